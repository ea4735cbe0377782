//! Model families as data: how a Hugging Face checkpoint becomes a GGUF model.
//!
//! - [`Family`]: one model family (today: `llama`, covering `LlamaForCausalLM` and
//!   `MistralForCausalLM`), described by a table of HF → GGUF tensor names, the transforms some
//!   tensors need, and the hyperparameter keys it writes. [`detect`] picks the family from
//!   `config.json`.
//! - [`HParams`]: `config.json` read as llama.cpp's converter reads it, including the defaults the
//!   `transformers` config classes would fill in.
//! - [`TensorMapping`] / [`Transform`]: what happens to one checkpoint tensor (its GGUF name, its
//!   layer, whether it must stay F32, and the row permutation of Llama's q/k projections).
//! - [`tokenizer`]: vocabulary export (SentencePiece `tokenizer.model`), special tokens and chat
//!   templates, with llama.cpp's precedence rules.
//! - [`gguf_metadata`]: the whole GGUF key/value list of a converted model, in the converter's
//!   order, so that kiln's files can be byte-identical to `convert_hf_to_gguf.py`'s.
//!
//! This crate reads no files: the pipeline hands it `config.json` and the tokenizer files as bytes
//! ([`SideFiles`]).

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod config_keys;
mod family;
mod hparams;
mod metadata;
mod names;
mod size_label;
pub mod tokenizer;

use std::collections::BTreeMap;

pub use config_keys::unknown_config_keys;
pub use family::{detect, Family, GeneratedTensor, Mapped, TensorMapping, Transform, FAMILIES};
pub use hparams::HParams;
pub use metadata::{gguf_metadata, MetadataInputs};
pub use size_label::{size_label, ParamCounts};

/// Side files of a checkpoint folder kiln may read, by file name.
pub const SIDE_FILE_NAMES: &[&str] = &[
    "config.json",
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "modules.json",
    "1_Pooling/config.json",
];

/// The side files that exist, by name, with their bytes.
#[derive(Debug, Clone, Default)]
pub struct SideFiles {
    files: BTreeMap<String, Vec<u8>>,
    pre_tokenizer: Option<String>,
}

impl SideFiles {
    /// An empty set.
    pub fn new() -> SideFiles {
        SideFiles::default()
    }

    /// Adds a file.
    pub fn insert(&mut self, name: &str, bytes: Vec<u8>) {
        self.files.insert(name.to_string(), bytes);
    }

    /// Sets the `tokenizer.ggml.pre` name to use instead of identifying the pre-tokenizer (the
    /// recipe's `[metadata.extra] "tokenizer.ggml.pre"`).
    pub fn set_pre_tokenizer(&mut self, name: &str) {
        self.pre_tokenizer = Some(name.to_string());
    }

    /// The pre-tokenizer name the user chose, if any.
    pub fn pre_tokenizer(&self) -> Option<&str> {
        self.pre_tokenizer.as_deref()
    }

    /// A file's bytes, if it exists.
    pub fn get(&self, name: &str) -> Option<&[u8]> {
        self.files.get(name).map(Vec::as_slice)
    }

    /// A file parsed as JSON; `Ok(None)` if absent.
    pub fn json(&self, name: &str) -> Result<Option<serde_json::Value>, ArchError> {
        self.get(name)
            .map(|b| {
                serde_json::from_slice(b).map_err(|e| ArchError::InvalidJson {
                    file: name.to_string(),
                    message: e.to_string(),
                })
            })
            .transpose()
    }

    /// A file as UTF-8 text; `Ok(None)` if absent.
    pub fn text(&self, name: &str) -> Result<Option<String>, ArchError> {
        self.get(name)
            .map(|b| {
                String::from_utf8(b.to_vec()).map_err(|_| ArchError::InvalidJson {
                    file: name.to_string(),
                    message: "not UTF-8".into(),
                })
            })
            .transpose()
    }
}

/// Why a checkpoint cannot be converted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ArchError {
    /// `config.json` is missing.
    #[error("config.json not found next to the checkpoint")]
    MissingConfig,
    /// A side file is not valid JSON (or text).
    #[error("{file}: {message}")]
    InvalidJson {
        /// File name.
        file: String,
        /// Parser message.
        message: String,
    },
    /// `config.json` names an architecture kiln does not know.
    #[error("architecture `{0}` is not supported (supported: {1})")]
    UnsupportedArchitecture(String, String),
    /// A required hyperparameter is missing or has the wrong type.
    #[error("config.json: `{key}` {problem}")]
    BadHParam {
        /// The key (or the list of keys tried).
        key: String,
        /// What is wrong.
        problem: String,
    },
    /// No tokenizer kiln can export was found.
    #[error("no supported tokenizer found: {0}")]
    NoTokenizer(String),
    /// `tokenizer.model` is not a valid SentencePiece model.
    #[error("tokenizer.model: {0}")]
    BadSentencePiece(String),
    /// The BPE pre-tokenizer's fingerprint is not one llama.cpp knows, so no `tokenizer.ggml.pre`
    /// name can be given without guessing.
    #[error(
        "the BPE pre-tokenizer is not recognized (chkhsh {hash}): kiln fingerprints the \
         tokenizer as transformers 4.57's AutoTokenizer does and llama.cpp's table has no entry \
         for it, so llama.cpp's converter would refuse it too (`kiln inspect` shows the digest). \
         If this is a known tokenizer with a new fingerprint, set \
         `[metadata.extra] \"tokenizer.ggml.pre\" = \"<name>\"` in the recipe after checking that \
         llama.cpp's pre-tokenizer of that name splits text the same way"
    )]
    UnknownPreTokenizer {
        /// sha256 of the token ids of the test text.
        hash: String,
    },
    /// `tokenizer.json` is not a tokenizer kiln can read.
    #[error("tokenizer.json: {0}")]
    BadTokenizerJson(String),
    /// A tensor's shape does not fit the transform it needs.
    #[error("tensor `{tensor}`: {problem}")]
    BadTensorShape {
        /// The HF tensor name.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
}
