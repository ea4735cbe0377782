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

use serde::Deserialize;

/// A whole recipe file.
#[derive(Debug, Clone, Deserialize)]
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
}

/// `[input]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct InputSection {
    /// A Hugging Face checkpoint folder (sharded or not) or a single `.safetensors` file,
    /// relative to the recipe's folder unless absolute.
    pub path: PathBuf,
}

/// `[output]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct OutputSection {
    /// The GGUF file to write, relative to the recipe's folder unless absolute.
    pub path: Option<PathBuf>,
    /// Data alignment in bytes (default 32, the only value llama.cpp's tools preserve).
    pub alignment: Option<u64>,
}

/// `[quantize]`
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct QuantizeSection {
    /// Type for every tensor no rule matches: a ggml type name (`F32`, `F16`, `BF16`, `Q8_0`,
    /// case-insensitive) or `keep` (the checkpoint's own dtype).
    pub default: String,
    /// The `general.file_type` to record (a llama.cpp file type name such as `Q8_0` or `BF16`).
    /// Default: the file type of `default`, or of the most common output type when `default` is
    /// `keep`.
    pub file_type: Option<String>,
}

/// One `[[rules]]` entry. Selectors are combined with AND; at least one is required.
#[derive(Debug, Clone, Deserialize)]
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
    /// Layer numbers the rule applies to: `"3"`, `"0..4"` (end excluded), `"0..=3"`, `"8.."`, or a
    /// list such as `[0, 2, 5]`. Tensors outside any layer (embeddings, output) never match.
    pub layers: Option<LayersSpec>,
    /// The type to use: a ggml type name or `keep`.
    #[serde(rename = "type")]
    pub type_: String,
    /// A label shown by `kiln plan` instead of `rules[N]`.
    pub label: Option<String>,
}

/// A string or a list of strings.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum LayersSpec {
    /// `"3"`, `"0..4"`, `"0..=3"`, `"8.."`.
    Range(String),
    /// `[0, 2, 5]`.
    List(Vec<u32>),
}

/// `[metadata]`: `general.*` keys. Names follow llama.cpp's `general.*` keys with `_` written `-`.
#[derive(Debug, Clone, Default, Deserialize)]
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
