// Plain GEMM, product (+)= lhs · rhs, on vec4 loads, with strided, offset operands and an
// optional per-k scale of rhs, so that one kernel serves every product of the loss: the
// benchmark's floor x·wᵀ, the unfused baseline's cosine matrix and gradient GEMMs, and
// the chunked plan's raw dots x·wᵀ, gx̂ = G·(inv_w ⊙ w) and gŵ += Gᵀ·(inv_x ⊙ x).
//
// Each operand is stored with one axis contiguous, chosen per pipeline by an override:
//
//   lhs[m, k] = lhs_data[lhs_offset + m·lhs_stride + k]   (LHS_ALONG_K)
//             = lhs_data[lhs_offset + k·lhs_stride + m]   (otherwise: along m)
//   rhs[k, n] = rhs_data[rhs_offset + n·rhs_stride + k]   (RHS_ALONG_K)
//             = rhs_data[rhs_offset + k·rhs_stride + n]   (otherwise: along n)
//   product[m, n] (+)= Σ_k lhs[m, k] · rhs[k, n] · (k_scale[k_scale_offset + k])
//
// Offsets and strides are multiples of 4 (plans pad rows to a multiple of 4), so each
// load takes four consecutive elements along the contiguous axis as one vec4. An
// invocation owns an (4·ROW_QUADS)×(4·COL_QUADS) block held in registers: on llvmpipe
// every load costs a loop over the SIMD lanes, and this block does 16·ROW_QUADS·COL_QUADS
// multiply-adds per 4·(ROW_QUADS + COL_QUADS) loaded vec4s. No workgroup memory.

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
    /// 1: multiply rhs row k by k_scale[k_scale_offset + k]; 0: no scale.
    scale_rhs_rows: u32,
    k_scale_offset: u32,
}

/// Sizes, strides and offsets of this GEMM.
@group(0) @binding(20) var<uniform> gemm: GemmShape;
/// Left operand, four consecutive elements of its contiguous axis per entry.
@group(0) @binding(21) var<storage, read> lhs: array<vec4<f32>>;
/// Right operand, four consecutive elements of its contiguous axis per entry.
@group(0) @binding(22) var<storage, read> rhs: array<vec4<f32>>;
/// The m×n product, rows product_stride apart from product_offset; every element of it
/// is written and nothing else.
@group(0) @binding(23) var<storage, read_write> product: array<f32>;
/// Per-k scale of rhs (inverse norms); bound to any f32 buffer and not read when unused.
@group(0) @binding(24) var<storage, read> k_scale: array<f32>;

/// true: lhs is contiguous along k (rows of x, or of G for gx̂); false: along m (G read
/// as Gᵀ for gŵ).
override LHS_ALONG_K: bool = true;
/// true: rhs is contiguous along k (rows of w for x·wᵀ); false: along n (w for gx̂, x for gŵ).
override RHS_ALONG_K: bool = true;

/// Quads of four product rows, and of four product columns, per invocation.
const ROW_QUADS: u32 = 2u;
const COL_QUADS: u32 = 2u;

/// Rows and columns of the product one workgroup covers.
fn gemm_tile_rows() -> u32 { return ROWS_WG * 4u * ROW_QUADS; }
fn gemm_tile_cols() -> u32 { return CLASSES_WG * 4u * COL_QUADS; }

/// One invocation's accumulators: row 4g + t of its block, columns of quad h.
alias GemmBlock = array<array<vec4<f32>, COL_QUADS>, 4u * ROW_QUADS>;

/// k + kk where kk < k_valid, else k (a valid k whose values are then masked to 0). Once
/// inlined with k_valid = 4 this folds to k + kk.
fn k_index(k: u32, kk: u32, k_valid: u32) -> u32 {
    return select(k, k + kk, kk < k_valid);
}

/// 1 for the first k_valid of four consecutive k, else 0.
fn k_mask(k_valid: u32) -> vec4<bool> {
    return vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(k_valid);
}

/// lhs for rows quad_row..quad_row + 3 and k..k + 3, as a matrix whose column t is row
/// quad_row + t over the four k (zero past k_valid). Rows past m read row m − 1 (or the
/// last quad); their products are never stored.
fn lhs_quad(quad_row: u32, k: u32, k_valid: u32) -> mat4x4<f32> {
    let mask = k_mask(k_valid);
    var cols: array<vec4<f32>, 4>;
    if (LHS_ALONG_K) {
        for (var t = 0u; t < 4u; t++) {
            let row = min(quad_row + t, gemm.m - 1u);
            cols[t] = select(vec4<f32>(), lhs[(gemm.lhs_offset + row * gemm.lhs_stride + k) / 4u], mask);
        }
        return mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]);
    }
    let quad = min(quad_row, (gemm.m - 1u) & ~3u);
    for (var kk = 0u; kk < 4u; kk++) {
        let at = gemm.lhs_offset + k_index(k, kk, k_valid) * gemm.lhs_stride + quad;
        cols[kk] = select(vec4<f32>(), lhs[at / 4u], mask[kk]);
    }
    return transpose(mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]));
}

/// rhs (times the k scale) for k..k + 3 and columns quad_col..quad_col + 3, as a matrix
/// whose column t is column quad_col + t over the four k (zero past k_valid). Columns
/// past n read column n − 1 (or the last quad); their products are never stored.
fn rhs_quad(quad_col: u32, k: u32, k_valid: u32) -> mat4x4<f32> {
    let mask = k_mask(k_valid);
    var cols: array<vec4<f32>, 4>;
    var quad: mat4x4<f32>;
    if (RHS_ALONG_K) {
        for (var t = 0u; t < 4u; t++) {
            let col = min(quad_col + t, gemm.n - 1u);
            cols[t] = select(vec4<f32>(), rhs[(gemm.rhs_offset + col * gemm.rhs_stride + k) / 4u], mask);
        }
        quad = mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]);
    } else {
        let first = min(quad_col, (gemm.n - 1u) & ~3u);
        for (var kk = 0u; kk < 4u; kk++) {
            let at = gemm.rhs_offset + k_index(k, kk, k_valid) * gemm.rhs_stride + first;
            cols[kk] = select(vec4<f32>(), rhs[at / 4u], mask[kk]);
        }
        quad = transpose(mat4x4<f32>(cols[0], cols[1], cols[2], cols[3]));
    }
    if (gemm.scale_rhs_rows == 1u) {
        var scale: vec4<f32>;
        for (var kk = 0u; kk < 4u; kk++) {
            scale[kk] = select(0.0, k_scale[gemm.k_scale_offset + k_index(k, kk, k_valid)], mask[kk]);
        }
        for (var t = 0u; t < 4u; t++) { quad[t] *= scale; }
    }
    return quad;
}

/// acc += lhs[block rows, k..k + k_valid] · rhs[k..k + k_valid, block columns].
fn gemm_step(acc: ptr<function, GemmBlock>, quad_rows: array<u32, ROW_QUADS>,
             quad_cols: array<u32, COL_QUADS>, k: u32, k_valid: u32) {
    var b: array<mat4x4<f32>, COL_QUADS>;
    for (var h = 0u; h < COL_QUADS; h++) { b[h] = rhs_quad(quad_cols[h], k, k_valid); }
    for (var g = 0u; g < ROW_QUADS; g++) {
        let a = lhs_quad(quad_rows[g], k, k_valid);
        for (var t = 0u; t < 4u; t++) {
            for (var h = 0u; h < COL_QUADS; h++) {
                // Row vector times matrix: the four dot products of row t with the columns.
                (*acc)[4u * g + t][h] += a[t] * b[h];
            }
        }
    }
}

/// Workgroup per gemm_tile_rows() × gemm_tile_cols() tile of the product, the tile index
/// folded into (x, y) and walked along n first. Invocation (x, y) owns row quads
/// y, y + ROWS_WG, … and column quads x, x + CLASSES_WG, … of the tile.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let tiles_n = (gemm.n + gemm_tile_cols() - 1u) / gemm_tile_cols();
    let tile = wid.x + wid.y * nwg.x;
    let tile_m = tile / tiles_n;
    if (tile_m * gemm_tile_rows() >= gemm.m) { return; }
    let tile_n = tile - tile_m * tiles_n;
    var quad_rows: array<u32, ROW_QUADS>;
    var quad_cols: array<u32, COL_QUADS>;
    for (var g = 0u; g < ROW_QUADS; g++) {
        quad_rows[g] = tile_m * gemm_tile_rows() + (g * ROWS_WG + lid.y) * 4u;
    }
    for (var h = 0u; h < COL_QUADS; h++) {
        quad_cols[h] = tile_n * gemm_tile_cols() + (h * CLASSES_WG + lid.x) * 4u;
    }
    var acc: GemmBlock;
    // k/4 iterations: llvmpipe stops an invocation after 65535 loop iterations in all;
    // plans cut longer k ranges into accumulated pieces.
    var k = 0u;
    for (; k + 4u <= gemm.k; k += 4u) {
        gemm_step(&acc, quad_rows, quad_cols, k, 4u);
    }
    if (k < gemm.k) {
        gemm_step(&acc, quad_rows, quad_cols, k, gemm.k - k);
    }
    for (var g = 0u; g < ROW_QUADS; g++) {
        for (var t = 0u; t < 4u; t++) {
            let row = quad_rows[g] + t;
            for (var h = 0u; h < COL_QUADS; h++) {
                for (var c = 0u; c < 4u; c++) {
                    let col = quad_cols[h] + c;
                    if (row < gemm.m && col < gemm.n) {
                        let at = gemm.product_offset + row * gemm.product_stride + col;
                        let sum = acc[4u * g + t][h][c];
                        product[at] = select(sum, product[at] + sum, gemm.accumulate == 1u);
                    }
                }
            }
        }
    }
}
