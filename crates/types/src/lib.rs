//! The vocabulary every other kiln crate speaks, with no behaviour attached.
//!
//! - [`GgmlType`]: a ggml tensor type as stored on disk (an open newtype over the raw `u32` id), with
//!   one table of truth ([`GGML_TYPES`]) giving each known id its name, block size and byte size.
//! - [`FileType`]: llama.cpp's `general.file_type` values (`LLAMA_FTYPE_*`).
//! - [`MetaValue`] / [`MetaArray`]: a GGUF metadata value, typed exactly as it is (or will be) stored.
//!
//! Format crates (`kiln-reader`, `kiln-writer`) and the quantizer (`kiln-quant`) all depend on this
//! crate and on nothing of each other, which keeps the dependency arrows pointing one way.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod ftype;
mod ggml;
mod meta;
mod pyrepr;

pub use ftype::{FileType, FILE_TYPES};
pub use ggml::{GgmlType, TypeInfo, GGML_TYPES};
pub use meta::{MetaArray, MetaValue, MetaValueType};
pub use pyrepr::{push_python_json_string, python_float_repr};
