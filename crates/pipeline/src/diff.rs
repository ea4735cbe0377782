//! Differences between two GGUF artifacts (`kiln diff A B`).
//!
//! [`diff`] opens both files (memory-mapped, through [`GgufInput`]) and compares:
//!
//! - **the header**: format version and data alignment;
//! - **metadata**: keys only in A, keys only in B, and keys whose value or *stored type* changed
//!   (a `u32` and an `i32` holding the same number are different to llama.cpp, whose loader checks
//!   types strictly), plus whether the common keys appear in a different order;
//! - **tensors**, matched by name: tensors only in A, only in B, and for every common tensor (in A's
//!   order) the type, shape and byte size on both sides, whether the stored bytes are equal and,
//!   unless that makes it pointless or impossible, numeric differences of the dequantized values
//!   ([`NumericDiff`]: maximum absolute difference, RMSE, the RMS of each side for scale, relative
//!   RMSE and cosine similarity).
//!
//! Memory stays bounded whatever the model size: byte comparison and dequantization walk each
//! tensor in chunks (whole rows, at most [`DiffOptions::chunk_bytes`] of `f32` per side and chunk),
//! a few chunks in parallel, and the mapped pages of a chunk are released once it is done. Sums are
//! accumulated in `f64` per chunk and combined in chunk order, so the report does not depend on the
//! number of threads. Nothing in the report comes from a hash map's iteration order.
//!
//! The report is plain data (`serde::Serialize`): the CLI prints it as a table or as JSON.
//! Metadata values are kept typed ([`MetaValue`]; `Display` gives a short rendering for tables)
//! and serialize through [`meta_to_json`].

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

use kiln_reader::{GgufInput, MmapAccess};
use kiln_types::{GgmlType, MetaArray, MetaValue};
use rayon::prelude::*;
use serde::{Serialize, Serializer};

use crate::{meta_to_json, PipelineError, Progress};

/// How to compare two files.
#[derive(Debug, Clone)]
pub struct DiffOptions {
    /// Compute numeric differences of dequantized values for common tensors whose bytes differ.
    /// When `false` only metadata, types, shapes and bytes are compared (much faster: a tensor's
    /// bytes are read only up to their first difference).
    pub numeric: bool,
    /// Worker threads for the numeric pass; `None` means rayon's default (all cores, or
    /// `RAYON_NUM_THREADS`). The report does not depend on it.
    pub threads: Option<usize>,
    /// Target size of one chunk in bytes of dequantized `f32` values *per side* (rounded to whole
    /// rows, at least one row). Peak memory is about `2 × threads × 2 × chunk_bytes`.
    pub chunk_bytes: usize,
}

impl Default for DiffOptions {
    fn default() -> Self {
        DiffOptions {
            numeric: true,
            threads: None,
            chunk_bytes: 4 << 20,
        }
    }
}

/// Everything that differs between two GGUF files. Lists are in a deterministic order (A's order
/// for anything present in A, B's order for what only B has).
#[derive(Debug, Clone, Serialize)]
pub struct DiffReport {
    /// File A (the reference: relative errors are relative to A).
    pub a: PathBuf,
    /// File B.
    pub b: PathBuf,
    /// Whether A and B have the same content: same version, same metadata (keys, stored types,
    /// values bit for bit, order), and the same tensors in the same order with the same types,
    /// shapes and data bytes. (Two such files are byte-identical when both use the canonical
    /// layout, as kiln and llama.cpp write it.)
    pub identical: bool,
    /// GGUF format version of A and B.
    pub version: [u32; 2],
    /// Data alignment of A and B (from `general.alignment`, else the default 32).
    pub alignment: [u64; 2],
    /// Metadata differences.
    pub metadata: MetadataDiff,
    /// Tensor differences.
    pub tensors: TensorsDiff,
    /// Counts, for a one-line summary.
    pub summary: DiffSummary,
}

/// Metadata differences.
#[derive(Debug, Clone, Serialize)]
pub struct MetadataDiff {
    /// Keys only in A, in A's order.
    pub only_in_a: Vec<MetaEntry>,
    /// Keys only in B, in B's order.
    pub only_in_b: Vec<MetaEntry>,
    /// Keys in both files whose stored type or value differs, in A's order.
    pub changed: Vec<ChangedKey>,
    /// Number of keys present in both files (changed or not).
    pub common: usize,
    /// Whether the keys present in both files appear in a different relative order.
    pub order_differs: bool,
}

/// A metadata key present on one side only.
#[derive(Debug, Clone, Serialize)]
pub struct MetaEntry {
    /// The key.
    pub key: String,
    /// Its stored type: `u32`, `string`, ..., and `array[ELEMENT]` for arrays (`array[i32]`).
    #[serde(rename = "type")]
    pub ty: String,
    /// The value (serialized as JSON by [`meta_to_json`]; `Display` gives a short form for tables).
    #[serde(serialize_with = "serialize_meta")]
    pub value: MetaValue,
}

/// A metadata key present in both files with a different type or value.
#[derive(Debug, Clone, Serialize)]
pub struct ChangedKey {
    /// The key.
    pub key: String,
    /// Stored type in A (same notation as [`MetaEntry::ty`]).
    pub type_a: String,
    /// Stored type in B.
    pub type_b: String,
    /// Whether the stored types differ (`u32` vs `i32`, `array[i32]` vs `array[u32]`, ...). The
    /// values may then still be numerically equal.
    pub type_changed: bool,
    /// The value in A (serialized as JSON by [`meta_to_json`]).
    #[serde(serialize_with = "serialize_meta")]
    pub value_a: MetaValue,
    /// The value in B.
    #[serde(serialize_with = "serialize_meta")]
    pub value_b: MetaValue,
    /// For two arrays of the same element type: where they differ.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayDiff>,
}

/// Where two arrays of the same element type differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ArrayDiff {
    /// Length in A.
    pub len_a: usize,
    /// Length in B.
    pub len_b: usize,
    /// Index of the first differing element (the shorter length if one array is a prefix of the
    /// other).
    pub first_difference: usize,
    /// Number of differing elements among the first `min(len_a, len_b)`.
    pub differing: usize,
}

/// Tensor differences.
#[derive(Debug, Clone, Serialize)]
pub struct TensorsDiff {
    /// Tensors only in A, in A's order.
    pub only_in_a: Vec<TensorSide>,
    /// Tensors only in B, in B's order.
    pub only_in_b: Vec<TensorSide>,
    /// Every tensor present in both files, identical or not, in A's order.
    pub common: Vec<TensorDiff>,
    /// Whether the tensors present in both files appear in a different relative order.
    pub order_differs: bool,
}

/// A tensor present on one side only.
#[derive(Debug, Clone, Serialize)]
pub struct TensorSide {
    /// Name.
    pub name: String,
    /// ggml type name (`UNKNOWN(id)` for a type kiln does not know).
    #[serde(rename = "type")]
    pub ty: String,
    /// Dimensions, fastest first (GGUF `ne`).
    pub shape: Vec<u64>,
    /// Data size in bytes, when the type is known.
    pub bytes: Option<u64>,
}

/// A tensor present in both files.
#[derive(Debug, Clone, Serialize)]
pub struct TensorDiff {
    /// Name.
    pub name: String,
    /// ggml type name in A.
    pub type_a: String,
    /// ggml type name in B.
    pub type_b: String,
    /// Dimensions in A, fastest first.
    pub shape_a: Vec<u64>,
    /// Dimensions in B, fastest first.
    pub shape_b: Vec<u64>,
    /// Data size in A, when the type is known.
    pub bytes_a: Option<u64>,
    /// Data size in B, when the type is known.
    pub bytes_b: Option<u64>,
    /// Whether the stored data bytes are equal (same length and content). Always `false` when
    /// either type is unknown to kiln, since the data's extent is then unknown.
    pub bytes_equal: bool,
    /// Same type, same shape and equal bytes.
    pub identical: bool,
    /// Numeric differences of the dequantized values, when computed.
    pub numeric: Option<NumericDiff>,
    /// Why `numeric` is absent (`None` when it is present).
    pub numeric_skipped: Option<NumericSkip>,
}

/// Why numeric differences were not computed for a common tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum NumericSkip {
    /// [`DiffOptions::numeric`] is off.
    Disabled,
    /// The tensors are identical, so every difference is exactly zero.
    Identical,
    /// The element counts differ, so values cannot be paired.
    ElementCountDiffers,
    /// kiln cannot dequantize A's or B's type.
    UnsupportedType,
}

impl fmt::Display for NumericSkip {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumericSkip::Disabled => "not computed",
            NumericSkip::Identical => "identical",
            NumericSkip::ElementCountDiffers => "element counts differ",
            NumericSkip::UnsupportedType => "type cannot be dequantized",
        })
    }
}

/// Numeric differences between the dequantized values of a common tensor, pairing elements in
/// storage order (element `i` of A with element `i` of B; with equal shapes that is the same
/// position). With `d = b − a` over the `compared` pairs:
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct NumericDiff {
    /// Elements in the tensor.
    pub elements: u64,
    /// Pairs where `a` or `b` is NaN or infinite. They are left out of every statistic below
    /// (except `differing`, which counts them when their bit patterns differ).
    pub non_finite: u64,
    /// Pairs whose values differ (`a != b` for finite pairs; different bits otherwise).
    pub differing: u64,
    /// `max |d|` (0 when nothing is compared).
    pub max_abs: f64,
    /// Storage index (flat, fastest dimension first) of the first element reaching `max_abs`.
    pub max_abs_index: u64,
    /// `sqrt(mean d²)`.
    pub rmse: f64,
    /// `mean d`: a systematic bias of B against A.
    pub mean_diff: f64,
    /// `sqrt(mean a²)`: the scale of A's values, to judge `rmse` against.
    pub rms_a: f64,
    /// `sqrt(mean b²)`.
    pub rms_b: f64,
    /// `rmse / rms_a`; `None` when `rms_a` is 0.
    pub relative_rmse: Option<f64>,
    /// `Σab / sqrt(Σa² · Σb²)`; `None` when either side is all zeros.
    pub cosine: Option<f64>,
}

/// Counts over the whole comparison.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DiffSummary {
    /// Metadata keys only in A.
    pub metadata_only_in_a: usize,
    /// Metadata keys only in B.
    pub metadata_only_in_b: usize,
    /// Common metadata keys whose type or value changed.
    pub metadata_changed: usize,
    /// Common metadata keys whose stored type changed (a subset of `metadata_changed`).
    pub metadata_type_changed: usize,
    /// Tensors only in A.
    pub tensors_only_in_a: usize,
    /// Tensors only in B.
    pub tensors_only_in_b: usize,
    /// Tensors in both files.
    pub tensors_common: usize,
    /// Common tensors that are identical (type, shape, bytes).
    pub tensors_identical: usize,
    /// Common tensors whose type differs.
    pub tensors_type_changed: usize,
    /// Common tensors whose shape differs.
    pub tensors_shape_changed: usize,
    /// Common tensors with numeric differences computed.
    pub tensors_compared: usize,
    /// Elements over which `rmse` and `max_abs` below are taken: those of the compared tensors
    /// plus those of identical tensors (whose differences are exactly zero).
    pub elements_compared: u64,
    /// RMSE over `elements_compared` (`None` when the numeric pass is off or nothing compared).
    pub rmse: Option<f64>,
    /// Largest `max_abs` of any compared tensor, 0 when only identical tensors were compared
    /// (`None` as for `rmse`).
    pub max_abs: Option<f64>,
}

/// Compares two GGUF files; see the [module documentation](self).
pub fn diff(
    a: &Path,
    b: &Path,
    access: &MmapAccess,
    options: &DiffOptions,
) -> Result<DiffReport, PipelineError> {
    diff_with_progress(a, b, access, options, &())
}

/// [`diff`] reporting progress: `begin` with the common tensors and A's bytes of them, `tensor`
/// for each common tensor (index in [`TensorsDiff::common`]), `advance` with A's bytes done.
pub fn diff_with_progress(
    a: &Path,
    b: &Path,
    access: &MmapAccess,
    options: &DiffOptions,
    progress: &dyn Progress,
) -> Result<DiffReport, PipelineError> {
    let fa = GgufInput::open(access, a)?;
    let fb = GgufInput::open(access, b)?;
    let metadata = diff_metadata(fa.metadata(), fb.metadata());

    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = options.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().map_err(|e| PipelineError::Threads {
        threads: options.threads.unwrap_or(0),
        message: e.to_string(),
    })?;

    let index_b: HashMap<&str, usize> = fb
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let index_a: HashMap<&str, usize> = fa
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let side = |t: &kiln_reader::gguf::GgufTensorInfo| TensorSide {
        name: t.name.clone(),
        ty: t.ty.to_string(),
        shape: t.ne.clone(),
        bytes: t.nbytes,
    };
    let only_in_a: Vec<TensorSide> = fa
        .tensors()
        .iter()
        .filter(|t| !index_b.contains_key(t.name.as_str()))
        .map(side)
        .collect();
    let only_in_b: Vec<TensorSide> = fb
        .tensors()
        .iter()
        .filter(|t| !index_a.contains_key(t.name.as_str()))
        .map(side)
        .collect();
    let pairs: Vec<(usize, usize)> = fa
        .tensors()
        .iter()
        .enumerate()
        .filter_map(|(i, t)| index_b.get(t.name.as_str()).map(|&j| (i, j)))
        .collect();
    let tensor_order_differs = pairs.windows(2).any(|w| w[0].1 > w[1].1);

    let total: u64 = pairs.iter().map(|&(i, _)| fa.data(i).len() as u64).sum();
    progress.begin(pairs.len(), total);
    let result = pairs
        .iter()
        .enumerate()
        .map(|(k, &(i, j))| {
            progress.tensor(k, &fa.tensors()[i].name);
            let d = diff_tensor(&fa, i, &fb, j, options, &pool);
            progress.advance(fa.data(i).len() as u64);
            d
        })
        .collect::<Result<Vec<(TensorDiff, Sums)>, PipelineError>>();
    progress.finish();
    let compared = result?;

    let mut total_sums = Sums::default();
    for (t, s) in &compared {
        if t.numeric.is_some() {
            total_sums.merge(s);
        } else if t.identical && options.numeric {
            total_sums.count += t.shape_a.iter().product::<u64>();
        }
    }
    let common: Vec<TensorDiff> = compared.into_iter().map(|(t, _)| t).collect();

    let summary = DiffSummary {
        metadata_only_in_a: metadata.only_in_a.len(),
        metadata_only_in_b: metadata.only_in_b.len(),
        metadata_changed: metadata.changed.len(),
        metadata_type_changed: metadata.changed.iter().filter(|c| c.type_changed).count(),
        tensors_only_in_a: only_in_a.len(),
        tensors_only_in_b: only_in_b.len(),
        tensors_common: common.len(),
        tensors_identical: common.iter().filter(|t| t.identical).count(),
        tensors_type_changed: common.iter().filter(|t| t.type_a != t.type_b).count(),
        tensors_shape_changed: common.iter().filter(|t| t.shape_a != t.shape_b).count(),
        tensors_compared: common.iter().filter(|t| t.numeric.is_some()).count(),
        elements_compared: total_sums.count,
        rmse: (options.numeric && total_sums.count > 0)
            .then(|| (total_sums.sq_diff / total_sums.count as f64).sqrt()),
        max_abs: (options.numeric && total_sums.count > 0).then_some(total_sums.max_abs),
    };
    let identical = fa.version() == fb.version()
        && metadata.only_in_a.is_empty()
        && metadata.only_in_b.is_empty()
        && metadata.changed.is_empty()
        && !metadata.order_differs
        && only_in_a.is_empty()
        && only_in_b.is_empty()
        && !tensor_order_differs
        && common.iter().all(|t| t.identical);
    Ok(DiffReport {
        a: a.to_path_buf(),
        b: b.to_path_buf(),
        identical,
        version: [fa.version(), fb.version()],
        alignment: [fa.alignment(), fb.alignment()],
        metadata,
        tensors: TensorsDiff {
            only_in_a,
            only_in_b,
            common,
            order_differs: tensor_order_differs,
        },
        summary,
    })
}

// ---------------------------------------------------------------------------------------------
// Metadata

fn serialize_meta<S: Serializer>(v: &MetaValue, s: S) -> Result<S::Ok, S::Error> {
    meta_to_json(v).serialize(s)
}

/// `u32`, `string`, ..., `array[i32]`.
fn type_label(v: &MetaValue) -> String {
    match v {
        MetaValue::Array(a) => format!("array[{}]", a.element_type().name()),
        other => other.value_type().name().to_string(),
    }
}

fn diff_metadata(a: &[(String, MetaValue)], b: &[(String, MetaValue)]) -> MetadataDiff {
    let index_b: HashMap<&str, usize> = b
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_str(), i))
        .collect();
    let index_a: HashMap<&str, usize> = a
        .iter()
        .enumerate()
        .map(|(i, (k, _))| (k.as_str(), i))
        .collect();
    let entry = |(k, v): &(String, MetaValue)| MetaEntry {
        key: k.clone(),
        ty: type_label(v),
        value: v.clone(),
    };
    let only_in_a = a
        .iter()
        .filter(|(k, _)| !index_b.contains_key(k.as_str()))
        .map(entry)
        .collect();
    let only_in_b = b
        .iter()
        .filter(|(k, _)| !index_a.contains_key(k.as_str()))
        .map(entry)
        .collect();
    let mut changed = Vec::new();
    let mut positions_in_b = Vec::new();
    for (key, va) in a {
        let Some(&j) = index_b.get(key.as_str()) else {
            continue;
        };
        positions_in_b.push(j);
        let vb = &b[j].1;
        if meta_identical(va, vb) {
            continue;
        }
        let (type_a, type_b) = (type_label(va), type_label(vb));
        changed.push(ChangedKey {
            key: key.clone(),
            type_changed: type_a != type_b,
            type_a,
            type_b,
            value_a: va.clone(),
            value_b: vb.clone(),
            array: array_diff(va, vb),
        });
    }
    MetadataDiff {
        only_in_a,
        only_in_b,
        changed,
        common: positions_in_b.len(),
        order_differs: positions_in_b.windows(2).any(|w| w[0] > w[1]),
    }
}

/// Same stored type and the same value bit for bit (so a NaN equals itself and `-0.0` differs
/// from `0.0`, as the file bytes do).
fn meta_identical(a: &MetaValue, b: &MetaValue) -> bool {
    match (a, b) {
        (MetaValue::F32(x), MetaValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::F64(x), MetaValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetaValue::Array(x), MetaValue::Array(y)) => {
            x.len() == y.len() && array_diff_counts(x, y).is_some_and(|(_, n)| n == 0)
        }
        _ => a == b,
    }
}

/// Elementwise comparison of two arrays of the same element type: `(first difference over the
/// common prefix, number of differing elements there)`; `None` for different element types.
fn array_diff_counts(a: &MetaArray, b: &MetaArray) -> Option<(Option<usize>, usize)> {
    fn count<T>(x: &[T], y: &[T], eq: impl Fn(&T, &T) -> bool) -> (Option<usize>, usize) {
        let mut first = None;
        let mut n = 0;
        for (i, (p, q)) in x.iter().zip(y).enumerate() {
            if !eq(p, q) {
                first.get_or_insert(i);
                n += 1;
            }
        }
        (first, n)
    }
    Some(match (a, b) {
        (MetaArray::U8(x), MetaArray::U8(y)) => count(x, y, PartialEq::eq),
        (MetaArray::I8(x), MetaArray::I8(y)) => count(x, y, PartialEq::eq),
        (MetaArray::U16(x), MetaArray::U16(y)) => count(x, y, PartialEq::eq),
        (MetaArray::I16(x), MetaArray::I16(y)) => count(x, y, PartialEq::eq),
        (MetaArray::U32(x), MetaArray::U32(y)) => count(x, y, PartialEq::eq),
        (MetaArray::I32(x), MetaArray::I32(y)) => count(x, y, PartialEq::eq),
        (MetaArray::U64(x), MetaArray::U64(y)) => count(x, y, PartialEq::eq),
        (MetaArray::I64(x), MetaArray::I64(y)) => count(x, y, PartialEq::eq),
        (MetaArray::Bool(x), MetaArray::Bool(y)) => count(x, y, PartialEq::eq),
        (MetaArray::String(x), MetaArray::String(y)) => count(x, y, PartialEq::eq),
        (MetaArray::F32(x), MetaArray::F32(y)) => count(x, y, |p, q| p.to_bits() == q.to_bits()),
        (MetaArray::F64(x), MetaArray::F64(y)) => count(x, y, |p, q| p.to_bits() == q.to_bits()),
        _ => return None,
    })
}

fn array_diff(a: &MetaValue, b: &MetaValue) -> Option<ArrayDiff> {
    let (MetaValue::Array(x), MetaValue::Array(y)) = (a, b) else {
        return None;
    };
    let (first, differing) = array_diff_counts(x, y)?;
    let shorter = x.len().min(y.len());
    Some(ArrayDiff {
        len_a: x.len(),
        len_b: y.len(),
        first_difference: first.unwrap_or(shorter),
        differing,
    })
}

// ---------------------------------------------------------------------------------------------
// Tensors

/// Running sums of one chunk or tensor, combined in a fixed order.
#[derive(Debug, Clone, Copy, Default)]
struct Sums {
    /// Finite pairs summed below.
    count: u64,
    non_finite: u64,
    differing: u64,
    sq_diff: f64,
    sum_diff: f64,
    sq_a: f64,
    sq_b: f64,
    dot: f64,
    max_abs: f64,
    /// Flat element index of `max_abs`.
    max_index: u64,
}

impl Sums {
    /// Adds `other`, which covers elements after this one's.
    fn merge(&mut self, other: &Sums) {
        self.count += other.count;
        self.non_finite += other.non_finite;
        self.differing += other.differing;
        self.sq_diff += other.sq_diff;
        self.sum_diff += other.sum_diff;
        self.sq_a += other.sq_a;
        self.sq_b += other.sq_b;
        self.dot += other.dot;
        if other.max_abs > self.max_abs {
            self.max_abs = other.max_abs;
            self.max_index = other.max_index;
        }
    }

    /// Adds pairs `a[i], b[i]`, whose flat indices start at `base`.
    fn add_values(&mut self, a: &[f32], b: &[f32], base: u64) {
        for (i, (&x, &y)) in a.iter().zip(b).enumerate() {
            if !(x.is_finite() && y.is_finite()) {
                self.non_finite += 1;
                self.differing += u64::from(x.to_bits() != y.to_bits());
                continue;
            }
            let (x, y) = (f64::from(x), f64::from(y));
            let d = y - x;
            self.count += 1;
            self.differing += u64::from(d != 0.0);
            self.sq_diff += d * d;
            self.sum_diff += d;
            self.sq_a += x * x;
            self.sq_b += y * y;
            self.dot += x * y;
            if d.abs() > self.max_abs {
                self.max_abs = d.abs();
                self.max_index = base + i as u64;
            }
        }
    }

    fn finish(&self, elements: u64) -> NumericDiff {
        let n = self.count.max(1) as f64;
        let rmse = (self.sq_diff / n).sqrt();
        let rms_a = (self.sq_a / n).sqrt();
        NumericDiff {
            elements,
            non_finite: self.non_finite,
            differing: self.differing,
            max_abs: self.max_abs,
            max_abs_index: self.max_index,
            rmse,
            mean_diff: self.sum_diff / n,
            rms_a,
            rms_b: (self.sq_b / n).sqrt(),
            relative_rmse: (rms_a > 0.0).then(|| rmse / rms_a),
            cosine: (self.sq_a > 0.0 && self.sq_b > 0.0)
                .then(|| (self.dot / (self.sq_a.sqrt() * self.sq_b.sqrt())).clamp(-1.0, 1.0)),
        }
    }
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

fn lcm(a: u64, b: u64) -> Option<u64> {
    if a == 0 || b == 0 {
        return Some(a.max(b));
    }
    (a / gcd(a, b)).checked_mul(b)
}

/// Compares tensor `i` of A with tensor `j` of B.
fn diff_tensor(
    fa: &GgufInput,
    i: usize,
    fb: &GgufInput,
    j: usize,
    options: &DiffOptions,
    pool: &rayon::ThreadPool,
) -> Result<(TensorDiff, Sums), PipelineError> {
    let (ta, tb) = (&fa.tensors()[i], &fb.tensors()[j]);
    let (da, db) = (fa.data(i), fb.data(j));
    let bytes_equal = match (ta.nbytes, tb.nbytes) {
        (Some(_), Some(_)) => bytes_equal(fa, i, da, fb, j, db, options.chunk_bytes),
        _ => false,
    };
    let identical = bytes_equal && ta.ty == tb.ty && ta.ne == tb.ne;
    let elements_a: u64 = ta.ne.iter().product();
    let elements_b: u64 = tb.ne.iter().product();
    let decodable = ta.nbytes.is_some()
        && tb.nbytes.is_some()
        && kiln_quant::kernel(ta.ty).is_some()
        && kiln_quant::kernel(tb.ty).is_some();
    let skip = if !options.numeric {
        Some(NumericSkip::Disabled)
    } else if identical {
        Some(NumericSkip::Identical)
    } else if elements_a != elements_b {
        Some(NumericSkip::ElementCountDiffers)
    } else if !decodable {
        Some(NumericSkip::UnsupportedType)
    } else {
        None
    };
    let sums = match skip {
        Some(_) => Sums::default(),
        None => numeric_sums(fa, i, fb, j, elements_a, options, pool)?,
    };
    Ok((
        TensorDiff {
            name: ta.name.clone(),
            type_a: ta.ty.to_string(),
            type_b: tb.ty.to_string(),
            shape_a: ta.ne.clone(),
            shape_b: tb.ne.clone(),
            bytes_a: ta.nbytes,
            bytes_b: tb.nbytes,
            bytes_equal,
            identical,
            numeric: skip.is_none().then(|| sums.finish(elements_a)),
            numeric_skipped: skip,
        },
        sums,
    ))
}

/// Compares two tensors' bytes chunk by chunk, stopping at the first difference and releasing
/// the pages read.
fn bytes_equal(
    fa: &GgufInput,
    i: usize,
    da: &[u8],
    fb: &GgufInput,
    j: usize,
    db: &[u8],
    chunk_bytes: usize,
) -> bool {
    if da.len() != db.len() {
        return false;
    }
    let step = chunk_bytes.max(1 << 16);
    let mut start = 0;
    while start < da.len() {
        let end = (start + step).min(da.len());
        let same = da[start..end] == db[start..end];
        fa.release_range(i, start, end);
        fb.release_range(j, start, end);
        if !same {
            return false;
        }
        start = end;
    }
    true
}

/// One side of a numeric comparison.
struct Side<'a> {
    ty: GgmlType,
    data: &'a [u8],
    block: u64,
    type_size: u64,
}

impl<'a> Side<'a> {
    fn new(f: &'a GgufInput, index: usize) -> Option<Side<'a>> {
        let ty = f.tensors()[index].ty;
        Some(Side {
            ty,
            data: f.data(index),
            block: ty.block_size()?,
            type_size: ty.type_size()?,
        })
    }

    fn byte_at(&self, element: u64) -> usize {
        (element / self.block * self.type_size) as usize
    }

    fn decode(&self, start: u64, end: u64, name: &str) -> Result<Vec<f32>, PipelineError> {
        let mut out = vec![0f32; (end - start) as usize];
        let bytes = self
            .data
            .get(self.byte_at(start)..self.byte_at(end))
            .unwrap_or(&[]);
        kiln_quant::dequantize_rows(self.ty, bytes, &mut out).map_err(|source| {
            PipelineError::Quant {
                tensor: name.to_string(),
                source,
            }
        })?;
        Ok(out)
    }
}

/// Dequantizes both tensors chunk by chunk (a window of chunks in parallel) and sums their
/// differences.
fn numeric_sums(
    fa: &GgufInput,
    i: usize,
    fb: &GgufInput,
    j: usize,
    elements: u64,
    options: &DiffOptions,
    pool: &rayon::ThreadPool,
) -> Result<Sums, PipelineError> {
    let (ta, tb) = (&fa.tensors()[i], &fb.tensors()[j]);
    let name = ta.name.as_str();
    let unsupported = |ty| PipelineError::UnsupportedType {
        tensor: name.to_string(),
        ty,
    };
    let sa = Side::new(fa, i).ok_or_else(|| unsupported(ta.ty))?;
    let sb = Side::new(fb, j).ok_or_else(|| unsupported(tb.ty))?;

    // A chunk is a whole number of rows of both tensors. Each tensor's data is a flat sequence of
    // blocks (rows are whole blocks), so when two different row lengths have a very large common
    // multiple, a whole number of blocks of both types is enough.
    let budget = (options.chunk_bytes / 4).max(1) as u64;
    let row_a = ta.ne.first().copied().unwrap_or(1).max(1);
    let row_b = tb.ne.first().copied().unwrap_or(1).max(1);
    let unit = match lcm(row_a, row_b) {
        Some(u) if u <= budget.max(row_a).max(row_b) => u,
        _ => lcm(sa.block, sb.block).unwrap_or(sa.block.max(sb.block)),
    };
    let per_chunk = (budget / unit).max(1) * unit;
    let chunks: Vec<(u64, u64)> = (0..elements)
        .step_by(per_chunk as usize)
        .map(|s| (s, (s + per_chunk).min(elements)))
        .collect();
    let window = (2 * pool.current_num_threads()).max(1);
    let mut total = Sums::default();
    for group in chunks.chunks(window) {
        let results: Vec<Result<Sums, PipelineError>> = pool.install(|| {
            group
                .par_iter()
                .map(|&(start, end)| {
                    let a = sa.decode(start, end, name)?;
                    let b = sb.decode(start, end, name)?;
                    let mut s = Sums::default();
                    s.add_values(&a, &b, start);
                    Ok(s)
                })
                .collect()
        });
        for r in results {
            total.merge(&r?);
        }
        if let (Some(first), Some(last)) = (group.first(), group.last()) {
            fa.release_range(i, sa.byte_at(first.0), sa.byte_at(last.1));
            fb.release_range(j, sb.byte_at(first.0), sb.byte_at(last.1));
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_writer::{GgufLayout, GgufWriter, TensorSpec};

    fn access() -> MmapAccess {
        // SAFETY: the tests map files they wrote themselves into private temporary directories
        // (or the shipped fixture), which nothing modifies while they run.
        #[allow(unsafe_code)]
        unsafe {
            MmapAccess::new()
        }
    }

    /// A tensor to write: name, shape, type, data bytes.
    type T = (&'static str, Vec<u64>, GgmlType, Vec<u8>);

    fn f32_bytes(v: &[f32]) -> Vec<u8> {
        v.iter().flat_map(|x| x.to_le_bytes()).collect()
    }

    fn q8_0_bytes(v: &[f32], row: usize) -> Vec<u8> {
        let k = kiln_quant::kernel(GgmlType::Q8_0).unwrap();
        let mut out = vec![0u8; v.len() / 32 * k.type_size()];
        kiln_quant::quantize_rows(GgmlType::Q8_0, v, row, None, &mut out).unwrap();
        out
    }

    fn write(dir: &Path, name: &str, meta: Vec<(&str, MetaValue)>, tensors: Vec<T>) -> PathBuf {
        let path = dir.join(name);
        let layout = GgufLayout::new(
            meta.into_iter().map(|(k, v)| (k.to_string(), v)).collect(),
            tensors
                .iter()
                .map(|(n, ne, ty, _)| TensorSpec {
                    name: n.to_string(),
                    ne: ne.clone(),
                    ty: *ty,
                })
                .collect(),
            32,
        )
        .unwrap();
        let file = std::fs::File::create(&path).unwrap();
        let mut w = GgufWriter::new(file, layout).unwrap();
        for (k, (_, _, _, data)) in tensors.iter().enumerate() {
            w.write_tensor(k, data).unwrap();
        }
        w.finish().unwrap();
        path
    }

    fn values(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
            .collect()
    }

    fn base_meta() -> Vec<(&'static str, MetaValue)> {
        vec![
            ("general.architecture", MetaValue::String("llama".into())),
            ("llama.block_count", MetaValue::U32(2)),
            (
                "tokenizer.ggml.tokens",
                MetaValue::Array(MetaArray::String(vec!["a".into(), "b".into(), "c".into()])),
            ),
        ]
    }

    fn base_tensors() -> Vec<T> {
        vec![
            ("w", vec![64, 4], GgmlType::F32, f32_bytes(&values(256))),
            ("n", vec![64], GgmlType::F32, f32_bytes(&values(64))),
        ]
    }

    fn run(a: &Path, b: &Path) -> DiffReport {
        diff(a, b, &access(), &DiffOptions::default()).unwrap()
    }

    fn common<'r>(r: &'r DiffReport, name: &str) -> &'r TensorDiff {
        r.tensors.common.iter().find(|t| t.name == name).unwrap()
    }

    #[test]
    fn identical_files_are_identical() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let b = write(dir.path(), "b.gguf", base_meta(), base_tensors());
        let r = run(&a, &b);
        assert!(r.identical);
        assert!(r.metadata.changed.is_empty() && r.metadata.only_in_a.is_empty());
        assert_eq!(r.metadata.common, 3);
        assert!(!r.metadata.order_differs && !r.tensors.order_differs);
        assert_eq!(r.tensors.common.len(), 2);
        for t in &r.tensors.common {
            assert!(t.identical && t.bytes_equal);
            assert_eq!(t.numeric, None);
            assert_eq!(t.numeric_skipped, Some(NumericSkip::Identical));
        }
        assert_eq!(r.summary.tensors_identical, 2);
        assert_eq!(r.summary.elements_compared, 320);
        assert_eq!(r.summary.rmse, Some(0.0));
        assert_eq!(r.summary.max_abs, Some(0.0));
        // JSON renders.
        let json = serde_json::to_value(&r).unwrap();
        assert_eq!(json["identical"], true);
        assert_eq!(json["tensors"]["common"][0]["numeric_skipped"], "identical");
    }

    #[test]
    fn changed_metadata_value() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut meta = base_meta();
        meta[1].1 = MetaValue::U32(3);
        meta[2].1 = MetaValue::Array(MetaArray::String(vec!["a".into(), "x".into()]));
        let b = write(dir.path(), "b.gguf", meta, base_tensors());
        let r = run(&a, &b);
        assert!(!r.identical);
        assert_eq!(r.metadata.changed.len(), 2);
        let c = &r.metadata.changed[0];
        assert_eq!(c.key, "llama.block_count");
        assert!(!c.type_changed);
        assert_eq!((c.type_a.as_str(), c.type_b.as_str()), ("u32", "u32"));
        assert_eq!(
            (&c.value_a, &c.value_b),
            (&MetaValue::U32(2), &MetaValue::U32(3))
        );
        assert_eq!(c.array, None);
        let t = &r.metadata.changed[1];
        assert_eq!(t.key, "tokenizer.ggml.tokens");
        assert_eq!(t.type_a, "array[string]");
        assert_eq!(
            t.array,
            Some(ArrayDiff {
                len_a: 3,
                len_b: 2,
                first_difference: 1,
                differing: 1
            })
        );
        let json = serde_json::to_value(&r.metadata.changed[0]).unwrap();
        assert_eq!(json["value_a"], 2);
        assert_eq!(json["value_b"], 3);
        assert_eq!(r.summary.metadata_changed, 2);
        assert_eq!(r.summary.metadata_type_changed, 0);
        // Tensors are untouched.
        assert!(r.tensors.common.iter().all(|t| t.identical));
    }

    #[test]
    fn u32_versus_i32_of_the_same_number_is_a_change() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut meta = base_meta();
        meta[1].1 = MetaValue::I32(2);
        let b = write(dir.path(), "b.gguf", meta, base_tensors());
        let r = run(&a, &b);
        assert!(!r.identical);
        assert_eq!(r.metadata.changed.len(), 1);
        let c = &r.metadata.changed[0];
        assert!(c.type_changed);
        assert_eq!((c.type_a.as_str(), c.type_b.as_str()), ("u32", "i32"));
        let json = serde_json::to_value(c).unwrap();
        assert_eq!(json["value_a"], json["value_b"]);
        assert_eq!(r.summary.metadata_type_changed, 1);
    }

    #[test]
    fn added_key_and_key_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut meta = base_meta();
        meta.insert(1, ("general.name", MetaValue::String("x".into())));
        let b = write(dir.path(), "b.gguf", meta.clone(), base_tensors());
        let r = run(&a, &b);
        assert!(!r.identical);
        assert!(r.metadata.only_in_a.is_empty() && r.metadata.changed.is_empty());
        assert_eq!(r.metadata.only_in_b.len(), 1);
        assert_eq!(r.metadata.only_in_b[0].key, "general.name");
        assert_eq!(r.metadata.only_in_b[0].ty, "string");
        assert!(!r.metadata.order_differs);
        let r = run(&b, &a);
        assert_eq!(r.metadata.only_in_a.len(), 1);
        assert_eq!(r.summary.metadata_only_in_a, 1);

        meta.swap(0, 2);
        let c = write(dir.path(), "c.gguf", meta, base_tensors());
        let r = run(&b, &c);
        assert!(r.metadata.order_differs);
        assert!(r.metadata.changed.is_empty());
        assert!(!r.identical);
    }

    #[test]
    fn tensor_only_on_one_side() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut tensors = base_tensors();
        tensors.push(("extra", vec![32], GgmlType::F32, f32_bytes(&values(32))));
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        let r = run(&a, &b);
        assert!(!r.identical);
        assert!(r.tensors.only_in_a.is_empty());
        assert_eq!(r.tensors.only_in_b.len(), 1);
        let t = &r.tensors.only_in_b[0];
        assert_eq!((t.name.as_str(), t.ty.as_str()), ("extra", "F32"));
        assert_eq!((t.shape.clone(), t.bytes), (vec![32], Some(128)));
        assert_eq!(r.tensors.common.len(), 2);
        assert_eq!(r.summary.tensors_only_in_b, 1);
        assert_eq!(r.summary.tensors_identical, 2);
    }

    #[test]
    fn one_changed_f32_element() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut w = values(256);
        let old = w[130];
        w[130] = old + 0.75;
        let mut tensors = base_tensors();
        tensors[0].3 = f32_bytes(&w);
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        // Tiny chunks (one 64-element row each) exercise the chunked path and its merging.
        let options = DiffOptions {
            chunk_bytes: 1,
            threads: Some(2),
            ..DiffOptions::default()
        };
        let r = diff(&a, &b, &access(), &options).unwrap();
        assert!(!r.identical);
        let t = common(&r, "w");
        assert!(!t.bytes_equal && !t.identical);
        assert_eq!(t.numeric_skipped, None);
        let n = t.numeric.unwrap();
        let d = f64::from(old + 0.75) - f64::from(old);
        assert_eq!(n.elements, 256);
        assert_eq!(n.differing, 1);
        assert_eq!(n.non_finite, 0);
        assert_eq!(n.max_abs, d);
        assert_eq!(n.max_abs_index, 130);
        assert_eq!(n.rmse, (d * d / 256.0).sqrt());
        assert_eq!(n.mean_diff, d / 256.0);
        let a_vals = values(256);
        let rms_a = (a_vals.iter().map(|&x| f64::from(x).powi(2)).sum::<f64>() / 256.0).sqrt();
        assert!((n.rms_a - rms_a).abs() < 1e-12);
        assert!((n.relative_rmse.unwrap() - n.rmse / rms_a).abs() < 1e-12);
        assert!(n.cosine.unwrap() > 0.99 && n.cosine.unwrap() < 1.0);
        assert!(common(&r, "n").identical);
        assert_eq!(r.summary.tensors_compared, 1);
        assert_eq!(r.summary.elements_compared, 320);
        assert_eq!(r.summary.max_abs, Some(d));
        assert!((r.summary.rmse.unwrap() - (d * d / 320.0).sqrt()).abs() < 1e-15);

        // The thread count does not change a bit; the chunk size only the rounding of sums.
        let with = |threads, chunk_bytes| {
            let options = DiffOptions {
                threads: Some(threads),
                chunk_bytes,
                ..DiffOptions::default()
            };
            common(&diff(&a, &b, &access(), &options).unwrap(), "w")
                .numeric
                .unwrap()
        };
        assert_eq!(with(1, 1), n);
        assert_eq!(with(3, 1), n);
        let whole = with(1, 4 << 20);
        assert_eq!((whole.max_abs, whole.rmse, whole.differing), (d, n.rmse, 1));
        assert!((whole.rms_a - n.rms_a).abs() < 1e-12);

        // Without the numeric pass: bytes only.
        let r = diff(
            &a,
            &b,
            &access(),
            &DiffOptions {
                numeric: false,
                ..DiffOptions::default()
            },
        )
        .unwrap();
        let t = common(&r, "w");
        assert!(!t.bytes_equal);
        assert_eq!(t.numeric, None);
        assert_eq!(t.numeric_skipped, Some(NumericSkip::Disabled));
        assert_eq!((r.summary.rmse, r.summary.max_abs), (None, None));
    }

    #[test]
    fn non_finite_values_are_counted_not_summed() {
        let dir = tempfile::tempdir().unwrap();
        let mut va = values(256);
        va[3] = f32::NAN;
        va[4] = f32::INFINITY;
        let mut vb = va.clone();
        vb[4] = 1.0;
        vb[5] += 0.5;
        let mut tensors = base_tensors();
        tensors[0].3 = f32_bytes(&va);
        let a = write(dir.path(), "a.gguf", base_meta(), tensors.clone());
        tensors[0].3 = f32_bytes(&vb);
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        let n = common(&run(&a, &b), "w").numeric.unwrap();
        // NaN vs the same NaN: not a difference; inf vs 1: a difference; both left out of sums.
        assert_eq!((n.non_finite, n.differing), (2, 2));
        assert_eq!(n.max_abs, 0.5);
        assert_eq!(n.max_abs_index, 5);
        assert_eq!(n.rmse, (0.25f64 / 254.0).sqrt());
        assert!(serde_json::to_string(&n).is_ok());
    }

    #[test]
    fn f32_versus_q8_0_of_the_same_values() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut tensors = base_tensors();
        tensors[0].2 = GgmlType::Q8_0;
        tensors[0].3 = q8_0_bytes(&values(256), 64);
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        let r = run(&a, &b);
        assert!(!r.identical);
        let t = common(&r, "w");
        assert_eq!((t.type_a.as_str(), t.type_b.as_str()), ("F32", "Q8_0"));
        assert_eq!((t.bytes_a, t.bytes_b), (Some(1024), Some(8 * 34)));
        assert!(!t.bytes_equal && !t.identical);
        let n = t.numeric.unwrap();
        assert!(n.rmse > 0.0 && n.max_abs > 0.0);
        assert!(n.relative_rmse.unwrap() < 0.01, "{n:?}");
        // Q8_0 rounds to half a step of max|x|/127 per block (plus the f16 rounding of the scale).
        assert!(n.max_abs <= 2.0 / 127.0, "{n:?}");
        assert!(n.cosine.unwrap() > 0.9999);
        assert_eq!(r.summary.tensors_type_changed, 1);
    }

    #[test]
    fn shape_mismatch_skips_numeric() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut tensors = base_tensors();
        tensors[0].1 = vec![64, 3];
        tensors[0].3 = f32_bytes(&values(192));
        // Same element count, other row length: compared element by element in storage order.
        tensors[1].1 = vec![32, 2];
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        let r = run(&a, &b);
        let t = common(&r, "w");
        assert_eq!(
            (t.shape_a.clone(), t.shape_b.clone()),
            (vec![64, 4], vec![64, 3])
        );
        assert!(!t.bytes_equal);
        assert_eq!(t.numeric, None);
        assert_eq!(t.numeric_skipped, Some(NumericSkip::ElementCountDiffers));
        let n = common(&r, "n");
        assert!(n.bytes_equal && !n.identical);
        let num = n.numeric.unwrap();
        assert_eq!((num.elements, num.differing, num.rmse), (64, 0, 0.0));
        assert_eq!(r.summary.tensors_shape_changed, 2);
    }

    #[test]
    fn tensor_order_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.gguf", base_meta(), base_tensors());
        let mut tensors = base_tensors();
        tensors.reverse();
        let b = write(dir.path(), "b.gguf", base_meta(), tensors);
        let r = run(&a, &b);
        assert!(r.tensors.order_differs);
        assert!(r.tensors.common.iter().all(|t| t.identical));
        assert_eq!(r.tensors.common[0].name, "w");
        assert!(!r.identical);
    }

    #[test]
    fn tiny_llama_f16_versus_q8_0() {
        use crate::{build, plan, BuildOptions, Recipe};
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        let input = root.join("fixtures/tiny-llama");
        let dir = tempfile::tempdir().unwrap();
        let convert = |ty: &str| {
            let out = dir.path().join(format!("tiny-llama-{ty}.gguf"));
            let text = format!(
                "kiln = 1\n[input]\npath = {input:?}\n[output]\npath = {out:?}\n[quantize]\ndefault = \"{ty}\"\n"
            );
            let recipe = Recipe::from_toml(&text, Path::new(".")).unwrap();
            let plan = plan(&recipe, &access()).unwrap();
            build(&plan, &BuildOptions::default(), &()).unwrap();
            out
        };
        let f16 = convert("f16");
        let q8 = convert("q8_0");
        let r = run(&f16, &q8);
        assert!(!r.identical);
        assert!(r.tensors.only_in_a.is_empty() && r.tensors.only_in_b.is_empty());
        assert!(!r.tensors.order_differs);
        assert!(r.metadata.only_in_a.is_empty() && r.metadata.only_in_b.is_empty());
        let ft = r
            .metadata
            .changed
            .iter()
            .find(|c| c.key == "general.file_type")
            .expect("general.file_type changed");
        assert_eq!(
            (&ft.value_a, &ft.value_b),
            (&MetaValue::U32(1), &MetaValue::U32(7))
        );
        let mut quantized = 0;
        for t in &r.tensors.common {
            assert_eq!(t.shape_a, t.shape_b, "{}", t.name);
            if t.shape_a.len() == 2 && t.type_a != t.type_b {
                assert_eq!((t.type_a.as_str(), t.type_b.as_str()), ("F16", "Q8_0"));
                let n = t
                    .numeric
                    .unwrap_or_else(|| panic!("{}: no numeric diff", t.name));
                assert!(n.rmse > 0.0, "{}", t.name);
                assert!(n.relative_rmse.unwrap() < 0.02, "{}: {n:?}", t.name);
                assert!(n.cosine.unwrap() > 0.999, "{}: {n:?}", t.name);
                quantized += 1;
            } else {
                // Norms (pinned to F32) and rows Q8_0 cannot hold are the same in both.
                assert!(t.identical, "{}", t.name);
            }
        }
        assert!(quantized > 0);
        assert_eq!(r.summary.tensors_compared, quantized);
        let rmse = r.summary.rmse.unwrap();
        assert!(rmse > 0.0 && rmse < 1e-2, "{rmse}");
    }
}
