// Plain GEMM, product (+)= lhs · rhs, with strided, offset operands and an optional
// per-k scale of rhs, so that one kernel serves every layout: the benchmark's floor x·wᵀ,
// the unfused baseline's cosine matrix and gradient GEMMs, and the chunked plan's
// gx̂ = G·(inv_w ⊙ w) and gŵ += Gᵀ·(inv_x ⊙ x). Same tile shape and register blocking as
// the fused cosine tiles.
//
//   product[p + m·n + n'] (+)= Σ_k lhs[l + m·lhs_stride_m + k·lhs_stride_k]
//                               · rhs[r + k·rhs_stride_k + n'·rhs_stride_n] · (k_scale[s + k])

/// Sizes, strides and offsets (in elements) of one GEMM. Mirrors `GemmShape` in Rust.
struct GemmShape {
    /// Rows of the product.
    m: u32,
    /// Columns of the product.
    n: u32,
    /// Length of each dot product.
    k: u32,
    lhs_stride_m: u32,
    lhs_stride_k: u32,
    rhs_stride_k: u32,
    rhs_stride_n: u32,
    lhs_offset: u32,
    rhs_offset: u32,
    product_offset: u32,
    /// 1: add into the product (a later k-piece or row chunk); 0: overwrite it.
    accumulate: u32,
    /// 1: multiply rhs row k by k_scale[k_scale_offset + k]; 0: no scale.
    scale_rhs_rows: u32,
    k_scale_offset: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

/// Sizes, strides and offsets of this GEMM.
@group(0) @binding(20) var<uniform> gemm: GemmShape;
/// Left operand.
@group(0) @binding(21) var<storage, read> lhs: array<f32>;
/// Right operand.
@group(0) @binding(22) var<storage, read> rhs: array<f32>;
/// The m×n product, row-major from product_offset; every element is written.
@group(0) @binding(23) var<storage, read_write> product: array<f32>;
/// Per-k scale of rhs (inverse norms); bound to rhs itself when unused.
@group(0) @binding(24) var<storage, read> k_scale: array<f32>;

/// acc += lhs[rows, k] ⊗ (rhs[k, columns]·scale_k), for rows and columns starting at
/// the given element offsets.
fn gemm_step(acc: ptr<function, Block>, lhs_base: array<u32, ROW_BLOCK>,
             rhs_base: array<u32, CLASS_BLOCK>, k: u32) {
    var a: array<f32, ROW_BLOCK>;
    var b: array<f32, CLASS_BLOCK>;
    let scale = select(1.0, k_scale[gemm.k_scale_offset + k], gemm.scale_rhs_rows == 1u);
    for (var r = 0u; r < ROW_BLOCK; r++) { a[r] = lhs[lhs_base[r] + k * gemm.lhs_stride_k]; }
    for (var q = 0u; q < CLASS_BLOCK; q++) { b[q] = rhs[rhs_base[q] + k * gemm.rhs_stride_k] * scale; }
    for (var r = 0u; r < ROW_BLOCK; r++) {
        for (var q = 0u; q < CLASS_BLOCK; q++) {
            (*acc)[r][q] = fma(a[r], b[q], (*acc)[r][q]);
        }
    }
}

/// Workgroup per (ROWS_WG·ROW_BLOCK)×(CLASSES_WG·CLASS_BLOCK) tile of the product, the
/// tile index folded into (x, y) and walked along n first.
@compute @workgroup_size(CLASSES_WG, ROWS_WG)
fn matmul(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
          @builtin(local_invocation_id) lid: vec3<u32>) {
    let tiles_n = (gemm.n + tile_classes() - 1u) / tile_classes();
    let tile = wid.x + wid.y * nwg.x;
    let tile_m = tile / tiles_n;
    if (tile_m * tile_rows() >= gemm.m) { return; }
    let row0 = tile_m * tile_rows() + lid.y;
    let col0 = (tile - tile_m * tiles_n) * tile_classes() + lid.x;
    var lhs_base: array<u32, ROW_BLOCK>;
    var rhs_base: array<u32, CLASS_BLOCK>;
    for (var r = 0u; r < ROW_BLOCK; r++) {
        lhs_base[r] = gemm.lhs_offset + min(row0 + r * ROWS_WG, gemm.m - 1u) * gemm.lhs_stride_m;
    }
    for (var q = 0u; q < CLASS_BLOCK; q++) {
        rhs_base[q] = gemm.rhs_offset + min(col0 + q * CLASSES_WG, gemm.n - 1u) * gemm.rhs_stride_n;
    }
    var acc: Block;
    // Four k per iteration: llvmpipe stops an invocation after 65535 loop iterations in
    // all; plans cut longer k ranges into accumulated pieces.
    var k = 0u;
    for (; k + 4u <= gemm.k; k += 4u) {
        gemm_step(&acc, lhs_base, rhs_base, k);
        gemm_step(&acc, lhs_base, rhs_base, k + 1u);
        gemm_step(&acc, lhs_base, rhs_base, k + 2u);
        gemm_step(&acc, lhs_base, rhs_base, k + 3u);
    }
    for (; k < gemm.k; k++) {
        gemm_step(&acc, lhs_base, rhs_base, k);
    }
    for (var r = 0u; r < ROW_BLOCK; r++) {
        let row = row0 + r * ROWS_WG;
        for (var q = 0u; q < CLASS_BLOCK; q++) {
            let col = col0 + q * CLASSES_WG;
            if (row < gemm.m && col < gemm.n) {
                let at = gemm.product_offset + row * gemm.n + col;
                product[at] = select(acc[r][q], product[at] + acc[r][q], gemm.accumulate == 1u);
            }
        }
    }
}
