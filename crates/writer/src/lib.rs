//! Output files: streaming GGUF v3 and safetensors writers, packed weight layouts, atomic file
//! creation, and hashing while writing.
//!
//! - [`GgufLayout`]: metadata plus tensor specs, laid out up front. Every offset is known from
//!   shapes and types before any tensor byte exists, so the header is written first and tensor
//!   data streams after it, one tensor (or one chunk of a tensor) at a time.
//! - [`GgufWriter`]: writes a layout to any `Write`, checks that each tensor receives exactly its
//!   byte size in order, pads to the alignment, and returns an xxh3 digest per tensor and for the
//!   whole file ([`WrittenFile`]), computed from the bytes as they pass (no second read).
//! - [`AtomicFile`]: a temporary file beside the destination, renamed over it only on
//!   [`AtomicFile::commit`]; dropped without commit, it is deleted, so a failed run leaves no file.
//! - [`safetensors`]: the same streaming discipline for safetensors files, Hugging Face's sharding
//!   and index, and a folder writer that commits shards, index and side files together.
//! - [`packed`]: the tensors and `quantization_config` blocks of compressed-tensors and
//!   bitsandbytes checkpoints, built from plain integer/code arrays (this crate does not depend on
//!   the quantizers).
//!
//! Layout rules follow llama.cpp's writers (`gguf.cpp`, `gguf_writer.py`): KV order as given,
//! tensor infos in the given order, data in the same order, each tensor at the previous one's end
//! rounded up to the alignment (the canonical layout ggml's reader demands), zero padding, and
//! the file ending on an alignment boundary.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod atomic;
mod gguf;
mod hashing;
pub mod packed;
pub mod safetensors;
pub mod split;

pub use atomic::AtomicFile;
pub use gguf::{GgufLayout, GgufWriter, TensorSlot, TensorSpec, WrittenFile, WrittenTensor};
pub use hashing::{HashingWriter, Xxh3Digest};

use std::path::PathBuf;

use kiln_types::GgmlType;

/// The default (and llama.cpp's only safe) GGUF alignment.
pub const GGUF_DEFAULT_ALIGNMENT: u64 = 32;

/// Why an output could not be written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// The operating system refused a file operation.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Writing to the output stream failed.
    #[error("write failed: {0}")]
    Stream(#[from] std::io::Error),
    /// Two tensors share a name.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),
    /// Two metadata entries share a key, or a key is empty.
    #[error("duplicate or empty metadata key `{0}`")]
    BadKey(String),
    /// llama.cpp cannot load tensor names of 64 bytes or more.
    #[error("tensor name `{0}` is {1} bytes; GGUF readers allow at most 63")]
    TensorNameTooLong(String, usize),
    /// A tensor has no dimensions, more than four, or an impossible size for its type.
    #[error("tensor `{name}`: shape {ne:?} is invalid for type {ty}")]
    InvalidShape {
        /// Tensor name.
        name: String,
        /// Dimensions, fastest first.
        ne: Vec<u64>,
        /// Type.
        ty: GgmlType,
    },
    /// The alignment is not a non-zero power of two, or disagrees with `general.alignment`.
    #[error("invalid alignment {0}")]
    InvalidAlignment(u64),
    /// A tensor received more or fewer bytes than its size.
    #[error("tensor `{name}`: expected {expected} bytes, got {actual}")]
    WrongTensorSize {
        /// Tensor name.
        name: String,
        /// Its byte size.
        expected: u64,
        /// Bytes supplied.
        actual: u64,
    },
    /// Tensor data arrived out of order or after the last tensor.
    #[error("tensor data out of order: expected tensor #{expected}, got #{actual}")]
    OutOfOrder {
        /// The tensor the writer expects next.
        expected: usize,
        /// The tensor supplied.
        actual: usize,
    },
    /// `finish` was called before every tensor was written.
    #[error("only {written} of {total} tensors were written")]
    Incomplete {
        /// Tensors written.
        written: usize,
        /// Tensors in the layout.
        total: usize,
    },
    /// The destination has no file name or its folder cannot hold a temporary file.
    #[error("{0}: not a file path")]
    BadDestination(PathBuf),
}
