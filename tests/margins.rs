//! The margin family against the f64 reference on the GPU: CosFace, ArcFace and
//! SphereFace margins, exact and straight-through target gradients, the hard objective,
//! target cosines at ±1 and within 1e-4 of them, the statistics, and the scale helpers.

mod common;

use common::{check_against_reference, context};
use margin_softmax::{
    cosface_scale_floor, reference, Error, LearnableScale, LossParams, Objective, Pass, Problem,
    Shape, TargetGradient,
};

fn modes() -> Vec<(&'static str, LossParams)> {
    let mut modes = vec![
        ("am-softmax", LossParams::am_softmax()),
        ("cosface", LossParams::cosface()),
        ("arcface", LossParams::arcface()),
        (
            "arcface m2=1.2",
            LossParams {
                angular_margin: 1.2,
                ..LossParams::arcface()
            },
        ),
        (
            "combined (1, 0.3, 0.2)",
            LossParams {
                angular_margin: 0.3,
                margin: 0.2,
                ..LossParams::default()
            },
        ),
    ];
    for m1 in [2, 3, 4] {
        modes.push(("sphereface", LossParams::sphereface(m1)));
    }
    let mut all = Vec::new();
    for (name, p) in modes {
        all.push((name, p));
        all.push((
            name,
            LossParams {
                target_gradient: TargetGradient::StraightThrough,
                ..p
            },
        ));
        all.push((
            name,
            LossParams {
                objective: Objective::HardMargin,
                ..p
            },
        ));
    }
    all
}

#[test]
fn every_mode_matches_the_reference() {
    let problem = Problem::random(Shape::new(21, 13, 67), 40);
    for (name, params) in modes() {
        check_against_reference(context(), &problem, &params, name);
    }
}

/// Rows whose target cosine is exactly 1 or −1, or within 1e-4 of either.
fn problem_at_the_ends() -> Problem {
    let mut p = Problem::random(Shape::new(8, 16, 40), 41);
    let d = p.shape.dim;
    for (i, (sign, tilt)) in [
        (1.0f32, 0.0f32),
        (-1.0, 0.0),
        (1.0, 0.014),
        (-1.0, 0.014),
        (1.0, 0.3),
        (-1.0, 0.3),
    ]
    .into_iter()
    .enumerate()
    {
        let y = p.labels[i] as usize;
        // x = ±w_y + tilt·(a direction across w_y): cos θ = ±1, or 1 − cos within about
        // tilt²/2 = 1e-4 of ±1.
        let w: Vec<f32> = p.classes[y * d..(y + 1) * d].to_vec();
        let norm = w.iter().map(|v| v * v).sum::<f32>().sqrt();
        for k in 0..d {
            let across = if k % 2 == 0 { w[k + 1] } else { -w[k - 1] } / norm;
            p.features[i * d + k] = sign * w[k] / norm + tilt * across;
        }
    }
    p
}

#[test]
fn target_cosines_at_and_near_plus_and_minus_one() {
    let p = problem_at_the_ends();
    for (name, params) in modes() {
        let out = check_against_reference(context(), &p, &params, name);
        assert!(out.grads.iter().all(|g| g
            .features
            .iter()
            .chain(&g.classes)
            .all(|v| v.is_finite())));
        assert!((out.target_cos[0] - 1.0).abs() < 1e-6 && (out.target_cos[1] + 1.0).abs() < 1e-6);
    }
}

#[test]
fn statistics_match_the_reference() {
    let p = Problem::random(Shape::new(30, 8, 12), 42);
    let params = LossParams::arcface();
    let out = context().loss_on(&p, &params, Pass::Forward).expect("loss");
    let r = reference::loss_on(&p, &params).expect("reference");
    assert_eq!(out.margin_satisfied_rows as usize, r.margin_satisfied_rows);
    for i in 0..30 {
        assert!((f64::from(out.achieved_margin[i]) - r.achieved_margin[i]).abs() < 1e-5);
        // p_y = exp(−L_i) for the softmax objective.
        assert!((out.target_prob[i] - (-out.row_loss[i]).exp()).abs() < 1e-5);
    }
}

#[test]
fn invalid_margins_are_rejected() {
    let p = Problem::random(Shape::new(2, 3, 4), 43);
    for (params, name) in [
        (
            LossParams {
                angular_margin: 3.5,
                ..LossParams::arcface()
            },
            "angular_margin",
        ),
        (
            LossParams {
                angular_margin: -0.1,
                ..LossParams::arcface()
            },
            "angular_margin",
        ),
        (
            LossParams {
                multiplicative_margin: 0,
                ..LossParams::default()
            },
            "multiplicative_margin",
        ),
        (
            LossParams {
                multiplicative_margin: 17,
                ..LossParams::default()
            },
            "multiplicative_margin",
        ),
        (
            LossParams {
                angular_margin: 0.2,
                ..LossParams::sphereface(2)
            },
            "angular_margin",
        ),
    ] {
        match context().loss_on(&p, &params, Pass::Forward) {
            Err(Error::InvalidParameter { name: n, .. }) => assert_eq!(n, name),
            other => panic!("{params:?}: expected InvalidParameter({name}), got {other:?}"),
        }
    }
}

#[test]
fn learnable_scale_respects_its_floor() {
    let mut s = LearnableScale::new(12.0, 10.0);
    s.sgd_step(1.0, 1.0);
    assert_eq!(s.value, 11.0);
    s.sgd_step(5.0, 1.0);
    assert_eq!(s.value, 10.0, "held at the floor");
    s.sgd_step(f32::NAN, 1.0);
    assert_eq!(s.value, 10.0, "a non-finite step is ignored");
    assert_eq!(LearnableScale::new(3.0, 10.0).effective(), 10.0);
    // CosFace's bound: C = 10 000 classes and P = 0.9 need s ≥ 11.4.
    let floor = cosface_scale_floor(10_000, 0.9);
    assert!((floor - 0.9999 * (9999.0f64 * 9.0).ln()).abs() < 1e-9 && (floor - 11.41).abs() < 0.01);
    assert_eq!(cosface_scale_floor(1, 0.9), 0.0);
    assert!(cosface_scale_floor(10, 1.0).is_nan());
    // Below its floor the scale gets no gradient through the loss.
    let p = Problem::random(Shape::new(4, 4, 6), 44);
    let params = LearnableScale::new(3.0, 10.0).apply(LossParams::default());
    let out = context().loss_on(&p, &params, Pass::Forward).expect("loss");
    assert_eq!(out.grad_scale, 0.0);
}

/// SphereFace's slope next to the ends of its pieces, θ = jπ/m1 ± δ: there
/// dψ/dc = m1·U_{m1−1}(c) is near 0 and the piece index k near a jump, and a GPU's acos
/// (accurate to about 1e-4 rad on some drivers) must not flip the slope's sign. The
/// property test found θ = 2π/3 − 2e-5 (m1 = 3) giving dL/dw the wrong sign.
#[test]
fn sphereface_slopes_keep_their_sign_at_the_ends_of_its_pieces() {
    let ctx = context();
    for m1 in [2u32, 3, 4] {
        let mut problem = Problem::random(Shape::new(12, 2, 12), 44 + u64::from(m1));
        let mut row = 0;
        for j in 1..m1 {
            for delta in [-2e-4f64, -2e-5, 2e-5, 2e-4] {
                if row == problem.shape.batch {
                    break;
                }
                // x_i = (1, 0) against its class vector at the angle jπ/m1 + δ.
                let theta = f64::from(j) * std::f64::consts::PI / f64::from(m1) + delta;
                // Each row its own class, so that no class vector is set twice.
                problem.labels[row] = row as u32;
                let y = row;
                problem.features[2 * row..2 * row + 2].copy_from_slice(&[1.0, 0.0]);
                problem.classes[2 * y..2 * y + 2]
                    .copy_from_slice(&[theta.cos() as f32, theta.sin() as f32]);
                row += 1;
            }
        }
        check_against_reference(
            ctx,
            &problem,
            &LossParams::sphereface(m1),
            &format!("sphereface m1 = {m1}"),
        );
    }
}
