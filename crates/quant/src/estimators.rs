//! Range estimators: how to choose the clipping range each parameter group of a weight (or
//! activation) matrix is quantized over.
//!
//! The groups are those of an [`affine::QuantScheme`]: the whole
//! tensor, each row (output channel), or each run of `G` columns within a row; the result is one
//! [`Range`] per group in scale order, ready for [`affine::quantize`].
//! For a symmetric scheme every estimator returns a symmetric range `[-a, a]`; for an asymmetric
//! one it returns `[lo, hi]` (which the quantizer widens to include 0).
//!
//! - [`Estimator::MinMax`]: the extremes. Never clips; one outlier sets the step for the group.
//! - [`Estimator::Percentile`]: the `p`-th percentile of |x| (symmetric) or the `(100 - p)`-th and
//!   `p`-th percentiles of x (asymmetric), with linear interpolation between order statistics
//!   (numpy's default).
//! - [`Estimator::Mse`]: shrink the min–max range by ratios `1 - i/grid` for `i` in
//!   `0..floor(max_shrink * grid)` (GPTQ's grid search) and keep the one whose quantize–dequantize
//!   round trip under the scheme has the smallest squared error; ties keep the wider range.
//! - [`Estimator::Kl`]: TensorRT's entropy calibration. Histogram |x| into `bins` bins over
//!   `[0, max|x|]`; for each candidate threshold of `i` bins (`i` from the level count up), fold
//!   the mass beyond it into the last bin (P), merge the `i` bins into `2^(b-1)` quantization
//!   levels and spread each level's mass back over its non-empty bins (Q), smooth both, and keep
//!   the threshold with the smallest KL(P ‖ Q) (the first on ties). An asymmetric scheme runs this
//!   separately on the positive values and on the magnitudes of the negative ones, each side with
//!   `2^(b-1)` levels. Cost: O(bins²) per group, so use fewer bins for per-channel or per-group
//!   ranges of large matrices. The histogram needs data: with a few dozen values per group most
//!   bins are empty and the chosen threshold is erratic (far below the group's spread); use MSE
//!   or percentile for small groups.
//!
//! Non-finite values (NaN, ±∞) are ignored by every estimator; a group with no finite value gets
//! the range `[0, 0]`. Everything is deterministic: fixed iteration order, f64 accumulation where
//! sums are formed, total-order sorting.

use crate::affine::{self, AffineError, QuantScheme, Range};

/// How to choose a clipping range.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Estimator {
    /// Minimum and maximum.
    MinMax,
    /// Percentile clipping; `percentile` in (0, 100], e.g. 99.9.
    Percentile {
        /// The upper percentile.
        percentile: f32,
    },
    /// MSE-optimal shrink of the min–max range over a fixed grid.
    Mse {
        /// Grid resolution: candidate ratios are `1 - i/grid` (at least 1).
        grid: usize,
        /// Largest shrink tried, in (0, 1]: ratios go down to just above `1 - max_shrink`.
        max_shrink: f32,
    },
    /// Entropy (KL-divergence) calibration on a histogram.
    Kl {
        /// Histogram bins (TensorRT uses 2048); at least `2^(b-1)`.
        bins: usize,
    },
}

impl Estimator {
    /// GPTQ's MSE search grid: 100 steps, shrinking by up to 80 %.
    pub const MSE_DEFAULT: Self = Self::Mse {
        grid: 100,
        max_shrink: 0.8,
    };
    /// TensorRT's histogram size.
    pub const KL_DEFAULT: Self = Self::Kl { bins: 2048 };

    fn validate(&self, scheme: &QuantScheme) -> Result<(), AffineError> {
        match *self {
            Self::MinMax => Ok(()),
            Self::Percentile { percentile } => {
                if percentile > 0.0 && percentile <= 100.0 {
                    Ok(())
                } else {
                    Err(AffineError::Parameter("percentile must be in (0, 100]"))
                }
            }
            Self::Mse { grid, max_shrink } => {
                if grid == 0 {
                    Err(AffineError::Parameter("MSE grid must be at least 1"))
                } else if !(max_shrink > 0.0 && max_shrink <= 1.0) {
                    Err(AffineError::Parameter("MSE max_shrink must be in (0, 1]"))
                } else {
                    Ok(())
                }
            }
            Self::Kl { bins } => {
                if bins < kl_levels(scheme) {
                    Err(AffineError::Parameter(
                        "KL needs at least 2^(bits-1) histogram bins",
                    ))
                } else {
                    Ok(())
                }
            }
        }
    }
}

/// One clipping range per parameter group of a `rows × cols` row-major matrix, in scale order.
pub fn estimate_ranges(
    weights: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    estimator: Estimator,
) -> Result<Vec<Range>, AffineError> {
    estimator.validate(scheme)?;
    let groups = affine::group_slices(weights, rows, cols, scheme)?;
    Ok(groups
        .iter()
        .map(|g| range_of(g, scheme, estimator))
        .collect())
}

/// The clipping range of one group of values (the scheme's granularity is not used).
pub fn estimate_range(
    values: &[f32],
    scheme: &QuantScheme,
    estimator: Estimator,
) -> Result<Range, AffineError> {
    scheme.validate()?;
    estimator.validate(scheme)?;
    Ok(range_of(values, scheme, estimator))
}

fn range_of(values: &[f32], scheme: &QuantScheme, estimator: Estimator) -> Range {
    match estimator {
        Estimator::MinMax => min_max(values, scheme.symmetric),
        Estimator::Percentile { percentile } => percentile_range(values, percentile, scheme),
        Estimator::Mse { grid, max_shrink } => mse_range(values, scheme, grid, max_shrink),
        Estimator::Kl { bins } => kl_range(values, scheme, bins),
    }
}

fn finite(values: &[f32]) -> impl Iterator<Item = f32> + '_ {
    values.iter().copied().filter(|v| v.is_finite())
}

fn min_max(values: &[f32], symmetric: bool) -> Range {
    let mut lo = f32::INFINITY;
    let mut hi = f32::NEG_INFINITY;
    for v in finite(values) {
        lo = lo.min(v);
        hi = hi.max(v);
    }
    if lo > hi {
        return Range::new(0.0, 0.0);
    }
    if symmetric {
        let a = lo.abs().max(hi.abs());
        Range::new(-a, a)
    } else {
        Range::new(lo, hi)
    }
}

/// Linear-interpolation percentile of sorted data (numpy's default method).
fn percentile_sorted(sorted: &[f32], p: f64) -> f32 {
    match sorted.len() {
        0 => 0.0,
        1 => sorted[0],
        n => {
            let pos = p / 100.0 * (n - 1) as f64;
            let i = (pos.floor() as usize).min(n - 1);
            let j = (i + 1).min(n - 1);
            let frac = pos - i as f64;
            let a = f64::from(sorted[i]);
            let b = f64::from(sorted[j]);
            (a + (b - a) * frac) as f32
        }
    }
}

fn percentile_range(values: &[f32], percentile: f32, scheme: &QuantScheme) -> Range {
    let p = f64::from(percentile);
    if scheme.symmetric {
        let mut mags: Vec<f32> = finite(values).map(f32::abs).collect();
        mags.sort_by(f32::total_cmp);
        let a = percentile_sorted(&mags, p);
        Range::new(-a, a)
    } else {
        let mut xs: Vec<f32> = finite(values).collect();
        xs.sort_by(f32::total_cmp);
        Range::new(percentile_sorted(&xs, 100.0 - p), percentile_sorted(&xs, p))
    }
}

fn mse_range(values: &[f32], scheme: &QuantScheme, grid: usize, max_shrink: f32) -> Range {
    let base = min_max(values, scheme.symmetric);
    let xs: Vec<f32> = finite(values).collect();
    let (qmin, qmax) = (scheme.qmin(), scheme.qmax());
    let steps = ((f64::from(max_shrink) * grid as f64) as usize).max(1);
    let mut best = base;
    let mut best_err = f64::INFINITY;
    for i in 0..steps {
        let ratio = (1.0 - i as f64 / grid as f64) as f32;
        let candidate = Range::new(base.min * ratio, base.max * ratio);
        let (scale, zp) = affine::qparams(candidate, scheme);
        let err = affine::quantization_sq_error(&xs, scale, zp, qmin, qmax);
        // Strictly smaller only: on ties the wider range (found first) stays.
        if err < best_err {
            best_err = err;
            best = candidate;
        }
    }
    best
}

/// Quantization levels per side for the KL search: `2^(b-1)` (128 for 8 bits, as TensorRT).
fn kl_levels(scheme: &QuantScheme) -> usize {
    1usize << (scheme.bits.clamp(affine::MIN_BITS, affine::MAX_BITS) - 1)
}

fn kl_range(values: &[f32], scheme: &QuantScheme, bins: usize) -> Range {
    let levels = kl_levels(scheme);
    if scheme.symmetric {
        let mags: Vec<f32> = finite(values).map(f32::abs).collect();
        let a = kl_threshold(&mags, bins, levels);
        Range::new(-a, a)
    } else {
        let pos: Vec<f32> = finite(values).filter(|&v| v > 0.0).collect();
        let neg: Vec<f32> = finite(values).filter(|&v| v < 0.0).map(|v| -v).collect();
        Range::new(
            -kl_threshold(&neg, bins, levels),
            kl_threshold(&pos, bins, levels),
        )
    }
}

/// TensorRT-style entropy calibration on non-negative magnitudes; returns the threshold.
fn kl_threshold(mags: &[f32], bins: usize, levels: usize) -> f32 {
    let max = mags.iter().copied().fold(0.0f32, f32::max);
    if max <= 0.0 || bins == 0 {
        return 0.0;
    }
    let width = f64::from(max) / bins as f64;
    let mut hist = vec![0.0f64; bins];
    for &m in mags {
        let idx = ((f64::from(m) / width) as usize).min(bins - 1);
        hist[idx] += 1.0;
    }
    kl_threshold_of_histogram(&hist, width, levels)
}

/// The KL search over a histogram of magnitudes with bins of `width` (the last bin holds
/// everything beyond); returns the threshold.
fn kl_threshold_of_histogram(hist: &[f64], width: f64, levels: usize) -> f32 {
    let bins = hist.len();
    if bins == 0 {
        return 0.0;
    }
    // Suffix sums give the outlier mass beyond each candidate in O(1).
    let mut beyond = vec![0.0f64; bins + 1];
    for i in (0..bins).rev() {
        beyond[i] = beyond[i + 1] + hist[i];
    }
    let mut best_i = bins;
    let mut best_kl = f64::INFINITY;
    let mut p = vec![0.0f64; bins];
    let mut q = vec![0.0f64; bins];
    for i in levels.max(1)..=bins {
        let (p, q) = (&mut p[..i], &mut q[..i]);
        p.copy_from_slice(&hist[..i]);
        p[i - 1] += beyond[i];
        // Merge the i bins into `levels` groups (the last one takes the remainder) and spread
        // each group's mass evenly over the bins where P is non-zero.
        let merged = i / levels;
        for j in 0..levels {
            let start = j * merged;
            let stop = if j + 1 == levels { i } else { start + merged };
            let total: f64 = hist[start..stop].iter().sum();
            let nonzero = p[start..stop].iter().filter(|&&v| v != 0.0).count();
            for k in start..stop {
                q[k] = if nonzero != 0 && p[k] != 0.0 {
                    total / nonzero as f64
                } else {
                    0.0
                };
            }
        }
        if !(smooth(p) && smooth(q)) {
            continue;
        }
        let kl = kl_divergence(p, q);
        if kl < best_kl {
            best_kl = kl;
            best_i = i;
        }
    }
    (best_i as f64 * width) as f32
}

/// A histogram of `|x|`: `counts[i]` values in `[i·max/n, (i+1)·max/n)`, the last bin also
/// holding every larger value (as `kiln calibrate` records them).
#[derive(Debug, Clone, Copy)]
pub struct MagnitudeHistogram<'a> {
    /// Values per bin.
    pub counts: &'a [u64],
    /// Upper end of the binned range.
    pub max: f32,
}

/// The clipping threshold `a` of a symmetric per-tensor scale (`a / qmax`) for a layer's input,
/// from the statistics a calibration run keeps instead of the activations themselves: the
/// largest `|x|` seen and, for every estimator but min–max, a histogram of `|x|`.
///
/// - min–max: `absmax`.
/// - percentile: the `p`-th percentile of `|x|`, interpolated linearly inside its bin.
/// - MSE: the shrink of `absmax` on the estimator's grid that minimizes the histogram's expected
///   round-trip error, each bin's values taken at the bin's centre (the overflow bin at
///   `absmax`); ties keep the wider range.
/// - KL: TensorRT's search on the histogram itself (its bins, not the estimator's `bins`).
///
/// The result never exceeds `absmax`. Errors: bits outside 2..=8, bad estimator parameters, a
/// histogram estimator without a histogram, or a non-finite or negative `absmax`.
pub fn activation_threshold(
    absmax: f32,
    histogram: Option<MagnitudeHistogram<'_>>,
    bits: u8,
    estimator: Estimator,
) -> Result<f32, AffineError> {
    let scheme = QuantScheme {
        bits,
        symmetric: true,
        granularity: affine::Granularity::Tensor,
    };
    scheme.validate()?;
    if let Estimator::Kl { .. } = estimator {
        // The histogram's own bins are used; only the level count matters here.
    } else {
        estimator.validate(&scheme)?;
    }
    if !(absmax.is_finite() && absmax >= 0.0) {
        return Err(AffineError::Parameter(
            "activation absmax must be finite and non-negative",
        ));
    }
    if estimator == Estimator::MinMax || absmax == 0.0 {
        return Ok(absmax);
    }
    let h = histogram.ok_or(AffineError::Parameter(
        "this activation estimator needs a histogram of |x| (kiln calibrate --hist-bins --hist-max)",
    ))?;
    if h.counts.is_empty() || !(h.max.is_finite() && h.max > 0.0) {
        return Err(AffineError::Parameter(
            "empty or invalid activation histogram",
        ));
    }
    let n = h.counts.len();
    let width = f64::from(h.max) / n as f64;
    let total: f64 = h.counts.iter().map(|&c| c as f64).sum();
    if total == 0.0 {
        return Ok(absmax);
    }
    let threshold = match estimator {
        Estimator::MinMax => f64::from(absmax),
        Estimator::Percentile { percentile } => {
            let target = f64::from(percentile) / 100.0 * total;
            let mut below = 0.0;
            let mut found = f64::from(absmax);
            for (i, &c) in h.counts.iter().enumerate() {
                let c = c as f64;
                if c > 0.0 && below + c >= target {
                    found = (i as f64 + (target - below) / c) * width;
                    break;
                }
                below += c;
            }
            found
        }
        Estimator::Mse { grid, max_shrink } => {
            let qmax = f64::from(scheme.qmax());
            let centres: Vec<f64> = (0..n)
                .map(|i| {
                    if i + 1 == n {
                        // The overflow bin: its values reach the largest seen.
                        f64::from(absmax).max((i as f64 + 0.5) * width)
                    } else {
                        (i as f64 + 0.5) * width
                    }
                    .min(f64::from(absmax))
                })
                .collect();
            let steps = ((f64::from(max_shrink) * grid as f64) as usize).max(1);
            let mut best = f64::from(absmax);
            let mut best_err = f64::INFINITY;
            for i in 0..steps {
                let a = f64::from(absmax) * (1.0 - i as f64 / grid as f64);
                let step = a / qmax;
                let err: f64 = h
                    .counts
                    .iter()
                    .zip(&centres)
                    .map(|(&c, &x)| {
                        let q = (x / step).round().min(qmax) * step;
                        c as f64 * (x - q) * (x - q)
                    })
                    .sum();
                if err < best_err {
                    best_err = err;
                    best = a;
                }
            }
            best
        }
        Estimator::Kl { .. } => {
            if n < kl_levels(&scheme) {
                return Err(AffineError::Parameter(
                    "KL needs at least 2^(bits-1) histogram bins",
                ));
            }
            let hist: Vec<f64> = h.counts.iter().map(|&c| c as f64).collect();
            f64::from(kl_threshold_of_histogram(&hist, width, kl_levels(&scheme)))
        }
    };
    Ok((threshold as f32).min(absmax))
}

/// MXNet's `_smooth_distribution`: move `eps` of mass onto every zero bin, taken evenly from the
/// non-zero ones. `false` when every bin is zero (the candidate is skipped).
fn smooth(d: &mut [f64]) -> bool {
    const EPS: f64 = 1e-4;
    let zeros = d.iter().filter(|&&v| v == 0.0).count();
    let nonzeros = d.len() - zeros;
    if nonzeros == 0 {
        return false;
    }
    let eps1 = EPS * zeros as f64 / nonzeros as f64;
    for v in d.iter_mut() {
        *v = if *v == 0.0 { EPS } else { *v - eps1 };
    }
    true
}

/// KL(P ‖ Q) of the normalized distributions (scipy's `entropy(p, q)`).
fn kl_divergence(p: &[f64], q: &[f64]) -> f64 {
    let ps: f64 = p.iter().sum();
    let qs: f64 = q.iter().sum();
    p.iter()
        .zip(q)
        .map(|(&a, &b)| {
            let a = a / ps;
            let b = b / qs;
            if a <= 0.0 {
                0.0
            } else if b <= 0.0 {
                f64::INFINITY
            } else {
                a * (a / b).ln()
            }
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::affine::Granularity;

    fn scheme(bits: u8, symmetric: bool) -> QuantScheme {
        QuantScheme::new(bits, symmetric, Granularity::Tensor).unwrap()
    }

    #[test]
    fn percentile_interpolates_like_numpy() {
        let sorted = [1.0, 2.0, 3.0, 4.0];
        assert_eq!(percentile_sorted(&sorted, 50.0), 2.5);
        assert_eq!(percentile_sorted(&sorted, 100.0), 4.0);
        assert_eq!(percentile_sorted(&sorted, 0.0), 1.0);
        assert_eq!(percentile_sorted(&[], 50.0), 0.0);
    }

    #[test]
    fn empty_and_non_finite_groups() {
        let s = scheme(4, false);
        for est in [
            Estimator::MinMax,
            Estimator::Percentile { percentile: 99.0 },
            Estimator::MSE_DEFAULT,
            Estimator::KL_DEFAULT,
        ] {
            assert_eq!(
                estimate_range(&[f32::NAN, f32::INFINITY], &s, est).unwrap(),
                Range::new(0.0, 0.0),
                "{est:?}"
            );
            assert_eq!(estimate_range(&[], &s, est).unwrap(), Range::new(0.0, 0.0));
        }
    }

    #[test]
    fn parameters_are_checked() {
        let s = scheme(8, true);
        for est in [
            Estimator::Percentile { percentile: 0.0 },
            Estimator::Percentile { percentile: 101.0 },
            Estimator::Mse {
                grid: 0,
                max_shrink: 0.5,
            },
            Estimator::Mse {
                grid: 10,
                max_shrink: 0.0,
            },
            Estimator::Kl { bins: 64 },
        ] {
            assert!(
                matches!(
                    estimate_range(&[1.0], &s, est),
                    Err(AffineError::Parameter(_))
                ),
                "{est:?}"
            );
        }
    }

    #[test]
    fn smoothing_moves_mass_to_empty_bins() {
        let mut d = [2.0, 0.0, 2.0, 0.0];
        assert!(smooth(&mut d));
        assert_eq!(d, [2.0 - 1e-4, 1e-4, 2.0 - 1e-4, 1e-4]);
        assert!(!smooth(&mut [0.0, 0.0]));
        assert_eq!(kl_divergence(&[1.0, 1.0], &[2.0, 2.0]), 0.0);
    }
}
