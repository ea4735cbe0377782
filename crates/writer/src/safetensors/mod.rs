//! Streaming safetensors output: one file ([`SafetensorsLayout`], [`SafetensorsWriter`]), a set of
//! shards with Hugging Face's index ([`SafetensorsSet`]), and a model folder committed as a whole
//! ([`FolderWriter`]).
//!
//! # The file format, as the `safetensors` crate (0.8) writes it
//!
//! An 8-byte little-endian header length `N`, `N` bytes of JSON, then the tensor data, tightly
//! packed (no alignment between tensors) and ending exactly at the end of the file. The JSON is
//! compact (`serde_json::to_string`): an optional `"__metadata__"` object of strings first, then
//! one entry per tensor in data order, `{"dtype":"F32","shape":[2,2],"data_offsets":[0,16]}`,
//! offsets relative to the start of the data. `N` is padded with spaces to a multiple of 8.
//!
//! `safetensors::serialize` orders tensors by **descending dtype** (in the crate's `Dtype` enum
//! order, which is by element size: `U64, I64, F64, C64, F32, U32, I32, BF16, F16, U16, I16, ...,
//! BOOL`) and then by name; [`TensorOrder::Safetensors`] does the same, so a file written here is
//! byte-identical to `safetensors::serialize` of the same tensors (tested). One exception: the
//! crate keeps `__metadata__` in a `HashMap`, so with two or more metadata entries its key order
//! is random; kiln sorts metadata keys (identical bytes for the usual zero or one entry, e.g.
//! transformers' `{"format": "pt"}`).
//!
//! [`TensorOrder::Declared`] keeps the caller's order instead. Every reader accepts any order
//! (the crate sorts entries by offset when it parses), and it lets a caller emit all tensors of a
//! layer together, so it never has to hold one layer's results while others are written.
//!
//! # Streaming
//!
//! All tensors (name, dtype, shape) are declared first, so every offset, and the header, is known
//! before any data exists. Data then arrives tensor by tensor in file order, each tensor in any
//! number of chunks; the writer checks order and sizes and hashes as it goes (xxh3-64 per tensor
//! and per file, like [`GgufWriter`](crate::GgufWriter)), and memory stays at the caller's chunk.

mod folder;
mod pyjson;
mod shards;

pub use folder::{FolderWriter, SideFile, WrittenSet, WrittenShard, WrittenSideFile};
pub use pyjson::to_python_json;
pub use shards::{
    plan_hf_shards, shard_file_name, PlannedShard, SafetensorsSet, SetOptions, INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
};

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::io::Write;
use std::path::PathBuf;

use xxhash_rust::xxh3::Xxh3;

use crate::{HashingWriter, WriteError, WrittenFile, WrittenTensor, Xxh3Digest};

/// Largest header the `safetensors` crate accepts (its `MAX_HEADER_SIZE`), in bytes of JSON
/// including padding.
pub const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The key the format reserves for the string metadata map.
const METADATA_KEY: &str = "__metadata__";

/// Element types of the safetensors format, spelled as in the file, in the `safetensors` crate's
/// declaration order (which its serializer sorts by, descending).
#[allow(non_camel_case_types, clippy::upper_case_acronyms)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Dtype {
    /// Boolean, one byte each.
    BOOL,
    /// MXFP4 element (4 bits).
    F4,
    /// MXFP6 element, E2M3 (6 bits).
    F6_E2M3,
    /// MXFP6 element, E3M2 (6 bits).
    F6_E3M2,
    /// Unsigned byte.
    U8,
    /// Signed byte.
    I8,
    /// FP8 E5M2.
    F8_E5M2,
    /// FP8 E4M3 (`float8_e4m3fn`).
    F8_E4M3,
    /// FP8 E8M0 (MX scale exponent).
    F8_E8M0,
    /// FP8 E4M3, FNUZ variant.
    F8_E4M3FNUZ,
    /// FP8 E5M2, FNUZ variant.
    F8_E5M2FNUZ,
    /// Signed 16-bit integer.
    I16,
    /// Unsigned 16-bit integer.
    U16,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    BF16,
    /// Signed 32-bit integer.
    I32,
    /// Unsigned 32-bit integer.
    U32,
    /// IEEE single precision.
    F32,
    /// Complex with two f32 parts.
    C64,
    /// IEEE double precision.
    F64,
    /// Signed 64-bit integer.
    I64,
    /// Unsigned 64-bit integer.
    U64,
}

impl Dtype {
    /// Every dtype, in declaration (ascending sort) order.
    pub const ALL: [Dtype; 22] = [
        Dtype::BOOL,
        Dtype::F4,
        Dtype::F6_E2M3,
        Dtype::F6_E3M2,
        Dtype::U8,
        Dtype::I8,
        Dtype::F8_E5M2,
        Dtype::F8_E4M3,
        Dtype::F8_E8M0,
        Dtype::F8_E4M3FNUZ,
        Dtype::F8_E5M2FNUZ,
        Dtype::I16,
        Dtype::U16,
        Dtype::F16,
        Dtype::BF16,
        Dtype::I32,
        Dtype::U32,
        Dtype::F32,
        Dtype::C64,
        Dtype::F64,
        Dtype::I64,
        Dtype::U64,
    ];

    /// The name written in the header (`"BF16"`, `"F8_E4M3"`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            Dtype::BOOL => "BOOL",
            Dtype::F4 => "F4",
            Dtype::F6_E2M3 => "F6_E2M3",
            Dtype::F6_E3M2 => "F6_E3M2",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::F8_E5M2 => "F8_E5M2",
            Dtype::F8_E4M3 => "F8_E4M3",
            Dtype::F8_E8M0 => "F8_E8M0",
            Dtype::F8_E4M3FNUZ => "F8_E4M3FNUZ",
            Dtype::F8_E5M2FNUZ => "F8_E5M2FNUZ",
            Dtype::I16 => "I16",
            Dtype::U16 => "U16",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::I32 => "I32",
            Dtype::U32 => "U32",
            Dtype::F32 => "F32",
            Dtype::C64 => "C64",
            Dtype::F64 => "F64",
            Dtype::I64 => "I64",
            Dtype::U64 => "U64",
        }
    }

    /// The dtype with this header name, if any.
    pub fn from_name(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bits per element.
    pub const fn bits(self) -> u64 {
        match self {
            Dtype::F4 => 4,
            Dtype::F6_E2M3 | Dtype::F6_E3M2 => 6,
            Dtype::BOOL
            | Dtype::U8
            | Dtype::I8
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E8M0
            | Dtype::F8_E4M3FNUZ
            | Dtype::F8_E5M2FNUZ => 8,
            Dtype::I16 | Dtype::U16 | Dtype::F16 | Dtype::BF16 => 16,
            Dtype::I32 | Dtype::U32 | Dtype::F32 => 32,
            Dtype::C64 | Dtype::F64 | Dtype::I64 | Dtype::U64 => 64,
        }
    }

    /// Bytes of a tensor of this dtype and shape (`[]` is a scalar), or `None` when the size
    /// overflows or sub-byte elements do not fill whole bytes (the `safetensors` crate rejects
    /// such tensors as misaligned).
    pub fn byte_size(self, shape: &[u64]) -> Option<u64> {
        let elements = shape.iter().try_fold(1u64, |n, &d| n.checked_mul(d))?;
        let bits = elements.checked_mul(self.bits())?;
        (bits % 8 == 0).then_some(bits / 8)
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A tensor to be stored: name, element type and shape (row-major, outermost first, as PyTorch
/// and the file state it).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorDecl {
    /// Tensor name (the state-dict key).
    pub name: String,
    /// Element type.
    pub dtype: Dtype,
    /// Dimensions, outermost first.
    pub shape: Vec<u64>,
}

impl TensorDecl {
    /// A declaration.
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: impl Into<Vec<u64>>) -> TensorDecl {
        TensorDecl {
            name: name.into(),
            dtype,
            shape: shape.into(),
        }
    }

    /// Byte size, checked as [`Dtype::byte_size`].
    pub fn nbytes(&self) -> Result<u64, SafetensorsError> {
        self.dtype
            .byte_size(&self.shape)
            .ok_or_else(|| SafetensorsError::BadShape {
                tensor: self.name.clone(),
                dtype: self.dtype,
                shape: self.shape.clone(),
            })
    }
}

/// Order of the tensors in a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TensorOrder {
    /// `safetensors::serialize`'s order: dtype descending, then name (byte-identical files).
    #[default]
    Safetensors,
    /// The order the tensors were declared in.
    Declared,
}

/// A tensor's place in a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsSlot {
    /// The tensor.
    pub decl: TensorDecl,
    /// Offset from the start of the data (the header's `data_offsets[0]`).
    pub offset: u64,
    /// Byte size.
    pub nbytes: u64,
}

/// Why a safetensors output could not be planned or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SafetensorsError {
    /// A tensor name is empty or is the reserved `__metadata__`.
    #[error("tensor name `{0}` is not allowed (empty, or the reserved `__metadata__`)")]
    BadName(String),
    /// Two tensors share a name.
    #[error("duplicate tensor name `{0}`")]
    DuplicateTensor(String),
    /// The byte size overflows, or sub-byte elements do not fill whole bytes.
    #[error("tensor `{tensor}`: shape {shape:?} is invalid for dtype {dtype}")]
    BadShape {
        /// Tensor name.
        tensor: String,
        /// Its dtype.
        dtype: Dtype,
        /// Its shape.
        shape: Vec<u64>,
    },
    /// The JSON header exceeds what readers accept.
    #[error("the header would be {0} bytes; safetensors readers accept at most 100000000")]
    HeaderTooLarge(u64),
    /// A tensor received more or fewer bytes than its size.
    #[error("tensor `{tensor}`: expected {expected} bytes, got {actual}")]
    WrongTensorSize {
        /// Tensor name.
        tensor: String,
        /// Its byte size.
        expected: u64,
        /// Bytes supplied so far.
        actual: u64,
    },
    /// Tensor data arrived out of order or after the last tensor.
    #[error("tensor data out of order: expected tensor #{expected} ({}), got #{actual}",
        next.as_deref().unwrap_or("none left"))]
    OutOfOrder {
        /// Index of the tensor the writer expects next (in write order).
        expected: usize,
        /// Index supplied.
        actual: usize,
        /// Name of the tensor expected next, if any is left.
        next: Option<String>,
    },
    /// `finish` was called before every tensor was written.
    #[error("only {written} of {total} tensors were written; `{next}` is missing")]
    Incomplete {
        /// Tensors written.
        written: usize,
        /// Tensors declared.
        total: usize,
        /// The first tensor not (fully) written.
        next: String,
    },
    /// The maximum shard size is zero.
    #[error("the maximum shard size must be at least one byte")]
    ZeroShardSize,
    /// A side file name is not a plain file name, or would clash with the weight files.
    #[error("side file `{0}`: not a plain file name, or it clashes with the weight files")]
    BadSideFile(String),
    /// Two side files share a name.
    #[error("side file `{0}` is given twice")]
    DuplicateSideFile(String),
    /// Writing to the output stream failed (a writer not bound to a path).
    #[error("write failed: {0}")]
    Stream(#[source] std::io::Error),
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// Creating or committing an atomic output file failed.
    #[error(transparent)]
    Output(#[from] WriteError),
}

/// Every tensor of a file with its offset decided, and the encoded header.
#[derive(Debug, Clone)]
pub struct SafetensorsLayout {
    tensors: Vec<SafetensorsSlot>,
    positions: HashMap<String, usize>,
    metadata: Option<BTreeMap<String, String>>,
    header: Vec<u8>,
    data_len: u64,
}

impl SafetensorsLayout {
    /// Lays out a file: checks names (non-empty, unique, not `__metadata__`) and sizes, orders
    /// the tensors, assigns offsets and encodes the header. `metadata: None` writes no
    /// `__metadata__` entry; `Some` of an empty map writes `"__metadata__":{}`, as the
    /// `safetensors` crate does.
    pub fn new(
        tensors: Vec<TensorDecl>,
        metadata: Option<BTreeMap<String, String>>,
        order: TensorOrder,
    ) -> Result<SafetensorsLayout, SafetensorsError> {
        let mut sized = Vec::with_capacity(tensors.len());
        let mut positions = HashMap::with_capacity(tensors.len());
        for decl in tensors {
            if decl.name.is_empty() || decl.name == METADATA_KEY {
                return Err(SafetensorsError::BadName(decl.name));
            }
            if positions.insert(decl.name.clone(), 0).is_some() {
                return Err(SafetensorsError::DuplicateTensor(decl.name));
            }
            let nbytes = decl.nbytes()?;
            sized.push((decl, nbytes));
        }
        if order == TensorOrder::Safetensors {
            // `prepare` in safetensors' tensor.rs: `right.dtype().cmp(&left.dtype())
            // .then(lname.cmp(rname))`. The sort is stable and names are unique, so the order is
            // total.
            sized.sort_by(|(l, _), (r, _)| r.dtype.cmp(&l.dtype).then(l.name.cmp(&r.name)));
        }
        let mut slots = Vec::with_capacity(sized.len());
        let mut offset = 0u64;
        for (i, (decl, nbytes)) in sized.into_iter().enumerate() {
            positions.insert(decl.name.clone(), i);
            let end = offset
                .checked_add(nbytes)
                .ok_or_else(|| SafetensorsError::BadShape {
                    tensor: decl.name.clone(),
                    dtype: decl.dtype,
                    shape: decl.shape.clone(),
                })?;
            slots.push(SafetensorsSlot {
                decl,
                offset,
                nbytes,
            });
            offset = end;
        }
        let header = encode_header(&slots, metadata.as_ref())?;
        Ok(SafetensorsLayout {
            tensors: slots,
            positions,
            metadata,
            header,
            data_len: offset,
        })
    }

    /// The tensors in file order (the order [`SafetensorsWriter`] expects their data in).
    pub fn tensors(&self) -> &[SafetensorsSlot] {
        &self.tensors
    }

    /// File-order index of the tensor with this name.
    pub fn position(&self, name: &str) -> Option<usize> {
        self.positions.get(name).copied()
    }

    /// The `__metadata__` map, if one is written.
    pub fn metadata(&self) -> Option<&BTreeMap<String, String>> {
        self.metadata.as_ref()
    }

    /// The encoded header: the 8-byte length, the JSON and its space padding.
    pub fn header(&self) -> &[u8] {
        &self.header
    }

    /// Where the tensor data starts (the header's size).
    pub fn data_offset(&self) -> u64 {
        self.header.len() as u64
    }

    /// Bytes of tensor data.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// Total file size.
    pub fn file_len(&self) -> u64 {
        self.data_offset() + self.data_len
    }
}

/// A JSON string literal exactly as `serde_json` (and therefore the `safetensors` crate) writes
/// it.
fn json_string(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

fn encode_header(
    slots: &[SafetensorsSlot],
    metadata: Option<&BTreeMap<String, String>>,
) -> Result<Vec<u8>, SafetensorsError> {
    let mut json = String::from("{");
    let mut first = true;
    if let Some(meta) = metadata {
        json.push_str(&json_string(METADATA_KEY));
        json.push_str(":{");
        for (i, (k, v)) in meta.iter().enumerate() {
            if i > 0 {
                json.push(',');
            }
            json.push_str(&json_string(k));
            json.push(':');
            json.push_str(&json_string(v));
        }
        json.push('}');
        first = false;
    }
    for slot in slots {
        if !first {
            json.push(',');
        }
        first = false;
        let shape = slot
            .decl
            .shape
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join(",");
        json.push_str(&json_string(&slot.decl.name));
        json.push_str(&format!(
            ":{{\"dtype\":\"{}\",\"shape\":[{shape}],\"data_offsets\":[{},{}]}}",
            slot.decl.dtype.name(),
            slot.offset,
            slot.offset + slot.nbytes
        ));
    }
    json.push('}');
    // The crate pads the JSON with spaces so the data starts 8-byte aligned.
    let padded = json.len().next_multiple_of(8);
    if padded as u64 > MAX_HEADER_BYTES {
        return Err(SafetensorsError::HeaderTooLarge(padded as u64));
    }
    let mut header = Vec::with_capacity(8 + padded);
    header.extend_from_slice(&(padded as u64).to_le_bytes());
    header.extend_from_slice(json.as_bytes());
    header.resize(8 + padded, b' ');
    Ok(header)
}

/// Streams a [`SafetensorsLayout`] to a writer: the header on creation, then tensor data in file
/// order, hashing as it goes.
pub struct SafetensorsWriter<W: Write> {
    out: HashingWriter<W>,
    layout: SafetensorsLayout,
    current: usize,
    current_written: u64,
    current_hash: Xxh3,
    written: Vec<WrittenTensor>,
}

impl<W: Write> SafetensorsWriter<W> {
    /// Writes the header. A layout whose first tensors are empty has them completed right away
    /// (they need no data).
    pub fn new(
        out: W,
        layout: SafetensorsLayout,
    ) -> Result<SafetensorsWriter<W>, SafetensorsError> {
        let mut out = HashingWriter::new(out);
        out.write_all(&layout.header)
            .map_err(SafetensorsError::Stream)?;
        let written = Vec::with_capacity(layout.tensors.len());
        let mut writer = SafetensorsWriter {
            out,
            layout,
            current: 0,
            current_written: 0,
            current_hash: Xxh3::new(),
            written,
        };
        writer.close_empty();
        Ok(writer)
    }

    /// The layout being written.
    pub fn layout(&self) -> &SafetensorsLayout {
        &self.layout
    }

    /// Index (in file order) of the tensor that receives the next bytes; equal to the tensor
    /// count once every tensor is complete.
    pub fn next_index(&self) -> usize {
        self.current
    }

    fn out_of_order(&self, actual: usize) -> SafetensorsError {
        SafetensorsError::OutOfOrder {
            expected: self.current,
            actual,
            next: self
                .layout
                .tensors
                .get(self.current)
                .map(|s| s.decl.name.clone()),
        }
    }

    /// Appends bytes of tensor `index` (file order), which must be the next unfinished tensor.
    /// A tensor may arrive in any number of chunks; it is complete when its size is reached.
    /// Tensors of zero bytes are completed without a call; writing one anyway (an empty chunk
    /// for it) is accepted and does nothing, so callers may treat every tensor alike.
    pub fn write_tensor_chunk(
        &mut self,
        index: usize,
        bytes: &[u8],
    ) -> Result<(), SafetensorsError> {
        if bytes.is_empty()
            && index < self.current
            && self
                .layout
                .tensors
                .get(index)
                .is_some_and(|s| s.nbytes == 0)
        {
            return Ok(());
        }
        let Some(slot) = self.layout.tensors.get(self.current) else {
            return Err(self.out_of_order(index));
        };
        if index != self.current {
            return Err(self.out_of_order(index));
        }
        let total = self.current_written + bytes.len() as u64;
        if total > slot.nbytes {
            return Err(SafetensorsError::WrongTensorSize {
                tensor: slot.decl.name.clone(),
                expected: slot.nbytes,
                actual: total,
            });
        }
        self.out
            .write_all(bytes)
            .map_err(SafetensorsError::Stream)?;
        self.current_hash.update(bytes);
        self.current_written = total;
        if total == slot.nbytes {
            self.close_current();
            self.close_empty();
        }
        Ok(())
    }

    /// Writes a whole tensor at once; its length must be the tensor's size.
    pub fn write_tensor(&mut self, index: usize, bytes: &[u8]) -> Result<(), SafetensorsError> {
        if index == self.current {
            if let Some(slot) = self.layout.tensors.get(index) {
                if bytes.len() as u64 != slot.nbytes || self.current_written != 0 {
                    return Err(SafetensorsError::WrongTensorSize {
                        tensor: slot.decl.name.clone(),
                        expected: slot.nbytes,
                        actual: self.current_written + bytes.len() as u64,
                    });
                }
            }
        }
        self.write_tensor_chunk(index, bytes)
    }

    fn close_current(&mut self) {
        let slot = &self.layout.tensors[self.current];
        self.written.push(WrittenTensor {
            name: slot.decl.name.clone(),
            file_offset: self.layout.data_offset() + slot.offset,
            nbytes: slot.nbytes,
            xxh3: Xxh3Digest(self.current_hash.digest()),
        });
        self.current += 1;
        self.current_written = 0;
        self.current_hash = Xxh3::new();
    }

    /// Completes any zero-byte tensors at the cursor: they take no data, so no caller could
    /// ever finish them with a chunk.
    fn close_empty(&mut self) {
        while self
            .layout
            .tensors
            .get(self.current)
            .is_some_and(|s| s.nbytes == 0)
        {
            self.close_current();
        }
    }

    /// Checks that every tensor was written, flushes, and returns the inner writer and digests.
    pub fn finish(mut self) -> Result<(W, WrittenFile), SafetensorsError> {
        if let Some(slot) = self.layout.tensors.get(self.current) {
            return Err(SafetensorsError::Incomplete {
                written: self.current,
                total: self.layout.tensors.len(),
                next: slot.decl.name.clone(),
            });
        }
        self.out.flush().map_err(SafetensorsError::Stream)?;
        debug_assert_eq!(
            self.out.position(),
            self.layout.file_len(),
            "internal error: safetensors writer position"
        );
        let file = WrittenFile {
            len: self.out.position(),
            xxh3: self.out.digest(),
            tensors: self.written,
        };
        Ok((self.out.into_inner(), file))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st_dtype(d: Dtype) -> safetensors::Dtype {
        serde_json::from_str(&format!("\"{}\"", d.name())).expect("same dtype names")
    }

    /// Deterministic filler bytes.
    fn bytes_for(seed: usize, n: u64) -> Vec<u8> {
        (0..n)
            .map(|i| (i as usize).wrapping_mul(31).wrapping_add(seed * 7) as u8)
            .collect()
    }

    fn write_all(
        decls: &[TensorDecl],
        metadata: Option<BTreeMap<String, String>>,
        order: TensorOrder,
        chunk: usize,
    ) -> (Vec<u8>, WrittenFile) {
        let layout = SafetensorsLayout::new(decls.to_vec(), metadata, order).unwrap();
        let data: HashMap<String, Vec<u8>> = decls
            .iter()
            .enumerate()
            .map(|(i, d)| (d.name.clone(), bytes_for(i, d.nbytes().unwrap())))
            .collect();
        let slots = layout.tensors().to_vec();
        let mut w = SafetensorsWriter::new(Vec::new(), layout).unwrap();
        for (i, slot) in slots.iter().enumerate() {
            let bytes = &data[&slot.decl.name];
            if bytes.is_empty() {
                // Completed already; an empty write is accepted as a no-op.
                w.write_tensor(i, bytes).unwrap();
                continue;
            }
            for c in bytes.chunks(chunk) {
                w.write_tensor_chunk(i, c).unwrap();
            }
        }
        w.finish().unwrap()
    }

    /// Every dtype, several shapes (scalar, empty, sub-byte), names that need escaping.
    fn many_tensors() -> Vec<TensorDecl> {
        let mut decls = Vec::new();
        for (i, d) in Dtype::ALL.into_iter().enumerate() {
            let shape = match d {
                Dtype::F4 => vec![2, 4],
                Dtype::F6_E2M3 | Dtype::F6_E3M2 => vec![4],
                _ => vec![(i % 3 + 1) as u64, 3],
            };
            decls.push(TensorDecl::new(
                format!("t{:02}.{}", 21 - i, d.name()),
                d,
                shape,
            ));
        }
        decls.push(TensorDecl::new("a.scalar", Dtype::F32, vec![]));
        decls.push(TensorDecl::new("a.empty", Dtype::BF16, vec![0, 5]));
        decls.push(TensorDecl::new(
            "quote\"back\\slash\ttab\u{1}é",
            Dtype::U8,
            vec![3],
        ));
        decls
    }

    #[test]
    fn byte_identical_to_safetensors_serialize() {
        let decls = many_tensors();
        let data: Vec<Vec<u8>> = decls
            .iter()
            .enumerate()
            .map(|(i, d)| bytes_for(i, d.nbytes().unwrap()))
            .collect();
        for meta in [
            None,
            Some(BTreeMap::new()),
            Some(BTreeMap::from([("format".to_string(), "pt".to_string())])),
        ] {
            let views: Vec<(String, safetensors::tensor::TensorView<'_>)> = decls
                .iter()
                .zip(&data)
                .map(|(d, b)| {
                    let shape = d.shape.iter().map(|&x| x as usize).collect();
                    let view =
                        safetensors::tensor::TensorView::new(st_dtype(d.dtype), shape, b).unwrap();
                    (d.name.clone(), view)
                })
                .collect();
            let hash_meta = meta.as_ref().map(|m| {
                m.clone()
                    .into_iter()
                    .collect::<std::collections::HashMap<_, _>>()
            });
            let expected = safetensors::serialize(views, hash_meta).unwrap();
            for chunk in [1, 3, 1 << 20] {
                let (bytes, file) =
                    write_all(&decls, meta.clone(), TensorOrder::Safetensors, chunk);
                assert_eq!(bytes, expected, "metadata {meta:?}, chunk {chunk}");
                assert_eq!(file.len, bytes.len() as u64);
                assert_eq!(file.xxh3, Xxh3Digest(xxhash_rust::xxh3::xxh3_64(&bytes)));
                for t in &file.tensors {
                    let range = t.file_offset as usize..(t.file_offset + t.nbytes) as usize;
                    assert_eq!(
                        t.xxh3,
                        Xxh3Digest(xxhash_rust::xxh3::xxh3_64(&bytes[range])),
                        "{}",
                        t.name
                    );
                }
            }
        }
    }

    #[test]
    fn declared_order_reads_back() {
        let decls = many_tensors();
        let (bytes, file) = write_all(&decls, None, TensorOrder::Declared, 5);
        let names: Vec<&str> = file.tensors.iter().map(|t| t.name.as_str()).collect();
        let declared: Vec<&str> = decls.iter().map(|d| d.name.as_str()).collect();
        assert_eq!(names, declared);
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (i, d) in decls.iter().enumerate() {
            let view = st.tensor(&d.name).unwrap();
            assert_eq!(view.dtype(), st_dtype(d.dtype));
            assert_eq!(view.data(), bytes_for(i, d.nbytes().unwrap()).as_slice());
        }
    }

    #[test]
    fn golden_header_of_a_tiny_file() {
        let layout = SafetensorsLayout::new(
            vec![
                TensorDecl::new("b", Dtype::F16, vec![1]),
                TensorDecl::new("a", Dtype::F32, vec![2]),
            ],
            Some(BTreeMap::from([("format".into(), "pt".into())])),
            TensorOrder::Safetensors,
        )
        .unwrap();
        let json = r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F16","shape":[1],"data_offsets":[8,10]}}"#;
        let padded = json.len().next_multiple_of(8);
        assert_eq!(&layout.header()[..8], &(padded as u64).to_le_bytes());
        assert_eq!(&layout.header()[8..8 + json.len()], json.as_bytes());
        assert!(layout.header()[8 + json.len()..].iter().all(|&b| b == b' '));
        assert_eq!(layout.file_len(), 8 + padded as u64 + 10);
        assert_eq!(layout.position("a"), Some(0));
        assert_eq!(layout.position("b"), Some(1));
    }

    #[test]
    fn order_sizes_and_completeness_are_checked() {
        let layout = SafetensorsLayout::new(
            vec![
                TensorDecl::new("a", Dtype::F32, vec![2]),
                TensorDecl::new("e", Dtype::F32, vec![0]),
                TensorDecl::new("b", Dtype::U8, vec![3]),
            ],
            None,
            TensorOrder::Declared,
        )
        .unwrap();
        let mut w = SafetensorsWriter::new(Vec::new(), layout.clone()).unwrap();
        assert!(matches!(
            w.write_tensor_chunk(2, &[0; 3]),
            Err(SafetensorsError::OutOfOrder { expected: 0, actual: 2, next: Some(ref n) }) if n == "a"
        ));
        assert!(matches!(
            w.write_tensor(0, &[0; 7]),
            Err(SafetensorsError::WrongTensorSize { ref tensor, expected: 8, actual: 7 }) if tensor == "a"
        ));
        w.write_tensor_chunk(0, &[0; 5]).unwrap();
        assert!(matches!(
            w.write_tensor_chunk(0, &[0; 4]),
            Err(SafetensorsError::WrongTensorSize {
                expected: 8,
                actual: 9,
                ..
            })
        ));
        w.write_tensor_chunk(0, &[0; 3]).unwrap();
        // The empty tensor completed itself.
        assert_eq!(w.next_index(), 2);
        let incomplete = SafetensorsWriter::new(Vec::new(), layout).unwrap().finish();
        assert!(matches!(
            incomplete,
            Err(SafetensorsError::Incomplete { written: 0, total: 3, ref next }) if next == "a"
        ));
        w.write_tensor(2, &[1, 2, 3]).unwrap();
        assert!(matches!(
            w.write_tensor_chunk(3, &[0]),
            Err(SafetensorsError::OutOfOrder {
                expected: 3,
                next: None,
                ..
            })
        ));
        let (bytes, file) = w.finish().unwrap();
        assert_eq!(file.tensors.len(), 3);
        safetensors::SafeTensors::deserialize(&bytes).unwrap();
    }

    #[test]
    fn layout_rejections() {
        let t = |n: &str, d, s: &[u64]| TensorDecl::new(n, d, s.to_vec());
        let new = |v| SafetensorsLayout::new(v, None, TensorOrder::Safetensors);
        assert!(matches!(
            new(vec![t("", Dtype::F32, &[1])]),
            Err(SafetensorsError::BadName(_))
        ));
        assert!(matches!(
            new(vec![t("__metadata__", Dtype::F32, &[1])]),
            Err(SafetensorsError::BadName(_))
        ));
        assert!(matches!(
            new(vec![t("a", Dtype::F32, &[1]), t("a", Dtype::U8, &[1])]),
            Err(SafetensorsError::DuplicateTensor(ref n)) if n == "a"
        ));
        assert!(matches!(
            new(vec![t("f4", Dtype::F4, &[3])]),
            Err(SafetensorsError::BadShape { ref tensor, .. }) if tensor == "f4"
        ));
        assert!(matches!(
            new(vec![t("huge", Dtype::F64, &[u64::MAX, 2])]),
            Err(SafetensorsError::BadShape { .. })
        ));
        assert!(matches!(
            new(vec![
                t("x", Dtype::U8, &[u64::MAX / 2]),
                t("y", Dtype::U8, &[u64::MAX / 2 + 2])
            ]),
            Err(SafetensorsError::BadShape { .. })
        ));
    }

    #[test]
    fn dtype_names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::from_name(d.name()), Some(d));
            // Same order as the crate's enum, which its serializer sorts by.
            for e in Dtype::ALL {
                assert_eq!(d.cmp(&e), st_dtype(d).cmp(&st_dtype(e)), "{d} vs {e}");
            }
            assert_eq!(d.bits() as usize, st_dtype(d).bitsize());
        }
        assert_eq!(Dtype::from_name("bf16"), None);
    }
}
