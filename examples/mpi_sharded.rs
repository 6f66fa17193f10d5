//! The class-sharded loss across MPI ranks, Partial FC's layout: each rank owns a
//! contiguous shard of the classes and a slice of the batch. The batch features and labels
//! are all-gathered, each rank computes per-row partials over its classes, the partials
//! are all-gathered and merged in rank order (deterministic), each rank computes the exact
//! dL/dw of its classes and its share of dL/dx, and each rank sums every shard's share of
//! its own rows (all-to-all) in rank order. Rank 0 compares everything with a
//! single-process run.
//!
//! `cargo build --release --features mpi --example mpi_sharded`
//! `mpirun --allow-run-as-root --oversubscribe -np 4 target/release/examples/mpi_sharded [B D C]`

use std::time::Instant;

use margin_softmax::shard::{
    finish_rows, merge_shards, ClassShard, GlobalRows, RowPartial, ShardInputs,
};
use margin_softmax::{Context, Gradients, LossOutput, LossParams, Pass, Problem, Shape};
use mpi::traits::*;

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).fold(0.0, |m, (x, y)| m.max((x - y).abs()))
}

/// One sharded forward + backward step: returns this rank's shard, the global rows, its
/// gradients and the all-reduced dL/dx.
fn step(
    world: &mpi::topology::SimpleCommunicator,
    p: &Problem,
    params: &LossParams,
    ctx: &Context,
    rank: usize,
    ranks: usize,
) -> (ClassShard, GlobalRows, Gradients, Vec<f32>) {
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = p.shape;
    // The batch, all-gathered: each rank contributes its B/K rows.
    let rows = b / ranks;
    let mut x = vec![0.0f32; b * d];
    world.all_gather_into(
        &p.features[rank * rows * d..(rank + 1) * rows * d],
        &mut x[..],
    );
    let mut labels = vec![0u32; b];
    world.all_gather_into(&p.labels[rank * rows..(rank + 1) * rows], &mut labels[..]);

    // This rank's classes and their partials; all-gathered and merged in rank order.
    let shard = ClassShard::split(c, ranks, rank).expect("rank < ranks");
    let w = &p.classes[shard.first * d..(shard.first + shard.count) * d];
    let inputs = ShardInputs {
        shard,
        dim: d,
        features: &x,
        classes: w,
        labels: &labels,
        sample: None,
        row_margins: None,
        hard_thresholds: None,
    };
    let partials = ctx.shard_forward(&inputs, params).expect("shard forward");
    let sent: &[u8] = bytemuck::cast_slice(&partials);
    let mut gathered = vec![0u8; ranks * sent.len()];
    world.all_gather_into(sent, &mut gathered[..]);
    let per_rank: Vec<Vec<RowPartial>> = gathered
        .chunks(sent.len())
        .map(bytemuck::pod_collect_to_vec)
        .collect();
    let merged = merge_shards(&per_rank).expect("every rank sends B partials");
    let global = finish_rows(&merged, &labels, c, params).expect("one label per row");

    // dL/dw of this shard exactly; dL/dx summed over the shards' shares in rank order.
    let grads = ctx
        .shard_backward(&inputs, params, &global)
        .expect("shard backward");
    // dL/dx reduced onto each rank's own rows: rank r receives every shard's share of its
    // B/K rows (all-to-all) and sums them in rank order, B·D·4 bytes a rank in all.
    let block = rows * d;
    let mut received = vec![0.0f32; ranks * block];
    world.all_to_all_into(&grads.features[..], &mut received[..]);
    let mine: Vec<f32> = (0..block)
        .map(|e| (0..ranks).fold(0.0f32, |sum, r| sum + received[r * block + e]))
        .collect();
    // Only to compare with the single process: all of dL/dx on every rank.
    let mut grad_x = vec![0.0f32; b * d];
    world.all_gather_into(&mine[..], &mut grad_x[..]);
    (shard, global, grads, grad_x)
}

fn main() {
    let universe = mpi::initialize().expect("MPI initialises");
    let world = universe.world();
    let (rank, ranks) = (world.rank() as usize, world.size() as usize);
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    let (b, d, c) = match args[..] {
        [b, d, c] => (b, d, c),
        _ => (64, 32, 2000),
    };
    assert!(
        b % ranks == 0 && c >= ranks,
        "B must be a multiple of the number of ranks, and C at least that number"
    );
    // Every rank can generate the problem; it keeps only its rows and its classes.
    let shape = Shape::new(b, d, c);
    let p = Problem::random(shape, 3);
    let params = LossParams::default();
    let ctx = Context::new_default().expect("a wgpu adapter");
    // One untimed step warms up each rank's pipelines, then the timed one.
    let mut result = None;
    let mut sharded_time = std::time::Duration::ZERO;
    for _ in 0..2 {
        world.barrier();
        let start = Instant::now();
        result = Some(step(&world, &p, &params, &ctx, rank, ranks));
        world.barrier();
        sharded_time = start.elapsed();
    }
    let (shard, global, grads, grad_x) = result.expect("a step");

    // Every rank checks its dL/dw rows against a single-process run (warmed up like the
    // sharded step, then timed); rank 0 checks the rest.
    ctx.loss_on(&p, &params, Pass::ForwardBackward)
        .expect("single-process loss");
    let single_start = Instant::now();
    let single = ctx
        .loss_on(&p, &params, Pass::ForwardBackward)
        .expect("single-process loss");
    let single_time = single_start.elapsed();
    let single_grads = single.grads.as_ref().expect("gradients");
    let local_dw = max_diff(
        &grads.classes,
        &single_grads.classes[shard.first * d..(shard.first + shard.count) * d],
    );
    let mut all_dw = vec![0.0f32; ranks];
    world.all_gather_into(&local_dw, &mut all_dw[..]);
    if rank == 0 {
        let times = (sharded_time, single_time);
        report(
            &world,
            shape,
            ranks,
            (&global, &grad_x, &all_dw),
            &single,
            times,
        );
    }
}

/// Rank 0's comparison of the sharded step (its rows, dL/dx gathered, every rank's dL/dw
/// error) with the single-process run, and the bytes and times; aborts on a mismatch.
fn report(
    world: &mpi::topology::SimpleCommunicator,
    shape: Shape,
    ranks: usize,
    (global, grad_x, all_dw): (&GlobalRows, &[f32], &[f32]),
    single: &LossOutput,
    (sharded_time, single_time): (std::time::Duration, std::time::Duration),
) {
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = shape;
    let single_grads = single.grads.as_ref().expect("gradients");
    let dw = all_dw.iter().fold(0.0f32, |m, &v| m.max(v));
    let dx = max_diff(grad_x, &single_grads.features);
    let dloss = (global.output.loss - single.loss).abs();
    let ds = (global.output.grad_scale - single.grad_scale).abs();
    // Per row of the batch: its partial from every rank, its dL/dx share (the
    // all-to-all moves one share per row), and its features and label.
    let exchanged = std::mem::size_of::<RowPartial>() * ranks + 4 * d + (4 * d + 4);
    println!(
        "ranks {ranks}, B = {b}, D = {d}, C = {c} ({} classes per rank at most)",
        c.div_ceil(ranks)
    );
    println!(
        "loss sharded {} single {} |Δ| {dloss:.3e}",
        global.output.loss, single.loss
    );
    println!("max |Δ| dL/dx {dx:.3e}, dL/dw {dw:.3e}, dL/ds {ds:.3e}");
    println!(
        "bytes per row received by each rank: {exchanged} (partials {}, dL/dx shares {}, features and label {})",
        std::mem::size_of::<RowPartial>() * ranks,
        4 * d,
        4 * d + 4
    );
    println!(
        "wall time: sharded {:.1} ms, single process {:.1} ms",
        sharded_time.as_secs_f64() * 1e3,
        single_time.as_secs_f64() * 1e3
    );
    let ok = dloss <= 1e-5 * single.loss.abs().max(1.0) && dx <= 1e-5 && dw <= 1e-5 && ds <= 1e-5;
    println!(
        "{}",
        if ok {
            "PASS"
        } else {
            "FAIL: the sharded result differs from the single-process one"
        }
    );
    if !ok {
        world.abort(1);
    }
}
