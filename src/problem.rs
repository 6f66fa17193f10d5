//! Seeded problems: the embedded default problem of the examples, the CLI and the tests.

use crate::error::{Error, Result};
use crate::io::Shape;

/// Inputs of one loss call, on the host.
#[derive(Debug, Clone, PartialEq)]
pub struct Problem {
    /// B, D and C.
    pub shape: Shape,
    /// x: B×D.
    pub features: Vec<f32>,
    /// w: C×D.
    pub classes: Vec<f32>,
    /// y: B labels in 0..C.
    pub labels: Vec<u32>,
}

/// SplitMix64: a tiny, well-mixed generator, so a seed gives the same problem everywhere.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator started at `seed`.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [-1, 1), with 24 random bits.
    pub fn next_signed(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }
}

impl Problem {
    /// The embedded default problem: B = 100, D = 64, C = 1000, seed 1.
    pub fn default_problem() -> Problem {
        Problem::random(Shape::new(100, 64, 1000), 1)
    }

    /// Features and class vectors uniform in [-1, 1), labels uniform in 0..C, from `seed`.
    ///
    /// # Panics
    /// Where the host cannot hold the problem; [`Problem::try_random`] returns
    /// [`Error::HostMemory`] instead.
    pub fn random(shape: Shape, seed: u64) -> Problem {
        Problem::try_random(shape, seed).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Problem::random`], or [`Error::HostMemory`] where the host cannot allocate x, w
    /// or y (B·D, C·D and B values): the allocation is asked for before any value is
    /// written, so a problem too large for the machine fails at once.
    pub fn try_random(shape: Shape, seed: u64) -> Result<Problem> {
        let mut rng = SplitMix64::new(seed);
        let mut values = |what, rows: usize| -> Result<Vec<f32>> {
            let n = rows.checked_mul(shape.dim);
            let mut v = host_vec(what, n)?;
            v.extend((0..n.unwrap_or(0)).map(|_| rng.next_signed()));
            Ok(v)
        };
        let features = values("features (B·D f32 values)", shape.batch)?;
        let classes = values("class vectors (C·D f32 values)", shape.classes)?;
        let mut labels = host_vec("labels (B u32 values)", Some(shape.batch))?;
        labels.extend((0..shape.batch).map(|_| rng.below(shape.classes.max(1)) as u32));
        Ok(Problem {
            shape,
            features,
            classes,
            labels,
        })
    }
}

/// An empty vector with room for `len` elements (`None`: a count that overflowed), or
/// [`Error::HostMemory`] for `what` where the host cannot allocate it.
pub(crate) fn host_vec<T>(what: &'static str, len: Option<usize>) -> Result<Vec<T>> {
    let element = std::mem::size_of::<T>() as u64;
    let bytes = len.map_or(u64::MAX, |n| (n as u64).saturating_mul(element));
    let mut v = Vec::new();
    match len {
        Some(n) if v.try_reserve_exact(n).is_ok() => Ok(v),
        _ => Err(Error::HostMemory { what, bytes }),
    }
}
