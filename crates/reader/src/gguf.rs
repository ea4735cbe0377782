//! GGUF v2/v3 parsing over a byte slice.
//!
//! # The format, briefly
//!
//! A GGUF file (all integers little-endian) is:
//!
//! 1. the magic `GGUF`, a `u32` version (2 or 3; both share this layout), a tensor count and a
//!    key-value count (each 64-bit);
//! 2. the key-value pairs: a key (a string: `u64` byte length, then the bytes), a `u32` value type
//!    and the value. Arrays are an element type, a `u64` count and the elements back to back;
//! 3. one tensor-info record per tensor: name (string), `u32` n_dims, n_dims `i64` dimensions
//!    (fastest first), `u32` ggml type and a `u64` offset relative to the data section;
//! 4. zero padding up to a multiple of the alignment (`general.alignment`, default 32), measured
//!    from the start of the file: the data section starts there;
//! 5. the tensor data.
//!
//! [`GgufFile::parse`] decodes the header into owned values ([`MetaValue`]s, [`GgufTensorInfo`]s)
//! and keeps a borrow of the whole file, so [`GgufFile::tensor_data`] hands out tensor bytes without
//! copying them.
//!
//! # Validation
//!
//! Every number read from the file is checked before it is used: a length or count is compared with
//! the bytes actually left in the file (times the smallest possible size of one item) before anything
//! is allocated for it, products and sums of sizes and offsets are checked for overflow, and nothing in
//! this module indexes, unwraps or casts in a way that could panic. Each failure has its own
//! [`GgufError`] variant carrying the key, tensor, offsets and lengths involved.
//!
//! Decisions where kiln is stricter or looser than llama.cpp's reader (`ggml/src/gguf.cpp`):
//!
//! - **Strings must be valid UTF-8** (keys, string values, string-array elements and tensor names),
//!   else [`GgufError::InvalidUtf8`] naming where. llama.cpp does not validate, but every writer kiln
//!   cares about encodes `str` as UTF-8, [`MetaValue::String`] holds a Rust `String`, and decoding
//!   lossily would silently change bytes that kiln later writes back out.
//! - **Alignment**: `general.alignment`, if present, must be a `UINT32` that is a non-zero power of
//!   two, exactly llama.cpp's rule (so 1, 2 and 4 are accepted; kiln's writer should still use 32).
//! - **Layout**: ggml's own reader demands the canonical layout (tensor *i* stored right after tensor
//!   *i − 1*, each at the next aligned slot). kiln reads any layout the format can express (gaps,
//!   another order), as long as every tensor of a known type has an aligned offset, lies inside the
//!   file and overlaps no other tensor. The padding after the last tensor is not required (llama.cpp's
//!   model loader does not require it either).
//! - **Unknown tensor types** (retired or future ids) are listed with [`GgufTensorInfo::nbytes`] `None`
//!   so that inspection still works; their size and range cannot be checked, only their offset's
//!   alignment. llama.cpp rejects them.
//! - **Dimensions**: n_dims must be 1..=4 (llama.cpp tolerates 0; no writer produces it) and each
//!   dimension non-negative; the element count must fit in `i64`, as in llama.cpp.
//! - Booleans: any non-zero byte is `true`, as in llama.cpp.
//! - A file whose version looks byte-swapped (`version & 0xFFFF == 0`) is reported as
//!   [`GgufError::BigEndian`]: big-endian GGUF files are not supported.

use std::collections::HashSet;
use std::fmt;

use kiln_types::{GgmlType, MetaArray, MetaValue, MetaValueType};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: [u8; 4] = *b"GGUF";
/// Alignment of the data section when `general.alignment` is absent (`GGUF_DEFAULT_ALIGNMENT`).
pub const DEFAULT_ALIGNMENT: u64 = 32;
/// The metadata key that overrides [`DEFAULT_ALIGNMENT`].
pub const ALIGNMENT_KEY: &str = "general.alignment";
/// Longest string accepted, in bytes (1 GiB, llama.cpp's limit).
pub const MAX_STRING_LEN: u64 = 1 << 30;
/// Most elements accepted in one metadata array (1 Gi, llama.cpp's limit).
pub const MAX_ARRAY_LEN: u64 = 1 << 30;
/// Longest tensor name accepted, in bytes (`GGML_MAX_NAME` = 64 including the NUL terminator).
pub const MAX_TENSOR_NAME_LEN: u64 = 63;
/// Most dimensions a tensor may have (`GGML_MAX_DIMS`).
pub const MAX_DIMS: u32 = 4;

/// Smallest possible key-value pair: key length, a 1-byte key, value type, a 1-byte value.
const MIN_KV_BYTES: u64 = 8 + 1 + 4 + 1;
/// Smallest possible tensor-info record: name length, empty name, n_dims, one dim, type, offset.
const MIN_TENSOR_INFO_BYTES: u64 = 8 + 4 + 8 + 4 + 8;
/// [`MAX_TENSOR_NAME_LEN`] as a slice length.
const NAME_PREFIX_LEN: usize = MAX_TENSOR_NAME_LEN as usize;
/// Largest element count llama.cpp accepts (`int64_t`).
const MAX_ELEMENTS: u64 = i64::MAX as u64;

/// What is wrong with a GGUF file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GgufError {
    /// The file does not start with `GGUF`.
    #[error("not a GGUF file (bad magic)")]
    BadMagic,
    /// The version is not 2 or 3.
    #[error("unsupported GGUF version {version} (kiln reads versions 2 and 3)")]
    UnsupportedVersion {
        /// The version as read (little-endian).
        version: u32,
    },
    /// The version looks byte-swapped: the file was written big-endian.
    #[error("GGUF version field {version:#010x} looks byte-swapped: big-endian GGUF files are not supported")]
    BigEndian {
        /// The version as read (little-endian).
        version: u32,
    },
    /// The file ends before a field that the header says is there.
    #[error("unexpected end of file reading {what} ({context}) at offset {offset}: {needed} bytes needed, {available} available")]
    UnexpectedEof {
        /// The field being read (`"string bytes"`, `"tensor offset"`, ...).
        what: &'static str,
        /// Where in the header: `"header"`, `"key #3"`, ``"value of `general.name`"``, ...
        context: String,
        /// Absolute offset of the field.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file at that offset.
        available: u64,
    },
    /// The key-value count is larger than the rest of the file could hold.
    #[error(
        "key-value count {count} is impossible: the rest of the file holds at most {max} pairs"
    )]
    TooManyKeys {
        /// Count declared in the header.
        count: u64,
        /// Most pairs the remaining bytes could hold.
        max: u64,
    },
    /// The tensor count is larger than the rest of the file could hold.
    #[error(
        "tensor count {count} is impossible: the rest of the file holds at most {max} tensor infos"
    )]
    TooManyTensors {
        /// Count declared in the header.
        count: u64,
        /// Most tensor-info records the remaining bytes could hold.
        max: u64,
    },
    /// A string is longer than [`MAX_STRING_LEN`].
    #[error("string of {len} bytes ({context}) at offset {offset} exceeds the {max}-byte limit")]
    StringTooLong {
        /// Where in the header.
        context: String,
        /// Absolute offset of the string's length field.
        offset: u64,
        /// Declared length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// A string is not valid UTF-8.
    #[error("string ({context}) is not valid UTF-8 (first bad byte at offset {offset})")]
    InvalidUtf8 {
        /// Where in the header: ``"key #3"``, ``"value of `general.name`"``,
        /// ``"element 7 of `tokenizer.ggml.tokens`"``, ``"name of tensor #2"``.
        context: String,
        /// Absolute offset of the first invalid byte.
        offset: u64,
    },
    /// A key is the empty string.
    #[error("key #{index} at offset {offset} is empty")]
    EmptyKey {
        /// Position of the pair in the file (0-based).
        index: u64,
        /// Absolute offset of the key.
        offset: u64,
    },
    /// A key appears twice.
    #[error("key `{key}` appears more than once")]
    DuplicateKey {
        /// The key.
        key: String,
    },
    /// A value (or array element) type id is not one of the 13 GGUF types.
    #[error("key `{key}`: invalid value type id {id}")]
    InvalidValueType {
        /// The key.
        key: String,
        /// The raw type id.
        id: u32,
    },
    /// An array's elements are arrays.
    #[error("key `{key}`: arrays of arrays are not supported")]
    NestedArray {
        /// The key.
        key: String,
    },
    /// An array has more than [`MAX_ARRAY_LEN`] elements.
    #[error("key `{key}`: array of {count} elements exceeds the {max}-element limit")]
    ArrayTooLong {
        /// The key.
        key: String,
        /// Declared element count.
        count: u64,
        /// The limit.
        max: u64,
    },
    /// `general.alignment` is not stored as `UINT32`.
    #[error("general.alignment must be a u32, found {found:?}")]
    AlignmentNotU32 {
        /// The stored type.
        found: MetaValueType,
    },
    /// `general.alignment` is zero or not a power of two.
    #[error("general.alignment = {value} is not a non-zero power of two")]
    BadAlignment {
        /// The stored value.
        value: u32,
    },
    /// A tensor name is longer than [`MAX_TENSOR_NAME_LEN`] bytes.
    #[error("tensor name `{prefix}…` is {len} bytes long; the limit is {max}")]
    TensorNameTooLong {
        /// The first [`MAX_TENSOR_NAME_LEN`] bytes of the name, decoded lossily.
        prefix: String,
        /// Its length in bytes.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// Two tensors have the same name.
    #[error("tensor `{tensor}` appears more than once")]
    DuplicateTensor {
        /// The name.
        tensor: String,
    },
    /// A tensor has zero dimensions.
    #[error("tensor `{tensor}` has 0 dimensions")]
    NoDims {
        /// The tensor.
        tensor: String,
    },
    /// A tensor has more than [`MAX_DIMS`] dimensions.
    #[error("tensor `{tensor}` has {n_dims} dimensions; at most {MAX_DIMS} are allowed")]
    TooManyDims {
        /// The tensor.
        tensor: String,
        /// Declared dimension count.
        n_dims: u32,
    },
    /// A tensor dimension is negative.
    #[error("tensor `{tensor}`: dimension {dim} is negative ({value})")]
    NegativeDim {
        /// The tensor.
        tensor: String,
        /// Which dimension (0 = fastest).
        dim: usize,
        /// The stored value.
        value: i64,
    },
    /// A tensor's row length is not a multiple of its type's block size.
    #[error(
        "tensor `{tensor}`: row length ne[0] = {ne0} is not a multiple of the block size {block}"
    )]
    RowNotMultipleOfBlock {
        /// The tensor.
        tensor: String,
        /// `ne[0]`.
        ne0: u64,
        /// The type's block size.
        block: u64,
    },
    /// A tensor's element count or byte size overflows.
    #[error("tensor `{tensor}`: element count or byte size of shape {ne:?} overflows")]
    SizeOverflow {
        /// The tensor.
        tensor: String,
        /// Its dimensions.
        ne: Vec<u64>,
    },
    /// A tensor's offset is not a multiple of the alignment.
    #[error("tensor `{tensor}`: offset {offset} is not a multiple of the alignment {alignment}")]
    MisalignedOffset {
        /// The tensor.
        tensor: String,
        /// Its offset relative to the data section.
        offset: u64,
        /// The file's alignment.
        alignment: u64,
    },
    /// A tensor's bytes extend past the end of the file.
    #[error("tensor `{tensor}`: bytes {start}..{end} lie outside the file of {file_len} bytes")]
    TensorOutOfBounds {
        /// The tensor.
        tensor: String,
        /// Absolute start offset (saturated at `u64::MAX` on overflow).
        start: u64,
        /// Absolute end offset, exclusive (saturated at `u64::MAX` on overflow).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// Two tensors' byte ranges overlap.
    #[error("tensors `{first}` and `{second}` overlap")]
    OverlappingTensors {
        /// The tensor starting first in the file.
        first: String,
        /// The tensor starting inside it.
        second: String,
    },
}

impl GgufError {
    /// Fills in where in the header an error happened, if the error has a `context` not yet set.
    fn with_context(mut self, f: impl FnOnce() -> String) -> Self {
        match &mut self {
            GgufError::UnexpectedEof { context, .. }
            | GgufError::StringTooLong { context, .. }
            | GgufError::InvalidUtf8 { context, .. }
                if context.is_empty() =>
            {
                *context = f();
            }
            _ => {}
        }
        self
    }
}

/// One tensor-info record.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// Tensor name.
    pub name: String,
    /// Dimensions, fastest first (`ne[0]` is the row length), as stored (no trailing-1 trimming).
    pub ne: Vec<u64>,
    /// Stored ggml type (possibly unknown to kiln).
    pub ty: GgmlType,
    /// Offset relative to the start of the data section.
    pub offset: u64,
    /// Byte size, when the type is known.
    pub nbytes: Option<u64>,
}

/// A parsed GGUF file borrowing its bytes.
#[derive(Clone)]
pub struct GgufFile<'a> {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Alignment of the data section (`general.alignment` or 32).
    pub alignment: u64,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    bytes: &'a [u8],
}

impl fmt::Debug for GgufFile<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("version", &self.version)
            .field("metadata", &self.metadata)
            .field("tensors", &self.tensors)
            .field("alignment", &self.alignment)
            .field("data_offset", &self.data_offset)
            .field("file_len", &self.bytes.len())
            .finish()
    }
}

impl<'a> GgufFile<'a> {
    /// Parses and validates a GGUF file (see the module documentation for what is checked).
    pub fn parse(bytes: &'a [u8]) -> Result<GgufFile<'a>, GgufError> {
        let mut cur = Cursor { bytes, pos: 0 };
        let header = || "header".to_owned();

        let magic: [u8; 4] = cur.array("magic").map_err(|e| e.with_context(header))?;
        if magic != GGUF_MAGIC {
            return Err(GgufError::BadMagic);
        }
        let version = cur.u32("version").map_err(|e| e.with_context(header))?;
        if version != 0 && version & 0xFFFF == 0 {
            return Err(GgufError::BigEndian { version });
        }
        if !(2..=3).contains(&version) {
            return Err(GgufError::UnsupportedVersion { version });
        }
        // Both counts are `int64_t` in C++; negative values read as huge `u64`s and fail below.
        let n_tensors = cur
            .u64("tensor count")
            .map_err(|e| e.with_context(header))?;
        let n_kv = cur
            .u64("key-value count")
            .map_err(|e| e.with_context(header))?;

        let remaining = to_u64(cur.remaining());
        let max_kv = remaining / MIN_KV_BYTES;
        if n_kv > max_kv {
            return Err(GgufError::TooManyKeys {
                count: n_kv,
                max: max_kv,
            });
        }
        let max_tensors =
            remaining.saturating_sub(n_kv.saturating_mul(MIN_KV_BYTES)) / MIN_TENSOR_INFO_BYTES;
        if n_tensors > max_tensors {
            return Err(GgufError::TooManyTensors {
                count: n_tensors,
                max: max_tensors,
            });
        }
        // Both counts are now bounded by the file length, so they fit in `usize`.
        let n_kv_usize = usize::try_from(n_kv).map_err(|_| GgufError::TooManyKeys {
            count: n_kv,
            max: max_kv,
        })?;
        let n_tensors_usize =
            usize::try_from(n_tensors).map_err(|_| GgufError::TooManyTensors {
                count: n_tensors,
                max: max_tensors,
            })?;

        // Key-value pairs.
        let mut metadata = Vec::with_capacity(n_kv_usize);
        let mut seen_keys: HashSet<&'a str> = HashSet::with_capacity(n_kv_usize);
        let mut alignment = DEFAULT_ALIGNMENT;
        for index in 0..n_kv {
            let (key, value) = read_kv(&mut cur, index)?;
            if !seen_keys.insert(key) {
                return Err(GgufError::DuplicateKey {
                    key: key.to_owned(),
                });
            }
            if key == ALIGNMENT_KEY {
                alignment = match &value {
                    MetaValue::U32(a) if a.is_power_of_two() => u64::from(*a),
                    MetaValue::U32(a) => return Err(GgufError::BadAlignment { value: *a }),
                    other => {
                        return Err(GgufError::AlignmentNotU32 {
                            found: other.value_type(),
                        })
                    }
                };
            }
            metadata.push((key.to_owned(), value));
        }

        // Tensor-info records.
        let mut tensors = Vec::with_capacity(n_tensors_usize);
        let mut seen_tensors: HashSet<&'a str> = HashSet::with_capacity(n_tensors_usize);
        for index in 0..n_tensors {
            let info = read_tensor_info(&mut cur, index, alignment, &mut seen_tensors)?;
            tensors.push(info);
        }

        // The data section starts at the end of the header, padded to the alignment.
        let header_end = to_u64(cur.pos);
        // `alignment` is a non-zero power of two and `header_end` a slice length, so this neither
        // fails nor saturates in practice; `None` (zero or overflow) cannot panic either way.
        let data_offset = header_end
            .checked_next_multiple_of(alignment)
            .unwrap_or(u64::MAX);
        let file = GgufFile {
            version,
            metadata,
            tensors,
            alignment,
            data_offset,
            bytes,
        };
        file.check_ranges()?;
        Ok(file)
    }

    /// Checks that every tensor of a known type lies inside the file and that no two overlap.
    fn check_ranges(&self) -> Result<(), GgufError> {
        let file_len = self.file_len();
        let mut ranges: Vec<(u64, u64, usize)> = Vec::with_capacity(self.tensors.len());
        for (index, t) in self.tensors.iter().enumerate() {
            let Some(nbytes) = t.nbytes else { continue };
            let start = self.data_offset.checked_add(t.offset);
            let end = start.and_then(|s| s.checked_add(nbytes));
            match (start, end) {
                (Some(start), Some(end)) if end <= file_len => {
                    if start < end {
                        ranges.push((start, end, index));
                    }
                }
                _ => {
                    return Err(GgufError::TensorOutOfBounds {
                        tensor: t.name.clone(),
                        start: start.unwrap_or(u64::MAX),
                        end: end.unwrap_or(u64::MAX),
                        file_len,
                    })
                }
            }
        }
        ranges.sort_unstable();
        // Track the range reaching furthest so far; a range starting before its end overlaps it.
        let mut furthest: Option<(u64, usize)> = None;
        for &(start, end, index) in &ranges {
            if let Some((prev_end, prev_index)) = furthest {
                if start < prev_end {
                    return Err(GgufError::OverlappingTensors {
                        first: self.tensor_name(prev_index),
                        second: self.tensor_name(index),
                    });
                }
            }
            if furthest.is_none_or(|(prev_end, _)| end > prev_end) {
                furthest = Some((end, index));
            }
        }
        Ok(())
    }

    fn tensor_name(&self, index: usize) -> String {
        self.tensors
            .get(index)
            .map(|t| t.name.clone())
            .unwrap_or_default()
    }

    /// The value of a metadata key.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// The position of the tensor called `name` in [`GgufFile::tensors`].
    pub fn tensor_index(&self, name: &str) -> Option<usize> {
        self.tensors.iter().position(|t| t.name == name)
    }

    /// Length of the whole file in bytes.
    pub fn file_len(&self) -> u64 {
        to_u64(self.bytes.len())
    }

    /// The bytes of tensor `index`, if the index exists and its type is known.
    pub fn tensor_data(&self, index: usize) -> Option<&'a [u8]> {
        let t = self.tensors.get(index)?;
        let start = self.data_offset.checked_add(t.offset)?;
        let end = start.checked_add(t.nbytes?)?;
        self.bytes
            .get(usize::try_from(start).ok()?..usize::try_from(end).ok()?)
    }
}

/// `usize` → `u64`, which cannot fail on any platform Rust supports; saturates if it ever did.
fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A read position in the file. Every read is bounds-checked and reports what it was reading.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn rest(&self) -> &'a [u8] {
        self.bytes.get(self.pos..).unwrap_or_default()
    }

    fn remaining(&self) -> usize {
        self.rest().len()
    }

    fn eof(&self, what: &'static str, needed: u64) -> GgufError {
        GgufError::UnexpectedEof {
            what,
            context: String::new(),
            offset: to_u64(self.pos),
            needed,
            available: to_u64(self.remaining()),
        }
    }

    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], GgufError> {
        match self.rest().get(..n) {
            Some(s) => {
                // `pos + n <= bytes.len()` since the slice exists.
                self.pos += n;
                Ok(s)
            }
            None => Err(self.eof(what, to_u64(n))),
        }
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], GgufError> {
        match self.rest().first_chunk::<N>() {
            Some(a) => {
                self.pos += N;
                Ok(*a)
            }
            None => Err(self.eof(what, to_u64(N))),
        }
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, GgufError> {
        self.array(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, GgufError> {
        self.array(what).map(u64::from_le_bytes)
    }

    fn i64(&mut self, what: &'static str) -> Result<i64, GgufError> {
        self.array(what).map(i64::from_le_bytes)
    }

    /// A GGUF string's raw bytes (`u64` length, then the bytes), with its length checked against
    /// [`MAX_STRING_LEN`] and the bytes left.
    fn raw_string(&mut self) -> Result<&'a [u8], GgufError> {
        let offset = to_u64(self.pos);
        let len = self.u64("string length")?;
        if len > MAX_STRING_LEN {
            return Err(GgufError::StringTooLong {
                context: String::new(),
                offset,
                len,
                max: MAX_STRING_LEN,
            });
        }
        let n = usize::try_from(len).map_err(|_| self.eof("string bytes", len))?;
        self.take(n, "string bytes")
    }

    /// A GGUF string that must be UTF-8.
    fn str(&mut self) -> Result<&'a str, GgufError> {
        let raw = self.raw_string()?;
        let start = self.pos.saturating_sub(raw.len());
        utf8(raw, start)
    }
}

fn utf8(raw: &[u8], start: usize) -> Result<&str, GgufError> {
    std::str::from_utf8(raw).map_err(|e| GgufError::InvalidUtf8 {
        context: String::new(),
        offset: to_u64(start.saturating_add(e.valid_up_to())),
    })
}

/// Reads one key-value pair.
fn read_kv<'a>(cur: &mut Cursor<'a>, index: u64) -> Result<(&'a str, MetaValue), GgufError> {
    let key_offset = to_u64(cur.pos);
    let key = cur
        .str()
        .map_err(|e| e.with_context(|| format!("key #{index}")))?;
    if key.is_empty() {
        return Err(GgufError::EmptyKey {
            index,
            offset: key_offset,
        });
    }
    let value = read_value(cur, key).map_err(|e| e.with_context(|| format!("value of `{key}`")))?;
    Ok((key, value))
}

/// Reads a value type id and the value.
fn read_value(cur: &mut Cursor<'_>, key: &str) -> Result<MetaValue, GgufError> {
    let id = cur.u32("value type")?;
    let ty = MetaValueType::from_id(id).ok_or_else(|| GgufError::InvalidValueType {
        key: key.to_owned(),
        id,
    })?;
    const W: &str = "value";
    Ok(match ty {
        MetaValueType::U8 => MetaValue::U8(u8::from_le_bytes(cur.array(W)?)),
        MetaValueType::I8 => MetaValue::I8(i8::from_le_bytes(cur.array(W)?)),
        MetaValueType::U16 => MetaValue::U16(u16::from_le_bytes(cur.array(W)?)),
        MetaValueType::I16 => MetaValue::I16(i16::from_le_bytes(cur.array(W)?)),
        MetaValueType::U32 => MetaValue::U32(u32::from_le_bytes(cur.array(W)?)),
        MetaValueType::I32 => MetaValue::I32(i32::from_le_bytes(cur.array(W)?)),
        MetaValueType::F32 => MetaValue::F32(f32::from_le_bytes(cur.array(W)?)),
        MetaValueType::Bool => MetaValue::Bool(u8::from_le_bytes(cur.array(W)?) != 0),
        MetaValueType::String => MetaValue::String(cur.str()?.to_owned()),
        MetaValueType::Array => MetaValue::Array(read_array(cur, key)?),
        MetaValueType::U64 => MetaValue::U64(u64::from_le_bytes(cur.array(W)?)),
        MetaValueType::I64 => MetaValue::I64(i64::from_le_bytes(cur.array(W)?)),
        MetaValueType::F64 => MetaValue::F64(f64::from_le_bytes(cur.array(W)?)),
    })
}

/// Smallest encoded size of one array element of type `ty`.
fn min_element_size(ty: MetaValueType) -> u64 {
    match ty {
        MetaValueType::U8 | MetaValueType::I8 | MetaValueType::Bool => 1,
        MetaValueType::U16 | MetaValueType::I16 => 2,
        MetaValueType::U32 | MetaValueType::I32 | MetaValueType::F32 => 4,
        // A string is at least its 8-byte length; arrays never get this far.
        MetaValueType::U64
        | MetaValueType::I64
        | MetaValueType::F64
        | MetaValueType::String
        | MetaValueType::Array => 8,
    }
}

/// Reads an array's element type, count and elements (after the ARRAY type id).
fn read_array(cur: &mut Cursor<'_>, key: &str) -> Result<MetaArray, GgufError> {
    let id = cur.u32("array element type")?;
    let ty = MetaValueType::from_id(id).ok_or_else(|| GgufError::InvalidValueType {
        key: key.to_owned(),
        id,
    })?;
    if ty == MetaValueType::Array {
        return Err(GgufError::NestedArray {
            key: key.to_owned(),
        });
    }
    let count = cur.u64("array length")?;
    if count > MAX_ARRAY_LEN {
        return Err(GgufError::ArrayTooLong {
            key: key.to_owned(),
            count,
            max: MAX_ARRAY_LEN,
        });
    }
    const W: &str = "array elements";
    let needed = count.saturating_mul(min_element_size(ty));
    if needed > to_u64(cur.remaining()) {
        return Err(cur.eof(W, needed));
    }
    // `count` is now at most the number of bytes left, so it fits in `usize` and the
    // allocations below are bounded by the file size.
    let n = usize::try_from(count).map_err(|_| cur.eof(W, needed))?;
    Ok(match ty {
        MetaValueType::U8 => MetaArray::U8(cur.take(n, W)?.to_vec()),
        MetaValueType::I8 => MetaArray::I8(read_vec(cur, n, i8::from_le_bytes)?),
        MetaValueType::U16 => MetaArray::U16(read_vec(cur, n, u16::from_le_bytes)?),
        MetaValueType::I16 => MetaArray::I16(read_vec(cur, n, i16::from_le_bytes)?),
        MetaValueType::U32 => MetaArray::U32(read_vec(cur, n, u32::from_le_bytes)?),
        MetaValueType::I32 => MetaArray::I32(read_vec(cur, n, i32::from_le_bytes)?),
        MetaValueType::F32 => MetaArray::F32(read_vec(cur, n, f32::from_le_bytes)?),
        MetaValueType::Bool => MetaArray::Bool(read_vec(cur, n, |[b]: [u8; 1]| b != 0)?),
        MetaValueType::U64 => MetaArray::U64(read_vec(cur, n, u64::from_le_bytes)?),
        MetaValueType::I64 => MetaArray::I64(read_vec(cur, n, i64::from_le_bytes)?),
        MetaValueType::F64 => MetaArray::F64(read_vec(cur, n, f64::from_le_bytes)?),
        MetaValueType::String => {
            let mut v = Vec::with_capacity(n);
            for i in 0..n {
                let s = cur
                    .str()
                    .map_err(|e| e.with_context(|| format!("element {i} of `{key}`")))?;
                v.push(s.to_owned());
            }
            MetaArray::String(v)
        }
        MetaValueType::Array => {
            return Err(GgufError::NestedArray {
                key: key.to_owned(),
            })
        }
    })
}

/// Decodes `n` fixed-size elements; the caller has checked that `n * N` bytes remain.
fn read_vec<T, const N: usize>(
    cur: &mut Cursor<'_>,
    n: usize,
    decode: impl Fn([u8; N]) -> T,
) -> Result<Vec<T>, GgufError> {
    let mut v = Vec::with_capacity(n);
    for _ in 0..n {
        v.push(decode(cur.array("array elements")?));
    }
    Ok(v)
}

/// Reads and checks one tensor-info record (everything but its range in the file, which needs the
/// data offset).
fn read_tensor_info<'a>(
    cur: &mut Cursor<'a>,
    index: u64,
    alignment: u64,
    seen: &mut HashSet<&'a str>,
) -> Result<GgufTensorInfo, GgufError> {
    let name_ctx = || format!("name of tensor #{index}");
    let raw = cur.raw_string().map_err(|e| e.with_context(name_ctx))?;
    let len = to_u64(raw.len());
    if len > MAX_TENSOR_NAME_LEN {
        let shown = raw.get(..NAME_PREFIX_LEN).unwrap_or(raw);
        return Err(GgufError::TensorNameTooLong {
            prefix: String::from_utf8_lossy(shown).into_owned(),
            len,
            max: MAX_TENSOR_NAME_LEN,
        });
    }
    let name =
        utf8(raw, cur.pos.saturating_sub(raw.len())).map_err(|e| e.with_context(name_ctx))?;
    if !seen.insert(name) {
        return Err(GgufError::DuplicateTensor {
            tensor: name.to_owned(),
        });
    }
    let ctx = || format!("tensor `{name}`");

    let n_dims = cur
        .u32("tensor dimension count")
        .map_err(|e| e.with_context(ctx))?;
    if n_dims == 0 {
        return Err(GgufError::NoDims {
            tensor: name.to_owned(),
        });
    }
    if n_dims > MAX_DIMS {
        return Err(GgufError::TooManyDims {
            tensor: name.to_owned(),
            n_dims,
        });
    }
    let mut ne = Vec::with_capacity(4);
    for dim in 0..n_dims {
        let value = cur
            .i64("tensor dimension")
            .map_err(|e| e.with_context(ctx))?;
        let d = u64::try_from(value).map_err(|_| GgufError::NegativeDim {
            tensor: name.to_owned(),
            dim: usize::try_from(dim).unwrap_or(usize::MAX),
            value,
        })?;
        ne.push(d);
    }
    // Type ids are `int32_t` in C++; a negative one reads as a large, unknown id.
    let ty = GgmlType(cur.u32("tensor type").map_err(|e| e.with_context(ctx))?);
    let offset = cur.u64("tensor offset").map_err(|e| e.with_context(ctx))?;

    let overflow = || GgufError::SizeOverflow {
        tensor: name.to_owned(),
        ne: ne.clone(),
    };
    let n_elements = ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d));
    if n_elements.is_none_or(|n| n > MAX_ELEMENTS) {
        return Err(overflow());
    }
    let nbytes = match ty.block_size() {
        Some(block) => {
            let ne0 = ne.first().copied().unwrap_or(1);
            if ne0.checked_rem(block) != Some(0) {
                return Err(GgufError::RowNotMultipleOfBlock {
                    tensor: name.to_owned(),
                    ne0,
                    block,
                });
            }
            Some(ty.tensor_bytes(&ne).ok_or_else(overflow)?)
        }
        None => None,
    };
    if offset.checked_rem(alignment) != Some(0) {
        return Err(GgufError::MisalignedOffset {
            tensor: name.to_owned(),
            offset,
            alignment,
        });
    }
    Ok(GgufTensorInfo {
        name: name.to_owned(),
        ne,
        ty,
        offset,
        nbytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;
    use std::path::{Path, PathBuf};

    // ---------------------------------------------------------------- builder

    fn put_str(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
    }

    fn put_u32(out: &mut Vec<u8>, v: u32) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    fn put_u64(out: &mut Vec<u8>, v: u64) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// Encodes a value payload (without its type id), independently of the parser.
    fn encode_payload(out: &mut Vec<u8>, v: &MetaValue) {
        match v {
            MetaValue::U8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Bool(x) => out.push(u8::from(*x)),
            MetaValue::String(s) => put_str(out, s.as_bytes()),
            MetaValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
            MetaValue::Array(a) => {
                put_u32(out, a.element_type().id());
                put_u64(out, a.len() as u64);
                match a {
                    MetaArray::U8(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::U8(*x))),
                    MetaArray::I8(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::I8(*x))),
                    MetaArray::U16(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::U16(*x))),
                    MetaArray::I16(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::I16(*x))),
                    MetaArray::U32(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::U32(*x))),
                    MetaArray::I32(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::I32(*x))),
                    MetaArray::F32(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::F32(*x))),
                    MetaArray::Bool(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::Bool(*x))),
                    MetaArray::String(v) => v.iter().for_each(|x| put_str(out, x.as_bytes())),
                    MetaArray::U64(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::U64(*x))),
                    MetaArray::I64(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::I64(*x))),
                    MetaArray::F64(v) => v
                        .iter()
                        .for_each(|x| encode_payload(out, &MetaValue::F64(*x))),
                }
            }
        }
    }

    /// A key-value pair with a raw key, type id and payload.
    fn kv_raw(key: &[u8], type_id: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        put_str(&mut out, key);
        put_u32(&mut out, type_id);
        out.extend_from_slice(payload);
        out
    }

    fn kv_bytes(key: &str, v: &MetaValue) -> Vec<u8> {
        let mut payload = Vec::new();
        encode_payload(&mut payload, v);
        kv_raw(key.as_bytes(), v.value_type().id(), &payload)
    }

    #[derive(Clone)]
    struct TensorSpec {
        name: Vec<u8>,
        /// Overrides the n_dims written (default: `ne.len()`).
        n_dims: Option<u32>,
        ne: Vec<i64>,
        ty: u32,
        /// Explicit offset (default: the canonical next aligned slot).
        offset: Option<u64>,
        data: Vec<u8>,
    }

    fn spec(name: &str, ne: &[i64], ty: GgmlType, data: Vec<u8>) -> TensorSpec {
        TensorSpec {
            name: name.as_bytes().to_vec(),
            n_dims: None,
            ne: ne.to_vec(),
            ty: ty.0,
            offset: None,
            data,
        }
    }

    /// Writes GGUF files in code.
    #[derive(Clone)]
    struct Builder {
        magic: [u8; 4],
        version_bytes: [u8; 4],
        n_tensors: Option<u64>,
        n_kv: Option<u64>,
        kvs: Vec<Vec<u8>>,
        tensors: Vec<TensorSpec>,
        alignment: u64,
    }

    struct Built {
        bytes: Vec<u8>,
        data_offset: u64,
        offsets: Vec<u64>,
    }

    fn align_up(n: u64, a: u64) -> u64 {
        n.div_ceil(a) * a
    }

    impl Builder {
        fn new() -> Self {
            Builder {
                magic: GGUF_MAGIC,
                version_bytes: 3u32.to_le_bytes(),
                n_tensors: None,
                n_kv: None,
                kvs: Vec::new(),
                tensors: Vec::new(),
                alignment: DEFAULT_ALIGNMENT,
            }
        }

        fn version(mut self, v: u32) -> Self {
            self.version_bytes = v.to_le_bytes();
            self
        }

        fn kv(mut self, key: &str, v: MetaValue) -> Self {
            self.kvs.push(kv_bytes(key, &v));
            self
        }

        fn raw_kv(mut self, bytes: Vec<u8>) -> Self {
            self.kvs.push(bytes);
            self
        }

        /// Sets `general.alignment` and lays the file out with it.
        fn alignment(mut self, a: u32) -> Self {
            self.alignment = u64::from(a);
            self.kv(ALIGNMENT_KEY, MetaValue::U32(a))
        }

        fn tensor(mut self, name: &str, ne: &[i64], ty: GgmlType, data: Vec<u8>) -> Self {
            self.tensors.push(spec(name, ne, ty, data));
            self
        }

        fn tensor_spec(mut self, t: TensorSpec) -> Self {
            self.tensors.push(t);
            self
        }

        fn build(&self) -> Built {
            let mut out = Vec::new();
            out.extend_from_slice(&self.magic);
            out.extend_from_slice(&self.version_bytes);
            put_u64(
                &mut out,
                self.n_tensors.unwrap_or(self.tensors.len() as u64),
            );
            put_u64(&mut out, self.n_kv.unwrap_or(self.kvs.len() as u64));
            for kv in &self.kvs {
                out.extend_from_slice(kv);
            }
            let mut offsets = Vec::new();
            let mut next = 0u64;
            for t in &self.tensors {
                let off = t.offset.unwrap_or(next);
                next = align_up(off + t.data.len() as u64, self.alignment);
                offsets.push(off);
                put_str(&mut out, &t.name);
                put_u32(&mut out, t.n_dims.unwrap_or(t.ne.len() as u32));
                for &d in &t.ne {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                put_u32(&mut out, t.ty);
                put_u64(&mut out, off);
            }
            let data_offset = align_up(out.len() as u64, self.alignment);
            out.resize(data_offset as usize, 0);
            let mut data: Vec<u8> = Vec::new();
            for (t, &off) in self.tensors.iter().zip(&offsets) {
                if t.data.is_empty() {
                    continue;
                }
                let (s, e) = (off as usize, off as usize + t.data.len());
                if data.len() < e {
                    data.resize(e, 0);
                }
                data[s..e].copy_from_slice(&t.data);
            }
            data.resize(align_up(data.len() as u64, self.alignment) as usize, 0);
            out.extend_from_slice(&data);
            Built {
                bytes: out,
                data_offset,
                offsets,
            }
        }

        fn bytes(&self) -> Vec<u8> {
            self.build().bytes
        }
    }

    fn f32_bytes(values: &[f32]) -> Vec<u8> {
        values.iter().flat_map(|v| v.to_le_bytes()).collect()
    }

    fn parse_err(bytes: &[u8]) -> GgufError {
        match GgufFile::parse(bytes) {
            Ok(f) => panic!("expected an error, parsed {f:?}"),
            Err(e) => e,
        }
    }

    /// A file exercising every value type, array types, alignment 64 and varied tensors.
    fn every_value_metadata() -> Vec<(String, MetaValue)> {
        let v = |k: &str, v: MetaValue| (k.to_owned(), v);
        vec![
            v("general.architecture", MetaValue::String("llama".into())),
            v("t.u8", MetaValue::U8(200)),
            v("t.i8", MetaValue::I8(-100)),
            v("t.u16", MetaValue::U16(65_000)),
            v("t.i16", MetaValue::I16(-30_000)),
            v("t.u32", MetaValue::U32(4_000_000_000)),
            v("t.i32", MetaValue::I32(-2_000_000_000)),
            v("t.f32", MetaValue::F32(1e-5)),
            v("t.bool_true", MetaValue::Bool(true)),
            v("t.bool_false", MetaValue::Bool(false)),
            v("t.string", MetaValue::String("héllo ✓ \0 nul".into())),
            v("t.empty_string", MetaValue::String(String::new())),
            v("t.u64", MetaValue::U64(u64::MAX)),
            v("t.i64", MetaValue::I64(i64::MIN)),
            v("t.f64", MetaValue::F64(-1.5e300)),
            v("a.u8", MetaValue::Array(MetaArray::U8(vec![0, 1, 255]))),
            v("a.i8", MetaValue::Array(MetaArray::I8(vec![-128, 0, 127]))),
            v("a.u16", MetaValue::Array(MetaArray::U16(vec![1, 65_535]))),
            v("a.i16", MetaValue::Array(MetaArray::I16(vec![-1, 2]))),
            v("a.u32", MetaValue::Array(MetaArray::U32(vec![7, 8, 9]))),
            v("a.i32", MetaValue::Array(MetaArray::I32(vec![-7, 8]))),
            v(
                "a.f32",
                MetaValue::Array(MetaArray::F32(vec![0.5, -0.25, f32::MAX])),
            ),
            v(
                "a.bool",
                MetaValue::Array(MetaArray::Bool(vec![true, false, true])),
            ),
            v(
                "a.string",
                MetaValue::Array(MetaArray::String(vec![
                    "<s>".into(),
                    String::new(),
                    "▁the".into(),
                ])),
            ),
            v("a.u64", MetaValue::Array(MetaArray::U64(vec![u64::MAX, 0]))),
            v("a.i64", MetaValue::Array(MetaArray::I64(vec![i64::MIN, 1]))),
            v("a.f64", MetaValue::Array(MetaArray::F64(vec![1e-300, 2.0]))),
            v("a.empty", MetaValue::Array(MetaArray::U32(vec![]))),
            v(
                "a.empty_strings",
                MetaValue::Array(MetaArray::String(vec![])),
            ),
        ]
    }

    fn sample_builder() -> Builder {
        let mut b = Builder::new();
        for (k, v) in every_value_metadata() {
            b = b.kv(&k, v);
        }
        b.alignment(64)
            .tensor("f32", &[4, 3], GgmlType::F32, f32_bytes(&[1.5; 12]))
            .tensor("q8", &[64, 2], GgmlType::Q8_0, (0..136u8).collect())
            .tensor("bf16", &[5], GgmlType::BF16, vec![7; 10])
            .tensor("retired", &[8], GgmlType(4), vec![9; 12])
            .tensor("empty", &[0, 4], GgmlType::F32, Vec::new())
            .tensor(
                "f16_4d",
                &[2, 1, 3, 1],
                GgmlType::F16,
                (100..112u8).collect(),
            )
    }

    // ---------------------------------------------------------------- round trip

    #[test]
    fn round_trip_every_value_type_and_tensor_data() {
        let b = sample_builder();
        let built = b.build();
        let f = GgufFile::parse(&built.bytes).expect("valid file");

        assert_eq!(f.version, 3);
        let mut expected = every_value_metadata();
        expected.push((ALIGNMENT_KEY.to_owned(), MetaValue::U32(64)));
        assert_eq!(f.metadata, expected);
        assert_eq!(f.alignment, 64);
        assert_eq!(f.data_offset, built.data_offset);
        assert_eq!(f.data_offset % 64, 0);
        assert_eq!(f.file_len(), built.bytes.len() as u64);
        assert_eq!(f.get("t.u8"), Some(&MetaValue::U8(200)));
        assert_eq!(f.get("missing"), None);

        assert_eq!(f.tensors.len(), b.tensors.len());
        for (i, (t, s)) in f.tensors.iter().zip(&b.tensors).enumerate() {
            assert_eq!(t.name.as_bytes(), s.name.as_slice());
            assert_eq!(t.ne, s.ne.iter().map(|&d| d as u64).collect::<Vec<_>>());
            assert_eq!(t.ty, GgmlType(s.ty));
            assert_eq!(t.offset, built.offsets[i]);
            assert_eq!(t.offset % 64, 0);
            assert_eq!(f.tensor_index(&t.name), Some(i));
            if t.ty.info().is_some() {
                assert_eq!(t.nbytes, Some(s.data.len() as u64), "{}", t.name);
                assert_eq!(f.tensor_data(i), Some(s.data.as_slice()), "{}", t.name);
            } else {
                assert_eq!(t.nbytes, None);
                assert_eq!(f.tensor_data(i), None);
            }
        }
        assert_eq!(f.tensors[1].ty, GgmlType::Q8_0);
        assert_eq!(f.tensors[1].nbytes, Some(136));
        assert_eq!(f.tensor_index("nope"), None);
        assert_eq!(f.tensor_data(99), None);

        // Tensor data is borrowed from the input, not copied.
        let data = f.tensor_data(0).expect("f32 data");
        let start = data.as_ptr() as usize - built.bytes.as_ptr() as usize;
        assert_eq!(start as u64, f.data_offset);
    }

    #[test]
    fn version_2_is_accepted() {
        let bytes = Builder::new().version(2).kv("a", MetaValue::U8(1)).bytes();
        let f = GgufFile::parse(&bytes).expect("v2");
        assert_eq!(f.version, 2);
        assert_eq!(f.alignment, DEFAULT_ALIGNMENT);
    }

    #[test]
    fn empty_file_with_no_tensors_or_keys() {
        let bytes = Builder::new().bytes();
        let f = GgufFile::parse(&bytes).expect("minimal file");
        assert!(f.metadata.is_empty() && f.tensors.is_empty());
        assert_eq!(f.data_offset, 32);
    }

    #[test]
    fn alignment_one_is_accepted() {
        let bytes = Builder::new()
            .alignment(1)
            .tensor("a", &[3], GgmlType::I8, vec![1, 2, 3])
            .tensor("b", &[1], GgmlType::I8, vec![4])
            .bytes();
        let f = GgufFile::parse(&bytes).expect("alignment 1");
        assert_eq!(f.alignment, 1);
        assert_eq!(f.tensors[1].offset, 3);
        assert_eq!(f.tensor_data(1), Some(&[4u8][..]));
    }

    #[test]
    fn non_canonical_layout_is_accepted() {
        // Reversed order with a gap between the tensors.
        let mut a = spec("a", &[8], GgmlType::F32, vec![1; 32]);
        a.offset = Some(128);
        let mut b = spec("b", &[8], GgmlType::F32, vec![2; 32]);
        b.offset = Some(0);
        let bytes = Builder::new().tensor_spec(a).tensor_spec(b).bytes();
        let f = GgufFile::parse(&bytes).expect("non-canonical layout");
        assert_eq!(f.tensor_data(0), Some(&[1u8; 32][..]));
        assert_eq!(f.tensor_data(1), Some(&[2u8; 32][..]));
    }

    #[test]
    fn trailing_padding_of_last_tensor_is_not_required() {
        let built = Builder::new()
            .tensor("a", &[3], GgmlType::F32, f32_bytes(&[1.0, 2.0, 3.0]))
            .build();
        let end = built.data_offset as usize + 12;
        assert!(built.bytes.len() > end);
        let f = GgufFile::parse(&built.bytes[..end]).expect("unpadded end");
        assert_eq!(f.tensor_data(0), Some(&built.bytes[end - 12..end]));
    }

    #[test]
    fn zero_sized_tensors_do_not_overlap() {
        let mut a = spec("a", &[0], GgmlType::F32, Vec::new());
        a.offset = Some(0);
        let mut b = spec("b", &[4], GgmlType::F32, vec![0; 16]);
        b.offset = Some(0);
        let bytes = Builder::new().tensor_spec(a).tensor_spec(b).bytes();
        let f = GgufFile::parse(&bytes).expect("empty tensor shares an offset");
        assert_eq!(f.tensor_data(0), Some(&[][..]));
    }

    #[test]
    fn tensor_name_of_63_bytes_is_accepted() {
        let name = "n".repeat(63);
        let bytes = Builder::new()
            .tensor(&name, &[1], GgmlType::F32, vec![0; 4])
            .bytes();
        let f = GgufFile::parse(&bytes).expect("63-byte name");
        assert_eq!(f.tensor_index(&name), Some(0));
    }

    #[test]
    fn nonzero_bool_bytes_are_true() {
        let bytes = Builder::new()
            .raw_kv(kv_raw(b"b", MetaValueType::Bool.id(), &[2]))
            .bytes();
        let f = GgufFile::parse(&bytes).expect("bool 2");
        assert_eq!(f.get("b"), Some(&MetaValue::Bool(true)));
    }

    #[test]
    fn debug_does_not_dump_the_file() {
        let bytes = sample_builder().bytes();
        let f = GgufFile::parse(&bytes).expect("valid");
        let s = format!("{f:?}");
        assert!(s.contains("file_len"));
        assert!(s.len() < 8 * bytes.len());
    }

    // ---------------------------------------------------------------- rejections

    #[test]
    fn rejects_bad_magic() {
        let mut b = Builder::new();
        b.magic = *b"GGML";
        assert!(matches!(parse_err(&b.bytes()), GgufError::BadMagic));
    }

    #[test]
    fn rejects_truncated_header() {
        let bytes = Builder::new().bytes();
        assert!(matches!(
            parse_err(&bytes[..2]),
            GgufError::UnexpectedEof {
                what: "magic",
                offset: 0,
                needed: 4,
                available: 2,
                ..
            }
        ));
        assert!(matches!(
            parse_err(&bytes[..12]),
            GgufError::UnexpectedEof {
                what: "tensor count",
                offset: 8,
                needed: 8,
                available: 4,
                ..
            }
        ));
    }

    #[test]
    fn rejects_truncated_string_value() {
        let bytes = Builder::new()
            .kv("general.name", MetaValue::String("abcdef".into()))
            .bytes();
        // Header 24 + key (8 + 12) + type 4 + length 8 = 56; keep 3 of the 6 bytes.
        let err = parse_err(&bytes[..59]);
        assert!(
            matches!(
                &err,
                GgufError::UnexpectedEof { what: "string bytes", context, offset: 56, needed: 6, available: 3 }
                    if context.contains("general.name")
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_truncated_tensor_info() {
        let bytes = Builder::new()
            .tensor("weight.name", &[4, 4], GgmlType::F32, vec![0; 64])
            .bytes();
        // Header 24 + name 19 + n_dims 4 + first dim 8 = 55; cut 3 bytes into the second dim.
        let err = parse_err(&bytes[..58]);
        assert!(
            matches!(
                &err,
                GgufError::UnexpectedEof { what: "tensor dimension", context, offset: 55, needed: 8, available: 3 }
                    if context.contains("weight.name")
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_array_longer_than_the_file() {
        let mut payload = Vec::new();
        put_u32(&mut payload, MetaValueType::U32.id());
        put_u64(&mut payload, 1000);
        payload.extend_from_slice(&[0; 16]);
        let bytes = Builder::new().raw_kv(kv_raw(b"arr", 9, &payload)).bytes();
        let err = parse_err(&bytes);
        assert!(
            matches!(
                &err,
                GgufError::UnexpectedEof {
                    what: "array elements",
                    needed: 4000,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_string_array_count_larger_than_the_file() {
        // 1000 strings need at least 8000 bytes, far more than present.
        let mut payload = Vec::new();
        put_u32(&mut payload, MetaValueType::String.id());
        put_u64(&mut payload, 1000);
        let bytes = Builder::new().raw_kv(kv_raw(b"toks", 9, &payload)).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::UnexpectedEof {
                what: "array elements",
                needed: 8000,
                ..
            }
        ));
    }

    #[test]
    fn rejects_unsupported_versions() {
        for v in [0, 1, 4, 0x1234] {
            let bytes = Builder::new().version(v).bytes();
            assert!(
                matches!(parse_err(&bytes), GgufError::UnsupportedVersion { version } if version == v),
                "version {v}"
            );
        }
    }

    #[test]
    fn rejects_big_endian() {
        let mut b = Builder::new();
        b.version_bytes = 3u32.to_be_bytes();
        assert!(matches!(
            parse_err(&b.bytes()),
            GgufError::BigEndian {
                version: 0x0300_0000
            }
        ));
    }

    #[test]
    fn rejects_too_many_keys() {
        let mut b = Builder::new().kv("a", MetaValue::U8(1));
        b.n_kv = Some(u64::MAX);
        assert!(matches!(
            parse_err(&b.bytes()),
            GgufError::TooManyKeys {
                count: u64::MAX,
                ..
            }
        ));
    }

    #[test]
    fn rejects_too_many_tensors() {
        let mut b = Builder::new().tensor("a", &[1], GgmlType::F32, vec![0; 4]);
        b.n_tensors = Some(u64::MAX); // also what a negative i64 count reads as
        assert!(matches!(
            parse_err(&b.bytes()),
            GgufError::TooManyTensors {
                count: u64::MAX,
                ..
            }
        ));
        b.n_tensors = Some(1_000);
        assert!(matches!(
            parse_err(&b.bytes()),
            GgufError::TooManyTensors { count: 1_000, .. }
        ));
    }

    #[test]
    fn rejects_string_too_long() {
        let mut payload = Vec::new();
        put_u64(&mut payload, MAX_STRING_LEN + 1);
        let bytes = Builder::new().raw_kv(kv_raw(b"s", 8, &payload)).bytes();
        let err = parse_err(&bytes);
        assert!(
            matches!(&err, GgufError::StringTooLong { context, len, .. }
                if *len == MAX_STRING_LEN + 1 && context.contains("`s`")),
            "{err:?}"
        );
        // A key length too long is caught the same way.
        let mut kv = Vec::new();
        put_u64(&mut kv, u64::MAX);
        kv.extend_from_slice(&[b'k'; 16]);
        let bytes = Builder::new().raw_kv(kv).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::StringTooLong { len: u64::MAX, .. }
        ));
    }

    #[test]
    fn rejects_invalid_utf8() {
        // In a key.
        let bytes = Builder::new().raw_kv(kv_raw(b"k\xff", 0, &[1])).bytes();
        let err = parse_err(&bytes);
        assert!(
            matches!(&err, GgufError::InvalidUtf8 { context, offset: 33 } if context == "key #0"),
            "{err:?}"
        );
        // In a string value.
        let mut payload = Vec::new();
        put_str(&mut payload, b"ok\xc3");
        let bytes = Builder::new()
            .raw_kv(kv_raw(b"general.name", 8, &payload))
            .bytes();
        let err = parse_err(&bytes);
        assert!(
            matches!(&err, GgufError::InvalidUtf8 { context, .. } if context.contains("general.name")),
            "{err:?}"
        );
        // In a string-array element.
        let mut payload = Vec::new();
        put_u32(&mut payload, 8);
        put_u64(&mut payload, 2);
        put_str(&mut payload, b"fine");
        put_str(&mut payload, b"\x80");
        let bytes = Builder::new()
            .raw_kv(kv_raw(b"tokenizer.ggml.tokens", 9, &payload))
            .bytes();
        let err = parse_err(&bytes);
        assert!(
            matches!(&err, GgufError::InvalidUtf8 { context, .. }
                if context.contains("element 1") && context.contains("tokenizer.ggml.tokens")),
            "{err:?}"
        );
        // In a tensor name.
        let mut t = spec("x", &[1], GgmlType::F32, vec![0; 4]);
        t.name = b"bad\xfe".to_vec();
        let err = parse_err(&Builder::new().tensor_spec(t).bytes());
        assert!(
            matches!(&err, GgufError::InvalidUtf8 { context, .. } if context.contains("tensor #0")),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_invalid_value_type() {
        let bytes = Builder::new().raw_kv(kv_raw(b"k", 13, &[0; 8])).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::InvalidValueType { key, id: 13 } if key == "k"
        ));
        let mut payload = Vec::new();
        put_u32(&mut payload, u32::MAX);
        put_u64(&mut payload, 0);
        let bytes = Builder::new().raw_kv(kv_raw(b"arr", 9, &payload)).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::InvalidValueType { key, id: u32::MAX } if key == "arr"
        ));
    }

    #[test]
    fn rejects_nested_array() {
        let mut payload = Vec::new();
        put_u32(&mut payload, 9);
        put_u64(&mut payload, 0);
        let bytes = Builder::new().raw_kv(kv_raw(b"nest", 9, &payload)).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::NestedArray { key } if key == "nest"
        ));
    }

    #[test]
    fn rejects_array_too_long() {
        let mut payload = Vec::new();
        put_u32(&mut payload, 0);
        put_u64(&mut payload, MAX_ARRAY_LEN + 1);
        let bytes = Builder::new().raw_kv(kv_raw(b"big", 9, &payload)).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::ArrayTooLong { key, count, .. } if key == "big" && count == MAX_ARRAY_LEN + 1
        ));
    }

    #[test]
    fn rejects_duplicate_key() {
        let bytes = Builder::new()
            .kv("general.name", MetaValue::String("a".into()))
            .kv("general.name", MetaValue::String("b".into()))
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::DuplicateKey { key } if key == "general.name"
        ));
    }

    #[test]
    fn rejects_empty_key() {
        let bytes = Builder::new()
            .kv("a", MetaValue::U8(1))
            .raw_kv(kv_raw(b"", 0, &[1]))
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::EmptyKey {
                index: 1,
                offset: 38
            }
        ));
    }

    #[test]
    fn rejects_alignment_of_wrong_type() {
        let bytes = Builder::new().kv(ALIGNMENT_KEY, MetaValue::U64(32)).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::AlignmentNotU32 {
                found: MetaValueType::U64
            }
        ));
    }

    #[test]
    fn rejects_bad_alignment() {
        for a in [0u32, 3, 24, u32::MAX] {
            let bytes = Builder::new().kv(ALIGNMENT_KEY, MetaValue::U32(a)).bytes();
            assert!(
                matches!(parse_err(&bytes), GgufError::BadAlignment { value } if value == a),
                "alignment {a}"
            );
        }
    }

    #[test]
    fn rejects_tensor_name_too_long() {
        let name = "n".repeat(64);
        let bytes = Builder::new()
            .tensor(&name, &[1], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::TensorNameTooLong { len: 64, prefix, .. } if prefix.len() == 63
        ));
    }

    #[test]
    fn rejects_duplicate_tensor() {
        let bytes = Builder::new()
            .tensor("w", &[1], GgmlType::F32, vec![0; 4])
            .tensor("w", &[1], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::DuplicateTensor { tensor } if tensor == "w"
        ));
    }

    #[test]
    fn rejects_zero_dims() {
        let mut t = spec("s", &[], GgmlType::F32, vec![0; 4]);
        t.n_dims = Some(0);
        assert!(matches!(
            parse_err(&Builder::new().tensor_spec(t).bytes()),
            GgufError::NoDims { tensor } if tensor == "s"
        ));
    }

    #[test]
    fn rejects_too_many_dims() {
        let bytes = Builder::new()
            .tensor("t5", &[1, 1, 1, 1, 1], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::TooManyDims { tensor, n_dims: 5 } if tensor == "t5"
        ));
        let mut t = spec("huge", &[1], GgmlType::F32, vec![0; 4]);
        t.n_dims = Some(u32::MAX);
        assert!(matches!(
            parse_err(&Builder::new().tensor_spec(t).bytes()),
            GgufError::TooManyDims {
                n_dims: u32::MAX,
                ..
            }
        ));
    }

    #[test]
    fn rejects_negative_dim() {
        let bytes = Builder::new()
            .tensor("neg", &[4, -1], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::NegativeDim { tensor, dim: 1, value: -1 } if tensor == "neg"
        ));
    }

    #[test]
    fn rejects_row_not_multiple_of_block() {
        let bytes = Builder::new()
            .tensor("q", &[33, 2], GgmlType::Q8_0, vec![0; 68])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::RowNotMultipleOfBlock { tensor, ne0: 33, block: 32 } if tensor == "q"
        ));
    }

    #[test]
    fn rejects_size_overflow() {
        // Element count overflows u64.
        let bytes = Builder::new()
            .tensor("big", &[1 << 32, 1 << 32], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::SizeOverflow { tensor, .. } if tensor == "big"
        ));
        // Element count above i64::MAX (llama.cpp's limit).
        let bytes = Builder::new()
            .tensor("big", &[1 << 32, 1 << 31], GgmlType::I8, vec![0; 4])
            .bytes();
        assert!(matches!(parse_err(&bytes), GgufError::SizeOverflow { .. }));
        // Element count fits, byte size does not.
        let bytes = Builder::new()
            .tensor("big", &[1 << 62], GgmlType::F32, vec![0; 4])
            .bytes();
        assert!(matches!(parse_err(&bytes), GgufError::SizeOverflow { .. }));
    }

    #[test]
    fn rejects_misaligned_offset() {
        let mut t = spec("m", &[2], GgmlType::F32, vec![0; 8]);
        t.offset = Some(8);
        assert!(matches!(
            parse_err(&Builder::new().tensor_spec(t).bytes()),
            GgufError::MisalignedOffset { tensor, offset: 8, alignment: 32 } if tensor == "m"
        ));
    }

    #[test]
    fn rejects_tensor_out_of_bounds() {
        let built = Builder::new()
            .tensor("a", &[8], GgmlType::F32, vec![1; 32])
            .tensor("b", &[8], GgmlType::F32, vec![2; 32])
            .build();
        let cut = built.bytes.len() - 1;
        let err = parse_err(&built.bytes[..cut]);
        let (start, end) = (built.data_offset + 32, built.data_offset + 64);
        assert!(
            matches!(&err, GgufError::TensorOutOfBounds { tensor, start: s, end: e, file_len }
                if tensor == "b" && *s == start && *e == end && *file_len == cut as u64),
            "{err:?}"
        );
        // An offset so large that data_offset + offset overflows.
        let mut t = spec("far", &[1], GgmlType::F32, Vec::new());
        t.offset = Some(u64::MAX - 31);
        let err = parse_err(&Builder::new().tensor_spec(t).bytes());
        assert!(
            matches!(
                &err,
                GgufError::TensorOutOfBounds {
                    start: u64::MAX,
                    end: u64::MAX,
                    ..
                }
            ),
            "{err:?}"
        );
    }

    #[test]
    fn rejects_overlapping_tensors() {
        let mut a = spec("a", &[16], GgmlType::F32, vec![1; 64]);
        a.offset = Some(0);
        let mut b = spec("b", &[8], GgmlType::F32, vec![2; 32]);
        b.offset = Some(32);
        let bytes = Builder::new().tensor_spec(b).tensor_spec(a).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::OverlappingTensors { first, second } if first == "a" && second == "b"
        ));
        // Identical ranges.
        let mut c = spec("c", &[8], GgmlType::F32, vec![1; 32]);
        c.offset = Some(0);
        let mut d = c.clone();
        d.name = b"d".to_vec();
        let bytes = Builder::new().tensor_spec(c).tensor_spec(d).bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::OverlappingTensors { .. }
        ));
        // Overlap with a tensor that is not the previous one in offset order.
        let mut big = spec("big", &[64], GgmlType::F32, vec![0; 256]);
        big.offset = Some(0);
        let mut small = spec("small", &[8], GgmlType::F32, vec![0; 32]);
        small.offset = Some(32);
        let mut late = spec("late", &[8], GgmlType::F32, vec![0; 32]);
        late.offset = Some(64);
        let bytes = Builder::new()
            .tensor_spec(big)
            .tensor_spec(small)
            .tensor_spec(late)
            .bytes();
        assert!(matches!(
            parse_err(&bytes),
            GgufError::OverlappingTensors { first, second } if first == "big" && second == "small"
        ));
    }

    #[test]
    fn unknown_types_are_listed_but_not_range_checked() {
        let mut t = spec("future", &[3], GgmlType(1000), Vec::new());
        t.offset = Some(1 << 40);
        let bytes = Builder::new().tensor_spec(t).bytes();
        let f = GgufFile::parse(&bytes).expect("unknown type listed");
        assert_eq!(f.tensors[0].ty, GgmlType(1000));
        assert_eq!(f.tensors[0].nbytes, None);
        assert_eq!(f.tensor_data(0), None);
    }

    // ---------------------------------------------------------------- never panic

    #[derive(Debug, Clone)]
    enum Mutation {
        Truncate(Index),
        Flip(Index, u8),
        Overwrite(Index, u64),
    }

    fn mutation() -> impl Strategy<Value = Mutation> {
        let interesting = prop_oneof![
            any::<u64>(),
            Just(0u64),
            Just(1),
            Just(5),
            Just(63),
            Just(64),
            Just(u64::from(u32::MAX)),
            Just(MAX_STRING_LEN),
            Just(MAX_STRING_LEN + 1),
            Just(i64::MAX as u64),
            Just(1 << 63),
            Just(u64::MAX),
            Just(u64::MAX - 31),
            0u64..256,
        ];
        prop_oneof![
            any::<Index>().prop_map(Mutation::Truncate),
            (any::<Index>(), 1u8..).prop_map(|(i, b)| Mutation::Flip(i, b)),
            (any::<Index>(), interesting).prop_map(|(i, v)| Mutation::Overwrite(i, v)),
        ]
    }

    fn apply(bytes: &mut Vec<u8>, m: &Mutation) {
        if bytes.is_empty() {
            return;
        }
        match m {
            Mutation::Truncate(i) => {
                let len = i.index(bytes.len());
                bytes.truncate(len);
            }
            Mutation::Flip(i, b) => {
                let at = i.index(bytes.len());
                bytes[at] ^= b;
            }
            Mutation::Overwrite(i, v) => {
                let at = i.index(bytes.len());
                for (dst, src) in bytes[at..].iter_mut().zip(v.to_le_bytes()) {
                    *dst = src;
                }
            }
        }
    }

    /// What must hold for any file `parse` accepts.
    fn check_invariants(f: &GgufFile<'_>) {
        assert!(f.alignment.is_power_of_two());
        assert_eq!(f.data_offset % f.alignment, 0);
        for (i, t) in f.tensors.iter().enumerate() {
            assert!((1..=4).contains(&t.ne.len()));
            assert!(t.name.len() <= 63);
            assert_eq!(t.offset % f.alignment, 0);
            if let Some(n) = t.nbytes {
                let data = f.tensor_data(i).expect("checked range");
                assert_eq!(data.len() as u64, n);
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn never_panics_on_mutated_files(
            mutations in prop::collection::vec(mutation(), 1..6),
            which in 0usize..2,
        ) {
            let mut bytes = if which == 0 {
                sample_builder().bytes()
            } else {
                // A small file, so that mutations hit counts and lengths more often.
                Builder::new()
                    .kv("general.architecture", MetaValue::String("llama".into()))
                    .kv("a", MetaValue::Array(MetaArray::String(vec!["x".into(), "yz".into()])))
                    .tensor("w", &[32, 2], GgmlType::Q8_0, vec![3; 68])
                    .tensor("v", &[4], GgmlType::F32, vec![4; 16])
                    .bytes()
            };
            for m in &mutations {
                apply(&mut bytes, m);
            }
            if let Ok(f) = GgufFile::parse(&bytes) {
                check_invariants(&f);
            }
        }

        #[test]
        fn never_panics_on_random_bytes_after_a_valid_prefix(
            tail in prop::collection::vec(any::<u8>(), 0..512),
        ) {
            let mut bytes = b"GGUF".to_vec();
            bytes.extend_from_slice(&3u32.to_le_bytes());
            bytes.extend_from_slice(&tail);
            if let Ok(f) = GgufFile::parse(&bytes) {
                check_invariants(&f);
            }
        }

        #[test]
        fn round_trips_arbitrary_scalars_and_f32_tensors(
            values in prop::collection::vec((any::<u32>(), any::<i64>(), "\\PC{0,12}", any::<bool>()), 0..8),
            shapes in prop::collection::vec(prop::collection::vec(0i64..5, 1..=4), 0..6),
            align_log2 in 0u32..8,
        ) {
            let alignment = 1u32 << align_log2;
            let mut b = Builder::new();
            let mut expected = Vec::new();
            for (i, (u, s, text, flag)) in values.iter().enumerate() {
                let kvs = [
                    (format!("k{i}.u32"), MetaValue::U32(*u)),
                    (format!("k{i}.i64"), MetaValue::I64(*s)),
                    (format!("k{i}.str"), MetaValue::String(text.clone())),
                    (format!("k{i}.arr"), MetaValue::Array(MetaArray::Bool(vec![*flag; i]))),
                ];
                for (k, v) in kvs {
                    b = b.kv(&k, v.clone());
                    expected.push((k, v));
                }
            }
            b = b.alignment(alignment);
            expected.push((ALIGNMENT_KEY.to_owned(), MetaValue::U32(alignment)));
            for (i, ne) in shapes.iter().enumerate() {
                let n: i64 = ne.iter().product();
                let data: Vec<u8> = (0..n * 4).map(|x| (x as u8) ^ (i as u8)).collect();
                b = b.tensor(&format!("t{i}"), ne, GgmlType::F32, data);
            }
            let built = b.build();
            let f = GgufFile::parse(&built.bytes).expect("valid built file");
            prop_assert_eq!(&f.metadata, &expected);
            prop_assert_eq!(f.alignment, u64::from(alignment));
            prop_assert_eq!(f.data_offset, built.data_offset);
            for (i, t) in b.tensors.iter().enumerate() {
                prop_assert_eq!(f.tensor_data(i), Some(t.data.as_slice()));
                prop_assert_eq!(f.tensors[i].offset, built.offsets[i]);
            }
            check_invariants(&f);
        }
    }

    // ---------------------------------------------------------------- golden files

    fn golden_dir() -> Option<PathBuf> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/golden");
        dir.is_dir().then_some(dir)
    }

    fn read_golden(rel: &str) -> Option<Vec<u8>> {
        let path = golden_dir()?.join(rel);
        std::fs::read(path).ok()
    }

    fn tokens_len(f: &GgufFile<'_>) -> Option<usize> {
        match f.get("tokenizer.ggml.tokens")? {
            MetaValue::Array(MetaArray::String(v)) => Some(v.len()),
            _ => None,
        }
    }

    #[test]
    fn golden_tiny_llama_convert_bf16() {
        let Some(bytes) = read_golden("tiny-llama/convert-bf16.gguf") else {
            return;
        };
        let f = GgufFile::parse(&bytes).expect("golden file parses");
        assert_eq!(f.version, 3);
        assert_eq!(f.tensors.len(), 57);
        assert_eq!(f.alignment, 32);
        assert_eq!(
            f.get("general.architecture").and_then(MetaValue::as_str),
            Some("llama")
        );
        assert_eq!(
            f.metadata.first().map(|(k, _)| k.as_str()),
            Some("general.architecture")
        );
        assert_eq!(tokens_len(&f), Some(512));
        // golden.json gives 15008 as the first tensor's absolute offset (data_offset + 0).
        assert_eq!(f.data_offset, 15008);
        let t = &f.tensors[0];
        assert_eq!(t.name, "token_embd.weight");
        assert_eq!(t.ty, GgmlType::BF16);
        assert_eq!(t.ne, vec![256, 512]);
        assert_eq!(t.offset, 0);
        assert_eq!(f.tensor_data(0).map(<[u8]>::len), Some(262_144));
        assert_eq!(f.get("llama.block_count"), Some(&MetaValue::U32(6)));
    }

    #[test]
    fn golden_tiny_llama_quant_q4_k_m() {
        let Some(bytes) = read_golden("tiny-llama/quant-Q4_K_M.gguf") else {
            return;
        };
        let f = GgufFile::parse(&bytes).expect("golden file parses");
        assert_eq!(f.tensors.len(), 57);
        assert_eq!(
            f.get("general.architecture").and_then(MetaValue::as_str),
            Some("llama")
        );
        assert_eq!(tokens_len(&f), Some(512));
        assert_eq!(f.data_offset, 15008);
        assert_eq!(f.tensors[0].name, "output.weight");
        assert_eq!(f.tensors[0].ty, GgmlType::Q6_K);
        assert_eq!(f.tensors[0].nbytes, Some(107_520));
        assert_eq!(f.get("general.file_type"), Some(&MetaValue::U32(15)));
    }

    #[test]
    fn golden_tiny_llama_imatrix() {
        let Some(bytes) = read_golden("tiny-llama/imatrix.gguf") else {
            return;
        };
        let f = GgufFile::parse(&bytes).expect("golden file parses");
        assert_eq!(f.tensors.len(), 84);
        assert_eq!(f.data_offset, 5248);
        assert_eq!(
            f.get("general.type").and_then(MetaValue::as_str),
            Some("imatrix")
        );
        assert!(matches!(
            f.get("imatrix.datasets"),
            Some(MetaValue::Array(MetaArray::String(_)))
        ));
        assert!(f.tensors.iter().all(|t| t.ty == GgmlType::F32));
    }

    #[test]
    fn golden_tiny_qwen2_large_token_array() {
        let Some(bytes) = read_golden("tiny-qwen2/convert-bf16.gguf") else {
            return;
        };
        let f = GgufFile::parse(&bytes).expect("golden file parses");
        assert_eq!(tokens_len(&f), Some(49_152));
        assert_eq!(f.tensors.len(), 26);
        assert_eq!(f.data_offset, 1_770_560);
        assert_eq!(f.tensors[0].ne, vec![64, 49_152]);
    }

    /// Compares a parsed value with its golden.json rendering (arrays longer than 16 items are
    /// summarised there as `{len, sha256}`).
    fn json_matches(v: &MetaValue, j: &serde_json::Value) -> bool {
        use serde_json::Value as J;
        match (v, j) {
            (MetaValue::String(s), J::String(t)) => s == t,
            (MetaValue::Bool(b), J::Bool(c)) => b == c,
            (MetaValue::F32(x), J::Number(n)) => n.as_f64() == Some(f64::from(*x)),
            (MetaValue::F64(x), J::Number(n)) => n.as_f64() == Some(*x),
            (MetaValue::Array(a), J::Object(o)) => {
                o.get("len").and_then(J::as_u64) == Some(a.len() as u64)
            }
            (MetaValue::Array(a), J::Array(items)) => {
                let scalars: Vec<MetaValue> = match a {
                    MetaArray::U8(v) => v.iter().map(|&x| MetaValue::U8(x)).collect(),
                    MetaArray::I8(v) => v.iter().map(|&x| MetaValue::I8(x)).collect(),
                    MetaArray::U16(v) => v.iter().map(|&x| MetaValue::U16(x)).collect(),
                    MetaArray::I16(v) => v.iter().map(|&x| MetaValue::I16(x)).collect(),
                    MetaArray::U32(v) => v.iter().map(|&x| MetaValue::U32(x)).collect(),
                    MetaArray::I32(v) => v.iter().map(|&x| MetaValue::I32(x)).collect(),
                    MetaArray::F32(v) => v.iter().map(|&x| MetaValue::F32(x)).collect(),
                    MetaArray::Bool(v) => v.iter().map(|&x| MetaValue::Bool(x)).collect(),
                    MetaArray::String(v) => {
                        v.iter().map(|x| MetaValue::String(x.clone())).collect()
                    }
                    MetaArray::U64(v) => v.iter().map(|&x| MetaValue::U64(x)).collect(),
                    MetaArray::I64(v) => v.iter().map(|&x| MetaValue::I64(x)).collect(),
                    MetaArray::F64(v) => v.iter().map(|&x| MetaValue::F64(x)).collect(),
                };
                scalars.len() == items.len()
                    && scalars.iter().zip(items).all(|(s, i)| json_matches(s, i))
            }
            (
                MetaValue::I8(_) | MetaValue::I16(_) | MetaValue::I32(_) | MetaValue::I64(_),
                J::Number(n),
            ) => {
                let x = match *v {
                    MetaValue::I8(x) => i64::from(x),
                    MetaValue::I16(x) => i64::from(x),
                    MetaValue::I32(x) => i64::from(x),
                    MetaValue::I64(x) => x,
                    _ => return false,
                };
                n.as_i64() == Some(x)
            }
            (_, J::Number(n)) => v.as_u64().is_some() && n.as_u64() == v.as_u64(),
            _ => false,
        }
    }

    /// Every shipped `.gguf` file under `shared/golden/*/` agrees with its `golden.json` summary:
    /// alignment, every metadata key and value, and every tensor's name, type, shape, absolute
    /// offset and byte size.
    #[test]
    fn golden_summaries_match_every_shipped_file() {
        let Some(root) = golden_dir() else {
            return;
        };
        let mut checked = 0;
        let Ok(dirs) = std::fs::read_dir(&root) else {
            return;
        };
        for dir in dirs.flatten() {
            let Ok(summary) = std::fs::read(dir.path().join("golden.json")) else {
                continue;
            };
            let summary: serde_json::Value =
                serde_json::from_slice(&summary).expect("golden.json is JSON");
            let Some(files) = summary.as_object() else {
                continue;
            };
            for (file_name, g) in files {
                let path = dir.path().join(file_name);
                let Ok(bytes) = std::fs::read(&path) else {
                    continue;
                };
                let what = path.display().to_string();
                let f = GgufFile::parse(&bytes).unwrap_or_else(|e| panic!("{what}: {e}"));
                assert_eq!(Some(f.alignment), g["alignment"].as_u64(), "{what}");

                let meta = g["metadata"].as_object().expect("metadata object");
                assert_eq!(f.metadata.len(), meta.len(), "{what}: key count");
                for (k, jv) in meta {
                    let v = f.get(k).unwrap_or_else(|| panic!("{what}: missing {k}"));
                    assert!(json_matches(v, jv), "{what}: {k} = {v:?}, golden {jv}");
                }

                let tensors = g["tensors"].as_array().expect("tensors array");
                assert_eq!(f.tensors.len(), tensors.len(), "{what}: tensor count");
                for (t, gt) in f.tensors.iter().zip(tensors) {
                    assert_eq!(Some(t.name.as_str()), gt["name"].as_str(), "{what}");
                    assert_eq!(Some(t.ty.name()), gt["type"].as_str(), "{what}: {}", t.name);
                    let shape: Vec<u64> = gt["shape"]
                        .as_array()
                        .expect("shape")
                        .iter()
                        .filter_map(serde_json::Value::as_u64)
                        .collect();
                    assert_eq!(t.ne, shape, "{what}: {}", t.name);
                    // golden.json's `offset` is absolute: data_offset + the stored offset.
                    assert_eq!(
                        Some(f.data_offset + t.offset),
                        gt["offset"].as_u64(),
                        "{what}: {}",
                        t.name
                    );
                    assert_eq!(t.nbytes, gt["nbytes"].as_u64(), "{what}: {}", t.name);
                }
                checked += 1;
            }
        }
        assert!(checked > 0 || golden_dir().is_none());
    }
}
