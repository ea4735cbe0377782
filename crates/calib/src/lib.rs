//! Calibration statistics (importance matrices), kept in mergeable form.
//!
//! An importance matrix records, for every input column of a linear layer (per expert, for
//! mixture-of-experts weights), the sum of squared activations seen during calibration and how many
//! activation rows contributed. kiln keeps these as **sums and counts, never means**, so that
//! statistics from several calibration runs merge exactly ([`Imatrix::merge`]); consumers divide
//! only when they read, through [`ImatrixEntry::quant_weights`] / [`Imatrix::quant_weights`], which
//! reproduce llama-quantize's division bit for bit. Entries are kept in a `BTreeMap` keyed by tensor
//! name, so nothing depends on hash order.
//!
//! # Where the statistics come from
//!
//! llama.cpp's `llama-imatrix` writes two formats (read by `kiln_reader::imatrix`):
//!
//! - **GGUF** (the default): per weight, `<name>.in_sum2` (F32, `ne = [columns, n_mat]`: raw
//!   `Σ x²` per column and matrix) and `<name>.counts` (F32, `ne = [1, n_mat]`: tokens per matrix),
//!   plus the metadata keys in [`keys`]. kiln stores the sums as read and the counts rounded with
//!   `lround`, as llama.cpp's loader does ([`ImatrixFormat::Gguf`]).
//! - **Legacy `.dat`**: per weight a name, `ncall` and `nval` values, each value being
//!   `(Σ x² / count) · ncall` rounded to f32, with `ncall = ⌈max count / chunk size⌉`; an optional
//!   trailer holds the chunk count and one dataset name. kiln stores the values as the "sums" and
//!   `ncall` as the single count ([`ImatrixFormat::Legacy`]). The file does not say how many experts
//!   a value vector covers, so a legacy entry is always one matrix of `nval` columns; that is also
//!   how llama-quantize treats it (it divides the whole vector by `ncall`).
//!
//! The two formats carry the same information in different units (tokens vs. chunks), so an
//! [`Imatrix`] remembers its [`ImatrixFormat`], and imatrices of different formats do not merge.
//!
//! # Arithmetic (llama-quantize's `load_imatrix`, `tools/quantize/quantize.cpp`)
//!
//! All in IEEE binary32, one division per value, no other rounding step:
//!
//! - GGUF: `count_j = (float) lround(counts_f32[j])`; for matrix `j`,
//!   `w[j·columns + i] = in_sum2[j·columns + i] / count_j` if `count_j > 0`, else `1.0` for the whole
//!   slice (an expert that never saw a token).
//! - Legacy: `w[i] = stored[i] / (float) ncall` if `ncall > 0`, else `stored[i]` unchanged.
//!
//! The result is the mean squared activation per input column (per expert), which llama-quantize
//! hands to ggml as `quant_weights`. For a 3-D (expert) weight, row `r` uses the slice starting at
//! `(r / ne[1]) · ne[0]`. llama-quantize aborts when a weight it uses is not finite and when the
//! entry's length is not `ne[0] · ne[2]` of the tensor (except for `token_embd.weight`); those checks
//! belong to the caller, which knows the tensor.
//!
//! # Filtering and lookup
//!
//! [`Imatrix::filter_entries`] implements llama-quantize's `--include-weights` /
//! `--exclude-weights` (substring match on entry names; the two are mutually exclusive).
//! [`Imatrix::lookup`] finds an entry by a tensor's GGUF name (what `llama-imatrix` records) or,
//! failing that, its Hugging Face name.

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod activations;
pub mod capture;
mod imatrix;

pub use activations::{ActivationStats, ActivationsError, HistogramSpec, ModuleStats};
pub use imatrix::{Imatrix, ImatrixEntry, ImatrixFormat};

/// Version of kiln's calibration-statistics representation (the meaning of [`ImatrixEntry`]'s sums
/// and counts and of [`ImatrixFormat`]). kiln's own statistics files will record it; it changes
/// whenever a stored statistic changes meaning.
pub const FORMAT_VERSION: u32 = 1;

/// Names of the keys and tensor suffixes in llama.cpp's GGUF importance matrices, and of the keys
/// llama-quantize adds to a model quantized with one.
pub mod keys {
    /// `general.type` of a GGUF imatrix file (value [`GENERAL_TYPE_IMATRIX`]).
    pub const GENERAL_TYPE: &str = "general.type";
    /// The value of [`GENERAL_TYPE`] in an imatrix file.
    pub const GENERAL_TYPE_IMATRIX: &str = "imatrix";
    /// Array of strings: the calibration datasets (earlier merged files first, then the prompt file).
    pub const DATASETS: &str = "imatrix.datasets";
    /// `u32`: number of chunks the statistics were computed on.
    pub const CHUNK_COUNT: &str = "imatrix.chunk_count";
    /// `u32`: tokens per chunk (`n_ctx / n_parallel`).
    pub const CHUNK_SIZE: &str = "imatrix.chunk_size";
    /// Suffix of the per-column sums of squared activations (`<weight name>.in_sum2`).
    pub const SUFFIX_IN_SUM2: &str = ".in_sum2";
    /// Suffix of the per-matrix token counts (`<weight name>.counts`).
    pub const SUFFIX_COUNTS: &str = ".counts";
    /// Model key written by llama-quantize: the imatrix file name (string, at most 127 bytes).
    pub const QUANTIZE_IMATRIX_FILE: &str = "quantize.imatrix.file";
    /// Model key written by llama-quantize: the first dataset, if any (string).
    pub const QUANTIZE_IMATRIX_DATASET: &str = "quantize.imatrix.dataset";
    /// Model key written by llama-quantize: entries left after filtering (`u32`).
    pub const QUANTIZE_IMATRIX_ENTRIES_COUNT: &str = "quantize.imatrix.entries_count";
    /// Model key written by llama-quantize: the chunk count, when positive (`u32`).
    pub const QUANTIZE_IMATRIX_CHUNKS_COUNT: &str = "quantize.imatrix.chunks_count";
}

/// Why statistics cannot be built or combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CalibError {
    /// Sums and counts do not describe `matrices × columns` values with at least one of each.
    #[error("{sums} sums and {counts} counts do not form matrices of {columns} columns")]
    InvalidShape {
        /// Columns per matrix.
        columns: usize,
        /// Number of sums given.
        sums: usize,
        /// Number of counts (matrices) given.
        counts: usize,
    },
    /// A row of activations does not fit the entry.
    #[error("row of {len} values for matrix {matrix}: the entry has {matrices} matrices of {columns} columns")]
    RowMismatch {
        /// The matrix (expert) the row was meant for.
        matrix: usize,
        /// Matrices in the entry.
        matrices: usize,
        /// Columns per matrix.
        columns: usize,
        /// Length of the row.
        len: usize,
    },
    /// Two statistics for the same tensor have different column counts.
    #[error("tensor `{tensor}`: {left} columns vs {right}")]
    ColumnMismatch {
        /// The tensor.
        tensor: String,
        /// Columns on one side.
        left: usize,
        /// Columns on the other.
        right: usize,
    },
    /// Two statistics for the same tensor have different numbers of matrices (experts).
    #[error("tensor `{tensor}`: {left} matrices vs {right}")]
    MatrixMismatch {
        /// The tensor.
        tensor: String,
        /// Matrices on one side.
        left: usize,
        /// Matrices on the other.
        right: usize,
    },
    /// The two importance matrices come from different formats (their counts have different units).
    #[error("cannot merge a {left:?} importance matrix with a {right:?} one")]
    FormatMismatch {
        /// Format of the matrix merged into.
        left: ImatrixFormat,
        /// Format of the other.
        right: ImatrixFormat,
    },
    /// The two importance matrices were computed with different chunk sizes.
    #[error("cannot merge importance matrices computed with chunk sizes {left} and {right}")]
    ChunkSizeMismatch {
        /// Chunk size of the matrix merged into.
        left: u32,
        /// Chunk size of the other.
        right: u32,
    },
    /// A count would overflow.
    #[error("{what}: count overflows")]
    CountOverflow {
        /// What was being counted (a tensor name, or `"chunk count"`).
        what: String,
    },
    /// `--include-weights` and `--exclude-weights` were both given.
    #[error("include and exclude filters cannot be used together")]
    IncludeAndExclude,
}
