//! Every GEMM candidate (the register-only kernel and the tiles staged in workgroup memory)
//! gives bit for bit the same loss and gradients, on every plan and on shapes off every
//! tile grid, and each is within the f64 reference's bounds.

mod common;

use margin_softmax::{
    reference, Algorithm, Context, ContextOptions, LossOutput, LossParams, Pass, Problem, Shape,
};

fn pinned(name: &str) -> Context {
    Context::new_blocking(ContextOptions {
        gemm_candidate: Some(name.to_string()),
        ..ContextOptions::default()
    })
    .unwrap_or_else(|e| panic!("a context pinned to {name}: {e}"))
}

#[test]
fn every_candidate_gives_the_same_bits() {
    let names: Vec<&str> = common::context()
        .gemm_candidates()
        .iter()
        .map(|c| c.name)
        .collect();
    assert!(names.len() >= 3, "candidates: {names:?}");
    let contexts: Vec<Context> = names.iter().map(|n| pinned(n)).collect();
    let params = LossParams::default();
    // Off every tile grid (32, 64, 128 rows and columns); k-pieces of 4096 along D (the
    // dots, one after another) and split-K along C (G'·w) and along B (G'ᵀ·x̂), each with
    // a ragged last split; a ragged last quad of k.
    for (shape, seed) in [
        (Shape::new(67, 131, 37), 1),
        (Shape::new(5, 13, 4099), 2),
        (Shape::new(130, 4101, 9), 3),
        (Shape::new(4101, 12, 7), 4),
    ] {
        let p = Problem::random(shape, seed);
        let expected = reference::loss_on(&p, &params).expect("reference");
        for algorithm in [
            Algorithm::Chunked,
            Algorithm::MemoryMinimal,
            Algorithm::Unfused,
        ] {
            let outputs: Vec<LossOutput> = contexts
                .iter()
                .map(|ctx| {
                    common::loss_with(ctx, algorithm, &p, &params, Pass::ForwardBackward)
                        .expect("loss")
                })
                .collect();
            for (out, name) in outputs.iter().zip(&names) {
                let check = reference::compare(shape.dim, &params, out, &expected);
                assert!(check.passes(), "{shape:?} {algorithm:?} {name}: {check:?}");
                assert!(
                    out == &outputs[0],
                    "{shape:?} {algorithm:?}: {name} differs from {}",
                    names[0]
                );
            }
        }
    }
}

#[test]
fn an_unknown_candidate_names_the_known_ones() {
    let err = Context::new_blocking(ContextOptions {
        gemm_candidate: Some("fastest".into()),
        ..ContextOptions::default()
    })
    .unwrap_err();
    let text = err.to_string();
    assert!(
        text.contains("fastest") && text.contains("register"),
        "{text}"
    );
}

/// The same with x and w stored in f16 and bf16 and D a multiple of 4, so that the dots
/// and G'·w read the 16-bit w in place (gemm_rhs_half.wgsl): every candidate gives the
/// same bits, their f16 and bf16 gradients included.
#[cfg(feature = "half")]
#[test]
fn every_candidate_gives_the_same_bits_on_16_bit_inputs() {
    use margin_softmax::half::{bf16, f16};
    use margin_softmax::HostInputs;
    let names: Vec<&str> = common::context()
        .gemm_candidates()
        .iter()
        .map(|c| c.name)
        .collect();
    let contexts: Vec<Context> = names.iter().map(|n| pinned(n)).collect();
    let params = LossParams::default();
    for (shape, seed) in [(Shape::new(67, 132, 37), 5), (Shape::new(5, 16, 4099), 6)] {
        let p = Problem::random(shape, seed);
        let x: Vec<f16> = p.features.iter().map(|&v| f16::from_f32(v)).collect();
        let w: Vec<bf16> = p.classes.iter().map(|&v| bf16::from_f32(v)).collect();
        for algorithm in [Algorithm::Chunked, Algorithm::MemoryMinimal] {
            let outputs: Vec<LossOutput<f16, bf16>> = contexts
                .iter()
                .map(|ctx| {
                    let inputs = HostInputs::new(shape, &x, &w, &p.labels);
                    ctx.loss_inputs(&inputs, &params, Pass::ForwardBackward, Some(algorithm))
                        .expect("loss")
                })
                .collect();
            for (out, name) in outputs.iter().zip(&names) {
                assert!(
                    out == &outputs[0],
                    "{shape:?} {algorithm:?}: {name} differs from {}",
                    names[0]
                );
            }
        }
    }
}
