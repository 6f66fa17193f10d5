//! The combined margin's options and the family's second part: easy margin, InsightFace's
//! inter-class filter, AdaFace (its clipped angular form and norm-adaptive per-row
//! margins), MagFace (margins from the norms, its regulariser and radial part) and
//! CurricularFace (hard negatives above per-row thresholds). Every plan and 3 class
//! shards against the f64 reference on off-grid shapes; the options take effect; the
//! states update as the reference code's and round-trip through their bytes; the typed
//! errors.

mod common;

use margin_softmax::reference;
use margin_softmax::schedule::{
    AdaFace, AdaFaceState, CurricularFace, CurricularState, CurricularStep,
};
use margin_softmax::shard::sharded_loss_inputs;
use margin_softmax::{
    Algorithm, Error, HostInputs, LossOutput, LossParams, MagFace, Objective, Pass, Problem,
    Reduction, Shape, TargetGradient, IGNORE,
};

const PLANS: [Algorithm; 3] = [
    Algorithm::MemoryMinimal,
    Algorithm::Chunked,
    Algorithm::Unfused,
];

/// A seeded problem with one row ignored and the features of row 0 scaled by `spread`
/// and row 2 by 1/`spread` (AdaFace's norms then differ).
fn problem(b: usize, d: usize, c: usize, seed: u64, spread: f32) -> Problem {
    let mut p = Problem::random(Shape::new(b, d, c), seed);
    p.labels[1] = IGNORE;
    for (row, k) in [(0, spread), (2, 1.0 / spread)] {
        for v in &mut p.features[row * d..(row + 1) * d] {
            *v *= k;
        }
    }
    p
}

/// `inputs` on every plan and on 3 class shards, each against the reference, and the
/// shards' bits repeated; returns the chunked plan's output.
fn check_everywhere(inputs: &HostInputs<'_>, params: &LossParams) -> LossOutput {
    let ctx = common::context();
    let expected = reference::loss_inputs(inputs, params).expect("reference");
    let what = |how: &str| format!("{how} {:?} {params:?}", inputs.shape);
    let compare = |out: &LossOutput, how: &str| {
        let check = reference::compare(inputs.shape.dim, params, out, &expected);
        assert!(check.passes(), "{}: {check:?}", what(how));
        assert_eq!(
            out.valid_rows as usize,
            expected.valid_rows,
            "{}",
            what(how)
        );
        assert_eq!(
            out.margin_satisfied_rows as usize,
            expected.margin_satisfied_rows,
            "{}",
            what(how)
        );
    };
    let mut chunked = None;
    for algorithm in PLANS {
        let out: LossOutput = ctx
            .loss_inputs(inputs, params, Pass::ForwardBackward, Some(algorithm))
            .unwrap_or_else(|e| panic!("{}: {e}", what(&format!("{algorithm:?}"))));
        compare(&out, &format!("{algorithm:?}"));
        if algorithm == Algorithm::Chunked {
            chunked = Some(out);
        }
    }
    let shards =
        || -> LossOutput { sharded_loss_inputs(&[ctx; 3], inputs, params).expect("shards") };
    let sharded = shards();
    compare(&sharded, "3 shards");
    assert_eq!(
        sharded,
        shards(),
        "{}: shards repeat bit for bit",
        what("3 shards")
    );
    chunked.expect("the chunked plan ran")
}

/// The option in `out`'s parameters changes the loss: it differs from the reference's
/// without it (`plain`) by more than `relative` of that loss.
fn assert_changes_loss(
    out: &LossOutput,
    inputs: &HostInputs<'_>,
    plain: &LossParams,
    relative: f64,
) {
    let without = reference::loss_inputs(inputs, plain).expect("reference");
    assert!(
        (f64::from(out.loss) - without.loss).abs() > relative * without.loss.abs(),
        "{plain:?} plus the option at {:?}: the loss did not change",
        inputs.shape
    );
}

const SHAPES: [(usize, usize, usize); 3] = [(7, 13, 29), (9, 20, 37), (33, 6, 5)];

#[test]
fn easy_margin_and_filter_match_the_reference_on_every_plan_and_shards() {
    let options = [
        LossParams {
            easy_margin: true,
            ..LossParams::arcface()
        },
        LossParams {
            easy_margin: true,
            target_gradient: TargetGradient::StraightThrough,
            ..LossParams::arcface()
        },
        LossParams {
            interclass_filter: Some(0.2),
            ..LossParams::cosface()
        },
        LossParams {
            interclass_filter: Some(0.1),
            easy_margin: true,
            ..LossParams::arcface()
        },
    ];
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let p = problem(b, d, c, 80 + k as u64, 1.0);
        let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
        for params in options {
            let out = check_everywhere(&inputs, &params);
            // The option changes the loss: the shape has target cosines ≤ 0 and
            // non-target cosines above the thresholds.
            let plain = LossParams {
                easy_margin: false,
                interclass_filter: None,
                ..params
            };
            assert_changes_loss(&out, &inputs, &plain, 1e-3);
        }
    }
}

#[test]
fn adaface_matches_the_reference_on_every_plan_and_shards() {
    let ada = AdaFace::default();
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let p = problem(b, d, c, 90 + k as u64, 4.0);
        // A state near the batch's norms, so that ẑ takes both signs, and |ẑ| = 1 (the
        // clip) on the rows scaled by 4 and by 1/4.
        let mut state = AdaFaceState {
            mean: 2.0,
            std: 0.3,
        };
        let margins = ada.margins(&mut state, &p.features, d).expect("margins");
        assert!(margins.iter().any(|m| m[0] < 0.0) && margins.iter().any(|m| m[0] > 0.0));
        assert!(margins.iter().any(|m| m[0] == -0.4) && margins.iter().any(|m| m[0] == 0.4));
        let inputs =
            HostInputs::new(p.shape, &p.features, &p.classes, &p.labels).with_row_margins(&margins);
        for params in [
            ada.params(),
            LossParams {
                scale: 16.0,
                ..ada.params()
            },
        ] {
            check_everywhere(&inputs, &params);
        }
    }
}

/// The clipped form where it binds: θ + m2 clipped at ε (m2 = −1.6) and at π − ε
/// (m2 = 3), and the cosine clamped at ±(1 − ε) (rows whose feature is ± their class
/// vector, c = ±1), each with zero slope.
#[test]
fn clipped_form_matches_the_reference_where_it_binds() {
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let mut p = problem(b, d, c, 110 + k as u64, 1.0);
        // Rows 0 and 3 at ±(their class vector + 2% of another row): |c| near 0.9998,
        // inside the clamp's band, where the clamped slope still moves the gradients
        // (at |c| = 1 exactly the projections remove them).
        for (row, sign) in [(0usize, 2.0f32), (3, -1.0)] {
            let y = p.labels[row] as usize;
            let unit = |v: &[f32]| {
                let n = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                v.iter().map(|a| a / n).collect::<Vec<f32>>()
            };
            let class = unit(&p.classes[y * d..(y + 1) * d]);
            let other = unit(&p.features[4 * d..5 * d]);
            for e in 0..d {
                p.features[row * d + e] = sign * (class[e] + 0.02 * other[e]);
            }
        }
        // Rows 0 and 3 (c = ±1) take margins that leave their angle inside: only the
        // clamp binds there.
        let margins: Vec<[f32; 2]> = (0..b)
            .map(|i| match i {
                0 => [0.2, 0.0],
                3 => [-0.3, 0.1],
                _ if i % 3 == 0 => [-1.6, 0.0],
                _ if i % 3 == 1 => [3.0, 0.1],
                _ => [-0.3, 0.2],
            })
            .collect();
        let inputs =
            HostInputs::new(p.shape, &p.features, &p.classes, &p.labels).with_row_margins(&margins);
        // A small scale, so that 1 − p_iy (which the slope multiplies) is not 0.
        let params = LossParams {
            scale: 4.0,
            ..AdaFace::default().params()
        };
        let out = check_everywhere(&inputs, &params);
        for row in [0, 3] {
            let c = out.target_cos[row].abs();
            assert!(
                c > 0.999 && c < 0.99999,
                "row {row}: |c| = {c}, inside the clamp's band"
            );
        }
    }
}

/// MagFace on every plan and on 3 class shards: the margins from the norms (rows below
/// l_a, inside and above u_a), the kernels with them, then the regulariser and the
/// radial part on the host, against the f64 reference; bits repeat.
#[test]
fn magface_matches_the_reference_on_every_plan_and_shards() {
    let ctx = common::context();
    let magface = MagFace::default();
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let mut p = problem(b, d, c, 120 + k as u64, 1.0);
        // Row norms from about 3 to 150: row i scaled to 3 + 147·i/(B − 1).
        for i in 0..b {
            let row = &mut p.features[i * d..(i + 1) * d];
            let norm = row.iter().map(|v| v * v).sum::<f32>().sqrt();
            let target = 3.0 + 147.0 * i as f32 / (b - 1) as f32;
            row.iter_mut().for_each(|v| *v *= target / norm);
        }
        // A zero row: outside the clamp, its radial part 0 and its gradient finite.
        p.features[3 * d..4 * d].fill(0.0);
        let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
        for params in [
            magface.params(),
            LossParams {
                scale: 16.0,
                easy_margin: false,
                reduction: Reduction::Sum,
                ..magface.params()
            },
        ] {
            let expected = reference::magface_loss(&inputs, &magface, &params).expect("reference");
            let what = |how: &str| format!("{how} {:?} {params:?}", p.shape);
            let compare = |out: &LossOutput, how: &str| {
                let check = reference::compare(d, &params, out, &expected);
                assert!(check.passes(), "{}: {check:?}", what(how));
            };
            for algorithm in PLANS {
                let run = || {
                    magface
                        .loss(
                            ctx,
                            &inputs,
                            &params,
                            Pass::ForwardBackward,
                            Some(algorithm),
                        )
                        .expect("MagFace")
                };
                let out = run();
                compare(&out, &format!("{algorithm:?}"));
                let grads = out.grads.as_ref().expect("gradients");
                assert!(
                    grads.features.iter().all(|v| v.is_finite()),
                    "{}",
                    what("finite")
                );
                assert_eq!(out, run(), "{}", what("repeat"));
            }
            let margins = magface.margins(&p.features, d).expect("margins");
            let mut sharded: LossOutput =
                sharded_loss_inputs(&[ctx; 3], &inputs.with_row_margins(&margins), &params)
                    .expect("shards");
            magface
                .finish(&inputs, &params, &mut sharded)
                .expect("finish");
            compare(&sharded, "3 shards");
        }
    }
}

/// CurricularFace on every plan and on 3 class shards: t from three steps of state (so
/// nonzero), each row's threshold φ_i from the host, against the reference (which takes
/// φ_i from its own cosines); the hard negatives change the loss.
#[test]
fn curricular_matches_the_reference_on_every_plan_and_shards() {
    let curricular = CurricularFace::default();
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let p = problem(b, d, c, 130 + k as u64, 1.0);
        let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
        let mut state = CurricularState { t: 0.3 };
        let step = curricular.step(&mut state, &inputs).expect("step");
        let with = inputs.with_hard_thresholds(&step.hard_thresholds);
        // Thresholds that are not the rows' own: every non-target hard (−2), none (2).
        for t in [-2.0f32, 2.0] {
            let thresholds = vec![t; b];
            check_everywhere(&inputs.with_hard_thresholds(&thresholds), &step.params);
        }
        for params in [
            step.params,
            LossParams {
                scale: 16.0,
                interclass_filter: Some(0.5),
                ..step.params
            },
        ] {
            let out = check_everywhere(&with, &params);
            let plain = LossParams {
                curricular: None,
                ..params
            };
            assert_changes_loss(&out, &inputs, &plain, 1e-4);
        }
    }
}

/// t ← 0.01·mean(c_iy) + 0.99·t over labelled rows, before use; saved and restored, the
/// next steps give the same bits; thresholds are ArcFace's ψ of each target cosine.
#[test]
fn curricular_state_updates_before_use_and_round_trips() {
    let curricular = CurricularFace::default();
    let p = problem(9, 20, 37, 140, 1.0);
    let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
    let expected = reference::loss_inputs(&inputs, &LossParams::arcface()).expect("reference");
    let labelled: Vec<usize> = (0..9).filter(|&i| p.labels[i] != IGNORE).collect();
    let mean = labelled
        .iter()
        .map(|&i| expected.target_cos[i])
        .sum::<f64>()
        / labelled.len() as f64;
    let mut state = CurricularState::default();
    let step = curricular.step(&mut state, &inputs).expect("step");
    assert!(
        (f64::from(state.t) - 0.01 * mean).abs() < 1e-7,
        "t = {}",
        state.t
    );
    assert_eq!(step.params.curricular, Some(state.t));
    for &i in &labelled {
        // cos(θ + m) without ArcFace's fallback.
        let theta = expected.target_cos[i].acos();
        let psi = (theta + 0.5).cos();
        assert!((f64::from(step.hard_thresholds[i]) - psi).abs() < 1e-6);
    }
    assert_eq!(
        step.hard_thresholds[1], 2.0,
        "the ignored row has no hard negatives"
    );
    // Past θ + m = π the threshold stays the raw cos(θ + m), not ArcFace's fallback.
    let far = curricular
        .step_from_target_cosines(&mut CurricularState::default(), &[Some(-0.95), None])
        .expect("step");
    let raw = ((-0.95f64).acos() + 0.5).cos();
    assert!((f64::from(far.hard_thresholds[0]) - raw).abs() < 1e-6);
    assert_eq!(far.hard_thresholds[1], 2.0);
    let saved = state.to_bytes();
    let run_on: Vec<CurricularStep> = (0..3)
        .map(|_| curricular.step(&mut state, &inputs).expect("step"))
        .collect();
    let mut restored = CurricularState::from_bytes(saved);
    for expected in &run_on {
        assert_eq!(
            &curricular.step(&mut restored, &inputs).expect("step"),
            expected
        );
    }
    assert_eq!(restored, state);
}

/// head.py's update, written out for three rows: clip, mean, unbiased std, momentum, then
/// ẑ from the updated statistics.
#[test]
fn adaface_state_updates_before_use_as_head_py() {
    let ada = AdaFace::default();
    // Rows of D = 3 with norms 3 (3, 0, 0), 4 (0, 0, 4), 1e-6 (clipped to 0.001) and 500
    // (clipped to 100).
    let x = [
        3.0f32, 0.0, 0.0, 0.0, 0.0, 4.0, 1e-6, 0.0, 0.0, 0.0, 500.0, 0.0,
    ];
    let mut state = AdaFaceState::default();
    let margins = ada.margins(&mut state, &x, 3).expect("margins");
    let norms = [3.0f64, 4.0, 0.001, 100.0];
    let mean = norms.iter().sum::<f64>() / 4.0;
    let std = (norms.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / 3.0).sqrt();
    let mu = (0.01 * mean + 0.99 * 20.0) as f32;
    let sigma = (0.01 * std + 0.99 * 100.0) as f32;
    assert_eq!(
        state,
        AdaFaceState {
            mean: mu,
            std: sigma
        }
    );
    for (i, a) in norms.iter().enumerate() {
        let z = (0.333 * (a - f64::from(mu)) / (f64::from(sigma) + 1e-3)).clamp(-1.0, 1.0);
        let expected = [(-0.4 * z) as f32, (0.4 + 0.4 * z) as f32];
        for (got, want) in margins[i].iter().zip(expected) {
            assert!(
                (got - want).abs() <= 1e-6,
                "row {i}: {:?} against {expected:?}",
                margins[i]
            );
        }
    }
    // From μ = 1, σ = 1 the norm of 500 (taken as 100) gives ẑ past 1: clipped to 1.
    let mut near = AdaFaceState {
        mean: 1.0,
        std: 1.0,
    };
    let clipped = ada.margins(&mut near, &x, 3).expect("margins");
    assert_eq!(clipped[3], [-0.4, 0.8], "ẑ clipped to 1");
    let counted = 0.01 * mean + 0.99;
    assert!(
        (f64::from(near.mean) - counted).abs() < 1e-6,
        "the norm of 500 counts as 100: μ = {}",
        near.mean
    );
    // One row has no standard deviation: σ stays, μ moves.
    let mut one = AdaFaceState::default();
    ada.margins(&mut one, &[3.0f32, 4.0], 2).expect("one row");
    assert_eq!(one.std, 100.0);
    assert_eq!(one.mean, (0.01 * 5.0 + 0.99 * 20.0) as f32);
    assert!(matches!(
        ada.margins(&mut one, &[1.0f32; 5], 2),
        Err(Error::LengthMismatch { .. })
    ));
}

/// Saving the state after a step and restoring it gives the next steps the same margins,
/// bit for bit, as running on.
#[test]
fn adaface_state_round_trips_through_save_and_restore() {
    let ada = AdaFace::default();
    let batches: Vec<Problem> = (0..4).map(|k| problem(9, 20, 37, 100 + k, 3.0)).collect();
    let mut state = AdaFaceState::default();
    let mut saved = None;
    let mut run_on = Vec::new();
    for (step, p) in batches.iter().enumerate() {
        run_on.push(ada.margins(&mut state, &p.features, 20).expect("margins"));
        if step == 1 {
            saved = Some(state.to_bytes());
        }
    }
    let mut restored = AdaFaceState::from_bytes(saved.expect("saved"));
    for (step, p) in batches.iter().enumerate().skip(2) {
        let m = ada
            .margins(&mut restored, &p.features, 20)
            .expect("margins");
        assert_eq!(m, run_on[step], "step {step}");
    }
    assert_eq!(restored, state);
    assert_eq!(AdaFaceState::from_bytes(state.to_bytes()), state);
}

#[test]
fn bad_options_are_typed_errors() {
    let ctx = common::context();
    let p = problem(4, 5, 6, 1, 1.0);
    let inputs = HostInputs::new(p.shape, &p.features, &p.classes, &p.labels);
    let name_of = |params: LossParams, margins: Option<&[[f32; 2]]>| {
        let inputs = match margins {
            Some(m) => inputs.with_row_margins(m),
            None => inputs,
        };
        match ctx.loss_inputs::<f32, f32, f32, f32>(&inputs, &params, Pass::Forward, None) {
            Err(Error::InvalidParameter { name, .. }) => name,
            other => panic!("{params:?}: expected InvalidParameter, got {other:?}"),
        }
    };
    for t in [1.5, -2.0, f32::NAN] {
        let params = LossParams {
            interclass_filter: Some(t),
            ..LossParams::default()
        };
        assert_eq!(name_of(params, None), "interclass_filter");
    }
    let hard = LossParams {
        interclass_filter: Some(0.4),
        objective: Objective::HardMargin,
        ..LossParams::default()
    };
    assert_eq!(name_of(hard, None), "interclass_filter");
    let sphere = LossParams {
        angle_clip: true,
        ..LossParams::sphereface(2)
    };
    assert_eq!(name_of(sphere, None), "multiplicative_margin");
    // A negative angular margin needs the clipped form.
    let negative = [[-0.2, 0.4]; 4];
    assert_eq!(
        name_of(LossParams::default(), Some(&negative)),
        "row_margins (m2_i)"
    );
    let magface = MagFace::default();
    for (params, name) in [
        (
            LossParams {
                objective: Objective::HardMargin,
                ..magface.params()
            },
            "objective",
        ),
        (
            LossParams {
                angle_clip: true,
                ..magface.params()
            },
            "angle_clip",
        ),
    ] {
        match magface.loss(ctx, &inputs, &params, Pass::Forward, None) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{params:?}: {other:?}"),
        }
    }
    let inverted = MagFace {
        upper_norm: 5.0,
        ..magface
    };
    match inverted.loss(ctx, &inputs, &magface.params(), Pass::Forward, None) {
        Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, "upper_norm"),
        other => panic!("u_a < l_a: {other:?}"),
    }
    // CurricularFace's t and thresholds come together, B of them.
    let curricular = LossParams {
        curricular: Some(0.1),
        ..LossParams::arcface()
    };
    assert_eq!(name_of(curricular, None), "curricular");
    let thresholds = [0.5f32; 4];
    let call = |params: &LossParams, t: &[f32]| {
        ctx.loss_inputs::<f32, f32, f32, f32>(
            &inputs.with_hard_thresholds(t),
            params,
            Pass::Forward,
            None,
        )
    };
    assert!(call(&curricular, &thresholds).is_ok());
    assert!(matches!(
        call(&LossParams::arcface(), &thresholds),
        Err(Error::InvalidParameter {
            name: "curricular",
            ..
        })
    ));
    assert!(matches!(
        call(&curricular, &thresholds[..3]),
        Err(Error::LengthMismatch {
            input: "hard_thresholds",
            ..
        })
    ));
    let hard = LossParams {
        objective: Objective::HardMargin,
        ..curricular
    };
    assert!(matches!(
        call(&hard, &thresholds),
        Err(Error::InvalidParameter {
            name: "curricular",
            ..
        })
    ));
    let clip = AdaFace::default().params();
    assert!(ctx
        .loss_inputs::<f32, f32, f32, f32>(
            &inputs.with_row_margins(&negative),
            &clip,
            Pass::Forward,
            None
        )
        .is_ok());
}
