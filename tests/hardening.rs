//! Regressions of issue 13: checks that see NaN, huge-norm rows, long feature vectors,
//! plans recorded twice before a submit, and plans or buffers of another device.

mod common;

use common::{read_back, storage};
use margin_softmax::reference::{self, ReferenceOutput};
use margin_softmax::{
    Algorithm, Context, DeviceInputs, DeviceOutputs, Error, GradOutputs, Gradients, LossOutput,
    LossParams, Pass, Plan, Problem, RowStats, Shape, Summary,
};

/// The reference's own result as a GPU output would hold it (every value rounded to f32).
fn as_gpu_output(r: &ReferenceOutput) -> LossOutput {
    let f = |v: &[f64]| v.iter().map(|&a| a as f32).collect::<Vec<f32>>();
    LossOutput {
        loss: r.loss as f32,
        row_loss: f(&r.row_loss),
        grad_scale: r.grad_scale as f32,
        pred: r.pred.clone(),
        target_cos: f(&r.target_cos),
        best_other_cos: f(&r.best_other_cos),
        achieved_margin: f(&r.achieved_margin),
        target_prob: f(&r.target_prob),
        mean_achieved_margin: r.mean_achieved_margin as f32,
        margin_satisfied_rows: r.margin_satisfied_rows as u32,
        valid_rows: r.valid_rows as u32,
        correct_rows: r.correct_rows as u32,
        grads: Some(Gradients {
            features: f(&r.grad_features),
            classes: f(&r.grad_classes),
        }),
    }
}

/// Every output of a comparison fails when one value of it is NaN or ±inf (where the
/// reference is finite), and the failing entry is that output's.
#[test]
fn comparison_fails_on_planted_non_finite_values() {
    let p = Problem::random(Shape::new(5, 7, 11), 3);
    let params = LossParams::default();
    let expected = reference::loss_on(&p, &params).expect("reference");
    let clean = as_gpu_output(&expected);
    assert!(
        reference::compare(p.shape.dim, &params, &clean, &expected).passes(),
        "the reference rounded to f32 must pass"
    );
    type Plant = fn(&mut LossOutput, f32);
    let plants: [(&str, Plant); 10] = [
        ("loss", |o, v| o.loss = v),
        ("row_loss", |o, v| o.row_loss[2] = v),
        ("grad_scale", |o, v| o.grad_scale = v),
        ("target_cos", |o, v| o.target_cos[1] = v),
        ("best_other_cos", |o, v| o.best_other_cos[4] = v),
        ("achieved_margin", |o, v| o.achieved_margin[0] = v),
        ("mean_margin", |o, v| o.mean_achieved_margin = v),
        ("target_prob", |o, v| o.target_prob[3] = v),
        ("grad_features", |o, v| {
            o.grads.as_mut().unwrap().features[9] = v
        }),
        ("grad_classes", |o, v| {
            o.grads.as_mut().unwrap().classes[20] = v
        }),
    ];
    for (output, plant) in plants {
        for value in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut out = clean.clone();
            plant(&mut out, value);
            let check = reference::compare(p.shape.dim, &params, &out, &expected);
            assert!(!check.passes(), "{value} in {output} passed: {check:?}");
            let failing: Vec<&str> = check
                .errors
                .iter()
                .filter(|(_, e, b)| e.is_nan() || e > b)
                .map(|(name, _, _)| *name)
                .collect();
            assert!(
                failing.contains(&output),
                "{value} in {output}: failing outputs {failing:?}"
            );
        }
    }
    // A truncated output is no match either.
    let mut short = clean.clone();
    short.pred.pop();
    short.target_cos.pop();
    assert!(!reference::compare(p.shape.dim, &params, &short, &expected).passes());
}

/// Every plan on `p`: each output within its bound of the f64 reference (which fails on
/// any non-finite output where the reference is finite). These rows' inverse norms are
/// subnormal: an adapter that flushes subnormals may answer `Error::Overflow` (the norms
/// pass flags it); llvmpipe keeps them, and there every plan must give the answer.
fn assert_every_plan_matches(p: &Problem, params: &LossParams, what: &str) {
    let ctx = common::context();
    let keeps_subnormals = ctx.adapter_info().name.contains("llvmpipe");
    let expected = reference::loss_on(p, params).expect("reference");
    for algorithm in [
        Algorithm::MemoryMinimal,
        Algorithm::Chunked,
        Algorithm::Unfused,
    ] {
        match common::loss_with(ctx, algorithm, p, params, Pass::ForwardBackward) {
            Ok(out) => {
                let check = reference::compare(p.shape.dim, params, &out, &expected);
                assert!(check.passes(), "{what} ({algorithm:?}): {check:?}");
            }
            Err(Error::Overflow) if !keeps_subnormals => {}
            Err(e) => panic!("{what} ({algorithm:?}): {e}"),
        }
    }
}

/// A row of x with entries of ±1e38 (‖x‖ = 4e38 overflows f32, D = 16): its dL/dx is
/// about 1e-37, finite and normal; the projection must not form Σ x·g from the raw row.
#[test]
fn huge_feature_rows_get_finite_gradients() {
    let mut p = Problem::random(Shape::new(3, 16, 5), 21);
    for (k, v) in p.features[16..32].iter_mut().enumerate() {
        *v = if k % 3 == 0 { -1e38 } else { 1e38 };
    }
    assert_every_plan_matches(&p, &LossParams::default(), "a row of x at ±1e38");
}

/// A row of w of norm 1e38 (D = 2) must leave every other row's dL/dx (about 8.5) finite.
#[test]
fn huge_class_rows_get_finite_gradients() {
    let mut p = Problem::random(Shape::new(4, 2, 3), 22);
    p.classes[2] = 7.0e37;
    p.classes[3] = -7.0e37;
    assert_every_plan_matches(&p, &LossParams::default(), "a row of w of norm 1e38");
}

/// The outputs of one recording: row statistics, summary and both gradients.
struct Outputs {
    row_stats: wgpu::Buffer,
    summary: wgpu::Buffer,
    grad_features: wgpu::Buffer,
    grad_classes: wgpu::Buffer,
}

impl Outputs {
    fn new(ctx: &Context, shape: Shape) -> Outputs {
        let zeros = |n: usize| storage(ctx, &vec![0f32; n]);
        Outputs {
            row_stats: zeros(shape.batch * std::mem::size_of::<RowStats>() / 4),
            summary: zeros(std::mem::size_of::<Summary>() / 4),
            grad_features: zeros(shape.batch * shape.dim),
            grad_classes: zeros(shape.classes * shape.dim),
        }
    }

    fn regions(&self) -> DeviceOutputs<'_> {
        DeviceOutputs {
            row_stats: (&self.row_stats).into(),
            summary: (&self.summary).into(),
            grads: Some(GradOutputs {
                features: (&self.grad_features).into(),
                classes: (&self.grad_classes).into(),
            }),
        }
    }

    /// Every output overwritten with NaN, so that a result left from an earlier round fails.
    fn fill_nan(&self, ctx: &Context) {
        for buffer in [
            &self.row_stats,
            &self.summary,
            &self.grad_features,
            &self.grad_classes,
        ] {
            let nan = vec![f32::NAN; (buffer.size() / 4) as usize];
            ctx.queue()
                .write_buffer(buffer, 0, bytemuck::cast_slice(&nan));
        }
    }

    /// The loss and both gradients, checked against the reference for `params`.
    fn check(&self, ctx: &Context, p: &Problem, params: &LossParams, what: &str) {
        let summary: Summary = bytemuck::pod_read_unaligned(&read_back(ctx, &self.summary));
        let expected = reference::loss_on(p, params).expect("reference");
        let loss = f64::from(summary.loss);
        assert!(
            (loss - expected.loss).abs() <= 1e-5 * expected.loss.abs(),
            "{what}: loss {loss}, reference {}",
            expected.loss
        );
        let gx: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(ctx, &self.grad_features));
        let gw: Vec<f32> = bytemuck::pod_collect_to_vec(&read_back(ctx, &self.grad_classes));
        let bound = reference::GRAD_REL_BOUND;
        let ex = reference::max_rel_error(&gx, &expected.grad_features, 0.0);
        let ew = reference::max_rel_error(&gw, &expected.grad_classes, 0.0);
        assert!(ex <= bound && ew <= bound, "{what}: dL/dx {ex}, dL/dw {ew}");
    }
}

/// An engine records step N+1 (another scale and margin) before it submits step N: each
/// recording must run with its own parameters, in one encoder or in two.
#[test]
fn each_recording_keeps_its_own_parameters() {
    let ctx = common::context();
    let shape = Shape::new(6, 5, 9);
    let p = Problem::random(shape, 23);
    let first = LossParams::default();
    let second = LossParams {
        scale: 64.0,
        margin: 0.1,
        ..LossParams::default()
    };
    let (x, w, y) = (
        storage(ctx, &p.features),
        storage(ctx, &p.classes),
        storage(ctx, &p.labels),
    );
    let inputs = DeviceInputs {
        features: (&x).into(),
        classes: (&w).into(),
        labels: (&y).into(),
        row_margins: None,
        hard_thresholds: None,
    };
    for algorithm in [
        Algorithm::MemoryMinimal,
        Algorithm::Chunked,
        Algorithm::Unfused,
    ] {
        let plan = Plan::with_algorithm(ctx, shape, algorithm).expect("plan");
        let (a, b) = (Outputs::new(ctx, shape), Outputs::new(ctx, shape));
        // One encoder, two recordings.
        a.fill_nan(ctx);
        b.fill_nan(ctx);
        let mut encoder = ctx.device().create_command_encoder(&Default::default());
        plan.record(ctx, &mut encoder, &inputs, &a.regions(), &first)
            .expect("record");
        plan.record(ctx, &mut encoder, &inputs, &b.regions(), &second)
            .expect("record");
        ctx.queue().submit([encoder.finish()]);
        a.check(
            ctx,
            &p,
            &first,
            &format!("{algorithm:?}, first of one encoder"),
        );
        b.check(
            ctx,
            &p,
            &second,
            &format!("{algorithm:?}, second of one encoder"),
        );
        // Two encoders, submitted together in the order they were recorded, and the
        // other way round.
        for reversed in [false, true] {
            a.fill_nan(ctx);
            b.fill_nan(ctx);
            let mut one = ctx.device().create_command_encoder(&Default::default());
            let mut two = ctx.device().create_command_encoder(&Default::default());
            plan.record(ctx, &mut one, &inputs, &a.regions(), &first)
                .expect("record");
            plan.record(ctx, &mut two, &inputs, &b.regions(), &second)
                .expect("record");
            let (one, two) = (one.finish(), two.finish());
            if reversed {
                ctx.queue().submit([two, one]);
            } else {
                ctx.queue().submit([one, two]);
            }
            let what = format!("{algorithm:?}, two encoders, reversed {reversed}");
            a.check(ctx, &p, &first, &what);
            b.check(ctx, &p, &second, &what);
        }
    }
}

/// A plan used with another context, and a buffer of another device, are typed errors.
#[test]
fn plans_and_buffers_of_another_device_are_bad_buffers() {
    let ctx = common::context();
    let other = Context::new_default().expect("a second context");
    let shape = Shape::new(3, 4, 5);
    let p = Problem::random(shape, 24);
    let params = LossParams::default();
    let plan = Plan::new(ctx, shape).expect("plan");
    let inputs_on = |c: &Context| {
        (
            storage(c, &p.features),
            storage(c, &p.classes),
            storage(c, &p.labels),
        )
    };
    let record = |c: &Context,
                  plan: &Plan,
                  buffers: &(wgpu::Buffer, wgpu::Buffer, wgpu::Buffer),
                  out: &Outputs| {
        let mut encoder = c.device().create_command_encoder(&Default::default());
        let inputs = DeviceInputs {
            features: (&buffers.0).into(),
            classes: (&buffers.1).into(),
            labels: (&buffers.2).into(),
            row_margins: None,
            hard_thresholds: None,
        };
        plan.record(c, &mut encoder, &inputs, &out.regions(), &params)
    };
    let mine = inputs_on(ctx);
    let theirs = inputs_on(&other);
    let out = Outputs::new(ctx, shape);
    // The plan of `ctx` with the context `other` (and other's buffers).
    let other_out = Outputs::new(&other, shape);
    match record(&other, &plan, &theirs, &other_out) {
        Err(Error::BadBuffer { .. }) => {}
        r => panic!("a plan of another context: {r:?}"),
    }
    // Inputs of another device.
    match record(ctx, &plan, &theirs, &out) {
        Err(Error::BadBuffer { role, .. }) => assert_eq!(role, "features"),
        r => panic!("buffers of another device: {r:?}"),
    }
    // The context is still usable.
    record(ctx, &plan, &mine, &out).expect("own buffers");
}

/// Long feature vectors: every plan matches the reference, never a wrong answer.
/// D = 16384 broke the chunked and unfused plans (their projection ran 4·D loop steps per
/// llvmpipe invocation), 20000 the memory-minimal plan (then tile kernels over whole
/// rows); 70001 is past both.
#[test]
fn long_feature_vectors_are_right() {
    let ctx = common::context();
    let params = LossParams::default();
    for dim in [16384, 20000, 70001] {
        let p = Problem::random(Shape::new(2, dim, 3), dim as u64);
        let expected = reference::loss_on(&p, &params).expect("reference");
        for algorithm in [
            Algorithm::MemoryMinimal,
            Algorithm::Chunked,
            Algorithm::Unfused,
        ] {
            let out = common::loss_with(ctx, algorithm, &p, &params, Pass::ForwardBackward)
                .unwrap_or_else(|e| panic!("D = {dim} ({algorithm:?}): {e}"));
            let check = reference::compare(dim, &params, &out, &expected);
            assert!(check.passes(), "D = {dim} ({algorithm:?}): {check:?}");
        }
        // The plan the context picks serves every one of them.
        let out = ctx
            .loss_on(&p, &params, Pass::ForwardBackward)
            .expect("default plan");
        assert!(reference::compare(dim, &params, &out, &expected).passes());
    }
}

/// A shard's backward given a log-sum-exp far below its rows' logits (finite, but not
/// theirs): the gradients overflow, and the call says so instead of returning them.
#[test]
fn shard_backward_reports_overflowing_gradients() {
    use margin_softmax::shard::{finish_rows, merge_shards, ClassShard, ShardInputs};
    let ctx = common::context();
    let p = Problem::random(Shape::new(4, 6, 5), 25);
    let params = LossParams::default();
    let inputs = ShardInputs {
        shard: ClassShard {
            first: 0,
            count: 5,
            total: 5,
        },
        dim: 6,
        features: &p.features,
        classes: &p.classes,
        labels: &p.labels,
        sample: None,
        row_margins: None,
        hard_thresholds: None,
    };
    let partials = ctx.shard_forward(&inputs, &params).expect("forward");
    let merged = merge_shards(&[partials]).expect("one shard");
    let mut rows = finish_rows(&merged, &p.labels, 5, &params).expect("rows");
    ctx.shard_backward(&inputs, &params, &rows)
        .expect("the merged rows");
    rows.softmax[1].lse = -1e38;
    match ctx.shard_backward(&inputs, &params, &rows) {
        Err(Error::Overflow) => {}
        other => panic!("expected Error::Overflow, got {other:?}"),
    }
}
