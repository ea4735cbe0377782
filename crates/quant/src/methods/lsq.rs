//! LSQ, learned step size quantization (Esser, McKinstry, Bablani, Appuswamy, Modha 2019,
//! "Learned Step Size Quantization"), used here post-training: each group's step size (scale)
//! is learned by gradient descent on the layer's output error on calibration data,
//!
//! ```text
//! E(s) = Σ_r (ŵ_r − w_r)ᵀ · G · (ŵ_r − w_r),   ŵ = s · (clamp(round(w/s + z), qmin, qmax) − z)
//! ```
//!
//! with the straight-through estimator for the rounding (LSQ's eq. 3):
//! `∂ŵ/∂s = round(w/s + z) − z − w/s` inside the range, and `qmin − z` or `qmax − z` where the
//! value is clipped. `∂E/∂ŵ_r = 2·G·(ŵ_r − w_r)`, so each group's gradient is
//! `Σ_{j ∈ group} 2·(G·d_r)_j · ∂ŵ_j/∂s`.
//!
//! As implemented:
//!
//! - Initialization: the ranges of [`LsqConfig::estimator`] (min–max by default), turned into
//!   scales and zero points by compressed-tensors' rule ([`affine::qparams`]).
//! - Only the scales are learned. Zero points (asymmetric schemes) stay at their initial
//!   integers: LSQ+'s learned offset is continuous, but the format stores an integer zero point,
//!   and with the straight-through estimator its gradient only sees clipped values.
//! - Optimizer: Adam (β₁ = 0.9, β₂ = 0.999) on `log s` with a fixed learning rate, instead of
//!   LSQ's SGD with gradient scale `g = 1/sqrt(N·Q_P)`. Steps on `log s` are relative, so one
//!   learning rate suits every layer and group whatever the weights' magnitude, and Adam's
//!   per-parameter normalization makes LSQ's gradient scale unnecessary. Each row's gradients
//!   are divided by that row's initial error (the whole tensor's for per-tensor scales) so
//!   Adam's ε is relative too.
//! - A fixed number of full-batch iterations in a fixed order; codes come from the exact f32
//!   quantization of the output format. The scales kept are, per row (per tensor for a
//!   per-tensor scale), those of the iteration with the smallest output error, counting the
//!   initialization, so LSQ returns nothing worse than its initialization (up to the f32
//!   rounding noted below).
//!
//! Cost. Per-channel and per-group scales belong to one row, so each row is optimized on its own
//! (tiles of rows on rayon's pool), and `G·d` is kept incrementally instead of recomputed: with
//! integer codes `c = q − z` and `P_g = G·c_g` (the codes of group `g` only, zero elsewhere),
//! `G·d = Σ_g s_g·P_g − G·w`. `G·w` and the `P_g` cost one pass over `G` per row; afterwards an
//! iteration costs `cols · groups` multiply-adds plus one row of `G` per code that changed (a few
//! per row and iteration in practice) instead of `cols²`. The model's `ŵ_j = s_g·c_j` is taken in
//! f64, so the tracked error differs from the stored f32 products' by at most their rounding;
//! the reported errors are always computed from the stored values. A per-tensor scale couples
//! all rows, so that case evaluates every row densely each iteration (`rows · cols²`) and sums
//! row gradients in row order. Either way every per-row value is computed identically on any
//! thread, so the result does not depend on the thread count.

use rayon::prelude::*;

use super::linalg::{axpy, dot};
use super::{Calibration, Details, MethodError};
use crate::affine::{self, AffineQuantized, Granularity, QuantScheme};
use crate::estimators::{self, Estimator};

/// LSQ's parameters; [`Default`] gives 200 iterations at learning rate 0.02 from min–max
/// ranges.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LsqConfig {
    /// Gradient steps (0 returns the initialization).
    pub iterations: usize,
    /// Adam's learning rate on `log s` (finite, > 0); 0.02 moves a scale by up to about 2 % per
    /// step.
    pub learning_rate: f64,
    /// Initial ranges.
    pub estimator: Estimator,
}

impl Default for LsqConfig {
    fn default() -> Self {
        Self {
            iterations: 200,
            learning_rate: 0.02,
            estimator: Estimator::MinMax,
        }
    }
}

const BETA1: f64 = 0.9;
const BETA2: f64 = 0.999;
const EPS: f64 = 1e-8;
/// Rows per tile; each row of `G` is read once per tile and iteration.
const TILE: usize = 8;

/// Per row: output error, and the gradient of each of the row's groups (one for per-tensor).
struct TileEval {
    errors: Vec<f64>,
    grads: Vec<f64>,
}

/// The shared, read-only inputs of an evaluation.
struct Problem<'a> {
    w: &'a [f32],
    cols: usize,
    gram: &'a [f64],
    scheme: QuantScheme,
    /// Groups per row in the gradient layout (1 for per-tensor).
    per_row: usize,
    /// Columns per group.
    width: usize,
    tensor: bool,
}

impl Problem<'_> {
    /// The scale index of row `r`, group `g` of the row.
    fn group(&self, r: usize, g: usize) -> usize {
        if self.tensor {
            0
        } else {
            r * self.per_row + g
        }
    }

    fn eval_tile(&self, r0: usize, t: usize, scales: &[f32], zps: &[i32]) -> TileEval {
        let cols = self.cols;
        let (qmin, qmax) = (self.scheme.qmin(), self.scheme.qmax());
        let mut d = vec![0.0f64; t * cols];
        let mut dds = vec![0.0f64; t * cols];
        for k in 0..t {
            let r = r0 + k;
            let row = &self.w[r * cols..(r + 1) * cols];
            for (j, &x) in row.iter().enumerate() {
                let gi = self.group(r, j / self.width);
                let (s, z) = (scales[gi], zps[gi]);
                let q = affine::quantize_value(x, s, z, qmin, qmax);
                let wh = affine::dequantize_value(q, s, z);
                d[k * cols + j] = f64::from(wh) - f64::from(x);
                let v = f64::from(x) / f64::from(s) + f64::from(z);
                dds[k * cols + j] = if v <= f64::from(qmin) {
                    f64::from(qmin - z)
                } else if v >= f64::from(qmax) {
                    f64::from(qmax - z)
                } else {
                    f64::from(q - z) - f64::from(x) / f64::from(s)
                };
            }
        }
        // y_k = G·d_k, accumulated row of G by row of G (G symmetric, so Σ_i d_i·G_i = G·d).
        let mut y = vec![0.0f64; t * cols];
        for i in 0..cols {
            let gi = &self.gram[i * cols..(i + 1) * cols];
            for (yk, dk) in y.chunks_exact_mut(cols).zip(d.chunks_exact(cols)) {
                axpy(yk, dk[i], gi);
            }
        }
        let mut errors = Vec::with_capacity(t);
        let mut grads = vec![0.0f64; t * self.per_row];
        for k in 0..t {
            let (yk, dk) = (&y[k * cols..(k + 1) * cols], &d[k * cols..(k + 1) * cols]);
            errors.push(dot(yk, dk));
            let gk = &mut grads[k * self.per_row..(k + 1) * self.per_row];
            for (j, (&yj, &sj)) in yk.iter().zip(&dds[k * cols..(k + 1) * cols]).enumerate() {
                gk[j / self.width] += 2.0 * yj * sj;
            }
        }
        TileEval { errors, grads }
    }

    /// Errors per row and gradients per (row, group) for all rows.
    fn eval(&self, rows: usize, scales: &[f32], zps: &[i32]) -> (Vec<f64>, Vec<f64>) {
        let tiles: Vec<TileEval> = (0..rows.div_ceil(TILE))
            .into_par_iter()
            .map(|ti| {
                let r0 = ti * TILE;
                self.eval_tile(r0, TILE.min(rows - r0), scales, zps)
            })
            .collect();
        let mut errors = Vec::with_capacity(rows);
        let mut grads = Vec::with_capacity(rows * self.per_row);
        for t in tiles {
            errors.extend(t.errors);
            grads.extend(t.grads);
        }
        (errors, grads)
    }
}

/// Adam on `θ = log s` for a set of scales.
struct Adam {
    lr: f64,
    theta: Vec<f64>,
    m: Vec<f64>,
    v: Vec<f64>,
    step: i32,
}

impl Adam {
    fn new(scales: &[f32], lr: f64) -> Self {
        Self {
            lr,
            theta: scales.iter().map(|&s| f64::from(s).ln()).collect(),
            m: vec![0.0; scales.len()],
            v: vec![0.0; scales.len()],
            step: 0,
        }
    }

    /// One step from gradients `∂E/∂s` (already normalized); updates `scales` in place.
    fn step(&mut self, grads: &[f64], scales: &mut [f32]) {
        self.step += 1;
        let (c1, c2) = (1.0 - BETA1.powi(self.step), 1.0 - BETA2.powi(self.step));
        for (i, s) in scales.iter_mut().enumerate() {
            // ∂E/∂θ = s·∂E/∂s.
            let g = grads[i] * f64::from(*s);
            self.m[i] = BETA1 * self.m[i] + (1.0 - BETA1) * g;
            self.v[i] = BETA2 * self.v[i] + (1.0 - BETA2) * g * g;
            self.theta[i] -= self.lr * (self.m[i] / c1) / ((self.v[i] / c2).sqrt() + EPS);
            *s = (self.theta[i].exp() as f32).max(f32::EPSILON);
        }
    }
}

/// `1/e` for a positive error, else 1 (a row without error has zero gradients anyway).
fn inverse_or_one(e: f64) -> f64 {
    if e > 0.0 {
        1.0 / e
    } else {
        1.0
    }
}

/// Per-channel and per-group LSQ for a tile of rows, all iterations. Every row is optimized on
/// its own (its scales only affect its own error), with incremental products: with integer codes
/// `c_j = q_j − z` and `P_g = G·c_g` (the codes of group `g` only), `G·ŵ = Σ_g s_g·P_g`, so
/// `G·d = Σ_g s_g·P_g − G·w`. `G·w` and the `P_g` cost one pass over `G` each; afterwards an
/// iteration costs `cols · groups` plus one row of `G` per code that changed, instead of `cols²`.
/// The model's `ŵ_j = s_g·c_j` is taken in f64, which differs from the stored f32 product by at
/// most an f32 rounding.
fn lsq_tile(
    p: &Problem<'_>,
    r0: usize,
    t: usize,
    cfg: &LsqConfig,
    init: &[f32],
    zps: &[i32],
) -> (Vec<f32>, f64) {
    let cols = p.cols;
    let per_row = p.per_row;
    let width = p.width;
    let (qmin, qmax) = (p.scheme.qmin(), p.scheme.qmax());
    let w = &p.w[r0 * cols..(r0 + t) * cols];
    let zps = &zps[r0 * per_row..(r0 + t) * per_row];
    let mut scales = init[r0 * per_row..(r0 + t) * per_row].to_vec();
    let code = |x: f32, s: f32, z: i32| affine::quantize_value(x, s, z, qmin, qmax) - z;

    // G·w and P for the initial codes, sharing each row of G across the tile.
    let mut gw = vec![0.0f64; t * cols];
    let mut codes = vec![0i32; t * cols];
    for (k, ck) in codes.chunks_exact_mut(cols).enumerate() {
        for (j, c) in ck.iter_mut().enumerate() {
            let gi = k * per_row + j / width;
            *c = code(w[k * cols + j], scales[gi], zps[gi]);
        }
    }
    let mut pg = vec![0.0f64; t * per_row * cols];
    for i in 0..cols {
        let gi = &p.gram[i * cols..(i + 1) * cols];
        for k in 0..t {
            axpy(
                &mut gw[k * cols..(k + 1) * cols],
                f64::from(w[k * cols + i]),
                gi,
            );
            let c = codes[k * cols + i];
            if c != 0 {
                let g = k * per_row + i / width;
                axpy(&mut pg[g * cols..(g + 1) * cols], f64::from(c), gi);
            }
        }
    }

    let mut best_scales = scales.clone();
    let mut initial_error = 0.0;
    let mut y = vec![0.0f64; cols];
    let mut d = vec![0.0f64; cols];
    let mut dds = vec![0.0f64; cols];
    let mut grads = vec![0.0f64; per_row];
    for k in 0..t {
        let wk = &w[k * cols..(k + 1) * cols];
        let ck = &mut codes[k * cols..(k + 1) * cols];
        let pk = &mut pg[k * per_row * cols..(k + 1) * per_row * cols];
        let sk = &mut scales[k * per_row..(k + 1) * per_row];
        let zk = &zps[k * per_row..(k + 1) * per_row];
        let mut adam = Adam::new(sk, cfg.learning_rate);
        let mut best = f64::INFINITY;
        let mut norm = 1.0;
        for it in 0..=cfg.iterations {
            for (j, &x) in wk.iter().enumerate() {
                let g = j / width;
                let (s, z) = (sk[g], zk[g]);
                let c = code(x, s, z);
                if c != ck[j] {
                    let gj = &p.gram[j * cols..(j + 1) * cols];
                    axpy(&mut pk[g * cols..(g + 1) * cols], f64::from(c - ck[j]), gj);
                    ck[j] = c;
                }
                d[j] = f64::from(s) * f64::from(c) - f64::from(x);
                let v = f64::from(x) / f64::from(s) + f64::from(z);
                dds[j] = if v <= f64::from(qmin) {
                    f64::from(qmin - z)
                } else if v >= f64::from(qmax) {
                    f64::from(qmax - z)
                } else {
                    f64::from(c) - f64::from(x) / f64::from(s)
                };
            }
            for (yj, &g) in y.iter_mut().zip(&gw[k * cols..(k + 1) * cols]) {
                *yj = -g;
            }
            for (g, &s) in sk.iter().enumerate() {
                axpy(&mut y, f64::from(s), &pk[g * cols..(g + 1) * cols]);
            }
            let e = dot(&d, &y);
            if it == 0 {
                initial_error += e;
                norm = inverse_or_one(e);
            }
            if e < best {
                best = e;
                best_scales[k * per_row..(k + 1) * per_row].copy_from_slice(sk);
            }
            if it == cfg.iterations {
                break;
            }
            grads.fill(0.0);
            for (j, (&yj, &sj)) in y.iter().zip(&dds).enumerate() {
                grads[j / width] += 2.0 * yj * sj;
            }
            for g in &mut grads {
                *g *= norm;
            }
            adam.step(&grads, sk);
        }
    }
    (best_scales, initial_error)
}

/// LSQ into an affine scheme (inputs already validated by the caller).
pub(super) fn lsq_affine(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    cfg: &LsqConfig,
    calib: &Calibration<'_>,
) -> Result<(AffineQuantized, Details), MethodError> {
    if !(cfg.learning_rate > 0.0 && cfg.learning_rate.is_finite()) {
        return Err(MethodError::Parameter(
            "LSQ learning_rate must be finite and positive",
        ));
    }
    let ranges = estimators::estimate_ranges(w, rows, cols, scheme, cfg.estimator)?;
    let (scales, zps): (Vec<f32>, Vec<i32>) =
        ranges.iter().map(|&r| affine::qparams(r, scheme)).unzip();
    let tensor = scheme.granularity == Granularity::Tensor;
    let (per_row, width) = match scheme.granularity {
        Granularity::Group(g) => (scheme.groups_per_row(cols), g),
        _ => (1, cols.max(1)),
    };
    let problem = Problem {
        w,
        cols,
        gram: calib.gram,
        scheme: *scheme,
        per_row,
        width,
        tensor,
    };
    if rows == 0 || cols == 0 {
        let q = affine::quantize_with_params(w, rows, cols, scheme, &scales, &zps)?;
        return Ok((
            q,
            Details::Lsq {
                iterations: 0,
                initial_error: 0.0,
            },
        ));
    }
    let n = calib.n as f64;
    let (best_scales, initial_error) = if tensor {
        lsq_tensor(&problem, rows, cfg, scales, &zps)
    } else {
        let tiles: Vec<(Vec<f32>, f64)> = (0..rows.div_ceil(TILE))
            .into_par_iter()
            .map(|ti| {
                let r0 = ti * TILE;
                lsq_tile(&problem, r0, TILE.min(rows - r0), cfg, &scales, &zps)
            })
            .collect();
        let mut best = Vec::with_capacity(scales.len());
        let mut e0 = 0.0;
        for (s, e) in tiles {
            best.extend(s);
            e0 += e;
        }
        (best, e0)
    };
    let q = affine::quantize_with_params(w, rows, cols, scheme, &best_scales, &zps)?;
    Ok((
        q,
        Details::Lsq {
            iterations: cfg.iterations,
            initial_error: initial_error / n,
        },
    ))
}

/// Per-tensor LSQ: one scale shared by every row, so every iteration evaluates all rows
/// (`rows · cols²` multiply-adds, split across the pool by tiles of rows) and sums the row
/// gradients in row order.
fn lsq_tensor(
    p: &Problem<'_>,
    rows: usize,
    cfg: &LsqConfig,
    mut scales: Vec<f32>,
    zps: &[i32],
) -> (Vec<f32>, f64) {
    let mut adam = Adam::new(&scales, cfg.learning_rate);
    let mut best_scales = scales.clone();
    let mut best = f64::INFINITY;
    let mut norm = 1.0;
    let mut initial_error = 0.0;
    for it in 0..=cfg.iterations {
        let (errors, grads) = p.eval(rows, &scales, zps);
        let total: f64 = errors.iter().sum();
        if it == 0 {
            initial_error = total;
            norm = inverse_or_one(total);
        }
        if total < best {
            best = total;
            best_scales.copy_from_slice(&scales);
        }
        if it == cfg.iterations {
            break;
        }
        let g = grads.iter().sum::<f64>() * norm;
        adam.step(&[g], &mut scales);
    }
    (best_scales, initial_error)
}
