//! Packed safetensors outputs: the output format, the packed weight types and the per-tensor
//! quantization method a recipe can ask for.
//!
//! ```toml
//! [output]
//! path = "../out/tiny-llama-w4a16"      # a folder
//! format = "compressed-tensors"          # or "bitsandbytes"; default "gguf"
//!
//! [calibration]
//! stats = "../out/tiny-llama.stats.safetensors"   # from `kiln calibrate`
//!
//! [quantize]
//! default = "keep"
//! method = "gptq"                        # rtn | gptq | awq | lsq (default rtn)
//! group-size = 128
//!
//! [[rules]]
//! hf-tensors = "model.layers.*.*_proj.weight"
//! type = "int4"
//! ```

use serde::{Deserialize, Serialize};

use crate::error::RecipeError;

/// What kind of artifact a recipe builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OutputFormat {
    /// A GGUF file (llama.cpp).
    #[default]
    Gguf,
    /// A Hugging Face folder in compressed-tensors `pack-quantized` layout (vLLM, transformers).
    CompressedTensors,
    /// A Hugging Face folder in bitsandbytes 4-bit layout (transformers).
    Bitsandbytes,
}

impl OutputFormat {
    /// Parses the `[output] format` value.
    pub fn parse(s: &str) -> Option<OutputFormat> {
        match s {
            "gguf" => Some(OutputFormat::Gguf),
            "compressed-tensors" => Some(OutputFormat::CompressedTensors),
            "bitsandbytes" => Some(OutputFormat::Bitsandbytes),
            _ => None,
        }
    }

    /// Whether the output is a packed safetensors folder.
    pub fn is_packed(self) -> bool {
        self != OutputFormat::Gguf
    }
}

/// A packed weight type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackedType {
    /// Integer weights of this many bits (2 to 8), compressed-tensors `pack-quantized`.
    Int(u8),
    /// bitsandbytes NF4.
    Nf4,
    /// bitsandbytes FP4.
    Fp4,
}

impl PackedType {
    /// Parses `int2` … `int8`, `nf4`, `fp4` (case-insensitive).
    pub fn parse(s: &str) -> Option<PackedType> {
        let lower = s.to_ascii_lowercase();
        match lower.as_str() {
            "nf4" => Some(PackedType::Nf4),
            "fp4" => Some(PackedType::Fp4),
            _ => lower
                .strip_prefix("int")
                .and_then(|b| b.parse::<u8>().ok())
                .filter(|b| (2..=8).contains(b))
                .map(PackedType::Int),
        }
    }

    /// The format this type belongs to.
    pub fn format(self) -> OutputFormat {
        match self {
            PackedType::Int(_) => OutputFormat::CompressedTensors,
            PackedType::Nf4 | PackedType::Fp4 => OutputFormat::Bitsandbytes,
        }
    }
}

impl std::fmt::Display for PackedType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PackedType::Int(b) => write!(f, "int{b}"),
            PackedType::Nf4 => f.write_str("nf4"),
            PackedType::Fp4 => f.write_str("fp4"),
        }
    }
}

/// How integer weights are chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Method {
    /// Round to nearest with the estimator's range.
    #[default]
    Rtn,
    /// GPTQ: column-by-column rounding with error compensation from the input Gram matrix.
    Gptq,
    /// AWQ-style per-input-channel scaling search.
    Awq,
    /// Learned step sizes (LSQ) minimizing the output error.
    Lsq,
}

impl Method {
    /// Parses `rtn`, `gptq`, `awq`, `lsq`.
    pub fn parse(s: &str) -> Option<Method> {
        match s {
            "rtn" => Some(Method::Rtn),
            "gptq" => Some(Method::Gptq),
            "awq" => Some(Method::Awq),
            "lsq" => Some(Method::Lsq),
            _ => None,
        }
    }

    /// Whether the method needs calibration statistics.
    pub fn needs_calibration(self) -> bool {
        self != Method::Rtn
    }
}

/// How a clipping range is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EstimatorChoice {
    /// Minimum and maximum.
    #[default]
    MinMax,
    /// The 99.9th percentile of |x| (per side for asymmetric schemes).
    Percentile,
    /// The clipping ratio that minimizes the quantization MSE.
    Mse,
    /// The threshold that minimizes the KL divergence of the histogram (TensorRT).
    Kl,
}

impl EstimatorChoice {
    /// Parses `minmax`, `percentile`, `mse`, `kl`.
    pub fn parse(s: &str) -> Option<EstimatorChoice> {
        match s {
            "minmax" => Some(EstimatorChoice::MinMax),
            "percentile" => Some(EstimatorChoice::Percentile),
            "mse" => Some(EstimatorChoice::Mse),
            "kl" => Some(EstimatorChoice::Kl),
            _ => None,
        }
    }
}

/// The options of a packed type, resolved from a rule and the `[quantize]` defaults.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackedOptions {
    /// The method.
    pub method: Method,
    /// The range estimator (for RTN, and the starting point of AWQ and LSQ).
    pub estimator: EstimatorChoice,
    /// Input columns per scale; `None` = one scale per output channel.
    pub group_size: Option<u32>,
    /// Zero point fixed at 0.
    pub symmetric: bool,
    /// bitsandbytes: quantize the absmax values too.
    pub double_quant: bool,
    /// GPTQ: process columns by decreasing Hessian diagonal.
    pub act_order: bool,
    /// Static 8-bit input activation scales (W8A8, compressed-tensors `int-quantized`).
    pub static_input_int8: bool,
    /// How the input activation range is estimated.
    pub activation_estimator: EstimatorChoice,
}

impl Default for PackedOptions {
    fn default() -> Self {
        PackedOptions {
            method: Method::Rtn,
            estimator: EstimatorChoice::MinMax,
            group_size: Some(128),
            symmetric: true,
            double_quant: false,
            act_order: false,
            static_input_int8: false,
            activation_estimator: EstimatorChoice::MinMax,
        }
    }
}

/// The packed-type fields a rule or `[quantize]` may set (all optional).
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct PackedFields {
    /// `rtn`, `gptq`, `awq` or `lsq`.
    pub method: Option<String>,
    /// `minmax`, `percentile`, `mse` or `kl`.
    pub estimator: Option<String>,
    /// Input columns per scale, or `"channel"` for one scale per output channel.
    pub group_size: Option<GroupSize>,
    /// Zero point fixed at 0 (default `true`).
    pub symmetric: Option<bool>,
    /// bitsandbytes double quantization (default `false`).
    pub double_quant: Option<bool>,
    /// GPTQ activation order (default `false`).
    pub act_order: Option<bool>,
    /// `"int8"`: static per-tensor input activation scales (W8A8); `"none"` (default): weights only.
    pub input_activations: Option<String>,
    /// `minmax`, `percentile`, `mse` or `kl`, for the input activation range.
    pub activation_estimator: Option<String>,
}

/// `group-size = 128` or `group-size = "channel"`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum GroupSize {
    /// Columns per group.
    Columns(u32),
    /// `"channel"`.
    Word(String),
}

impl PackedFields {
    /// These fields over `base`.
    pub(crate) fn resolve(
        &self,
        base: PackedOptions,
        context: &str,
    ) -> Result<PackedOptions, RecipeError> {
        let bad = |key: &str, value: &str, expected: &str| RecipeError::BadValue {
            context: format!("{context}.{key}"),
            value: value.to_string(),
            expected: expected.to_string(),
        };
        let mut out = base;
        if let Some(m) = &self.method {
            out.method =
                Method::parse(m).ok_or_else(|| bad("method", m, "rtn, gptq, awq or lsq"))?;
        }
        if let Some(e) = &self.estimator {
            out.estimator = EstimatorChoice::parse(e)
                .ok_or_else(|| bad("estimator", e, "minmax, percentile, mse or kl"))?;
        }
        match &self.group_size {
            None => {}
            Some(GroupSize::Columns(0)) => {
                return Err(bad("group-size", "0", "a positive number or \"channel\""))
            }
            Some(GroupSize::Columns(n)) => out.group_size = Some(*n),
            Some(GroupSize::Word(w)) if w == "channel" => out.group_size = None,
            Some(GroupSize::Word(w)) => {
                return Err(bad("group-size", w, "a positive number or \"channel\""))
            }
        }
        if let Some(s) = self.symmetric {
            out.symmetric = s;
        }
        if let Some(d) = self.double_quant {
            out.double_quant = d;
        }
        if let Some(a) = self.act_order {
            out.act_order = a;
        }
        match self.input_activations.as_deref() {
            None => {}
            Some("int8") => out.static_input_int8 = true,
            Some("none") => out.static_input_int8 = false,
            Some(other) => return Err(bad("input-activations", other, "\"int8\" or \"none\"")),
        }
        if let Some(e) = &self.activation_estimator {
            out.activation_estimator = EstimatorChoice::parse(e)
                .ok_or_else(|| bad("activation-estimator", e, "minmax, percentile, mse or kl"))?;
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names() {
        assert_eq!(PackedType::parse("INT4"), Some(PackedType::Int(4)));
        assert_eq!(PackedType::parse("int9"), None);
        assert_eq!(PackedType::parse("nf4"), Some(PackedType::Nf4));
        assert_eq!(
            OutputFormat::parse("bitsandbytes"),
            Some(OutputFormat::Bitsandbytes)
        );
        let f = PackedFields {
            method: Some("gptq".into()),
            group_size: Some(GroupSize::Word("channel".into())),
            ..Default::default()
        };
        let o = f.resolve(PackedOptions::default(), "rules[0]").unwrap();
        assert_eq!((o.method, o.group_size), (Method::Gptq, None));
        let bad = PackedFields {
            method: Some("magic".into()),
            ..Default::default()
        };
        assert!(bad.resolve(PackedOptions::default(), "rules[0]").is_err());
    }
}
