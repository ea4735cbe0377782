//! Errors of the checkpoint reader.

use std::path::PathBuf;

use crate::gguf::GgufError;
use crate::safetensors::SafetensorsError;

/// Why a checkpoint could not be opened or read. Every variant names the file (and the tensor,
/// where one is involved).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The operating system refused to open, map or read a file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A safetensors file is malformed.
    #[error("{path}: {source}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: SafetensorsError,
    },
    /// A GGUF file is malformed.
    #[error("{path}: {source}")]
    Gguf {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        source: GgufError,
    },
    /// `model.safetensors.index.json` is not valid JSON or lacks a `weight_map` object of strings.
    #[error("{path}: invalid shard index: {reason}")]
    InvalidIndex {
        /// The index file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The index names a shard file that does not exist.
    #[error(
        "{index}: shard `{shard}` (holding `{tensor}` and {more} more tensors) does not exist"
    )]
    MissingShard {
        /// The index file.
        index: PathBuf,
        /// The shard file name as written in the index.
        shard: String,
        /// One tensor the index places in that shard.
        tensor: String,
        /// How many other tensors the index places there.
        more: usize,
    },
    /// The index places a tensor in a shard that does not contain it.
    #[error("{index}: tensor `{tensor}` is listed in shard `{shard}`, which does not contain it")]
    TensorMissingFromShard {
        /// The index file.
        index: PathBuf,
        /// The tensor.
        tensor: String,
        /// The shard file name.
        shard: String,
    },
    /// A shard holds a tensor the index does not list (or lists in another shard).
    #[error("{path}: tensor `{tensor}` is not listed for this shard in the index")]
    TensorNotInIndex {
        /// The shard.
        path: PathBuf,
        /// The tensor.
        tensor: String,
    },
    /// Two shards hold a tensor of the same name.
    #[error("tensor `{tensor}` appears in both {first} and {second}")]
    DuplicateTensor {
        /// The tensor.
        tensor: String,
        /// Where it was seen first.
        first: PathBuf,
        /// Where it was seen again.
        second: PathBuf,
    },
    /// The folder has no safetensors weights.
    #[error("{path}: no safetensors weights found (looked for model.safetensors.index.json and *.safetensors)")]
    NoWeights {
        /// The folder.
        path: PathBuf,
    },
    /// A side file (config.json and the like) is not valid JSON.
    #[error("{path}: invalid JSON: {source}")]
    InvalidJson {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        source: serde_json::Error,
    },
}
