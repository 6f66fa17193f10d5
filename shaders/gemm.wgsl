// Plain GEMM, product (+)= lhs · rhs, on vec4 loads, with strided, offset operands, so
// that one kernel serves every product of the loss: the benchmark's floor x·wᵀ, the
// unfused baseline's cosine matrix and gradient GEMMs, and the chunked plan's dots x̂·wᵀ,
// gx̂ = G'·w and gw' += G'ᵀ·x̂ (G' = G ⊙ inv_w, see backward.wgsl).
//
// Each operand is stored with one axis contiguous, chosen per pipeline by an override:
//
//   lhs[m, k] = lhs_data[lhs_offset + m·lhs_stride + k]   (LHS_ALONG_K)
//             = lhs_data[lhs_offset + k·lhs_stride + m]   (otherwise: along m)
//   rhs[k, n] = rhs_data[rhs_offset + n·rhs_stride + k]   (RHS_ALONG_K)
//             = rhs_data[rhs_offset + k·rhs_stride + n]   (otherwise: along n)
//   product[m, n] (+)= Σ_k lhs[m, k] · rhs[k, n]
//
// Offsets and strides are multiples of 4 (plans pad rows to a multiple of 4), so each
// load takes four consecutive elements along the contiguous axis as one vec4. An
// invocation owns an (4·ROW_QUADS)×(4·COL_QUADS) block held in registers: on llvmpipe
// every load costs a loop over the SIMD lanes, and this block does 16·ROW_QUADS·COL_QUADS
// multiply-adds per 4·(ROW_QUADS + COL_QUADS) loaded vec4s. No workgroup memory.
//
// The module ends with one of two loaders of the lhs block, `lhs_tile`:
// gemm_lhs_loads.wgsl (each invocation loads its own) or gemm_lhs_subgroup.wgsl (the
// eight invocations of a subgroup, which own the same rows, load one vec4 each and share
// them), chosen per adapter in `src/kernels.rs`; and one of two declarations of the rhs
// with its quad loader, `rhs_quad`: gemm_rhs_f32.wgsl, or gemm_rhs_half.wgsl where the
// rhs is w stored in 16 bits (f16 or bf16, widened to f32 as it is loaded, so that every
// product and sum is f32 and the same as on the f32 values).

/// Sizes, strides and offsets (in f32 elements) of one GEMM. Mirrors `GemmShape` in Rust.
struct GemmShape {
    /// Rows of the product.
    m: u32,
    /// Columns of the product.
    n: u32,
    /// Length of each dot product.
    k: u32,
    /// Elements between consecutive rows of lhs along its non-contiguous axis.
    lhs_stride: u32,
    /// Elements between consecutive rows of rhs along its non-contiguous axis.
    rhs_stride: u32,
    /// Elements between consecutive rows of the product.
    product_stride: u32,
    lhs_offset: u32,
    rhs_offset: u32,
    product_offset: u32,
    /// 1: add into the product (a later k-piece or row chunk); 0: overwrite it.
    accumulate: u32,
    /// Quads of k summed in one run before the run is added to the total (a power of
    /// two near √(k/4), fixed by the shape: see `end_run`).
    run_quads: u32,
    /// Length of each split of k (a multiple of 4; the last split may be shorter).
    split_k: u32,
    /// Splits of k: 1, or a split-K product whose splits store their partial products in
    /// `product` (bound to the workspace's split products, split s at s·m·n, rows n
    /// apart) for `sum_splits` to add up in order.
    splits: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// Sizes, strides and offsets of this GEMM.
@group(0) @binding(20) var<uniform> gemm: GemmShape;
/// Left operand, four consecutive elements of its contiguous axis per entry.
@group(0) @binding(21) var<storage, read> lhs: array<vec4<f32>>;
/// The m×n product, rows product_stride apart from product_offset; every element of it
/// is written and nothing else. Of a split-K product: the splits' partial products.
@group(0) @binding(23) var<storage, read_write> product: array<f32>;
/// The splits' partial products, read by `sum_splits` (whose `product` is the product).
@group(0) @binding(24) var<storage, read> split_products: array<f32>;

/// true: lhs is contiguous along k (rows of x̂, or of G' for gx̂); false: along m (G'
/// read as G'ᵀ for gw').
override LHS_ALONG_K: bool = true;
/// true: rhs is contiguous along k (rows of w for x̂·wᵀ); false: along n (w for gx̂, x̂ for gw').
override RHS_ALONG_K: bool = true;

/// Quads of four product rows, and of four product columns, per invocation.
const ROW_QUADS: u32 = 2u;
const COL_QUADS: u32 = 2u;

/// Rows and columns of the product one workgroup covers.
fn gemm_tile_rows() -> u32 { return ROWS_WG * 4u * ROW_QUADS; }
fn gemm_tile_cols() -> u32 { return CLASSES_WG * 4u * COL_QUADS; }

// Every loop over the register block indexes an array of exactly its trip count with its
// counter: drivers then unroll it (Mesa does so by rule), so that the block stays in
// registers. An index such as 4·g + t hides the trip count, and one loop left rolled
// anywhere puts the whole block in memory (half the speed on llvmpipe).

/// One invocation's accumulators: [row quad][row in quad][column quad], four columns each.
alias GemmBlock = array<array<array<vec4<f32>, COL_QUADS>, 4>, ROW_QUADS>;

/// The k range one split sums: its length and its operands' offsets, in elements.
struct KSlice {
    k: u32,
    lhs_offset: u32,
    rhs_offset: u32,
}

/// Split `split`'s k range: k from split·split_k, at most split_k of them.
fn k_slice(split: u32) -> KSlice {
    let k0 = split * gemm.split_k;
    var lhs = gemm.lhs_offset + k0;
    if (!LHS_ALONG_K) { lhs = gemm.lhs_offset + k0 * gemm.lhs_stride; }
    var rhs = gemm.rhs_offset + k0;
    if (!RHS_ALONG_K) { rhs = gemm.rhs_offset + k0 * gemm.rhs_stride; }
    return KSlice(min(gemm.split_k, gemm.k - k0), lhs, rhs);
}

/// The tile a workgroup covers: (split, tile row, tile column, 1), or w = 0 past the
/// end. Tiles are walked along n first, then m, then the splits.
fn workgroup_tile(wid: vec3<u32>, nwg: vec3<u32>) -> vec4<u32> {
    let tiles_n = (gemm.n + gemm_tile_cols() - 1u) / gemm_tile_cols();
    let tiles_m = (gemm.m + gemm_tile_rows() - 1u) / gemm_tile_rows();
    let tile = wid.x + wid.y * nwg.x;
    let split = tile / (tiles_m * tiles_n);
    let rest = tile - split * tiles_m * tiles_n;
    let tile_m = rest / tiles_n;
    return vec4<u32>(split, tile_m, rest - tile_m * tiles_n, u32(split < gemm.splits));
}

/// Where one invocation reads its operands, in vec4 entries: per row quad, the entry of
/// each of its four rows at k = 0 (lhs along k) or of the quad at k = 0 (along m, all
/// four the same); per column quad likewise for rhs. And how many entries one k moves
/// along the non-contiguous axes.
struct OperandBases {
    lhs: array<vec4<u32>, ROW_QUADS>,
    rhs: array<vec4<u32>, COL_QUADS>,
    lhs_k_stride: u32,
    rhs_k_stride: u32,
}

/// The bases of rows first_row + (0, 1, 2, 3) of an operand with `count` rows along the
/// block's axis: rows past the end read the last row (along k) or the last quad (across
/// k); their products are not stored.
fn quad_bases(first_row: u32, count: u32, offset: u32, stride: u32, along_k: bool) -> vec4<u32> {
    if (along_k) {
        let rows = min(vec4<u32>(first_row) + vec4<u32>(0u, 1u, 2u, 3u), vec4<u32>(count - 1u));
        return (vec4<u32>(offset) + rows * stride) / 4u;
    }
    return vec4<u32>((offset + min(first_row, (count - 1u) & ~3u)) / 4u);
}

/// 1 for the first k_valid of four consecutive k, else 0. With k_valid = 4 (every step
/// but the last) it folds away once inlined.
fn k_mask(k_valid: u32) -> vec4<bool> {
    return vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(k_valid);
}

/// kk where kk < k_valid, else 0 (a valid k whose values are then masked to 0).
fn k_offset(kk: u32, k_valid: u32) -> u32 {
    return select(0u, kk, kk < k_valid);
}

/// Four consecutive k of a quad of an operand, as a matrix whose column t is row t of
/// the quad over k = 4·kv .. 4·kv + 3, zero past k_valid: four vec4 loads, along k one
/// per row, across k one per k, transposed.
fn operand_quad(from_lhs: bool, along_k: bool, bases: vec4<u32>, k_stride: u32, kv: u32,
                k_valid: u32) -> mat4x4<f32> {
    let mask = k_mask(k_valid);
    var cols: array<vec4<f32>, 4>;
    for (var i = 0u; i < 4u; i++) {
        var at = bases[i] + kv;
        if (!along_k) { at = bases[0] + (4u * kv + k_offset(i, k_valid)) * k_stride; }
        var v: vec4<f32>;
        if (from_lhs) { v = lhs[at]; } else { v = rhs_quad(at); }
        if (along_k) {
            cols[i] = select(vec4<f32>(), v, mask);
        } else {
            cols[i] = select(vec4<f32>(), v, mask[i]);
        }
    }
    let quad = mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]);
    if (along_k) { return quad; }
    return transpose(quad);
}

/// acc += lhs[block rows, k] · rhs[k, block columns] for k = 4·kv .. 4·kv + k_valid − 1,
/// the lhs block `a` from `lhs_tile`.
fn gemm_step(acc: ptr<function, GemmBlock>, a: array<mat4x4<f32>, ROW_QUADS>, at: OperandBases,
             kv: u32, k_valid: u32) {
    var b: array<mat4x4<f32>, COL_QUADS>;
    for (var h = 0u; h < COL_QUADS; h++) {
        b[h] = operand_quad(false, RHS_ALONG_K, at.rhs[h], at.rhs_k_stride, kv, k_valid);
    }
    block_product(acc, a, b);
}

/// acc += a · b for one quad of k: the one arithmetic step of every candidate, so that
/// each output element is the same sum of the same products in the same order whichever
/// candidate runs.
fn block_product(acc: ptr<function, GemmBlock>, a: array<mat4x4<f32>, ROW_QUADS>,
                 b: array<mat4x4<f32>, COL_QUADS>) {
    for (var g = 0u; g < ROW_QUADS; g++) {
        for (var t = 0u; t < 4u; t++) {
            for (var h = 0u; h < COL_QUADS; h++) {
                // Row vector times matrix: the four dot products of row t with the columns.
                (*acc)[g][t][h] += a[g][t] * b[h];
            }
        }
    }
}

/// total += run, then run = 0, where the quad just summed (`kv`) ends a run of
/// `gemm.run_quads` quads or is the `last`. A sum of n quads of k is then one chain of
/// about √n additions per run and one of √n runs, instead of one chain of n: this bounds
/// the rounding of the long sums (and of the cosines, each a sum of D products).
fn end_run(total: ptr<function, GemmBlock>, run: ptr<function, GemmBlock>, kv: u32, last: bool) {
    if (((kv + 1u) & (gemm.run_quads - 1u)) != 0u && !last) { return; }
    for (var g = 0u; g < ROW_QUADS; g++) {
        for (var t = 0u; t < 4u; t++) {
            for (var h = 0u; h < COL_QUADS; h++) {
                (*total)[g][t][h] += (*run)[g][t][h];
                (*run)[g][t][h] = vec4<f32>();
            }
        }
    }
}

/// Stores (or adds) `sums` at columns first_col .. first_col + 3 of `row`, those inside
/// the product; of a split-K product, stores them in split `split`'s partial product.
fn store_quad(split: u32, row: u32, first_col: u32, sums: vec4<f32>) {
    if (row >= gemm.m) { return; }
    var at = gemm.product_offset + row * gemm.product_stride + first_col;
    var add = gemm.accumulate == 1u;
    if (gemm.splits > 1u) {
        at = (split * gemm.m + row) * gemm.n + first_col;
        add = false;
    }
    let inside = vec4<u32>(first_col) + vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(gemm.n);
    if (inside.x) { product[at] = select(sums.x, product[at] + sums.x, add); }
    if (inside.y) { product[at + 1u] = select(sums.y, product[at + 1u] + sums.y, add); }
    if (inside.z) { product[at + 2u] = select(sums.z, product[at + 2u] + sums.z, add); }
    if (inside.w) { product[at + 3u] = select(sums.w, product[at + 3u] + sums.w, add); }
}

/// Workgroup per gemm_tile_rows() × gemm_tile_cols() tile of the product (per split of
/// k), the tile index folded into (x, y) as `workgroup_tile` walks it. Invocation (x, y)
/// owns row quads y, y + ROWS_WG, … and column quads x, x + CLASSES_WG, … of the tile.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let tile = workgroup_tile(wid, nwg);
    if (tile.w == 0u) { return; }
    let slice = k_slice(tile.x);
    let tile_m = tile.y;
    let tile_n = tile.z;
    var quad_rows: array<u32, ROW_QUADS>;
    var quad_cols: array<u32, COL_QUADS>;
    var at: OperandBases;
    at.lhs_k_stride = gemm.lhs_stride / 4u;
    at.rhs_k_stride = gemm.rhs_stride / 4u;
    for (var g = 0u; g < ROW_QUADS; g++) {
        quad_rows[g] = tile_m * gemm_tile_rows() + (g * ROWS_WG + lid.y) * 4u;
        at.lhs[g] = quad_bases(quad_rows[g], gemm.m, slice.lhs_offset, gemm.lhs_stride, LHS_ALONG_K);
    }
    for (var h = 0u; h < COL_QUADS; h++) {
        quad_cols[h] = tile_n * gemm_tile_cols() + (h * CLASSES_WG + lid.x) * 4u;
        at.rhs[h] = quad_bases(quad_cols[h], gemm.n, slice.rhs_offset, gemm.rhs_stride, RHS_ALONG_K);
    }
    var acc: GemmBlock;
    var run: GemmBlock;
    // k/4 iterations: llvmpipe stops an invocation after 65535 loop iterations in all;
    // plans cut longer k ranges into splits of at most MAX_GEMM_K.
    let full_steps = slice.k / 4u;
    let steps = (slice.k + 3u) / 4u;
    for (var kv = 0u; kv < full_steps; kv++) {
        gemm_step(&run, lhs_tile(at, lid.x, kv, 4u), at, kv, 4u);
        end_run(&acc, &run, kv, kv + 1u == steps);
    }
    if (slice.k % 4u != 0u) {
        gemm_step(&run, lhs_tile(at, lid.x, full_steps, slice.k % 4u), at, full_steps, slice.k % 4u);
        end_run(&acc, &run, full_steps, true);
    }
    for (var g = 0u; g < ROW_QUADS; g++) {
        for (var t = 0u; t < 4u; t++) {
            for (var h = 0u; h < COL_QUADS; h++) {
                store_quad(tile.x, quad_rows[g] + t, quad_cols[h], acc[g][t][h]);
            }
        }
    }
}

/// Quads of k one staged step covers (a K tile of 16).
const K_QUADS: u32 = 4u;
/// The lhs of a K tile of the workgroup's rows: (row quad, k quad) → the quad as
/// `operand_quad` loads it, index row_quad·K_QUADS + k_quad.
var<workgroup> lhs_stage: array<mat4x4<f32>, ROWS_WG * ROW_QUADS * K_QUADS>;
/// The rhs of a K tile of the workgroup's columns, index column_quad·K_QUADS + k_quad.
var<workgroup> rhs_stage: array<mat4x4<f32>, CLASSES_WG * COL_QUADS * K_QUADS>;

/// Entry e of a K tile's stage from k quad k0 of `slice` (quad e / K_QUADS of the
/// workgroup's rows for lhs or columns for rhs, k quad k0 + e % K_QUADS), as
/// `operand_quad` loads it.
fn staged_quad(from_lhs: bool, slice: KSlice, tile0: u32, e: u32, k0: u32) -> mat4x4<f32> {
    let first = tile0 + (e / K_QUADS) * 4u;
    let kv = k0 + e % K_QUADS;
    let k_valid = min(slice.k - 4u * kv, 4u);
    if (from_lhs) {
        let bases = quad_bases(first, gemm.m, slice.lhs_offset, gemm.lhs_stride, LHS_ALONG_K);
        return operand_quad(true, LHS_ALONG_K, bases, gemm.lhs_stride / 4u, kv, k_valid);
    }
    let bases = quad_bases(first, gemm.n, slice.rhs_offset, gemm.rhs_stride, RHS_ALONG_K);
    return operand_quad(false, RHS_ALONG_K, bases, gemm.rhs_stride / 4u, kv, k_valid);
}

/// `matmul` with the operands staged in workgroup memory a K tile at a time: each quad is
/// loaded once per workgroup instead of once per invocation that uses it, then every
/// invocation runs the same `block_product` steps over k, in the same order, as `matmul`.
/// For adapters whose storage loads are slow against workgroup memory (discrete GPUs).
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn matmul_staged(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(local_invocation_id) lid: vec3<u32>,
                 @builtin(local_invocation_index) flat: u32) {
    let tile = workgroup_tile(wid, nwg);
    if (tile.w == 0u) { return; }
    let slice = k_slice(tile.x);
    let row0 = tile.y * gemm_tile_rows();
    let col0 = tile.z * gemm_tile_cols();
    let invocations = ROWS_WG * CLASSES_WG;
    let steps = (slice.k + 3u) / 4u;
    var acc: GemmBlock;
    var run: GemmBlock;
    for (var k0 = 0u; k0 < steps; k0 += K_QUADS) {
        for (var e = flat; e < ROWS_WG * ROW_QUADS * K_QUADS; e += invocations) {
            if (k0 + e % K_QUADS < steps) { lhs_stage[e] = staged_quad(true, slice, row0, e, k0); }
        }
        for (var e = flat; e < CLASSES_WG * COL_QUADS * K_QUADS; e += invocations) {
            if (k0 + e % K_QUADS < steps) { rhs_stage[e] = staged_quad(false, slice, col0, e, k0); }
        }
        workgroupBarrier();
        for (var q = 0u; q < K_QUADS; q++) {
            if (k0 + q >= steps) { break; }
            var a: array<mat4x4<f32>, ROW_QUADS>;
            var b: array<mat4x4<f32>, COL_QUADS>;
            for (var g = 0u; g < ROW_QUADS; g++) { a[g] = lhs_stage[(g * ROWS_WG + lid.y) * K_QUADS + q]; }
            for (var h = 0u; h < COL_QUADS; h++) { b[h] = rhs_stage[(h * CLASSES_WG + lid.x) * K_QUADS + q]; }
            block_product(&run, a, b);
            end_run(&acc, &run, k0 + q, k0 + q + 1u == steps);
        }
        workgroupBarrier();
    }
    for (var g = 0u; g < ROW_QUADS; g++) {
        for (var t = 0u; t < 4u; t++) {
            for (var h = 0u; h < COL_QUADS; h++) {
                store_quad(tile.x, row0 + (g * ROWS_WG + lid.y) * 4u + t,
                           col0 + (h * CLASSES_WG + lid.x) * 4u, acc[g][t][h]);
            }
        }
    }
}

/// The second pass of a split-K product: each element of the product is its splits'
/// partial products added in split order onto the product (with `accumulate`) or onto
/// the first split's: the same additions in the same order as running the splits one
/// after another into the product, so that splitting changes no bit. One invocation per
/// element, the element index folded into (x, y).
@compute @workgroup_size(ROW_WG)
fn sum_splits(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(local_invocation_index) lid: u32) {
    let e = folded_index(wid, nwg, lid);
    let elements = gemm.m * gemm.n;
    if (e >= elements) { return; }
    let row = e / gemm.n;
    let at = gemm.product_offset + row * gemm.product_stride + (e - row * gemm.n);
    var sum = split_products[e];
    if (gemm.accumulate == 1u) { sum = product[at] + sum; }
    for (var split = 1u; split < gemm.splits; split++) {
        sum += split_products[split * elements + e];
    }
    product[at] = sum;
}
