//! The module on Burn's wgpu (the fused kernels, on lavapipe in CI) and its composed twin
//! (on the same device, or on NdArray with the feature `ndarray`), each against the crate's f64 reference within its documented bounds
//! (`margin_softmax::reference::compare`), with gradients through a Burn backbone, and
//! bitwise-repeatable training steps; f16 and bf16 inputs, where Burn holds them on the
//! device, against the reference on their stored values
//! (`margin_softmax::reference::compare_stored`), and a typed error where it does not.

use std::sync::OnceLock;

use burn::module::Param;
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use margin_softmax::reference::{self, compare, compare_stored, ReferenceOutput};
use margin_softmax::{
    flags, ElementType, ElementTypes, Gradients, LossOutput, LossParams, Problem, Shape, IGNORE,
};
use margin_softmax_burn::{
    is_fused, Error, MarginGradient, MarginObjective, MarginReduction, MarginSoftmax,
    MarginSoftmaxConfig, MarginSoftmaxOutput,
};

/// Burn's default wgpu device, registered with the fused kernels once per process.
fn wgpu() -> Device {
    static DEVICE: OnceLock<Device> = OnceLock::new();
    DEVICE
        .get_or_init(|| {
            margin_softmax_burn::wgpu_device()
                .expect("a wgpu adapter (lavapipe in CI): a missing adapter fails the test")
        })
        .clone()
        .autodiff()
}

/// The two paths under test: the fused kernels on the registered wgpu device, and the
/// composed twin (`forward_composed`): on the same wgpu device, or on NdArray with the
/// feature `ndarray` (`cargo test -p margin-softmax-burn --features ndarray`).
#[derive(Clone, Copy, Debug)]
enum Path {
    Fused,
    Composed,
}

const PATHS: [Path; 2] = [Path::Fused, Path::Composed];

impl Path {
    fn device(self) -> Device {
        match self {
            Path::Fused => wgpu(),
            #[cfg(feature = "ndarray")]
            #[allow(deprecated)]
            Path::Composed => Device::ndarray().autodiff(),
            #[cfg(not(feature = "ndarray"))]
            Path::Composed => wgpu(),
        }
    }

    fn forward(self, head: &MarginSoftmax, x: Tensor<2>, y: Tensor<1, Int>) -> MarginSoftmaxOutput {
        match self {
            Path::Fused => head.forward(x, y),
            Path::Composed => head.forward_composed(x, y),
        }
    }
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .unwrap()
}

fn ints<const D: usize>(t: Tensor<D, Int>) -> Vec<i64> {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .unwrap()
}

fn first(t: Tensor<1, Int>) -> u32 {
    ints(t)[0] as u32
}

/// The labels as Burn takes them: −1 for an ignored row.
fn labels(problem: &Problem, device: &Device) -> Tensor<1, Int> {
    let y: Vec<i64> = problem
        .labels
        .iter()
        .map(|&l| if l == IGNORE { -1 } else { i64::from(l) })
        .collect();
    Tensor::from_data(TensorData::new(y, [problem.shape.batch]), device)
}

fn matrix(values: &[f32], rows: usize, cols: usize, device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), [rows, cols]), device)
}

/// `values` stored as `dtype` (rounded to nearest on the host, then uploaded).
fn matrix_as(values: &[f32], rows: usize, cols: usize, device: &Device, dtype: DType) -> Tensor<2> {
    Tensor::from_data(
        TensorData::new(values.to_vec(), [rows, cols]),
        (device, dtype),
    )
}

/// The core's storage type of a Burn float dtype.
fn element(dtype: DType) -> ElementType {
    match dtype {
        DType::F32 => ElementType::F32,
        DType::F16 => ElementType::F16,
        DType::BF16 => ElementType::Bf16,
        other => panic!("no storage type for {other:?}"),
    }
}

/// The module with the problem's class vectors.
fn head(config: &MarginSoftmaxConfig, problem: &Problem, device: &Device) -> MarginSoftmax {
    head_as(config, problem, device, DType::F32)
}

/// The module with the problem's class vectors stored as `dtype`.
fn head_as(
    config: &MarginSoftmaxConfig,
    problem: &Problem,
    device: &Device,
    dtype: DType,
) -> MarginSoftmax {
    let Shape { dim, classes, .. } = problem.shape;
    let mut head = config.init(device);
    head.classes = Param::from_tensor(matrix_as(&problem.classes, classes, dim, device, dtype));
    head
}

/// The problem as Burn stores it: x and w of the dtypes `[x, w]` on `device`, read back
/// (each value exact in f32), for the reference to run on.
fn stored(problem: &Problem, [x, w]: [DType; 2], device: &Device) -> Problem {
    let Shape {
        batch,
        dim,
        classes,
        ..
    } = problem.shape;
    let mut stored = problem.clone();
    stored.features = floats(matrix_as(&problem.features, batch, dim, device, x));
    stored.classes = floats(matrix_as(&problem.classes, classes, dim, device, w));
    stored
}

/// Everything the crate's reference compares, read back from the module's tensors.
fn host(out: MarginSoftmaxOutput, grad_scale: f32, grads: Gradients) -> LossOutput {
    let rows = out.rows;
    LossOutput {
        loss: floats(out.loss)[0],
        row_loss: floats(rows.loss),
        grad_scale,
        pred: ints(rows.pred).into_iter().map(|p| p as u32).collect(),
        target_cos: floats(rows.target_cos),
        best_other_cos: floats(rows.best_other_cos),
        achieved_margin: floats(rows.achieved_margin),
        target_prob: floats(rows.target_prob),
        mean_achieved_margin: floats(out.mean_achieved_margin)[0],
        margin_satisfied_rows: first(out.margin_satisfied_rows),
        valid_rows: first(out.valid_rows),
        correct_rows: first(out.correct_rows),
        grads: Some(grads),
    }
}

/// One forward and backward of the module on `path`; dL/ds where the scale is learned,
/// else the reference's `fixed_scale_grad` (a fixed scale has no gradient to compare).
fn step(
    path: Path,
    problem: &Problem,
    config: &MarginSoftmaxConfig,
    fixed_scale_grad: f64,
) -> (LossOutput, u32) {
    step_as(path, problem, config, fixed_scale_grad, [DType::F32; 2])
}

/// [`step`] with x and w stored as the dtypes `[x, w]`; the gradients come back in those
/// dtypes and are widened to f32 (exactly) here.
fn step_as(
    path: Path,
    problem: &Problem,
    config: &MarginSoftmaxConfig,
    fixed_scale_grad: f64,
    [x_dtype, w_dtype]: [DType; 2],
) -> (LossOutput, u32) {
    let Shape { batch, dim, .. } = problem.shape;
    let device = &path.device();
    let head = head_as(config, problem, device, w_dtype);
    let x = matrix_as(&problem.features, batch, dim, device, x_dtype).require_grad();
    let out = path.forward(&head, x.clone(), labels(problem, device));
    let flags = first(out.flags.clone());
    let grads = out.loss.clone().backward();
    let (grad_x, grad_w) = (
        x.grad(&grads).expect("dL/dx"),
        head.classes.val().grad(&grads).expect("dL/dw"),
    );
    assert_eq!(
        (grad_x.dtype(), grad_w.dtype()),
        (x_dtype, w_dtype),
        "{path:?}: each gradient in its input's dtype"
    );
    let gradients = Gradients {
        features: floats(grad_x),
        classes: floats(grad_w),
    };
    let grad_scale = head
        .learned_scale
        .as_ref()
        .map(|s| floats(s.val().grad(&grads).expect("dL/ds"))[0]);
    assert_eq!(grad_scale.is_some(), config.learn_scale);
    let grad_scale = grad_scale.unwrap_or(fixed_scale_grad as f32);
    (host(out, grad_scale, gradients), flags)
}

/// A problem off every tile grid, with every 7th row ignored and two zero feature rows,
/// one ignored (row 0) and one labelled (row 1).
fn problem(shape: Shape, seed: u64) -> Problem {
    let mut problem = Problem::random(shape, seed);
    for i in (0..shape.batch).step_by(7) {
        problem.labels[i] = IGNORE;
    }
    problem.features[..2 * shape.dim.min(shape.batch * shape.dim / 2)].fill(0.0);
    problem
}

/// The margins and objectives of the family, each as a Burn user configures it.
fn family(num_classes: usize, dim: usize) -> Vec<(&'static str, MarginSoftmaxConfig)> {
    let base = || MarginSoftmaxConfig::new(num_classes, dim);
    vec![
        ("cosface", base()),
        ("arcface", base().with_margin(0.0).with_angular_margin(0.5)),
        (
            "arcface straight-through",
            base()
                .with_margin(0.0)
                .with_angular_margin(0.5)
                .with_target_gradient(MarginGradient::StraightThrough),
        ),
        (
            "sphereface m1 = 3",
            base().with_margin(0.0).with_multiplicative_margin(3),
        ),
        (
            "combined (1, 0.3, 0.2)",
            base().with_margin(0.2).with_angular_margin(0.3),
        ),
        (
            "sphereface m1 = 4",
            base().with_margin(0.0).with_multiplicative_margin(4),
        ),
        (
            "arcface, easy margin",
            base()
                .with_margin(0.0)
                .with_angular_margin(0.5)
                .with_easy_margin(true),
        ),
        (
            "cosface, inter-class filter 0.2",
            base().with_interclass_filter(Some(0.2)),
        ),
        (
            "hard margin",
            base().with_objective(MarginObjective::HardMargin),
        ),
        (
            "hard margin, arcface",
            base()
                .with_margin(0.0)
                .with_angular_margin(0.5)
                .with_objective(MarginObjective::HardMargin),
        ),
        (
            "sum, learnable scale above its floor",
            base()
                .with_reduction(MarginReduction::Sum)
                .with_learn_scale(true)
                .with_scale(20.0)
                .with_scale_floor(12.0),
        ),
        (
            "learnable scale under its floor",
            base()
                .with_learn_scale(true)
                .with_scale(8.0)
                .with_scale_floor(12.0),
        ),
    ]
}

/// The crate's comparison, and the counts it leaves out.
fn check(
    problem: &Problem,
    params: &LossParams,
    out: &LossOutput,
    expected: &ReferenceOutput,
    what: &str,
) {
    check_stored(
        problem,
        params,
        out,
        expected,
        ElementTypes::default(),
        what,
    );
}

/// [`check`] for tensors stored as `elements` (the problem holds the stored values):
/// `compare_stored`, which adds one rounding of each gradient's type to its bound.
fn check_stored(
    problem: &Problem,
    params: &LossParams,
    out: &LossOutput,
    expected: &ReferenceOutput,
    elements: ElementTypes,
    what: &str,
) {
    let comparison = match elements.all_f32() {
        true => compare(problem.shape.dim, params, out, expected),
        false => compare_stored(problem.shape.dim, params, out, expected, elements),
    };
    assert!(comparison.passes(), "{what}: {comparison:?}");
    let correct = (0..problem.shape.batch)
        .filter(|&i| problem.labels[i] != IGNORE && expected.pred[i] == problem.labels[i])
        .count() as u32;
    assert_eq!(out.correct_rows, correct, "{what}: correct rows");
    assert_eq!(
        out.margin_satisfied_rows as usize, expected.margin_satisfied_rows,
        "{what}: rows whose margin holds"
    );
}

#[test]
fn fused_and_composed_match_the_f64_reference_on_every_margin() {
    let shape = Shape::new(37, 19, 103);
    let problem = problem(shape, 5);
    assert!(
        is_fused(&wgpu()),
        "the registered wgpu device runs the kernels"
    );
    for (name, config) in family(shape.classes, shape.dim) {
        let params = config.loss_params().unwrap();
        let expected = reference::loss_on(&problem, &params).unwrap();
        for path in PATHS {
            let (out, flags) = step(path, &problem, &config, expected.grad_scale);
            let what = format!("{name}, {path:?}");
            check(&problem, &params, &out, &expected, &what);
            assert_eq!(flags, 0, "{what}");
            assert_eq!(out.valid_rows, 31, "{what}");
        }
    }
}

/// f16 and bf16 features and class vectors, together and each with f32, on both paths,
/// wherever Burn holds the dtype on the path's device (f16 on a wgpu adapter with
/// SHADER_F16, lavapipe's included; never bf16 on Burn's wgpu backend): against the f64
/// reference on the values as stored, each gradient in its input's dtype. The problem
/// keeps [`problem`]'s ignored zero row but not its labelled one, whose dL/dx (g/ε) is
/// past f16's range (it rounds to ±inf, which a gradient scaler's check finds).
#[test]
fn sixteen_bit_inputs_match_the_f64_reference_on_their_stored_values() {
    let shape = Shape::new(37, 19, 103);
    let mut problem = problem(shape, 5);
    let fresh = Problem::random(shape, 5);
    problem.features[shape.dim..2 * shape.dim]
        .copy_from_slice(&fresh.features[shape.dim..2 * shape.dim]);
    let kept = [
        "cosface",
        "arcface",
        "sphereface m1 = 3",
        "hard margin",
        "sum, learnable scale above its floor",
    ];
    let configs: Vec<_> = family(shape.classes, shape.dim)
        .into_iter()
        .filter(|(name, _)| kept.contains(name))
        .collect();
    let combinations = [
        [DType::F16, DType::F16],
        [DType::BF16, DType::BF16],
        [DType::F16, DType::F32],
        [DType::F32, DType::F16],
        [DType::BF16, DType::F32],
        [DType::F32, DType::BF16],
    ];
    let mut ran = Vec::new();
    for dtypes in combinations {
        for path in PATHS {
            let device = path.device();
            if !dtypes.iter().all(|&d| device.supports_dtype(d)) {
                // dtypes_burn_cannot_hold_give_typed_errors covers these.
                continue;
            }
            let stored = stored(&problem, dtypes, &device);
            let elements = ElementTypes::inputs(element(dtypes[0]), element(dtypes[1]));
            for (name, config) in &configs {
                let params = config.loss_params().unwrap();
                let expected = reference::loss_on(&stored, &params).unwrap();
                let (out, flags) = step_as(path, &stored, config, expected.grad_scale, dtypes);
                let what = format!("{name}, {path:?}, x {:?}, w {:?}", dtypes[0], dtypes[1]);
                check_stored(&stored, &params, &out, &expected, elements, &what);
                assert_eq!(flags, 0, "{what}");
                assert_eq!(out.valid_rows, 31, "{what}");
            }
            ran.push(format!("{path:?} x {:?} w {:?}", dtypes[0], dtypes[1]));
        }
    }
    eprintln!("16-bit combinations run: {ran:?}");
    if wgpu().supports_dtype(DType::F16) {
        assert!(
            ran.iter().any(|r| r == "Fused x F16 w F16"),
            "f16 is held on the wgpu device, so the fused path ran on it: {ran:?}"
        );
    }
}

/// A 16-bit dtype Burn does not hold on the device (bf16 on Burn's wgpu backend, whose
/// kernels are WGSL, which has no bf16; f16 on an adapter without SHADER_F16), and a
/// float dtype the loss does not take, each refused with an error naming the tensor and
/// the dtype.
#[test]
fn dtypes_burn_cannot_hold_give_typed_errors() {
    let device = wgpu();
    // The WGSL compiler registers no bf16 type on any adapter (cubecl-wgpu's
    // register_types), so Burn reports bf16 unsupported on every wgpu device.
    assert!(!device.supports_dtype(DType::BF16));
    let config = MarginSoftmaxConfig::new(10, 4).with_learn_scale(true);
    let head = config.init(&device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
    let values = vec![0.5f32; 40];
    let mut refused = vec![DType::F64];
    refused.extend(
        [DType::F16, DType::BF16]
            .into_iter()
            .filter(|&d| !device.supports_dtype(d)),
    );
    for dtype in refused {
        // Created from host data: an upload, no kernel of that dtype.
        let x = matrix_as(&values[..8], 2, 4, &device, dtype);
        let error = head.try_forward(x, y.clone()).unwrap_err();
        assert!(
            matches!(error, Error::Dtype { what: "features", dtype: d, .. } if d == dtype),
            "{error}"
        );
        assert!(error.to_string().contains(&format!("{dtype:?}")), "{error}");
        let mut other = head.clone();
        other.classes = Param::from_tensor(matrix_as(&values, 10, 4, &device, dtype));
        let x = matrix(&values[..8], 2, 4, &device);
        let error = other.try_forward(x, y.clone()).unwrap_err();
        assert!(
            matches!(error, Error::Dtype { what: "class vectors", dtype: d, .. } if d == dtype),
            "{error}"
        );
        eprintln!("{dtype:?}: {error}");
    }
}

/// A linear layer before the loss: its weight's gradient is the chain rule of the
/// reference's dL/dx, Σ_i dL/dx_i ⊗ input_i, within the reference's gradient bound.
#[test]
fn gradients_reach_a_linear_backbone() {
    let shape = Shape::new(29, 12, 67);
    let problem = problem(shape, 11);
    let inputs = Problem::random(Shape::new(shape.batch, 9, 1), 3).features;
    let config = MarginSoftmaxConfig::new(shape.classes, shape.dim);
    for path in PATHS {
        let device = path.device();
        let mut linear: Linear = LinearConfig::new(9, shape.dim)
            .with_bias(false)
            .init(&device);
        // Weights [9, D] such that inputs · weights = the problem's features exactly
        // would need a solve; instead take the layer's own output as the features.
        linear.weight = Param::from_tensor(matrix(
            &Problem::random(Shape::new(9, shape.dim, 1), 4).features,
            9,
            shape.dim,
            &device,
        ));
        let input = matrix(&inputs, shape.batch, 9, &device);
        let features = linear.forward(input);
        let host_features = floats(features.clone());
        let head = head(&config, &problem, &device);
        let out = path.forward(&head, features, labels(&problem, &device));
        let grads = out.loss.backward();
        let grad_weight = floats(linear.weight.val().grad(&grads).expect("dL/dW"));

        let params = config.loss_params().unwrap();
        let expected = reference::loss(
            shape,
            &host_features,
            &problem.classes,
            &problem.labels,
            &params,
        )
        .unwrap();
        let mut chain = vec![0.0f64; 9 * shape.dim];
        for i in 0..shape.batch {
            for a in 0..9 {
                for k in 0..shape.dim {
                    chain[a * shape.dim + k] +=
                        f64::from(inputs[i * 9 + a]) * expected.grad_features[i * shape.dim + k];
                }
            }
        }
        let magnitude = expected.grad_features_magnitude
            * inputs.iter().fold(0.0f64, |m, v| m.max(f64::from(v.abs())))
            * shape.batch as f64;
        let error = reference::max_rel_error(&grad_weight, &chain, magnitude);
        assert!(
            error <= reference::GRAD_REL_BOUND,
            "{path:?}: dL/dW off by {error:e}"
        );
    }
}

/// Three Adam steps, twice from the same start: the same bits.
#[test]
fn training_steps_are_bitwise_repeatable() {
    let shape = Shape::new(24, 8, 50);
    let problem = problem(shape, 17);
    let device = wgpu();
    let run = || {
        let config = MarginSoftmaxConfig::new(shape.classes, shape.dim).with_learn_scale(true);
        let mut head = head(&config, &problem, &device);
        let mut optimizer = AdamConfig::new().init();
        let x = matrix(&problem.features, shape.batch, shape.dim, &device);
        let mut trace = Vec::new();
        for _ in 0..3 {
            let out = head.forward(x.clone(), labels(&problem, &device));
            trace.extend(floats(out.loss.clone()).iter().map(|v| v.to_bits()));
            let grads = GradientsParams::from_grads(out.loss.backward(), &head);
            head = optimizer.step(1e-2, head, grads);
        }
        trace.extend(floats(head.classes.val()).iter().map(|v| v.to_bits()));
        trace.extend(floats(head.scale(&device)).iter().map(|v| v.to_bits()));
        trace
    };
    let (a, b) = (run(), run());
    assert_eq!(a, b);
    assert_ne!(a[0], a[1], "the steps change the loss");
}

/// Features that are a transposed view (strides (1, B)) give what their contiguous copy
/// gives, the loss and dL/dx bit for bit: Burn makes them contiguous first.
#[test]
fn strided_features_are_made_contiguous() {
    let shape = Shape::new(13, 6, 21);
    let problem = problem(shape, 23);
    let device = wgpu();
    let config = MarginSoftmaxConfig::new(shape.classes, shape.dim);
    let head = head(&config, &problem, &device);
    let mut transposed = vec![0.0; shape.batch * shape.dim];
    for i in 0..shape.batch {
        for k in 0..shape.dim {
            transposed[k * shape.batch + i] = problem.features[i * shape.dim + k];
        }
    }
    let run = |x: Tensor<2>| {
        let x = x.require_grad();
        let out = head.forward(x.clone(), labels(&problem, &device));
        let grads = out.loss.clone().backward();
        (
            floats(out.rows.loss),
            floats(x.grad(&grads).expect("dL/dx")),
        )
    };
    let contiguous = run(matrix(&problem.features, shape.batch, shape.dim, &device));
    let strided = run(matrix(&transposed, shape.dim, shape.batch, &device).transpose());
    assert_eq!(contiguous, strided);
}

/// `(3·L).backward()` gives 3 × the gradients of L, bit for bit (one f32 product each).
#[test]
fn the_incoming_gradient_scales_every_gradient() {
    let shape = Shape::new(11, 5, 17);
    let problem = problem(shape, 29);
    let device = wgpu();
    let config = MarginSoftmaxConfig::new(shape.classes, shape.dim).with_learn_scale(true);
    let head = head(&config, &problem, &device);
    let grads = |factor: f32| {
        let x = matrix(&problem.features, shape.batch, shape.dim, &device).require_grad();
        let out = head.forward(x.clone(), labels(&problem, &device));
        let grads = (out.loss * factor).backward();
        let scale = head.learned_scale.as_ref().expect("learned").val();
        [
            floats(x.grad(&grads).expect("dL/dx")),
            floats(head.classes.val().grad(&grads).expect("dL/dw")),
            floats(scale.grad(&grads).expect("dL/ds")),
        ]
    };
    let once = grads(1.0);
    let thrice = grads(3.0);
    for (a, b) in once.iter().zip(&thrice) {
        let tripled: Vec<f32> = a.iter().map(|v| v * 3.0).collect();
        assert_eq!(&tripled, b);
    }
}

/// Without autodiff the forward alone runs, with the reference's loss and statistics.
#[test]
fn the_forward_runs_without_autodiff() {
    let shape = Shape::new(19, 7, 33);
    let problem = problem(shape, 31);
    let device = wgpu().without_autodiff();
    let config = MarginSoftmaxConfig::new(shape.classes, shape.dim);
    let params = config.loss_params().unwrap();
    let expected = reference::loss_on(&problem, &params).unwrap();
    let head = head(&config, &problem, &device);
    let x = matrix(&problem.features, shape.batch, shape.dim, &device);
    let out = head.forward(x, labels(&problem, &device));
    let loss = floats(out.loss)[0];
    let rows = floats(out.rows.loss);
    let bound = reference::error_bounds(f64::from(params.scale), shape.dim);
    assert!((f64::from(loss) - expected.loss).abs() <= bound.0 * expected.loss.abs());
    assert!(reference::max_rel_error(&rows, &expected.row_loss, 0.0) <= bound.1);
}

/// B = 1, C = 1, every row ignored, on both paths and both objectives; and non-finite
/// features, flagged.
#[test]
fn edge_problems_match_the_reference_and_flag_non_finite_features() {
    let mut all_ignored = Problem::random(Shape::new(6, 3, 5), 37);
    all_ignored.labels.fill(IGNORE);
    let problems = [
        Problem::random(Shape::new(1, 5, 7), 41),
        Problem::random(Shape::new(9, 4, 1), 43),
        all_ignored,
    ];
    for problem in &problems {
        let Shape { dim, classes, .. } = problem.shape;
        for objective in [MarginObjective::Softmax, MarginObjective::HardMargin] {
            let config = MarginSoftmaxConfig::new(classes, dim).with_objective(objective);
            let params = config.loss_params().unwrap();
            let expected = reference::loss_on(problem, &params).unwrap();
            for path in PATHS {
                let (out, flags) = step(path, problem, &config, expected.grad_scale);
                let what = format!("{:?} {objective:?} {path:?}", problem.shape);
                check(problem, &params, &out, &expected, &what);
                assert_eq!(flags, 0, "{what}");
            }
        }
    }
    let mut poisoned = Problem::random(Shape::new(8, 4, 9), 47);
    poisoned.features[5] = f32::NAN;
    let config = MarginSoftmaxConfig::new(9, 4);
    for path in PATHS {
        let (_, flags) = step(path, &poisoned, &config, 0.0);
        assert_ne!(flags & flags::FEATURES_NON_FINITE, 0, "{path:?}");
    }
}

#[test]
fn bad_input_gives_typed_errors() {
    let device = wgpu();
    let head = MarginSoftmaxConfig::new(10, 4).init(&device);
    let y = Tensor::<1, Int>::from_data(TensorData::new(vec![0i64, 1], [2]), &device);
    let wrong_dim = Tensor::<2>::zeros([2, 5], &device);
    assert!(matches!(
        head.try_forward(wrong_dim, y.clone()),
        Err(Error::Shape {
            what: "features",
            ..
        })
    ));
    let three_rows = Tensor::<2>::zeros([3, 4], &device);
    assert!(matches!(
        head.try_forward(three_rows, y),
        Err(Error::Shape { what: "labels", .. })
    ));
    let bad = MarginSoftmaxConfig::new(10, 4).with_scale(-1.0);
    assert!(matches!(bad.try_init(&device), Err(Error::Core(_))));
    let none = MarginSoftmaxConfig::new(0, 4);
    assert!(matches!(none.try_init(&device), Err(Error::Config(_))));
}
