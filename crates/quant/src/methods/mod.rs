//! Calibration-aware weight quantizers: GPTQ, AWQ-style scaling search and LSQ step-size
//! learning, next to plain round-to-nearest (RTN), all producing an [`AffineQuantized`] in
//! compressed-tensors' conventions (see [`crate::affine`]); GPTQ also produces ggml's legacy
//! block types ([`gptq_gguf`]). Pure numeric code: no file I/O.
//!
//! # The objective
//!
//! A linear layer's weight `W` is `rows × cols` f32 row-major (`[out_features, in_features]`).
//! Calibration runs `n` input rows `X` (`n × cols`) through the layer and keeps the Gram matrix
//! `G = XᵀX` (`cols × cols`, f64, symmetric positive semi-definite). Every method here aims at
//! the layer's output error on that data,
//!
//! ```text
//! E(Q) = ‖X·Wᵀ − X·Qᵀ‖²_F = Σ_r (w_r − q_r)ᵀ · G · (w_r − q_r)
//! ```
//!
//! which [`output_error`] computes. [`MethodResult`] reports it divided by `n` (the mean squared
//! output error per calibration row, summed over output channels) before (RTN with min–max ranges,
//! the baseline every method is compared with) and after, next to `‖X·Wᵀ‖²/n` so relative errors
//! can be formed, and the weight RMSE before and after.
//!
//! # Methods
//!
//! - [`Method::Rtn`]: ranges from an [`Estimator`], round to nearest. Needs no calibration.
//! - [`Method::Gptq`]: Frantar et al. 2022, column by column with error feedback through the
//!   inverse Hessian; see `gptq.rs` and [`GptqConfig`].
//! - [`Method::Awq`]: Lin et al. 2023, per-input-channel scales `s = mean|x|^α` searched over a
//!   grid of α; see `awq.rs` and [`AwqConfig`] for how the result is made packable.
//! - [`Method::Lsq`]: Esser et al. 2019, step sizes learned by gradient descent on `E` with the
//!   straight-through estimator; see `lsq.rs` and [`LsqConfig`].
//!
//! `docs/methods.md` describes the algorithms as implemented, their deviations from the reference
//! implementations, and measured error reductions and costs.
//!
//! # Determinism and threads
//!
//! Work is split across rayon's current thread pool by rows of `W` (and by independent outputs in
//! the linear algebra). Every row's result is computed by the same sequence of floating-point
//! operations whichever thread computes it, and sums across rows are taken in row order, so the
//! output is bit-identical for any thread count (tested with 1- and 2-thread pools).

mod awq;
mod gptq;
mod linalg;
mod lsq;

pub use awq::{awq_search_scales, AwqConfig, AwqScales};
pub use gptq::{gptq_gguf, GgufResult, GptqConfig, GGUF_GPTQ_TYPES};
pub use lsq::LsqConfig;

use kiln_types::GgmlType;

use crate::affine::{self, AffineError, AffineQuantized, QuantScheme};
use crate::estimators::{self, Estimator};
use crate::QuantError;

/// Calibration statistics of one linear layer's input.
#[derive(Debug, Clone, Copy)]
pub struct Calibration<'a> {
    /// `G = XᵀX`, `cols × cols` row-major, summed over the `n` calibration rows. Must be
    /// symmetric; methods read the upper triangle (quadratic forms) or the whole matrix
    /// (gradients), which agree only for a symmetric matrix.
    pub gram: &'a [f64],
    /// Number of calibration rows summed into `gram` (at least 1).
    pub n: u64,
    /// Per input column, the mean |x| over the calibration rows (AWQ's activation scale). When
    /// absent, AWQ uses the RMS `sqrt(G_jj / n)` from the Gram diagonal instead.
    pub act_abs_mean: Option<&'a [f32]>,
}

/// A quantization method and its parameters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Method {
    /// Round to nearest with ranges from an estimator.
    Rtn {
        /// How each group's clipping range is chosen.
        estimator: Estimator,
    },
    /// GPTQ.
    Gptq(GptqConfig),
    /// AWQ-style activation-aware scaling search.
    Awq(AwqConfig),
    /// LSQ step-size learning.
    Lsq(LsqConfig),
}

impl Method {
    /// Short lowercase name for reports: `rtn`, `gptq`, `awq`, `lsq`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Rtn { .. } => "rtn",
            Self::Gptq(_) => "gptq",
            Self::Awq(_) => "awq",
            Self::Lsq(_) => "lsq",
        }
    }

    /// Whether the method needs [`Calibration`].
    pub fn needs_calibration(&self) -> bool {
        !matches!(self, Self::Rtn { .. })
    }
}

/// What a method found, beyond the quantized weights.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Details {
    /// Round to nearest.
    Rtn,
    /// GPTQ.
    Gptq {
        /// The damping λ added to the Hessian diagonal (in the units of `G`).
        damp: f64,
        /// Input columns with `G_jj = 0` (never activated), whose weights were set to 0.
        dead_columns: usize,
    },
    /// AWQ.
    Awq {
        /// The α whose adjusted weights `deq(quant(W·s))/s` the packed result was quantized
        /// from; 0 when it was quantized from `W` itself.
        alpha: f32,
        /// Whether the packed result came from the clipping search.
        clipped: bool,
        /// The α of the scale search (with `1/s` folded).
        searched_alpha: f32,
        /// Output error / n of the scale search's best scaling with `1/s` folded exactly into the
        /// previous operation (the error of real AWQ, as [`awq_search_scales`] returns it); the
        /// packed self-contained result's error is [`MethodResult::error_after`].
        folded_error: f64,
    },
    /// LSQ.
    Lsq {
        /// Gradient steps taken.
        iterations: usize,
        /// Output error / n at the initialization (the estimator's ranges).
        initial_error: f64,
    },
}

/// A quantized matrix and what it cost in accuracy.
#[derive(Debug, Clone, PartialEq)]
pub struct MethodResult {
    /// The quantized weights, in the requested scheme.
    pub quantized: AffineQuantized,
    /// Output error / n of RTN with min–max ranges in the same scheme (the baseline); `None`
    /// without calibration.
    pub error_before: Option<f64>,
    /// Output error / n of [`Self::quantized`]; `None` without calibration.
    pub error_after: Option<f64>,
    /// `‖X·Wᵀ‖² / n = Σ_r w_rᵀ·G·w_r / n`, the scale the errors compare against; `None` without
    /// calibration.
    pub output_energy: Option<f64>,
    /// Weight RMSE of the RTN min–max baseline.
    pub weight_rmse_before: f64,
    /// Weight RMSE of [`Self::quantized`].
    pub weight_rmse: f64,
    /// Method-specific findings.
    pub details: Details,
}

impl MethodResult {
    /// `error_before / output_energy`.
    pub fn relative_before(&self) -> Option<f64> {
        Some(self.error_before? / self.output_energy?)
    }

    /// `error_after / output_energy`.
    pub fn relative_after(&self) -> Option<f64> {
        Some(self.error_after? / self.output_energy?)
    }

    /// `1 − error_after / error_before`: the fraction of the baseline's output error removed.
    pub fn reduction(&self) -> Option<f64> {
        Some(1.0 - self.error_after? / self.error_before?)
    }
}

/// Why a method call was refused or failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum MethodError {
    /// The scheme, an estimator or a buffer was rejected by the affine quantizer.
    #[error(transparent)]
    Affine(#[from] AffineError),
    /// A GGUF block type call was rejected by the kernels.
    #[error(transparent)]
    Quant(#[from] QuantError),
    /// A buffer does not have the length the shape implies.
    #[error("{what}: expected {expected} entries, got {actual}")]
    Length {
        /// Which buffer.
        what: &'static str,
        /// Entries needed.
        expected: usize,
        /// Entries given.
        actual: usize,
    },
    /// `rows × cols` (or `cols²`) overflows `usize`.
    #[error("shape {rows} x {cols} is too large")]
    TooLarge {
        /// Rows.
        rows: usize,
        /// Columns.
        cols: usize,
    },
    /// The method needs calibration statistics and none were given.
    #[error("{0} needs calibration statistics (the input Gram matrix)")]
    NeedsCalibration(&'static str),
    /// The calibration claims zero rows.
    #[error("calibration has no rows (n = 0)")]
    NoSamples,
    /// A NaN or infinity in an input.
    #[error("{what}[{index}] is not finite")]
    NonFinite {
        /// Which input.
        what: &'static str,
        /// Its flat index.
        index: usize,
    },
    /// A method parameter is out of its domain.
    #[error("invalid parameter: {0}")]
    Parameter(&'static str),
    /// GPTQ's damped Hessian is not positive definite, so its Cholesky factorization failed.
    #[error("Hessian is not positive definite even with damping {damp} (pivot of input column {column})")]
    NotPositiveDefinite {
        /// The input column (original order) whose pivot was not positive.
        column: usize,
        /// The damping that was added.
        damp: f64,
    },
    /// No calibration-aware method for this GGUF type.
    #[error("GPTQ does not support GGUF type {0}")]
    Unsupported(GgmlType),
}

/// `rows · cols`, or [`MethodError::TooLarge`].
pub(crate) fn elements(rows: usize, cols: usize) -> Result<usize, MethodError> {
    rows.checked_mul(cols)
        .ok_or(MethodError::TooLarge { rows, cols })
}

/// A buffer must have exactly `expected` entries.
pub(crate) fn check_len(
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), MethodError> {
    if expected == actual {
        Ok(())
    } else {
        Err(MethodError::Length {
            what,
            expected,
            actual,
        })
    }
}

fn check_finite_f32(what: &'static str, xs: &[f32]) -> Result<(), MethodError> {
    match xs.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(MethodError::NonFinite { what, index }),
        None => Ok(()),
    }
}

/// Checks the weights' length and finiteness.
pub(crate) fn check_weights(w: &[f32], rows: usize, cols: usize) -> Result<(), MethodError> {
    check_len("weights", elements(rows, cols)?, w.len())?;
    check_finite_f32("weights", w)
}

/// Checks the calibration against `cols` input columns.
pub(crate) fn check_calibration(calib: &Calibration<'_>, cols: usize) -> Result<(), MethodError> {
    check_len("gram", elements(cols, cols)?, calib.gram.len())?;
    if calib.n == 0 {
        return Err(MethodError::NoSamples);
    }
    if let Some(index) = calib.gram.iter().position(|v| !v.is_finite()) {
        return Err(MethodError::NonFinite {
            what: "gram",
            index,
        });
    }
    if let Some(a) = calib.act_abs_mean {
        check_len("act_abs_mean", cols, a.len())?;
        check_finite_f32("act_abs_mean", a)?;
    }
    Ok(())
}

/// The raw output error `Σ_r (w_r − q_r)ᵀ·G·(w_r − q_r)` of replacing the `rows × cols` weights
/// `w` by `q`, with the Gram matrix `gram = XᵀX` (symmetric `cols × cols`, upper triangle read).
/// Not divided by `n`. Accumulated in f64 in a fixed order (per row, then rows in order), so the
/// value does not depend on the thread count.
pub fn output_error(
    w: &[f32],
    q: &[f32],
    rows: usize,
    cols: usize,
    gram: &[f64],
) -> Result<f64, MethodError> {
    let n = elements(rows, cols)?;
    check_len("weights", n, w.len())?;
    check_len("quantized weights", n, q.len())?;
    check_len("gram", elements(cols, cols)?, gram.len())?;
    Ok(output_error_unchecked(w, q, rows, cols, gram))
}

/// [`output_error`] without the size checks.
pub(crate) fn output_error_unchecked(
    w: &[f32],
    q: &[f32],
    rows: usize,
    cols: usize,
    gram: &[f64],
) -> f64 {
    let d: Vec<f64> = w
        .iter()
        .zip(q)
        .map(|(&a, &b)| f64::from(a) - f64::from(b))
        .collect();
    linalg::quadratic_forms(&d, rows, cols, gram).iter().sum()
}

/// `Σ_r w_rᵀ·G·w_r`, i.e. `‖X·Wᵀ‖²`.
pub(crate) fn output_energy_unchecked(w: &[f32], rows: usize, cols: usize, gram: &[f64]) -> f64 {
    let d: Vec<f64> = w.iter().map(|&a| f64::from(a)).collect();
    linalg::quadratic_forms(&d, rows, cols, gram).iter().sum()
}

/// `sqrt(mean((w − q)²))`, accumulated in f64 in order; 0 for an empty matrix.
pub fn weight_rmse(w: &[f32], q: &[f32]) -> f64 {
    if w.is_empty() {
        return 0.0;
    }
    let s: f64 = w
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let e = f64::from(a) - f64::from(b);
            e * e
        })
        .sum();
    (s / w.len() as f64).sqrt()
}

/// Round to nearest with ranges from `estimator` ([`estimators::estimate_ranges`] then
/// [`affine::quantize`]).
pub fn rtn(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    estimator: Estimator,
) -> Result<AffineQuantized, AffineError> {
    let ranges = estimators::estimate_ranges(w, rows, cols, scheme, estimator)?;
    affine::quantize(w, rows, cols, scheme, &ranges)
}

/// Quantizes a `rows × cols` weight matrix with `method` into `scheme`, and reports the output
/// error before (RTN min–max) and after.
///
/// Every method except [`Method::Rtn`] needs `calib` ([`MethodError::NeedsCalibration`]).
/// Weights and calibration must be finite. The result is deterministic and independent of the
/// size of rayon's current thread pool.
pub fn quantize_affine(
    method: &Method,
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    calib: Option<&Calibration<'_>>,
) -> Result<MethodResult, MethodError> {
    scheme.validate()?;
    check_weights(w, rows, cols)?;
    if let Some(c) = calib {
        check_calibration(c, cols)?;
    }
    let need = |name| calib.ok_or(MethodError::NeedsCalibration(name));
    let (quantized, details) = match method {
        Method::Rtn { estimator } => (rtn(w, rows, cols, scheme, *estimator)?, Details::Rtn),
        Method::Gptq(cfg) => gptq::gptq_affine(w, rows, cols, scheme, cfg, need("GPTQ")?)?,
        Method::Awq(cfg) => awq::awq_affine(w, rows, cols, scheme, cfg, need("AWQ")?)?,
        Method::Lsq(cfg) => lsq::lsq_affine(w, rows, cols, scheme, cfg, need("LSQ")?)?,
    };
    let baseline = rtn(w, rows, cols, scheme, Estimator::MinMax)?.dequantize();
    let after = quantized.dequantize();
    let (error_before, error_after, output_energy) = match calib {
        Some(c) => {
            let n = c.n as f64;
            (
                Some(output_error_unchecked(w, &baseline, rows, cols, c.gram) / n),
                Some(output_error_unchecked(w, &after, rows, cols, c.gram) / n),
                Some(output_energy_unchecked(w, rows, cols, c.gram) / n),
            )
        }
        None => (None, None, None),
    };
    Ok(MethodResult {
        quantized,
        error_before,
        error_after,
        output_energy,
        weight_rmse_before: weight_rmse(w, &baseline),
        weight_rmse: weight_rmse(w, &after),
        details,
    })
}
