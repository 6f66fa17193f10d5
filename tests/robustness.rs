//! Many threads on one context, long runs without growing allocations, lost devices,
//! bounded waits and overflowing inputs.

mod common;

use std::time::Duration;

use common::context;
use margin_softmax::{
    reference, Algorithm, Context, ContextOptions, Error, LossParams, Pass, Problem, Shape,
};

#[test]
fn context_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Context>();
}

#[test]
fn eight_threads_share_one_context() {
    let ctx = context();
    std::thread::scope(|scope| {
        for t in 0..8usize {
            scope.spawn(move || {
                for call in 0..25usize {
                    let shape = Shape::new(1 + t * 3 + call % 4, 3 + t, 10 + 7 * t + call % 3);
                    let p = Problem::random(shape, (t * 100 + call) as u64);
                    let params = LossParams {
                        scale: 10.0 + t as f32,
                        ..LossParams::default()
                    };
                    let out = ctx
                        .loss_on(&p, &params, Pass::ForwardBackward)
                        .unwrap_or_else(|e| panic!("thread {t} call {call}: {e}"));
                    let expected = reference::loss_on(&p, &params).expect("reference");
                    let check = reference::compare(shape.dim, &params, &out, &expected);
                    assert!(
                        check.passes(),
                        "thread {t} call {call} {shape:?}: {check:?}"
                    );
                }
            });
        }
    });
}

#[test]
fn two_thousand_calls_do_not_grow_allocations() {
    let ctx = Context::new_default().expect("context");
    let shapes = [
        Shape::new(5, 8, 40),
        Shape::new(9, 4, 17),
        Shape::new(3, 8, 40),
        Shape::new(1, 1, 2),
    ];
    let problems: Vec<Problem> = shapes
        .iter()
        .enumerate()
        .map(|(k, &s)| Problem::random(s, k as u64))
        .collect();
    let mut curve = Vec::new();
    for call in 0..2000 {
        let p = &problems[call % problems.len()];
        ctx.loss_on(p, &LossParams::default(), Pass::ForwardBackward)
            .expect("loss");
        curve.push(ctx.allocated_bytes());
    }
    let settled = curve[9];
    eprintln!(
        "allocated bytes after calls 1, 4, 10, 100, 1000, 2000: {} {} {} {} {} {}",
        curve[0], curve[3], curve[9], curve[99], curve[999], curve[1999]
    );
    let changed = curve[10..].iter().position(|&b| b != settled);
    assert_eq!(
        changed, None,
        "allocations changed after call 10 (settled at {settled} bytes)"
    );
}

#[test]
fn a_lost_device_fails_every_later_call() {
    let ctx = Context::new_default().expect("context");
    let p = Problem::random(Shape::new(4, 4, 4), 1);
    let call = || ctx.loss_on(&p, &LossParams::default(), Pass::ForwardBackward);
    assert!(call().is_ok());
    ctx.device().destroy();
    for _ in 0..3 {
        match call() {
            Err(Error::DeviceLost(_) | Error::Gpu(_)) => {}
            other => panic!("expected an error after the device was destroyed, got {other:?}"),
        }
    }
}

#[test]
fn waits_are_bounded_by_the_timeout() {
    let mut ctx = Context::new_blocking(ContextOptions {
        timeout: Some(Duration::from_micros(1)),
        ..ContextOptions::default()
    })
    .expect("context");
    let p = Problem::random(Shape::new(256, 128, 4096), 2);
    let params = LossParams::default();
    match ctx.loss_on(&p, &params, Pass::ForwardBackward) {
        Err(Error::Timeout { .. }) => {}
        other => panic!("expected a timeout, got {:?}", other.map(|o| o.loss)),
    }
    // The context stays usable once the caller allows more time.
    ctx.set_timeout(None);
    let small = Problem::random(Shape::new(3, 3, 3), 3);
    assert!(ctx.loss_on(&small, &params, Pass::Forward).is_ok());
}

#[test]
fn overflowing_dot_products_are_an_error_not_nan() {
    let ctx = context();
    let call = |p: &Problem, algorithm| {
        common::loss_with(ctx, algorithm, p, &LossParams::default(), Pass::Forward)
    };
    // Where a plan's dots stay finite it must give the reference's loss; where they
    // overflow, Error::Overflow.
    let check = |p: &Problem, algorithm, overflows: bool| {
        let out = call(p, algorithm);
        if overflows {
            assert_eq!(out.map(|o| o.loss), Err(Error::Overflow), "{algorithm:?}");
            return;
        }
        let expected = reference::loss_on(p, &LossParams::default()).expect("reference");
        let loss = f64::from(out.expect("a finite loss").loss);
        assert!(
            (loss - expected.loss).abs() <= 1e-5 * expected.loss.abs().max(1.0),
            "{algorithm:?}: loss {loss} against {}",
            expected.loss
        );
    };
    // x·w would overflow f32 (1e40), but the chunked and memory-minimal plans take x̂·w
    // (1e20) and the unfused baseline cosines: all stay finite.
    let mut p = Problem::random(Shape::new(2, 4, 3), 4);
    p.features.iter_mut().for_each(|v| *v *= 1e20);
    p.classes.iter_mut().for_each(|v| *v *= 1e20);
    check(&p, Algorithm::MemoryMinimal, false);
    check(&p, Algorithm::Chunked, false);
    check(&p, Algorithm::Unfused, false);
    // Rows of w near f32's largest value overflow x̂·w too; only cosines stay finite.
    p.classes.iter_mut().for_each(|v| *v = 3e38);
    check(&p, Algorithm::MemoryMinimal, true);
    check(&p, Algorithm::Chunked, true);
    check(&p, Algorithm::Unfused, false);
}
