//! # margin-softmax
//!
//! The margin-softmax family (AM-Softmax / CosFace, ArcFace, SphereFace-style) and its
//! gradients, fused in WGSL compute shaders and run through wgpu. The default chunked
//! plan runs three GEMMs and keeps G for as many rows (or, for small budgets, as large a
//! block of classes) as a workspace budget holds; the memory-minimal plan never
//! materialises any of the B×C logits. For AM-Softmax:
//!
//! ```text
//! c_ij = x̂_i·ŵ_j   (x̂ = x / max(‖x‖, ε), ŵ likewise)
//! z_ij = s·(c_ij − m·[j = y_i])
//! L_i  = logsumexp_j z_ij − z_{i,y_i},   L = mean over rows not ignored
//! ```
//!
//! Two APIs share one [`Context`] (device, queue, pipelines compiled on first use):
//! - the slice API, [`Context::loss`], takes host slices and returns host vectors;
//! - the device API, [`Plan::record`], records into the caller's command encoder on the
//!   caller's buffers, so a training loop on the GPU never leaves it.
//!
//! [`reference`](mod@reference) is the f64 CPU twin of every kernel.
//!
//! ```no_run
//! use margin_softmax::{Context, LossParams, Pass, Shape};
//! let ctx = Context::new_default()?;
//! let shape = Shape::new(2, 3, 4);
//! let x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0];
//! let w = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0];
//! let out = ctx.loss(shape, &x, &w, &[0, 1], &LossParams::default(), Pass::ForwardBackward)?;
//! println!("loss {} dL/ds {}", out.loss, out.grad_scale);
//! # Ok::<(), margin_softmax::Error>(())
//! ```

#![warn(missing_docs)]

mod api;
pub mod bench;
mod context;
mod error;
mod io;
mod kernels;
mod params;
mod plan;
mod problem;
pub mod reference;
pub mod schedule;
pub mod shard;
pub mod sphere;
#[cfg(feature = "cli")]
pub mod tensors;
mod timing;
mod tune;

pub use api::Pass;
pub use context::{
    enumerate_adapters, parse_backends, Context, ContextOptions, Tuning, DEFAULT_WORKSPACE_BUDGET,
};
pub use error::{Error, Result};
/// The `half` crate, whose `f16` and `bf16` the slice API takes (feature `half`).
#[cfg(feature = "half")]
pub use half;
pub use io::{
    flags, BufferRegion, DeviceInputs, DeviceOutputs, Element, ElementType, ElementTypes,
    GradOutputs, Gradients, HostInputs, LossOutput, RowStats, Shape, Summary, IGNORE,
};
pub use kernels::{GemmCandidate, TileConfig};
pub use params::{
    cosface_scale_floor, LearnableScale, LossParams, MagFace, Objective, Reduction, TargetGradient,
    ANGLE_CLIP, MAX_MARGIN, MAX_MULTIPLICATIVE_MARGIN, MAX_SCALE, SIN_GUARD,
};
pub use plan::{workspace_bytes, Algorithm, Plan};
pub use problem::{Problem, SplitMix64};
pub use tune::{Bucket, Tuned};

/// The README's examples, compiled as doctests so that they stay true.
#[doc = include_str!("../README.md")]
#[cfg(doctest)]
pub struct ReadmeDoctests;
