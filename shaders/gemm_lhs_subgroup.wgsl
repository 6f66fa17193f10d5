// The lhs block of a `matmul` step (gemm.wgsl), shared by a subgroup: for adapters whose
// subgroups are exactly 8 invocations (llvmpipe) with CLASSES_WG = 8, so that a subgroup
// is one row of the workgroup, lane = local_invocation_id.x, and its 8 invocations own the
// same row quads. The block is 8 vec4s (two quads of four rows, or of four k); each lane
// loads one and subgroupBroadcast hands them round: one load where there were eight.

const_assert ROW_QUADS == 2u;

/// lhs for the invocation's row quads and k = 4·kv .. 4·kv + 3 (zero past k_valid), one
/// matrix per quad whose column t is row t of the quad over the four k. Lane l loads
/// vec4 i = l % 4 of quad g = l / 4: row i along k, or k-row i across k.
fn lhs_tile(at: OperandBases, lane: u32, kv: u32, k_valid: u32) -> array<mat4x4<f32>, ROW_QUADS> {
    let bases = select(at.lhs[0], at.lhs[1], lane >= 4u);
    let i = lane % 4u;
    var mine: vec4<f32>;
    if (LHS_ALONG_K) {
        mine = select(vec4<f32>(), lhs[bases[i] + kv], k_mask(k_valid));
    } else {
        let at_k = bases[0] + (4u * kv + k_offset(i, k_valid)) * at.lhs_k_stride;
        mine = select(vec4<f32>(), lhs[at_k], i < k_valid);
    }
    var a = array<mat4x4<f32>, ROW_QUADS>(
        mat4x4<f32>(subgroupBroadcast(mine, 0u), subgroupBroadcast(mine, 1u),
                    subgroupBroadcast(mine, 2u), subgroupBroadcast(mine, 3u)),
        mat4x4<f32>(subgroupBroadcast(mine, 4u), subgroupBroadcast(mine, 5u),
                    subgroupBroadcast(mine, 6u), subgroupBroadcast(mine, 7u)),
    );
    if (!LHS_ALONG_K) {
        for (var g = 0u; g < ROW_QUADS; g++) { a[g] = transpose(a[g]); }
    }
    return a;
}
