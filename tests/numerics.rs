//! The spec's reference cases, fused GPU path against the f64 reference, on shapes that
//! are not multiples of any tile size (tiles are 32×32 by default, 4-wide register blocks).

mod common;

use common::{check_against_reference, context};
use margin_softmax::{
    Context, ContextOptions, LossParams, Problem, Reduction, Shape, TileConfig, IGNORE,
};

fn params(scale: f32, margin: f32) -> LossParams {
    LossParams {
        scale,
        margin,
        ..LossParams::default()
    }
}

#[test]
fn random_shapes_off_the_tile_grid() {
    for (seed, (b, d, c)) in [(37, 45, 101), (33, 17, 65), (70, 33, 97), (5, 130, 250)]
        .into_iter()
        .enumerate()
    {
        let problem = Problem::random(Shape::new(b, d, c), seed as u64);
        check_against_reference(context(), &problem, &LossParams::default(), "random");
    }
}

#[test]
fn dimensions_of_one() {
    for (b, d, c) in [
        (1, 1, 1),
        (1, 5, 7),
        (6, 1, 9),
        (5, 7, 1),
        (1, 1, 3),
        (4, 1, 1),
    ] {
        let problem = Problem::random(Shape::new(b, d, c), 3);
        check_against_reference(context(), &problem, &LossParams::default(), "ones");
    }
}

#[test]
fn many_classes_split_across_workgroups() {
    // A small batch over many classes: the memory-minimal plan's blocks of 256 classes,
    // merged in block order, off the block grid.
    let problem = Problem::random(Shape::new(3, 16, 3001), 4);
    check_against_reference(context(), &problem, &params(64.0, 0.35), "splits");
}

#[test]
fn large_and_small_feature_norms_and_a_zero_row() {
    let mut problem = Problem::random(Shape::new(9, 20, 41), 5);
    let d = problem.shape.dim;
    for (row, factor) in [(0, 1e3f32), (1, 1e-3), (2, 1e3), (3, 1e-3)] {
        for v in &mut problem.features[row * d..(row + 1) * d] {
            *v *= factor;
        }
    }
    problem.features[4 * d..5 * d].fill(0.0);
    for v in &mut problem.classes[..d] {
        *v *= 1e3;
    }
    check_against_reference(context(), &problem, &LossParams::default(), "norms");
}

#[test]
fn scales_from_1_to_1000_and_zero_margin() {
    let problem = Problem::random(Shape::new(19, 24, 77), 6);
    for scale in [1.0, 5.0, 30.0, 64.0] {
        for margin in [0.0, 0.35] {
            check_against_reference(context(), &problem, &params(scale, margin), "scales");
        }
    }
    // Far past any useful scale the loss is a hard max; the relative bound of the loss
    // still holds because every term is max-subtracted.
    let aligned = aligned_problem();
    check_against_reference(context(), &aligned, &params(1000.0, 0.35), "s = 1000");
}

/// Rows whose target cosine is the maximum (x = w_y) and the minimum (x = −w_y).
fn aligned_problem() -> Problem {
    let mut problem = Problem::random(Shape::new(6, 12, 35), 7);
    let d = problem.shape.dim;
    for i in 0..problem.shape.batch {
        let y = problem.labels[i] as usize;
        let sign = if i % 2 == 0 { 1.0 } else { -1.0 };
        for k in 0..d {
            problem.features[i * d + k] = sign * problem.classes[y * d + k];
        }
    }
    problem
}

#[test]
fn target_cosine_is_the_maximum_or_the_minimum() {
    let problem = aligned_problem();
    let out = check_against_reference(context(), &problem, &LossParams::default(), "aligned");
    for i in 0..problem.shape.batch {
        let expected = if i % 2 == 0 { 1.0 } else { -1.0 };
        assert!(
            (out.target_cos[i] - expected).abs() < 1e-5,
            "row {i}: {}",
            out.target_cos[i]
        );
        if i % 2 == 0 {
            assert_eq!(
                out.pred[i], problem.labels[i],
                "row {i} predicts its own class"
            );
        }
    }
}

#[test]
fn ignored_labels_and_all_ignored() {
    let mut problem = Problem::random(Shape::new(21, 10, 50), 8);
    for i in (0..21).step_by(3) {
        problem.labels[i] = IGNORE;
    }
    let out = check_against_reference(context(), &problem, &LossParams::default(), "ignore");
    assert_eq!(out.valid_rows, 14);
    problem.labels.fill(IGNORE);
    let out = check_against_reference(context(), &problem, &LossParams::default(), "all ignored");
    assert_eq!(out.loss, 0.0);
    assert_eq!(out.valid_rows, 0);
    let grads = out.grads.expect("gradients");
    assert!(grads
        .features
        .iter()
        .chain(&grads.classes)
        .all(|&g| g == 0.0));
}

#[test]
fn reductions_and_scale_floor() {
    let problem = Problem::random(Shape::new(13, 9, 40), 9);
    for reduction in [Reduction::Mean, Reduction::Sum, Reduction::None] {
        let p = LossParams {
            reduction,
            ..LossParams::default()
        };
        check_against_reference(context(), &problem, &p, "reduction");
    }
    // Below its floor the scale is max(s, s_min) and receives no gradient.
    let floored = LossParams {
        scale: 4.0,
        scale_min: 10.0,
        ..LossParams::default()
    };
    let out = check_against_reference(context(), &problem, &floored, "floor");
    assert_eq!(out.grad_scale, 0.0);
    let at_floor = LossParams {
        scale: 10.0,
        scale_min: 10.0,
        ..LossParams::default()
    };
    let out = check_against_reference(context(), &problem, &at_floor, "at floor");
    assert_ne!(out.grad_scale, 0.0);
}

#[test]
fn every_tile_configuration() {
    let problem = Problem::random(Shape::new(29, 11, 83), 10);
    for (rows, classes) in [(1, 1), (4, 8), (8, 4), (2, 16), (16, 16)] {
        let ctx = Context::new_blocking(ContextOptions {
            tiles: TileConfig {
                rows_per_workgroup: rows,
                classes_per_workgroup: classes,
            },
            ..ContextOptions::default()
        })
        .expect("context with custom tiles");
        check_against_reference(&ctx, &problem, &params(30.0, 0.2), "tiles");
    }
}

#[test]
fn chunked_plan_with_many_row_chunks_and_long_class_ranges() {
    // A 5-row budget cuts B = 37 into 8 row chunks; C = 70 000 cuts the dL/dx GEMM into
    // 18 accumulated k-pieces of at most 4096 classes (and past llvmpipe's loop budget,
    // had it one piece).
    for (b, d, c, rows) in [(37usize, 10usize, 300usize, 5usize), (6, 3, 70_000, 4)] {
        let ctx = Context::new_blocking(ContextOptions {
            // G for `rows` rows (of C rounded up to 4), on top of the other workspace:
            // norms, flags, softmax rows (20 bytes each), 64 KiB of uniforms, and the
            // copies of x̂ and w in rows of D rounded up to 4 (D is not a multiple of 4).
            workspace_budget: Some(
                (4 * (b + c)
                    + 4
                    + 20 * b
                    + (64 << 10)
                    + 4 * (b + c) * d.next_multiple_of(4)
                    + c.next_multiple_of(4) * 4 * rows) as u64,
            ),
            ..ContextOptions::default()
        })
        .expect("context");
        let p = Problem::random(Shape::new(b, d, c), 12);
        let params = LossParams::default();
        let expected = margin_softmax::reference::loss_on(&p, &params).expect("reference");
        // The unfused baseline cuts the same long k = C into pieces.
        for algorithm in [
            margin_softmax::Algorithm::Chunked,
            margin_softmax::Algorithm::Unfused,
        ] {
            let out = common::loss_with(
                &ctx,
                algorithm,
                &p,
                &params,
                margin_softmax::Pass::ForwardBackward,
            )
            .expect("loss");
            common::check_output(
                &out,
                &expected,
                &p,
                &params,
                &format!("{algorithm:?} row chunks and k-pieces"),
            );
        }
    }
}

#[test]
fn chunked_plan_in_class_blocks() {
    // Budgets far below G for whole rows (B·C·4 bytes) make the chunked plan hold one
    // block of classes at a time: partials per block in the forward, the blocks' dots
    // recomputed in the backward. Labels sit at block edges, one row is ignored, and the
    // margin family and the hard objective (whose gradient goes to one other class) run.
    // (600, 16, 2000) takes blocks in five row chunks of at most 128 rows.
    for (b, d, c, budget) in [
        (70usize, 24usize, 3000usize, 240_000u64),
        (600, 16, 2000, 380_000),
    ] {
        assert!((b * c * 4) as u64 > budget);
        let ctx = Context::new_blocking(ContextOptions {
            workspace_budget: Some(budget),
            ..ContextOptions::default()
        })
        .expect("context");
        let plan = margin_softmax::Plan::new(&ctx, Shape::new(b, d, c)).expect("plan");
        assert_eq!(plan.algorithm(), margin_softmax::Algorithm::Chunked);
        assert!(
            plan.workspace_bytes() <= budget,
            "{} > {budget}",
            plan.workspace_bytes()
        );
        let mut p = Problem::random(Shape::new(b, d, c), 21);
        // Blocks are whole multiples of 32 classes (the default tile): labels at every
        // multiple of 32 and one below it land on the edges whatever the block width.
        for (i, label) in p.labels.iter_mut().enumerate().skip(3) {
            *label = ((32 * (i / 2) + c - i % 2) % c) as u32;
        }
        p.labels[0] = margin_softmax::IGNORE;
        p.labels[1] = (c - 1) as u32;
        p.labels[2] = 0;
        let hard = LossParams {
            objective: margin_softmax::Objective::HardMargin,
            ..LossParams::default()
        };
        for (what, params) in [
            ("cosface blocks", params(30.0, 0.35)),
            ("arcface blocks", LossParams::arcface()),
            ("hard blocks", hard),
        ] {
            let out = check_against_reference(&ctx, &p, &params, what);
            let again = ctx
                .loss_on(&p, &params, margin_softmax::Pass::ForwardBackward)
                .expect("loss");
            assert_eq!(again, out, "{what}: a second call differs");
            // The forward alone runs the same blocks: the same loss and rows, bit for bit.
            let forward = ctx
                .loss_on(&p, &params, margin_softmax::Pass::Forward)
                .expect("forward");
            assert_eq!(forward.loss, out.loss, "{what}: forward loss");
            assert_eq!(forward.row_loss, out.row_loss, "{what}: forward row losses");
            assert_eq!(forward.pred, out.pred, "{what}: forward predictions");
        }
    }
}

#[test]
fn feature_lengths_past_one_gemm_piece() {
    // D = 8192 > 4096 cuts the dots GEMM into accumulated k-pieces; the backward must not
    // run them again over G (the unfused baseline once did).
    let p = Problem::random(Shape::new(5, 8192, 37), 23);
    check_against_reference(context(), &p, &params(30.0, 0.35), "D = 8192");
}

#[test]
fn long_sums_are_as_accurate_as_pytorch_f32() {
    // The case: dL/dx sums over 16 384 classes and dL/dw over 512 rows at s = 64,
    // where PyTorch's f32 reaches 1.0e-6 and 7.8e-7 (max |error| / max |value|). Before
    // the GEMMs summed in runs of about √(k/4) quads and the softmax lanes in runs, the
    // chunked plan gave 2.66e-6 and 1.71e-6 here, the memory-minimal plan 2.77e-6 and
    // 1.94e-6 (examples/long_sums.rs prints the figures).
    let ctx = context();
    let problem = Problem::random(Shape::new(512, 256, 16384), 11);
    let params = params(64.0, 0.35);
    let exact = margin_softmax::reference::loss_on(&problem, &params).expect("reference");
    for algorithm in [
        margin_softmax::Algorithm::Chunked,
        margin_softmax::Algorithm::MemoryMinimal,
    ] {
        let out = common::loss_with(
            ctx,
            algorithm,
            &problem,
            &params,
            margin_softmax::Pass::ForwardBackward,
        )
        .expect("loss");
        let grads = out.grads.expect("gradients");
        let dx =
            margin_softmax::reference::max_rel_error(&grads.features, &exact.grad_features, 0.0);
        let dw = margin_softmax::reference::max_rel_error(&grads.classes, &exact.grad_classes, 0.0);
        assert!(
            dx <= 1.0e-6 && dw <= 7.8e-7,
            "{algorithm:?}: dL/dx {dx:.3e}, dL/dw {dw:.3e}"
        );
    }
}
