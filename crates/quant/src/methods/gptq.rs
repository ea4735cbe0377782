//! GPTQ (Frantar, Ashkboos, Hoefler, Alistarh 2022, "GPTQ: Accurate Post-Training Quantization
//! for Generative Pre-trained Transformers"), following the reference `fasterquant` of the GPTQ
//! repository and AutoGPTQ's `gptq.py`.
//!
//! Each row of `W` is quantized column by column; the rounding error of column `i` is spread over
//! the not yet quantized columns through the upper Cholesky factor `U` of the inverse Hessian
//! (`H⁻¹ = UᵀU`), which minimizes the growth of the output error `Σ_r (w_r − q_r)ᵀ H (w_r − q_r)`:
//!
//! ```text
//! err_i = (w_i − q_i) / U_ii ;   w_j −= err_i · U_ij   for j > i
//! ```
//!
//! As in the reference:
//!
//! - `H = G` (the reference uses `2G/n`; a positive factor changes neither the damping, which is
//!   relative, nor `U_ij / U_ii`).
//! - Dead columns (`H_jj = 0`, an input that was always 0) get `H_jj = 1` and their weights are
//!   set to 0.
//! - Damping `λ = damp_percent · mean(diag H)` is added to the diagonal. If the Cholesky
//!   factorization still fails, the call fails with [`MethodError::NotPositiveDefinite`] (no
//!   retry with more damping).
//! - Columns go in blocks of `block_size`: inside a block every column's update is applied at
//!   once to the block's remaining columns; the columns after the block receive the block's
//!   accumulated update `Err₁ · U[block, after]` when the block ends ("lazy batch updates").
//! - `act_order`: columns are processed in order of decreasing `H_jj` (a stable sort, so ties keep
//!   column order; torch's `argsort` is not stable), and the result is permuted back.
//! - Group quantization (`Granularity::Group(G)`): without `static_groups` or `act_order`, a
//!   group's scale and zero point are computed when its first column is reached, from the
//!   group's weights as updated by every column quantized so far. The reference reads them from
//!   `W`, which lacks the in-block updates when a group starts inside a block; kiln applies the
//!   pending updates first, so the group sees its true current weights. The two agree whenever
//!   groups start on block boundaries (e.g. the defaults, block 128 and group 128).
//!   With `static_groups`, every group's parameters are computed up front from the original
//!   weights. With `act_order` and groups, static groups are always used: processing columns in
//!   a permuted order would otherwise give groups of scattered columns, which needs a `g_idx`
//!   tensor the contiguous-group layout of [`AffineQuantized`] (and compressed-tensors' group
//!   strategy without actorder) cannot express. This is llm-compressor's `actorder = "weight"`.
//! - Per-channel and per-tensor parameters are computed from the original weights before any
//!   column is quantized. kiln computes all up-front parameters after zeroing dead columns (the
//!   reference computes per-channel ones before).
//!
//! Numerics: the Hessian, its factor and the working copy of the weights are f64 (the reference
//! is f32 on GPU); each weight is quantized as f32 by exactly the arithmetic of the output format,
//! and the error fed back is the f64 difference to the dequantized f32 value. The upper factor is
//! computed as one Cholesky factorization of the reversed Hessian and one triangular inverse
//! (`linalg.rs`), which is the same matrix as the reference's Cholesky → inverse → Cholesky.
//!
//! Rows are independent given `U`, so they are processed in tiles of a few rows (each row of `U`
//! is read once per tile) on rayon's pool; a row's arithmetic does not depend on its tile or
//! thread, so results are bit-identical for any thread count.
//!
//! [`gptq_gguf`] runs the same algorithm with ggml's legacy block formats (Q8_0, Q4_0, Q4_1,
//! Q5_0, Q5_1: blocks of 32 along a row with an f16 scale, and an f16 minimum for the `_1`
//! types). A block is a group of 32: its scale is computed with the kernel's own rule from the
//! current weights when the block starts, and each weight is coded with the kernel's own
//! rounding, clamped to the code range (GPTQ's later updates can push a weight past the block's
//! extreme value, which the kernel never sees; in range, codes are exactly the kernel's). The
//! bytes are written directly. Handing the final updated weights to the kernel would NOT give the
//! same codes: each block's scale would be recomputed from weights that changed after the block
//! started (and from the weights as they were when each column was quantized, which no single
//! matrix holds), so kiln encodes itself and checks against the kernel when no error is fed back
//! (a diagonal Gram matrix makes GPTQ equal RTN byte for byte).

use kiln_types::GgmlType;
use rayon::prelude::*;

use super::linalg::{axpy, upper_cholesky_of_inverse};
use super::{
    check_calibration, check_weights, elements, output_energy_unchecked, output_error_unchecked,
    weight_rmse, Calibration, Details, MethodError,
};
use crate::affine::{self, AffineQuantized, Granularity, QuantScheme, Range};
use crate::estimators::{self, Estimator};
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// GPTQ's parameters; [`Default`] gives the reference defaults (block 128, 1 % damping, no
/// activation order, dynamic groups, min–max ranges).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct GptqConfig {
    /// Columns per lazy-update block (at least 1).
    pub block_size: usize,
    /// Damping as a fraction of the mean Hessian diagonal (finite, ≥ 0).
    pub damp_percent: f64,
    /// Process columns in order of decreasing Hessian diagonal (AutoGPTQ's `desc_act`).
    pub act_order: bool,
    /// Compute all group parameters from the original weights before quantizing (always the
    /// case with `act_order`).
    pub static_groups: bool,
    /// How a group's range is chosen from its weights (GPTQ's quantizer uses min–max; its
    /// `mse` option is [`Estimator::MSE_DEFAULT`]). Ignored by [`gptq_gguf`], which uses the
    /// kernel's rule.
    pub estimator: Estimator,
}

impl Default for GptqConfig {
    fn default() -> Self {
        Self {
            block_size: 128,
            damp_percent: 0.01,
            act_order: false,
            static_groups: false,
            estimator: Estimator::MinMax,
        }
    }
}

impl GptqConfig {
    fn validate(&self) -> Result<(), MethodError> {
        if self.block_size == 0 {
            return Err(MethodError::Parameter("GPTQ block_size must be at least 1"));
        }
        if !(self.damp_percent >= 0.0 && self.damp_percent.is_finite()) {
            return Err(MethodError::Parameter(
                "GPTQ damp_percent must be finite and non-negative",
            ));
        }
        Ok(())
    }
}

/// The factorized Hessian, in processing order.
struct Prepared {
    /// Upper Cholesky factor of the damped inverse Hessian, permuted, row-major `cols × cols`.
    u: Vec<f64>,
    /// Processing position → original column.
    perm: Vec<usize>,
    /// Per original column: `H_jj == 0`.
    dead: Vec<bool>,
    /// λ.
    damp: f64,
}

fn prepare(gram: &[f64], cols: usize, cfg: &GptqConfig) -> Result<Prepared, MethodError> {
    let mut h = gram.to_vec();
    let mut dead = vec![false; cols];
    for (j, dj) in dead.iter_mut().enumerate() {
        if h[j * cols + j] == 0.0 {
            *dj = true;
            h[j * cols + j] = 1.0;
        }
    }
    let mut perm: Vec<usize> = (0..cols).collect();
    if cfg.act_order {
        // Decreasing diagonal; `sort_by` is stable, so equal diagonals keep column order.
        perm.sort_by(|&a, &b| h[b * cols + b].total_cmp(&h[a * cols + a]));
    }
    let mean_diag = if cols == 0 {
        0.0
    } else {
        (0..cols).map(|j| h[j * cols + j]).sum::<f64>() / cols as f64
    };
    let damp = cfg.damp_percent * mean_diag;
    let mut hp = if cfg.act_order {
        let mut hp = vec![0.0f64; cols * cols];
        for (row, &pa) in hp.chunks_exact_mut(cols.max(1)).zip(&perm) {
            let src = &h[pa * cols..(pa + 1) * cols];
            for (x, &pb) in row.iter_mut().zip(&perm) {
                *x = src[pb];
            }
        }
        hp
    } else {
        h
    };
    for a in 0..cols {
        hp[a * cols + a] += damp;
    }
    let u = upper_cholesky_of_inverse(hp, cols).map_err(|c| MethodError::NotPositiveDefinite {
        column: perm[c],
        damp,
    })?;
    Ok(Prepared {
        u,
        perm,
        dead,
        damp,
    })
}

/// How one group's parameters are chosen and how a value is coded with them.
trait Codec: Sync {
    /// A group's parameters.
    type Params: Copy + Default + Send + Sync;
    /// Parameters for a group with these (current) weights.
    fn params(&self, values: &[f32]) -> Self::Params;
    /// The code of `x` and its dequantized value.
    fn quantize(&self, p: &Self::Params, x: f32) -> (i32, f32);
}

/// Where group parameters come from.
enum Plan<'a, P> {
    /// Known before any column is quantized: `per_row` parameters per row (row-major), column `c`
    /// (original order) uses parameter `c / width` of its row.
    Fixed {
        params: &'a [P],
        per_row: usize,
        width: usize,
    },
    /// Computed when the group's first column is reached (requires the identity permutation).
    Dynamic { per_row: usize, width: usize },
}

impl<P> Plan<'_, P> {
    fn shape(&self) -> (usize, usize) {
        match *self {
            Self::Fixed { per_row, width, .. } | Self::Dynamic { per_row, width } => {
                (per_row, width)
            }
        }
    }
}

/// Rows per tile: each row of `U` is read once per tile.
const TILE: usize = 8;

/// Codes (original column order), parameters (row-major, `per_row` per row) and dequantized
/// values of every row.
struct Output<P> {
    codes: Vec<i32>,
    params: Vec<P>,
    deq: Vec<f32>,
}

/// Runs GPTQ over all rows of `w0` (dead columns already zeroed).
fn run<C: Codec>(
    w0: &[f32],
    rows: usize,
    cols: usize,
    prep: &Prepared,
    codec: &C,
    plan: &Plan<'_, C::Params>,
    block: usize,
) -> Output<C::Params> {
    if cols == 0 || rows == 0 {
        let params = match plan {
            Plan::Fixed { params, .. } => params.to_vec(),
            Plan::Dynamic { .. } => Vec::new(),
        };
        return Output {
            codes: Vec::new(),
            params,
            deq: Vec::new(),
        };
    }
    let tiles: Vec<Output<C::Params>> = (0..rows.div_ceil(TILE))
        .into_par_iter()
        .map(|ti| {
            let r0 = ti * TILE;
            let t = TILE.min(rows - r0);
            run_tile(
                &w0[r0 * cols..(r0 + t) * cols],
                r0,
                t,
                cols,
                prep,
                codec,
                plan,
                block,
            )
        })
        .collect();
    let mut out = Output {
        codes: Vec::with_capacity(rows * cols),
        params: Vec::new(),
        deq: Vec::with_capacity(rows * cols),
    };
    for tile in tiles {
        out.codes.extend(tile.codes);
        out.params.extend(tile.params);
        out.deq.extend(tile.deq);
    }
    out
}

#[allow(clippy::too_many_arguments)]
fn run_tile<C: Codec>(
    w0: &[f32],
    r0: usize,
    t: usize,
    cols: usize,
    prep: &Prepared,
    codec: &C,
    plan: &Plan<'_, C::Params>,
    block: usize,
) -> Output<C::Params> {
    let u = &prep.u;
    let perm = &prep.perm;
    let (per_row, width) = plan.shape();
    let width = width.max(1);
    // Working weights in processing order, f64.
    let mut w = vec![0.0f64; t * cols];
    for (wk, src) in w.chunks_exact_mut(cols).zip(w0.chunks_exact(cols)) {
        for (x, &p) in wk.iter_mut().zip(perm) {
            *x = f64::from(src[p]);
        }
    }
    let mut params: Vec<C::Params> = match plan {
        Plan::Fixed { params, .. } => params[r0 * per_row..(r0 + t) * per_row].to_vec(),
        Plan::Dynamic { .. } => vec![C::Params::default(); t * per_row],
    };
    let dynamic = matches!(plan, Plan::Dynamic { .. });
    let mut codes = vec![0i32; t * cols];
    let mut deq = vec![0.0f32; t * cols];
    let block = block.min(cols).max(1);
    let mut err = vec![0.0f64; t * block];
    let mut acc = vec![0.0f64; t * cols];
    let mut vals: Vec<f32> = Vec::with_capacity(width);

    let mut b0 = 0;
    while b0 < cols {
        let b1 = (b0 + block).min(cols);
        for i in b0..b1 {
            let orig = perm[i];
            if dynamic && orig % width == 0 {
                // Dynamic plans use the identity permutation, so the group is columns
                // i..i+width in processing order too.
                let gend = (i + width).min(cols);
                for k in 0..t {
                    let wk = &w[k * cols..(k + 1) * cols];
                    let ek = &err[k * block..k * block + (i - b0)];
                    vals.clear();
                    vals.extend(wk[i..gend.min(b1)].iter().map(|&x| x as f32));
                    // Columns past the block still lack this block's pending update.
                    for j in b1..gend {
                        let mut pending = 0.0f64;
                        for (kk, &e) in ek.iter().enumerate() {
                            pending += e * u[(b0 + kk) * cols + j];
                        }
                        vals.push((wk[j] - pending) as f32);
                    }
                    params[k * per_row + orig / width] = codec.params(&vals);
                }
            }
            let urow = &u[i * cols..(i + 1) * cols];
            let d = urow[i];
            let g = orig / width;
            for k in 0..t {
                let x = w[k * cols + i];
                let (c, dq) = codec.quantize(&params[k * per_row + g], x as f32);
                codes[k * cols + orig] = c;
                deq[k * cols + orig] = dq;
                let e = (x - f64::from(dq)) / d;
                err[k * block + (i - b0)] = e;
                axpy(
                    &mut w[k * cols + i + 1..k * cols + b1],
                    -e,
                    &urow[i + 1..b1],
                );
            }
        }
        if b1 < cols {
            // W[:, b1..] -= Err₁ · U[b0..b1, b1..], the sum over the block's columns formed
            // first, in column order.
            let rest = cols - b1;
            acc[..t * rest].fill(0.0);
            for kk in b0..b1 {
                let urow = &u[kk * cols + b1..(kk + 1) * cols];
                for k in 0..t {
                    axpy(
                        &mut acc[k * rest..(k + 1) * rest],
                        err[k * block + (kk - b0)],
                        urow,
                    );
                }
            }
            for k in 0..t {
                for (x, a) in w[k * cols + b1..(k + 1) * cols]
                    .iter_mut()
                    .zip(&acc[k * rest..(k + 1) * rest])
                {
                    *x -= a;
                }
            }
        }
        b0 = b1;
    }
    Output { codes, params, deq }
}

/// compressed-tensors' affine quantization of one value.
struct AffineCodec {
    scheme: QuantScheme,
    estimator: Estimator,
}

impl Codec for AffineCodec {
    type Params = (f32, i32);

    fn params(&self, values: &[f32]) -> (f32, i32) {
        // The estimator was validated up front, so this cannot fail; keep a harmless range
        // rather than panic if it ever did.
        let range = estimators::estimate_range(values, &self.scheme, self.estimator)
            .unwrap_or(Range::new(0.0, 0.0));
        affine::qparams(range, &self.scheme)
    }

    fn quantize(&self, &(scale, zp): &(f32, i32), x: f32) -> (i32, f32) {
        let q = affine::quantize_value(x, scale, zp, self.scheme.qmin(), self.scheme.qmax());
        (q, affine::dequantize_value(q, scale, zp))
    }
}

/// Copies `w` with the dead columns set to 0.
fn zero_dead(w: &[f32], cols: usize, dead: &[bool]) -> Vec<f32> {
    let mut w0 = w.to_vec();
    if dead.iter().any(|&d| d) {
        for row in w0.chunks_exact_mut(cols) {
            for (x, &d) in row.iter_mut().zip(dead) {
                if d {
                    *x = 0.0;
                }
            }
        }
    }
    w0
}

/// GPTQ into an affine scheme (inputs already validated by the caller).
pub(super) fn gptq_affine(
    w: &[f32],
    rows: usize,
    cols: usize,
    scheme: &QuantScheme,
    cfg: &GptqConfig,
    calib: &Calibration<'_>,
) -> Result<(AffineQuantized, Details), MethodError> {
    cfg.validate()?;
    // Validates the estimator for this scheme.
    estimators::estimate_range(&[], scheme, cfg.estimator)?;
    let prep = prepare(calib.gram, cols, cfg)?;
    let w0 = zero_dead(w, cols, &prep.dead);
    let codec = AffineCodec {
        scheme: *scheme,
        estimator: cfg.estimator,
    };
    let gpr = scheme.groups_per_row(cols);
    let fixed: Vec<(f32, i32)>;
    let plan = match scheme.granularity {
        Granularity::Group(g) if !(cfg.static_groups || cfg.act_order) => Plan::Dynamic {
            per_row: gpr,
            width: g,
        },
        granularity => {
            let ranges = estimators::estimate_ranges(&w0, rows, cols, scheme, cfg.estimator)?;
            let p: Vec<(f32, i32)> = ranges.iter().map(|&r| affine::qparams(r, scheme)).collect();
            let width = match granularity {
                Granularity::Group(g) => g,
                _ => cols.max(1),
            };
            fixed = if granularity == Granularity::Tensor {
                // One parameter pair for every row.
                vec![p[0]; rows]
            } else {
                p
            };
            Plan::Fixed {
                params: &fixed,
                per_row: gpr,
                width,
            }
        }
    };
    let out = run(&w0, rows, cols, &prep, &codec, &plan, cfg.block_size);
    let params: &[(f32, i32)] = if scheme.granularity == Granularity::Tensor {
        &out.params[..out.params.len().min(1)]
    } else {
        &out.params
    };
    let (mut scales, mut zero_points): (Vec<f32>, Vec<i32>) = params.iter().copied().unzip();
    if scheme.granularity == Granularity::Tensor && scales.is_empty() {
        // No rows: keep the one (unused) parameter pair the scheme calls for.
        let (s, z) = affine::qparams(Range::new(0.0, 0.0), scheme);
        scales.push(s);
        zero_points.push(z);
    }
    let quantized = AffineQuantized {
        rows,
        cols,
        scheme: *scheme,
        // Codes come from quantize_value, inside [qmin, qmax] ⊂ i8.
        q: out.codes.iter().map(|&c| c as i8).collect(),
        scales,
        zero_points,
    };
    Ok((
        quantized,
        Details::Gptq {
            damp: prep.damp,
            dead_columns: prep.dead.iter().filter(|&&d| d).count(),
        },
    ))
}

/// The GGUF block types [`gptq_gguf`] supports.
pub const GGUF_GPTQ_TYPES: [GgmlType; 5] = [
    GgmlType::Q8_0,
    GgmlType::Q4_0,
    GgmlType::Q4_1,
    GgmlType::Q5_0,
    GgmlType::Q5_1,
];

/// Elements per block of every supported type.
const QK: usize = 32;

/// One block's parameters as the kernel computes them.
#[derive(Debug, Clone, Copy, Default)]
struct BlockParams {
    /// The scale stored in the block, f16 bits.
    d_bits: u16,
    /// The minimum stored in the block (`_1` types), f16 bits.
    m_bits: u16,
    /// `1/d` in f32, as the kernel codes with it.
    id: f32,
    /// The block minimum in f32 (`_1` types), as the kernel codes with it.
    min: f32,
    /// The stored scale as f32 (what dequantization multiplies by).
    d: f32,
    /// The stored minimum as f32.
    m: f32,
}

/// ggml's reference (no importance matrix) scale rules and codes, per type.
struct GgufCodec {
    ty: GgmlType,
}

impl GgufCodec {
    fn symmetric(x: &[f32], levels: f32) -> BlockParams {
        // abs_max as the kernel finds it: the first value of largest magnitude, with its sign.
        let mut amax = 0.0f32;
        let mut max = 0.0f32;
        for &v in x {
            if v.abs() > amax {
                amax = v.abs();
                max = v;
            }
        }
        let d = max / -levels;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d_bits = f32_to_f16_bits(d);
        BlockParams {
            d_bits,
            id,
            d: f16_bits_to_f32(d_bits),
            ..BlockParams::default()
        }
    }

    fn affine(x: &[f32], top: f32) -> BlockParams {
        let mut min = f32::MAX;
        let mut max = -f32::MAX;
        for &v in x {
            if v < min {
                min = v;
            }
            if v > max {
                max = v;
            }
        }
        let d = (max - min) / top;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        let d_bits = f32_to_f16_bits(d);
        let m_bits = f32_to_f16_bits(min);
        BlockParams {
            d_bits,
            m_bits,
            id,
            min,
            d: f16_bits_to_f32(d_bits),
            m: f16_bits_to_f32(m_bits),
        }
    }
}

/// C's `(int)(v)` truncation, clamped into `[0, top]` (the kernel's `MIN(top, ·)` without the
/// wrap-around it would show below 0, which it never reaches).
fn truncated(v: f32, top: i32) -> i32 {
    (v as i32).clamp(0, top)
}

impl Codec for GgufCodec {
    type Params = BlockParams;

    fn params(&self, x: &[f32]) -> BlockParams {
        match self.ty {
            GgmlType::Q8_0 => {
                let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                let d_bits = f32_to_f16_bits(d);
                BlockParams {
                    d_bits,
                    id,
                    d: f16_bits_to_f32(d_bits),
                    ..BlockParams::default()
                }
            }
            GgmlType::Q4_0 => Self::symmetric(x, 8.0),
            GgmlType::Q5_0 => Self::symmetric(x, 16.0),
            GgmlType::Q4_1 => Self::affine(x, 15.0),
            _ => Self::affine(x, 31.0),
        }
    }

    fn quantize(&self, p: &BlockParams, v: f32) -> (i32, f32) {
        match self.ty {
            GgmlType::Q8_0 => {
                // `roundf` then a saturating cast, as the kernel does.
                let c = i32::from((v * p.id).round() as i8);
                (c, c as f32 * p.d)
            }
            GgmlType::Q4_0 => {
                let c = truncated(v * p.id + 8.5, 15);
                (c, (c - 8) as f32 * p.d)
            }
            GgmlType::Q5_0 => {
                let c = truncated(v * p.id + 16.5, 31);
                (c, (c - 16) as f32 * p.d)
            }
            GgmlType::Q4_1 => {
                let c = truncated((v - p.min) * p.id + 0.5, 15);
                (c, c as f32 * p.d + p.m)
            }
            _ => {
                let c = truncated((v - p.min) * p.id + 0.5, 31);
                (c, c as f32 * p.d + p.m)
            }
        }
    }
}

/// Writes one row's blocks in the kernels' byte layout.
fn encode_row(ty: GgmlType, codes: &[i32], params: &[BlockParams], out: &mut Vec<u8>) {
    for (c, p) in codes.chunks_exact(QK).zip(params) {
        out.extend_from_slice(&p.d_bits.to_le_bytes());
        match ty {
            GgmlType::Q8_0 => out.extend(c.iter().map(|&q| q as i8 as u8)),
            _ => {
                if matches!(ty, GgmlType::Q4_1 | GgmlType::Q5_1) {
                    out.extend_from_slice(&p.m_bits.to_le_bytes());
                }
                if matches!(ty, GgmlType::Q5_0 | GgmlType::Q5_1) {
                    let qh = c
                        .iter()
                        .enumerate()
                        .fold(0u32, |h, (j, &q)| h | ((((q >> 4) & 1) as u32) << j));
                    out.extend_from_slice(&qh.to_le_bytes());
                }
                // Byte j: low nibble element j, high nibble element j + 16.
                out.extend(
                    (0..QK / 2).map(|j| ((c[j] & 0x0f) | ((c[j + QK / 2] & 0x0f) << 4)) as u8),
                );
            }
        }
    }
}

/// GPTQ into a GGUF block type, with the error report.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufResult {
    /// The type.
    pub ty: GgmlType,
    /// `rows` rows of blocks, in the kernels' layout (what `quantize_rows` would write).
    pub bytes: Vec<u8>,
    /// Output error / n of the kernel's own quantization without an importance matrix.
    pub error_before: f64,
    /// Output error / n of [`Self::bytes`].
    pub error_after: f64,
    /// `‖X·Wᵀ‖² / n`.
    pub output_energy: f64,
    /// Weight RMSE of the kernel's quantization.
    pub weight_rmse_before: f64,
    /// Weight RMSE of [`Self::bytes`].
    pub weight_rmse: f64,
    /// Damping and dead columns.
    pub details: Details,
}

/// GPTQ for ggml's legacy block types ([`GGUF_GPTQ_TYPES`]); `cols` must be a multiple of 32.
/// `cfg.estimator` is not used (each block's scale follows the kernel's rule, without an
/// importance matrix). With `act_order` or `static_groups`, every block's scale is computed up
/// front from the original weights; otherwise when the block's first column is reached. The
/// baseline (`error_before`) is the kernel's own quantization without an importance matrix.
pub fn gptq_gguf(
    ty: GgmlType,
    w: &[f32],
    rows: usize,
    cols: usize,
    cfg: &GptqConfig,
    calib: &Calibration<'_>,
) -> Result<GgufResult, MethodError> {
    if !GGUF_GPTQ_TYPES.contains(&ty) {
        return Err(MethodError::Unsupported(ty));
    }
    let kernel = crate::kernel(ty).ok_or(MethodError::Unsupported(ty))?;
    let row_bytes = kernel.row_bytes(cols)?;
    cfg.validate()?;
    check_weights(w, rows, cols)?;
    check_calibration(calib, cols)?;
    let total = elements(rows, cols)?;

    let prep = prepare(calib.gram, cols, cfg)?;
    let w0 = zero_dead(w, cols, &prep.dead);
    let codec = GgufCodec { ty };
    let per_row = cols / QK;
    let fixed: Vec<BlockParams>;
    let plan = if cfg.act_order || cfg.static_groups {
        fixed = w0.chunks_exact(QK).map(|b| codec.params(b)).collect();
        Plan::Fixed {
            params: &fixed,
            per_row,
            width: QK,
        }
    } else {
        Plan::Dynamic { per_row, width: QK }
    };
    let out = run(&w0, rows, cols, &prep, &codec, &plan, cfg.block_size);
    let mut bytes = Vec::with_capacity(rows * row_bytes);
    if cols > 0 {
        for (c, p) in out
            .codes
            .chunks_exact(cols)
            .zip(out.params.chunks_exact(per_row))
        {
            encode_row(ty, c, p, &mut bytes);
        }
    }

    let mut before_bytes = vec![0u8; rows * row_bytes];
    crate::quantize_rows(ty, w, cols, None, &mut before_bytes)?;
    let mut before = vec![0.0f32; total];
    crate::dequantize_rows(ty, &before_bytes, &mut before)?;
    let mut after = vec![0.0f32; total];
    crate::dequantize_rows(ty, &bytes, &mut after)?;
    let n = calib.n as f64;
    Ok(GgufResult {
        ty,
        error_before: output_error_unchecked(w, &before, rows, cols, calib.gram) / n,
        error_after: output_error_unchecked(w, &after, rows, cols, calib.gram) / n,
        output_energy: output_energy_unchecked(w, rows, cols, calib.gram) / n,
        weight_rmse_before: weight_rmse(w, &before),
        weight_rmse: weight_rmse(w, &after),
        bytes,
        details: Details::Gptq {
            damp: prep.damp,
            dead_columns: prep.dead.iter().filter(|&&d| d).count(),
        },
    })
}
