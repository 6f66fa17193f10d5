// Inverse L2 norms of the rows of x and w: inv_norm = 1 / max(‖row‖, ε), ε = 1e-12,
// and the non-finite flags of both inputs (`row_inv_norms`); the copies of x and w that
// the GEMMs read, with rows padded to a multiple of 4 (`pad_rows`): x̂, and ŵ for the
// unfused baseline or w as it is for the chunked plan (only when D % 4 ≠ 0).
// One invocation per row: rows 0..B are features, rows B..B+C are class vectors.

/// 1/max(‖x_i‖, ε), B values (0 for a row holding a non-finite value).
@group(0) @binding(4) var<storage, read_write> inv_norm_features: array<f32>;
/// 1/max(‖w_j‖, ε), this chunk's classes (0 for a row holding a non-finite value).
@group(0) @binding(5) var<storage, read_write> inv_norm_classes: array<f32>;
/// The stacked [x̂; ŵ or w] (or x̂ alone), rows of padded_dim() values, zero past D.
/// Workspace.
@group(0) @binding(14) var<storage, read_write> padded_rows: array<f32>;
/// Non-finite-input flags (FLAG_*), one word. Workspace, cleared by the host before this pass.
@group(0) @binding(6) var<storage, read_write> input_flags: atomic<u32>;

const EPS: f32 = 1e-12;

/// Element `index` of x (is_features) or of w.
fn input_value(is_features: bool, index: u32) -> f32 {
    if (is_features) { return features[index]; }
    return class_vectors[index];
}

/// 1/max(‖v‖, ε) of the D values starting at `base`, or -1 if one is not finite.
/// The row is scaled by its largest magnitude first, so squares neither overflow nor underflow.
fn inv_norm(is_features: bool, base: u32) -> f32 {
    let d = params.dim;
    var amax = 0.0;
    for (var k = 0u; k < d; k++) {
        let v = input_value(is_features, base + k);
        if (is_non_finite(v)) { return -1.0; }
        amax = max(amax, abs(v));
    }
    // ‖v‖ ≤ amax·√D: below 1e-30 the row is shorter than ε for any D up to 1e36, and
    // 1/amax would overflow for subnormal amax.
    if (amax < 1e-30) { return 1.0 / EPS; }
    let inv_amax = 1.0 / amax;
    var sum_sq = 0.0;
    for (var k = 0u; k < d; k++) {
        let u = input_value(is_features, base + k) * inv_amax;
        sum_sq = fma(u, u, sum_sq);
    }
    // ‖v‖ = amax·sqrt(Σ(v/amax)²).
    let root = sqrt(sum_sq);
    if (amax * root < EPS) { return 1.0 / EPS; }
    return inv_amax / root;
}

/// This invocation's row of the stacked [x; w chunk], as (1 for a row of x else 0, the
/// row within x or the chunk); rows past the chunk's end have a row index ≥ its classes.
/// x takes part only where norm_feature_rows = B (the first chunk).
fn stacked_row(wid: vec3<u32>, nwg: vec3<u32>, lid: u32) -> vec2<u32> {
    let row = folded_index(wid, nwg, lid);
    let split = params.norm_feature_rows;
    return select(vec2<u32>(0u, row - split), vec2<u32>(1u, row), row < split);
}

@compute @workgroup_size(ROW_WG)
fn row_inv_norms(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_index) lid: u32) {
    let at = stacked_row(wid, nwg, lid);
    let is_features = at.x == 1u;
    let local_row = at.y;
    if (!is_features && local_row >= params.classes) { return; }
    var row = local_row;
    if (!is_features) { row = class_row(local_row); }
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
/// (`raw_classes`, the chunked plan), stacked in rows of padded_dim() with zeros past D.
/// The grid covers the rows to copy: x alone, or x and w.
@compute @workgroup_size(ROW_WG)
fn pad_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
            @builtin(local_invocation_index) lid: u32) {
    let at = stacked_row(wid, nwg, lid);
    let is_features = at.x == 1u;
    if (!is_features && at.y >= params.classes) { return; }
    var scale = inv_norm_features[min(at.y, params.batch - 1u)];
    if (!is_features) { scale = select(inv_norm_classes[at.y], 1.0, params.raw_classes == 1u); }
    let dest = (at.y + select(params.batch + params.class_offset, 0u, is_features)) * padded_dim();
    let source = at.y * params.dim;
    for (var k = 0u; k < params.dim; k++) { padded_rows[dest + k] = input_value(is_features, source + k) * scale; }
    for (var k = params.dim; k < padded_dim(); k++) { padded_rows[dest + k] = 0.0; }
}
