//! The module's errors: each says what to change.

use std::fmt;

/// Why the module could not be built or run.
#[derive(Debug)]
pub enum Error {
    /// The core crate refused the problem (parameters, sizes, buffers, the device).
    Core(margin_softmax::Error),
    /// wgpu or CubeCL could not bring up or register the device.
    Setup(String),
    /// A tensor's shape does not fit the module.
    Shape {
        /// Which tensor.
        what: &'static str,
        /// The shape the module needs.
        expected: String,
        /// The shape it was given.
        got: Vec<usize>,
    },
    /// A tensor's element type the module does not take, or that Burn's backend cannot
    /// hold on the tensor's device (bf16 on Burn's wgpu backend, whose WGSL compiler has
    /// no bf16 type; f16 on an adapter without `SHADER_F16`).
    Dtype {
        /// Which tensor.
        what: &'static str,
        /// Its element type.
        dtype: burn::tensor::DType,
        /// Why it is refused, and what to do.
        reason: String,
    },
    /// A setting the module does not take.
    Config(String),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Core(e) => write!(f, "{e}"),
            Error::Setup(why) => write!(f, "the wgpu device could not be set up: {why}"),
            Error::Shape {
                what,
                expected,
                got,
            } => write!(f, "{what} has shape {got:?}; the module needs {expected}"),
            Error::Dtype {
                what,
                dtype,
                reason,
            } => write!(f, "{what} of dtype {dtype:?}: {reason}"),
            Error::Config(why) => write!(f, "{why}"),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Error::Core(e) => Some(e),
            _ => None,
        }
    }
}

impl From<margin_softmax::Error> for Error {
    fn from(e: margin_softmax::Error) -> Self {
        Error::Core(e)
    }
}
