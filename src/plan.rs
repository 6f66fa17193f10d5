//! Plans: for one problem shape and algorithm, the workspace buffers and the dispatch
//! geometry, and the recording of the passes into a command encoder.

use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::{
    check_aliasing, check_region, DeviceInputs, DeviceOutputs, Region, RowStats, Shape, Summary,
};
use crate::kernels::{
    encode, fold_grid, Binding, Dispatch, GemmShape, GpuParams, Kernel, ROW_KERNEL_WORKGROUP,
};
use crate::params::LossParams;

/// How the loss is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Algorithm {
    /// The fused kernels: the B×C logits are recomputed per tile, never stored.
    #[default]
    Fused,
    /// The baseline an engine without fusion runs: normalised copies of x and w, the B×C
    /// cosine matrix from a GEMM, a row softmax, G in place, and two gradient GEMMs.
    Unfused,
}

/// How the class axis is cut for one shape (fused algorithm).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Geometry {
    row_tiles: u32,
    class_tiles: u32,
    forward_splits: u32,
    forward_split_classes: u32,
    feature_splits: u32,
    feature_split_classes: u32,
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
const FLAGS_BYTES: u64 = 4;
const PARAMS_BYTES: u64 = std::mem::size_of::<GpuParams>() as u64;
const GEMM_SHAPE_BYTES: u64 = std::mem::size_of::<GemmShape>() as u64;

/// Cuts `class_tiles` tiles into at most `max_splits` contiguous splits of equal whole
/// tiles, none empty; returns (splits, classes per split).
fn class_splits(
    classes: u32,
    class_tiles: u32,
    row_tiles: u32,
    max_splits: u32,
    tile: u32,
) -> (u32, u32) {
    let wanted = TARGET_WORKGROUPS
        .div_ceil(row_tiles)
        .clamp(1, max_splits.min(class_tiles));
    let split_classes = class_tiles.div_ceil(wanted) * tile;
    (classes.div_ceil(split_classes), split_classes)
}

fn to_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what,
        size: n as u64,
        limit: u64::from(u32::MAX),
    })
}

impl Geometry {
    fn new(ctx: &Context, shape: Shape) -> Result<Geometry> {
        shape.check_nonempty()?;
        let batch = to_u32("batch", shape.batch)?;
        let classes = to_u32("classes", shape.classes)?;
        to_u32("dim", shape.dim)?;
        let tiles = ctx.tiles;
        let row_tiles = batch.div_ceil(tiles.tile_rows());
        let class_tiles = classes.div_ceil(tiles.tile_classes());
        let limit = ctx.limits.max_compute_workgroups_per_dimension;
        if row_tiles > limit {
            return Err(Error::TooLarge {
                what: "row tiles (batch / tile rows) in one dispatch dimension",
                size: u64::from(row_tiles),
                limit: u64::from(limit),
            });
        }
        let split = |max| class_splits(classes, class_tiles, row_tiles, max, tiles.tile_classes());
        let (forward_splits, forward_split_classes) = split(MAX_FORWARD_SPLITS);
        let (feature_splits, feature_split_classes) = split(MAX_FEATURE_SPLITS);
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

/// The workspace buffers of one algorithm, with their sizes in bytes.
fn workspace_layout(shape: Shape, g: &Geometry, algorithm: Algorithm) -> Vec<(Binding, u64)> {
    let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
    let mut layout = vec![
        (Binding::InvNormFeatures, 4 * b),
        (Binding::InvNormClasses, 4 * c),
        (Binding::InputFlags, FLAGS_BYTES),
        (Binding::RowSoftmax, ROW_SOFTMAX_BYTES * b),
    ];
    match algorithm {
        Algorithm::Fused => layout.extend([
            (
                Binding::SplitPartials,
                SPLIT_PARTIAL_BYTES * b * u64::from(g.forward_splits),
            ),
            (
                Binding::FeatureGradPartials,
                4 * b * d * u64::from(g.feature_splits),
            ),
        ]),
        Algorithm::Unfused => layout.extend([
            (Binding::UnitFeatures, 4 * b * d),
            (Binding::UnitClasses, 4 * c * d),
            (Binding::Logits, 4 * b * c),
        ]),
    }
    layout
}

/// The unfused algorithm's three GEMMs: cosines c = x̂·ŵᵀ, gx̂ = G·ŵ, gŵ = Gᵀ·x̂,
/// each as (shape, lhs, rhs, product).
fn unfused_gemms(shape: Shape) -> [(GemmShape, Binding, Binding, Binding); 3] {
    let (b, c, d) = (shape.batch as u32, shape.classes as u32, shape.dim as u32);
    let gemm = |m, n, k, lhs_stride_m, lhs_stride_k, rhs_stride_k, rhs_stride_n| GemmShape {
        m,
        n,
        k,
        lhs_stride_m,
        lhs_stride_k,
        rhs_stride_k,
        rhs_stride_n,
        _pad: 0,
    };
    [
        (
            gemm(b, c, d, d, 1, 1, d),
            Binding::UnitFeatures,
            Binding::UnitClasses,
            Binding::Logits,
        ),
        (
            gemm(b, d, c, c, 1, d, 1),
            Binding::Logits,
            Binding::UnitClasses,
            Binding::GradFeatures,
        ),
        (
            gemm(c, d, b, 1, c, d, 1),
            Binding::Logits,
            Binding::UnitFeatures,
            Binding::GradClasses,
        ),
    ]
}

/// Byte stride of the GEMM shapes in their uniform buffer.
fn gemm_stride(ctx: &Context) -> u64 {
    GEMM_SHAPE_BYTES.next_multiple_of(u64::from(ctx.limits.min_uniform_buffer_offset_alignment))
}

/// Bytes of workspace the crate allocates for `shape` with `algorithm` on `ctx`, beyond
/// the caller's inputs and outputs. Fused: O(B·(splits + D·feature_splits) + C), with at
/// most 32 and 8 splits, whatever C is. Unfused: it holds the B×C logits.
pub fn workspace_bytes(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<u64> {
    let g = Geometry::new(ctx, shape)?;
    Ok(total_bytes(ctx, shape, &g, algorithm))
}

fn total_bytes(ctx: &Context, shape: Shape, g: &Geometry, algorithm: Algorithm) -> u64 {
    let buffers: u64 = workspace_layout(shape, g, algorithm)
        .iter()
        .map(|(_, s)| s)
        .sum();
    let gemm = match algorithm {
        Algorithm::Fused => 0,
        Algorithm::Unfused => 3 * gemm_stride(ctx),
    };
    buffers + PARAMS_BYTES + gemm
}

/// The workspace and dispatch geometry for one shape on one context. Reuse it across
/// calls of that shape: it allocates nothing after creation.
#[derive(Debug)]
pub struct Plan {
    shape: Shape,
    algorithm: Algorithm,
    geometry: Geometry,
    workspace_bytes: u64,
    params: wgpu::Buffer,
    workspace: Vec<(Binding, wgpu::Buffer)>,
    /// Unfused only: the three GemmShapes, `gemm_stride` apart.
    gemm_shapes: Option<wgpu::Buffer>,
}

impl Plan {
    /// Allocates the fused algorithm's workspace for `shape`.
    pub fn new(ctx: &Context, shape: Shape) -> Result<Plan> {
        Plan::with_algorithm(ctx, shape, Algorithm::Fused)
    }

    /// Allocates the workspace of `algorithm` for `shape`. Fails with
    /// [`Error::TooLarge`] where a buffer would exceed the device's limits.
    pub fn with_algorithm(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<Plan> {
        ctx.check_alive()?;
        let geometry = Geometry::new(ctx, shape)?;
        let layout = workspace_layout(shape, &geometry, algorithm);
        let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
        let max_binding = ctx
            .limits
            .max_storage_buffer_binding_size
            .min(ctx.limits.max_buffer_size);
        let inputs = [
            ("features (B·D·4 bytes)", b * d * 4),
            ("class vectors (C·D·4 bytes)", c * d * 4),
        ];
        for (what, size) in inputs
            .into_iter()
            .chain(layout.iter().map(|&(bind, s)| (binding_name(bind), s)))
        {
            if size > max_binding {
                return Err(Error::TooLarge {
                    what,
                    size,
                    limit: max_binding,
                });
            }
        }
        if algorithm == Algorithm::Unfused && b * c > u64::from(u32::MAX) {
            return Err(Error::TooLarge {
                what: "B·C logits (u32 indices)",
                size: b * c,
                limit: u64::from(u32::MAX),
            });
        }
        let device = &ctx.device;
        let workspace = layout
            .iter()
            .map(|&(binding, size)| {
                let buffer = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(binding_name(binding)),
                    size,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
                    mapped_at_creation: false,
                });
                (binding, buffer)
            })
            .collect();
        let uniform = |label, size| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size,
                usage: wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            })
        };
        let gemm_shapes = (algorithm == Algorithm::Unfused).then(|| {
            let stride = gemm_stride(ctx);
            let buffer = uniform("gemm_shapes", 3 * stride);
            for (k, (gemm, ..)) in unfused_gemms(shape).iter().enumerate() {
                ctx.queue
                    .write_buffer(&buffer, k as u64 * stride, bytemuck::bytes_of(gemm));
            }
            buffer
        });
        Ok(Plan {
            shape,
            algorithm,
            geometry,
            workspace_bytes: total_bytes(ctx, shape, &geometry, algorithm),
            params: uniform("params", PARAMS_BYTES),
            workspace,
            gemm_shapes,
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The algorithm this plan runs.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// Bytes this plan allocated (its whole workspace).
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace_bytes
    }

    /// Records the loss into the caller's `encoder`: the forward pass, and the backward
    /// pass when `outputs.grads` is set. Nothing is submitted or read back.
    ///
    /// The parameters are uploaded with `Queue::write_buffer`, so they take effect at the
    /// next submit: record a plan at most once per submit (use one plan per call site).
    /// Input regions are only read. Output regions are written exactly over their
    /// documented sizes and nowhere else.
    pub fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
    ) -> Result<()> {
        self.record_timed(ctx, encoder, inputs, outputs, params, None)
    }

    /// [`Plan::record`] with optional timestamps at the beginning and end of its pass.
    pub(crate) fn record_timed(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
        timestamps: Option<wgpu::ComputePassTimestampWrites<'_>>,
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
            batch: b as u32,
            dim: d as u32,
            classes: c as u32,
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
        if let Some((_, flags)) = self
            .workspace
            .iter()
            .find(|(b, _)| *b == Binding::InputFlags)
        {
            encoder.clear_buffer(flags, 0, None);
        }

        let k = &ctx.kernels;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let per_row = |rows: u64| fold_grid(rows.div_ceil(u64::from(ROW_KERNEL_WORKGROUP)), max);
        let backward = outputs.grads.is_some();
        // (kernel, grid, GEMM index for matmul steps)
        let mut steps: Vec<(&Kernel, (u32, u32), Option<usize>)> =
            vec![(&k.row_inv_norms, per_row(b + c)?, None)];
        match self.algorithm {
            Algorithm::Fused => {
                steps.push((
                    &k.class_split_partials,
                    (g.forward_splits, g.row_tiles),
                    None,
                ));
                steps.push((&k.merge_rows, per_row(b)?, None));
                steps.push((&k.summarize, (1, 1), None));
                if backward {
                    steps.push((
                        &k.grad_feature_partials,
                        (g.feature_splits, g.row_tiles),
                        None,
                    ));
                    steps.push((&k.grad_features_finish, per_row(b)?, None));
                    steps.push((
                        &k.grad_classes_tile,
                        fold_grid(u64::from(g.class_tiles), max)?,
                        None,
                    ));
                }
            }
            Algorithm::Unfused => {
                let gemms = unfused_gemms(self.shape);
                let matmul = |index: usize| -> Result<_> {
                    Ok((
                        &k.matmul,
                        fold_grid(gemms[index].0.workgroups(ctx.tiles), max)?,
                        Some(index),
                    ))
                };
                steps.push((&k.normalize_rows, per_row(b + c)?, None));
                steps.push(matmul(0)?);
                steps.push((&k.logit_softmax_rows, fold_grid(b, max)?, None));
                steps.push((&k.summarize, (1, 1), None));
                if backward {
                    steps.push((&k.logit_grads, per_row(b * c)?, None));
                    steps.push(matmul(1)?);
                    steps.push(matmul(2)?);
                    steps.push((&k.normalize_backward, per_row(b + c)?, None));
                }
            }
        }
        let dispatches = steps
            .iter()
            .map(|&(kernel, grid, gemm)| {
                let resources = kernel
                    .bindings
                    .iter()
                    .map(|&binding| self.resource(ctx, binding, gemm, &regions))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Dispatch {
                    kernel,
                    grid,
                    resources,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        encode(&ctx.device, encoder, &dispatches, timestamps);
        Ok(())
    }

    /// The buffer bound at `binding`: the plan's workspace, or a caller's region. For a
    /// matmul step, the GEMM bindings resolve through that GEMM's operands.
    fn resource<'b>(
        &'b self,
        ctx: &Context,
        binding: Binding,
        gemm: Option<usize>,
        regions: &'b [Region<'b>],
    ) -> Result<wgpu::BufferBinding<'b>> {
        let internal = |what: &str| Error::Gpu(format!("internal: no buffer for {what}"));
        let caller = |role: &'static str| {
            regions
                .iter()
                .find(|r| r.role == role)
                .map(Region::binding)
                .ok_or(Error::BadBuffer {
                    role,
                    reason: "this pass needs it but none was given".into(),
                })
        };
        let operand = |pick: fn(&(GemmShape, Binding, Binding, Binding)) -> Binding| {
            let index = gemm.ok_or_else(|| internal("a GEMM operand outside a GEMM step"))?;
            self.resource(ctx, pick(&unfused_gemms(self.shape)[index]), None, regions)
        };
        match binding {
            Binding::Params => Ok(whole(&self.params)),
            Binding::Features => caller("features"),
            Binding::ClassVectors => caller("classes"),
            Binding::Labels => caller("labels"),
            Binding::RowStats => caller("row_stats"),
            Binding::Summary => caller("summary"),
            Binding::GradFeatures => caller("grad_features"),
            Binding::GradClasses => caller("grad_classes"),
            Binding::GemmShape => {
                let index = gemm.ok_or_else(|| internal("a GEMM shape outside a GEMM step"))?;
                let buffer = self
                    .gemm_shapes
                    .as_ref()
                    .ok_or_else(|| internal("GEMM shapes"))?;
                Ok(wgpu::BufferBinding {
                    buffer,
                    offset: index as u64 * gemm_stride(ctx),
                    size: std::num::NonZeroU64::new(GEMM_SHAPE_BYTES),
                })
            }
            Binding::GemmLhs => operand(|g| g.1),
            Binding::GemmRhs => operand(|g| g.2),
            Binding::GemmProduct => operand(|g| g.3),
            own => self
                .workspace
                .iter()
                .find(|(b, _)| *b == own)
                .map(|(_, buffer)| whole(buffer))
                .ok_or_else(|| internal(binding_name(own))),
        }
    }
}

fn whole(buffer: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: None,
    }
}

/// The WGSL name of a binding, for labels and messages.
fn binding_name(binding: Binding) -> &'static str {
    match binding {
        Binding::Params => "params",
        Binding::Features => "features",
        Binding::ClassVectors => "class_vectors",
        Binding::Labels => "labels",
        Binding::InvNormFeatures => "inv_norm_features",
        Binding::InvNormClasses => "inv_norm_classes",
        Binding::InputFlags => "input_flags",
        Binding::SplitPartials => "split_partials",
        Binding::RowSoftmax => "row_softmax",
        Binding::RowStats => "row_stats",
        Binding::Summary => "summary",
        Binding::FeatureGradPartials => "feature_grad_partials",
        Binding::GradFeatures => "grad_features",
        Binding::GradClasses => "grad_classes",
        Binding::UnitFeatures => "unit_features",
        Binding::UnitClasses => "unit_classes",
        Binding::Logits => "logits (B·C·4 bytes)",
        Binding::GemmShape => "gemm",
        Binding::GemmLhs => "lhs",
        Binding::GemmRhs => "rhs",
        Binding::GemmProduct => "product",
    }
}
