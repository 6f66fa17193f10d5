//! The fused loss as a Burn backend extension. On [`CubeBackend`] (Burn's wgpu backend)
//! it records the crate's kernels on Burn's own device, queue and buffers; the extension
//! macro wraps that for Burn's fusion (`Fusion<CubeBackend>`, the `Wgpu` Burn runs by
//! default), which records the call in its stream and runs it there in order; on
//! `Autodiff<…>` the backward hands out the gradients that the forward computed in the
//! same recording.
//!
//! Element types. x and w may each be f32, f16 or bf16 (where Burn's backend holds the
//! type on the device: `module.rs` checks [`Device::supports_dtype`](burn::tensor::Device));
//! the plan reads them as they are stored. The kernels write dL/dx and dL/dw in f32, and
//! the backward multiplies them by the loss's incoming gradient in f32 before it rounds
//! them, once, to the dtype of their input, as automatic mixed precision hands them
//! out: a scaled loss (`(loss · k).backward()`, a gradient scaler's) lifts small gradients
//! before they are rounded, not after. Every other output is f32.
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
use burn::backend::fusion::custom::TensorSpec;
use burn::backend::ops::IntTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::wgpu::{AutoCompiler, CubeBackend, CubeTensor, WgpuResource};
use burn::backend::{backend_extension, AutodiffBackend, Backend, ExtensionType, TensorMetadata};
use burn::tensor::{DType, FloatDType, IntDType, Shape};
use cubecl::wgpu::WgpuServer;
use margin_softmax::{
    BufferRegion, DeviceInputs, DeviceOutputs, ElementType, ElementTypes, GradOutputs, LossParams,
};

use crate::device::fused_cube;

/// f32 words per row of statistics (`margin_softmax::RowStats`).
const ROW_WORDS: usize = 6;
/// f32 words in the summary (`margin_softmax::Summary`); dL/ds is the second.
const SUMMARY_WORDS: usize = 8;

/// The loss's tensor inputs: features x (B×D), class vectors w (C×D), the scale s (one
/// value: the scale's node in the graph; its value travels in `LossParams::scale`) and
/// labels y (B, i32; −1 ignores a row).
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct LossInputs<B: Backend> {
    /// x.
    pub features: FloatTensor<B>,
    /// w.
    pub classes: FloatTensor<B>,
    /// s.
    pub scale: FloatTensor<B>,
    /// y.
    pub labels: IntTensor<B>,
}

/// What the forward leaves. The summary and the row statistics are each one buffer, read
/// as f32 and as i32 words (`margin_softmax::Summary`, `margin_softmax::RowStats`).
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct LossTensors<B: Backend> {
    /// The reduced loss (one value).
    pub loss: FloatTensor<B>,
    /// 8 words: loss, dL/ds, valid rows, correct rows, flags, mean achieved margin, rows
    /// whose margin holds, padding.
    pub summary: FloatTensor<B>,
    /// The same words as i32.
    pub summary_words: IntTensor<B>,
    /// B×6 words: loss, target cosine, best other cosine, prediction, achieved margin,
    /// target probability.
    pub rows: FloatTensor<B>,
    /// The same words as i32.
    pub row_words: IntTensor<B>,
}

/// The forward's tensors and dL/dx, dL/dw of the reduced loss.
#[derive(ExtensionType)]
#[extension_type(fusion)]
pub struct LossAndGradients<B: Backend> {
    /// The forward's tensors.
    #[extension_type]
    pub forward: LossTensors<B>,
    /// dL/dx, B×D.
    pub features: FloatTensor<B>,
    /// dL/dw, C×D.
    pub classes: FloatTensor<B>,
}

/// The fused margin-softmax loss as a backend extension.
#[backend_extension(Cube, Fusion, Autodiff)]
pub trait MarginSoftmaxOps: Backend {
    /// The forward pass: the loss and its statistics.
    #[fusion(meta = forward_specs)]
    fn margin_softmax(
        #[extension_type] inputs: LossInputs<Self>,
        params: LossParams,
    ) -> LossTensors<Self>;

    /// The forward pass and the gradients, in one recording (the cosines are computed
    /// once for both).
    #[fusion(meta = forward_backward_specs)]
    fn margin_softmax_with_grads(
        #[extension_type] inputs: LossInputs<Self>,
        params: LossParams,
    ) -> LossAndGradients<Self>;
}

/// The shapes and types of [`MarginSoftmaxOps::margin_softmax`]'s outputs, for Burn's
/// fusion, which records the call and runs it in its stream's order.
fn forward_specs(inputs: &LossInputsMetadata, _: &LossParams) -> LossTensorsMetadata {
    let spec = |shape: &[usize], dtype| TensorSpec::new(Shape::from(shape.to_vec()), dtype);
    let batch = inputs.features.shape[0];
    LossTensorsMetadata {
        loss: spec(&[1], DType::F32),
        summary: spec(&[SUMMARY_WORDS], DType::F32),
        summary_words: spec(&[SUMMARY_WORDS], DType::I32),
        rows: spec(&[batch, ROW_WORDS], DType::F32),
        row_words: spec(&[batch, ROW_WORDS], DType::I32),
    }
}

/// The core's storage type of a float dtype the kernels read and write: f32, f16 or
/// bf16; `None` for any other.
pub(crate) fn element_type(dtype: DType) -> Option<ElementType> {
    match dtype {
        DType::F32 => Some(ElementType::F32),
        DType::F16 => Some(ElementType::F16),
        DType::BF16 => Some(ElementType::Bf16),
        _ => None,
    }
}

/// The plan's element types for x and w of these dtypes: the gradients in f32, to be
/// rounded to their inputs' types after the incoming gradient (see the module doc).
pub(crate) fn element_types(features: DType, classes: DType) -> Option<ElementTypes> {
    Some(ElementTypes::inputs(element_type(features)?, element_type(classes)?).with_f32_grads())
}

/// [`forward_specs`] and the gradients' (the shapes of x and w, in f32).
fn forward_backward_specs(
    inputs: &LossInputsMetadata,
    params: &LossParams,
) -> LossAndGradientsMetadata {
    let grad = |t: &TensorSpec| TensorSpec::new(t.shape.clone(), DType::F32);
    LossAndGradientsMetadata {
        forward: forward_specs(inputs, params),
        features: grad(&inputs.features),
        classes: grad(&inputs.classes),
    }
}

/// What one recording leaves, each a Burn tensor on Burn's allocations.
struct Recorded {
    forward: LossTensors<CubeBackend>,
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
fn record(inputs: LossInputs<CubeBackend>, params: LossParams, with_grads: bool) -> Recorded {
    let LossInputs {
        features,
        classes,
        labels,
        ..
    } = inputs;
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
    let elements = element_types(features.dtype, classes.dtype)
        .expect("the module routes only f32, f16 and bf16 tensors to the fused kernels");
    let shape = margin_softmax::Shape::new(batch, dim, num_classes).with_elements(elements);
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
        row_margins: None,
        hard_thresholds: None,
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
        forward: LossTensors {
            loss: view(&summary, Shape::new([1]), DType::F32),
            summary_words: view(&summary, Shape::new([SUMMARY_WORDS]), DType::I32),
            row_words: view(&rows, Shape::new([batch, ROW_WORDS]), DType::I32),
            summary,
            rows,
        },
        grads,
    }
}

impl MarginSoftmaxOps for CubeBackend {
    fn margin_softmax(inputs: LossInputs<Self>, params: LossParams) -> LossTensors<Self> {
        record(inputs, params, false).forward
    }

    fn margin_softmax_with_grads(
        inputs: LossInputs<Self>,
        params: LossParams,
    ) -> LossAndGradients<Self> {
        let recorded = record(inputs, params, true);
        let (features, classes) = recorded.grads.expect("recorded with gradients");
        LossAndGradients {
            forward: recorded.forward,
            features,
            classes,
        }
    }
}

/// The backward of the fused loss: the forward left dL/dx, dL/dw and (in its summary)
/// dL/ds of the reduced loss, in f32; each is scaled by the loss's incoming gradient and
/// handed out in the dtype of its input.
#[derive(Debug)]
struct StoredGradients;

/// The dtypes of x, w and s: those of the gradients the backward hands out.
type InputDtypes = [FloatDType; 3];

impl<B: Backend> Backward<B, 3> for StoredGradients {
    /// dL/dx, dL/dw, the summary, and the dtypes of x, w and s.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>, InputDtypes);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let upstream = grads.consume::<B>(&ops.node);
        let (grad_features, grad_classes, summary, [x_dtype, w_dtype, scale_dtype]) = ops.state;
        // grad · upstream in f32 (the kernels' gradients are f32; an upstream of another
        // dtype is widened), then rounded once to `dtype`, the input's.
        let times_upstream = |grad: FloatTensor<B>, dtype: FloatDType| {
            let shape = grad.shape();
            let ones = Shape::from(vec![1; shape.num_dims()]);
            let mut factor = B::float_expand(B::float_reshape(upstream.clone(), ones), shape);
            if factor.dtype() != grad.dtype() {
                factor = B::float_cast(factor, grad.dtype().into());
            }
            let product = B::float_mul(grad, factor);
            if FloatDType::from(product.dtype()) == dtype {
                product
            } else {
                B::float_cast(product, dtype)
            }
        };
        let [features, classes, scale] = ops.parents;
        for (node, grad, dtype) in [
            (features, grad_features, x_dtype),
            (classes, grad_classes, w_dtype),
        ] {
            if let Some(node) = node {
                grads.register::<B>(node.id, times_upstream(grad, dtype));
            }
        }
        if let Some(node) = scale {
            let grad_scale = B::float_slice(summary, &[(1..2).into()]);
            grads.register::<B>(node.id, times_upstream(grad_scale, scale_dtype));
        }
    }
}

/// The inputs' primitives, outside the graph.
fn primitives<B: Backend, C: CheckpointStrategy>(
    inputs: LossInputs<Autodiff<B, C>>,
) -> LossInputs<B> {
    LossInputs {
        features: inputs.features.into_primitive(),
        classes: inputs.classes.into_primitive(),
        scale: inputs.scale.into_primitive(),
        labels: inputs.labels,
    }
}

/// Tensors of the inner backend as constants of the graph (the loss excepted, which
/// `Tracked::finish` or `UnTracked::finish` makes).
fn constants<B: Backend, C: CheckpointStrategy>(
    tensors: LossTensors<B>,
    loss: FloatTensor<Autodiff<B, C>>,
) -> LossTensors<Autodiff<B, C>> {
    let lift = <Autodiff<B, C> as AutodiffBackend>::from_inner;
    LossTensors {
        loss,
        summary: lift(tensors.summary),
        summary_words: tensors.summary_words,
        rows: lift(tensors.rows),
        row_words: tensors.row_words,
    }
}

impl<B: MarginSoftmaxOps, C: CheckpointStrategy> MarginSoftmaxOps for Autodiff<B, C> {
    fn margin_softmax(inputs: LossInputs<Self>, params: LossParams) -> LossTensors<Self> {
        let nodes = [
            inputs.features.node(),
            inputs.classes.node(),
            inputs.scale.node(),
        ];
        let dtypes = [
            inputs.features.dtype().into(),
            inputs.classes.dtype().into(),
            inputs.scale.dtype().into(),
        ];
        let inputs = primitives(inputs);
        match StoredGradients
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let out = B::margin_softmax_with_grads(inputs, params);
                let state = (
                    out.features,
                    out.classes,
                    out.forward.summary.clone(),
                    dtypes,
                );
                let loss = prep.finish(state, out.forward.loss.clone());
                constants(out.forward, loss)
            }
            OpsKind::UnTracked(prep) => {
                let out = B::margin_softmax(inputs, params);
                let loss = prep.finish(out.loss.clone());
                constants(out, loss)
            }
        }
    }

    fn margin_softmax_with_grads(
        inputs: LossInputs<Self>,
        params: LossParams,
    ) -> LossAndGradients<Self> {
        // Outside the graph: the gradients are outputs here, not the graph's.
        let out = B::margin_softmax_with_grads(primitives(inputs), params);
        let lift = <Self as AutodiffBackend>::from_inner;
        let loss = lift(out.forward.loss.clone());
        LossAndGradients {
            forward: constants(out.forward, loss),
            features: lift(out.features),
            classes: lift(out.classes),
        }
    }
}
