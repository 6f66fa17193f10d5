//! How a plan cuts a shape: class chunks or blocks, row chunks, the GEMMs and their
//! k-pieces, the workspace each needs, and the limits (llvmpipe's loop budget among them)
//! that bound them.

use super::Algorithm;
use crate::context::Context;
use crate::error::{Error, Result};
use crate::io::{ElementType, Shape};
use crate::kernels::{
    padded, run_quads, Binding, GemmLayout, GemmShape, DIM_PIECE, FAMILY_UNIFORM_BYTES, GEMM_QUADS,
};
/// One chunk of the class matrix: the classes one binding of w covers, or, for a plan
/// in blocks, one block of classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Chunk {
    pub(super) class_offset: u32,
    pub(super) classes: u32,
}

/// How a shape is cut: class chunks (or blocks) and row chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Geometry {
    pub(super) chunks: Vec<Chunk>,
    /// Row ranges [begin, end) of the row chunks of the materialised logits, in row order.
    pub(super) row_passes: Vec<(u32, u32)>,
    /// Chunked plan: the logits hold one class chunk (a block) at a time, not all C; the
    /// forward merges a partial per row over the blocks and the backward recomputes each
    /// block's dots.
    pub(super) blocked: bool,
    /// Elements between rows of the materialised logits.
    pub(super) logit_stride: u32,
}

/// How the chunked plan cuts a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cut {
    /// As fast as the budget allows: whole rows where they fit, else the widest blocks.
    Budget,
    /// Blocks even where whole rows fit, all rows at once where they fit (a class shard:
    /// its forward leaves partials, and its dots last until its backward).
    Shard,
    /// The smallest workspace at GEMM granularity (the memory-minimal plan): at most
    /// BLOCK_ROWS rows, and the block that balances G against the per-block uniforms.
    Smallest,
}

/// Loop iterations one invocation may run, counted over all its loops. llvmpipe, the
/// software rasteriser behind lavapipe, ends an invocation after 65535 of them
/// (LP_MAX_TGSI_LOOP_ITERATIONS) and carries on with wrong results; on llvmpipe, plans
/// keep every invocation under half of that by cutting the classes of a row into blocks
/// (the softmax rows) and refusing D past the norms pass. Other drivers have no such
/// limit, and there these cuts do not apply ([`LoopLimits::of`], the one place that
/// decides). The GEMM's k-pieces and the rows' D-pieces apply everywhere: they also bound
/// each dispatch's work and the long sums' rounding.
pub(super) const LOOP_BUDGET: u64 = 32768;
/// llvmpipe's own limit, for the one pass whose iterations are counted exactly rather
/// than estimated: the norms, D/4 vec4 steps for the largest magnitude, D/4 for the sum of
/// squares and at most 12 scalar steps at the ends, in no branch (so not doubled by
/// divergence), with 1024 of slack.
pub(super) const LOOP_LIMIT: u64 = 65535 - 1024;

/// The loop limits a context's plans keep to: llvmpipe's, or none.
#[derive(Debug, Clone, Copy)]
pub(super) struct LoopLimits {
    /// Estimated iterations per invocation (LOOP_BUDGET).
    pub(super) budget: u64,
    /// Exactly counted iterations per invocation (LOOP_LIMIT).
    pub(super) exact: u64,
}

impl LoopLimits {
    /// llvmpipe's limits where the adapter is llvmpipe (by its name or driver), else none.
    pub(super) fn of(ctx: &Context) -> LoopLimits {
        let info = &ctx.info;
        if info.name.contains("llvmpipe") || info.driver.contains("llvmpipe") {
            LoopLimits {
                budget: LOOP_BUDGET,
                exact: LOOP_LIMIT,
            }
        } else {
            LoopLimits {
                budget: u64::MAX,
                exact: u64::MAX,
            }
        }
    }
}

/// Loop iterations of one invocation of `row_inv_norms` for rows of `dim` values.
pub(super) fn norm_iterations(dim: u64) -> u64 {
    dim.div_ceil(2) + 12
}

/// Pieces of DIM_PIECE values in a row of `dim`: one invocation each in `pad_rows` and
/// the projections, whose loops then stay within LOOP_BUDGET for any D (at most
/// 4·DIM_PIECE steps: a piece's dot and its write, over both of the projection's
/// branches, plus one per piece to merge the dots).
pub(super) fn dim_pieces(dim: u64) -> u64 {
    dim.div_ceil(u64::from(DIM_PIECE)).max(1)
}
/// Bytes of one `SplitPartial` in `shaders/forward.wgsl`.
pub(super) const SPLIT_PARTIAL_BYTES: u64 = 28;
/// Bytes of one `RowSoftmax` in `shaders/common.wgsl`.
pub(super) const ROW_SOFTMAX_BYTES: u64 = 20;
pub(super) const FLAGS_BYTES: u64 = 4;
pub(super) const GEMM_SHAPE_BYTES: u64 = std::mem::size_of::<GemmShape>() as u64;

/// The product of byte counts, saturating: sizes past u64 compare as too large instead of
/// wrapping.
pub(super) fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

pub(super) fn to_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what,
        size: n as u64,
        limit: u64::from(u32::MAX),
    })
}

pub(super) fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Geometry {
    /// The geometry of `algorithm` for `shape` within `budget` bytes of workspace (the
    /// chunked plan is held to it; the memory-minimal plan and the unfused baseline do not
    /// depend on it). With `shard`, the chunked plan cuts as for a class shard.
    pub(super) fn new(
        ctx: &Context,
        shape: Shape,
        algorithm: Algorithm,
        budget: u64,
        shard: bool,
    ) -> Result<Geometry> {
        let cut = match algorithm {
            Algorithm::MemoryMinimal => Cut::Smallest,
            _ if shard => Cut::Shard,
            _ => Cut::Budget,
        };
        let engine = algorithm.engine();
        if engine != Algorithm::Chunked || cut == Cut::Smallest {
            return Geometry::select(ctx, shape, engine, budget, cut);
        }
        // The chunked plan sizes G from estimates of the rest of its workspace (uniforms
        // above all); it is then held to the budget by its exact bytes, shrinking G's
        // share until they fit.
        let mut target = budget;
        let mut smallest = u64::MAX;
        for _ in 0..16 {
            let g = match Geometry::select(ctx, shape, engine, target, cut) {
                Ok(g) => g,
                Err(e) if target == budget => return Err(e),
                Err(_) => break,
            };
            // The f32 shadow of 16-bit gradients is the outputs' size, whatever the cut:
            // reported with the workspace, but not held to the budget, which bounds G.
            let total = total_bytes(ctx, shape, &g, engine) - gradient_shadow_bytes(shape, &g);
            if total <= budget {
                return Ok(g);
            }
            smallest = smallest.min(total);
            // At least one row of G (or of a block) less, so that each try changes G.
            target =
                target.saturating_sub((total - budget + 4096).max(4 * u64::from(g.logit_stride)));
        }
        Err(Error::TooLarge {
            what: "the chunked plan's workspace (set a larger ContextOptions::workspace_budget)",
            size: smallest,
            limit: budget,
        })
    }

    /// The geometry for a budget of `budget` bytes, from estimates of what is not G:
    /// class chunks of at most `ctx.max_binding` bytes of w, each starting at a class
    /// whose byte offsets meet the storage offset alignment; for the chunked plan, its row
    /// chunks and blocks as `cut` asks.
    pub(super) fn select(
        ctx: &Context,
        shape: Shape,
        algorithm: Algorithm,
        budget: u64,
        cut: Cut,
    ) -> Result<Geometry> {
        shape.check_nonempty()?;
        let batch = to_u32("batch", shape.batch)?;
        let classes = to_u32("classes", shape.classes)?;
        to_u32("dim", shape.dim)?;
        let loops = LoopLimits::of(ctx);
        if norm_iterations(shape.dim as u64) > loops.exact {
            return Err(Error::TooLarge {
                what: "D, the values of one row (the norms pass of one invocation per row stays within llvmpipe's loop budget up to this D)",
                size: shape.dim as u64,
                limit: (loops.exact - 12) * 2,
            });
        }
        let d = shape.dim as u64;
        let quantum = class_quantum(ctx, shape);
        let mut chunk_classes = class_chunk_classes(ctx, shape, algorithm, loops, quantum)?;
        let mut row_passes = vec![(0, batch)];
        // The padded copies are bound whole: they must fit one binding.
        let copies = product(&[4, u64::from(batch), padded(d)]);
        if copies > ctx.max_binding {
            return Err(Error::TooLarge {
                what:
                    "the copy of x̂ in rows of D rounded up to 4 (B·⌈D/4⌉·16 bytes in one binding)",
                size: copies,
                limit: ctx.max_binding,
            });
        }
        let mut blocked = false;
        if algorithm == Algorithm::Chunked {
            let (rows, block) = chunked_rows_and_block(ctx, shape, budget, cut, quantum, loops)?;
            if let Some(block) = block {
                chunk_classes = chunk_classes.min(block.min(u64::from(classes)) as u32);
                blocked = true;
            }
            row_passes = row_passes_of(batch, classes, rows, budget)?;
        }
        let chunks = (0..classes)
            .step_by(chunk_classes as usize)
            .map(|class_offset| Chunk {
                class_offset,
                classes: chunk_classes.min(classes - class_offset),
            })
            .collect();
        let logit_stride = padded(u64::from(if blocked { chunk_classes } else { classes })) as u32;
        Ok(Geometry {
            chunks,
            row_passes,
            blocked,
            logit_stride,
        })
    }

    /// Classes of the largest class chunk (the first).
    pub(super) fn largest_chunk(&self) -> u64 {
        self.chunks
            .iter()
            .map(|k| u64::from(k.classes))
            .max()
            .unwrap_or(0)
    }

    /// Family uniform slots: the norms' and the backward's per chunk, the forward's per
    /// (chunk, row pass).
    pub(super) fn uniforms(&self) -> usize {
        self.chunks.len() * (2 + self.row_passes.len()) + usize::from(self.blocked)
    }

    /// Rows of the largest row pass.
    pub(super) fn max_pass_rows(&self) -> u64 {
        self.row_passes
            .iter()
            .map(|&(a, b)| u64::from(b - a))
            .max()
            .unwrap_or(0)
    }
}

/// The classes every chunk start is a multiple of: byte offsets stay aligned for w, its
/// gradient and the per-class norms, and chunks hold whole class lanes' quads.
fn class_quantum(ctx: &Context, shape: Shape) -> u64 {
    let d = shape.dim as u64;
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment).max(4);
    let tile = u64::from(ctx.tiles.tile_classes());
    let lcm = |a: u64, b: u64| a * b / gcd(a, b);
    // Rows of w and dL/dw in their storage types, and in f32 (the workspace gradient).
    let e = shape.elements;
    let by_row = [4, e.classes.bytes(), e.grad_classes.bytes()]
        .iter()
        .map(|bytes| align / gcd(align, d * bytes))
        .fold(1, lcm);
    let by_padded_row = align / gcd(align, 4 * padded(d));
    let by_norm = align / 4;
    lcm(lcm(lcm(by_row, by_padded_row), by_norm), tile)
}

/// Classes of a class chunk before any cut into blocks: all of them for the unfused
/// baseline (whose softmax rows must stay within the loop budget), else as many whole
/// quanta as one binding of w holds.
fn class_chunk_classes(
    ctx: &Context,
    shape: Shape,
    algorithm: Algorithm,
    loops: LoopLimits,
    quantum: u64,
) -> Result<u32> {
    let classes = shape.classes as u32;
    let d = shape.dim as u64;
    // A row's softmax runs over its classes in CLASSES_WG lanes, a quad of classes per
    // loop iteration (twice in the chunked plan: statistics, then G'), within
    // LOOP_BUDGET: past it the chunked plan takes the classes in blocks.
    let lanes = u64::from(ctx.tiles.classes_per_workgroup);
    if algorithm == Algorithm::Unfused {
        let loop_columns = loops.budget.saturating_mul(4 * lanes);
        if u64::from(classes) > loop_columns {
            return Err(Error::TooLarge {
                what:
                    "classes of one row of the unfused baseline's softmax (llvmpipe's loop budget)",
                size: u64::from(classes),
                limit: loop_columns,
            });
        }
        return Ok(classes);
    }
    // The chunked plan runs GEMMs only: one binding of w per chunk.
    // (the copy of w, where made, has rows of D rounded up to 4).
    let fit = ctx.max_binding / (4 * padded(d)) / quantum * quantum;
    if fit == 0 {
        return Err(Error::TooLarge {
            what: "one chunk of class vectors (the alignment quantum of classes × D·4 bytes)",
            size: quantum * d * 4,
            limit: ctx.max_binding,
        });
    }
    Ok(fit.min(u64::from(classes)) as u32)
}

/// The chunked plan's rows per row chunk of G, and its block of classes where it takes
/// the classes in blocks (None for whole rows).
fn chunked_rows_and_block(
    ctx: &Context,
    shape: Shape,
    budget: u64,
    cut: Cut,
    quantum: u64,
    loops: LoopLimits,
) -> Result<(u64, Option<u64>)> {
    let (b, classes, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
    // Row chunks of G: as many rows as the budget holds, at most 65536 (the loop
    // budget of the dL/dw GEMM, whose k runs over the chunk's rows).
    // The rest of the workspace (norms, flags, softmax rows, partials, the padded
    // copies) comes out of the budget first, and for whole rows 64 KiB for the
    // uniforms.
    // w's copy, where made, holds all classes for whole rows, one block for blocks.
    let copy_per_class = if copies_classes(shape, Algorithm::Chunked) {
        4 * padded(d)
    } else {
        0
    };
    let rest_base = 4 * (b + classes)
        + product(&[4, b, padded(d)])
        + FLAGS_BYTES
        + product(&[ROW_SOFTMAX_BYTES + SPLIT_PARTIAL_BYTES, b]);
    let rest = rest_base + copy_per_class * classes;
    // G's rows also fit one storage binding.
    let room = budget
        .saturating_sub(rest + (64 << 10))
        .min(ctx.max_binding);
    let whole_rows = (room / (4 * padded(classes))).min(65536).min(b);
    let lanes = u64::from(ctx.tiles.classes_per_workgroup);
    let loop_columns = loops.budget.saturating_mul(4 * lanes) / 2;
    let whole_fits_loops = classes <= loop_columns;
    if cut == Cut::Budget && whole_rows >= MIN_CHUNK_ROWS.min(b) && whole_fits_loops {
        return Ok((whole_rows, None));
    }
    // Blocks of classes: G for `rows` rows × one block; the backward recomputes each
    // block's dots (8·B·C·D flops). Every block and row chunk costs a set of uniforms.
    // Where no block fits, thin whole rows, if any fit.
    let gemm_rows = u64::from(ctx.tiles.rows_per_workgroup * 4 * GEMM_QUADS);
    let sizing = BlockSizing {
        ctx,
        b,
        classes,
        d,
        quantum,
        budget,
        rest_base,
        copy_per_class,
        loop_columns,
        uniform_bytes: u64::from(ctx.limits.min_uniform_buffer_offset_alignment)
            .max(GEMM_SHAPE_BYTES.max(FAMILY_UNIFORM_BYTES)),
        min_block_rows: MIN_CHUNK_ROWS.max(gemm_rows).min(b),
    };
    let (rows, block) = if cut == Cut::Smallest {
        sizing.smallest()
    } else {
        sizing.widest(cut)
    };
    if block >= quantum {
        Ok((rows, Some(block)))
    } else if whole_fits_loops && whole_rows > 0 {
        Ok((whole_rows, None))
    } else {
        let blocks = classes.div_ceil(quantum);
        Err(Error::TooLarge {
            what: "the chunked plan's smallest block of G (one GEMM tile of rows × the alignment quantum of classes) with the norms and x̂ (set a larger ContextOptions::workspace_budget)",
            size: rest
                + 4 * rows * quantum
                + blocks * b.div_ceil(rows) * sizing.block_uniforms(quantum, rows) * sizing.uniform_bytes,
            limit: budget,
        })
    }
}

/// The row ranges of row chunks of `rows` rows over `batch`; none fit where `rows` is 0.
fn row_passes_of(batch: u32, classes: u32, rows: u64, budget: u64) -> Result<Vec<(u32, u32)>> {
    if rows == 0 {
        return Err(Error::TooLarge {
            what: "one row of G (C·4 bytes, C rounded up to 4) within the workspace budget",
            size: 4 * padded(u64::from(classes)),
            limit: budget,
        });
    }
    let rows = rows as u32;
    Ok((0..batch.div_ceil(rows))
        .map(|p| (p * rows, ((p + 1) * rows).min(batch)))
        .collect())
}

/// What sizes the chunked plan's blocks of classes: the shape, the budget, the workspace
/// besides G and the limits on a block.
struct BlockSizing<'c> {
    ctx: &'c Context,
    b: u64,
    classes: u64,
    d: u64,
    quantum: u64,
    budget: u64,
    /// The workspace besides G, the uniforms and w's copy.
    rest_base: u64,
    /// Bytes of w's copy per class (0 where not made).
    copy_per_class: u64,
    /// Classes of a row within the loop budget of the softmax's two passes.
    loop_columns: u64,
    /// Bytes of one uniform entry.
    uniform_bytes: u64,
    /// One GEMM tile of rows (64 by default) or MIN_CHUNK_ROWS if more, at most B.
    min_block_rows: u64,
}

impl BlockSizing<'_> {
    /// Uniform entries per block and row chunk: its parameters, and the GEMM shapes of
    /// its dots, gx̂ and gw, each in k-pieces of MAX_GEMM_K (an upper bound: the gradient
    /// products take their pieces up to MAX_SPLITS a dispatch).
    fn block_uniforms(&self, block: u64, rows: u64) -> u64 {
        let pieces = |k: u64| k.div_ceil(u64::from(MAX_GEMM_K)).max(1);
        1 + pieces(self.d) + pieces(block) + pieces(rows)
    }

    /// `block` cut to the loop budget, in whole quanta.
    fn within_loops(&self, block: u64) -> u64 {
        block.min(self.loop_columns) / self.quantum * self.quantum
    }

    /// The memory-minimal plan's (rows, block): 4·rows·block bytes of G against
    /// ⌈C/block⌉·⌈B/rows⌉ sets of uniforms; the sum is least near
    /// block = √(C·⌈B/rows⌉·U / (4·rows)), taken at least MIN_SMALLEST_BLOCK classes
    /// (thinner GEMMs waste their tiles).
    fn smallest(&self) -> (u64, u64) {
        let (b, quantum) = (self.b, self.quantum);
        let rows = b.min(BLOCK_ROWS).max(self.min_block_rows);
        let per_block = b.div_ceil(rows) * self.block_uniforms(self.d, rows) * self.uniform_bytes;
        let balance = ((self.classes * per_block) as f64 / (4 * rows) as f64).sqrt();
        let wanted = (balance as u64)
            .max(MIN_SMALLEST_BLOCK)
            .next_multiple_of(quantum);
        // G's block fits one binding.
        let binding = self.ctx.max_binding / (4 * rows);
        let block = self.within_loops(
            wanted
                .min(self.classes.next_multiple_of(quantum))
                .min(binding),
        );
        (rows, block)
    }

    /// The (rows, block) for the budget: the widest block whose G and uniforms fit
    /// (narrower blocks cost more uniforms, so it shrinks to a fixed point), rows halving
    /// from BLOCK_ROWS (all rows for a shard) while no block fits, down to
    /// `min_block_rows`: thinner GEMMs waste their tiles.
    fn widest(&self, cut: Cut) -> (u64, u64) {
        let b = self.b;
        let mut rows = if cut == Cut::Shard {
            b
        } else {
            b.min(BLOCK_ROWS)
        };
        loop {
            let fit = |block: u64| {
                let blocks = self.classes.div_ceil(block.max(1));
                let overhead = blocks
                    * b.div_ceil(rows)
                    * self.block_uniforms(block, rows)
                    * self.uniform_bytes;
                // G's block fits one binding; the rest of the budget holds all, the
                // block's copy of w included.
                let bytes = self.budget.saturating_sub(self.rest_base + overhead);
                self.within_loops(
                    (bytes / (4 * rows + self.copy_per_class))
                        .min(self.ctx.max_binding / (4 * rows)),
                )
            };
            let mut block = fit(self.classes);
            while block >= self.quantum && fit(block) < block {
                block = fit(block);
            }
            if block >= self.quantum || rows <= self.min_block_rows {
                return (rows, block);
            }
            rows = (rows / 2).max(self.min_block_rows);
        }
    }
}

/// The memory-minimal plan's narrowest block of classes: thinner GEMMs waste their tiles
/// and pay a dispatch per few columns.
pub(super) const MIN_SMALLEST_BLOCK: u64 = 256;

/// Smallest row chunk of whole rows of G: below it the chunked plan takes G in blocks of
/// classes instead.
pub(super) const MIN_CHUNK_ROWS: u64 = 32;
/// Rows of a chunk of blocks of G (fewer where the budget asks).
pub(super) const BLOCK_ROWS: u64 = 256;

impl Algorithm {
    /// The fastest algorithm whose workspace fits `ctx`'s budget for `shape`: chunked
    /// (whole rows of G when at least 32 rows, or all of them, fit and a row is within
    /// llvmpipe's loop budget; else blocks of classes for at least one GEMM tile of
    /// rows), and the memory-minimal plan only where not even one block fits.
    pub fn choose(ctx: &Context, shape: Shape) -> Algorithm {
        Algorithm::choose_within(ctx, shape, ctx.workspace_budget)
    }

    /// [`Algorithm::choose`] for a budget of `budget` bytes.
    pub(super) fn choose_within(ctx: &Context, shape: Shape, budget: u64) -> Algorithm {
        // Thinner whole rows (what is left when not even a block fits) lose to the
        // memory-minimal plan's blocks.
        match Geometry::new(ctx, shape, Algorithm::Chunked, budget, false) {
            Ok(g) if g.blocked || g.max_pass_rows() >= MIN_CHUNK_ROWS.min(shape.batch as u64) => {
                Algorithm::Chunked
            }
            _ => Algorithm::MemoryMinimal,
        }
    }

    /// The passes it records: the memory-minimal plan is the chunked plan's.
    pub(super) fn engine(self) -> Algorithm {
        match self {
            Algorithm::MemoryMinimal => Algorithm::Chunked,
            other => other,
        }
    }
}

/// Whether the GEMMs read a copy of w in rows padded to a multiple of 4 (after x̂'s):
/// always in the unfused baseline (it is ŵ), and in the chunked plan when D is not a
/// multiple of 4 (the GEMMs load rows as vec4s); otherwise they read the caller's w.
pub(super) fn copies_classes(shape: Shape, algorithm: Algorithm) -> bool {
    match algorithm.engine() {
        Algorithm::Unfused => true,
        _ => !shape.dim.is_multiple_of(4),
    }
}

/// Bytes of the padded copy of w or ŵ in rows of D rounded up to 4, where the plan copies
/// them: all classes (bound per chunk), or for a plan in blocks one block at a time (each
/// block copied before its GEMMs); else a 4-byte stand-in.
pub(super) fn padded_classes_bytes(shape: Shape, g: &Geometry, algorithm: Algorithm) -> u64 {
    if !copies_classes(shape, algorithm) {
        return 4;
    }
    let held = if g.blocked {
        g.largest_chunk()
    } else {
        shape.classes as u64
    };
    product(&[4, held, padded(shape.dim as u64)])
}

/// Bytes of the f32 copies of dL/dx and dL/dw the kernels sum and project in where the
/// gradient is stored in 16 bits, 0 where stored in f32: 4·B·D, and 4·C·D, or in blocks
/// of classes the largest block's (each block's dL/dw is finished, projected and rounded
/// before the next block's begins).
fn gradient_shadows(shape: Shape, g: &Geometry) -> (u64, u64) {
    let (b, d) = (shape.batch as u64, shape.dim as u64);
    let classes = if g.blocked {
        g.largest_chunk()
    } else {
        shape.classes as u64
    };
    let e = shape.elements;
    let bytes = |t: ElementType, rows: u64| {
        if t == ElementType::F32 {
            0
        } else {
            product(&[4, rows, d])
        }
    };
    (bytes(e.grad_features, b), bytes(e.grad_classes, classes))
}

/// The two of [`gradient_shadows`] together.
pub(super) fn gradient_shadow_bytes(shape: Shape, g: &Geometry) -> u64 {
    let (gx, gw) = gradient_shadows(shape, g);
    gx.saturating_add(gw)
}

/// The workspace buffers of one algorithm, with their sizes in bytes.
pub(super) fn workspace_layout(
    shape: Shape,
    g: &Geometry,
    algorithm: Algorithm,
) -> Vec<(Binding, u64)> {
    let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
    let d4 = padded(d);
    let mut layout = vec![
        (Binding::InvNormFeatures, 4 * b),
        // C rounded up to 4: also read four classes at a time.
        (Binding::InvNormClasses, 4 * padded(c)),
        (Binding::InputFlags, FLAGS_BYTES),
        (Binding::RowSoftmax, product(&[ROW_SOFTMAX_BYTES, b])),
        // One v̂·g per piece of each row of [x; w chunk], for rows of more than one piece.
        (
            Binding::ProjectionPieceDots,
            match dim_pieces(d) {
                1 => 4,
                pieces => product(&[4, pieces, b + g.largest_chunk()]),
            },
        ),
    ];
    layout.extend([
        (
            Binding::Logits,
            product(&[4, u64::from(g.logit_stride), g.max_pass_rows()]),
        ),
        // One partial per row, merged over the blocks (bound, and unread, otherwise).
        (Binding::SplitPartials, product(&[SPLIT_PARTIAL_BYTES, b])),
        (Binding::PaddedFeatures, product(&[4, b, d4])),
        // The partial products of the split-K GEMMs (bound, and unused, without one).
        (
            Binding::SplitProducts,
            gemm_specs(shape, g, algorithm)
                .iter()
                .map(GemmSpec::split_bytes)
                .fold(4, u64::max),
        ),
        (
            Binding::PaddedClasses,
            padded_classes_bytes(shape, g, algorithm),
        ),
    ]);
    // Gradients stored in 16 bits are summed and projected in f32 here first, then
    // rounded into the caller's buffers (`round_gradients`).
    let (gx, gw) = gradient_shadows(shape, g);
    if gx > 0 {
        layout.push((Binding::GradFeatures, gx));
    }
    if gw > 0 {
        layout.push((Binding::GradClasses, gw));
    }
    layout
}

/// One GEMM of a plan: its shape, layout and the bindings of its operands.
#[derive(Debug, Clone, Copy)]
pub(super) struct GemmSpec {
    pub(super) shape: GemmShape,
    pub(super) layout: GemmLayout,
    /// The row chunk (pass) it serves.
    pub(super) pass: usize,
    /// The class chunk whose bindings of w and dL/dw it reads and writes.
    pub(super) chunk: usize,
    pub(super) lhs: Binding,
    pub(super) rhs: Binding,
    pub(super) product: Binding,
    /// The GEMM candidate it runs (an index into the context's candidates); every
    /// candidate gives the same bits.
    pub(super) candidate: usize,
    /// The storage type of its rhs: w's where it reads the caller's w, else f32.
    pub(super) rhs_element: ElementType,
}

/// The longest k one invocation of a matmul sums, a multiple of 4 so that every piece
/// starts on a vec4: a product's k is cut into pieces of it by the shape alone. The
/// gradient products (k = classes for gx̂, rows for gw) run their pieces as the splits of
/// split-K dispatches (of up to MAX_SPLITS pieces, [`split_limit`]), whose partial
/// products `sum_splits` adds in order; the dots (k = D, past 4096 only for very long
/// rows, whose partials would outweigh the logits) run them one after another, each adding
/// onto the last. Both add the same values in the same order, and within a piece the GEMM
/// sums runs of about √(k/4) quads, then run by run ([`run_quads`]): this shortens the
/// chains of additions the long sums' rounding accumulates over. It keeps each
/// invocation's k/4 loop iterations within LOOP_BUDGET, and a workgroup's slice of the
/// streamed operand (4096 rows of a tile) within a CPU core's cache: on llvmpipe G·w over
/// k = 16384 runs 10–20% faster in pieces of 4096.
pub(super) const MAX_GEMM_K: u32 = 4096;

/// Splits one split-K dispatch runs at most: later groups of splits add onto the product,
/// so that no dispatch sums more than 8·MAX_GEMM_K of k (operating systems end long
/// dispatches). Fewer where the partial products would outgrow a quarter of G
/// ([`split_limit`]).
pub(super) const MAX_SPLITS: u32 = 8;

/// The splits a gradient product of m×n may run per dispatch in geometry `g`: as many as
/// keep their partial products (4·splits·m·n bytes) within a quarter of G's bytes, from 1
/// (pieces one after another, no partials) to MAX_SPLITS. The grouping changes no bit
/// (`sum_splits` adds in the order the pieces would), so it may follow the workspace.
fn split_limit(g: &Geometry, m: u32, n: u32) -> u32 {
    let logits = product(&[4, u64::from(g.logit_stride), g.max_pass_rows()]);
    let per_split = product(&[4, m.into(), n.into()]).max(1);
    (logits / 4 / per_split).clamp(1, u64::from(MAX_SPLITS)) as u32
}

impl GemmSpec {
    /// The spec cut along k into pieces of at most MAX_GEMM_K, `splits` of them a
    /// dispatch (the splits of a split-K dispatch where more than one; the dots take 1).
    /// Each dispatch after the first adds onto the product, with its operand offsets
    /// advanced to its first k.
    pub(super) fn k_pieces(self, splits: u32) -> Vec<GemmSpec> {
        let gemm = self.shape;
        let pieces = splits.max(1);
        let dispatch_k = MAX_GEMM_K * pieces;
        let (lhs_along_k, rhs_along_k) = self.layout.along_k();
        let step = |along_k: bool, stride: u32, k0: u32| if along_k { k0 } else { k0 * stride };
        (0..gemm.k.max(1))
            .step_by(dispatch_k as usize)
            .map(|k0| {
                let k = dispatch_k.min(gemm.k - k0);
                let splits = k.div_ceil(MAX_GEMM_K).max(1);
                GemmSpec {
                    shape: GemmShape {
                        k,
                        run_quads: run_quads(gemm.k.min(MAX_GEMM_K)),
                        split_k: if splits > 1 { MAX_GEMM_K } else { k },
                        splits,
                        lhs_offset: gemm.lhs_offset + step(lhs_along_k, gemm.lhs_stride, k0),
                        rhs_offset: gemm.rhs_offset + step(rhs_along_k, gemm.rhs_stride, k0),
                        accumulate: gemm.accumulate | u32::from(k0 > 0),
                        ..gemm
                    },
                    ..self
                }
            })
            .collect()
    }

    /// Bytes of the splits' partial products it needs (0 without a split).
    pub(super) fn split_bytes(&self) -> u64 {
        let g = &self.shape;
        if g.splits > 1 {
            product(&[4, g.splits.into(), g.m.into(), g.n.into()])
        } else {
            0
        }
    }
}

/// The GEMMs of a plan: per row chunk and class chunk, the dots and (for gradients) gx̂
/// and gw; steps find them by [`GemmSpec::pass`], `chunk` and `layout`. They read x̂ from
/// its padded copy, w from the caller's buffer (bound per class chunk) or its copy after
/// x̂ ([`copies_classes`]), in rows of D rounded up to 4; the logits and G in rows of
/// `logit_stride`, a class chunk's columns from its first class (from column 0 when the
/// logits hold one block at a time).
pub(super) fn gemm_specs(shape: Shape, g: &Geometry, algorithm: Algorithm) -> Vec<GemmSpec> {
    let d = shape.dim as u32;
    let shape_elements = shape.elements;
    let (c4, d4) = (g.logit_stride, padded(d.into()) as u32);
    let column = |part: &Chunk| if g.blocked { 0 } else { part.class_offset };
    // w's binding, bound per chunk from the chunk's first class: the caller's, or its copy.
    let w = if copies_classes(shape, algorithm) {
        Binding::PaddedClasses
    } else {
        Binding::ClassVectors
    };
    let features = Binding::PaddedFeatures;
    let spec = |(pass, chunk), shape, layout, lhs, rhs, product| GemmSpec {
        shape,
        layout,
        pass,
        chunk,
        lhs,
        rhs,
        product,
        candidate: 0,
        rhs_element: if rhs == Binding::ClassVectors {
            shape_elements.classes
        } else {
            ElementType::F32
        },
    };
    let mut specs = Vec::new();
    for (pass, &(r0, r1)) in g.row_passes.iter().enumerate() {
        let rows = r1 - r0;
        // x̂·wᵀ into the chunk's columns of the logits.
        for (k, part) in g.chunks.iter().enumerate() {
            let mut dots = GemmShape::new((rows, part.classes, d), d4, d4, c4);
            dots.lhs_offset = r0 * d4;
            dots.product_offset = column(part);
            let dots = spec(
                (pass, k),
                dots,
                GemmLayout::Dots,
                features,
                w,
                Binding::Logits,
            );
            specs.extend(dots.k_pieces(1));
        }
        // gx̂ (+)= G·w over the chunk's classes, and its gw (+)= Gᵀ·x̂ over these rows,
        // both from G (from the chunk's first column) in split-K pieces.
        for (k, part) in g.chunks.iter().enumerate() {
            let mut gx = GemmShape::new((rows, d, part.classes), c4, d4, d);
            gx.product_offset = r0 * d;
            gx.accumulate = u32::from(k > 0);
            let mut gw = GemmShape::new((part.classes, d, rows), c4, d4, d);
            gw.rhs_offset = r0 * d4;
            gw.accumulate = u32::from(pass > 0);
            for (mut shape, layout, rhs, product) in [
                (gx, GemmLayout::FeatureGrad, w, Binding::GradFeatures),
                (gw, GemmLayout::ClassGrad, features, Binding::GradClasses),
            ] {
                shape.lhs_offset = column(part);
                let grad = spec((pass, k), shape, layout, Binding::Logits, rhs, product);
                specs.extend(grad.k_pieces(split_limit(g, shape.m, shape.n)));
            }
        }
    }
    specs
}

/// Byte stride of consecutive uniform structs of `bytes` in one buffer.
pub(super) fn uniform_stride(ctx: &Context, bytes: u64) -> u64 {
    bytes.next_multiple_of(u64::from(ctx.limits.min_uniform_buffer_offset_alignment))
}

/// Bytes of workspace the crate allocates for `shape` with `algorithm` on `ctx`, beyond
/// the caller's inputs and outputs. Chunked: x̂ (B·D), G for a chunk of rows (or a block of
/// classes), the split-K partial products (at most a quarter of G), the norms, a partial
/// per row and the uniforms. Memory-minimal: x̂, up to 256 rows of one block of G, the
/// norms and a partial per row, and uniforms per block and row chunk. Unfused: it holds
/// the B×C logits. Each gradient stored in 16 bits adds its f32 shadow (4·B·D; 4·C·D, or
/// in blocks one block's), which the kernels sum and project in before rounding: the
/// workspace budget bounds G, not these.
pub fn workspace_bytes(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<u64> {
    let g = Geometry::new(ctx, shape, algorithm, ctx.workspace_budget, false)?;
    Ok(total_bytes(ctx, shape, &g, algorithm))
}

pub(super) fn total_bytes(ctx: &Context, shape: Shape, g: &Geometry, algorithm: Algorithm) -> u64 {
    let buffers = workspace_layout(shape, g, algorithm)
        .iter()
        .fold(0u64, |acc, (_, s)| acc.saturating_add(*s));
    let gemm = gemm_specs(shape, g, algorithm).len() as u64 * uniform_stride(ctx, GEMM_SHAPE_BYTES);
    buffers + g.uniforms() as u64 * uniform_stride(ctx, FAMILY_UNIFORM_BYTES) + gemm
}
