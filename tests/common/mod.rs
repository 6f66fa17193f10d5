//! Shared by the integration tests: one context per test binary, and checks against the
//! f64 reference.
#![allow(dead_code)]

use std::sync::OnceLock;

use margin_softmax::{reference, Context, LossOutput, LossParams, Pass, Problem};

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

/// Runs forward + backward on `ctx` and asserts every output is within its bound of the
/// f64 reference. Returns the GPU output.
pub fn check_against_reference(
    ctx: &Context,
    problem: &Problem,
    params: &LossParams,
    what: &str,
) -> LossOutput {
    let p = problem;
    let out = ctx
        .loss(
            p.shape,
            &p.features,
            &p.classes,
            &p.labels,
            params,
            Pass::ForwardBackward,
        )
        .unwrap_or_else(|e| panic!("{what}: GPU call failed: {e}"));
    let expected = reference::loss(p.shape, &p.features, &p.classes, &p.labels, params)
        .unwrap_or_else(|e| panic!("{what}: reference failed: {e}"));
    let check = reference::compare(p.shape.dim, &out, &expected);
    assert!(
        check.passes(),
        "{what} ({:?}, {params:?}): {:?}",
        p.shape,
        check
    );
    assert_eq!(
        out.valid_rows as usize, expected.valid_rows,
        "{what}: valid rows"
    );
    for v in [&out.row_loss, &out.target_cos, &out.best_other_cos] {
        assert!(v.iter().all(|a| a.is_finite()), "{what}: non-finite output");
    }
    out
}
