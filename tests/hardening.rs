//! Regressions of issue 13: checks that see NaN, huge-norm rows, long feature vectors,
//! plans recorded twice before a submit, and plans or buffers of another device.

mod common;

use margin_softmax::reference::{self, ReferenceOutput};
use margin_softmax::{Gradients, LossOutput, LossParams, Problem, Shape};

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
