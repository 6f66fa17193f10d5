//! Plans: for one problem shape and algorithm, the workspace buffers and the dispatch
//! geometry (`geometry`: how a shape is cut, and what that costs), and the recording of
//! the passes into a command encoder (`record`).

mod geometry;
mod record;

use crate::context::{Context, DeviceBuffer};
use crate::error::{Error, Result};
use crate::io::{DeviceInputs, DeviceOutputs, Shape};
use crate::kernels::{padded, Binding, GemmLayout, Timestamps, FAMILY_UNIFORM_BYTES};
use crate::params::LossParams;

pub use geometry::workspace_bytes;
use geometry::{
    copies_classes, gemm_specs, padded_classes_bytes, product, to_u32, total_bytes, uniform_stride,
    workspace_layout, GemmSpec, Geometry, GEMM_SHAPE_BYTES,
};
use record::binding_name;

/// How the loss is computed. [`Plan::new`] picks the fastest that fits the context's
/// workspace budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The memory-minimal plan: the chunked plan's GEMMs on at most 256 rows and a narrow
    /// block of classes at a time (the block that balances G against the per-block
    /// uniforms, at least 256 classes), its dots computed twice: about 8·B·C·D flops;
    /// the workspace is x̂, one block of G, a partial per row, the norms and the uniforms,
    /// whatever the workspace budget (and where D is not a multiple of 4, a copy of the
    /// block of w in hand in rows of D rounded up to 4, which the GEMMs read as vec4s).
    MemoryMinimal,
    /// A chunk of rows at a time (as many as the workspace budget holds): the dots x̂·wᵀ
    /// of the chunk's rows × all classes from one GEMM (w read in place, or copied in
    /// rows of D rounded up to 4 when D is not a multiple of 4; x̂ from a B×D copy), their
    /// softmax, then G/‖w‖ in place and two GEMMs for dL/dx and dL/dw; the reduction's
    /// 1/N is applied at the end. About 6·B·C·D flops at GEMM speed. For small budgets
    /// (or rows too long for llvmpipe's loop budget) one block of classes at a time: a
    /// softmax partial per row and block, and each block's dots recomputed in the
    /// backward, about 8·B·C·D flops.
    Chunked,
    /// The baseline an engine without fusion runs: normalised copies of x and w, the B×C
    /// cosine matrix from a GEMM, a row softmax, G in place, and two gradient GEMMs.
    Unfused,
}

/// The workspace and dispatch geometry for one shape on one context. Reuse it across
/// calls of that shape: it allocates nothing after creation.
#[derive(Debug)]
pub struct Plan {
    shape: Shape,
    algorithm: Algorithm,
    geometry: Geometry,
    workspace_bytes: u64,
    /// The family uniforms, `uniform_stride` apart (see `Plan::uniform_slot`).
    params: DeviceBuffer,
    workspace: Vec<(Binding, DeviceBuffer)>,
    /// The GEMMs of the unfused and chunked algorithms.
    gemms: Vec<GemmSpec>,
    /// Their GemmShapes, `uniform_stride` apart (none for the fused algorithm).
    gemm_shapes: Option<DeviceBuffer>,
    /// Labels below this are rows that take part: the shape's classes, or for a class
    /// shard one more, the label of rows whose class is in another shard.
    total_classes: u32,
    /// The serial number of the context whose device holds the workspace: recording
    /// with another context is refused.
    context: u64,
}

/// Which passes a recording runs: the whole loss, or one side of a class shard's
/// exchange (`crate::shard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Forward (and backward when gradients are asked for).
    Whole,
    /// A class shard's forward (the chunked plan in blocks): norms, dots and one softmax
    /// partial per row and block; the caller reads the partials back.
    ShardForward,
    /// A class shard's backward from the row softmax data and target cosines the caller
    /// uploaded: the blocks' dots again (none with `reuse_dots`: the forward's are still
    /// in the workspace), G' and the gradient GEMMs, then the projections.
    ShardBackward {
        /// The dots of the shard's forward are still in the workspace.
        reuse_dots: bool,
    },
}

impl Plan {
    /// Allocates the workspace of the fastest algorithm that fits the context's workspace
    /// budget ([`Algorithm::choose`]) for `shape`.
    pub fn new(ctx: &Context, shape: Shape) -> Result<Plan> {
        Plan::with_budget(ctx, shape, ctx.workspace_budget)
    }

    /// [`Plan::new`] within `budget` bytes of workspace instead of the context's budget:
    /// the chunked plan in blocks of classes down to a few hundred kilobytes, the fused
    /// kernels below.
    pub fn with_budget(ctx: &Context, shape: Shape, budget: u64) -> Result<Plan> {
        let algorithm = Algorithm::choose_within(ctx, shape, budget);
        Plan::build(ctx, shape, algorithm, budget, false)
    }

    /// Allocates the workspace of `algorithm` for `shape`. Fails with
    /// [`Error::TooLarge`] where a buffer would exceed the device's limits.
    pub fn with_algorithm(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<Plan> {
        Plan::build(ctx, shape, algorithm, ctx.workspace_budget, false)
    }

    fn build(
        ctx: &Context,
        shape: Shape,
        algorithm: Algorithm,
        budget: u64,
        blocks: bool,
    ) -> Result<Plan> {
        ctx.check_alive()?;
        let geometry = Geometry::new(ctx, shape, algorithm, budget, blocks)?;
        let layout = workspace_layout(shape, &geometry, algorithm);
        check_bindings(ctx, shape, algorithm, &geometry, &layout)?;
        check_buffers(ctx, shape, algorithm, &geometry)?;
        let workspace = allocate_workspace(ctx, &layout);
        let gemms = tuned_gemms(ctx, shape, &geometry, algorithm)?;
        let gemm_shapes = upload_gemm_shapes(ctx, &gemms);
        let params_bytes = geometry.uniforms() as u64 * uniform_stride(ctx, FAMILY_UNIFORM_BYTES);
        Ok(Plan {
            shape,
            algorithm,
            workspace_bytes: total_bytes(ctx, shape, &geometry, algorithm),
            geometry,
            params: uniform_buffer(ctx, "params", params_bytes),
            workspace,
            gemms,
            gemm_shapes,
            total_classes: shape.classes as u32,
            context: ctx.serial,
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

    /// The GEMM candidate each of its products runs, as `dots register, G·w staged-64, …`
    /// (the first of a product's pieces where they differ).
    pub fn gemm_summary(&self, ctx: &Context) -> String {
        GemmLayout::ALL
            .iter()
            .filter_map(|&layout| {
                let spec = self.gemms.iter().find(|g| g.layout == layout)?;
                let name = ctx.kernels.candidates.get(spec.candidate)?.name;
                Some(format!("{} {name}", layout.key(spec.rhs_element)))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bytes this plan allocated (its whole workspace).
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace_bytes
    }

    /// Records the loss into the caller's `encoder`: the forward pass, and the backward
    /// pass when `outputs.grads` is set. Nothing is submitted or read back.
    ///
    /// The parameters travel in the encoder (a copy recorded before the dispatches), so
    /// a plan may be recorded any number of times before a submit, each recording with
    /// its own parameters; recordings of one plan share its workspace, so they run in the
    /// order they are submitted, one after the other. Input regions are only read. Output regions are written exactly over their
    /// documented sizes and nowhere else.
    pub fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
    ) -> Result<()> {
        self.record_phase(
            ctx,
            encoder,
            inputs,
            outputs,
            params,
            Timestamps::Off,
            Phase::Whole,
        )?;
        Ok(())
    }

    /// A plan for one class shard (`crate::shard`): the chunked plan over the shard's
    /// classes in blocks, so that its forward leaves one softmax partial per row and block;
    /// all its rows at once where the budget allows, so that its dots last from its
    /// forward to its backward ([`Plan::keeps_dots`]). Its labels are local: a class of
    /// the shard, or `shape.classes` for a row whose class is in another shard.
    pub(crate) fn for_shard(ctx: &Context, shape: Shape) -> Result<Plan> {
        let mut plan = Plan::build(ctx, shape, Algorithm::Chunked, ctx.workspace_budget, true)?;
        // Only blocks leave the partials a shard's forward hands over: where not even one
        // block fits, the shard is refused rather than run as whole rows.
        if !plan.geometry.blocked {
            return Err(Error::TooLarge {
                what: "a class shard's smallest block of G (one GEMM tile of rows × the alignment quantum of classes) within the workspace budget and one binding (set a larger ContextOptions::workspace_budget or max_binding_bytes)",
                size: plan.workspace_bytes,
                limit: ctx.workspace_budget.min(ctx.max_binding),
            });
        }
        plan.total_classes = to_u32("classes", shape.classes + 1)?;
        Ok(plan)
    }

    /// True when the dots x̂·wᵀ of every row and class are held at once (one row pass,
    /// one block): a shard's backward then reuses its forward's.
    pub(crate) fn keeps_dots(&self) -> bool {
        self.geometry.blocked
            && self.geometry.chunks.len() == 1
            && self.geometry.row_passes.len() == 1
    }

    /// The workspace buffer bound at `binding`, if the plan has one.
    pub(crate) fn workspace_buffer(&self, binding: Binding) -> Option<&wgpu::Buffer> {
        self.workspace
            .iter()
            .find(|(b, _)| *b == binding)
            .map(|(_, buffer)| &**buffer)
    }
}

/// Refuses a plan whose caller regions (x, one chunk of w, its copy) or workspace
/// buffers would exceed one storage binding.
fn check_bindings(
    ctx: &Context,
    shape: Shape,
    algorithm: Algorithm,
    geometry: &Geometry,
    layout: &[(Binding, u64)],
) -> Result<()> {
    let (b, d) = (shape.batch as u64, shape.dim as u64);
    let max_binding = ctx.max_binding;
    let biggest_chunk = geometry.largest_chunk();
    // w's copy (where made) is bound chunk by chunk too.
    let copied_chunk = if copies_classes(shape, algorithm) {
        product(&[biggest_chunk, padded(d), 4])
    } else {
        0
    };
    let bound = [
        ("features (B·D·4 bytes)", product(&[b, d, 4])),
        (
            "class vectors of one chunk (classes·D·4 bytes)",
            product(&[biggest_chunk, d, 4]),
        ),
        (
            "the copy of one chunk of w in rows of D rounded up to 4 (classes·⌈D/4⌉·16 bytes)",
            copied_chunk,
        ),
    ];
    for (what, size) in bound.into_iter().chain(
        layout
            .iter()
            // Bound chunk by chunk, as w is (the f32 shadow of 16-bit dL/dw too).
            .filter(|&&(bind, _)| !matches!(bind, Binding::PaddedClasses | Binding::GradClasses))
            .map(|&(bind, s)| (binding_name(bind), s)),
    ) {
        if size > max_binding {
            return Err(Error::TooLarge {
                what,
                size,
                limit: max_binding,
            });
        }
    }
    Ok(())
}

/// Refuses a plan whose copy of w or the caller's w would exceed one buffer, or whose
/// unfused logits would outgrow u32 indices.
fn check_buffers(
    ctx: &Context,
    shape: Shape,
    algorithm: Algorithm,
    geometry: &Geometry,
) -> Result<()> {
    let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
    // The copy of w is bound chunk by chunk, like w: it must fit one buffer.
    let copy = padded_classes_bytes(shape, geometry, algorithm);
    if copy > ctx.limits.max_buffer_size {
        return Err(Error::TooLarge {
            what: "the copy of w in rows of D rounded up to 4 (C·⌈D/4⌉·16 bytes in one buffer)",
            size: copy,
            limit: ctx.limits.max_buffer_size,
        });
    }
    if product(&[c, d, 4]) > ctx.limits.max_buffer_size {
        return Err(Error::TooLarge {
            what: "class vectors (C·D·4 bytes) in one buffer",
            size: product(&[c, d, 4]),
            limit: ctx.limits.max_buffer_size,
        });
    }
    if algorithm == Algorithm::Unfused && product(&[b, padded(c)]) > u64::from(u32::MAX) {
        return Err(Error::TooLarge {
            what: "B·C logits (u32 indices, C rounded up to 4)",
            size: product(&[b, padded(c)]),
            limit: u64::from(u32::MAX),
        });
    }
    Ok(())
}

/// The workspace buffers of `layout`, each labelled by its binding.
fn allocate_workspace(ctx: &Context, layout: &[(Binding, u64)]) -> Vec<(Binding, DeviceBuffer)> {
    // COPY_SRC: a class shard reads its split partials back.
    let storage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::COPY_SRC;
    layout
        .iter()
        .map(|&(binding, size)| {
            (
                binding,
                ctx.create_buffer(binding_name(binding), size, storage),
            )
        })
        .collect()
}

/// A uniform buffer the queue or the encoder fills.
fn uniform_buffer(ctx: &Context, label: &str, size: u64) -> DeviceBuffer {
    ctx.create_buffer(
        label,
        size,
        wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
    )
}

/// The plan's GEMMs, each running the candidate its bucket tuned to (timed now, if new).
fn tuned_gemms(
    ctx: &Context,
    shape: Shape,
    geometry: &Geometry,
    algorithm: Algorithm,
) -> Result<Vec<GemmSpec>> {
    let mut gemms = gemm_specs(shape, geometry, algorithm);
    for spec in &mut gemms {
        let s = spec.shape;
        spec.candidate = ctx.gemm_choice(spec.layout, spec.rhs_element, (s.m, s.n, s.k))?;
    }
    Ok(gemms)
}

/// The GEMMs' shapes, `uniform_stride` apart, written through the queue (none without
/// GEMMs).
fn upload_gemm_shapes(ctx: &Context, gemms: &[GemmSpec]) -> Option<DeviceBuffer> {
    (!gemms.is_empty()).then(|| {
        let stride = uniform_stride(ctx, GEMM_SHAPE_BYTES);
        let buffer = uniform_buffer(ctx, "gemm_shapes", gemms.len() as u64 * stride);
        let mut bytes = vec![0u8; (gemms.len() as u64 * stride) as usize];
        for (k, spec) in gemms.iter().enumerate() {
            let at = k * stride as usize;
            bytes[at..at + GEMM_SHAPE_BYTES as usize]
                .copy_from_slice(bytemuck::bytes_of(&spec.shape));
        }
        ctx.queue.write_buffer(&buffer, 0, &bytes);
        buffer
    })
}
