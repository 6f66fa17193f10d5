// Inverse L2 norms of the rows of x and w: inv_norm = 1 / max(‖row‖, ε), ε = 1e-12,
// and the non-finite flags of both inputs (`row_inv_norms`); the copies of x and w that
// the GEMMs read, with rows padded to a multiple of 4 (`pad_rows`): x̂, and ŵ for the
// unfused baseline or w as it is for the chunked plan (only when D % 4 ≠ 0).
// Rows 0..B are features, rows B..B+C class vectors: one invocation per row for the
// norms, one per piece of DIM_PIECE values of a row for the copies.

/// The uniform of the norms pass (`row_inv_norms`, `pad_rows`), one per class chunk.
/// Mirrors `NormsParams` in `src/kernels.rs` (a test compares their sizes).
struct NormsParams {
    /// B: rows of x.
    batch: u32,
    /// D: length of every feature and class vector.
    dim: u32,
    /// Classes in this dispatch's chunk of w (all C unless w is bound in chunks).
    classes: u32,
    /// Rows of x the pass covers before w's (the stacked rows): B in the first chunk, 0 in
    /// later ones.
    norm_feature_rows: u32,
    /// Rows `pad_rows` copies in this chunk: x̂ (B, first chunk only), then the chunk's
    /// rows of w where the plan copies them.
    copy_rows: u32,
    /// 1 (the chunked plan): w enters the GEMMs as it is, not normalised: `logits` holds
    /// x̂_i·w_j, to be scaled by 1/‖w_j‖, and G carries the factor 1/‖w_j‖ of its column;
    /// 0 (the unfused baseline): `logits` holds cosines (and `pad_rows` copies ŵ).
    raw_classes: u32,
    _pad0: u32,
    _pad1: u32,
}

/// This dispatch's uniform.
@group(0) @binding(0) var<uniform> params: NormsParams;

/// 1/max(‖x_i‖, ε), B values (0 for a row holding a non-finite value).
@group(0) @binding(4) var<storage, read_write> inv_norm_features: array<f32>;
/// 1/max(‖w_j‖, ε), this chunk's classes (0 for a row holding a non-finite value).
@group(0) @binding(5) var<storage, read_write> inv_norm_classes: array<f32>;
/// x̂ in rows of padded_dim() values, zero past D. Workspace.
@group(0) @binding(14) var<storage, read_write> padded_features: array<f32>;
/// ŵ or w of this chunk in rows of padded_dim() values, zero past D, where the plan copies
/// them (else a stand-in that is not written). Workspace, bound per chunk.
@group(0) @binding(15) var<storage, read_write> padded_classes: array<f32>;
/// x four words per entry (the same buffer as `features`), for the aligned middle of a
/// row: one quad of values in f32 (16-bit quads are two words of `features`).
@group(0) @binding(25) var<storage, read> feature_quads: array<vec4<u32>>;
/// This chunk of w four words per entry (the same binding as `class_vectors`).
@group(0) @binding(26) var<storage, read> class_quads: array<vec4<u32>>;
/// Non-finite-input flags (FLAG_*), one word. Workspace, cleared by the host before this pass.
@group(0) @binding(6) var<storage, read_write> input_flags: atomic<u32>;

const EPS: f32 = 1e-12;

/// Element `index` of x (is_features) or of w.
fn input_value(is_features: bool, index: u32) -> f32 {
    if (is_features) { return feature_value(index); }
    return class_value(index);
}

/// Elements index .. index + 3 of x (is_features) or of w; `index` a multiple of 4.
fn input_quad(is_features: bool, index: u32) -> vec4<f32> {
    if (is_features) {
        if (FEATURES_ELEMENT == ELEMENT_F32) { return bitcast<vec4<f32>>(feature_quads[index / 4u]); }
        return half_quad(features[index / 2u], features[index / 2u + 1u], FEATURES_ELEMENT);
    }
    if (CLASSES_ELEMENT == ELEMENT_F32) { return bitcast<vec4<f32>>(class_quads[index / 4u]); }
    return half_quad(class_vectors[index / 2u], class_vectors[index / 2u + 1u], CLASSES_ELEMENT);
}

/// The D values from `base` as the elements before the first multiple of 4, the vec4s
/// from there, and the elements after the last: (vec4 start, vec4 end, row end). With
/// D a multiple of 4 the row is all vec4s: a quarter of the loads.
fn row_span(base: u32) -> vec3<u32> {
    let end = base + params.dim;
    let quads_begin = min((base + 3u) & ~3u, end);
    return vec3<u32>(quads_begin, max(quads_begin, end & ~3u), end);
}

/// max |v| over the D values from `base`, or -1 if one is not finite.
fn row_abs_max(is_features: bool, base: u32) -> f32 {
    let span = row_span(base);
    var amax = 0.0;
    var non_finite = false;
    for (var k = base; k < span.x; k++) {
        let v = input_value(is_features, k);
        non_finite = non_finite || is_non_finite(v);
        amax = max(amax, abs(v));
    }
    for (var k = span.x; k < span.y; k += 4u) {
        let v = abs(input_quad(is_features, k));
        non_finite = non_finite || any((bitcast<vec4<u32>>(v) & vec4<u32>(0x7f800000u)) == vec4<u32>(0x7f800000u));
        amax = max(amax, max(max(v.x, v.y), max(v.z, v.w)));
    }
    for (var k = span.y; k < span.z; k++) {
        let v = input_value(is_features, k);
        non_finite = non_finite || is_non_finite(v);
        amax = max(amax, abs(v));
    }
    return select(amax, -1.0, non_finite);
}

/// Squares summed in one run, per lane, before the run is added to the lane's total.
const SQUARE_RUN_QUADS: u32 = 8u;

/// Σ (v·scale)² over the D values from `base`: four lanes (one per element of a vec4),
/// each summed in runs of SQUARE_RUN_QUADS squares, then run by run, then the lanes in
/// pairs. Every inverse norm's rounding reaches every cosine of its row, so the chains
/// are kept short: 8 additions a run and D/32 runs a lane, instead of one chain of D/4.
fn row_sum_squares(is_features: bool, base: u32, scale: f32) -> f32 {
    let span = row_span(base);
    var total = vec4<f32>();
    var run = vec4<f32>();
    for (var k = base; k < span.x; k++) {
        let u = input_value(is_features, k) * scale;
        run.x = fma(u, u, run.x);
    }
    for (var k = span.x; k < span.y; k += 4u) {
        let u = input_quad(is_features, k) * scale;
        run = fma(u, u, run);
        if (((k - span.x) / 4u) % SQUARE_RUN_QUADS == SQUARE_RUN_QUADS - 1u) {
            total += run;
            run = vec4<f32>();
        }
    }
    for (var k = span.y; k < span.z; k++) {
        let u = input_value(is_features, k) * scale;
        run.y = fma(u, u, run.y);
    }
    total += run;
    return (total.x + total.y) + (total.z + total.w);
}

/// 1/max(‖v‖, ε) of the D values starting at `base`, or -1 if one is not finite.
/// The row is scaled by its largest magnitude first, so squares neither overflow nor underflow.
fn inv_norm(is_features: bool, base: u32) -> f32 {
    let amax = row_abs_max(is_features, base);
    if (amax < 0.0) { return -1.0; }
    // ‖v‖ ≤ amax·√D: below 1e-30 the row is shorter than ε for any D up to 1e36, and
    // 1/amax would overflow for subnormal amax.
    if (amax < 1e-30) { return 1.0 / EPS; }
    let inv_amax = 1.0 / amax;
    // ‖v‖ = amax·sqrt(Σ(v/amax)²).
    let root = sqrt(row_sum_squares(is_features, base, inv_amax));
    if (amax * root < EPS) { return 1.0 / EPS; }
    let inv = inv_amax / root;
    // Past ‖v‖ ≈ 8.5e37 the inverse norm is subnormal: where the adapter flushes
    // subnormals to 0, v̂ would be 0, so the call reports an overflow instead.
    if (inv * amax == 0.0) { atomicOr(&input_flags, FLAG_OVERFLOW); }
    return inv;
}

@compute @workgroup_size(ROW_WG)
fn row_inv_norms(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let at = stacked_row(folded_index(wid, nwg, lid));
    let is_features = at.x == 1u;
    let local_row = at.y;
    if (!is_features && local_row >= params.classes) { return; }
    var row = local_row;
    let inv = inv_norm(is_features, row * params.dim);
    let stored = max(inv, 0.0);
    if (is_features) {
        inv_norm_features[local_row] = stored;
    } else {
        inv_norm_classes[local_row] = stored;
    }
    if (inv < 0.0) {
        atomicOr(&input_flags, select(FLAG_CLASSES_NON_FINITE, FLAG_FEATURES_NON_FINITE, is_features));
    }
}

/// x̂ = x·inv_norm, and ŵ = w·inv_norm (the unfused baseline) or w as it is
/// (`raw_classes`, the chunked plan), in rows of padded_dim() with zeros past D.
/// One invocation per (piece, row) of the `copy_rows` stacked rows to copy (x alone, or
/// x and w, or w alone in later chunks).
@compute @workgroup_size(ROW_WG)
fn pad_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    if (e >= params.copy_rows * dim_pieces()) { return; }
    let piece = row_piece(e, params.copy_rows);
    let at = stacked_row(piece.x);
    let is_features = at.x == 1u;
    var scale = inv_norm_features[min(at.y, params.batch - 1u)];
    if (!is_features) { scale = select(inv_norm_classes[at.y], 1.0, params.raw_classes == 1u); }
    let dest = at.y * padded_dim();
    let source = at.y * params.dim;
    var end = piece.z;
    // The last piece also writes the zeros past D.
    if (piece.z == params.dim) { end = padded_dim(); }
    for (var k = piece.y; k < end; k++) {
        var v = 0.0;
        if (k < params.dim) { v = input_value(is_features, source + k) * scale; }
        if (is_features) {
            padded_features[dest + k] = v;
        } else {
            padded_classes[dest + k] = v;
        }
    }
}
