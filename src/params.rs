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
    /// `c ≤ 0`, in place of ψ and its fallback (dψ/dc = 1 there); with m1 = 1 and without
    /// `angle_clip` only.
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
    /// CurricularFace's t for this step (`schedule::CurricularFace` keeps it): a
    /// non-target cosine c above its row's threshold φ_i (the margined target cosine,
    /// given per row as `hard_thresholds`) counts as c·(t + c) in the softmax. `None` for
    /// none; only with the softmax objective.
    pub curricular: Option<f32>,
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
            curricular: None,
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

    /// The range of a per-row angular margin m2_i: [0, π), or [−π, π) with
    /// [`LossParams::angle_clip`] (AdaFace's negative margins for high-norm rows).
    pub fn row_angle_range(&self) -> (f32, f32) {
        let pi = std::f32::consts::PI;
        (if self.angle_clip { -pi } else { 0.0 }, pi)
    }

    /// CurricularFace's threshold φ for a row whose target cosine is c: the raw
    /// cos(θ + m2) = c·cos m2 − sin θ·sin m2 with the parameters' angular margin, without
    /// ArcFace's fallback (the official code masks with it before the fallback applies).
    pub fn curricular_threshold(&self, c: f64) -> f64 {
        let cc = c.clamp(-1.0, 1.0);
        let m2 = f64::from(self.angular_margin);
        cc * m2.cos() - ((1.0 - cc) * (1.0 + cc)).max(0.0).sqrt() * m2.sin()
    }

    /// ∂ψ/∂m2 of the target's margin function at cosine c with angular margin m2 (m1 = 1,
    /// ArcFace's form): −sin(θ + m2) inside, −(sin m2 + m2·cos m2) on its fallback, 0
    /// where the easy margin takes c.
    pub fn margin_slope_m2(&self, m2: f64, c: f64) -> f64 {
        if self.easy_margin && c <= 0.0 {
            return 0.0;
        }
        let cc = c.clamp(-1.0, 1.0);
        if cc > -m2.cos() {
            -(cc.acos() + m2).sin()
        } else {
            -(m2.sin() + m2 * m2.cos())
        }
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
        // The two options that reweight non-target cosines: a cosine each, and both
        // options of the softmax.
        for (name, value, range) in [
            (
                "interclass_filter",
                self.interclass_filter,
                "a cosine in [-1, 1] (InsightFace uses 0.4), or None for no filter",
            ),
            (
                "curricular",
                self.curricular,
                "t, a running mean of cosines, in [-1, 1] (it starts at 0)",
            ),
        ] {
            let Some(t) = value else { continue };
            if !(t.is_finite() && (-1.0..=1.0).contains(&t)) {
                return invalid(name, t, range);
            }
            if self.objective == Objective::HardMargin {
                return invalid(
                    name,
                    t,
                    "None with Objective::HardMargin (it reweights the softmax's non-target logits)",
                );
            }
        }
        if self.easy_margin && (m1 > 1 || self.angle_clip) {
            return Err(Error::InvalidParameter {
                name: "easy_margin",
                value: 1.0,
                requirement: "false with a multiplicative margin or angle_clip (it replaces ArcFace's fallback, cos(θ + m2) − m3 with m1 = 1)",
            });
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

/// MagFace's parameters (IrvingMeng/MagFace `models/magface.py`): the feature norm
/// a = ‖x‖, clamped to â ∈ [l_a, u_a], sets the row's angular margin
/// m(â) = l_m + (u_m − l_m)·(â − l_a)/(u_a − l_a), and the loss adds the regulariser
/// λ_g·(â/u_a² + 1/â) per row, so that dL/dx has a radial part through â (zero outside
/// the clamp). [`crate::schedule`] runs it: margins from the norms, then the regulariser
/// and the radial part on the host.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MagFace {
    /// l_a, the norm below which the margin stays l_m (10).
    pub lower_norm: f32,
    /// u_a, the norm above which the margin stays u_m (110).
    pub upper_norm: f32,
    /// l_m, the smallest margin (0.45).
    pub lower_margin: f32,
    /// u_m, the largest margin (0.8).
    pub upper_margin: f32,
    /// λ_g, the regulariser's weight (20, the code's default; its run scripts pass 35).
    pub regularizer: f32,
}

impl Default for MagFace {
    /// The official defaults: l_a = 10, u_a = 110, l_m = 0.45, u_m = 0.8, λ_g = 20.
    fn default() -> Self {
        MagFace {
            lower_norm: 10.0,
            upper_norm: 110.0,
            lower_margin: 0.45,
            upper_margin: 0.8,
            regularizer: 20.0,
        }
    }
}

impl MagFace {
    /// The loss parameters it pairs with: s = 64 and the easy margin (MagFace's
    /// default), no margin of the parameters' own (the per-row margins replace them).
    pub fn params(&self) -> LossParams {
        LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: 0.0,
            easy_margin: true,
            ..LossParams::default()
        }
    }

    /// Checks the parameters; the error says which one and what it must be.
    pub fn validate(&self) -> Result<()> {
        let (la, ua) = (self.lower_norm, self.upper_norm);
        if !(la.is_finite() && la > 0.0) {
            return invalid("lower_norm", la, "finite and > 0 (MagFace uses 10)");
        }
        if !(ua.is_finite() && ua > la) {
            return invalid(
                "upper_norm",
                ua,
                "finite and > lower_norm (MagFace uses 110)",
            );
        }
        for (name, m) in [
            ("lower_margin", self.lower_margin),
            ("upper_margin", self.upper_margin),
        ] {
            if !(m.is_finite() && (0.0..std::f32::consts::PI).contains(&m)) {
                return invalid(
                    name,
                    m,
                    "an angular margin in [0, π) (MagFace uses 0.45 and 0.8)",
                );
            }
        }
        if !(self.regularizer.is_finite() && self.regularizer >= 0.0) {
            return invalid(
                "regularizer",
                self.regularizer,
                "finite and >= 0 (MagFace uses 20)",
            );
        }
        Ok(())
    }

    /// MagFace takes its per-row margins from the norms (no others, `row_margins`), m1 = 1
    /// without the clipped form, and the softmax objective.
    pub(crate) fn check_params(&self, row_margins: bool, params: &LossParams) -> Result<()> {
        if row_margins {
            return invalid(
                "row_margins",
                0.0,
                "none with MagFace: its margins come from the norms",
            );
        }
        if params.multiplicative_margin != 1 {
            return invalid(
                "multiplicative_margin",
                params.multiplicative_margin as f32,
                "1 with MagFace: its margin is ArcFace's angular margin",
            );
        }
        if params.angle_clip {
            return invalid(
                "angle_clip",
                1.0,
                "false with MagFace: its margin takes ArcFace's form",
            );
        }
        if params.objective != Objective::Softmax {
            return invalid("objective", 1.0, "Objective::Softmax with MagFace");
        }
        Ok(())
    }

    /// (â, inside): the norm a clamped to [l_a, u_a], and whether it was inside (where
    /// â moves with a).
    pub fn clamped_norm(&self, a: f64) -> (f64, bool) {
        let (la, ua) = (f64::from(self.lower_norm), f64::from(self.upper_norm));
        (a.clamp(la, ua), (la..=ua).contains(&a))
    }

    /// m(â) = l_m + (u_m − l_m)·(â − l_a)/(u_a − l_a).
    pub fn margin(&self, clamped_norm: f64) -> f64 {
        f64::from(self.lower_margin)
            + self.margin_slope() * (clamped_norm - f64::from(self.lower_norm))
    }

    /// dm/dâ = (u_m − l_m)/(u_a − l_a).
    pub fn margin_slope(&self) -> f64 {
        f64::from(self.upper_margin - self.lower_margin)
            / (f64::from(self.upper_norm) - f64::from(self.lower_norm))
    }

    /// Row i's (λ_g·g(â_i), dL_i/da_i) under the softmax objective with `params` (scale
    /// `scale`): its regulariser, and the derivative of its loss L_i (margin softmax plus
    /// regulariser) through the norm a_i = ‖x_i‖, from its target cosine c and target
    /// probability p: −(1 − p)·s·∂ψ/∂m2·dm/dâ + λ_g·g'(â) inside the clamp, 0 outside.
    /// dL/dx_i gains weight·dL_i/da_i·x̂_i (the radial part).
    pub fn row_terms(
        &self,
        params: &LossParams,
        scale: f64,
        norm: f64,
        c: f64,
        p: f64,
    ) -> (f64, f64) {
        let (a, inside) = self.clamped_norm(norm);
        let (reg, reg_slope) = self.regularizer_and_slope(a);
        if !inside {
            return (reg, 0.0);
        }
        let dpsi = params.margin_slope_m2(self.margin(a), c);
        (
            reg,
            -(1.0 - p) * scale * dpsi * self.margin_slope() + reg_slope,
        )
    }

    /// The regulariser g(â)·λ_g = λ_g·(â/u_a² + 1/â) and its slope λ_g·(1/u_a² − 1/â²).
    pub fn regularizer_and_slope(&self, clamped_norm: f64) -> (f64, f64) {
        let (lambda, ua) = (f64::from(self.regularizer), f64::from(self.upper_norm));
        let a = clamped_norm;
        (
            lambda * (a / (ua * ua) + 1.0 / a),
            lambda * (1.0 / (ua * ua) - 1.0 / (a * a)),
        )
    }
}

/// `Err(InvalidParameter)` for parameter `name` with `value`, which must meet
/// `requirement`.
fn invalid(name: &'static str, value: f32, requirement: &'static str) -> Result<()> {
    Err(Error::InvalidParameter {
        name,
        value,
        requirement,
    })
}
