//! The compute pipelines: one per WGSL entry point (and GEMM layout and candidate), each
//! compiled the first time a recording uses it, and the bindings each one reads; the
//! uniform structs of the families, mirrored from WGSL. Every shader module is
//! `shaders/common.wgsl`, the shared pieces it needs, then its family's file.

use crate::io::{ElementType, ElementTypes};
use crate::params::{LossParams, Objective, TargetGradient};

/// Binding numbers shared by every shader module (see the declarations in `shaders/`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Binding {
    Params = 0,
    Features = 1,
    ClassVectors = 2,
    Labels = 3,
    InvNormFeatures = 4,
    InvNormClasses = 5,
    InputFlags = 6,
    SplitPartials = 7,
    RowSoftmax = 8,
    RowStats = 9,
    Summary = 10,
    GradFeatures = 12,
    GradClasses = 13,
    PaddedFeatures = 14,
    PaddedClasses = 15,
    ProjectionPieceDots = 19,
    InvNormClassQuads = 17,
    Logits = 16,
    GemmShape = 20,
    GemmLhs = 21,
    GemmRhs = 22,
    GemmProduct = 23,
    SplitProducts = 24,
    FeatureQuads = 25,
    ClassQuads = 26,
    GradFeaturesOut = 27,
    GradClassesOut = 28,
    RowMargins = 29,
    HardThresholds = 30,
}

/// The workgroup shape of the GEMM and the softmax rows, set on the WGSL `override`
/// constants at pipeline creation. A GEMM workgroup covers `8·rows_per_workgroup` rows by
/// `8·classes_per_workgroup` columns (an 8×8 block per invocation); a softmax workgroup
/// takes `rows_per_workgroup` rows in `classes_per_workgroup` lanes, four classes a lane
/// at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Invocations along the row axis (WGSL `ROWS_WG`).
    pub rows_per_workgroup: u32,
    /// Invocations along the class axis (WGSL `CLASSES_WG`).
    pub classes_per_workgroup: u32,
}

impl Default for TileConfig {
    /// 8×8 invocations: 64×64 GEMM tiles.
    fn default() -> Self {
        TileConfig {
            rows_per_workgroup: 8,
            classes_per_workgroup: 8,
        }
    }
}

/// Classes one softmax lane reads at a time (a vec4).
const LANE_QUAD: u32 = 4;
/// Invocations per workgroup of the one-row-per-invocation kernels (WGSL `ROW_WG`).
pub(crate) const ROW_KERNEL_WORKGROUP: u32 = 64;
/// Values of a row one invocation of `pad_rows` and the projections covers (WGSL
/// `DIM_PIECE`): longer rows take one invocation per piece (llvmpipe's loop budget).
pub(crate) const DIM_PIECE: u32 = 4096;

impl TileConfig {
    /// Classes one softmax workgroup's lanes read in one step (a quad each): class
    /// chunks start at multiples of it.
    pub fn tile_classes(&self) -> u32 {
        self.classes_per_workgroup * LANE_QUAD
    }
}

/// Which options reweight the non-target cosines: the WGSL `override OTHER_TERMS` of the
/// forward and backward pipelines (bit 0 the inter-class filter, bit 1 CurricularFace),
/// so that a call without them runs the plain loop over classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OtherTerms(pub u32);

impl OtherTerms {
    /// Variants: every combination of the two bits.
    pub(crate) const COUNT: usize = 4;

    /// The options `params` turns on.
    pub(crate) fn of(params: &LossParams) -> OtherTerms {
        OtherTerms(
            u32::from(params.interclass_filter.is_some())
                | (u32::from(params.curricular.is_some()) << 1),
        )
    }
}

/// s and the margin function, the first member of the forward and backward uniforms.
/// Mirrors `struct LossTerms` in `shaders/margin.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct LossTerms {
    pub scale: f32,
    pub margin: f32,
    pub multiplicative_margin: u32,
    pub angular_margin: f32,
    pub cos_m2: f32,
    pub sin_m2: f32,
    pub objective: u32,
    pub straight_through: u32,
    pub per_row: u32,
    pub easy_margin: u32,
    pub filter_threshold: f32,
    pub angle_clip: u32,
    pub curricular_t: f32,
    pub _pad: [u32; 3],
}

impl LossTerms {
    /// The terms of `params`, with `per_row` where the call brings per-row margins.
    pub(crate) fn of(params: &LossParams, per_row: bool) -> LossTerms {
        LossTerms {
            scale: params.effective_scale(),
            margin: params.margin,
            multiplicative_margin: params.multiplicative_margin,
            angular_margin: params.angular_margin,
            cos_m2: params.angular_margin.cos(),
            sin_m2: params.angular_margin.sin(),
            objective: u32::from(params.objective == Objective::HardMargin),
            straight_through: u32::from(params.target_gradient == TargetGradient::StraightThrough),
            per_row: u32::from(per_row),
            easy_margin: u32::from(params.easy_margin),
            // Read only by the pipelines with the filter ([`OtherTerms`]).
            filter_threshold: params.interclass_filter.unwrap_or(0.0),
            angle_clip: u32::from(params.angle_clip),
            curricular_t: params.curricular.unwrap_or(0.0),
            _pad: [0; 3],
        }
    }
}

/// The uniform of the norms pass, one per class chunk. Mirrors `struct NormsParams` in
/// `shaders/norms.wgsl`, whose comments say what each field means.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct NormsParams {
    pub batch: u32,
    pub dim: u32,
    pub classes: u32,
    pub norm_feature_rows: u32,
    pub copy_rows: u32,
    pub raw_classes: u32,
    pub _pad: [u32; 2],
}

/// The uniform of the forward family, one per class chunk and row pass. Mirrors `struct
/// ForwardParams` in `shaders/forward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct ForwardParams {
    pub loss: LossTerms,
    pub batch: u32,
    pub classes: u32,
    pub total_classes: u32,
    pub class_offset: u32,
    pub row_begin: u32,
    pub row_end: u32,
    pub logit_stride: u32,
    pub blocks: u32,
    pub block_index: u32,
    pub write_grads: u32,
    pub raw_classes: u32,
    pub reduction: u32,
    pub scale_grad_gate: f32,
    pub _pad: [u32; 3],
}

/// The uniform of the backward family, one per class chunk. Mirrors `struct
/// BackwardParams` in `shaders/backward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct BackwardParams {
    pub loss: LossTerms,
    pub batch: u32,
    pub dim: u32,
    pub classes: u32,
    pub total_classes: u32,
    pub norm_feature_rows: u32,
    pub reduction: u32,
    pub raw_classes: u32,
    pub defer_norm: u32,
    pub logit_stride: u32,
    pub loss_scale: f32,
    pub rounded_features: u32,
    pub rounded_classes: u32,
}

/// Bytes of the largest family uniform: the stride of the plan's uniform slots.
pub(crate) const FAMILY_UNIFORM_BYTES: u64 = {
    let sizes = [
        std::mem::size_of::<NormsParams>(),
        std::mem::size_of::<ForwardParams>(),
        std::mem::size_of::<BackwardParams>(),
    ];
    let mut max = 0;
    let mut i = 0;
    while i < sizes.len() {
        if sizes[i] > max {
            max = sizes[i];
        }
        i += 1;
    }
    max as u64
};

/// Rows (and columns) of the product one `matmul` invocation owns, in quads of four
/// (WGSL `ROW_QUADS`, `COL_QUADS` in `shaders/gemm.wgsl`): an 8×8 register block.
pub(crate) const GEMM_QUADS: u32 = 2;

/// Elements `n` rounded up to a multiple of 4: the row length the GEMMs read as vec4s.
pub(crate) fn padded(n: u64) -> u64 {
    n.next_multiple_of(4)
}

/// Which axis of each GEMM operand is contiguous (WGSL `LHS_ALONG_K`, `RHS_ALONG_K`):
/// one `matmul` pipeline per product of the loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GemmLayout {
    /// lhs·rhsᵀ with both operands' rows along k: the dots x̂·wᵀ (or x̂·ŵᵀ).
    Dots,
    /// lhs·rhs with lhs along k and rhs along n: gx̂ = G·w.
    FeatureGrad,
    /// lhsᵀ·rhs: lhs along m and rhs along n: gŵ = Gᵀ·x̂.
    ClassGrad,
}

impl GemmLayout {
    /// Every layout, in declaration order.
    pub(crate) const ALL: [GemmLayout; 3] = [
        GemmLayout::Dots,
        GemmLayout::FeatureGrad,
        GemmLayout::ClassGrad,
    ];

    /// Its names in the tuner's cache, per storage type of the rhs (f32, f16, bf16).
    pub(crate) const KEYS: [[&'static str; 3]; 3] = [
        ["dots", "dots_f16", "dots_bf16"],
        ["feature_grad", "feature_grad_f16", "feature_grad_bf16"],
        ["class_grad", "class_grad_f16", "class_grad_bf16"],
    ];

    /// Its name in the tuner's cache with its rhs stored as `rhs`: `dots`,
    /// `feature_grad`, `class_grad` for f32, with `_f16` or `_bf16` after them otherwise.
    pub(crate) fn key(self, rhs: ElementType) -> &'static str {
        GemmLayout::KEYS[self as usize][rhs.code() as usize]
    }

    /// The kernel's name in the benchmark's profile.
    fn name(self) -> &'static str {
        match self {
            GemmLayout::Dots => "matmul x·wᵀ",
            GemmLayout::FeatureGrad => "matmul G·w",
            GemmLayout::ClassGrad => "matmul Gᵀ·x",
        }
    }

    /// (lhs contiguous along k, rhs contiguous along k).
    pub(crate) fn along_k(self) -> (bool, bool) {
        match self {
            GemmLayout::Dots => (true, true),
            GemmLayout::FeatureGrad => (true, false),
            GemmLayout::ClassGrad => (false, false),
        }
    }
}

/// Sizes, strides and offsets (in f32 elements; strides and operand offsets multiples
/// of 4) of one GEMM. Mirrors `struct GemmShape` in `shaders/gemm.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GemmShape {
    pub m: u32,
    pub n: u32,
    pub k: u32,
    pub lhs_stride: u32,
    pub rhs_stride: u32,
    pub product_stride: u32,
    pub lhs_offset: u32,
    pub rhs_offset: u32,
    pub product_offset: u32,
    pub accumulate: u32,
    pub run_quads: u32,
    pub split_k: u32,
    pub splits: u32,
    pub _pad: [u32; 3],
}

impl GemmShape {
    /// product (m×n, rows `product_stride` apart) = lhs (m×k) · rhs (k×n), with rows of
    /// lhs and rhs `lhs_stride` and `rhs_stride` apart along their non-contiguous axis;
    /// no offsets, accumulation or split, and the runs of its k ([`run_quads`]).
    pub(crate) fn new(
        (m, n, k): (u32, u32, u32),
        lhs_stride: u32,
        rhs_stride: u32,
        product_stride: u32,
    ) -> GemmShape {
        GemmShape {
            m,
            n,
            k,
            lhs_stride,
            rhs_stride,
            product_stride,
            lhs_offset: 0,
            rhs_offset: 0,
            product_offset: 0,
            accumulate: 0,
            run_quads: run_quads(k),
            split_k: k,
            splits: 1,
            _pad: [0; 3],
        }
    }

    /// A uniform buffer holding this shape.
    pub(crate) fn uniform(&self, device: &wgpu::Device, label: &str) -> wgpu::Buffer {
        use wgpu::util::DeviceExt;
        device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some(label),
            contents: bytemuck::bytes_of(self),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// Workgroups of `candidate` for this product: one per tile of the product and split.
    pub(crate) fn workgroups(&self, candidate: &GemmCandidate) -> u64 {
        let (rows, cols) = candidate.tile();
        u64::from(self.m.div_ceil(rows))
            * u64::from(self.n.div_ceil(cols))
            * u64::from(self.splits.max(1))
    }
}

/// Quads of k a GEMM sums in one run before adding the run to its total (WGSL
/// `end_run`), for sums of k values: the power of two r with r² ≥ k/4 > (r/2)² (32 for
/// the 4096 of a piece), so that a sum of n quads is a chain of about √n additions per
/// run and one of √n runs. A function of k alone, so that every candidate sums the same
/// way.
pub(crate) fn run_quads(k: u32) -> u32 {
    let quads = k.div_ceil(4).max(1);
    let mut run = 1u32;
    while run * run < quads {
        run *= 2;
    }
    run
}

/// One way to run the GEMM (`shaders/gemm.wgsl`): a workgroup shape, and whether the
/// operands are staged in workgroup memory. Every candidate computes each element of the
/// product with the same operations in the same order (`block_product`, over k in
/// order), so that the choice of candidate never changes a bit of the result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct GemmCandidate {
    /// Its name, for `ContextOptions::gemm_candidate`, the tuner and the benchmark.
    pub name: &'static str,
    /// Invocations along the product's rows; each owns 8 rows.
    pub rows_per_workgroup: u32,
    /// Invocations along the product's columns; each owns 8 columns.
    pub cols_per_workgroup: u32,
    /// True: the operands of a K tile of 16 are loaded once per workgroup into workgroup
    /// memory; false: each invocation loads its own from storage (registers only).
    pub staged: bool,
}

impl GemmCandidate {
    /// Rows and columns of the product one workgroup covers.
    pub fn tile(&self) -> (u32, u32) {
        (
            self.rows_per_workgroup * 4 * GEMM_QUADS,
            self.cols_per_workgroup * 4 * GEMM_QUADS,
        )
    }

    /// Bytes of workgroup memory it uses: a K tile of 16 of both operands (a 4×4 matrix
    /// of f32 per quad of rows or columns and quad of k).
    pub fn workgroup_bytes(&self) -> u32 {
        if self.staged {
            64 * 4 * GEMM_QUADS * (self.rows_per_workgroup + self.cols_per_workgroup)
        } else {
            0
        }
    }

    /// Whether the adapter's limits allow it.
    fn fits(&self, limits: &wgpu::Limits) -> bool {
        self.rows_per_workgroup * self.cols_per_workgroup
            <= limits.max_compute_invocations_per_workgroup
            && self.rows_per_workgroup <= limits.max_compute_workgroup_size_y
            && self.cols_per_workgroup <= limits.max_compute_workgroup_size_x
            && self.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
    }
}

/// The GEMM candidates of a context whose tiles are `tiles`: first the register-only
/// kernel on the tiles' workgroup shape (the default), then tiles staged in workgroup
/// memory: 64×64 (8 KiB), 128×128 (16 KiB) and 32×32 (4 KiB), those the limits allow.
pub(crate) fn gemm_candidates(tiles: TileConfig, limits: &wgpu::Limits) -> Vec<GemmCandidate> {
    let staged = |name, invocations| GemmCandidate {
        name,
        rows_per_workgroup: invocations,
        cols_per_workgroup: invocations,
        staged: true,
    };
    let register = GemmCandidate {
        name: "register",
        rows_per_workgroup: tiles.rows_per_workgroup,
        cols_per_workgroup: tiles.classes_per_workgroup,
        staged: false,
    };
    [
        register,
        staged("staged-64", 8),
        staged("staged-128", 16),
        staged("staged-32", 4),
    ]
    .into_iter()
    .filter(|c| !c.staged || c.fits(limits))
    .collect()
}

/// One compute pipeline and the bindings its entry point uses, in binding order.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub bindings: &'static [Binding],
    /// The entry point, with the product for `matmul`: the benchmark's profile rows.
    pub name: &'static str,
    /// Its family, whose uniform it reads.
    pub family: Family,
}

/// The shader families, one module each: `shaders/common.wgsl`, the shared pieces it
/// needs (`rows.wgsl`, `margin.wgsl`) and the family's file. Each but the GEMM reads its
/// own uniform at binding 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Family {
    Norms,
    Forward,
    Backward,
    Gemm,
}

impl Family {
    const COUNT: usize = 4;
}

/// The entry points of the loss other than the GEMM's `matmul` (see [`Kernels::matmul`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Entry {
    RowInvNorms,
    PadRows,
    LogitSoftmaxRows,
    LogitGradRows,
    MergeRows,
    Summarize,
    LogitGrads,
    ProjectionDots,
    NormalizeBackward,
    SumSplits,
    RoundGradients,
}

impl Entry {
    const COUNT: usize = 11;

    /// Its WGSL name, its module, and the bindings it uses.
    fn spec(self) -> (&'static str, Family, &'static [Binding]) {
        match self {
            Entry::RowInvNorms => ("row_inv_norms", Family::Norms, ROW_INV_NORMS_BINDINGS),
            Entry::PadRows => ("pad_rows", Family::Norms, PAD_ROWS_BINDINGS),
            Entry::LogitSoftmaxRows => (
                "logit_softmax_rows",
                Family::Forward,
                LOGIT_SOFTMAX_ROWS_BINDINGS,
            ),
            Entry::LogitGradRows => ("logit_grad_rows", Family::Forward, LOGIT_GRAD_ROWS_BINDINGS),
            Entry::MergeRows => ("merge_rows", Family::Forward, MERGE_ROWS_BINDINGS),
            Entry::Summarize => ("summarize", Family::Forward, SUMMARIZE_BINDINGS),
            Entry::LogitGrads => ("logit_grads", Family::Backward, LOGIT_GRADS_BINDINGS),
            Entry::ProjectionDots => (
                "projection_dots",
                Family::Backward,
                PROJECTION_DOTS_BINDINGS,
            ),
            Entry::NormalizeBackward => (
                "normalize_backward",
                Family::Backward,
                NORMALIZE_BACKWARD_BINDINGS,
            ),
            Entry::SumSplits => ("sum_splits", Family::Gemm, SUM_SPLITS_BINDINGS),
            Entry::RoundGradients => (
                "round_gradients",
                Family::Backward,
                ROUND_GRADIENTS_BINDINGS,
            ),
        }
    }
}

/// The bindings of `row_inv_norms`, in binding order.
const ROW_INV_NORMS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Features,
    Binding::ClassVectors,
    Binding::FeatureQuads,
    Binding::ClassQuads,
    Binding::InvNormFeatures,
    Binding::InvNormClasses,
    Binding::InputFlags,
];
/// The bindings of `pad_rows`, in binding order.
const PAD_ROWS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Features,
    Binding::ClassVectors,
    Binding::InvNormFeatures,
    Binding::InvNormClasses,
    Binding::PaddedFeatures,
    Binding::PaddedClasses,
];
/// The bindings of `logit_softmax_rows`, in binding order.
const LOGIT_SOFTMAX_ROWS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Labels,
    Binding::InvNormClassQuads,
    Binding::SplitPartials,
    Binding::RowSoftmax,
    Binding::RowStats,
    Binding::Logits,
    Binding::RowMargins,
    Binding::HardThresholds,
];
/// The bindings of `logit_grad_rows`, in binding order.
const LOGIT_GRAD_ROWS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Labels,
    Binding::InvNormClassQuads,
    Binding::RowSoftmax,
    Binding::RowStats,
    Binding::Logits,
    Binding::RowMargins,
    Binding::HardThresholds,
];
/// The bindings of `merge_rows`, in binding order.
const MERGE_ROWS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Labels,
    Binding::SplitPartials,
    Binding::RowSoftmax,
    Binding::RowStats,
    Binding::RowMargins,
];
/// The bindings of `summarize`, in binding order.
const SUMMARIZE_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Labels,
    Binding::InputFlags,
    Binding::RowSoftmax,
    Binding::RowStats,
    Binding::Summary,
    Binding::RowMargins,
];
/// The bindings of `logit_grads`, in binding order.
const LOGIT_GRADS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Labels,
    Binding::RowSoftmax,
    Binding::Summary,
    Binding::Logits,
    Binding::RowMargins,
    Binding::HardThresholds,
];
/// The bindings of `projection_dots`, in binding order.
const PROJECTION_DOTS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Features,
    Binding::ClassVectors,
    Binding::InvNormFeatures,
    Binding::InvNormClasses,
    Binding::GradFeatures,
    Binding::GradClasses,
    Binding::ProjectionPieceDots,
];
/// The bindings of `normalize_backward`, in binding order.
const NORMALIZE_BACKWARD_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Features,
    Binding::ClassVectors,
    Binding::InvNormFeatures,
    Binding::InvNormClasses,
    Binding::Summary,
    Binding::GradFeatures,
    Binding::GradClasses,
    Binding::ProjectionPieceDots,
];
/// The bindings of `round_gradients`, in binding order.
const ROUND_GRADIENTS_BINDINGS: &[Binding] = &[
    Binding::Params,
    Binding::Summary,
    Binding::GradFeatures,
    Binding::GradClasses,
    Binding::GradFeaturesOut,
    Binding::GradClassesOut,
];
/// The bindings of `sum_splits`, in binding order.
const SUM_SPLITS_BINDINGS: &[Binding] = &[
    Binding::GemmShape,
    Binding::GemmProduct,
    Binding::SplitProducts,
];

/// Every pipeline of the fused loss, each compiled the first time a recording uses it
/// (as is its module), so that a call compiles only what its plan runs and more GEMM
/// candidates add no start-up time.
#[derive(Debug)]
pub(crate) struct Kernels {
    /// Per [`Entry`], in its declaration order, and per storage types
    /// ([`ElementTypes::key`]; the forward and the GEMM's `sum_splits` read none of the
    /// tensors stored in them, and take key 0).
    entries: Vec<std::sync::OnceLock<Kernel>>,
    /// `matmul` per GemmLayout, in its declaration order, per storage type of the rhs
    /// (f32, f16, bf16) and per candidate.
    matmul: [[Vec<std::sync::OnceLock<Kernel>>; 3]; 3],
    /// The GEMM candidates this device allows; the first is the default.
    pub candidates: Vec<GemmCandidate>,
    /// Per [`Family`], in its declaration order, then the GEMM module whose rhs is
    /// stored in 16 bits (gemm_rhs_half.wgsl).
    modules: [std::sync::OnceLock<wgpu::ShaderModule>; 5],
    /// The GEMM module's lhs loader (gemm_lhs_loads.wgsl or gemm_lhs_subgroup.wgsl).
    lhs_loader: &'static str,
    tiles: TileConfig,
    device: wgpu::Device,
}

pub(crate) const NORMS_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/rows.wgsl"),
    include_str!("../shaders/norms.wgsl")
);
pub(crate) const FORWARD_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/margin.wgsl"),
    include_str!("../shaders/forward.wgsl")
);
pub(crate) const BACKWARD_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/margin.wgsl"),
    include_str!("../shaders/rows.wgsl"),
    include_str!("../shaders/backward.wgsl")
);
const GEMM_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/gemm.wgsl")
);
/// The rhs declaration and loader of an f32 rhs.
const GEMM_RHS_F32_WGSL: &str = include_str!("../shaders/gemm_rhs_f32.wgsl");
/// The rhs declaration and loader of a 16-bit rhs (w in f16 or bf16).
const GEMM_RHS_HALF_WGSL: &str = include_str!("../shaders/gemm_rhs_half.wgsl");
/// Storage types of the tensors the kernels read or write in 16 bits ([`ElementTypes::key`]).
const ELEMENT_KEYS: usize = 81;
/// The lhs loader where each invocation loads its own block.
const GEMM_LHS_LOADS_WGSL: &str = include_str!("../shaders/gemm_lhs_loads.wgsl");
/// The lhs loader where an 8-wide subgroup shares the block.
const GEMM_LHS_SUBGROUP_WGSL: &str = include_str!("../shaders/gemm_lhs_subgroup.wgsl");

/// Whether the GEMM's lhs block can be shared by subgroups (gemm_lhs_subgroup.wgsl):
/// subgroups of exactly 8 invocations (llvmpipe), enabled on the device, and 8
/// invocations along a workgroup's rows, so that a subgroup is one row of it. That last
/// step assumes subgroups take consecutive local invocation indices, which neither
/// WebGPU nor Vulkan promises but llvmpipe does (its SIMD lanes); the tests run this path
/// there and the per-invocation loader on every other tile shape.
pub(crate) fn shares_lhs(device: &wgpu::Device, tiles: TileConfig) -> bool {
    let info = device.adapter_info();
    device.features().contains(wgpu::Features::SUBGROUP)
        && info.subgroup_min_size == 8
        && info.subgroup_max_size == 8
        && tiles.classes_per_workgroup == 8
}

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, tiles: TileConfig) -> Kernels {
        let lhs_loader = if shares_lhs(device, tiles) {
            GEMM_LHS_SUBGROUP_WGSL
        } else {
            GEMM_LHS_LOADS_WGSL
        };
        let candidates = gemm_candidates(tiles, &device.limits());
        Kernels {
            entries: (0..Entry::COUNT * ELEMENT_KEYS * OtherTerms::COUNT)
                .map(|_| Default::default())
                .collect(),
            matmul: GemmLayout::ALL
                .map(|_| [(); 3].map(|_| candidates.iter().map(|_| Default::default()).collect())),
            candidates,
            modules: Default::default(),
            lhs_loader,
            tiles,
            device: device.clone(),
        }
    }

    /// The pipeline of `entry` for tensors stored as `elements` and the non-target
    /// options `other`, compiled on first use.
    pub(crate) fn kernel(
        &self,
        entry: Entry,
        elements: ElementTypes,
        other: OtherTerms,
    ) -> crate::Result<&Kernel> {
        let (name, family, bindings) = entry.spec();
        // Only the norms and the backward read or write x, w and their gradients; only
        // the forward and the backward have the margin (and so the options).
        let typed = matches!(family, Family::Norms | Family::Backward);
        let margined = matches!(family, Family::Forward | Family::Backward);
        let key = if typed { elements.key() } else { 0 };
        let variant = if margined { other.0 as usize } else { 0 };
        let slot = (entry as usize * ELEMENT_KEYS + key) * OtherTerms::COUNT + variant;
        self.compiled(&self.entries[slot], || {
            let mut constants = vec![
                ("ROWS_WG", f64::from(self.tiles.rows_per_workgroup)),
                ("CLASSES_WG", f64::from(self.tiles.classes_per_workgroup)),
            ];
            if margined {
                constants.push(("OTHER_TERMS", f64::from(other.0)));
            }
            // rows.wgsl's piece length and the storage types, in the modules that use them.
            if typed {
                constants.push(("DIM_PIECE", f64::from(DIM_PIECE)));
                constants.push(("FEATURES_ELEMENT", f64::from(elements.features.code())));
                constants.push(("CLASSES_ELEMENT", f64::from(elements.classes.code())));
            }
            if family == Family::Backward {
                let (gx, gw) = (elements.grad_features, elements.grad_classes);
                constants.push(("GRAD_FEATURES_ELEMENT", f64::from(gx.code())));
                constants.push(("GRAD_CLASSES_ELEMENT", f64::from(gw.code())));
            }
            self.compile(family, name, &constants, bindings, name)
        })
    }

    /// The `matmul` pipeline of `layout` for candidate `candidate` (an index into
    /// [`Kernels::candidates`]) with its rhs stored as `rhs`, compiled on first use.
    pub(crate) fn matmul(
        &self,
        layout: GemmLayout,
        rhs: ElementType,
        candidate: usize,
    ) -> crate::Result<&Kernel> {
        let c = &self.candidates[candidate];
        let (lhs_along_k, rhs_along_k) = layout.along_k();
        let mut constants = vec![
            ("ROWS_WG", f64::from(c.rows_per_workgroup)),
            ("CLASSES_WG", f64::from(c.cols_per_workgroup)),
            ("LHS_ALONG_K", f64::from(u8::from(lhs_along_k))),
            ("RHS_ALONG_K", f64::from(u8::from(rhs_along_k))),
        ];
        if rhs != ElementType::F32 {
            constants.push(("RHS_ELEMENT", f64::from(rhs.code())));
        }
        let entry = if c.staged { "matmul_staged" } else { "matmul" };
        use Binding::*;
        let cell = &self.matmul[layout as usize][rhs.code() as usize][candidate];
        self.compiled(cell, || {
            self.compile_in(
                Self::gemm_module_index(rhs),
                entry,
                &constants,
                &[GemmShape, GemmLhs, GemmRhs, GemmProduct],
                layout.name(),
                Family::Gemm,
            )
        })
    }

    /// The index in `modules` of the GEMM module for an rhs stored as `rhs`.
    fn gemm_module_index(rhs: ElementType) -> usize {
        if rhs == ElementType::F32 {
            Family::Gemm as usize
        } else {
            Family::COUNT
        }
    }

    /// The kernel in `cell`, made by `make` the first time. Two threads may compile it
    /// at once: the first kept serves both.
    fn compiled<'k>(
        &'k self,
        cell: &'k std::sync::OnceLock<Kernel>,
        make: impl FnOnce() -> crate::Result<Kernel>,
    ) -> crate::Result<&'k Kernel> {
        if let Some(kernel) = cell.get() {
            return Ok(kernel);
        }
        let _ = cell.set(make()?);
        cell.get()
            .ok_or_else(|| crate::Error::Gpu("internal: a pipeline was not kept".into()))
    }

    /// One pipeline of `family`'s module (made first if need be), inside error scopes,
    /// so that a module or pipeline the device refuses is an error, not a panic.
    fn compile(
        &self,
        family: Family,
        entry: &'static str,
        constants: &[(&str, f64)],
        bindings: &'static [Binding],
        name: &'static str,
    ) -> crate::Result<Kernel> {
        self.compile_in(family as usize, entry, constants, bindings, name, family)
    }

    /// [`Kernels::compile`] from module `module_index` of `modules`.
    fn compile_in(
        &self,
        module_index: usize,
        entry: &'static str,
        constants: &[(&str, f64)],
        bindings: &'static [Binding],
        name: &'static str,
        family: Family,
    ) -> crate::Result<Kernel> {
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let scope = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let module = self.modules[module_index].get_or_init(|| self.module(module_index));
        let pipeline = self
            .device
            .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            });
        let refused = pollster::block_on(scope.pop());
        if let Some(e) = pollster::block_on(internal.pop()).or(refused) {
            return Err(crate::Error::Gpu(e.to_string()));
        }
        Ok(Kernel {
            pipeline,
            bindings,
            name,
            family,
        })
    }

    /// The shader module of `family`. Every check stays on. The GEMM module alone drops
    /// naga's forced loop bound: its extra counter hides the trip counts of the
    /// register-block loops from the driver, which then cannot unroll them and keeps the
    /// 8×8 block in memory (half the GEMM speed on llvmpipe). The other modules keep it:
    /// unrolling their loops gains nothing there and multiplies their compile time.
    fn module(&self, module_index: usize) -> wgpu::ShaderModule {
        let gemm_source;
        let is_gemm = module_index >= Family::Gemm as usize;
        let (label, source) = match module_index {
            0 => ("norms.wgsl", NORMS_WGSL),
            1 => ("forward.wgsl", FORWARD_WGSL),
            2 => ("backward.wgsl", BACKWARD_WGSL),
            _ => {
                let rhs = if module_index == Family::COUNT {
                    GEMM_RHS_HALF_WGSL
                } else {
                    GEMM_RHS_F32_WGSL
                };
                gemm_source = format!("{GEMM_WGSL}{}{rhs}", self.lhs_loader);
                ("gemm.wgsl", gemm_source.as_str())
            }
        };
        let mut checks = wgpu::ShaderRuntimeChecks::checked();
        checks.force_loop_bounding = !is_gemm;
        let descriptor = wgpu::ShaderModuleDescriptor {
            label: Some(label),
            source: wgpu::ShaderSource::Wgsl(source.into()),
        };
        // SAFETY: the only check ever turned off is the forced loop bound, which the
        // caller may drop when no shader loop can run forever. Every loop of the GEMM
        // module (gemm.wgsl, its lhs loaders, and common.wgsl's functions, which the GEMM
        // never calls) counts a u32 up by 1 or 4 to a bound fixed before the loop: a
        // constant, k/4 of a uniform GemmShape (at most 2³⁰), its split count, or D,
        // below 2³² − 4 as every size fits one binding; none wraps around.
        unsafe { self.device.create_shader_module_trusted(descriptor, checks) }
    }
}

/// One dispatch: a kernel, its grid, and the buffer bound at each of its bindings.
pub(crate) struct Dispatch<'a> {
    pub kernel: &'a Kernel,
    pub grid: (u32, u32),
    pub resources: Vec<wgpu::BufferBinding<'a>>,
}

/// Where a recording writes GPU timestamps.
#[derive(Clone, Copy)]
pub enum Timestamps<'a> {
    /// Nowhere.
    Off,
    /// At the beginning and end of its compute pass: queries 0 and 1.
    Pass(&'a wgpu::QuerySet),
    /// Around each dispatch, each in a pass of its own: queries 2·i and 2·i + 1 for
    /// dispatch i, in a set of `capacity` queries (the benchmark's per-kernel profile).
    PerDispatch {
        /// The query set.
        set: &'a wgpu::QuerySet,
        /// Its number of queries.
        capacity: u32,
    },
}

/// Records `dispatches` in order into one compute pass of `encoder` (one pass per
/// dispatch for a profile), with the timestamps asked for. Returns the kernels' names
/// in dispatch order.
pub(crate) fn encode(
    device: &wgpu::Device,
    encoder: &mut wgpu::CommandEncoder,
    dispatches: &[Dispatch<'_>],
    timestamps: Timestamps<'_>,
) -> crate::Result<Vec<&'static str>> {
    let groups = bind_groups(device, dispatches);
    encode_bound(encoder, dispatches, &groups, timestamps)
}

/// The bind group of every dispatch, in order.
pub(crate) fn bind_groups(
    device: &wgpu::Device,
    dispatches: &[Dispatch<'_>],
) -> Vec<wgpu::BindGroup> {
    dispatches
        .iter()
        .map(|d| {
            let entries: Vec<wgpu::BindGroupEntry<'_>> = d
                .kernel
                .bindings
                .iter()
                .zip(&d.resources)
                .map(|(&binding, resource)| wgpu::BindGroupEntry {
                    binding: binding as u32,
                    resource: wgpu::BindingResource::Buffer(resource.clone()),
                })
                .collect();
            device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: None,
                layout: &d.kernel.pipeline.get_bind_group_layout(0),
                entries: &entries,
            })
        })
        .collect()
}

/// Records `dispatches` with their bind groups `groups` into `encoder`.
pub(crate) fn encode_bound(
    encoder: &mut wgpu::CommandEncoder,
    dispatches: &[Dispatch<'_>],
    groups: &[wgpu::BindGroup],
    timestamps: Timestamps<'_>,
) -> crate::Result<Vec<&'static str>> {
    let writes = |query_set, first: u32| wgpu::ComputePassTimestampWrites {
        query_set,
        beginning_of_pass_write_index: Some(first),
        end_of_pass_write_index: Some(first + 1),
    };
    let begin = |encoder: &mut wgpu::CommandEncoder, timestamp_writes| {
        encoder
            .begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("margin-softmax"),
                timestamp_writes,
            })
            .forget_lifetime()
    };
    let mut pass = match timestamps {
        Timestamps::Off => Some(begin(encoder, None)),
        Timestamps::Pass(set) => Some(begin(encoder, Some(writes(set, 0)))),
        Timestamps::PerDispatch { capacity, .. } => {
            let needed = 2 * dispatches.len() as u64;
            if needed > u64::from(capacity) {
                return Err(crate::Error::TooLarge {
                    what: "timestamp queries of a per-dispatch profile",
                    size: needed,
                    limit: u64::from(capacity),
                });
            }
            None
        }
    };
    for (index, (d, group)) in dispatches.iter().zip(groups).enumerate() {
        if let Timestamps::PerDispatch { set, .. } = timestamps {
            // The previous pass ends before the next begins.
            drop(pass.take());
            pass = Some(begin(encoder, Some(writes(set, 2 * index as u32))));
        }
        if let Some(pass) = pass.as_mut() {
            pass.set_pipeline(&d.kernel.pipeline);
            pass.set_bind_group(0, group, &[]);
            pass.dispatch_workgroups(d.grid.0, d.grid.1, 1);
        }
    }
    Ok(dispatches.iter().map(|d| d.kernel.name).collect())
}

/// A 1-D grid of `n` workgroups as (x, y) with x ≤ `max`; kernels skip the excess.
pub(crate) fn fold_grid(n: u64, max: u32) -> crate::Result<(u32, u32)> {
    let max64 = u64::from(max);
    let y = n.div_ceil(max64).max(1);
    if y > max64 {
        return Err(crate::Error::TooLarge {
            what: "workgroups of one dispatch",
            size: n,
            limit: max64 * max64,
        });
    }
    Ok((n.div_ceil(y) as u32, y as u32))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::offset_of;
    use wgpu::naga;

    /// The uniform at @group(0) @binding(`binding`) of `source`, validated as naga
    /// validates it for wgpu: its size and its members' (name, byte offset).
    fn wgsl_uniform(source: &str, binding: u32) -> (u32, Vec<(String, u32)>) {
        let module = naga::front::wgsl::parse_str(source).expect("the WGSL parses");
        naga::valid::Validator::new(
            naga::valid::ValidationFlags::all(),
            naga::valid::Capabilities::all(),
        )
        .validate(&module)
        .expect("the WGSL validates, uniform layout rules included");
        let mut layouter = naga::proc::Layouter::default();
        layouter
            .update(module.to_ctx())
            .expect("the WGSL types lay out");
        let (_, global) = module
            .global_variables
            .iter()
            .find(|(_, g)| {
                g.space == naga::AddressSpace::Uniform
                    && g.binding.as_ref().map(|b| (b.group, b.binding)) == Some((0, binding))
            })
            .expect("a uniform at the binding");
        let members = match &module.types[global.ty].inner {
            naga::TypeInner::Struct { members, .. } => members
                .iter()
                .map(|m| (m.name.clone().unwrap_or_default(), m.offset))
                .collect(),
            other => panic!("the uniform is not a struct: {other:?}"),
        };
        (layouter[global.ty].size, members)
    }

    /// (name, offset) of each named field of a Rust mirror, padding left out.
    macro_rules! fields {
        ($t:ty: $($f:ident),*) => {
            vec![$((stringify!($f).to_string(), offset_of!($t, $f) as u32)),*]
        };
    }

    /// Each family's uniform struct in WGSL has the size of its Rust mirror, and every
    /// field of the mirror is a member of the WGSL struct, of the same name, at the same
    /// byte offset, in the same order (the padding members aside).
    #[test]
    fn every_uniform_struct_matches_its_rust_mirror() {
        let gemm_source = format!("{GEMM_WGSL}{GEMM_LHS_LOADS_WGSL}{GEMM_RHS_F32_WGSL}");
        let norms = fields!(NormsParams: batch, dim, classes, norm_feature_rows, copy_rows,
            raw_classes);
        let forward = fields!(ForwardParams: loss, batch, classes, total_classes,
            class_offset, row_begin, row_end, logit_stride, blocks, block_index, write_grads,
            raw_classes, reduction, scale_grad_gate);
        let backward = fields!(BackwardParams: loss, batch, dim, classes, total_classes,
            norm_feature_rows, reduction, raw_classes, defer_norm, logit_stride, loss_scale,
            rounded_features, rounded_classes);
        let gemm = fields!(GemmShape: m, n, k, lhs_stride, rhs_stride, product_stride,
            lhs_offset, rhs_offset, product_offset, accumulate, run_quads, split_k, splits);
        let cases = [
            ("norms", NORMS_WGSL, 0, size_of::<NormsParams>(), norms),
            (
                "forward",
                FORWARD_WGSL,
                0,
                size_of::<ForwardParams>(),
                forward,
            ),
            (
                "backward",
                BACKWARD_WGSL,
                0,
                size_of::<BackwardParams>(),
                backward,
            ),
            (
                "gemm",
                gemm_source.as_str(),
                20,
                size_of::<GemmShape>(),
                gemm,
            ),
        ];
        for (family, source, binding, rust_size, rust_fields) in cases {
            let (size, members) = wgsl_uniform(source, binding);
            assert_eq!(
                size as usize, rust_size,
                "{family}: WGSL size against Rust's"
            );
            let named: Vec<(String, u32)> = members
                .into_iter()
                .filter(|(name, _)| !name.starts_with("_pad"))
                .collect();
            assert_eq!(
                named, rust_fields,
                "{family}: WGSL members against Rust's fields"
            );
        }
        // LossTerms, the first member of two of them, member by member.
        let (_, forward_members) = wgsl_uniform(FORWARD_WGSL, 0);
        assert_eq!(forward_members[1], ("batch".to_string(), 64));
        assert_eq!(size_of::<LossTerms>(), 64);
        assert_eq!(offset_of!(ForwardParams, batch), 64);
        let module = naga::front::wgsl::parse_str(FORWARD_WGSL).expect("the WGSL parses");
        let terms = module
            .types
            .iter()
            .find_map(|(_, t)| match &t.inner {
                naga::TypeInner::Struct { members, .. }
                    if t.name.as_deref() == Some("LossTerms") =>
                {
                    Some(
                        members
                            .iter()
                            .map(|m| (m.name.clone().unwrap_or_default(), m.offset)),
                    )
                }
                _ => None,
            })
            .expect("LossTerms in forward.wgsl")
            .filter(|(name, _)| !name.starts_with("_pad"))
            .collect::<Vec<_>>();
        assert_eq!(
            terms,
            fields!(LossTerms: scale, margin, multiplicative_margin, angular_margin, cos_m2,
                sin_m2, objective, straight_through, per_row, easy_margin, filter_threshold,
                angle_clip, curricular_t)
        );
    }
}
