//! The f64 CPU twin of every kernel family: norms, forward (LSE, loss, statistics) and
//! backward (G, projections, dL/ds). Plain loops, no wgpu; use it to check an adapter.

use crate::error::Result;
use crate::io::Shape;
use crate::io::{ElementType, ElementTypes, HostInputs, LossOutput, IGNORE};
use crate::params::{LossParams, MagFace, Objective, Reduction, TargetGradient};
use crate::problem::Problem;

/// ε of the normalisation, as `torch.nn.functional.normalize`.
pub const EPS: f64 = 1e-12;

/// What the reference computes, in f64.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceOutput {
    /// The reduced loss.
    pub loss: f64,
    /// L_i per row (0 for ignored rows).
    pub row_loss: Vec<f64>,
    /// dL/dx, B×D.
    pub grad_features: Vec<f64>,
    /// dL/dw, C×D.
    pub grad_classes: Vec<f64>,
    /// dL/ds (0 when s < s_min).
    pub grad_scale: f64,
    /// max_i inv_norm_i · Σ_j |G_ij|: the size of the terms that dL/dx_i sums (|ŵ_jk| ≤ 1).
    /// A float sum is accurate relative to the sum of its terms' magnitudes, not to its
    /// result, which can cancel to zero (with D = 1 every projected gradient does).
    pub grad_features_magnitude: f64,
    /// max_j inv_norm_j · Σ_i |G_ij|, the same for dL/dw.
    pub grad_classes_magnitude: f64,
    /// How far dL/dx may move when the f32 target cosine's own rounding (4·γ_{D+4})
    /// shifts a steep dψ/dc (an exact angular margin with sin θ < 0.05, near θ = 0 or π):
    /// errors up to it are excused. 0 elsewhere.
    pub grad_features_slack: f64,
    /// The same for dL/dw.
    pub grad_classes_slack: f64,
    /// The largest |dψ/dc| over the rows (at least 1): a margin multiplies the cosines'
    /// rounding by it, so the loss's relative bound scales with it.
    pub max_target_slope: f64,
    /// Absolute error of p_iy excused where ψ is steep: p(1 − p)·s·Δψ ≤ s·Δψ/4.
    pub target_prob_slack: f64,
    /// Absolute error of dL/ds excused for the same reasons as `loss_slack`.
    pub grad_scale_slack: f64,
    /// Absolute error of the reduced loss excused where the f32 cosines' own rounding
    /// moves it by more than the relative bound allows: a steep ψ (an angular margin
    /// near θ = 0), and the hard objective's hinge near zero. 0 elsewhere.
    pub loss_slack: f64,
    /// argmax_j c_ij, lowest index on ties.
    pub pred: Vec<u32>,
    /// c_iy (0 for ignored rows).
    pub target_cos: Vec<f64>,
    /// max_{j≠y} c_ij (over all j for ignored rows; -1 when C = 1).
    pub best_other_cos: Vec<f64>,
    /// c_iy − max_{j≠y} c_ij (0 for ignored rows).
    pub achieved_margin: Vec<f64>,
    /// p_iy, the margin softmax's probability of the label (0 for ignored rows).
    pub target_prob: Vec<f64>,
    /// Mean achieved margin over rows not ignored.
    pub mean_achieved_margin: f64,
    /// Rows not ignored with ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: usize,
    /// Per row, the best cosine minus the second best: below the cosine error bound a
    /// GPU may rightly pick another class than `pred` (infinite when C = 1).
    pub pred_gap: Vec<f64>,
    /// N, rows not ignored.
    pub valid_rows: usize,
    /// Rows not ignored whose prediction is the label.
    pub correct_rows: usize,
}

/// Inverse norms 1/max(‖row‖, ε) of the `rows` rows of length `dim` in `v`.
pub fn inv_norms(v: &[f64], rows: usize, dim: usize) -> Vec<f64> {
    (0..rows)
        .map(|r| {
            let norm = v[r * dim..(r + 1) * dim]
                .iter()
                .map(|a| a * a)
                .sum::<f64>()
                .sqrt();
            1.0 / norm.max(EPS)
        })
        .collect()
}

/// The loss on f32 inputs, computed in f64. Checks the inputs like the GPU path does.
pub fn loss(
    shape: Shape,
    features: &[f32],
    classes: &[f32],
    labels: &[u32],
    params: &LossParams,
) -> Result<ReferenceOutput> {
    loss_inputs(&HostInputs::new(shape, features, classes, labels), params)
}

/// [`loss`] on [`HostInputs`], with their per-row margins where they have them.
pub fn loss_inputs(inputs: &HostInputs<'_>, params: &LossParams) -> Result<ReferenceOutput> {
    params.validate()?;
    inputs.check(params)?;
    if inputs.row_margins.is_some() && params.multiplicative_margin != 1 {
        return Err(crate::Error::InvalidParameter {
            name: "multiplicative_margin",
            value: params.multiplicative_margin as f32,
            requirement: "1 with per-row margins: they are additive margins (m2_i, m3_i) of \
                          the combined form cos(θ + m2_i) − m3_i",
        });
    }
    let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    let margins = inputs.row_margins.map(widen_margins);
    let rows = RowInputs {
        labels: inputs.labels,
        margins: margins.as_deref(),
        hard_thresholds: inputs.hard_thresholds,
    };
    Ok(loss_f64_rows(
        inputs.shape,
        (&widen(inputs.features), &widen(inputs.classes)),
        rows,
        params,
        f64::from(params.scale),
    ))
}

/// Per-row margins in f64.
fn widen_margins(m: &[[f32; 2]]) -> Vec<[f64; 2]> {
    m.iter()
        .map(|&[a, b]| [f64::from(a), f64::from(b)])
        .collect()
}

/// What the reference takes per row: the labels, the margins (f64, so that MagFace's
/// move with x) and CurricularFace's thresholds, where given.
#[derive(Clone, Copy)]
struct RowInputs<'a> {
    labels: &'a [u32],
    margins: Option<&'a [[f64; 2]]>,
    hard_thresholds: Option<&'a [f32]>,
}

/// [`loss`] on a [`Problem`].
pub fn loss_on(problem: &Problem, params: &LossParams) -> Result<ReferenceOutput> {
    let p = problem;
    loss(p.shape, &p.features, &p.classes, &p.labels, params)
}

/// (T_m(c), U_{m−1}(c)) = (cos mθ, sin mθ / sin θ) for c = cos θ, m ≥ 1.
fn chebyshev(m: u32, c: f64) -> (f64, f64) {
    let (mut t_prev, mut t, mut u_prev, mut u) = (1.0, c, 0.0, 1.0);
    for _ in 1..m {
        (t_prev, t) = (t, 2.0 * c * t - t_prev);
        (u_prev, u) = (u, 2.0 * c * u - u_prev);
    }
    (t, u)
}

/// The target's margin function and its slope, (ψ(c), dψ/dc), as the kernels define them
/// (see [`LossParams`]): ψ(c) = cos(m1·θ + m2) − m3 with the monotonic fallbacks, the slope
/// with sin θ clamped to [`crate::SIN_GUARD`] for an angular margin, or 1 when straight-through.
pub fn target_margin(params: &LossParams, c: f64) -> (f64, f64) {
    target_margin_at(params, additive_margins(params), c)
}

/// The parameters' (m2, m3) in f64.
fn additive_margins(params: &LossParams) -> [f64; 2] {
    [f64::from(params.angular_margin), f64::from(params.margin)]
}

/// [`target_margin`] with the additive margins (m2, m3) given in f64 (a row's own).
fn target_margin_at(params: &LossParams, [m2, m3]: [f64; 2], c: f64) -> (f64, f64) {
    let m1 = params.multiplicative_margin;
    if params.easy_margin && c <= 0.0 {
        return (c, 1.0);
    }
    if params.angle_clip {
        let (psi, slope) = clipped_angle_margin(c, m2);
        return match params.target_gradient {
            TargetGradient::Exact => (psi - m3, slope),
            TargetGradient::StraightThrough => (psi - m3, 1.0),
        };
    }
    if m1 == 1 && m2 == 0.0 {
        return (c - m3, 1.0);
    }
    let cc = c.clamp(-1.0, 1.0);
    let (psi, slope) = if m2 > 0.0 {
        let sin_t = ((1.0 - cc) * (1.0 + cc)).max(0.0).sqrt();
        if cc > -m2.cos() {
            let guard = f64::from(crate::SIN_GUARD);
            (
                cc * m2.cos() - sin_t * m2.sin(),
                m2.cos() + cc * m2.sin() / sin_t.max(guard),
            )
        } else {
            (cc - m2 * m2.sin(), 1.0)
        }
    } else {
        let m = f64::from(m1);
        let k = (m * cc.acos() / std::f64::consts::PI).floor().min(m - 1.0);
        let sign = if (k as u32) % 2 == 1 { -1.0 } else { 1.0 };
        let (t, u) = chebyshev(m1, cc);
        (sign * t - 2.0 * k, sign * m * u)
    };
    let slope = match params.target_gradient {
        TargetGradient::Exact => slope,
        TargetGradient::StraightThrough => 1.0,
    };
    (psi - m3, slope)
}

/// AdaFace's (cos θ', dcos θ'/dc) with θ' = clip(acos(c') + m2, ε, π − ε),
/// c' = clamp(c, −1 + ε, 1 − ε), ε = [`crate::ANGLE_CLIP`]; the slope is 0 where the
/// clip or the clamp binds.
fn clipped_angle_margin(c: f64, m2: f64) -> (f64, f64) {
    let eps = f64::from(crate::ANGLE_CLIP);
    let cc = c.clamp(-1.0 + eps, 1.0 - eps);
    let angle = cc.acos() + m2;
    if angle < eps {
        return (eps.cos(), 0.0);
    }
    if angle > std::f64::consts::PI - eps {
        return (-eps.cos(), 0.0);
    }
    let slope = if cc == c {
        angle.sin() / cc.acos().sin()
    } else {
        0.0
    };
    (angle.cos(), slope)
}

/// The loss and its gradients in f64 on f64 inputs, with the scale given in f64 (for
/// finite differences in s); the other parameters come from `params`, each row's
/// angular and cosine margins from its per-row margins where given
/// ([`LossParams::with_row_margin`]). Labels that are not classes count as ignored.
/// Lengths must match `shape`.
pub fn loss_f64(
    shape: Shape,
    x: &[f64],
    w: &[f64],
    (labels, row_margins): (&[u32], Option<&[[f32; 2]]>),
    params: &LossParams,
    scale: f64,
) -> ReferenceOutput {
    let wide = row_margins.map(widen_margins);
    let rows = RowInputs {
        labels,
        margins: wide.as_deref(),
        hard_thresholds: None,
    };
    loss_f64_rows(shape, (x, w), rows, params, scale)
}

/// MagFace ([`MagFace`]) on [`HostInputs`] (without per-row margins: MagFace's come
/// from the norms), under the softmax objective.
pub fn magface_loss(
    inputs: &HostInputs<'_>,
    magface: &MagFace,
    params: &LossParams,
) -> Result<ReferenceOutput> {
    params.validate()?;
    magface.validate()?;
    inputs.check(params)?;
    magface.check_params(inputs.row_margins.is_some(), params)?;
    let widen = |v: &[f32]| v.iter().map(|&a| f64::from(a)).collect::<Vec<f64>>();
    Ok(magface_loss_f64(
        inputs.shape,
        (&widen(inputs.features), &widen(inputs.classes)),
        inputs.labels,
        magface,
        params,
        f64::from(params.scale),
    ))
}

/// MagFace's loss and gradients in f64: each row's angular margin m(â_i) from its norm
/// (moving with x), the regulariser λ_g·g(â_i) added to L_i, and dL/dx_i's radial part
/// weight·dL_i/da_i·x̂_i ([`MagFace::row_terms`]).
pub fn magface_loss_f64(
    shape: Shape,
    (x, w): (&[f64], &[f64]),
    labels: &[u32],
    magface: &MagFace,
    params: &LossParams,
    scale: f64,
) -> ReferenceOutput {
    let (b, d) = (shape.batch, shape.dim);
    let norms: Vec<f64> = inv_norms(x, b, d).iter().map(|inv| 1.0 / inv).collect();
    let margins: Vec<[f64; 2]> = norms
        .iter()
        .map(|&a| [magface.margin(magface.clamped_norm(a).0), 0.0])
        .collect();
    let rows = RowInputs {
        labels,
        margins: Some(&margins),
        hard_thresholds: None,
    };
    let mut out = loss_f64_rows(shape, (x, w), rows, params, scale);
    let weight = reduction_weight(params.reduction, out.valid_rows);
    let s = scale.max(f64::from(params.scale_min));
    let mut regularizer = 0.0;
    for i in (0..b).filter(|&i| labels[i] != IGNORE && (labels[i] as usize) < shape.classes) {
        let (reg, da) =
            magface.row_terms(params, s, norms[i], out.target_cos[i], out.target_prob[i]);
        out.row_loss[i] += reg;
        regularizer += reg;
        for k in 0..d {
            out.grad_features[i * d + k] += weight * da * x[i * d + k] / norms[i];
        }
    }
    out.loss += weight * regularizer;
    out
}

/// [`loss_f64`] on [`RowInputs`]. With CurricularFace and no thresholds given, each row's
/// is [`LossParams::curricular_threshold`] of its own target cosine.
fn loss_f64_rows(
    shape: Shape,
    (x, w): (&[f64], &[f64]),
    rows: RowInputs<'_>,
    params: &LossParams,
    scale: f64,
) -> ReferenceOutput {
    let RowInputs {
        labels,
        margins: row_margins,
        hard_thresholds,
    } = rows;
    let Shape {
        batch: b,
        dim: d,
        classes: c,
        ..
    } = shape;
    let inv_x = inv_norms(x, b, d);
    let inv_w = inv_norms(w, c, d);
    let xh: Vec<f64> = (0..b * d).map(|e| x[e] * inv_x[e / d]).collect();
    let wh: Vec<f64> = (0..c * d).map(|e| w[e] * inv_w[e / d]).collect();
    let label = |i: usize| {
        let y = labels[i];
        (y != IGNORE && (y as usize) < c).then_some(y as usize)
    };
    let valid_rows = (0..b).filter(|&i| label(i).is_some()).count();
    let mut batch = Batch {
        params,
        row_margins,
        hard_thresholds,
        xh: &xh,
        wh: &wh,
        inv_x: &inv_x,
        inv_w: &inv_w,
        d,
        s: scale.max(f64::from(params.scale_min)),
        norm: reduction_weight(params.reduction, valid_rows),
        gamma: 4.0 * cosine_bound(d),
        acc: Accumulators {
            gxh: vec![0.0; b * d],
            gwh: vec![0.0; c * d],
            row_terms: vec![0.0; b],
            class_terms: vec![0.0; c],
            class_slack: vec![0.0; c],
        },
    };
    let mut out = zeroed_output(b, d, c, valid_rows);
    let mut cos = vec![0.0; c];
    for i in 0..b {
        batch.row_cosines(i, &mut cos);
        let y = label(i);
        let best_other = record_prediction(&mut out, i, &cos, y);
        let Some(y) = y else { continue };
        let target = batch.target(&mut out, i, &cos, y, best_other);
        let softmax = batch.target_softmax(&mut out, &target);
        if params.objective == Objective::HardMargin {
            batch.add_hard_margin_row(&mut out, &target);
        } else {
            batch.add_softmax_row(&mut out, &target, &softmax);
        }
    }
    batch.finish(out)
}

/// The weight of each row's loss in the reduced loss: 1/N for the mean (0 without a
/// valid row), else 1.
fn reduction_weight(reduction: Reduction, valid_rows: usize) -> f64 {
    match reduction {
        Reduction::Mean if valid_rows == 0 => 0.0,
        Reduction::Mean => 1.0 / valid_rows as f64,
        Reduction::Sum | Reduction::None => 1.0,
    }
}

/// The output before any row: zero sums, no prediction, no best other class.
fn zeroed_output(b: usize, d: usize, c: usize, valid_rows: usize) -> ReferenceOutput {
    ReferenceOutput {
        loss: 0.0,
        row_loss: vec![0.0; b],
        grad_features: vec![0.0; b * d],
        grad_classes: vec![0.0; c * d],
        grad_scale: 0.0,
        grad_features_magnitude: 0.0,
        grad_classes_magnitude: 0.0,
        grad_features_slack: 0.0,
        grad_classes_slack: 0.0,
        loss_slack: 0.0,
        grad_scale_slack: 0.0,
        max_target_slope: 1.0,
        target_prob_slack: 0.0,
        pred: vec![0; b],
        target_cos: vec![0.0; b],
        best_other_cos: vec![-1.0; b],
        achieved_margin: vec![0.0; b],
        target_prob: vec![0.0; b],
        mean_achieved_margin: 0.0,
        margin_satisfied_rows: 0,
        pred_gap: vec![f64::INFINITY; b],
        valid_rows,
        correct_rows: 0,
    }
}

/// Records row `i`'s prediction, its gap to the runner-up and its best non-target
/// cosine; returns the first non-target class with the largest cosine (−0 and +0 tie,
/// as on the GPU).
fn record_prediction(
    out: &mut ReferenceOutput,
    i: usize,
    cos: &[f64],
    y: Option<usize>,
) -> Option<usize> {
    let c = cos.len();
    let mut pred = 0;
    for j in 1..c {
        if cos[j] > cos[pred] {
            pred = j;
        }
    }
    out.pred[i] = pred as u32;
    out.pred_gap[i] = (0..c)
        .filter(|&j| j != pred)
        .map(|j| cos[pred] - cos[j])
        .fold(f64::INFINITY, f64::min);
    let mut best_other: Option<usize> = None;
    for j in (0..c).filter(|&j| Some(j) != y) {
        if best_other.is_none_or(|b| cos[j] > cos[b]) {
            best_other = Some(j);
        }
    }
    out.best_other_cos[i] = best_other.map_or(-1.0, |j| cos[j]);
    best_other
}

/// What every row of [`loss_f64`] reads: the unit rows, their inverse norms, the
/// effective scale, the reduction's weight and the cosine error bound γ; and the sums
/// its gradient terms add to.
struct Batch<'a> {
    params: &'a LossParams,
    /// Per-row margins, where the call has them.
    row_margins: Option<&'a [[f64; 2]]>,
    /// CurricularFace's thresholds φ_i, where given.
    hard_thresholds: Option<&'a [f32]>,
    xh: &'a [f64],
    wh: &'a [f64],
    inv_x: &'a [f64],
    inv_w: &'a [f64],
    d: usize,
    s: f64,
    norm: f64,
    gamma: f64,
    acc: Accumulators,
}

/// The sums over the rows: G·ŵ and Gᵀ·x̂, Σ_j |G_ij| per row and Σ_i |G_ij| per class,
/// and the slope-rounding slack per class.
struct Accumulators {
    gxh: Vec<f64>,
    gwh: Vec<f64>,
    row_terms: Vec<f64>,
    class_terms: Vec<f64>,
    class_slack: Vec<f64>,
}

/// A labelled row `i` with cosines `cos`: its target ψ(c_iy) and dψ/dc, and how far a
/// cosine rounding error of γ moves them where ψ is steep.
struct Target<'c> {
    i: usize,
    cos: &'c [f64],
    y: usize,
    best_other: Option<usize>,
    psi: f64,
    slope: f64,
    slope_spread: f64,
    psi_spread: f64,
    /// The inter-class filter's threshold, if any.
    filter: Option<f32>,
    /// CurricularFace's t, if on.
    curricular: Option<f64>,
    /// CurricularFace's φ_i, if on.
    hard_threshold: Option<f64>,
}

impl Target<'_> {
    /// zc_ij = z_ij / s: ψ(c_iy) for the target; for the others 0 where the inter-class
    /// filter drops c_ij, c_ij·(t + c_ij) where CurricularFace finds it hard (above ψ),
    /// else c_ij.
    fn zc(&self, j: usize) -> f64 {
        if j == self.y {
            self.psi
        } else if self.filtered(j) {
            0.0
        } else if self.hard(j) {
            self.cos[j] * (self.curricular.unwrap_or(0.0) + self.cos[j])
        } else {
            self.cos[j]
        }
    }

    /// dzc_ij/dc_ij of a non-target: 0 where filtered, t + 2c_ij where hard, else 1.
    fn other_slope(&self, j: usize) -> f64 {
        if self.filtered(j) {
            0.0
        } else if self.hard(j) {
            self.curricular.unwrap_or(0.0) + 2.0 * self.cos[j]
        } else {
            1.0
        }
    }

    /// True where CurricularFace counts non-target j as hard: c_ij above the row's
    /// threshold φ_i.
    fn hard(&self, j: usize) -> bool {
        j != self.y && self.hard_threshold.is_some_and(|phi| self.cos[j] > phi)
    }

    /// True where the inter-class filter drops non-target j: its logit is the constant 0.
    fn filtered(&self, j: usize) -> bool {
        j != self.y && self.filter.is_some_and(|t| self.cos[j] > f64::from(t))
    }
}

/// A labelled row's margin softmax: its log-sum-exp, L_i and 1 − p_iy.
struct TargetSoftmax {
    lse: f64,
    loss: f64,
    complement: f64,
}

impl Batch<'_> {
    /// c_ij = x̂_i·ŵ_j of row `i` and every class j.
    fn row_cosines(&self, i: usize, cos: &mut [f64]) {
        let d = self.d;
        let xi = &self.xh[i * d..(i + 1) * d];
        for (j, cj) in cos.iter_mut().enumerate() {
            *cj = xi
                .iter()
                .zip(&self.wh[j * d..(j + 1) * d])
                .map(|(a, b)| a * b)
                .sum();
        }
    }

    /// Row `i`'s target with label `y`, recording its target statistics.
    fn target<'c>(
        &self,
        out: &mut ReferenceOutput,
        i: usize,
        cos: &'c [f64],
        y: usize,
        best_other: Option<usize>,
    ) -> Target<'c> {
        let params = self.params;
        let margins = self
            .row_margins
            .map_or_else(|| additive_margins(params), |m| m[i]);
        let target_margin = |c: f64| target_margin_at(params, margins, c);
        out.correct_rows += usize::from(out.pred[i] as usize == y);
        out.target_cos[i] = cos[y];
        out.achieved_margin[i] = cos[y] - out.best_other_cos[i];
        let (psi, slope) = target_margin(cos[y]);
        out.max_target_slope = out.max_target_slope.max(slope.abs());
        // The change of ψ and dψ/dc that a cosine rounding error of γ causes, where ψ is
        // steep: an angular margin with sin θ < 0.05 (elsewhere it is within the bounds).
        let steep = margins[0] != 0.0 && 1.0 - cos[y] * cos[y] < 0.0025;
        let (slope_spread, psi_spread) = if steep {
            let (lo, hi) = (
                target_margin(cos[y] - self.gamma),
                target_margin(cos[y] + self.gamma),
            );
            ((hi.1 - lo.1).abs(), (hi.0 - lo.0).abs() / 2.0)
        } else {
            (0.0, 0.0)
        };
        out.margin_satisfied_rows += usize::from(psi >= out.best_other_cos[i]);
        Target {
            i,
            cos,
            y,
            best_other,
            psi,
            slope,
            slope_spread,
            psi_spread,
            filter: params.interclass_filter,
            curricular: params.curricular.map(f64::from),
            hard_threshold: params.curricular.map(|_| match self.hard_thresholds {
                Some(t) => f64::from(t[i]),
                None => params.curricular_threshold(cos[y]),
            }),
        }
    }

    /// Row `i`'s margin softmax, recording p_iy and its slack.
    fn target_softmax(&self, out: &mut ReferenceOutput, target: &Target<'_>) -> TargetSoftmax {
        let (s, c, psi) = (self.s, target.cos.len(), target.psi);
        let zmax = (0..c)
            .map(|j| s * target.zc(j))
            .fold(f64::NEG_INFINITY, f64::max);
        let sum_exp: f64 = (0..c).map(|j| (s * target.zc(j) - zmax).exp()).sum();
        let lse = zmax + sum_exp.ln();
        // L_i = log(1 + X), X = Σ_{j≠y} exp(z_j − z_y), p_iy = 1/(1 + X) and
        // 1 − p_iy = X/(1 + X): exact relative to themselves when the target dominates,
        // where lse − z_y cancels even in f64. X overflows only when L_i is large, and
        // then lse − z_y is exact enough.
        let other: f64 = (0..c)
            .filter(|&j| j != target.y)
            .map(|j| (s * (target.zc(j) - psi)).exp())
            .sum();
        let (loss, p_target, complement) = if other.is_finite() {
            (other.ln_1p(), 1.0 / (1.0 + other), other / (1.0 + other))
        } else {
            let p = (s * psi - lse).exp();
            (lse - s * psi, p, 1.0)
        };
        out.target_prob[target.i] = p_target;
        out.target_prob_slack = out.target_prob_slack.max(s * target.psi_spread / 4.0);
        TargetSoftmax {
            lse,
            loss,
            complement,
        }
    }

    /// Adds the gradient term `g` = G_ij of row `i` and class `j` to the sums.
    fn add_term(&mut self, i: usize, j: usize, g: f64) {
        let d = self.d;
        self.acc.row_terms[i] += g.abs();
        self.acc.class_terms[j] += g.abs();
        for k in 0..d {
            self.acc.gxh[i * d + k] += g * self.wh[j * d + k];
            self.acc.gwh[j * d + k] += g * self.xh[i * d + k];
        }
    }

    /// Row `i` under the hard objective: the hinge s·(best − ψ) and its gradient where
    /// active, and the slack its rounding excuses.
    fn add_hard_margin_row(&mut self, out: &mut ReferenceOutput, target: &Target<'_>) {
        let (s, norm, gamma) = (self.s, self.norm, self.gamma);
        let (i, cos, y, slope) = (target.i, target.cos, target.y, target.slope);
        let coef = norm * s;
        let gap = out.best_other_cos[i] - target.psi;
        let active = target.best_other.is_some() && gap > 0.0;
        if active {
            out.row_loss[i] = s * gap;
            out.grad_scale += norm * gap;
            let j = target.best_other.unwrap_or(0);
            for (k, g) in [(y, -coef * slope), (j, coef)] {
                self.add_term(i, k, g);
            }
            let slack = coef * target.slope_spread * self.inv_x[i];
            out.grad_features_slack = out.grad_features_slack.max(slack);
            self.acc.class_slack[y] += coef * target.slope_spread;
        }
        // The hinge is s·(best − ψ): rounding moves it by s·(γ·(1 + |ψ'|) + Δψ)
        // whatever its size, so near zero only that absolute error is meaningful.
        let blur = gamma * (1.0 + slope.abs()) + target.psi_spread;
        out.loss_slack += norm * s * blur;
        out.grad_scale_slack += norm * blur;
        // Where rounding can flip the hinge, or pick another of several near-tied
        // best classes, the row's whole gradient is ambiguous: excuse it.
        let runner_up_gap = target.best_other.map_or(f64::INFINITY, |b| {
            (0..cos.len())
                .filter(|&j| j != y && j != b)
                .map(|j| cos[b] - cos[j])
                .fold(f64::INFINITY, f64::min)
        });
        if gap.abs() <= 2.0 * blur || runner_up_gap <= 2.0 * gamma {
            out.grad_features_slack = out
                .grad_features_slack
                .max(coef * (1.0 + slope.abs()) * self.inv_x[i]);
            for (j, slack) in self.acc.class_slack.iter_mut().enumerate() {
                if j == y
                    || runner_up_gap <= 2.0 * gamma
                        && (cos[j] - out.best_other_cos[i]).abs() <= 2.0 * gamma
                {
                    *slack += coef * (1.0 + slope.abs());
                }
            }
        }
    }

    /// Row `i` under the margin softmax: L_i, its gradient G_ij = s·(p_ij − onehot)/N
    /// (times dψ/dc at the target) and dL_i/ds, and the slack a steep ψ excuses.
    fn add_softmax_row(
        &mut self,
        out: &mut ReferenceOutput,
        target: &Target<'_>,
        softmax: &TargetSoftmax,
    ) {
        let (s, norm, i) = (self.s, self.norm, target.i);
        let (slope, psi_spread) = (target.slope, target.psi_spread);
        let coef = norm * s;
        out.row_loss[i] = softmax.loss;
        let mut expected_zc = 0.0;
        for j in 0..target.cos.len() {
            let p = (s * target.zc(j) - softmax.lse).exp();
            expected_zc += p * target.zc(j);
            let g = coef
                * if j == target.y {
                    -softmax.complement * slope
                } else {
                    p * target.other_slope(j)
                };
            self.add_term(i, j, g);
        }
        out.grad_scale += norm * (expected_zc - target.psi);
        // Where ψ is steep, the cosine's rounding moves z_y by s·Δψ and so 1 − p_iy, and
        // moves dψ/dc itself: both are excused.
        let row_slack =
            coef * (softmax.complement * target.slope_spread + slope.abs() * s * psi_spread);
        out.grad_features_slack = out.grad_features_slack.max(row_slack * self.inv_x[i]);
        self.acc.class_slack[target.y] += row_slack;
        out.loss_slack += norm * s * psi_spread;
        out.grad_scale_slack += norm * 2.0 * psi_spread;
    }

    /// The reduced loss and mean margin, and the gradients projected through the
    /// normalisations with the sizes of their terms.
    fn finish(self, mut out: ReferenceOutput) -> ReferenceOutput {
        let acc = &self.acc;
        out.loss = self.norm * out.row_loss.iter().sum::<f64>();
        out.mean_achieved_margin =
            out.achieved_margin.iter().sum::<f64>() / out.valid_rows.max(1) as f64;
        if self.params.scale < self.params.scale_min {
            out.grad_scale = 0.0;
        }
        project(
            &mut out.grad_features,
            &acc.gxh,
            self.xh,
            self.inv_x,
            self.d,
        );
        project(&mut out.grad_classes, &acc.gwh, self.wh, self.inv_w, self.d);
        let weighted_max = |terms: &[f64], inv: &[f64]| {
            terms.iter().zip(inv).fold(0.0f64, |m, (t, i)| m.max(t * i))
        };
        out.grad_features_magnitude = weighted_max(&acc.row_terms, self.inv_x);
        out.grad_classes_magnitude = weighted_max(&acc.class_terms, self.inv_w);
        out.grad_classes_slack = weighted_max(&acc.class_slack, self.inv_w);
        out
    }
}

/// dL/dv = (g − v̂(v̂·g))·inv where ‖v‖ > ε; below ε the normalisation is a plain scaling
/// by 1/ε, so dL/dv = g/ε.
fn project(out: &mut [f64], g: &[f64], vh: &[f64], inv: &[f64], d: usize) {
    for (r, &inv_r) in inv.iter().enumerate() {
        let row = r * d..(r + 1) * d;
        let along = if inv_r < 1.0 / EPS {
            vh[row.clone()]
                .iter()
                .zip(&g[row.clone()])
                .map(|(a, b)| a * b)
                .sum()
        } else {
            0.0
        };
        for k in row {
            out[k] = (g[k] - vh[k] * along) * inv_r;
        }
    }
}

/// Bound on the relative error of the reduced loss for s ≤ [`SCALE_OF_FIXED_BOUNDS`]. Each
/// cosine carries an error of at most γ_{D+4} (see [`cosine_bound`]), typically a few
/// ulp, and L_i moves by about s times it; 1e-5 leaves headroom for every published
/// setting (s ≤ 64).
pub const LOSS_REL_BOUND: f64 = 1e-5;
/// Bound on max |error| / max |value| of every gradient and of the per-row losses for
/// s ≤ [`SCALE_OF_FIXED_BOUNDS`]: G = s·(p − onehot)/N carries a relative error of about
/// s times the cosine error per element.
pub const GRAD_REL_BOUND: f64 = 1e-4;
/// Up to this scale the fixed bounds above hold. Past it, the f32 rounding of the
/// cosines alone, magnified by s, can exceed them: the bounds become 2·s·γ_{D+4}.
pub const SCALE_OF_FIXED_BOUNDS: f64 = 64.0;

/// The (loss, gradient) relative-error bounds for an effective scale `s` and length `dim`.
pub fn error_bounds(s: f64, dim: usize) -> (f64, f64) {
    if s <= SCALE_OF_FIXED_BOUNDS {
        (LOSS_REL_BOUND, GRAD_REL_BOUND)
    } else {
        let magnified = 2.0 * s * cosine_bound(dim);
        (LOSS_REL_BOUND.max(magnified), GRAD_REL_BOUND.max(magnified))
    }
}

/// Bound on the absolute error of one f32 cosine of length-D unit vectors: Higham's
/// γ_{D+4} = (D+4)·u / (1 − (D+4)·u), u = 2⁻²⁴ (D products and sums, plus the two
/// normalisations).
pub fn cosine_bound(dim: usize) -> f64 {
    let nu = (dim as f64 + 4.0) * f64::from(f32::EPSILON) / 2.0;
    nu / (1.0 - nu)
}

/// The largest errors of a GPU result against the reference, each with its bound.
#[derive(Debug, Clone, PartialEq)]
pub struct Comparison {
    /// (output, error, bound) for each compared output.
    pub errors: Vec<(&'static str, f64, f64)>,
    /// Rows whose predicted class differs while the reference's choice is decisive
    /// (its gap to the runner-up exceeds twice the cosine bound).
    pub pred_mismatches: usize,
}

impl Comparison {
    /// True when every error is within its bound and no decisive prediction differs.
    pub fn passes(&self) -> bool {
        self.pred_mismatches == 0 && self.errors.iter().all(|(_, e, b)| e <= b)
    }
}

/// Relative errors are measured against at least this: f32 flushes values below
/// 1.2e-38 to zero, so a true value of 1e-87 (an s = 1000 loss tail) reads as 0, and
/// even 10⁸ flushed terms stay below 1e-4 · TINY.
pub const TINY: f64 = 1e-25;

/// max |a − b| / max(max |b|, `magnitude`, [`TINY`]) (0 when the error is 0).
pub fn max_rel_error(gpu: &[f32], reference: &[f64], magnitude: f64) -> f64 {
    let scale = reference.iter().fold(magnitude, |m, v| m.max(v.abs()));
    let err = max_abs_error(gpu, reference);
    if err == 0.0 {
        0.0
    } else {
        err / scale.max(TINY)
    }
}

/// [`max_rel_error`] after excusing `slack` of absolute error.
fn max_rel_error_with_slack(gpu: &[f32], reference: &[f64], magnitude: f64, slack: f64) -> f64 {
    let scale = reference
        .iter()
        .fold(magnitude, |m, v| m.max(v.abs()))
        .max(TINY);
    (max_abs_error(gpu, reference) - slack).max(0.0) / scale
}

/// |gpu − reference| of one value: infinite where the two differ and either is not finite,
/// so that a NaN or an infinity where the reference is finite fails every bound (`f64::max`
/// and `(e − slack).max(0)` would drop a NaN error); 0 where both are the same infinity.
fn abs_error(gpu: f32, reference: f64) -> f64 {
    let gpu = f64::from(gpu);
    if gpu == reference {
        0.0
    } else if gpu.is_finite() && reference.is_finite() {
        (gpu - reference).abs()
    } else {
        f64::INFINITY
    }
}

/// The largest [`abs_error`] over the elements; infinite when the lengths differ.
fn max_abs_error(gpu: &[f32], reference: &[f64]) -> f64 {
    if gpu.len() != reference.len() {
        return f64::INFINITY;
    }
    gpu.iter()
        .zip(reference)
        .fold(0.0f64, |m, (&a, &b)| m.max(abs_error(a, b)))
}

/// Compares a GPU result with the reference for the same inputs and parameters.
///
/// Bounds ([`error_bounds`]): loss relative [`LOSS_REL_BOUND`] (times the largest
/// |dψ/dc|, which multiplies the cosines' rounding); per-row losses and gradients
/// [`GRAD_REL_BOUND`] as max |error| / max |value| (for gradients, at least the size of
/// the terms each one sums, since the sums can cancel to zero); dL/ds relative to max(|value|, 1),
/// since it is a difference of cosine averages whose natural unit is 1; cosines
/// absolute [`cosine_bound`].
pub fn compare(
    dim: usize,
    params: &LossParams,
    gpu: &LossOutput,
    reference: &ReferenceOutput,
) -> Comparison {
    compare_stored(dim, params, gpu, reference, ElementTypes::default())
}

/// [`compare`] for gradients the GPU stored as `elements` gives them (read back as f32,
/// see [`ElementType::value`]), and run on the inputs as stored (the reference's inputs
/// are the 16-bit values, which f32 holds exactly). The loss and the per-row outputs
/// keep the f32 bounds; each gradient's bound gains one rounding of its type (2⁻¹¹
/// relative for f16, 2⁻⁸ for bf16, [`ElementType::unit_roundoff`]), relative to its
/// largest value as the f32 bound is. That holds wherever the largest value is a normal
/// number of the type; a gradient that falls among f16's subnormals (below 6.1e-5)
/// fails it, and needs a loss scale. Gradients are compared divided by
/// [`LossParams::loss_scale`] (exact for a power of two).
pub fn compare_stored(
    dim: usize,
    params: &LossParams,
    gpu: &LossOutput,
    reference: &ReferenceOutput,
    elements: ElementTypes,
) -> Comparison {
    let cos = cosine_bound(dim);
    let (loss_bound, grad_bound) = error_bounds(f64::from(params.effective_scale()), dim);
    let loss_bound = loss_bound * reference.max_target_slope.min(1e3);
    let mut errors = statistic_errors(gpu, reference, cos, (loss_bound, grad_bound));
    errors.extend(gradient_errors(
        gpu,
        reference,
        grad_bound,
        elements,
        params.loss_scale,
    ));
    Comparison {
        errors,
        pred_mismatches: pred_mismatches(gpu, reference, cos),
    }
}

/// (output, error, bound) of the loss, the per-row losses, dL/ds and the statistics,
/// with the cosine bound `cos` and the (loss, gradient) bounds.
fn statistic_errors(
    gpu: &LossOutput,
    reference: &ReferenceOutput,
    cos: f64,
    (loss_bound, grad_bound): (f64, f64),
) -> Vec<(&'static str, f64, f64)> {
    let loss_err = (abs_error(gpu.loss, reference.loss) - reference.loss_slack).max(0.0);
    let loss_rel = if loss_err == 0.0 {
        0.0
    } else {
        loss_err / reference.loss.abs().max(TINY)
    };
    vec![
        ("loss", loss_rel, loss_bound),
        (
            "row_loss",
            max_rel_error_with_slack(
                &gpu.row_loss,
                &reference.row_loss,
                0.0,
                reference.loss_slack * reference.valid_rows.max(1) as f64,
            ),
            grad_bound,
        ),
        (
            "grad_scale",
            (abs_error(gpu.grad_scale, reference.grad_scale) - reference.grad_scale_slack).max(0.0)
                / reference.grad_scale.abs().max(1.0),
            grad_bound,
        ),
        (
            "target_cos",
            max_abs_error(&gpu.target_cos, &reference.target_cos),
            cos,
        ),
        (
            "best_other_cos",
            max_abs_error(&gpu.best_other_cos, &reference.best_other_cos),
            cos,
        ),
        (
            "achieved_margin",
            max_abs_error(&gpu.achieved_margin, &reference.achieved_margin),
            2.0 * cos,
        ),
        (
            "mean_margin",
            abs_error(gpu.mean_achieved_margin, reference.mean_achieved_margin),
            2.0 * cos,
        ),
        (
            "target_prob",
            (max_abs_error(&gpu.target_prob, &reference.target_prob) - reference.target_prob_slack)
                .max(0.0),
            grad_bound,
        ),
    ]
}

/// (output, error, bound) of dL/dx and dL/dw, where the GPU computed them.
fn gradient_errors(
    gpu: &LossOutput,
    reference: &ReferenceOutput,
    grad_bound: f64,
    elements: ElementTypes,
    loss_scale: f32,
) -> Vec<(&'static str, f64, f64)> {
    let Some(g) = &gpu.grads else {
        return Vec::new();
    };
    // Unscaled (a power-of-two loss scale divides exactly), with the slack and bound of
    // one rounding into the storage type.
    let unscaled = |v: &[f32]| -> Vec<f32> {
        if loss_scale == 1.0 {
            v.to_vec()
        } else {
            v.iter().map(|x| x / loss_scale).collect()
        }
    };
    let rounded_bound = |t: ElementType| match t {
        ElementType::F32 => grad_bound,
        _ => grad_bound + t.unit_roundoff(),
    };
    vec![
        (
            "grad_features",
            max_rel_error_with_slack(
                &unscaled(&g.features),
                &reference.grad_features,
                reference.grad_features_magnitude,
                reference.grad_features_slack,
            ),
            rounded_bound(elements.grad_features),
        ),
        (
            "grad_classes",
            max_rel_error_with_slack(
                &unscaled(&g.classes),
                &reference.grad_classes,
                reference.grad_classes_magnitude,
                reference.grad_classes_slack,
            ),
            rounded_bound(elements.grad_classes),
        ),
    ]
}

/// Rows whose predicted class differs while the reference's choice is decisive, and
/// rows that one side lacks.
fn pred_mismatches(gpu: &LossOutput, reference: &ReferenceOutput, cos: f64) -> usize {
    gpu.pred
        .iter()
        .zip(&reference.pred)
        .zip(&reference.pred_gap)
        .filter(|((a, b), gap)| a != b && **gap > 2.0 * cos)
        .count()
        + gpu.pred.len().abs_diff(reference.pred.len())
}
