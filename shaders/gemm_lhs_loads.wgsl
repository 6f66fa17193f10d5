// The lhs block of a `matmul` step (gemm.wgsl), loaded by each invocation on its own:
// 4·ROW_QUADS vec4 loads. For adapters without fixed 8-wide subgroups.

/// lhs for the invocation's row quads and k = 4·kv .. 4·kv + 3 (zero past k_valid), one
/// matrix per quad whose column t is row t of the quad over the four k. `lane` is unused
/// here (gemm_lhs_subgroup.wgsl shares the loads by it).
fn lhs_tile(at: OperandBases, lane: u32, kv: u32, k_valid: u32) -> array<mat4x4<f32>, ROW_QUADS> {
    var a: array<mat4x4<f32>, ROW_QUADS>;
    for (var g = 0u; g < ROW_QUADS; g++) {
        a[g] = operand_quad(true, LHS_ALONG_K, at.lhs[g], at.lhs_k_stride, kv, k_valid);
    }
    return a;
}
