//! The compute pipelines: one per WGSL entry point, compiled once per device, and the
//! bindings each one reads. Every shader module is `shaders/common.wgsl` followed by
//! its family's file.

use crate::params::{LossParams, Reduction};

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
    FeatureGradPartials = 11,
    GradFeatures = 12,
    GradClasses = 13,
}

/// The cosine-tile workgroup shape, set on the WGSL `override` constants at pipeline creation.
/// Each invocation computes a 4×4 register block, so a tile is
/// `4·rows_per_workgroup` rows by `4·classes_per_workgroup` classes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TileConfig {
    /// Invocations along the row axis (WGSL `ROWS_WG`).
    pub rows_per_workgroup: u32,
    /// Invocations along the class axis (WGSL `CLASSES_WG`).
    pub classes_per_workgroup: u32,
}

impl Default for TileConfig {
    /// 8×8 invocations: 32×32 tiles.
    fn default() -> Self {
        TileConfig {
            rows_per_workgroup: 8,
            classes_per_workgroup: 8,
        }
    }
}

/// Register block of one invocation (WGSL `ROW_BLOCK`, `CLASS_BLOCK`).
pub(crate) const REGISTER_BLOCK: u32 = 4;
/// Invocations per workgroup of the one-row-per-invocation kernels (WGSL `NORM_WG`, `ROW_WG`).
pub(crate) const ROW_KERNEL_WORKGROUP: u32 = 64;

impl TileConfig {
    /// Rows of x in one cosine tile.
    pub fn tile_rows(&self) -> u32 {
        self.rows_per_workgroup * REGISTER_BLOCK
    }
    /// Classes in one cosine tile.
    pub fn tile_classes(&self) -> u32 {
        self.classes_per_workgroup * REGISTER_BLOCK
    }
}

/// The uniform of every dispatch. Mirrors `struct Params` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
pub(crate) struct GpuParams {
    pub batch: u32,
    pub dim: u32,
    pub classes: u32,
    pub forward_splits: u32,
    pub forward_split_classes: u32,
    pub feature_splits: u32,
    pub feature_split_classes: u32,
    pub reduction: u32,
    pub scale: f32,
    pub margin: f32,
    pub scale_grad_gate: f32,
    pub _pad: u32,
}

impl GpuParams {
    pub(crate) fn set_loss(&mut self, params: &LossParams) {
        self.scale = params.effective_scale();
        self.margin = params.margin;
        self.scale_grad_gate = if params.scale_receives_grad() {
            1.0
        } else {
            0.0
        };
        self.reduction = Reduction::code(params.reduction);
    }
}

/// One compute pipeline and the bindings its entry point uses, in binding order.
#[derive(Debug)]
pub(crate) struct Kernel {
    pub pipeline: wgpu::ComputePipeline,
    pub bindings: &'static [Binding],
}

/// Every pipeline of the fused loss.
#[derive(Debug)]
pub(crate) struct Kernels {
    pub row_inv_norms: Kernel,
    pub class_split_partials: Kernel,
    pub merge_rows: Kernel,
    pub summarize: Kernel,
    pub grad_feature_partials: Kernel,
    pub grad_features_finish: Kernel,
    pub grad_classes_tile: Kernel,
}

const NORMS_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/norms.wgsl")
);
const FORWARD_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/forward.wgsl")
);
const BACKWARD_WGSL: &str = concat!(
    include_str!("../shaders/common.wgsl"),
    include_str!("../shaders/backward.wgsl")
);

impl Kernels {
    pub(crate) fn new(device: &wgpu::Device, tiles: TileConfig) -> Kernels {
        use Binding::*;
        let module = |label, source: &str| {
            device.create_shader_module(wgpu::ShaderModuleDescriptor {
                label: Some(label),
                source: wgpu::ShaderSource::Wgsl(source.into()),
            })
        };
        let norms = module("norms.wgsl", NORMS_WGSL);
        let forward = module("forward.wgsl", FORWARD_WGSL);
        let backward = module("backward.wgsl", BACKWARD_WGSL);
        let constants = [
            ("ROWS_WG", f64::from(tiles.rows_per_workgroup)),
            ("CLASSES_WG", f64::from(tiles.classes_per_workgroup)),
        ];
        let kernel = |module: &wgpu::ShaderModule, entry: &'static str, bindings| Kernel {
            pipeline: device.create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                label: Some(entry),
                layout: None,
                module,
                entry_point: Some(entry),
                compilation_options: wgpu::PipelineCompilationOptions {
                    constants: &constants,
                    zero_initialize_workgroup_memory: false,
                },
                cache: None,
            }),
            bindings,
        };
        Kernels {
            row_inv_norms: kernel(
                &norms,
                "row_inv_norms",
                &[
                    Params,
                    Features,
                    ClassVectors,
                    InvNormFeatures,
                    InvNormClasses,
                    InputFlags,
                ],
            ),
            class_split_partials: kernel(
                &forward,
                "class_split_partials",
                &[
                    Params,
                    Features,
                    ClassVectors,
                    Labels,
                    InvNormFeatures,
                    InvNormClasses,
                    SplitPartials,
                ],
            ),
            merge_rows: kernel(
                &forward,
                "merge_rows",
                &[Params, Labels, SplitPartials, RowSoftmax, RowStats],
            ),
            summarize: kernel(
                &forward,
                "summarize",
                &[Params, Labels, InputFlags, RowSoftmax, RowStats, Summary],
            ),
            grad_feature_partials: kernel(
                &backward,
                "grad_feature_partials",
                &[
                    Params,
                    Features,
                    ClassVectors,
                    Labels,
                    InvNormFeatures,
                    InvNormClasses,
                    RowSoftmax,
                    Summary,
                    FeatureGradPartials,
                ],
            ),
            grad_features_finish: kernel(
                &backward,
                "grad_features_finish",
                &[
                    Params,
                    Features,
                    InvNormFeatures,
                    FeatureGradPartials,
                    GradFeatures,
                ],
            ),
            grad_classes_tile: kernel(
                &backward,
                "grad_classes_tile",
                &[
                    Params,
                    Features,
                    ClassVectors,
                    Labels,
                    InvNormFeatures,
                    InvNormClasses,
                    RowSoftmax,
                    Summary,
                    GradClasses,
                ],
            ),
        }
    }
}
