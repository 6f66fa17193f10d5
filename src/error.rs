//! The crate's one error type. Every variant says what to change.

use std::fmt;
use std::time::Duration;

/// Everything that can go wrong in a call. Each message names the input and what to change.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Error {
    /// No wgpu adapter matched the request.
    NoAdapter {
        /// What was asked for (backend and name filter).
        wanted: String,
    },
    /// The adapter refused to create a device.
    RequestDevice(String),
    /// A dimension of the problem is zero.
    EmptyShape {
        /// `"batch"`, `"dim"` or `"classes"`.
        dimension: &'static str,
    },
    /// A host slice has the wrong number of elements.
    LengthMismatch {
        /// The input (`"features"`, `"classes"` or `"labels"`).
        input: &'static str,
        /// Elements expected from the shape.
        expected: usize,
        /// Elements given.
        actual: usize,
    },
    /// A label is neither in `0..classes` nor [`crate::IGNORE`].
    LabelOutOfRange {
        /// Row of the first bad label (`None` when detected on the device, where the row is not tracked).
        row: Option<usize>,
        /// The bad label (`None` when detected on the device).
        label: Option<u32>,
        /// C.
        classes: usize,
    },
    /// A parameter is invalid.
    InvalidParameter {
        /// The parameter.
        name: &'static str,
        /// Its value.
        value: f32,
        /// What it must satisfy.
        requirement: &'static str,
    },
    /// An input holds NaN or infinity.
    NonFinite {
        /// `"features"` or `"classes"`.
        input: &'static str,
    },
    /// The products of feature and class norms overflow f32 (|x_i|·|w_j| near 3e38).
    Overflow,
    /// A finite gradient value is too large for the 16-bit type it is stored in: it
    /// would round to ±inf.
    GradientOutOfRange {
        /// `"grad_features"` or `"grad_classes"`.
        tensor: &'static str,
        /// Its storage type.
        element: crate::ElementType,
    },
    /// A buffer or dispatch would exceed a limit: the adapter's, or a lower one the
    /// context was given ([`crate::ContextOptions::max_binding_bytes`], the workspace
    /// budget).
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// Its size.
        size: u64,
        /// The limit it exceeds.
        limit: u64,
    },
    /// The host could not allocate memory for an input or output the call needs.
    HostMemory {
        /// What the memory was for.
        what: &'static str,
        /// Bytes asked for (saturated at `u64::MAX` where the count overflows).
        bytes: u64,
    },
    /// A caller's buffer region is unusable for the device API.
    BadBuffer {
        /// The buffer's role (for example `"grad_features"`).
        role: &'static str,
        /// What is wrong and what to change.
        reason: String,
    },
    /// wgpu reported a validation or out-of-memory error; the message is wgpu's.
    Gpu(String),
    /// The device was lost or a wait failed; later calls on this context also fail.
    DeviceLost(String),
    /// No GEMM candidate has this name (`ContextOptions::gemm_candidate`,
    /// `MARGIN_SOFTMAX_GEMM`).
    UnknownCandidate {
        /// The name asked for.
        name: String,
        /// The candidates this adapter allows.
        known: String,
    },
    /// The GPU did not finish within the context's timeout.
    Timeout {
        /// The timeout that expired.
        timeout: Duration,
    },
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NoAdapter { wanted } => write!(
                f,
                "no wgpu adapter found ({wanted}); install a Vulkan, Metal or DX12 driver \
                 (on Debian: apt-get install -y mesa-vulkan-drivers) or change WGPU_BACKEND / WGPU_ADAPTER_NAME"
            ),
            Error::RequestDevice(m) => write!(f, "the adapter refused to create a device: {m}"),
            Error::EmptyShape { dimension } => {
                write!(f, "{dimension} is 0; every dimension must be at least 1")
            }
            Error::LengthMismatch { input, expected, actual } => write!(
                f,
                "{input} has {actual} elements but the shape needs {expected}; pass a slice of exactly {expected}"
            ),
            Error::LabelOutOfRange { row, label, classes } => match (row, label) {
                (Some(r), Some(l)) => write!(
                    f,
                    "label {l} of row {r} is not a class: labels must be in 0..{classes}, or u32::MAX (-1) to ignore the row"
                ),
                _ => write!(
                    f,
                    "a label is not a class: labels must be in 0..{classes}, or u32::MAX (-1) to ignore the row"
                ),
            },
            Error::InvalidParameter { name, value, requirement } => {
                write!(f, "parameter {name} = {value} is invalid: it must be {requirement}")
            }
            Error::NonFinite { input } => {
                write!(f, "{input} holds NaN or infinity; every value must be finite")
            }
            Error::Overflow => write!(
                f,
                "a logit or a gradient overflowed f32: the norms of features and class vectors \
                 multiply past 3e38, or LossParams::loss_scale lifts a gradient past it; scale \
                 x or w down (the loss only depends on their directions), or lower the loss scale"
            ),
            Error::GradientOutOfRange { tensor, element } => write!(
                f,
                "{tensor}: a gradient value is too large for {} and would round to infinity; \
                 lower LossParams::loss_scale (halve it, as a gradient scaler does), or store \
                 {tensor} in f32",
                element.name()
            ),
            Error::TooLarge { what, size, limit } => write!(
                f,
                "{what} needs {size} but the limit is {limit}; use a smaller problem, raise \
                 ContextOptions::max_binding_bytes or ContextOptions::workspace_budget if they \
                 were set below the adapter's limits, or use an adapter with larger limits"
            ),
            Error::HostMemory { what, bytes } => write!(
                f,
                "cannot allocate {bytes} bytes of host memory for {what}; use a smaller problem"
            ),
            Error::BadBuffer { role, reason } => write!(f, "buffer {role}: {reason}"),
            Error::Gpu(m) => write!(f, "wgpu reported an error: {m}"),
            Error::DeviceLost(m) => {
                write!(f, "the GPU device is lost ({m}); create a new context")
            }
            Error::UnknownCandidate { name, known } => write!(
                f,
                "no GEMM candidate is named {name:?}; pick one of: {known} (ContextOptions::gemm_candidate or MARGIN_SOFTMAX_GEMM)"
            ),
            Error::Timeout { timeout } => write!(
                f,
                "the GPU did not finish within {timeout:?}; raise the timeout with Context::set_timeout or use a smaller problem"
            ),
        }
    }
}

impl std::error::Error for Error {}

/// Result with the crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
