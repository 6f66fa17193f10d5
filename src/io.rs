//! The device API's data: shapes, the caller's buffer regions, and the layouts of the
//! per-row statistics and the per-call summary.

use crate::error::{Error, Result};

/// The problem's dimensions: B rows of x, D values per vector, C classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// B: rows of x (samples).
    pub batch: usize,
    /// D: length of every feature and class vector.
    pub dim: usize,
    /// C: rows of w (classes).
    pub classes: usize,
}

impl Shape {
    /// A shape of B rows, D values per vector and C classes.
    pub fn new(batch: usize, dim: usize, classes: usize) -> Shape {
        Shape {
            batch,
            dim,
            classes,
        }
    }

    pub(crate) fn check_nonempty(&self) -> Result<()> {
        for (dimension, n) in [
            ("batch", self.batch),
            ("dim", self.dim),
            ("classes", self.classes),
        ] {
            if n == 0 {
                return Err(Error::EmptyShape { dimension });
            }
        }
        Ok(())
    }
}

/// Per-row statistics, as the device API writes them (24 bytes per row).
/// Mirrors `struct RowStats` in `shaders/forward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowStats {
    /// L_i (0 for an ignored row).
    pub loss: f32,
    /// c_iy, the target cosine (0 for an ignored row).
    pub target_cos: f32,
    /// The largest non-target cosine (over all classes for an ignored row; -1 when C = 1).
    pub best_other_cos: f32,
    /// argmax_j c_ij, the lowest index on ties.
    pub pred: u32,
    /// c_iy − max_{j≠y} c_ij, the achieved margin (0 for an ignored row).
    pub achieved_margin: f32,
    /// p_iy, the margin softmax's probability of the label (0 for an ignored row).
    pub target_prob: f32,
}

/// Per-call totals, as the device API writes them (32 bytes).
/// Mirrors `struct Summary` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Summary {
    /// The reduced loss (the sum for [`crate::Reduction::None`]).
    pub loss: f32,
    /// dL/ds of the reduced loss (0 when s < s_min).
    pub scale_grad: f32,
    /// N, the rows whose label is a class.
    pub valid_rows: u32,
    /// Valid rows whose predicted class is the label.
    pub correct_rows: u32,
    /// Bits of [`flags`]: non-finite x or w, a label ≥ C that is not IGNORE, overflow.
    pub flags: u32,
    /// Mean over valid rows of the achieved margin c_iy − max_{j≠y} c_ij.
    pub mean_achieved_margin: f32,
    /// Valid rows whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: u32,
    _pad: u32,
}

/// Bits of [`Summary::flags`].
pub mod flags {
    /// x holds NaN or infinity.
    pub const FEATURES_NON_FINITE: u32 = 1;
    /// w holds NaN or infinity.
    pub const CLASSES_NON_FINITE: u32 = 2;
    /// A label is ≥ C and not IGNORE (the row was treated as ignored).
    pub const LABEL_OUT_OF_RANGE: u32 = 4;
    /// A loss or log-sum-exp is not finite: the raw dot products x·w overflowed f32.
    pub const OVERFLOW: u32 = 8;
}

/// A region of a caller's buffer: `buffer[offset..offset + size]`, the size given by the shape.
#[derive(Debug, Clone, Copy)]
pub struct BufferRegion<'a> {
    /// The buffer. It needs `BufferUsages::STORAGE`.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset; a multiple of the device's `min_storage_buffer_offset_alignment` (256 on most).
    pub offset: u64,
}

impl<'a> From<&'a wgpu::Buffer> for BufferRegion<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        BufferRegion { buffer, offset: 0 }
    }
}

/// The inputs of the device API. All row-major, tightly packed.
#[derive(Debug, Clone, Copy)]
pub struct DeviceInputs<'a> {
    /// x: B×D `f32`.
    pub features: BufferRegion<'a>,
    /// w: C×D `f32`.
    pub classes: BufferRegion<'a>,
    /// y: B `u32`, each in 0..C or [`crate::IGNORE`].
    pub labels: BufferRegion<'a>,
}

/// The outputs of the device API.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOutputs<'a> {
    /// B [`RowStats`] (24 bytes each).
    pub row_stats: BufferRegion<'a>,
    /// One [`Summary`] (32 bytes).
    pub summary: BufferRegion<'a>,
    /// The gradients; `None` records the forward pass only.
    pub grads: Option<GradOutputs<'a>>,
}

/// Gradient outputs of the device API; every element is overwritten.
#[derive(Debug, Clone, Copy)]
pub struct GradOutputs<'a> {
    /// dL/dx: B×D `f32`.
    pub features: BufferRegion<'a>,
    /// dL/dw: C×D `f32`.
    pub classes: BufferRegion<'a>,
}

impl<'a> DeviceInputs<'a> {
    /// x, w and the labels, each a whole buffer.
    pub(crate) fn whole(
        features: &'a wgpu::Buffer,
        classes: &'a wgpu::Buffer,
        labels: &'a wgpu::Buffer,
    ) -> Self {
        DeviceInputs {
            features: BufferRegion::from(features),
            classes: BufferRegion::from(classes),
            labels: BufferRegion::from(labels),
        }
    }
}

impl<'a> DeviceOutputs<'a> {
    /// The row statistics and the summary, each a whole buffer, and `grads`.
    pub(crate) fn whole(
        row_stats: &'a wgpu::Buffer,
        summary: &'a wgpu::Buffer,
        grads: Option<GradOutputs<'a>>,
    ) -> Self {
        DeviceOutputs {
            row_stats: BufferRegion::from(row_stats),
            summary: BufferRegion::from(summary),
            grads,
        }
    }
}

/// A caller's region with its role and the bytes the shape needs there.
pub(crate) struct Region<'a> {
    pub role: &'static str,
    pub region: BufferRegion<'a>,
    pub bytes: u64,
}

/// The first three regions are inputs, the rest outputs. An output may not share a buffer
/// with an input (WebGPU forbids one buffer as read-only and writable storage in one
/// dispatch), and outputs may not overlap.
pub(crate) fn check_aliasing(regions: &[Region<'_>]) -> Result<()> {
    let (inputs, outputs) = regions.split_at(3);
    for (k, out) in outputs.iter().enumerate() {
        if let Some(input) = inputs.iter().find(|i| i.region.buffer == out.region.buffer) {
            return Err(Error::BadBuffer {
                role: out.role,
                reason: format!(
                    "it shares a buffer with input {}; WebGPU forbids binding one buffer as read-only \
                     and writable storage in one dispatch, so keep outputs in other buffers",
                    input.role
                ),
            });
        }
        let overlaps = |other: &Region<'_>| {
            other.region.buffer == out.region.buffer
                && other.region.offset < out.region.offset + out.bytes
                && out.region.offset < other.region.offset + other.bytes
        };
        if let Some(other) = outputs[k + 1..].iter().find(|o| overlaps(o)) {
            return Err(Error::BadBuffer {
                role: out.role,
                reason: format!(
                    "it overlaps output {}; give each output its own range",
                    other.role
                ),
            });
        }
    }
    Ok(())
}

/// Label value meaning "ignore this row" (`-1i32 as u32`).
pub const IGNORE: u32 = u32::MAX;

/// Everything one call of the slice API returns.
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput {
    /// The reduced loss (mean or sum over non-ignored rows; the sum for `Reduction::None`).
    pub loss: f32,
    /// L_i per row (0 for ignored rows).
    pub row_loss: Vec<f32>,
    /// dL/ds of the reduced loss (0 when s < s_min).
    pub grad_scale: f32,
    /// argmax_j c_ij per row.
    pub pred: Vec<u32>,
    /// c_iy per row (0 for ignored rows).
    pub target_cos: Vec<f32>,
    /// The largest non-target cosine per row (-1 when C = 1).
    pub best_other_cos: Vec<f32>,
    /// c_iy − max_{j≠y} c_ij per row (0 for ignored rows).
    pub achieved_margin: Vec<f32>,
    /// p_iy per row: the margin softmax's probability of the label (0 for ignored rows).
    pub target_prob: Vec<f32>,
    /// Mean achieved margin over the rows not ignored.
    pub mean_achieved_margin: f32,
    /// Rows not ignored whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: u32,
    /// N, the rows not ignored.
    pub valid_rows: u32,
    /// Rows not ignored whose prediction is the label.
    pub correct_rows: u32,
    /// dL/dx (B×D) and dL/dw (C×D), for [`Pass::ForwardBackward`](crate::Pass::ForwardBackward).
    pub grads: Option<Gradients>,
}

/// The gradients of the reduced loss.
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients {
    /// dL/dx, B×D row-major.
    pub features: Vec<f32>,
    /// dL/dw, C×D row-major.
    pub classes: Vec<f32>,
}

/// Checks lengths and labels on the host, before anything reaches the GPU.
pub(crate) fn check_slices(
    shape: Shape,
    features: &[f32],
    classes: &[f32],
    labels: &[u32],
) -> Result<()> {
    shape.check_nonempty()?;
    let classes_len = (
        "classes",
        shape.classes.saturating_mul(shape.dim),
        classes.len(),
    );
    check_batch(shape, features, Some(classes_len), labels, shape.classes)
}

/// Checks the lengths of x, (optionally) w and the labels, then that every label is in
/// 0..`total_classes` or IGNORE.
pub(crate) fn check_batch(
    shape: Shape,
    features: &[f32],
    classes: Option<(&'static str, usize, usize)>,
    labels: &[u32],
    total_classes: usize,
) -> Result<()> {
    let lengths = [(
        "features",
        shape.batch.saturating_mul(shape.dim),
        features.len(),
    )]
    .into_iter()
    .chain(classes)
    .chain([("labels", shape.batch, labels.len())]);
    for (input, expected, actual) in lengths {
        if expected != actual {
            return Err(Error::LengthMismatch {
                input,
                expected,
                actual,
            });
        }
    }
    if let Some((row, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l != IGNORE && l as usize >= total_classes)
    {
        return Err(Error::LabelOutOfRange {
            row: Some(row),
            label: Some(label),
            classes: total_classes,
        });
    }
    Ok(())
}
