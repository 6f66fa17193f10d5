//! The f64 reference's gradients against central finite differences of its own loss:
//! this is what shows that the reference, and so every comparison with it, is right.

use margin_softmax::reference::{loss_f64, magface_loss_f64, ReferenceOutput};
use margin_softmax::{LossParams, MagFace, Objective, Problem, Reduction, Shape, IGNORE};

/// Central differences with step h·max(1, |v|): truncation O(h²) ≈ 1e-12 and rounding
/// O(ε_f64/h) ≈ 1e-10, so 1e-6 relative to the largest gradient is a wide, honest margin.
const H: f64 = 1e-6;
const BOUND: f64 = 1e-6;

fn fd_check(shape: Shape, seed: u64, params: LossParams) {
    fd_check_rows(shape, seed, params, None);
}

/// [`fd_check`] with per-row margins (m2_i, m3_i), where given.
fn fd_check_rows(shape: Shape, seed: u64, params: LossParams, row_margins: Option<&[[f32; 2]]>) {
    let (x, w, labels) = fd_problem(shape, seed, 1.0);
    let eval =
        |x: &[f64], w: &[f64], s: f64| loss_f64(shape, x, w, (&labels, row_margins), &params, s);
    fd_compare(
        &format!("{shape:?} {params:?}"),
        (&x, &w),
        f64::from(params.scale),
        &eval,
    );
}

/// A seeded problem in f64 (row 1 ignored where B > 2), row i's features scaled by
/// `spread`^i.
fn fd_problem(shape: Shape, seed: u64, spread: f64) -> (Vec<f64>, Vec<f64>, Vec<u32>) {
    let p = Problem::random(shape, seed);
    let mut labels = p.labels.clone();
    if shape.batch > 2 {
        labels[1] = IGNORE;
    }
    let d = shape.dim.max(1);
    let x: Vec<f64> = (0..p.features.len())
        .map(|e| f64::from(p.features[e]) * spread.powi((e / d) as i32))
        .collect();
    let w: Vec<f64> = p.classes.iter().map(|&v| f64::from(v)).collect();
    (x, w, labels)
}

/// A reference loss at (x, w, s).
type LossAt<'a> = dyn Fn(&[f64], &[f64], f64) -> ReferenceOutput + 'a;

/// The gradients `eval` reports at (x, w, scale) against central differences of its loss.
fn fd_compare(what: &str, (x, w): (&[f64], &[f64]), scale: f64, eval: &LossAt<'_>) {
    let base = eval(x, w, scale);
    let check = |name: &str, analytic: &[f64], numeric: &[f64]| {
        let scale = analytic
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(1e-300);
        let err = analytic
            .iter()
            .zip(numeric)
            .fold(0.0f64, |m, (a, n)| m.max((a - n).abs()));
        assert!(
            err / scale < BOUND,
            "{name} {what}: rel err {:.3e}",
            err / scale
        );
    };
    let numeric = |v: &[f64], f: &dyn Fn(&[f64]) -> f64| -> Vec<f64> {
        (0..v.len())
            .map(|k| {
                let step = H * v[k].abs().max(1.0);
                let mut plus = v.to_vec();
                let mut minus = v.to_vec();
                plus[k] += step;
                minus[k] -= step;
                (f(&plus) - f(&minus)) / (2.0 * step)
            })
            .collect()
    };
    let gx = numeric(x, &|x| eval(x, w, scale).loss);
    check("dL/dx", &base.grad_features, &gx);
    let gw = numeric(w, &|w| eval(x, w, scale).loss);
    check("dL/dw", &base.grad_classes, &gw);
    let gs = numeric(&[scale], &|s| eval(x, w, s[0]).loss);
    check("dL/ds", &[base.grad_scale], &gs);
}

fn with(scale: f32, margin: f32, reduction: Reduction) -> LossParams {
    LossParams {
        scale,
        margin,
        reduction,
        ..LossParams::default()
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    fd_check(Shape::new(5, 7, 9), 1, with(30.0, 0.35, Reduction::Mean));
    fd_check(Shape::new(3, 4, 6), 2, with(5.0, 0.0, Reduction::Sum));
    fd_check(Shape::new(1, 1, 1), 3, with(10.0, 0.2, Reduction::Mean));
    fd_check(Shape::new(4, 3, 2), 4, with(64.0, 0.5, Reduction::None));
}

#[test]
fn margin_family_gradients_match_finite_differences() {
    // Random cosines stay away from θ = 0 and π, where the exact slopes are smooth.
    let shape = Shape::new(5, 6, 7);
    fd_check(
        shape,
        5,
        LossParams {
            scale: 16.0,
            ..LossParams::arcface()
        },
    );
    for m1 in [2, 3, 4] {
        fd_check(
            shape,
            6,
            LossParams {
                scale: 8.0,
                ..LossParams::sphereface(m1)
            },
        );
    }
    fd_check(
        shape,
        7,
        LossParams {
            angular_margin: 0.3,
            margin: 0.1,
            scale: 12.0,
            ..LossParams::default()
        },
    );
    // The hard objective is piecewise linear: its kinks have measure zero.
    fd_check(
        shape,
        8,
        LossParams {
            objective: Objective::HardMargin,
            ..LossParams::default()
        },
    );
}

/// Per-row margins, each row its own (m2_i, m3_i): CosFace's (m2 = 0), ArcFace's, the
/// combined form, and an angular margin past θ + m2 = π for some rows (the fallback).
#[test]
fn per_row_margin_gradients_match_finite_differences() {
    let shape = Shape::new(6, 5, 7);
    let margins = [
        [0.0, 0.35],
        [0.5, 0.0],
        [0.3, 0.1],
        [2.9, 0.0],
        [0.0, -0.2],
        [1.2, 0.4],
    ];
    let params = LossParams {
        scale: 12.0,
        ..LossParams::default()
    };
    fd_check_rows(shape, 9, params, Some(&margins));
    let sum = LossParams {
        reduction: Reduction::Sum,
        ..params
    };
    fd_check_rows(shape, 10, sum, Some(&margins));
}

/// Easy margin (ψ = c where c ≤ 0) on ArcFace and on the combined form, and the
/// inter-class filter (non-target cosines above t count as 0): random cosines of D = 6
/// fall on both sides of 0 and of t, never within the step of either jump.
#[test]
fn easy_margin_and_filter_gradients_match_finite_differences() {
    let shape = Shape::new(6, 6, 9);
    for (seed, params) in [
        LossParams {
            scale: 16.0,
            easy_margin: true,
            ..LossParams::arcface()
        },
        LossParams {
            scale: 12.0,
            angular_margin: 0.3,
            margin: 0.1,
            easy_margin: true,
            ..LossParams::default()
        },
        LossParams {
            scale: 16.0,
            interclass_filter: Some(0.2),
            ..LossParams::default()
        },
        LossParams {
            scale: 16.0,
            interclass_filter: Some(0.0),
            easy_margin: true,
            reduction: Reduction::Sum,
            ..LossParams::arcface()
        },
    ]
    .into_iter()
    .enumerate()
    {
        let plain = LossParams {
            easy_margin: false,
            interclass_filter: None,
            ..params
        };
        fd_check_option(shape, 20 + seed as u64, params, plain);
    }
}

/// [`fd_check`] of `params`, whose option must change the loss against `plain`.
fn fd_check_option(shape: Shape, seed: u64, params: LossParams, plain: LossParams) {
    fd_check(shape, seed, params);
    assert_ne!(
        loss_of(shape, seed, params, None),
        loss_of(shape, seed, plain, None),
        "{params:?} takes effect"
    );
}

/// The reference's loss on [`fd_check`]'s problem.
fn loss_of(shape: Shape, seed: u64, params: LossParams, row_margins: Option<&[[f32; 2]]>) -> f64 {
    let (x, w, labels) = fd_problem(shape, seed, 1.0);
    loss_f64(
        shape,
        &x,
        &w,
        (&labels, row_margins),
        &params,
        f64::from(params.scale),
    )
    .loss
}

/// AdaFace's clipped form with its per-row margins (m2_i, m3_i) = (−m·ẑ, m + m·ẑ): ẑ from
/// −1 to 1, some rows with θ + m2 clipped at ε (zero slope), negative m2 elsewhere.
#[test]
fn clipped_angle_gradients_match_finite_differences() {
    let shape = Shape::new(6, 5, 7);
    let m = 0.4f32;
    let margins: Vec<[f32; 2]> = [-1.0f32, -0.4, 0.0, 0.3, 1.0, 0.8]
        .iter()
        .map(|z| [-m * z, m + m * z])
        .collect();
    let params = LossParams {
        scale: 12.0,
        margin: 0.0,
        angle_clip: true,
        ..LossParams::default()
    };
    fd_check_rows(shape, 30, params, Some(&margins));
    // Angles clipped: m2 = −1.6 takes θ + m2 below ε wherever θ < 1.6 (c > −0.03), and
    // m2 = 3 past π − ε wherever θ > 0.14; there ψ is constant and its slope 0.
    let clipped = [
        [-1.6, 0.0],
        [3.0, 0.1],
        [-1.6, 0.2],
        [3.0, 0.0],
        [0.2, 0.0],
        [-0.2, 0.1],
    ];
    fd_check_rows(shape, 31, params, Some(&clipped));
    let unclipped = LossParams {
        angle_clip: false,
        ..params
    };
    // The same non-negative margins in both forms: m2 = 3 clips at π − ε in one and
    // takes ArcFace's fallback in the other.
    let margins = [
        [1.6, 0.0],
        [3.0, 0.1],
        [1.6, 0.2],
        [3.0, 0.0],
        [0.2, 0.0],
        [0.2, 0.1],
    ];
    assert_ne!(
        loss_of(shape, 31, params, Some(&margins)),
        loss_of(shape, 31, unclipped, Some(&margins)),
        "the clip differs from ArcFace's fallback"
    );
}

/// MagFace: norms from about 2 to 200 (rows below l_a, inside and above u_a), each row's
/// margin m(â) moving with x, the regulariser, and dL/dx's radial part (zero outside the
/// clamp), with and without the easy margin, mean and sum.
#[test]
fn magface_gradients_match_finite_differences() {
    let shape = Shape::new(7, 5, 6);
    let magface = MagFace {
        lower_norm: 4.0,
        upper_norm: 60.0,
        ..MagFace::default()
    };
    // Row i's features times 1.9^i: norms from about 2 to 100.
    let (x, w, labels) = fd_problem(shape, 40, 1.9);
    for params in [
        LossParams {
            scale: 16.0,
            ..magface.params()
        },
        LossParams {
            scale: 8.0,
            easy_margin: false,
            reduction: Reduction::Sum,
            ..magface.params()
        },
    ] {
        let eval = |x: &[f64], w: &[f64], s: f64| {
            magface_loss_f64(shape, (x, w), &labels, &magface, &params, s)
        };
        fd_compare(
            &format!("MagFace {params:?}"),
            (&x, &w),
            f64::from(params.scale),
            &eval,
        );
    }
}

/// CurricularFace: hard non-targets (c_j above the row's ArcFace target ψ) counted as
/// c_j·(t + c_j), with t of either sign; random cosines of D = 6 put several above ψ.
#[test]
fn curricular_gradients_match_finite_differences() {
    let shape = Shape::new(6, 6, 9);
    for (seed, t) in [(50u64, 0.3f32), (51, -0.2), (52, 0.0)] {
        let params = LossParams {
            scale: 16.0,
            curricular: Some(t),
            ..LossParams::arcface()
        };
        let plain = LossParams {
            curricular: None,
            ..params
        };
        fd_check_option(shape, seed, params, plain);
    }
}
