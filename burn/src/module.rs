//! The module a Burn user adds: [`MarginSoftmaxConfig`] → [`MarginSoftmax`].

use burn::config::Config;
use burn::module::{Initializer, Module, Param};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use margin_softmax::{LossParams, Objective, Reduction, TargetGradient};

use crate::composed;
use crate::device::{fused, is_wgpu};
use crate::error::Error;
use crate::fused::{element_types, LossInputs, MarginSoftmaxOps};

/// What the loss optimises (`margin_softmax::Objective`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MarginObjective {
    /// The margin softmax: L_i = logsumexp_j z_ij − z_{i,y_i}.
    Softmax,
    /// The hard objective max(0, s·(max_{j≠y} c_ij − ψ(c_iy))).
    HardMargin,
}

/// How the target logit's gradient treats the margin (`margin_softmax::TargetGradient`).
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MarginGradient {
    /// dz/dc = s·ψ'(c).
    Exact,
    /// InsightFace's: the margin passes no gradient of its own.
    StraightThrough,
}

/// How per-row losses are combined into the loss tensor.
#[derive(Config, Debug, Copy, PartialEq, Eq)]
pub enum MarginReduction {
    /// Mean over the rows whose label is a class.
    Mean,
    /// Sum over those rows.
    Sum,
}

/// The margin-softmax loss: C class vectors of length D, the scale s and InsightFace's
/// combined margin ψ(c) = cos(m1·θ + m2) − m3 on the target logit (CosFace (1, 0, m),
/// ArcFace (1, m, 0), SphereFace-style (m1, 0, 0)).
#[derive(Config, Debug)]
pub struct MarginSoftmaxConfig {
    /// C, the number of classes.
    pub num_classes: usize,
    /// D, the length of a feature.
    pub dim: usize,
    /// s, the scale.
    #[config(default = 30.0)]
    pub scale: f32,
    /// m3, the additive cosine margin (CosFace, AM-Softmax).
    #[config(default = 0.35)]
    pub margin: f32,
    /// m2, the additive angular margin in radians (ArcFace).
    #[config(default = 0.0)]
    pub angular_margin: f32,
    /// m1, the multiplicative angular margin (SphereFace), 1 to 16.
    #[config(default = 1)]
    pub multiplicative_margin: u32,
    /// What the loss optimises.
    #[config(default = "MarginObjective::Softmax")]
    pub objective: MarginObjective,
    /// How the target logit's gradient treats the margin.
    #[config(default = "MarginGradient::Exact")]
    pub target_gradient: MarginGradient,
    /// How per-row losses are combined.
    #[config(default = "MarginReduction::Mean")]
    pub reduction: MarginReduction,
    /// Easy margin: the target logit is s·c where c ≤ 0 (ArcFace's option).
    #[config(default = false)]
    pub easy_margin: bool,
    /// InsightFace's inter-class filter: non-target cosines above it count as 0 (0.4 in
    /// its configs); `None` for none.
    #[config(default = "None")]
    pub interclass_filter: Option<f32>,
    /// Whether s is a parameter that the optimizer updates.
    #[config(default = false)]
    pub learn_scale: bool,
    /// s_min, the learnable scale's floor (0 for none): the loss uses max(s, s_min).
    #[config(default = 0.0)]
    pub scale_floor: f32,
    /// How the class vectors start.
    #[config(default = "Initializer::Normal { mean: 0.0, std: 1.0 }")]
    pub initializer: Initializer,
}

/// The loss module: the class vectors as a parameter, the scale as one where
/// [`MarginSoftmaxConfig::learn_scale`], and the loss's parameters.
#[derive(Module, Debug)]
pub struct MarginSoftmax {
    /// w, C×D; each row is normalised inside the loss.
    pub classes: Param<Tensor<2>>,
    /// s (one value) where it is learned; a fixed s is one of the loss's parameters.
    pub learned_scale: Option<Param<Tensor<1>>>,
    #[module(skip)]
    params: LossParams,
}

/// Per-row statistics, each of length B (0 for an ignored row but `best_other_cos`
/// and `pred`). None carries a gradient.
#[derive(Debug, Clone)]
pub struct RowStatistics {
    /// L_i.
    pub loss: Tensor<1>,
    /// c_iy, the target cosine.
    pub target_cos: Tensor<1>,
    /// The largest non-target cosine (over all classes for an ignored row; −1 when C = 1).
    pub best_other_cos: Tensor<1>,
    /// argmax_j c_ij.
    pub pred: Tensor<1, Int>,
    /// c_iy − max_{j≠y} c_ij.
    pub achieved_margin: Tensor<1>,
    /// p_iy, the margin softmax's probability of the label.
    pub target_prob: Tensor<1>,
}

/// What [`MarginSoftmax::forward`] returns.
#[derive(Debug, Clone)]
pub struct MarginSoftmaxOutput {
    /// The reduced loss, one value; `backward()` from it reaches the features, the class
    /// vectors and a learnable scale.
    pub loss: Tensor<1>,
    /// Per-row statistics.
    pub rows: RowStatistics,
    /// N, the rows whose label is a class.
    pub valid_rows: Tensor<1, Int>,
    /// Valid rows whose prediction is the label.
    pub correct_rows: Tensor<1, Int>,
    /// The mean over valid rows of the achieved margin c_iy − max_{j≠y} c_ij.
    pub mean_achieved_margin: Tensor<1>,
    /// Valid rows whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: Tensor<1, Int>,
    /// Bits of `margin_softmax::flags`: non-finite features (1) or class vectors (2), a
    /// label that is neither a class nor −1 (4), a non-finite loss (8). Bits 16 and 32
    /// (a gradient out of its 16-bit type's range) are never set here: the module's
    /// gradients are rounded to a 16-bit input's dtype by Burn's cast in the backward,
    /// where a value too large becomes ±inf, which a gradient scaler's check finds.
    pub flags: Tensor<1, Int>,
}

impl MarginSoftmaxConfig {
    /// The core's parameters for this configuration, checked.
    pub fn loss_params(&self) -> Result<LossParams, Error> {
        let params = LossParams {
            scale: self.scale,
            scale_min: self.scale_floor,
            margin: self.margin,
            angular_margin: self.angular_margin,
            multiplicative_margin: self.multiplicative_margin,
            objective: match self.objective {
                MarginObjective::Softmax => Objective::Softmax,
                MarginObjective::HardMargin => Objective::HardMargin,
            },
            target_gradient: match self.target_gradient {
                MarginGradient::Exact => TargetGradient::Exact,
                MarginGradient::StraightThrough => TargetGradient::StraightThrough,
            },
            reduction: match self.reduction {
                MarginReduction::Mean => Reduction::Mean,
                MarginReduction::Sum => Reduction::Sum,
            },
            // Burn scales the gradients by the loss's incoming gradient instead.
            loss_scale: 1.0,
            easy_margin: self.easy_margin,
            interclass_filter: self.interclass_filter,
            // AdaFace's form goes with per-row margins, which the module does not take.
            angle_clip: false,
            // CurricularFace takes per-row thresholds, which the module does not take.
            curricular: None,
        };
        params.validate()?;
        if self.num_classes == 0 || self.dim == 0 {
            return Err(Error::Config(format!(
                "num_classes ({}) and dim ({}) must both be at least 1",
                self.num_classes, self.dim
            )));
        }
        Ok(params)
    }

    /// The module on `device`, or why this configuration is refused.
    pub fn try_init(&self, device: &Device) -> Result<MarginSoftmax, Error> {
        let params = self.loss_params()?;
        let learned_scale = self.learn_scale.then(|| {
            Param::from_tensor(Tensor::<1>::from_data(
                TensorData::new(vec![self.scale], [1]),
                device,
            ))
        });
        Ok(MarginSoftmax {
            classes: self.initializer.init([self.num_classes, self.dim], device),
            learned_scale,
            params,
        })
    }

    /// The module on `device`.
    ///
    /// # Panics
    ///
    /// Where [`MarginSoftmaxConfig::try_init`] returns an error, with its message.
    pub fn init(&self, device: &Device) -> MarginSoftmax {
        self.try_init(device)
            .unwrap_or_else(|e| panic!("MarginSoftmaxConfig: {e}"))
    }
}

impl MarginSoftmax {
    /// The loss of `features` (B×D) against `labels` (B; −1, or any value that is not a
    /// class, ignores a row). On a device registered with the fused kernels
    /// ([`crate::wgpu_device`]) it runs them; elsewhere the composed twin.
    ///
    /// The features and the class vectors may each be f32, f16 or bf16, where Burn's
    /// backend holds that dtype on their device ([`Device::supports_dtype`]: f16 on a
    /// wgpu adapter with `SHADER_F16`, never bf16 on Burn's wgpu backend, whose WGSL has
    /// no bf16). Every product, sum and exponential is f32 on both paths; dL/dx and dL/dw
    /// come back in the dtype of their input, rounded once from f32 (as automatic mixed
    /// precision hands them out), the loss and the statistics in f32.
    ///
    /// # Panics
    ///
    /// Where [`MarginSoftmax::try_forward`] returns an error, with its message.
    pub fn forward(&self, features: Tensor<2>, labels: Tensor<1, Int>) -> MarginSoftmaxOutput {
        self.try_forward(features, labels)
            .unwrap_or_else(|e| panic!("MarginSoftmax: {e}"))
    }

    /// [`MarginSoftmax::forward`], or why these tensors are refused.
    pub fn try_forward(
        &self,
        features: Tensor<2>,
        labels: Tensor<1, Int>,
    ) -> Result<MarginSoftmaxOutput, Error> {
        let [num_classes, dim] = self.classes.dims();
        let [batch, feature_dim] = features.dims();
        if feature_dim != dim || batch == 0 {
            return Err(Error::Shape {
                what: "features",
                expected: format!("[B, {dim}] with B ≥ 1"),
                got: features.dims().to_vec(),
            });
        }
        if labels.dims() != [batch] {
            return Err(Error::Shape {
                what: "labels",
                expected: format!("[{batch}], one per feature row"),
                got: labels.dims().to_vec(),
            });
        }
        self.check_tensors(&features, &labels)?;
        let elements = element_types(features.dtype(), self.classes.val().dtype())
            .expect("check_tensors took f32, f16 and bf16 only");
        match fused(&features.device()) {
            Some(fused) => {
                let mut params = self.params;
                if let Some(scale) = &self.learned_scale {
                    // The kernels take s in their parameters: a device sync per step.
                    params.scale = scale.val().into_scalar::<f32>();
                    params.validate()?;
                }
                fused.plan(
                    margin_softmax::Shape::new(batch, dim, num_classes).with_elements(elements),
                )?;
                Ok(self.fused_forward(features, labels, params))
            }
            None => Ok(self.forward_composed(features, labels)),
        }
    }

    /// Every tensor on one device; the features, the class vectors and a learned scale
    /// each f32, f16 or bf16, of a dtype Burn's backend holds on that device.
    fn check_tensors(&self, features: &Tensor<2>, labels: &Tensor<1, Int>) -> Result<(), Error> {
        let classes = self.classes.val();
        let device = features.device();
        if classes.device() != device || labels.device() != device {
            return Err(Error::Config(format!(
                "the features are on {device:?}, the class vectors on {:?} and the labels on \
                 {:?}: move them to one device",
                classes.device(),
                labels.device()
            )));
        }
        let scale = self
            .learned_scale
            .as_ref()
            .map(|s| ("learned scale", s.val().dtype()));
        for (what, dtype) in [
            ("features", features.dtype()),
            ("class vectors", classes.dtype()),
        ]
        .into_iter()
        .chain(scale)
        {
            check_dtype(what, dtype, &device)?;
        }
        Ok(())
    }

    /// s as a tensor on `device`: the learned one, or the fixed one's value.
    pub fn scale(&self, device: &Device) -> Tensor<1> {
        match &self.learned_scale {
            Some(scale) => scale.val(),
            None => Tensor::full([1], self.params.scale, device),
        }
    }

    /// The composed twin on any device, the fused kernels' device too: the same
    /// mathematics from Burn's own operations, to compare with.
    pub fn forward_composed(
        &self,
        features: Tensor<2>,
        labels: Tensor<1, Int>,
    ) -> MarginSoftmaxOutput {
        let scale = self.scale(&features.device());
        composed::loss(features, self.classes.val(), scale, labels, &self.params)
    }

    /// The workspace the fused kernels hold on `device` for batches of `batch` rows
    /// (made on first use; allocated by the crate, not by Burn's pools), with features
    /// of the class vectors' dtype; `None` where the composed twin runs.
    pub fn workspace_bytes(&self, device: &Device, batch: usize) -> Result<Option<u64>, Error> {
        let [num_classes, dim] = self.classes.dims();
        let dtype = self.classes.val().dtype();
        check_dtype("class vectors", dtype, device)?;
        let elements = element_types(dtype, dtype).expect("check_dtype took it");
        let shape = margin_softmax::Shape::new(batch, dim, num_classes).with_elements(elements);
        match fused(device) {
            Some(fused) => Ok(Some(fused.plan(shape)?.workspace_bytes())),
            None => Ok(None),
        }
    }

    fn fused_forward(
        &self,
        features: Tensor<2>,
        labels: Tensor<1, Int>,
        params: LossParams,
    ) -> MarginSoftmaxOutput {
        let [batch, _] = features.dims();
        let [num_classes, _] = self.classes.dims();
        // Labels the kernels read as u32: clamped so that no i64 wraps onto a class
        // (−1 stays −1; any other value outside 0..C stays outside, and is flagged).
        let labels = if labels.dtype() == DType::I32 {
            labels
        } else {
            labels.clamp(-2, num_classes as i64)
        };
        let inputs = LossInputs {
            scale: self.scale(&features.device()).into_dispatch(),
            features: features.into_dispatch(),
            classes: self.classes.val().into_dispatch(),
            labels: labels.into_dispatch(),
        };
        let out = burn::backend::Dispatch::margin_softmax(inputs, params);
        let summary: Tensor<1> = Tensor::from_dispatch(out.summary);
        let words: Tensor<1, Int> = Tensor::from_dispatch(out.summary_words);
        let rows: Tensor<2> = Tensor::from_dispatch(out.rows);
        let row_words: Tensor<2, Int> = Tensor::from_dispatch(out.row_words);
        let column = |k: usize| rows.clone().narrow(1, k, 1).reshape([batch]);
        MarginSoftmaxOutput {
            loss: Tensor::from_dispatch(out.loss),
            rows: RowStatistics {
                loss: column(0),
                target_cos: column(1),
                best_other_cos: column(2),
                pred: row_words.narrow(1, 3, 1).reshape([batch]),
                achieved_margin: column(4),
                target_prob: column(5),
            },
            valid_rows: words.clone().narrow(0, 2, 1),
            correct_rows: words.clone().narrow(0, 3, 1),
            flags: words.clone().narrow(0, 4, 1),
            mean_achieved_margin: summary.narrow(0, 5, 1),
            margin_satisfied_rows: words.narrow(0, 6, 1),
        }
    }
}

/// f32, or f16 or bf16 where Burn's backend holds it on `device`
/// ([`Device::supports_dtype`]: storage, conversion and arithmetic, which the gradients'
/// product with the incoming gradient, their accumulation and an optimizer need).
fn check_dtype(what: &'static str, dtype: DType, device: &Device) -> Result<(), Error> {
    let reason = match dtype {
        DType::F32 => return Ok(()),
        DType::F16 | DType::BF16 if device.supports_dtype(dtype) => return Ok(()),
        DType::F16 | DType::BF16 => {
            let why = match (dtype, is_wgpu(device)) {
                (DType::BF16, true) => {
                    ": Burn's wgpu backend compiles its kernels to WGSL, which has no bf16"
                }
                (_, true) => ": the wgpu adapter lacks SHADER_F16",
                _ => "",
            };
            format!(
                "Burn's backend does not hold {dtype:?} on {device:?} (Device::supports_dtype \
                 is false{why}); cast to f32 (or to f16 where the device supports it)"
            )
        }
        _ => "the loss takes f32, f16 or bf16; cast with .cast(DType::F32)".to_string(),
    };
    Err(Error::Dtype {
        what,
        dtype,
        reason,
    })
}
