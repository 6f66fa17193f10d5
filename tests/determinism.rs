//! Same inputs, same adapter: bitwise-identical outputs (no float atomics anywhere; every
//! sum has one owner or is reduced in a fixed order).

mod common;

use common::context;
use margin_softmax::{Algorithm, LossOutput, LossParams, Pass, Problem, Shape};

fn bits(out: &LossOutput) -> Vec<u32> {
    let grads = out.grads.as_ref().expect("grads");
    [out.loss, out.grad_scale]
        .iter()
        .chain(&out.row_loss)
        .chain(&out.target_cos)
        .chain(&out.best_other_cos)
        .chain(&grads.features)
        .chain(&grads.classes)
        .map(|v| v.to_bits())
        .chain(out.pred.iter().copied())
        .collect()
}

#[test]
fn repeated_calls_are_bitwise_identical() {
    let ctx = context();
    // Small B and large C, so that several class splits are merged.
    for (shape, seed) in [(Shape::new(5, 24, 2500), 31), (Shape::new(70, 9, 90), 32)] {
        let p = Problem::random(shape, seed);
        let run = || {
            ctx.loss(
                shape,
                &p.features,
                &p.classes,
                &p.labels,
                &LossParams::default(),
                Pass::ForwardBackward,
            )
            .expect("loss")
        };
        let first = bits(&run());
        for _ in 0..3 {
            assert_eq!(bits(&run()), first, "{shape:?}");
        }
        for algorithm in [
            Algorithm::MemoryMinimal,
            Algorithm::Chunked,
            Algorithm::Unfused,
        ] {
            let run = || {
                common::loss_with(
                    ctx,
                    algorithm,
                    &p,
                    &LossParams::default(),
                    Pass::ForwardBackward,
                )
                .expect("loss")
            };
            assert_eq!(bits(&run()), bits(&run()), "{algorithm:?} {shape:?}");
        }
    }
}
