//! [`ActivationStats`]: kiln's own activation-statistics file, per linear layer input.
//!
//! For every linear layer (keyed by its Hugging Face module name, `model.layers.0.self_attn.q_proj`)
//! the statistics describe that layer's **input** `X` (one row per token, `cols` = the layer's
//! input features), kept as sums so that files merge ([`ActivationStats::merge`]):
//!
//! | statistic | type | meaning |
//! |---|---|---|
//! | `count` | `u64` | rows (tokens) seen |
//! | `sum_sq` | `f64` per column | `Σ x²`, the importance-matrix quantity ([`ActivationStats::to_imatrix`]) |
//! | `sum` | `f64` per column | `Σ x` |
//! | `min`, `max` | `f32` per column | extremes (`+∞` / `-∞` while `count = 0`) |
//! | `gram` (optional) | `f64`, `cols × cols` row-major | `XᵀX`, the Hessian GPTQ needs (up to a factor `2/n`) |
//! | histogram (optional) | `u64` per bin | `|x|` over `[0, max)` in `bins` equal bins, fixed at creation |
//!
//! # Accumulation order
//!
//! Statistics grow by **batches** (a calibration chunk): [`ModuleStats::add_rows`] first forms
//! the batch's partial sums, each column's (and each Gram entry's) summed over the batch's rows
//! in row order starting from zero, products and squares formed in `f64` from the `f32` inputs
//! (exactly: a product of two `f32` fits in an `f64`); the partial is then added to the running
//! totals, one addition per value. Merging two statistics ([`ModuleStats::merge`]) is the same
//! addition. Consequences:
//!
//! - A capture run over chunks `c₀, c₁, …` is the left fold `((0 + p₀) + p₁) + …` of per-chunk
//!   partials. Merging the file of chunks `c₀..cₖ` with the file of chunk `cₖ` alone gives **the
//!   same bits** as one run over `c₀..=cₖ`; merging single-chunk files in chunk order reproduces a
//!   whole run bit for bit.
//! - Merging a file of several chunks into another adds partial sums grouped differently; the
//!   result equals the single run up to `f64` rounding (about `1e-16` relative per addition), not
//!   bit for bit, because floating-point addition is not associative. Counts, minima, maxima and
//!   histograms are integers or order-free and always merge exactly.
//! - Nothing depends on threads: a capture computes each chunk's partial on one thread and folds
//!   the partials in chunk order.
//!
//! # Shared inputs (aliases)
//!
//! Several layers can read the same tensor: in a Llama block `q_proj`, `k_proj` and `v_proj` all
//! read the attention norm's output, `gate_proj` and `up_proj` the MLP norm's. Their statistics
//! are identical, so they are stored once, under the first module (`q_proj`, `gate_proj`), and the
//! others are **aliases** ([`ActivationStats::aliases`]); [`ActivationStats::get`] resolves them,
//! and [`ActivationStats::names`] lists every module, aliases included. This keeps the Gram
//! matrices, by far the largest part of the file, from being stored three times.
//!
//! # File format (safetensors)
//!
//! [`ActivationStats::to_safetensors`] writes an ordinary safetensors file (little-endian, data
//! laid out by the `safetensors` crate: 8-byte types first, then by name), one tensor per
//! statistic, named `{module}.{statistic}`:
//!
//! | tensor | dtype | shape |
//! |---|---|---|
//! | `{module}.count` | I64 | `[1]` |
//! | `{module}.sum_sq` | F64 | `[cols]` |
//! | `{module}.sum` | F64 | `[cols]` |
//! | `{module}.min` | F32 | `[cols]` |
//! | `{module}.max` | F32 | `[cols]` |
//! | `{module}.gram` (optional) | F64 | `[cols, cols]` |
//! | `{module}.hist` (optional) | I64 | `[bins]` |
//! | `{module}.hist_max` (with `hist`) | F32 | `[1]` |
//!
//! Only canonical modules have tensors. `__metadata__` holds strings, in this order:
//! `format` = [`FORMAT_NAME`], `format_version` = [`crate::FORMAT_VERSION`], `chunk_size`
//! (tokens per chunk, omitted when unknown), `chunk_count`, `datasets` (a JSON array of strings)
//! and `aliases` (a JSON object, alias → module). The JSON header is written in a fixed order
//! (the `safetensors` crate's serializer emits `__metadata__` from a hash map, whose order changes
//! from run to run), so equal statistics always give equal bytes.
//!
//! The Gram matrix is stored as F64, not F32: reading a file back must give exactly the sums that
//! were written, so that merging files equals merging in memory. It is the full symmetric matrix
//! (not a triangle), so any safetensors reader can use it as it is.

use std::collections::BTreeMap;

use safetensors::tensor::{Dtype, SafeTensorError, SafeTensors, TensorView};

use crate::{CalibError, Imatrix, ImatrixEntry, ImatrixFormat};

/// The `format` value in a kiln activation-statistics file's `__metadata__`.
pub const FORMAT_NAME: &str = "kiln.activation-stats";

/// Why activation statistics cannot be built, combined, written or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ActivationsError {
    /// A module with no input columns.
    #[error("module `{module}`: statistics need at least one column")]
    NoColumns {
        /// The module.
        module: String,
    },
    /// A histogram specification that cannot hold values.
    #[error("histogram of {bins} bins over [0, {max}): need at least one bin and a finite positive range")]
    InvalidHistogram {
        /// Bins asked for.
        bins: usize,
        /// Upper end of the range.
        max: f32,
    },
    /// A batch of rows whose length is not a multiple of the columns.
    #[error("module `{module}`: {len} values are not whole rows of {cols} columns")]
    RowLength {
        /// The module.
        module: String,
        /// Values given.
        len: usize,
        /// Columns per row.
        cols: usize,
    },
    /// Two statistics of one module have different column counts.
    #[error("module `{module}`: {left} columns vs {right}")]
    ColumnMismatch {
        /// The module.
        module: String,
        /// Columns on one side.
        left: usize,
        /// Columns on the other.
        right: usize,
    },
    /// One side has a Gram matrix and the other has none.
    #[error("module `{module}`: only one side has a Gram matrix")]
    GramMismatch {
        /// The module.
        module: String,
    },
    /// The histograms differ in presence, bin count or range.
    #[error("module `{module}`: histograms {left:?} and {right:?} do not match")]
    HistogramMismatch {
        /// The module.
        module: String,
        /// One side's histogram (`None`: no histogram).
        left: Option<HistogramSpec>,
        /// The other side's.
        right: Option<HistogramSpec>,
    },
    /// A name is an alias on one side and a module (or an alias of another module) on the other.
    #[error("`{name}` is {left} on one side and {right} on the other")]
    AliasMismatch {
        /// The name.
        name: String,
        /// What it is on the side merged into.
        left: String,
        /// What it is on the other side.
        right: String,
    },
    /// An alias names a module that has no statistics, or a name is both alias and module.
    #[error("alias `{alias}` → `{target}`: {problem}")]
    BadAlias {
        /// The alias.
        alias: String,
        /// Its target.
        target: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// The statistics were collected with different chunk sizes.
    #[error("cannot merge statistics of chunk sizes {left} and {right}")]
    ChunkSizeMismatch {
        /// Chunk size of the side merged into.
        left: u32,
        /// Chunk size of the other.
        right: u32,
    },
    /// A count would overflow.
    #[error("{what}: count overflows")]
    CountOverflow {
        /// What was counted.
        what: String,
    },
    /// The bytes are not a valid safetensors file.
    #[error("not a valid safetensors file: {source}")]
    Safetensors {
        /// What the `safetensors` crate found.
        #[source]
        source: SafeTensorError,
    },
    /// The safetensors file is not a kiln activation-statistics file of a version this code reads.
    #[error("not a kiln activation-statistics file: {problem}")]
    Format {
        /// What is wrong.
        problem: String,
    },
    /// A tensor of the file has the wrong dtype, shape or value, or an unknown name.
    #[error("tensor `{tensor}`: {problem}")]
    BadTensor {
        /// The tensor.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// A module lacks one of the statistics every module has.
    #[error("tensor `{tensor}` is missing")]
    MissingTensor {
        /// The tensor that should be there.
        tensor: String,
    },
}

/// A histogram's bins: `bins` equal bins of `|x|` over `[0, max)`. Values at or above `max` count
/// in the last bin (the per-column maxima say how far they went); non-finite values are not
/// counted. Fixed when the statistics are created, so that histograms of different runs merge.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct HistogramSpec {
    /// Number of bins (at least 1).
    pub bins: usize,
    /// Upper end of the range (finite, positive).
    pub max: f32,
}

impl HistogramSpec {
    /// Checks that the range and bin count are usable.
    pub fn validate(&self) -> Result<(), ActivationsError> {
        if self.bins == 0 || !self.max.is_finite() || self.max <= 0.0 {
            return Err(ActivationsError::InvalidHistogram {
                bins: self.bins,
                max: self.max,
            });
        }
        Ok(())
    }

    /// The bin of `|x|` (`None` for a non-finite `x`). Computed in `f64` as
    /// `floor(|x| · bins / max)`, clamped to the last bin.
    pub fn bin(&self, x: f32) -> Option<usize> {
        if !x.is_finite() {
            return None;
        }
        let pos = f64::from(x.abs()) * self.bins as f64 / f64::from(self.max);
        // `as usize` saturates; a finite non-negative `pos` floors.
        Some((pos as usize).min(self.bins - 1))
    }

    /// Lower edge of bin `i` (`i · max / bins`).
    pub fn edge(&self, i: usize) -> f64 {
        i as f64 * f64::from(self.max) / self.bins as f64
    }
}

/// A histogram of `|x|` over a fixed range.
#[derive(Debug, Clone, PartialEq)]
pub struct Histogram {
    spec: HistogramSpec,
    counts: Vec<u64>,
}

impl Histogram {
    /// An empty histogram.
    pub fn new(spec: HistogramSpec) -> Result<Histogram, ActivationsError> {
        spec.validate()?;
        Ok(Histogram {
            spec,
            counts: vec![0; spec.bins],
        })
    }

    /// Bin count and range.
    pub fn spec(&self) -> HistogramSpec {
        self.spec
    }

    /// Values per bin.
    pub fn counts(&self) -> &[u64] {
        &self.counts
    }
}

/// The statistics of one linear layer's input (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct ModuleStats {
    cols: usize,
    count: u64,
    sum_sq: Vec<f64>,
    sum: Vec<f64>,
    min: Vec<f32>,
    max: Vec<f32>,
    gram: Option<Vec<f64>>,
    histogram: Option<Histogram>,
}

impl ModuleStats {
    /// Empty statistics for an input of `cols` columns, with a Gram matrix if `gram` and a
    /// histogram if `histogram` is given.
    pub fn new(
        cols: usize,
        gram: bool,
        histogram: Option<HistogramSpec>,
    ) -> Result<ModuleStats, ActivationsError> {
        if cols == 0 {
            return Err(ActivationsError::NoColumns {
                module: String::new(),
            });
        }
        let gram = if gram {
            let n = cols
                .checked_mul(cols)
                .ok_or_else(|| ActivationsError::CountOverflow {
                    what: format!("Gram matrix of {cols} columns"),
                })?;
            Some(vec![0.0; n])
        } else {
            None
        };
        Ok(ModuleStats {
            cols,
            count: 0,
            sum_sq: vec![0.0; cols],
            sum: vec![0.0; cols],
            min: vec![f32::INFINITY; cols],
            max: vec![f32::NEG_INFINITY; cols],
            gram,
            histogram: histogram.map(Histogram::new).transpose()?,
        })
    }

    /// The statistics of one batch of rows (`rows.len() / cols` rows, row-major): the batch
    /// partial that [`ModuleStats::add_rows`] adds. Single-threaded, in row order.
    pub fn from_rows(
        rows: &[f32],
        cols: usize,
        gram: bool,
        histogram: Option<HistogramSpec>,
    ) -> Result<ModuleStats, ActivationsError> {
        let mut s = ModuleStats::new(cols, gram, histogram)?;
        if rows.len() % cols != 0 {
            return Err(ActivationsError::RowLength {
                module: String::new(),
                len: rows.len(),
                cols,
            });
        }
        let n = rows.len() / cols;
        s.count = n as u64;
        for row in rows.chunks_exact(cols) {
            for (c, &x) in row.iter().enumerate() {
                let xd = f64::from(x);
                s.sum[c] += xd;
                s.sum_sq[c] += xd * xd;
                // `f32::min`/`max` ignore NaN, so one NaN does not hide the finite extremes.
                s.min[c] = s.min[c].min(x);
                s.max[c] = s.max[c].max(x);
            }
        }
        if let Some(h) = &mut s.histogram {
            for &x in rows {
                if let Some(b) = h.spec.bin(x) {
                    h.counts[b] += 1;
                }
            }
        }
        if let Some(g) = &mut s.gram {
            gram_upper(rows, n, cols, g);
            mirror_upper(g, cols);
        }
        Ok(s)
    }

    /// Adds one batch of rows: its partial statistics ([`ModuleStats::from_rows`]) are formed
    /// first, then added to the totals.
    pub fn add_rows(&mut self, rows: &[f32]) -> Result<(), ActivationsError> {
        let partial = ModuleStats::from_rows(
            rows,
            self.cols,
            self.gram.is_some(),
            self.histogram.as_ref().map(|h| h.spec),
        )?;
        self.merge_named("", &partial)
    }

    /// Adds `other`'s statistics: sums, counts and Gram entries by addition, extremes by min/max,
    /// histogram bins by addition. Fails, changing nothing, when the columns, the Gram matrix's
    /// presence or the histograms differ, or a count would overflow.
    pub fn merge(&mut self, other: &ModuleStats) -> Result<(), ActivationsError> {
        self.merge_named("", other)
    }

    fn check_merge(&self, module: &str, other: &ModuleStats) -> Result<(), ActivationsError> {
        if self.cols != other.cols {
            return Err(ActivationsError::ColumnMismatch {
                module: module.to_owned(),
                left: self.cols,
                right: other.cols,
            });
        }
        if self.gram.is_some() != other.gram.is_some() {
            return Err(ActivationsError::GramMismatch {
                module: module.to_owned(),
            });
        }
        let (l, r) = (self.histogram_spec(), other.histogram_spec());
        if l != r {
            return Err(ActivationsError::HistogramMismatch {
                module: module.to_owned(),
                left: l,
                right: r,
            });
        }
        let overflow = || ActivationsError::CountOverflow {
            what: format!("module `{module}`"),
        };
        self.count.checked_add(other.count).ok_or_else(overflow)?;
        if let (Some(a), Some(b)) = (&self.histogram, &other.histogram) {
            if a.counts
                .iter()
                .zip(&b.counts)
                .any(|(x, y)| x.checked_add(*y).is_none())
            {
                return Err(overflow());
            }
        }
        Ok(())
    }

    /// Adds `other` after [`ModuleStats::check_merge`] (`module` names it in errors).
    fn merge_named(&mut self, module: &str, other: &ModuleStats) -> Result<(), ActivationsError> {
        self.check_merge(module, other)?;
        self.add_checked(other);
        Ok(())
    }

    fn add_checked(&mut self, other: &ModuleStats) {
        self.count = self.count.saturating_add(other.count);
        for (a, b) in self.sum_sq.iter_mut().zip(&other.sum_sq) {
            *a += b;
        }
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        for (a, b) in self.min.iter_mut().zip(&other.min) {
            *a = a.min(*b);
        }
        for (a, b) in self.max.iter_mut().zip(&other.max) {
            *a = a.max(*b);
        }
        if let (Some(a), Some(b)) = (&mut self.gram, &other.gram) {
            for (x, y) in a.iter_mut().zip(b) {
                *x += y;
            }
        }
        if let (Some(a), Some(b)) = (&mut self.histogram, &other.histogram) {
            for (x, y) in a.counts.iter_mut().zip(&b.counts) {
                *x = x.saturating_add(*y);
            }
        }
    }

    /// Input columns.
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Rows (tokens) seen.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// `Σ x²` per column.
    pub fn sum_sq(&self) -> &[f64] {
        &self.sum_sq
    }

    /// `Σ x` per column.
    pub fn sum(&self) -> &[f64] {
        &self.sum
    }

    /// Smallest value per column (`+∞` before any row).
    pub fn min(&self) -> &[f32] {
        &self.min
    }

    /// Largest value per column (`-∞` before any row).
    pub fn max(&self) -> &[f32] {
        &self.max
    }

    /// `XᵀX`, `cols × cols` row-major (symmetric), if collected.
    pub fn gram(&self) -> Option<&[f64]> {
        self.gram.as_deref()
    }

    /// The histogram of `|x|`, if collected.
    pub fn histogram(&self) -> Option<&Histogram> {
        self.histogram.as_ref()
    }

    /// The histogram's bins and range, if there is one.
    pub fn histogram_spec(&self) -> Option<HistogramSpec> {
        self.histogram.as_ref().map(|h| h.spec)
    }

    /// Mean of `x²` per column (`sum_sq / count`, all zeros before any row).
    pub fn mean_sq(&self) -> Vec<f64> {
        let n = self.count as f64;
        self.sum_sq
            .iter()
            .map(|s| if self.count > 0 { s / n } else { 0.0 })
            .collect()
    }
}

/// Upper triangle (`j ≥ i`) of `XᵀX` added into `g` (`cols × cols`, row-major), each entry summed
/// over the rows in row order from its current value; products in `f64` (exact for `f32` inputs).
///
/// Tiles of 4 × 4 entries keep 16 independent sums in registers while the rows stream past; the
/// order of additions into each entry is the same as the plain triple loop's, so tiling never
/// changes a bit (a test compares with [`gram_upper_ref`]).
fn gram_upper(x: &[f32], rows: usize, cols: usize, g: &mut [f64]) {
    // 3 × 8 sums (12 SSE2 registers) stay in registers while the rows stream past; measured the
    // fastest shape on x86-64's baseline instruction set.
    const TI: usize = 3;
    const TJ: usize = 8;
    let xd: Vec<f64> = x[..rows * cols].iter().map(|&v| f64::from(v)).collect();
    let mut i0 = 0;
    while i0 < cols {
        let ih = TI.min(cols - i0);
        // Column tiles are aligned to the right edge, so all of them are full; the first one may
        // start left of the diagonal (those entries are overwritten by `mirror_upper`).
        let first = i0.checked_sub((TJ - (cols - i0) % TJ) % TJ);
        match first {
            Some(mut j0) if ih == TI => {
                while j0 < cols {
                    let mut acc = [[0.0f64; TJ]; TI];
                    for (a, row) in acc.iter_mut().enumerate() {
                        row.copy_from_slice(&g[(i0 + a) * cols + j0..(i0 + a) * cols + j0 + TJ]);
                    }
                    for r in xd.chunks_exact(cols) {
                        let (Some(xi), Some(xj)) = (r.get(i0..i0 + TI), r.get(j0..j0 + TJ)) else {
                            continue;
                        };
                        for a in 0..TI {
                            for b in 0..TJ {
                                acc[a][b] += xi[a] * xj[b];
                            }
                        }
                    }
                    for (a, row) in acc.iter().enumerate() {
                        g[(i0 + a) * cols + j0..(i0 + a) * cols + j0 + TJ].copy_from_slice(row);
                    }
                    j0 += TJ;
                }
            }
            // The last rows (fewer than TI), or a matrix narrower than a tile: plain loops, in
            // the same order.
            _ => {
                for i in i0..i0 + ih {
                    for j in i..cols {
                        let mut acc = g[i * cols + j];
                        for r in xd.chunks_exact(cols) {
                            acc += r[i] * r[j];
                        }
                        g[i * cols + j] = acc;
                    }
                }
            }
        }
        i0 += ih;
    }
}

/// The plain triple loop [`gram_upper`] must agree with bit for bit.
#[cfg(test)]
fn gram_upper_ref(x: &[f32], rows: usize, cols: usize, g: &mut [f64]) {
    for i in 0..cols {
        for j in i..cols {
            for r in 0..rows {
                g[i * cols + j] += f64::from(x[r * cols + i]) * f64::from(x[r * cols + j]);
            }
        }
    }
}

/// Copies the upper triangle onto the lower one (a tile on the diagonal also computed some lower
/// entries; the copy makes the matrix exactly symmetric).
fn mirror_upper(g: &mut [f64], cols: usize) {
    for i in 0..cols {
        for j in 0..i {
            g[i * cols + j] = g[j * cols + i];
        }
    }
}

/// Activation statistics of a model: one [`ModuleStats`] per linear layer input, aliases for
/// layers that share an input, and what the calibration data was.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ActivationStats {
    modules: BTreeMap<String, ModuleStats>,
    aliases: BTreeMap<String, String>,
    /// Tokens per chunk (the context length of the capture), if known.
    pub chunk_size: Option<u32>,
    /// Chunks the statistics were collected on.
    pub chunk_count: u64,
    /// Names of the calibration datasets, earlier merged files first.
    pub datasets: Vec<String>,
}

impl ActivationStats {
    /// No statistics.
    pub fn new() -> ActivationStats {
        ActivationStats::default()
    }

    /// Adds (or replaces) the statistics of module `name`. Fails when `name` is an alias.
    pub fn insert(&mut self, name: &str, stats: ModuleStats) -> Result<(), ActivationsError> {
        if let Some(target) = self.aliases.get(name) {
            return Err(ActivationsError::BadAlias {
                alias: name.to_owned(),
                target: target.clone(),
                problem: "the name is already an alias",
            });
        }
        self.modules.insert(name.to_owned(), stats);
        Ok(())
    }

    /// Records that module `alias` reads the same input as module `target`, which must have
    /// statistics of its own (aliases do not chain).
    pub fn add_alias(&mut self, alias: &str, target: &str) -> Result<(), ActivationsError> {
        let bad = |problem| ActivationsError::BadAlias {
            alias: alias.to_owned(),
            target: target.to_owned(),
            problem,
        };
        if !self.modules.contains_key(target) {
            return Err(bad("the target has no statistics"));
        }
        if self.modules.contains_key(alias) {
            return Err(bad("the alias has statistics of its own"));
        }
        self.aliases.insert(alias.to_owned(), target.to_owned());
        Ok(())
    }

    /// The statistics of module `name`, following an alias.
    pub fn get(&self, name: &str) -> Option<&ModuleStats> {
        let name = self.aliases.get(name).map_or(name, String::as_str);
        self.modules.get(name)
    }

    /// Mutable statistics of module `name`, following an alias.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut ModuleStats> {
        let name = self.aliases.get(name).map_or(name, String::as_str);
        self.modules.get_mut(name)
    }

    /// The modules that have statistics of their own, by name.
    pub fn modules(&self) -> &BTreeMap<String, ModuleStats> {
        &self.modules
    }

    /// Alias → module it shares statistics with.
    pub fn aliases(&self) -> &BTreeMap<String, String> {
        &self.aliases
    }

    /// Every module name, aliases included, in byte order.
    pub fn names(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self
            .modules
            .keys()
            .chain(self.aliases.keys())
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all
    }

    /// Whether there are no statistics.
    pub fn is_empty(&self) -> bool {
        self.modules.is_empty()
    }

    /// Adds `other`: each module's statistics as [`ModuleStats::merge`] adds them, modules only
    /// `other` has are copied (with their aliases), chunk counts added, datasets concatenated
    /// (`self`'s first); the chunk size is kept, or becomes `None` if either side lacks it.
    ///
    /// Fails, changing nothing, when a module present on both sides does not merge, when a name
    /// is an alias on one side and not the same alias on the other, when the chunk sizes differ,
    /// or when a count would overflow.
    pub fn merge(&mut self, other: &ActivationStats) -> Result<(), ActivationsError> {
        let chunk_size = match (self.chunk_size, other.chunk_size) {
            (Some(left), Some(right)) if left != right => {
                return Err(ActivationsError::ChunkSizeMismatch { left, right })
            }
            (Some(s), Some(_)) => Some(s),
            _ => None,
        };
        let chunk_count = self
            .chunk_count
            .checked_add(other.chunk_count)
            .ok_or_else(|| ActivationsError::CountOverflow {
                what: "chunk count".into(),
            })?;
        let describe = |s: &ActivationStats, name: &str| -> Option<String> {
            if s.modules.contains_key(name) {
                Some("a module".into())
            } else {
                s.aliases.get(name).map(|t| format!("an alias of `{t}`"))
            }
        };
        for name in other.modules.keys().chain(other.aliases.keys()) {
            if let (Some(left), Some(right)) = (describe(self, name), describe(other, name)) {
                if left != right {
                    return Err(ActivationsError::AliasMismatch {
                        name: name.clone(),
                        left,
                        right,
                    });
                }
            }
        }
        for (name, theirs) in &other.modules {
            if let Some(mine) = self.modules.get(name) {
                mine.check_merge(name, theirs)?;
            }
        }

        for (name, theirs) in &other.modules {
            match self.modules.get_mut(name) {
                Some(mine) => mine.add_checked(theirs),
                None => {
                    self.modules.insert(name.clone(), theirs.clone());
                }
            }
        }
        for (alias, target) in &other.aliases {
            self.aliases.insert(alias.clone(), target.clone());
        }
        self.chunk_size = chunk_size;
        self.chunk_count = chunk_count;
        self.datasets.extend(other.datasets.iter().cloned());
        Ok(())
    }

    /// The statistics as an importance matrix for llama.cpp's imatrix-aware quantizers: one entry
    /// per module, aliases included, named `{module}.weight` (the checkpoint's tensor name, which
    /// [`Imatrix::lookup`] accepts in place of the GGUF name), with `sum_sq` rounded to `f32` as
    /// the sums and `count` as the single count, in [`ImatrixFormat::Gguf`] units (tokens);
    /// chunk count, chunk size and datasets carried over.
    ///
    /// `llama-imatrix` sums squares in `f32` token by token; these sums were formed in `f64`, so
    /// they are the same statistic, more accurately rounded.
    pub fn to_imatrix(&self) -> Result<Imatrix, CalibError> {
        let mut m = Imatrix::new(ImatrixFormat::Gguf);
        for name in self.names() {
            let Some(s) = self.get(name) else { continue };
            let count = i64::try_from(s.count).map_err(|_| CalibError::CountOverflow {
                what: name.to_owned(),
            })?;
            let sums = s.sum_sq.iter().map(|&v| v as f32).collect();
            m.entries.insert(
                format!("{name}.weight"),
                ImatrixEntry::new(s.cols, sums, vec![count])?,
            );
        }
        m.datasets = Some(self.datasets.clone());
        m.chunk_count =
            Some(
                u32::try_from(self.chunk_count).map_err(|_| CalibError::CountOverflow {
                    what: "chunk count".into(),
                })?,
            );
        m.chunk_size = self.chunk_size;
        Ok(m)
    }

    /// The statistics as a safetensors file (see the module documentation for the layout). Equal
    /// statistics give equal bytes.
    pub fn to_safetensors(&self) -> Result<Vec<u8>, ActivationsError> {
        let st = |source| ActivationsError::Safetensors { source };
        let mut buffers: Vec<RawTensor> = Vec::new();
        for (name, s) in &self.modules {
            let count = i64::try_from(s.count).map_err(|_| ActivationsError::CountOverflow {
                what: format!("module `{name}`"),
            })?;
            let t = |stat: &str| format!("{name}.{stat}");
            buffers.push((
                t("count"),
                Dtype::I64,
                vec![1],
                count.to_le_bytes().to_vec(),
            ));
            buffers.push((t("sum_sq"), Dtype::F64, vec![s.cols], f64_bytes(&s.sum_sq)));
            buffers.push((t("sum"), Dtype::F64, vec![s.cols], f64_bytes(&s.sum)));
            buffers.push((t("min"), Dtype::F32, vec![s.cols], f32_bytes(&s.min)));
            buffers.push((t("max"), Dtype::F32, vec![s.cols], f32_bytes(&s.max)));
            if let Some(g) = &s.gram {
                buffers.push((t("gram"), Dtype::F64, vec![s.cols, s.cols], f64_bytes(g)));
            }
            if let Some(h) = &s.histogram {
                let mut bytes = Vec::with_capacity(h.counts.len() * 8);
                for &c in &h.counts {
                    let c = i64::try_from(c).map_err(|_| ActivationsError::CountOverflow {
                        what: format!("histogram of `{name}`"),
                    })?;
                    bytes.extend_from_slice(&c.to_le_bytes());
                }
                buffers.push((t("hist"), Dtype::I64, vec![h.counts.len()], bytes));
                buffers.push((
                    t("hist_max"),
                    Dtype::F32,
                    vec![1],
                    h.spec.max.to_le_bytes().to_vec(),
                ));
            }
        }
        let views = buffers
            .iter()
            .map(|(n, d, shape, bytes)| {
                Ok((n.as_str(), TensorView::new(*d, shape.clone(), bytes)?))
            })
            .collect::<Result<Vec<_>, SafeTensorError>>()
            .map_err(st)?;
        // Serialized without metadata the crate's output is deterministic (its layout sorts the
        // tensors); `__metadata__` is then put in front of the tensor entries in a fixed order.
        let plain = safetensors::serialize(views, None).map_err(st)?;
        self.with_metadata(&plain)
    }

    /// `plain` (a safetensors file without `__metadata__`) with this file's metadata added.
    fn with_metadata(&self, plain: &[u8]) -> Result<Vec<u8>, ActivationsError> {
        let bad = |problem: &str| ActivationsError::Format {
            problem: problem.to_owned(),
        };
        let n = plain
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or_else(|| bad("serialized header is truncated"))?;
        let end = n.checked_add(8).filter(|&e| e <= plain.len());
        let (header, data) = match end {
            Some(e) => (&plain[8..e], &plain[e..]),
            None => return Err(bad("serialized header is truncated")),
        };
        let tensors: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(header).map_err(|e| bad(&e.to_string()))?;

        let mut meta = serde_json::Map::new();
        let s = |v: String| serde_json::Value::String(v);
        meta.insert("format".into(), s(FORMAT_NAME.into()));
        meta.insert(
            "format_version".into(),
            s(crate::FORMAT_VERSION.to_string()),
        );
        if let Some(size) = self.chunk_size {
            meta.insert("chunk_size".into(), s(size.to_string()));
        }
        meta.insert("chunk_count".into(), s(self.chunk_count.to_string()));
        let json = |v: serde_json::Value| s(v.to_string());
        meta.insert("datasets".into(), json(serde_json::json!(self.datasets)));
        meta.insert("aliases".into(), json(serde_json::json!(self.aliases)));

        let mut top = serde_json::Map::new();
        top.insert("__metadata__".into(), serde_json::Value::Object(meta));
        top.extend(tensors);
        let mut header = serde_json::Value::Object(top).to_string().into_bytes();
        // The data section starts 8-byte aligned, as the crate's own serializer pads it.
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = Vec::with_capacity(8 + header.len() + data.len());
        out.extend_from_slice(&(header.len() as u64).to_le_bytes());
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        Ok(out)
    }

    /// Reads a file written by [`ActivationStats::to_safetensors`] (or by
    /// `tools/capture_activations.py`), validating every tensor's dtype and shape.
    pub fn from_safetensors(bytes: &[u8]) -> Result<ActivationStats, ActivationsError> {
        let st = |source| ActivationsError::Safetensors { source };
        let (_, header) = SafeTensors::read_metadata(bytes).map_err(st)?;
        let file = SafeTensors::deserialize(bytes).map_err(st)?;
        let format = |problem: String| ActivationsError::Format { problem };
        let meta = header
            .metadata()
            .as_ref()
            .ok_or_else(|| format("no __metadata__".into()))?;
        let field = |k: &str| meta.get(k).map(String::as_str);
        if field("format") != Some(FORMAT_NAME) {
            return Err(format(format!(
                "`format` is {:?}, expected {FORMAT_NAME:?}",
                field("format")
            )));
        }
        let version = crate::FORMAT_VERSION.to_string();
        if field("format_version") != Some(version.as_str()) {
            return Err(format(format!(
                "`format_version` is {:?}; this kiln reads version {version}",
                field("format_version")
            )));
        }
        let chunk_size = field("chunk_size")
            .map(|v| {
                v.parse::<u32>()
                    .map_err(|_| format(format!("`chunk_size` {v:?} is not a 32-bit count")))
            })
            .transpose()?;
        let chunk_count = match field("chunk_count") {
            Some(v) => v
                .parse::<u64>()
                .map_err(|_| format(format!("`chunk_count` {v:?} is not a count")))?,
            None => 0,
        };
        let datasets: Vec<String> = match field("datasets") {
            Some(v) => serde_json::from_str(v)
                .map_err(|e| format(format!("`datasets` is not a JSON array of strings: {e}")))?,
            None => Vec::new(),
        };
        let aliases: BTreeMap<String, String> = match field("aliases") {
            Some(v) => serde_json::from_str(v)
                .map_err(|e| format(format!("`aliases` is not a JSON object of strings: {e}")))?,
            None => BTreeMap::new(),
        };

        // Group tensors by module (names are `{module}.{statistic}`, statistics have no dots).
        let mut by_module: BTreeMap<&str, BTreeMap<&str, TensorView<'_>>> = BTreeMap::new();
        for (name, view) in file.iter() {
            let Some((module, stat)) = name.rsplit_once('.') else {
                return Err(ActivationsError::BadTensor {
                    tensor: name.to_owned(),
                    problem: "not named `{module}.{statistic}`".into(),
                });
            };
            if !matches!(
                stat,
                "count" | "sum_sq" | "sum" | "min" | "max" | "gram" | "hist" | "hist_max"
            ) {
                return Err(ActivationsError::BadTensor {
                    tensor: name.to_owned(),
                    problem: format!("unknown statistic `{stat}`"),
                });
            }
            by_module.entry(module).or_default().insert(stat, view);
        }

        let mut out = ActivationStats {
            chunk_size,
            chunk_count,
            datasets,
            ..ActivationStats::default()
        };
        for (module, stats) in &by_module {
            out.modules
                .insert((*module).to_owned(), read_module(module, stats)?);
        }
        for (alias, target) in &aliases {
            out.add_alias(alias, target)?;
        }
        Ok(out)
    }
}

/// One module's statistics from its tensors.
fn read_module(
    module: &str,
    t: &BTreeMap<&str, TensorView<'_>>,
) -> Result<ModuleStats, ActivationsError> {
    let name = |stat: &str| format!("{module}.{stat}");
    let get = |stat: &str| {
        t.get(stat)
            .ok_or_else(|| ActivationsError::MissingTensor { tensor: name(stat) })
    };
    let check = |stat: &str, view: &TensorView<'_>, dtype: Dtype, shape: &[usize]| {
        if view.dtype() != dtype || view.shape() != shape {
            return Err(ActivationsError::BadTensor {
                tensor: name(stat),
                problem: format!(
                    "is {:?} {:?}, expected {dtype:?} {shape:?}",
                    view.dtype(),
                    view.shape()
                ),
            });
        }
        Ok(())
    };
    let sum_sq = get("sum_sq")?;
    let cols = match sum_sq.shape() {
        [c] if *c > 0 => *c,
        _ => {
            return Err(ActivationsError::BadTensor {
                tensor: name("sum_sq"),
                problem: format!("shape {:?} is not [cols] with cols ≥ 1", sum_sq.shape()),
            })
        }
    };
    let count_view = get("count")?;
    check("count", count_view, Dtype::I64, &[1])?;
    let count = read_i64(count_view.data())[0];
    let count = u64::try_from(count).map_err(|_| ActivationsError::BadTensor {
        tensor: name("count"),
        problem: format!("negative count {count}"),
    })?;
    check("sum_sq", sum_sq, Dtype::F64, &[cols])?;
    let read = |stat: &str, dtype: Dtype| -> Result<&[u8], ActivationsError> {
        let v = get(stat)?;
        check(stat, v, dtype, &[cols])?;
        Ok(v.data())
    };
    let sum = read_f64(read("sum", Dtype::F64)?);
    let min = read_f32(read("min", Dtype::F32)?);
    let max = read_f32(read("max", Dtype::F32)?);
    let gram = match t.get("gram") {
        Some(v) => {
            check("gram", v, Dtype::F64, &[cols, cols])?;
            Some(read_f64(v.data()))
        }
        None => None,
    };
    let histogram = match (t.get("hist"), t.get("hist_max")) {
        (None, None) => None,
        (Some(h), Some(m)) => {
            let bins = match h.shape() {
                [b] => *b,
                _ => 0,
            };
            check("hist", h, Dtype::I64, &[bins])?;
            check("hist_max", m, Dtype::F32, &[1])?;
            let spec = HistogramSpec {
                bins,
                max: read_f32(m.data())[0],
            };
            spec.validate().map_err(|e| ActivationsError::BadTensor {
                tensor: name("hist"),
                problem: e.to_string(),
            })?;
            let counts = read_i64(h.data())
                .into_iter()
                .map(u64::try_from)
                .collect::<Result<Vec<u64>, _>>()
                .map_err(|_| ActivationsError::BadTensor {
                    tensor: name("hist"),
                    problem: "negative bin count".into(),
                })?;
            Some(Histogram { spec, counts })
        }
        (Some(_), None) => {
            return Err(ActivationsError::MissingTensor {
                tensor: name("hist_max"),
            })
        }
        (None, Some(_)) => {
            return Err(ActivationsError::MissingTensor {
                tensor: name("hist"),
            })
        }
    };
    Ok(ModuleStats {
        cols,
        count,
        sum_sq: read_f64(sum_sq.data()),
        sum,
        min,
        max,
        gram,
        histogram,
    })
}

/// A tensor ready for serialization: name, dtype, shape, little-endian bytes.
type RawTensor = (String, Dtype, Vec<usize>, Vec<u8>);

fn f64_bytes(v: &[f64]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

// The readers below get byte slices whose length the caller checked against dtype × shape (the
// `safetensors` crate validated the ranges); `chunks_exact` drops nothing for such slices.
fn read_f64(b: &[u8]) -> Vec<f64> {
    b.chunks_exact(8)
        .map(|c| f64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

fn read_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn read_i64(b: &[u8]) -> Vec<i64> {
    b.chunks_exact(8)
        .map(|c| i64::from_le_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic pseudo-random rows (xorshift), with a few large values.
    fn rows(seed: u64, n: usize, cols: usize) -> Vec<f32> {
        let mut s = seed | 1;
        (0..n * cols)
            .map(|i| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let u = (s >> 40) as f32 / (1u64 << 24) as f32 - 0.5;
                if i % 37 == 0 {
                    u * 40.0
                } else {
                    u
                }
            })
            .collect()
    }

    const HIST: HistogramSpec = HistogramSpec { bins: 16, max: 8.0 };

    fn sample(chunks: &[Vec<f32>], cols: usize) -> ActivationStats {
        let mut m = ModuleStats::new(cols, true, Some(HIST)).unwrap();
        for c in chunks {
            m.add_rows(c).unwrap();
        }
        let mut s = ActivationStats::new();
        s.insert("model.layers.0.self_attn.q_proj", m).unwrap();
        s.add_alias(
            "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.q_proj",
        )
        .unwrap();
        s.chunk_size = Some(7);
        s.chunk_count = chunks.len() as u64;
        s.datasets = vec!["calib.tokens".into()];
        s
    }

    #[test]
    fn tiled_gram_equals_the_plain_loop_bit_for_bit() {
        for (n, cols) in [(7, 9), (13, 4), (5, 1), (16, 17)] {
            let x = rows(n as u64 * 31 + cols as u64, n, cols);
            let mut a = vec![0.25; cols * cols];
            let mut b = a.clone();
            gram_upper(&x, n, cols, &mut a);
            gram_upper_ref(&x, n, cols, &mut b);
            for i in 0..cols {
                for j in i..cols {
                    assert_eq!(a[i * cols + j].to_bits(), b[i * cols + j].to_bits());
                }
            }
        }
    }

    #[test]
    fn batch_statistics_are_what_they_say() {
        let x = [1.0f32, -2.0, 3.0, 0.5, -0.25, 9.5];
        let s = ModuleStats::from_rows(&x, 2, true, Some(HIST)).unwrap();
        assert_eq!(s.count(), 3);
        assert_eq!(s.sum_sq(), &[1.0 + 9.0 + 0.0625, 4.0 + 0.25 + 90.25]);
        assert_eq!(s.sum(), &[1.0 + 3.0 - 0.25, -2.0 + 0.5 + 9.5]);
        assert_eq!(s.min(), &[-0.25, -2.0]);
        assert_eq!(s.max(), &[3.0, 9.5]);
        let g01 = -2.0 + 1.5 + -0.25 * 9.5;
        assert_eq!(
            s.gram().unwrap(),
            &[1.0 + 9.0 + 0.0625, g01, g01, 4.0 + 0.25 + 90.25]
        );
        // |x| in bins of width 0.5 over [0, 8); 9.5 clamps into the last bin.
        let h = s.histogram().unwrap().counts();
        assert_eq!((h[2], h[4], h[6], h[1], h[0], h[15]), (1, 1, 1, 1, 1, 1));
        assert_eq!(h.iter().sum::<u64>(), 6);
        assert_eq!(s.mean_sq()[0], (1.0 + 9.0 + 0.0625) / 3.0);
    }

    #[test]
    fn merging_chunk_files_in_order_equals_one_run_bit_for_bit() {
        let cols = 9;
        let chunks: Vec<Vec<f32>> = (0..4).map(|i| rows(100 + i, 7, cols)).collect();
        let whole = sample(&chunks, cols);
        // Prefix file + one-chunk file.
        let mut merged = sample(&chunks[..3], cols);
        merged.merge(&sample(&chunks[3..], cols)).unwrap();
        merged.datasets.truncate(1);
        assert_eq!(merged, whole);
        // One file per chunk, folded in order.
        let mut folded = sample(&chunks[..1], cols);
        for c in &chunks[1..] {
            folded
                .merge(&sample(std::slice::from_ref(c), cols))
                .unwrap();
        }
        folded.datasets.truncate(1);
        assert_eq!(folded, whole);
    }

    #[test]
    fn merging_multi_chunk_files_is_exact_for_counts_and_close_for_sums() {
        let cols = 5;
        let chunks: Vec<Vec<f32>> = (0..4).map(|i| rows(7 + i, 11, cols)).collect();
        let whole = sample(&chunks, cols);
        let mut merged = sample(&chunks[..2], cols);
        merged.merge(&sample(&chunks[2..], cols)).unwrap();
        let (a, b) = (
            merged.get("model.layers.0.self_attn.k_proj").unwrap(),
            whole.get("model.layers.0.self_attn.q_proj").unwrap(),
        );
        assert_eq!(a.count(), b.count());
        assert_eq!((a.min(), a.max()), (b.min(), b.max()));
        assert_eq!(a.histogram(), b.histogram());
        for (x, y) in a.sum_sq().iter().zip(b.sum_sq()) {
            assert!((x - y).abs() <= 1e-12 * y.abs());
        }
        for (x, y) in a.gram().unwrap().iter().zip(b.gram().unwrap()) {
            assert!((x - y).abs() <= 1e-12 * (1.0 + y.abs()));
        }
    }

    #[test]
    fn safetensors_round_trip_is_exact_and_deterministic() {
        let chunks: Vec<Vec<f32>> = (0..2).map(|i| rows(50 + i, 6, 3)).collect();
        let mut s = sample(&chunks, 3);
        s.insert(
            "model.layers.0.mlp.down_proj",
            ModuleStats::from_rows(&rows(9, 4, 2), 2, false, None).unwrap(),
        )
        .unwrap();
        // A module that saw nothing keeps its infinite extremes through the file.
        s.insert(
            "model.layers.1.mlp.down_proj",
            ModuleStats::new(2, false, None).unwrap(),
        )
        .unwrap();
        let bytes = s.to_safetensors().unwrap();
        assert_eq!(bytes, s.clone().to_safetensors().unwrap());
        let back = ActivationStats::from_safetensors(&bytes).unwrap();
        assert_eq!(back, s);
        assert_eq!(back.to_safetensors().unwrap(), bytes);

        // Any safetensors reader sees the documented tensors and metadata.
        let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
        let m = meta.metadata().as_ref().unwrap();
        assert_eq!(m["format"], FORMAT_NAME);
        assert_eq!(m["format_version"], "1");
        assert_eq!(m["chunk_size"], "7");
        assert_eq!(m["chunk_count"], "2");
        assert_eq!(m["datasets"], r#"["calib.tokens"]"#);
        assert_eq!(
            m["aliases"],
            r#"{"model.layers.0.self_attn.k_proj":"model.layers.0.self_attn.q_proj"}"#
        );
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let g = file.tensor("model.layers.0.self_attn.q_proj.gram").unwrap();
        assert_eq!((g.dtype(), g.shape()), (Dtype::F64, &[3usize, 3][..]));
        let c = file.tensor("model.layers.0.mlp.down_proj.count").unwrap();
        assert_eq!((c.dtype(), c.data()), (Dtype::I64, &4i64.to_le_bytes()[..]));
        assert!(file.tensor("model.layers.0.self_attn.k_proj.sum").is_err());
        // The header is valid for the crate and ends 8-byte aligned.
        let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        assert_eq!(n % 8, 0);
    }

    #[test]
    fn malformed_files_are_refused_with_the_tensor_named() {
        let s = sample(&[rows(1, 3, 2)], 2);
        let bytes = s.to_safetensors().unwrap();
        assert!(matches!(
            ActivationStats::from_safetensors(&bytes[..bytes.len() - 1]),
            Err(ActivationsError::Safetensors { .. })
        ));
        // A plain safetensors file without kiln's metadata.
        let view = TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap();
        let plain = safetensors::serialize([("x.sum", view)], None).unwrap();
        assert!(matches!(
            ActivationStats::from_safetensors(&plain),
            Err(ActivationsError::Format { .. })
        ));

        // Rebuild files with one tensor changed.
        let rebuild = |edit: &dyn Fn(&mut Vec<RawTensor>)| {
            let file = SafeTensors::deserialize(&bytes).unwrap();
            let mut tensors: Vec<RawTensor> = file
                .iter()
                .map(|(n, v)| {
                    (
                        n.to_owned(),
                        v.dtype(),
                        v.shape().to_vec(),
                        v.data().to_vec(),
                    )
                })
                .collect();
            edit(&mut tensors);
            let views: Vec<(String, TensorView<'_>)> = tensors
                .iter()
                .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
                .collect();
            let plain = safetensors::serialize(views, None).unwrap();
            let mut meta = s.clone();
            meta.aliases.clear();
            meta.with_metadata(&plain).unwrap()
        };
        let q = "model.layers.0.self_attn.q_proj";
        let negative = rebuild(&|t| {
            if let Some(c) = t.iter_mut().find(|t| t.0.ends_with(".count")) {
                c.3 = (-1i64).to_le_bytes().to_vec();
            }
        });
        assert!(matches!(
            ActivationStats::from_safetensors(&negative),
            Err(ActivationsError::BadTensor { tensor, .. }) if tensor == format!("{q}.count")
        ));
        let missing = rebuild(&|t| t.retain(|t| !t.0.ends_with(".max")));
        assert!(matches!(
            ActivationStats::from_safetensors(&missing),
            Err(ActivationsError::MissingTensor { tensor }) if tensor == format!("{q}.max")
        ));
        let wrong_dtype = rebuild(&|t| {
            if let Some(c) = t.iter_mut().find(|t| t.0.ends_with(".min")) {
                c.1 = Dtype::I32;
            }
        });
        assert!(matches!(
            ActivationStats::from_safetensors(&wrong_dtype),
            Err(ActivationsError::BadTensor { tensor, .. }) if tensor == format!("{q}.min")
        ));
        let unknown = rebuild(&|t| t.push(("x.mean".into(), Dtype::F32, vec![1], vec![0; 4])));
        assert!(matches!(
            ActivationStats::from_safetensors(&unknown),
            Err(ActivationsError::BadTensor { tensor, .. }) if tensor == "x.mean"
        ));
    }

    #[test]
    fn mismatches_are_refused_and_change_nothing() {
        let cols = 4;
        let base = sample(&[rows(3, 5, cols)], cols);
        let q = "model.layers.0.self_attn.q_proj";

        let mut other = sample(&[rows(4, 5, 3)], 3);
        let mut s = base.clone();
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::ColumnMismatch { module, left: 4, right: 3 }) if module == q
        ));
        assert_eq!(s, base);

        other = ActivationStats::new();
        other
            .insert(q, ModuleStats::new(cols, false, Some(HIST)).unwrap())
            .unwrap();
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::GramMismatch { .. })
        ));
        other = ActivationStats::new();
        let spec = HistogramSpec { bins: 16, max: 4.0 };
        other
            .insert(q, ModuleStats::new(cols, true, Some(spec)).unwrap())
            .unwrap();
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::HistogramMismatch { .. })
        ));

        // `k_proj` is an alias on one side and a module on the other.
        other = ActivationStats::new();
        other
            .insert(
                "model.layers.0.self_attn.k_proj",
                ModuleStats::new(cols, true, Some(HIST)).unwrap(),
            )
            .unwrap();
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::AliasMismatch { .. })
        ));

        other = base.clone();
        other.chunk_size = Some(8);
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::ChunkSizeMismatch { left: 7, right: 8 })
        ));
        other = base.clone();
        other.chunk_count = u64::MAX;
        assert!(matches!(
            s.merge(&other),
            Err(ActivationsError::CountOverflow { .. })
        ));
        assert_eq!(s, base);

        assert!(matches!(
            ModuleStats::new(0, false, None),
            Err(ActivationsError::NoColumns { .. })
        ));
        assert!(matches!(
            ModuleStats::new(2, false, Some(HistogramSpec { bins: 0, max: 1.0 })),
            Err(ActivationsError::InvalidHistogram { .. })
        ));
        assert!(matches!(
            ModuleStats::new(
                2,
                false,
                Some(HistogramSpec {
                    bins: 4,
                    max: f32::NAN
                })
            ),
            Err(ActivationsError::InvalidHistogram { .. })
        ));
        assert!(matches!(
            ModuleStats::from_rows(&[1.0; 5], 2, false, None),
            Err(ActivationsError::RowLength {
                len: 5,
                cols: 2,
                ..
            })
        ));
        let mut s = ActivationStats::new();
        assert!(matches!(
            s.add_alias("a", "b"),
            Err(ActivationsError::BadAlias { .. })
        ));
    }

    #[test]
    fn imatrix_has_every_module_and_llama_quantize_weights() {
        let s = sample(&[rows(11, 6, 3), rows(12, 6, 3)], 3);
        let m = s.to_imatrix().unwrap();
        assert_eq!(m.len(), 2);
        assert!(m.has_required_metadata());
        assert_eq!((m.chunk_count, m.chunk_size), (Some(2), Some(7)));
        let q = s.get("model.layers.0.self_attn.q_proj").unwrap();
        let expected: Vec<f32> = q.sum_sq().iter().map(|&v| v as f32 / 12.0).collect();
        assert_eq!(
            m.quant_weights_for(
                "blk.0.attn_k.weight",
                "model.layers.0.self_attn.k_proj.weight"
            ),
            Some(expected)
        );
        let e = m.entry("model.layers.0.self_attn.q_proj.weight").unwrap();
        assert_eq!(e.counts(), &[12]);
    }
}
