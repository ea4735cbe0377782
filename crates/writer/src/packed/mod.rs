//! Packed quantized safetensors layouts that Python runtimes load natively: compressed-tensors
//! ([`compressed_tensors`], for vLLM and transformers) and bitsandbytes 4-bit ([`bnb`], as
//! transformers serializes it), plus the `config.json` edit both need.
//!
//! Each format module turns one quantized linear weight into the tensors the format stores for it
//! (names, dtypes, shapes, bytes: [`PackedTensor`]) and builds the `quantization_config` block.
//! For planning before any weight is quantized, each also gives the same tensors' declarations
//! from shapes alone, so a [`SafetensorsSet`](crate::safetensors::SafetensorsSet) can be laid out
//! first and the bytes streamed later; the encoders return exactly those declarations (tested).
//!
//! The inputs are plain slices and small structs defined here, not `kiln-quant`'s types: format
//! crates never depend on `kiln-quant` (`crates/README.md`), so the pipeline converts (a struct
//! literal borrowing the quantizer's vectors). Everything a caller can get wrong is checked and
//! reported with the tensor's name ([`PackedError`]).
//!
//! Facts about the layouts come from `../shared/docs/ecosystem.md` (§0, §1.3–1.5, §2, §9.3) and
//! were checked against compressed-tensors' and transformers' sources; `docs/packed.md` lists
//! them with their sources.

pub mod bnb;
pub mod compressed_tensors;

use serde_json::Value;

use crate::safetensors::{to_python_json, Dtype, TensorDecl};

/// The `config.json` key both formats use.
pub const QUANTIZATION_CONFIG_KEY: &str = "quantization_config";

/// The dtypes a scale may be stored in (a model dtype, as compressed-tensors stores scales).
pub const SCALE_DTYPES: [Dtype; 3] = [Dtype::F32, Dtype::F16, Dtype::BF16];

/// One output tensor with its bytes (little-endian, row-major).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PackedTensor {
    /// Name, dtype and shape.
    pub decl: TensorDecl,
    /// The data; its length is the declaration's byte size.
    pub bytes: Vec<u8>,
}

/// Why a packed tensor or a `quantization_config` block could not be produced.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum PackedError {
    /// compressed-tensors names a layer's tensors after the module: the weight must be called
    /// `weight` or end in `.weight`.
    #[error("tensor `{0}`: expected a linear weight named `PREFIX.weight`")]
    BadWeightName(String),
    /// A bit width the format (or its runtimes) cannot take.
    #[error("tensor `{tensor}`: {bits}-bit weights are not supported here (4 or 8)")]
    UnsupportedBits {
        /// Tensor name.
        tensor: String,
        /// The bit width.
        bits: u8,
    },
    /// A group size of zero.
    #[error("tensor `{0}`: group size must be at least 1")]
    BadGroupSize(String),
    /// A combination the format has no agreed layout for.
    #[error("tensor `{tensor}`: {reason}")]
    Unsupported {
        /// Tensor name.
        tensor: String,
        /// What is not supported.
        reason: &'static str,
    },
    /// A buffer does not have the length the shape implies.
    #[error("tensor `{tensor}`: {what} has {actual} entries, expected {expected}")]
    Length {
        /// Tensor name.
        tensor: String,
        /// Which buffer.
        what: &'static str,
        /// Entries needed.
        expected: usize,
        /// Entries given.
        actual: usize,
    },
    /// A quantized value or zero point outside the bit width's signed range, or a non-zero zero
    /// point in a symmetric scheme (which stores none).
    #[error("tensor `{tensor}`: {what}[{index}] = {value} is outside {min}..={max}")]
    OutOfRange {
        /// Tensor name.
        tensor: String,
        /// Which buffer.
        what: &'static str,
        /// Position in the buffer.
        index: usize,
        /// The value.
        value: i64,
        /// Smallest allowed.
        min: i64,
        /// Largest allowed.
        max: i64,
    },
    /// A scale that is not finite and positive.
    #[error("tensor `{tensor}`: {what}[{index}] = {value} is not a finite positive scale")]
    BadScale {
        /// Tensor name.
        tensor: String,
        /// Which scale buffer.
        what: &'static str,
        /// Position.
        index: usize,
        /// The value.
        value: f32,
    },
    /// A scale that the storage dtype would round: the stored file would dequantize to other
    /// values than the ones the quantizer chose its integers for. Round scales with
    /// [`round_scale`] before quantizing with them.
    #[error(
        "tensor `{tensor}`: {what}[{index}] = {value:e} is not exactly representable in {dtype}; \
         round scales to the storage dtype before quantizing"
    )]
    ScaleNotRepresentable {
        /// Tensor name.
        tensor: String,
        /// Which scale buffer.
        what: &'static str,
        /// Position.
        index: usize,
        /// The value.
        value: f32,
        /// The storage dtype.
        dtype: Dtype,
    },
    /// A scale dtype other than F32, F16 or BF16.
    #[error("tensor `{tensor}`: scales cannot be stored as {dtype} (F32, F16 or BF16)")]
    ScaleDtype {
        /// Tensor name.
        tensor: String,
        /// The dtype asked for.
        dtype: Dtype,
    },
    /// The shape's element or byte count overflows.
    #[error("tensor `{0}`: shape is too large")]
    TooLarge(String),
    /// A bitsandbytes block size other than a power of two in 32..=4096.
    #[error("tensor `{tensor}`: block size {blocksize} is not a power of two in 32..=4096")]
    BadBlockSize {
        /// Tensor name.
        tensor: String,
        /// The block size.
        blocksize: usize,
    },
    /// The bitsandbytes quant-state JSON does not describe this tensor.
    #[error("tensor `{tensor}`: quant state JSON: {problem}")]
    QuantState {
        /// Tensor name.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// A `quantization_config` block could not be built.
    #[error("quantization_config: {0}")]
    Config(String),
    /// `config.json` is not a JSON object.
    #[error("config.json is not a JSON object")]
    ConfigNotObject,
}

/// `x` rounded to a scale dtype as torch's `.to(dtype)` does (round to nearest even), back in
/// f32; `None` for a dtype that is not in [`SCALE_DTYPES`]. Quantizers that target a bf16/f16
/// model should round their scales with this before quantizing, so the integers are chosen for
/// the scale that is stored.
pub fn round_scale(x: f32, dtype: Dtype) -> Option<f32> {
    match dtype {
        Dtype::F32 => Some(x),
        Dtype::F16 => Some(half::f16::from_f32(x).to_f32()),
        Dtype::BF16 => Some(half::bf16::from_f32(x).to_f32()),
        _ => None,
    }
}

/// Encodes scales in `dtype` after checking each is finite, positive and exactly representable.
pub(crate) fn encode_scales(
    tensor: &str,
    what: &'static str,
    values: &[f32],
    dtype: Dtype,
) -> Result<Vec<u8>, PackedError> {
    let width = match dtype {
        Dtype::F32 => 4,
        Dtype::F16 | Dtype::BF16 => 2,
        _ => {
            return Err(PackedError::ScaleDtype {
                tensor: tensor.to_string(),
                dtype,
            })
        }
    };
    let mut out = Vec::with_capacity(values.len() * width);
    for (index, &value) in values.iter().enumerate() {
        if !(value.is_finite() && value > 0.0) {
            return Err(PackedError::BadScale {
                tensor: tensor.to_string(),
                what,
                index,
                value,
            });
        }
        if round_scale(value, dtype) != Some(value) {
            return Err(PackedError::ScaleNotRepresentable {
                tensor: tensor.to_string(),
                what,
                index,
                value,
                dtype,
            });
        }
        match dtype {
            Dtype::F16 => {
                out.extend_from_slice(&half::f16::from_f32(value).to_bits().to_le_bytes())
            }
            Dtype::BF16 => {
                out.extend_from_slice(&half::bf16::from_f32(value).to_bits().to_le_bytes())
            }
            _ => out.extend_from_slice(&value.to_le_bytes()),
        }
    }
    Ok(out)
}

/// Checks a buffer length.
pub(crate) fn check_len(
    tensor: &str,
    what: &'static str,
    actual: usize,
    expected: usize,
) -> Result<(), PackedError> {
    if actual == expected {
        Ok(())
    } else {
        Err(PackedError::Length {
            tensor: tensor.to_string(),
            what,
            expected,
            actual,
        })
    }
}

/// `rows × cols` without overflow.
pub(crate) fn elements(tensor: &str, rows: usize, cols: usize) -> Result<usize, PackedError> {
    rows.checked_mul(cols)
        .ok_or_else(|| PackedError::TooLarge(tensor.to_string()))
}

/// Adds or replaces `quantization_config` in a `config.json` object, keeping every other key and
/// the key order: an existing entry is replaced in place; a new one goes where a sorted config
/// (transformers writes them with `sort_keys=True`) would have it, or last if the keys are not
/// sorted.
pub fn set_quantization_config(config: &mut Value, block: Value) -> Result<(), PackedError> {
    let Value::Object(map) = config else {
        return Err(PackedError::ConfigNotObject);
    };
    if let Some(slot) = map.get_mut(QUANTIZATION_CONFIG_KEY) {
        *slot = block;
        return Ok(());
    }
    let keys: Vec<&String> = map.keys().collect();
    let sorted = keys.windows(2).all(|w| w[0] <= w[1]);
    if sorted {
        let at = keys.partition_point(|k| k.as_str() < QUANTIZATION_CONFIG_KEY);
        map.shift_insert(at, QUANTIZATION_CONFIG_KEY.to_string(), block);
    } else {
        map.insert(QUANTIZATION_CONFIG_KEY.to_string(), block);
    }
    Ok(())
}

/// `config.json` bytes as transformers writes them: `json.dumps(config, indent=2)` (keys in the
/// value's order) and a final newline.
pub fn config_json_bytes(config: &Value) -> Vec<u8> {
    let mut text = to_python_json(config, false);
    text.push('\n');
    text.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_edit_keeps_order() {
        let mut sorted: Value = serde_json::from_str(
            r#"{"architectures": ["LlamaForCausalLM"], "hidden_size": 64, "rms_norm_eps": 1e-05, "vocab_size": 10}"#,
        )
        .unwrap();
        set_quantization_config(&mut sorted, Value::Bool(true)).unwrap();
        let keys: Vec<&str> = sorted
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(
            keys,
            [
                "architectures",
                "hidden_size",
                "quantization_config",
                "rms_norm_eps",
                "vocab_size"
            ]
        );
        let text = String::from_utf8(config_json_bytes(&sorted)).unwrap();
        assert!(text.contains("\"rms_norm_eps\": 1e-05,"), "{text}");
        assert!(text.ends_with("}\n"));

        let mut unsorted: Value = serde_json::from_str(r#"{"z": 1, "a": 2}"#).unwrap();
        set_quantization_config(&mut unsorted, Value::Null).unwrap();
        set_quantization_config(&mut unsorted, Value::Bool(false)).unwrap();
        let keys: Vec<&str> = unsorted
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(keys, ["z", "a", "quantization_config"]);
        assert_eq!(unsorted["quantization_config"], Value::Bool(false));

        assert_eq!(
            set_quantization_config(&mut Value::Null, Value::Null),
            Err(PackedError::ConfigNotObject)
        );
    }

    #[test]
    fn scales_are_checked() {
        assert_eq!(
            encode_scales("t", "scales", &[1.5, 0.25], Dtype::BF16).unwrap(),
            vec![0xC0, 0x3F, 0x80, 0x3E]
        );
        assert!(matches!(
            encode_scales("t", "scales", &[1.0, 0.1], Dtype::BF16),
            Err(PackedError::ScaleNotRepresentable { index: 1, .. })
        ));
        let r = round_scale(0.1, Dtype::F16).unwrap();
        assert!(encode_scales("t", "scales", &[r], Dtype::F16).is_ok());
        for bad in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            assert!(matches!(
                encode_scales("t", "scales", &[bad], Dtype::F32),
                Err(PackedError::BadScale { .. })
            ));
        }
        assert!(matches!(
            encode_scales("t", "scales", &[1.0], Dtype::I32),
            Err(PackedError::ScaleDtype { .. })
        ));
        assert_eq!(round_scale(1.0, Dtype::U8), None);
    }
}
