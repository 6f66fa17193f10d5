//! Regressions of issue 13: checks that see NaN, huge-norm rows, long feature vectors,
//! plans recorded twice before a submit, and plans or buffers of another device.

mod common;

use margin_softmax::reference::{self, ReferenceOutput};
use margin_softmax::{Algorithm, Gradients, LossOutput, LossParams, Pass, Problem, Shape};

/// The reference's own result as a GPU output would hold it (every value rounded to f32).
fn as_gpu_output(r: &ReferenceOutput) -> LossOutput {
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    LossOutput {
        loss: r.loss as f32,
        row_loss: f(&r.row_loss),
        grad_scale: r.grad_scale as f32,
        pred: r.pred.clone(),
        target_cos: f(&r.target_cos),
        best_other_cos: f(&r.best_other_cos),
        achieved_margin: f(&r.achieved_margin),
        target_prob: f(&r.target_prob),
        mean_achieved_margin: r.mean_achieved_margin as f32,
        margin_satisfied_rows: r.margin_satisfied_rows as u32,
        valid_rows: r.valid_rows as u32,
        correct_rows: r.correct_rows as u32,
        grads: Some(Gradients {
            features: f(&r.grad_features),
            classes: f(&r.grad_classes),
        }),
    }
}

/// Every output of a comparison fails when one value of it is NaN or ±inf (where the
/// reference is finite), and the failing entry is that output's.
#[test]
fn comparison_fails_on_planted_non_finite_values() {
    let p = Problem::random(Shape::new(5, 7, 11), 3);
    let params = LossParams::default();
    let expected = reference::loss_on(&p, &params).expect("reference");
    let clean = as_gpu_output(&expected);
    assert!(
        reference::compare(p.shape.dim, &params, &clean, &expected).passes(),
        "the reference rounded to f32 must pass"
    );
    type Plant = fn(&mut LossOutput, f32);
    let plants: [(&str, Plant); 10] = [
        ("loss", |o, v| o.loss = v),
        ("row_loss", |o, v| o.row_loss[2] = v),
        ("grad_scale", |o, v| o.grad_scale = v),
        ("target_cos", |o, v| o.target_cos[1] = v),
        ("best_other_cos", |o, v| o.best_other_cos[4] = v),
        ("achieved_margin", |o, v| o.achieved_margin[0] = v),
        ("mean_margin", |o, v| o.mean_achieved_margin = v),
        ("target_prob", |o, v| o.target_prob[3] = v),
        ("grad_features", |o, v| {
            o.grads.as_mut().unwrap().features[9] = v
        }),
        ("grad_classes", |o, v| {
            o.grads.as_mut().unwrap().classes[20] = v
        }),
    ];
    for (output, plant) in plants {
        for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut out = clean.clone();
            plant(&mut out, value);
            let check = reference::compare(p.shape.dim, &params, &out, &expected);
            assert!(!check.passes(), "{value} in {output} passed: {check:?}");
            let failing: Vec<&str> = check
                .errors
                .iter()
                .filter(|(_, e, b)| !(e <= b))
                .map(|(name, _, _)| *name)
                .collect();
            assert!(
                failing.contains(&output),
                "{value} in {output}: failing outputs {failing:?}"
            );
        }
    }
    // A truncated output is no match either.
    let mut short = clean.clone();
    short.pred.pop();
    short.target_cos.pop();
    assert!(!reference::compare(p.shape.dim, &params, &short, &expected).passes());
}

/// Every plan on `p`: each output within its bound of the f64 reference (which fails on
/// any non-finite output where the reference is finite).
fn assert_every_plan_matches(p: &Problem, params: &LossParams, what: &str) {
    let ctx = common::context();
    let expected = reference::loss_on(p, params).expect("reference");
    for algorithm in [Algorithm::Fused, Algorithm::Chunked, Algorithm::Unfused] {
        let out = common::loss_with(ctx, algorithm, p, params, Pass::ForwardBackward)
            .unwrap_or_else(|e| panic!("{what} ({algorithm:?}): {e}"));
        let check = reference::compare(p.shape.dim, params, &out, &expected);
        assert!(check.passes(), "{what} ({algorithm:?}): {check:?}");
    }
}

/// A row of x with entries of ±1e38 (‖x‖ = 4e38 overflows f32, D = 16): its dL/dx is
/// about 1e-37, finite and normal; the projection must not form Σ x·g from the raw row.
#[test]
fn huge_feature_rows_get_finite_gradients() {
    let mut p = Problem::random(Shape::new(3, 16, 5), 21);
    for (k, v) in p.features[16..32].iter_mut().enumerate() {
        *v = if k % 3 == 0 { -1e38 } else { 1e38 };
    }
    assert_every_plan_matches(&p, &LossParams::default(), "a row of x at ±1e38");
}

/// A row of w of norm 1e38 (D = 2) must leave every other row's dL/dx (about 8.5) finite.
#[test]
fn huge_class_rows_get_finite_gradients() {
    let mut p = Problem::random(Shape::new(4, 2, 3), 22);
    p.classes[2] = 7.0e37;
    p.classes[3] = -7.0e37;
    assert_every_plan_matches(&p, &LossParams::default(), "a row of w of norm 1e38");
}
