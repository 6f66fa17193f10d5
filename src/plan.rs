//! Plans: for one problem shape, the workspace buffers and the dispatch geometry, and the
//! recording of the fused passes into a command encoder.

use std::num::NonZeroU64;

use crate::context::Context;
use crate::error::{Error, Result};
use crate::kernels::{Binding, GpuParams, Kernel, ROW_KERNEL_WORKGROUP};
use crate::params::LossParams;

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

/// Per-row statistics, as the device API writes them (16 bytes per row).
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
    /// Bit 0: non-finite x; bit 1: non-finite w; bit 2: a label ≥ C that is not IGNORE.
    pub flags: u32,
    _pad: [u32; 3],
}

/// Bits of [`Summary::flags`].
pub mod flags {
    /// x holds NaN or infinity.
    pub const FEATURES_NON_FINITE: u32 = 1;
    /// w holds NaN or infinity.
    pub const CLASSES_NON_FINITE: u32 = 2;
    /// A label is ≥ C and not IGNORE (the row was treated as ignored).
    pub const LABEL_OUT_OF_RANGE: u32 = 4;
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
    /// B [`RowStats`] (16 bytes each).
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

/// How the class axis is cut for one shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Geometry {
    pub row_tiles: u32,
    pub class_tiles: u32,
    pub forward_splits: u32,
    pub forward_split_classes: u32,
    pub feature_splits: u32,
    pub feature_split_classes: u32,
}

/// Workgroups the split passes aim for, so that a small batch still fills the device.
const TARGET_WORKGROUPS: u32 = 512;
/// Most forward splits: each costs 24 bytes per row of workspace.
const MAX_FORWARD_SPLITS: u32 = 32;
/// Most feature-gradient splits: each costs a B×D partial of workspace.
const MAX_FEATURE_SPLITS: u32 = 8;
/// Bytes of one `SplitPartial` in `shaders/forward.wgsl`.
const SPLIT_PARTIAL_BYTES: u64 = 24;
/// Bytes of one `RowSoftmax` in `shaders/common.wgsl`.
const ROW_SOFTMAX_BYTES: u64 = 8;

fn div_ceil(a: u32, b: u32) -> u32 {
    a.div_ceil(b)
}

/// Cuts `class_tiles` tiles into at most `max_splits` contiguous splits of equal whole
/// tiles, none empty; returns (splits, classes per split).
fn class_splits(
    classes: u32,
    class_tiles: u32,
    row_tiles: u32,
    max_splits: u32,
    tile: u32,
) -> (u32, u32) {
    let wanted = div_ceil(TARGET_WORKGROUPS, row_tiles).clamp(1, max_splits.min(class_tiles));
    let split_classes = div_ceil(class_tiles, wanted) * tile;
    (div_ceil(classes, split_classes), split_classes)
}

impl Geometry {
    fn new(ctx: &Context, shape: Shape) -> Result<Geometry> {
        shape.check_nonempty()?;
        let limit = u64::from(ctx.limits.max_compute_workgroups_per_dimension);
        let as_u32 = |what, n: usize| {
            u32::try_from(n).map_err(|_| Error::TooLarge {
                what,
                size: n as u64,
                limit: u64::from(u32::MAX),
            })
        };
        let batch = as_u32("batch", shape.batch)?;
        let classes = as_u32("classes", shape.classes)?;
        as_u32("dim", shape.dim)?;
        let tiles = ctx.tiles;
        let row_tiles = div_ceil(batch, tiles.tile_rows());
        let class_tiles = div_ceil(classes, tiles.tile_classes());
        if u64::from(row_tiles) > limit {
            return Err(Error::TooLarge {
                what: "row tiles (batch / tile rows) in one dispatch dimension",
                size: u64::from(row_tiles),
                limit,
            });
        }
        let (forward_splits, forward_split_classes) = class_splits(
            classes,
            class_tiles,
            row_tiles,
            MAX_FORWARD_SPLITS,
            tiles.tile_classes(),
        );
        let (feature_splits, feature_split_classes) = class_splits(
            classes,
            class_tiles,
            row_tiles,
            MAX_FEATURE_SPLITS,
            tiles.tile_classes(),
        );
        Ok(Geometry {
            row_tiles,
            class_tiles,
            forward_splits,
            forward_split_classes,
            feature_splits,
            feature_split_classes,
        })
    }
}

/// Sizes in bytes of each workspace buffer for a shape.
#[derive(Debug, Clone, Copy)]
struct WorkspaceSizes {
    inv_norm_features: u64,
    inv_norm_classes: u64,
    split_partials: u64,
    row_softmax: u64,
    feature_grad_partials: u64,
}

impl WorkspaceSizes {
    fn new(shape: Shape, g: &Geometry) -> WorkspaceSizes {
        let b = shape.batch as u64;
        WorkspaceSizes {
            inv_norm_features: 4 * b,
            inv_norm_classes: 4 * shape.classes as u64,
            split_partials: SPLIT_PARTIAL_BYTES * b * u64::from(g.forward_splits),
            row_softmax: ROW_SOFTMAX_BYTES * b,
            feature_grad_partials: 4 * b * shape.dim as u64 * u64::from(g.feature_splits),
        }
    }

    fn total(&self) -> u64 {
        self.inv_norm_features
            + self.inv_norm_classes
            + self.split_partials
            + self.row_softmax
            + self.feature_grad_partials
            + FLAGS_BYTES
            + PARAMS_BYTES
    }
}

const FLAGS_BYTES: u64 = 4;
const PARAMS_BYTES: u64 = std::mem::size_of::<GpuParams>() as u64;

/// The workspace and dispatch geometry for one shape on one context. Reuse it across
/// calls of that shape: it allocates nothing after creation.
#[derive(Debug)]
pub struct Plan {
    shape: Shape,
    geometry: Geometry,
    workspace_bytes: u64,
    params: wgpu::Buffer,
    input_flags: wgpu::Buffer,
    inv_norm_features: wgpu::Buffer,
    inv_norm_classes: wgpu::Buffer,
    split_partials: wgpu::Buffer,
    row_softmax: wgpu::Buffer,
    feature_grad_partials: wgpu::Buffer,
}

/// Bytes of workspace the crate allocates for `shape` on `ctx`, beyond the caller's
/// inputs and outputs: O(B·(splits + D·feature_splits) + C), independent of B·C.
pub fn workspace_bytes(ctx: &Context, shape: Shape) -> Result<u64> {
    let g = Geometry::new(ctx, shape)?;
    Ok(WorkspaceSizes::new(shape, &g).total())
}

/// Which binding sizes a caller region must cover, per role.
struct Region<'a> {
    role: &'static str,
    region: BufferRegion<'a>,
    bytes: u64,
}

impl Plan {
    /// Allocates the workspace for `shape`. Fails with [`Error::TooLarge`] where a buffer
    /// would exceed the device's limits.
    pub fn new(ctx: &Context, shape: Shape) -> Result<Plan> {
        ctx.check_alive()?;
        let geometry = Geometry::new(ctx, shape)?;
        let sizes = WorkspaceSizes::new(shape, &geometry);
        let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        for (what, size) in [
            ("features (B·D·4 bytes)", b * d * 4),
            ("class vectors (C·D·4 bytes)", c * d * 4),
            (
                "feature-gradient partials (splits·B·D·4 bytes)",
                sizes.feature_grad_partials,
            ),
            ("split partials", sizes.split_partials),
        ] {
            if size > max_binding {
                return Err(Error::TooLarge {
                    what,
                    size,
                    limit: max_binding,
                });
            }
        }
        let storage = |label, size: u64| {
            ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        Ok(Plan {
            shape,
            geometry,
            workspace_bytes: sizes.total(),
            params: ctx.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("params"),
                size: PARAMS_BYTES,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
            input_flags: storage("input_flags", FLAGS_BYTES),
            inv_norm_features: storage("inv_norm_features", sizes.inv_norm_features),
            inv_norm_classes: storage("inv_norm_classes", sizes.inv_norm_classes),
            split_partials: storage("split_partials", sizes.split_partials),
            row_softmax: storage("row_softmax", sizes.row_softmax),
            feature_grad_partials: storage("feature_grad_partials", sizes.feature_grad_partials),
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// Bytes this plan allocated (its whole workspace).
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace_bytes
    }

    /// Records the fused loss into the caller's `encoder`: the forward pass, and the
    /// backward pass when `outputs.grads` is set. Nothing is submitted or read back.
    ///
    /// The parameters are uploaded with `Queue::write_buffer`, so they take effect at the
    /// next submit: record a plan at most once per submit (use one plan per call site).
    /// Input regions must hold the shape's elements; they are only read. Output regions
    /// are written exactly over their documented sizes and nowhere else.
    pub fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
    ) -> Result<()> {
        ctx.check_alive()?;
        params.validate()?;
        let (b, c, d) = (
            self.shape.batch as u64,
            self.shape.classes as u64,
            self.shape.dim as u64,
        );
        let mut regions = vec![
            Region {
                role: "features",
                region: inputs.features,
                bytes: b * d * 4,
            },
            Region {
                role: "classes",
                region: inputs.classes,
                bytes: c * d * 4,
            },
            Region {
                role: "labels",
                region: inputs.labels,
                bytes: b * 4,
            },
            Region {
                role: "row_stats",
                region: outputs.row_stats,
                bytes: b * std::mem::size_of::<RowStats>() as u64,
            },
            Region {
                role: "summary",
                region: outputs.summary,
                bytes: std::mem::size_of::<Summary>() as u64,
            },
        ];
        if let Some(grads) = &outputs.grads {
            regions.push(Region {
                role: "grad_features",
                region: grads.features,
                bytes: b * d * 4,
            });
            regions.push(Region {
                role: "grad_classes",
                region: grads.classes,
                bytes: c * d * 4,
            });
        }
        for r in &regions {
            check_region(ctx, r)?;
        }
        check_aliasing(&regions)?;
        let g = &self.geometry;
        let mut gpu = GpuParams {
            batch: self.shape.batch as u32,
            dim: self.shape.dim as u32,
            classes: self.shape.classes as u32,
            forward_splits: g.forward_splits,
            forward_split_classes: g.forward_split_classes,
            feature_splits: g.feature_splits,
            feature_split_classes: g.feature_split_classes,
            reduction: 0,
            scale: 0.0,
            margin: 0.0,
            scale_grad_gate: 0.0,
            _pad: 0,
        };
        gpu.set_loss(params);
        ctx.queue
            .write_buffer(&self.params, 0, bytemuck::bytes_of(&gpu));
        encoder.clear_buffer(&self.input_flags, 0, None);

        let bind = |kernel: &Kernel| -> Result<wgpu::BindGroup> {
            let entries = kernel
                .bindings
                .iter()
                .map(|&binding| {
                    Ok(wgpu::BindGroupEntry {
                        binding: binding as u32,
                        resource: wgpu::BindingResource::Buffer(self.resource(binding, &regions)?),
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            Ok(ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &kernel.pipeline.get_bind_group_layout(0),
                entries: &entries,
            }))
        };

        let k = &ctx.kernels;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let per_row = |rows: u64| fold_grid(rows.div_ceil(u64::from(ROW_KERNEL_WORKGROUP)), max);
        let mut steps: Vec<(&Kernel, (u32, u32))> = vec![
            (&k.row_inv_norms, per_row(b + c)?),
            (&k.class_split_partials, (g.forward_splits, g.row_tiles)),
            (&k.merge_rows, per_row(b)?),
            (&k.summarize, (1, 1)),
        ];
        if outputs.grads.is_some() {
            steps.push((&k.grad_feature_partials, (g.feature_splits, g.row_tiles)));
            steps.push((&k.grad_features_finish, per_row(b)?));
            steps.push((
                &k.grad_classes_tile,
                fold_grid(u64::from(g.class_tiles), max)?,
            ));
        }
        let groups = steps
            .iter()
            .map(|(kernel, _)| bind(kernel))
            .collect::<Result<Vec<_>>>()?;
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("margin-softmax"),
            timestamp_writes: None,
        });
        for ((kernel, (x, y)), group) in steps.iter().zip(&groups) {
            pass.set_pipeline(&kernel.pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(*x, *y, 1);
        }
        Ok(())
    }
}

impl Plan {
    /// The buffer bound at `binding`: the plan's own workspace, or a caller's region.
    fn resource<'b>(
        &'b self,
        binding: Binding,
        regions: &'b [Region<'b>],
    ) -> Result<wgpu::BufferBinding<'b>> {
        let own = |buffer| {
            Ok(wgpu::BufferBinding {
                buffer,
                offset: 0,
                size: None,
            })
        };
        let caller = |role: &'static str| {
            let r = regions
                .iter()
                .find(|r| r.role == role)
                .ok_or(Error::BadBuffer {
                    role,
                    reason: "this pass needs it but none was given".into(),
                })?;
            Ok(wgpu::BufferBinding {
                buffer: r.region.buffer,
                offset: r.region.offset,
                size: NonZeroU64::new(r.bytes),
            })
        };
        match binding {
            Binding::Params => own(&self.params),
            Binding::Features => caller("features"),
            Binding::ClassVectors => caller("classes"),
            Binding::Labels => caller("labels"),
            Binding::InvNormFeatures => own(&self.inv_norm_features),
            Binding::InvNormClasses => own(&self.inv_norm_classes),
            Binding::InputFlags => own(&self.input_flags),
            Binding::SplitPartials => own(&self.split_partials),
            Binding::RowSoftmax => own(&self.row_softmax),
            Binding::RowStats => caller("row_stats"),
            Binding::Summary => caller("summary"),
            Binding::FeatureGradPartials => own(&self.feature_grad_partials),
            Binding::GradFeatures => caller("grad_features"),
            Binding::GradClasses => caller("grad_classes"),
        }
    }
}

/// A 1-D grid of `n` workgroups as (x, y) with x ≤ `max`; kernels skip the excess.
fn fold_grid(n: u64, max: u32) -> Result<(u32, u32)> {
    let max64 = u64::from(max);
    let y = n.div_ceil(max64).max(1);
    if y > max64 {
        return Err(Error::TooLarge {
            what: "workgroups of one dispatch",
            size: n,
            limit: max64 * max64,
        });
    }
    let x = n.div_ceil(y);
    Ok((x as u32, y as u32))
}

/// The first three regions are inputs, the rest outputs. An output may not share a buffer
/// with an input (WebGPU forbids one buffer as read-only and writable storage in one
/// dispatch), and outputs may not overlap.
fn check_aliasing(regions: &[Region<'_>]) -> Result<()> {
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

fn check_region(ctx: &Context, r: &Region<'_>) -> Result<()> {
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
    let max_binding = ctx.limits.max_storage_buffer_binding_size;
    if r.bytes > max_binding {
        return Err(Error::TooLarge {
            what: r.role,
            size: r.bytes,
            limit: max_binding,
        });
    }
    Ok(())
}
