// Backward pass from the saved per-row LSE:
//
//   p_ij = exp(z_ij − LSE_i),  G_ij = s·(p_ij − [j = y_i]) / N   (dL/dc_ij; 0 on ignored rows)
//   gx̂_i = Σ_j G_ij ŵ_j,       gŵ_j = Σ_i G_ij x̂_i
//   dL/dx_i = (gx̂_i − x̂_i (x̂_i·gx̂_i)) / max(‖x_i‖, ε)     (the same for w_j)
//
// The unfused baseline turns materialised cosines into G (`logit_grads`) and takes gx̂
// and gŵ with gemm.wgsl. The chunked plan does the same a chunk of rows (or a block of
// classes) at a time without a copy of ŵ: from the dots x̂_i·w_j, forward.wgsl's
// `logit_softmax_rows` (or `logit_grad_rows`) stores G'_ij = G_ij/‖w_j‖, so that
// gx̂ = G'·w and gw' = G'ᵀ·x̂ = gŵ_j/‖w_j‖, whose projection is dL/dw_j with no further
// 1/‖w_j‖. Both then project gx̂ and gŵ (or gw') in place (`projection_dots`,
// `normalize_backward`), in pieces of DIM_PIECE values per row.

/// The uniform of the backward family (`logit_grads`, the projections), one per class
/// chunk. Mirrors `BackwardParams` in `src/kernels.rs` (a test compares their sizes).
struct BackwardParams {
    /// s and the margin function (shaders/margin.wgsl).
    loss: LossTerms,
    /// B: rows of x.
    batch: u32,
    /// D: length of every feature and class vector.
    dim: u32,
    /// Classes in this dispatch's chunk of w (all C unless w is bound in chunks).
    classes: u32,
    /// C: all classes; labels are checked against it.
    total_classes: u32,
    /// Rows of x the pass covers before w's (the stacked rows): B in the first chunk, 0 in
    /// later ones.
    norm_feature_rows: u32,
    /// 0 = mean, 1 = sum, 2 = none (gradients of the sum).
    reduction: u32,
    /// 1 (the chunked plan): w enters the GEMMs as it is, not normalised: `logits` holds
    /// x̂_i·w_j, to be scaled by 1/‖w_j‖, and G carries the factor 1/‖w_j‖ of its column;
    /// 0 (the unfused baseline): `logits` holds cosines (and `pad_rows` copies ŵ).
    raw_classes: u32,
    /// 1: G leaves out the reduction's 1/N, applied once by `normalize_backward` (the
    /// chunked plan computes G before N is known); 0: G includes it.
    defer_norm: u32,
    /// Elements between rows of the materialised logits (a multiple of 4).
    logit_stride: u32,
    /// The loss-scale factor: dL/dx and dL/dw are written times it (1 for none), before
    /// they are rounded to a 16-bit type, as mixed precision's gradient scaler does.
    loss_scale: f32,
    /// Elements of dL/dx `round_gradients` rounds to GRAD_FEATURES_ELEMENT in this chunk:
    /// B·D in the first chunk where dL/dx is stored in 16 bits, else 0.
    rounded_features: u32,
    /// Elements of this chunk's dL/dw `round_gradients` rounds to GRAD_CLASSES_ELEMENT:
    /// classes·D where dL/dw is stored in 16 bits, else 0.
    rounded_classes: u32,
}

/// This dispatch's uniform.
@group(0) @binding(0) var<uniform> params: BackwardParams;

/// 1/max(‖x_i‖, ε), B values (from norms.wgsl).
@group(0) @binding(4) var<storage, read> inv_norm_features: array<f32>;
/// 1/max(‖w_j‖, ε), this chunk's classes (from norms.wgsl).
@group(0) @binding(5) var<storage, read> inv_norm_classes: array<f32>;
/// `Summary` (common.wgsl) as the backward kernels see it: its flags as an atomic word.
struct BackwardSummary {
    loss: f32,
    scale_grad: f32,
    /// N, read by the gradients of the mean.
    valid_rows: u32,
    correct_rows: u32,
    /// FLAG_OVERFLOW is or-ed in where a gradient the kernels wrote is not finite.
    flags: atomic<u32>,
    mean_achieved_margin: f32,
    margin_satisfied_rows: u32,
    _pad: u32,
}
/// Per-call totals from the forward pass: N is read and the overflow flag set. Declared
/// read_write because it may share a buffer with the gradient outputs, and WebGPU forbids
/// one buffer as read-only and writable storage in one dispatch.
@group(0) @binding(10) var<storage, read_write> summary: BackwardSummary;
/// Per-row LSE_i (and dL_i/ds, unused here), B values, from forward.wgsl.
@group(0) @binding(8) var<storage, read> row_softmax: array<RowSoftmax>;
/// dL/dx, B×D f32: the caller's output, or where dL/dx is stored in 16 bits an f32
/// workspace that `round_gradients` rounds into `grad_features_out`. Holds gx̂ until the
/// projection.
@group(0) @binding(12) var<storage, read_write> grad_features: array<f32>;
/// dL/dw, this chunk's classes × D f32: the caller's output or a workspace, as for
/// `grad_features`. Holds gŵ (or gw') until the projection.
@group(0) @binding(13) var<storage, read_write> grad_classes: array<f32>;
/// dL/dx in GRAD_FEATURES_ELEMENT (16 bits), two values a word as `features` holds them.
/// Caller's output, written by `round_gradients` alone.
@group(0) @binding(27) var<storage, read_write> grad_features_out: array<u32>;
/// This chunk's dL/dw in GRAD_CLASSES_ELEMENT (16 bits), as `grad_features_out`.
@group(0) @binding(28) var<storage, read_write> grad_classes_out: array<u32>;

/// The storage type of dL/dx (`ELEMENT_*`; f32 needs no `round_gradients`).
override GRAD_FEATURES_ELEMENT: u32 = ELEMENT_F32;
/// The storage type of dL/dw.
override GRAD_CLASSES_ELEMENT: u32 = ELEMENT_F32;
/// Summary flags: a finite dL/dx (dL/dw) value became ±inf when rounded to its 16-bit
/// type. Mirrors `flags::GRAD_FEATURES_OUT_OF_RANGE` and `GRAD_CLASSES_OUT_OF_RANGE`.
const FLAG_GRAD_FEATURES_OUT_OF_RANGE: u32 = 16u;
const FLAG_GRAD_CLASSES_OUT_OF_RANGE: u32 = 32u;
/// v̂·g over each piece of each stacked row [x; w chunk], piece-major (all rows of piece
/// 0 first), from `projection_dots` for `normalize_backward`, where rows are longer than
/// one piece (else one unread word). Workspace.
@group(0) @binding(19) var<storage, read_write> projection_piece_dots: array<f32>;
/// Unfused baseline: the B×C cosines, overwritten with G by `logit_grads`; chunked plan:
/// G' of rows [row_begin, row_end) (forward.wgsl's `logit_softmax_rows`).
/// Rows logit_stride apart. Workspace.
@group(0) @binding(16) var<storage, read_write> logits: array<f32>;


/// 1/ε: the inverse norm of a row shorter than ε, which is scaled, not projected.
const INV_EPS: f32 = 1e12;

/// G_ij / (p_ij − [j = y_i]): s/N for the mean (0 when N = 0), s for sum and none, and
/// s when the 1/N is deferred to `normalize_backward`.
fn grad_coef() -> f32 {
    if (params.reduction != 0u || params.defer_norm == 1u) { return params.loss.scale; }
    let n = summary.valid_rows;
    return select(params.loss.scale / f32(max(n, 1u)), 0.0, n == 0u);
}

/// The projection's component along v̂ = v·inv, from v̂·g: dL/dv = (g − v̂·along)·inv.
/// v̂ is formed before the product, so that Σ v·g cannot overflow on rows of huge norm.
/// Rows shorter than ε are scaled only (0), as the spec's normalisation is there.
fn along_normal(normal_dot_g: f32, inv: f32) -> f32 {
    return select(normal_dot_g, 0.0, inv >= INV_EPS);
}

/// Sets the summary's overflow flag unless every gradient value an invocation wrote was
/// finite (`finite`, and-ed over them); an or of flag bits, the same in any order.
fn flag_non_finite_gradients(finite: bool) {
    if (!finite) { atomicOr(&summary.flags, FLAG_OVERFLOW); }
}

/// Unfused baseline: one invocation per element of the B×C matrix, c_ij → G_ij in place.
@compute @workgroup_size(ROW_WG)
fn logit_grads(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
               @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    if (e >= params.batch * params.classes) { return; }
    let i = e / params.classes;
    let j = e - i * params.classes;
    let y = label_of(i);
    let at = i * params.logit_stride + j;
    logits[at] = select(0.0, grad_logit(logits[at], i, row_softmax[i], j, y, grad_coef()), y != IGNORE);
}

/// The reduction's 1/N where G left it out (defer_norm), else 1.
fn deferred_norm() -> f32 {
    if (params.defer_norm == 0u || params.reduction != 0u) { return 1.0; }
    let n = summary.valid_rows;
    return select(1.0 / f32(max(n, 1u)), 0.0, n == 0u);
}

/// Where one invocation of the projections works: a piece of a stacked row of
/// [x; w chunk], its inverse norm, and where the row starts in x (and dL/dx) or in w (and
/// dL/dw).
struct ProjectionRow {
    /// (stacked row, first value of the piece, end of the piece).
    piece: vec3<u32>,
    is_features: bool,
    inv: f32,
    base: u32,
}

/// The ProjectionRow of flat index e, if e < rows · dim_pieces().
fn projection_row(e: u32, rows: u32) -> ProjectionRow {
    let piece = row_piece(e, rows);
    let at = stacked_row(piece.x);
    if (at.x == 1u) {
        return ProjectionRow(piece, true, inv_norm_features[at.y], at.y * params.dim);
    }
    return ProjectionRow(piece, false, inv_norm_classes[at.y], at.y * params.dim);
}

/// Rows of the stacked [x; w chunk] the projections cover: x in the first chunk only
/// (norm_feature_rows = B there), then the chunk's classes.
fn projection_rows() -> u32 { return params.norm_feature_rows + params.classes; }

/// v̂·g over one piece of a stacked row, g being gx̂ (in grad_features), gŵ, or
/// gw' = gŵ/‖w‖ with `raw_classes` (in grad_classes).
fn piece_dot(at: ProjectionRow) -> f32 {
    var dot = 0.0;
    if (at.is_features) {
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            dot = fma(feature_value(d) * at.inv, grad_features[d], dot);
        }
    } else {
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            dot = fma(class_value(d) * at.inv, grad_classes[d], dot);
        }
    }
    return dot;
}

/// Rows longer than one piece: one invocation per (piece, row) of [x; w chunk] stores
/// its piece's v̂·g for `normalize_backward`.
@compute @workgroup_size(ROW_WG)
fn projection_dots(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    let rows = projection_rows();
    if (e >= rows * dim_pieces()) { return; }
    projection_piece_dots[e] = piece_dot(projection_row(e, rows));
}

/// One invocation per (piece, row) of [x; w chunk]: the row's v̂·g (its own, for rows of
/// one piece; else from `projection_dots`, in piece order), then the piece of
/// dL/dv = (g − v̂(v̂·g))·inv in place, times the deferred 1/N and the loss scale. The projection is linear: projecting gw' = gŵ·inv gives dL/dw without the last
/// factor inv (`raw_classes`).
@compute @workgroup_size(ROW_WG)
fn normalize_backward(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    let rows = projection_rows();
    if (e >= rows * dim_pieces()) { return; }
    let at = projection_row(e, rows);
    var dot = 0.0;
    if (dim_pieces() == 1u) {
        dot = piece_dot(at);
    } else {
        for (var p = 0u; p < dim_pieces(); p++) { dot += projection_piece_dots[p * rows + at.piece.x]; }
    }
    let along = along_normal(dot, at.inv);
    let norm = deferred_norm() * params.loss_scale;
    var finite = true;
    if (at.is_features) {
        let factor = at.inv * norm;
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            let out = (grad_features[d] - feature_value(d) * at.inv * along) * factor;
            grad_features[d] = out;
            finite = finite && !is_non_finite(out);
        }
    } else {
        let factor = select(at.inv, 1.0, params.raw_classes == 1u) * norm;
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            let out = (grad_classes[d] - class_value(d) * at.inv * along) * factor;
            grad_classes[d] = out;
            finite = finite && !is_non_finite(out);
        }
    }
    flag_non_finite_gradients(finite);
}

/// Two consecutive values of an f32 gradient rounded to the 16-bit `element`, packed in
/// one word as the caller's buffer holds them (the second is 0 past the end, `pair` = 1);
/// `out_of_range` is set where a finite value became ±inf.
fn rounded_word(first: f32, second: f32, pair: u32, element: u32, out_of_range: ptr<function, bool>) -> u32 {
    let lo = half_bits(first, element);
    let hi = select(0u, half_bits(second, element), pair == 2u);
    *out_of_range = rounded_out_of_range(first, lo, element)
        || (pair == 2u && rounded_out_of_range(second, hi, element));
    return lo | (hi << 16u);
}

/// dL/dx (first chunk) and this chunk's dL/dw, where stored in 16 bits: one invocation
/// per word of the output (two values, from the f32 gradients the projections left),
/// dL/dx's words first. Rounds to nearest, ties to even, and flags a finite value that
/// rounds to ±inf (FLAG_GRAD_*_OUT_OF_RANGE: lower the loss scale). A region of an odd
/// number of values ends in a word whose upper half is written 0.
@compute @workgroup_size(ROW_WG)
fn round_gradients(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_index) lid: u32) {
    let word = folded_index(wid, nwg, lid);
    let feature_words = (params.rounded_features + 1u) / 2u;
    let class_words = (params.rounded_classes + 1u) / 2u;
    var out_of_range = false;
    if (word < feature_words) {
        let e = 2u * word;
        let pair = min(params.rounded_features - e, 2u);
        let second = grad_features[select(e, e + 1u, pair == 2u)];
        grad_features_out[word] = rounded_word(grad_features[e], second, pair, GRAD_FEATURES_ELEMENT, &out_of_range);
        if (out_of_range) { atomicOr(&summary.flags, FLAG_GRAD_FEATURES_OUT_OF_RANGE); }
    } else if (word < feature_words + class_words) {
        let w = word - feature_words;
        let e = 2u * w;
        let pair = min(params.rounded_classes - e, 2u);
        let second = grad_classes[select(e, e + 1u, pair == 2u)];
        grad_classes_out[w] = rounded_word(grad_classes[e], second, pair, GRAD_CLASSES_ELEMENT, &out_of_range);
        if (out_of_range) { atomicOr(&summary.flags, FLAG_GRAD_CLASSES_OUT_OF_RANGE); }
    }
}
