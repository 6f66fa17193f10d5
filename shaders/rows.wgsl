// Rows cut into pieces of DIM_PIECE values, and the stacked rows [x; w chunk]: shared by
// the norms pass and the backward projections (prepended to norms.wgsl and backward.wgsl,
// after common.wgsl). Reads `params.dim` and `params.norm_feature_rows` of the family's
// uniform.

/// Values of a row that one invocation of a per-row pass (`pad_rows`, the projections)
/// covers: longer rows are cut into pieces, one invocation each, so that no invocation
/// runs past llvmpipe's loop budget (see `plan.rs`). Set from `kernels::DIM_PIECE`.
override DIM_PIECE: u32 = 4096u;
/// Pieces of DIM_PIECE values in a row of D.
fn dim_pieces() -> u32 { return (params.dim + DIM_PIECE - 1u) / DIM_PIECE; }
/// The stacked row and the piece of flat index e over `rows` stacked rows, piece-major:
/// (row, first value of the piece, end of the piece).
fn row_piece(e: u32, rows: u32) -> vec3<u32> {
    let piece = e / rows;
    let first = piece * DIM_PIECE;
    return vec3<u32>(e - piece * rows, first, min(first + DIM_PIECE, params.dim));
}
/// Stacked row r of [x; w chunk] as (1 for a row of x else 0, the row within x or the
/// chunk). x takes part only where norm_feature_rows = B (the first chunk).
fn stacked_row(r: u32) -> vec2<u32> {
    let split = params.norm_feature_rows;
    return select(vec2<u32>(0u, r - split), vec2<u32>(1u, r), r < split);
}
/// D rounded up to a multiple of 4: the row length of x and w as the GEMMs read them.
fn padded_dim() -> u32 { return (params.dim + 3u) & ~3u; }
