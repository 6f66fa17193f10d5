//! The device API's data: shapes, the caller's buffer regions, and the layouts of the
//! per-row statistics and the per-call summary.

use crate::error::{Error, Result};
use crate::params::LossParams;

/// How the values of a tensor are stored in memory. Whatever the storage, every product,
/// sum, exponential and statistic the kernels compute is f32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ElementType {
    /// IEEE binary32.
    #[default]
    F32,
    /// IEEE binary16: 11 significant bits, normal from 6.1e-5 to 65504.
    F16,
    /// bfloat16, the high half of an f32: 8 significant bits, f32's range.
    Bf16,
}

impl ElementType {
    /// Bytes per value.
    pub fn bytes(self) -> u64 {
        match self {
            ElementType::F32 => 4,
            ElementType::F16 | ElementType::Bf16 => 2,
        }
    }

    /// Its name, as safetensors writes it: `F32`, `F16`, `BF16`.
    pub fn name(self) -> &'static str {
        match self {
            ElementType::F32 => "F32",
            ElementType::F16 => "F16",
            ElementType::Bf16 => "BF16",
        }
    }

    /// Bytes a buffer region of `values` values of this type holds: the values, rounded
    /// up to a whole 4-byte word (a 16-bit tensor of an odd length ends in half a word,
    /// which outputs write as 0).
    pub fn region_bytes(self, values: u64) -> u64 {
        values.saturating_mul(self.bytes()).next_multiple_of(4)
    }

    /// Its code in the shaders' `*_ELEMENT` overrides (`ELEMENT_F32` … in common.wgsl).
    pub(crate) fn code(self) -> u32 {
        match self {
            ElementType::F32 => 0,
            ElementType::F16 => 1,
            ElementType::Bf16 => 2,
        }
    }

    /// `v` rounded to nearest (ties to even) in this type, as its bits: the rounding the
    /// kernels apply to 16-bit gradients, bit for bit (±inf past the type's range, f16's
    /// subnormals below 2⁻¹⁴, NaN kept NaN). The f32 bits for `F32`.
    pub fn round_bits(self, v: f32) -> u32 {
        let u = v.to_bits();
        match self {
            ElementType::F32 => u,
            ElementType::Bf16 if (u & 0x7fff_ffff) > 0x7f80_0000 => (u >> 16) | 0x40,
            ElementType::Bf16 => (u + 0x7fff + ((u >> 16) & 1)) >> 16,
            ElementType::F16 => f16_bits(u),
        }
    }

    /// The value whose bits in this type are `bits` (the low 16 bits for f16 and bf16),
    /// exactly, as f32.
    pub fn value(self, bits: u32) -> f32 {
        match self {
            ElementType::F32 => f32::from_bits(bits),
            ElementType::Bf16 => f32::from_bits((bits & 0xffff) << 16),
            ElementType::F16 => {
                let sign = if bits & 0x8000 != 0 { -1.0 } else { 1.0 };
                let exponent = ((bits >> 10) & 0x1f) as i32;
                let fraction = (bits & 0x3ff) as f32;
                sign * match exponent {
                    0 => fraction * (2.0f32).powi(-24),
                    31 if fraction == 0.0 => f32::INFINITY,
                    31 => f32::NAN,
                    e => (1024.0 + fraction) * (2.0f32).powi(e - 25),
                }
            }
        }
    }

    /// `values` rounded to this type, as little-endian memory holds them (16-bit values
    /// two bytes each): the bytes of a buffer or a file of this type.
    pub fn stored_bytes(self, values: &[f32]) -> Vec<u8> {
        let width = self.bytes() as usize;
        values
            .iter()
            .flat_map(|&v| self.round_bits(v).to_le_bytes()[..width].to_vec())
            .collect()
    }

    /// `v` rounded to this type and back: the value the type stores for it.
    pub fn round(self, v: f32) -> f32 {
        self.value(self.round_bits(v))
    }

    /// Relative size of one rounding to nearest into this type: 2⁻²⁴ (f32), 2⁻¹¹ (f16),
    /// 2⁻⁸ (bf16).
    pub fn unit_roundoff(self) -> f64 {
        match self {
            ElementType::F32 => (2.0f64).powi(-24),
            ElementType::F16 => (2.0f64).powi(-11),
            ElementType::Bf16 => (2.0f64).powi(-8),
        }
    }
}

/// The f16 bits nearest the f32 of bits `u`, ties to even: `f16_bits` in common.wgsl.
fn f16_bits(u: u32) -> u32 {
    let sign = (u >> 16) & 0x8000;
    let a = u & 0x7fff_ffff;
    if a > 0x7f80_0000 {
        return sign | 0x7e00;
    }
    if a >= 0x477f_f000 {
        return sign | 0x7c00;
    }
    let (bits, rest, halfway) = if a < 0x3880_0000 {
        let exponent = a >> 23;
        if exponent < 102 {
            return sign;
        }
        let significand = (a & 0x7f_ffff) | 0x80_0000;
        let shift = 126 - exponent;
        (
            significand >> shift,
            significand & ((1 << shift) - 1),
            1 << (shift - 1),
        )
    } else {
        let rebiased = a - 0x3800_0000;
        (rebiased >> 13, rebiased & 0x1fff, 0x1000)
    };
    let up = rest > halfway || (rest == halfway && bits & 1 == 1);
    sign | (bits + u32::from(up))
}

/// The storage type of each tensor of the loss: x, w, dL/dx and dL/dw, independently.
/// The default is f32 throughout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct ElementTypes {
    /// x.
    pub features: ElementType,
    /// w.
    pub classes: ElementType,
    /// dL/dx.
    pub grad_features: ElementType,
    /// dL/dw.
    pub grad_classes: ElementType,
}

impl ElementTypes {
    /// x and w stored as `features` and `classes`, and each gradient in the type of its
    /// input (as automatic mixed precision writes them).
    pub fn inputs(features: ElementType, classes: ElementType) -> ElementTypes {
        ElementTypes {
            features,
            classes,
            grad_features: features,
            grad_classes: classes,
        }
    }

    /// The storage types of the slice API's type parameters: x of `X`, w of `W`, and the
    /// gradients of `GX` and `GW`.
    pub fn of<X: Element, W: Element, GX: Element, GW: Element>() -> ElementTypes {
        ElementTypes {
            features: X::TYPE,
            classes: W::TYPE,
            grad_features: GX::TYPE,
            grad_classes: GW::TYPE,
        }
    }

    /// The same, with both gradients in f32 (for an f32 master copy of the weights).
    pub fn with_f32_grads(self) -> ElementTypes {
        ElementTypes {
            grad_features: ElementType::F32,
            grad_classes: ElementType::F32,
            ..self
        }
    }

    /// True when every tensor is f32.
    pub fn all_f32(&self) -> bool {
        *self == ElementTypes::default()
    }

    /// The code of the four types in one number, for the kernels' pipeline caches.
    pub(crate) fn key(&self) -> usize {
        [
            self.features,
            self.classes,
            self.grad_features,
            self.grad_classes,
        ]
        .iter()
        .fold(0, |acc, t| acc * 3 + t.code() as usize)
    }
}

/// The problem's dimensions: B rows of x, D values per vector, C classes, and how each
/// tensor is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Shape {
    /// B: rows of x (samples).
    pub batch: usize,
    /// D: length of every feature and class vector.
    pub dim: usize,
    /// C: rows of w (classes).
    pub classes: usize,
    /// The storage types of x, w, dL/dx and dL/dw (f32 unless set).
    pub elements: ElementTypes,
}

impl Shape {
    /// A shape of B rows, D values per vector and C classes, every tensor f32.
    pub fn new(batch: usize, dim: usize, classes: usize) -> Shape {
        Shape {
            batch,
            dim,
            classes,
            elements: ElementTypes::default(),
        }
    }

    /// The same dimensions with the tensors stored as `elements`.
    pub fn with_elements(self, elements: ElementTypes) -> Shape {
        Shape { elements, ..self }
    }

    pub(crate) fn check_nonempty(&self) -> Result<()> {
        for (dimension, n) in [
            ("batch", self.batch),
            ("dim", self.dim),
            ("classes", self.classes),
        ] {
            if n == 0 {
                return Err(Error::EmptyShape { dimension });
            }
        }
        Ok(())
    }
}

/// Per-row statistics, as the device API writes them (24 bytes per row).
/// Mirrors `struct RowStats` in `shaders/forward.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct RowStats {
    /// L_i (0 for an ignored row).
    pub loss: f32,
    /// c_iy, the target cosine (0 for an ignored row).
    pub target_cos: f32,
    /// The largest non-target cosine (over all classes for an ignored row; -1 when C = 1).
    pub best_other_cos: f32,
    /// argmax_j c_ij, the lowest index on ties.
    pub pred: u32,
    /// c_iy − max_{j≠y} c_ij, the achieved margin (0 for an ignored row).
    pub achieved_margin: f32,
    /// p_iy, the margin softmax's probability of the label (0 for an ignored row).
    pub target_prob: f32,
}

/// Per-call totals, as the device API writes them (32 bytes).
/// Mirrors `struct Summary` in `shaders/common.wgsl`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Summary {
    /// The reduced loss (the sum for [`crate::Reduction::None`]).
    pub loss: f32,
    /// dL/ds of the reduced loss (0 when s < s_min).
    pub scale_grad: f32,
    /// N, the rows whose label is a class.
    pub valid_rows: u32,
    /// Valid rows whose predicted class is the label.
    pub correct_rows: u32,
    /// Bits of [`flags`]: non-finite x or w, a label ≥ C that is not IGNORE, overflow.
    pub flags: u32,
    /// Mean over valid rows of the achieved margin c_iy − max_{j≠y} c_ij.
    pub mean_achieved_margin: f32,
    /// Valid rows whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: u32,
    _pad: u32,
}

/// Bits of [`Summary::flags`].
pub mod flags {
    /// x holds NaN or infinity.
    pub const FEATURES_NON_FINITE: u32 = 1;
    /// w holds NaN or infinity.
    pub const CLASSES_NON_FINITE: u32 = 2;
    /// A label is ≥ C and not IGNORE (the row was treated as ignored).
    pub const LABEL_OUT_OF_RANGE: u32 = 4;
    /// A loss or log-sum-exp is not finite: the raw dot products x·w overflowed f32.
    pub const OVERFLOW: u32 = 8;
    /// A finite dL/dx value became ±inf when rounded to its 16-bit storage type: lower
    /// the loss scale ([`crate::LossParams::loss_scale`]).
    pub const GRAD_FEATURES_OUT_OF_RANGE: u32 = 16;
    /// A finite dL/dw value became ±inf when rounded to its 16-bit storage type.
    pub const GRAD_CLASSES_OUT_OF_RANGE: u32 = 32;
}

/// A region of a caller's buffer: `buffer[offset..offset + size]`, the size given by the shape.
#[derive(Debug, Clone, Copy)]
pub struct BufferRegion<'a> {
    /// The buffer. It needs `BufferUsages::STORAGE`.
    pub buffer: &'a wgpu::Buffer,
    /// Byte offset; a multiple of the device's `min_storage_buffer_offset_alignment` (256 on most).
    pub offset: u64,
}

impl<'a> From<&'a wgpu::Buffer> for BufferRegion<'a> {
    fn from(buffer: &'a wgpu::Buffer) -> Self {
        BufferRegion { buffer, offset: 0 }
    }
}

/// The inputs of the device API. All row-major, tightly packed, each in the storage type
/// the plan's [`Shape::elements`] gives it (16-bit values two to a 32-bit word, the first
/// in the low half, as little-endian memory holds them).
#[derive(Debug, Clone, Copy)]
pub struct DeviceInputs<'a> {
    /// x: B×D values of `elements.features`.
    pub features: BufferRegion<'a>,
    /// w: C×D values of `elements.classes`.
    pub classes: BufferRegion<'a>,
    /// y: B `u32`, each in 0..C or [`crate::IGNORE`].
    pub labels: BufferRegion<'a>,
    /// Per-row margins, B pairs of `f32` (m2_i, m3_i): the additive angular margin, in
    /// [0, π) ([−π, π) with [`LossParams::angle_clip`](crate::LossParams::angle_clip)), and the additive cosine margin of row i's target, z_iy = s·(cos(θ + m2_i) −
    /// m3_i). They replace [`LossParams::angular_margin`](crate::LossParams::angular_margin)
    /// and [`LossParams::margin`](crate::LossParams::margin) (whose multiplicative margin
    /// must then be 1): the mechanism under AdaFace, MagFace and ElasticFace, and any
    /// schedule a caller brings. `None`: every row takes the parameters' margins.
    pub row_margins: Option<BufferRegion<'a>>,
    /// CurricularFace's per-row thresholds φ_i, B `f32` (row i's cos(θ_iy + m),
    /// [`crate::schedule::CurricularFace`]): given exactly when
    /// [`LossParams::curricular`](crate::LossParams::curricular) is.
    pub hard_thresholds: Option<BufferRegion<'a>>,
}

/// The outputs of the device API.
#[derive(Debug, Clone, Copy)]
pub struct DeviceOutputs<'a> {
    /// B [`RowStats`] (24 bytes each).
    pub row_stats: BufferRegion<'a>,
    /// One [`Summary`] (32 bytes).
    pub summary: BufferRegion<'a>,
    /// The gradients; `None` records the forward pass only.
    pub grads: Option<GradOutputs<'a>>,
}

/// Gradient outputs of the device API; every element is overwritten, in the storage type
/// the plan's [`Shape::elements`] gives it.
#[derive(Debug, Clone, Copy)]
pub struct GradOutputs<'a> {
    /// dL/dx: B×D values of `elements.grad_features`.
    pub features: BufferRegion<'a>,
    /// dL/dw: C×D values of `elements.grad_classes`.
    pub classes: BufferRegion<'a>,
}

impl<'a> DeviceInputs<'a> {
    /// x, w and the labels, with the parameters' margins for every row and no
    /// CurricularFace thresholds (set the other fields after, where a call has them).
    pub fn new(
        features: BufferRegion<'a>,
        classes: BufferRegion<'a>,
        labels: BufferRegion<'a>,
    ) -> Self {
        DeviceInputs {
            features,
            classes,
            labels,
            row_margins: None,
            hard_thresholds: None,
        }
    }

    /// x, w and the labels, each a whole buffer.
    pub(crate) fn whole(
        features: &'a wgpu::Buffer,
        classes: &'a wgpu::Buffer,
        labels: &'a wgpu::Buffer,
    ) -> Self {
        DeviceInputs::new(
            BufferRegion::from(features),
            BufferRegion::from(classes),
            BufferRegion::from(labels),
        )
    }
}

impl<'a> DeviceOutputs<'a> {
    /// The row statistics and the summary, each a whole buffer, and `grads`.
    pub(crate) fn whole(
        row_stats: &'a wgpu::Buffer,
        summary: &'a wgpu::Buffer,
        grads: Option<GradOutputs<'a>>,
    ) -> Self {
        DeviceOutputs {
            row_stats: BufferRegion::from(row_stats),
            summary: BufferRegion::from(summary),
            grads,
        }
    }
}

/// A caller's region with its role and the bytes the shape needs there.
pub(crate) struct Region<'a> {
    pub role: &'static str,
    pub region: BufferRegion<'a>,
    pub bytes: u64,
    /// Read only (x, w, the labels, the per-row margins), else written.
    pub input: bool,
}

/// An output may not share a buffer with an input (WebGPU forbids one buffer as
/// read-only and writable storage in one dispatch), and outputs may not overlap.
pub(crate) fn check_aliasing(regions: &[Region<'_>]) -> Result<()> {
    let (inputs, outputs): (Vec<&Region<'_>>, Vec<&Region<'_>>) =
        regions.iter().partition(|r| r.input);
    for (k, out) in outputs.iter().enumerate() {
        if let Some(input) = inputs.iter().find(|i| i.region.buffer == out.region.buffer) {
            return Err(Error::BadBuffer {
                role: out.role,
                reason: format!(
                    "it shares a buffer with input {}; WebGPU forbids binding one buffer as read-only \
                     and writable storage in one dispatch, so keep outputs in other buffers",
                    input.role
                ),
            });
        }
        let overlaps = |other: &Region<'_>| {
            other.region.buffer == out.region.buffer
                && other.region.offset < out.region.offset + out.bytes
                && out.region.offset < other.region.offset + other.bytes
        };
        if let Some(other) = outputs[k + 1..].iter().find(|o| overlaps(o)) {
            return Err(Error::BadBuffer {
                role: out.role,
                reason: format!(
                    "it overlaps output {}; give each output its own range",
                    other.role
                ),
            });
        }
    }
    Ok(())
}

/// Label value meaning "ignore this row" (`-1i32 as u32`).
pub const IGNORE: u32 = u32::MAX;

/// Everything one call of the slice API returns; the gradients in the types `GX` and
/// `GW` they are stored in (f32 unless [`Context::loss_typed`](crate::Context::loss_typed)
/// asks for others).
#[derive(Debug, Clone, PartialEq)]
pub struct LossOutput<GX = f32, GW = f32> {
    /// The reduced loss (mean or sum over non-ignored rows; the sum for `Reduction::None`).
    pub loss: f32,
    /// L_i per row (0 for ignored rows).
    pub row_loss: Vec<f32>,
    /// dL/ds of the reduced loss (0 when s < s_min).
    pub grad_scale: f32,
    /// argmax_j c_ij per row.
    pub pred: Vec<u32>,
    /// c_iy per row (0 for ignored rows).
    pub target_cos: Vec<f32>,
    /// The largest non-target cosine per row (-1 when C = 1).
    pub best_other_cos: Vec<f32>,
    /// c_iy − max_{j≠y} c_ij per row (0 for ignored rows).
    pub achieved_margin: Vec<f32>,
    /// p_iy per row: the margin softmax's probability of the label (0 for ignored rows).
    pub target_prob: Vec<f32>,
    /// Mean achieved margin over the rows not ignored.
    pub mean_achieved_margin: f32,
    /// Rows not ignored whose margined target still wins: ψ(c_iy) ≥ max_{j≠y} c_ij.
    pub margin_satisfied_rows: u32,
    /// N, the rows not ignored.
    pub valid_rows: u32,
    /// Rows not ignored whose prediction is the label.
    pub correct_rows: u32,
    /// dL/dx (B×D) and dL/dw (C×D), for [`Pass::ForwardBackward`](crate::Pass::ForwardBackward).
    pub grads: Option<Gradients<GX, GW>>,
}

impl<GX, GW> LossOutput<GX, GW> {
    /// The same output with `grads` for its gradients (of other types, say).
    pub fn with_grads<HX, HW>(self, grads: Option<Gradients<HX, HW>>) -> LossOutput<HX, HW> {
        LossOutput {
            grads,
            loss: self.loss,
            row_loss: self.row_loss,
            grad_scale: self.grad_scale,
            pred: self.pred,
            target_cos: self.target_cos,
            best_other_cos: self.best_other_cos,
            achieved_margin: self.achieved_margin,
            target_prob: self.target_prob,
            mean_achieved_margin: self.mean_achieved_margin,
            margin_satisfied_rows: self.margin_satisfied_rows,
            valid_rows: self.valid_rows,
            correct_rows: self.correct_rows,
        }
    }
}

impl<GX: Element, GW: Element> LossOutput<GX, GW> {
    /// The same output with its gradients widened, exactly, to f32.
    pub fn widened(self) -> LossOutput {
        let grads = self.grads.as_ref().map(|g| Gradients {
            features: g.features.iter().map(|v| v.widen()).collect(),
            classes: g.classes.iter().map(|v| v.widen()).collect(),
        });
        self.with_grads(grads)
    }
}

/// The gradients of the reduced loss (times [`LossParams::loss_scale`](crate::LossParams::loss_scale)).
#[derive(Debug, Clone, PartialEq)]
pub struct Gradients<GX = f32, GW = f32> {
    /// dL/dx, B×D row-major.
    pub features: Vec<GX>,
    /// dL/dw, C×D row-major.
    pub classes: Vec<GW>,
}

/// A value type the slice API takes and returns tensors in: `f32`, and with the feature
/// `half` (on by default) `half::f16` and `half::bf16`; no other (the trait is sealed:
/// the kernels' storage types are these three). Values are laid out as little-endian
/// memory holds them, as every wgpu backend's is.
pub trait Element: sealed::Sealed + bytemuck::Pod + std::fmt::Debug + PartialEq {
    /// How it is stored.
    const TYPE: ElementType;

    /// Its value, exactly, as f32.
    fn widen(self) -> f32 {
        let mut word = [0u8; 4];
        word[..size_of::<Self>()].copy_from_slice(bytemuck::bytes_of(&self));
        Self::TYPE.value(u32::from_le_bytes(word))
    }

    /// `v` rounded to nearest in this type, ties to even, as the kernels round
    /// ([`ElementType::round_bits`]).
    fn narrow(v: f32) -> Self {
        let word = Self::TYPE.round_bits(v).to_le_bytes();
        bytemuck::pod_read_unaligned(&word[..size_of::<Self>()])
    }
}

/// Keeps [`Element`] to the three storage types.
mod sealed {
    pub trait Sealed {}
    impl Sealed for f32 {}
    #[cfg(feature = "half")]
    impl Sealed for half::f16 {}
    #[cfg(feature = "half")]
    impl Sealed for half::bf16 {}
}

impl Element for f32 {
    const TYPE: ElementType = ElementType::F32;
}

#[cfg(feature = "half")]
impl Element for half::f16 {
    const TYPE: ElementType = ElementType::F16;
}

#[cfg(feature = "half")]
impl Element for half::bf16 {
    const TYPE: ElementType = ElementType::Bf16;
}

/// The host inputs of one slice-API call ([`Context::loss_inputs`](crate::Context::loss_inputs)):
/// x stored as `X`, w as `W` ([`Element`]), the labels, and optionally per-row margins.
#[derive(Debug, Clone, Copy)]
pub struct HostInputs<'a, X: Element = f32, W: Element = f32> {
    /// B, D and C (the element types are set from `X`, `W` and the gradients' types).
    pub shape: Shape,
    /// x: B×D, row-major.
    pub features: &'a [X],
    /// w: C×D, row-major.
    pub classes: &'a [W],
    /// y: B labels in 0..C, or [`IGNORE`].
    pub labels: &'a [u32],
    /// Per-row margins (m2_i, m3_i), as [`DeviceInputs::row_margins`]: m2_i in [0, π) (or
    /// [−π, π) with `angle_clip`),
    /// |m3_i| ≤ 2, replacing the parameters' angular and cosine margins.
    pub row_margins: Option<&'a [[f32; 2]]>,
    /// CurricularFace's per-row thresholds φ_i, as [`DeviceInputs::hard_thresholds`].
    pub hard_thresholds: Option<&'a [f32]>,
}

impl<'a, X: Element, W: Element> HostInputs<'a, X, W> {
    /// x, w and the labels of `shape`, with the parameters' margins for every row.
    pub fn new(shape: Shape, features: &'a [X], classes: &'a [W], labels: &'a [u32]) -> Self {
        HostInputs {
            shape,
            features,
            classes,
            labels,
            row_margins: None,
            hard_thresholds: None,
        }
    }

    /// The same inputs with CurricularFace's per-row thresholds φ_i.
    pub fn with_hard_thresholds(self, hard_thresholds: &'a [f32]) -> Self {
        HostInputs {
            hard_thresholds: Some(hard_thresholds),
            ..self
        }
    }

    /// The same inputs with per-row margins (m2_i, m3_i).
    pub fn with_row_margins(self, row_margins: &'a [[f32; 2]]) -> Self {
        HostInputs {
            row_margins: Some(row_margins),
            ..self
        }
    }

    /// Checks the lengths, the labels and the per-row margins (for `params`) on the host.
    pub(crate) fn check(&self, params: &LossParams) -> Result<()> {
        check_slices(self.shape, self.features, self.classes, self.labels)?;
        check_hard_thresholds(self.hard_thresholds, self.shape.batch, params)?;
        match self.row_margins {
            Some(m) => check_row_margins(m, self.shape.batch, params),
            None => Ok(()),
        }
    }
}

/// CurricularFace's thresholds: B finite values, given exactly when `params.curricular` is.
pub(crate) fn check_hard_thresholds(
    thresholds: Option<&[f32]>,
    batch: usize,
    params: &LossParams,
) -> Result<()> {
    match (thresholds, params.curricular) {
        (None, None) => Ok(()),
        (Some(t), Some(_)) if t.len() != batch => Err(Error::LengthMismatch {
            input: "hard_thresholds",
            expected: batch,
            actual: t.len(),
        }),
        (Some(t), Some(_)) => match t.iter().find(|v| !v.is_finite()) {
            Some(&v) => Err(Error::InvalidParameter {
                name: "hard_thresholds (φ_i)",
                value: v,
                requirement: "finite: each row's cos(θ_iy + m)",
            }),
            None => Ok(()),
        },
        (t, _) => Err(Error::InvalidParameter {
            name: "curricular",
            value: f32::from(u8::from(t.is_some())),
            requirement:
                "given together with hard_thresholds (schedule::CurricularFace makes both)",
        }),
    }
}

/// Largest |m3_i| of a per-row margin (as [`crate::MAX_MARGIN`]).
const MAX_ROW_MARGIN: f32 = 2.0;

/// B per-row margins, each finite, m2_i in `params`' [`LossParams::row_angle_range`] and
/// |m3_i| ≤ 2.
pub(crate) fn check_row_margins(
    margins: &[[f32; 2]],
    batch: usize,
    params: &LossParams,
) -> Result<()> {
    let angles = params.row_angle_range();
    if margins.len() != batch {
        return Err(Error::LengthMismatch {
            input: "row_margins",
            expected: batch,
            actual: margins.len(),
        });
    }
    for &[m2, m3] in margins {
        if !(m2.is_finite() && (angles.0..angles.1).contains(&m2)) {
            return Err(Error::InvalidParameter {
                name: "row_margins (m2_i)",
                value: m2,
                requirement:
                    "an angular margin in [0, π) radians, or [-π, π) with LossParams::angle_clip",
            });
        }
        if !(m3.is_finite() && m3.abs() <= MAX_ROW_MARGIN) {
            return Err(Error::InvalidParameter {
                name: "row_margins (m3_i)",
                value: m3,
                requirement: "a cosine margin in [-2, 2]",
            });
        }
    }
    Ok(())
}

/// Checks lengths and labels on the host, before anything reaches the GPU.
pub(crate) fn check_slices<X, W>(
    shape: Shape,
    features: &[X],
    classes: &[W],
    labels: &[u32],
) -> Result<()> {
    shape.check_nonempty()?;
    let classes_len = (
        "classes",
        shape.classes.saturating_mul(shape.dim),
        classes.len(),
    );
    check_batch(shape, features, Some(classes_len), labels, shape.classes)
}

/// Checks the lengths of x, (optionally) w and the labels, then that every label is in
/// 0..`total_classes` or IGNORE.
pub(crate) fn check_batch<X>(
    shape: Shape,
    features: &[X],
    classes: Option<(&'static str, usize, usize)>,
    labels: &[u32],
    total_classes: usize,
) -> Result<()> {
    let lengths = [(
        "features",
        shape.batch.saturating_mul(shape.dim),
        features.len(),
    )]
    .into_iter()
    .chain(classes)
    .chain([("labels", shape.batch, labels.len())]);
    for (input, expected, actual) in lengths {
        if expected != actual {
            return Err(Error::LengthMismatch {
                input,
                expected,
                actual,
            });
        }
    }
    if let Some((row, &label)) = labels
        .iter()
        .enumerate()
        .find(|(_, &l)| l != IGNORE && l as usize >= total_classes)
    {
        return Err(Error::LabelOutOfRange {
            row: Some(row),
            label: Some(label),
            classes: total_classes,
        });
    }
    Ok(())
}
