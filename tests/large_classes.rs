//! Class matrices larger than one storage binding are bound in chunks at buffer offsets:
//! the memory-minimal plan merges the per-row log-sum-exp statistics across chunks, the
//! chunked plan writes each chunk's columns of the logits and runs its GEMMs per chunk. Long class ranges
//! and large batches are also cut so that no invocation exceeds llvmpipe's loop limit.

mod common;

use common::{check_output, context};
use margin_softmax::{
    reference, Algorithm, Context, ContextOptions, LossOutput, LossParams, Pass, Problem, Shape,
    IGNORE,
};

/// Forward + backward of `p` on `ctx` with `algorithm`.
fn loss(ctx: &Context, algorithm: Algorithm, p: &Problem, params: &LossParams) -> LossOutput {
    common::loss_with(ctx, algorithm, p, params, Pass::ForwardBackward).expect("loss")
}

/// A context whose bindings are capped at `bytes`, so small problems need many chunks.
fn capped(bytes: u64) -> Context {
    Context::new_blocking(ContextOptions {
        max_binding_bytes: Some(bytes),
        ..ContextOptions::default()
    })
    .expect("context")
}

#[test]
fn many_chunks_match_the_reference() {
    // 16 KiB bindings: with D = 24 a chunk holds 128 classes, so C = 1000 takes 8 chunks,
    // the last one short and not a multiple of the tile.
    let ctx = capped(16 * 1024);
    for (b, d, c, seed) in [(21, 24, 1000, 1), (3, 24, 777, 2), (40, 7, 2000, 3)] {
        let mut p = Problem::random(Shape::new(b, d, c), seed);
        p.labels[0] = IGNORE;
        // Labels in the last chunk and at chunk edges.
        p.labels[1] = (c - 1) as u32;
        p.labels[2] = 128;
        let params = LossParams::default();
        let expected = reference::loss_on(&p, &params).expect("reference");
        // With D = 7 the GEMMs read w from a copy in rows of 8, bound chunk by chunk too.
        for algorithm in [Algorithm::MemoryMinimal, Algorithm::Chunked] {
            let out = loss(&ctx, algorithm, &p, &params);
            check_output(
                &out,
                &expected,
                &p,
                &params,
                &format!("{algorithm:?} in chunks"),
            );
        }
        // The same bytes as without chunks would be too strong (the split order differs),
        // but the unchunked result must agree within the same bounds.
        let whole = context()
            .loss_on(&p, &params, Pass::ForwardBackward)
            .expect("unchunked");
        check_output(&whole, &expected, &p, &params, "unchunked");
    }
}

#[test]
fn class_matrix_just_over_128_mib() {
    // C·D·4 = 66 000 · 512 · 4 = 135 168 000 bytes > 134 217 728 (128 MiB), the default
    // and lavapipe's max_storage_buffer_binding_size.
    let ctx = capped(128 << 20);
    let shape = Shape::new(8, 512, 66_000);
    assert!((shape.classes * shape.dim * 4) as u64 > 128 << 20);
    let mut p = Problem::random(shape, 9);
    p.labels[0] = 65_999;
    p.labels[1] = 0;
    let params = LossParams::default();
    let expected = reference::loss_on(&p, &params).expect("reference");
    for algorithm in [Algorithm::MemoryMinimal, Algorithm::Chunked] {
        let out = loss(&ctx, algorithm, &p, &params);
        check_output(
            &out,
            &expected,
            &p,
            &params,
            &format!("{algorithm:?}, C·D·4 > 128 MiB"),
        );
    }
}

#[test]
fn long_class_ranges_and_large_batches_stay_exact() {
    // Before plans respected llvmpipe's 65535-iteration limit, each of these lost whole
    // class splits of dL/dx (long splits) or rows of dL/dw (a large batch) on lavapipe;
    // (1000, 2048, 40) takes two dL/dw row passes; (4101, 12, 7) sums dL/dw over
    // k = B in two splits of a split-K GEMM, the last one ragged.
    let ctx = context();
    for (b, d, c) in [
        (8, 768, 12_000),
        (8, 64, 200_000),
        (1000, 2048, 40),
        (4101, 12, 7),
    ] {
        let p = Problem::random(Shape::new(b, d, c), 11);
        let params = LossParams::default();
        let out = ctx
            .loss_on(&p, &params, Pass::ForwardBackward)
            .expect("loss");
        let expected = reference::loss_on(&p, &params).expect("reference");
        check_output(&out, &expected, &p, &params, "loop budget");
    }
}

#[test]
fn later_chunks_never_have_more_splits_than_the_first() {
    // 278 528-byte bindings cut C = 2112 (D = 64) into a 1088-class and a 1024-class
    // chunk; cut independently, the smaller one would get more splits than the first and
    // merge into partial slots the first never wrote. Two calls must agree bit for bit.
    let ctx = capped(278_528);
    let p = Problem::random(Shape::new(8, 64, 2112), 13);
    let params = LossParams::default();
    let expected = reference::loss_on(&p, &params).expect("reference");
    for algorithm in [Algorithm::MemoryMinimal, Algorithm::Chunked] {
        let first = loss(&ctx, algorithm, &p, &params);
        check_output(
            &first,
            &expected,
            &p,
            &params,
            &format!("{algorithm:?}, uneven chunks"),
        );
        assert_eq!(
            loss(&ctx, algorithm, &p, &params),
            first,
            "{algorithm:?}: a second call differs"
        );
    }
}

#[test]
fn the_chosen_plan_fits_one_binding() {
    // With 128 MiB bindings G for the rows the budget allows would not fit one binding;
    // the plan must cut its rows (or fall back), not fail.
    let ctx = capped(128 << 20);
    let plan = margin_softmax::Plan::new(&ctx, Shape::new(1024, 256, 100_000)).expect("a plan");
    assert!(plan.workspace_bytes() <= margin_softmax::DEFAULT_WORKSPACE_BUDGET);
}

#[test]
fn chunked_rows_past_the_loop_budget() {
    // 1.1 M classes: one row's softmax over all of them would run 2·C/32 loop iterations
    // per invocation, past llvmpipe's 65535 (it then stops the loop and the gradients are
    // silently wrong); the plan cuts the classes into blocks instead.
    let ctx = context();
    let shape = Shape::new(2, 4, 1_100_000);
    assert_eq!(Algorithm::choose(ctx, shape), Algorithm::Chunked);
    let mut p = Problem::random(shape, 17);
    p.labels[1] = 1_099_999;
    let params = LossParams::default();
    let expected = reference::loss_on(&p, &params).expect("reference");
    let out = loss(ctx, Algorithm::Chunked, &p, &params);
    check_output(&out, &expected, &p, &params, "C = 1.1 M");
}
