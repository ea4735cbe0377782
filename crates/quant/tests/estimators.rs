//! Range estimators on distributions where the right answer is known.
//!
//! Data come from a seeded xorshift64* generator with Box–Muller Gaussians (`common/mod.rs`), so
//! every run and every machine sees the same numbers.

mod common;

use common::Rng;
use kiln_quant::affine::{quantize, Granularity, QuantScheme, Range};
use kiln_quant::estimators::{estimate_range, estimate_ranges, Estimator};

const OUTLIER: f32 = 40.0;

/// 16 384 standard normal values with four injected outliers of magnitude about 40 (the largest
/// Gaussian value is about 4.4).
fn gaussian_with_outliers() -> Vec<f32> {
    let mut x = Rng::new(42).gaussians(16_384);
    for (i, v) in [
        (100, OUTLIER),
        (5000, -OUTLIER),
        (9000, 38.0),
        (15_000, -39.0),
    ] {
        x[i] = v;
    }
    x
}

fn tensor(bits: u8, symmetric: bool) -> QuantScheme {
    QuantScheme::new(bits, symmetric, Granularity::Tensor).unwrap()
}

fn abs_max(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |m, v| m.max(v.abs()))
}

/// Sum of squared quantization errors over the whole tensor for one range.
fn sq_error(x: &[f32], scheme: &QuantScheme, range: Range) -> f64 {
    let q = quantize(x, 1, x.len(), scheme, &[range]).unwrap();
    x.iter()
        .zip(q.dequantize())
        .map(|(&a, b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum()
}

#[test]
fn min_max_keeps_the_outliers() {
    let x = gaussian_with_outliers();
    for symmetric in [true, false] {
        let r = estimate_range(&x, &tensor(4, symmetric), Estimator::MinMax).unwrap();
        assert_eq!((r.min, r.max), (-OUTLIER, OUTLIER), "symmetric={symmetric}");
    }
}

#[test]
fn percentile_clips_the_outliers() {
    let x = gaussian_with_outliers();
    let est = Estimator::Percentile { percentile: 99.9 };
    // Symmetric: the 99.9th percentile of |x| of a standard normal is 3.29.
    let r = estimate_range(&x, &tensor(4, true), est).unwrap();
    assert!(r.max > 3.0 && r.max < 4.0, "{r:?}");
    assert_eq!(r.min, -r.max);
    // Per side: the 0.1st and 99.9th percentiles, about ±3.09.
    let r = estimate_range(&x, &tensor(4, false), est).unwrap();
    assert!(r.min < -2.8 && r.min > -3.6, "{r:?}");
    assert!(r.max > 2.8 && r.max < 3.6, "{r:?}");
}

#[test]
fn mse_clips_the_outliers_at_4_bits() {
    let x = gaussian_with_outliers();
    for symmetric in [true, false] {
        let s = tensor(4, symmetric);
        let r = estimate_range(&x, &s, Estimator::MSE_DEFAULT).unwrap();
        // Much smaller than the outliers: at 4 bits a 40-wide range rounds all the Gaussian mass
        // to zero, which costs more than clipping four values.
        assert!(r.max < 0.5 * OUTLIER && r.min > -0.5 * OUTLIER, "{r:?}");
        let minmax = estimate_range(&x, &s, Estimator::MinMax).unwrap();
        assert!(sq_error(&x, &s, r) < 0.5 * sq_error(&x, &s, minmax));
    }
}

#[test]
fn mse_keeps_the_outliers_at_8_bits_where_the_grid_is_fine() {
    // The opposite case: with 256 levels the Gaussian bulk is already fine, and clipping the four
    // outliers would cost more than it saves, so the range stays (nearly) full.
    let x = gaussian_with_outliers();
    let r = estimate_range(&x, &tensor(8, true), Estimator::MSE_DEFAULT).unwrap();
    assert!(r.max > 0.9 * OUTLIER, "{r:?}");
}

#[test]
fn mse_on_a_gaussian_finds_the_known_4_bit_clip() {
    // The MSE-optimal symmetric clip of a standard normal at 4 bits is about 2.5 sigma.
    let x = Rng::new(7).gaussians(65_536);
    let r = estimate_range(&x, &tensor(4, true), Estimator::MSE_DEFAULT).unwrap();
    assert!(r.max > 2.2 && r.max < 2.9, "{r:?}");
}

#[test]
fn mse_on_uniform_data_keeps_the_full_range() {
    let mut rng = Rng::new(3);
    let x: Vec<f32> = (0..16_384)
        .map(|_| (rng.uniform() * 2.0 - 1.0) as f32)
        .collect();
    let full = abs_max(&x);
    for bits in [4, 8] {
        for symmetric in [true, false] {
            let r = estimate_range(&x, &tensor(bits, symmetric), Estimator::MSE_DEFAULT).unwrap();
            assert!(
                r.max >= 0.95 * full && r.min <= -0.95 * full,
                "{bits} bits, symmetric={symmetric}: {r:?}"
            );
        }
    }
}

#[test]
fn kl_clips_the_outliers() {
    let x = gaussian_with_outliers();
    for bits in [4, 8] {
        for symmetric in [true, false] {
            let r = estimate_range(&x, &tensor(bits, symmetric), Estimator::KL_DEFAULT).unwrap();
            assert!(
                r.max > 2.5 && r.max < 5.0 && r.min < -2.5 && r.min > -5.0,
                "{bits} bits, symmetric={symmetric}: {r:?}"
            );
        }
    }
}

#[test]
fn kl_on_a_gaussian_picks_a_threshold_below_the_max() {
    let x = Rng::new(7).gaussians(65_536);
    let max = abs_max(&x);
    // 8 levels per side: the sparse tail is not worth levels.
    let r = estimate_range(&x, &tensor(4, true), Estimator::KL_DEFAULT).unwrap();
    assert!(r.max > 2.5 && r.max < 0.9 * max, "max {max}: {r:?}");
    // 128 levels per side: still clipped, by less.
    let r8 = estimate_range(&x, &tensor(8, true), Estimator::KL_DEFAULT).unwrap();
    assert!(r8.max > r.max && r8.max < max, "max {max}: {r8:?}");
}

#[test]
fn per_group_ranges_isolate_a_hot_group() {
    // 4 rows x 1024 columns in groups of 256 (KL needs a few hundred values per group to have a
    // histogram worth the name); group 1 of row 2 is ten times larger than the rest.
    let (rows, cols, g) = (4, 1024, 256);
    let mut x = Rng::new(11).gaussians(rows * cols);
    for v in &mut x[2 * cols + g..2 * cols + 2 * g] {
        *v *= 10.0;
    }
    let s = QuantScheme::new(4, true, Granularity::Group(g)).unwrap();
    let hot = 2 * (cols / g) + 1;
    for est in [
        Estimator::MinMax,
        Estimator::Percentile { percentile: 99.0 },
        Estimator::MSE_DEFAULT,
        Estimator::Kl { bins: 128 },
    ] {
        let ranges = estimate_ranges(&x, rows, cols, &s, est).unwrap();
        assert_eq!(ranges.len(), rows * cols / g);
        let coldest_hot = ranges[hot].max;
        for (i, r) in ranges.iter().enumerate() {
            if i != hot {
                assert!(
                    r.max * 3.0 < coldest_hot,
                    "{est:?}: group {i} {r:?} vs {coldest_hot}"
                );
            }
        }
    }
    // Per channel, the hot row stands out; per tensor, one range covers everything.
    let c = QuantScheme::new(4, true, Granularity::Channel).unwrap();
    let ranges = estimate_ranges(&x, rows, cols, &c, Estimator::MinMax).unwrap();
    assert_eq!(ranges.len(), rows);
    let hottest = (0..rows)
        .max_by(|&a, &b| ranges[a].max.total_cmp(&ranges[b].max))
        .unwrap();
    assert_eq!(hottest, 2);
    let t = tensor(4, true);
    assert_eq!(
        estimate_ranges(&x, rows, cols, &t, Estimator::MinMax)
            .unwrap()
            .len(),
        1
    );
    // Group-wise parameters protect the other groups from the hot one.
    let grouped = estimate_ranges(&x, rows, cols, &s, Estimator::MinMax).unwrap();
    let qg = quantize(&x, rows, cols, &s, &grouped).unwrap().dequantize();
    let whole = estimate_ranges(&x, rows, cols, &t, Estimator::MinMax).unwrap();
    let qt = quantize(&x, rows, cols, &t, &whole).unwrap().dequantize();
    let err = |d: &[f32]| -> f64 {
        x.iter()
            .zip(d)
            .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
            .sum()
    };
    assert!(err(&qg) < 0.25 * err(&qt));
}

#[test]
fn estimates_are_deterministic() {
    let x = gaussian_with_outliers();
    let s = QuantScheme::new(4, false, Granularity::Group(128)).unwrap();
    for est in [
        Estimator::Percentile { percentile: 99.9 },
        Estimator::MSE_DEFAULT,
        Estimator::Kl { bins: 128 },
    ] {
        let a = estimate_ranges(&x, 128, 128, &s, est).unwrap();
        let b = estimate_ranges(&x, 128, 128, &s, est).unwrap();
        assert_eq!(a, b, "{est:?}");
    }
}

/// A histogram of |x| as `kiln calibrate` records it: `bins` bins over `[0, max)`, larger values
/// in the last bin.
fn magnitude_histogram(x: &[f32], bins: usize, max: f32) -> Vec<u64> {
    let mut counts = vec![0u64; bins];
    for v in x {
        let pos = f64::from(v.abs()) * bins as f64 / f64::from(max);
        counts[(pos as usize).min(bins - 1)] += 1;
    }
    counts
}

/// Static activation scales (W8A8) come from statistics, not from the activations: the same
/// outlier test through the histogram path. Min–max keeps the outliers; percentile, MSE (at 4 bits)
/// and KL clip them, and each agrees with the estimator run on the values themselves to within
/// the histogram's resolution.
#[test]
fn activation_thresholds_from_a_histogram() {
    use kiln_quant::estimators::{activation_threshold, MagnitudeHistogram};
    let x = gaussian_with_outliers();
    let absmax = abs_max(&x);
    let (bins, max) = (2048, 64.0f32);
    let counts = magnitude_histogram(&x, bins, max);
    let h = Some(MagnitudeHistogram {
        counts: &counts,
        max,
    });
    let width = max / bins as f32;
    let values =
        |bits: u8, est: Estimator| estimate_range(&x, &tensor(bits, true), est).unwrap().max;

    assert_eq!(
        activation_threshold(absmax, None, 8, Estimator::MinMax).unwrap(),
        absmax
    );
    let p = Estimator::Percentile { percentile: 99.9 };
    let from_hist = activation_threshold(absmax, h, 8, p).unwrap();
    assert!(from_hist < 5.0, "percentile clips: {from_hist}");
    assert!(
        (from_hist - values(8, p)).abs() <= width,
        "{from_hist} vs {}",
        values(8, p)
    );

    let mse4 = activation_threshold(absmax, h, 4, Estimator::MSE_DEFAULT).unwrap();
    assert!(mse4 < 0.5 * absmax, "4-bit MSE clips: {mse4}");
    let rel = (mse4 - values(4, Estimator::MSE_DEFAULT)).abs() / values(4, Estimator::MSE_DEFAULT);
    assert!(
        rel <= 0.05,
        "{mse4} vs {}",
        values(4, Estimator::MSE_DEFAULT)
    );

    let kl = activation_threshold(absmax, h, 8, Estimator::KL_DEFAULT).unwrap();
    assert!(kl < 0.5 * absmax, "KL clips: {kl}");
    // The same search on the same binning, once the histogram spans exactly [0, absmax).
    let exact = magnitude_histogram(&x, bins, absmax);
    let kl_exact = activation_threshold(
        absmax,
        Some(MagnitudeHistogram {
            counts: &exact,
            max: absmax,
        }),
        8,
        Estimator::KL_DEFAULT,
    )
    .unwrap();
    let kl_values = values(8, Estimator::KL_DEFAULT);
    assert!(
        (kl_exact - kl_values).abs() <= absmax / bins as f32,
        "{kl_exact} vs {kl_values}"
    );

    // Histogram estimators need a histogram; KL needs at least 128 bins at 8 bits.
    assert!(activation_threshold(absmax, None, 8, p).is_err());
    let few = magnitude_histogram(&x, 64, max);
    let small = Some(MagnitudeHistogram { counts: &few, max });
    assert!(activation_threshold(absmax, small, 8, Estimator::KL_DEFAULT).is_err());
    assert!(activation_threshold(f32::NAN, h, 8, p).is_err());
}
