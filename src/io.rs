//! The device API's data: shapes, the caller's buffer regions, and the layouts of the
//! per-row statistics and the per-call summary.

use crate::context::Context;
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

pub(crate) fn check_region(ctx: &Context, r: &Region<'_>) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::BadBuffer {
            role: r.role,
            reason,
        })
    };
    let buffer = r.region.buffer;
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return bad("it lacks BufferUsages::STORAGE; create it with STORAGE usage".into());
    }
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
    if !r.region.offset.is_multiple_of(align) {
        return bad(format!(
            "offset {} is not a multiple of {align} (min_storage_buffer_offset_alignment)",
            r.region.offset
        ));
    }
    let end = r.region.offset.checked_add(r.bytes);
    if end.is_none_or(|end| end > buffer.size()) {
        return bad(format!(
            "it holds {} bytes but offset {} + {} bytes are needed; make it larger",
            buffer.size(),
            r.region.offset,
            r.bytes
        ));
    }
    probe_region(ctx, r)
}

/// Binds four bytes of the region, alone, inside an error scope: a buffer of another device
/// of the same wgpu instance is refused there (wgpu's validation error), and becomes
/// [`Error::BadBuffer`] before the caller's encoder is touched. A buffer of another wgpu
/// instance makes wgpu-core panic where its id is unknown here (caught, and the same
/// error); where its id happens to name one of this instance's buffers, wgpu cannot tell.
fn probe_region(ctx: &Context, r: &Region<'_>) -> Result<()> {
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let bound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("region probe"),
            layout: &ctx.region_probe,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: r.region.buffer,
                    offset: r.region.offset,
                    // Four bytes tell the device; the range was checked above.
                    size: std::num::NonZeroU64::new(4),
                }),
            }],
        })
    }));
    let refused = pollster::block_on(scope.pop());
    match (bound, refused) {
        (Ok(_), None) => Ok(()),
        (_, Some(e)) => Err(Error::BadBuffer {
            role: r.role,
            reason: format!(
                "wgpu refused to bind it ({}); pass a buffer of this context's device \
                 (Context::from_device wraps an engine's own)",
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }),
        (Err(_), None) => Err(Error::BadBuffer {
            role: r.role,
            reason: "it belongs to another wgpu instance; pass a buffer of this context's \
                     device (Context::from_device wraps an engine's own)"
                .into(),
        }),
    }
}
