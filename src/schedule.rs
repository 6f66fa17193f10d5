//! Per-row margin schedules: where each row's margins (m2_i, m3_i) come from, for
//! [`HostInputs::with_row_margins`](crate::HostInputs::with_row_margins) and
//! [`DeviceInputs::row_margins`](crate::DeviceInputs::row_margins). ElasticFace
//! (fdbtrs/ElasticFace, `utils/losses.py`; docs/loss-spec.md): each row draws its margin
//! from N(m, σ) at every step, with no clamp; Arc takes it as the angular margin, Cos as
//! the cosine margin; the "+" variants give the smallest margins to the rows whose target
//! cosine is largest. The draws come from a counter-based generator keyed by (seed,
//! step, row): the same seed and step give the same margins on every machine, whatever
//! ran before, and the reference takes the same margins as the kernels.

use crate::io::IGNORE;
use crate::params::LossParams;
use crate::problem::SplitMix64;

/// Which margin of the combined form an ElasticFace draw sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElasticKind {
    /// The angular margin m2_i: cos(θ + m_i) (ElasticArcFace).
    Arc,
    /// The cosine margin m3_i: cos θ − m_i (ElasticCosFace).
    Cos,
}

/// ElasticFace's per-row margins: m_i ~ N(mean, std), drawn per row and step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ElasticFace {
    /// Which margin the draw sets.
    pub kind: ElasticKind,
    /// m, the draws' mean.
    pub mean: f32,
    /// σ, the draws' standard deviation.
    pub std: f32,
    /// The "+" variant: the draws sorted, the smallest to the rows with the largest
    /// target cosines ([`ElasticFace::plus_margins`]).
    pub plus: bool,
    /// The generator's key, with the step and the row.
    pub seed: u64,
}

impl ElasticFace {
    /// ElasticArcFace's defaults: m = 0.5, σ = 0.05 (with s = 64, [`ElasticFace::params`]).
    pub fn arc() -> ElasticFace {
        ElasticFace {
            kind: ElasticKind::Arc,
            mean: 0.5,
            std: 0.05,
            plus: false,
            seed: 0,
        }
    }

    /// ElasticCosFace's defaults: m = 0.35, σ = 0.05.
    pub fn cos() -> ElasticFace {
        ElasticFace {
            kind: ElasticKind::Cos,
            mean: 0.35,
            ..ElasticFace::arc()
        }
    }

    /// ElasticArcFace+: m = 0.5, σ = 0.0175, sorted.
    pub fn arc_plus() -> ElasticFace {
        ElasticFace {
            std: 0.0175,
            plus: true,
            ..ElasticFace::arc()
        }
    }

    /// ElasticCosFace+: m = 0.35, σ = 0.02, sorted.
    pub fn cos_plus() -> ElasticFace {
        ElasticFace {
            std: 0.02,
            plus: true,
            ..ElasticFace::cos()
        }
    }

    /// The loss parameters the paper pairs with it: s = 64, and no margin of the
    /// parameters' own (the per-row margins replace them).
    pub fn params(&self) -> LossParams {
        LossParams {
            scale: 64.0,
            margin: 0.0,
            angular_margin: 0.0,
            ..LossParams::default()
        }
    }

    /// Draw `k` of step `step`: mean + std·z, z standard normal by Box–Muller from two
    /// uniforms hashed from (seed, step, k).
    pub fn draw(&self, step: u64, k: usize) -> f32 {
        let hash = |lane: u64| {
            [step, k as u64, lane]
                .iter()
                .fold(SplitMix64::new(self.seed).next_u64(), |h, &v| {
                    SplitMix64::new(h ^ v).next_u64()
                })
        };
        // u1 in (0, 1], u2 in [0, 1), from 53 random bits each.
        let unit = |bits: u64| (bits >> 11) as f64 / (1u64 << 53) as f64;
        let u1 = 1.0 - unit(hash(0));
        let u2 = unit(hash(1));
        let z = (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos();
        (f64::from(self.mean) + f64::from(self.std) * z) as f32
    }

    /// The pair (m2_i, m3_i) of a margin.
    fn pair(&self, m: f32) -> [f32; 2] {
        match self.kind {
            ElasticKind::Arc => [m, 0.0],
            ElasticKind::Cos => [0.0, m],
        }
    }

    /// Each of `rows` rows' margins at step `step`: row i takes draw i (the plain
    /// variant; for "+", see [`ElasticFace::plus_margins`]).
    pub fn margins(&self, step: u64, rows: usize) -> Vec<[f32; 2]> {
        (0..rows).map(|i| self.pair(self.draw(step, i))).collect()
    }

    /// The "+" variant's margins at step `step`, from each row's label and target cosine
    /// (those of this step's forward, [`crate::Pass::Forward`]): one draw per labelled
    /// row (draws 0, 1, … in row order), sorted ascending and handed out in descending
    /// order of target cosine (ties in row order); ignored rows take the mean, which
    /// enters no loss.
    pub fn plus_margins(&self, step: u64, labels: &[u32], target_cos: &[f32]) -> Vec<[f32; 2]> {
        let labelled: Vec<usize> = (0..labels.len()).filter(|&i| labels[i] != IGNORE).collect();
        let mut draws: Vec<f32> = (0..labelled.len()).map(|k| self.draw(step, k)).collect();
        draws.sort_by(f32::total_cmp);
        let mut by_cos = labelled;
        by_cos.sort_by(|&a, &b| target_cos[b].total_cmp(&target_cos[a]));
        let mut margins = vec![self.pair(self.mean); labels.len()];
        for (&row, &m) in by_cos.iter().zip(&draws) {
            margins[row] = self.pair(m);
        }
        margins
    }
}
