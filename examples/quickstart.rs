//! The main job on an embedded default problem: a seeded random batch, the fused loss and
//! gradients on the default adapter, and the largest differences from the f64 reference.
//!
//! `cargo run --release --example quickstart`

use margin_softmax::{reference, workspace_bytes, Context, LossParams, Pass, Shape};

/// A small deterministic generator (SplitMix64), so the problem is the same everywhere.
fn random_values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            ((z >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

fn main() -> Result<(), margin_softmax::Error> {
    let ctx = Context::new_default()?;
    let shape = Shape::new(100, 64, 1000);
    let x = random_values(1, shape.batch * shape.dim);
    let w = random_values(2, shape.classes * shape.dim);
    let labels: Vec<u32> = (0..shape.batch as u32).map(|i| (i * 7919) % 1000).collect();
    let params = LossParams::default();

    let start = std::time::Instant::now();
    let out = ctx.loss(shape, &x, &w, &labels, &params, Pass::ForwardBackward)?;
    let elapsed = start.elapsed();
    let expected = reference::loss(shape, &x, &w, &labels, &params)?;
    let check = reference::compare(shape.dim, &out, &expected);

    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    let grads = out.grads.as_ref().expect("ForwardBackward returns gradients");
    println!("adapter    {}", ctx.describe());
    println!(
        "problem    B = {}, D = {}, C = {}, s = {}, m = {}",
        shape.batch, shape.dim, shape.classes, params.scale, params.margin
    );
    println!("loss       {:.6} (f64 reference {:.6})", out.loss, expected.loss);
    println!("|dL/dx|    {:.6e}", norm(&grads.features));
    println!("|dL/dw|    {:.6e}", norm(&grads.classes));
    println!("dL/ds      {:.6e}", out.grad_scale);
    println!(
        "accuracy   {}/{}",
        out.correct_rows, out.valid_rows
    );
    let ws = workspace_bytes(&ctx, shape)?;
    println!(
        "workspace  {ws} bytes (B·C·4 = {} bytes)",
        shape.batch * shape.classes * 4
    );
    println!("time       {:.1} ms (first call, including set-up)", elapsed.as_secs_f64() * 1e3);
    println!("max error against the f64 reference:");
    for (name, err, bound) in &check.errors {
        println!("  {name:<15} {err:.3e}  (bound {bound:.1e})");
    }
    println!("  pred mismatches {}", check.pred_mismatches);
    if !check.passes() {
        eprintln!("FAILED: an error exceeds its bound");
        std::process::exit(1);
    }
    println!("PASS");
    Ok(())
}
