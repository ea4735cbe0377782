//! AWQ-style activation-aware quantization (Lin et al. 2023, "AWQ: Activation-aware Weight
//! Quantization for LLM Compression and Acceleration"; AutoAWQ's `_search_best_scale` and
//! `_compute_best_clip`), with the output error computed from the Gram matrix instead of by
//! running the layer.
//!
//! **Scale search** ([`awq_search_scales`]): for α = i/grid, i in `0..grid`, per-input-channel
//! scales `s_j = max(a_j^α, 1e-4) / sqrt(max(s)·min(s))` (AutoAWQ's normalization; `a_j` is the
//! channel's mean |x|, or its RMS from the Gram diagonal), quantize `W·diag(s)` with the scheme
//! and the estimator's ranges, dequantize, divide by `s`, and keep the α with the smallest output
//! error (the first on ties; α = 0 is plain RTN). This is exact when `1/s` is folded into the
//! operation producing the layer's input (a norm's weight or the previous linear layer), which is
//! what AWQ does; the result carries the quantization of `W·diag(s)` and `s` for a caller that
//! can fold.
//!
//! **Self-contained, packable result** ([`super::Method::Awq`]): a stored weight has one scale
//! per group, and `1/s_j` differs between the columns of a group, so it cannot be folded into the
//! group scales exactly (a group-constant `s` folds exactly but changes nothing, since uniform
//! quantization is scale-equivariant). kiln therefore packs the best of these candidates by the
//! output error of what is actually stored (the first on ties):
//!
//! 1. RTN of `W` with the estimator's ranges (so AWQ is never worse than RTN with the same
//!    estimator, and with the default min–max never worse than the reported baseline);
//! 2. RTN of the AWQ-adjusted weights `Ŵ = deq(quant(W·s))/s` of the searched α (AWQ as a weight
//!    transform that chooses rounding), when α > 0;
//! 3. AWQ's clipping search (`auto_clip`) on `W`: for each group, shrink the estimator's range by
//!    `1 − i/grid` for `i < grid/2` (AutoAWQ's `max_shrink = 0.5`) and keep the ratio with the
//!    smallest output error of the group alone, `(w_g − q_g)ᵀ·G_gg·(w_g − q_g)` (cross-group
//!    terms ignored, as AutoAWQ does by evaluating each group's partial output); per-tensor
//!    ranges are searched on the whole output error;
//! 4. the clipping search on `Ŵ` (scored against `W`), when α > 0.
//!
//! [`super::Details::Awq`] reports which candidate won, the searched α, and the folded error of
//! the scale search, so a caller sees what folding would have bought. On the synthetic layers of
//! the tests (`docs/methods.md`) the clipping search on `W` wins every time, often close to the
//! folded error (not for asymmetric groups, where folding is worth much more); re-quantizing `Ŵ`
//! loses most of what the scales gained, because a uniform group grid cannot keep the
//! per-column steps `scale/s_j` that made `Ŵ` good.

use rayon::prelude::*;

use super::linalg::{axpy, dot};
use super::{
    check_calibration, check_weights, output_error_unchecked, rtn, Calibration, Details,
    MethodError,
};
use crate::affine::{self, AffineQuantized, Granularity, QuantScheme, Range};
use crate::estimators::{self, Estimator};

/// AWQ's parameters; [`Default`] gives AutoAWQ's grid of 20 with min–max ranges and clipping
/// search on.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AwqConfig {
    /// α candidates `i/grid` for `i` in `0..grid` (at least 1), and the clipping grid.
    pub grid: usize,
    /// How the quantizer's ranges are chosen.
    pub estimator: Estimator,
    /// Include the clipping-search candidates (3 and 4 in the module docs).
    pub clip: bool,
}

impl Default for AwqConfig {
    fn default() -> Self {
        Self {
            grid: 20,
            estimator: Estimator::MinMax,
            clip: true,
        }
    }
}

/// The outcome of AWQ's scale search.
#[derive(Debug, Clone, PartialEq)]
pub struct AwqScales {
    /// The chosen exponent.
    pub alpha: f32,
    /// Per input column, the scale `s` the weights were multiplied by (`1/s` belongs in the
    /// operation that produces the layer's input).
    pub scales: Vec<f32>,
    /// The quantization of `W·diag(s)`.
    pub scaled: AffineQuantized,
    /// Output error / n of `deq(scaled)·diag(1/s)` against `W`, i.e. with `1/s` folded.
    pub error: f64,
}

/// AutoAWQ's floor on a scale before normalization.
const MIN_SCALE: f32 = 1e-4;

/// Per input column, the activation magnitude: mean |x| when given, else `sqrt(G_jj / n)`.
fn channel_magnitudes(calib: &Calibration<'_>, cols: usize) -> Vec<f32> {
    match calib.act_abs_mean {
        Some(a) => a.to_vec(),
        None => (0..cols)
            .map(|j| (calib.gram[j * cols + j] / calib.n as f64).sqrt() as f32)
            .collect(),
    }
}

/// `s_j = max(a_j^α, 1e-4)`, divided by `sqrt(max(s)·min(s))`; non-finite results become 1.
fn scales_for(alpha: f32, mags: &[f32]) -> Vec<f32> {
    let mut s: Vec<f32> = mags
        .iter()
        .map(|&a| a.abs().powf(alpha).max(MIN_SCALE))
        .collect();
    let hi = s.iter().fold(MIN_SCALE, |m, &v| m.max(v));
    let lo = s.iter().fold(f32::INFINITY, |m, &v| m.min(v));
    let norm = (hi * lo).sqrt();
    for v in &mut s {
        *v /= norm;
        if !v.is_finite() {
            *v = 1.0;
        }
    }
    s
}

/// Quantizes `W·diag(s)`; returns it and `deq/s`.
fn quantize_scaled(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    estimator: Estimator,
    s: &[f32],
) -> Result<(AffineQuantized, Vec<f32>), MethodError> {
    let scaled: Vec<f32> = w
        .chunks_exact(cols.max(1))
        .flat_map(|row| row.iter().zip(s).map(|(&x, &sj)| x * sj))
        .collect();
    let q = rtn(&scaled, rows, cols, scheme, estimator)?;
    let back: Vec<f32> = q
        .dequantize()
        .chunks_exact(cols.max(1))
        .flat_map(|row| {
            row.iter()
                .zip(s)
                .map(|(&x, &sj)| x / sj)
                .collect::<Vec<_>>()
        })
        .collect();
    Ok((q, back))
}

/// AWQ's scale search for a caller that folds `1/s` into the previous operation. Needs
/// `grid ≥ 1`; calibration and weights as for [`super::quantize_affine`].
pub fn awq_search_scales(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    cfg: &AwqConfig,
    calib: &Calibration<'_>,
) -> Result<AwqScales, MethodError> {
    scheme.validate()?;
    check_weights(w, rows, cols)?;
    check_calibration(calib, cols)?;
    search(w, rows, cols, scheme, cfg, calib).map(|(found, _)| found)
}

/// The α search with `1/s` folded: the candidate with the smallest output error (the first on
/// ties, so α = 0, plain RTN, wins when nothing improves on it). Also returns `Ŵ_α` of the best.
fn search(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    cfg: &AwqConfig,
    calib: &Calibration<'_>,
) -> Result<(AwqScales, Vec<f32>), MethodError> {
    if cfg.grid == 0 {
        return Err(MethodError::Parameter("AWQ grid must be at least 1"));
    }
    let mags = channel_magnitudes(calib, cols);
    let n = calib.n as f64;
    let mut best: Option<(AwqScales, Vec<f32>)> = None;
    for i in 0..cfg.grid {
        let alpha = i as f32 / cfg.grid as f32;
        let s = scales_for(alpha, &mags);
        let (scaled, back) = quantize_scaled(w, rows, cols, scheme, cfg.estimator, &s)?;
        let error = output_error_unchecked(w, &back, rows, cols, calib.gram) / n;
        if best.as_ref().is_none_or(|b| error < b.0.error) {
            let found = AwqScales {
                alpha,
                scales: s,
                scaled,
                error,
            };
            best = Some((found, back));
        }
    }
    // grid ≥ 1, so there was at least one candidate.
    best.ok_or(MethodError::Parameter("AWQ grid must be at least 1"))
}

/// The columns of group `g` (in a row) for this scheme.
fn group_span(scheme: &QuantScheme, cols: usize, g: usize) -> (usize, usize) {
    match scheme.granularity {
        Granularity::Group(size) => (g * size, ((g + 1) * size).min(cols)),
        _ => (0, cols),
    }
}

/// `dᵀ·G_sub·d` for the principal submatrix of `gram` on columns `c0..c0 + d.len()`.
fn sub_quadratic(d: &[f64], gram: &[f64], cols: usize, c0: usize, y: &mut [f64]) -> f64 {
    let m = d.len();
    y[..m].fill(0.0);
    for (i, &di) in d.iter().enumerate() {
        let row = &gram[(c0 + i) * cols + c0..(c0 + i) * cols + c0 + m];
        axpy(&mut y[..m], di, row);
    }
    dot(&y[..m], d)
}

/// AWQ's clipping search on `target` (the weights to quantize), scored against the original
/// `w`: per group, the shrink ratio of the estimator's range with the smallest group output
/// error. Per-tensor ranges are searched on the whole output error.
#[allow(clippy::too_many_arguments)]
fn clip_search(
    w: &[f32],
    target: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    estimator: Estimator,
    grid: usize,
    gram: &[f64],
) -> Result<AffineQuantized, MethodError> {
    let base = estimators::estimate_ranges(target, rows, cols, scheme, estimator)?;
    // AutoAWQ: max_shrink 0.5 over n_grid 20, i.e. ratios 1, 0.95, ..., 0.55.
    let steps = (grid / 2).max(1);
    let ratio = |i: usize| 1.0 - i as f32 / grid as f32;
    let shrink = |r: Range, k: f32| Range::new(r.min * k, r.max * k);
    let (qmin, qmax) = (scheme.qmin(), scheme.qmax());
    if scheme.granularity == Granularity::Tensor {
        let mut best = (f64::INFINITY, None);
        for i in 0..steps {
            let q = affine::quantize(target, rows, cols, scheme, &[shrink(base[0], ratio(i))])?;
            let e = output_error_unchecked(w, &q.dequantize(), rows, cols, gram);
            if e < best.0 {
                best = (e, Some(q));
            }
        }
        return best
            .1
            .ok_or(MethodError::Parameter("AWQ grid must be at least 1"));
    }
    let gpr = scheme.groups_per_row(cols);
    let per_row: Vec<Vec<(f32, i32)>> = (0..rows)
        .into_par_iter()
        .map(|r| {
            let mut y = vec![0.0f64; cols];
            let mut d = vec![0.0f64; cols];
            (0..gpr)
                .map(|g| {
                    let (c0, c1) = group_span(scheme, cols, g);
                    let (wg, tg) = (
                        &w[r * cols + c0..r * cols + c1],
                        &target[r * cols + c0..r * cols + c1],
                    );
                    let mut best = (f64::INFINITY, (0.0f32, 0i32));
                    for i in 0..steps {
                        let (s, z) = affine::qparams(shrink(base[r * gpr + g], ratio(i)), scheme);
                        for ((dj, &x), &t) in d.iter_mut().zip(wg).zip(tg) {
                            let q = affine::quantize_value(t, s, z, qmin, qmax);
                            *dj = f64::from(x) - f64::from(affine::dequantize_value(q, s, z));
                        }
                        let e = sub_quadratic(&d[..c1 - c0], gram, cols, c0, &mut y);
                        if e < best.0 {
                            best = (e, (s, z));
                        }
                    }
                    best.1
                })
                .collect()
        })
        .collect();
    let (scales, zps): (Vec<f32>, Vec<i32>) = per_row.into_iter().flatten().unzip();
    Ok(affine::quantize_with_params(
        target, rows, cols, scheme, &scales, &zps,
    )?)
}

/// AWQ into an affine scheme, packable (inputs already validated by the caller).
pub(super) fn awq_affine(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    cfg: &AwqConfig,
    calib: &Calibration<'_>,
) -> Result<(AffineQuantized, Details), MethodError> {
    let (found, adjusted) = search(w, rows, cols, scheme, cfg, calib)?;
    let error =
        |q: &AffineQuantized| output_error_unchecked(w, &q.dequantize(), rows, cols, calib.gram);
    // Candidates in order of preference on ties: (quantized, α of its source, clipped).
    let plain = rtn(w, rows, cols, scheme, cfg.estimator)?;
    let mut best = (error(&plain), plain, 0.0f32, false);
    let mut consider = |q: AffineQuantized, alpha: f32, clipped: bool| {
        let e = error(&q);
        if e < best.0 {
            best = (e, q, alpha, clipped);
        }
    };
    if found.alpha > 0.0 {
        consider(
            rtn(&adjusted, rows, cols, scheme, cfg.estimator)?,
            found.alpha,
            false,
        );
    }
    if cfg.clip {
        let clip = |source: &[f32]| {
            clip_search(
                w,
                source,
                rows,
                cols,
                scheme,
                cfg.estimator,
                cfg.grid,
                calib.gram,
            )
        };
        consider(clip(w)?, 0.0, true);
        if found.alpha > 0.0 {
            consider(clip(&adjusted)?, found.alpha, true);
        }
    }
    let (_, quantized, alpha, clipped) = best;
    Ok((
        quantized,
        Details::Awq {
            alpha,
            clipped,
            searched_alpha: found.alpha,
            folded_error: found.error,
        },
    ))
}
