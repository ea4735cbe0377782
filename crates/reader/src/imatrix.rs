//! llama.cpp importance-matrix files, GGUF and legacy `.dat`, read into [`kiln_calib::Imatrix`].
//!
//! [`parse`] looks at the first four bytes: `GGUF` means a GGUF imatrix, anything else the legacy
//! format (llama.cpp tries GGUF and falls back to legacy on any failure; a legacy file cannot start
//! with `GGUF` unless it claims over a billion entries, so the two rules agree).
//!
//! # GGUF imatrix (`llama-imatrix`'s default output)
//!
//! An ordinary GGUF file (parsed with [`crate::gguf::GgufFile`]) with the metadata keys
//! `imatrix.datasets` (array of strings), `imatrix.chunk_count` and `imatrix.chunk_size` (`u32`), and
//! for each weight `W` two F32 tensors: `W.in_sum2` with `ne = [columns, n_mat]` (raw `Σ x²` per input
//! column, per matrix; written 1-D when `n_mat = 1`) and `W.counts` with `ne = [1, n_mat]` (tokens
//! per matrix, as floats). `n_mat` > 1 for mixture-of-experts weights, one matrix per expert.
//!
//! kiln stores the sums as read and each count as `lround(count)`, which is what llama.cpp's loader
//! (`common_imatrix_load`) keeps; [`kiln_calib::ImatrixEntry::quant_weights`] then divides exactly
//! as llama-quantize does.
//!
//! # Legacy `.dat` (`--output-format dat`)
//!
//! Little-endian, no alignment: `i32 n_entries`, then per entry `i32 name_len`, the name bytes,
//! `i32 ncall`, `i32 nval` and `nval` f32 values (`(Σ x² / count) · ncall`); then an optional trailer,
//! `i32 chunk_count`, `i32 dataset_len` and the dataset name. kiln stores the values as the sums and
//! `ncall` as the single count of a one-matrix entry.
//!
//! # Decisions
//!
//! Everything llama-imatrix writes is accepted and gives exactly llama-quantize's weights. Where
//! llama.cpp's loader is lax about malformed files, kiln refuses them with a specific
//! [`ImatrixError`] instead of guessing:
//!
//! - Every length and count is checked against the bytes left before anything is allocated; nothing
//!   here indexes, unwraps or casts in a way that can panic.
//! - GGUF: both `.in_sum2` and `.counts` must exist for every entry and be F32 (as in llama.cpp);
//!   `.in_sum2` must be `[columns]` or `[columns, n_mat]` (trailing 1s allowed) with `n_mat` equal to
//!   the number of counts, and neither may be empty (llama.cpp versions disagree on such files).
//!   Counts must be finite, non-negative and below 2⁶³ (llama.cpp would feed anything else to
//!   `lround`, whose result is then platform-defined). Other tensors (`.in_sum`, `.stats` from newer
//!   writers) are ignored. The three metadata keys are read when present and must then have the
//!   types llama-imatrix writes; their absence is reported by
//!   [`kiln_calib::Imatrix::has_required_metadata`] (llama-quantize refuses such files), not here.
//! - A file with no entries is refused ([`ImatrixError::NoEntries`]), as llama.cpp does.
//! - Legacy: a negative length or count is refused (llama.cpp would misread the file), as are an
//!   empty entry (`nval = 0`, as in llama.cpp), a name that appears twice (llama.cpp keeps the last),
//!   a trailer cut short, and bytes after the trailer (llama.cpp ignores both). A negative or zero
//!   `ncall` is accepted: llama-quantize then uses the stored values undivided.
//! - Entry names and the legacy dataset name must be UTF-8 without NUL bytes (llama.cpp stops at the
//!   first NUL), and entry names non-empty. GGUF strings are already UTF-8 ([`crate::gguf`]).

use std::collections::BTreeMap;

use kiln_calib::{keys, Imatrix, ImatrixEntry, ImatrixFormat};
use kiln_types::{GgmlType, MetaArray, MetaValue, MetaValueType};

use crate::gguf::{GgufError, GgufFile, GgufTensorInfo, GGUF_MAGIC};

/// Smallest possible legacy entry: name length, a 1-byte name, ncall, nval and one value.
const MIN_LEGACY_ENTRY_BYTES: u64 = 4 + 1 + 4 + 4 + 4;
/// Counts at or above this (2⁶³) do not fit the `long` that `lround` returns.
const MAX_COUNT: f32 = 9_223_372_036_854_775_808.0;

/// Why an importance-matrix file cannot be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ImatrixError {
    /// The file starts with `GGUF` but is not a valid GGUF file.
    #[error("invalid GGUF imatrix: {0}")]
    Gguf(#[from] GgufError),
    /// The file holds no entries (a GGUF file without `.in_sum2`/`.counts` tensors, or a legacy
    /// file whose entry count is 0).
    #[error("the importance matrix has no entries")]
    NoEntries,
    /// A legacy file ends before a field it declares (or a GGUF tensor's bytes are missing).
    #[error(
        "unexpected end of file reading {what}{} at offset {offset}: {needed} bytes needed, {available} available",
        in_entry(entry)
    )]
    UnexpectedEof {
        /// The field being read (`"entry count"`, `"values"`, `"dataset name"`, ...).
        what: &'static str,
        /// The entry it belongs to, when its name is known.
        entry: Option<String>,
        /// Absolute offset of the field.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file at that offset.
        available: u64,
    },
    /// A legacy entry count larger than the rest of the file could hold.
    #[error("entry count {count} is impossible: the rest of the file holds at most {max} entries")]
    TooManyEntries {
        /// Count declared in the file.
        count: u64,
        /// Most entries the remaining bytes could hold.
        max: u64,
    },
    /// A legacy length or count field is negative.
    #[error("{what} is negative ({value}){}", in_entry(entry))]
    Negative {
        /// The field (`"entry count"`, `"name length"`, `"value count"`, `"chunk count"`,
        /// `"dataset name length"`).
        what: &'static str,
        /// The entry it belongs to, when its name is known.
        entry: Option<String>,
        /// The stored value.
        value: i32,
    },
    /// An entry name is empty, not UTF-8 or contains a NUL byte.
    #[error("invalid entry name {name:?}: {reason}")]
    InvalidEntryName {
        /// The name (decoded lossily if it is not UTF-8).
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A legacy entry name appears twice.
    #[error("entry `{entry}` appears more than once")]
    DuplicateEntry {
        /// The name.
        entry: String,
    },
    /// An entry has no values (legacy `nval = 0`, or a GGUF tensor with no elements).
    #[error("entry `{entry}` has no values")]
    EmptyEntry {
        /// The entry.
        entry: String,
    },
    /// The legacy trailer's dataset name is not UTF-8 or contains a NUL byte.
    #[error("dataset name at offset {offset} is invalid: {reason}")]
    InvalidDatasetName {
        /// Absolute offset of the name's bytes.
        offset: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Bytes follow the legacy trailer.
    #[error("{len} unexpected bytes after the trailer, at offset {offset}")]
    TrailingBytes {
        /// Absolute offset of the first extra byte.
        offset: u64,
        /// Number of extra bytes.
        len: u64,
    },
    /// A GGUF entry lacks its `.in_sum2` or `.counts` tensor.
    #[error("entry `{entry}` has no `{entry}{suffix}` tensor")]
    MissingTensor {
        /// The entry.
        entry: String,
        /// The missing tensor's suffix ([`keys::SUFFIX_IN_SUM2`] or [`keys::SUFFIX_COUNTS`]).
        suffix: &'static str,
    },
    /// A GGUF entry's tensor is not F32.
    #[error("tensor `{tensor}` of entry `{entry}` is {found}, not F32")]
    NotF32 {
        /// The entry.
        entry: String,
        /// The tensor.
        tensor: String,
        /// Its stored type.
        found: GgmlType,
    },
    /// A GGUF entry's `.in_sum2` shape does not match its number of counts.
    #[error("entry `{entry}`: in_sum2 shape {in_sum2:?} does not fit counts shape {counts:?}")]
    ShapeMismatch {
        /// The entry.
        entry: String,
        /// `.in_sum2` dimensions, fastest first.
        in_sum2: Vec<u64>,
        /// `.counts` dimensions, fastest first.
        counts: Vec<u64>,
    },
    /// A GGUF count is not a finite, non-negative number below 2⁶³.
    #[error("entry `{entry}`: count {value} of matrix {matrix} is not a valid token count")]
    InvalidCount {
        /// The entry.
        entry: String,
        /// The matrix (expert) index.
        matrix: usize,
        /// The stored value.
        value: f32,
    },
    /// An `imatrix.*` metadata key has the wrong type.
    #[error("metadata key `{key}` must be {expected}, found {found:?}")]
    MetadataType {
        /// The key.
        key: &'static str,
        /// The type llama-imatrix writes.
        expected: &'static str,
        /// The stored type.
        found: MetaValueType,
    },
}

fn in_entry(entry: &Option<String>) -> String {
    entry
        .as_ref()
        .map(|e| format!(" of entry `{e}`"))
        .unwrap_or_default()
}

/// Reads an importance matrix in either llama.cpp format (see the module documentation).
pub fn parse(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
    if bytes.starts_with(&GGUF_MAGIC) {
        parse_gguf(bytes)
    } else {
        parse_legacy(bytes)
    }
}

/// Reads a GGUF importance matrix.
pub fn parse_gguf(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
    let file = GgufFile::parse(bytes)?;

    let mut imatrix = Imatrix::new(ImatrixFormat::Gguf);
    imatrix.datasets = match file.get(keys::DATASETS) {
        None => None,
        Some(MetaValue::Array(MetaArray::String(names))) => Some(names.clone()),
        Some(other) => {
            return Err(ImatrixError::MetadataType {
                key: keys::DATASETS,
                expected: "an array of strings",
                found: other.value_type(),
            })
        }
    };
    imatrix.chunk_count = meta_u32(&file, keys::CHUNK_COUNT)?;
    imatrix.chunk_size = meta_u32(&file, keys::CHUNK_SIZE)?;

    // Entry name → (`.in_sum2`, `.counts`), each with its index in the file.
    let mut pairs: BTreeMap<&str, (Option<Tensor<'_>>, Option<Tensor<'_>>)> = BTreeMap::new();
    for (index, t) in file.tensors.iter().enumerate() {
        if let Some(base) = t.name.strip_suffix(keys::SUFFIX_IN_SUM2) {
            pairs.entry(base).or_default().0 = Some((index, t));
        } else if let Some(base) = t.name.strip_suffix(keys::SUFFIX_COUNTS) {
            pairs.entry(base).or_default().1 = Some((index, t));
        }
    }
    if pairs.is_empty() {
        return Err(ImatrixError::NoEntries);
    }

    for (name, (sums, counts)) in pairs {
        check_name(name, name.as_bytes())?;
        let missing = |suffix| ImatrixError::MissingTensor {
            entry: name.to_owned(),
            suffix,
        };
        let sums = sums.ok_or_else(|| missing(keys::SUFFIX_IN_SUM2))?;
        let counts = counts.ok_or_else(|| missing(keys::SUFFIX_COUNTS))?;
        let entry = read_gguf_entry(&file, name, sums, counts)?;
        imatrix.entries.insert(name.to_owned(), entry);
    }
    Ok(imatrix)
}

/// An optional `u32` metadata key.
fn meta_u32(file: &GgufFile<'_>, key: &'static str) -> Result<Option<u32>, ImatrixError> {
    match file.get(key) {
        None => Ok(None),
        Some(MetaValue::U32(v)) => Ok(Some(*v)),
        Some(other) => Err(ImatrixError::MetadataType {
            key,
            expected: "a u32",
            found: other.value_type(),
        }),
    }
}

/// A tensor of a GGUF file and its index.
type Tensor<'f> = (usize, &'f GgufTensorInfo);

/// One GGUF entry from its two tensors.
fn read_gguf_entry(
    file: &GgufFile<'_>,
    name: &str,
    (sums_index, sums_t): Tensor<'_>,
    (counts_index, counts_t): Tensor<'_>,
) -> Result<ImatrixEntry, ImatrixError> {
    for t in [sums_t, counts_t] {
        if t.ty != GgmlType::F32 {
            return Err(ImatrixError::NotF32 {
                entry: name.to_owned(),
                tensor: t.name.clone(),
                found: t.ty,
            });
        }
    }
    let shape_mismatch = || ImatrixError::ShapeMismatch {
        entry: name.to_owned(),
        in_sum2: sums_t.ne.clone(),
        counts: counts_t.ne.clone(),
    };
    let n_sums = elements(&sums_t.ne).ok_or_else(shape_mismatch)?;
    let n_counts = elements(&counts_t.ne).ok_or_else(shape_mismatch)?;
    if n_sums == 0 || n_counts == 0 {
        return Err(ImatrixError::EmptyEntry {
            entry: name.to_owned(),
        });
    }
    // `[columns]` or `[columns, n_mat]`, trailing dimensions 1, one count per matrix.
    let columns = sums_t.ne.first().copied().unwrap_or(1);
    let n_mat = sums_t.ne.get(1).copied().unwrap_or(1);
    if n_mat != n_counts || sums_t.ne.iter().skip(2).any(|&d| d != 1) {
        return Err(shape_mismatch());
    }

    // Both allocations are bounded by tensor bytes the GGUF parser found inside the file.
    let sums: Vec<f32> = f32s(tensor_bytes(file, sums_index, sums_t, name)?).collect();
    let counts = f32s(tensor_bytes(file, counts_index, counts_t, name)?)
        .enumerate()
        .map(|(matrix, value)| {
            lround_count(value).ok_or_else(|| ImatrixError::InvalidCount {
                entry: name.to_owned(),
                matrix,
                value,
            })
        })
        .collect::<Result<Vec<i64>, _>>()?;
    let columns = usize::try_from(columns).map_err(|_| shape_mismatch())?;
    ImatrixEntry::new(columns, sums, counts).map_err(|_| shape_mismatch())
}

/// Product of the dimensions, `None` on overflow.
fn elements(ne: &[u64]) -> Option<u64> {
    ne.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d))
}

/// The bytes of a tensor the GGUF parser has already bounds-checked.
fn tensor_bytes<'a>(
    file: &GgufFile<'a>,
    index: usize,
    t: &GgufTensorInfo,
    entry: &str,
) -> Result<&'a [u8], ImatrixError> {
    file.tensor_data(index)
        .ok_or_else(|| ImatrixError::UnexpectedEof {
            what: "tensor data",
            entry: Some(entry.to_owned()),
            offset: file.data_offset.saturating_add(t.offset),
            needed: t.nbytes.unwrap_or(0),
            available: file
                .file_len()
                .saturating_sub(file.data_offset.saturating_add(t.offset)),
        })
}

/// Little-endian f32s (a trailing partial value is ignored; callers pass whole tensors).
fn f32s(bytes: &[u8]) -> impl Iterator<Item = f32> + '_ {
    bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(<[u8; 4]>::try_from(b).unwrap_or_default()))
}

/// `lround` of a stored count (round half away from zero), for finite counts in `[0, 2⁶³)`.
fn lround_count(value: f32) -> Option<i64> {
    // NaN and infinities fail the range test.
    if (0.0..MAX_COUNT).contains(&value) {
        // In range, so the conversion is exact after rounding (no saturation).
        Some(value.round() as i64)
    } else {
        None
    }
}

/// Entry names must be non-empty UTF-8 without NUL bytes (`raw` is the name's bytes).
fn check_name(name: &str, raw: &[u8]) -> Result<(), ImatrixError> {
    let invalid = |reason| ImatrixError::InvalidEntryName {
        name: String::from_utf8_lossy(raw).into_owned(),
        reason,
    };
    if raw.is_empty() {
        return Err(invalid("empty"));
    }
    if std::str::from_utf8(raw).is_err() {
        return Err(invalid("not UTF-8"));
    }
    if name.contains('\0') {
        return Err(invalid("contains a NUL byte"));
    }
    Ok(())
}

/// Reads a legacy `.dat` importance matrix.
pub fn parse_legacy(bytes: &[u8]) -> Result<Imatrix, ImatrixError> {
    let mut cur = Cursor { bytes, pos: 0 };
    let n_entries = cur.i32("entry count", None)?;
    if n_entries < 0 {
        return Err(ImatrixError::Negative {
            what: "entry count",
            entry: None,
            value: n_entries,
        });
    }
    if n_entries == 0 {
        return Err(ImatrixError::NoEntries);
    }
    let count = u64::from(n_entries.unsigned_abs());
    let max = to_u64(cur.remaining()) / MIN_LEGACY_ENTRY_BYTES;
    if count > max {
        return Err(ImatrixError::TooManyEntries { count, max });
    }

    let mut imatrix = Imatrix::new(ImatrixFormat::Legacy);
    for _ in 0..count {
        let name_len = cur.i32("name length", None)?;
        let name_len = non_negative(name_len, "name length", None)?;
        let raw = cur.take(name_len, "name", None)?;
        let name = String::from_utf8_lossy(raw).into_owned();
        check_name(&name, raw)?;
        let entry = Some(name.as_str());

        let ncall = cur.i32("ncall", entry)?;
        let nval = cur.i32("value count", entry)?;
        let nval = non_negative(nval, "value count", entry)?;
        if nval == 0 {
            return Err(ImatrixError::EmptyEntry { entry: name });
        }
        let values = cur.take(nval.saturating_mul(4), "values", entry)?;
        let sums: Vec<f32> = f32s(values).collect();

        if imatrix.entries.contains_key(&name) {
            return Err(ImatrixError::DuplicateEntry { entry: name });
        }
        let columns = sums.len();
        let entry = ImatrixEntry::new(columns, sums, vec![i64::from(ncall)]).map_err(|_| {
            ImatrixError::EmptyEntry {
                entry: name.clone(),
            }
        })?;
        imatrix.entries.insert(name, entry);
    }

    // Optional trailer: chunk count, then the dataset name.
    if cur.remaining() > 0 {
        let chunks = cur.i32("chunk count", None)?;
        let chunks = non_negative(chunks, "chunk count", None)?;
        let len = cur.i32("dataset name length", None)?;
        let len = non_negative(len, "dataset name length", None)?;
        let offset = to_u64(cur.pos);
        let raw = cur.take(len, "dataset name", None)?;
        let invalid = |reason| ImatrixError::InvalidDatasetName { offset, reason };
        let dataset = std::str::from_utf8(raw).map_err(|_| invalid("not UTF-8"))?;
        if dataset.contains('\0') {
            return Err(invalid("contains a NUL byte"));
        }
        if cur.remaining() > 0 {
            return Err(ImatrixError::TrailingBytes {
                offset: to_u64(cur.pos),
                len: to_u64(cur.remaining()),
            });
        }
        // `chunks` came from a non-negative i32.
        imatrix.chunk_count = u32::try_from(chunks).ok();
        imatrix.datasets = Some(if dataset.is_empty() {
            Vec::new()
        } else {
            vec![dataset.to_owned()]
        });
    }
    Ok(imatrix)
}

/// A non-negative `i32` as `u64`, else [`ImatrixError::Negative`].
fn non_negative(value: i32, what: &'static str, entry: Option<&str>) -> Result<u64, ImatrixError> {
    if value < 0 {
        return Err(ImatrixError::Negative {
            what,
            entry: entry.map(str::to_owned),
            value,
        });
    }
    Ok(u64::from(value.unsigned_abs()))
}

/// `usize` → `u64`, which cannot fail on any platform Rust supports; saturates if it ever did.
fn to_u64(n: usize) -> u64 {
    u64::try_from(n).unwrap_or(u64::MAX)
}

/// A read position in a legacy file; every read is bounds-checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn remaining(&self) -> usize {
        self.bytes.len().saturating_sub(self.pos)
    }

    /// The next `n` bytes, or [`ImatrixError::UnexpectedEof`] if fewer are left.
    fn take(
        &mut self,
        n: u64,
        what: &'static str,
        entry: Option<&str>,
    ) -> Result<&'a [u8], ImatrixError> {
        let available = self.remaining();
        let eof = || ImatrixError::UnexpectedEof {
            what,
            entry: entry.map(str::to_owned),
            offset: to_u64(self.pos),
            needed: n,
            available: to_u64(available),
        };
        let n = usize::try_from(n).map_err(|_| eof())?;
        if n > available {
            return Err(eof());
        }
        let end = self.pos.checked_add(n).ok_or_else(eof)?;
        let out = self.bytes.get(self.pos..end).ok_or_else(eof)?;
        self.pos = end;
        Ok(out)
    }

    fn i32(&mut self, what: &'static str, entry: Option<&str>) -> Result<i32, ImatrixError> {
        let b = self.take(4, what, entry)?;
        Ok(i32::from_le_bytes(
            <[u8; 4]>::try_from(b).unwrap_or_default(),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::sample::Index;

    const GGUF_FIXTURE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/golden/tiny-llama-imatrix.gguf"
    ));
    const DAT_FIXTURE: &[u8] = include_bytes!(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../fixtures/golden/tiny-llama-imatrix.dat"
    ));
    const DATASET: &str = "/tmp/oracle/text/calib.txt";
    const F16: u32 = 1;
    const F32: u32 = 0;

    // ------------------------------------------------------------ builders

    fn put_str(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }

    /// A minimal GGUF v3 writer (canonical layout, alignment 32), enough for imatrix files.
    #[derive(Default)]
    struct Gguf {
        n_kv: u64,
        kvs: Vec<u8>,
        tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    }

    impl Gguf {
        /// The three keys llama-imatrix writes (chunk count 30, chunk size 128, one dataset).
        fn imatrix() -> Gguf {
            Gguf::default()
                .kv_str(keys::GENERAL_TYPE, keys::GENERAL_TYPE_IMATRIX)
                .kv_str_array(keys::DATASETS, &["calib.txt"])
                .kv_u32(keys::CHUNK_COUNT, 30)
                .kv_u32(keys::CHUNK_SIZE, 128)
        }

        fn kv_header(mut self, key: &str, ty: u32) -> Gguf {
            put_str(&mut self.kvs, key);
            self.kvs.extend_from_slice(&ty.to_le_bytes());
            self.n_kv += 1;
            self
        }

        fn kv_u32(self, key: &str, v: u32) -> Gguf {
            let mut g = self.kv_header(key, 4);
            g.kvs.extend_from_slice(&v.to_le_bytes());
            g
        }

        fn kv_str(self, key: &str, v: &str) -> Gguf {
            let mut g = self.kv_header(key, 8);
            put_str(&mut g.kvs, v);
            g
        }

        fn kv_str_array(self, key: &str, v: &[&str]) -> Gguf {
            let mut g = self.kv_header(key, 9);
            g.kvs.extend_from_slice(&8u32.to_le_bytes());
            g.kvs.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for s in v {
                put_str(&mut g.kvs, s);
            }
            g
        }

        fn kv_u32_array(self, key: &str, v: &[u32]) -> Gguf {
            let mut g = self.kv_header(key, 9);
            g.kvs.extend_from_slice(&4u32.to_le_bytes());
            g.kvs.extend_from_slice(&(v.len() as u64).to_le_bytes());
            for x in v {
                g.kvs.extend_from_slice(&x.to_le_bytes());
            }
            g
        }

        fn tensor(mut self, name: &str, ne: &[u64], ty: u32, data: Vec<u8>) -> Gguf {
            self.tensors.push((name.to_owned(), ne.to_vec(), ty, data));
            self
        }

        fn f32s(self, name: &str, ne: &[u64], values: &[f32]) -> Gguf {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            self.tensor(name, ne, F32, data)
        }

        /// `W.in_sum2` and `W.counts` as llama-imatrix writes them.
        fn entry(self, name: &str, columns: u64, sums: &[f32], counts: &[f32]) -> Gguf {
            let n_mat = counts.len() as u64;
            let sums_ne: Vec<u64> = if n_mat == 1 {
                vec![columns]
            } else {
                vec![columns, n_mat]
            };
            self.f32s(&format!("{name}.in_sum2"), &sums_ne, sums).f32s(
                &format!("{name}.counts"),
                &[1, n_mat],
                counts,
            )
        }

        fn bytes(&self) -> Vec<u8> {
            let mut out = b"GGUF".to_vec();
            out.extend_from_slice(&3u32.to_le_bytes());
            out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
            out.extend_from_slice(&self.n_kv.to_le_bytes());
            out.extend_from_slice(&self.kvs);
            let mut offset = 0u64;
            for (name, ne, ty, data) in &self.tensors {
                put_str(&mut out, name);
                out.extend_from_slice(&(ne.len() as u32).to_le_bytes());
                for d in ne {
                    out.extend_from_slice(&d.to_le_bytes());
                }
                out.extend_from_slice(&ty.to_le_bytes());
                out.extend_from_slice(&offset.to_le_bytes());
                offset += (data.len() as u64).next_multiple_of(32);
            }
            out.resize(out.len().next_multiple_of(32), 0);
            for (_, _, _, data) in &self.tensors {
                out.extend_from_slice(data);
                out.resize(out.len().next_multiple_of(32), 0);
            }
            out
        }
    }

    fn put_i32(out: &mut Vec<u8>, v: i32) {
        out.extend_from_slice(&v.to_le_bytes());
    }

    /// A legacy entry: name, ncall, values.
    fn dat_entry(out: &mut Vec<u8>, name: &[u8], ncall: i32, values: &[f32]) {
        put_i32(out, name.len() as i32);
        out.extend_from_slice(name);
        put_i32(out, ncall);
        put_i32(out, values.len() as i32);
        for v in values {
            out.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// A legacy file with the given entries and optional trailer `(chunk count, dataset)`.
    fn dat(entries: &[(&str, i32, &[f32])], trailer: Option<(i32, &[u8])>) -> Vec<u8> {
        let mut out = Vec::new();
        put_i32(&mut out, entries.len() as i32);
        for (name, ncall, values) in entries {
            dat_entry(&mut out, name.as_bytes(), *ncall, values);
        }
        if let Some((chunks, dataset)) = trailer {
            put_i32(&mut out, chunks);
            put_i32(&mut out, dataset.len() as i32);
            out.extend_from_slice(dataset);
        }
        out
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    fn expected_names() -> Vec<String> {
        let kinds = [
            "attn_k",
            "attn_output",
            "attn_q",
            "attn_v",
            "ffn_down",
            "ffn_gate",
            "ffn_up",
        ];
        (0..6)
            .flat_map(|b| kinds.map(|k| format!("blk.{b}.{k}.weight")))
            .collect()
    }

    // ------------------------------------------------------------ fixtures

    #[test]
    fn parses_the_gguf_fixture() {
        let m = parse(GGUF_FIXTURE).unwrap();
        assert_eq!(m.format, ImatrixFormat::Gguf);
        assert_eq!(m.len(), 42);
        assert_eq!(
            m.entries.keys().cloned().collect::<Vec<_>>(),
            expected_names()
        );
        assert_eq!(m.datasets, Some(vec![DATASET.to_owned()]));
        assert_eq!(m.chunk_count, Some(30));
        assert_eq!(m.chunk_size, Some(128));
        assert!(m.has_required_metadata());
        for (name, e) in &m.entries {
            let columns = if name.contains("ffn_down") { 512 } else { 256 };
            assert_eq!((e.columns(), e.matrices()), (columns, 1), "{name}");
            // 30 chunks of 128 tokens, every entry saw every token.
            assert_eq!(e.counts(), &[3840], "{name}");
        }
    }

    #[test]
    fn parses_the_dat_fixture() {
        let m = parse(DAT_FIXTURE).unwrap();
        assert_eq!(m.format, ImatrixFormat::Legacy);
        assert_eq!(m.len(), 42);
        assert_eq!(
            m.entries.keys().cloned().collect::<Vec<_>>(),
            expected_names()
        );
        assert_eq!(m.datasets, Some(vec![DATASET.to_owned()]));
        assert_eq!(m.chunk_count, Some(30));
        assert_eq!(m.chunk_size, None);
        assert!(m.has_required_metadata());
        for (name, e) in &m.entries {
            let columns = if name.contains("ffn_down") { 512 } else { 256 };
            assert_eq!((e.columns(), e.matrices()), (columns, 1), "{name}");
            // ncall = ⌈3840 / 128⌉.
            assert_eq!(e.counts(), &[30], "{name}");
        }
    }

    /// The finding: for this fixture, the weights llama-quantize derives from the `.dat` file
    /// (`stored / ncall`) are bit-identical to those from the `.gguf` (`in_sum2 / count`) for all 42
    /// entries and all 12 288 values. (That is not true in general: see kiln-calib's
    /// `legacy_round_trip_is_exact_only_when_count_is_ncall_times_a_power_of_two`.)
    #[test]
    fn gguf_and_dat_weights_are_bit_identical() {
        let g = parse(GGUF_FIXTURE).unwrap();
        let d = parse(DAT_FIXTURE).unwrap();
        assert_eq!(
            g.entries.keys().collect::<Vec<_>>(),
            d.entries.keys().collect::<Vec<_>>()
        );
        let (mut values, mut differing, mut entries_differing, mut max_ulps) = (0, 0, 0, 0i64);
        for name in g.entries.keys() {
            let wg = g.quant_weights(name).unwrap();
            let wd = d.quant_weights(name).unwrap();
            assert_eq!(wg.len(), wd.len(), "{name}");
            values += wg.len();
            let diff: Vec<i64> = wg
                .iter()
                .zip(&wd)
                .map(|(a, b)| (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs())
                .filter(|&u| u != 0)
                .collect();
            differing += diff.len();
            entries_differing += usize::from(!diff.is_empty());
            max_ulps = max_ulps.max(diff.into_iter().max().unwrap_or(0));
        }
        assert_eq!(values, 12_288);
        assert_eq!(
            (differing, entries_differing, max_ulps),
            (0, 0, 0),
            "values / entries differing, largest difference in ulps"
        );
    }

    /// The `.dat` values are `(in_sum2 / count) · ncall` in f32, from the `.gguf`'s raw tensors
    /// (§4.3 of the format notes), with `ncall = ⌈count / chunk_size⌉`.
    #[test]
    fn dat_values_are_gguf_means_times_ncall() {
        let file = GgufFile::parse(GGUF_FIXTURE).unwrap();
        let d = parse(DAT_FIXTURE).unwrap();
        for (name, e) in &d.entries {
            let raw = |suffix: &str| -> Vec<f32> {
                let i = file.tensor_index(&format!("{name}{suffix}")).unwrap();
                f32s(file.tensor_data(i).unwrap()).collect()
            };
            let (sums, counts) = (raw(".in_sum2"), raw(".counts"));
            let ncall = (counts[0] as i64 + 127) / 128;
            assert_eq!(e.counts(), &[ncall]);
            let expected: Vec<f32> = sums
                .iter()
                .map(|s| (s / counts[0]) * ncall as f32)
                .collect();
            assert_eq!(bits(e.sums()), bits(&expected), "{name}");
        }
    }

    #[test]
    fn weights_match_values_computed_from_the_raw_tensors() {
        let m = parse(GGUF_FIXTURE).unwrap();
        let file = GgufFile::parse(GGUF_FIXTURE).unwrap();
        for name in m.entries.keys() {
            let raw = |suffix: &str| -> Vec<f32> {
                let i = file.tensor_index(&format!("{name}{suffix}")).unwrap();
                let b = file.tensor_data(i).unwrap();
                b.chunks(4)
                    .map(|c| f32::from_bits(u32::from_le_bytes([c[0], c[1], c[2], c[3]])))
                    .collect()
            };
            let (sums, counts) = (raw(".in_sum2"), raw(".counts"));
            let expected: Vec<f32> = sums.iter().map(|s| s / counts[0]).collect();
            assert_eq!(
                bits(&m.quant_weights(name).unwrap()),
                bits(&expected),
                "{name}"
            );
        }

        // Values computed outside kiln (numpy, float32 division of the stored sums by 3840).
        let q = m.quant_weights("blk.0.attn_q.weight").unwrap();
        assert_eq!(
            bits(&m.entry("blk.0.attn_q.weight").unwrap().sums()[..4]),
            [0x44ed_6f09, 0x450a_8b70, 0x452f_56ce, 0x452a_fdc2]
        );
        assert_eq!(
            bits(&q[..4]),
            [0x3efd_433d, 0x3f13_c7ef, 0x3f3b_0742, 0x3f36_6402]
        );
        let down = m.quant_weights("blk.5.ffn_down.weight").unwrap();
        assert_eq!(bits(&down[509..]), [0x3c18_7c42, 0x3d78_9afc, 0x3c8c_ad92]);
        // The same weights through the legacy file.
        let d = parse(DAT_FIXTURE).unwrap();
        assert_eq!(
            bits(&d.quant_weights("blk.0.attn_q.weight").unwrap()[..4]),
            bits(&q[..4])
        );
    }

    #[test]
    fn lookup_and_filters_work_on_the_fixture() {
        let mut m = parse(GGUF_FIXTURE).unwrap();
        let (found, _) = m
            .lookup(
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            )
            .unwrap();
        assert_eq!(found, "blk.0.attn_q.weight");
        assert!(m
            .lookup("token_embd.weight", "model.embed_tokens.weight")
            .is_none());
        m.filter_entries::<&str>(&[], &["ffn_"]).unwrap();
        assert_eq!(m.len(), 24);
        m.filter_entries(&["blk.3."], &[]).unwrap();
        assert_eq!(m.len(), 4);
    }

    /// Every prefix of a fixture is refused, except those that only drop the GGUF file's final
    /// padding (which kiln's GGUF reader, like llama.cpp's model loader, does not require) and, for
    /// the legacy file, the prefix that stops right before the optional trailer.
    #[test]
    fn truncated_fixtures_are_refused_without_panicking() {
        let full = parse(GGUF_FIXTURE).unwrap();
        let file = GgufFile::parse(GGUF_FIXTURE).unwrap();
        let last = file.tensors.last().unwrap();
        let data_end = (file.data_offset + last.offset + last.nbytes.unwrap()) as usize;
        assert!(data_end < GGUF_FIXTURE.len());
        for len in 0..GGUF_FIXTURE.len() {
            let r = parse(&GGUF_FIXTURE[..len]);
            if len >= data_end {
                assert_eq!(r.as_ref(), Ok(&full), "gguf prefix {len}");
            } else {
                assert!(r.is_err(), "gguf prefix {len}");
            }
        }
        let trailer = 4 + 4 + DATASET.len();
        for len in 0..DAT_FIXTURE.len() {
            let r = parse(&DAT_FIXTURE[..len]);
            if len == DAT_FIXTURE.len() - trailer {
                let m = r.unwrap();
                assert_eq!((m.len(), m.chunk_count, m.datasets), (42, None, None));
            } else {
                assert!(r.is_err(), "dat prefix {len}");
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn mutated_fixtures_never_panic(
            gguf in any::<bool>(),
            flips in prop::collection::vec((any::<Index>(), any::<bool>(), 1u8..=255), 0..8),
            cut in any::<Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = if gguf { GGUF_FIXTURE.to_vec() } else { DAT_FIXTURE.to_vec() };
            for (at, in_header, mask) in flips {
                // Half of the flips land in the first 4 KiB, where the headers and lengths are.
                let span = if in_header { bytes.len().min(4096) } else { bytes.len() };
                let i = at.index(span);
                bytes[i] ^= mask;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len() + 1));
            }
            if let Ok(m) = parse(&bytes) {
                prop_assert!(!m.is_empty());
                for e in m.entries.values() {
                    prop_assert_eq!(e.quant_weights(m.format).len(), e.columns() * e.matrices());
                }
            }
        }

        #[test]
        fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse(&bytes);
            let mut gguf = b"GGUF".to_vec();
            gguf.extend_from_slice(&bytes);
            let _ = parse(&gguf);
        }
    }

    // ------------------------------------------------------------ built files

    #[test]
    fn gguf_expert_entries_use_each_experts_count() {
        let sums = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let bytes = Gguf::imatrix()
            .entry("blk.0.ffn_up_exps.weight", 3, &sums, &[2.0, 0.0])
            .bytes();
        let m = parse(&bytes).unwrap();
        let e = m.entry("blk.0.ffn_up_exps.weight").unwrap();
        assert_eq!((e.columns(), e.matrices()), (3, 2));
        assert_eq!(e.counts(), &[2, 0]);
        assert_eq!(
            m.quant_weights("blk.0.ffn_up_exps.weight").unwrap(),
            vec![0.5, 1.0, 1.5, 1.0, 1.0, 1.0]
        );
        assert_eq!(m.datasets, Some(vec!["calib.txt".to_owned()]));
    }

    #[test]
    fn gguf_counts_are_rounded_half_away_from_zero() {
        let bytes = Gguf::imatrix()
            .entry("a", 1, &[6.0], &[2.5])
            .entry("b", 1, &[6.0], &[2.49])
            .entry("c", 1, &[6.0], &[0.4])
            .bytes();
        let m = parse(&bytes).unwrap();
        assert_eq!(m.entry("a").unwrap().counts(), &[3]);
        assert_eq!(m.quant_weights("a").unwrap(), vec![2.0]);
        assert_eq!(m.quant_weights("b").unwrap(), vec![3.0]);
        // lround(0.4) = 0: no tokens, weight 1.0.
        assert_eq!(m.quant_weights("c").unwrap(), vec![1.0]);
    }

    #[test]
    fn gguf_metadata_is_optional_and_other_tensors_are_ignored() {
        let bytes = Gguf::default()
            .f32s("blk.0.attn_q.weight.in_sum", &[2], &[1.0, 2.0])
            .f32s("blk.0.attn_q.weight.stats", &[1], &[0.0])
            .entry("blk.0.attn_q.weight", 2, &[4.0, 8.0], &[4.0])
            .bytes();
        let m = parse(&bytes).unwrap();
        assert_eq!(m.len(), 1);
        assert_eq!(
            (m.datasets.clone(), m.chunk_count, m.chunk_size),
            (None, None, None)
        );
        assert!(!m.has_required_metadata());
        assert_eq!(
            m.quant_weights("blk.0.attn_q.weight").unwrap(),
            vec![1.0, 2.0]
        );

        let empty_list = Gguf::default()
            .kv_str_array(keys::DATASETS, &[])
            .entry("w", 1, &[1.0], &[1.0])
            .bytes();
        assert_eq!(parse(&empty_list).unwrap().datasets, Some(vec![]));
    }

    #[test]
    fn legacy_trailer_is_optional() {
        let none = parse(&dat(&[("w", 3, &[3.0, 6.0])], None)).unwrap();
        assert_eq!((none.datasets.clone(), none.chunk_count), (None, None));
        assert_eq!(none.quant_weights("w").unwrap(), vec![1.0, 2.0]);

        let unnamed = parse(&dat(&[("w", 3, &[3.0])], Some((7, b"")))).unwrap();
        assert_eq!(
            (unnamed.datasets, unnamed.chunk_count),
            (Some(vec![]), Some(7))
        );

        let named = parse(&dat(&[("w", 3, &[3.0])], Some((7, b"data.txt")))).unwrap();
        assert_eq!(named.datasets, Some(vec!["data.txt".to_owned()]));
    }

    #[test]
    fn legacy_ncall_of_zero_or_less_keeps_the_stored_values() {
        let m = parse(&dat(&[("a", 0, &[3.0, 6.0]), ("b", -2, &[5.0])], None)).unwrap();
        assert_eq!(m.quant_weights("a").unwrap(), vec![3.0, 6.0]);
        assert_eq!(m.quant_weights("b").unwrap(), vec![5.0]);
        assert_eq!(m.entry("b").unwrap().counts(), &[-2]);
    }

    // ------------------------------------------------------------ one rejection per variant

    #[test]
    fn rejects_invalid_gguf_containers() {
        let mut bytes = Gguf::imatrix().entry("w", 1, &[1.0], &[1.0]).bytes();
        bytes[4] = 9; // version 9
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::Gguf(GgufError::UnsupportedVersion {
                version: 9
            }))
        ));
    }

    #[test]
    fn rejects_files_without_entries() {
        assert!(matches!(
            parse(&Gguf::imatrix().bytes()),
            Err(ImatrixError::NoEntries)
        ));
        let unrelated = Gguf::imatrix().f32s("x.weight", &[1], &[1.0]).bytes();
        assert!(matches!(parse(&unrelated), Err(ImatrixError::NoEntries)));
        assert!(matches!(
            parse(&dat(&[], Some((1, b"d")))),
            Err(ImatrixError::NoEntries)
        ));
    }

    #[test]
    fn rejects_truncated_legacy_files() {
        assert!(matches!(
            parse(&[1, 0]),
            Err(ImatrixError::UnexpectedEof {
                what: "entry count",
                entry: None,
                offset: 0,
                needed: 4,
                available: 2
            })
        ));
        let mut bytes = dat(&[("w", 1, &[1.0, 2.0])], None);
        bytes.pop();
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::UnexpectedEof { what: "values", entry: Some(ref e), needed: 8, available: 7, .. }) if e == "w"
        ));
        // A huge declared name length is checked against the file before anything is allocated.
        let mut bytes = Vec::new();
        put_i32(&mut bytes, 1);
        put_i32(&mut bytes, i32::MAX);
        bytes.extend_from_slice(&[b'x'; 13]);
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::UnexpectedEof {
                what: "name",
                needed: 2_147_483_647,
                available: 13,
                ..
            })
        ));
        // A trailer cut after the chunk count.
        let mut bytes = dat(&[("w", 1, &[1.0])], None);
        put_i32(&mut bytes, 30);
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::UnexpectedEof {
                what: "dataset name length",
                ..
            })
        ));
    }

    #[test]
    fn rejects_impossible_entry_counts() {
        let mut bytes = dat(&[("w", 1, &[1.0])], None);
        bytes[..4].copy_from_slice(&1000i32.to_le_bytes());
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::TooManyEntries {
                count: 1000,
                max: 1
            })
        ));
    }

    #[test]
    fn rejects_negative_lengths_and_counts() {
        let negative = |bytes: &[u8]| match parse(bytes) {
            Err(ImatrixError::Negative { what, entry, value }) => Some((what, entry, value)),
            _ => None,
        };
        assert_eq!(
            negative(&(-1i32).to_le_bytes()),
            Some(("entry count", None, -1))
        );

        let mut bytes = Vec::new();
        put_i32(&mut bytes, 1);
        put_i32(&mut bytes, -5);
        bytes.extend_from_slice(&[0; 16]);
        assert_eq!(negative(&bytes), Some(("name length", None, -5)));

        let mut bytes = Vec::new();
        put_i32(&mut bytes, 1);
        put_i32(&mut bytes, 1);
        bytes.push(b'w');
        put_i32(&mut bytes, 1);
        put_i32(&mut bytes, -3);
        bytes.extend_from_slice(&[0; 8]);
        assert_eq!(
            negative(&bytes),
            Some(("value count", Some("w".to_owned()), -3))
        );

        let bytes = dat(&[("w", 1, &[1.0])], Some((-2, b"d")));
        assert_eq!(negative(&bytes), Some(("chunk count", None, -2)));

        let mut bytes = dat(&[("w", 1, &[1.0])], None);
        put_i32(&mut bytes, 3);
        put_i32(&mut bytes, -1);
        assert_eq!(negative(&bytes), Some(("dataset name length", None, -1)));
    }

    #[test]
    fn rejects_invalid_entry_names() {
        let reason = |bytes: &[u8]| match parse(bytes) {
            Err(ImatrixError::InvalidEntryName { reason, .. }) => Some(reason),
            _ => None,
        };
        let mut empty = Vec::new();
        put_i32(&mut empty, 1);
        dat_entry(&mut empty, b"", 1, &[1.0, 2.0]);
        assert_eq!(reason(&empty), Some("empty"));
        let mut latin1 = Vec::new();
        put_i32(&mut latin1, 1);
        dat_entry(&mut latin1, b"blk.0.\xe9", 1, &[1.0]);
        assert_eq!(reason(&latin1), Some("not UTF-8"));
        let nul = dat(&[("blk.0\0x", 1, &[1.0])], None);
        assert_eq!(reason(&nul), Some("contains a NUL byte"));
        let gguf = Gguf::imatrix().entry("", 1, &[1.0], &[1.0]).bytes();
        assert!(matches!(
            parse(&gguf),
            Err(ImatrixError::InvalidEntryName { ref name, reason: "empty" }) if name.is_empty()
        ));
    }

    #[test]
    fn rejects_duplicate_legacy_entries() {
        let bytes = dat(&[("w", 1, &[1.0]), ("w", 1, &[2.0])], None);
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::DuplicateEntry { ref entry }) if entry == "w"
        ));
    }

    #[test]
    fn rejects_empty_entries() {
        let bytes = dat(&[("w", 1, &[])], Some((1, b"data")));
        assert!(
            matches!(parse(&bytes), Err(ImatrixError::EmptyEntry { ref entry }) if entry == "w")
        );
        let gguf = Gguf::imatrix()
            .f32s("w.in_sum2", &[0], &[])
            .f32s("w.counts", &[1], &[1.0])
            .bytes();
        assert!(
            matches!(parse(&gguf), Err(ImatrixError::EmptyEntry { ref entry }) if entry == "w")
        );
    }

    #[test]
    fn rejects_invalid_dataset_names() {
        let bytes = dat(&[("w", 1, &[1.0])], Some((1, b"\xff\xfe")));
        let offset = (bytes.len() - 2) as u64;
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::InvalidDatasetName { offset: o, reason: "not UTF-8" }) if o == offset
        ));
        let bytes = dat(&[("w", 1, &[1.0])], Some((1, b"a\0b")));
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::InvalidDatasetName {
                reason: "contains a NUL byte",
                ..
            })
        ));
    }

    #[test]
    fn rejects_bytes_after_the_trailer() {
        let mut bytes = dat(&[("w", 1, &[1.0])], Some((1, b"d")));
        let end = bytes.len() as u64;
        bytes.extend_from_slice(&[0, 0, 0]);
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::TrailingBytes { offset, len: 3 }) if offset == end
        ));
    }

    #[test]
    fn rejects_entries_missing_a_tensor() {
        let no_counts = Gguf::imatrix().f32s("w.in_sum2", &[1], &[1.0]).bytes();
        assert!(matches!(
            parse(&no_counts),
            Err(ImatrixError::MissingTensor { ref entry, suffix: keys::SUFFIX_COUNTS }) if entry == "w"
        ));
        let no_sums = Gguf::imatrix().f32s("w.counts", &[1], &[1.0]).bytes();
        assert!(matches!(
            parse(&no_sums),
            Err(ImatrixError::MissingTensor { ref entry, suffix: keys::SUFFIX_IN_SUM2 }) if entry == "w"
        ));
    }

    #[test]
    fn rejects_tensors_that_are_not_f32() {
        let bytes = Gguf::imatrix()
            .tensor("w.in_sum2", &[2], F16, vec![0, 0x3c, 0, 0x3c])
            .f32s("w.counts", &[1], &[1.0])
            .bytes();
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::NotF32 { ref entry, ref tensor, found: GgmlType::F16 })
                if entry == "w" && tensor == "w.in_sum2"
        ));
    }

    #[test]
    fn rejects_sums_that_do_not_fit_the_counts() {
        let bytes = Gguf::imatrix()
            .f32s("w.in_sum2", &[2, 2], &[1.0; 4])
            .f32s("w.counts", &[1, 3], &[1.0; 3])
            .bytes();
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::ShapeMismatch { ref entry, ref in_sum2, ref counts })
                if entry == "w" && in_sum2 == &[2, 2] && counts == &[1, 3]
        ));
        let three_d = Gguf::imatrix()
            .f32s("w.in_sum2", &[2, 1, 2], &[1.0; 4])
            .f32s("w.counts", &[1, 2], &[1.0; 2])
            .bytes();
        assert!(matches!(
            parse(&three_d),
            Err(ImatrixError::ShapeMismatch { .. })
        ));
    }

    #[test]
    fn rejects_invalid_counts() {
        for bad in [f32::NAN, f32::INFINITY, -1.0, 1.0e19] {
            let bytes = Gguf::imatrix()
                .entry("w", 1, &[1.0, 1.0], &[1.0, bad])
                .bytes();
            match parse(&bytes) {
                Err(ImatrixError::InvalidCount {
                    entry,
                    matrix: 1,
                    value,
                }) => {
                    assert_eq!(entry, "w");
                    assert_eq!(value.to_bits(), bad.to_bits());
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }

    #[test]
    fn rejects_metadata_of_the_wrong_type() {
        let bytes = Gguf::default()
            .kv_str(keys::CHUNK_COUNT, "30")
            .entry("w", 1, &[1.0], &[1.0])
            .bytes();
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::MetadataType {
                key: keys::CHUNK_COUNT,
                found: MetaValueType::String,
                ..
            })
        ));
        let bytes = Gguf::default()
            .kv_u32_array(keys::DATASETS, &[1])
            .entry("w", 1, &[1.0], &[1.0])
            .bytes();
        assert!(matches!(
            parse(&bytes),
            Err(ImatrixError::MetadataType {
                key: keys::DATASETS,
                found: MetaValueType::Array,
                ..
            })
        ));
    }
}
