//! Loss parameters, validated once.

use crate::error::{Error, Result};

/// The largest effective scale accepted: logits stay far from f32 overflow.
pub const MAX_SCALE: f32 = 1.0e6;
/// The largest |margin| accepted: cosines span [-1, 1].
pub const MAX_MARGIN: f32 = 2.0;
/// The largest multiplicative (SphereFace) margin accepted.
pub const MAX_MULTIPLICATIVE_MARGIN: u32 = 16;
/// In the exact target gradient of an angular margin, sin θ is clamped to at least this:
/// the derivative s·sin(θ + m2)/sin θ is singular at θ = 0 and π, and 1e-3 (θ ≈ 0.06°)
/// caps it at about 1000·s·sin m2 while leaving every θ that training meets untouched.
pub const SIN_GUARD: f32 = 1e-3;
/// ε of AdaFace's angular form ([`LossParams::angle_clip`]): the cosine is clamped to
/// [−1 + ε, 1 − ε] and the angle θ + m2 clipped to [ε, π − ε], as its `head.py` does.
pub const ANGLE_CLIP: f32 = 1e-3;

/// What the loss optimises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Objective {
    /// The margin softmax: L_i = logsumexp_j z_ij − z_{i,y_i}.
    #[default]
    Softmax,
    /// The article's hard objective, the s → ∞ limit: L_i = max(0, s·(max_{j≠y} c_ij − ψ(c_iy)))
    /// with ψ the target's margin function (c − m for CosFace). Its gradient touches only
    /// the target and the best non-target class.
    HardMargin,
}

/// How the target logit's gradient treats the margin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TargetGradient {
    /// dz/dc = s·ψ'(c): for an angular margin s·sin(θ + m2)/sin θ with sin θ clamped to
    /// at least [`SIN_GUARD`]; for a multiplicative one s·m1·U_{m1−1}(c) (exact, finite).
    #[default]
    Exact,
    /// InsightFace's: the margin passes no gradient of its own, dz/dc = s as without it.
    StraightThrough,
}

/// How per-row losses are combined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Mean over the N rows that are not ignored (0, with zero gradients, when N = 0).
    #[default]
    Mean,
    /// Sum over the rows that are not ignored.
    Sum,
    /// Per-row losses; the scalar loss and the gradients are those of the sum.
    None,
}

impl Reduction {
    pub(crate) fn code(self) -> u32 {
        match self {
            Reduction::Mean => 0,
            Reduction::Sum => 1,
            Reduction::None => 2,
        }
    }
}

/// Parameters of the margin-softmax family.
///
/// The target logit is `s·ψ(c)` with InsightFace's combined margin
/// `ψ(c) = cos(m1·θ + m2) − m3`, θ = acos(c): AM-Softmax/CosFace is (1, 0, m), ArcFace
/// (1, m, 0), SphereFace-style (m1, 0, 0). ArcFace's fallback `cos θ − m2·sin m2` applies
/// where θ + m2 > π, and SphereFace's `(−1)^k·cos(m1θ) − 2k` on θ ∈ [kπ/m1, (k+1)π/m1],
/// so ψ always falls as θ grows.
///
/// The effective scale is `max(scale, scale_min)`; the scale receives a gradient only
/// where `scale >= scale_min` (as `torch.clamp` passes it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParams {
    /// s, the scale (a temperature). AM-Softmax's default is 30.
    pub scale: f32,
    /// s_min, the floor of a learnable scale. `0.0` means no floor.
    pub scale_min: f32,
    /// m3 (m), the additive cosine margin on the target logit. AM-Softmax's default is 0.35.
    pub margin: f32,
    /// m2, the additive angular margin (ArcFace), in radians, in [0, π). 0 for none.
    pub angular_margin: f32,
    /// m1, the multiplicative angular margin (SphereFace), a whole number from 1 (none)
    /// to 16. It cannot be combined with an angular margin.
    pub multiplicative_margin: u32,
    /// What the loss optimises.
    pub objective: Objective,
    /// How the target logit's gradient treats the margin.
    pub target_gradient: TargetGradient,
    /// How per-row losses are combined.
    pub reduction: Reduction,
    /// The loss-scale factor of mixed precision (PyTorch's `GradScaler`): dL/dx and dL/dw
    /// are written times it, before they are rounded to a 16-bit storage type, so that
    /// small gradients stay above f16's subnormals. L and dL/ds are not scaled. 1 for
    /// none; a power of two changes no bit but the exponent.
    pub loss_scale: f32,
    /// Easy margin (ArcFace's and MagFace's option): the target logit is `s·c` where
    /// `c ≤ 0`, in place of ψ and its fallback (dψ/dc = 1 there).
    pub easy_margin: bool,
    /// InsightFace's inter-class filter (`interclass_filtering_threshold`, 0.4 in its
    /// configs): a non-target cosine above `t` counts as 0 in the softmax (its logit is 0
    /// and it receives no gradient). The statistics (prediction, best non-target cosine)
    /// still see the raw cosines. `None` for no filter; only with the softmax objective.
    pub interclass_filter: Option<f32>,
    /// AdaFace's angular form, in place of ArcFace's fallback: c clamped to
    /// [−1 + ε, 1 − ε], θ + m2 clipped to [ε, π − ε] (ε = [`ANGLE_CLIP`]), and dψ/dc = 0
    /// where either binds. Per-row angular margins may then be negative, in [−π, π).
    /// Only with m1 = 1.
    pub angle_clip: bool,
}

impl Default for LossParams {
    /// AM-Softmax's values: s = 30, m = 0.35, no floor, mean.
    fn default() -> Self {
        LossParams::am_softmax()
    }
}

impl LossParams {
    /// AM-Softmax (Wang et al. 2018): s = 30, m = 0.35.
    pub fn am_softmax() -> LossParams {
        LossParams {
            scale: 30.0,
            scale_min: 0.0,
            margin: 0.35,
            angular_margin: 0.0,
            multiplicative_margin: 1,
            objective: Objective::Softmax,
            target_gradient: TargetGradient::Exact,
            reduction: Reduction::Mean,
            loss_scale: 1.0,
            easy_margin: false,
            interclass_filter: None,
            angle_clip: false,
        }
    }

    /// CosFace (Wang et al. 2018): s = 64, m = 0.35.
    pub fn cosface() -> LossParams {
        LossParams {
            scale: 64.0,
            ..LossParams::am_softmax()
        }
    }

    /// ArcFace (Deng et al. 2019): s = 64, angular margin m2 = 0.5.
    pub fn arcface() -> LossParams {
        LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: 0.5,
            ..LossParams::am_softmax()
        }
    }

    /// SphereFace-style multiplicative margin m1 on normalised features, s = 30.
    pub fn sphereface(m1: u32) -> LossParams {
        LossParams {
            margin: 0.0,
            multiplicative_margin: m1,
            ..LossParams::am_softmax()
        }
    }
}

impl LossParams {
    /// The parameters of a row whose per-row margins are `[m2, m3]`: its angular and
    /// cosine margins replaced ([`crate::DeviceInputs::row_margins`]).
    pub fn with_row_margin(&self, [m2, m3]: [f32; 2]) -> LossParams {
        LossParams {
            angular_margin: m2,
            margin: m3,
            ..*self
        }
    }

    /// The range of a per-row angular margin m2_i: [0, π), or (−π, π) with
    /// [`LossParams::angle_clip`] (AdaFace's negative margins for high-norm rows).
    pub fn row_angle_range(&self) -> (f32, f32) {
        let pi = std::f32::consts::PI;
        (if self.angle_clip { -pi } else { 0.0 }, pi)
    }

    /// `max(scale, scale_min)`, the scale the kernels use.
    pub fn effective_scale(&self) -> f32 {
        self.scale.max(self.scale_min)
    }

    /// True when the scale receives a gradient (`scale >= scale_min`).
    pub fn scale_receives_grad(&self) -> bool {
        self.scale >= self.scale_min
    }

    /// Checks every parameter; the error says which one and what it must be.
    pub fn validate(&self) -> Result<()> {
        let finite = |name, value: f32| {
            if value.is_finite() {
                Ok(())
            } else {
                Err(Error::InvalidParameter {
                    name,
                    value,
                    requirement: "finite",
                })
            }
        };
        finite("scale", self.scale)?;
        finite("scale_min", self.scale_min)?;
        finite("margin", self.margin)?;
        if self.effective_scale() > MAX_SCALE {
            return Err(Error::InvalidParameter {
                name: "scale",
                value: self.effective_scale(),
                requirement: "at most 1e6 (larger scales make every softmax a hard max and f32 logits lose all precision)",
            });
        }
        if self.margin.abs() > MAX_MARGIN {
            return Err(Error::InvalidParameter {
                name: "margin",
                value: self.margin,
                requirement: "in [-2, 2] (cosines span 2, so a larger margin has no meaning)",
            });
        }
        finite("angular_margin", self.angular_margin)?;
        if !(0.0..std::f32::consts::PI).contains(&self.angular_margin) {
            return Err(Error::InvalidParameter {
                name: "angular_margin",
                value: self.angular_margin,
                requirement: "in [0, π) radians (ArcFace uses 0.5)",
            });
        }
        let m1 = self.multiplicative_margin;
        if !(1..=MAX_MULTIPLICATIVE_MARGIN).contains(&m1) {
            return Err(Error::InvalidParameter {
                name: "multiplicative_margin",
                value: m1 as f32,
                requirement: "a whole number from 1 (no margin) to 16",
            });
        }
        if m1 > 1 && self.angular_margin > 0.0 {
            return Err(Error::InvalidParameter {
                name: "angular_margin",
                value: self.angular_margin,
                requirement: "0 when multiplicative_margin > 1: cos(m1·θ + m2) has no monotonic fallback; use one of the two",
            });
        }
        if self.scale_min < 0.0 {
            return Err(Error::InvalidParameter {
                name: "scale_min",
                value: self.scale_min,
                requirement: ">= 0 (0 means no floor)",
            });
        }
        if !(self.loss_scale.is_finite() && self.loss_scale > 0.0) {
            return Err(Error::InvalidParameter {
                name: "loss_scale",
                value: self.loss_scale,
                requirement: "finite and > 0 (1 for none; mixed precision starts near 2^16 and halves it on overflow)",
            });
        }
        if let Some(t) = self.interclass_filter {
            if !(t.is_finite() && (-1.0..=1.0).contains(&t)) {
                return Err(Error::InvalidParameter {
                    name: "interclass_filter",
                    value: t,
                    requirement:
                        "a cosine in [-1, 1] (InsightFace uses 0.4), or None for no filter",
                });
            }
            if self.objective == Objective::HardMargin {
                return Err(Error::InvalidParameter {
                    name: "interclass_filter",
                    value: t,
                    requirement:
                        "None with Objective::HardMargin (the filter is an option of the softmax)",
                });
            }
        }
        if self.angle_clip && m1 > 1 {
            return Err(Error::InvalidParameter {
                name: "multiplicative_margin",
                value: m1 as f32,
                requirement: "1 with angle_clip (AdaFace's form clips θ + m2, an additive angle)",
            });
        }
        if self.effective_scale() <= 0.0 {
            return Err(Error::InvalidParameter {
                name: "scale",
                value: self.scale,
                requirement: "> 0, or raised above 0 by scale_min (the effective scale is max(scale, scale_min))",
            });
        }
        Ok(())
    }
}

/// A learnable scale with a floor: the value the optimiser moves, and the effective scale
/// max(value, floor) the loss uses.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LearnableScale {
    /// s, the parameter.
    pub value: f32,
    /// s_min, the floor.
    pub floor: f32,
}

impl LearnableScale {
    /// A scale starting at `value` with floor `floor`.
    pub fn new(value: f32, floor: f32) -> LearnableScale {
        LearnableScale { value, floor }
    }

    /// `max(value, floor)`.
    pub fn effective(&self) -> f32 {
        self.value.max(self.floor)
    }

    /// `params` with this scale and floor.
    pub fn apply(&self, params: LossParams) -> LossParams {
        LossParams {
            scale: self.value,
            scale_min: self.floor,
            ..params
        }
    }

    /// One SGD step `s ← s − lr·dL/ds` (dL/ds is already 0 below the floor, as the loss
    /// reports it), then held at the floor, so the parameter never sinks where its
    /// gradient cannot lift it. Non-finite steps leave it unchanged.
    pub fn sgd_step(&mut self, grad: f32, learning_rate: f32) {
        let next = self.value - learning_rate * grad;
        if next.is_finite() {
            self.value = next.max(self.floor);
        }
    }
}

/// CosFace's lower bound on the scale: for C classes and a wanted target probability P,
/// `s ≥ (C−1)/C · ln((C−1)·P/(1−P))`. Use it as the floor of a learnable scale. Returns
/// 0 for C ≤ 1 and NaN for P outside (0, 1).
pub fn cosface_scale_floor(classes: usize, target_probability: f64) -> f64 {
    if classes <= 1 {
        return 0.0;
    }
    let c = classes as f64;
    let p = target_probability;
    if !(p > 0.0 && p < 1.0) {
        return f64::NAN;
    }
    ((c - 1.0) / c * ((c - 1.0) * p / (1.0 - p)).ln()).max(0.0)
}
