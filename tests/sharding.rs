//! Class sharding: three shards on the one adapter against the unsharded loss and the
//! f64 reference; the exchange is O(B) per shard.

mod common;

use common::{check_output, context};
use margin_softmax::shard::{
    finish_rows, merge_shards, sharded_loss, ClassShard, RowPartial, ShardInputs,
};
use margin_softmax::{reference, LossParams, Objective, Pass, Problem, Shape, IGNORE};

#[test]
fn three_shards_match_the_unsharded_loss_and_the_reference() {
    let ctx = context();
    let contexts = [ctx, ctx, ctx];
    for (params, name) in [
        (LossParams::default(), "am-softmax"),
        (
            LossParams {
                scale: 16.0,
                ..LossParams::arcface()
            },
            "arcface",
        ),
        (
            LossParams {
                objective: Objective::HardMargin,
                ..LossParams::default()
            },
            "hard",
        ),
    ] {
        let mut p = Problem::random(Shape::new(37, 19, 301), 50);
        p.labels[0] = IGNORE;
        p.labels[1] = 300;
        p.labels[2] = 100; // the first class of the second shard
        let sharded = sharded_loss(
            &contexts,
            p.shape,
            &p.features,
            &p.classes,
            &p.labels,
            &params,
        )
        .expect("sharded");
        let expected = reference::loss_on(&p, &params).expect("reference");
        check_output(&sharded, &expected, &p, &params, name);
        let whole = ctx
            .loss_on(&p, &params, Pass::ForwardBackward)
            .expect("unsharded");
        let (a, b) = (
            sharded.grads.as_ref().expect("grads"),
            whole.grads.as_ref().expect("grads"),
        );
        let diff = a
            .features
            .iter()
            .chain(&a.classes)
            .zip(b.features.iter().chain(&b.classes))
            .fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
        eprintln!(
            "{name}: loss {} vs {}, max gradient difference from the unsharded run {diff:.2e}",
            sharded.loss, whole.loss
        );
        assert!((sharded.loss - whole.loss).abs() <= 1e-5 * whole.loss.abs().max(1.0));
        assert_eq!(sharded.pred, whole.pred);
        // Deterministic for the same shard layout.
        let again = sharded_loss(
            &contexts,
            p.shape,
            &p.features,
            &p.classes,
            &p.labels,
            &params,
        )
        .expect("again");
        assert_eq!(again, sharded);
    }
}

#[test]
fn shards_split_the_classes_and_merge_in_order() {
    let shards: Vec<ClassShard> = (0..3)
        .map(|k| ClassShard::split(10, 3, k).expect("k < shards"))
        .collect();
    assert_eq!(
        shards
            .iter()
            .map(|s| (s.first, s.count))
            .collect::<Vec<_>>(),
        vec![(0, 3), (3, 3), (6, 4)]
    );
    let a = RowPartial {
        max_logit: 2.0,
        sum_exp: 1.5,
        sum_exp_logit: 0.5,
        sum_exp_other: 1.0,
        target_cos: 0.3,
        best_other_cos: 0.4,
        best_other_class: 2,
    };
    let b = RowPartial {
        max_logit: 1.0,
        sum_exp: 2.0,
        sum_exp_logit: 0.2,
        sum_exp_other: 2.0,
        target_cos: -3.0e38,
        best_other_cos: 0.4,
        best_other_class: 7,
    };
    let merged = merge_shards(&[vec![a], vec![b]]).expect("equal lengths");
    assert_eq!(merged[0].best_other_class, 2, "ties keep the lower class");
    assert_eq!(merged[0].target_cos, 0.3);
    assert!((merged[0].sum_exp - (1.5 + 2.0 * (-1.0f32).exp())).abs() < 1e-6);
}

#[test]
fn bad_shards_are_typed_errors() {
    let ctx = context();
    let p = Problem::random(Shape::new(4, 3, 10), 51);
    let params = LossParams::default();
    let inputs = ShardInputs {
        shard: ClassShard {
            first: 8,
            count: 4,
            total: 10,
        },
        dim: 3,
        features: &p.features,
        classes: &p.classes[..12],
        labels: &p.labels,
        sample: None,
        row_margins: None,
        hard_thresholds: None,
    };
    assert!(matches!(
        ctx.shard_forward(&inputs, &params),
        Err(margin_softmax::Error::InvalidParameter { name: "shard", .. })
    ));
    let short = ShardInputs {
        shard: ClassShard {
            first: 0,
            count: 4,
            total: 10,
        },
        classes: &p.classes[..11],
        ..inputs
    };
    assert!(matches!(
        ctx.shard_forward(&short, &params),
        Err(margin_softmax::Error::LengthMismatch {
            input: "classes",
            ..
        })
    ));
}

#[test]
fn shards_report_non_finite_inputs_and_overflow() {
    let ctx = context();
    let mut p = Problem::random(Shape::new(4, 3, 10), 53);
    p.features[5] = f32::NAN;
    let params = LossParams::default();
    let shard = |p: &Problem| {
        sharded_loss(
            &[ctx, ctx],
            p.shape,
            &p.features,
            &p.classes,
            &p.labels,
            &params,
        )
    };
    let err = shard(&p).unwrap_err();
    assert_eq!(err, margin_softmax::Error::NonFinite { input: "features" });
    // Shards run the chunked plan's GEMMs on x̂ and w: x·w at 1e40 stays finite there
    // (x̂·w is 1e20), as on one device, and the loss is the reference's.
    let mut p = Problem::random(Shape::new(4, 3, 10), 54);
    p.features
        .iter_mut()
        .chain(p.classes.iter_mut())
        .for_each(|v| *v *= 1e20);
    let expected = margin_softmax::reference::loss_on(&p, &params).expect("reference");
    let loss = f64::from(shard(&p).expect("finite dots").loss);
    assert!(
        (loss - expected.loss).abs() <= 1e-5 * expected.loss,
        "{loss}"
    );
    // Rows of w near f32's largest value overflow x̂·w too.
    p.classes.iter_mut().for_each(|v| *v = 3e38);
    assert_eq!(shard(&p).unwrap_err(), margin_softmax::Error::Overflow);
}

#[test]
fn class_centre_sampling_matches_the_reference_on_the_subset() {
    // One shard of C = 40 classes samples 15 of them, keeping every positive. The loss
    // must be the reference's over the subset, and dL/dw must land on the sampled rows.
    let ctx = context();
    let (b, d, c) = (12, 9, 40);
    let p = Problem::random(Shape::new(b, d, c), 52);
    let mut sample: Vec<u32> = p.labels.clone();
    sample.extend([1, 5, 17, 23, 30, 38]);
    sample.sort_unstable();
    sample.dedup();
    let params = LossParams::default();
    let shard = ClassShard {
        first: 0,
        count: c,
        total: c,
    };
    let inputs = ShardInputs {
        shard,
        dim: d,
        features: &p.features,
        classes: &p.classes,
        labels: &p.labels,
        sample: Some(&sample),
        row_margins: None,
        hard_thresholds: None,
    };
    let partials = ctx
        .shard_forward(&inputs, &params)
        .expect("sampled forward");
    let merged = merge_shards(&[partials]).expect("one shard");
    let rows = finish_rows(&merged, &p.labels, c, &params).expect("one label per row");
    let grads = ctx
        .shard_backward(&inputs, &params, &rows)
        .expect("sampled backward");

    // The reference on the subset: w restricted to the sample, labels renumbered.
    let subset = Problem {
        shape: Shape::new(b, d, sample.len()),
        features: p.features.clone(),
        classes: sample
            .iter()
            .flat_map(|&r| p.classes[r as usize * d..(r as usize + 1) * d].to_vec())
            .collect(),
        labels: p
            .labels
            .iter()
            .map(|y| sample.binary_search(y).expect("positives kept") as u32)
            .collect(),
    };
    let expected = reference::loss_on(&subset, &params).expect("reference");
    let mut out = rows.output;
    out.pred = out
        .pred
        .iter()
        .map(|y| sample.binary_search(y).expect("sampled") as u32)
        .collect();
    let sampled_rows: Vec<f32> = sample
        .iter()
        .flat_map(|&r| grads.classes[r as usize * d..(r as usize + 1) * d].to_vec())
        .collect();
    out.grads = Some(margin_softmax::Gradients {
        features: grads.features.clone(),
        classes: sampled_rows,
    });
    check_output(&out, &expected, &subset, &params, "sampled");
    for r in (0..c as u32).filter(|r| sample.binary_search(r).is_err()) {
        let row = &grads.classes[r as usize * d..(r as usize + 1) * d];
        assert!(
            row.iter().all(|&v| v == 0.0),
            "class {r} was not sampled but got a gradient"
        );
    }
    // A sample that drops a positive is refused.
    let missing: Vec<u32> = sample
        .iter()
        .copied()
        .filter(|&r| r != p.labels[0])
        .collect();
    let bad = ShardInputs {
        sample: Some(&missing),
        ..inputs
    };
    assert!(matches!(
        ctx.shard_forward(&bad, &params),
        Err(margin_softmax::Error::InvalidParameter { name: "sample", .. })
    ));
}

#[test]
fn reused_shard_buffers_give_the_fresh_results_bit_for_bit() {
    // Contexts of this test's own, so that its calls alone use their shard caches: a
    // context's first call allocates, its later calls reuse the last call's buffers.
    let new_context = || margin_softmax::Context::new_default().expect("adapter");
    let (reused, fresh) = (new_context(), new_context());
    let params = LossParams::default();
    let a = Problem::random(Shape::new(21, 13, 45), 61);
    let b = Problem::random(Shape::new(21, 13, 45), 62);
    let bits = |ctx: &margin_softmax::Context, p: &Problem| {
        let out = sharded_loss(&[ctx], p.shape, &p.features, &p.classes, &p.labels, &params)
            .expect("sharded");
        let grads = out.grads.expect("grads");
        std::iter::once(out.loss)
            .chain(out.row_loss)
            .chain(grads.features)
            .chain(grads.classes)
            .map(f32::to_bits)
            .collect::<Vec<u32>>()
    };
    let first_a = bits(&reused, &a);
    let then_b = bits(&reused, &b);
    assert_ne!(first_a, then_b, "different problems give different outputs");
    assert_eq!(
        then_b,
        bits(&fresh, &b),
        "b on a's buffers matches b on its own"
    );
    assert_eq!(
        bits(&reused, &a),
        first_a,
        "a on b's buffers matches a on its own"
    );
}

/// A shard's backward right after its forward reuses the forward's dots (the plan keeps
/// them); a second backward computes them again. Both give the same bits.
#[test]
fn backward_from_kept_dots_matches_recomputed_dots_bit_for_bit() {
    let ctx = context();
    let p = Problem::random(Shape::new(37, 13, 70), 57);
    let params = LossParams::default();
    let shard = ClassShard::split(70, 2, 1).expect("shard");
    let d = p.shape.dim;
    let inputs = ShardInputs {
        shard,
        dim: d,
        features: &p.features,
        classes: &p.classes[shard.first * d..(shard.first + shard.count) * d],
        labels: &p.labels,
        sample: None,
        row_margins: None,
        hard_thresholds: None,
    };
    let partials = ctx.shard_forward(&inputs, &params).expect("forward");
    let rows = finish_rows(
        &merge_shards(&[partials]).expect("merge"),
        &p.labels,
        70,
        &params,
    )
    .expect("rows");
    let kept = ctx
        .shard_backward(&inputs, &params, &rows)
        .expect("from kept dots");
    let again = ctx
        .shard_backward(&inputs, &params, &rows)
        .expect("recomputed dots");
    assert_eq!(kept, again);
}

/// Where not even one block of a shard fits one binding, the shard is refused: it never
/// runs as whole rows, which leave no partials (and gave zeros).
#[test]
fn a_shard_without_room_for_a_block_is_refused_not_wrong() {
    let ctx = margin_softmax::Context::new_blocking(margin_softmax::ContextOptions {
        max_binding_bytes: Some(4096),
        ..margin_softmax::ContextOptions::default()
    })
    .expect("context");
    let p = Problem::random(Shape::new(64, 16, 200), 58);
    let params = LossParams::default();
    match sharded_loss(
        &[&ctx, &ctx],
        p.shape,
        &p.features,
        &p.classes,
        &p.labels,
        &params,
    ) {
        Err(margin_softmax::Error::TooLarge { .. }) => {}
        Ok(out) => {
            let expected = margin_softmax::reference::loss_on(&p, &params).expect("reference");
            let check = margin_softmax::reference::compare(16, &params, &out, &expected);
            assert!(check.passes(), "{check:?}");
        }
        Err(e) => panic!("{e}"),
    }
}
