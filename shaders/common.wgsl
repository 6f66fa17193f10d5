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
/// x: features, B×D values of FEATURES_ELEMENT, row-major, as 32-bit words: one f32 a
/// word, or two 16-bit values (element 2k in the low half of word k). Read through
/// `feature_value`.
@group(0) @binding(1) var<storage, read> features: array<u32>;
/// w: class vectors, row-major: this chunk's `classes` rows of D values of
/// CLASSES_ELEMENT, as words like `features`. Read through `class_value`.
@group(0) @binding(2) var<storage, read> class_vectors: array<u32>;
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

// Storage types. Features, class vectors and their gradients may each be stored as f32,
// f16 or bf16 (`ElementType` in `src/kernels.rs`); every product, sum, exponential and
// statistic is f32 whatever they are. 16-bit values are read from packed u32 words,
// which core WGSL has on every adapter: f16 through unpack2x16float, bf16 as the high
// half of an f32.

/// `ElementType::F32`, `F16` and `Bf16`: the values of the *_ELEMENT overrides.
const ELEMENT_F32: u32 = 0u;
const ELEMENT_F16: u32 = 1u;
const ELEMENT_BF16: u32 = 2u;
/// The storage type of x.
override FEATURES_ELEMENT: u32 = ELEMENT_F32;
/// The storage type of w.
override CLASSES_ELEMENT: u32 = ELEMENT_F32;

/// Value `half` (0 the low, 1 the high) of a word holding two 16-bit values of `element`.
fn half_value(word: u32, half: u32, element: u32) -> f32 {
    if (element == ELEMENT_BF16) {
        return bitcast<f32>(select(word << 16u, word & 0xffff0000u, half == 1u));
    }
    return unpack2x16float(word)[half];
}

/// x's element `index`.
fn feature_value(index: u32) -> f32 {
    if (FEATURES_ELEMENT == ELEMENT_F32) { return bitcast<f32>(features[index]); }
    return half_value(features[index >> 1u], index & 1u, FEATURES_ELEMENT);
}

/// w's element `index` (of this chunk).
fn class_value(index: u32) -> f32 {
    if (CLASSES_ELEMENT == ELEMENT_F32) { return bitcast<f32>(class_vectors[index]); }
    return half_value(class_vectors[index >> 1u], index & 1u, CLASSES_ELEMENT);
}

/// Four 16-bit values of `element` from two words (the low half of `lo` first).
fn half_quad(lo: u32, hi: u32, element: u32) -> vec4<f32> {
    if (element == ELEMENT_BF16) {
        return bitcast<vec4<f32>>(vec4<u32>(lo << 16u, lo & 0xffff0000u, hi << 16u, hi & 0xffff0000u));
    }
    return vec4<f32>(unpack2x16float(lo), unpack2x16float(hi));
}

/// The f16 bits nearest `v`, ties to even (IEEE 754 round to nearest), in the low half:
/// ±inf past 65504 (from 65520 up), subnormals below 2⁻¹⁴, NaN kept NaN. Done on the
/// integer bits, so that every adapter rounds alike (pack2x16float leaves overflow
/// undefined and need not round to nearest).
fn f16_bits(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    let sign = (u >> 16u) & 0x8000u;
    let a = u & 0x7fffffffu;
    if (a > 0x7f800000u) { return sign | 0x7e00u; }
    if (a >= 0x477ff000u) { return sign | 0x7c00u; }
    var bits: u32;
    var rest: u32;
    var halfway: u32;
    if (a < 0x38800000u) {
        // Below f16's smallest normal: a multiple of 2⁻²⁴, from the significand with its
        // implicit bit; values under 2⁻²⁵ (exponent field below 102) round to 0.
        let exponent = a >> 23u;
        if (exponent < 102u) { return sign; }
        let significand = (a & 0x7fffffu) | 0x800000u;
        let shift = 126u - exponent;
        bits = significand >> shift;
        rest = significand & ((1u << shift) - 1u);
        halfway = 1u << (shift - 1u);
    } else {
        // Normal: rebias the exponent by 127 − 15 and drop 13 bits of significand.
        let rebiased = a - 0x38000000u;
        bits = rebiased >> 13u;
        rest = rebiased & 0x1fffu;
        halfway = 0x1000u;
    }
    let up = rest > halfway || (rest == halfway && (bits & 1u) == 1u);
    return sign | (bits + select(0u, 1u, up));
}

/// The bf16 bits nearest `v`, ties to even, in the low half; NaN kept NaN.
fn bf16_bits(v: f32) -> u32 {
    let u = bitcast<u32>(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { return (u >> 16u) | 0x40u; }
    return (u + 0x7fffu + ((u >> 16u) & 1u)) >> 16u;
}

/// `v` rounded to the 16-bit `element`, as its bits in the low half of a word.
fn half_bits(v: f32, element: u32) -> u32 {
    if (element == ELEMENT_BF16) { return bf16_bits(v); }
    return f16_bits(v);
}

/// True where finite `v` rounds to ±inf in the 16-bit `element` (its bits `bits`).
fn rounded_out_of_range(v: f32, bits: u32, element: u32) -> bool {
    let exponent_mask = select(0x7c00u, 0x7f80u, element == ELEMENT_BF16);
    let mantissa_mask = select(0x03ffu, 0x007fu, element == ELEMENT_BF16);
    return !is_non_finite(v) && (bits & exponent_mask) == exponent_mask && (bits & mantissa_mask) == 0u;
}
