//! Plans: for one problem shape and algorithm, the workspace buffers and the dispatch
//! geometry, and the recording of the passes into a command encoder.

use crate::context::{Context, DeviceBuffer};
use crate::error::{Error, Result};
use crate::io::{check_aliasing, DeviceInputs, DeviceOutputs, Region, RowStats, Shape, Summary};
use crate::kernels::{
    encode, fold_grid, padded, Binding, Dispatch, GemmLayout, GemmShape, GpuParams, Kernel,
    Timestamps, DIM_PIECE, GEMM_QUADS, ROW_KERNEL_WORKGROUP,
};
use crate::params::LossParams;

/// One dispatch of a recording.
#[derive(Clone, Copy)]
struct Step<'a> {
    kernel: &'a Kernel,
    grid: (u32, u32),
    /// The class chunk it covers.
    chunk: usize,
    /// The dL/dw row pass it covers.
    pass: usize,
    /// The GEMM it runs (matmul steps), an index into the plan's GEMMs.
    gemm: Option<usize>,
}

/// How the loss is computed. [`Plan::new`] picks the fastest that fits the context's
/// workspace budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// The memory-minimal plan: the chunked plan's GEMMs on at most 256 rows and a narrow
    /// block of classes at a time (the block that balances G against the per-block
    /// uniforms, at least 256 classes), its dots computed twice: about 8·B·C·D flops;
    /// the workspace is x̂, one block of G, a partial per row, the norms and the uniforms,
    /// whatever the workspace budget.
    MemoryMinimal,
    /// A chunk of rows at a time (as many as the workspace budget holds): the dots x̂·wᵀ
    /// of the chunk's rows × all classes from one GEMM (w read in place, or copied in
    /// rows of D rounded up to 4 when D is not a multiple of 4; x̂ from a B×D copy), their
    /// softmax, then G/‖w‖ in place and two GEMMs for dL/dx and dL/dw; the reduction's
    /// 1/N is applied at the end. About 6·B·C·D flops at GEMM speed. For small budgets
    /// (or rows too long for llvmpipe's loop budget) one block of classes at a time: a
    /// softmax partial per row and block, and each block's dots recomputed in the
    /// backward, about 8·B·C·D flops.
    Chunked,
    /// The baseline an engine without fusion runs: normalised copies of x and w, the B×C
    /// cosine matrix from a GEMM, a row softmax, G in place, and two gradient GEMMs.
    Unfused,
}

/// One chunk of the class matrix: the classes one binding of w covers, or, for a plan
/// in blocks, one block of classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Chunk {
    class_offset: u32,
    classes: u32,
}

/// How a shape is cut: class chunks (or blocks) and row chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Geometry {
    chunks: Vec<Chunk>,
    /// Row ranges [begin, end) of the row chunks of the materialised logits, in row order.
    row_passes: Vec<(u32, u32)>,
    /// Chunked plan: the logits hold one class chunk (a block) at a time, not all C; the
    /// forward merges a partial per row over the blocks and the backward recomputes each
    /// block's dots.
    blocked: bool,
    /// Elements between rows of the materialised logits.
    logit_stride: u32,
}

/// How the chunked plan cuts a shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cut {
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
const LOOP_BUDGET: u64 = 32768;
/// llvmpipe's own limit, for the one pass whose iterations are counted exactly rather
/// than estimated: the norms, D/4 vec4 steps for the largest magnitude, D/4 for the sum of
/// squares and at most 12 scalar steps at the ends, in no branch (so not doubled by
/// divergence), with 1024 of slack.
const LOOP_LIMIT: u64 = 65535 - 1024;

/// The loop limits a context's plans keep to: llvmpipe's, or none.
#[derive(Debug, Clone, Copy)]
struct LoopLimits {
    /// Estimated iterations per invocation (LOOP_BUDGET).
    budget: u64,
    /// Exactly counted iterations per invocation (LOOP_LIMIT).
    exact: u64,
}

impl LoopLimits {
    /// llvmpipe's limits where the adapter is llvmpipe (by its name or driver), else none.
    fn of(ctx: &Context) -> LoopLimits {
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
fn norm_iterations(dim: u64) -> u64 {
    dim.div_ceil(2) + 12
}

/// Pieces of DIM_PIECE values in a row of `dim`: one invocation each in `pad_rows` and
/// the projections, whose loops then stay within LOOP_BUDGET for any D (at most
/// 4·DIM_PIECE steps: a piece's dot and its write, over both of the projection's
/// branches, plus one per piece to merge the dots).
fn dim_pieces(dim: u64) -> u64 {
    dim.div_ceil(u64::from(DIM_PIECE)).max(1)
}
/// Bytes of one `SplitPartial` in `shaders/forward.wgsl`.
const SPLIT_PARTIAL_BYTES: u64 = 28;
/// Bytes of one `RowSoftmax` in `shaders/common.wgsl`.
const ROW_SOFTMAX_BYTES: u64 = 20;
const FLAGS_BYTES: u64 = 4;
const PARAMS_BYTES: u64 = std::mem::size_of::<GpuParams>() as u64;
const GEMM_SHAPE_BYTES: u64 = std::mem::size_of::<GemmShape>() as u64;

/// The product of byte counts, saturating: sizes past u64 compare as too large instead of
/// wrapping.
fn product(factors: &[u64]) -> u64 {
    factors.iter().fold(1u64, |acc, &f| acc.saturating_mul(f))
}

fn to_u32(what: &'static str, n: usize) -> Result<u32> {
    u32::try_from(n).map_err(|_| Error::TooLarge {
        what,
        size: n as u64,
        limit: u64::from(u32::MAX),
    })
}

fn gcd(a: u64, b: u64) -> u64 {
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
    fn new(
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
            let total = total_bytes(ctx, shape, &g, engine);
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
    fn select(
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
        let tiles = ctx.tiles;
        let d = shape.dim as u64;
        let row_bytes = d * 4;
        let b = u64::from(batch);
        let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment).max(4);
        let tile = u64::from(tiles.tile_classes());
        // Chunk starts are multiples of `quantum` classes: byte offsets stay aligned for w,
        // its gradient and the per-class norms, and chunks hold whole class lanes' quads.
        let lcm = |a: u64, b: u64| a * b / gcd(a, b);
        let quantum = {
            let by_row = align / gcd(align, row_bytes);
            let by_padded_row = align / gcd(align, 4 * padded(d));
            let by_norm = align / 4;
            lcm(lcm(lcm(by_row, by_padded_row), by_norm), tile)
        };
        // A row's softmax runs over its classes in CLASSES_WG lanes, a quad of classes per
        // loop iteration (twice in the chunked plan: statistics, then G'), within
        // LOOP_BUDGET: past it the chunked plan takes the classes in blocks.
        let lanes = u64::from(tiles.classes_per_workgroup);
        let (mut chunk_classes, mut row_passes) = if algorithm == Algorithm::Unfused {
            let loop_columns = loops.budget.saturating_mul(4 * lanes);
            if u64::from(classes) > loop_columns {
                return Err(Error::TooLarge {
                    what: "classes of one row of the unfused baseline's softmax (llvmpipe's loop budget)",
                    size: u64::from(classes),
                    limit: loop_columns,
                });
            }
            (classes, vec![(0, batch)])
        } else {
            // The chunked plan runs GEMMs only: one binding of w per chunk.
            // (the copy of w, where made, has rows of D rounded up to 4).
            let fit = ctx.max_binding / (4 * padded(d)) / quantum * quantum;
            if fit == 0 {
                return Err(Error::TooLarge {
                    what:
                        "one chunk of class vectors (the alignment quantum of classes × D·4 bytes)",
                    size: quantum * row_bytes,
                    limit: ctx.max_binding,
                });
            }
            (fit.min(u64::from(classes)) as u32, vec![(0, batch)])
        };
        // The padded copies are bound whole: they must fit one binding.
        let copies = product(&[4, b, padded(d)]);
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
            // Row chunks of G: as many rows as the budget holds, at most 65536 (the loop
            // budget of the dL/dw GEMM, whose k runs over the chunk's rows).
            // The rest of the workspace (norms, flags, softmax rows, partials, the padded
            // copies) comes out of the budget first, and for whole rows 64 KiB for the
            // uniforms.
            let rest = 4 * (b + u64::from(classes))
                + product(&[4, b, padded(d)])
                + padded_classes_bytes(shape, algorithm)
                + FLAGS_BYTES
                + product(&[ROW_SOFTMAX_BYTES + SPLIT_PARTIAL_BYTES, b]);
            // G's rows also fit one storage binding.
            let room = budget
                .saturating_sub(rest + (64 << 10))
                .min(ctx.max_binding);
            let whole_rows = (room / (4 * padded(u64::from(classes)))).min(65536).min(b);
            let mut rows = whole_rows;
            let loop_columns = loops.budget.saturating_mul(4 * lanes) / 2;
            let whole_fits_loops = u64::from(classes) <= loop_columns;
            if cut != Cut::Budget || rows < MIN_CHUNK_ROWS.min(b) || !whole_fits_loops {
                // Blocks of classes: G for `rows` rows × one block; the backward recomputes
                // each block's dots (8·B·C·D flops). Every block and row chunk costs a set
                // of uniforms. For the budget, the widest block whose G and uniforms fit
                // (narrower blocks cost more uniforms, so it shrinks to a fixed point),
                // rows halving from BLOCK_ROWS while no block fits, down to one GEMM tile
                // of rows (64 by default) or MIN_CHUNK_ROWS if more: thinner GEMMs waste
                // their tiles. Where no block fits, thin whole rows, if any fit.
                let uniform_bytes = u64::from(ctx.limits.min_uniform_buffer_offset_alignment)
                    .max(GEMM_SHAPE_BYTES.max(PARAMS_BYTES));
                let gemm_rows = u64::from(tiles.rows_per_workgroup * 4 * GEMM_QUADS);
                let min_block_rows = MIN_CHUNK_ROWS.max(gemm_rows).min(b);
                // Uniform entries per block and row chunk: its parameters, and the GEMM
                // shapes of its dots, gx̂ and gw, each in k-pieces of MAX_GEMM_K.
                let pieces = |k: u64| k.div_ceil(u64::from(MAX_GEMM_K)).max(1);
                let block_uniforms =
                    |block: u64, rows: u64| 1 + pieces(d) + pieces(block) + pieces(rows);
                let within_loops = |block: u64| block.min(loop_columns) / quantum * quantum;
                let mut block;
                if cut == Cut::Smallest {
                    // 4·rows·block bytes of G against ⌈C/block⌉·⌈B/rows⌉ sets of uniforms:
                    // the sum is least near block = √(C·⌈B/rows⌉·U / (4·rows)), taken at
                    // least MIN_SMALLEST_BLOCK classes (thinner GEMMs waste their tiles).
                    rows = b.min(BLOCK_ROWS).max(min_block_rows);
                    let per_block = b.div_ceil(rows) * block_uniforms(d, rows) * uniform_bytes;
                    let balance =
                        ((u64::from(classes) * per_block) as f64 / (4 * rows) as f64).sqrt();
                    let wanted = (balance as u64)
                        .max(MIN_SMALLEST_BLOCK)
                        .next_multiple_of(quantum);
                    // G's block fits one binding.
                    let binding = ctx.max_binding / (4 * rows);
                    block = within_loops(
                        wanted
                            .min(u64::from(classes).next_multiple_of(quantum))
                            .min(binding),
                    );
                } else {
                    rows = if cut == Cut::Shard {
                        b
                    } else {
                        b.min(BLOCK_ROWS)
                    };
                    loop {
                        let fit = |block: u64| {
                            let blocks = u64::from(classes).div_ceil(block.max(1));
                            let overhead = blocks
                                * b.div_ceil(rows)
                                * block_uniforms(block, rows)
                                * uniform_bytes;
                            // G's block fits one binding; the rest of the budget holds all.
                            let bytes = budget.saturating_sub(rest + overhead).min(ctx.max_binding);
                            within_loops(bytes / (4 * rows))
                        };
                        block = fit(u64::from(classes));
                        while block >= quantum && fit(block) < block {
                            block = fit(block);
                        }
                        if block >= quantum || rows <= min_block_rows {
                            break;
                        }
                        rows = (rows / 2).max(min_block_rows);
                    }
                }
                if block >= quantum {
                    chunk_classes = chunk_classes.min(block.min(u64::from(classes)) as u32);
                    blocked = true;
                } else if whole_fits_loops && whole_rows > 0 {
                    rows = whole_rows;
                } else {
                    let blocks = u64::from(classes).div_ceil(quantum);
                    return Err(Error::TooLarge {
                        what: "the chunked plan's smallest block of G (one GEMM tile of rows × the alignment quantum of classes) with the norms and x̂ (set a larger ContextOptions::workspace_budget)",
                        size: rest
                            + 4 * rows * quantum
                            + blocks * b.div_ceil(rows) * block_uniforms(quantum, rows) * uniform_bytes,
                        limit: budget,
                    });
                }
            }
            if rows == 0 {
                return Err(Error::TooLarge {
                    what: "one row of G (C·4 bytes, C rounded up to 4) within the workspace budget",
                    size: 4 * padded(u64::from(classes)),
                    limit: budget,
                });
            }
            let rows = rows as u32;
            row_passes = (0..batch.div_ceil(rows))
                .map(|p| (p * rows, ((p + 1) * rows).min(batch)))
                .collect();
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
    fn largest_chunk(&self) -> u64 {
        self.chunks
            .iter()
            .map(|k| u64::from(k.classes))
            .max()
            .unwrap_or(0)
    }

    /// Uniform entries: one per (chunk, row pass), chunk-major.
    fn uniforms(&self) -> usize {
        self.chunks.len() * self.row_passes.len()
    }

    /// Rows of the largest row pass.
    fn max_pass_rows(&self) -> u64 {
        self.row_passes
            .iter()
            .map(|&(a, b)| u64::from(b - a))
            .max()
            .unwrap_or(0)
    }
}

/// The memory-minimal plan's narrowest block of classes: thinner GEMMs waste their tiles
/// and pay a dispatch per few columns.
const MIN_SMALLEST_BLOCK: u64 = 256;

/// Smallest row chunk of whole rows of G: below it the chunked plan takes G in blocks of
/// classes instead.
const MIN_CHUNK_ROWS: u64 = 32;
/// Rows of a chunk of blocks of G (fewer where the budget asks).
const BLOCK_ROWS: u64 = 256;

impl Algorithm {
    /// The fastest algorithm whose workspace fits `ctx`'s budget for `shape`: chunked
    /// (whole rows of G when at least 32 rows, or all of them, fit and a row is within
    /// llvmpipe's loop budget; else blocks of classes for at least one GEMM tile of
    /// rows), and the memory-minimal plan only where not even one block fits.
    pub fn choose(ctx: &Context, shape: Shape) -> Algorithm {
        Algorithm::choose_within(ctx, shape, ctx.workspace_budget)
    }

    /// [`Algorithm::choose`] for a budget of `budget` bytes.
    fn choose_within(ctx: &Context, shape: Shape, budget: u64) -> Algorithm {
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
    fn engine(self) -> Algorithm {
        match self {
            Algorithm::MemoryMinimal => Algorithm::Chunked,
            other => other,
        }
    }
}

/// Whether the GEMMs read a copy of w in rows padded to a multiple of 4 (after x̂'s):
/// always in the unfused baseline (it is ŵ), and in the chunked plan when D is not a
/// multiple of 4 (the GEMMs load rows as vec4s); otherwise they read the caller's w.
fn copies_classes(shape: Shape, algorithm: Algorithm) -> bool {
    match algorithm.engine() {
        Algorithm::Unfused => true,
        _ => !shape.dim.is_multiple_of(4),
    }
}

/// Bytes of the padded copy of w or ŵ: all classes in rows of D rounded up to 4 where
/// the plan copies them (bound per chunk), else a 4-byte stand-in.
fn padded_classes_bytes(shape: Shape, algorithm: Algorithm) -> u64 {
    if copies_classes(shape, algorithm) {
        product(&[4, shape.classes as u64, padded(shape.dim as u64)])
    } else {
        4
    }
}

/// The workspace buffers of one algorithm, with their sizes in bytes.
fn workspace_layout(shape: Shape, g: &Geometry, algorithm: Algorithm) -> Vec<(Binding, u64)> {
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
        (
            Binding::PaddedClasses,
            padded_classes_bytes(shape, algorithm),
        ),
    ]);
    layout
}

/// One GEMM of a plan: its shape, layout and the bindings of its operands.
#[derive(Debug, Clone, Copy)]
struct GemmSpec {
    shape: GemmShape,
    layout: GemmLayout,
    /// The row chunk (pass) it serves.
    pass: usize,
    /// The class chunk whose bindings of w and dL/dw it reads and writes.
    chunk: usize,
    lhs: Binding,
    rhs: Binding,
    product: Binding,
    /// The GEMM candidate it runs (an index into the context's candidates); every
    /// candidate gives the same bits.
    candidate: usize,
}

/// The longest k one matmul dispatch runs, a multiple of 4 so that every piece starts
/// on a vec4: a product's k is cut into pieces of it by the shape alone, each piece
/// adding onto the last; within a piece the GEMM sums runs of 256 values, then run by run
/// (`RUN_QUADS` in shaders/gemm.wgsl), which bounds the rounding of the long sums. It
/// keeps each invocation's k/4 loop iterations within LOOP_BUDGET, and a workgroup's
/// slice of the streamed operand (4096 rows of a tile) within a CPU core's cache: on
/// llvmpipe G·w over k = 16384 runs 10–20% faster in pieces of 4096.
const MAX_GEMM_K: u32 = 4096;

impl GemmSpec {
    /// The spec cut along k into pieces of at most MAX_GEMM_K, each accumulating onto
    /// the previous ones, with its operand offsets advanced to the piece's first k.
    fn k_pieces(self) -> Vec<GemmSpec> {
        let gemm = self.shape;
        let (lhs_along_k, rhs_along_k) = self.layout.along_k();
        let step = |along_k: bool, stride: u32, k0: u32| if along_k { k0 } else { k0 * stride };
        (0..gemm.k)
            .step_by(MAX_GEMM_K as usize)
            .map(|k0| GemmSpec {
                shape: GemmShape {
                    k: MAX_GEMM_K.min(gemm.k - k0),
                    lhs_offset: gemm.lhs_offset + step(lhs_along_k, gemm.lhs_stride, k0),
                    rhs_offset: gemm.rhs_offset + step(rhs_along_k, gemm.rhs_stride, k0),
                    accumulate: gemm.accumulate | u32::from(k0 > 0),
                    ..gemm
                },
                ..self
            })
            .collect()
    }
}

/// The GEMMs of a plan: per row chunk and class chunk, the dots and (for gradients) gx̂
/// and gw; steps find them by [`GemmSpec::pass`], `chunk` and `layout`. They read x̂ from
/// its padded copy, w from the caller's buffer (bound per class chunk) or its copy after
/// x̂ ([`copies_classes`]), in rows of D rounded up to 4; the logits and G in rows of
/// `logit_stride`, a class chunk's columns from its first class (from column 0 when the
/// logits hold one block at a time).
fn gemm_specs(shape: Shape, g: &Geometry, algorithm: Algorithm) -> Vec<GemmSpec> {
    let d = shape.dim as u32;
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
            specs.extend(dots.k_pieces());
        }
        // gx̂ (+)= G·w over the chunk's classes, and its gw (+)= Gᵀ·x̂ over these rows.
        for (k, part) in g.chunks.iter().enumerate() {
            let mut gx = GemmShape::new((rows, d, part.classes), c4, d4, d);
            gx.lhs_offset = column(part);
            gx.product_offset = r0 * d;
            gx.accumulate = u32::from(k > 0);
            let gx = spec(
                (pass, k),
                gx,
                GemmLayout::FeatureGrad,
                Binding::Logits,
                w,
                Binding::GradFeatures,
            );
            specs.extend(gx.k_pieces());
            let mut gw = GemmShape::new((part.classes, d, rows), c4, d4, d);
            gw.lhs_offset = column(part);
            gw.rhs_offset = r0 * d4;
            gw.accumulate = u32::from(pass > 0);
            let gw = spec(
                (pass, k),
                gw,
                GemmLayout::ClassGrad,
                Binding::Logits,
                features,
                Binding::GradClasses,
            );
            specs.extend(gw.k_pieces());
        }
    }
    specs
}

/// Byte stride of consecutive uniform structs of `bytes` in one buffer.
fn uniform_stride(ctx: &Context, bytes: u64) -> u64 {
    bytes.next_multiple_of(u64::from(ctx.limits.min_uniform_buffer_offset_alignment))
}

/// Bytes of workspace the crate allocates for `shape` with `algorithm` on `ctx`, beyond
/// the caller's inputs and outputs. Memory-minimal: x̂ (B·D), up to 256 rows of one block
/// of G, the norms and a partial per row, and uniforms per block and row chunk. Unfused:
/// it holds the B×C logits.
pub fn workspace_bytes(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<u64> {
    let g = Geometry::new(ctx, shape, algorithm, ctx.workspace_budget, false)?;
    Ok(total_bytes(ctx, shape, &g, algorithm))
}

fn total_bytes(ctx: &Context, shape: Shape, g: &Geometry, algorithm: Algorithm) -> u64 {
    let buffers = workspace_layout(shape, g, algorithm)
        .iter()
        .fold(0u64, |acc, (_, s)| acc.saturating_add(*s));
    let gemm = gemm_specs(shape, g, algorithm).len() as u64 * uniform_stride(ctx, GEMM_SHAPE_BYTES);
    buffers + g.uniforms() as u64 * uniform_stride(ctx, PARAMS_BYTES) + gemm
}

/// The workspace and dispatch geometry for one shape on one context. Reuse it across
/// calls of that shape: it allocates nothing after creation.
#[derive(Debug)]
pub struct Plan {
    shape: Shape,
    algorithm: Algorithm,
    geometry: Geometry,
    workspace_bytes: u64,
    /// One GpuParams per (chunk, row pass), `uniform_stride` apart.
    params: DeviceBuffer,
    workspace: Vec<(Binding, DeviceBuffer)>,
    /// The GEMMs of the unfused and chunked algorithms.
    gemms: Vec<GemmSpec>,
    /// Their GemmShapes, `uniform_stride` apart (none for the fused algorithm).
    gemm_shapes: Option<DeviceBuffer>,
    /// Labels below this are rows that take part: the shape's classes, or for a class
    /// shard one more, the label of rows whose class is in another shard.
    total_classes: u32,
    /// The serial number of the context whose device holds the workspace: recording
    /// with another context is refused.
    context: u64,
}

/// Which passes a recording runs: the whole loss, or one side of a class shard's
/// exchange (`crate::shard`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Forward (and backward when gradients are asked for).
    Whole,
    /// A class shard's forward (the chunked plan in blocks): norms, dots and one softmax
    /// partial per row and block; the caller reads the partials back.
    ShardForward,
    /// A class shard's backward from the row softmax data and target cosines the caller
    /// uploaded: the blocks' dots again (none with `reuse_dots`: the forward's are still
    /// in the workspace), G' and the gradient GEMMs, then the projections.
    ShardBackward {
        /// The dots of the shard's forward are still in the workspace.
        reuse_dots: bool,
    },
}

impl Plan {
    /// Allocates the workspace of the fastest algorithm that fits the context's workspace
    /// budget ([`Algorithm::choose`]) for `shape`.
    pub fn new(ctx: &Context, shape: Shape) -> Result<Plan> {
        Plan::with_budget(ctx, shape, ctx.workspace_budget)
    }

    /// [`Plan::new`] within `budget` bytes of workspace instead of the context's budget:
    /// the chunked plan in blocks of classes down to a few hundred kilobytes, the fused
    /// kernels below.
    pub fn with_budget(ctx: &Context, shape: Shape, budget: u64) -> Result<Plan> {
        let algorithm = Algorithm::choose_within(ctx, shape, budget);
        Plan::build(ctx, shape, algorithm, budget, false)
    }

    /// Allocates the workspace of `algorithm` for `shape`. Fails with
    /// [`Error::TooLarge`] where a buffer would exceed the device's limits.
    pub fn with_algorithm(ctx: &Context, shape: Shape, algorithm: Algorithm) -> Result<Plan> {
        Plan::build(ctx, shape, algorithm, ctx.workspace_budget, false)
    }

    fn build(
        ctx: &Context,
        shape: Shape,
        algorithm: Algorithm,
        budget: u64,
        blocks: bool,
    ) -> Result<Plan> {
        ctx.check_alive()?;
        let geometry = Geometry::new(ctx, shape, algorithm, budget, blocks)?;
        let layout = workspace_layout(shape, &geometry, algorithm);
        let (b, c, d) = (shape.batch as u64, shape.classes as u64, shape.dim as u64);
        let max_binding = ctx.max_binding;
        let biggest_chunk = geometry
            .chunks
            .iter()
            .map(|k| u64::from(k.classes))
            .max()
            .unwrap_or(0);
        let bound = [
            ("features (B·D·4 bytes)", product(&[b, d, 4])),
            (
                "class vectors of one chunk (classes·D·4 bytes)",
                product(&[biggest_chunk, d, 4]),
            ),
        ];
        for (what, size) in bound.into_iter().chain(
            layout
                .iter()
                .filter(|&&(bind, _)| bind != Binding::PaddedClasses)
                .map(|&(bind, s)| (binding_name(bind), s)),
        ) {
            if size > max_binding {
                return Err(Error::TooLarge {
                    what,
                    size,
                    limit: max_binding,
                });
            }
        }
        // The copy of w is bound chunk by chunk, like w: it must fit one buffer.
        let copy = padded_classes_bytes(shape, algorithm);
        if copy > ctx.limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: "the copy of w in rows of D rounded up to 4 (C·⌈D/4⌉·16 bytes in one buffer)",
                size: copy,
                limit: ctx.limits.max_buffer_size,
            });
        }
        if product(&[c, d, 4]) > ctx.limits.max_buffer_size {
            return Err(Error::TooLarge {
                what: "class vectors (C·D·4 bytes) in one buffer",
                size: product(&[c, d, 4]),
                limit: ctx.limits.max_buffer_size,
            });
        }
        if algorithm == Algorithm::Unfused && product(&[b, padded(c)]) > u64::from(u32::MAX) {
            return Err(Error::TooLarge {
                what: "B·C logits (u32 indices, C rounded up to 4)",
                size: product(&[b, padded(c)]),
                limit: u64::from(u32::MAX),
            });
        }
        // COPY_SRC: a class shard reads its split partials back.
        let storage = wgpu::BufferUsages::STORAGE
            | wgpu::BufferUsages::COPY_DST
            | wgpu::BufferUsages::COPY_SRC;
        let workspace = layout
            .iter()
            .map(|&(binding, size)| {
                (
                    binding,
                    ctx.create_buffer(binding_name(binding), size, storage),
                )
            })
            .collect();
        let uniform = |label, size| {
            ctx.create_buffer(
                label,
                size,
                wgpu::BufferUsages::UNIFORM | wgpu::BufferUsages::COPY_DST,
            )
        };
        // Each GEMM runs the candidate its bucket tuned to (timed now, if new).
        let mut gemms = gemm_specs(shape, &geometry, algorithm);
        for spec in &mut gemms {
            let s = spec.shape;
            spec.candidate = ctx.gemm_choice(spec.layout, s.m, s.n, s.k)?;
        }
        let gemm_shapes = (!gemms.is_empty()).then(|| {
            let stride = uniform_stride(ctx, GEMM_SHAPE_BYTES);
            let buffer = uniform("gemm_shapes", gemms.len() as u64 * stride);
            let mut bytes = vec![0u8; (gemms.len() as u64 * stride) as usize];
            for (k, spec) in gemms.iter().enumerate() {
                let at = k * stride as usize;
                bytes[at..at + GEMM_SHAPE_BYTES as usize]
                    .copy_from_slice(bytemuck::bytes_of(&spec.shape));
            }
            ctx.queue.write_buffer(&buffer, 0, &bytes);
            buffer
        });
        let params_bytes = geometry.uniforms() as u64 * uniform_stride(ctx, PARAMS_BYTES);
        Ok(Plan {
            shape,
            algorithm,
            workspace_bytes: total_bytes(ctx, shape, &geometry, algorithm),
            geometry,
            params: uniform("params", params_bytes),
            workspace,
            gemms,
            gemm_shapes,
            total_classes: c as u32,
            context: ctx.serial,
        })
    }

    /// The shape this plan serves.
    pub fn shape(&self) -> Shape {
        self.shape
    }

    /// The algorithm this plan runs.
    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    /// The GEMM candidate each of its products runs, as `dots register, G·w staged-64, …`
    /// (the first of a product's pieces where they differ).
    pub fn gemm_summary(&self, ctx: &Context) -> String {
        GemmLayout::ALL
            .iter()
            .filter_map(|&layout| {
                let spec = self.gemms.iter().find(|g| g.layout == layout)?;
                let name = ctx.kernels.candidates.get(spec.candidate)?.name;
                Some(format!("{} {name}", layout.key()))
            })
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// Bytes this plan allocated (its whole workspace).
    pub fn workspace_bytes(&self) -> u64 {
        self.workspace_bytes
    }

    /// Records the loss into the caller's `encoder`: the forward pass, and the backward
    /// pass when `outputs.grads` is set. Nothing is submitted or read back.
    ///
    /// The parameters travel in the encoder (a copy recorded before the dispatches), so
    /// a plan may be recorded any number of times before a submit, each recording with
    /// its own parameters; recordings of one plan share its workspace, so they run in the
    /// order they are submitted, one after the other. Input regions are only read. Output regions are written exactly over their
    /// documented sizes and nowhere else.
    pub fn record(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
    ) -> Result<()> {
        self.record_phase(
            ctx,
            encoder,
            inputs,
            outputs,
            params,
            Timestamps::Off,
            Phase::Whole,
        )?;
        Ok(())
    }

    /// A plan for one class shard (`crate::shard`): the chunked plan over the shard's
    /// classes in blocks, so that its forward leaves one softmax partial per row and block;
    /// all its rows at once where the budget allows, so that its dots last from its
    /// forward to its backward ([`Plan::keeps_dots`]). Its labels are local: a class of
    /// the shard, or `shape.classes` for a row whose class is in another shard.
    pub(crate) fn for_shard(ctx: &Context, shape: Shape) -> Result<Plan> {
        let mut plan = Plan::build(ctx, shape, Algorithm::Chunked, ctx.workspace_budget, true)?;
        plan.total_classes = to_u32("classes", shape.classes + 1)?;
        Ok(plan)
    }

    /// True when the dots x̂·wᵀ of every row and class are held at once (one row pass,
    /// one block): a shard's backward then reuses its forward's.
    pub(crate) fn keeps_dots(&self) -> bool {
        self.geometry.blocked
            && self.geometry.chunks.len() == 1
            && self.geometry.row_passes.len() == 1
    }

    /// The workspace buffer bound at `binding`, if the plan has one.
    pub(crate) fn workspace_buffer(&self, binding: Binding) -> Option<&wgpu::Buffer> {
        self.workspace
            .iter()
            .find(|(b, _)| *b == binding)
            .map(|(_, buffer)| &**buffer)
    }

    /// Records `phase`, with the timestamps asked for; returns the kernels' names in
    /// dispatch order.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn record_phase(
        &self,
        ctx: &Context,
        encoder: &mut wgpu::CommandEncoder,
        inputs: &DeviceInputs<'_>,
        outputs: &DeviceOutputs<'_>,
        params: &LossParams,
        timestamps: Timestamps<'_>,
        phase: Phase,
    ) -> Result<Vec<&'static str>> {
        ctx.check_alive()?;
        if self.context != ctx.serial {
            return Err(Error::BadBuffer {
                role: "plan",
                reason: "it was made on another context; make a plan with Plan::new on the \
                         context you record with"
                    .into(),
            });
        }
        params.validate()?;
        let (b, c, d) = (
            self.shape.batch as u64,
            self.shape.classes as u64,
            self.shape.dim as u64,
        );
        let mut regions = vec![
            Region {
                role: "features",
                region: inputs.features,
                bytes: product(&[b, d, 4]),
            },
            Region {
                role: "classes",
                region: inputs.classes,
                bytes: product(&[c, d, 4]),
            },
            Region {
                role: "labels",
                region: inputs.labels,
                bytes: b * 4,
            },
            Region {
                role: "row_stats",
                region: outputs.row_stats,
                bytes: b * std::mem::size_of::<RowStats>() as u64,
            },
            Region {
                role: "summary",
                region: outputs.summary,
                bytes: std::mem::size_of::<Summary>() as u64,
            },
        ];
        if let Some(grads) = &outputs.grads {
            regions.push(Region {
                role: "grad_features",
                region: grads.features,
                bytes: product(&[b, d, 4]),
            });
            regions.push(Region {
                role: "grad_classes",
                region: grads.classes,
                bytes: product(&[c, d, 4]),
            });
        }
        for r in &regions {
            check_region(ctx, r)?;
        }
        check_aliasing(&regions)?;
        let g = &self.geometry;
        let stride = uniform_stride(ctx, PARAMS_BYTES);
        let passes = g.row_passes.len();
        // Rows `pad_rows` copies per chunk: x̂ with the first, w's rows where copied.
        let copied = copies_classes(self.shape, self.algorithm);
        let copy_rows = |k: usize| {
            (if k == 0 { b as u32 } else { 0 }) + if copied { g.chunks[k].classes } else { 0 }
        };
        let mut uniforms = vec![0u8; (stride * g.uniforms() as u64) as usize];
        let chunked = self.algorithm.engine() == Algorithm::Chunked;
        for (k, chunk) in g.chunks.iter().enumerate() {
            for (pass, &(row_begin, row_end)) in g.row_passes.iter().enumerate() {
                let mut gpu = GpuParams {
                    batch: b as u32,
                    dim: d as u32,
                    classes: chunk.classes,
                    total_classes: self.total_classes,
                    class_offset: chunk.class_offset,
                    row_begin,
                    row_end,
                    reduction: 0,
                    norm_feature_rows: if k == 0 { b as u32 } else { 0 },
                    scale: 0.0,
                    margin: 0.0,
                    scale_grad_gate: 0.0,
                    raw_classes: u32::from(chunked),
                    defer_norm: u32::from(chunked),
                    multiplicative_margin: 1,
                    angular_margin: 0.0,
                    cos_m2: 1.0,
                    sin_m2: 0.0,
                    objective: 0,
                    straight_through: 0,
                    write_grads: u32::from(chunked && outputs.grads.is_some() && !g.blocked),
                    logit_stride: g.logit_stride,
                    blocks: u32::from(g.blocked),
                    block_index: k as u32,
                    copy_rows: copy_rows(k),
                };
                gpu.set_loss(params);
                let at = (k * passes + pass) * stride as usize;
                uniforms[at..at + PARAMS_BYTES as usize].copy_from_slice(bytemuck::bytes_of(&gpu));
            }
        }
        // Through the encoder, not the queue: each recording's copy runs just before its
        // own dispatches, so recordings made before a submit keep their own parameters.
        // The upload buffer is this recording's alone: the queue fills it at the next
        // submit, before any command of that submit runs.
        let upload = ctx.create_buffer(
            "params upload",
            uniforms.len() as u64,
            wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
        );
        ctx.queue.write_buffer(&upload, 0, &uniforms);
        encoder.copy_buffer_to_buffer(&upload, 0, &self.params, 0, uniforms.len() as u64);
        if let Some((_, flags)) = self
            .workspace
            .iter()
            .find(|(b, _)| *b == Binding::InputFlags)
        {
            encoder.clear_buffer(flags, 0, None);
        }

        let k = &ctx.kernels;
        let max = ctx.limits.max_compute_workgroups_per_dimension;
        let per_row = |rows: u64| fold_grid(rows.div_ceil(u64::from(ROW_KERNEL_WORKGROUP)), max);
        let backward = outputs.grads.is_some();
        let rows_of = |k: usize| u64::from(g.chunks[k].classes) + if k == 0 { b } else { 0 };
        let once = |kernel, grid| Step {
            kernel,
            grid,
            chunk: 0,
            pass: 0,
            gemm: None,
        };
        let mut steps: Vec<Step<'_>> = Vec::new();
        for chunk in 0..g.chunks.len() {
            steps.push(Step {
                chunk,
                ..once(&k.row_inv_norms, per_row(rows_of(chunk))?)
            });
        }
        let matmul = |index: usize| -> Result<Step<'_>> {
            let spec = &self.gemms[index];
            let candidate = &ctx.kernels.candidates[spec.candidate];
            let grid = fold_grid(spec.shape.workgroups(candidate), max)?;
            Ok(Step {
                gemm: Some(index),
                chunk: self.gemms[index].chunk,
                ..once(k.matmul(spec.layout, spec.candidate), grid)
            })
        };
        let pieces = dim_pieces(d);
        let chunked_backward = backward && chunked;
        // A shard's backward from the dots its forward left (Plan::keeps_dots).
        let reuse_dots = phase == (Phase::ShardBackward { reuse_dots: true });
        // The blocked chunked plan's backward, which runs after the summary.
        let mut blocked_backward = Vec::new();
        {
            // x̂ (and w's copy), then per row chunk the dots and their
            // softmax rows. The chunked plan's backward turns each chunk's dots into G' in
            // the softmax pass (its 1/N deferred) and runs the gx̂ and gw' GEMMs on it.
            // x̂ with the first chunk; w's copy, where made, chunk by chunk.
            for chunk in 0..g.chunks.len() {
                let rows = u64::from(copy_rows(chunk));
                if rows > 0 && !reuse_dots {
                    steps.push(Step {
                        chunk,
                        ..once(&k.pad_rows, per_row(rows * pieces)?)
                    });
                }
            }
            // The GEMMs of each (pass, chunk), indexed once: its dots, and its gradient
            // products, in spec order.
            let mut by_block =
                vec![vec![(Vec::new(), Vec::new()); g.chunks.len()]; g.row_passes.len()];
            for (index, spec) in self.gemms.iter().enumerate() {
                let (dots, grads) = &mut by_block[spec.pass][spec.chunk];
                if spec.layout == GemmLayout::Dots {
                    dots.push(index);
                } else {
                    grads.push(index);
                }
            }
            let gemms = |pass: usize, chunk: usize, dots: bool| -> Result<Vec<Step<'_>>> {
                let (dot_specs, grad_specs) = &by_block[pass][chunk];
                let indices = if dots { dot_specs } else { grad_specs };
                indices.iter().map(|&index| matmul(index)).collect()
            };
            let row_grid = |(r0, r1): (u32, u32)| {
                fold_grid(
                    u64::from(r1 - r0).div_ceil(u64::from(ctx.tiles.rows_per_workgroup)),
                    max,
                )
            };
            let forward = matches!(phase, Phase::Whole | Phase::ShardForward);
            for (pass, &rows) in g.row_passes.iter().enumerate().filter(|_| forward) {
                if g.blocked {
                    // Each block's dots and its partial per row.
                    for chunk in 0..g.chunks.len() {
                        steps.extend(gemms(pass, chunk, true)?);
                        steps.push(Step {
                            pass,
                            chunk,
                            ..once(&k.logit_softmax_rows, row_grid(rows)?)
                        });
                    }
                } else {
                    // Whole rows: every chunk's dots, the softmax (and G') of the rows,
                    // then the gradient GEMMs.
                    for chunk in 0..g.chunks.len() {
                        steps.extend(gemms(pass, chunk, true)?);
                    }
                    steps.push(Step {
                        pass,
                        ..once(&k.logit_softmax_rows, row_grid(rows)?)
                    });
                    if chunked_backward {
                        for chunk in 0..g.chunks.len() {
                            steps.extend(gemms(pass, chunk, false)?);
                        }
                    }
                }
            }
            // A shard's forward leaves the blocks' partials to the caller.
            if g.blocked && phase == Phase::Whole {
                steps.push(once(&k.merge_rows, per_row(b)?));
            }
            if g.blocked && chunked_backward {
                // After the forward: each block's dots again (unless a shard's forward
                // left them), its G', its gradient GEMMs.
                blocked_backward = g
                    .row_passes
                    .iter()
                    .enumerate()
                    .map(|(pass, &rows)| -> Result<Vec<Step<'_>>> {
                        let mut steps = Vec::new();
                        for chunk in 0..g.chunks.len() {
                            if !reuse_dots {
                                steps.extend(gemms(pass, chunk, true)?);
                            }
                            steps.push(Step {
                                pass,
                                chunk,
                                ..once(&k.logit_grad_rows, row_grid(rows)?)
                            });
                            steps.extend(gemms(pass, chunk, false)?);
                        }
                        Ok(steps)
                    })
                    .collect::<Result<Vec<_>>>()?
                    .concat();
            }
        }
        if phase == Phase::Whole {
            steps.push(once(&k.summarize, (1, 1)));
        }
        if backward {
            match self.algorithm.engine() {
                Algorithm::Unfused => {
                    steps.push(once(&k.logit_grads, per_row(b * c)?));
                    // The gradient GEMMs: every one but the dots' k-pieces.
                    for index in 0..self.gemms.len() {
                        if self.gemms[index].layout != GemmLayout::Dots {
                            steps.push(matmul(index)?);
                        }
                    }
                }
                _ => steps.append(&mut blocked_backward),
            }
        }
        // Every plan's backward ends in the projections of gx̂ and gŵ (or gw'), per chunk.
        if backward {
            for chunk in 0..g.chunks.len() {
                let grid = per_row(rows_of(chunk) * pieces)?;
                if pieces > 1 {
                    steps.push(Step {
                        chunk,
                        ..once(&k.projection_dots, grid)
                    });
                }
                steps.push(Step {
                    chunk,
                    ..once(&k.normalize_backward, grid)
                });
            }
        }
        let dispatches = steps
            .iter()
            .map(|step| {
                let resources = step
                    .kernel
                    .bindings
                    .iter()
                    .map(|&binding| self.resource(ctx, binding, step, &regions))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Dispatch {
                    kernel: step.kernel,
                    grid: step.grid,
                    resources,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        encode(&ctx.device, encoder, &dispatches, timestamps)
    }

    /// The buffer bound at `binding` for `step`: the plan's workspace, or a
    /// caller's region. Class-indexed buffers are bound from the chunk's first class; for
    /// a matmul step, the GEMM bindings resolve through that GEMM's operands.
    fn resource<'b>(
        &'b self,
        ctx: &'b Context,
        binding: Binding,
        step: &Step<'_>,
        regions: &'b [Region<'b>],
    ) -> Result<wgpu::BufferBinding<'b>> {
        let internal = |what: &str| Error::Gpu(format!("internal: no buffer for {what}"));
        let part = self
            .geometry
            .chunks
            .get(step.chunk)
            .ok_or_else(|| internal("a chunk"))?;
        let gemm = step.gemm;
        let row_bytes = self.shape.dim as u64 * 4;
        // (first byte, bytes) of this chunk in a class-indexed buffer of `per_class` bytes a
        // class.
        let class_range = |per_class: u64| {
            (
                u64::from(part.class_offset) * per_class,
                u64::from(part.classes) * per_class,
            )
        };
        let caller = |role: &'static str, range: Option<(u64, u64)>| {
            let r = regions
                .iter()
                .find(|r| r.role == role)
                .ok_or(Error::BadBuffer {
                    role,
                    reason: "this pass needs it but none was given".into(),
                })?;
            let (skip, bytes) = range.unwrap_or((0, r.bytes));
            Ok(wgpu::BufferBinding {
                buffer: r.region.buffer,
                offset: r.region.offset + skip,
                size: std::num::NonZeroU64::new(bytes),
            })
        };
        let own = |binding: Binding, range: Option<(u64, u64)>| {
            let (_, buffer) = self
                .workspace
                .iter()
                .find(|(b, _)| *b == binding)
                .ok_or_else(|| internal(binding_name(binding)))?;
            Ok(match range {
                Some((offset, bytes)) => wgpu::BufferBinding {
                    buffer,
                    offset,
                    size: std::num::NonZeroU64::new(bytes),
                },
                None => whole(buffer),
            })
        };
        let operand = |pick: fn(&GemmSpec) -> Binding| {
            let spec = gemm
                .and_then(|index| self.gemms.get(index))
                .ok_or_else(|| internal("a GEMM operand outside a GEMM step"))?;
            let operand_step = Step {
                gemm: None,
                ..*step
            };
            self.resource(ctx, pick(spec), &operand_step, regions)
        };
        match binding {
            Binding::Params => Ok(wgpu::BufferBinding {
                buffer: &self.params,
                offset: (step.chunk * self.geometry.row_passes.len() + step.pass) as u64
                    * uniform_stride(ctx, PARAMS_BYTES),
                size: std::num::NonZeroU64::new(PARAMS_BYTES),
            }),
            Binding::Features => caller("features", None),
            Binding::ClassVectors => caller("classes", Some(class_range(row_bytes))),
            Binding::FeatureQuads | Binding::ClassQuads => {
                let scalars = if binding == Binding::FeatureQuads {
                    caller("features", None)?
                } else {
                    caller("classes", Some(class_range(row_bytes)))?
                };
                Ok(match scalars.size {
                    Some(size) if size.get() < 16 => whole(&ctx.quad_stand_in),
                    _ => scalars,
                })
            }
            Binding::Labels => caller("labels", None),
            Binding::RowStats => caller("row_stats", None),
            Binding::Summary => caller("summary", None),
            Binding::GradFeatures => caller("grad_features", None),
            Binding::GradClasses => caller("grad_classes", Some(class_range(row_bytes))),
            Binding::InvNormClasses => own(binding, Some(class_range(4))),
            Binding::PaddedClasses if copies_classes(self.shape, self.algorithm) => own(
                binding,
                Some(class_range(4 * padded(self.shape.dim as u64))),
            ),
            // One chunk (the GEMM algorithms): all of it, padding included.
            Binding::InvNormClassQuads => own(Binding::InvNormClasses, None),
            Binding::GemmShape => {
                let index = gemm.ok_or_else(|| internal("a GEMM shape outside a GEMM step"))?;
                let buffer = self
                    .gemm_shapes
                    .as_ref()
                    .ok_or_else(|| internal("GEMM shapes"))?;
                Ok(wgpu::BufferBinding {
                    buffer,
                    offset: index as u64 * uniform_stride(ctx, GEMM_SHAPE_BYTES),
                    size: std::num::NonZeroU64::new(GEMM_SHAPE_BYTES),
                })
            }
            Binding::GemmLhs => operand(|g| g.lhs),
            Binding::GemmRhs => operand(|g| g.rhs),
            Binding::GemmProduct => operand(|g| g.product),
            other => own(other, None),
        }
    }
}

fn whole(buffer: &wgpu::Buffer) -> wgpu::BufferBinding<'_> {
    wgpu::BufferBinding {
        buffer,
        offset: 0,
        size: None,
    }
}

/// The WGSL name of a binding, for labels and messages.
fn binding_name(binding: Binding) -> &'static str {
    match binding {
        Binding::Params => "params",
        Binding::Features => "features",
        Binding::ClassVectors => "class_vectors",
        Binding::Labels => "labels",
        Binding::InvNormFeatures => "inv_norm_features",
        Binding::InvNormClasses => "inv_norm_classes",
        Binding::InputFlags => "input_flags",
        Binding::SplitPartials => "split_partials",
        Binding::RowSoftmax => "row_softmax",
        Binding::RowStats => "row_stats",
        Binding::Summary => "summary",
        Binding::GradFeatures => "grad_features",
        Binding::GradClasses => "grad_classes",
        Binding::InvNormClassQuads => "inv_norm_class_quads",
        Binding::FeatureQuads => "feature_quads",
        Binding::ClassQuads => "class_quads",
        Binding::PaddedFeatures => "padded_features (x̂ in rows of D rounded up to 4)",
        Binding::PaddedClasses => "padded_classes (w in rows of D rounded up to 4)",
        Binding::ProjectionPieceDots => "projection_piece_dots",
        Binding::Logits => "logits (rows of a chunk × C, or × a class block)",
        Binding::GemmShape => "gemm",
        Binding::GemmLhs => "lhs",
        Binding::GemmRhs => "rhs",
        Binding::GemmProduct => "product",
    }
}

pub(crate) fn check_region(ctx: &Context, r: &Region<'_>) -> Result<()> {
    let bad = |reason: String| {
        Err(Error::BadBuffer {
            role: r.role,
            reason,
        })
    };
    let buffer = r.region.buffer;
    if !buffer.usage().contains(wgpu::BufferUsages::STORAGE) {
        return bad("it lacks BufferUsages::STORAGE; create it with STORAGE usage".into());
    }
    let align = u64::from(ctx.limits.min_storage_buffer_offset_alignment);
    if !r.region.offset.is_multiple_of(align) {
        return bad(format!(
            "offset {} is not a multiple of {align} (min_storage_buffer_offset_alignment)",
            r.region.offset
        ));
    }
    let end = r.region.offset.checked_add(r.bytes);
    if end.is_none_or(|end| end > buffer.size()) {
        return bad(format!(
            "it holds {} bytes but offset {} + {} bytes are needed; make it larger",
            buffer.size(),
            r.region.offset,
            r.bytes
        ));
    }
    probe_region(ctx, r)
}

/// Binds four bytes of the region, alone, inside an error scope: a buffer of another device
/// of the same wgpu instance is refused there (wgpu's validation error), and becomes
/// [`Error::BadBuffer`] before the caller's encoder is touched. A buffer of another wgpu
/// instance makes wgpu-core panic where its id is unknown here (caught, and the same
/// error); where its id happens to name one of this instance's buffers, wgpu cannot tell.
fn probe_region(ctx: &Context, r: &Region<'_>) -> Result<()> {
    let scope = ctx.device.push_error_scope(wgpu::ErrorFilter::Validation);
    let bound = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        ctx.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("region probe"),
            layout: &ctx.region_probe,
            entries: &[wgpu::BindGroupEntry {
                binding: 0,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer: r.region.buffer,
                    offset: r.region.offset,
                    // Four bytes tell the device; the range was checked above.
                    size: std::num::NonZeroU64::new(4),
                }),
            }],
        })
    }));
    let refused = pollster::block_on(scope.pop());
    match (bound, refused) {
        (Ok(_), None) => Ok(()),
        (_, Some(e)) => Err(Error::BadBuffer {
            role: r.role,
            reason: format!(
                "wgpu refused to bind it ({}); pass a buffer of this context's device \
                 (Context::from_device wraps an engine's own)",
                e.to_string()
                    .split_whitespace()
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
        }),
        (Err(_), None) => Err(Error::BadBuffer {
            role: r.role,
            reason: "it belongs to another wgpu instance; pass a buffer of this context's \
                     device (Context::from_device wraps an engine's own)"
                .into(),
        }),
    }
}
