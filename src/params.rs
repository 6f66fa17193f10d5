//! Loss parameters, validated once.

use crate::error::{Error, Result};

/// The largest effective scale accepted: logits stay far from f32 overflow.
pub const MAX_SCALE: f32 = 1.0e6;
/// The largest |margin| accepted: cosines span [-1, 1].
pub const MAX_MARGIN: f32 = 2.0;

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

/// Parameters of the AM-Softmax / CosFace loss.
///
/// The effective scale is `max(scale, scale_min)`; the scale receives a gradient only
/// where `scale >= scale_min` (as `torch.clamp` passes it).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossParams {
    /// s, the scale (a temperature). AM-Softmax's default is 30.
    pub scale: f32,
    /// s_min, the floor of a learnable scale. `0.0` means no floor.
    pub scale_min: f32,
    /// m, the additive cosine margin on the target logit. AM-Softmax's default is 0.35.
    pub margin: f32,
    /// How per-row losses are combined.
    pub reduction: Reduction,
}

impl Default for LossParams {
    /// AM-Softmax's values: s = 30, m = 0.35, no floor, mean.
    fn default() -> Self {
        LossParams {
            scale: 30.0,
            scale_min: 0.0,
            margin: 0.35,
            reduction: Reduction::Mean,
        }
    }
}

impl LossParams {
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
        if self.scale_min < 0.0 {
            return Err(Error::InvalidParameter {
                name: "scale_min",
                value: self.scale_min,
                requirement: ">= 0 (0 means no floor)",
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
