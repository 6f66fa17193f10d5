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
    /// Index of the chunk's first class (class-indexed buffers are bound from it).
    class_offset: u32,
    /// Rows [row_begin, row_end) of this row chunk of the logits.
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
    /// 1 (the chunked plan): w enters the GEMMs as it is, not normalised: `logits` holds
    /// x̂_i·w_j, to be scaled by 1/‖w_j‖, and G carries the factor 1/‖w_j‖ of its column;
    /// 0 (the unfused baseline): `logits` holds cosines.
    raw_classes: u32,
    /// 1: G leaves out the reduction's 1/N, applied once by `normalize_backward` (the
    /// chunked plan computes G before N is known); 0: G includes it.
    defer_norm: u32,
    /// m1, the multiplicative (SphereFace) margin, a whole number ≥ 1.
    multiplicative_margin: u32,
    /// m2, the additive angular (ArcFace) margin in radians, and its cosine and sine.
    angular_margin: f32,
    cos_m2: f32,
    sin_m2: f32,
    /// 0 = margin softmax, 1 = hard margin max(0, s·(max_{j≠y} c_j − ψ(c_y))).
    objective: u32,
    /// 1: the margin passes no gradient of its own (dψ/dc taken as 1); 0: exact dψ/dc.
    straight_through: u32,
    /// 1 (the chunked plan's backward): `logit_softmax_rows` overwrites each row of dots
    /// with G'_ij = G_ij/‖w_j‖ once the row's softmax is known, without the 1/N.
    write_grads: u32,
    /// Elements between rows of the materialised logits (a multiple of 4).
    logit_stride: u32,
    /// 1: the logits hold one class block (this chunk's classes), not all C; the forward
    /// leaves per-block partials and the backward recomputes each block's dots.
    blocks: u32,
    /// This chunk's partial slot with `blocks`.
    block_index: u32,
    /// Rows `pad_rows` copies in this chunk: x̂ (B, first chunk only), then the chunk's
    /// rows of w where the plan copies them.
    copy_rows: u32,
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

/// Values of a row that one invocation of a per-row pass (`pad_rows`, the projections)
/// covers: longer rows are cut into pieces, one invocation each, so that no invocation
/// runs past llvmpipe's loop budget (see `plan.rs`). Set from `kernels::DIM_PIECE`.
override DIM_PIECE: u32 = 4096u;
/// Pieces of DIM_PIECE values in a row of D.
fn dim_pieces() -> u32 { return (params.dim + DIM_PIECE - 1u) / DIM_PIECE; }
/// The stacked row and the piece of flat index e over `rows` stacked rows, piece-major:
/// (row, first value of the piece, end of the piece).
fn row_piece(e: u32, rows: u32) -> vec3<u32> {
    let piece = e / rows;
    let first = piece * DIM_PIECE;
    return vec3<u32>(e - piece * rows, first, min(first + DIM_PIECE, params.dim));
}
/// Stacked row r of [x; w chunk] as (1 for a row of x else 0, the row within x or the
/// chunk). x takes part only where norm_feature_rows = B (the first chunk).
fn stacked_row(r: u32) -> vec2<u32> {
    let split = params.norm_feature_rows;
    return select(vec2<u32>(0u, r - split), vec2<u32>(1u, r), r < split);
}
/// D rounded up to a multiple of 4: the row length of x and w as the GEMMs read them.
fn padded_dim() -> u32 { return (params.dim + 3u) & ~3u; }

/// The shared bindings: every kernel family reads these.
/// Shape and loss parameters.
@group(0) @binding(0) var<uniform> params: Params;
/// x: features, B×D f32, row-major.
@group(0) @binding(1) var<storage, read> features: array<f32>;
/// w: class vectors, row-major: this chunk's `classes` rows of D f32.
@group(0) @binding(2) var<storage, read> class_vectors: array<f32>;
/// y: B labels in 0..C, or IGNORE.
@group(0) @binding(3) var<storage, read> labels: array<u32>;

const PI: f32 = 3.14159265358979;
/// sin θ is clamped to at least this in the exact gradient of an angular margin (see
/// `SIN_GUARD` in `src/params.rs`).
const SIN_GUARD: f32 = 1e-3;

/// (T_m(c), U_{m−1}(c)) = (cos mθ, sin mθ / sin θ) for c = cos θ, m ≥ 1, by the
/// Chebyshev recurrences: exact polynomials, no acos and no division.
fn chebyshev(m: u32, c: f32) -> vec2<f32> {
    var t_prev = 1.0;
    var t = c;
    var u_prev = 0.0;
    var u = 1.0;
    for (var n = 1u; n < m; n++) {
        let t_next = 2.0 * c * t - t_prev;
        t_prev = t;
        t = t_next;
        let u_next = 2.0 * c * u - u_prev;
        u_prev = u;
        u = u_next;
    }
    return vec2<f32>(t, u);
}

/// The target's margin function and its slope: (ψ(c), dψ/dc) with
/// ψ(c) = cos(m1·θ + m2) − m3, θ = acos(c), made monotonic as in the spec: ArcFace's
/// fallback c − m2·sin m2 where θ + m2 > π, SphereFace's (−1)^k·cos(m1θ) − 2k on
/// θ ∈ [kπ/m1, (k+1)π/m1]. The slope is 1 with `straight_through`.
fn target_margin(c: f32) -> vec2<f32> {
    if (params.multiplicative_margin == 1u && params.angular_margin == 0.0) {
        return vec2<f32>(c - params.margin, 1.0);
    }
    let cc = clamp(c, -1.0, 1.0);
    var psi: f32;
    var slope: f32;
    if (params.angular_margin > 0.0) {
        // cos(θ + m2) = c·cos m2 − sin θ·sin m2, with sin θ from (1 − c)(1 + c).
        let sin_t = sqrt(max(0.0, (1.0 - cc) * (1.0 + cc)));
        if (cc > -params.cos_m2) {
            psi = cc * params.cos_m2 - sin_t * params.sin_m2;
            slope = params.cos_m2 + cc * params.sin_m2 / max(sin_t, SIN_GUARD);
        } else {
            psi = cc - params.angular_margin * params.sin_m2;
            slope = 1.0;
        }
    } else {
        let m = params.multiplicative_margin;
        // k only picks the branch; ψ is continuous where acos's rounding could move it.
        let k = min(floor(f32(m) * acos(cc) / PI), f32(m - 1u));
        let sign = select(1.0, -1.0, (u32(k) & 1u) == 1u);
        let cheb = chebyshev(m, cc);
        psi = sign * cheb.x - 2.0 * k;
        slope = sign * f32(m) * cheb.y;
    }
    return vec2<f32>(psi - params.margin, select(slope, 1.0, params.straight_through == 1u));
}

/// The smallest normal f32.
const MIN_NORMAL: f32 = 1.17549435e-38;

/// v with its subnormal components set to 0. A gradient term this small changes no sum
/// it enters by more than 2⁻¹²⁶, and CPU drivers (llvmpipe) take a slow microcode path
/// on every multiply by one: the softmax of a large scale is full of them.
fn flush_subnormal(v: vec4<f32>) -> vec4<f32> {
    return select(v, vec4<f32>(), abs(v) < vec4<f32>(MIN_NORMAL));
}

/// G_ij = dL/dc_ij from the cosine c_ij, for a row with label y ≠ IGNORE, its softmax
/// results `row` and a global class j. The target's is −coef·(1 − p_iy)·dψ/dc, from the
/// forward pass's cancellation-free 1 − p_iy; the hard objective's touches only the
/// target and the best non-target class, where its hinge is active.
fn grad_logit(c: f32, row: RowSoftmax, j: u32, y: u32, coef: f32) -> f32 {
    if (j == y) { return -coef * row.target_complement * target_margin(c).y; }
    if (params.objective == 1u) {
        return select(0.0, coef * row.target_complement, j == row.best_other_class);
    }
    return flush_subnormal(vec4<f32>(coef * exp(params.scale * c - row.lse))).x;
}

/// The (global) label of row i, or IGNORE if i is past B or the label is not a class.
fn label_of(i: u32) -> u32 {
    if (i >= params.batch) { return IGNORE; }
    let y = labels[i];
    return select(IGNORE, y, y < params.total_classes);
}
