//! The digits training of `examples/digits_core.rs`, in Burn: a 64→32→3 MLP backbone
//! (Burn's `Linear` and `tanh`) and the margin-softmax module, with a learnable scale
//! over CosFace's floor, trained end to end by Burn's Adam on Burn's wgpu device (the
//! fused kernels), once with m = 0 and once with m = 0.35 from the same seed. Prints
//! test accuracy and intra/inter-class angles per run and side by side.
//!
//! `cargo run --release -p margin-softmax-burn --example digits -- [--epochs N]`

use burn::module::{Module, Param};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::tanh;
use burn::tensor::{Device, Int, Tensor, TensorData};
use margin_softmax::{cosface_scale_floor, SplitMix64};
use margin_softmax_burn::{MarginSoftmax, MarginSoftmaxConfig};

#[path = "../../examples/shared/digits_data.rs"]
mod digits_data;
use digits_data::{class_angles, load_digits_from, train_test_split, Split};

const HIDDEN: usize = 32;
const DIM: usize = 3;
const CLASSES: usize = 10;

/// The backbone and the loss, trained together.
#[derive(Module, Debug)]
struct Model {
    hidden: Linear,
    features: Linear,
    head: MarginSoftmax,
}

impl Model {
    fn new(margin: f32, seed: u64, device: &Device) -> Model {
        // Every parameter from one host generator, so that both runs start alike.
        let mut rng = SplitMix64::new(seed);
        let mut dense = |rows: usize, cols: usize, scale: f32| -> Param<Tensor<2>> {
            let values: Vec<f32> = (0..rows * cols)
                .map(|_| rng.next_signed() * scale)
                .collect();
            Param::from_tensor(Tensor::from_data(
                TensorData::new(values, [rows, cols]),
                device,
            ))
        };
        let zeros = |n: usize| Some(Param::from_tensor(Tensor::zeros([n], device)));
        let mut hidden = LinearConfig::new(64, HIDDEN).init(device);
        hidden.weight = dense(64, HIDDEN, (3.0f32 / 64.0).sqrt());
        hidden.bias = zeros(HIDDEN);
        let mut features = LinearConfig::new(HIDDEN, DIM).init(device);
        features.weight = dense(HIDDEN, DIM, (3.0f32 / HIDDEN as f32).sqrt());
        features.bias = zeros(DIM);
        // The floor: CosFace's bound for 10 classes and a wanted target probability of 0.9.
        let floor = cosface_scale_floor(CLASSES, 0.9) as f32;
        let mut head = MarginSoftmaxConfig::new(CLASSES, DIM)
            .with_margin(margin)
            .with_learn_scale(true)
            .with_scale(floor + 1.0)
            .with_scale_floor(floor)
            .init(device);
        head.classes = dense(CLASSES, DIM, 1.0);
        Model {
            hidden,
            features,
            head,
        }
    }

    fn embed(&self, images: Tensor<2>) -> Tensor<2> {
        self.features.forward(tanh(self.hidden.forward(images)))
    }
}

fn tensors(split: &Split, device: &Device) -> (Tensor<2>, Tensor<1, Int>) {
    let (images, labels) = split;
    let pixels: Vec<f32> = images.iter().flatten().copied().collect();
    let labels: Vec<i64> = labels.iter().map(|&l| i64::from(l)).collect();
    (
        Tensor::from_data(TensorData::new(pixels, [images.len(), 64]), device),
        Tensor::from_data(TensorData::new(labels, [images.len()]), device),
    )
}

fn floats<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .convert::<f32>()
        .try_into_vec::<f32>()
        .expect("f32 values")
}

fn count(t: Tensor<1, Int>) -> f32 {
    t.into_data()
        .convert::<i64>()
        .try_into_vec::<i64>()
        .expect("a count")[0] as f32
}

/// Test accuracy, mean intra-class angle, smallest inter-class angle, the scale.
struct Finish {
    test_accuracy: f32,
    intra_degrees: f32,
    inter_degrees: f32,
    scale: f32,
}

fn train(margin: f32, epochs: usize, device: &Device) -> Finish {
    let digits = load_digits_from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../data/digits.csv.gz"
    ));
    let (train_split, test_split) = train_test_split(&digits, &mut SplitMix64::new(7));
    let (train_x, train_y) = tensors(&train_split, device);
    let mut model = Model::new(margin, 7, device);
    let mut optimizer = AdamConfig::new().init();
    println!("\nm = {margin}: epoch, loss, train accuracy");
    for epoch in 0..epochs {
        let out = model
            .head
            .forward(model.embed(train_x.clone()), train_y.clone());
        if epoch % (epochs / 10).max(1) == 0 || epoch + 1 == epochs {
            let accuracy = count(out.correct_rows.clone()) / count(out.valid_rows.clone());
            let loss = floats(out.loss.clone())[0];
            println!("{:>5} {loss:>8.4} {accuracy:>7.3}", epoch + 1);
        }
        let grads = GradientsParams::from_grads(out.loss.backward(), &model);
        model = optimizer.step(0.01, model, grads);
    }
    let model = model.valid();
    let inner = device.clone().without_autodiff();
    let (test_x, test_y) = tensors(&test_split, &inner);
    let features = model.embed(test_x);
    let out = model.head.forward(features.clone(), test_y);
    let (intra, inter) = class_angles(
        &floats(features),
        &test_split.1,
        &floats(model.head.classes.val()),
        DIM,
    );
    Finish {
        test_accuracy: count(out.correct_rows) / count(out.valid_rows),
        intra_degrees: intra,
        inter_degrees: inter,
        scale: floats(model.head.scale(&inner))[0],
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let epochs: usize = args
        .iter()
        .position(|a| a == "--epochs")
        .and_then(|k| args.get(k + 1))
        .map_or(300, |v| v.parse().expect("--epochs N"));
    let device = margin_softmax_burn::wgpu_device()
        .expect("a wgpu adapter")
        .autodiff();
    println!(
        "Burn wgpu device, fused kernels: {}",
        margin_softmax_burn::is_fused(&device)
    );
    let runs: Vec<Finish> = [0.0, 0.35]
        .into_iter()
        .map(|margin| {
            let start = std::time::Instant::now();
            let finish = train(margin, epochs, &device);
            println!("({:.1} s)", start.elapsed().as_secs_f64());
            finish
        })
        .collect();
    println!("\n| after {epochs} epochs | m = 0 | m = 0.35 |\n|---|---|---|");
    let row = |name: &str, f: &dyn Fn(&Finish) -> f32| {
        println!("| {name} | {:.3} | {:.3} |", f(&runs[0]), f(&runs[1]))
    };
    row("test accuracy", &|r| r.test_accuracy);
    row("mean intra-class angle (°)", &|r| r.intra_degrees);
    row("smallest inter-class angle (°)", &|r| r.inter_degrees);
    row("learned scale s", &|r| r.scale);
}
