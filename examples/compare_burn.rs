//! The crate against Burn on one adapter, in one sitting: the crate's GEMM, fused
//! forward + backward and unfused baseline (from `margin_softmax::bench`), and the Burn
//! peer's plain matmul and autodiff step (`../shared/peers/burn-cosface`, run as a child
//! process), all by host wall clock around submit and wait, as the peer times itself.
//!
//! ```text
//! cargo run --release --example compare_burn -- [--burn PATH] [--shapes BxDxC,...] [--reps N]
//! ```
//!
//! PATH defaults to `$BURN_COSFACE`, else `/tmp/burn-cosface-target/release/burn-cosface`
//! (build it as the peer's README says). Prints one markdown table with the ratios.

use std::process::Command;

use margin_softmax::bench::{self, BenchOptions, BenchRow};
use margin_softmax::{Context, Shape};

const DEFAULT_SHAPES: &str = "256x128x4096,512x256x16384,1024x512x16384";

/// The seconds the peer printed: the number after the first ": " of its timing line.
fn burn_seconds(burn: &str, shape: Shape, reps: usize, gemm_only: bool) -> Result<f64, String> {
    let mut command = Command::new(burn);
    command.args([
        shape.batch.to_string(),
        shape.dim.to_string(),
        shape.classes.to_string(),
        reps.to_string(),
    ]);
    if gemm_only {
        command.env("GEMM_ONLY", "1");
    }
    let out = command
        .output()
        .map_err(|e| format!("cannot run {burn}: {e} (pass --burn PATH)"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|line| line.starts_with("burn-wgpu-"))
        .and_then(|line| line.split(": ").nth(1))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .ok_or_else(|| format!("no timing in the output of {burn}: {text}"))
}

fn run() -> Result<(), String> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut burn = std::env::var("BURN_COSFACE")
        .unwrap_or_else(|_| "/tmp/burn-cosface-target/release/burn-cosface".into());
    let mut shapes = bench::parse_shapes(DEFAULT_SHAPES)?;
    let mut reps = 3;
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = || it.next().cloned().ok_or(format!("{arg} needs a value"));
        match arg.as_str() {
            "--burn" => burn = value()?,
            "--shapes" => shapes = bench::parse_shapes(&value()?)?,
            "--reps" => reps = value()?.parse().map_err(|_| "--reps takes a number")?,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    let options = BenchOptions {
        shapes: shapes.clone(),
        warmup: 2,
        reps,
        ops: vec![
            "fused_forward_backward".into(),
            "unfused_forward_backward".into(),
        ],
        wall_clock: true,
        ..BenchOptions::default()
    };
    let ctx = Context::new_blocking(options.context.clone()).map_err(|e| e.to_string())?;
    eprintln!("crate on {}", ctx.describe());
    let rows =
        bench::run(&ctx, &options, &mut |line| eprintln!("{line}")).map_err(|e| e.to_string())?;
    let median = |shape: Shape, op: &str| -> f64 {
        rows.iter()
            .find(|r: &&BenchRow| r.shape == shape && r.op == op)
            .map_or(f64::NAN, |r| r.seconds[0])
    };
    println!("wall clock, median of {reps} runs after 2 warm-ups; ms\n");
    println!(
        "| B | D | C | crate GEMM | Burn GEMM | GEMM speed-up | crate fused fwd+bwd (plan) | crate unfused | Burn step | step speed-up | fused / crate GEMM |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for &shape in &shapes {
        eprintln!("burn B={} D={} C={}", shape.batch, shape.dim, shape.classes);
        let burn_gemm = burn_seconds(&burn, shape, reps, true)?;
        let burn_step = burn_seconds(&burn, shape, reps, false)?;
        let gemm = median(shape, "gemm");
        let fused = median(shape, "fused_forward_backward");
        let unfused = median(shape, "unfused_forward_backward");
        let plan = rows
            .iter()
            .find(|r| r.shape == shape && r.op == "fused_forward_backward")
            .and_then(|r| r.algorithm)
            .map_or("-".into(), |a| format!("{a:?}").to_lowercase());
        println!(
            "| {} | {} | {} | {:.1} | {:.1} | {:.2}× | {:.1} ({plan}) | {:.1} | {:.1} | {:.2}× | {:.2}× |",
            shape.batch,
            shape.dim,
            shape.classes,
            gemm * 1e3,
            burn_gemm * 1e3,
            burn_gemm / gemm,
            fused * 1e3,
            unfused * 1e3,
            burn_step * 1e3,
            burn_step / fused,
            fused / gemm,
        );
    }
    Ok(())
}

fn main() {
    if let Err(message) = run() {
        eprintln!("{message}");
        std::process::exit(2);
    }
}
