//! Zero-copy readers for model checkpoints: the only kiln crate that memory-maps files.
//!
//! - [`MmapAccess`]: the capability to memory-map inputs. Creating one is `unsafe`, because a
//!   mapped file that another process truncates or rewrites can crash kiln (SIGBUS) or give torn
//!   reads; the binary creates it once, with its reasons written down, and hands it on.
//! - [`Checkpoint`]: a Hugging Face checkpoint (one `.safetensors` file, or a folder of shards with
//!   `model.safetensors.index.json`), mapped and validated, listing [`TensorEntry`]s in the order
//!   llama.cpp's converter visits them, and handing out borrowed tensor bytes.
//! - [`safetensors`]: header parsing over `&[u8]` on top of the `safetensors` crate, with errors that
//!   name the offending tensor.
//! - [`gguf`]: a GGUF v2/v3 parser over `&[u8]` ([`gguf::GgufFile`]), typed metadata in file order and
//!   tensor views, every length and offset checked before use.
//!
//! Nothing here copies tensor data or allocates in proportion to it; every size read from a file is
//! checked against the bytes actually present before it is used.

#![deny(missing_docs)]

mod checkpoint;
mod error;
pub mod gguf;
mod gguf_input;
pub mod imatrix;
mod mmap;
pub mod safetensors;
pub mod split;

pub use checkpoint::{Checkpoint, SourceDtype, TensorEntry};
pub use error::ReadError;
pub use gguf_input::GgufInput;
pub use mmap::{MappedFile, MmapAccess};
