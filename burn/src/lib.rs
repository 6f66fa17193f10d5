//! # margin-softmax-burn
//!
//! The margin-softmax loss (AM-Softmax/CosFace, ArcFace, SphereFace-style, the hard
//! objective) as a Burn module. On Burn's wgpu backend, with or without autodiff, it
//! records the crate's fused WGSL kernels on Burn's own device, queue and buffers; on
//! every other backend it runs the same mathematics composed from Burn's operations.
//!
//! ```no_run
//! use burn::tensor::{Int, Tensor};
//! use margin_softmax_burn::MarginSoftmaxConfig;
//!
//! let device = margin_softmax_burn::wgpu_device()?.autodiff();
//! let head = MarginSoftmaxConfig::new(1000, 128).with_scale(30.0).with_margin(0.35).init(&device);
//! let features = Tensor::<2>::random([64, 128], burn::tensor::Distribution::Default, &device).require_grad();
//! let labels = Tensor::<1, Int>::arange(0..64, &device);
//! let out = head.forward(features.clone(), labels);
//! let grads = out.loss.backward();
//! let dx = features.grad(&grads);
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
