//! The main job on the embedded default problem: a seeded random batch, the fused loss and
//! gradients on the default adapter, and the largest differences from the f64 reference.
//!
//! `cargo run --release --example quickstart`

use margin_softmax::{reference, workspace_bytes, Algorithm, Context, LossParams, Pass, Problem};

fn main() -> Result<(), margin_softmax::Error> {
    let ctx = Context::new_default()?;
    let Problem {
        shape,
        features,
        classes,
        labels,
    } = Problem::default_problem();
    let params = LossParams::default();

    let start = std::time::Instant::now();
    let out = ctx.loss(
        shape,
        &features,
        &classes,
        &labels,
        &params,
        Pass::ForwardBackward,
    )?;
    let elapsed = start.elapsed();
    let expected = reference::loss(shape, &features, &classes, &labels, &params)?;
    let check = reference::compare(shape.dim, &params, &out, &expected);

    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    println!("adapter    {}", ctx.describe());
    println!(
        "problem    B = {}, D = {}, C = {}, s = {}, m = {}",
        shape.batch, shape.dim, shape.classes, params.scale, params.margin
    );
    println!(
        "loss       {:.6} (f64 reference {:.6})",
        out.loss, expected.loss
    );
    if let Some(grads) = &out.grads {
        println!("|dL/dx|    {:.6e}", norm(&grads.features));
        println!("|dL/dw|    {:.6e}", norm(&grads.classes));
    }
    println!("dL/ds      {:.6e}", out.grad_scale);
    println!("accuracy   {}/{}", out.correct_rows, out.valid_rows);
    let chosen = Algorithm::choose(&ctx, shape);
    println!(
        "workspace  {} bytes ({chosen:?} plan, used here); memory-minimal plan {} bytes; the B×C logits alone {} bytes",
        workspace_bytes(&ctx, shape, chosen)?,
        workspace_bytes(&ctx, shape, Algorithm::MemoryMinimal)?,
        shape.batch * shape.classes * 4
    );
    println!(
        "time       {:.1} ms (first call, including buffer set-up)",
        elapsed.as_secs_f64() * 1e3
    );
    println!("largest error against the f64 reference:");
    for (name, err, bound) in &check.errors {
        println!("  {name:<15} {err:.3e}  (bound {bound:.1e})");
    }
    println!("  pred mismatches {}", check.pred_mismatches);
    if !check.passes() {
        eprintln!("FAIL: an error exceeds its bound");
        std::process::exit(1);
    }
    println!("PASS");
    Ok(())
}
