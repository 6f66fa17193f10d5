//! A real training run on the UCI handwritten digits (data/digits.csv.gz, CC BY 4.0):
//! a 64→32→3 MLP on the CPU produces 3-D features; the class vectors and the scale are
//! learned too, all from the crate's GPU gradients (dL/dx feeds the MLP's backward pass,
//! dL/dw and dL/ds update the class vectors and the scale). It trains once with m = 0
//! and once with m = 0.35 from the same seed, prints both runs per epoch and side by side,
//! and draws each trained model's sphere map with the test features as dots.
//!
//! `cargo run --release --example digits_core -- [--epochs N] [--out DIR]`; with
//! `--family` it trains the same model with CosFace, ArcFace, AdaFace, CurricularFace and
//! MagFace instead and prints their table.

use margin_softmax::schedule::{AdaFace, AdaFaceState, CurricularFace, CurricularState};
use margin_softmax::{
    cosface_scale_floor, sphere, Context, HostInputs, LearnableScale, LossOutput, LossParams,
    MagFace, Pass, Shape, SplitMix64,
};

#[path = "shared/digits_data.rs"]
mod digits_data;
pub use digits_data::Digits;
use digits_data::{class_angles, load_digits_from, train_test_split};

/// Reads data/digits.csv.gz.
pub fn load_digits() -> Digits {
    load_digits_from(concat!(env!("CARGO_MANIFEST_DIR"), "/data/digits.csv.gz"))
}

const HIDDEN: usize = 32;
const DIM: usize = 3;
const CLASSES: usize = 10;

/// The feature extractor: x = W2·tanh(W1·image + b1) + b2.
#[derive(Clone)]
pub struct Mlp {
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
}

/// Adam's state for one parameter vector.
struct Adam {
    m: Vec<f32>,
    v: Vec<f32>,
    t: i32,
}

impl Adam {
    fn new(n: usize) -> Adam {
        Adam {
            m: vec![0.0; n],
            v: vec![0.0; n],
            t: 0,
        }
    }
    fn step(&mut self, param: &mut [f32], grad: &[f32], lr: f32) {
        self.t += 1;
        let (b1, b2) = (0.9f32, 0.999f32);
        for k in 0..param.len() {
            self.m[k] = b1 * self.m[k] + (1.0 - b1) * grad[k];
            self.v[k] = b2 * self.v[k] + (1.0 - b2) * grad[k] * grad[k];
            let m = self.m[k] / (1.0 - b1.powi(self.t));
            let v = self.v[k] / (1.0 - b2.powi(self.t));
            param[k] -= lr * m / (v.sqrt() + 1e-8);
        }
    }
}

impl Mlp {
    fn new(rng: &mut SplitMix64) -> Mlp {
        let mut init = |n: usize, fan_in: usize| -> Vec<f32> {
            let s = (1.0 / fan_in as f32).sqrt();
            (0..n).map(|_| rng.next_signed() * s).collect()
        };
        Mlp {
            w1: init(HIDDEN * 64, 64),
            b1: vec![0.0; HIDDEN],
            w2: init(DIM * HIDDEN, HIDDEN),
            b2: vec![0.0; DIM],
        }
    }

    /// Features (B×3) and the hidden activations (B×32) for the backward pass.
    fn forward(&self, images: &[[f32; 64]]) -> (Vec<f32>, Vec<f32>) {
        let mut hidden = vec![0.0; images.len() * HIDDEN];
        let mut features = vec![0.0; images.len() * DIM];
        for (i, image) in images.iter().enumerate() {
            for h in 0..HIDDEN {
                let z: f32 =
                    self.b1[h] + (0..64).map(|k| self.w1[h * 64 + k] * image[k]).sum::<f32>();
                hidden[i * HIDDEN + h] = z.tanh();
            }
            for o in 0..DIM {
                features[i * DIM + o] = self.b2[o]
                    + (0..HIDDEN)
                        .map(|h| self.w2[o * HIDDEN + h] * hidden[i * HIDDEN + h])
                        .sum::<f32>();
            }
        }
        (features, hidden)
    }

    /// Gradients of (w1, b1, w2, b2) from dL/dfeatures.
    fn backward(&self, images: &[[f32; 64]], hidden: &[f32], grad_x: &[f32]) -> [Vec<f32>; 4] {
        let mut g = [
            vec![0.0; self.w1.len()],
            vec![0.0; HIDDEN],
            vec![0.0; self.w2.len()],
            vec![0.0; DIM],
        ];
        for (i, image) in images.iter().enumerate() {
            for o in 0..DIM {
                let go = grad_x[i * DIM + o];
                g[3][o] += go;
                for h in 0..HIDDEN {
                    g[2][o * HIDDEN + h] += go * hidden[i * HIDDEN + h];
                }
            }
            for h in 0..HIDDEN {
                let a = hidden[i * HIDDEN + h];
                let gh: f32 = (0..DIM)
                    .map(|o| grad_x[i * DIM + o] * self.w2[o * HIDDEN + h])
                    .sum::<f32>()
                    * (1.0 - a * a);
                g[1][h] += gh;
                for k in 0..64 {
                    g[0][h * 64 + k] += gh * image[k];
                }
            }
        }
        g
    }
}

/// One epoch's figures.
#[derive(Debug, Clone, Copy)]
pub struct EpochStats {
    pub loss: f32,
    pub train_accuracy: f32,
    pub test_accuracy: f32,
    /// Mean angle (degrees) between each test feature and its class vector.
    pub intra_class_degrees: f32,
    /// Smallest angle (degrees) between two class vectors.
    pub inter_class_degrees: f32,
    pub scale: f32,
}

/// A trained model and its history.
pub struct Run {
    pub history: Vec<EpochStats>,
    pub class_vectors: Vec<f32>,
    pub test_features: Vec<f32>,
    pub params: LossParams,
}

/// A member of the margin family, as the training loop runs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Member {
    /// AM-Softmax / CosFace with cosine margin m.
    Cos(f32),
    /// ArcFace with angular margin m.
    Arc(f32),
    /// AdaFace with its defaults and a running state.
    Ada,
    /// CurricularFace with its defaults and a running t.
    Curricular,
    /// MagFace with its defaults.
    Mag,
}

impl Member {
    /// The name in the comparison table.
    pub fn name(&self) -> String {
        match self {
            Member::Cos(m) => format!("CosFace m = {m}"),
            Member::Arc(m) => format!("ArcFace m = {m}"),
            Member::Ada => "AdaFace".into(),
            Member::Curricular => "CurricularFace".into(),
            Member::Mag => "MagFace".into(),
        }
    }

    /// The parameters without the scale, which is learned.
    fn base(&self) -> LossParams {
        match self {
            Member::Cos(m) => LossParams {
                margin: *m,
                ..LossParams::default()
            },
            Member::Arc(m) => LossParams {
                margin: 0.0,
                angular_margin: *m,
                ..LossParams::default()
            },
            Member::Ada => AdaFace::default().params(),
            Member::Curricular => LossParams {
                margin: 0.0,
                angular_margin: CurricularFace::default().margin,
                ..LossParams::default()
            },
            Member::Mag => MagFace::default().params(),
        }
    }
}

/// The running state of the members that keep one.
#[derive(Default)]
struct MemberState {
    adaface: AdaFaceState,
    curricular: CurricularState,
}

impl MemberState {
    /// One training step's loss on `inputs` for `member` with learned `params`.
    fn loss(
        &mut self,
        ctx: &Context,
        member: Member,
        inputs: &HostInputs<'_>,
        params: LossParams,
    ) -> LossOutput {
        let pass = Pass::ForwardBackward;
        let run = |inputs: &HostInputs<'_>, params: &LossParams| {
            ctx.loss_inputs(inputs, params, pass, None)
                .expect("loss on the GPU")
        };
        match member {
            Member::Cos(_) | Member::Arc(_) => run(inputs, &params),
            Member::Ada => {
                let dim = inputs.shape.dim;
                let margins = AdaFace::default()
                    .margins(&mut self.adaface, inputs.features, dim)
                    .expect("AdaFace margins");
                run(&inputs.with_row_margins(&margins), &params)
            }
            Member::Curricular => {
                let step = CurricularFace::default()
                    .step(&mut self.curricular, inputs)
                    .expect("CurricularFace step");
                let params = step.apply(params);
                run(&inputs.with_hard_thresholds(&step.hard_thresholds), &params)
            }
            Member::Mag => MagFace::default()
                .loss(ctx, inputs, &params, pass, None)
                .expect("MagFace"),
        }
    }
}

/// Trains for `epochs` full-batch epochs with margin `margin` on a fixed 80/20 split.
pub fn train(ctx: &Context, digits: &Digits, margin: f32, epochs: usize, seed: u64) -> Run {
    train_member(ctx, digits, Member::Cos(margin), epochs, seed)
}

/// Trains `member` for `epochs` full-batch epochs on a fixed 80/20 split.
pub fn train_member(
    ctx: &Context,
    digits: &Digits,
    member: Member,
    epochs: usize,
    seed: u64,
) -> Run {
    let mut rng = SplitMix64::new(seed);
    let ((train_x, train_y), (test_x, test_y)) = train_test_split(digits, &mut rng);
    let mut mlp = Mlp::new(&mut rng);
    let mut classes: Vec<f32> = (0..CLASSES * DIM).map(|_| rng.next_signed()).collect();
    // The floor: CosFace's bound for 10 classes and a wanted target probability of 0.9.
    let floor = cosface_scale_floor(CLASSES, 0.9) as f32;
    let mut scale = LearnableScale::new(floor + 1.0, floor);
    let mut adam: Vec<Adam> = [mlp.w1.len(), HIDDEN, mlp.w2.len(), DIM, classes.len()]
        .into_iter()
        .map(Adam::new)
        .collect();
    let mut history = Vec::new();
    let base = member.base();
    let mut state = MemberState::default();
    let mut test_features = Vec::new();
    for _ in 0..epochs {
        let params = scale.apply(base);
        let (features, hidden) = mlp.forward(&train_x);
        let shape = Shape::new(train_x.len(), DIM, CLASSES);
        let inputs = HostInputs::new(shape, &features, &classes, &train_y);
        let out = state.loss(ctx, member, &inputs, params);
        let grads = out.grads.as_ref().expect("gradients");
        let g = mlp.backward(&train_x, &hidden, &grads.features);
        let lr = 0.01;
        adam[0].step(&mut mlp.w1, &g[0], lr);
        adam[1].step(&mut mlp.b1, &g[1], lr);
        adam[2].step(&mut mlp.w2, &g[2], lr);
        adam[3].step(&mut mlp.b2, &g[3], lr);
        adam[4].step(&mut classes, &grads.classes, lr);
        scale.sgd_step(out.grad_scale, 0.5);

        let (test, _) = mlp.forward(&test_x);
        // The prediction (the nearest class vector) needs no member's per-row inputs.
        let test_out = ctx
            .loss(
                Shape::new(test_x.len(), DIM, CLASSES),
                &test,
                &classes,
                &test_y,
                &scale.apply(LossParams::default()),
                Pass::Forward,
            )
            .expect("test loss");
        let (intra, inter) = class_angles(&test, &test_y, &classes, DIM);
        history.push(EpochStats {
            loss: out.loss,
            train_accuracy: out.correct_rows as f32 / out.valid_rows as f32,
            test_accuracy: test_out.correct_rows as f32 / test_out.valid_rows as f32,
            intra_class_degrees: intra,
            inter_class_degrees: inter,
            scale: params.effective_scale(),
        });
        test_features = test;
    }
    Run {
        history,
        class_vectors: classes,
        test_features,
        params: scale.apply(base),
    }
}

#[allow(dead_code)]
fn main() {
    let args: Vec<String> = std::env::args().collect();
    let value = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|k| args.get(k + 1))
            .cloned()
    };
    let epochs: usize = value("--epochs").map_or(300, |v| v.parse().expect("--epochs N"));
    let out = std::path::PathBuf::from(value("--out").unwrap_or_else(|| "docs".into()));
    std::fs::create_dir_all(&out).expect("output directory");
    let ctx = Context::new_default().expect("a wgpu adapter");
    let digits = load_digits();
    println!(
        "adapter {}; {} images; {epochs} epochs per run",
        ctx.describe(),
        digits.labels.len()
    );
    if args.iter().any(|a| a == "--family") {
        compare_family(&ctx, &digits, epochs);
        return;
    }
    let mut runs = Vec::new();
    for margin in [0.0, 0.35] {
        let start = std::time::Instant::now();
        let run = train(&ctx, &digits, margin, epochs, 7);
        println!(
            "\nm = {margin}: epoch, loss, train acc, test acc, intra-class °, min inter-class °, s"
        );
        for (e, h) in run.history.iter().enumerate() {
            if e % (epochs / 10).max(1) == 0 || e + 1 == epochs {
                println!(
                    "{:>5} {:>8.4} {:>7.3} {:>7.3} {:>7.2} {:>7.2} {:>6.2}",
                    e + 1,
                    h.loss,
                    h.train_accuracy,
                    h.test_accuracy,
                    h.intra_class_degrees,
                    h.inter_class_degrees,
                    h.scale
                );
            }
        }
        println!("({:.1} s)", start.elapsed().as_secs_f64());
        let image = sphere::render(
            &ctx,
            &run.class_vectors,
            &run.params,
            256,
            &run.test_features,
        )
        .expect("sphere map");
        let path = out.join(format!(
            "digits-m{}.png",
            if margin == 0.0 { "0" } else { "035" }
        ));
        image.write_png(&path).expect("write png");
        println!("wrote {}", path.display());
        runs.push((margin, run));
    }
    println!("\n| | m = 0 | m = 0.35 |\n|---|---|---|");
    let last = |k: usize| *runs[k].1.history.last().expect("an epoch");
    let row = |name: &str, f: &dyn Fn(EpochStats) -> f32| {
        println!("| {name} | {:.3} | {:.3} |", f(last(0)), f(last(1)))
    };
    row("final loss", &|h| h.loss);
    row("train accuracy", &|h| h.train_accuracy);
    row("test accuracy", &|h| h.test_accuracy);
    row("mean intra-class angle (°)", &|h| h.intra_class_degrees);
    row("smallest inter-class angle (°)", &|h| {
        h.inter_class_degrees
    });
    row("learned scale s", &|h| h.scale);
}

/// Trains the same model with each member from the same seed and prints the table of
/// final test accuracy, mean intra-class angle and smallest inter-class angle.
fn compare_family(ctx: &Context, digits: &Digits, epochs: usize) {
    let members = [
        Member::Cos(0.35),
        Member::Arc(0.5),
        Member::Ada,
        Member::Curricular,
        Member::Mag,
    ];
    println!("\n| member | test accuracy | mean intra-class angle (°) | smallest inter-class angle (°) | learned s | final loss | mean test feature norm |");
    println!("|---|---|---|---|---|---|---|");
    for member in members {
        let start = std::time::Instant::now();
        let run = train_member(ctx, digits, member, epochs, 7);
        let h = *run.history.last().expect("an epoch");
        let norms: Vec<f32> = run
            .test_features
            .chunks_exact(DIM)
            .map(|v| v.iter().map(|a| a * a).sum::<f32>().sqrt())
            .collect();
        println!(
            "| {} | {:.3} | {:.2} | {:.2} | {:.2} | {:.3} | {:.2} |",
            member.name(),
            h.test_accuracy,
            h.intra_class_degrees,
            h.inter_class_degrees,
            h.scale,
            h.loss,
            norms.iter().sum::<f32>() / norms.len().max(1) as f32
        );
        eprintln!(
            "({} in {:.1} s)",
            member.name(),
            start.elapsed().as_secs_f64()
        );
    }
}
