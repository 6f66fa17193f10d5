//! A Burn training step of the loss alone (the backbone excluded): this module's fused
//! kernels against the composed Burn loss (`MarginSoftmax::forward_composed`: normalise,
//! matmul, margin, log-softmax, Burn's autodiff), on one Burn wgpu device, in one run.
//! Each step is forward, backward and the gradients dL/dx and dL/dw, timed by the host
//! around a device sync; the two are interleaved rep by rep. Memory: the bytes Burn's
//! allocator holds between the forward and the backward (the graph's state), plus the
//! crate's workspace for the fused step.
//!
//! `cargo bench -p margin-softmax-burn --bench step -- [--shapes BxDxC,...] [--reps N] [--plain]`

use std::time::Instant;

use burn::module::Param;
use burn::tensor::{Device, DeviceKind, Int, Tensor, TensorData};
use margin_softmax::{bench, Problem, Shape};
use margin_softmax_burn::{MarginSoftmax, MarginSoftmaxConfig, MarginSoftmaxOutput};

const DEFAULT_SHAPES: &str = "256x128x4096,512x256x16384";

/// The fused or the composed forward.
type Forward = fn(&MarginSoftmax, Tensor<2>, Tensor<1, Int>) -> MarginSoftmaxOutput;

fn in_use(device: &Device) -> u64 {
    device.memory_pool_usage().map_or(0, |u| u.bytes_in_use)
}

/// One step; returns its seconds and the bytes held between forward and backward.
fn step(
    device: &Device,
    head: &MarginSoftmax,
    x: &Tensor<2>,
    y: &Tensor<1, Int>,
    forward: Forward,
) -> (f64, u64) {
    device.sync().expect("device");
    let before = in_use(device);
    let start = Instant::now();
    let out = forward(head, x.clone(), y.clone());
    device.sync().expect("device");
    let held = in_use(device).saturating_sub(before);
    let grads = out.loss.backward();
    let gx = x.grad(&grads).expect("dL/dx");
    let gw = head.classes.val().grad(&grads).expect("dL/dw");
    device.sync().expect("device");
    let seconds = start.elapsed().as_secs_f64();
    drop((gx, gw));
    (seconds, held)
}

/// The median; NaN for a path not run (`--plain` runs the composed one alone).
fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|k| args.get(k + 1))
            .cloned()
    };
    let shapes = value("--shapes").unwrap_or_else(|| DEFAULT_SHAPES.into());
    let reps: usize = value("--reps").map_or(5, |v| v.parse().expect("--reps N"));
    // --plain: the composed loss alone, on Burn's own default wgpu device (CubeCL's
    // default memory pools, no kernels registered), for comparison.
    let plain = args.iter().any(|a| a == "--plain");
    let device = if plain {
        Device::wgpu(DeviceKind::DefaultDevice).autodiff()
    } else {
        margin_softmax_burn::wgpu_device()
            .expect("a wgpu adapter")
            .autodiff()
    };
    println!("| B×D×C | fused step (s) | composed step (s) | composed / fused | held by fused (MB) | held by composed (MB) |");
    println!("|---|---|---|---|---|---|");
    for shape in bench::parse_shapes(&shapes).expect("--shapes BxDxC,...") {
        let problem = Problem::random(shape, 1);
        let Shape {
            batch,
            dim,
            classes,
            ..
        } = shape;
        let mut head = MarginSoftmaxConfig::new(classes, dim).init(&device);
        head.classes = Param::from_tensor(Tensor::from_data(
            TensorData::new(problem.classes.clone(), [classes, dim]),
            &device,
        ));
        let x = Tensor::<2>::from_data(
            TensorData::new(problem.features.clone(), [batch, dim]),
            &device,
        )
        .require_grad();
        let labels: Vec<i64> = problem.labels.iter().map(|&l| i64::from(l)).collect();
        let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch]), &device);
        let workspace = head
            .workspace_bytes(&device, batch)
            .expect("a plan")
            .unwrap_or(0);
        let paths: [Forward; 2] = [MarginSoftmax::forward, MarginSoftmax::forward_composed];
        let paths = &paths[usize::from(plain)..];
        // Warm-up: compiles the kernels, makes the plan, tunes Burn's matmul.
        for &forward in paths {
            step(&device, &head, &x, &y, forward);
        }
        let mut times = [Vec::new(), Vec::new()];
        let mut held = [0u64; 2];
        for _ in 0..reps {
            for (k, &forward) in paths.iter().enumerate() {
                let k = k + usize::from(plain);
                let (seconds, bytes) = step(&device, &head, &x, &y, forward);
                times[k].push(seconds);
                held[k] = held[k].max(bytes);
            }
        }
        let [fused, composed] = times.map(median);
        let mb = |b: u64| b as f64 / 1e6;
        println!(
            "| {batch}×{dim}×{classes} | {fused:.4} | {composed:.4} | {:.2} | {:.1} (+{:.1} workspace) | {:.1} |",
            composed / fused,
            mb(held[0]),
            mb(workspace),
            mb(held[1])
        );
    }
}
