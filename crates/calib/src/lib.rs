//! Calibration statistics, kept in mergeable form.
//!
//! An importance matrix records, for every input column of a linear layer, the sum of squared
//! activations seen during calibration and how many rows contributed ([`ColumnStats`]).
//! Statistics stay as sums and counts (never means) so that files from several calibration runs
//! can be merged exactly ([`ColumnStats::merge`]); consumers divide only when they read
//! ([`ColumnStats::mean_squares`]). [`Imatrix`] maps tensor names to their statistics in name order,
//! so nothing about it depends on hash order.
//!
//! Readers for llama.cpp's imatrix formats and kiln's own statistics file come with the
//! quantization issues that use them.

#![deny(unsafe_code)]
#![deny(missing_docs)]

use std::collections::BTreeMap;

/// Why statistics cannot be combined.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CalibError {
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
}

/// Per-column sums of squared activations and the number of rows summed.
#[derive(Debug, Clone, PartialEq)]
pub struct ColumnStats {
    /// Σ x² per input column.
    pub sum_squares: Vec<f64>,
    /// Rows (tokens) that contributed.
    pub count: u64,
}

impl ColumnStats {
    /// Empty statistics for `columns` columns.
    pub fn new(columns: usize) -> ColumnStats {
        ColumnStats {
            sum_squares: vec![0.0; columns],
            count: 0,
        }
    }

    /// Adds one row of activations.
    pub fn add_row(&mut self, row: &[f32]) {
        for (s, x) in self.sum_squares.iter_mut().zip(row) {
            *s += f64::from(*x) * f64::from(*x);
        }
        self.count += 1;
    }

    /// Adds another run's statistics (same columns).
    pub fn merge(&mut self, other: &ColumnStats) -> Result<(), CalibError> {
        if other.sum_squares.len() != self.sum_squares.len() {
            return Err(CalibError::ColumnMismatch {
                tensor: String::new(),
                left: self.sum_squares.len(),
                right: other.sum_squares.len(),
            });
        }
        for (s, o) in self.sum_squares.iter_mut().zip(&other.sum_squares) {
            *s += o;
        }
        self.count += other.count;
        Ok(())
    }

    /// Mean of x² per column (zeros when nothing was counted).
    pub fn mean_squares(&self) -> Vec<f32> {
        if self.count == 0 {
            return vec![0.0; self.sum_squares.len()];
        }
        self.sum_squares
            .iter()
            .map(|s| (s / self.count as f64) as f32)
            .collect()
    }
}

/// Column statistics per tensor name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Imatrix {
    /// Statistics by tensor name.
    pub tensors: BTreeMap<String, ColumnStats>,
}

impl Imatrix {
    /// Merges another importance matrix into this one, tensor by tensor.
    pub fn merge(&mut self, other: &Imatrix) -> Result<(), CalibError> {
        for (name, stats) in &other.tensors {
            match self.tensors.get_mut(name) {
                Some(mine) => mine.merge(stats).map_err(|e| match e {
                    CalibError::ColumnMismatch { left, right, .. } => CalibError::ColumnMismatch {
                        tensor: name.clone(),
                        left,
                        right,
                    },
                })?,
                None => {
                    self.tensors.insert(name.clone(), stats.clone());
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merging_equals_one_run() {
        let rows = [[1.0f32, -2.0], [3.0, 0.5], [0.0, 4.0]];
        let mut all = ColumnStats::new(2);
        rows.iter().for_each(|r| all.add_row(r));
        let mut a = ColumnStats::new(2);
        a.add_row(&rows[0]);
        let mut b = ColumnStats::new(2);
        b.add_row(&rows[1]);
        b.add_row(&rows[2]);
        a.merge(&b).unwrap();
        assert_eq!(a, all);
        assert_eq!(all.mean_squares(), vec![10.0 / 3.0, 20.25 / 3.0]);
    }

    #[test]
    fn mismatched_columns_are_refused() {
        let mut x = Imatrix::default();
        x.tensors.insert("t".into(), ColumnStats::new(2));
        let mut y = Imatrix::default();
        y.tensors.insert("t".into(), ColumnStats::new(3));
        assert!(
            matches!(x.merge(&y), Err(CalibError::ColumnMismatch { ref tensor, left: 2, right: 3 }) if tensor == "t")
        );
    }
}
