// The rhs of a `matmul` (gemm.wgsl) stored in 16 bits: w in f16 or bf16 (the override
// RHS_ELEMENT, common.wgsl's ELEMENT_*), two words per quad of its contiguous axis,
// each value widened to f32 as it is loaded.

/// Right operand, one quad of 16-bit values (two words) per entry.
@group(0) @binding(22) var<storage, read> rhs: array<vec2<u32>>;
/// The storage type of the rhs: ELEMENT_F16 or ELEMENT_BF16.
override RHS_ELEMENT: u32 = ELEMENT_F16;

/// Quad `at` of the rhs (elements 4·at .. 4·at + 3 of its buffer), as f32.
fn rhs_quad(at: u32) -> vec4<f32> {
    let words = rhs[at];
    return half_quad(words.x, words.y, RHS_ELEMENT);
}
