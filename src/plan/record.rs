//! The recording of a plan: its uniforms, its steps in dispatch order (norms, copies,
//! dots, softmax rows, gradient GEMMs, projections) and the buffers each binds.

use super::geometry::{
    copies_classes, dim_pieces, product, uniform_stride, GemmSpec, GEMM_SHAPE_BYTES,
};
use super::{Algorithm, Phase, Plan};
use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::{
    check_aliasing, DeviceInputs, DeviceOutputs, ElementType, Region, RowStats, Summary,
};
use crate::kernels::{
    bind_groups, encode_bound, fold_grid, padded, BackwardParams, Binding, Dispatch, Entry, Family,
    ForwardParams, GemmLayout, Kernel, LossTerms, NormsParams, OtherTerms, Timestamps,
    FAMILY_UNIFORM_BYTES, ROW_KERNEL_WORKGROUP,
};
use crate::params::{LossParams, Reduction};
/// One dispatch of a recording.
#[derive(Clone, Copy)]
struct Step<'a> {
    kernel: &'a Kernel,
    grid: (u32, u32),
    /// The class chunk it covers.
    chunk: usize,
    /// The dL/dw row pass it covers.
    pass: usize,
    /// The GEMM it runs (matmul steps), an index into the plan's GEMMs.
    gemm: Option<usize>,
    /// A projection (or rounding) of x's rows alone, after every block of a plan in
    /// blocks: it reads the backward uniform of its own slot ([`Plan::features_slot`]);
    /// its class bindings are chunk 0's, unread.
    features_only: bool,
}

impl Plan {
    /// Records `phase`, with the timestamps asked for; returns the kernels' names in
    /// dispatch order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_phase(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
        timestamps: Timestamps<'_>,
        phase: Phase,
    ) -> Result<Vec<&'static str>> {
        ctx.check_alive()?;
        if self.context != ctx.serial {
            return Err(Error::BadBuffer {
                role: "plan",
                reason: "it was made on another context; make a plan with Plan::new on the \
                         context you record with"
                    .into(),
            });
        }
        params.validate()?;
        let per_row = inputs.row_margins.is_some();
        if inputs.hard_thresholds.is_some() != params.curricular.is_some() {
            return Err(Error::InvalidParameter {
                name: "curricular",
                value: f32::from(u8::from(inputs.hard_thresholds.is_some())),
                requirement:
                    "given together with hard_thresholds (schedule::CurricularFace makes both)",
            });
        }
        if per_row && params.multiplicative_margin != 1 {
            return Err(Error::InvalidParameter {
                name: "multiplicative_margin",
                value: params.multiplicative_margin as f32,
                requirement: "1 with per-row margins: they are additive margins (m2_i, m3_i) of \
                              the combined form cos(θ + m2_i) − m3_i",
            });
        }
        let regions = self.regions(inputs, outputs);
        for r in &regions {
            check_region(ctx, r)?;
        }
        check_aliasing(&regions)?;
        let steps = self.steps(ctx, outputs.grads.is_some(), phase, OtherTerms::of(params))?;
        let dispatches = steps
            .iter()
            .map(|step| {
                let resources = step
                    .kernel
                    .bindings
                    .iter()
                    .map(|&binding| self.resource(ctx, binding, step, &regions))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Dispatch {
                    kernel: step.kernel,
                    grid: step.grid,
                    resources,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        // Every bind group first, in an error scope, before anything reaches the caller's
        // encoder: a buffer wgpu refuses (another device's) is a typed error naming it.
        let groups = bind_checked(ctx, &dispatches, &regions)?;
        self.upload_params(ctx, encoder, params, outputs.grads.is_some(), per_row);
        encode_bound(encoder, &dispatches, &groups, timestamps)
    }

    /// The caller's regions this recording binds, with the bytes each must hold.
    fn regions<'r>(
        &self,
        inputs: &DeviceInputs<'r>,
        outputs: &DeviceOutputs<'r>,
    ) -> Vec<Region<'r>> {
        let (b, c, d) = (
            self.shape.batch as u64,
            self.shape.classes as u64,
            self.shape.dim as u64,
        );
        let e = self.shape.elements;
        let mut regions = vec![
            Region {
                role: "features",
                region: inputs.features,
                bytes: e.features.region_bytes(product(&[b, d])),
                input: true,
            },
            Region {
                role: "classes",
                region: inputs.classes,
                bytes: e.classes.region_bytes(product(&[c, d])),
                input: true,
            },
            Region {
                role: "labels",
                region: inputs.labels,
                bytes: b * 4,
                input: true,
            },
            Region {
                role: "row_stats",
                region: outputs.row_stats,
                bytes: b * std::mem::size_of::<RowStats>() as u64,
                input: false,
            },
            Region {
                role: "summary",
                region: outputs.summary,
                bytes: std::mem::size_of::<Summary>() as u64,
                input: false,
            },
        ];
        if let Some(row_margins) = inputs.row_margins {
            regions.push(Region {
                role: "row_margins",
                region: row_margins,
                bytes: b * 8,
                input: true,
            });
        }
        if let Some(thresholds) = inputs.hard_thresholds {
            regions.push(Region {
                role: "hard_thresholds",
                region: thresholds,
                bytes: b * 4,
                input: true,
            });
        }
        if let Some(grads) = &outputs.grads {
            regions.push(Region {
                role: "grad_features",
                region: grads.features,
                bytes: e.grad_features.region_bytes(product(&[b, d])),
                input: false,
            });
            regions.push(Region {
                role: "grad_classes",
                region: grads.classes,
                bytes: e.grad_classes.region_bytes(product(&[c, d])),
                input: false,
            });
        }
        regions
    }

    /// Rows `pad_rows` copies in chunk `k`: x̂ with the first, w's rows where copied.
    fn copy_rows(&self, k: usize) -> u32 {
        let copied = copies_classes(self.shape, self.algorithm);
        (if k == 0 { self.shape.batch as u32 } else { 0 })
            + if copied {
                self.geometry.chunks[k].classes
            } else {
                0
            }
    }

    /// The family uniforms of every chunk (and, for the forward, row pass), in their slots
    /// ([`Plan::uniform_slot`]), copied into the plan's uniform buffer through the
    /// encoder, and the input flags cleared.
    fn upload_params(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        params: &LossParams,
        with_grads: bool,
        per_row: bool,
    ) {
        let uniforms = self.family_uniforms(ctx, params, with_grads, per_row);
        // Through the encoder, not the queue: each recording's copy runs just before its
        // own dispatches, so recordings made before a submit keep their own parameters.
        // The upload buffer is this recording's alone: the queue fills it at the next
        // submit, before any command of that submit runs.
        let upload = ctx.create_buffer(
            "params upload",
            uniforms.len() as u64,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        ctx.queue.write_buffer(&upload, 0, &uniforms);
        encoder.copy_buffer_to_buffer(&upload, 0, &self.params, 0, uniforms.len() as u64);
        if let Some((_, flags)) = self
            .workspace
            .iter()
            .find(|(b, _)| *b == Binding::InputFlags)
        {
            encoder.clear_buffer(flags, 0, None);
        }
    }

    /// The bytes of every family uniform, each in its slot.
    fn family_uniforms(
        &self,
        ctx: &Context,
        params: &LossParams,
        with_grads: bool,
        per_row: bool,
    ) -> Vec<u8> {
        let stride = uniform_stride(ctx, FAMILY_UNIFORM_BYTES) as usize;
        let mut uniforms = vec![0u8; stride * self.geometry.uniforms()];
        let mut put = |slot: usize, bytes: &[u8]| {
            uniforms[slot * stride..slot * stride + bytes.len()].copy_from_slice(bytes)
        };
        let loss = LossTerms::of(params, per_row);
        for k in 0..self.geometry.chunks.len() {
            put(
                self.uniform_slot(Family::Norms, k, 0),
                bytemuck::bytes_of(&self.norms_params(k)),
            );
            for pass in 0..self.geometry.row_passes.len() {
                let forward = self.forward_params(k, pass, loss, params, with_grads);
                put(
                    self.uniform_slot(Family::Forward, k, pass),
                    bytemuck::bytes_of(&forward),
                );
            }
            put(
                self.uniform_slot(Family::Backward, k, 0),
                bytemuck::bytes_of(&self.backward_params(k, loss, params)),
            );
        }
        if self.geometry.blocked {
            let features = BackwardParams {
                classes: 0,
                norm_feature_rows: self.shape.batch as u32,
                rounded_features: self.rounded_features(),
                rounded_classes: 0,
                ..self.backward_params(0, loss, params)
            };
            put(self.features_slot(), bytemuck::bytes_of(&features));
        }
        uniforms
    }

    /// 1 where w enters the GEMMs as it is (the chunked plan), 0 where normalised.
    fn raw_classes(&self) -> u32 {
        u32::from(self.algorithm.engine() == Algorithm::Chunked)
    }

    /// Rows of x the stacked rows of chunk `k` start with: B in the first chunk. (The
    /// backward of a plan in blocks projects x's rows on their own, after every block:
    /// its chunks' stacked rows are the blocks' classes alone.)
    fn norm_feature_rows(&self, k: usize) -> u32 {
        if k == 0 {
            self.shape.batch as u32
        } else {
            0
        }
    }

    /// [`Plan::norm_feature_rows`] of the backward's chunk `k`: none in blocks.
    fn projected_feature_rows(&self, k: usize) -> u32 {
        if self.geometry.blocked {
            0
        } else {
            self.norm_feature_rows(k)
        }
    }

    /// The norms pass's uniform for chunk `k`.
    fn norms_params(&self, k: usize) -> NormsParams {
        NormsParams {
            batch: self.shape.batch as u32,
            dim: self.shape.dim as u32,
            classes: self.geometry.chunks[k].classes,
            norm_feature_rows: self.norm_feature_rows(k),
            copy_rows: self.copy_rows(k),
            raw_classes: self.raw_classes(),
            _pad: [0; 2],
        }
    }

    /// The forward family's uniform for chunk `k` and row pass `pass`.
    fn forward_params(
        &self,
        k: usize,
        pass: usize,
        loss: LossTerms,
        params: &LossParams,
        with_grads: bool,
    ) -> ForwardParams {
        let g = &self.geometry;
        let (row_begin, row_end) = g.row_passes[pass];
        ForwardParams {
            loss,
            batch: self.shape.batch as u32,
            classes: g.chunks[k].classes,
            total_classes: self.total_classes,
            class_offset: g.chunks[k].class_offset,
            row_begin,
            row_end,
            logit_stride: g.logit_stride,
            blocks: u32::from(g.blocked),
            block_index: k as u32,
            write_grads: u32::from(self.raw_classes() == 1 && with_grads && !g.blocked),
            raw_classes: self.raw_classes(),
            reduction: Reduction::code(params.reduction),
            scale_grad_gate: if params.scale_receives_grad() {
                1.0
            } else {
                0.0
            },
            _pad: [0; 3],
        }
    }

    /// The backward family's uniform for chunk `k`.
    fn backward_params(&self, k: usize, loss: LossTerms, params: &LossParams) -> BackwardParams {
        BackwardParams {
            loss,
            batch: self.shape.batch as u32,
            dim: self.shape.dim as u32,
            classes: self.geometry.chunks[k].classes,
            total_classes: self.total_classes,
            norm_feature_rows: self.projected_feature_rows(k),
            reduction: Reduction::code(params.reduction),
            raw_classes: self.raw_classes(),
            defer_norm: self.raw_classes(),
            logit_stride: self.geometry.logit_stride,
            loss_scale: params.loss_scale,
            rounded_features: self.rounded_values(k).0,
            rounded_classes: self.rounded_values(k).1,
        }
    }

    /// Values of dL/dx and of chunk `k`'s dL/dw that `round_gradients` rounds to their
    /// 16-bit types: B·D with the chunk whose projection covers x's rows, and classes·D;
    /// each 0 where stored in f32.
    fn rounded_values(&self, k: usize) -> (u32, u32) {
        let features = if self.projected_feature_rows(k) > 0 {
            self.rounded_features()
        } else {
            0
        };
        let classes = if self.shape.elements.grad_classes != ElementType::F32 {
            self.geometry.chunks[k].classes * self.shape.dim as u32
        } else {
            0
        };
        (features, classes)
    }

    /// B·D where dL/dx is stored in 16 bits, else 0.
    fn rounded_features(&self) -> u32 {
        if self.shape.elements.grad_features != ElementType::F32 {
            (self.shape.batch * self.shape.dim) as u32
        } else {
            0
        }
    }

    /// The slot of the backward uniform of x's rows alone (plans in blocks), after every
    /// other slot.
    fn features_slot(&self) -> usize {
        let g = &self.geometry;
        g.chunks.len() * (2 + g.row_passes.len())
    }

    /// The dispatches of `phase`, in order, with the pipelines of the non-target options
    /// `other`.
    fn steps<'a>(
        &'a self,
        ctx: &'a Context,
        backward: bool,
        phase: Phase,
        other: OtherTerms,
    ) -> Result<Vec<Step<'a>>> {
        let g = &self.geometry;
        let s = Steps::new(self, ctx, phase, other);
        let mut steps = s.norms()?;
        // x̂ (and w's copy), then per row chunk the dots and their
        // softmax rows. The chunked plan's backward turns each chunk's dots into G' in
        // the softmax pass (its 1/N deferred) and runs the gx̂ and gw' GEMMs on it.
        // x̂ with the first chunk; w's copy, where made, chunk by chunk.
        if !s.copy_blocks {
            for chunk in 0..g.chunks.len() {
                steps.extend(s.pad(chunk)?);
            }
        }
        let chunked_backward = backward && self.algorithm.engine() == Algorithm::Chunked;
        let forward = matches!(phase, Phase::Whole | Phase::ShardForward);
        for (pass, &rows) in g.row_passes.iter().enumerate().filter(|_| forward) {
            steps.extend(s.forward_pass(pass, rows, chunked_backward)?);
        }
        // A shard's forward leaves the blocks' partials to the caller.
        if g.blocked && phase == Phase::Whole {
            let b = self.shape.batch as u64;
            steps.push(Step::once(s.kernel(Entry::MergeRows)?, s.per_row(b)?));
        }
        // The blocked chunked plan's backward, which runs after the summary.
        let mut blocked_backward = if g.blocked && chunked_backward {
            s.blocked_backward()?
        } else {
            Vec::new()
        };
        if phase == Phase::Whole {
            steps.push(Step::once(s.kernel(Entry::Summarize)?, (1, 1)));
        }
        if backward {
            match self.algorithm.engine() {
                Algorithm::Unfused => steps.extend(s.unfused_backward()?),
                _ => steps.append(&mut blocked_backward),
            }
            if !g.blocked {
                steps.extend(s.projections()?);
            }
        }
        Ok(steps)
    }

    /// The slot of `family`'s uniform for class chunk `chunk` (and row pass `pass`, for the
    /// forward) in the plan's uniform buffer: the norms' per chunk, then the forward's per
    /// chunk and row pass, then the backward's per chunk. (The GEMM family reads its
    /// GemmShape instead and binds none of them; it maps to the norms' slot.)
    fn uniform_slot(&self, family: Family, chunk: usize, pass: usize) -> usize {
        let (chunks, passes) = (self.geometry.chunks.len(), self.geometry.row_passes.len());
        match family {
            Family::Norms | Family::Gemm => chunk,
            Family::Forward => chunks + chunk * passes + pass,
            Family::Backward => chunks * (1 + passes) + chunk,
        }
    }

    /// The buffer bound at `binding` for `step`: the plan's workspace, or a
    /// caller's region. Class-indexed buffers are bound from the chunk's first class; for
    /// a matmul step, the GEMM bindings resolve through that GEMM's operands.
    fn resource<'b>(
        &'b self,
        ctx: &'b Context,
        binding: Binding,
        step: &Step<'_>,
        regions: &'b [Region<'b>],
    ) -> Result<wgpu::BufferBinding<'b>> {
        let part = self
            .geometry
            .chunks
            .get(step.chunk)
            .ok_or_else(|| internal("a chunk"))?;
        let gemm = step.gemm;
        let d = self.shape.dim as u64;
        let e = self.shape.elements;
        let row_bytes = d * 4;
        // (first byte, bytes) of this chunk in a class-indexed buffer of `per_class` bytes a
        // class, the bytes rounded up to a whole word (a 16-bit tensor's last chunk).
        let class_range = |per_class: u64| {
            (
                u64::from(part.class_offset) * per_class,
                (u64::from(part.classes) * per_class).next_multiple_of(4),
            )
        };
        let caller = |role, range| caller_binding(regions, role, range);
        let operand = |pick| self.gemm_operand(ctx, step, regions, pick);
        match binding {
            Binding::Params => Ok(wgpu::BufferBinding {
                buffer: &self.params,
                offset: if step.features_only {
                    self.features_slot()
                } else {
                    self.uniform_slot(step.kernel.family, step.chunk, step.pass)
                } as u64
                    * uniform_stride(ctx, FAMILY_UNIFORM_BYTES),
                size: std::num::NonZeroU64::new(FAMILY_UNIFORM_BYTES),
            }),
            Binding::Features => caller("features", None),
            Binding::ClassVectors => caller("classes", Some(class_range(d * e.classes.bytes()))),
            Binding::FeatureQuads | Binding::ClassQuads => {
                let scalars = if binding == Binding::FeatureQuads {
                    caller("features", None)?
                } else {
                    caller("classes", Some(class_range(d * e.classes.bytes())))?
                };
                Ok(match scalars.size {
                    Some(size) if size.get() < 16 => whole(&ctx.quad_stand_in),
                    _ => scalars,
                })
            }
            Binding::Labels => caller("labels", None),
            // Read only where the call has per-row margins (LossTerms::per_row).
            Binding::RowMargins => match regions.iter().any(|r| r.role == "row_margins") {
                true => caller("row_margins", None),
                false => Ok(whole(&ctx.quad_stand_in)),
            },
            // Read only with CurricularFace (LossTerms::curricular).
            Binding::HardThresholds => match regions.iter().any(|r| r.role == "hard_thresholds") {
                true => caller("hard_thresholds", None),
                false => Ok(whole(&ctx.quad_stand_in)),
            },
            Binding::RowStats => caller("row_stats", None),
            Binding::Summary => caller("summary", None),
            // The gradients in f32: the caller's where stored in f32, else the workspace
            // `round_gradients` rounds into the caller's (GradFeaturesOut, GradClassesOut).
            Binding::GradFeatures if e.grad_features == ElementType::F32 => {
                caller("grad_features", None)
            }
            Binding::GradClasses if e.grad_classes == ElementType::F32 => {
                caller("grad_classes", Some(class_range(row_bytes)))
            }
            // In blocks, the shadow holds the block in hand, from its start.
            Binding::GradClasses if self.geometry.blocked => self.own(
                binding,
                Some((0, (u64::from(part.classes) * row_bytes).next_multiple_of(4))),
            ),
            Binding::GradClasses => self.own(binding, Some(class_range(row_bytes))),
            Binding::GradFeaturesOut => caller("grad_features", None),
            Binding::GradClassesOut => caller(
                "grad_classes",
                Some(class_range(d * e.grad_classes.bytes())),
            ),
            Binding::InvNormClasses => self.own(binding, Some(class_range(4))),
            // In blocks, the copy holds the block in hand, from its start.
            Binding::PaddedClasses
                if copies_classes(self.shape, self.algorithm) && !self.geometry.blocked =>
            {
                self.own(
                    binding,
                    Some(class_range(4 * padded(self.shape.dim as u64))),
                )
            }
            // One chunk (the GEMM algorithms): all of it, padding included.
            Binding::InvNormClassQuads => self.own(Binding::InvNormClasses, None),
            Binding::GemmShape => self.gemm_shape(ctx, gemm),
            Binding::GemmLhs => operand(|g| g.lhs),
            Binding::GemmRhs => operand(|g| g.rhs),
            // A split-K GEMM's splits store their partial products in the workspace, which
            // the sum of its splits (the step that binds them) reads.
            Binding::GemmProduct
                if gemm
                    .and_then(|index| self.gemms.get(index))
                    .is_some_and(|spec| spec.shape.splits > 1)
                    && !step.kernel.bindings.contains(&Binding::SplitProducts) =>
            {
                self.own(Binding::SplitProducts, None)
            }
            Binding::GemmProduct => operand(|g| g.product),
            other => self.own(other, None),
        }
    }

    /// The workspace buffer at `binding`: `range` (first byte, bytes) of it, or all.
    fn own(&self, binding: Binding, range: Option<(u64, u64)>) -> Result<wgpu::BufferBinding<'_>> {
        let buffer = self
            .workspace_buffer(binding)
            .ok_or_else(|| internal(binding_name(binding)))?;
        Ok(match range {
            Some((offset, bytes)) => wgpu::BufferBinding {
                buffer,
                offset,
                size: std::num::NonZeroU64::new(bytes),
            },
            None => whole(buffer),
        })
    }

    /// The operand `pick` names of the GEMM `step` runs, bound as for a step outside it.
    fn gemm_operand<'b>(
        &'b self,
        ctx: &'b Context,
        step: &Step<'_>,
        regions: &'b [Region<'b>],
        pick: fn(&GemmSpec) -> Binding,
    ) -> Result<wgpu::BufferBinding<'b>> {
        let spec = step
            .gemm
            .and_then(|index| self.gemms.get(index))
            .ok_or_else(|| internal("a GEMM operand outside a GEMM step"))?;
        let operand_step = Step {
            gemm: None,
            ..*step
        };
        self.resource(ctx, pick(spec), &operand_step, regions)
    }

    /// The GemmShape uniform of GEMM `gemm`.
    fn gemm_shape(&self, ctx: &Context, gemm: Option<usize>) -> Result<wgpu::BufferBinding<'_>> {
        let index = gemm.ok_or_else(|| internal("a GEMM shape outside a GEMM step"))?;
        let buffer = self
            .gemm_shapes
            .as_ref()
            .ok_or_else(|| internal("GEMM shapes"))?;
        Ok(wgpu::BufferBinding {
            buffer,
            offset: index as u64 * uniform_stride(ctx, GEMM_SHAPE_BYTES),
            size: std::num::NonZeroU64::new(GEMM_SHAPE_BYTES),
        })
    }
}

/// The error of a binding the plan should have had.
fn internal(what: &str) -> Error {
    Error::Gpu(format!("internal: no buffer for {what}"))
}

/// The caller's region of `role`: `range` (first byte, bytes) of it, or all its bytes.
fn caller_binding<'b>(
    regions: &'b [Region<'b>],
    role: &'static str,
    range: Option<(u64, u64)>,
) -> Result<wgpu::BufferBinding<'b>> {
    let r = regions
        .iter()
        .find(|r| r.role == role)
        .ok_or(Error::BadBuffer {
            role,
            reason: "this pass needs it but none was given".into(),
        })?;
    let (skip, bytes) = range.unwrap_or((0, r.bytes));
    Ok(wgpu::BufferBinding {
        buffer: r.region.buffer,
        offset: r.region.offset + skip,
        size: std::num::NonZeroU64::new(bytes),
    })
}

impl<'a> Step<'a> {
    /// A dispatch of `kernel` over `grid` for the first class chunk and row pass, outside
    /// a GEMM.
    fn once(kernel: &'a Kernel, grid: (u32, u32)) -> Step<'a> {
        Step {
            kernel,
            grid,
            chunk: 0,
            pass: 0,
            gemm: None,
            features_only: false,
        }
    }
}

/// What the steps of one recording are made from: the plan, its context, and how the
/// phase treats the dots and the copies.
struct Steps<'a> {
    plan: &'a Plan,
    ctx: &'a Context,
    /// The GEMMs of each (pass, chunk), indexed once: its dots, and its gradient
    /// products, in spec order.
    by_block: Vec<Vec<(Vec<usize>, Vec<usize>)>>,
    /// A shard's backward from the dots its forward left (Plan::keeps_dots).
    reuse_dots: bool,
    /// In blocks, each block's copy of w (and x̂ with the first) is made just before the
    /// block's GEMMs, in the forward and again in the backward.
    copy_blocks: bool,
    /// The non-target options the forward and backward pipelines are compiled for.
    other: OtherTerms,
}

impl<'a> Steps<'a> {
    fn new(plan: &'a Plan, ctx: &'a Context, phase: Phase, other: OtherTerms) -> Steps<'a> {
        let g = &plan.geometry;
        let mut by_block = vec![vec![(Vec::new(), Vec::new()); g.chunks.len()]; g.row_passes.len()];
        for (index, spec) in plan.gemms.iter().enumerate() {
            let (dots, grads) = &mut by_block[spec.pass][spec.chunk];
            if spec.layout == GemmLayout::Dots {
                dots.push(index);
            } else {
                grads.push(index);
            }
        }
        Steps {
            plan,
            ctx,
            by_block,
            reuse_dots: phase == (Phase::ShardBackward { reuse_dots: true }),
            copy_blocks: g.blocked && copies_classes(plan.shape, plan.algorithm),
            other,
        }
    }

    fn kernel(&self, entry: Entry) -> Result<&'a Kernel> {
        self.ctx
            .kernels
            .kernel(entry, self.plan.shape.elements, self.other)
    }

    fn max_workgroups(&self) -> u32 {
        self.ctx.limits.max_compute_workgroups_per_dimension
    }

    /// The grid of a row kernel over `rows` rows (or elements).
    fn per_row(&self, rows: u64) -> Result<(u32, u32)> {
        fold_grid(
            rows.div_ceil(u64::from(ROW_KERNEL_WORKGROUP)),
            self.max_workgroups(),
        )
    }

    /// The grid of a softmax row pass over the rows [r0, r1).
    fn row_grid(&self, (r0, r1): (u32, u32)) -> Result<(u32, u32)> {
        fold_grid(
            u64::from(r1 - r0).div_ceil(u64::from(self.ctx.tiles.rows_per_workgroup)),
            self.max_workgroups(),
        )
    }

    /// Rows of [x; w chunk] chunk `chunk` normalises: x's with the first.
    fn rows_of(&self, chunk: usize) -> u64 {
        let first = if chunk == 0 {
            self.plan.shape.batch as u64
        } else {
            0
        };
        u64::from(self.plan.geometry.chunks[chunk].classes) + first
    }

    /// The norms of each class chunk's rows (none where the dots are reused).
    fn norms(&self) -> Result<Vec<Step<'a>>> {
        // A shard's backward from its forward's dots finds the inverse norms that forward
        // left in the same workspace.
        let chunks = if self.reuse_dots {
            0
        } else {
            self.plan.geometry.chunks.len()
        };
        (0..chunks)
            .map(|chunk| {
                Ok(Step {
                    chunk,
                    ..Step::once(
                        self.kernel(Entry::RowInvNorms)?,
                        self.per_row(self.rows_of(chunk))?,
                    )
                })
            })
            .collect()
    }

    /// A GEMM's dispatch, and for a split-K GEMM the sum of its splits.
    fn matmul(&self, index: usize) -> Result<Vec<Step<'a>>> {
        let spec = &self.plan.gemms[index];
        let candidate = &self.ctx.kernels.candidates[spec.candidate];
        let grid = fold_grid(spec.shape.workgroups(candidate), self.max_workgroups())?;
        let product = Step {
            gemm: Some(index),
            chunk: spec.chunk,
            ..Step::once(
                self.ctx
                    .kernels
                    .matmul(spec.layout, spec.rhs_element, spec.candidate)?,
                grid,
            )
        };
        let mut steps = vec![product];
        if spec.shape.splits > 1 {
            let elements = u64::from(spec.shape.m) * u64::from(spec.shape.n);
            steps.push(Step {
                kernel: self.kernel(Entry::SumSplits)?,
                grid: self.per_row(elements)?,
                ..product
            });
        }
        Ok(steps)
    }

    /// The copy of chunk `chunk`'s rows in rows of D rounded up to 4, where it has any to
    /// copy and the dots are not reused.
    fn pad(&self, chunk: usize) -> Result<Option<Step<'a>>> {
        let rows = u64::from(self.plan.copy_rows(chunk));
        let pieces = dim_pieces(self.plan.shape.dim as u64);
        Ok((rows > 0 && !self.reuse_dots).then_some(Step {
            chunk,
            ..Step::once(self.kernel(Entry::PadRows)?, self.per_row(rows * pieces)?)
        }))
    }

    /// The GEMMs of (pass, chunk): its dots, or its gradient products.
    fn gemms(&self, pass: usize, chunk: usize, dots: bool) -> Result<Vec<Step<'a>>> {
        let (dot_specs, grad_specs) = &self.by_block[pass][chunk];
        let indices = if dots { dot_specs } else { grad_specs };
        Ok(indices
            .iter()
            .map(|&index| self.matmul(index))
            .collect::<Result<Vec<_>>>()?
            .concat())
    }

    /// The forward's steps of row pass `pass` over `rows`: in blocks, each block's dots
    /// and its partial per row; for whole rows, every chunk's dots, the softmax (and G')
    /// of the rows, then (for the chunked backward) the gradient GEMMs.
    fn forward_pass(
        &self,
        pass: usize,
        rows: (u32, u32),
        chunked_backward: bool,
    ) -> Result<Vec<Step<'a>>> {
        let chunks = self.plan.geometry.chunks.len();
        let mut steps = Vec::new();
        if self.plan.geometry.blocked {
            for chunk in 0..chunks {
                if self.copy_blocks {
                    steps.extend(self.pad(chunk)?);
                }
                steps.extend(self.gemms(pass, chunk, true)?);
                steps.push(Step {
                    pass,
                    chunk,
                    ..Step::once(self.kernel(Entry::LogitSoftmaxRows)?, self.row_grid(rows)?)
                });
            }
            return Ok(steps);
        }
        for chunk in 0..chunks {
            steps.extend(self.gemms(pass, chunk, true)?);
        }
        steps.push(Step {
            pass,
            ..Step::once(self.kernel(Entry::LogitSoftmaxRows)?, self.row_grid(rows)?)
        });
        if chunked_backward {
            for chunk in 0..chunks {
                steps.extend(self.gemms(pass, chunk, false)?);
            }
        }
        Ok(steps)
    }

    /// The blocked backward, after the summary: per block, its copy where made, then
    /// per row pass the block's dots again (unless a shard's forward left them), its G'
    /// and its gradient GEMMs; then the block's dL/dw is whole, and is projected (and
    /// rounded, where stored in 16 bits, out of a shadow of one block) before the next
    /// block begins. x's rows are projected after the last block. Each sum adds the same
    /// values in the same order as passes-then-blocks would: dL/dw's over the passes,
    /// gx̂'s over the blocks.
    fn blocked_backward(&self) -> Result<Vec<Step<'a>>> {
        let mut steps = Vec::new();
        for chunk in 0..self.plan.geometry.chunks.len() {
            if self.copy_blocks {
                steps.extend(self.pad(chunk)?);
            }
            for (pass, &rows) in self.plan.geometry.row_passes.iter().enumerate() {
                if !self.reuse_dots {
                    steps.extend(self.gemms(pass, chunk, true)?);
                }
                steps.push(Step {
                    pass,
                    chunk,
                    ..Step::once(self.kernel(Entry::LogitGradRows)?, self.row_grid(rows)?)
                });
                steps.extend(self.gemms(pass, chunk, false)?);
            }
            steps.extend(self.projection(chunk, false)?);
        }
        steps.extend(self.projection(0, true)?);
        Ok(steps)
    }

    /// The unfused baseline's backward: G from the logits, then the gradient GEMMs (every
    /// one but the dots' k-pieces).
    fn unfused_backward(&self) -> Result<Vec<Step<'a>>> {
        let shape = self.plan.shape;
        let logits = shape.batch as u64 * shape.classes as u64;
        let mut steps = vec![Step::once(
            self.kernel(Entry::LogitGrads)?,
            self.per_row(logits)?,
        )];
        for (index, spec) in self.plan.gemms.iter().enumerate() {
            if spec.layout != GemmLayout::Dots {
                steps.extend(self.matmul(index)?);
            }
        }
        Ok(steps)
    }

    /// The backward of the whole-row plans ends in the projections of gx̂ and gŵ (or
    /// gw'), per chunk (a plan in blocks projects each block as it is finished).
    fn projections(&self) -> Result<Vec<Step<'a>>> {
        let mut steps = Vec::new();
        for chunk in 0..self.plan.geometry.chunks.len() {
            steps.extend(self.projection(chunk, false)?);
        }
        Ok(steps)
    }

    /// The projection of chunk `chunk`'s stacked rows (x's with the first, unless in
    /// blocks), or with `features_only` of x's rows alone, then the rounding of those
    /// rows' gradients where stored in 16 bits.
    fn projection(&self, chunk: usize, features_only: bool) -> Result<Vec<Step<'a>>> {
        let plan = self.plan;
        let pieces = dim_pieces(plan.shape.dim as u64);
        let (rows, rounded) = if features_only {
            (plan.shape.batch as u64, (plan.rounded_features(), 0))
        } else {
            let classes = u64::from(plan.geometry.chunks[chunk].classes);
            let features = u64::from(plan.projected_feature_rows(chunk));
            (classes + features, plan.rounded_values(chunk))
        };
        let step = |entry, grid| -> Result<Step<'a>> {
            Ok(Step {
                chunk,
                features_only,
                ..Step::once(self.kernel(entry)?, grid)
            })
        };
        let grid = self.per_row(rows * pieces)?;
        let mut steps = Vec::new();
        if pieces > 1 {
            steps.push(step(Entry::ProjectionDots, grid)?);
        }
        steps.push(step(Entry::NormalizeBackward, grid)?);
        let words = u64::from(rounded.0.div_ceil(2)) + u64::from(rounded.1.div_ceil(2));
        if words > 0 {
            steps.push(step(Entry::RoundGradients, self.per_row(words)?)?);
        }
        Ok(steps)
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
pub(super) fn binding_name(binding: Binding) -> &'static str {
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
        Binding::GradFeatures => "grad_features",
        Binding::GradClasses => "grad_classes",
        Binding::GradFeaturesOut => "grad_features_out",
        Binding::GradClassesOut => "grad_classes_out",
        Binding::RowMargins => "row_margins",
        Binding::HardThresholds => "hard_thresholds",
        Binding::InvNormClassQuads => "inv_norm_class_quads",
        Binding::FeatureQuads => "feature_quads",
        Binding::ClassQuads => "class_quads",
        Binding::PaddedFeatures => "padded_features (x̂ in rows of D rounded up to 4)",
        Binding::PaddedClasses => "padded_classes (w in rows of D rounded up to 4)",
        Binding::ProjectionPieceDots => "projection_piece_dots",
        Binding::Logits => "logits (rows of a chunk × C, or × a class block)",
        Binding::GemmShape => "gemm",
        Binding::GemmLhs => "lhs",
        Binding::GemmRhs => "rhs",
        Binding::GemmProduct => "product",
        Binding::SplitProducts => "split_products",
    }
}

/// A caller's region on the host: STORAGE usage, an aligned offset, room for its bytes.
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
    Ok(())
}

/// The bind groups of `dispatches`, made inside an error scope. Where wgpu refuses one (a
/// buffer of another device of the same wgpu instance: a validation error; of another
/// instance whose id is unknown here: a panic of wgpu-core, caught), each caller region
/// is bound alone to find which, and the error names it. Where a foreign buffer's id
/// happens to name one of this instance's buffers, wgpu cannot tell.
fn bind_checked(
    ctx: &Context,
    dispatches: &[Dispatch<'_>],
    regions: &[Region<'_>],
) -> Result<Vec<wgpu::BindGroup>> {
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let bound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        bind_groups(&ctx.device, dispatches)
    }));
    let refused = pollster::block_on(scope.pop());
    match (bound, refused) {
        (Ok(groups), None) => Ok(groups),
        (_, refused) => {
            for r in regions {
                probe_region(ctx, r)?;
            }
            Err(Error::Gpu(refused.map_or_else(
                || "internal: wgpu-core refused a bind group".into(),
                |e| e.to_string(),
            )))
        }
    }
}

/// Binds four bytes of the region, alone, inside an error scope: [`Error::BadBuffer`]
/// where wgpu refuses it (see [`bind_checked`]).
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
