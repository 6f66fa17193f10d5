//! `margin-softmax`: run the loss on safetensors files, check an adapter against the f64
//! reference, list adapters, benchmark. A client of the library's public API only.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use margin_softmax::reference::{self, Comparison};
use margin_softmax::schedule::{
    AdaFace, AdaFaceState, CurricularFace, CurricularState, CurricularStep, ElasticFace,
};
use margin_softmax::sphere;
use margin_softmax::tensors::{self, InputError, LossInputs, StoredValues};
use margin_softmax::MagFace;
use margin_softmax::{
    enumerate_adapters, parse_backends, workspace_bytes, Algorithm, Context, ContextOptions,
    Element, ElementTypes, HostInputs, LossOutput, LossParams, Objective, Pass, Problem, Reduction,
    Shape, TargetGradient,
};

#[derive(Parser)]
#[command(
    name = "margin-softmax",
    version,
    about = "Fused margin-softmax (AM-Softmax / CosFace) loss on any wgpu adapter"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Clone)]
struct AdapterArgs {
    /// Use the adapter whose name contains NAME (default: WGPU_ADAPTER_NAME, else wgpu's choice).
    #[arg(long, value_name = "NAME", global = true)]
    adapter: Option<String>,
    /// Backend to search: vulkan, metal, dx12 or gl (default: WGPU_BACKEND, else all).
    #[arg(long, value_name = "NAME", global = true)]
    backend: Option<String>,
    /// No progress indicator.
    #[arg(long, global = true)]
    quiet: bool,
}

#[derive(Args)]
struct TuneArgs {
    #[command(flatten)]
    adapter: AdapterArgs,
    /// Shapes whose products to tune first, as BxDxC,... (default: none, only show).
    #[arg(long, value_name = "BxDxC,...")]
    shapes: Option<String>,
}

#[derive(Subcommand)]
enum Command {
    /// Run the loss and its gradients on tensors from a safetensors file.
    Loss(LossArgs),
    /// Run the embedded default problem (seeded) and compare everything with the f64 reference.
    Check(CheckArgs),
    /// List every adapter wgpu can see, with the features and limits that matter here.
    Adapters(AdapterArgs),
    /// The GEMM autotuner: tune the products of the given shapes, then show the cache file
    /// and every bucket's per-candidate times.
    Tune(TuneArgs),
    /// Render the sphere map of the highest class probability as a PNG (the article's figure).
    Sphere(SphereArgs),
    /// The portable benchmark (same as `cargo bench`); run with `bench -- --help` for its options.
    Bench {
        #[command(flatten)]
        adapter: AdapterArgs,
        /// Options passed to the benchmark (after `--`).
        #[arg(last = true)]
        options: Vec<String>,
    },
}

/// ElasticFace's per-row margins, with the paper's defaults.
#[derive(Clone, Copy, ValueEnum)]
enum ElasticArg {
    /// ElasticArcFace: angular margins from N(0.5, 0.05).
    Arc,
    /// ElasticCosFace: cosine margins from N(0.35, 0.05).
    Cos,
    /// ElasticArcFace+: N(0.5, 0.0175), the smallest to the largest target cosines.
    ArcPlus,
    /// ElasticCosFace+: N(0.35, 0.02), sorted likewise.
    CosPlus,
}

impl ElasticArg {
    fn schedule(self, seed: u64) -> ElasticFace {
        let e = match self {
            ElasticArg::Arc => ElasticFace::arc(),
            ElasticArg::Cos => ElasticFace::cos(),
            ElasticArg::ArcPlus => ElasticFace::arc_plus(),
            ElasticArg::CosPlus => ElasticFace::cos_plus(),
        };
        ElasticFace { seed, ..e }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum ObjectiveArg {
    /// The margin softmax.
    Softmax,
    /// The hard margin max(0, s·(max_{j≠y} c_j − ψ(c_y))).
    Hard,
}

#[derive(Clone, Copy, ValueEnum)]
enum TargetGradientArg {
    /// The exact dψ/dc.
    Exact,
    /// InsightFace's: the margin passes no gradient of its own.
    StraightThrough,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReductionArg {
    Mean,
    Sum,
    None,
}

#[derive(Args)]
struct LossArgs {
    /// Input: `features` (B×D) and `weights` (C×D), each F32, F16 or BF16 (16-bit values are used as stored, every sum in f32), `labels` (B i64/i32, negative = ignore), optional scalar `scale`.
    #[arg(long, value_name = "IN.safetensors")]
    input: PathBuf,
    /// Output: loss, per_sample_loss, grad_features, grad_weights (each in the dtype of its input unless --f32-grads), grad_scale, pred, target_cos, best_other_cos.
    #[arg(long, value_name = "OUT.safetensors")]
    output: PathBuf,
    /// Write grad_features and grad_weights as F32 whatever the inputs' dtypes (for an f32 master copy of the weights).
    #[arg(long)]
    f32_grads: bool,
    /// Loss scale: the gradients written are dL/dx and dL/dw times S (rounded to their dtype after scaling, so that small F16 gradients stay above its subnormals); the loss and dL/ds are not scaled. A gradient too large for its dtype is an error: lower S.
    #[arg(long, value_name = "S", default_value_t = 1.0)]
    loss_scale: f32,
    /// Scale s (overrides the file's `scale`; default 30).
    #[arg(long)]
    scale: Option<f32>,
    /// Floor of the scale: the effective scale is max(s, s_min).
    #[arg(long, default_value_t = 0.0)]
    scale_min: f32,
    /// Additive cosine margin m.
    #[arg(long, default_value_t = 0.35)]
    margin: f32,
    /// Additive angular margin m2 in radians (ArcFace: 0.5 with --margin 0).
    #[arg(long, default_value_t = 0.0)]
    angular_margin: f32,
    /// Multiplicative angular margin m1, a whole number (SphereFace-style).
    #[arg(long, default_value_t = 1)]
    multiplicative_margin: u32,
    /// What the loss optimises.
    #[arg(long, value_enum, default_value = "softmax")]
    objective: ObjectiveArg,
    /// How the target logit's gradient treats the margin.
    #[arg(long, value_enum, default_value = "exact")]
    target_gradient: TargetGradientArg,
    /// How per-row losses are combined (`none` writes B losses; its gradients are those of the sum).
    #[arg(long, value_enum, default_value = "mean")]
    reduction: ReductionArg,
    /// ElasticFace's per-row margins, drawn from (--seed, --step) with the paper's
    /// defaults (they replace --margin and --angular-margin; pair them with --scale 64).
    #[arg(long, value_enum)]
    elastic: Option<ElasticArg>,
    /// The generator's seed for --elastic.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The training step for --elastic: each step draws new margins.
    #[arg(long, default_value_t = 0)]
    step: u64,
    /// AdaFace's per-row margins from the features' norms, with its defaults (m = 0.4,
    /// h = 0.333) and clipped angular form (they replace --margin and --angular-margin;
    /// pair them with --scale 64). The running statistics come from --adaface-state.
    #[arg(long, conflicts_with = "elastic")]
    adaface: bool,
    /// AdaFace's running statistics: read from this file where it exists (else μ = 20,
    /// σ = 100), updated with this batch, and written back (8 bytes: μ, σ as f32 LE).
    #[arg(long, value_name = "STATE", requires = "adaface")]
    adaface_state: Option<PathBuf>,
    /// MagFace's per-row angular margins from the features' norms, with its defaults
    /// (l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 20) and easy margin; its
    /// regulariser and dL/dx's radial part are added to the outputs (pair with --scale 64;
    /// gradients F32).
    #[arg(long, conflicts_with_all = ["elastic", "adaface"])]
    magface: bool,
    /// CurricularFace: ArcFace's m = 0.5 (replacing --margin and --angular-margin; pair
    /// with --scale 64) and hard non-targets c_j > φ_i counted as c_j·(t + c_j), t from
    /// --curricular-state.
    #[arg(long, conflicts_with_all = ["elastic", "adaface", "magface"])]
    curricular: bool,
    /// CurricularFace's t: read from this file where it exists (else 0), updated with
    /// this batch's target cosines, and written back (4 bytes: t as f32 LE).
    #[arg(long, value_name = "STATE", requires = "curricular")]
    curricular_state: Option<PathBuf>,
    /// Easy margin: the target logit is s·c where c ≤ 0 (MagFace's default; ArcFace's option).
    #[arg(long)]
    easy_margin: bool,
    /// InsightFace's inter-class filter: non-target cosines above T count as 0 (0.4 in its configs).
    #[arg(long, value_name = "T")]
    interclass_filter: Option<f32>,
    /// Also run the f64 reference and print the largest error per output; exit 1 past the bounds.
    #[arg(long)]
    verify: bool,
    #[command(flatten)]
    adapter: AdapterArgs,
}

#[derive(Args)]
struct SphereArgs {
    /// Output PNG.
    #[arg(long, value_name = "OUT.png")]
    output: PathBuf,
    /// Class vectors: a safetensors file whose `weights` tensor is C×3 f32 (default: C evenly spread).
    #[arg(long, value_name = "IN.safetensors")]
    input: Option<PathBuf>,
    /// C for the default class vectors (at least 1; not with --input).
    #[arg(long, default_value_t = 10, conflicts_with = "input")]
    classes: usize,
    /// Scale s.
    #[arg(long, default_value_t = 30.0)]
    scale: f32,
    /// Additive cosine margin m.
    #[arg(long, default_value_t = 0.0)]
    margin: f32,
    /// The article's sequence: s ∈ {1, 5, 10, 30}, with m = 0 and then m = 0.35.
    #[arg(long)]
    grid: bool,
    /// Pixels across each hemisphere, 8 to 8192.
    #[arg(long, default_value_t = 256)]
    size: usize,
    #[command(flatten)]
    adapter: AdapterArgs,
}

#[derive(Args)]
struct CheckArgs {
    /// B, rows of features.
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// D, length of each vector.
    #[arg(long, default_value_t = 64)]
    dim: usize,
    /// C, classes.
    #[arg(long, default_value_t = 1000)]
    classes: usize,
    /// Scale s.
    #[arg(long, default_value_t = 30.0)]
    scale: f32,
    /// Additive cosine margin m.
    #[arg(long, default_value_t = 0.35)]
    margin: f32,
    /// Seed of the random problem.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    #[command(flatten)]
    adapter: AdapterArgs,
}

/// A failure and its exit code: 2 for bad input, 1 for everything else.
struct Failure {
    code: u8,
    message: String,
}

fn bad_input(message: impl ToString) -> Failure {
    Failure {
        code: 2,
        message: message.to_string(),
    }
}

fn failure(message: impl ToString) -> Failure {
    Failure {
        code: 1,
        message: message.to_string(),
    }
}

/// Refuses, before anything is allocated, an input the slice API would upload as one
/// buffer larger than the adapter's buffers hold: `what` (with the flags that size it, as
/// `--flag value` pairs) needs `rows × columns` f32 values.
fn check_buffer(
    ctx: &Context,
    what: &str,
    flags: &[(&str, usize)],
    rows: usize,
    columns: usize,
) -> Result<(), Failure> {
    // In 128 bits: rows·columns·4 is exact for any two usize values.
    let bytes = rows as u128 * columns as u128 * 4;
    let limit = ctx.limits().max_buffer_size;
    if bytes <= u128::from(limit) {
        return Ok(());
    }
    let given: Vec<String> = flags.iter().map(|(f, v)| format!("{f} {v}")).collect();
    let names: Vec<&str> = flags.iter().map(|(f, _)| *f).collect();
    Err(bad_input(format!(
        "{}: the {what} need {bytes} bytes in one buffer, but this adapter's buffers hold at most {limit}; use a smaller {}",
        given.join(" × "),
        names.join(" or ")
    )))
}

/// Refuses a run whose host memory (about `bytes`) this machine cannot allocate: the
/// allocation is asked for, and returned untouched, before any value is computed.
fn check_host_memory(bytes: u64, what: &str, flags: &str) -> Result<(), Failure> {
    let fits = usize::try_from(bytes)
        .ok()
        .is_some_and(|n| Vec::<u8>::new().try_reserve_exact(n).is_ok());
    if fits {
        Ok(())
    } else {
        Err(bad_input(format!(
            "{what} needs about {bytes} bytes of host memory and this machine cannot allocate them; use a smaller {flags}"
        )))
    }
}

fn context(args: &AdapterArgs) -> Result<Context, Failure> {
    let backends = match &args.backend {
        Some(name) => Some(parse_backends(name).ok_or_else(|| {
            bad_input(format!("--backend {name:?}: use vulkan, metal, dx12 or gl"))
        })?),
        None => None,
    };
    let options = ContextOptions {
        backends,
        adapter_name: args.adapter.clone(),
        ..ContextOptions::default()
    };
    Context::new_blocking(options).map_err(failure)
}

/// Runs `work` under a spinner (unless quiet) and returns its result and wall time.
fn with_progress<T>(quiet: bool, label: &str, work: impl FnOnce() -> T) -> (T, Duration) {
    let bar = if quiet {
        ProgressBar::hidden()
    } else {
        ProgressBar::new_spinner()
    };
    bar.set_style(
        ProgressStyle::with_template("{spinner} {msg} {elapsed}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    bar.set_message(label.to_string());
    bar.enable_steady_tick(Duration::from_millis(100));
    let start = Instant::now();
    let value = work();
    let elapsed = start.elapsed();
    bar.finish_and_clear();
    (value, elapsed)
}

fn print_comparison(check: &Comparison) {
    println!(
        "{:<16} {:>12} {:>12}  result",
        "output", "max error", "bound"
    );
    for (name, err, bound) in &check.errors {
        let verdict = if err <= bound { "pass" } else { "FAIL" };
        println!("{name:<16} {err:>12.3e} {bound:>12.1e}  {verdict}");
    }
    let verdict = if check.pred_mismatches == 0 {
        "pass"
    } else {
        "FAIL"
    };
    println!(
        "{:<16} {:>12} {:>12}  {verdict}",
        "pred", check.pred_mismatches, "0"
    );
}

/// Accuracy and the mean achieved margin c_y − max_{j≠y} c_j over rows not ignored.
fn training_figures<GX, GW>(out: &LossOutput<GX, GW>, labels: &[u32]) -> (f64, f64) {
    let valid: Vec<usize> = (0..labels.len())
        .filter(|&i| labels[i] != margin_softmax::IGNORE)
        .collect();
    let n = valid.len().max(1) as f64;
    let margin = valid
        .iter()
        .map(|&i| f64::from(out.target_cos[i] - out.best_other_cos[i]))
        .sum::<f64>()
        / n;
    (f64::from(out.correct_rows) / n, margin)
}

/// The loss's parameters from the flags and the file.
fn loss_params(args: &LossArgs, inputs: &LossInputs) -> LossParams {
    LossParams {
        scale: args.scale.or(inputs.scale).unwrap_or(30.0),
        scale_min: args.scale_min,
        margin: args.margin,
        angular_margin: args.angular_margin,
        multiplicative_margin: args.multiplicative_margin,
        objective: match args.objective {
            ObjectiveArg::Softmax => Objective::Softmax,
            ObjectiveArg::Hard => Objective::HardMargin,
        },
        target_gradient: match args.target_gradient {
            TargetGradientArg::Exact => TargetGradient::Exact,
            TargetGradientArg::StraightThrough => TargetGradient::StraightThrough,
        },
        reduction: match args.reduction {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        },
        loss_scale: args.loss_scale,
        easy_margin: args.easy_margin || args.magface,
        interclass_filter: args.interclass_filter,
        angle_clip: args.adaface,
        curricular: None,
    }
}

/// A failed loss call: a gradient too large for its dtype names the output tensor (as the
/// output file names it) and the flags that fix it; anything else as the library says.
fn loss_failure(e: margin_softmax::Error) -> Failure {
    match e {
        margin_softmax::Error::GradientOutOfRange { tensor, element } => {
            let name = if tensor == "grad_classes" {
                "grad_weights"
            } else {
                tensor
            };
            failure(format!(
                "tensor `{name}`: a gradient value is too large for {} and would round to \
                 infinity; lower --loss-scale, or write the gradients as F32 with --f32-grads",
                element.name()
            ))
        }
        e => failure(e),
    }
}

/// What one loss run needs besides its typed values.
struct LossRun<'a> {
    args: &'a LossArgs,
    inputs: &'a LossInputs,
    params: LossParams,
    ctx: Context,
}

fn run_loss(args: &LossArgs) -> Result<(), Failure> {
    let inputs = tensors::read_inputs(&args.input).map_err(|e: InputError| bad_input(e))?;
    let params = loss_params(args, &inputs);
    params.validate().map_err(bad_input)?;
    let run = LossRun {
        args,
        inputs: &inputs,
        params,
        ctx: context(&args.adapter)?,
    };
    match &inputs.features {
        StoredValues::F32(x) => run.with_features(x),
        StoredValues::F16(x) => run.with_features(x),
        StoredValues::Bf16(x) => run.with_features(x),
    }
}

/// The bytes of a state file where `path` names one that exists; `what` says what it
/// must hold.
fn read_state<const N: usize>(path: Option<&Path>, what: &str) -> Result<Option<[u8; N]>, Failure> {
    let Some(p) = path.filter(|p| p.exists()) else {
        return Ok(None);
    };
    let bytes = std::fs::read(p).map_err(|e| failure(format!("{}: {e}", p.display())))?;
    let bytes: [u8; N] = bytes
        .try_into()
        .map_err(|_| bad_input(format!("{}: {what}", p.display())))?;
    Ok(Some(bytes))
}

/// Writes a state file where `path` names one.
fn write_state(path: Option<&Path>, bytes: &[u8]) -> Result<(), Failure> {
    match path {
        Some(p) => std::fs::write(p, bytes).map_err(|e| failure(format!("{}: {e}", p.display()))),
        None => Ok(()),
    }
}

/// AdaFace's per-row margins for this batch, and its state updated with the batch.
type AdaFaceStep = (Vec<[f32; 2]>, AdaFaceState);

impl LossRun<'_> {
    /// ElasticFace's margins where --elastic asks for them (the "+" variants from the
    /// target cosines of a forward pass on the same inputs), else none.
    fn elastic_margins<X: Element, W: Element>(
        &self,
        host: &HostInputs<'_, X, W>,
    ) -> Result<Option<Vec<[f32; 2]>>, Failure> {
        let Some(kind) = self.args.elastic else {
            return Ok(None);
        };
        self.schedule_flag(true, "--elastic")?;
        let e = kind.schedule(self.args.seed);
        if !e.plus {
            return Ok(Some(e.margins(self.args.step, host.labels.len())));
        }
        let forward: LossOutput = self
            .ctx
            .loss_inputs(host, &self.params, Pass::Forward, None)
            .map_err(loss_failure)?;
        Ok(Some(e.plus_margins(
            self.args.step,
            host.labels,
            &forward.target_cos,
        )))
    }

    /// Whether the schedule `flag` (set: `on`) runs: not beside the file's row_margins,
    /// which would give the rows other margins.
    fn schedule_flag(&self, on: bool, flag: &str) -> Result<bool, Failure> {
        if on && self.inputs.row_margins.is_some() {
            return Err(bad_input(format!(
                "{flag} and the file's row_margins both set the rows' margins: give one"
            )));
        }
        Ok(on)
    }

    /// AdaFace's margins where --adaface asks for them, from the features' norms and the
    /// state in --adaface-state, with the updated state, else none.
    fn adaface_margins<X: Element>(&self, x: &[X]) -> Result<Option<AdaFaceStep>, Failure> {
        if !self.schedule_flag(self.args.adaface, "--adaface")? {
            return Ok(None);
        }
        let path = self.args.adaface_state.as_deref();
        let mut state = read_state(path, "an AdaFace state is 8 bytes (μ and σ as f32 LE)")?
            .map_or_else(AdaFaceState::default, AdaFaceState::from_bytes);
        let before = state;
        let margins = AdaFace::default()
            .margins(&mut state, x, self.inputs.problem.shape.dim)
            .map_err(bad_input)?;
        println!(
            "adaface     μ {} → {}, σ {} → {}",
            before.mean, state.mean, before.std, state.std
        );
        Ok(Some((margins, state)))
    }

    /// CurricularFace's step where --curricular asks for it (t from --curricular-state),
    /// with the updated state, else none.
    fn curricular_step<X: Element, W: Element>(
        &self,
        host: &HostInputs<'_, X, W>,
    ) -> Result<Option<(CurricularStep, CurricularState)>, Failure> {
        if !self.schedule_flag(self.args.curricular, "--curricular")? {
            return Ok(None);
        }
        let path = self.args.curricular_state.as_deref();
        let mut state = read_state(path, "a CurricularFace state is 4 bytes (t as f32 LE)")?
            .map_or_else(CurricularState::default, CurricularState::from_bytes);
        let before = state.t;
        let step = CurricularFace::default()
            .step(&mut state, host)
            .map_err(bad_input)?;
        println!("curricular  t {before} → {}", state.t);
        Ok(Some((step, state)))
    }

    /// MagFace's margins where --magface asks for them, else none.
    fn magface_margins<X: Element>(&self, x: &[X]) -> Result<Option<Vec<[f32; 2]>>, Failure> {
        if !self.schedule_flag(self.args.magface, "--magface")? {
            return Ok(None);
        }
        MagFace::default()
            .margins(x, self.inputs.problem.shape.dim)
            .map(Some)
            .map_err(bad_input)
    }

    fn with_features<X: Element>(&self, x: &[X]) -> Result<(), Failure> {
        match &self.inputs.weights {
            StoredValues::F32(w) => self.with_inputs(x, w),
            StoredValues::F16(w) => self.with_inputs(x, w),
            StoredValues::Bf16(w) => self.with_inputs(x, w),
        }
    }

    /// Gradients in the inputs' types, or f32 with --f32-grads (and with --magface).
    fn with_inputs<X: Element, W: Element>(&self, x: &[X], w: &[W]) -> Result<(), Failure> {
        if self.args.f32_grads || self.args.magface {
            self.typed::<X, W, f32, f32>(x, w)
        } else {
            self.typed::<X, W, X, W>(x, w)
        }
    }

    /// Runs the loss on x and w as stored, with gradients of `GX` and `GW`; prints, verifies
    /// and writes the outputs.
    fn typed<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        x: &[X],
        w: &[W],
    ) -> Result<(), Failure> {
        let (args, inputs, params, ctx) = (self.args, self.inputs, &self.params, &self.ctx);
        let problem = &inputs.problem;
        let shape = problem.shape;
        let elements = ElementTypes::of::<X, W, GX, GW>();
        let plain = HostInputs::new(shape, x, w, &problem.labels);
        let adaface = self.adaface_margins(x)?;
        let schedule = match (&adaface, self.magface_margins(x)?) {
            (Some((m, _)), _) => Some(m.clone()),
            (None, Some(m)) => Some(m),
            (None, None) => self.elastic_margins(&plain)?,
        };
        let margins = schedule.as_deref().or(inputs.row_margins.as_deref());
        let curricular = self.curricular_step(&plain)?;
        let thresholds = curricular
            .as_ref()
            .map(|(step, _)| step.hard_thresholds.as_slice());
        let params = &match &curricular {
            Some((step, _)) => step.apply(*params),
            None => *params,
        };
        let host = HostInputs {
            row_margins: margins,
            hard_thresholds: thresholds,
            ..plain
        };
        let (result, elapsed) = with_progress(args.adapter.quiet, "running the loss", || {
            ctx.loss_inputs::<X, W, GX, GW>(&host, params, Pass::ForwardBackward, None)
        });
        let mut out = result.map_err(loss_failure)?;
        if args.magface {
            MagFace::default()
                .finish(&plain, params, &mut out)
                .map_err(bad_input)?;
        }
        // The states advance only with a step that ran.
        if let Some((_, state)) = &adaface {
            write_state(args.adaface_state.as_deref(), &state.to_bytes())?;
        }
        if let Some((_, state)) = &curricular {
            write_state(args.curricular_state.as_deref(), &state.to_bytes())?;
        }
        let (accuracy, achieved) = training_figures(&out, &problem.labels);
        println!("adapter     {}", ctx.describe());
        println!(
            "shapes      features {}×{} {}, weights {}×{} {}, labels {}",
            shape.batch,
            shape.dim,
            X::TYPE.name(),
            shape.classes,
            shape.dim,
            W::TYPE.name(),
            shape.batch
        );
        let margin = match (args.elastic, margins) {
            (None, Some(_)) if args.adaface => "per row (AdaFace)".to_string(),
            (None, Some(_)) if args.magface => "per row (MagFace, from the norms)".to_string(),
            (None, None) if args.curricular => format!(
                "ArcFace's {} with CurricularFace's hard negatives",
                params.angular_margin
            ),
            (Some(_), _) => format!(
                "per row (ElasticFace, seed {}, step {})",
                args.seed, args.step
            ),
            (None, Some(_)) => "per row (the file's row_margins)".to_string(),
            (None, None) => params.margin.to_string(),
        };
        println!(
            "params      s = {} (effective {}), m = {margin}, reduction {:?}",
            params.scale,
            params.effective_scale(),
            params.reduction
        );
        println!(
            "gradients   grad_features {}, grad_weights {}, loss scale {}",
            GX::TYPE.name(),
            GW::TYPE.name(),
            params.loss_scale
        );
        println!("loss        {:.6}", out.loss);
        println!("dL/ds       {:.6e}", out.grad_scale);
        println!(
            "accuracy    {:.4} ({}/{} rows)",
            accuracy, out.correct_rows, out.valid_rows
        );
        println!("margin      {achieved:.4} (mean target cosine minus best other cosine)");
        println!("time        {:.1} ms", elapsed.as_secs_f64() * 1e3);
        let mut verdict = Ok(());
        if args.verify {
            // The reference runs on the values as stored (widened exactly to f32).
            let stored = HostInputs {
                row_margins: margins,
                hard_thresholds: thresholds,
                ..HostInputs::new(shape, &problem.features, &problem.classes, &problem.labels)
            };
            let expected = if args.magface {
                let plain = HostInputs {
                    row_margins: None,
                    ..stored
                };
                reference::magface_loss(&plain, &MagFace::default(), params)
            } else {
                reference::loss_inputs(&stored, params)
            }
            .map_err(failure)?;
            let check = reference::compare_stored(
                shape.dim,
                params,
                &out.clone().widened(),
                &expected,
                elements,
            );
            println!();
            print_comparison(&check);
            if !check.passes() {
                verdict = Err(failure("verification failed: an error exceeds its bound"));
            }
        }
        let bytes = tensors::serialize_outputs(shape, &out, params.reduction == Reduction::None)
            .map_err(failure)?;
        verdict?;
        tensors::write_atomically(&args.output, &bytes)
            .map_err(|e| failure(format!("cannot write {}: {e}", args.output.display())))?;
        println!("wrote       {}", args.output.display());
        Ok(())
    }
}

fn run_check(args: &CheckArgs) -> Result<(), Failure> {
    let shape = Shape::new(args.batch, args.dim, args.classes);
    let params = LossParams {
        scale: args.scale,
        margin: args.margin,
        ..LossParams::default()
    };
    params.validate().map_err(bad_input)?;
    let ctx = context(&args.adapter)?;
    let (b, d, c) = (args.batch, args.dim, args.classes);
    check_buffer(&ctx, "features", &[("--batch", b), ("--dim", d)], b, d)?;
    check_buffer(
        &ctx,
        "class vectors",
        &[("--classes", c), ("--dim", d)],
        c,
        d,
    )?;
    // Per value of x and w: 4 bytes each for the problem and the GPU's gradients, 32 for
    // the f64 reference's copies and gradients; and the per-row and per-class outputs.
    let values = (b as u64).saturating_add(c as u64).saturating_mul(d as u64);
    let per_item = (b as u64).saturating_add(c as u64).saturating_mul(128);
    check_host_memory(
        values.saturating_mul(40).saturating_add(per_item),
        "the check (the problem, its gradients and the f64 reference)",
        "--batch, --dim or --classes",
    )?;
    let p = Problem::try_random(shape, args.seed).map_err(bad_input)?;
    let (result, elapsed) = with_progress(args.adapter.quiet, "running the fused loss", || {
        ctx.loss_on(&p, &params, Pass::ForwardBackward)
    });
    let out = result.map_err(|e| match e {
        margin_softmax::Error::EmptyShape { .. } | margin_softmax::Error::TooLarge { .. } => {
            bad_input(e)
        }
        e => failure(e),
    })?;
    let (expected, reference_time) =
        with_progress(args.adapter.quiet, "running the f64 reference", || {
            reference::loss_on(&p, &params)
        });
    let expected = expected.map_err(failure)?;
    let check = reference::compare(shape.dim, &params, &out, &expected);
    let chosen = Algorithm::choose(&ctx, shape);
    let workspace = |a| workspace_bytes(&ctx, shape, a).map_err(failure);
    println!("adapter     {}", ctx.describe());
    println!(
        "problem     B = {}, D = {}, C = {}, s = {}, m = {}, seed {}",
        shape.batch, shape.dim, shape.classes, params.scale, params.margin, args.seed
    );
    println!(
        "loss        {:.6} (f64 reference {:.6})",
        out.loss, expected.loss
    );
    println!(
        "workspace   {} bytes ({chosen:?} plan, used here); memory-minimal plan {} bytes; the B×C logits alone {} bytes",
        workspace(chosen)?,
        workspace(Algorithm::MemoryMinimal)?,
        shape.batch * shape.classes * 4
    );
    println!(
        "time        {:.1} ms on the GPU path (first call, with set-up), {:.1} ms f64 reference",
        elapsed.as_secs_f64() * 1e3,
        reference_time.as_secs_f64() * 1e3
    );
    println!();
    print_comparison(&check);
    if check.passes() {
        println!("\nPASS");
        Ok(())
    } else {
        Err(failure("FAIL: an error exceeds its bound"))
    }
}

fn run_sphere(args: &SphereArgs) -> Result<(), Failure> {
    if args.input.is_none() && args.classes == 0 {
        return Err(bad_input(
            "--classes 0: the sphere map needs at least 1 class",
        ));
    }
    if !(8..=sphere::MAX_SIZE).contains(&args.size) {
        return Err(bad_input(format!(
            "--size {}: use 8 to {} pixels across each hemisphere",
            args.size,
            sphere::MAX_SIZE
        )));
    }
    let from_file = match &args.input {
        Some(path) => {
            let (weights, _, dim) = tensors::read_class_vectors(path).map_err(bad_input)?;
            if dim != 3 {
                return Err(bad_input(format!(
                    "tensor `weights`: expected C×3 class vectors for a sphere map, found D = {dim}"
                )));
            }
            Some(weights)
        }
        None => None,
    };
    let ctx = context(&args.adapter)?;
    let classes = match from_file {
        Some(weights) => weights,
        None => {
            let c = args.classes;
            check_buffer(&ctx, "class vectors", &[("--classes", c)], c, 3)?;
            sphere::try_default_class_vectors(c).map_err(bad_input)?
        }
    };
    let (image, elapsed) = with_progress(args.adapter.quiet, "rendering", || {
        if args.grid {
            sphere::render_grid(
                &ctx,
                &classes,
                &[1.0, 5.0, 10.0, 30.0],
                &[0.0, 0.35],
                args.size,
            )
        } else {
            let params = LossParams {
                scale: args.scale,
                margin: args.margin,
                ..LossParams::default()
            };
            sphere::render(&ctx, &classes, &params, args.size, &[])
        }
    });
    let image = image.map_err(bad_input)?;
    image.write_png(&args.output).map_err(failure)?;
    println!(
        "wrote {} ({}×{} pixels, {} classes, {:.1} s)",
        args.output.display(),
        image.width,
        image.height,
        classes.len() / 3,
        elapsed.as_secs_f64()
    );
    Ok(())
}

fn run_tune(args: &TuneArgs) -> Result<(), Failure> {
    let ctx = context(&args.adapter)?;
    for text in args.shapes.iter().flat_map(|s| s.split(',')) {
        let dims: Vec<usize> = text
            .split('x')
            .map(str::parse)
            .collect::<Result<_, _>>()
            .map_err(|_| bad_input(format!("--shapes {text:?}: write shapes as BxDxC")))?;
        let [b, d, c] = dims[..] else {
            return Err(bad_input(format!(
                "--shapes {text:?}: write shapes as BxDxC"
            )));
        };
        // A plan tunes every product it runs.
        margin_softmax::Plan::new(&ctx, Shape::new(b, d, c)).map_err(failure)?;
    }
    println!("adapter     {}", ctx.describe());
    match ctx.tuning_file() {
        Some(file) => println!("cache file  {}", file.display()),
        None => println!("cache file  none (tuning in memory, or off)"),
    }
    let tuned = ctx.tuned();
    if tuned.is_empty() {
        println!("no bucket tuned yet; give --shapes BxDxC to tune a shape's products");
        return Ok(());
    }
    println!("\n| product      |      m |      n |      k | chosen     | median ms per candidate on the tuning slice");
    println!("|--------------|--------|--------|--------|------------|--------------------------------------------");
    for t in tuned {
        let b = t.bucket;
        let times: Vec<String> = t
            .seconds
            .iter()
            .map(|(name, s)| format!("{name} {:.3}", s * 1e3))
            .collect();
        println!(
            "| {:<12} | {:>6} | {:>6} | {:>6} | {:<10} | {}",
            b.layout,
            b.m,
            b.n,
            b.k,
            t.candidate,
            times.join(", ")
        );
    }
    Ok(())
}

fn run_adapters(args: &AdapterArgs) -> Result<(), Failure> {
    let backends = match &args.backend {
        Some(name) => Some(parse_backends(name).ok_or_else(|| {
            bad_input(format!("--backend {name:?}: use vulkan, metal, dx12 or gl"))
        })?),
        None => None,
    };
    let adapters = pollster::block_on(enumerate_adapters(backends));
    if adapters.is_empty() {
        return Err(failure(margin_softmax::Error::NoAdapter {
            wanted: format!("backends {backends:?}"),
        }));
    }
    for adapter in adapters {
        let info = adapter.get_info();
        if let Some(name) = &args.adapter {
            if !info.name.to_lowercase().contains(&name.to_lowercase()) {
                continue;
            }
        }
        let features = adapter.features();
        let limits = adapter.limits();
        let has = |f| if features.contains(f) { "yes" } else { "no" };
        println!("{}", info.name);
        println!(
            "  backend {:?}, type {:?}, driver {} {}",
            info.backend, info.device_type, info.driver, info.driver_info
        );
        println!(
            "  timestamps {}, f16 {}, subgroups {}",
            has(wgpu::Features::TIMESTAMP_QUERY),
            has(wgpu::Features::SHADER_F16),
            has(wgpu::Features::SUBGROUP)
        );
        println!(
            "  max storage binding {} bytes, max buffer {} bytes, workgroup storage {} bytes, invocations/workgroup {}, workgroups/dimension {}",
            limits.max_storage_buffer_binding_size,
            limits.max_buffer_size,
            limits.max_compute_workgroup_storage_size,
            limits.max_compute_invocations_per_workgroup,
            limits.max_compute_workgroups_per_dimension
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match &cli.command {
        Command::Loss(args) => run_loss(args),
        Command::Check(args) => run_check(args),
        Command::Adapters(args) => run_adapters(args),
        Command::Tune(args) => run_tune(args),
        Command::Sphere(args) => run_sphere(args),
        Command::Bench { adapter, options } => {
            let mut all = options.clone();
            if let Some(name) = &adapter.adapter {
                all.extend(["--adapter".to_string(), name.clone()]);
            }
            if let Some(name) = &adapter.backend {
                all.extend(["--backend".to_string(), name.clone()]);
            }
            margin_softmax::bench::main_with_args(&all).map_err(bad_input)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}
