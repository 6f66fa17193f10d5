//! The fused loss as a Burn backend extension: on [`CubeBackend`] (Burn's wgpu backend
//! without fusion) it records the crate's kernels on Burn's own device, queue and
//! buffers; on `Autodiff<CubeBackend>` its backward hands out the gradients that the
//! forward computed in the same recording.
//!
//! Ordering. CubeCL batches its kernels in an encoder of its own and submits them later.
//! Before the crate's passes are submitted, [`Client::flush`](cubecl::client::Client)
//! submits everything Burn has queued on this device, so that the inputs are written
//! when the kernels read them; the crate then submits on the same queue at once, before
//! Burn records anything that reads the outputs. One queue runs submissions in order,
//! so Burn's laziness cannot reorder the passes. The inputs' and outputs' allocations
//! are pinned ([`get_resource`](cubecl::client::Client)) until the submit.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::autodiff::Autodiff;
use burn::backend::ops::IntTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, WgpuResource};
use burn::backend::{backend_extension, AutodiffBackend, Backend, TensorMetadata};
use burn::tensor::{DType, IntDType, Shape};
use cubecl::wgpu::WgpuServer;
use margin_softmax::{BufferRegion, DeviceInputs, DeviceOutputs, GradOutputs, LossParams};

use crate::device::fused_cube;

/// f32 words per row of statistics (`margin_softmax::RowStats`) and in the summary.
const ROW_WORDS: usize = 6;
const SUMMARY_WORDS: usize = 8;

/// The fused margin-softmax loss of features x (B×D), class vectors w (C×D) and labels
/// y (B, i32; −1 ignores a row), with the scale tensor s (one value) as the scale's
/// node in the graph (its value travels in `params.scale`).
///
/// Outputs: the loss (1), the summary as f32 and as i32 words (8: loss, dL/ds, valid
/// rows, correct rows, flags, mean achieved margin, rows whose margin holds, padding),
/// the row statistics as f32 and as i32 words (B×6: loss, target cosine, best other
/// cosine, prediction, achieved margin, target probability). Each pair is one buffer.
#[backend_extension(Cube, Autodiff)]
pub trait MarginSoftmaxOps: Backend {
    /// The forward pass: the loss and its statistics.
    #[allow(clippy::type_complexity)]
    fn margin_softmax(
        features: FloatTensor<Self>,
        classes: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        labels: IntTensor<Self>,
        params: LossParams,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
    );

    /// The forward pass and dL/dx, dL/dw of the reduced loss, in one recording (the
    /// cosines are computed once for both). The last two outputs are the gradients.
    #[allow(clippy::type_complexity)]
    fn margin_softmax_with_grads(
        features: FloatTensor<Self>,
        classes: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        labels: IntTensor<Self>,
        params: LossParams,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    );
}

/// What one recording leaves, each a Burn tensor on Burn's allocations.
struct Recorded {
    loss: CubeTensor,
    summary: CubeTensor,
    summary_words: CubeTensor,
    rows: CubeTensor,
    row_words: CubeTensor,
    grads: Option<(CubeTensor, CubeTensor)>,
}

/// A contiguous f32 or i32 tensor on `like`'s device, on a new allocation.
fn empty(like: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    let handle = like.client.empty(shape.num_elements() * dtype.size());
    CubeTensor::new_contiguous(
        like.client.clone(),
        like.device.clone(),
        shape,
        handle,
        dtype,
    )
}

/// `tensor`'s allocation read as another shape and type (the i32 words of an f32 buffer).
fn view(tensor: &CubeTensor, shape: Shape, dtype: DType) -> CubeTensor {
    CubeTensor::new_contiguous(
        tensor.client.clone(),
        tensor.device.clone(),
        shape,
        tensor.handle.clone(),
        dtype,
    )
}

/// A pinned allocation as the crate's device API takes it.
fn region(resource: &WgpuResource) -> BufferRegion<'_> {
    BufferRegion {
        buffer: &resource.buffer,
        offset: resource.offset,
    }
}

/// Records the crate's plan for these tensors and submits it. `module.rs` made the plan
/// and checked the shapes and parameters before routing here, so a failure now is a
/// device fault or a bug, and panics with the crate's message (Burn's ops return no
/// errors).
fn record(
    features: CubeTensor,
    classes: CubeTensor,
    labels: CubeTensor,
    params: LossParams,
    with_grads: bool,
) -> Recorded {
    let fused = fused_cube(&features.device)
        .expect("the module routes only tensors on a registered device to the fused kernels");
    let features = burn_cubecl::kernel::into_contiguous(features);
    let classes = burn_cubecl::kernel::into_contiguous(classes);
    let labels = match labels.dtype {
        DType::I32 => labels,
        _ => CubeBackend::int_cast(labels, IntDType::I32),
    };
    let labels = burn_cubecl::kernel::into_contiguous(labels);
    let (batch, dim) = (features.meta.shape()[0], features.meta.shape()[1]);
    let num_classes = classes.meta.shape()[0];
    let shape = margin_softmax::Shape::new(batch, dim, num_classes);
    let plan = fused
        .plan(shape)
        .expect("the module made this shape's plan before routing here");

    let summary = empty(&features, Shape::new([SUMMARY_WORDS]), DType::F32);
    let rows = empty(&features, Shape::new([batch, ROW_WORDS]), DType::F32);
    let grads = with_grads.then(|| {
        (
            empty(&features, Shape::new([batch, dim]), DType::F32),
            empty(&features, Shape::new([num_classes, dim]), DType::F32),
        )
    });
    let client = features.client.clone();
    let resource = |t: &CubeTensor| {
        client
            .get_resource::<WgpuServer<AutoCompiler>>(t.handle.clone())
            .expect("a live tensor of this device has a wgpu buffer")
    };
    let (x, w, y) = (resource(&features), resource(&classes), resource(&labels));
    let (stats, total) = (resource(&rows), resource(&summary));
    let grad_resources = grads.as_ref().map(|(gx, gw)| (resource(gx), resource(gw)));
    client
        .flush()
        .expect("Burn's queued work on this device submits");
    let inputs = DeviceInputs {
        features: region(x.resource()),
        classes: region(w.resource()),
        labels: region(y.resource()),
    };
    let outputs = DeviceOutputs {
        row_stats: region(stats.resource()),
        summary: region(total.resource()),
        grads: grad_resources.as_ref().map(|(gx, gw)| GradOutputs {
            features: region(gx.resource()),
            classes: region(gw.resource()),
        }),
    };
    let ctx = &fused.context;
    let mut encoder = ctx
        .device()
        .create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("margin-softmax"),
        });
    plan.record(ctx, &mut encoder, &inputs, &outputs, &params)
        .unwrap_or_else(|e| panic!("margin-softmax could not record its kernels: {e}"));
    ctx.queue().submit([encoder.finish()]);

    Recorded {
        loss: view(&summary, Shape::new([1]), DType::F32),
        summary_words: view(&summary, Shape::new([SUMMARY_WORDS]), DType::I32),
        row_words: view(&rows, Shape::new([batch, ROW_WORDS]), DType::I32),
        summary,
        rows,
        grads,
    }
}

impl MarginSoftmaxOps for CubeBackend {
    fn margin_softmax(
        features: CubeTensor,
        classes: CubeTensor,
        _scale: CubeTensor,
        labels: CubeTensor,
        params: LossParams,
    ) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
        let r = record(features, classes, labels, params, false);
        (r.loss, r.summary, r.summary_words, r.rows, r.row_words)
    }

    fn margin_softmax_with_grads(
        features: CubeTensor,
        classes: CubeTensor,
        _scale: CubeTensor,
        labels: CubeTensor,
        params: LossParams,
    ) -> (
        CubeTensor,
        CubeTensor,
        CubeTensor,
        CubeTensor,
        CubeTensor,
        CubeTensor,
        CubeTensor,
    ) {
        let r = record(features, classes, labels, params, true);
        let (gx, gw) = r.grads.expect("recorded with gradients");
        (
            r.loss,
            r.summary,
            r.summary_words,
            r.rows,
            r.row_words,
            gx,
            gw,
        )
    }
}

/// The backward of the fused loss: the forward left dL/dx, dL/dw and dL/ds of the
/// reduced loss; each is scaled by the loss's incoming gradient.
#[derive(Debug)]
struct StoredGradients;

impl<B: Backend> Backward<B, 3> for StoredGradients {
    /// dL/dx, dL/dw and dL/ds (one value).
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let (grad_features, grad_classes, grad_scale) = ops.state;
        let times_upstream = |grad: FloatTensor<B>| {
            let shape = grad.shape();
            let ones = Shape::from(vec![1; shape.num_dims()]);
            let factor = B::float_expand(B::float_reshape(upstream.clone(), ones), shape);
            B::float_mul(grad, factor)
        };
        let [features, classes, scale] = ops.parents;
        for (node, grad) in [
            (features, grad_features),
            (classes, grad_classes),
            (scale, grad_scale),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, times_upstream(grad));
            }
        }
    }
}

impl<B: MarginSoftmaxOps, C: CheckpointStrategy> MarginSoftmaxOps for Autodiff<B, C> {
    fn margin_softmax(
        features: FloatTensor<Self>,
        classes: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        labels: IntTensor<Self>,
        params: LossParams,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
    ) {
        let nodes = [features.node(), classes.node(), scale.node()];
        let (features, classes, scale) = (
            features.into_primitive(),
            classes.into_primitive(),
            scale.into_primitive(),
        );
        match StoredGradients
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let (loss, summary, summary_words, rows, row_words, gx, gw) =
                    B::margin_softmax_with_grads(features, classes, scale, labels, params);
                let grad_scale = B::float_slice(summary.clone(), &[(1..2).into()]);
                let loss = prep.finish((gx, gw, grad_scale), loss);
                (
                    loss,
                    <Self as AutodiffBackend>::from_inner(summary),
                    summary_words,
                    <Self as AutodiffBackend>::from_inner(rows),
                    row_words,
                )
            }
            OpsKind::UnTracked(prep) => {
                let (loss, summary, summary_words, rows, row_words) =
                    B::margin_softmax(features, classes, scale, labels, params);
                (
                    prep.finish(loss),
                    <Self as AutodiffBackend>::from_inner(summary),
                    summary_words,
                    <Self as AutodiffBackend>::from_inner(rows),
                    row_words,
                )
            }
        }
    }

    fn margin_softmax_with_grads(
        features: FloatTensor<Self>,
        classes: FloatTensor<Self>,
        scale: FloatTensor<Self>,
        labels: IntTensor<Self>,
        params: LossParams,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        IntTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        // Outside the graph: the gradients are outputs here, not the graph's.
        let (loss, summary, summary_words, rows, row_words, gx, gw) = B::margin_softmax_with_grads(
            features.into_primitive(),
            classes.into_primitive(),
            scale.into_primitive(),
            labels,
            params,
        );
        let lift = <Self as AutodiffBackend>::from_inner;
        (
            lift(loss),
            lift(summary),
            summary_words,
            lift(rows),
            row_words,
            lift(gx),
            lift(gw),
        )
    }
}
