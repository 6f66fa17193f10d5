//! The accuracy of the long sums: dL/dx sums over every class (k = C) and dL/dw over
//! every row (k = B). Prints max |error| / max |value| of each gradient against the f64
//! reference, for shapes and scales where PyTorch's f32 reaches about 1.0e-6 (dL/dx) and
//! 7.8e-7 (dL/dw).
//!
//!   cargo run --release --example long_sums [-- BxDxC ...]

use margin_softmax::{reference, Context, LossParams, Pass, Problem, Shape};

fn main() -> margin_softmax::Result<()> {
    let ctx = Context::new_default()?;
    let args: Vec<String> = std::env::args().skip(1).collect();
    let shapes: Vec<Shape> = if args.is_empty() {
        vec![Shape::new(512, 256, 16384), Shape::new(256, 512, 10000)]
    } else {
        args.iter()
            .filter_map(|a| {
                let d: Vec<usize> = a.split('x').filter_map(|v| v.parse().ok()).collect();
                (d.len() == 3).then(|| Shape::new(d[0], d[1], d[2]))
            })
            .collect()
    };
    println!("adapter {}", ctx.describe());
    println!("| B | D | C | s | m | dL/dx max err / max value | dL/dw max err / max value |");
    println!("|---|---|---|---|---|---|---|");
    for shape in shapes {
        let p = Problem::random(shape, 11);
        for scale in [30.0, 64.0] {
            let params = LossParams {
                scale,
                margin: 0.35,
                ..LossParams::default()
            };
            let out = ctx.loss_on(&p, &params, Pass::ForwardBackward)?;
            let exact = reference::loss_on(&p, &params)?;
            let grads = out.grads.expect("gradients");
            println!(
                "| {} | {} | {} | {scale} | 0.35 | {:.2e} | {:.2e} |",
                shape.batch,
                shape.dim,
                shape.classes,
                reference::max_rel_error(&grads.features, &exact.grad_features, 0.0),
                reference::max_rel_error(&grads.classes, &exact.grad_classes, 0.0)
            );
        }
    }
    Ok(())
}
