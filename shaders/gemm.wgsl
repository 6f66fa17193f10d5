// Plain GEMM, product = lhs · rhs, with strided operands so that one kernel serves every
// layout: the benchmark's floor x·wᵀ, and the unfused baseline's cosine matrix and its
// two gradient GEMMs. Same tile shape and register blocking as the fused cosine tiles.
//
//   product[m, n] = Σ_k lhs[m·lhs_stride_m + k·lhs_stride_k] · rhs[k·rhs_stride_k + n·rhs_stride_n]

/// Sizes and strides of one GEMM. Mirrors `GemmShape` in Rust.
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
    _pad: u32,
}

/// Sizes and strides of this GEMM.
@group(0) @binding(20) var<uniform> gemm: GemmShape;
/// Left operand, read through lhs_stride_m and lhs_stride_k.
@group(0) @binding(21) var<storage, read> lhs: array<f32>;
/// Right operand, read through rhs_stride_k and rhs_stride_n.
@group(0) @binding(22) var<storage, read> rhs: array<f32>;
/// The m×n product, row-major; every element is overwritten.
@group(0) @binding(23) var<storage, read_write> product: array<f32>;

/// acc += lhs[rows, k] ⊗ rhs[k, columns], for rows and columns starting at the given
/// element offsets.
fn gemm_step(acc: ptr<function, Block>, lhs_base: array<u32, ROW_BLOCK>,
             rhs_base: array<u32, CLASS_BLOCK>, k: u32) {
    var a: array<f32, ROW_BLOCK>;
    var b: array<f32, CLASS_BLOCK>;
    for (var r = 0u; r < ROW_BLOCK; r++) { a[r] = lhs[lhs_base[r] + k * gemm.lhs_stride_k]; }
    for (var q = 0u; q < CLASS_BLOCK; q++) { b[q] = rhs[rhs_base[q] + k * gemm.rhs_stride_k]; }
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
        lhs_base[r] = min(row0 + r * ROWS_WG, gemm.m - 1u) * gemm.lhs_stride_m;
    }
    for (var q = 0u; q < CLASS_BLOCK; q++) {
        rhs_base[q] = min(col0 + q * CLASSES_WG, gemm.n - 1u) * gemm.rhs_stride_n;
    }
    var acc: Block;
    // Four k per iteration: llvmpipe stops an invocation after 65535 loop iterations in
    // all, and k runs to C or B in the unfused gradient GEMMs.
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
                product[row * gemm.n + col] = acc[r][q];
            }
        }
    }
}
