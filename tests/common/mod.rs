//! Shared by the integration tests: one context per test binary, and checks against the
//! f64 reference.
#![allow(dead_code)]

use std::sync::OnceLock;

use margin_softmax::reference::{self, ReferenceOutput};
use margin_softmax::{Algorithm, Context, LossOutput, LossParams, Pass, Problem};

/// The context on the machine's adapter. A missing adapter fails the test run: it never
/// skips.
pub fn context() -> &'static Context {
    static CONTEXT: OnceLock<Context> = OnceLock::new();
    CONTEXT.get_or_init(|| match Context::new_default() {
        Ok(ctx) => ctx,
        Err(e) => panic!(
            "margin-softmax tests need a wgpu adapter and none could be created: {e}. \
             On Debian install Mesa's software Vulkan driver: apt-get install -y mesa-vulkan-drivers"
        ),
    })
}

/// `p` on `ctx` with `algorithm`: [`Context::loss_with`] for a [`Problem`].
pub fn loss_with(
    ctx: &Context,
    algorithm: Algorithm,
    p: &Problem,
    params: &LossParams,
    pass: Pass,
) -> margin_softmax::Result<LossOutput> {
    ctx.loss_with(
        algorithm,
        p.shape,
        &p.features,
        &p.classes,
        &p.labels,
        params,
        pass,
    )
}

/// Runs forward + backward on `ctx` with every algorithm (memory-minimal fused, chunked,
/// unfused) and asserts every output of each is within its bound of the f64 reference.
/// Returns the output of the algorithm `Context::loss` picks.
pub fn check_against_reference(
    ctx: &Context,
    problem: &Problem,
    params: &LossParams,
    what: &str,
) -> LossOutput {
    let p = problem;
    let expected =
        reference::loss_on(p, params).unwrap_or_else(|e| panic!("{what}: reference failed: {e}"));
    let pass = Pass::ForwardBackward;
    for algorithm in [
        Algorithm::MemoryMinimal,
        Algorithm::Chunked,
        Algorithm::Unfused,
    ] {
        let out = loss_with(ctx, algorithm, p, params, pass)
            .unwrap_or_else(|e| panic!("{what} ({algorithm:?}): GPU call failed: {e}"));
        check_output(
            &out,
            &expected,
            p,
            params,
            &format!("{what} ({algorithm:?})"),
        );
    }
    let chosen = ctx
        .loss_on(p, params, pass)
        .unwrap_or_else(|e| panic!("{what}: GPU call failed: {e}"));
    check_output(&chosen, &expected, p, params, what);
    chosen
}

/// Asserts that one GPU output is within every bound of the reference.
pub fn check_output(
    out: &LossOutput,
    expected: &ReferenceOutput,
    p: &Problem,
    params: &LossParams,
    what: &str,
) {
    let check = reference::compare(p.shape.dim, params, out, expected);
    assert!(
        check.passes(),
        "{what} ({:?}, {params:?}): {check:?}",
        p.shape
    );
    assert_eq!(
        out.valid_rows as usize, expected.valid_rows,
        "{what}: valid rows"
    );
    for v in [&out.row_loss, &out.target_cos, &out.best_other_cos] {
        assert!(v.iter().all(|a| a.is_finite()), "{what}: non-finite output");
    }
}
