//! The portable benchmark: on any adapter, per shape, one plain GEMM (the cost floor),
//! the fused forward, the fused forward + backward (also with x, w and the gradients
//! stored in bf16 and in f16) and the unfused baseline, timed on the GPU with timestamp
//! queries where the adapter has them, else by wall clock around submit-and-wait.
//! `cargo bench` runs [`main_with_args`]; the CLI can call it too.
//!
//! Each row shows the bytes it moves ([`BenchRow::moved_bytes`]): the bytes of x and w
//! it reads plus, with gradients, the bytes of dL/dx and dL/dw it writes, each in its
//! storage type (B·D + C·D values, times 2 for forward + backward, at 4 bytes each in
//! f32 and 2 in f16 or bf16). Workspace traffic and repeated reads are not counted: it is
//! the floor every implementation of the operation moves to and from its caller.

use std::time::Instant;

use wgpu::util::DeviceExt;

use crate::context::{Context, ContextOptions};
use crate::error::{Error, Result};
use crate::io::{
    BufferRegion, DeviceInputs, DeviceOutputs, ElementType, ElementTypes, GradOutputs, RowStats,
    Shape, Summary,
};
use crate::kernels::{encode, fold_grid, padded, Dispatch, GemmLayout, GemmShape, Timestamps};
use crate::params::LossParams;
use crate::plan::{Algorithm, Phase, Plan};
use crate::problem::Problem;
use crate::timing::{time_recording, Record, TimestampQueries};
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
                        fused_forward_backward, fused_fwd_bwd_bf16, fused_fwd_bwd_f16,
                        small_budget_fwd_bwd, fused_min_memory_fwd_bwd,
                        unfused_forward_backward, sharded_fwd_bwd, slice_api_tiny_call,
                        gemm_candidates (the GEMM on every candidate)
  --wall-clock          time by host wall clock around submit and wait, not GPU timestamps
";

/// The operations besides the GEMM, in the order they run.
const OPS: [&str; 10] = [
    "gemm_candidates",
    "fused_forward",
    "fused_forward_backward",
    "fused_fwd_bwd_bf16",
    "fused_fwd_bwd_f16",
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
    /// see `algorithm`); `fused_fwd_bwd_bf16` and `fused_fwd_bwd_f16` (the same with x, w
    /// and both gradients stored in bf16 or f16); `small_budget_fwd_bwd` (the plan [`Plan::with_budget`] picks for
    /// an eighth of the logits' bytes); `fused_min_memory_fwd_bwd` (the memory-minimal plan);
    /// `unfused_forward_backward`; or `slice_api_tiny_call` (per-call host overhead).
    pub op: &'static str,
    /// How it was timed.
    pub timing: Timing,
    /// The algorithm that ran (`None` for the GEMM and the tiny call).
    pub algorithm: Option<Algorithm>,
    /// Median, min and max seconds over the timed runs.
    pub seconds: [f64; 3],
    /// Seconds of each timed run, in run order: each run timed every operation of the
    /// shape once, in turn, so run r of two rows saw the same moment of the host.
    pub runs: Vec<f64>,
    /// Flops counted per run: 2·B·C·D per GEMM-equivalent, 6·B·C·D for forward + backward.
    pub flops: f64,
    /// This row's time over the GEMM's in the same run, the median over the runs
    /// ([`paired_ratio`]).
    pub vs_gemm: f64,
    /// The unfused baseline's time over this row's in the same run, the median over the
    /// runs (the default plan's forward + backward row).
    pub fused_speedup: Option<f64>,
    /// Bytes the crate allocates beyond inputs and outputs.
    pub workspace_bytes: u64,
    /// Bytes of every device buffer the operation needs at once: inputs, outputs, workspace.
    pub device_bytes: u64,
    /// The bytes it moves: x and w read, plus dL/dx and dL/dw written where it computes
    /// gradients, each in its storage type ([`moved_bytes`]).
    pub moved_bytes: u64,
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

/// The bytes an operation on `shape` moves: x and w read and, `with_grads`, dL/dx and
/// dL/dw written, each in the storage type `shape.elements` gives it.
pub fn moved_bytes(shape: Shape, with_grads: bool) -> u64 {
    let (b, d, c) = (shape.batch as u64, shape.dim as u64, shape.classes as u64);
    let e = shape.elements;
    let mut bytes = b * d * e.features.bytes() + c * d * e.classes.bytes();
    if with_grads {
        bytes += b * d * e.grad_features.bytes() + c * d * e.grad_classes.bytes();
    }
    bytes
}

impl ShapeBuffers {
    /// The buffers of `problem`, x and w stored as `elements` gives them (its values
    /// rounded to that type), the gradients sized for theirs.
    fn new(ctx: &Context, problem: &Problem, elements: ElementTypes) -> ShapeBuffers {
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
            ..
        } = problem.shape;
        let region = |t: ElementType, n: usize| t.region_bytes(n as u64) as usize;
        ShapeBuffers {
            // Buffers made from contents are padded to a whole word.
            features: init(
                "features",
                &elements.features.stored_bytes(&problem.features),
            ),
            classes: init("classes", &elements.classes.stored_bytes(&problem.classes)),
            labels: init("labels", bytemuck::cast_slice(&problem.labels)),
            row_stats: empty("row_stats", b * std::mem::size_of::<RowStats>()),
            summary: empty("summary", std::mem::size_of::<Summary>()),
            grad_features: empty("grad_features", region(elements.grad_features, b * d)),
            grad_classes: empty("grad_classes", region(elements.grad_classes, c * d)),
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

/// One operation to time: GPU timestamps around a recording (host wall clock around its
/// submit and wait without timestamps, or with `--wall-clock`), or host wall clock around
/// a whole call.
enum Timer<'a> {
    Gpu(Record<'a>),
    Host(&'a dyn Fn() -> Result<()>),
}

/// Times each of `timers`: warm-up runs, then `reps` timed runs, as (timing, seconds per
/// run), interleaved: every run times each operation once in turn, starting one
/// operation later than the run before, so that a host whose speed drifts during the
/// sweep (a shared machine) shifts them all alike and their ratios stay comparable. An operation that fails is dropped from later runs and gives
/// its error in its place.
fn time_ops(ctx: &Context, options: &BenchOptions, timers: &[Timer<'_>]) -> Vec<Result<Timed>> {
    let queries = TimestampQueries::new(ctx).filter(|_| !options.wall_clock);
    let mut samples: Vec<Result<Vec<f64>>> = timers
        .iter()
        .map(|_| Ok(Vec::with_capacity(options.reps)))
        .collect();
    for run in 0..options.warmup + options.reps {
        // Each run starts one operation later, so that no operation always follows the
        // same one (whose data the caches then hold).
        for turn in 0..timers.len() {
            let at = (run + turn) % timers.len();
            let Ok(times) = &mut samples[at] else {
                continue;
            };
            match time_once(ctx, queries.as_ref(), &timers[at]) {
                Ok(seconds) if run >= options.warmup => times.push(seconds),
                Ok(_) => {}
                Err(e) => samples[at] = Err(e),
            }
        }
    }
    let gpu_timing = if queries.is_some() {
        Timing::GpuTimestamps
    } else {
        Timing::WallClock
    };
    timers
        .iter()
        .zip(samples)
        .map(|(timer, kept)| {
            let timing = match timer {
                Timer::Gpu(_) => gpu_timing,
                Timer::Host(_) => Timing::WallClock,
            };
            Ok((timing, kept?))
        })
        .collect()
}

/// Seconds of one run of `timer`: between the timestamps where there are `queries`,
/// else host wall clock around the submit and wait (or around the call).
fn time_once(ctx: &Context, queries: Option<&TimestampQueries>, timer: &Timer<'_>) -> Result<f64> {
    match timer {
        Timer::Gpu(record) => time_recording(ctx, queries, *record),
        Timer::Host(call) => {
            let start = Instant::now();
            call()?;
            Ok(start.elapsed().as_secs_f64())
        }
    }
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
            ..
        } = shape;
        let problem = Problem::try_random(shape, index as u64 + 1)?;
        let buffers = ShapeBuffers::new(ctx, &problem, ElementTypes::default());
        let mut note = |op: &str| {
            progress(&format!(
                "[{}/{}] B={b} D={d} C={c}: {op}",
                index + 1,
                options.shapes.len()
            ))
        };
        rows.extend(shape_rows(ctx, options, &problem, &buffers, &mut note)?);
    }
    if options.runs("slice_api_tiny_call") {
        progress("slice API host overhead: B=1 D=1 C=2");
        rows.push(tiny_call_row(ctx, options)?);
    }
    Ok(rows)
}

/// Flops of one plain GEMM x·wᵀ of `shape`: 2·B·C·D.
fn gemm_flops(shape: Shape) -> f64 {
    2.0 * (shape.batch * shape.classes * shape.dim) as f64
}

/// How an operation was timed, and its seconds per timed run, in run order.
type Timed = (Timing, Vec<f64>);

/// [median, min, max] of `runs` (NaN for none).
fn stats(runs: &[f64]) -> [f64; 3] {
    let mut sorted = runs.to_vec();
    sorted.sort_by(f64::total_cmp);
    match (sorted.first(), sorted.last()) {
        (Some(&min), Some(&max)) => [sorted[sorted.len() / 2], min, max],
        _ => [f64::NAN; 3],
    }
}

/// The median over runs of `a[r] / b[r]`: two operations timed in the same runs compared
/// run by run, so that a host whose speed drifts from run to run (a shared machine) moves
/// both sides of each ratio alike. The ratio of the medians where the runs do not pair.
pub fn paired_ratio(a: &[f64], b: &[f64]) -> f64 {
    if a.len() != b.len() || a.is_empty() {
        return stats(a)[0] / stats(b)[0];
    }
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| x / y).collect();
    stats(&ratios)[0]
}

/// A piece's shape uniform, and its grid for every candidate.
type PieceUniform = (wgpu::Buffer, Vec<(u32, u32)>);

/// The plain product x·wᵀ of one shape as the plans' dots read it, ready to time on
/// every candidate: rows of D rounded up to 4 (copies with zero padding when D is not a
/// multiple of 4), and where w or the product exceeds one binding, the classes in pieces
/// (multiples of 64, so offsets stay aligned), each bound at its offset and writing a
/// product of its own columns into the same buffer.
struct GemmFloor<'a> {
    shape: Shape,
    buffers: &'a ShapeBuffers,
    /// Zero-padded copies of x and w, where D is not a multiple of 4.
    padded_copies: (Option<wgpu::Buffer>, Option<wgpu::Buffer>),
    d4: usize,
    product: wgpu::Buffer,
    /// Each piece's first class and number of classes.
    pieces: Vec<(usize, usize)>,
    uniforms: Vec<PieceUniform>,
    /// The candidate the plans' dots tuned to for this shape: the floor.
    tuned: usize,
}

impl<'a> GemmFloor<'a> {
    fn new(ctx: &Context, problem: &Problem, buffers: &'a ShapeBuffers) -> Result<GemmFloor<'a>> {
        let Shape {
            batch: b,
            dim: d,
            classes: c,
            ..
        } = problem.shape;
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
        let padded_copies = (
            padded_rows(&problem.features),
            padded_rows(&problem.classes),
        );
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
        let tuned = ctx.gemm_choice(
            GemmLayout::Dots,
            ElementType::F32,
            (b as u32, piece as u32, d as u32),
        )?;
        let uniforms = piece_uniforms(ctx, &pieces, (b, d, d4))?;
        Ok(GemmFloor {
            shape: problem.shape,
            buffers,
            padded_copies,
            d4,
            product,
            pieces,
            uniforms,
            tuned,
        })
    }

    /// x as the product reads it.
    fn lhs(&self) -> &wgpu::Buffer {
        self.padded_copies
            .0
            .as_ref()
            .unwrap_or(&self.buffers.features)
    }

    /// w as the product reads it.
    fn rhs(&self) -> &wgpu::Buffer {
        self.padded_copies
            .1
            .as_ref()
            .unwrap_or(&self.buffers.classes)
    }

    /// Recordings of the product, every piece, on each of `candidates`.
    fn recordings(&self, ctx: &'a Context, candidates: &[usize]) -> Result<Vec<Recording<'_>>> {
        let (lhs, rhs, d4) = (self.lhs(), self.rhs(), self.d4);
        candidates
            .iter()
            .map(|&candidate| -> Result<Recording<'_>> {
                let kernel = ctx
                    .kernels
                    .matmul(GemmLayout::Dots, ElementType::F32, candidate)?;
                Ok(Box::new(move |encoder, writes| {
                    let dispatches: Vec<Dispatch<'_>> = self
                        .pieces
                        .iter()
                        .zip(&self.uniforms)
                        .map(|(&(n0, n), (uniform, grids))| Dispatch {
                            kernel,
                            grid: grids[candidate],
                            resources: vec![
                                uniform.as_entire_buffer_binding(),
                                lhs.as_entire_buffer_binding(),
                                wgpu::BufferBinding {
                                    buffer: rhs,
                                    offset: (n0 * d4 * 4) as u64,
                                    size: std::num::NonZeroU64::new((n * d4 * 4) as u64),
                                },
                                self.product.as_entire_buffer_binding(),
                            ],
                        })
                        .collect();
                    encode(&ctx.device, encoder, &dispatches, writes)
                }))
            })
            .collect()
    }

    /// The row `op` of `candidate`'s timing, against the floor's runs `floor`.
    fn row(
        &self,
        ctx: &Context,
        op: &'static str,
        candidate: usize,
        (timing, runs): Timed,
        floor: &[f64],
    ) -> BenchRow {
        BenchRow {
            shape: self.shape,
            op,
            timing,
            algorithm: None,
            seconds: stats(&runs),
            vs_gemm: paired_ratio(&runs, floor),
            runs,
            flops: gemm_flops(self.shape),
            fused_speedup: None,
            workspace_bytes: 0,
            device_bytes: self.lhs().size() + self.rhs().size() + self.product.size(),
            moved_bytes: moved_bytes(self.shape, false),
            skipped: None,
            profile: Vec::new(),
            gemms: ctx.kernels.candidates[candidate].name.to_string(),
        }
    }
}

/// Each piece's shape uniform for the product of B × D (rows of `d4`) by the piece's
/// classes, and its grid for every candidate.
fn piece_uniforms(
    ctx: &Context,
    pieces: &[(usize, usize)],
    (b, d, d4): (usize, usize, usize),
) -> Result<Vec<PieceUniform>> {
    pieces
        .iter()
        .map(|&(_, n)| {
            let gemm = GemmShape::new(
                (b as u32, n as u32, d as u32),
                d4 as u32,
                d4 as u32,
                n as u32,
            );
            let uniform = gemm.uniform(&ctx.device, "gemm shape");
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
        .collect()
}

/// A loss operation: its name, the algorithm asked for, the pass, the workspace budget
/// its plan is picked for (the default plan where `None`), and the storage types of x, w
/// and the gradients.
type LossOp = (&'static str, Algorithm, Pass, Option<u64>, ElementTypes);

/// The loss operations on `shape`, in the order they run, with the algorithm `Plan::new`
/// picks where they take the default plan.
fn loss_ops(ctx: &Context, shape: Shape) -> [LossOp; 7] {
    let f32s = ElementTypes::default();
    let chosen = Algorithm::choose(ctx, shape);
    // An eighth of the logits' bytes: the chunked plan in blocks of classes where one
    // block fits, else the memory-minimal plan.
    let small_budget = (shape.batch * shape.classes * 4 / 8) as u64;
    // The default plan with x, w and both gradients in `t`: `Plan::new` on the shape.
    let sixteen_bit = |op, t| {
        let elements = ElementTypes::inputs(t, t);
        let chosen = Algorithm::choose(ctx, shape.with_elements(elements));
        (
            op,
            chosen,
            Pass::ForwardBackward,
            Some(ctx.workspace_budget),
            elements,
        )
    };
    [
        ("fused_forward", chosen, Pass::Forward, None, f32s),
        (
            "fused_forward_backward",
            chosen,
            Pass::ForwardBackward,
            None,
            f32s,
        ),
        sixteen_bit("fused_fwd_bwd_bf16", ElementType::Bf16),
        sixteen_bit("fused_fwd_bwd_f16", ElementType::F16),
        (
            "small_budget_fwd_bwd",
            chosen,
            Pass::ForwardBackward,
            Some(small_budget),
            f32s,
        ),
        (
            "fused_min_memory_fwd_bwd",
            Algorithm::MemoryMinimal,
            Pass::ForwardBackward,
            None,
            f32s,
        ),
        (
            "unfused_forward_backward",
            Algorithm::Unfused,
            Pass::ForwardBackward,
            None,
            f32s,
        ),
    ]
}

/// Sets the fused forward + backward row's speed-up over the unfused baseline, where
/// both ran and the ratio is finite.
fn set_fused_speedup(rows: &mut [BenchRow]) {
    let unfused = rows
        .iter()
        .find(|r| r.op == "unfused_forward_backward")
        .map(|r| r.runs.clone());
    if let (Some(fused), Some(unfused)) = (
        rows.iter_mut().find(|r| r.op == "fused_forward_backward"),
        unfused,
    ) {
        fused.fused_speedup = Some(paired_ratio(&unfused, &fused.runs)).filter(|s| s.is_finite());
    }
}

/// A boxed recording, for a list of operations to time together.
type Recording<'r> =
    Box<dyn Fn(&mut wgpu::CommandEncoder, Timestamps<'_>) -> Result<Vec<&'static str>> + 'r>;

/// The rows of one shape: the plain GEMM on its tuned candidate (`gemm`, the floor the
/// other rows are measured against) and on every candidate (`gemm_candidate`), the loss
/// operations, and the class shards, all timed in one interleaved sweep ([`time_ops`]) so
/// that their ratios see the same host. An operation too large for the adapter, or that
/// the GPU refuses, gives a skipped row.
fn shape_rows(
    ctx: &Context,
    options: &BenchOptions,
    problem: &Problem,
    buffers: &ShapeBuffers,
    note: &mut dyn FnMut(&str),
) -> Result<Vec<BenchRow>> {
    let shape = problem.shape;
    let floor = GemmFloor::new(ctx, problem, buffers)?;
    let mut candidates = vec![floor.tuned];
    if options.runs("gemm_candidates") {
        candidates.extend(0..ctx.kernels.candidates.len());
    }
    let gemm_recordings = floor.recordings(ctx, &candidates)?;
    let plans = loss_plans(ctx, options, shape);
    // The buffers of the operations that store x, w or the gradients in 16 bits.
    let mut typed_buffers: Vec<(ElementTypes, ShapeBuffers)> = Vec::new();
    for ((.., elements), _) in &plans {
        if !elements.all_f32() && typed_buffers.iter().all(|(e, _)| e != elements) {
            typed_buffers.push((*elements, ShapeBuffers::new(ctx, problem, *elements)));
        }
    }
    let buffers_for = |elements: &ElementTypes| {
        typed_buffers
            .iter()
            .find(|(e, _)| e == elements)
            .map_or(buffers, |(_, b)| b)
    };
    let plan_recordings: Vec<Option<Recording<'_>>> = plans
        .iter()
        .map(|((_, _, pass, _, elements), plan)| {
            let with_grads = *pass == Pass::ForwardBackward;
            let buffers = buffers_for(elements);
            plan.as_ref()
                .ok()
                .map(|plan| plan_recording(ctx, plan, buffers, with_grads, Phase::Whole))
        })
        .collect();
    let sharded = options
        .runs("sharded_fwd_bwd")
        .then(|| sharded_call(ctx, problem));
    let mut timers: Vec<Timer<'_>> = gemm_recordings
        .iter()
        .chain(plan_recordings.iter().flatten())
        .map(|r| Timer::Gpu(r.as_ref()))
        .collect();
    if let Some(call) = &sharded {
        timers.push(Timer::Host(call.as_ref()));
    }
    note(&format!("{} operations, interleaved", timers.len()));
    let mut timings = time_ops(ctx, options, &timers).into_iter();
    let mut next = || {
        timings
            .next()
            .unwrap_or_else(|| Err(Error::Gpu("internal: a timing is missing".into())))
    };
    let gemm = next()?;
    let floor_runs = gemm.1.clone();
    let mut rows = vec![floor.row(ctx, "gemm", floor.tuned, gemm, &floor_runs)];
    for &index in &candidates[1..] {
        rows.push(floor.row(ctx, "gemm_candidate", index, next()?, &floor_runs));
    }
    for ((op, plan), recording) in plans.iter().zip(&plan_recordings) {
        let timed = match (plan, recording) {
            (Ok(_), Some(_)) => next(),
            (Err(e), _) => Err(e.clone()),
            (Ok(_), None) => Err(Error::Gpu("internal: a plan without a recording".into())),
        };
        let profile = match (recording, options.profile) {
            (Some(record), true) if timed.is_ok() => profile_op(ctx, options, record.as_ref())?,
            _ => Vec::new(),
        };
        rows.push(loss_row(
            ctx,
            (shape, op),
            plan,
            timed,
            profile,
            buffers_for(&op.4),
            &floor_runs,
        )?);
    }
    if sharded.is_some() {
        let mut row = sharded_row(ctx, shape, next()?, &floor_runs, buffers.io_bytes(true))?;
        if options.profile {
            row.profile = shard_profile(ctx, options, buffers, shape)?;
        }
        rows.push(row);
    }
    set_fused_speedup(&mut rows);
    Ok(rows)
}

/// The loss operations `options` runs on `shape`, each with its plan (or the error that
/// skips it).
fn loss_plans(ctx: &Context, options: &BenchOptions, shape: Shape) -> Vec<(LossOp, Result<Plan>)> {
    loss_ops(ctx, shape)
        .into_iter()
        .filter(|op| options.runs(op.0))
        .map(|op| {
            let shape = shape.with_elements(op.4);
            let plan = match op.3 {
                Some(bytes) => Plan::with_budget(ctx, shape, bytes),
                None => Plan::with_algorithm(ctx, shape, op.1),
            };
            (op, plan)
        })
        .collect()
}

/// The recording of `plan`'s `phase` on the shape's buffers, with gradients where
/// `with_grads`.
fn plan_recording<'r>(
    ctx: &'r Context,
    plan: &'r Plan,
    buffers: &'r ShapeBuffers,
    with_grads: bool,
    phase: Phase,
) -> Recording<'r> {
    Box::new(move |encoder, writes| {
        let inputs = DeviceInputs::whole(&buffers.features, &buffers.classes, &buffers.labels);
        let grads = with_grads.then_some(GradOutputs {
            features: BufferRegion::from(&buffers.grad_features),
            classes: BufferRegion::from(&buffers.grad_classes),
        });
        let outputs = DeviceOutputs::whole(&buffers.row_stats, &buffers.summary, grads);
        plan.record_phase(
            ctx,
            encoder,
            &inputs,
            &outputs,
            &LossParams::default(),
            writes,
            phase,
        )
    })
}

/// Per-kernel GPU times of the first shard's forward, then of its backward (each timed
/// backward recorded after an untimed forward, so that it finds the dots it reuses where
/// its plan keeps them), on the shape's buffers: where the sharded row's time goes on the
/// device.
fn shard_profile(
    ctx: &Context,
    options: &BenchOptions,
    buffers: &ShapeBuffers,
    shape: Shape,
) -> Result<Vec<KernelTime>> {
    let shard = crate::shard::ClassShard::split(shape.classes, BENCH_SHARDS, 0)?;
    let plan = Plan::for_shard(ctx, Shape::new(shape.batch, shape.dim, shard.count))?;
    let backward = Phase::ShardBackward {
        reuse_dots: plan.keeps_dots(),
    };
    let forward = plan_recording(ctx, &plan, buffers, false, Phase::ShardForward);
    let timed_backward = plan_recording(ctx, &plan, buffers, true, backward);
    let after_forward: Record<'_> = &|encoder, writes| {
        forward(encoder, Timestamps::Off)?;
        timed_backward(encoder, writes)
    };
    let mut profile = profile_op(ctx, options, forward.as_ref())?;
    profile.extend(profile_op(ctx, options, after_forward)?);
    Ok(profile)
}

/// The row of loss operation `op`, from its plan and timing (or the error that skipped
/// it: too large for the adapter, or refused by the GPU), against the GEMM floor.
fn loss_row(
    ctx: &Context,
    (shape, &(op, algorithm, pass, _, elements)): (Shape, &LossOp),
    plan: &Result<Plan>,
    timed: Result<Timed>,
    profile: Vec<KernelTime>,
    buffers: &ShapeBuffers,
    gemm_runs: &[f64],
) -> Result<BenchRow> {
    let with_grads = pass == Pass::ForwardBackward;
    let flops = if with_grads { 3.0 } else { 1.0 } * gemm_flops(shape);
    let algorithm = plan.as_ref().map_or(algorithm, |p| p.algorithm());
    let moved = moved_bytes(shape.with_elements(elements), with_grads);
    let skipped = |e: Error| BenchRow {
        shape,
        op,
        timing: Timing::WallClock,
        algorithm: Some(algorithm),
        seconds: [f64::NAN; 3],
        runs: Vec::new(),
        flops,
        vs_gemm: f64::NAN,
        fused_speedup: None,
        workspace_bytes: 0,
        device_bytes: 0,
        moved_bytes: moved,
        skipped: Some(e.to_string()),
        profile: Vec::new(),
        gemms: String::new(),
    };
    Ok(match (plan, timed) {
        (Ok(plan), Ok((timing, runs))) => BenchRow {
            shape,
            op,
            timing,
            algorithm: Some(algorithm),
            seconds: stats(&runs),
            vs_gemm: paired_ratio(&runs, gemm_runs),
            runs,
            flops,
            fused_speedup: None,
            workspace_bytes: plan.workspace_bytes(),
            device_bytes: plan.workspace_bytes() + buffers.io_bytes(with_grads),
            moved_bytes: moved,
            skipped: None,
            profile,
            gemms: plan.gemm_summary(ctx),
        },
        (_, Err(e @ (Error::TooLarge { .. } | Error::Gpu(_)))) => skipped(e),
        (_, Err(e)) => return Err(e),
        (Err(e), _) => skipped(e.clone()),
    })
}

/// Shards of the sharded row: the shape's classes in two, on one context.
const BENCH_SHARDS: usize = 2;

/// Forward and backward of `problem` with its classes in BENCH_SHARDS shards on `ctx`,
/// through the shard API ([`crate::shard::sharded_loss`]), to be timed by host wall clock
/// around the whole call (uploads, the shards' passes, the host merge and the read-backs).
fn sharded_call<'r>(ctx: &'r Context, problem: &'r Problem) -> Box<dyn Fn() -> Result<()> + 'r> {
    Box::new(move || {
        crate::shard::sharded_loss(
            &[ctx; BENCH_SHARDS],
            problem.shape,
            &problem.features,
            &problem.classes,
            &problem.labels,
            &LossParams::default(),
        )
        .map(|_| ())
    })
}

/// The sharded row from its timing, against the GEMM floor.
fn sharded_row(
    ctx: &Context,
    shape: Shape,
    (timing, runs): Timed,
    gemm_runs: &[f64],
    io_bytes: u64,
) -> Result<BenchRow> {
    let mut workspace_bytes = 0;
    for k in 0..BENCH_SHARDS {
        let shard = crate::shard::ClassShard::split(shape.classes, BENCH_SHARDS, k)?;
        let plan = Plan::for_shard(ctx, Shape::new(shape.batch, shape.dim, shard.count))?;
        workspace_bytes += plan.workspace_bytes();
    }
    Ok(BenchRow {
        shape,
        op: "sharded_fwd_bwd",
        timing,
        algorithm: Some(Algorithm::Chunked),
        seconds: stats(&runs),
        vs_gemm: paired_ratio(&runs, gemm_runs),
        runs,
        flops: 3.0 * gemm_flops(shape),
        fused_speedup: None,
        workspace_bytes,
        device_bytes: workspace_bytes + io_bytes,
        moved_bytes: moved_bytes(shape, true),
        skipped: None,
        profile: Vec::new(),
        gemms: String::new(),
    })
}

fn tiny_call_row(ctx: &Context, options: &BenchOptions) -> Result<BenchRow> {
    let shape = Shape::new(1, 1, 2);
    let p = Problem::random(shape, 0);
    let params = LossParams::default();
    let call = || ctx.loss_on(&p, &params, Pass::ForwardBackward).map(|_| ());
    let calls = BenchOptions {
        reps: 20 * options.reps.max(1),
        ..options.clone()
    };
    let mut timed = time_ops(ctx, &calls, &[Timer::Host(&call)]);
    let (timing, runs) = timed
        .pop()
        .unwrap_or_else(|| Err(Error::Gpu("internal: no timing".into())))?;
    Ok(BenchRow {
        shape,
        op: "slice_api_tiny_call",
        timing,
        algorithm: None,
        seconds: stats(&runs),
        runs,
        flops: 0.0,
        vs_gemm: f64::NAN,
        fused_speedup: None,
        workspace_bytes: 0,
        device_bytes: 0,
        moved_bytes: moved_bytes(shape, true),
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
    out += "|    B |   D |      C | operation                | plan           | median ms (min-max)      | GFLOP/s | x GEMM | fused speed-up | workspace  | device bytes | moved bytes | GEMM candidates |\n";
    out += "|------|-----|--------|--------------------------|----------------|--------------------------|---------|--------|----------------|------------|--------------|-------------|-----------------|\n";
    for r in rows {
        out += &table_line(r);
    }
    // With --profile, the tuner's per-candidate times for every bucket it knows.
    if rows.iter().any(|r| !r.profile.is_empty()) {
        out += &tuner_lines(ctx);
    }
    out += &tuned_gemm_lines(rows);
    out += "\n";
    if rows.iter().any(|r| r.op.starts_with("fused_fwd_bwd_")) {
        out += "\nfused_fwd_bwd_bf16, fused_fwd_bwd_f16: the default plan's forward + backward with x, w, \
                dL/dx and dL/dw stored in bf16 / f16 (every sum in f32); moved bytes: x and w read \
                plus dL/dx and dL/dw written (forward + backward), each in its storage type\n";
    }
    if rows.iter().any(|r| r.op == "sharded_fwd_bwd") {
        out += &format!(
            "\nsharded_fwd_bwd: the classes in {BENCH_SHARDS} shards on one context through the shard API, \
             host wall clock around the whole call (uploads, passes, host merge, read-backs)\n"
        );
        out += &sharded_lines(rows);
    }
    for r in rows.iter().filter(|r| !r.profile.is_empty()) {
        out += &profile_table(r);
    }
    out
}

/// One row's line of the table.
fn table_line(r: &BenchRow) -> String {
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = r.shape;
    if let Some(why) = &r.skipped {
        return format!(
            "| {b:>4} | {d:>3} | {c:>6} | {:<24} | skipped: {why}\n",
            r.op
        );
    }
    if r.op == "slice_api_tiny_call" {
        let [med, min, max] = r.seconds.map(|s| s * 1e6);
        return format!(
            "| {b:>4} | {d:>3} | {c:>6} | {:<24} | {med:.1} us ({min:.1}-{max:.1} us), wall clock of a whole slice-API call\n",
            r.op
        );
    }
    let [med, min, max] = r.seconds.map(|s| s * 1e3);
    format!(
        "| {b:>4} | {d:>3} | {c:>6} | {:<24} | {:<14} | {:>8.3} ({:.3}-{:.3}) | {:>7.2} | {:>6.2} | {:>14} | {:>10} | {:>12} | {:>11} | {} |\n",
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
        megabytes(r.moved_bytes),
        r.gemms,
    )
}

/// The tuner's median time of every candidate on each bucket it knows.
fn tuner_lines(ctx: &Context) -> String {
    let mut out = "\ntuner: median ms per candidate on each bucket's tuning slice\n".to_string();
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
    out
}

/// B×D×C of `shape`, for the lines under the table.
fn dims(shape: Shape) -> String {
    format!("{}×{}×{}", shape.batch, shape.dim, shape.classes)
}

/// Each shape's sharded row against its single-device forward + backward, run by run.
fn sharded_lines(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    for sharded in rows.iter().filter(|r| r.op == "sharded_fwd_bwd") {
        let single = rows
            .iter()
            .find(|r| r.op == "fused_forward_backward" && r.shape == sharded.shape);
        if let Some(single) = single {
            out += &format!(
                "sharded_fwd_bwd at {}: {:.2}× fused_forward_backward, run by run\n",
                dims(sharded.shape),
                paired_ratio(&sharded.runs, &single.runs)
            );
        }
    }
    out
}

/// The tuned choice of each shape's GEMM against the fastest candidate of this run: the
/// two candidates' rows of the sweep, compared run by run ([`paired_ratio`]).
fn tuned_gemm_lines(rows: &[BenchRow]) -> String {
    let mut out = String::new();
    for gemm in rows.iter().filter(|r| r.op == "gemm") {
        let same_shape = |r: &&BenchRow| r.op == "gemm_candidate" && r.shape == gemm.shape;
        let tuned = rows
            .iter()
            .filter(same_shape)
            .find(|r| r.gemms == gemm.gemms);
        if let (Some(tuned), Some(fastest)) = (
            tuned,
            rows.iter()
                .filter(same_shape)
                .min_by(|a, b| a.seconds[0].total_cmp(&b.seconds[0])),
        ) {
            out += &format!(
                "\ntuned GEMM at {}: {} ({:.3} ms), fastest this run {} ({:.3} ms): {:.2}× the fastest",
                dims(tuned.shape),
                tuned.gemms,
                tuned.seconds[0] * 1e3,
                fastest.gemms,
                fastest.seconds[0] * 1e3,
                paired_ratio(&tuned.runs, &fastest.runs)
            );
        }
    }
    out
}

/// A profiled row's kernels: dispatches, median time and share of the operation.
fn profile_table(r: &BenchRow) -> String {
    let total: f64 = r.profile.iter().map(|k| k.seconds).sum();
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = r.shape;
    let mut out = format!(
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
                 \"fused_speedup\":{},\"workspace_bytes\":{},\"device_bytes\":{},\"moved_bytes\":{},\"skipped\":{},\"gemms\":{},\
                 \"runs_s\":[{}]}}\n",
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
                r.moved_bytes,
                r.skipped.as_deref().map_or("null".into(), text),
                text(&r.gemms),
                r.runs.iter().map(|&v| num(v)).collect::<Vec<_>>().join(","),
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
