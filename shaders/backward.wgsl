// Backward pass from the saved per-row LSE, recomputing each cosine tile:
//
//   p_ij = exp(z_ij − LSE_i),  G_ij = s·(p_ij − [j = y_i]) / N   (dL/dc_ij; 0 on ignored rows)
//   gx̂_i = Σ_j G_ij ŵ_j,       gŵ_j = Σ_i G_ij x̂_i
//   dL/dx_i = (gx̂_i − x̂_i (x̂_i·gx̂_i)) / max(‖x_i‖, ε)     (the same for w_j)
//
// dL/dx: `grad_feature_partials` sums gx̂ over each class split into its own partial,
// `sum_feature_splits` adds the splits in split order into grad_features.
// dL/dw: `grad_classes_tile` gives each class tile one owner that loops over all rows.
// The unfused baseline instead turns materialised cosines into G (`logit_grads`) and
// takes gx̂ and gŵ with gemm.wgsl. Every plan then projects gx̂ and gŵ in place
// (`projection_dots`, `normalize_backward`), in pieces of DIM_PIECE values per row. The
// chunked plan does the same a chunk of rows at a time without a copy of ŵ: from the
// dots x̂_i·w_j, forward.wgsl's `logit_softmax_rows` stores G'_ij = G_ij/‖w_j‖, so that
// gx̂ = G'·w and gw' = G'ᵀ·x̂ = gŵ_j/‖w_j‖, whose projection is dL/dw_j with no further
// 1/‖w_j‖.

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
/// gx̂ partials, one B×D block per feature split: index (split·B + i)·D + d; later chunks
/// add into the same blocks. Workspace.
@group(0) @binding(11) var<storage, read_write> feature_grad_partials: array<f32>;
/// dL/dx, B×D. Caller's output.
@group(0) @binding(12) var<storage, read_write> grad_features: array<f32>;
/// dL/dw, this chunk's classes × D. Caller's output; also holds gŵ until the projection.
@group(0) @binding(13) var<storage, read_write> grad_classes: array<f32>;
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
    if (params.reduction != 0u || params.defer_norm == 1u) { return params.scale; }
    let n = summary.valid_rows;
    return select(params.scale / f32(max(n, 1u)), 0.0, n == 0u);
}

/// One cosine tile's G, pre-multiplied by 1/‖w_j‖ (dL/dx) or 1/‖x_i‖ (dL/dw),
/// index (row in tile)·tile_classes() + (class in tile).
var<workgroup> g_tile: array<f32, ROWS_WG * ROW_BLOCK * CLASSES_WG * CLASS_BLOCK>;

/// The label of row i as the forward pass saved it, IGNORE past B.
fn row_label(i: u32) -> u32 {
    if (i >= params.batch) { return IGNORE; }
    return row_softmax[i].label;
}

/// Fills g_tile for the rows row_tile0.. and classes class_tile0.. of this tile.
fn fill_g_tile(row_tile0: u32, class_tile0: u32, lid: vec3<u32>, coef: f32, scale_by_class: bool) {
    let row0 = row_tile0 + lid.y;
    let class0 = class_tile0 + lid.x;
    let dots = dot_block(row0, class0);
    for (var r = 0u; r < ROW_BLOCK; r++) {
        let i = row0 + r * ROWS_WG;
        for (var q = 0u; q < CLASS_BLOCK; q++) {
            let j = class0 + q * CLASSES_WG;
            let y = row_label(i);
            var g = 0.0;
            if (y != IGNORE && j < params.classes) {
                let inv_x = inv_norm_features[i];
                let inv_w = inv_norm_classes[j];
                g = grad_logit(dots[r][q] * inv_x * inv_w, row_softmax[i],
                               params.class_offset + j, y, coef) *
                    select(inv_x, inv_w, scale_by_class);
            }
            g_tile[(lid.y + r * ROWS_WG) * tile_classes() + lid.x + q * CLASSES_WG] = g;
        }
    }
}

/// How a workgroup's invocations cover an R×D gradient block in ROW_BLOCK × CLASS_BLOCK
/// register blocks: rows group + r·groups, columns d0 + lane + q·lanes.
struct BlockLayout {
    group: u32,
    groups: u32,
    lane: u32,
    lanes: u32,
}

/// The layout for R = `out_rows` rows (the tile's rows or classes, a multiple of 4).
fn block_layout(flat: u32, out_rows: u32) -> BlockLayout {
    let groups = out_rows / ROW_BLOCK;
    return BlockLayout(flat % groups, groups, flat / groups, ROWS_WG * CLASSES_WG / groups);
}

/// Where one tile-gradient product reads: g_tile at out_row·g_out_stride + e·g_red_stride,
/// and V's row e as row operand_row0 + e of x (from_features) or of w.
struct ProductOperands {
    g_out_stride: u32,
    g_red_stride: u32,
    from_features: bool,
    operand_row0: u32,
}

/// acc += G_tile[rows, e] ⊗ V[e, columns] for one reduction index e.
fn product_step(acc: ptr<function, Block>, lay: BlockLayout, ops: ProductOperands,
                col: array<u32, CLASS_BLOCK>, e: u32) {
    var g: array<f32, ROW_BLOCK>;
    var v: array<f32, CLASS_BLOCK>;
    for (var r = 0u; r < ROW_BLOCK; r++) {
        g[r] = g_tile[(lay.group + r * lay.groups) * ops.g_out_stride + e * ops.g_red_stride];
    }
    let base = (ops.operand_row0 + e) * params.dim;
    if (ops.from_features) {
        for (var q = 0u; q < CLASS_BLOCK; q++) { v[q] = features[base + col[q]]; }
    } else {
        for (var q = 0u; q < CLASS_BLOCK; q++) { v[q] = class_vectors[base + col[q]]; }
    }
    for (var r = 0u; r < ROW_BLOCK; r++) {
        for (var q = 0u; q < CLASS_BLOCK; q++) {
            (*acc)[r][q] = fma(g[r], v[q], (*acc)[r][q]);
        }
    }
}

/// One invocation's register block of G_tile·V for the columns from d0, reducing over
/// `n_red` entries in order (four per loop iteration, for llvmpipe's loop budget).
/// Columns past D read the last column; callers mask them.
fn tile_product(lay: BlockLayout, d0: u32, n_red: u32, ops: ProductOperands) -> Block {
    var col: array<u32, CLASS_BLOCK>;
    for (var q = 0u; q < CLASS_BLOCK; q++) { col[q] = min(d0 + lay.lane + q * lay.lanes, params.dim - 1u); }
    var acc: Block;
    var e = 0u;
    for (; e + 4u <= n_red; e += 4u) {
        product_step(&acc, lay, ops, col, e);
        product_step(&acc, lay, ops, col, e + 1u);
        product_step(&acc, lay, ops, col, e + 2u);
        product_step(&acc, lay, ops, col, e + 3u);
    }
    for (; e < n_red; e++) {
        product_step(&acc, lay, ops, col, e);
    }
    return acc;
}

/// Workgroup (split k, row tile t): gx̂ of the tile's rows over the classes of split k,
/// into feature_grad_partials. Each (row, d) has one owning invocation.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn grad_feature_partials(@builtin(workgroup_id) wid: vec3<u32>,
                         @builtin(local_invocation_id) lid: vec3<u32>,
                         @builtin(local_invocation_index) flat: u32) {
    let split = wid.x;
    let row_tile0 = wid.y * tile_rows();
    let class_begin = split * params.feature_split_classes;
    let class_end = min(class_begin + params.feature_split_classes, params.classes);
    let coef = grad_coef();
    let d_len = params.dim;
    let lay = block_layout(flat, tile_rows());
    for (var tile = class_begin; tile < class_end; tile += tile_classes()) {
        fill_g_tile(row_tile0, tile, lid, coef, true);
        workgroupBarrier();
        let n_classes = min(tile_classes(), class_end - tile);
        for (var d0 = 0u; d0 < d_len; d0 += lay.lanes * CLASS_BLOCK) {
            let acc = tile_product(lay, d0, n_classes, ProductOperands(tile_classes(), 1u, false, tile));
            for (var r = 0u; r < ROW_BLOCK; r++) {
                let i = row_tile0 + lay.group + r * lay.groups;
                for (var q = 0u; q < CLASS_BLOCK; q++) {
                    let d = d0 + lay.lane + q * lay.lanes;
                    if (i >= params.batch || d >= d_len) { continue; }
                    let idx = (split * params.batch + i) * d_len + d;
                    let fresh = tile == class_begin && params.accumulate == 0u;
                    let old = select(feature_grad_partials[idx], 0.0, fresh);
                    feature_grad_partials[idx] = old + acc[r][q];
                }
            }
        }
        workgroupBarrier();
    }
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

/// One invocation per element of gx̂: the feature splits' partials summed in split order.
@compute @workgroup_size(ROW_WG)
fn sum_feature_splits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    let block = params.batch * params.dim;
    if (e >= block) { return; }
    var g = feature_grad_partials[e];
    for (var k = 1u; k < params.feature_splits; k++) {
        g += feature_grad_partials[k * block + e];
    }
    grad_features[e] = g;
}

/// Workgroup per class tile (grid folded into x, y): gŵ_j over the row tiles of this
/// pass in row order, added into grad_classes (the pass from row 0 overwrites); the
/// projection follows in `normalize_backward`. Each (j, d) has one owner.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn grad_classes_tile(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                     @builtin(local_invocation_id) lid: vec3<u32>,
                     @builtin(local_invocation_index) flat: u32) {
    let class_tile0 = (wid.x + wid.y * nwg.x) * tile_classes();
    if (class_tile0 >= params.classes) { return; }
    let coef = grad_coef();
    let d_len = params.dim;
    let n_classes = min(tile_classes(), params.classes - class_tile0);
    let lay = block_layout(flat, tile_classes());
    for (var row_tile0 = params.row_begin; row_tile0 < params.row_end; row_tile0 += tile_rows()) {
        fill_g_tile(row_tile0, class_tile0, lid, coef, false);
        workgroupBarrier();
        let n_rows = min(tile_rows(), params.row_end - row_tile0);
        for (var d0 = 0u; d0 < d_len; d0 += lay.lanes * CLASS_BLOCK) {
            let acc = tile_product(lay, d0, n_rows, ProductOperands(1u, tile_classes(), true, row_tile0));
            for (var r = 0u; r < ROW_BLOCK; r++) {
                let ci = lay.group + r * lay.groups;
                for (var q = 0u; q < CLASS_BLOCK; q++) {
                    let d = d0 + lay.lane + q * lay.lanes;
                    if (ci >= n_classes || d >= d_len) { continue; }
                    let idx = (class_tile0 + ci) * d_len + d;
                    let old = select(grad_classes[idx], 0.0, row_tile0 == 0u);
                    grad_classes[idx] = old + acc[r][q];
                }
            }
        }
        workgroupBarrier();
    }
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
    logits[at] = select(0.0, grad_logit(logits[at], row_softmax[i], j, y, grad_coef()), y != IGNORE);
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
            dot = fma(features[d] * at.inv, grad_features[d], dot);
        }
    } else {
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            dot = fma(class_vectors[d] * at.inv, grad_classes[d], dot);
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
/// one piece; else from `projection_dots`, in piece order), then the piece of dL/dv = (g − v̂(v̂·g))·inv in place, times the deferred
/// 1/N. The projection is linear: projecting gw' = gŵ·inv gives dL/dw without the last
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
    let norm = deferred_norm();
    var finite = true;
    if (at.is_features) {
        let factor = at.inv * norm;
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            let out = (grad_features[d] - features[d] * at.inv * along) * factor;
            grad_features[d] = out;
            finite = finite && !is_non_finite(out);
        }
    } else {
        let factor = select(at.inv, 1.0, params.raw_classes == 1u) * norm;
        for (var d = at.base + at.piece.y; d < at.base + at.piece.z; d++) {
            let out = (grad_classes[d] - class_vectors[d] * at.inv * along) * factor;
            grad_classes[d] = out;
            finite = finite && !is_non_finite(out);
        }
    }
    flag_non_finite_gradients(finite);
}
