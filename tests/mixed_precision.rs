//! Mixed precision: x, w and the gradients stored as f16 or bf16, every product and sum
//! in f32. Each plan against the f64 reference run on the 16-bit values as stored; the
//! kernels' rounding of the gradients against the host's, bit for bit; repeatability;
//! the loss scale against f16's underflow; the typed error of a gradient too large for
//! its type.

mod common;

use margin_softmax::half::{bf16, f16};
use margin_softmax::reference;
use margin_softmax::{
    Algorithm, Element, ElementType, ElementTypes, Error, HostInputs, LossOutput, LossParams, Pass,
    Problem, Shape, IGNORE,
};

/// `values` rounded to nearest in `T`.
fn stored<T: Element>(values: &[f32]) -> Vec<T> {
    values.iter().map(|&v| T::narrow(v)).collect()
}

/// The f32 value of each stored `T` (exact).
fn widened<T: Element>(values: &[T]) -> Vec<f32> {
    values.iter().map(|&v| v.widen()).collect()
}

/// A seeded problem with a few rows ignored and feature norms from 1e-3 to 1e3.
fn problem(b: usize, d: usize, c: usize, seed: u64) -> Problem {
    let mut p = Problem::random(Shape::new(b, d, c), seed);
    p.labels[1] = IGNORE;
    for (i, row) in p.features.chunks_mut(d).enumerate() {
        let scale = [1e-3f32, 1.0, 1e3][i % 3];
        row.iter_mut().for_each(|v| *v *= scale);
    }
    p
}

/// Runs `p` stored as (X, W) with gradients (GX, GW) on `algorithm`, checks it against
/// the reference on the stored values, and returns its widened output.
fn check_typed<X: Element, W: Element, GX: Element, GW: Element>(
    algorithm: Algorithm,
    p: &Problem,
    params: &LossParams,
) -> LossOutput {
    let (x, w) = (stored::<X>(&p.features), stored::<W>(&p.classes));
    let elements = ElementTypes::of::<X, W, GX, GW>();
    let what = format!("{algorithm:?} {elements:?} {:?}", p.shape);
    let out: LossOutput<GX, GW> =
        typed_run(algorithm, p, (&x, &w), params).unwrap_or_else(|e| panic!("{what}: {e}"));
    let out = out.widened();
    let expected =
        reference::loss(p.shape, &widened(&x), &widened(&w), &p.labels, params).expect("reference");
    let check = reference::compare_stored(p.shape.dim, params, &out, &expected, elements);
    assert!(check.passes(), "{what}: {check:?}");
    assert_eq!(out.valid_rows as usize, expected.valid_rows, "{what}");
    out
}

/// `p`'s labels and shape with x and w as given, on `algorithm`, forward and backward.
fn typed_run<X: Element, W: Element, GX: Element, GW: Element>(
    algorithm: Algorithm,
    p: &Problem,
    (x, w): (&[X], &[W]),
    params: &LossParams,
) -> margin_softmax::Result<LossOutput<GX, GW>> {
    let inputs = HostInputs::new(p.shape, x, w, &p.labels);
    common::context().loss_inputs(&inputs, params, Pass::ForwardBackward, Some(algorithm))
}

const PLANS: [Algorithm; 3] = [
    Algorithm::MemoryMinimal,
    Algorithm::Chunked,
    Algorithm::Unfused,
];

/// Off-grid shapes: D % 4 ≠ 0 (w copied to f32 rows for the GEMMs), and D % 4 = 0 (the
/// GEMMs read the 16-bit w in place), odd B and C.
const SHAPES: [(usize, usize, usize); 2] = [(7, 13, 29), (9, 20, 37)];

#[test]
fn every_plan_matches_the_reference_on_f16_and_bf16_values() {
    let params = LossParams::default();
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let p = problem(b, d, c, 11 + k as u64);
        for algorithm in PLANS {
            check_typed::<f16, f16, f16, f16>(algorithm, &p, &params);
            check_typed::<bf16, bf16, bf16, bf16>(algorithm, &p, &params);
            check_typed::<f16, bf16, f32, f32>(algorithm, &p, &params);
            check_typed::<f32, f16, f32, bf16>(algorithm, &p, &params);
        }
    }
}

#[test]
fn arcface_and_the_hard_objective_on_bf16_values() {
    let p = problem(11, 24, 41, 5);
    let hard = LossParams {
        objective: margin_softmax::Objective::HardMargin,
        ..LossParams::default()
    };
    for params in [LossParams::arcface(), hard] {
        for algorithm in PLANS {
            check_typed::<bf16, bf16, bf16, bf16>(algorithm, &p, &params);
        }
    }
}

/// The kernels round each 16-bit gradient from the same f32 value the f32 output holds,
/// to nearest with ties to even, exactly as `ElementType::round_bits` does on the host.
#[test]
fn sixteen_bit_gradients_are_the_f32_gradients_rounded_to_nearest() {
    let p = problem(9, 20, 37, 3);
    let (x, w) = (stored::<f16>(&p.features), stored::<bf16>(&p.classes));
    let params = LossParams {
        loss_scale: 4.0,
        ..LossParams::default()
    };
    for algorithm in PLANS {
        let full: LossOutput<f32, f32> = typed_run(algorithm, &p, (&x, &w), &params).unwrap();
        let half: LossOutput<f16, bf16> = typed_run(algorithm, &p, (&x, &w), &params).unwrap();
        let (gf, gh) = (full.grads.unwrap(), half.grads.unwrap());
        assert_eq!(
            gh.features,
            stored::<f16>(&gf.features),
            "{algorithm:?} dL/dx"
        );
        assert_eq!(
            gh.classes,
            stored::<bf16>(&gf.classes),
            "{algorithm:?} dL/dw"
        );
        assert_eq!(
            full.loss.to_bits(),
            half.loss.to_bits(),
            "{algorithm:?} loss"
        );
    }
}

/// The host's rounding is IEEE round-to-nearest-even: the half crate's, on every f16
/// and bf16 boundary case (ties, subnormals, overflow, NaN) and on a sweep of values.
#[test]
fn host_rounding_matches_the_half_crate() {
    let mut values = vec![
        0.0f32,
        -0.0,
        1.0,
        65504.0,
        65519.99,
        65520.0,
        -65520.0,
        1e-8,
        2.0f32.powi(-25),
        2.0f32.powi(-24) * 1.5,
        2.0f32.powi(-14),
        6.0e-5,
        f32::MAX,
        f32::MIN_POSITIVE,
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.0 + 2.0f32.powi(-11),
        1.0 + 3.0 * 2.0f32.powi(-11),
        1.0 + 2.0f32.powi(-8),
    ];
    let mut rng = margin_softmax::SplitMix64::new(7);
    for _ in 0..200_000 {
        values.push(f32::from_bits(rng.next_u64() as u32));
    }
    for v in values.into_iter().filter(|v| !v.is_nan()) {
        assert_eq!(
            ElementType::F16.round_bits(v),
            u32::from(f16::from_f32(v).to_bits()),
            "f16 of {v:e}"
        );
        assert_eq!(
            ElementType::Bf16.round_bits(v),
            u32::from(bf16::from_f32(v).to_bits()),
            "bf16 of {v:e}"
        );
        let h = f16::from_f32(v);
        assert_eq!(ElementType::F16.value(u32::from(h.to_bits())), h.to_f32());
    }
    assert!(ElementType::F16.round(f32::NAN).is_nan());
    assert!(ElementType::Bf16.round(f32::NAN).is_nan());
}

/// The same 16-bit inputs give the same bits, call after call, on every plan.
#[test]
fn sixteen_bit_results_repeat_bit_for_bit() {
    let p = problem(9, 20, 37, 9);
    let (x, w) = (stored::<bf16>(&p.features), stored::<f16>(&p.classes));
    let params = LossParams::default();
    for algorithm in PLANS {
        let run =
            || -> LossOutput<bf16, f16> { typed_run(algorithm, &p, (&x, &w), &params).unwrap() };
        let (a, b) = (run(), run());
        assert_eq!(a.loss.to_bits(), b.loss.to_bits());
        assert_eq!(a.grads, b.grads, "{algorithm:?}");
    }
}

/// A mean over a large batch of rows with large norms: dL/dx falls among f16's
/// subnormals, much of it below the smallest (6e-8), where it rounds to 0, far outside
/// the f16 bound; a loss scale of 2¹⁶ lifts it into f16's normal range and the result
/// meets the bound.
#[test]
fn a_loss_scale_recovers_gradients_that_underflow_f16() {
    let ctx = common::context();
    let (b, d, c) = (2048, 16, 64);
    let mut p = Problem::random(Shape::new(b, d, c), 21);
    // Norms near 6e4·√(D/3), the top of f16's range.
    p.features.iter_mut().for_each(|v| *v *= 6e4);
    let x = stored::<f16>(&p.features);
    let w = stored::<f16>(&p.classes);
    let expected = reference::loss(
        p.shape,
        &widened(&x),
        &widened(&w),
        &p.labels,
        &LossParams::default(),
    )
    .unwrap();
    let underflowed = |out: &LossOutput<f16, f16>| {
        let g = &out.grads.as_ref().unwrap().features;
        g.iter()
            .zip(&expected.grad_features)
            .filter(|(a, r)| a.to_f32() == 0.0 && **r != 0.0)
            .count()
    };
    let elements = ElementTypes::inputs(ElementType::F16, ElementType::F16);
    let mut verdicts = Vec::new();
    for loss_scale in [1.0, 65536.0] {
        let params = LossParams {
            loss_scale,
            ..LossParams::default()
        };
        let out: LossOutput<f16, f16> = ctx
            .loss_typed(p.shape, &x, &w, &p.labels, &params, Pass::ForwardBackward)
            .unwrap();
        let zeros = underflowed(&out);
        let check = reference::compare_stored(d, &params, &out.widened(), &expected, elements);
        let error = check
            .errors
            .iter()
            .find(|e| e.0 == "grad_features")
            .unwrap();
        verdicts.push((loss_scale, zeros, error.1, error.2));
    }
    eprintln!("(loss scale, dL/dx values rounded to 0, error, bound): {verdicts:?}");
    let (unscaled, scaled) = (verdicts[0], verdicts[1]);
    assert!(
        unscaled.1 > b * d / 10 && unscaled.2 > 10.0 * unscaled.3,
        "unscaled f16 gradients should underflow: {verdicts:?}"
    );
    assert!(
        scaled.1 == 0 && scaled.2 <= scaled.3,
        "the loss scale should recover them: {verdicts:?}"
    );
}

/// A gradient too large for f16 is a typed error naming the tensor; in bf16 (f32's
/// range) the same loss scale passes.
#[test]
fn a_gradient_past_f16s_range_is_a_typed_error_naming_it() {
    let ctx = common::context();
    let p = problem(9, 20, 37, 4);
    let (x, w) = (stored::<f16>(&p.features), stored::<f16>(&p.classes));
    let params = LossParams {
        loss_scale: 1e9,
        ..LossParams::default()
    };
    let f16_grads: margin_softmax::Result<LossOutput<f16, f32>> =
        ctx.loss_typed(p.shape, &x, &w, &p.labels, &params, Pass::ForwardBackward);
    match f16_grads {
        Err(Error::GradientOutOfRange { tensor, element }) => {
            assert_eq!((tensor, element), ("grad_features", ElementType::F16));
        }
        other => panic!("expected GradientOutOfRange, got {other:?}"),
    }
    let w_grads: margin_softmax::Result<LossOutput<f32, f16>> =
        ctx.loss_typed(p.shape, &x, &w, &p.labels, &params, Pass::ForwardBackward);
    assert!(
        matches!(
            w_grads,
            Err(Error::GradientOutOfRange {
                tensor: "grad_classes",
                ..
            })
        ),
        "{w_grads:?}"
    );
    let bf16_grads: margin_softmax::Result<LossOutput<bf16, bf16>> =
        ctx.loss_typed(p.shape, &x, &w, &p.labels, &params, Pass::ForwardBackward);
    assert!(bf16_grads.is_ok(), "{bf16_grads:?}");
}

/// Three class shards on one context, x and w stored in 16 bits: every output within
/// the bounds of the reference on the stored values, the gradients rounded once from
/// their f32 sums.
#[test]
fn three_class_shards_match_the_reference_on_16_bit_values() {
    let ctx = common::context();
    let params = LossParams::default();
    for (k, &(b, d, c)) in SHAPES.iter().enumerate() {
        let p = problem(b, d, c, 31 + k as u64);
        let contexts = [ctx; 3];
        let shard = |p: &Problem| -> (LossOutput, ElementTypes) {
            let (x, w) = (stored::<f16>(&p.features), stored::<bf16>(&p.classes));
            let out: LossOutput<f16, bf16> = margin_softmax::shard::sharded_loss_typed(
                &contexts, p.shape, &x, &w, &p.labels, &params,
            )
            .expect("sharded");
            (
                out.widened(),
                ElementTypes::inputs(ElementType::F16, ElementType::Bf16),
            )
        };
        let (out, elements) = shard(&p);
        let (x, w) = (stored::<f16>(&p.features), stored::<bf16>(&p.classes));
        let expected =
            reference::loss(p.shape, &widened(&x), &widened(&w), &p.labels, &params).unwrap();
        let check = reference::compare_stored(d, &params, &out, &expected, elements);
        assert!(check.passes(), "{:?}: {check:?}", p.shape);
        let (again, _) = shard(&p);
        assert_eq!(out.grads, again.grads, "sharded results repeat bit for bit");
    }
}

/// The device API on 16-bit tensors of odd length: each region holds its values two to
/// a word, rounded up to a whole word; the kernels write the half word past the last
/// gradient value as 0 and nothing past the region; the values are the slice API's, bit
/// for bit; a region a word short is a typed error naming it.
#[test]
fn device_regions_of_odd_16_bit_length_round_up_to_a_word() {
    use margin_softmax::{BufferRegion, DeviceInputs, DeviceOutputs, GradOutputs, Plan};
    let ctx = common::context();
    let p = problem(3, 5, 7, 2);
    let elements = ElementTypes::inputs(ElementType::F16, ElementType::Bf16);
    let shape = p.shape.with_elements(elements);
    let (x, w) = (stored::<f16>(&p.features), stored::<bf16>(&p.classes));
    let words = |n: usize| ElementType::F16.region_bytes(n as u64);
    assert_eq!((words(15), words(35)), (32, 72));
    let padded = |v: &[u8]| {
        let mut bytes = v.to_vec();
        bytes.resize(bytes.len().next_multiple_of(4), 0);
        common::storage(ctx, &bytes)
    };
    let (xb, wb) = (
        padded(bytemuck::cast_slice(&x)),
        padded(bytemuck::cast_slice(&w)),
    );
    let labels = common::storage(ctx, &p.labels);
    let rows = common::storage(ctx, &[0u8; 3 * 24]);
    let summary = common::storage(ctx, &[0u8; 32]);
    // One word of guard past each gradient region.
    let gx = common::storage(ctx, &[0xffu8; 36]);
    let gw = common::storage(ctx, &[0xffu8; 76]);
    let plan = Plan::new(ctx, shape).expect("plan");
    let record = |features: &wgpu::Buffer| {
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        plan.record(
            ctx,
            &mut encoder,
            &DeviceInputs {
                features: BufferRegion::from(features),
                classes: BufferRegion::from(&wb),
                labels: BufferRegion::from(&labels),
                row_margins: None,
                hard_thresholds: None,
            },
            &DeviceOutputs {
                row_stats: BufferRegion::from(&rows),
                summary: BufferRegion::from(&summary),
                grads: Some(GradOutputs {
                    features: BufferRegion::from(&gx),
                    classes: BufferRegion::from(&gw),
                }),
            },
            &LossParams::default(),
        )
        .map(|()| ctx.queue().submit([encoder.finish()]))
    };
    record(&xb).expect("record");
    let (gx_bytes, gw_bytes) = (common::read_back(ctx, &gx), common::read_back(ctx, &gw));
    assert_eq!(&gx_bytes[30..], &[0, 0, 0xff, 0xff, 0xff, 0xff]);
    assert_eq!(&gw_bytes[70..], &[0, 0, 0xff, 0xff, 0xff, 0xff]);
    let slice: LossOutput<f16, bf16> = ctx
        .loss_typed(
            p.shape,
            &x,
            &w,
            &p.labels,
            &LossParams::default(),
            Pass::ForwardBackward,
        )
        .unwrap();
    let g = slice.grads.unwrap();
    assert_eq!(
        &gx_bytes[..30],
        bytemuck::cast_slice::<f16, u8>(&g.features)
    );
    assert_eq!(
        &gw_bytes[..70],
        bytemuck::cast_slice::<bf16, u8>(&g.classes)
    );
    let short = common::storage(ctx, &[0u8; 28]);
    match record(&short) {
        Err(Error::BadBuffer { role, .. }) => assert_eq!(role, "features"),
        other => panic!("a short 16-bit region should be refused: {other:?}"),
    }
}

/// w bound in many chunks (16 KiB bindings): each chunk's 16-bit w, f32 shadow of dL/dw
/// and 16-bit dL/dw are bound from the chunk's first class. D = 24: the GEMMs read the
/// 16-bit w in place, 8 chunks of 128 classes. D = 13: 4 chunks of 256 classes (the
/// quantum that keeps a 16-bit row's byte offsets aligned is 128 classes), the last of
/// 233·13 values, an odd number, so its region ends in a half word.
#[test]
fn sixteen_bit_class_chunks_match_the_reference() {
    let ctx = margin_softmax::Context::new_blocking(margin_softmax::ContextOptions {
        max_binding_bytes: Some(16 * 1024),
        ..Default::default()
    })
    .expect("context");
    let params = LossParams::default();
    let elements = ElementTypes::inputs(ElementType::Bf16, ElementType::F16);
    for d in [24, 13] {
        let p = problem(9, d, 1001, 8);
        let (x, w) = (stored::<bf16>(&p.features), stored::<f16>(&p.classes));
        let expected =
            reference::loss(p.shape, &widened(&x), &widened(&w), &p.labels, &params).unwrap();
        // The unfused baseline binds all of w at once (as in f32): the fused plans chunk it.
        for algorithm in [Algorithm::MemoryMinimal, Algorithm::Chunked] {
            let inputs = HostInputs::new(p.shape, &x, &w, &p.labels);
            let out: LossOutput<bf16, f16> = ctx
                .loss_inputs(&inputs, &params, Pass::ForwardBackward, Some(algorithm))
                .unwrap_or_else(|e| panic!("{algorithm:?}: {e}"));
            let check = reference::compare_stored(d, &params, &out.widened(), &expected, elements);
            assert!(check.passes(), "D = {d} {algorithm:?}: {check:?}");
        }
    }
}

/// The kernels' f16 rounding on its edge cases, bit for bit against the host's: a loss
/// scale that puts the largest |dL/dx| at 2⁻¹⁴ puts all of it among f16's subnormals
/// (and some below them, to 0);
/// scales that put the largest |dL/dx| at 65510 (which rounds down to 65504) and at
/// 65530 (which rounds to infinity: the typed error, and ±inf in the host's rounding).
#[test]
fn the_kernels_round_f16_edge_cases_as_the_host_does() {
    let p = problem(9, 20, 37, 12);
    let (x, w) = (stored::<f16>(&p.features), stored::<f16>(&p.classes));
    let at = |loss_scale: f32| LossParams {
        loss_scale,
        ..LossParams::default()
    };
    let f32_grads = |params: &LossParams| -> Vec<f32> {
        let out: LossOutput<f32, f32> =
            typed_run(Algorithm::Chunked, &p, (&x, &w), params).unwrap();
        out.grads.unwrap().features
    };
    let largest = f32_grads(&at(1.0))
        .iter()
        .fold(0.0f32, |m, v| m.max(v.abs()));
    for (loss_scale, overflows) in [
        (2.0f32.powi(-14) / largest, false),
        (65510.0 / largest, false),
        (65530.0 / largest, true),
    ] {
        let params = at(loss_scale);
        let expected: Vec<f16> = stored(&f32_grads(&params));
        let overflowed = expected.iter().any(|v| v.is_infinite());
        assert_eq!(overflowed, overflows, "scale {loss_scale}");
        let gpu: margin_softmax::Result<LossOutput<f16, f32>> =
            typed_run(Algorithm::Chunked, &p, (&x, &w), &params);
        match gpu {
            Ok(out) => {
                assert!(!overflows, "scale {loss_scale}: no error");
                assert_eq!(out.grads.unwrap().features, expected, "scale {loss_scale}");
            }
            Err(Error::GradientOutOfRange { tensor, .. }) => {
                assert!(overflows, "scale {loss_scale}");
                assert_eq!(tensor, "grad_features");
            }
            Err(e) => panic!("scale {loss_scale}: {e}"),
        }
    }
    let tiny: Vec<f16> = stored(&f32_grads(&at(2.0f32.powi(-14) / largest)));
    assert!(
        tiny.iter()
            .filter(|v| v.to_f32() != 0.0 && v.to_f32().abs() < 6.103_515_6e-5)
            .count()
            > tiny.len() / 4
            && tiny.iter().any(|v| v.to_f32() == 0.0),
        "the small scale reaches the subnormals"
    );
}
