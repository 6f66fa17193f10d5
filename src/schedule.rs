//! Per-row margin schedules: where each row's margins (m2_i, m3_i) come from, for
//! [`HostInputs::with_row_margins`](crate::HostInputs::with_row_margins) and
//! [`DeviceInputs::row_margins`](crate::DeviceInputs::row_margins). ElasticFace
//! (fdbtrs/ElasticFace, `utils/losses.py`; docs/loss-spec.md): each row draws its margin
//! from N(m, σ) at every step, with no clamp; Arc takes it as the angular margin, Cos as
//! the cosine margin; the "+" variants give the smallest margins to the rows whose target
//! cosine is largest. The draws come from a counter-based generator keyed by (seed,
//! step, row): the same seed and step give the same margins on every machine, whatever
//! ran before, and the reference takes the same margins as the kernels. AdaFace
//! (mk-minchul/AdaFace, `head.py`): margins from each row's feature norm against running
//! statistics of the batch's norms, an explicit state the caller holds.

use crate::api::Pass;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::{Element, ElementType, HostInputs, LossOutput, IGNORE};
use crate::params::{LossParams, MagFace, Reduction};
use crate::plan::Algorithm;
use crate::problem::SplitMix64;

/// Which margin of the combined form an ElasticFace draw sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElasticKind {
    /// The angular margin m2_i: cos(θ + m_i) (ElasticArcFace).
    Arc,
    /// The cosine margin m3_i: cos θ − m_i (ElasticCosFace).
    Cos,
}

/// ElasticFace's per-row margins: m_i ~ N(mean, std), drawn per row and step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElasticFace {
    /// Which margin the draw sets.
    pub kind: ElasticKind,
    /// m, the draws' mean.
    pub mean: f32,
    /// σ, the draws' standard deviation.
    pub std: f32,
    /// The "+" variant: the draws sorted, the smallest to the rows with the largest
    /// target cosines ([`ElasticFace::plus_margins`]).
    pub plus: bool,
    /// The generator's key, with the step and the row.
    pub seed: u64,
}

impl ElasticFace {
    /// ElasticArcFace's defaults: m = 0.5, σ = 0.05 (with s = 64, [`ElasticFace::params`]).
    pub fn arc() -> ElasticFace {
        ElasticFace {
            kind: ElasticKind::Arc,
            mean: 0.5,
            std: 0.05,
            plus: false,
            seed: 0,
        }
    }

    /// ElasticCosFace's defaults: m = 0.35, σ = 0.05.
    pub fn cos() -> ElasticFace {
        ElasticFace {
            kind: ElasticKind::Cos,
            mean: 0.35,
            ..ElasticFace::arc()
        }
    }

    /// ElasticArcFace+: m = 0.5, σ = 0.0175, sorted.
    pub fn arc_plus() -> ElasticFace {
        ElasticFace {
            std: 0.0175,
            plus: true,
            ..ElasticFace::arc()
        }
    }

    /// ElasticCosFace+: m = 0.35, σ = 0.02, sorted.
    pub fn cos_plus() -> ElasticFace {
        ElasticFace {
            std: 0.02,
            plus: true,
            ..ElasticFace::cos()
        }
    }

    /// The loss parameters the paper pairs with it: s = 64, and no margin of the
    /// parameters' own (the per-row margins replace them).
    pub fn params(&self) -> LossParams {
        LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: 0.0,
            ..LossParams::default()
        }
    }

    /// Draw `k` of step `step`: mean + std·z, z standard normal by Box–Muller from two
    /// uniforms hashed from (seed, step, k).
    pub fn draw(&self, step: u64, k: usize) -> f32 {
        let hash = |lane: u64| {
            [step, k as u64, lane]
                .iter()
                .fold(SplitMix64::new(self.seed).next_u64(), |h, &v| {
                    SplitMix64::new(h ^ v).next_u64()
                })
        };
        // u1 in (0, 1], u2 in [0, 1), from 53 random bits each.
        let unit = |bits: u64| (bits >> 11) as f64 / (1u64 << 53) as f64;
        let u1 = 1.0 - unit(hash(0));
        let u2 = unit(hash(1));
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (f64::from(self.mean) + f64::from(self.std) * z) as f32
    }

    /// The pair (m2_i, m3_i) of a margin.
    fn pair(&self, m: f32) -> [f32; 2] {
        match self.kind {
            ElasticKind::Arc => [m, 0.0],
            ElasticKind::Cos => [0.0, m],
        }
    }

    /// Each of `rows` rows' margins at step `step`: row i takes draw i (the plain
    /// variant; for "+", see [`ElasticFace::plus_margins`]).
    pub fn margins(&self, step: u64, rows: usize) -> Vec<[f32; 2]> {
        (0..rows).map(|i| self.pair(self.draw(step, i))).collect()
    }

    /// The "+" variant's margins at step `step`, from each row's label and target cosine
    /// (those of this step's forward, [`crate::Pass::Forward`]): one draw per labelled
    /// row (draws 0, 1, … in row order), sorted ascending and handed out in descending
    /// order of target cosine (ties in row order); ignored rows take the mean, which
    /// enters no loss.
    pub fn plus_margins(&self, step: u64, labels: &[u32], target_cos: &[f32]) -> Vec<[f32; 2]> {
        let labelled: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != IGNORE).collect();
        let mut draws: Vec<f32> = (0..labelled.len()).map(|k| self.draw(step, k)).collect();
        draws.sort_by(f32::total_cmp);
        let mut by_cos = labelled;
        by_cos.sort_by(|&a, &b| target_cos[b].total_cmp(&target_cos[a]));
        let mut margins = vec![self.pair(self.mean); labels.len()];
        for (&row, &m) in by_cos.iter().zip(&draws) {
            margins[row] = self.pair(m);
        }
        margins
    }
}

/// AdaFace's running statistics of the batch's clipped feature norms: the value the
/// caller holds between steps, saves with the model and restores
/// ([`AdaFaceState::to_bytes`], [`AdaFaceState::from_bytes`]). `head.py` keeps them as
/// f32 buffers; so does this.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaFaceState {
    /// μ, the running mean of the clipped norms.
    pub mean: f32,
    /// σ, the running (unbiased) standard deviation of the clipped norms.
    pub std: f32,
}

impl Default for AdaFaceState {
    /// `head.py`'s start: μ = 20, σ = 100.
    fn default() -> Self {
        AdaFaceState {
            mean: 20.0,
            std: 100.0,
        }
    }
}

impl AdaFaceState {
    /// μ then σ, little-endian f32.
    pub fn to_bytes(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.mean.to_le_bytes());
        out[4..].copy_from_slice(&self.std.to_le_bytes());
        out
    }

    /// The state [`AdaFaceState::to_bytes`] wrote.
    pub fn from_bytes(bytes: [u8; 8]) -> AdaFaceState {
        let f = |k: usize| f32::from_le_bytes([bytes[k], bytes[k + 1], bytes[k + 2], bytes[k + 3]]);
        AdaFaceState {
            mean: f(0),
            std: f(4),
        }
    }
}

/// AdaFace (mk-minchul/AdaFace `head.py`): each row's margin adapts to its feature norm,
/// a proxy of image quality. With â_i = clip(‖x_i‖, 0.001, 100) (detached),
/// ẑ_i = clip(h·(â_i − μ)/(σ + ε), −1, 1) from the running statistics, updated with this
/// batch first; row i's target is `s·(cos(clip(θ − m·ẑ_i, ε', π − ε')) − (m + m·ẑ_i))`,
/// per-row margins (m2_i, m3_i) = (−m·ẑ_i, m + m·ẑ_i) in the clipped angular form
/// ([`LossParams::angle_clip`], [`AdaFace::params`]). No gradient reaches the norm.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaFace {
    /// m, the margin (0.4).
    pub margin: f32,
    /// h, how far the norm moves the margin (0.333: the value its training scripts pass;
    /// its config file's default is 0, which makes the margin CosFace's m for every row).
    pub h: f32,
    /// α, the momentum of the running statistics (`t_alpha`, 0.01).
    pub momentum: f32,
    /// ε added to σ (1e-3; the angle's clip takes [`crate::ANGLE_CLIP`], the same 1e-3
    /// in `head.py`).
    pub eps: f32,
}

impl Default for AdaFace {
    /// The paper's and scripts' defaults: m = 0.4, h = 0.333, α = 0.01, ε = 1e-3.
    fn default() -> Self {
        AdaFace {
            margin: 0.4,
            h: 0.333,
            momentum: 0.01,
            eps: 1e-3,
        }
    }
}

impl AdaFace {
    /// Checks m, h, α and ε; the error says which and what it must be.
    pub fn validate(&self) -> Result<()> {
        let check = |name, value: f32, ok: bool, requirement| {
            if value.is_finite() && ok {
                Ok(())
            } else {
                Err(Error::InvalidParameter {
                    name,
                    value,
                    requirement,
                })
            }
        };
        check(
            "AdaFace::margin",
            self.margin,
            (0.0..=1.0).contains(&self.margin),
            "in [0, 1] (its cosine margin m + m·ẑ reaches 2m; AdaFace uses 0.4)",
        )?;
        check(
            "AdaFace::h",
            self.h,
            self.h >= 0.0,
            ">= 0 (AdaFace uses 0.333)",
        )?;
        check(
            "AdaFace::momentum",
            self.momentum,
            (0.0..=1.0).contains(&self.momentum),
            "in [0, 1] (AdaFace uses 0.01)",
        )?;
        check(
            "AdaFace::eps",
            self.eps,
            self.eps > 0.0,
            "> 0 (AdaFace uses 1e-3)",
        )
    }

    /// The loss parameters it pairs with: s = 64, the clipped angular form, and no margin
    /// of the parameters' own (the per-row margins replace them).
    pub fn params(&self) -> LossParams {
        LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: 0.0,
            angle_clip: true,
            ..LossParams::default()
        }
    }

    /// The per-row margins of a batch whose rows of `features` (`dim` values each, stored
    /// as any [`Element`]) have the norms ‖x_i‖; `state` is updated with the batch first,
    /// as `head.py` does. The statistics run over every row, labelled or not, in row
    /// order in f64, so they are bitwise repeatable. A batch of one row has no standard
    /// deviation: σ is then left as it was (`head.py` would store NaN).
    pub fn margins<X: Element>(
        &self,
        state: &mut AdaFaceState,
        features: &[X],
        dim: usize,
    ) -> Result<Vec<[f32; 2]>> {
        self.validate()?;
        let norms: Vec<f64> = feature_norms(features, dim)?
            .iter()
            .map(|a| a.clamp(0.001, 100.0))
            .collect();
        let n = norms.len() as f64;
        let alpha = f64::from(self.momentum);
        if !norms.is_empty() {
            let mean = norms.iter().sum::<f64>() / n;
            let mean_term = alpha * mean + (1.0 - alpha) * f64::from(state.mean);
            if norms.len() > 1 {
                let var = norms.iter().map(|a| (a - mean).powi(2)).sum::<f64>() / (n - 1.0);
                state.std = (alpha * var.sqrt() + (1.0 - alpha) * f64::from(state.std)) as f32;
            }
            state.mean = mean_term as f32;
        }
        let (mu, sigma) = (f64::from(state.mean), f64::from(state.std));
        let (m, h) = (f64::from(self.margin), f64::from(self.h));
        Ok(norms
            .iter()
            .map(|a| {
                let z = (h * (a - mu) / (sigma + f64::from(self.eps))).clamp(-1.0, 1.0);
                [(-m * z) as f32, (m + m * z) as f32]
            })
            .collect())
    }
}

/// The raw norms ‖x_i‖ (f64, in row order, from the values as stored) of the rows of
/// `features`, `dim` values each: what AdaFace's and MagFace's margins are made from, for
/// any other norm-based schedule a caller brings.
pub fn feature_norms<X: Element>(features: &[X], dim: usize) -> Result<Vec<f64>> {
    if dim == 0 {
        return Err(Error::InvalidParameter {
            name: "dim",
            value: 0.0,
            requirement: "at least 1",
        });
    }
    if !features.len().is_multiple_of(dim) {
        return Err(Error::LengthMismatch {
            input: "features (whole rows of dim values)",
            expected: features.len().next_multiple_of(dim),
            actual: features.len(),
        });
    }
    Ok(features
        .chunks_exact(dim)
        .map(|row| {
            row.iter()
                .map(|v| f64::from(v.widen()).powi(2))
                .sum::<f64>()
                .sqrt()
        })
        .collect())
}

/// MagFace's host steps around the kernels: [`MagFace::margins`] before (each row's
/// angular margin from its norm), [`MagFace::finish`] after (the regulariser and dL/dx's
/// radial part, from the per-row outputs). Between them any plan or class shards run
/// the loss with those per-row margins; [`MagFace::loss`] does all three on one context.
impl MagFace {
    /// Each row's margins (m(â_i), 0), â_i the norm of row i of `features` (`dim` values
    /// each) clamped to [l_a, u_a], computed in f64.
    pub fn margins<X: Element>(&self, features: &[X], dim: usize) -> Result<Vec<[f32; 2]>> {
        self.validate()?;
        Ok(feature_norms(features, dim)?
            .iter()
            .map(|&a| [self.margin(self.clamped_norm(a).0) as f32, 0.0])
            .collect())
    }

    /// Adds MagFace's regulariser to `out`'s per-row and reduced loss, and dL/dx's radial
    /// part weight·dL_i/da_i·x̂_i (times the loss scale) to its dL/dx, from the target
    /// cosines and probabilities of the loss `out` holds: the loss of `inputs` with
    /// [`MagFace::margins`] under `params` (softmax objective), on any plan or shards.
    /// Computed in f64 in row order and rounded once per value, so dL/dx must be f32
    /// (a 16-bit one would be rounded twice): `Error::InvalidParameter` otherwise.
    pub fn finish<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        inputs: &HostInputs<'_, X, W>,
        params: &LossParams,
        out: &mut LossOutput<GX, GW>,
    ) -> Result<()> {
        self.validate()?;
        self.check_params(false, params)?;
        if GX::TYPE != ElementType::F32 {
            return Err(Error::InvalidParameter {
                name: "grad_features (element type; value: its bits)",
                value: 16.0,
                requirement: "f32 with MagFace, whose radial part is added on the host",
            });
        }
        let shape = inputs.shape;
        let d = shape.dim;
        let norms = feature_norms(inputs.features, d)?;
        let valid = out.valid_rows as usize;
        let weight = match params.reduction {
            Reduction::Mean if valid == 0 => 0.0,
            Reduction::Mean => 1.0 / valid as f64,
            Reduction::Sum | Reduction::None => 1.0,
        };
        let s = f64::from(params.effective_scale());
        let loss_scale = f64::from(params.loss_scale);
        let mut regularizer = 0.0;
        for i in (0..shape.batch).filter(|&i| (inputs.labels[i] as usize) < shape.classes) {
            let (c, p) = (f64::from(out.target_cos[i]), f64::from(out.target_prob[i]));
            let (reg, da) = self.row_terms(params, s, norms[i], c, p);
            out.row_loss[i] = (f64::from(out.row_loss[i]) + reg) as f32;
            regularizer += reg;
            // da is 0 outside the clamp, a zero row's included (its x̂ is 0).
            if let (Some(g), true) = (out.grads.as_mut(), da != 0.0) {
                let factor = weight * da * loss_scale / norms[i];
                for (gx, x) in g.features[i * d..(i + 1) * d]
                    .iter_mut()
                    .zip(&inputs.features[i * d..(i + 1) * d])
                {
                    *gx =
                        GX::narrow((f64::from(gx.widen()) + factor * f64::from(x.widen())) as f32);
                }
            }
        }
        out.loss = (f64::from(out.loss) + weight * regularizer) as f32;
        Ok(())
    }

    /// MagFace on one context: [`MagFace::margins`], the loss with them on `algorithm`
    /// (or the context's choice), then [`MagFace::finish`].
    pub fn loss(
        &self,
        ctx: &Context,
        inputs: &HostInputs<'_>,
        params: &LossParams,
        pass: Pass,
        algorithm: Option<Algorithm>,
    ) -> Result<LossOutput> {
        self.check_params(inputs.row_margins.is_some(), params)?;
        let margins = self.margins(inputs.features, inputs.shape.dim)?;
        let with = inputs.with_row_margins(&margins);
        let mut out = ctx.loss_inputs(&with, params, pass, algorithm)?;
        self.finish(inputs, params, &mut out)?;
        Ok(out)
    }
}

/// CurricularFace's running value t, the state the caller holds between steps, saves
/// and restores ([`CurricularState::to_bytes`], [`CurricularState::from_bytes`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct CurricularState {
    /// t, the running mean of the target cosines (starts at 0).
    pub t: f32,
}

impl CurricularState {
    /// t, little-endian f32.
    pub fn to_bytes(&self) -> [u8; 4] {
        self.t.to_le_bytes()
    }

    /// The state [`CurricularState::to_bytes`] wrote.
    pub fn from_bytes(bytes: [u8; 4]) -> CurricularState {
        CurricularState {
            t: f32::from_le_bytes(bytes),
        }
    }
}

/// CurricularFace (HuangYG123/CurricularFace `head/metrics.py`): ArcFace's target
/// φ = cos(θ_y + m) (with its fallback c_y − m·sin m past θ_y + m = π), and the hard
/// non-targets, c_j > φ, reweighted to c_j·(t + c_j) (slope t + 2c_j), t a detached
/// running mean of the target cosines, updated with the batch before use:
/// t ← α·mean_i c_iy + (1 − α)·t. The official code's α = 0.01 (its paper writes the
/// momentum as 0.99 the other way round; Tencent's TFace uses 0.1).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CurricularFace {
    /// m, the angular margin (0.5).
    pub margin: f32,
    /// α, the weight of the batch's mean in t's update (0.01).
    pub momentum: f32,
}

impl Default for CurricularFace {
    /// The official code's defaults: m = 0.5, α = 0.01 (with s = 64).
    fn default() -> Self {
        CurricularFace {
            margin: 0.5,
            momentum: 0.01,
        }
    }
}

/// What one CurricularFace step gives the loss: its parameters (with t) and each row's
/// threshold φ_i ([`HostInputs::with_hard_thresholds`]).
#[derive(Debug, Clone, PartialEq)]
pub struct CurricularStep {
    /// s = 64, ArcFace's margin m and this step's t.
    pub params: LossParams,
    /// φ_i = cos(θ_iy + m) of row i (2, above every cosine, for an ignored row).
    pub hard_thresholds: Vec<f32>,
}

impl CurricularFace {
    /// Checks m and α; the error says which and what it must be.
    pub fn validate(&self) -> Result<()> {
        if !(self.margin.is_finite() && (0.0..std::f32::consts::PI).contains(&self.margin)) {
            return Err(Error::InvalidParameter {
                name: "CurricularFace::margin",
                value: self.margin,
                requirement: "an angular margin in [0, π) (the official code uses 0.5)",
            });
        }
        if !(self.momentum.is_finite() && (0.0..=1.0).contains(&self.momentum)) {
            return Err(Error::InvalidParameter {
                name: "CurricularFace::momentum",
                value: self.momentum,
                requirement: "in [0, 1] (the official code uses 0.01)",
            });
        }
        Ok(())
    }

    /// One step's parameters and thresholds for `inputs`: their target cosines c_iy in
    /// f64 (in row order, so bitwise repeatable, and the global batch's under
    /// [`crate::shard::sharded_loss_inputs`]), then [`CurricularFace::step_from_target_cosines`].
    /// Per-row margins in `inputs` are refused.
    pub fn step<X: Element, W: Element>(
        &self,
        state: &mut CurricularState,
        inputs: &HostInputs<'_, X, W>,
    ) -> Result<CurricularStep> {
        if inputs.row_margins.is_some() {
            return Err(Error::InvalidParameter {
                name: "row_margins",
                value: 0.0,
                requirement: "none with CurricularFace: its margin is one angular margin m",
            });
        }
        crate::io::check_slices(inputs.shape, inputs.features, inputs.classes, inputs.labels)?;
        let d = inputs.shape.dim;
        let x = feature_norms(inputs.features, d)?;
        let w = feature_norms(inputs.classes, d)?;
        let floor = |n: f64| n.max(crate::reference::EPS);
        let cosines: Vec<Option<f64>> = (0..inputs.shape.batch)
            .map(|i| {
                let y = inputs.labels[i] as usize;
                (y < inputs.shape.classes).then(|| {
                    let dot: f64 = (0..d)
                        .map(|k| {
                            f64::from(inputs.features[i * d + k].widen())
                                * f64::from(inputs.classes[y * d + k].widen())
                        })
                        .sum();
                    dot / (floor(x[i]) * floor(w[y]))
                })
            })
            .collect();
        self.step_from_target_cosines(state, &cosines)
    }

    /// One step from each row's target cosine c_iy (`None` for an ignored row), for a
    /// caller that holds only a shard of the classes and gathers them (TFace all-reduces
    /// them): `state.t` updated with their mean, in row order (left as it was without a
    /// labelled row), then φ_i = cos(θ_iy + m) ([`LossParams::curricular_threshold`]),
    /// and 2 (above every cosine) for an ignored row. The state is left as it was where
    /// the result is an error.
    pub fn step_from_target_cosines(
        &self,
        state: &mut CurricularState,
        target_cos: &[Option<f64>],
    ) -> Result<CurricularStep> {
        self.validate()?;
        let labelled: Vec<f64> = target_cos.iter().flatten().copied().collect();
        let mut t = state.t;
        if !labelled.is_empty() {
            let mean = labelled.iter().sum::<f64>() / labelled.len() as f64;
            let alpha = f64::from(self.momentum);
            t = (alpha * mean + (1.0 - alpha) * f64::from(state.t)) as f32;
        }
        let params = LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: self.margin,
            curricular: Some(t),
            ..LossParams::default()
        };
        params.validate()?;
        state.t = t;
        let hard_thresholds = target_cos
            .iter()
            .map(|c| c.map_or(2.0, |c| params.curricular_threshold(c) as f32))
            .collect();
        Ok(CurricularStep {
            params,
            hard_thresholds,
        })
    }
}

impl CurricularStep {
    /// `params` (a caller's own scale, reduction, …) with this step's margin and t: the
    /// angular margin m, no cosine margin, and `curricular`.
    pub fn apply(&self, params: LossParams) -> LossParams {
        LossParams {
            margin: 0.0,
            angular_margin: self.params.angular_margin,
            curricular: self.params.curricular,
            ..params
        }
    }
}
