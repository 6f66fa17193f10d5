//! Shared by the integration tests: one context per test binary, and checks against the
//! f64 reference.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::OnceLock;

use wgpu::util::DeviceExt;

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

/// A storage buffer holding `data` (copyable both ways).
pub fn storage<T: bytemuck::Pod>(ctx: &Context, data: &[T]) -> wgpu::Buffer {
    ctx.device()
        .create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: None,
            contents: bytemuck::cast_slice(data),
            usage: wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST,
        })
}

/// The bytes of `buffer` after everything submitted so far.
pub fn read_back(ctx: &Context, buffer: &wgpu::Buffer) -> Vec<u8> {
    let staging = ctx.device().create_buffer(&wgpu::BufferDescriptor {
        label: None,
        size: buffer.size(),
        usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        mapped_at_creation: false,
    });
    let mut encoder = ctx.device().create_command_encoder(&Default::default());
    encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, buffer.size());
    ctx.queue().submit([encoder.finish()]);
    staging
        .slice(..)
        .map_async(wgpu::MapMode::Read, |r| r.expect("map"));
    ctx.device()
        .poll(wgpu::PollType::wait_indefinitely())
        .expect("poll");
    let bytes = staging
        .slice(..)
        .get_mapped_range()
        .expect("mapped")
        .to_vec();
    bytes
}

/// The `margin-softmax` binary, with the runtime directory lavapipe wants.
pub fn cli() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_margin-softmax"));
    cmd.env("XDG_RUNTIME_DIR", std::env::temp_dir());
    cmd
}

/// The binary run with `args` to its end.
pub fn run_cli(args: &[&str]) -> Output {
    cli().args(args).output().expect("run margin-softmax")
}

/// `loss --quiet --input IN --output OUT`, to its end.
pub fn run_loss(input: &std::path::Path, output: &std::path::Path) -> Output {
    let path = |p: &std::path::Path| p.to_str().expect("a UTF-8 path").to_string();
    let (input, output) = (path(input), path(output));
    run_cli(&["loss", "--quiet", "--input", &input, "--output", &output])
}

/// A temporary directory of this test process, named `name`.
pub fn test_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("margin-softmax-test-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}
