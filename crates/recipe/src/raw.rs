//! The recipe schema as written in TOML. Every table rejects keys it does not define.
//!
//! ```toml
//! kiln = 1
//!
//! [input]
//! path = "../fixtures/tiny-llama"
//!
//! [output]
//! path = "../out/tiny-llama-q8_0.gguf"
//!
//! [quantize]
//! default = "q8_0"
//!
//! [[rules]]
//! tensors = "blk.*.attn_v.weight"
//! layers = "0..2"
//! type = "f16"
//!
//! [metadata]
//! name = "Tiny Llama"
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// A whole recipe file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RecipeFile {
    /// Recipe format version. Must be `1`.
    pub kiln: u32,
    /// The checkpoint to read. Optional in the file; `--input` overrides it.
    pub input: Option<InputSection>,
    /// The artifact to write. Optional in the file; `--output` overrides the path.
    pub output: Option<OutputSection>,
    /// How tensors are stored.
    pub quantize: QuantizeSection,
    /// Per-tensor rules, tried in order; the first rule whose selectors all match decides.
    #[serde(default)]
    pub rules: Vec<RuleSection>,
    /// `general.*` metadata for the artifact.
    pub metadata: Option<MetadataSection>,
    /// Calibration data for methods that need it (GPTQ, AWQ, LSQ).
    pub calibration: Option<CalibrationSection>,
    /// Shape fallbacks: `TYPE = "FALLBACK"` pairs used when a tensor's rows are not a multiple of
    /// the chosen type's block size. When the fallback does not fit either, or no fallback is
    /// listed, the tensor is stored as F16.
    #[serde(default)]
    pub fallback: std::collections::BTreeMap<String, String>,
}

/// `[input]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InputSection {
    /// A Hugging Face checkpoint folder (sharded or not) or a single `.safetensors` file,
    /// relative to the recipe's folder unless absolute.
    pub path: PathBuf,
}

/// `[calibration]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct CalibrationSection {
    /// kiln's activation statistics file (`kiln calibrate`), relative to the recipe's folder.
    pub stats: PathBuf,
}

/// `[output]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutputSection {
    /// The GGUF file to write, relative to the recipe's folder unless absolute.
    pub path: Option<PathBuf>,
    /// Data alignment in bytes (default 32, the only value llama.cpp's tools preserve).
    pub alignment: Option<u64>,
    /// Whether to record provenance in the artifact: `kiln.*` metadata keys (tool version, recipe
    /// hash, input hash) and a manifest `<artifact>.kiln.json` beside it. Default `true`. With
    /// `false`, the GGUF holds exactly what llama.cpp's tools would write.
    pub provenance: Option<bool>,
    /// Split the output into shards of at most this many tensors, as llama.cpp's
    /// `gguf-split --split-max-tensors` (files `<name>-0000N-of-0000M.gguf`).
    pub split_max_tensors: Option<usize>,
    /// Split the output into shards of at most this size (`500M`, `2G`: decimal units, counting
    /// tensor data as `gguf-split --split-max-size` does).
    pub split_max_size: Option<String>,
    /// `gguf` (default), `compressed-tensors` or `bitsandbytes` (the last two write a Hugging
    /// Face folder at `path`).
    pub format: Option<String>,
    /// Packed outputs: the largest safetensors shard (`5G`, `500M`); more than one shard gets
    /// Hugging Face's `model.safetensors.index.json`.
    pub max_shard_size: Option<String>,
}

/// `[quantize]`
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuantizeSection {
    /// Type for every tensor no rule matches: a ggml type name (`F32`, `F16`, `BF16`, `Q8_0`,
    /// case-insensitive) or `keep` (the checkpoint's own dtype).
    pub default: String,
    /// The `general.file_type` to record (a llama.cpp file type name such as `Q8_0` or `BF16`).
    /// Default: the file type of `default`, or of the most common output type when `default` is
    /// `keep`.
    pub file_type: Option<String>,
    /// An importance matrix (llama.cpp's GGUF `imatrix.gguf` or legacy `.dat`), relative to the
    /// recipe's folder. `--imatrix` overrides it.
    pub imatrix: Option<PathBuf>,
    /// Use only importance-matrix entries whose name contains one of these strings
    /// (llama-quantize's `--include-weights`).
    #[serde(default)]
    pub imatrix_include: Vec<String>,
    /// Ignore importance-matrix entries whose name contains one of these strings
    /// (`--exclude-weights`). Cannot be combined with `imatrix-include`.
    #[serde(default)]
    pub imatrix_exclude: Vec<String>,
    /// Types that must not be produced without importance data: a tensor assigned one of these
    /// types (by a rule that does not set `imatrix = false`) needs an imatrix entry, or the plan
    /// fails. Types whose kernel cannot work without one are refused regardless.
    #[serde(default)]
    pub require_imatrix: Vec<String>,
    /// Allow inputs whose tensors are already quantized (e.g. a Q4_K GGUF) to be requantized.
    /// Requantizing loses precision twice, so it must be asked for. F32, F16 and BF16 inputs are
    /// always allowed.
    #[serde(default)]
    pub allow_requantize: bool,
    // The method fields below are repeated in `RuleSection` rather than shared through
    // `#[serde(flatten)]`: serde cannot combine `flatten` with `deny_unknown_fields`, and a
    // misspelled key must stay an error. `packed_fields()` gathers them into one type.
    /// Packed types: `rtn` (default), `gptq`, `awq` or `lsq`.
    pub method: Option<String>,
    /// Packed types: `minmax` (default), `percentile`, `mse` or `kl`.
    pub estimator: Option<String>,
    /// Packed integer types: input columns per scale (default 128) or `"channel"`.
    pub group_size: Option<crate::packed::GroupSize>,
    /// Packed integer types: zero point fixed at 0 (default `true`).
    pub symmetric: Option<bool>,
    /// bitsandbytes types: quantize the absmax values too (default `false`).
    pub double_quant: Option<bool>,
    /// GPTQ: process columns by decreasing Hessian diagonal (default `false`).
    pub act_order: Option<bool>,
    /// compressed-tensors integer types: `"int8"` adds static per-tensor input activation scales
    /// (W8A8, `int-quantized`) from the calibration statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_activations: Option<String>,
    /// How the input activation range is estimated: `minmax` (default), `percentile`, `mse` or
    /// `kl` (all but `minmax` need a histogram in the statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_estimator: Option<String>,
}

/// One `[[rules]]` entry. Selectors are combined with AND; at least one is required.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RuleSection {
    /// Glob (or list of globs, any may match) over GGUF tensor names, e.g. `blk.*.ffn_down.weight`.
    pub tensors: Option<OneOrMany>,
    /// Glob (or list of globs) over the checkpoint's own (Hugging Face) tensor names, e.g.
    /// `model.layers.*.mlp.down_proj.weight`.
    pub hf_tensors: Option<OneOrMany>,
    /// Regular expression over GGUF tensor names (unanchored; use `^…$` to anchor).
    pub regex: Option<String>,
    /// Regular expression over Hugging Face tensor names.
    pub hf_regex: Option<String>,
    /// Layer numbers the rule applies to: `"3"`, `"0..4"` (end excluded), `"0..=3"`, `"8.."`,
    /// expressions in `n` (the block count) such as `"..n/8"`, `"more-bits"`, or a list such as
    /// `[0, 2, 5]`. Tensors outside any layer (embeddings, output) never match.
    pub layers: Option<LayersSpec>,
    /// Ordinal selection: the tensor's position among all tensors matching this rule's name
    /// selectors, in llama.cpp's order (block number, then name), with `n` their count. Same
    /// syntax as `layers`. llama-quantize's "first two attn_v tensors" is `nth = "0..2"`.
    pub nth: Option<LayersSpec>,
    /// Conditions on the model (and on the tensor's shape) that must all hold.
    pub when: Option<WhenSection>,
    /// Importance-matrix use for matching tensors: `true` (the default: used when available, and
    /// required for the types in `quantize.require-imatrix`), `false` (never used), or
    /// `"optional"` (used when available, never required; llama-quantize treats `token_embd` and
    /// `output` this way).
    pub imatrix: Option<ImatrixUse>,
    /// Whether the `[fallback]` table applies when the type does not fit the row length
    /// (default `true`). With `false`, a type that does not fit is an error.
    pub fallback: Option<bool>,
    /// The type to use: a ggml type name, `keep` (the source's type) or `default` (the recipe's
    /// default type; useful to stop later rules from matching).
    #[serde(rename = "type")]
    pub type_: String,
    /// A label shown by `kiln plan` instead of `rules[N]`.
    pub label: Option<String>,
    /// Packed types: `rtn` (default), `gptq`, `awq` or `lsq`.
    pub method: Option<String>,
    /// Packed types: `minmax` (default), `percentile`, `mse` or `kl`.
    pub estimator: Option<String>,
    /// Packed integer types: input columns per scale (default 128) or `"channel"`.
    pub group_size: Option<crate::packed::GroupSize>,
    /// Packed integer types: zero point fixed at 0 (default `true`).
    pub symmetric: Option<bool>,
    /// bitsandbytes types: quantize the absmax values too (default `false`).
    pub double_quant: Option<bool>,
    /// GPTQ: process columns by decreasing Hessian diagonal (default `false`).
    pub act_order: Option<bool>,
    /// compressed-tensors integer types: `"int8"` adds static per-tensor input activation scales
    /// (W8A8, `int-quantized`) from the calibration statistics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_activations: Option<String>,
    /// How the input activation range is estimated: `minmax` (default), `percentile`, `mse` or
    /// `kl` (all but `minmax` need a histogram in the statistics).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub activation_estimator: Option<String>,
}

/// `when`: conditions on the model being converted. All given conditions must hold.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct WhenSection {
    /// Grouped-query factor (`n_head / n_head_kv` of the first layer) at least this.
    pub gqa_min: Option<u32>,
    /// Grouped-query factor at most this.
    pub gqa_max: Option<u32>,
    /// Number of experts exactly this (0 for dense models).
    pub experts: Option<u32>,
    /// Number of experts at least this.
    pub experts_min: Option<u32>,
    /// Number of blocks (layers) exactly this.
    pub block_count: Option<u32>,
    /// Whether an importance matrix is in use.
    pub imatrix: Option<bool>,
    /// Whether the model ties its output to the token embedding (no `output.weight`).
    pub tied_embeddings: Option<bool>,
    /// Whether the tensor is a stacked expert tensor (three dimensions, more than one expert).
    pub expert_tensor: Option<bool>,
    /// Whether the tensor's rows are a multiple of the default type's block size.
    pub default_fits: Option<bool>,
}

/// `imatrix` of a rule: a boolean or `"optional"`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum ImatrixUse {
    /// `true` or `false`.
    Flag(bool),
    /// `"optional"`.
    Word(String),
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum OneOrMany {
    /// One value.
    One(String),
    /// Several values.
    Many(Vec<String>),
}

impl OneOrMany {
    /// The values as a list.
    pub fn to_vec(&self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        }
    }
}

/// A layer selection: a range string or a list of layer numbers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum LayersSpec {
    /// `"3"`, `"0..4"`, `"0..=3"`, `"8.."`, `"..n/8"`, `"n/8..7*n/8"` (bounds are integer
    /// expressions in `n`, the number of blocks, with C's truncating division), or `"more-bits"`
    /// (llama.cpp's `use_more_bits`: the first and last eighth, and every third layer between).
    Range(String),
    /// `[0, 2, 5]`.
    List(Vec<u32>),
}

/// `[metadata]`: `general.*` keys. Names follow llama.cpp's `general.*` keys with `_` written `-`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct MetadataSection {
    /// `general.name`. llama.cpp's converter derives it from the folder name; kiln never reads
    /// metadata from paths, so set it here.
    pub name: Option<String>,
    /// `general.author`.
    pub author: Option<String>,
    /// `general.version`.
    pub version: Option<String>,
    /// `general.organization`.
    pub organization: Option<String>,
    /// `general.finetune`.
    pub finetune: Option<String>,
    /// `general.basename`.
    pub basename: Option<String>,
    /// `general.description`.
    pub description: Option<String>,
    /// `general.quantized_by`.
    pub quantized_by: Option<String>,
    /// `general.size_label`. Default: computed from the parameter count as llama.cpp does
    /// (`3.8M`, `8x7.0B`).
    pub size_label: Option<String>,
    /// `general.license`.
    pub license: Option<String>,
    /// `general.url`.
    pub url: Option<String>,
    /// `general.repo_url`.
    pub repo_url: Option<String>,
    /// `general.tags`.
    pub tags: Option<Vec<String>>,
    /// `general.languages`.
    pub languages: Option<Vec<String>>,
    /// Any other keys, written after all others: strings and booleans as they are; numbers need
    /// an explicit GGUF type, e.g. `"my.count" = { u32 = 5 }` or `{ f32 = 0.5 }`.
    #[serde(default)]
    pub extra: toml::Table,
}

impl QuantizeSection {
    /// The packed-type fields.
    pub fn packed_fields(&self) -> crate::packed::PackedFields {
        crate::packed::PackedFields {
            method: self.method.clone(),
            estimator: self.estimator.clone(),
            group_size: self.group_size.clone(),
            symmetric: self.symmetric,
            double_quant: self.double_quant,
            act_order: self.act_order,
            input_activations: self.input_activations.clone(),
            activation_estimator: self.activation_estimator.clone(),
        }
    }
}

impl RuleSection {
    /// The packed-type fields.
    pub fn packed_fields(&self) -> crate::packed::PackedFields {
        crate::packed::PackedFields {
            method: self.method.clone(),
            estimator: self.estimator.clone(),
            group_size: self.group_size.clone(),
            symmetric: self.symmetric,
            double_quant: self.double_quant,
            act_order: self.act_order,
            input_activations: self.input_activations.clone(),
            activation_estimator: self.activation_estimator.clone(),
        }
    }
}
