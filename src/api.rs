//! The slice API: host slices in, host vectors out. It drives the device API on
//! buffers it owns and reuses across calls of the same shape.

use crate::context::{Context, DeviceBuffer};
use crate::error::{Error, Result};
use crate::io::{
    flags, BufferRegion, DeviceInputs, DeviceOutputs, Element, ElementTypes, GradOutputs,
    Gradients, HostInputs, LossOutput, RowStats, Shape, Summary,
};
use crate::params::LossParams;
use crate::plan::{Algorithm, Plan};
use crate::problem::Problem;

/// Which passes to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pass {
    /// Loss and statistics only.
    Forward,
    /// Loss, statistics and the gradients of x and w.
    ForwardBackward,
}

/// Buffers of one shape, kept by the context for reuse.
#[derive(Debug)]
struct SliceState {
    plan: Plan,
    features: DeviceBuffer,
    classes: DeviceBuffer,
    labels: DeviceBuffer,
    /// Per-row margins, where a call has them.
    row_margins: DeviceBuffer,
    /// CurricularFace's per-row thresholds, where a call has them.
    hard_thresholds: DeviceBuffer,
    row_stats: DeviceBuffer,
    summary: DeviceBuffer,
    grad_features: DeviceBuffer,
    grad_classes: DeviceBuffer,
    readback: DeviceBuffer,
}

/// States kept per context; more concurrent shapes than this allocate afresh.
const POOL_SIZE: usize = 8;

/// Byte layout of the read-back buffer: summary, row stats, dL/dx, dL/dw (each gradient
/// in its storage type, rounded up to a whole word).
struct ReadbackLayout {
    row_stats: u64,
    grad_features: u64,
    grad_classes: u64,
    end: u64,
}

impl ReadbackLayout {
    fn new(shape: Shape) -> ReadbackLayout {
        let sizes = BufferSizes::of(shape);
        let row_stats = std::mem::size_of::<Summary>() as u64;
        let grad_features = row_stats + shape.batch as u64 * std::mem::size_of::<RowStats>() as u64;
        let grad_classes = grad_features + sizes.grad_features;
        ReadbackLayout {
            row_stats,
            grad_features,
            grad_classes,
            end: grad_classes + sizes.grad_classes,
        }
    }

    /// The loss output from the read-back bytes: the summary (whose flags are checked),
    /// the row stats and, where computed, the gradients.
    fn read_output<GX: Element, GW: Element>(
        &self,
        bytes: &[u8],
        shape: Shape,
        with_grads: bool,
    ) -> Result<LossOutput<GX, GW>> {
        let summary: Summary = bytemuck::pod_read_unaligned(&bytes[..self.row_stats as usize]);
        check_flags(summary.flags, shape)?;
        let rows: Vec<RowStats> = bytemuck::pod_collect_to_vec(
            &bytes[self.row_stats as usize..self.grad_features as usize],
        );
        let (b, c, d) = (shape.batch, shape.classes, shape.dim);
        // The values alone, without the half word that may end a 16-bit region.
        let values = |at: u64, n: usize, size: usize| &bytes[at as usize..at as usize + n * size];
        let grads = with_grads.then(|| Gradients {
            features: bytemuck::pod_collect_to_vec(values(
                self.grad_features,
                b * d,
                size_of::<GX>(),
            )),
            classes: bytemuck::pod_collect_to_vec(values(
                self.grad_classes,
                c * d,
                size_of::<GW>(),
            )),
        });
        Ok(LossOutput {
            loss: summary.loss,
            row_loss: rows.iter().map(|r| r.loss).collect(),
            grad_scale: summary.scale_grad,
            pred: rows.iter().map(|r| r.pred).collect(),
            target_cos: rows.iter().map(|r| r.target_cos).collect(),
            best_other_cos: rows.iter().map(|r| r.best_other_cos).collect(),
            achieved_margin: rows.iter().map(|r| r.achieved_margin).collect(),
            target_prob: rows.iter().map(|r| r.target_prob).collect(),
            mean_achieved_margin: summary.mean_achieved_margin,
            margin_satisfied_rows: summary.margin_satisfied_rows,
            valid_rows: summary.valid_rows,
            correct_rows: summary.correct_rows,
            grads,
        })
    }
}

impl SliceState {
    fn new(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<SliceState> {
        let plan = Plan::with_algorithm(ctx, shape, algorithm)?;
        let layout = ReadbackLayout::new(shape);
        let buffer = |label, size: u64, usage| ctx.create_buffer(label, size, usage);
        use wgpu::BufferUsages as U;
        let input = U::STORAGE | U::COPY_DST;
        let output = U::STORAGE | U::COPY_SRC;
        let sizes = BufferSizes::of(shape);
        Ok(SliceState {
            features: buffer("features", sizes.features, input),
            classes: buffer("classes", sizes.classes, input),
            labels: buffer("labels", sizes.labels, input),
            row_margins: buffer("row_margins", 2 * sizes.labels, input),
            hard_thresholds: buffer("hard_thresholds", sizes.labels, input),
            row_stats: buffer("row_stats", layout.grad_features - layout.row_stats, output),
            summary: buffer("summary", layout.row_stats, output),
            grad_features: buffer("grad_features", sizes.grad_features, output),
            grad_classes: buffer("grad_classes", sizes.grad_classes, output),
            readback: buffer("readback", layout.end, U::MAP_READ | U::COPY_DST),
            plan,
        })
    }
}

/// Bytes of the slice API's input and gradient buffers for a shape, in its storage types.
struct BufferSizes {
    features: u64,
    classes: u64,
    labels: u64,
    grad_features: u64,
    grad_classes: u64,
}

impl BufferSizes {
    fn of(shape: Shape) -> BufferSizes {
        let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
        let e = shape.elements;
        BufferSizes {
            features: e.features.region_bytes(b * d),
            classes: e.classes.region_bytes(c * d),
            labels: b * 4,
            grad_features: e.grad_features.region_bytes(b * d),
            grad_classes: e.grad_classes.region_bytes(c * d),
        }
    }
}

impl SliceState {
    /// True when every buffer is large enough for `shape`.
    fn fits(&self, shape: Shape) -> bool {
        let layout = ReadbackLayout::new(shape);
        let sizes = BufferSizes::of(shape);
        [
            (&self.features, sizes.features),
            (&self.classes, sizes.classes),
            (&self.labels, sizes.labels),
            (&self.row_margins, 2 * sizes.labels),
            (&self.hard_thresholds, sizes.labels),
            (&self.row_stats, layout.grad_features - layout.row_stats),
            (&self.grad_features, sizes.grad_features),
            (&self.grad_classes, sizes.grad_classes),
            (&self.readback, layout.end),
        ]
        .iter()
        .all(|(buffer, needed)| buffer.size() >= *needed)
    }

    /// Records the copies of the summary, the row stats and, with gradients, dL/dx and
    /// dL/dw into the read-back buffer; returns the bytes to read back.
    fn copy_to_readback(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        layout: &ReadbackLayout,
        with_grads: bool,
    ) -> u64 {
        let mut copy = |src: &wgpu::Buffer, at: u64, size: u64| {
            encoder.copy_buffer_to_buffer(src, 0, &self.readback, at, size)
        };
        copy(&self.summary, 0, layout.row_stats);
        copy(
            &self.row_stats,
            layout.row_stats,
            layout.grad_features - layout.row_stats,
        );
        if with_grads {
            copy(
                &self.grad_features,
                layout.grad_features,
                layout.grad_classes - layout.grad_features,
            );
            copy(
                &self.grad_classes,
                layout.grad_classes,
                layout.end - layout.grad_classes,
            );
            layout.end
        } else {
            layout.grad_features
        }
    }
}

impl Context {
    /// The fused loss on host slices: x (B×D), w (C×D), labels (B, [`IGNORE`](crate::IGNORE) to skip a row).
    /// Blocking; see [`Context::loss_async`].
    pub fn loss(
        &self,
        shape: Shape,
        features: &[f32],
        classes: &[f32],
        labels: &[u32],
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput> {
        pollster::block_on(self.loss_async(shape, features, classes, labels, params, pass))
    }

    /// The loss on host slices, with the fastest algorithm that fits the context's
    /// workspace budget ([`Algorithm::choose`]). Waiting on the GPU is `map_async`
    /// underneath; on native the wait is bounded by the context's timeout.
    pub async fn loss_async(
        &self,
        shape: Shape,
        features: &[f32],
        classes: &[f32],
        labels: &[u32],
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput> {
        let shape = typed_shape::<f32, f32, f32, f32>(shape);
        let algorithm = Algorithm::choose(self, shape);
        let inputs = HostInputs::new(shape, features, classes, labels);
        self.run_slice(algorithm, &inputs, params, pass).await
    }

    /// [`Context::loss`] on a [`Problem`]'s shape, features, class vectors and labels.
    pub fn loss_on(
        &self,
        problem: &Problem,
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput> {
        let p = problem;
        self.loss(p.shape, &p.features, &p.classes, &p.labels, params, pass)
    }

    /// [`Context::loss`] with a given algorithm, for example [`Algorithm::Unfused`] (the
    /// baseline that materialises the B×C logits) or [`Algorithm::MemoryMinimal`] (the
    /// memory-minimal kernels). Blocking.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_with(
        &self,
        algorithm: Algorithm,
        shape: Shape,
        features: &[f32],
        classes: &[f32],
        labels: &[u32],
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput> {
        let inputs = HostInputs::new(shape, features, classes, labels);
        self.loss_inputs(&inputs, params, pass, Some(algorithm))
    }

    /// The loss on host slices stored in 16 or 32 bits: x of `X`, w of `W`, and the
    /// gradients returned as `GX` and `GW` (each `f32`, `half::f16` or `half::bf16`:
    /// for automatic mixed precision, the type of its input; for an f32 master copy,
    /// `f32`). Every product, sum and statistic is f32; 16-bit gradients are rounded to
    /// nearest from f32, times [`LossParams::loss_scale`]. Where a finite gradient rounds
    /// to ±inf the call fails with [`Error::GradientOutOfRange`], naming the tensor.
    /// `shape`'s element types are set from the four types. Blocking.
    #[allow(clippy::too_many_arguments)]
    pub fn loss_typed<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        shape: Shape,
        features: &[X],
        classes: &[W],
        labels: &[u32],
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput<GX, GW>> {
        let inputs = HostInputs::new(shape, features, classes, labels);
        self.loss_inputs(&inputs, params, pass, None)
    }

    /// The loss on [`HostInputs`]: [`Context::loss_typed`] with, optionally, per-row
    /// margins, on `algorithm` (`None`: the fastest that fits the workspace budget).
    /// Blocking.
    pub fn loss_inputs<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        inputs: &HostInputs<'_, X, W>,
        params: &LossParams,
        pass: Pass,
        algorithm: Option<Algorithm>,
    ) -> Result<LossOutput<GX, GW>> {
        let shape = typed_shape::<X, W, GX, GW>(inputs.shape);
        let algorithm = algorithm.unwrap_or_else(|| Algorithm::choose(self, shape));
        let inputs = HostInputs { shape, ..*inputs };
        pollster::block_on(self.run_slice(algorithm, &inputs, params, pass))
    }

    async fn run_slice<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        algorithm: Algorithm,
        inputs: &HostInputs<'_, X, W>,
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput<GX, GW>> {
        self.check_alive()?;
        params.validate()?;
        inputs.check(params)?;
        let state = self.take_state(inputs.shape, algorithm)?;
        let result = self.run_on_state(&state, inputs, params, pass).await;
        // A state whose call failed inside wgpu may hold a pending mapping: drop it.
        if !matches!(
            result,
            Err(Error::Gpu(_) | Error::DeviceLost(_) | Error::Timeout { .. })
        ) {
            self.return_state(state);
        }
        result
    }

    /// A pooled state for `shape`: one of the same shape; else, when the pool is full,
    /// one whose buffers are large enough (its plan is remade for the shape); else a new one.
    fn take_state(&self, shape: Shape, algorithm: Algorithm) -> Result<SliceState> {
        let reused = self.with_cache(Vec::<SliceState>::new, |pool| {
            let exact = pool
                .iter()
                .position(|s| s.plan.shape() == shape && s.plan.algorithm() == algorithm);
            // Reuse a larger state only once the pool is full, so that a few shapes in
            // turn each keep their own state.
            let index = exact.or_else(|| {
                (pool.len() >= POOL_SIZE)
                    .then(|| pool.iter().position(|s| s.fits(shape)))
                    .flatten()
            })?;
            Some(pool.swap_remove(index))
        });
        match reused {
            Some(mut state) => {
                if state.plan.shape() != shape || state.plan.algorithm() != algorithm {
                    state.plan =
                        self.gpu_scoped(|| Plan::with_algorithm(self, shape, algorithm))?;
                }
                Ok(state)
            }
            None => self.gpu_scoped(|| SliceState::new(self, shape, algorithm)),
        }
    }

    fn return_state(&self, state: SliceState) {
        self.with_cache(Vec::<SliceState>::new, |pool| {
            if pool.len() >= POOL_SIZE {
                pool.remove(0);
            }
            pool.push(state);
        });
    }

    /// Runs `f` inside validation and out-of-memory error scopes; a captured error
    /// becomes [`Error::Gpu`].
    pub(crate) fn gpu_scoped<T>(&self, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let oom = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let value = f();
        let validation = pollster::block_on(validation.pop());
        let oom = pollster::block_on(oom.pop());
        if let Some(e) = validation.or(oom) {
            return Err(Error::Gpu(e.to_string()));
        }
        value
    }

    async fn run_on_state<X: Element, W: Element, GX: Element, GW: Element>(
        &self,
        state: &SliceState,
        host: &HostInputs<'_, X, W>,
        params: &LossParams,
        pass: Pass,
    ) -> Result<LossOutput<GX, GW>> {
        let shape = state.plan.shape();
        let layout = ReadbackLayout::new(shape);
        let with_grads = pass == Pass::ForwardBackward;
        let submission = self.gpu_scoped(|| {
            let write = |buffer: &wgpu::Buffer, bytes: &[u8]| {
                self.queue.write_buffer(buffer, 0, &whole_words(bytes))
            };
            write(&state.features, bytemuck::cast_slice(host.features));
            write(&state.classes, bytemuck::cast_slice(host.classes));
            write(&state.labels, bytemuck::cast_slice(host.labels));
            if let Some(margins) = host.row_margins {
                write(&state.row_margins, bytemuck::cast_slice(margins));
            }
            if let Some(thresholds) = host.hard_thresholds {
                write(&state.hard_thresholds, bytemuck::cast_slice(thresholds));
            }
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor::default());
            let outputs = DeviceOutputs {
                row_stats: BufferRegion::from(&*state.row_stats),
                summary: BufferRegion::from(&*state.summary),
                grads: with_grads.then_some(GradOutputs {
                    features: BufferRegion::from(&*state.grad_features),
                    classes: BufferRegion::from(&*state.grad_classes),
                }),
            };
            let inputs = DeviceInputs {
                features: BufferRegion::from(&*state.features),
                classes: BufferRegion::from(&*state.classes),
                labels: BufferRegion::from(&*state.labels),
                row_margins: host
                    .row_margins
                    .map(|_| BufferRegion::from(&*state.row_margins)),
                hard_thresholds: host
                    .hard_thresholds
                    .map(|_| BufferRegion::from(&*state.hard_thresholds)),
            };
            state
                .plan
                .record(self, &mut encoder, &inputs, &outputs, params)?;
            let end = state.copy_to_readback(&mut encoder, &layout, with_grads);
            Ok((self.queue.submit([encoder.finish()]), end))
        })?;
        let (submission, end) = submission;
        let bytes = self.read_back(&state.readback, end, submission).await?;
        layout.read_output(&bytes, shape, with_grads)
    }

    /// Maps `buffer[..size]` once the submission is done and copies it out.
    pub(crate) async fn read_back(
        &self,
        buffer: &wgpu::Buffer,
        size: u64,
        submission: wgpu::SubmissionIndex,
    ) -> Result<Vec<u8>> {
        let (sender, receiver) = futures_intrusive::channel::shared::oneshot_channel();
        let slice = buffer.slice(..size);
        slice.map_async(wgpu::MapMode::Read, move |result| {
            sender.send(result).ok();
        });
        self.wait(submission)?;
        match receiver.receive().await {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(Error::DeviceLost(e.to_string())),
            None => return Err(Error::DeviceLost("the map callback was dropped".into())),
        }
        let bytes = slice
            .get_mapped_range()
            .map(|view| view.to_vec())
            .map_err(|e| Error::Gpu(e.to_string()));
        buffer.unmap();
        bytes
    }
}

/// `shape` with the storage types of the slice API's type parameters.
fn typed_shape<X: Element, W: Element, GX: Element, GW: Element>(shape: Shape) -> Shape {
    shape.with_elements(ElementTypes::of::<X, W, GX, GW>())
}

/// `bytes` ending on a whole 4-byte word (a 16-bit tensor of odd length gains a zero
/// half word), as buffer writes need.
pub(crate) fn whole_words(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    if bytes.len().is_multiple_of(4) {
        std::borrow::Cow::Borrowed(bytes)
    } else {
        let mut padded = bytes.to_vec();
        padded.resize(bytes.len().next_multiple_of(4), 0);
        std::borrow::Cow::Owned(padded)
    }
}

/// Turns the device's input flags into the slice API's typed errors.
pub(crate) fn check_flags(bits: u32, shape: Shape) -> Result<()> {
    if bits & flags::FEATURES_NON_FINITE != 0 {
        return Err(Error::NonFinite { input: "features" });
    }
    if bits & flags::CLASSES_NON_FINITE != 0 {
        return Err(Error::NonFinite { input: "classes" });
    }
    if bits & flags::OVERFLOW != 0 {
        return Err(Error::Overflow);
    }
    for (flag, tensor, element) in [
        (
            flags::GRAD_FEATURES_OUT_OF_RANGE,
            "grad_features",
            shape.elements.grad_features,
        ),
        (
            flags::GRAD_CLASSES_OUT_OF_RANGE,
            "grad_classes",
            shape.elements.grad_classes,
        ),
    ] {
        if bits & flag != 0 {
            return Err(Error::GradientOutOfRange { tensor, element });
        }
    }
    if bits & flags::LABEL_OUT_OF_RANGE != 0 {
        return Err(Error::LabelOutOfRange {
            row: None,
            label: None,
            classes: shape.classes,
        });
    }
    Ok(())
}
