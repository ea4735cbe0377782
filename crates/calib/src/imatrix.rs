//! [`Imatrix`] and its entries: sums and counts per tensor, and llama-quantize's division.

use std::collections::BTreeMap;

use crate::CalibError;

/// Which llama.cpp format the statistics came from: it fixes the unit of the counts and how
/// [`ImatrixEntry::quant_weights`] divides (see the crate documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ImatrixFormat {
    /// GGUF imatrix: sums are raw `Σ x²`, counts are tokens per matrix (expert); a matrix with a
    /// zero count gets weight 1.0. Also the format of statistics collected with
    /// [`ImatrixEntry::add_row`].
    Gguf,
    /// Legacy `.dat`: "sums" are the stored `mean · ncall` values and the single count is `ncall`;
    /// with `ncall ≤ 0` the stored values are used unchanged.
    Legacy,
}

/// Statistics for one weight tensor: per-column sums for each of its matrices (experts), and the
/// number of activation rows each matrix saw.
///
/// Invariant (checked by [`ImatrixEntry::new`]): at least one column and one matrix, and
/// `sums.len() == columns · counts.len()`, matrix `j`'s sums being `sums[j·columns .. (j+1)·columns]`.
#[derive(Debug, Clone, PartialEq)]
pub struct ImatrixEntry {
    columns: usize,
    sums: Vec<f32>,
    counts: Vec<i64>,
}

impl ImatrixEntry {
    /// Builds an entry from `counts.len()` matrices of `columns` sums each (matrix-major).
    pub fn new(columns: usize, sums: Vec<f32>, counts: Vec<i64>) -> Result<Self, CalibError> {
        let ok = columns > 0
            && !counts.is_empty()
            && columns.checked_mul(counts.len()) == Some(sums.len());
        if !ok {
            return Err(CalibError::InvalidShape {
                columns,
                sums: sums.len(),
                counts: counts.len(),
            });
        }
        Ok(ImatrixEntry {
            columns,
            sums,
            counts,
        })
    }

    /// An entry with `matrices` matrices of `columns` columns and nothing counted yet.
    pub fn zeros(columns: usize, matrices: usize) -> Result<Self, CalibError> {
        let n = columns
            .checked_mul(matrices)
            .ok_or(CalibError::InvalidShape {
                columns,
                sums: usize::MAX,
                counts: matrices,
            })?;
        ImatrixEntry::new(columns, vec![0.0; n], vec![0; matrices])
    }

    /// Input columns per matrix (`ne[0]` of the weight; for a legacy entry, all stored values).
    pub fn columns(&self) -> usize {
        self.columns
    }

    /// Number of matrices (experts); 1 for dense weights and for every legacy entry.
    pub fn matrices(&self) -> usize {
        self.counts.len()
    }

    /// All sums, matrix-major (`matrices() · columns()` values).
    pub fn sums(&self) -> &[f32] {
        &self.sums
    }

    /// The count of each matrix: tokens (GGUF, after `lround`) or `ncall` (legacy).
    pub fn counts(&self) -> &[i64] {
        &self.counts
    }

    /// The sums of matrix `matrix`, if it exists.
    pub fn matrix_sums(&self, matrix: usize) -> Option<&[f32]> {
        let start = matrix.checked_mul(self.columns)?;
        self.sums.get(start..start.checked_add(self.columns)?)
    }

    /// Adds one activation row (one token) seen by matrix `matrix`: `sum[i] += x[i]·x[i]` in f32, as
    /// `llama-imatrix` accumulates, and the matrix's count grows by one.
    pub fn add_row(&mut self, matrix: usize, row: &[f32]) -> Result<(), CalibError> {
        let mismatch = CalibError::RowMismatch {
            matrix,
            matrices: self.counts.len(),
            columns: self.columns,
            len: row.len(),
        };
        if row.len() != self.columns {
            return Err(mismatch);
        }
        let start = matrix.checked_mul(self.columns);
        let end = start.and_then(|s| s.checked_add(self.columns));
        let (Some(sums), Some(count)) = (
            start.zip(end).and_then(|(s, e)| self.sums.get_mut(s..e)),
            self.counts.get_mut(matrix),
        ) else {
            return Err(mismatch);
        };
        *count = count
            .checked_add(1)
            .ok_or_else(|| CalibError::CountOverflow {
                what: format!("matrix {matrix}"),
            })?;
        for (s, x) in sums.iter_mut().zip(row) {
            *s += *x * *x;
        }
        Ok(())
    }

    /// The weights llama-quantize passes to ggml as `quant_weights` for this entry, when it was read
    /// from a file of format `format`: `matrices() · columns()` values, matrix-major.
    ///
    /// Per matrix `j` with count `c` (converted to f32 as C converts `int64_t` to `float`):
    /// - [`ImatrixFormat::Gguf`]: `sum / c` when `c > 0`, else 1.0 for every column;
    /// - [`ImatrixFormat::Legacy`]: `sum / c` when `c > 0`, else the stored value.
    ///
    /// Each value is one f32 division, so the result is bit-identical to llama-quantize's.
    pub fn quant_weights(&self, format: ImatrixFormat) -> Vec<f32> {
        let mut out = Vec::with_capacity(self.sums.len());
        for (sums, &count) in self.sums.chunks_exact(self.columns).zip(&self.counts) {
            // `count > 0` as an integer is the same test as `(float) count > 0.0f`.
            let c = count as f32;
            if count > 0 {
                out.extend(sums.iter().map(|s| s / c));
            } else {
                match format {
                    ImatrixFormat::Gguf => out.extend(sums.iter().map(|_| 1.0f32)),
                    ImatrixFormat::Legacy => out.extend_from_slice(sums),
                }
            }
        }
        out
    }

    /// Checks that `other` can be added to `self` (`name` is only for the error).
    fn check_merge(&self, name: &str, other: &ImatrixEntry) -> Result<(), CalibError> {
        if self.columns != other.columns {
            return Err(CalibError::ColumnMismatch {
                tensor: name.to_owned(),
                left: self.columns,
                right: other.columns,
            });
        }
        if self.counts.len() != other.counts.len() {
            return Err(CalibError::MatrixMismatch {
                tensor: name.to_owned(),
                left: self.counts.len(),
                right: other.counts.len(),
            });
        }
        if self
            .counts
            .iter()
            .zip(&other.counts)
            .any(|(a, b)| a.checked_add(*b).is_none())
        {
            return Err(CalibError::CountOverflow {
                what: name.to_owned(),
            });
        }
        Ok(())
    }

    /// Adds `other` (already checked with [`ImatrixEntry::check_merge`]): f32 sums, integer counts.
    fn add(&mut self, other: &ImatrixEntry) {
        for (s, o) in self.sums.iter_mut().zip(&other.sums) {
            *s += o;
        }
        for (c, o) in self.counts.iter_mut().zip(&other.counts) {
            *c = c.saturating_add(*o);
        }
    }
}

/// An importance matrix: statistics per tensor name, plus the file's metadata.
///
/// Names are whatever the producer recorded: GGUF tensor names (`blk.0.attn_q.weight`) for
/// `llama-imatrix`; [`Imatrix::lookup`] also accepts a Hugging Face name.
#[derive(Debug, Clone, PartialEq)]
pub struct Imatrix {
    /// The format the statistics came from (fixes the units of the counts).
    pub format: ImatrixFormat,
    /// Statistics by tensor name, in byte order of the names (llama-imatrix's `std::sort` order).
    pub entries: BTreeMap<String, ImatrixEntry>,
    /// Calibration datasets: `imatrix.datasets` (GGUF), or the trailer's dataset name (legacy; an
    /// empty list when the trailer has an empty name). `None` when the file does not say.
    pub datasets: Option<Vec<String>>,
    /// Chunks the statistics were computed on: `imatrix.chunk_count`, or the legacy trailer's.
    pub chunk_count: Option<u32>,
    /// Tokens per chunk: `imatrix.chunk_size` (legacy files do not record it).
    pub chunk_size: Option<u32>,
}

impl Imatrix {
    /// An empty importance matrix of format `format`, without metadata.
    pub fn new(format: ImatrixFormat) -> Imatrix {
        Imatrix {
            format,
            entries: BTreeMap::new(),
            datasets: None,
            chunk_count: None,
            chunk_size: None,
        }
    }

    /// Number of entries (what llama-quantize records as `quantize.imatrix.entries_count`, after
    /// filtering).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries (llama-quantize then quantizes as if no imatrix were given).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether llama-quantize would accept this matrix's metadata: a GGUF imatrix must have all three
    /// of `imatrix.datasets`, `imatrix.chunk_count` and `imatrix.chunk_size` ("missing imatrix
    /// metadata"); a legacy file needs none.
    pub fn has_required_metadata(&self) -> bool {
        match self.format {
            ImatrixFormat::Gguf => {
                self.datasets.is_some() && self.chunk_count.is_some() && self.chunk_size.is_some()
            }
            ImatrixFormat::Legacy => true,
        }
    }

    /// The entry stored under exactly `name`.
    pub fn entry(&self, name: &str) -> Option<&ImatrixEntry> {
        self.entries.get(name)
    }

    /// The entry for a tensor known as `gguf_name` in the output and `hf_name` in the checkpoint:
    /// the one stored under the GGUF name if there is one (llama-quantize's exact-name lookup), else
    /// the one stored under the Hugging Face name. Returns the name it was found under.
    pub fn lookup(&self, gguf_name: &str, hf_name: &str) -> Option<(&str, &ImatrixEntry)> {
        self.entries
            .get_key_value(gguf_name)
            .or_else(|| self.entries.get_key_value(hf_name))
            .map(|(k, v)| (k.as_str(), v))
    }

    /// llama-quantize's `quant_weights` for the entry stored under exactly `name`
    /// (see [`ImatrixEntry::quant_weights`]).
    pub fn quant_weights(&self, name: &str) -> Option<Vec<f32>> {
        self.entry(name).map(|e| e.quant_weights(self.format))
    }

    /// llama-quantize's `quant_weights` for the entry [`Imatrix::lookup`] finds.
    pub fn quant_weights_for(&self, gguf_name: &str, hf_name: &str) -> Option<Vec<f32>> {
        self.lookup(gguf_name, hf_name)
            .map(|(_, e)| e.quant_weights(self.format))
    }

    /// llama-quantize's `--include-weights` / `--exclude-weights`: with `include` non-empty, keeps
    /// only entries whose name contains at least one of its strings; with `exclude` non-empty, drops
    /// entries whose name contains any of its strings. Substring matches, case-sensitive (an empty
    /// string matches every name). Giving both is an error, as in llama-quantize, and leaves the
    /// matrix unchanged.
    pub fn filter_entries<S: AsRef<str>>(
        &mut self,
        include: &[S],
        exclude: &[S],
    ) -> Result<(), CalibError> {
        if !include.is_empty() && !exclude.is_empty() {
            return Err(CalibError::IncludeAndExclude);
        }
        let contains_any = |name: &str, pats: &[S]| pats.iter().any(|p| name.contains(p.as_ref()));
        if !include.is_empty() {
            self.entries.retain(|name, _| contains_any(name, include));
        }
        if !exclude.is_empty() {
            self.entries.retain(|name, _| !contains_any(name, exclude));
        }
        Ok(())
    }

    /// Adds another importance matrix of the same format, entry by entry: sums are added in f32 and
    /// counts as integers (what `llama-imatrix --in-file` does when it combines GGUF files); entries
    /// only `other` has are copied. Metadata: datasets are concatenated (`self`'s first), chunk counts
    /// added, and the chunk size kept; a chunk count or size that either side lacks becomes `None`.
    ///
    /// Fails, leaving `self` unchanged, when the formats or chunk sizes differ, when an entry present
    /// on both sides has different columns or matrices, or when a count would overflow.
    pub fn merge(&mut self, other: &Imatrix) -> Result<(), CalibError> {
        if self.format != other.format {
            return Err(CalibError::FormatMismatch {
                left: self.format,
                right: other.format,
            });
        }
        let chunk_size = match (self.chunk_size, other.chunk_size) {
            (Some(left), Some(right)) if left != right => {
                return Err(CalibError::ChunkSizeMismatch { left, right })
            }
            (Some(size), Some(_)) => Some(size),
            _ => None,
        };
        let chunk_count = match (self.chunk_count, other.chunk_count) {
            (Some(a), Some(b)) => {
                Some(a.checked_add(b).ok_or_else(|| CalibError::CountOverflow {
                    what: "chunk count".to_owned(),
                })?)
            }
            _ => None,
        };
        for (name, theirs) in &other.entries {
            if let Some(mine) = self.entries.get(name) {
                mine.check_merge(name, theirs)?;
            }
        }

        for (name, theirs) in &other.entries {
            match self.entries.get_mut(name) {
                Some(mine) => mine.add(theirs),
                None => {
                    self.entries.insert(name.clone(), theirs.clone());
                }
            }
        }
        self.datasets = match (self.datasets.take(), &other.datasets) {
            (None, None) => None,
            (mine, theirs) => {
                let mut all = mine.unwrap_or_default();
                all.extend(theirs.iter().flatten().cloned());
                Some(all)
            }
        };
        self.chunk_count = chunk_count;
        self.chunk_size = chunk_size;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(columns: usize, sums: &[f32], counts: &[i64]) -> ImatrixEntry {
        ImatrixEntry::new(columns, sums.to_vec(), counts.to_vec()).unwrap()
    }

    fn gguf(entries: &[(&str, ImatrixEntry)]) -> Imatrix {
        let mut m = Imatrix::new(ImatrixFormat::Gguf);
        for (n, e) in entries {
            m.entries.insert((*n).to_owned(), e.clone());
        }
        m.datasets = Some(vec!["a.txt".into()]);
        m.chunk_count = Some(3);
        m.chunk_size = Some(128);
        m
    }

    fn bits(v: &[f32]) -> Vec<u32> {
        v.iter().map(|x| x.to_bits()).collect()
    }

    #[test]
    fn rows_accumulate_in_f32_and_merging_equals_one_run() {
        let rows = [[1.0f32, -2.0], [3.0, 0.5], [0.0, 4.0]];
        let mut all = ImatrixEntry::zeros(2, 1).unwrap();
        rows.iter().for_each(|r| all.add_row(0, r).unwrap());
        assert_eq!(all.sums(), &[10.0, 20.25]);
        assert_eq!(all.counts(), &[3]);

        let mut a = gguf(&[("t", ImatrixEntry::zeros(2, 1).unwrap())]);
        a.entries
            .get_mut("t")
            .unwrap()
            .add_row(0, &rows[0])
            .unwrap();
        let mut b = gguf(&[("t", ImatrixEntry::zeros(2, 1).unwrap())]);
        b.datasets = Some(vec!["b.txt".into()]);
        b.entries
            .get_mut("t")
            .unwrap()
            .add_row(0, &rows[1])
            .unwrap();
        b.entries
            .get_mut("t")
            .unwrap()
            .add_row(0, &rows[2])
            .unwrap();
        a.merge(&b).unwrap();
        assert_eq!(a.entry("t"), Some(&all));
        assert_eq!(a.datasets, Some(vec!["a.txt".into(), "b.txt".into()]));
        assert_eq!((a.chunk_count, a.chunk_size), (Some(6), Some(128)));
        assert_eq!(
            a.quant_weights("t").unwrap(),
            vec![10.0f32 / 3.0, 20.25f32 / 3.0]
        );
    }

    #[test]
    fn rows_go_to_their_expert() {
        let mut e = ImatrixEntry::zeros(2, 3).unwrap();
        e.add_row(2, &[2.0, 3.0]).unwrap();
        assert_eq!(e.sums(), &[0.0, 0.0, 0.0, 0.0, 4.0, 9.0]);
        assert_eq!(e.counts(), &[0, 0, 1]);
        assert_eq!(e.matrix_sums(2), Some(&[4.0f32, 9.0][..]));
        assert_eq!(e.matrix_sums(3), None);
        // Experts 0 and 1 never saw a token: weight 1.0 (GGUF rule).
        assert_eq!(
            e.quant_weights(ImatrixFormat::Gguf),
            vec![1.0, 1.0, 1.0, 1.0, 4.0, 9.0]
        );
    }

    #[test]
    fn gguf_weights_divide_each_expert_by_its_own_count_in_f32() {
        let sums = [1899.4698f32, 2216.7148, 7.0, 1.0e-3, 5.0, 6.0];
        let e = entry(2, &sums, &[3840, 7, 0]);
        let w = e.quant_weights(ImatrixFormat::Gguf);
        let expected = [
            sums[0] / 3840.0f32,
            sums[1] / 3840.0f32,
            sums[2] / 7.0f32,
            sums[3] / 7.0f32,
            1.0,
            1.0,
        ];
        assert_eq!(bits(&w), bits(&expected));
    }

    #[test]
    fn counts_above_2_pow_24_are_converted_to_f32_like_c() {
        let c: i64 = (1 << 24) + 1; // not representable: rounds to 2^24 (ties to even)
        let e = entry(1, &[3.0e7], &[c]);
        assert_eq!(
            e.quant_weights(ImatrixFormat::Gguf),
            vec![3.0e7f32 / 16_777_216.0]
        );
    }

    #[test]
    fn legacy_weights_divide_by_ncall_or_keep_the_stored_values() {
        let e = entry(3, &[30.0, 15.0, 0.3], &[30]);
        assert_eq!(
            bits(&e.quant_weights(ImatrixFormat::Legacy)),
            bits(&[1.0, 0.5, 0.3f32 / 30.0])
        );
        let zero = entry(2, &[2.5, 3.5], &[0]);
        assert_eq!(zero.quant_weights(ImatrixFormat::Legacy), vec![2.5, 3.5]);
        let negative = entry(2, &[2.5, 3.5], &[-4]);
        assert_eq!(
            negative.quant_weights(ImatrixFormat::Legacy),
            vec![2.5, 3.5]
        );
        // The GGUF rule differs for the same numbers.
        assert_eq!(zero.quant_weights(ImatrixFormat::Gguf), vec![1.0, 1.0]);
    }

    /// The legacy file stores `(s / count) · ncall`; llama-quantize divides that by `ncall`. Whether
    /// this gives back `s / count` exactly depends on the numbers: it does when
    /// `count = ncall · 2^k` (dense models with a power-of-two chunk size, like the fixtures), and
    /// differs by one ulp for some columns otherwise. So kiln keeps each format's own arithmetic.
    #[test]
    fn legacy_round_trip_is_exact_only_when_count_is_ncall_times_a_power_of_two() {
        let sums: Vec<f32> = (1..=4000u32)
            .map(|i| (i as f32) * 1.37 + (i as f32).sqrt())
            .collect();
        let differing = |count: i64, ncall: i64| -> (usize, i64) {
            let g = entry(sums.len(), &sums, &[count]).quant_weights(ImatrixFormat::Gguf);
            let stored: Vec<f32> = sums
                .iter()
                .map(|s| (s / count as f32) * ncall as f32)
                .collect();
            let l = entry(sums.len(), &stored, &[ncall]).quant_weights(ImatrixFormat::Legacy);
            let n = g
                .iter()
                .zip(&l)
                .filter(|(a, b)| a.to_bits() != b.to_bits())
                .count();
            let max_ulps = g
                .iter()
                .zip(&l)
                .map(|(a, b)| (i64::from(a.to_bits() as i32) - i64::from(b.to_bits() as i32)).abs())
                .max()
                .unwrap_or(0);
            (n, max_ulps)
        };
        assert_eq!(differing(3840, 30), (0, 0));
        assert_eq!(differing(30 * 512, 30).0, 0);
        let (n, ulps) = differing(3800, 30); // ncall = ⌈3800 / 128⌉ = 30
        assert!(n > 0, "expected some 1-ulp differences");
        assert_eq!(ulps, 1);
    }

    #[test]
    fn merge_adds_f32_sums_and_integer_counts_per_expert() {
        let mut a = gguf(&[("x", entry(2, &[0.1, 0.2, 0.3, 0.4], &[5, 0]))]);
        let b = gguf(&[
            ("x", entry(2, &[0.7, 0.11, 0.13, 0.17], &[2, 9])),
            ("y", entry(1, &[1.0], &[1])),
        ]);
        a.merge(&b).unwrap();
        let x = a.entry("x").unwrap();
        assert_eq!(
            bits(x.sums()),
            bits(&[0.1f32 + 0.7, 0.2f32 + 0.11, 0.3f32 + 0.13, 0.4f32 + 0.17])
        );
        assert_eq!(x.counts(), &[7, 9]);
        assert_eq!(a.entry("y"), b.entry("y"));
        assert_eq!(a.len(), 2);
    }

    #[test]
    fn merge_metadata_rules() {
        let mut a = gguf(&[]);
        let mut b = gguf(&[]);
        b.chunk_count = None;
        b.datasets = None;
        a.merge(&b).unwrap();
        assert_eq!(a.datasets, Some(vec!["a.txt".into()]));
        assert_eq!(a.chunk_count, None);
        assert_eq!(a.chunk_size, Some(128));

        let mut c = Imatrix::new(ImatrixFormat::Legacy);
        c.merge(&Imatrix::new(ImatrixFormat::Legacy)).unwrap();
        assert_eq!(
            (c.datasets, c.chunk_count, c.chunk_size),
            (None, None, None)
        );
    }

    #[test]
    fn invalid_shapes_are_refused() {
        for (columns, sums, counts) in [(0usize, 0usize, 1usize), (2, 4, 0), (2, 5, 2), (3, 3, 2)] {
            let r = ImatrixEntry::new(columns, vec![0.0; sums], vec![0; counts]);
            assert!(
                matches!(r, Err(CalibError::InvalidShape { columns: c, sums: s, counts: n }) if (c, s, n) == (columns, sums, counts))
            );
        }
        assert!(matches!(
            ImatrixEntry::zeros(usize::MAX, 2),
            Err(CalibError::InvalidShape { .. })
        ));
    }

    #[test]
    fn rows_that_do_not_fit_are_refused() {
        let mut e = ImatrixEntry::zeros(2, 2).unwrap();
        assert!(matches!(
            e.add_row(0, &[1.0]),
            Err(CalibError::RowMismatch {
                matrix: 0,
                matrices: 2,
                columns: 2,
                len: 1
            })
        ));
        assert!(matches!(
            e.add_row(2, &[1.0, 2.0]),
            Err(CalibError::RowMismatch { matrix: 2, .. })
        ));
        assert_eq!(e, ImatrixEntry::zeros(2, 2).unwrap());
    }

    #[test]
    fn mismatched_columns_are_refused() {
        let mut x = gguf(&[("t", entry(2, &[1.0, 2.0], &[1]))]);
        let y = gguf(&[("t", entry(3, &[1.0, 2.0, 3.0], &[1]))]);
        let before = x.clone();
        assert!(
            matches!(x.merge(&y), Err(CalibError::ColumnMismatch { ref tensor, left: 2, right: 3 }) if tensor == "t")
        );
        assert_eq!(x, before);
    }

    #[test]
    fn mismatched_matrices_are_refused() {
        let mut x = gguf(&[("t", entry(1, &[1.0, 2.0], &[1, 1]))]);
        let y = gguf(&[("t", entry(1, &[1.0], &[1]))]);
        assert!(
            matches!(x.merge(&y), Err(CalibError::MatrixMismatch { ref tensor, left: 2, right: 1 }) if tensor == "t")
        );
    }

    #[test]
    fn mismatched_formats_are_refused() {
        let mut x = gguf(&[]);
        let y = Imatrix::new(ImatrixFormat::Legacy);
        assert!(matches!(
            x.merge(&y),
            Err(CalibError::FormatMismatch {
                left: ImatrixFormat::Gguf,
                right: ImatrixFormat::Legacy
            })
        ));
    }

    #[test]
    fn mismatched_chunk_sizes_are_refused() {
        let mut x = gguf(&[]);
        let mut y = gguf(&[]);
        y.chunk_size = Some(512);
        assert!(matches!(
            x.merge(&y),
            Err(CalibError::ChunkSizeMismatch {
                left: 128,
                right: 512
            })
        ));
    }

    #[test]
    fn overflowing_counts_are_refused() {
        let mut x = gguf(&[
            ("a", entry(1, &[1.0], &[1])),
            ("t", entry(1, &[1.0], &[i64::MAX])),
        ]);
        let y = gguf(&[("a", entry(1, &[1.0], &[1])), ("t", entry(1, &[1.0], &[1]))]);
        let before = x.clone();
        assert!(matches!(x.merge(&y), Err(CalibError::CountOverflow { ref what }) if what == "t"));
        assert_eq!(x, before, "a failed merge changes nothing");

        let mut x = gguf(&[]);
        x.chunk_count = Some(u32::MAX);
        assert!(
            matches!(x.merge(&gguf(&[])), Err(CalibError::CountOverflow { ref what }) if what == "chunk count")
        );

        let mut e = entry(1, &[0.0], &[i64::MAX]);
        assert!(matches!(
            e.add_row(0, &[1.0]),
            Err(CalibError::CountOverflow { .. })
        ));
        assert_eq!(e.sums(), &[0.0]);
    }

    #[test]
    fn include_keeps_only_matching_entries() {
        let names = [
            "blk.0.attn_q.weight",
            "blk.0.ffn_up.weight",
            "blk.1.attn_k.weight",
            "output.weight",
        ];
        let mut m = gguf(&names.map(|n| (n, entry(1, &[1.0], &[1]))));
        m.filter_entries(&["attn_", "output"], &[]).unwrap();
        assert_eq!(
            m.entries.keys().collect::<Vec<_>>(),
            [
                "blk.0.attn_q.weight",
                "blk.1.attn_k.weight",
                "output.weight"
            ]
        );
    }

    #[test]
    fn exclude_drops_matching_entries() {
        let names = [
            "blk.0.attn_q.weight",
            "blk.0.ffn_up.weight",
            "blk.1.attn_k.weight",
        ];
        let mut m = gguf(&names.map(|n| (n, entry(1, &[1.0], &[1]))));
        m.filter_entries::<&str>(&[], &["blk.0."]).unwrap();
        assert_eq!(
            m.entries.keys().collect::<Vec<_>>(),
            ["blk.1.attn_k.weight"]
        );
        m.filter_entries::<&str>(&[], &[""]).unwrap();
        assert!(m.is_empty());
        // No filter: nothing changes.
        let mut n = gguf(&names.map(|n| (n, entry(1, &[1.0], &[1]))));
        n.filter_entries::<String>(&[], &[]).unwrap();
        assert_eq!(n.len(), 3);
    }

    #[test]
    fn include_and_exclude_together_are_refused() {
        let mut m = gguf(&[("a", entry(1, &[1.0], &[1]))]);
        assert!(matches!(
            m.filter_entries(&["a"], &["b"]),
            Err(CalibError::IncludeAndExclude)
        ));
        assert_eq!(m.len(), 1);
    }

    #[test]
    fn lookup_prefers_the_gguf_name_then_the_hf_name() {
        let m = gguf(&[
            ("blk.0.attn_q.weight", entry(1, &[2.0], &[1])),
            (
                "model.layers.0.self_attn.q_proj.weight",
                entry(1, &[3.0], &[1]),
            ),
            (
                "model.layers.1.self_attn.q_proj.weight",
                entry(1, &[5.0], &[1]),
            ),
        ]);
        let (name, _) = m
            .lookup(
                "blk.0.attn_q.weight",
                "model.layers.0.self_attn.q_proj.weight",
            )
            .unwrap();
        assert_eq!(name, "blk.0.attn_q.weight");
        assert_eq!(
            m.quant_weights_for(
                "blk.1.attn_q.weight",
                "model.layers.1.self_attn.q_proj.weight"
            ),
            Some(vec![5.0])
        );
        assert_eq!(
            m.quant_weights_for("blk.2.attn_q.weight", "model.layers.2.x"),
            None
        );
        assert_eq!(m.quant_weights("blk.0.attn_q.weight"), Some(vec![2.0]));
    }

    #[test]
    fn required_metadata_depends_on_the_format() {
        let mut m = gguf(&[]);
        assert!(m.has_required_metadata());
        m.datasets = None;
        assert!(!m.has_required_metadata());
        assert!(Imatrix::new(ImatrixFormat::Legacy).has_required_metadata());
        assert!(!Imatrix::new(ImatrixFormat::Gguf).has_required_metadata());
    }
}
