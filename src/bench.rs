//! The portable benchmark: on any adapter, per shape, one plain GEMM (the cost floor),
//! the fused forward, the fused forward + backward and the unfused baseline, timed on the
//! GPU with timestamp queries where the adapter has them, else by wall clock around
//! submit-and-wait. `cargo bench` runs [`main_with_args`]; the CLI can call it too.

use std::time::Instant;

use wgpu::util::DeviceExt;

use crate::context::{Context, ContextOptions};
use crate::error::{Error, Result};
use crate::io::{BufferRegion, DeviceInputs, DeviceOutputs, GradOutputs, RowStats, Shape, Summary};
use crate::kernels::{encode, fold_grid, padded, Dispatch, GemmLayout, GemmShape, Timestamps};
use crate::params::LossParams;
use crate::plan::{Algorithm, Phase, Plan};
use crate::problem::Problem;
use crate::Pass;

/// What to run.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Problem shapes, in order.
    pub shapes: Vec<Shape>,
    /// Untimed runs of each operation before timing.
    pub warmup: usize,
    /// Timed runs of each operation.
    pub reps: usize,
    /// Write one JSON object per row to this file.
    pub json: Option<std::path::PathBuf>,
    /// Adapter choice.
    pub context: ContextOptions,
    /// Also time each kernel of every loss operation, each dispatch in a compute pass of
    /// its own (GPU timestamps only).
    pub profile: bool,
    /// Operations to run besides the GEMM (see [`BenchRow::op`]); all when empty.
    pub ops: Vec<String>,
    /// Time by host wall clock around submit and wait even where GPU timestamps exist,
    /// as a framework's own benchmark does.
    pub wall_clock: bool,
}

/// The default shapes: B ∈ {256, 1024}, D ∈ {128, 512}, C ∈ {4096, 16384, 100000}.
pub fn default_shapes() -> Vec<Shape> {
    let mut shapes = Vec::new();
    for b in [256, 1024] {
        for d in [128, 512] {
            for c in [4096, 16384, 100_000] {
                shapes.push(Shape::new(b, d, c));
            }
        }
    }
    shapes
}

/// The quick preset for slow adapters such as lavapipe: a few seconds per shape there.
pub fn quick_shapes() -> Vec<Shape> {
    vec![Shape::new(256, 128, 4096), Shape::new(256, 128, 16384)]
}

impl Default for BenchOptions {
    fn default() -> Self {
        BenchOptions {
            shapes: default_shapes(),
            warmup: 2,
            reps: 10,
            json: None,
            context: ContextOptions::default(),
            profile: false,
            ops: Vec::new(),
            wall_clock: false,
        }
    }
}

/// Usage of [`parse_args`].
pub const USAGE: &str = "\
margin-softmax benchmark: fused loss against the unfused baseline and a plain GEMM

options:
  --quick               shapes 256x128x4096 and 256x128x16384, 1 warm-up, 5 runs
  --shapes BxDxC,...    shapes to run (default: B in {256,1024}, D in {128,512}, C in {4096,16384,100000})
  --reps N              timed runs per operation (default 10)
  --warmup N            untimed runs first (default 2)
  --json FILE           also write one JSON object per row to FILE
  --adapter NAME        adapter whose name contains NAME (default: WGPU_ADAPTER_NAME, else wgpu's choice)
  --backend NAME        vulkan, metal, dx12 or gl (default: WGPU_BACKEND, else all)
  --profile             also time each kernel of the loss operations (needs GPU timestamps)
  --ops NAME,...        operations besides the GEMM (default all): fused_forward,
                        fused_forward_backward, small_budget_fwd_bwd, fused_min_memory_fwd_bwd,
                        unfused_forward_backward, sharded_fwd_bwd, slice_api_tiny_call,
                        gemm_candidates (the GEMM on every candidate)
  --wall-clock          time by host wall clock around submit and wait, not GPU timestamps
";

/// The operations besides the GEMM, in the order they run.
const OPS: [&str; 8] = [
    "gemm_candidates",
    "fused_forward",
    "fused_forward_backward",
    "small_budget_fwd_bwd",
    "fused_min_memory_fwd_bwd",
    "unfused_forward_backward",
    "sharded_fwd_bwd",
    "slice_api_tiny_call",
];

impl BenchOptions {
    /// Whether `op` runs.
    fn runs(&self, op: &str) -> bool {
        self.ops.is_empty() || self.ops.iter().any(|o| o == op)
    }
}

/// Parses the benchmark's arguments (unknown flags such as cargo's `--bench` are ignored).
pub fn parse_args(args: &[String]) -> std::result::Result<BenchOptions, String> {
    let mut options = BenchOptions::default();
    let mut it = args.iter();
    while let Some(arg) = it.next() {
        let mut value = |name: &str| it.next().cloned().ok_or(format!("{name} needs a value"));
        let number = |text: String, name: &str| {
            text.parse::<usize>()
                .map_err(|_| format!("{name} takes a whole number, not {text:?}"))
        };
        match arg.as_str() {
            "--quick" => {
                options.shapes = quick_shapes();
                options.warmup = 1;
                options.reps = 5;
            }
            "--shapes" => options.shapes = parse_shapes(&value("--shapes")?)?,
            "--reps" => options.reps = number(value("--reps")?, "--reps")?.max(1),
            "--warmup" => options.warmup = number(value("--warmup")?, "--warmup")?,
            "--json" => options.json = Some(value("--json")?.into()),
            "--adapter" => options.context.adapter_name = Some(value("--adapter")?),
            "--backend" => {
                let name = value("--backend")?;
                options.context.backends =
                    Some(crate::parse_backends(&name).ok_or(format!("unknown backend {name:?}"))?);
            }
            "--profile" => options.profile = true,
            "--wall-clock" => options.wall_clock = true,
            "--ops" => {
                options.ops = value("--ops")?.split(',').map(str::to_string).collect();
                if let Some(bad) = options.ops.iter().find(|op| !OPS.contains(&op.as_str())) {
                    return Err(format!(
                        "unknown operation {bad:?}; known: {}",
                        OPS.join(", ")
                    ));
                }
            }
            "--help" | "-h" => return Err(USAGE.to_string()),
            _ => {}
        }
    }
    Ok(options)
}

/// Parses `BxDxC,BxDxC,...`.
pub fn parse_shapes(text: &str) -> std::result::Result<Vec<Shape>, String> {
    text.split(',')
        .map(|s| {
            let dims: Vec<usize> = s
                .split('x')
                .map(|n| n.trim().parse::<usize>())
                .collect::<std::result::Result<_, _>>()
                .map_err(|_| format!("shape {s:?} is not BxDxC"))?;
            match dims[..] {
                [b, d, c] if b > 0 && d > 0 && c > 0 => Ok(Shape::new(b, d, c)),
                _ => Err(format!(
                    "shape {s:?} is not BxDxC with every size at least 1"
                )),
            }
        })
        .collect()
}

/// How a row was timed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Timing {
    /// GPU timestamps at the beginning and end of the operation's compute pass.
    GpuTimestamps,
    /// Host wall clock around submit and wait.
    WallClock,
}

/// One measured operation on one shape.
#[derive(Debug, Clone, PartialEq)]
pub struct BenchRow {
    /// The shape.
    pub shape: Shape,
    /// `gemm`; `fused_forward` and `fused_forward_backward` (the plan `Plan::new` picks,
    /// see `algorithm`); `small_budget_fwd_bwd` (the plan [`Plan::with_budget`] picks for
    /// an eighth of the logits' bytes); `fused_min_memory_fwd_bwd` (the memory-minimal plan);
    /// `unfused_forward_backward`; or `slice_api_tiny_call` (per-call host overhead).
    pub op: &'static str,
    /// How it was timed.
    pub timing: Timing,
    /// The algorithm that ran (`None` for the GEMM and the tiny call).
    pub algorithm: Option<Algorithm>,
    /// Median, min and max seconds over the timed runs.
    pub seconds: [f64; 3],
    /// Flops counted per run: 2·B·C·D per GEMM-equivalent, 6·B·C·D for forward + backward.
    pub flops: f64,
    /// Median time over the GEMM's median time.
    pub vs_gemm: f64,
    /// Unfused median over this row's median (forward + backward rows).
    pub fused_speedup: Option<f64>,
    /// Bytes the crate allocates beyond inputs and outputs.
    pub workspace_bytes: u64,
    /// Bytes of every device buffer the operation needs at once: inputs, outputs, workspace.
    pub device_bytes: u64,
    /// Why the row has no figures, if it has none.
    pub skipped: Option<String>,
    /// With `--profile`: the operation's kernels, in order of first dispatch.
    pub profile: Vec<KernelTime>,
    /// The GEMM candidate each product ran (`dots register, G·w staged-64, …`), or the
    /// candidate of a `gemm` row.
    pub gemms: String,
}

/// One kernel's share of a profiled operation.
#[derive(Debug, Clone, PartialEq)]
pub struct KernelTime {
    /// The WGSL entry point (for `matmul`, with its product).
    pub kernel: &'static str,
    /// Its dispatches in one run.
    pub dispatches: usize,
    /// Median over the timed runs of its summed seconds in one run.
    pub seconds: f64,
}

impl BenchRow {
    /// GFLOP/s at the median time.
    pub fn gflops(&self) -> f64 {
        self.flops / self.seconds[0] / 1e9
    }
}

/// The buffers of one shape, shared by every operation.
struct ShapeBuffers {
    features: wgpu::Buffer,
    classes: wgpu::Buffer,
    labels: wgpu::Buffer,
    row_stats: wgpu::Buffer,
    summary: wgpu::Buffer,
    grad_features: wgpu::Buffer,
    grad_classes: wgpu::Buffer,
}

impl ShapeBuffers {
    fn new(ctx: &Context, problem: &Problem) -> ShapeBuffers {
        let init = |label, contents: &[u8]| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents,
                    usage: wgpu::BufferUsages::STORAGE,
                })
        };
        let empty = |label, size: usize| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: size as u64,
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            })
        };
        let Shape {
            batch: b,
            dim: d,
            classes: c,
        } = problem.shape;
        ShapeBuffers {
            features: init("features", bytemuck::cast_slice(&problem.features)),
            classes: init("classes", bytemuck::cast_slice(&problem.classes)),
            labels: init("labels", bytemuck::cast_slice(&problem.labels)),
            row_stats: empty("row_stats", b * std::mem::size_of::<RowStats>()),
            summary: empty("summary", std::mem::size_of::<Summary>()),
            grad_features: empty("grad_features", b * d * 4),
            grad_classes: empty("grad_classes", c * d * 4),
        }
    }

    fn io_bytes(&self, with_grads: bool) -> u64 {
        let mut total = self.features.size() + self.classes.size() + self.labels.size();
        total += self.row_stats.size() + self.summary.size();
        if with_grads {
            total += self.grad_features.size() + self.grad_classes.size();
        }
        total
    }
}

/// A recording of one operation with the timestamps asked for, returning its kernels'
/// names in dispatch order.
type Record<'a> =
    &'a dyn Fn(&mut wgpu::CommandEncoder, Timestamps<'_>) -> Result<Vec<&'static str>>;

/// Times `record` (which records one operation's compute pass, given optional timestamp
/// writes): warm-up runs, then `reps` timed runs; returns (timing, [median, min, max]).
fn time_op(
    ctx: &Context,
    options: &BenchOptions,
    record: Record<'_>,
) -> Result<(Timing, [f64; 3])> {
    let queries = (ctx.has_timestamps() && !options.wall_clock).then(|| {
        let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
            label: Some("bench timestamps"),
            ty: wgpu::QueryType::Timestamp,
            count: 2,
        });
        let buffer = |usage| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: None,
                size: 16,
                usage,
                mapped_at_creation: false,
            })
        };
        let resolved = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
        let readable = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
        (set, resolved, readable)
    });
    let period_ns = f64::from(ctx.queue.get_timestamp_period());
    let mut samples = Vec::with_capacity(options.reps);
    for run in 0..options.warmup + options.reps {
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let writes = queries
            .as_ref()
            .map_or(Timestamps::Off, |(set, ..)| Timestamps::Pass(set));
        ctx.gpu_scoped(|| record(&mut encoder, writes))?;
        if let Some((set, resolved, _)) = &queries {
            encoder.resolve_query_set(set, 0..2, resolved, 0);
        }
        let start = Instant::now();
        let submission = ctx.queue.submit([encoder.finish()]);
        ctx.wait(submission)?;
        let wall = start.elapsed().as_secs_f64();
        let seconds = match &queries {
            Some((_, resolved, readable)) => {
                // Copied in a second encoder: on Vulkan a copy in the resolving encoder can read 0.
                let mut copy = ctx.device.create_command_encoder(&Default::default());
                copy.copy_buffer_to_buffer(resolved, 0, readable, 0, 16);
                let submission = ctx.queue.submit([copy.finish()]);
                let bytes = pollster::block_on(ctx.read_back(readable, 16, submission))?;
                let stamps: [u64; 2] = bytemuck::pod_read_unaligned(&bytes);
                stamps[1].saturating_sub(stamps[0]) as f64 * period_ns * 1e-9
            }
            None => wall,
        };
        if run >= options.warmup {
            samples.push(seconds);
        }
    }
    samples.sort_by(f64::total_cmp);
    let timing = if queries.is_some() {
        Timing::GpuTimestamps
    } else {
        Timing::WallClock
    };
    Ok((
        timing,
        [
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1],
        ],
    ))
}

/// Queries of a profile: two per dispatch.
const PROFILE_QUERIES: u32 = 4096;

/// Per-kernel GPU times of `record`: each dispatch in a compute pass of its own between
/// two timestamps, summed per kernel within a run; the median over `options.reps` runs
/// after the warm-up. Empty without timestamps.
fn profile_op(
    ctx: &Context,
    options: &BenchOptions,
    record: Record<'_>,
) -> Result<Vec<KernelTime>> {
    if !ctx.has_timestamps() {
        return Ok(Vec::new());
    }
    let set = ctx.device.create_query_set(&wgpu::QuerySetDescriptor {
        label: Some("profile timestamps"),
        ty: wgpu::QueryType::Timestamp,
        count: PROFILE_QUERIES,
    });
    let bytes = u64::from(PROFILE_QUERIES) * 8;
    let buffer = |usage| {
        ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: None,
            size: bytes,
            usage,
            mapped_at_creation: false,
        })
    };
    let resolved = buffer(wgpu::BufferUsages::QUERY_RESOLVE | wgpu::BufferUsages::COPY_SRC);
    let readable = buffer(wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST);
    let period_ns = f64::from(ctx.queue.get_timestamp_period());
    let mut kernels: Vec<(&'static str, usize, Vec<f64>)> = Vec::new();
    for run in 0..options.warmup + options.reps {
        let mut encoder = ctx.device.create_command_encoder(&Default::default());
        let timestamps = Timestamps::PerDispatch {
            set: &set,
            capacity: PROFILE_QUERIES,
        };
        let names = ctx.gpu_scoped(|| record(&mut encoder, timestamps))?;
        let queries = 2 * names.len() as u32;
        encoder.resolve_query_set(&set, 0..queries, &resolved, 0);
        let submission = ctx.queue.submit([encoder.finish()]);
        ctx.wait(submission)?;
        // Copied in a second encoder: on Vulkan a copy in the resolving encoder can read 0.
        let mut copy = ctx.device.create_command_encoder(&Default::default());
        copy.copy_buffer_to_buffer(&resolved, 0, &readable, 0, u64::from(queries) * 8);
        let submission = ctx.queue.submit([copy.finish()]);
        let raw = pollster::block_on(ctx.read_back(&readable, u64::from(queries) * 8, submission))?;
        let stamps: Vec<u64> = bytemuck::pod_collect_to_vec(&raw);
        if run < options.warmup {
            continue;
        }
        let mut this_run: Vec<(&'static str, usize, f64)> = Vec::new();
        for (name, pair) in names.iter().zip(stamps.chunks_exact(2)) {
            let seconds = pair[1].saturating_sub(pair[0]) as f64 * period_ns * 1e-9;
            match this_run.iter_mut().find(|(n, ..)| n == name) {
                Some(entry) => {
                    entry.1 += 1;
                    entry.2 += seconds;
                }
                None => this_run.push((name, 1, seconds)),
            }
        }
        for (name, calls, seconds) in this_run {
            match kernels.iter_mut().find(|(n, ..)| *n == name) {
                Some(entry) => entry.2.push(seconds),
                None => kernels.push((name, calls, vec![seconds])),
            }
        }
    }
    Ok(kernels
        .into_iter()
        .map(|(kernel, dispatches, mut samples)| {
            samples.sort_by(f64::total_cmp);
            KernelTime {
                kernel,
                dispatches,
                seconds: samples[samples.len() / 2],
            }
        })
        .collect())
}

/// Runs every operation on every shape of `options` on `ctx`; `progress` hears a line
/// before each operation.
pub fn run(
    ctx: &Context,
    options: &BenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let mut rows = Vec::new();
    for (index, &shape) in options.shapes.iter().enumerate() {
        let Shape {
            batch: b,
            dim: d,
            classes: c,
        } = shape;
        let problem = Problem::try_random(shape, index as u64 + 1)?;
        let buffers = ShapeBuffers::new(ctx, &problem);
        let gemm_flops = 2.0 * (b * c * d) as f64;
        let params = LossParams::default();
        let mut shape_rows: Vec<BenchRow> = Vec::new();
        let mut note = |op: &str| {
            progress(&format!(
                "[{}/{}] B={b} D={d} C={c}: {op}",
                index + 1,
                options.shapes.len()
            ))
        };

        note("gemm");
        // x·wᵀ as the plans' dots read it: rows of D rounded up to 4 (copies with zero
        // padding when D is not a multiple of 4).
        let d4 = padded(d as u64) as usize;
        let padded_rows = |data: &[f32]| -> Option<wgpu::Buffer> {
            (d4 != d).then(|| {
                let mut rows = vec![0f32; data.len() / d * d4];
                for (to, from) in rows.chunks_mut(d4).zip(data.chunks(d)) {
                    to[..d].copy_from_slice(from);
                }
                ctx.device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("gemm operand"),
                        contents: bytemuck::cast_slice(&rows),
                        usage: wgpu::BufferUsages::STORAGE,
                    })
            })
        };
        let (lhs_copy, rhs_copy) = (
            padded_rows(&problem.features),
            padded_rows(&problem.classes),
        );
        let lhs = lhs_copy.as_ref().unwrap_or(&buffers.features);
        let rhs = rhs_copy.as_ref().unwrap_or(&buffers.classes);
        // Where w or the product exceeds one binding, the classes go in pieces (multiples
        // of 64, so offsets stay aligned), each bound at its offset and writing a product
        // of its own columns into the same buffer.
        let fit = ctx.max_binding / (4 * d4.max(b) as u64);
        let piece = (fit / 64 * 64).max(64).min(c as u64) as usize;
        let product = ctx.device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("gemm product"),
            size: (b * piece * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let pieces: Vec<(usize, usize)> = (0..c)
            .step_by(piece)
            .map(|n0| (n0, piece.min(c - n0)))
            .collect();
        // The candidate the plans' dots tuned to for this shape: the floor.
        let tuned = ctx.gemm_choice(GemmLayout::Dots, b as u32, piece as u32, d as u32)?;
        // Each piece's shape uniform, and its grid for every candidate.
        let uniforms: Vec<(wgpu::Buffer, Vec<(u32, u32)>)> = pieces
            .iter()
            .map(|&(_, n)| {
                let gemm = GemmShape::new(
                    (b as u32, n as u32, d as u32),
                    d4 as u32,
                    d4 as u32,
                    n as u32,
                );
                let uniform = ctx
                    .device
                    .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                        label: Some("gemm shape"),
                        contents: bytemuck::bytes_of(&gemm),
                        usage: wgpu::BufferUsages::UNIFORM,
                    });
                let grids = ctx
                    .kernels
                    .candidates
                    .iter()
                    .map(|candidate| {
                        fold_grid(
                            gemm.workgroups(candidate),
                            ctx.limits.max_compute_workgroups_per_dimension,
                        )
                    })
                    .collect::<Result<_>>()?;
                Ok((uniform, grids))
            })
            .collect::<Result<_>>()?;
        let whole = |buffer| wgpu::BufferBinding {
            buffer,
            offset: 0,
            size: None,
        };
        let time_gemm = |candidate: usize| {
            let kernel = ctx.kernels.matmul(GemmLayout::Dots, candidate)?;
            time_op(ctx, options, &|encoder, writes| {
                let dispatches: Vec<Dispatch<'_>> = pieces
                    .iter()
                    .zip(&uniforms)
                    .map(|(&(n0, n), (uniform, grids))| Dispatch {
                        kernel,
                        grid: grids[candidate],
                        resources: vec![
                            whole(uniform),
                            whole(lhs),
                            wgpu::BufferBinding {
                                buffer: rhs,
                                offset: (n0 * d4 * 4) as u64,
                                size: std::num::NonZeroU64::new((n * d4 * 4) as u64),
                            },
                            whole(&product),
                        ],
                    })
                    .collect();
                encode(&ctx.device, encoder, &dispatches, writes)
            })
        };
        let gemm_bytes = lhs.size() + rhs.size() + product.size();
        let gemm_row =
            |op, candidate: usize, (timing, seconds): (Timing, [f64; 3]), floor: f64| BenchRow {
                shape,
                op,
                timing,
                algorithm: None,
                seconds,
                flops: gemm_flops,
                vs_gemm: seconds[0] / floor,
                fused_speedup: None,
                workspace_bytes: 0,
                device_bytes: gemm_bytes,
                skipped: None,
                profile: Vec::new(),
                gemms: ctx.kernels.candidates[candidate].name.to_string(),
            };
        // Every candidate on the same product, in this run (first, so that the floor below
        // runs warm): the tuned choice against the fastest.
        let mut candidate_rows = Vec::new();
        if options.runs("gemm_candidates") {
            for index in 0..ctx.kernels.candidates.len() {
                note("gemm_candidates");
                candidate_rows.push((index, time_gemm(index)?));
            }
        }
        let (timing, gemm_seconds) = time_gemm(tuned)?;
        let floor = gemm_seconds[0];
        shape_rows.push(gemm_row("gemm", tuned, (timing, gemm_seconds), floor));
        for (index, timed) in candidate_rows {
            shape_rows.push(gemm_row("gemm_candidate", index, timed, floor));
        }
        drop(product);

        let chosen = Algorithm::choose(ctx, shape);
        // An eighth of the logits' bytes: the chunked plan in blocks of classes where one
        // block fits, else the memory-minimal plan.
        let small_budget = (b * c * 4 / 8) as u64;
        for (op, algorithm, pass, budget) in [
            ("fused_forward", chosen, Pass::Forward, None),
            (
                "fused_forward_backward",
                chosen,
                Pass::ForwardBackward,
                None,
            ),
            (
                "small_budget_fwd_bwd",
                chosen,
                Pass::ForwardBackward,
                Some(small_budget),
            ),
            (
                "fused_min_memory_fwd_bwd",
                Algorithm::MemoryMinimal,
                Pass::ForwardBackward,
                None,
            ),
            (
                "unfused_forward_backward",
                Algorithm::Unfused,
                Pass::ForwardBackward,
                None,
            ),
        ] {
            if !options.runs(op) {
                continue;
            }
            note(op);
            let with_grads = pass == Pass::ForwardBackward;
            let flops = if with_grads {
                3.0 * gemm_flops
            } else {
                gemm_flops
            };
            let plan = match budget {
                Some(bytes) => Plan::with_budget(ctx, shape, bytes),
                None => Plan::with_algorithm(ctx, shape, algorithm),
            };
            let algorithm = plan.as_ref().map_or(algorithm, |p| p.algorithm());
            let measured = plan.and_then(|plan| {
                let inputs = DeviceInputs {
                    features: BufferRegion::from(&buffers.features),
                    classes: BufferRegion::from(&buffers.classes),
                    labels: BufferRegion::from(&buffers.labels),
                };
                let outputs = DeviceOutputs {
                    row_stats: BufferRegion::from(&buffers.row_stats),
                    summary: BufferRegion::from(&buffers.summary),
                    grads: with_grads.then_some(GradOutputs {
                        features: BufferRegion::from(&buffers.grad_features),
                        classes: BufferRegion::from(&buffers.grad_classes),
                    }),
                };
                let record: Record<'_> = &|encoder, writes| {
                    plan.record_phase(
                        ctx,
                        encoder,
                        &inputs,
                        &outputs,
                        &params,
                        writes,
                        Phase::Whole,
                    )
                };
                let timed = time_op(ctx, options, record)?;
                let profile = if options.profile {
                    profile_op(ctx, options, record)?
                } else {
                    Vec::new()
                };
                Ok((
                    timed,
                    plan.workspace_bytes(),
                    profile,
                    plan.gemm_summary(ctx),
                ))
            });
            shape_rows.push(match measured {
                Ok(((timing, seconds), workspace_bytes, profile, gemms)) => BenchRow {
                    shape,
                    op,
                    timing,
                    algorithm: Some(algorithm),
                    seconds,
                    flops,
                    vs_gemm: seconds[0] / gemm_seconds[0],
                    fused_speedup: None,
                    workspace_bytes,
                    device_bytes: workspace_bytes + buffers.io_bytes(with_grads),
                    skipped: None,
                    profile,
                    gemms,
                },
                Err(e @ (Error::TooLarge { .. } | Error::Gpu(_))) => BenchRow {
                    shape,
                    op,
                    timing,
                    algorithm: Some(algorithm),
                    seconds: [f64::NAN; 3],
                    flops,
                    vs_gemm: f64::NAN,
                    fused_speedup: None,
                    workspace_bytes: 0,
                    device_bytes: 0,
                    skipped: Some(e.to_string()),
                    profile: Vec::new(),
                    gemms: String::new(),
                },
                Err(e) => return Err(e),
            });
        }
        if options.runs("sharded_fwd_bwd") {
            note("sharded_fwd_bwd");
            let io_bytes = buffers.io_bytes(true);
            shape_rows.push(sharded_row(
                ctx,
                options,
                &problem,
                (3.0 * gemm_flops, gemm_seconds),
                io_bytes,
            )?);
        }
        let unfused = shape_rows
            .iter()
            .find(|r| r.op == "unfused_forward_backward")
            .map(|r| r.seconds[0]);
        if let (Some(fused), Some(unfused)) = (
            shape_rows
                .iter_mut()
                .find(|r| r.op == "fused_forward_backward"),
            unfused,
        ) {
            fused.fused_speedup = Some(unfused / fused.seconds[0]).filter(|s| s.is_finite());
        }
        rows.extend(shape_rows);
    }
    if options.runs("slice_api_tiny_call") {
        progress("slice API host overhead: B=1 D=1 C=2");
        rows.push(tiny_call_row(ctx, options)?);
    }
    Ok(rows)
}

/// Shards of the sharded row: the shape's classes in two, on one context.
const BENCH_SHARDS: usize = 2;

/// Forward and backward of `problem` with its classes in BENCH_SHARDS shards on `ctx`,
/// through the shard API ([`crate::shard::sharded_loss`]): host wall clock around the
/// whole call (uploads, the shards' passes, the host merge and the read-backs).
fn sharded_row(
    ctx: &Context,
    options: &BenchOptions,
    problem: &Problem,
    (flops, gemm_seconds): (f64, [f64; 3]),
    io_bytes: u64,
) -> Result<BenchRow> {
    let shape = problem.shape;
    let params = LossParams::default();
    let contexts = [ctx; BENCH_SHARDS];
    let call = || {
        crate::shard::sharded_loss(
            &contexts,
            shape,
            &problem.features,
            &problem.classes,
            &problem.labels,
            &params,
        )
    };
    let mut samples = Vec::with_capacity(options.reps);
    for run in 0..options.warmup + options.reps {
        let start = Instant::now();
        call()?;
        if run >= options.warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    samples.sort_by(f64::total_cmp);
    let seconds = [
        samples[samples.len() / 2],
        samples[0],
        samples[samples.len() - 1],
    ];
    let mut workspace_bytes = 0;
    for k in 0..BENCH_SHARDS {
        let shard = crate::shard::ClassShard::split(shape.classes, BENCH_SHARDS, k)?;
        let plan = Plan::for_shard(ctx, Shape::new(shape.batch, shape.dim, shard.count))?;
        workspace_bytes += plan.workspace_bytes();
    }
    Ok(BenchRow {
        shape,
        op: "sharded_fwd_bwd",
        timing: Timing::WallClock,
        algorithm: Some(Algorithm::Chunked),
        seconds,
        flops,
        vs_gemm: seconds[0] / gemm_seconds[0],
        fused_speedup: None,
        workspace_bytes,
        device_bytes: workspace_bytes + io_bytes,
        skipped: None,
        profile: Vec::new(),
        gemms: String::new(),
    })
}

/// Wall time of one whole slice-API call (upload, record, submit, wait, read back) on
/// the smallest problem, B = 1, D = 1, C = 2: the crate's per-call host overhead.
fn tiny_call_row(ctx: &Context, options: &BenchOptions) -> Result<BenchRow> {
    let shape = Shape::new(1, 1, 2);
    let p = Problem::random(shape, 0);
    let params = LossParams::default();
    let calls = 20 * options.reps.max(1);
    let mut samples = Vec::with_capacity(calls);
    for run in 0..options.warmup + calls {
        let start = Instant::now();
        ctx.loss_on(&p, &params, Pass::ForwardBackward)?;
        if run >= options.warmup {
            samples.push(start.elapsed().as_secs_f64());
        }
    }
    samples.sort_by(f64::total_cmp);
    Ok(BenchRow {
        shape,
        op: "slice_api_tiny_call",
        timing: Timing::WallClock,
        algorithm: None,
        seconds: [
            samples[samples.len() / 2],
            samples[0],
            samples[samples.len() - 1],
        ],
        flops: 0.0,
        vs_gemm: f64::NAN,
        fused_speedup: None,
        workspace_bytes: 0,
        device_bytes: 0,
        skipped: None,
        profile: Vec::new(),
        gemms: String::new(),
    })
}

fn megabytes(bytes: u64) -> String {
    format!("{:.2} MB", bytes as f64 / 1e6)
}

/// The readable table.
pub fn format_table(ctx: &Context, rows: &[BenchRow]) -> String {
    let info = ctx.adapter_info();
    let timing = match rows.first().map(|r| r.timing) {
        Some(Timing::GpuTimestamps) => "GPU timestamps",
        _ => "wall clock around submit and wait (no TIMESTAMP_QUERY)",
    };
    let mut out = format!(
        "adapter: {} | backend: {:?} | driver: {} {}\ntiming: {timing}; median (min-max) per run\n\n",
        info.name, info.backend, info.driver, info.driver_info
    );
    out += "|    B |   D |      C | operation                | plan           | median ms (min-max)      | GFLOP/s | x GEMM | fused speed-up | workspace  | device bytes | GEMM candidates |\n";
    out += "|------|-----|--------|--------------------------|----------------|--------------------------|---------|--------|----------------|------------|--------------|-----------------|\n";
    for r in rows {
        let Shape {
            batch: b,
            dim: d,
            classes: c,
        } = r.shape;
        if let Some(why) = &r.skipped {
            out += &format!(
                "| {b:>4} | {d:>3} | {c:>6} | {:<24} | skipped: {why}\n",
                r.op
            );
            continue;
        }
        if r.op == "slice_api_tiny_call" {
            let [med, min, max] = r.seconds.map(|s| s * 1e6);
            out += &format!(
                "| {b:>4} | {d:>3} | {c:>6} | {:<24} | {med:.1} us ({min:.1}-{max:.1} us), wall clock of a whole slice-API call\n",
                r.op
            );
            continue;
        }
        let [med, min, max] = r.seconds.map(|s| s * 1e3);
        out += &format!(
            "| {b:>4} | {d:>3} | {c:>6} | {:<24} | {:<14} | {:>8.3} ({:.3}-{:.3}) | {:>7.2} | {:>6.2} | {:>14} | {:>10} | {:>12} | {} |\n",
            r.op,
            r.algorithm.map_or("-".to_string(), |a| format!("{a:?}").to_lowercase()),
            med,
            min,
            max,
            r.gflops(),
            r.vs_gemm,
            r.fused_speedup.map_or("".into(), |s| format!("{s:.2}x")),
            megabytes(r.workspace_bytes),
            megabytes(r.device_bytes),
            r.gemms,
        );
    }
    // With --profile, the tuner's per-candidate times for every bucket it knows.
    if rows.iter().any(|r| !r.profile.is_empty()) {
        out += "\ntuner: median ms per candidate on each bucket's tuning slice\n";
        for t in ctx.tuned() {
            let times: Vec<String> = t
                .seconds
                .iter()
                .map(|(name, s)| format!("{name} {:.3}", s * 1e3))
                .collect();
            out += &format!(
                "  {} {}×{}×{}: {} ({})\n",
                t.bucket.layout,
                t.bucket.m,
                t.bucket.n,
                t.bucket.k,
                t.candidate,
                times.join(", ")
            );
        }
    }
    // The tuned choice of each shape's GEMM against the fastest candidate of this run.
    for tuned in rows.iter().filter(|r| r.op == "gemm") {
        let same_shape = |r: &&BenchRow| r.op == "gemm_candidate" && r.shape == tuned.shape;
        if let Some(fastest) = rows
            .iter()
            .filter(same_shape)
            .min_by(|a, b| a.seconds[0].total_cmp(&b.seconds[0]))
        {
            let Shape {
                batch: b,
                dim: d,
                classes: c,
            } = tuned.shape;
            out += &format!(
                "\ntuned GEMM at {b}×{d}×{c}: {} ({:.3} ms), fastest this run {} ({:.3} ms): {:.2}× the fastest",
                tuned.gemms,
                tuned.seconds[0] * 1e3,
                fastest.gemms,
                fastest.seconds[0] * 1e3,
                tuned.seconds[0] / fastest.seconds[0]
            );
        }
    }
    out += "\n";
    if rows.iter().any(|r| r.op == "sharded_fwd_bwd") {
        out += &format!(
            "\nsharded_fwd_bwd: the classes in {BENCH_SHARDS} shards on one context through the shard API, \
             host wall clock around the whole call (uploads, passes, host merge, read-backs)\n"
        );
    }
    for r in rows.iter().filter(|r| !r.profile.is_empty()) {
        let Shape {
            batch: b,
            dim: d,
            classes: c,
        } = r.shape;
        let total: f64 = r.profile.iter().map(|k| k.seconds).sum();
        out += &format!(
            "\nprofile: B={b} D={d} C={c} {} ({}), each dispatch in its own pass; median ms per run\n\n",
            r.op,
            r.algorithm.map_or("-".to_string(), |a| format!("{a:?}").to_lowercase()),
        );
        out += "| kernel                   | dispatches |       ms |  share |\n";
        out += "|--------------------------|------------|----------|--------|\n";
        for k in &r.profile {
            out += &format!(
                "| {:<24} | {:>10} | {:>8.3} | {:>5.1}% |\n",
                k.kernel,
                k.dispatches,
                k.seconds * 1e3,
                100.0 * k.seconds / total
            );
        }
    }
    out
}

/// One JSON object per row, one row per line.
pub fn format_json(ctx: &Context, rows: &[BenchRow]) -> String {
    let info = ctx.adapter_info();
    let text = |s: &str| format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""));
    let num = |v: f64| {
        if v.is_finite() {
            format!("{v}")
        } else {
            "null".into()
        }
    };
    rows.iter()
        .map(|r| {
            format!(
                "{{\"adapter\":{},\"backend\":{},\"driver\":{},\"batch\":{},\"dim\":{},\"classes\":{},\"op\":{},\
                 \"timing\":{},\"plan\":{},\"median_s\":{},\"min_s\":{},\"max_s\":{},\"gflops\":{},\"vs_gemm\":{},\
                 \"fused_speedup\":{},\"workspace_bytes\":{},\"device_bytes\":{},\"skipped\":{},\"gemms\":{}}}\n",
                text(&info.name),
                text(&format!("{:?}", info.backend)),
                text(&format!("{} {}", info.driver, info.driver_info)),
                r.shape.batch,
                r.shape.dim,
                r.shape.classes,
                text(r.op),
                text(match r.timing {
                    Timing::GpuTimestamps => "gpu_timestamps",
                    Timing::WallClock => "wall_clock",
                }),
                r.algorithm.map_or("null".into(), |a| text(&format!("{a:?}").to_lowercase())),
                num(r.seconds[0]),
                num(r.seconds[1]),
                num(r.seconds[2]),
                num(if r.skipped.is_some() { f64::NAN } else { r.gflops() }),
                num(r.vs_gemm),
                r.fused_speedup.map_or("null".into(), num),
                r.workspace_bytes,
                r.device_bytes,
                r.skipped.as_deref().map_or("null".into(), text),
                text(&r.gemms),
            )
        })
        .collect()
}

/// The benchmark's `main`: parses `args`, runs, prints the table and writes the JSON.
pub fn main_with_args(args: &[String]) -> std::result::Result<(), String> {
    let options = parse_args(args)?;
    let ctx = Context::new_blocking(options.context.clone()).map_err(|e| e.to_string())?;
    eprintln!("benchmarking on {}", ctx.describe());
    let rows = run(&ctx, &options, &mut |line| eprintln!("{line}")).map_err(|e| e.to_string())?;
    println!("{}", format_table(&ctx, &rows));
    if let Some(path) = &options.json {
        std::fs::write(path, format_json(&ctx, &rows))
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        eprintln!("wrote {}", path.display());
    }
    Ok(())
}
