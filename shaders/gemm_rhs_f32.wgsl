// The rhs of a `matmul` (gemm.wgsl) stored in f32: four consecutive elements of its
// contiguous axis per entry.

/// Right operand, one quad of its contiguous axis per entry.
@group(0) @binding(22) var<storage, read> rhs: array<vec4<f32>>;

/// Quad `at` of the rhs (elements 4·at .. 4·at + 3 of its buffer).
fn rhs_quad(at: u32) -> vec4<f32> {
    return rhs[at];
}
