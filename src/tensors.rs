//! Safetensors input and output: the format PyTorch, JAX, NumPy and Burn already write.
//!
//! Inputs: `features` (B×D) and `weights` (C×D), each F32, F16 or BF16 (kept as stored,
//! see [`StoredValues`]), `labels` (B i64 or i32, a negative label means ignore) and an
//! optional scalar `scale` (f32 or f64). Outputs: the gradients in the storage type the
//! caller asks for, the rest f32.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::Path;

use safetensors::{Dtype, SafeTensors};

use crate::io::{Element, ElementType, LossOutput, Shape, IGNORE};
use crate::problem::Problem;

/// A problem read from a safetensors file.
#[derive(Debug, Clone, PartialEq)]
pub struct LossInputs {
    /// x (`features`), w (`weights`) and y (`labels`; negative labels in the file become
    /// [`IGNORE`]). x and w as f32: for F16 and BF16 tensors the stored values widened,
    /// exactly (what the f64 reference runs on).
    pub problem: Problem,
    /// x as the file stores it.
    pub features: StoredValues,
    /// w as the file stores it.
    pub weights: StoredValues,
    /// The file's `scale`, if it has one.
    pub scale: Option<f32>,
    /// The file's `row_margins` (B×2 f32: each row's angular margin m2_i and cosine
    /// margin m3_i, [`crate::HostInputs::row_margins`]), if it has them.
    pub row_margins: Option<Vec<[f32; 2]>>,
}

/// A floating-point tensor's values as the file stores them: f32, or 16-bit values kept
/// bit for bit (for [`crate::Context::loss_typed`]).
#[derive(Debug, Clone, PartialEq)]
pub enum StoredValues {
    /// F32.
    F32(Vec<f32>),
    /// F16.
    F16(Vec<half::f16>),
    /// BF16.
    Bf16(Vec<half::bf16>),
}

impl StoredValues {
    /// The storage type.
    pub fn element(&self) -> ElementType {
        match self {
            StoredValues::F32(_) => ElementType::F32,
            StoredValues::F16(_) => ElementType::F16,
            StoredValues::Bf16(_) => ElementType::Bf16,
        }
    }
}

/// Why a file cannot be used, naming the tensor and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputError {
    /// The tensor at fault, if one is.
    pub tensor: Option<String>,
    /// What is wrong and what was expected.
    pub message: String,
}

impl fmt::Display for InputError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.tensor {
            // Escaped: a name from a file may hold line breaks; the message stays one line.
            Some(t) => write!(f, "tensor `{}`: {}", t.escape_debug(), self.message),
            None => write!(f, "{}", self.message),
        }
    }
}

impl std::error::Error for InputError {}

fn tensor_error(tensor: &str, message: impl Into<String>) -> InputError {
    InputError {
        tensor: Some(tensor.to_string()),
        message: message.into(),
    }
}

/// A tensor's raw parts, checked for dtype and rank.
struct Raw<'a> {
    dtype: Dtype,
    shape: Vec<usize>,
    data: &'a [u8],
}

fn get<'a>(file: &SafeTensors<'a>, name: &str) -> Result<Raw<'a>, InputError> {
    let view = file.tensor(name).map_err(|_| {
        let mut names = file.names();
        names.sort_unstable();
        tensor_error(name, format!("missing; the file holds {names:?}"))
    })?;
    Ok(Raw {
        dtype: view.dtype(),
        shape: view.shape().to_vec(),
        data: view.data(),
    })
}

fn expect_rank(name: &str, raw: &Raw<'_>, rank: usize, what: &str) -> Result<(), InputError> {
    if raw.shape.len() != rank {
        return Err(tensor_error(
            name,
            format!("expected {what} (rank {rank}), found shape {:?}", raw.shape),
        ));
    }
    Ok(())
}

/// The safetensors dtype of `element`.
pub fn dtype_of(element: ElementType) -> Dtype {
    match element {
        ElementType::F32 => Dtype::F32,
        ElementType::F16 => Dtype::F16,
        ElementType::Bf16 => Dtype::BF16,
    }
}

/// The values of an F32, F16 or BF16 tensor: as stored, and widened (exactly) to f32.
/// Every value must be finite.
fn stored_values(name: &str, raw: &Raw<'_>) -> Result<(StoredValues, Vec<f32>), InputError> {
    let words = |bytes: usize| raw.data.chunks_exact(bytes);
    let bits16 = || words(2).map(|b| u16::from_le_bytes([b[0], b[1]]));
    let (stored, widened) = match raw.dtype {
        Dtype::F32 => {
            let values: Vec<f32> = words(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            (StoredValues::F32(values.clone()), values)
        }
        Dtype::F16 => {
            let values: Vec<half::f16> = bits16().map(half::f16::from_bits).collect();
            let widened = values.iter().map(|v| v.to_f32()).collect();
            (StoredValues::F16(values), widened)
        }
        Dtype::BF16 => {
            let values: Vec<half::bf16> = bits16().map(half::bf16::from_bits).collect();
            let widened = values.iter().map(|v| v.to_f32()).collect();
            (StoredValues::Bf16(values), widened)
        }
        other => {
            return Err(tensor_error(
                name,
                format!("expected dtype F32, F16 or BF16, found {other:?}"),
            ))
        }
    };
    check_finite(name, &widened)?;
    Ok((stored, widened))
}

/// The values of an F32 tensor (every one finite).
fn f32_values(name: &str, raw: &Raw<'_>) -> Result<Vec<f32>, InputError> {
    if raw.dtype != Dtype::F32 {
        return Err(tensor_error(
            name,
            format!("expected dtype f32, found {:?}", raw.dtype),
        ));
    }
    Ok(stored_values(name, raw)?.1)
}

fn check_finite(name: &str, values: &[f32]) -> Result<(), InputError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(k) => Err(tensor_error(
            name,
            format!("element {k} is {}; every value must be finite", values[k]),
        )),
        None => Ok(()),
    }
}

/// The string starting after the opening quote at `start` of `text`, decoded from JSON,
/// and the index after its closing quote; `None` where it is not a valid JSON string.
fn json_string(text: &str, start: usize) -> Option<(String, usize)> {
    let bytes = text.as_bytes();
    let hex4 = |at: usize| {
        let digits = text.get(at..at + 4)?;
        if digits.bytes().all(|b| b.is_ascii_hexdigit()) {
            u32::from_str_radix(digits, 16).ok()
        } else {
            None
        }
    };
    let mut out = String::new();
    let (mut i, mut run) = (start, start);
    loop {
        match *bytes.get(i)? {
            b'"' => {
                out.push_str(text.get(run..i)?);
                return Some((out, i + 1));
            }
            b'\\' => {
                out.push_str(text.get(run..i)?);
                let escape = *bytes.get(i + 1)?;
                i += 2;
                let c = match escape {
                    b'"' => '"',
                    b'\\' => '\\',
                    b'/' => '/',
                    b'b' => '\u{8}',
                    b'f' => '\u{c}',
                    b'n' => '\n',
                    b'r' => '\r',
                    b't' => '\t',
                    b'u' => {
                        let high = hex4(i)?;
                        i += 4;
                        let code = if (0xD800..0xDC00).contains(&high) {
                            // A surrogate pair: \uD8xx\uDCxx.
                            if text.get(i..i + 2)? != "\\u" {
                                return None;
                            }
                            let low = hex4(i + 2)?;
                            if !(0xDC00..0xE000).contains(&low) {
                                return None;
                            }
                            i += 6;
                            0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00)
                        } else {
                            high
                        };
                        char::from_u32(code)?
                    }
                    _ => return None,
                };
                out.push(c);
                run = i;
            }
            _ => i += 1,
        }
    }
}

/// The first key of the header's top-level object that appears twice, decoded. JSON
/// parsers keep the last of them, so without this check the earlier entry of a
/// duplicated tensor name would be dropped unchecked. `None` where there is none, or
/// where the header is not readable (the safetensors parser then says why).
fn duplicate_header_key(bytes: &[u8]) -> Option<String> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = usize::try_from(n).ok()?.checked_add(8)?;
    let header = std::str::from_utf8(bytes.get(8..end)?).ok()?;
    let raw = header.as_bytes();
    let (mut depth, mut i) = (0usize, 0usize);
    let mut keys = HashSet::new();
    while i < raw.len() {
        match raw[i] {
            b'{' | b'[' => depth += 1,
            b'}' | b']' => depth = depth.saturating_sub(1),
            b'"' => {
                let (text, after) = json_string(header, i + 1)?;
                i = after;
                while raw.get(i).is_some_and(u8::is_ascii_whitespace) {
                    i += 1;
                }
                // A string followed by ':' directly inside the top-level object is a key.
                if depth == 1 && raw.get(i) == Some(&b':') && !keys.insert(text.clone()) {
                    return Some(text);
                }
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    None
}

/// Parses safetensors bytes, refusing a header that names a tensor (or its
/// `__metadata__`) twice.
fn deserialize(bytes: &[u8]) -> Result<SafeTensors<'_>, InputError> {
    if let Some(name) = duplicate_header_key(bytes) {
        let message = "appears more than once in the header; every tensor name must be \
                       unique (write the file again with one entry per name)";
        return Err(if name == "__metadata__" {
            InputError {
                tensor: None,
                message: format!("`__metadata__` {message}"),
            }
        } else {
            tensor_error(&name, message)
        });
    }
    SafeTensors::deserialize(bytes).map_err(|e| InputError {
        tensor: None,
        message: format!("not a readable safetensors file: {e}"),
    })
}

/// Reads and checks a problem from safetensors bytes. Every failure names the tensor;
/// a tensor named twice in the header is refused.
pub fn parse_inputs(bytes: &[u8]) -> Result<LossInputs, InputError> {
    let file = deserialize(bytes)?;
    let x = get(&file, "features")?;
    expect_rank("features", &x, 2, "B×D")?;
    let w = get(&file, "weights")?;
    expect_rank("weights", &w, 2, "C×D")?;
    let y = get(&file, "labels")?;
    expect_rank("labels", &y, 1, "B labels")?;
    let (b, d, c) = (x.shape[0], x.shape[1], w.shape[0]);
    if w.shape[1] != d {
        return Err(tensor_error(
            "weights",
            format!(
                "expected {d} columns to match features ({b}×{d}), found shape {:?}",
                w.shape
            ),
        ));
    }
    if y.shape[0] != b {
        return Err(tensor_error(
            "labels",
            format!(
                "expected {b} labels, one per row of features, found {}",
                y.shape[0]
            ),
        ));
    }
    for (name, n) in [("features", b), ("weights", c)] {
        if n == 0 || d == 0 {
            return Err(tensor_error(
                name,
                "has a zero dimension; every size must be at least 1",
            ));
        }
    }
    let (stored_features, features) = stored_values("features", &x)?;
    let (stored_weights, classes) = stored_values("weights", &w)?;
    let labels = label_values(&y, c)?;
    let scale = scalar_scale(&file)?;
    let row_margins = row_margin_values(&file, b)?;
    Ok(LossInputs {
        problem: Problem {
            shape: Shape::new(b, d, c),
            features,
            classes,
            labels,
        },
        features: stored_features,
        weights: stored_weights,
        scale,
        row_margins,
    })
}

/// The optional `row_margins` tensor: B×2 f32, each row's (m2_i, m3_i), in range.
fn row_margin_values(
    file: &SafeTensors<'_>,
    b: usize,
) -> Result<Option<Vec<[f32; 2]>>, InputError> {
    if !file.names().contains(&"row_margins") {
        return Ok(None);
    }
    let raw = get(file, "row_margins")?;
    expect_rank("row_margins", &raw, 2, "B×2 (m2_i, m3_i) per row")?;
    if raw.shape != [b, 2] {
        return Err(tensor_error(
            "row_margins",
            format!(
                "expected shape [{b}, 2], one (m2_i, m3_i) per row of features, found {:?}",
                raw.shape
            ),
        ));
    }
    let values = f32_values("row_margins", &raw)?;
    let margins: Vec<[f32; 2]> = values.chunks_exact(2).map(|m| [m[0], m[1]]).collect();
    // The file's margins take the fallback form (m2_i ≥ 0); AdaFace's come from `--adaface`.
    crate::io::check_row_margins(&margins, b, &crate::LossParams::default())
        .map_err(|e| tensor_error("row_margins", e.to_string()))?;
    Ok(Some(margins))
}

/// The labels of rows 0.. from the i64 or i32 tensor `y`: a class of `c`, or IGNORE for
/// a negative label.
fn label_values(y: &Raw<'_>, c: usize) -> Result<Vec<u32>, InputError> {
    let wide: Vec<i64> = match y.dtype {
        Dtype::I64 => y
            .data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap_or_default()))
            .collect(),
        Dtype::I32 => y
            .data
            .chunks_exact(4)
            .map(|b| i64::from(i32::from_le_bytes(b.try_into().unwrap_or_default())))
            .collect(),
        other => {
            return Err(tensor_error(
                "labels",
                format!("expected dtype i64 or i32, found {other:?}"),
            ))
        }
    };
    let mut labels = Vec::with_capacity(wide.len());
    for (row, &label) in wide.iter().enumerate() {
        labels.push(match label {
            l if l < 0 => IGNORE,
            l if (l as u64) < c as u64 => l as u32,
            l => {
                return Err(tensor_error(
                    "labels",
                    format!("row {row} has label {l}, but weights has {c} classes: labels must be in 0..{c}, or negative to ignore the row"),
                ))
            }
        });
    }
    Ok(labels)
}

/// The optional `scale` tensor: a scalar f32 or f64, read as f32.
fn scalar_scale(file: &SafeTensors<'_>) -> Result<Option<f32>, InputError> {
    Ok(match file.tensor("scale") {
        Err(_) => None,
        Ok(view) => {
            let raw = Raw {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                data: view.data(),
            };
            if raw.shape.iter().product::<usize>() != 1 {
                return Err(tensor_error(
                    "scale",
                    format!("expected a scalar, found shape {:?}", raw.shape),
                ));
            }
            let value = match raw.dtype {
                Dtype::F32 => f32::from_le_bytes(raw.data.try_into().unwrap_or_default()),
                Dtype::F64 => f64::from_le_bytes(raw.data.try_into().unwrap_or_default()) as f32,
                other => {
                    return Err(tensor_error(
                        "scale",
                        format!("expected dtype f32 or f64, found {other:?}"),
                    ))
                }
            };
            Some(value)
        }
    })
}

/// Reads and checks the `weights` tensor alone (C×D f32) from a safetensors file:
/// returns the values and (C, D). A tensor named twice in the header is refused.
pub fn read_class_vectors(path: &Path) -> Result<(Vec<f32>, usize, usize), InputError> {
    let bytes = std::fs::read(path).map_err(|e| InputError {
        tensor: None,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let file = deserialize(&bytes)?;
    let w = get(&file, "weights")?;
    expect_rank("weights", &w, 2, "C×D")?;
    if w.shape[0] == 0 || w.shape[1] == 0 {
        return Err(tensor_error(
            "weights",
            "has a zero dimension; every size must be at least 1",
        ));
    }
    Ok((f32_values("weights", &w)?, w.shape[0], w.shape[1]))
}

/// Reads and checks a problem from a safetensors file.
pub fn read_inputs(path: &Path) -> Result<LossInputs, InputError> {
    let bytes = std::fs::read(path).map_err(|e| InputError {
        tensor: None,
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    parse_inputs(&bytes)
}

/// One output tensor: its dtype, shape and little-endian bytes.
type Tensor = (Dtype, Vec<usize>, Vec<u8>);

fn le_f32(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A gradient tensor of `shape` in its storage type `T`, little-endian.
fn gradient_tensor<T: Element>(shape: Vec<usize>, values: &[T]) -> Tensor {
    let data = match T::TYPE.bytes() {
        2 => bytemuck::cast_slice::<T, u16>(values)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => bytemuck::cast_slice::<T, u32>(values)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    };
    (dtype_of(T::TYPE), shape, data)
}

/// The outputs as safetensors bytes: `loss` (a scalar, or B values when `per_row_loss`),
/// `per_sample_loss`, `grad_features` and `grad_weights` (in their storage types `GX`
/// and `GW`), `grad_scale`, `pred` (i64), `target_cos` and `best_other_cos`.
pub fn serialize_outputs<GX: Element, GW: Element>(
    shape: Shape,
    out: &LossOutput<GX, GW>,
    per_row_loss: bool,
) -> Result<Vec<u8>, InputError> {
    let b = shape.batch;
    let mut tensors: Vec<(&str, Tensor)> = vec![
        (
            "loss",
            if per_row_loss {
                (Dtype::F32, vec![b], le_f32(&out.row_loss))
            } else {
                (Dtype::F32, vec![], le_f32(&[out.loss]))
            },
        ),
        (
            "per_sample_loss",
            (Dtype::F32, vec![b], le_f32(&out.row_loss)),
        ),
        (
            "grad_scale",
            (Dtype::F32, vec![], le_f32(&[out.grad_scale])),
        ),
        (
            "pred",
            (
                Dtype::I64,
                vec![b],
                out.pred
                    .iter()
                    .flat_map(|&p| i64::from(p).to_le_bytes())
                    .collect(),
            ),
        ),
        ("target_cos", (Dtype::F32, vec![b], le_f32(&out.target_cos))),
        (
            "best_other_cos",
            (Dtype::F32, vec![b], le_f32(&out.best_other_cos)),
        ),
    ];
    if let Some(g) = &out.grads {
        tensors.push((
            "grad_features",
            gradient_tensor(vec![b, shape.dim], &g.features),
        ));
        tensors.push((
            "grad_weights",
            gradient_tensor(vec![shape.classes, shape.dim], &g.classes),
        ));
    }
    let views = tensors
        .iter()
        .map(|(name, (dtype, dims, data))| {
            safetensors::tensor::TensorView::new(*dtype, dims.clone(), data)
                .map(|view| (name.to_string(), view))
                .map_err(|e| tensor_error(name, format!("cannot be encoded: {e}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    safetensors::serialize(views, None::<HashMap<String, String>>).map_err(|e| InputError {
        tensor: None,
        message: format!("cannot encode the outputs: {e}"),
    })
}

/// Writes `bytes` to `path` atomically: to a temporary file beside it, then a rename, so
/// a failed run never leaves a half-written output.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}
