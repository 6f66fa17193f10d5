// Forward pass over the dots of the GEMMs: the margin on the target logit and the online
// log-sum-exp of each row (`logit_softmax_rows`: whole rows, or class blocks merged in
// block order into one partial per row, finished by `merge_rows`), the per-call totals
// (`summarize`), and the chunked plan's G' (`write_grad_row`, `logit_grad_rows`).
//
//   c_ij = x̂_i·ŵ_j,  z_ij = s·(c_ij − m·[j = y_i]),  L_i = LSE_j(z_ij) − z_{i,y_i}

/// The uniform of the forward family (the softmax rows, `merge_rows`, `summarize`), one
/// per class chunk and row pass. Mirrors `ForwardParams` in `src/kernels.rs` (a test
/// compares their sizes).
struct ForwardParams {
    /// s and the margin function (shaders/margin.wgsl).
    loss: LossTerms,
    /// B: rows of x.
    batch: u32,
    /// Classes in this dispatch's chunk of w (all C unless w is bound in chunks).
    classes: u32,
    /// C: all classes; labels are checked against it.
    total_classes: u32,
    /// Index of the chunk's first class (class-indexed buffers are bound from it).
    class_offset: u32,
    /// Rows [row_begin, row_end) of this row chunk of the logits.
    row_begin: u32,
    row_end: u32,
    /// Elements between rows of the materialised logits (a multiple of 4).
    logit_stride: u32,
    /// 1: the logits hold one class block (this chunk's classes), not all C; the forward
    /// leaves per-block partials and the backward recomputes each block's dots.
    blocks: u32,
    /// This chunk's partial slot with `blocks`.
    block_index: u32,
    /// 1 (the chunked plan's backward): `logit_softmax_rows` overwrites each row of dots
    /// with G'_ij = G_ij/‖w_j‖ once the row's softmax is known, without the 1/N.
    write_grads: u32,
    /// 1 (the chunked plan): w enters the GEMMs as it is, not normalised: `logits` holds
    /// x̂_i·w_j, to be scaled by 1/‖w_j‖, and G carries the factor 1/‖w_j‖ of its column;
    /// 0 (the unfused baseline): `logits` holds cosines (and `pad_rows` copies ŵ).
    raw_classes: u32,
    /// 0 = mean, 1 = sum, 2 = none (gradients of the sum).
    reduction: u32,
    /// 1.0 when s >= s_min (the scale receives a gradient), else 0.0.
    scale_grad_gate: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// This dispatch's uniform.
@group(0) @binding(0) var<uniform> params: ForwardParams;

/// 1/max(‖x_i‖, ε), B values (from norms.wgsl).
@group(0) @binding(4) var<storage, read> inv_norm_features: array<f32>;
/// 1/max(‖w_j‖, ε), this chunk's classes (from norms.wgsl).
@group(0) @binding(5) var<storage, read> inv_norm_classes: array<f32>;
/// Non-finite-input flags from norms.wgsl, one word. Workspace.
@group(0) @binding(6) var<storage, read_write> input_flags: atomic<u32>;
/// One SplitPartial per row over the class blocks so far (chunked plan in blocks).
/// Workspace.
@group(0) @binding(7) var<storage, read_write> split_partials: array<SplitPartial>;
/// Per-row log-sum-exp and dL/ds term, B values. Workspace, read by the backward pass.
@group(0) @binding(8) var<storage, read_write> row_softmax: array<RowSoftmax>;
/// Per-row statistics, B values. Caller's output. Mirrors `RowStats` in Rust.
@group(0) @binding(9) var<storage, read_write> row_stats: array<RowStats>;
/// Per-call totals, written by `summarize`. Caller's output. Mirrors `Summary` in Rust.
@group(0) @binding(10) var<storage, read_write> summary: Summary;
/// Unfused baseline: the B×C cosines c_ij; chunked plan: x̂_i·w_j for rows
/// [row_begin, row_end) over logit_columns(); from gemm.wgsl, rows logit_stride apart,
/// four classes per entry. Workspace.
@group(0) @binding(16) var<storage, read_write> logits: array<vec4<f32>>;
/// inv_norm_classes four classes per entry (the buffer holds C rounded up to 4 values;
/// those past C are 0).
@group(0) @binding(17) var<storage, read> inv_norm_class_quads: array<vec4<f32>>;

/// Online softmax state of one row over a set of classes, plus the statistics.
struct SplitPartial {
    /// M: running max of z.
    max_logit: f32,
    /// S = Σ exp(z − M).
    sum_exp: f32,
    /// T = Σ exp(z − M)·z/s, so that Σ_j p_j·z_j/s = T/S (for dL/ds).
    sum_exp_logit: f32,
    /// The non-target part of S, Σ_{j≠y} exp(z_j − M): L_i and 1 − p_iy from it keep
    /// their relative precision when the target dominates and L_i ≪ 1.
    sum_exp_other: f32,
    /// c_iy if the label is among these classes, else NEG_BIG.
    target_cos: f32,
    /// max over non-target classes of c_ij, NEG_BIG if none.
    best_other_cos: f32,
    /// Lowest class index attaining best_other_cos, NO_CLASS if none.
    best_other_class: u32,
}

struct RowStats {
    /// L_i (0 for an ignored row).
    loss: f32,
    /// c_iy (0 for an ignored row).
    target_cos: f32,
    /// max over j ≠ y_i of c_ij (over all j for an ignored row); -1 when C = 1.
    best_other_cos: f32,
    /// argmax_j c_ij, lowest index on ties.
    pred: u32,
    /// c_iy − max_{j≠y} c_ij (0 for an ignored row).
    achieved_margin: f32,
    /// p_iy, the margin softmax's probability of the label (0 for an ignored row).
    target_prob: f32,
}

fn empty_partial() -> SplitPartial {
    return SplitPartial(NEG_BIG, 0.0, 0.0, 0.0, NEG_BIG, NEG_BIG, NO_CLASS);
}

/// (M, S, T) ⊕ (M', S', T'), and the statistics; ties in best_other_cos keep the lower
/// class index, so the result does not depend on which classes each side saw.
fn merge_partials(a: SplitPartial, b: SplitPartial) -> SplitPartial {
    let m = max(a.max_logit, b.max_logit);
    let fa = exp(a.max_logit - m);
    let fb = exp(b.max_logit - m);
    var out = SplitPartial(
        m,
        a.sum_exp * fa + b.sum_exp * fb,
        a.sum_exp_logit * fa + b.sum_exp_logit * fb,
        a.sum_exp_other * fa + b.sum_exp_other * fb,
        max(a.target_cos, b.target_cos),
        a.best_other_cos,
        a.best_other_class,
    );
    if (b.best_other_class != NO_CLASS &&
        (a.best_other_class == NO_CLASS || b.best_other_cos > a.best_other_cos ||
         (b.best_other_cos == a.best_other_cos && b.best_other_class < a.best_other_class))) {
        out.best_other_cos = b.best_other_cos;
        out.best_other_class = b.best_other_class;
    }
    return out;
}

/// Adds one more logit z = s·zc to the online (M, S, T) of `st`; returns its
/// exp(z − M) under the new M.
fn add_exp(st: ptr<function, SplitPartial>, zc: f32) -> f32 {
    let z = params.loss.scale * zc;
    if (z > (*st).max_logit) {
        let f = exp((*st).max_logit - z);
        (*st).sum_exp *= f;
        (*st).sum_exp_logit *= f;
        (*st).sum_exp_other *= f;
        (*st).max_logit = z;
    }
    let e = exp(z - (*st).max_logit);
    (*st).sum_exp += e;
    (*st).sum_exp_logit = fma(e, zc, (*st).sum_exp_logit);
    return e;
}

/// The state after row i's target class, with cosine c (its logit takes the margin).
fn add_target(state: SplitPartial, c: f32, i: u32) -> SplitPartial {
    var st = state;
    _ = add_exp(&st, target_margin(c, i).x);
    st.target_cos = c;
    return st;
}

/// The state after four more non-target classes j0 .. j0 + 3 with cosines c, those
/// where `take` holds: one rescale for the four, and the lowest index kept on ties. The
/// softmax sees row i's `other_terms`, the statistics the raw cosines.
fn add_others(state: SplitPartial, c: vec4<f32>, j0: u32, take: vec4<bool>, i: u32) -> SplitPartial {
    var st = state;
    let zc = other_terms(c, i).zc;
    let z = params.loss.scale * zc;
    let top = max(max(select(NEG_BIG, z.x, take.x), select(NEG_BIG, z.y, take.y)),
                  max(select(NEG_BIG, z.z, take.z), select(NEG_BIG, z.w, take.w)));
    if (top > st.max_logit) {
        let f = exp(st.max_logit - top);
        st.sum_exp *= f;
        st.sum_exp_logit *= f;
        st.sum_exp_other *= f;
        st.max_logit = top;
    }
    let e = select(vec4<f32>(), exp(z - st.max_logit), take);
    let sum = (e.x + e.y) + (e.z + e.w);
    st.sum_exp += sum;
    st.sum_exp_other += sum;
    st.sum_exp_logit += dot(e, zc);
    for (var t = 0u; t < 4u; t++) {
        if (take[t] && c[t] > st.best_other_cos) {
            st.best_other_cos = c[t];
            st.best_other_class = j0 + t;
        }
    }
    return st;
}

/// log(1 + x) for x ≥ 0, to a few ulp also where x ≪ 1 (WGSL has no log1p): below 0.5
/// as 2·atanh(y), y = x/(2 + x), by its series (y ≤ 0.2: the terms past y¹⁵ are below
/// 1e-12 relative); above, log(1 + x) ≥ 0.4 carries no cancellation.
fn log1p_accurate(x: f32) -> f32 {
    if (x > 0.5) { return log(1.0 + x); }
    let y = x / (2.0 + x);
    let y2 = y * y;
    var series = 1.0 / 15.0;
    series = fma(series, y2, 1.0 / 13.0);
    series = fma(series, y2, 1.0 / 11.0);
    series = fma(series, y2, 1.0 / 9.0);
    series = fma(series, y2, 1.0 / 7.0);
    series = fma(series, y2, 1.0 / 5.0);
    series = fma(series, y2, 1.0 / 3.0);
    series = fma(series, y2, 1.0);
    return 2.0 * y * series;
}

/// LSE_i = M + log S, L_i, 1 − p_iy, dL_i/ds and the statistics of row i from its
/// merged state.
fn finish_row(i: u32, acc: SplitPartial) {
    let lse = acc.max_logit + log(acc.sum_exp);
    let y = label_of(i);
    let has_other = acc.best_other_class != NO_CLASS;
    let best_other = select(-1.0, acc.best_other_cos, has_other);
    var stats = RowStats(0.0, 0.0, best_other, acc.best_other_class, 0.0, 0.0);
    var softmax = RowSoftmax(lse, 0.0, 0.0, acc.best_other_class, y);
    if (y != IGNORE) {
        let zc_target = target_margin(acc.target_cos, i).x;
        let z_target = params.loss.scale * zc_target;
        // t = M − z_y ≥ 0. With X = Σ_{j≠y} exp(z_j − z_y), L_i = log(1 + X),
        // p_iy = 1/(1 + X) and 1 − p_iy = X/(1 + X): all stay exact relative to
        // themselves as X → 0, where lse − z_y and 1 − exp(z_y − lse) would cancel. For
        // t > 10 the target is far from the top and the direct forms are well conditioned.
        let t = acc.max_logit - z_target;
        if (t > 10.0) {
            stats.loss = t + log(acc.sum_exp);
            stats.target_prob = exp(z_target - lse);
            softmax.target_complement = 1.0 - stats.target_prob;
        } else {
            let other = acc.sum_exp_other * exp(t);
            stats.loss = log1p_accurate(other);
            stats.target_prob = 1.0 / (1.0 + other);
            softmax.target_complement = other / (1.0 + other);
        }
        softmax.scale_grad = acc.sum_exp_logit / acc.sum_exp - zc_target;
        if (params.loss.objective == 1u) {
            // Hard margin: a hinge on the best non-target against the margined target.
            let gap = best_other - zc_target;
            let hinge_on = has_other && gap > 0.0;
            stats.loss = select(0.0, params.loss.scale * gap, hinge_on);
            softmax.scale_grad = select(0.0, gap, hinge_on);
            softmax.target_complement = select(0.0, 1.0, hinge_on);
        }
        stats.target_cos = acc.target_cos;
        stats.achieved_margin = acc.target_cos - best_other;
        let target_wins = !has_other || acc.target_cos > acc.best_other_cos ||
            (acc.target_cos == acc.best_other_cos && y < acc.best_other_class);
        stats.pred = select(acc.best_other_class, y, target_wins);
    }
    row_softmax[i] = softmax;
    row_stats[i] = stats;
}

/// Lane partials of one workgroup, index (row in workgroup)·CLASSES_WG + class lane.
var<workgroup> lane_partials: array<SplitPartial, ROWS_WG * CLASSES_WG>;

/// lane_partials[first] ⊕ … ⊕ lane_partials[first + count − 1], in lane order.
fn fold_lanes(first: u32, count: u32) -> SplitPartial {
    var acc = lane_partials[first];
    for (var lane = 1u; lane < count; lane++) {
        acc = merge_partials(acc, lane_partials[first + lane]);
    }
    return acc;
}

/// One invocation per row: finish the row from its partial over every class block.
@compute @workgroup_size(ROW_WG)
fn merge_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let i = folded_index(wid, nwg, lid);
    if (i >= params.batch) { return; }
    finish_row(i, split_partials[i]);
}

/// The columns of the materialised logits a row pass covers: (first global class, classes).
/// All C classes, or with `blocks` the class block of this dispatch's chunk.
fn logit_columns() -> vec2<u32> {
    if (params.blocks == 1u) { return vec2<u32>(params.class_offset, params.classes); }
    return vec2<u32>(0u, params.total_classes);
}

/// The row i of the logits (vec4 entries from `base`, classes `columns`) overwritten with
/// G'_ij = G_ij/‖w_j‖ from the finished row (`row_softmax`, `row_stats`), 0 past the
/// columns; the lane's share: quads lane, lane + lanes, …. The chunked plan's 1/N is
/// deferred. Every class goes as a non-target of the margin softmax first (0 for the
/// hard margin); then the lanes that hold the target, and the hard margin's best other
/// class, overwrite theirs.
fn write_grad_row(i: u32, y: u32, base: u32, columns: vec2<u32>, lane: u32, lanes: u32) {
    let row = row_softmax[i];
    let soft = y != IGNORE && params.loss.objective == 0u;
    let first_quad = columns.x / 4u;
    for (var q = lane; q < (columns.y + 3u) / 4u; q += lanes) {
        let inv_w = inv_norm_class_quads[first_quad + q];
        let terms = other_terms(logits[base + q] * inv_w, i);
        let p = exp(params.loss.scale * terms.zc - row.lse);
        let inside = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(columns.y);
        let g = flush_subnormal(params.loss.scale * p) * terms.slope * inv_w;
        logits[base + q] = select(vec4<f32>(), g, inside & vec4<bool>(soft));
    }
    if (y == IGNORE) { return; }
    var special = array<u32, 2>(y, NO_CLASS);
    if (params.loss.objective == 1u) { special[1] = row.best_other_class; }
    for (var k = 0u; k < 2u; k++) {
        let j = special[k];
        let local = j - columns.x;
        if (j != NO_CLASS && j >= columns.x && local < columns.y && (local / 4u) % lanes == lane) {
            let g = grad_logit(row_stats[i].target_cos, i, row, j, y, params.loss.scale);
            logits[base + local / 4u][local % 4u] = g * inv_norm_class_quads[j / 4u][j % 4u];
        }
    }
}

/// Unfused baseline and chunked plan: one row of the materialised logits per ROWS_WG
/// invocations of a workgroup (rows [row_begin, row_end), stored from row_begin, over
/// logit_columns()). The CLASSES_WG lanes of a row take strided quads of four classes,
/// then its lane 0 folds them in lane order and finishes the row, or with `blocks`
/// merges the block's SplitPartial into the row's (finished by `merge_rows`). With
/// `write_grads` the lanes then overwrite the row with G' (`write_grad_row`).
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn logit_softmax_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                      @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = params.row_begin + (wid.x + wid.y * nwg.x) * ROWS_WG + lid.y;
    // Rows past the end take part in the barriers only.
    let in_range = i < params.row_end;
    let lane = lid.x;
    let lanes = CLASSES_WG;
    let y = select(IGNORE, label_of(i), in_range);
    let base = (min(i, params.row_end - 1u) - params.row_begin) * params.logit_stride / 4u;
    let columns = logit_columns();
    let quads = select(0u, (columns.y + 3u) / 4u, in_range);
    let first_quad = columns.x / 4u;
    let raw = params.raw_classes == 1u;
    var st = empty_partial();
    // Each lane sums its quads in runs of about √(its quads), merged run by run: S, T and
    // the non-target sum, whose rounding reaches every p_ij of the row through the LSE,
    // are chains of about 2√n additions instead of one of n (n up to C/(4·lanes)).
    let run_quads = 1u << ((firstLeadingBit(max(quads / lanes, 1u)) + 1u) / 2u);
    var run = empty_partial();
    // The target, whose logit takes the margin, joins after the other classes, in the
    // lane that holds it: the loop over the other classes stays free of the margin.
    for (var q = lane; q < quads; q += lanes) {
        let c = logits[base + q] * select(vec4<f32>(1.0), inv_norm_class_quads[first_quad + q], raw);
        let local = vec4<u32>(4u * q) + vec4<u32>(0u, 1u, 2u, 3u);
        let take = local < vec4<u32>(columns.y) & local + columns.x != vec4<u32>(y);
        run = add_others(run, c, columns.x + 4u * q, take, i);
        if (((q / lanes + 1u) & (run_quads - 1u)) == 0u) {
            st = merge_partials(st, run);
            run = empty_partial();
        }
    }
    st = merge_partials(st, run);
    let target_local = y - columns.x;
    if (y != IGNORE && y >= columns.x && target_local < columns.y && (target_local / 4u) % lanes == lane) {
        let c = logits[base + target_local / 4u][target_local % 4u];
        st = add_target(st, c * select(1.0, inv_norm_class_quads[y / 4u][y % 4u], raw), i);
    }
    lane_partials[lid.y * lanes + lane] = st;
    workgroupBarrier();
    if (in_range && lane == 0u) {
        let merged = fold_lanes(lid.y * lanes, lanes);
        if (params.blocks == 1u) {
            // Blocks run one after another in class order: the first writes the row's
            // partial, the later ones merge into it (the same order the host merges in).
            if (params.block_index == 0u) {
                split_partials[i] = merged;
            } else {
                split_partials[i] = merge_partials(split_partials[i], merged);
            }
        } else {
            finish_row(i, merged);
        }
    }
    if (params.write_grads == 0u) { return; }
    storageBarrier();
    if (in_range) { write_grad_row(i, y, base, columns, lane, lanes); }
}

/// Chunked plan over class blocks, backward: the block's rows of G' from its recomputed
/// dots and the finished rows, as in `logit_softmax_rows`.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn logit_grad_rows(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(local_invocation_id) lid: vec3<u32>) {
    let i = params.row_begin + (wid.x + wid.y * nwg.x) * ROWS_WG + lid.y;
    if (i >= params.row_end) { return; }
    let base = (i - params.row_begin) * params.logit_stride / 4u;
    write_grad_row(i, label_of(i), base, logit_columns(), lid.x, CLASSES_WG);
}

/// Invocations of the single `summarize` workgroup; a power of two (tree reduction).
override SUMMARY_WG: u32 = 256u;

var<workgroup> lane_loss: array<f32, SUMMARY_WG>;
var<workgroup> lane_scale_grad: array<f32, SUMMARY_WG>;
var<workgroup> lane_valid: array<u32, SUMMARY_WG>;
var<workgroup> lane_correct: array<u32, SUMMARY_WG>;
var<workgroup> lane_flags: array<u32, SUMMARY_WG>;
var<workgroup> lane_margin: array<f32, SUMMARY_WG>;
var<workgroup> lane_satisfied: array<u32, SUMMARY_WG>;

/// One workgroup: sums over rows in a fixed order (strided lanes, then a tree), and the
/// reduction. Also flags labels that are neither a class nor IGNORE.
@compute @workgroup_size(SUMMARY_WG)
fn summarize(@builtin(local_invocation_index) lid: u32) {
    var loss = 0.0;
    var scale_grad = 0.0;
    var valid = 0u;
    var correct = 0u;
    var margin = 0.0;
    var satisfied = 0u;
    var found = 0u; // FLAG_* bits seen by this lane
    for (var i = lid; i < params.batch; i += SUMMARY_WG) {
        let y = labels[i];
        found |= select(0u, FLAG_LABEL_OUT_OF_RANGE, y >= params.total_classes && y != IGNORE);
        let overflowed = is_non_finite(row_stats[i].loss) || is_non_finite(row_softmax[i].lse);
        found |= select(0u, FLAG_OVERFLOW, overflowed);
        if (y < params.total_classes) {
            loss += row_stats[i].loss;
            scale_grad += row_softmax[i].scale_grad;
            valid += 1u;
            correct += select(0u, 1u, row_stats[i].pred == y);
            margin += row_stats[i].achieved_margin;
            let margined = target_margin(row_stats[i].target_cos, i).x;
            satisfied += select(0u, 1u, margined >= row_stats[i].best_other_cos);
        }
    }
    lane_loss[lid] = loss;
    lane_scale_grad[lid] = scale_grad;
    lane_valid[lid] = valid;
    lane_correct[lid] = correct;
    lane_flags[lid] = found;
    lane_margin[lid] = margin;
    lane_satisfied[lid] = satisfied;
    for (var half = SUMMARY_WG / 2u; half > 0u; half /= 2u) {
        workgroupBarrier();
        if (lid < half) {
            lane_loss[lid] += lane_loss[lid + half];
            lane_scale_grad[lid] += lane_scale_grad[lid + half];
            lane_valid[lid] += lane_valid[lid + half];
            lane_correct[lid] += lane_correct[lid + half];
            lane_flags[lid] |= lane_flags[lid + half];
            lane_margin[lid] += lane_margin[lid + half];
            lane_satisfied[lid] += lane_satisfied[lid + half];
        }
    }
    if (lid == 0u) {
        let n = lane_valid[0];
        // Mean over N rows; with every row ignored the loss and its gradients are 0.
        let norm = select(1.0, 1.0 / f32(max(n, 1u)), params.reduction == 0u);
        summary.loss = lane_loss[0] * norm;
        summary.scale_grad = lane_scale_grad[0] * norm * params.scale_grad_gate;
        summary.valid_rows = n;
        summary.correct_rows = lane_correct[0];
        summary.flags = lane_flags[0] | atomicLoad(&input_flags);
        summary.mean_achieved_margin = lane_margin[0] / f32(max(n, 1u));
        summary.margin_satisfied_rows = lane_satisfied[0];
    }
}
