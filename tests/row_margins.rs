//! Per-row margins (m2_i, m3_i): each row's target takes its own angular and cosine
//! margin, z_iy = s·(cos(θ + m2_i) − m3_i), the mechanism under AdaFace, MagFace and
//! ElasticFace. Every plan and 3 class shards against the f64 reference with the same
//! margins; the same margin on every row against the parameters' margin; the typed
//! errors; repeatable bits.

mod common;

use margin_softmax::reference;
use margin_softmax::shard::sharded_loss_inputs;
use margin_softmax::{
    Algorithm, Error, HostInputs, LossOutput, LossParams, Objective, Pass, Problem, Shape,
    SplitMix64, TargetGradient, IGNORE,
};

const PLANS: [Algorithm; 3] = [
    Algorithm::MemoryMinimal,
    Algorithm::Chunked,
    Algorithm::Unfused,
];

/// B margins from a seeded generator: angular margins from 0 to 0.8 (a quarter of the
/// rows none: CosFace's path), one near π (ArcFace's fallback for most cosines), and
/// cosine margins from −0.1 to 0.4.
fn margins(b: usize, seed: u64) -> Vec<[f32; 2]> {
    let mut rng = SplitMix64::new(seed);
    (0..b)
        .map(|i| {
            let unit = |rng: &mut SplitMix64| 0.5 * (rng.next_signed() + 1.0);
            let m2 = match i % 4 {
                0 => 0.0,
                3 if i == 3 => 3.0,
                _ => 0.8 * unit(&mut rng),
            };
            [m2, -0.1 + 0.5 * unit(&mut rng)]
        })
        .collect()
}

/// A seeded problem with one row ignored.
fn problem(b: usize, d: usize, c: usize, seed: u64) -> Problem {
    let mut p = Problem::random(Shape::new(b, d, c), seed);
    p.labels[1] = IGNORE;
    p
}

/// `p` with per-row `margins` on `algorithm`, checked against the reference.
fn check(
    algorithm: Algorithm,
    p: &Problem,
    margins: &[[f32; 2]],
    params: &LossParams,
) -> LossOutput {
    let inputs =
        HostInputs::new(p.shape, &p.features, &p.classes, &p.labels).with_row_margins(margins);
    let what = format!("{algorithm:?} {:?} {params:?}", p.shape);
    let out: LossOutput = common::context()
        .loss_inputs(&inputs, params, Pass::ForwardBackward, Some(algorithm))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let expected = reference::loss_inputs(&inputs, params).expect("reference");
    let check = reference::compare(p.shape.dim, params, &out, &expected);
    assert!(check.passes(), "{what}: {check:?}");
    assert_eq!(out.valid_rows as usize, expected.valid_rows, "{what}");
    assert_eq!(
        out.margin_satisfied_rows as usize, expected.margin_satisfied_rows,
        "{what}"
    );
    out
}

#[test]
fn per_row_margins_match_the_reference_on_every_plan() {
    let hard = LossParams {
        objective: Objective::HardMargin,
        ..LossParams::default()
    };
    let straight = LossParams {
        target_gradient: TargetGradient::StraightThrough,
        ..LossParams::cosface()
    };
    for (k, &(b, d, c)) in [(7, 13, 29), (9, 20, 37), (33, 6, 5)].iter().enumerate() {
        let p = problem(b, d, c, 40 + k as u64);
        let m = margins(b, 50 + k as u64);
        for params in [LossParams::default(), LossParams::cosface(), hard, straight] {
            for algorithm in PLANS {
                check(algorithm, &p, &m, &params);
            }
        }
    }
}

/// The same (m2, m3) on every row is the parameters' margin: the same loss and
/// gradients, within the bounds (the kernels take cos m2 and sin m2 from their own
/// series rather than the host's), and both within the reference's.
#[test]
fn one_margin_on_every_row_is_the_parameters_margin() {
    let ctx = common::context();
    let p = problem(9, 20, 37, 3);
    for params in [
        LossParams::arcface(),
        LossParams::cosface(),
        LossParams::default(),
    ] {
        let row = [[params.angular_margin, params.margin]; 9];
        let zero = LossParams {
            angular_margin: 0.0,
            margin: 0.0,
            ..params
        };
        let per_row = check(Algorithm::Chunked, &p, &row, &zero);
        let uniform = ctx
            .loss_on(&p, &params, Pass::ForwardBackward)
            .expect("uniform");
        let expected = reference::loss_on(&p, &params).expect("reference");
        let check = reference::compare(20, &params, &per_row, &expected);
        assert!(check.passes(), "{params:?}: {check:?}");
        assert_eq!(per_row.pred, uniform.pred);
        assert_eq!(per_row.margin_satisfied_rows, uniform.margin_satisfied_rows);
    }
}

#[test]
fn three_class_shards_take_per_row_margins() {
    let ctx = common::context();
    let params = LossParams::default();
    for (k, &(b, d, c)) in [(7, 13, 29), (9, 20, 37)].iter().enumerate() {
        let p = problem(b, d, c, 60 + k as u64);
        let m = margins(b, 70 + k as u64);
        let inputs =
            HostInputs::new(p.shape, &p.features, &p.classes, &p.labels).with_row_margins(&m);
        let run =
            || -> LossOutput { sharded_loss_inputs(&[ctx; 3], &inputs, &params).expect("shards") };
        let out = run();
        let expected = reference::loss_inputs(&inputs, &params).expect("reference");
        let check = reference::compare(d, &params, &out, &expected);
        assert!(check.passes(), "{:?}: {check:?}", p.shape);
        assert_eq!(out, run(), "sharded results repeat bit for bit");
    }
}

#[test]
fn per_row_results_repeat_bit_for_bit() {
    let p = problem(9, 20, 37, 8);
    let m = margins(9, 9);
    for algorithm in PLANS {
        let a = check(algorithm, &p, &m, &LossParams::default());
        let b = check(algorithm, &p, &m, &LossParams::default());
        assert_eq!(a, b, "{algorithm:?}");
    }
}

#[test]
fn bad_per_row_margins_are_typed_errors() {
    let ctx = common::context();
    let p = problem(4, 5, 6, 1);
    let call = |m: &[[f32; 2]], params: &LossParams| {
        let inputs =
            HostInputs::new(p.shape, &p.features, &p.classes, &p.labels).with_row_margins(m);
        ctx.loss_inputs::<f32, f32, f32, f32>(&inputs, params, Pass::Forward, None)
    };
    let ok = [[0.2, 0.1]; 4];
    assert!(call(&ok, &LossParams::default()).is_ok());
    assert!(matches!(
        call(&ok[..3], &LossParams::default()),
        Err(Error::LengthMismatch {
            input: "row_margins",
            expected: 4,
            actual: 3
        })
    ));
    for (bad, name) in [
        ([4.0, 0.0], "row_margins (m2_i)"),
        ([-0.1, 0.0], "row_margins (m2_i)"),
        ([f32::NAN, 0.0], "row_margins (m2_i)"),
        ([0.1, 2.5], "row_margins (m3_i)"),
        ([0.1, f32::INFINITY], "row_margins (m3_i)"),
    ] {
        let mut m = ok;
        m[2] = bad;
        match call(&m, &LossParams::default()) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name, "{bad:?}"),
            other => panic!("{bad:?}: expected InvalidParameter({name}), got {other:?}"),
        }
    }
    match call(&ok, &LossParams::sphereface(3)) {
        Err(Error::InvalidParameter { name, .. }) => assert_eq!(name, "multiplicative_margin"),
        other => panic!("per-row margins with m1 = 3: {other:?}"),
    }
}
