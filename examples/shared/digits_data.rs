//! The UCI handwritten digits (data/digits.csv.gz, CC BY 4.0) and the angles the digits
//! examples report: shared by `examples/digits_core.rs` (the crate on its own) and
//! `burn/examples/digits.rs` (the Burn module), each of which includes it by path.

use std::io::Read;

use margin_softmax::SplitMix64;

/// Images (64 values in 0..1 each) and digit labels.
pub struct Digits {
    /// 8×8 pixels per image, row by row.
    pub images: Vec<[f32; 64]>,
    /// The digit each image shows.
    pub labels: Vec<u32>,
}

/// Reads the gzipped CSV at `path` (data/digits.csv.gz).
pub fn load_digits_from(path: &str) -> Digits {
    let file = std::fs::File::open(path).expect("data/digits.csv.gz ships with the crate");
    let mut text = String::new();
    flate2::read::GzDecoder::new(file)
        .read_to_string(&mut text)
        .expect("a gzipped CSV");
    let mut digits = Digits {
        images: Vec::new(),
        labels: Vec::new(),
    };
    for line in text.lines().filter(|l| !l.is_empty()) {
        let values: Vec<f32> = line
            .split(',')
            .map(|v| v.trim().parse().expect("a number"))
            .collect();
        let mut image = [0.0; 64];
        for (k, v) in values[..64].iter().enumerate() {
            image[k] = v / 16.0;
        }
        digits.images.push(image);
        digits.labels.push(values[64] as u32);
    }
    digits
}

/// The angle between two vectors, in degrees.
fn angle_degrees(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    (dot / (na * nb).max(1e-12))
        .clamp(-1.0, 1.0)
        .acos()
        .to_degrees()
}

/// Images and their labels.
pub type Split = (Vec<[f32; 64]>, Vec<u32>);

/// The digits shuffled by `rng`, cut 80/20 into (train, test).
pub fn train_test_split(digits: &Digits, rng: &mut SplitMix64) -> (Split, Split) {
    let mut order: Vec<usize> = (0..digits.labels.len()).collect();
    for k in (1..order.len()).rev() {
        order.swap(k, rng.below(k + 1));
    }
    let split = order.len() * 4 / 5;
    let pick = |idx: &[usize]| -> Split {
        (
            idx.iter().map(|&i| digits.images[i]).collect(),
            idx.iter().map(|&i| digits.labels[i]).collect(),
        )
    };
    (pick(&order[..split]), pick(&order[split..]))
}

/// The mean angle between each test feature and its class vector, and the smallest
/// angle between two class vectors, in degrees; vectors of length `dim`.
pub fn class_angles(test: &[f32], test_y: &[u32], classes: &[f32], dim: usize) -> (f32, f32) {
    let count = classes.len() / dim;
    let intra = test_y
        .iter()
        .enumerate()
        .map(|(i, &y)| {
            angle_degrees(
                &test[i * dim..(i + 1) * dim],
                &classes[y as usize * dim..(y as usize + 1) * dim],
            )
        })
        .sum::<f32>()
        / test_y.len() as f32;
    let mut inter = f32::INFINITY;
    for a in 0..count {
        for b in a + 1..count {
            inter = inter.min(angle_degrees(
                &classes[a * dim..(a + 1) * dim],
                &classes[b * dim..(b + 1) * dim],
            ));
        }
    }
    (intra, inter)
}
