//! The same loss composed from Burn's tensor operations, for every backend the fused
//! kernels do not run on (NdArray, CUDA, a wgpu device not registered with the crate):
//! what a Burn user would write, with the target's margin ψ(c) and its slope ψ'(c)
//! exactly as the kernels define them (`margin_softmax::reference::target_margin`),
//! so that the two paths can be compared on any machine.
//!
//! f16 and bf16 inputs are cast up to f32 first, so that every operation is f32 as in
//! the kernels; Burn's autodiff casts their gradients back to the inputs' dtypes (one
//! rounding each), as the fused path writes them.

use burn::tensor::activation::{log_softmax, relu};
use burn::tensor::{Bool, DType, FloatDType, Int, Tensor};
use margin_softmax::{
    flags, reference, LossParams, Objective, Reduction, TargetGradient, SIN_GUARD,
};

use crate::module::{MarginSoftmaxOutput, RowStatistics};

/// `t` in f32: itself, or cast up (in the graph: its gradient is cast back).
fn f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    match t.dtype() {
        DType::F32 => t,
        _ => t.cast(FloatDType::F32),
    }
}

/// Rows scaled to unit length: v / max(‖v‖, ε), ε the kernels' (`reference::EPS`). The
/// floor is taken on ‖v‖², so that a zero row has the gradient g/ε, not 0·∞.
fn unit_rows(v: Tensor<2>) -> Tensor<2> {
    let floor = reference::EPS as f32;
    let norm = (v.clone() * v.clone())
        .sum_dim(1)
        .clamp_min(floor * floor)
        .sqrt();
    v / norm
}

/// (ψ(c), ψ'(c)) elementwise, outside the graph: ψ(c) = cos(m1·θ + m2) − m3 with the
/// kernels' monotonic fallbacks; the slope with sin θ at least [`SIN_GUARD`] for an
/// angular margin, or 1 when straight-through; (c, 1) where c ≤ 0 with the easy margin.
fn target_margin(c: Tensor<2>, params: &LossParams) -> (Tensor<2>, Tensor<2>) {
    let c_raw = c.clone();
    let (m1, m2) = (params.multiplicative_margin, params.angular_margin);
    let ones = c.ones_like();
    let (psi, slope) = if m1 == 1 && m2 == 0.0 {
        (c, ones.clone())
    } else if m2 > 0.0 {
        let c = c.clamp(-1.0, 1.0);
        let sin_t = ((c.clone().neg() + 1.0) * (c.clone() + 1.0))
            .clamp_min(0.0)
            .sqrt();
        let inside: Tensor<2, Bool> = c.clone().greater_elem(-m2.cos());
        let psi_inside = c.clone() * m2.cos() - sin_t.clone() * m2.sin();
        let slope_inside = c.clone() * m2.sin() / sin_t.clamp_min(SIN_GUARD) + m2.cos();
        let psi_outside = c.clone() - m2 * m2.sin();
        (
            psi_outside.mask_where(inside.clone(), psi_inside),
            ones.clone().mask_where(inside, slope_inside),
        )
    } else {
        // SphereFace: (−1)^k·T_m(c) − 2k on θ ∈ [kπ/m, (k+1)π/m), k counted from c.
        let c = c.clamp(-1.0, 1.0);
        let m = m1 as f32;
        let mut k = c.zeros_like();
        for j in 1..m1 {
            let threshold = (j as f32 * std::f32::consts::PI / m).cos();
            k = k + c.clone().lower_equal_elem(threshold).float();
        }
        let parity = k.clone() - (k.clone() / 2.0).floor() * 2.0;
        let sign = parity.neg() * 2.0 + 1.0;
        // T_m(c) and U_{m−1}(c) by the Chebyshev recurrences, from (T_0, T_1) = (1, c)
        // and (U_{−1}, U_0) = (0, 1).
        let (mut t_prev, mut t) = (ones.clone(), c.clone());
        let (mut u_prev, mut u) = (c.zeros_like(), ones.clone());
        for _ in 1..m1 {
            let t_next = c.clone() * t.clone() * 2.0 - t_prev;
            let u_next = c.clone() * u.clone() * 2.0 - u_prev;
            (t_prev, t, u_prev, u) = (t, t_next, u, u_next);
        }
        // (−1)^k·m·U_{m−1}(c) = m·|U_{m−1}(c)|, as the kernels take it.
        (sign * t - k * 2.0, u.abs() * m)
    };
    let slope = match params.target_gradient {
        TargetGradient::Exact => slope,
        TargetGradient::StraightThrough => ones.clone(),
    };
    let psi = psi - params.margin;
    if !params.easy_margin {
        return (psi, slope);
    }
    // Easy margin: (c, 1) where c ≤ 0.
    let easy = c_raw.clone().lower_equal_elem(0.0);
    (
        psi.mask_where(easy.clone(), c_raw),
        slope.mask_where(easy, ones),
    )
}

/// The loss of features x (B×D), class vectors w (C×D), labels y (B; a row whose label
/// is not a class is ignored) and the scale s (one value), on `params`' margins.
pub(crate) fn loss(
    features: Tensor<2>,
    classes: Tensor<2>,
    scale: Tensor<1>,
    labels: Tensor<1, Int>,
    params: &LossParams,
) -> MarginSoftmaxOutput {
    let (features, classes, scale) = (f32(features), f32(classes), f32(scale));
    let [batch, num_classes] = [features.dims()[0], classes.dims()[0]];
    let cos = unit_rows(features.clone()).matmul(unit_rows(classes.clone()).transpose());
    let valid = labels
        .clone()
        .greater_equal_elem(0)
        .bool_and(labels.clone().lower_elem(num_classes as i64));
    let valid_rows = valid.clone().float().reshape([batch, 1]);
    // The one-hot targets, by comparison with 0..C (Burn's one_hot wants C ≥ 2).
    let is_target = Tensor::<1, Int>::arange(0..num_classes as i64, &labels.device())
        .reshape([1, num_classes])
        .expand([batch, num_classes])
        .equal(
            labels
                .clone()
                .reshape([batch, 1])
                .expand([batch, num_classes]),
        );
    let target = is_target.clone().float();
    let target_cos = (cos.clone() * target.clone()).sum_dim(1);
    // ψ with the kernels' slope: value ψ(c), gradient ψ'(c)·dc.
    let (psi, slope) = target_margin(target_cos.clone().detach(), params);
    let psi = psi + slope * (target_cos.clone() - target_cos.clone().detach());
    // s_eff = max(s, s_min), with dL/ds passed only where s ≥ s_min.
    let passes = scale.clone().greater_equal_elem(params.scale_min).float();
    let scale = (scale * passes.clone() + (passes.neg() + 1.0) * params.scale_min).reshape([1, 1]);
    // The inter-class filter: non-target cosines above t count as 0 (no gradient).
    let softmax_cos = match params.interclass_filter {
        Some(t) => {
            let drop = cos
                .clone()
                .greater_elem(t)
                .bool_and(is_target.clone().bool_not());
            cos.clone().mask_fill(drop, 0.0)
        }
        None => cos.clone(),
    };
    let logits =
        (softmax_cos + target.clone() * (psi.clone() - target_cos.clone())) * scale.clone();
    let log_probs = log_softmax(logits, 1);
    let target_log_prob = (log_probs * target).sum_dim(1);
    let best_other = cos.clone().mask_fill(is_target, -1.0).max_dim(1);
    let satisfied = psi
        .clone()
        .detach()
        .greater_equal(best_other.clone().detach())
        .float()
        * valid_rows.clone();
    let row_loss = match params.objective {
        Objective::Softmax => target_log_prob.clone().neg(),
        // With one class there is no other class to beat: no row is active.
        Objective::HardMargin => {
            relu((best_other.clone() - psi) * scale) * f32::from(u8::from(num_classes > 1))
        }
    } * valid_rows.clone();
    let count = valid_rows.clone().sum();
    let loss = match params.reduction {
        Reduction::Mean => row_loss.clone().sum() / count.clone().clamp_min(1.0),
        Reduction::Sum | Reduction::None => row_loss.clone().sum(),
    };

    let pred = cos.clone().argmax(1).reshape([batch]);
    let best_other = best_other
        .detach()
        .mask_where(valid_rows.clone().lower_elem(0.5), cos.detach().max_dim(1));
    let target_cos = target_cos.detach() * valid_rows.clone();
    let non_finite = |t: Tensor<2>| t.is_finite().bool_not().any().int();
    let out_of_range = valid
        .clone()
        .bool_not()
        .bool_and(labels.clone().not_equal_elem(-1))
        .any()
        .int();
    let overflow = loss.clone().is_finite().bool_not().any().int();
    let flags = non_finite(features.detach()) * flags::FEATURES_NON_FINITE as i64
        + non_finite(classes.detach()) * flags::CLASSES_NON_FINITE as i64
        + out_of_range * flags::LABEL_OUT_OF_RANGE as i64
        + overflow * flags::OVERFLOW as i64;
    let correct = pred
        .clone()
        .equal(labels)
        .bool_and(valid.clone())
        .int()
        .sum();
    let achieved_margin = (target_cos.clone() - best_other.clone()) * valid_rows.clone();
    MarginSoftmaxOutput {
        loss,
        mean_achieved_margin: achieved_margin.clone().sum() / count.clamp_min(1.0),
        margin_satisfied_rows: satisfied.sum().int(),
        rows: RowStatistics {
            loss: row_loss.detach().reshape([batch]),
            achieved_margin: achieved_margin.reshape([batch]),
            target_cos: target_cos.reshape([batch]),
            best_other_cos: best_other.reshape([batch]),
            pred,
            target_prob: (target_log_prob.detach().exp() * valid_rows).reshape([batch]),
        },
        valid_rows: valid.int().sum(),
        correct_rows: correct,
        flags,
    }
}
