//! Class sharding (Partial FC's layout): the classes are split across shards; each shard
//! computes per-row partials over its own classes, a fixed-order merge of those O(B)
//! numbers gives the global log-sum-exp and statistics, and each shard then computes the
//! exact dL/dw of its classes and its share of dL/dx from the global values. The exchange
//! per row is one [`RowPartial`] (28 bytes) out and one [`RowSoftmax`] (20 bytes) back,
//! whatever C is.

use wgpu::util::DeviceExt;

use crate::api::check_flags;
use crate::api::whole_words;
use crate::context::{Context, DeviceBuffer};
use crate::error::{Error, Result};
use crate::io::{
    check_batch, check_hard_thresholds, check_row_margins, Element, ElementTypes, Gradients,
    HostInputs, LossOutput, IGNORE,
};
use crate::io::{BufferRegion, DeviceInputs, DeviceOutputs, GradOutputs, RowStats, Shape, Summary};
use crate::kernels::{Binding, Timestamps};
use crate::params::{LossParams, Objective, Reduction};
use crate::plan::{Phase, Plan};
use crate::reference::target_margin;

/// Classes `[first, first + count)` of `total`: the part of w one shard holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClassShard {
    /// Global index of the shard's first class.
    pub first: usize,
    /// Classes in the shard (rows of its w).
    pub count: usize,
    /// C, all classes; labels are global.
    pub total: usize,
}

impl ClassShard {
    /// The `k`-th of `shards` near-equal contiguous shards of `total` classes: classes
    /// `⌊total·k/shards⌋..⌊total·(k+1)/shards⌋`, exact for every `total` (the products
    /// are formed in 128 bits). [`Error::InvalidParameter`] where `shards` is 0 or `k` is
    /// not below it.
    pub fn split(total: usize, shards: usize, k: usize) -> Result<ClassShard> {
        if shards == 0 {
            return Err(Error::InvalidParameter {
                name: "shards",
                value: 0.0,
                requirement: "at least 1",
            });
        }
        if k >= shards {
            return Err(Error::InvalidParameter {
                name: "k",
                value: k as f32,
                requirement: "a shard index below the number of shards (0..shards)",
            });
        }
        // k < shards, so k + 1 does not overflow and every bound is at most total.
        let bound = |k: usize| (total as u128 * k as u128 / shards as u128) as usize;
        let first = bound(k);
        Ok(ClassShard {
            first,
            count: bound(k + 1) - first,
            total,
        })
    }
}

const NEG_BIG: f32 = -3.0e38;
const NO_CLASS: u32 = u32::MAX;

/// One row's online-softmax state over a set of classes (mirrors `SplitPartial` in
/// `shaders/forward.wgsl`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowPartial {
    /// M, the running max of z.
    pub max_logit: f32,
    /// S = Σ exp(z − M).
    pub sum_exp: f32,
    /// T = Σ exp(z − M)·z/s.
    pub sum_exp_logit: f32,
    /// The non-target part of S.
    pub sum_exp_other: f32,
    /// c_iy if the label is among these classes, else −3e38.
    pub target_cos: f32,
    /// The largest non-target cosine, −3e38 if none.
    pub best_other_cos: f32,
    /// Its lowest global class index, `u32::MAX` if none.
    pub best_other_class: u32,
}

impl RowPartial {
    /// The state over no classes.
    pub fn empty() -> RowPartial {
        RowPartial {
            max_logit: NEG_BIG,
            sum_exp: 0.0,
            sum_exp_logit: 0.0,
            sum_exp_other: 0.0,
            target_cos: NEG_BIG,
            best_other_cos: NEG_BIG,
            best_other_class: NO_CLASS,
        }
    }

    /// a ⊕ b, as the kernels merge: rescaled sums, and ties in the best cosine keep the
    /// lower class.
    pub fn merge(a: RowPartial, b: RowPartial) -> RowPartial {
        let m = a.max_logit.max(b.max_logit);
        let (fa, fb) = ((a.max_logit - m).exp(), (b.max_logit - m).exp());
        let b_wins = b.best_other_class != NO_CLASS
            && (a.best_other_class == NO_CLASS
                || b.best_other_cos > a.best_other_cos
                || (b.best_other_cos == a.best_other_cos
                    && b.best_other_class < a.best_other_class));
        RowPartial {
            max_logit: m,
            sum_exp: a.sum_exp * fa + b.sum_exp * fb,
            sum_exp_logit: a.sum_exp_logit * fa + b.sum_exp_logit * fb,
            sum_exp_other: a.sum_exp_other * fa + b.sum_exp_other * fb,
            target_cos: a.target_cos.max(b.target_cos),
            best_other_cos: if b_wins {
                b.best_other_cos
            } else {
                a.best_other_cos
            },
            best_other_class: if b_wins {
                b.best_other_class
            } else {
                a.best_other_class
            },
        }
    }
}

/// Merges each row's partials over the shards, in shard order (deterministic).
/// [`Error::LengthMismatch`] unless every shard gives as many rows as the first.
pub fn merge_shards(shards: &[Vec<RowPartial>]) -> Result<Vec<RowPartial>> {
    let rows = shards.first().map_or(0, Vec::len);
    if let Some(short) = shards.iter().find(|s| s.len() != rows) {
        return Err(Error::LengthMismatch {
            input: "a shard's partials (one per row, as many as the first shard's)",
            expected: rows,
            actual: short.len(),
        });
    }
    Ok((0..rows)
        .map(|i| {
            shards
                .iter()
                .map(|s| s[i])
                .fold(RowPartial::empty(), RowPartial::merge)
        })
        .collect())
}

/// What every shard needs back for its backward pass, per row (mirrors `RowSoftmax` in
/// `shaders/common.wgsl`; 20 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowSoftmax {
    /// LSE_i.
    pub lse: f32,
    /// dL_i/ds.
    pub scale_grad: f32,
    /// 1 − p_iy (the hard objective: 1 where its hinge is active).
    pub target_complement: f32,
    /// The best non-target class (global).
    pub best_other_class: u32,
    /// The row's label, `IGNORE` if it takes no part.
    pub label: u32,
}

/// The global per-row values and totals from the merged partials.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalRows {
    /// Sent back to every shard.
    pub softmax: Vec<RowSoftmax>,
    /// The loss, dL/ds and statistics (without gradients).
    pub output: LossOutput,
}

impl GlobalRows {
    /// [`Error::Overflow`] where a log-sum-exp or loss is not finite (the shards' dot
    /// products overflowed f32), as the single-device path reports it.
    pub fn check(&self) -> Result<()> {
        let lse_ok = self.softmax.iter().all(|r| r.lse.is_finite());
        let loss_ok =
            self.output.row_loss.iter().all(|l| l.is_finite()) && self.output.loss.is_finite();
        if lse_ok && loss_ok {
            Ok(())
        } else {
            Err(Error::Overflow)
        }
    }
}

/// LSE, L_i, 1 − p_iy, dL_i/ds and the statistics of every row from its merged state, and
/// the totals: the host's twin of `finish_row` and `summarize` (in f64).
/// [`Error::LengthMismatch`] unless there is one label per merged row.
pub fn finish_rows(
    merged: &[RowPartial],
    labels: &[u32],
    total_classes: usize,
    params: &LossParams,
) -> Result<GlobalRows> {
    finish_rows_with_margins(merged, (labels, None), total_classes, params)
}

/// [`finish_rows`] with the batch's per-row margins, where the shards had them (each
/// row's target takes its own, [`LossParams::with_row_margin`]).
pub fn finish_rows_with_margins(
    merged: &[RowPartial],
    (labels, row_margins): (&[u32], Option<&[[f32; 2]]>),
    total_classes: usize,
    params: &LossParams,
) -> Result<GlobalRows> {
    let s = f64::from(params.effective_scale());
    let b = merged.len();
    if labels.len() != b {
        return Err(Error::LengthMismatch {
            input: "labels (one per merged row)",
            expected: b,
            actual: labels.len(),
        });
    }
    if let Some(margins) = row_margins {
        check_row_margins(margins, b, params)?;
    }
    let mut softmax = Vec::with_capacity(b);
    let mut out = LossOutput {
        loss: 0.0,
        row_loss: vec![0.0; b],
        grad_scale: 0.0,
        pred: vec![0; b],
        target_cos: vec![0.0; b],
        best_other_cos: vec![0.0; b],
        achieved_margin: vec![0.0; b],
        target_prob: vec![0.0; b],
        mean_achieved_margin: 0.0,
        margin_satisfied_rows: 0,
        valid_rows: 0,
        correct_rows: 0,
        grads: None,
    };
    let (mut loss, mut scale_grad, mut margin) = (0.0f64, 0.0f64, 0.0f64);
    for (i, acc) in merged.iter().enumerate() {
        let has_other = acc.best_other_class != NO_CLASS;
        let best_other = if has_other { acc.best_other_cos } else { -1.0 };
        let lse = f64::from(acc.max_logit) + f64::from(acc.sum_exp).ln();
        let y = labels[i];
        out.best_other_cos[i] = best_other;
        out.pred[i] = acc.best_other_class;
        let valid = y != IGNORE && (y as usize) < total_classes;
        let mut row = RowSoftmax {
            lse: lse as f32,
            scale_grad: 0.0,
            target_complement: 0.0,
            best_other_class: acc.best_other_class,
            label: if valid { y } else { IGNORE },
        };
        if valid {
            let row_params = match row_margins {
                Some(margins) => params.with_row_margin(margins[i]),
                None => *params,
            };
            let terms = target_row_terms(acc, lse, best_other, &row_params, s);
            row.scale_grad = terms.scale_grad as f32;
            row.target_complement = terms.complement as f32;
            record_target_row(&mut out, i, acc, y, best_other, &terms);
            loss += terms.loss;
            scale_grad += terms.scale_grad;
            margin += f64::from(out.achieved_margin[i]);
        }
        softmax.push(row);
    }
    let n = out.valid_rows;
    let norm = if params.reduction == Reduction::Mean {
        1.0 / f64::from(n.max(1))
    } else {
        1.0
    };
    out.loss = (loss * norm) as f32;
    let gate = if params.scale_receives_grad() {
        1.0
    } else {
        0.0
    };
    out.grad_scale = (scale_grad * norm * gate) as f32;
    out.mean_achieved_margin = (margin / f64::from(n.max(1))) as f32;
    Ok(GlobalRows {
        softmax,
        output: out,
    })
}

/// A labelled row's terms from its merged state: L_i, p_iy, 1 − p_iy and dL_i/ds (the
/// hard objective's where it is set), and ψ(c_iy).
struct TargetTerms {
    loss: f64,
    prob: f64,
    complement: f64,
    scale_grad: f64,
    zc: f64,
}

/// The [`TargetTerms`] of a labelled row with merged state `acc`, log-sum-exp `lse` and
/// best non-target cosine `best_other` (−1 without one), at the effective scale `s`.
fn target_row_terms(
    acc: &RowPartial,
    lse: f64,
    best_other: f32,
    params: &LossParams,
    s: f64,
) -> TargetTerms {
    let (m, sum) = (f64::from(acc.max_logit), f64::from(acc.sum_exp));
    let (zc, _) = target_margin(params, f64::from(acc.target_cos));
    let z = s * zc;
    let t = m - z;
    let (row_loss, p, complement) = if t > 10.0 {
        let p = (z - lse).exp();
        (t + sum.ln(), p, 1.0 - p)
    } else {
        let other = f64::from(acc.sum_exp_other) * t.exp();
        (other.ln_1p(), 1.0 / (1.0 + other), other / (1.0 + other))
    };
    let mut row_scale_grad = f64::from(acc.sum_exp_logit) / sum - zc;
    let mut row_loss = row_loss;
    let mut complement = complement;
    if params.objective == Objective::HardMargin {
        let gap = f64::from(best_other) - zc;
        let on = acc.best_other_class != NO_CLASS && gap > 0.0;
        row_loss = if on { s * gap } else { 0.0 };
        row_scale_grad = if on { gap } else { 0.0 };
        complement = if on { 1.0 } else { 0.0 };
    }
    TargetTerms {
        loss: row_loss,
        prob: p,
        complement,
        scale_grad: row_scale_grad,
        zc,
    }
}

/// Records row `i`'s loss, statistics and prediction (the label where the target wins:
/// a higher cosine, or the same with a lower class) and counts it.
fn record_target_row(
    out: &mut LossOutput,
    i: usize,
    acc: &RowPartial,
    y: u32,
    best_other: f32,
    terms: &TargetTerms,
) {
    out.row_loss[i] = terms.loss as f32;
    out.target_prob[i] = terms.prob as f32;
    out.target_cos[i] = acc.target_cos;
    out.achieved_margin[i] = acc.target_cos - best_other;
    let wins = acc.best_other_class == NO_CLASS
        || acc.target_cos > acc.best_other_cos
        || (acc.target_cos == acc.best_other_cos && y < acc.best_other_class);
    if wins {
        out.pred[i] = y;
    }
    out.valid_rows += 1;
    out.correct_rows += u32::from(out.pred[i] == y);
    out.margin_satisfied_rows += u32::from(terms.zc >= f64::from(best_other));
}

/// One shard's inputs: its class range, the batch, its rows of w and, optionally, the
/// rows of w it samples (class-centre sampling: Partial FC's second lever).
/// x and w may be stored as f32, `half::f16` or `half::bf16` ([`Element`]), each
/// independently; the shard's gradients come back in f32, times
/// [`LossParams::loss_scale`] (dL/dx shares are partial sums, to be added across shards
/// before any rounding; [`sharded_loss_typed`] rounds once).
#[derive(Debug, Clone, Copy)]
pub struct ShardInputs<'a, X: Element = f32, W: Element = f32> {
    /// The shard's classes.
    pub shard: ClassShard,
    /// D.
    pub dim: usize,
    /// x: B×D, the whole batch.
    pub features: &'a [X],
    /// The shard's rows of w: shard.count × D.
    pub classes: &'a [W],
    /// y: B global labels (IGNORE skips a row).
    pub labels: &'a [u32],
    /// With sampling, the strictly increasing rows of w the loss uses (0..count); it must
    /// keep every positive. The kernels read rows through it; nothing is copied, and the
    /// gradient lands on these rows only.
    pub sample: Option<&'a [u32]>,
    /// The batch's per-row margins (m2_i, m3_i), B pairs, as
    /// [`DeviceInputs::row_margins`](crate::DeviceInputs::row_margins): the same on every
    /// shard, and given to [`finish_rows_with_margins`] too.
    pub row_margins: Option<&'a [[f32; 2]]>,
    /// CurricularFace's per-row thresholds φ_i, B values, as
    /// [`DeviceInputs::hard_thresholds`](crate::DeviceInputs::hard_thresholds): the same
    /// on every shard.
    pub hard_thresholds: Option<&'a [f32]>,
}

/// A shard as its plan sees it: its classes (the sampled rows gathered, where sampled) as
/// classes 0.., and local labels: a class of the shard, or `classes` (one past the last)
/// for a row whose class is in another shard, or IGNORE.
struct LocalShard<'a, W: Element> {
    /// The shard's rows of w the loss uses: all of them, or a gathered copy of the sample.
    classes: std::borrow::Cow<'a, [W]>,
    labels: Vec<u32>,
    /// The global class of each local class.
    global: Vec<u32>,
}

impl<'a, W: Element> LocalShard<'a, W> {
    fn new<X: Element>(inputs: &ShardInputs<'a, X, W>) -> LocalShard<'a, W> {
        let (first, d) = (inputs.shard.first, inputs.dim);
        let rows: Vec<u32> = match inputs.sample {
            Some(sample) => sample.to_vec(),
            None => (0..inputs.shard.count as u32).collect(),
        };
        let classes = match inputs.sample {
            Some(sample) => std::borrow::Cow::Owned(
                sample
                    .iter()
                    .flat_map(|&r| &inputs.classes[r as usize * d..(r as usize + 1) * d])
                    .copied()
                    .collect(),
            ),
            None => std::borrow::Cow::Borrowed(inputs.classes),
        };
        let elsewhere = rows.len() as u32;
        let local = |y: u32| {
            (y as usize)
                .checked_sub(first)
                .filter(|&r| r < inputs.shard.count)
                .and_then(|r| rows.binary_search(&(r as u32)).ok())
                .map_or(elsewhere, |k| k as u32)
        };
        let labels = inputs
            .labels
            .iter()
            .map(|&y| if y == IGNORE { IGNORE } else { local(y) })
            .collect();
        let global = rows.iter().map(|&r| (first + r as usize) as u32).collect();
        LocalShard {
            classes,
            labels,
            global,
        }
    }

    /// The local class of a global one: its index here, or `classes` if elsewhere.
    fn local_class(&self, class: u32) -> u32 {
        self.global
            .binary_search(&class)
            .map_or(self.global.len() as u32, |k| k as u32)
    }
}

/// One shard's plan and device buffers. The context keeps those of the last few shards
/// it served, so that a step's forward and backward calls on each shard (and the next
/// step's) reuse them, and a backward finds its forward's dots where the plan keeps them.
#[derive(Debug)]
struct ShardBuffers {
    shard: ClassShard,
    sample: Option<Vec<u32>>,
    plan: Plan,
    features: wgpu::Buffer,
    classes: wgpu::Buffer,
    labels: wgpu::Buffer,
    /// The per-row margins of the last call that had them (B pairs).
    row_margins: wgpu::Buffer,
    /// Whether the current call has per-row margins.
    per_row: bool,
    /// CurricularFace's thresholds of the last call that had them (B values).
    hard_thresholds: wgpu::Buffer,
    /// Whether the current call has them.
    curricular: bool,
    row_stats: wgpu::Buffer,
    summary: wgpu::Buffer,
    /// The host slices (addresses and lengths of x, w and the labels) whose dots the last
    /// forward left in the workspace, until a backward consumes them.
    dots_of: Option<[usize; 6]>,
    /// The backward's outputs and their read-back buffer, made by the first backward.
    grads: Option<ShardGrads>,
}

/// A shard backward's dL/dx share (B×D), dL/dw (its classes × D), and the buffer both
/// and the summary are read back through.
#[derive(Debug)]
struct ShardGrads {
    features: DeviceBuffer,
    classes: DeviceBuffer,
    readback: DeviceBuffer,
}

impl ShardGrads {
    fn new(ctx: &Context, shape: Shape) -> ShardGrads {
        let (b, d, c) = (shape.batch as u64, shape.dim as u64, shape.classes as u64);
        let out = |label, size| {
            ctx.create_buffer(
                label,
                size,
                wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
            )
        };
        ShardGrads {
            features: out("grad_features", b * d * 4),
            classes: out("grad_classes", c * d * 4),
            readback: ctx.create_buffer(
                "gradients",
                (b + c) * d * 4 + std::mem::size_of::<Summary>() as u64,
                wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
            ),
        }
    }
}

/// Shards whose buffers a context keeps.
const CACHED_SHARDS: usize = 8;

/// Identifies a call's host inputs: the addresses and lengths of x, w and the labels.
fn inputs_id<X: Element, W: Element>(inputs: &ShardInputs<'_, X, W>) -> [usize; 6] {
    [
        inputs.features.as_ptr() as usize,
        inputs.features.len(),
        inputs.classes.as_ptr() as usize,
        inputs.classes.len(),
        inputs.labels.as_ptr() as usize,
        inputs.labels.len(),
    ]
}

impl ShardBuffers {
    fn new<X: Element, W: Element>(
        ctx: &Context,
        inputs: &ShardInputs<'_, X, W>,
        local: &LocalShard<'_, W>,
    ) -> Result<ShardBuffers> {
        let shape = Shape::new(local.labels.len(), inputs.dim, local.global.len())
            .with_elements(shard_elements::<X, W>());
        let plan = Plan::for_shard(ctx, shape)?;
        let init = |label, contents: &[u8]| {
            ctx.device
                .create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some(label),
                    contents,
                    // COPY_SRC: the backward reads the summary's flags back.
                    usage: wgpu::BufferUsages::STORAGE
                        | wgpu::BufferUsages::COPY_DST
                        | wgpu::BufferUsages::COPY_SRC,
                })
        };
        let rows = vec![0u8; shape.batch * std::mem::size_of::<RowStats>()];
        Ok(ShardBuffers {
            shard: inputs.shard,
            sample: inputs.sample.map(<[u32]>::to_vec),
            plan,
            features: init("features", bytemuck::cast_slice(inputs.features)),
            classes: init("classes", bytemuck::cast_slice(&local.classes)),
            labels: init("labels", bytemuck::cast_slice(&local.labels)),
            row_margins: init(
                "row_margins",
                &whole_words(bytemuck::cast_slice(
                    inputs.row_margins.unwrap_or(&vec![[0.0; 2]; shape.batch]),
                )),
            ),
            per_row: inputs.row_margins.is_some(),
            hard_thresholds: init(
                "hard_thresholds",
                bytemuck::cast_slice(
                    inputs
                        .hard_thresholds
                        .unwrap_or(&vec![0.0; shape.batch.max(1)]),
                ),
            ),
            curricular: inputs.hard_thresholds.is_some(),
            row_stats: init("row_stats", &rows),
            summary: init("summary", &[0u8; std::mem::size_of::<Summary>()]),
            dots_of: None,
            grads: None,
        })
    }

    /// Whether these buffers serve this shard, sample and input size as they are.
    fn serves<X: Element, W: Element>(&self, inputs: &ShardInputs<'_, X, W>) -> bool {
        let shape = self.plan.shape();
        shape.elements == shard_elements::<X, W>()
            && self.shard == inputs.shard
            && self.sample.as_deref() == inputs.sample
            && shape.batch == inputs.labels.len()
            && shape.batch * shape.dim == inputs.features.len()
    }

    /// Uploads a new call's inputs (unless `held`: the buffers already hold them, the
    /// slices of the forward whose dots a backward takes) and clears the outputs, leaving
    /// the buffers as [`ShardBuffers::new`] would make them.
    fn upload<X: Element, W: Element>(
        &mut self,
        ctx: &Context,
        inputs: &ShardInputs<'_, X, W>,
        local: &LocalShard<'_, W>,
        held: bool,
    ) {
        let x = inputs.features;
        let write = |buffer, bytes: &[u8]| ctx.queue.write_buffer(buffer, 0, bytes);
        // The margins are written every call: a backward takes its target's from them.
        self.per_row = inputs.row_margins.is_some();
        if let Some(margins) = inputs.row_margins {
            write(&self.row_margins, bytemuck::cast_slice(margins));
        }
        self.curricular = inputs.hard_thresholds.is_some();
        if let Some(thresholds) = inputs.hard_thresholds {
            write(&self.hard_thresholds, bytemuck::cast_slice(thresholds));
        }
        if !held {
            write(&self.features, &whole_words(bytemuck::cast_slice(x)));
            write(
                &self.classes,
                &whole_words(bytemuck::cast_slice(&local.classes)),
            );
            write(&self.labels, bytemuck::cast_slice(&local.labels));
        }
        let rows = vec![0u8; local.labels.len() * std::mem::size_of::<RowStats>()];
        write(&self.row_stats, &rows);
        write(&self.summary, &[0u8; std::mem::size_of::<Summary>()]);
    }

    fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        grads: Option<GradOutputs<'_>>,
        params: &LossParams,
        phase: Phase,
    ) -> Result<()> {
        let inputs = DeviceInputs {
            row_margins: self.per_row.then(|| BufferRegion::from(&self.row_margins)),
            hard_thresholds: self
                .curricular
                .then(|| BufferRegion::from(&self.hard_thresholds)),
            ..DeviceInputs::whole(&self.features, &self.classes, &self.labels)
        };
        let outputs = DeviceOutputs::whole(&self.row_stats, &self.summary, grads);
        self.plan.record_phase(
            ctx,
            encoder,
            &inputs,
            &outputs,
            params,
            Timestamps::Off,
            phase,
        )?;
        Ok(())
    }
}

fn check_shard<X, W>(
    shard: ClassShard,
    sample: Option<&[u32]>,
    shape: Shape,
    x: &[X],
    w: &[W],
    labels: &[u32],
) -> Result<()> {
    let end = shard.first.checked_add(shard.count);
    if shard.count == 0 || end.is_none_or(|end| end > shard.total) {
        return Err(Error::InvalidParameter {
            name: "shard",
            value: shard.first as f32,
            requirement: "a non-empty class range [first, first + count) within 0..total",
        });
    }
    shape.check_nonempty()?;
    check_batch(shape, x, None, labels, shard.total)?;
    let expected = shard.count.saturating_mul(shape.dim);
    if w.len() != expected {
        return Err(Error::LengthMismatch {
            input: "classes",
            expected,
            actual: w.len(),
        });
    }
    if let Some(rows) = sample {
        // The value reported is the first offending row (the length, for an empty list).
        let bad = if rows.is_empty() {
            Some((
                0,
                "a non-empty list of the shard's rows (this one has none)",
            ))
        } else if let Some(&r) = rows.iter().find(|&&r| r as usize >= shard.count) {
            Some((
                r,
                "a row of the shard: each sampled row must be below the shard's class count",
            ))
        } else {
            rows.windows(2).find(|p| p[0] >= p[1]).map(|p| {
                (
                    p[1],
                    "above the row before it: the sample must be strictly increasing, without repeats",
                )
            })
        };
        if let Some((value, requirement)) = bad {
            return Err(Error::InvalidParameter {
                name: "sample",
                value: value as f32,
                requirement,
            });
        }
        let kept = |y: u32| {
            let local = y as usize - shard.first;
            rows.binary_search(&(local as u32)).is_ok()
        };
        if let Some(&y) = labels.iter().find(|&&y| {
            y != IGNORE
                && (y as usize) >= shard.first
                && (y as usize) < shard.first + shard.count
                && !kept(y)
        }) {
            return Err(Error::InvalidParameter {
                name: "sample",
                value: y as f32,
                requirement:
                    "to keep every positive: each label in the shard must be among the sampled rows",
            });
        }
    }
    Ok(())
}

impl Context {
    /// Checks a shard's inputs and takes its plan and buffers (kept from an earlier call
    /// on this shard, or new ones) with the call's inputs uploaded; returns the shape (B,
    /// D, the shard's rows) and the shard as its plan sees it.
    fn shard_setup<'a, X: Element, W: Element>(
        &self,
        inputs: &ShardInputs<'a, X, W>,
        params: &LossParams,
        backward: bool,
    ) -> Result<(Shape, ShardBuffers, LocalShard<'a, W>)> {
        self.check_alive()?;
        params.validate()?;
        let ShardInputs {
            shard,
            dim,
            features: x,
            classes: w,
            labels,
            sample,
            row_margins,
            hard_thresholds,
        } = *inputs;
        let shape = Shape::new(labels.len(), dim, shard.count);
        check_shard(shard, sample, shape, x, w, labels)?;
        check_hard_thresholds(hard_thresholds, shape.batch, params)?;
        if let Some(margins) = row_margins {
            check_row_margins(margins, shape.batch, params)?;
            if params.multiplicative_margin != 1 {
                return Err(Error::InvalidParameter {
                    name: "multiplicative_margin",
                    value: params.multiplicative_margin as f32,
                    requirement:
                        "1 with per-row margins (additive margins of cos(θ + m2_i) − m3_i)",
                });
            }
        }
        let local = LocalShard::new(inputs);
        let cached = self.with_cache(Vec::<ShardBuffers>::new, |kept| {
            let at = kept.iter().position(|b| b.serves(inputs))?;
            Some(kept.remove(at))
        });
        let buffers = self.gpu_scoped(|| match cached {
            Some(mut buffers) => {
                // A backward on its forward's slices finds them uploaded (the dots it
                // reuses rest on the same assumption: the inputs are unchanged).
                let held = backward && buffers.dots_of == Some(inputs_id(inputs));
                buffers.upload(self, inputs, &local, held);
                Ok(buffers)
            }
            None => ShardBuffers::new(self, inputs, &local),
        })?;
        Ok((shape, buffers, local))
    }

    /// Keeps a shard call's buffers for later calls (the most recent CACHED_SHARDS
    /// shards); a call that failed drops them.
    fn shard_keep<T>(&self, buffers: ShardBuffers, result: Result<T>) -> Result<T> {
        if result.is_ok() {
            self.with_cache(Vec::<ShardBuffers>::new, |kept| {
                kept.insert(0, buffers);
                kept.truncate(CACHED_SHARDS);
            });
        }
        result
    }

    /// One shard's forward partials: for every row, the online-softmax state over the
    /// shard's classes `w` (shard.count × D), with global `labels`. The shard runs on the
    /// chunked plan's GEMMs, in blocks of its classes; where all its rows and classes fit
    /// the workspace budget at once, the dots stay for [`Context::shard_backward`] with
    /// the same inputs (the same slices), which then computes no dot again.
    pub fn shard_forward<X: Element, W: Element>(
        &self,
        inputs: &ShardInputs<'_, X, W>,
        params: &LossParams,
    ) -> Result<Vec<RowPartial>> {
        let (shape, mut buffers, local) = self.shard_setup(inputs, params, false)?;
        let result = self.shard_forward_on(&buffers, shape, params, &local);
        buffers.dots_of = (result.is_ok() && buffers.plan.keeps_dots()).then(|| inputs_id(inputs));
        self.shard_keep(buffers, result)
    }

    fn shard_forward_on<W: Element>(
        &self,
        buffers: &ShardBuffers,
        shape: Shape,
        params: &LossParams,
        local: &LocalShard<'_, W>,
    ) -> Result<Vec<RowPartial>> {
        // One partial per row, merged over the shard's blocks in block order.
        let bytes = (shape.batch * std::mem::size_of::<RowPartial>()) as u64;
        // The partials, then the non-finite-input flags word.
        let readback = self.create_buffer(
            "partials",
            bytes + 4,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        );
        let submission = self.gpu_scoped(|| {
            let mut encoder = self.device.create_command_encoder(&Default::default());
            buffers.record(self, &mut encoder, None, params, Phase::ShardForward)?;
            let missing = || Error::Gpu("internal: no shard workspace".into());
            let partials = buffers
                .plan
                .workspace_buffer(Binding::SplitPartials)
                .ok_or_else(missing)?;
            let flags = buffers
                .plan
                .workspace_buffer(Binding::InputFlags)
                .ok_or_else(missing)?;
            encoder.copy_buffer_to_buffer(partials, 0, &readback, 0, bytes);
            encoder.copy_buffer_to_buffer(flags, 0, &readback, bytes, 4);
            Ok(self.queue.submit([encoder.finish()]))
        })?;
        let raw = pollster::block_on(self.read_back(&readback, bytes + 4, submission))?;
        let split = bytes as usize;
        let flags: u32 = bytemuck::pod_read_unaligned(&raw[split..split + 4]);
        check_flags(flags, shape)?;
        let mut partials: Vec<RowPartial> = bytemuck::pod_collect_to_vec(&raw[..split]);
        // The best other class made global.
        for row in &mut partials {
            if let Some(&class) = local.global.get(row.best_other_class as usize) {
                row.best_other_class = class;
            }
        }
        Ok(partials)
    }

    /// One shard's backward pass from the global rows: the exact dL/dw of its classes
    /// (shard.count × D; with a sample, only the sampled rows are non-zero) and its share
    /// of dL/dx (B×D; the shares sum to dL/dx). Give it the inputs of the step's
    /// [`Context::shard_forward`], unchanged: where that forward's dots are still held
    /// (the same slices, by address and length), they are used again, not recomputed.
    pub fn shard_backward<X: Element, W: Element>(
        &self,
        inputs: &ShardInputs<'_, X, W>,
        params: &LossParams,
        rows: &GlobalRows,
    ) -> Result<Gradients> {
        let (shape, mut buffers, local) = self.shard_setup(inputs, params, true)?;
        let reuse_dots = buffers.dots_of == Some(inputs_id(inputs));
        // The backward overwrites the dots with G'.
        buffers.dots_of = None;
        if buffers.grads.is_none() {
            buffers.grads = Some(self.gpu_scoped(|| Ok(ShardGrads::new(self, shape)))?);
        }
        let result = self.shard_backward_on(&buffers, shape, params, rows, &local, reuse_dots);
        let result = result.map(|g| match inputs.sample {
            // The sampled rows' gradients land on their rows of the shard; the rest are 0.
            Some(sample) => {
                let d = shape.dim;
                let mut classes = vec![0.0; shape.classes * d];
                for (k, &r) in sample.iter().enumerate() {
                    classes[r as usize * d..(r as usize + 1) * d]
                        .copy_from_slice(&g.classes[k * d..(k + 1) * d]);
                }
                Gradients {
                    features: g.features,
                    classes,
                }
            }
            None => g,
        });
        self.shard_keep(buffers, result)
    }

    fn shard_backward_on<W: Element>(
        &self,
        buffers: &ShardBuffers,
        shape: Shape,
        params: &LossParams,
        rows: &GlobalRows,
        local: &LocalShard<'_, W>,
        reuse_dots: bool,
    ) -> Result<Gradients> {
        let b = shape.batch;
        if rows.softmax.len() != b || rows.output.target_cos.len() != b {
            return Err(Error::LengthMismatch {
                input: "rows",
                expected: b,
                actual: rows.softmax.len().min(rows.output.target_cos.len()),
            });
        }
        let (b, d, c) = (b as u64, shape.dim as u64, local.global.len() as u64);
        let ShardGrads {
            features: gx,
            classes: gw,
            readback,
        } = buffers
            .grads
            .as_ref()
            .ok_or_else(|| Error::Gpu("internal: no shard gradient buffers".into()))?;
        // The gradients, then the summary, whose overflow flag the backward sets where a
        // gradient is not finite (rows whose log-sum-exp does not fit these classes).
        let summary_bytes = std::mem::size_of::<Summary>() as u64;
        let submission = self.gpu_scoped(|| {
            self.upload_global_rows(buffers, rows, local)?;
            let mut encoder = self.device.create_command_encoder(&Default::default());
            let grads = GradOutputs {
                features: BufferRegion::from(&**gx),
                classes: BufferRegion::from(&**gw),
            };
            buffers.record(
                self,
                &mut encoder,
                Some(grads),
                params,
                Phase::ShardBackward { reuse_dots },
            )?;
            encoder.copy_buffer_to_buffer(gx, 0, readback, 0, b * d * 4);
            encoder.copy_buffer_to_buffer(gw, 0, readback, b * d * 4, c * d * 4);
            let at = (b + c) * d * 4;
            encoder.copy_buffer_to_buffer(&buffers.summary, 0, readback, at, summary_bytes);
            Ok(self.queue.submit([encoder.finish()]))
        })?;
        let grad_bytes = ((b + c) * d * 4) as usize;
        let raw = pollster::block_on(self.read_back(
            readback,
            grad_bytes as u64 + summary_bytes,
            submission,
        ))?;
        let summary: Summary = bytemuck::pod_read_unaligned(&raw[grad_bytes..]);
        check_flags(summary.flags, shape)?;
        let split = (b * d * 4) as usize;
        Ok(Gradients {
            features: bytemuck::pod_collect_to_vec(&raw[..split]),
            classes: bytemuck::pod_collect_to_vec(&raw[split..grad_bytes]),
        })
    }

    /// Writes the global rows for a shard's backward pass: each row's softmax in the
    /// shard's local classes, its target cosine (the target's gradient is taken at it)
    /// and the number of valid rows.
    fn upload_global_rows<W: Element>(
        &self,
        buffers: &ShardBuffers,
        rows: &GlobalRows,
        local: &LocalShard<'_, W>,
    ) -> Result<()> {
        let softmax: Vec<RowSoftmax> = rows
            .softmax
            .iter()
            .zip(&local.labels)
            .map(|(row, &label)| RowSoftmax {
                label,
                best_other_class: match row.best_other_class {
                    NO_CLASS => NO_CLASS,
                    class => local.local_class(class),
                },
                ..*row
            })
            .collect();
        let stats: Vec<RowStats> = rows
            .output
            .target_cos
            .iter()
            .map(|&target_cos| RowStats {
                target_cos,
                ..bytemuck::Zeroable::zeroed()
            })
            .collect();
        let workspace = buffers
            .plan
            .workspace_buffer(Binding::RowSoftmax)
            .ok_or_else(|| Error::Gpu("internal: no row softmax".into()))?;
        self.queue
            .write_buffer(workspace, 0, bytemuck::cast_slice(&softmax));
        self.queue
            .write_buffer(&buffers.row_stats, 0, bytemuck::cast_slice(&stats));
        let mut summary: Summary = bytemuck::Zeroable::zeroed();
        summary.valid_rows = rows.output.valid_rows;
        self.queue
            .write_buffer(&buffers.summary, 0, bytemuck::bytes_of(&summary));
        Ok(())
    }
}

/// The loss with the classes split across `contexts` (shard k on `contexts[k]`, in
/// order), merged on the host: forward partials per shard, a fixed-order merge, then each
/// shard's backward pass. dL/dx sums the shards' shares in shard order; dL/dw joins them.
/// There are min(contexts, C) shards; [`Error::InvalidParameter`] without any context.
/// For 16-bit storage, see [`sharded_loss_typed`].
pub fn sharded_loss(
    contexts: &[&Context],
    shape: Shape,
    x: &[f32],
    w: &[f32],
    labels: &[u32],
    params: &LossParams,
) -> Result<LossOutput> {
    sharded_loss_typed(contexts, shape, x, w, labels, params)
}

/// [`sharded_loss`] with x and w stored as `X` and `W` (f32, `half::f16` or
/// `half::bf16`) and the gradients returned as `GX` and `GW`, each summed (or joined) in
/// f32 and rounded once, to nearest as the kernels round
/// ([`ElementType::round_bits`](crate::ElementType::round_bits)), after the loss scale;
/// [`Error::GradientOutOfRange`] where a finite value rounds to ±inf.
pub fn sharded_loss_typed<X: Element, W: Element, GX: Element, GW: Element>(
    contexts: &[&Context],
    shape: Shape,
    x: &[X],
    w: &[W],
    labels: &[u32],
    params: &LossParams,
) -> Result<LossOutput<GX, GW>> {
    sharded_loss_inputs(contexts, &HostInputs::new(shape, x, w, labels), params)
}

/// [`sharded_loss_typed`] on [`HostInputs`], with their per-row margins where they have
/// them (the same on every shard, and in the host's merge).
pub fn sharded_loss_inputs<X: Element, W: Element, GX: Element, GW: Element>(
    contexts: &[&Context],
    host: &HostInputs<'_, X, W>,
    params: &LossParams,
) -> Result<LossOutput<GX, GW>> {
    if contexts.is_empty() {
        return Err(Error::InvalidParameter {
            name: "contexts",
            value: 0.0,
            requirement: "at least one Context: pass one per shard (the same context may repeat)",
        });
    }
    params.validate()?;
    host.check(params)?;
    let HostInputs {
        shape,
        features: x,
        classes: w,
        labels,
        row_margins,
        hard_thresholds,
    } = *host;
    let k = contexts.len().min(shape.classes).max(1);
    let shards = (0..k)
        .map(|s| ClassShard::split(shape.classes, k, s))
        .collect::<Result<Vec<ClassShard>>>()?;
    let part = |s: &ClassShard| &w[s.first * shape.dim..(s.first + s.count) * shape.dim];
    let mut partials = Vec::with_capacity(k);
    let inputs = |shard: &ClassShard| ShardInputs {
        shard: *shard,
        dim: shape.dim,
        features: x,
        classes: part(shard),
        labels,
        sample: None,
        row_margins,
        hard_thresholds,
    };
    // k ≤ contexts.len(): shard s runs on contexts[s].
    for (shard, ctx) in shards.iter().zip(contexts) {
        partials.push(ctx.shard_forward(&inputs(shard), params)?);
    }
    let merged = merge_shards(&partials)?;
    let rows = finish_rows_with_margins(&merged, (labels, row_margins), shape.classes, params)?;
    rows.check()?;
    let mut features = vec![0.0f32; shape.batch * shape.dim];
    let mut classes = Vec::with_capacity(w.len());
    for (shard, ctx) in shards.iter().zip(contexts) {
        let g = ctx.shard_backward(&inputs(shard), params, &rows)?;
        features
            .iter_mut()
            .zip(&g.features)
            .for_each(|(a, b)| *a += b);
        classes.extend(g.classes);
    }
    let grads = Gradients {
        features: rounded::<GX>("grad_features", &features)?,
        classes: rounded::<GW>("grad_classes", &classes)?,
    };
    Ok(rows.output.with_grads(Some(grads)))
}

/// The element types of a shard's plan: x and w as stored, its gradients in f32.
fn shard_elements<X: Element, W: Element>() -> ElementTypes {
    ElementTypes::inputs(X::TYPE, W::TYPE).with_f32_grads()
}

/// f32 gradients rounded to `T` as the kernels round them; a finite value that rounds
/// to ±inf is [`Error::GradientOutOfRange`] naming `tensor`.
fn rounded<T: Element>(tensor: &'static str, values: &[f32]) -> Result<Vec<T>> {
    values
        .iter()
        .map(|&v| {
            let stored = T::narrow(v);
            if v.is_finite() && stored.widen().is_infinite() {
                return Err(Error::GradientOutOfRange {
                    tensor,
                    element: T::TYPE,
                });
            }
            Ok(stored)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A forward leaves its dots for the backward with the same slices (where the plan
    /// keeps them), and that backward takes them: the reuse the sharding tests check for
    /// bitwise agreement really happens.
    #[test]
    fn a_backward_after_its_forward_reuses_the_dots() {
        let ctx = Context::new_default().expect("a context");
        let p = crate::Problem::random(Shape::new(37, 13, 35), 57);
        let params = LossParams::default();
        let inputs = ShardInputs {
            shard: ClassShard::split(35, 1, 0).expect("shard"),
            dim: 13,
            features: &p.features,
            classes: &p.classes,
            labels: &p.labels,
            sample: None,
            row_margins: None,
            hard_thresholds: None,
        };
        let held = |ctx: &Context| {
            ctx.with_cache(Vec::<ShardBuffers>::new, |kept| {
                kept.iter()
                    .any(|b| b.plan.keeps_dots() && b.dots_of == Some(inputs_id(&inputs)))
            })
        };
        let partials = ctx.shard_forward(&inputs, &params).expect("forward");
        assert!(held(&ctx), "the forward's dots are held for its backward");
        let rows = finish_rows(
            &merge_shards(&[partials]).expect("merge"),
            &p.labels,
            35,
            &params,
        )
        .expect("rows");
        ctx.shard_backward(&inputs, &params, &rows)
            .expect("backward");
        assert!(!held(&ctx), "the backward took them (G' overwrote them)");
    }
}
