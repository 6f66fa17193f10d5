//! # margin-softmax-burn
//!
//! The margin-softmax loss (AM-Softmax/CosFace, ArcFace, SphereFace-style, the hard
//! objective) as a Burn module. On Burn's wgpu backend, with or without autodiff, it
//! records the crate's fused WGSL kernels on Burn's own device, queue and buffers; on
//! every other backend it runs the same mathematics composed from Burn's operations.
//!
//! ```no_run
//! # use burn::module::Module;
//! # use burn::nn::{Linear, LinearConfig};
//! # use burn::optim::{AdamConfig, GradientsParams};
//! # use burn::tensor::{Int, Tensor};
//! use margin_softmax_burn::{MarginSoftmax, MarginSoftmaxConfig};
//! # #[derive(Module, Debug)]
//! # struct Model { backbone: Linear, head: MarginSoftmax }
//! # let (num_classes, dim, lr) = (1000, 128, 1e-3);
//! let device = margin_softmax_burn::wgpu_device()?.autodiff(); // Burn's default wgpu device, kernels on it
//! let head = MarginSoftmaxConfig::new(num_classes, dim)         // class vectors: Param<Tensor<2>>
//!     .with_scale(30.0).with_margin(0.35)                       // or .with_angular_margin(0.5), …
//!     .init(&device);
//! # let mut model = Model { backbone: LinearConfig::new(64, dim).init(&device), head };
//! # let mut optimizer = AdamConfig::new().init();
//! # let images = Tensor::<2>::zeros([32, 64], &device);
//! # let labels = Tensor::<1, Int>::zeros([32], &device);
//! let out = model.head.forward(model.backbone.forward(images), labels); // [B, D], [B] Int (−1 ignores)
//! let grads = GradientsParams::from_grads(out.loss.backward(), &model); // reaches the backbone and w
//! model = optimizer.step(lr, model, grads);                     // out.rows: loss, cosines, pred, p_y per row
//! # Ok::<(), margin_softmax_burn::Error>(())
//! ```

#![warn(missing_docs)]

mod composed;
mod device;
mod error;
mod fused;
mod module;

pub use burn;
pub use device::{is_fused, register_setup, wgpu_device};
pub use error::Error;
pub use module::{
    MarginGradient, MarginObjective, MarginReduction, MarginSoftmax, MarginSoftmaxConfig,
    MarginSoftmaxOutput, RowStatistics,
};
