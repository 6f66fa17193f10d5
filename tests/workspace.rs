//! The memory-minimal plan never holds B×C values: its workspace grows like O(B·k + C).
//! The chunked plan holds G for a chunk of rows, within the context's budget.

mod common;

use common::context;
use margin_softmax::{workspace_bytes, Algorithm, Context, ContextOptions, Plan, Shape};

#[test]
fn workspace_is_far_below_the_logits() {
    let ctx = context();
    let shape = Shape::new(64, 64, 20000);
    let bytes = workspace_bytes(ctx, shape, Algorithm::MemoryMinimal).expect("workspace");
    let logits = (shape.batch * shape.classes * 4) as u64;
    assert!(
        bytes < logits / 16,
        "workspace {bytes} bytes, logits {logits} bytes"
    );
    let plan = Plan::with_algorithm(ctx, shape, Algorithm::MemoryMinimal).expect("plan");
    assert_eq!(plan.workspace_bytes(), bytes);
}

#[test]
fn workspace_grows_with_c_only_through_one_value_per_class() {
    let ctx = context();
    let at = |c| {
        workspace_bytes(ctx, Shape::new(256, 128, c), Algorithm::MemoryMinimal).expect("workspace")
    };
    // From C = 100 000 to 1 000 000, the per-class inverse norms grow by 4 bytes a
    // class, and the uniforms of the extra blocks (about 1 KB a block and row chunk, the
    // blocks √C wide) by about one more: nothing grows with B·C (the logits would grow by
    // 921.6 MB).
    let growth = at(1_000_000) - at(100_000);
    assert!((900_000 * 4..=900_000 * 6).contains(&growth), "{growth}");
}

#[test]
fn the_unfused_baseline_holds_the_logits() {
    let ctx = context();
    let shape = Shape::new(64, 64, 20000);
    let unfused = workspace_bytes(ctx, shape, Algorithm::Unfused).expect("workspace");
    assert!(unfused > (shape.batch * shape.classes * 4) as u64);
    let plan = Plan::with_algorithm(ctx, shape, Algorithm::Unfused).expect("plan");
    assert_eq!(plan.workspace_bytes(), unfused);
}

#[test]
fn the_budget_picks_the_plan() {
    let shape = Shape::new(64, 64, 20000);
    // The default 256 MiB budget holds G for all 64 rows: the chunked plan.
    let ctx = context();
    let plan = Plan::new(ctx, shape).expect("plan");
    assert_eq!(plan.algorithm(), Algorithm::Chunked);
    assert!(plan.workspace_bytes() <= margin_softmax::DEFAULT_WORKSPACE_BUDGET);
    // At C = 100 000, D = 256, G for 668 of the 1024 rows fits: the whole workspace too.
    let big = Shape::new(1024, 256, 100_000);
    let ws = margin_softmax::workspace_bytes(ctx, big, Algorithm::Chunked).expect("workspace");
    assert!(ws <= margin_softmax::DEFAULT_WORKSPACE_BUDGET, "{ws}");
    // 1 MiB holds G for 13 whole rows only, fewer than 32: the chunked plan takes G in
    // blocks of classes, within the budget.
    let budget = |bytes| {
        Context::new_blocking(ContextOptions {
            workspace_budget: Some(bytes),
            ..ContextOptions::default()
        })
        .expect("context")
    };
    let small = budget(1 << 20);
    let plan = Plan::new(&small, shape).expect("plan");
    assert_eq!(plan.algorithm(), Algorithm::Chunked);
    assert!(
        plan.workspace_bytes() <= 1 << 20,
        "{}",
        plan.workspace_bytes()
    );
    // 160 000 bytes do not even hold the norms, x̂ and the softmax rows (about 161 KB):
    // the memory-minimal plan, which does not depend on the budget.
    assert_eq!(
        Plan::new(&budget(160_000), shape)
            .expect("plan")
            .algorithm(),
        Algorithm::MemoryMinimal
    );
}

#[test]
fn the_chunked_plan_stays_within_its_budget() {
    // Many row chunks, GEMM k-pieces and blocks wider than 4096 classes: the plan's exact
    // bytes (uniforms included) never pass the budget. Nothing is allocated here.
    // (B, D, C, budget, whether a chunked plan fits): at 30 MiB the blocks (one partial
    // per row over all of them) fit beside the 65 536 softmax rows and x̂; at 20 MiB those
    // alone leave no room for a block, so the choice is the memory-minimal plan.
    for (b, d, c, budget, fits) in [
        (65_536, 64, 100_000, 40u64 << 20, true),
        (65_536, 64, 100_000, 30 << 20, true),
        (65_536, 64, 100_000, 20 << 20, false),
        (8192, 64, 2_000_000, 64 << 20, true),
        (1024, 128, 2_000_000, 64 << 20, true),
        (256, 512, 100_000, 2 << 20, true),
    ] {
        let ctx = Context::new_blocking(ContextOptions {
            workspace_budget: Some(budget),
            ..ContextOptions::default()
        })
        .expect("context");
        let shape = Shape::new(b, d, c);
        match workspace_bytes(&ctx, shape, Algorithm::Chunked) {
            Ok(bytes) => {
                assert!(
                    fits,
                    "{b}×{d}×{c}: a chunked plan of {bytes} bytes in {budget}"
                );
                assert!(bytes <= budget, "{b}×{d}×{c}: {bytes} > {budget}");
            }
            Err(e) => {
                assert!(!fits, "{b}×{d}×{c} in {budget}: {e}");
                assert_eq!(Algorithm::choose(&ctx, shape), Algorithm::MemoryMinimal);
            }
        }
    }
    // Just past what the first estimate of the uniforms allows: a few rows fewer fit
    // (49 rows hold 61.3 MB); the plan must find them, not give up.
    let ctx = Context::new_blocking(ContextOptions {
        workspace_budget: Some(62_536_924),
        ..ContextOptions::default()
    })
    .expect("context");
    let bytes = workspace_bytes(&ctx, Shape::new(2000, 128, 300_000), Algorithm::Chunked)
        .expect("a chunked plan");
    assert!(bytes <= 62_536_924);
}

/// 16-bit gradients add their f32 shadows to the workspace and nothing else (16-bit
/// inputs add nothing: the GEMMs read w in place, D % 4 = 0): 4·B·D for dL/dx, and
/// 4·C·D for dL/dw in the whole-row chunked plan, or in blocks (the memory-minimal plan)
/// the largest block's, a small part of it.
#[test]
fn sixteen_bit_gradients_add_their_f32_shadows() {
    use margin_softmax::{ElementType, ElementTypes};
    let ctx = context();
    let (b, d, c) = (64u64, 64u64, 2000u64);
    let shape = Shape::new(b as usize, d as usize, c as usize);
    let inputs16 = ElementTypes::inputs(ElementType::Bf16, ElementType::F16);
    let at = |elements, algorithm| {
        workspace_bytes(ctx, shape.with_elements(elements), algorithm).unwrap()
    };
    for algorithm in [Algorithm::Chunked, Algorithm::MemoryMinimal] {
        let f32_bytes = at(ElementTypes::default(), algorithm);
        assert_eq!(
            at(inputs16.with_f32_grads(), algorithm),
            f32_bytes,
            "{algorithm:?}"
        );
        let class_shadow = at(inputs16, algorithm) - f32_bytes - 4 * b * d;
        assert_eq!(
            class_shadow % (4 * d),
            0,
            "{algorithm:?}: whole rows of dL/dw"
        );
        if algorithm == Algorithm::Chunked {
            assert_eq!(class_shadow, 4 * c * d);
        } else {
            assert!(class_shadow <= 4 * c * d / 4, "{class_shadow}: one block");
        }
    }
}
