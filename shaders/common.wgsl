// Shared prelude, prepended to every kernel family (see `src/kernels.rs`).
// Symbols follow ../docs: x features (B×D), w class vectors (C×D), y labels,
// s the effective scale max(s, s_min), m the additive margin.

/// The shape and loss parameters of one call. Mirrors `kernels::Params` in Rust.
struct Params {
    /// B: rows of x.
    batch: u32,
    /// D: length of every feature and class vector.
    dim: u32,
    /// Classes in this dispatch's chunk of w (all C unless w is bound in chunks).
    classes: u32,
    /// C: all classes; labels are checked against it.
    total_classes: u32,
    /// Global index of the chunk's first class (class-indexed buffers are bound from it).
    class_offset: u32,
    /// Forward splits (merged by `merge_rows`); every chunk uses the same split slots.
    forward_splits: u32,
    /// Classes per forward split, a multiple of the class tile.
    forward_split_classes: u32,
    /// Feature-gradient splits (summed by `grad_features_finish`), shared by every chunk.
    feature_splits: u32,
    /// Classes per feature-gradient split, a multiple of the class tile.
    feature_split_classes: u32,
    /// 1 after the first chunk: partials are merged into, not overwritten.
    accumulate: u32,
    /// Rows [row_begin, row_end) that this pass of `grad_classes_tile` sums over.
    row_begin: u32,
    row_end: u32,
    /// 0 = mean, 1 = sum, 2 = none (gradients of the sum).
    reduction: u32,
    /// Rows of x the norms pass covers: B in the first chunk, 0 in later ones.
    norm_feature_rows: u32,
    /// s, already max(s, s_min).
    scale: f32,
    /// m, subtracted from the target cosine.
    margin: f32,
    /// 1.0 when s >= s_min (the scale receives a gradient), else 0.0.
    scale_grad_gate: f32,
    /// 1: `logits` holds raw dots x_i·w_j (the chunked plan), to be scaled by the inverse
    /// norms; 0: it holds cosines (the unfused baseline).
    raw_dots: u32,
    /// 1: G leaves out the reduction's 1/N, applied once by `normalize_backward` (the
    /// chunked plan computes G before N is known); 0: G includes it.
    defer_norm: u32,
    _pad0: u32,
    _pad1: u32,
}

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
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// Per-row softmax results of the forward pass, kept for the backward pass.
struct RowSoftmax {
    /// LSE_i = M + log S.
    lse: f32,
    /// dL_i/ds = Σ_j p_ij z_ij/s − z_iy/s (0 for ignored rows).
    scale_grad: f32,
    /// 1 − p_iy, computed without cancellation (0 for ignored rows).
    target_complement: f32,
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

/// Rows of x per invocation in a cosine tile (register block).
const ROW_BLOCK: u32 = 4u;
/// Classes per invocation in a cosine tile (register block).
const CLASS_BLOCK: u32 = 4u;

/// Invocations along the row axis of a cosine-tile workgroup.
override ROWS_WG: u32 = 8u;
/// Invocations along the class axis of a cosine-tile workgroup.
override CLASSES_WG: u32 = 8u;

/// Rows in one cosine tile.
fn tile_rows() -> u32 { return ROWS_WG * ROW_BLOCK; }
/// Classes in one cosine tile.
fn tile_classes() -> u32 { return CLASSES_WG * CLASS_BLOCK; }

/// One invocation's register block: ROW_BLOCK rows × CLASS_BLOCK classes.
alias Block = array<array<f32, CLASS_BLOCK>, ROW_BLOCK>;

/// acc += x[rows, k] ⊗ w[classes, k], for the rows and classes starting at the given
/// element offsets.
fn dot_step(acc: ptr<function, Block>, row_base: array<u32, ROW_BLOCK>,
            class_base: array<u32, CLASS_BLOCK>, k: u32) {
    var xv: array<f32, ROW_BLOCK>;
    var wv: array<f32, CLASS_BLOCK>;
    for (var r = 0u; r < ROW_BLOCK; r++) { xv[r] = features[row_base[r] + k]; }
    for (var q = 0u; q < CLASS_BLOCK; q++) { wv[q] = class_vectors[class_base[q] + k]; }
    for (var r = 0u; r < ROW_BLOCK; r++) {
        for (var q = 0u; q < CLASS_BLOCK; q++) {
            (*acc)[r][q] = fma(xv[r], wv[q], (*acc)[r][q]);
        }
    }
}

/// Raw dot products x_i · w_j for the ROW_BLOCK × CLASS_BLOCK outputs of one invocation:
/// rows row0 + r·ROWS_WG and classes class0 + q·CLASSES_WG. Out-of-range rows and
/// classes read the last valid row/class; callers mask those outputs. Each sum runs over
/// k in order; the loop takes four k per iteration because llvmpipe (lavapipe) stops a
/// shader invocation after 65535 loop iterations in all (see `plan.rs`, LOOP_BUDGET).
fn dot_block(row0: u32, class0: u32) -> Block {
    let d = params.dim;
    var row_base: array<u32, ROW_BLOCK>;
    var class_base: array<u32, CLASS_BLOCK>;
    for (var r = 0u; r < ROW_BLOCK; r++) {
        row_base[r] = min(row0 + r * ROWS_WG, params.batch - 1u) * d;
    }
    for (var q = 0u; q < CLASS_BLOCK; q++) {
        class_base[q] = min(class0 + q * CLASSES_WG, params.classes - 1u) * d;
    }
    var acc: Block;
    var k = 0u;
    for (; k + 4u <= d; k += 4u) {
        dot_step(&acc, row_base, class_base, k);
        dot_step(&acc, row_base, class_base, k + 1u);
        dot_step(&acc, row_base, class_base, k + 2u);
        dot_step(&acc, row_base, class_base, k + 3u);
    }
    for (; k < d; k++) {
        dot_step(&acc, row_base, class_base, k);
    }
    return acc;
}

/// The shared bindings: every kernel family reads these.
/// Shape and loss parameters.
@group(0) @binding(0) var<uniform> params: Params;
/// x: features, B×D f32, row-major.
@group(0) @binding(1) var<storage, read> features: array<f32>;
/// w: class vectors, row-major: this chunk's `classes` rows of D f32.
@group(0) @binding(2) var<storage, read> class_vectors: array<f32>;
/// y: B labels in 0..C, or IGNORE.
@group(0) @binding(3) var<storage, read> labels: array<u32>;

/// The (global) label of row i, or IGNORE if i is past B or the label is not a class.
fn label_of(i: u32) -> u32 {
    if (i >= params.batch) { return IGNORE; }
    let y = labels[i];
    return select(IGNORE, y, y < params.total_classes);
}
