//! Issue 13: the shard API returns typed errors where it panicked or overflowed, and the
//! error messages say what is true (the missing context, the offending sample row, the
//! timeout's units, the limit a size exceeds).

mod common;

use std::time::Duration;

use common::context;
use margin_softmax::shard::{
    finish_rows, merge_shards, sharded_loss, ClassShard, RowPartial, ShardInputs,
};
use margin_softmax::{Context, ContextOptions, Error, LossParams, Pass, Problem, Shape};

fn partial() -> RowPartial {
    RowPartial {
        max_logit: 1.0,
        sum_exp: 1.0,
        sum_exp_logit: 0.5,
        sum_exp_other: 0.5,
        target_cos: 0.2,
        best_other_cos: 0.1,
        best_other_class: 1,
    }
}

#[test]
fn merging_partial_lists_of_different_lengths_is_an_error() {
    let a = partial();
    for shards in [vec![vec![a, a], vec![a]], vec![vec![a], vec![a, a]]] {
        let err = merge_shards(&shards).unwrap_err();
        assert!(
            matches!(
                err,
                Error::LengthMismatch {
                    expected: _,
                    actual: _,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("partials"), "{err}");
    }
    assert_eq!(
        merge_shards(&[vec![a, a], vec![a, a]]).map(|m| m.len()),
        Ok(2)
    );
    assert_eq!(merge_shards(&[]), Ok(vec![]));
}

#[test]
fn finishing_rows_with_a_label_count_unlike_the_rows_is_an_error() {
    let a = partial();
    let params = LossParams::default();
    for labels in [&[0u32, 1][..], &[0, 1, 2, 3]] {
        let err = finish_rows(&[a, a, a], labels, 4, &params).unwrap_err();
        assert_eq!(
            err,
            Error::LengthMismatch {
                input: "labels (one per merged row)",
                expected: 3,
                actual: labels.len(),
            }
        );
    }
    assert!(finish_rows(&[a, a, a], &[0, 1, 2], 4, &params).is_ok());
}

#[test]
fn splitting_huge_class_counts_does_not_overflow() {
    // total·k overflows usize here: a debug build panicked, a release build wrapped.
    for (total, shards) in [
        (usize::MAX / 2, 4),
        (usize::MAX, 3),
        (usize::MAX, usize::MAX),
        (7, usize::MAX),
    ] {
        let mut next = 0usize;
        for k in [0, 1, shards / 2, shards - 2, shards - 1] {
            let s = ClassShard::split(total, shards, k).expect("k < shards");
            assert_eq!(s.total, total);
            let end = s.first.checked_add(s.count).expect("first + count fits");
            assert!(end <= total, "{s:?}");
            if k == shards - 1 {
                assert_eq!(end, total, "the last shard ends at C: {s:?}");
            }
            if k == 0 {
                assert_eq!(s.first, 0);
            }
            next = next.max(end);
        }
        assert_eq!(next, total);
    }
    let last = ClassShard::split(usize::MAX / 2, 4, 3).expect("k < shards");
    assert_eq!(last.first, (usize::MAX / 2) / 4 * 3 + 2);
    assert_eq!(last.first + last.count, usize::MAX / 2);
    // The common case is unchanged.
    let small: Vec<(usize, usize)> = (0..3)
        .map(|k| ClassShard::split(10, 3, k).map(|s| (s.first, s.count)))
        .collect::<Result<_, _>>()
        .expect("split");
    assert_eq!(small, vec![(0, 3), (3, 3), (6, 4)]);
    for (shards, k, name) in [(0, 0, "shards"), (3, 3, "k"), (3, usize::MAX, "k")] {
        assert!(
            matches!(
                ClassShard::split(10, shards, k),
                Err(Error::InvalidParameter { name: n, .. }) if n == name
            ),
            "split(10, {shards}, {k})"
        );
    }
}

#[test]
fn a_shard_whose_range_overflows_is_an_error() {
    // first + count overflowed: a debug build panicked, a release build wrapped past the
    // range check.
    let ctx = context();
    let p = Problem::random(Shape::new(2, 3, 4), 1);
    let params = LossParams::default();
    for (first, count, total) in [
        (usize::MAX, 4, 10),
        (usize::MAX, 1, usize::MAX),
        (1, usize::MAX, usize::MAX),
    ] {
        let inputs = ShardInputs {
            shard: ClassShard {
                first,
                count,
                total,
            },
            dim: 3,
            features: &p.features,
            classes: &p.classes,
            labels: &[0, 1],
            sample: None,
            row_margins: None,
            hard_thresholds: None,
        };
        for result in [
            ctx.shard_forward(&inputs, &params).map(|_| ()),
            ctx.shard_backward(
                &inputs,
                &params,
                &finish_rows(&[partial(), partial()], &[0, 1], 4, &params).expect("rows"),
            )
            .map(|_| ()),
        ] {
            assert!(
                matches!(result, Err(Error::InvalidParameter { name: "shard", .. })),
                "({first}, {count}, {total}): {result:?}"
            );
        }
    }
}

#[test]
fn sharded_loss_without_contexts_asks_for_one() {
    let p = Problem::random(Shape::new(2, 3, 4), 1);
    let err = sharded_loss(
        &[],
        p.shape,
        &p.features,
        &p.classes,
        &p.labels,
        &LossParams::default(),
    )
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::InvalidParameter {
                name: "contexts",
                ..
            }
        ),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains("at least one Context") && !message.contains("driver"),
        "{message}"
    );
}

#[test]
fn a_bad_sample_names_the_offending_row() {
    let ctx = context();
    let p = Problem::random(Shape::new(2, 3, 10), 1);
    let labels = [0u32, 1];
    let params = LossParams::default();
    for (sample, value) in [
        (&[0u32, 1, 2, 3, 4, 99][..], "sample = 99 "),
        (&[0, 1, 7, 5, 8, 9], "sample = 5 "),
        (&[0, 1, 2, 2], "sample = 2 "),
        (&[], "sample = 0 "),
    ] {
        let inputs = ShardInputs {
            shard: ClassShard {
                first: 0,
                count: 10,
                total: 10,
            },
            dim: 3,
            features: &p.features,
            classes: &p.classes,
            labels: &labels,
            sample: Some(sample),
            row_margins: None,
            hard_thresholds: None,
        };
        let message = ctx.shard_forward(&inputs, &params).unwrap_err().to_string();
        assert!(message.contains(value), "{sample:?}: {message}");
    }
}

#[test]
fn a_microsecond_timeout_reads_in_microseconds() {
    let ctx = Context::new_blocking(ContextOptions {
        timeout: Some(Duration::from_micros(1)),
        ..ContextOptions::default()
    })
    .expect("context");
    let p = Problem::random(Shape::new(256, 128, 4096), 2);
    let err = ctx
        .loss_on(&p, &LossParams::default(), Pass::ForwardBackward)
        .unwrap_err();
    assert_eq!(
        err,
        Error::Timeout {
            timeout: Duration::from_micros(1)
        }
    );
    let message = err.to_string();
    assert!(
        message.contains("within 1µs") && !message.contains("0 ms"),
        "{message}"
    );
    for (timeout, text) in [
        (Duration::from_millis(250), "within 250ms"),
        (Duration::from_millis(1500), "within 1.5s"),
    ] {
        let message = Error::Timeout { timeout }.to_string();
        assert!(message.contains(text), "{message}");
    }
}

#[test]
fn a_binding_cap_is_not_reported_as_the_adapters_limit() {
    let ctx = Context::new_blocking(ContextOptions {
        max_binding_bytes: Some(64),
        ..ContextOptions::default()
    })
    .expect("context");
    let p = Problem::random(Shape::new(8, 8, 8), 3);
    let err = ctx
        .loss_on(&p, &LossParams::default(), Pass::Forward)
        .unwrap_err();
    assert!(matches!(err, Error::TooLarge { limit: 64, .. }), "{err:?}");
    let message = err.to_string();
    assert!(
        message.contains("the limit is 64")
            && message.contains("ContextOptions::max_binding_bytes")
            && !message.contains("adapter allows"),
        "{message}"
    );
}
