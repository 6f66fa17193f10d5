//! Property test: any shape (0 and 1 included), labels (in range, ignored, out of range),
//! scales, margins of every family and both objectives, and values (zeros, large and small norms) give either the f64
//! reference's answer within the documented bounds or the documented error. Never a panic.

mod common;

use common::context;
use margin_softmax::{
    reference, Error, LossParams, Objective, Pass, Reduction, Shape, SplitMix64, TargetGradient,
    IGNORE,
};
use proptest::prelude::*;

/// Row magnitudes drawn per row: zero rows and norms from 1e-3 to 1e6.
const SCALES: [f32; 6] = [0.0, 1e-3, 1.0, 1.0, 1e3, 1e6];

/// Every cosine between a row of `x` and a row of `w` (rows of `d` values), in f64; none
/// where `d` is 0 or a length is off.
fn cosines(x: &[f32], w: &[f32], d: usize) -> Vec<f64> {
    if d == 0 {
        return Vec::new();
    }
    let unit = |v: &[f32]| {
        let n = v.iter().map(|&a| f64::from(a).powi(2)).sum::<f64>().sqrt();
        v.iter()
            .map(|&a| f64::from(a) / n.max(1e-12))
            .collect::<Vec<f64>>()
    };
    let xs: Vec<Vec<f64>> = x.chunks_exact(d).map(unit).collect();
    let ws: Vec<Vec<f64>> = w.chunks_exact(d).map(unit).collect();
    xs.iter()
        .flat_map(|a| {
            ws.iter()
                .map(move |b| a.iter().zip(b).map(|(p, q)| p * q).sum())
        })
        .collect()
}

fn values(rng: &mut SplitMix64, rows: usize, dim: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(rows * dim);
    for _ in 0..rows {
        let scale = SCALES[rng.below(SCALES.len())];
        v.extend((0..dim).map(|_| rng.next_signed() * scale));
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, failure_persistence: None, ..ProptestConfig::default() })]
    #[test]
    fn every_call_is_right_or_a_documented_error(
        b in 0usize..7,
        d in 0usize..7,
        c in 0usize..9,
        seed in any::<u64>(),
        label_kinds in prop::collection::vec(0u8..6, 7),
        scale in prop_oneof![Just(30.0f32), 0.5f32..100.0, Just(1000.0), Just(0.0), Just(-2.0), Just(f32::NAN)],
        scale_min in prop_oneof![Just(0.0f32), 1.0f32..20.0, Just(-1.0)],
        margin in prop_oneof![Just(0.35f32), -0.5f32..1.0, Just(0.0), Just(5.0)],
        reduction in prop_oneof![Just(Reduction::Mean), Just(Reduction::Sum), Just(Reduction::None)],
        length_error in 0u8..12,
        family in 0u8..6,
        hard in any::<bool>(),
        straight_through in any::<bool>(),
        easy_margin in any::<bool>(),
        interclass_filter in prop_oneof![Just(None), (-0.5f32..0.9).prop_map(Some), Just(Some(1.5))],
        angle_clip in any::<bool>(),
    ) {
        let shape = Shape::new(b, d, c);
        let mut rng = SplitMix64::new(seed);
        let mut x = values(&mut rng, b, d);
        let w = values(&mut rng, c, d);
        let mut labels: Vec<u32> = (0..b)
            .map(|i| match label_kinds[i] {
                0 => IGNORE,
                1 if rng.below(4) == 0 => (c + rng.below(3)) as u32, // out of range, sometimes
                _ => rng.below(c.max(1)) as u32,
            })
            .collect();
        match length_error {
            0 => { x.pop(); }
            1 => labels.push(0),
            _ => {}
        }
        let (angular_margin, multiplicative_margin) = match family {
            0 => (0.5, 1),
            1 => (2.5, 1),
            2 => (0.0, 3),
            3 => (0.3, 2), // invalid: both kinds of angular margin
            _ => (0.0, 1),
        };
        // The easy margin and the filter switch a logit at c = 0 and c = t: keep every
        // cosine off those points by more than the f32 cosines' rounding, where a GPU
        // and the f64 reference may rightly fall on different sides.
        let cos = cosines(&x, &w, d);
        let near = |point: f32| cos.iter().any(|c| (c - f64::from(point)).abs() < 1e-4);
        let easy_margin = easy_margin && !near(0.0);
        let interclass_filter = interclass_filter.filter(|&t| !near(t));
        let params = LossParams {
            scale,
            scale_min,
            margin,
            reduction,
            angular_margin,
            multiplicative_margin,
            objective: if hard { Objective::HardMargin } else { Objective::Softmax },
            target_gradient: if straight_through { TargetGradient::StraightThrough } else { TargetGradient::Exact },
            loss_scale: 1.0,
            easy_margin,
            interclass_filter,
            angle_clip,
            curricular: None,
        };
        let gpu = context().loss(shape, &x, &w, &labels, &params, Pass::ForwardBackward);
        match reference::loss(shape, &x, &w, &labels, &params) {
            Err(expected) => {
                let got = gpu.expect_err("the reference refused these inputs; the GPU path must too");
                prop_assert_eq!(std::mem::discriminant(&got), std::mem::discriminant(&expected), "{} vs {}", got, expected);
            }
            Ok(expected) => match gpu {
                Ok(out) => {
                    let check = reference::compare(d, &params, &out, &expected);
                    prop_assert!(check.passes(), "{:?} {:?}: {:?}", shape, params, check);
                }
                Err(e) => prop_assert!(false, "{:?} {:?}: unexpected error {}", shape, params, e),
            },
        }
    }
}

#[test]
fn errors_match_their_documented_variants() {
    // The property above compares variants with the reference; this pins the variants.
    let ctx = context();
    let p = LossParams::default();
    let shape = Shape::new(1, 1, 1);
    assert!(matches!(
        ctx.loss(shape, &[1.0], &[1.0], &[1], &p, Pass::Forward),
        Err(Error::LabelOutOfRange { .. })
    ));
    assert!(matches!(
        ctx.loss(Shape::new(0, 1, 1), &[], &[1.0], &[], &p, Pass::Forward),
        Err(Error::EmptyShape { .. })
    ));
}
