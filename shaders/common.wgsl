// Shared prelude, prepended to every kernel family (see `src/kernels.rs`).
// Symbols follow ../docs: x features (B×D), w class vectors (C×D), y labels,
// s the effective scale max(s, s_min), m the additive margin.

/// Per-call totals, written by `summarize` and read by the backward kernels.
/// Mirrors `Summary` in Rust.
struct Summary {
    /// L: the reduced loss (mean over non-ignored rows, or their sum).
    loss: f32,
    /// dL/ds of the reduced loss (0 when s < s_min).
    scale_grad: f32,
    /// N: rows whose label is in 0..C.
    valid_rows: u32,
    /// Valid rows whose predicted class (argmax cosine) equals the label.
    correct_rows: u32,
    /// Bit 0: non-finite value in x; bit 1: in w; bit 2: a label >= C that is not IGNORE;
    /// bit 3: a non-finite loss or LSE (the raw dot products overflowed).
    flags: u32,
    /// Mean over valid rows of c_iy − max_{j≠y} c_ij.
    mean_achieved_margin: f32,
    /// Valid rows whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    margin_satisfied_rows: u32,
    _pad: u32,
}

/// Per-row softmax results of the forward pass, kept for the backward pass.
struct RowSoftmax {
    /// LSE_i = M + log S.
    lse: f32,
    /// dL_i/ds = Σ_j p_ij z_ij/s − z_iy/s (0 for ignored rows).
    scale_grad: f32,
    /// 1 − p_iy, computed without cancellation (0 for ignored rows); for the hard
    /// objective, 1 where the row's hinge is active and 0 where it is not.
    target_complement: f32,
    /// The best non-target class (NO_CLASS if none), where the hard objective's gradient goes.
    best_other_class: u32,
    /// The row's label, IGNORE if it takes no part (the backward pass reads it here).
    label: u32,
}

const FLAG_FEATURES_NON_FINITE: u32 = 1u;
const FLAG_CLASSES_NON_FINITE: u32 = 2u;
const FLAG_LABEL_OUT_OF_RANGE: u32 = 4u;
const FLAG_OVERFLOW: u32 = 8u;

/// True for ±inf and NaN, by the exponent bits (robust to drivers that assume finite math).
fn is_non_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7f800000u) == 0x7f800000u;
}

/// Label value meaning "ignore this row" (-1 as i32).
const IGNORE: u32 = 0xffffffffu;
/// "No class" marker for argmax indices.
const NO_CLASS: u32 = 0xffffffffu;
/// Start value of running maxima: finite, so that exp(NEG_BIG - z) is exactly 0 and never NaN.
const NEG_BIG: f32 = -3.0e38;

/// Invocations along the row axis of a workgroup of `logit_softmax_rows` (rows) and of
/// the GEMM (row quads).
override ROWS_WG: u32 = 8u;
/// Invocations along the class axis of those workgroups (class lanes, column quads).
override CLASSES_WG: u32 = 8u;

/// Invocations per workgroup of the kernels that give each row (or element) one invocation.
override ROW_WG: u32 = 64u;

/// The index of this invocation in a one-per-row grid of ROW_WG-wide workgroups, folded
/// into (x, y) when it exceeds one dispatch dimension; kernels skip indices past the end.
fn folded_index(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wid.x + wid.y * nwg.x) * ROW_WG + lid;
}

/// The shared bindings: every kernel family reads these. Binding 0 is each family's own
/// uniform, `params`, declared in its file.
/// x: features, B×D f32, row-major.
@group(0) @binding(1) var<storage, read> features: array<f32>;
/// w: class vectors, row-major: this chunk's `classes` rows of D f32.
@group(0) @binding(2) var<storage, read> class_vectors: array<f32>;
/// y: B labels in 0..C, or IGNORE.
@group(0) @binding(3) var<storage, read> labels: array<u32>;

/// The smallest normal f32.
const MIN_NORMAL: f32 = 1.17549435e-38;

/// v with its subnormal components set to 0. A gradient term this small changes no sum
/// it enters by more than 2⁻¹²⁶, and CPU drivers (llvmpipe) take a slow microcode path
/// on every multiply by one: the softmax of a large scale is full of them.
fn flush_subnormal(v: vec4<f32>) -> vec4<f32> {
    return select(v, vec4<f32>(), abs(v) < vec4<f32>(MIN_NORMAL));
}
