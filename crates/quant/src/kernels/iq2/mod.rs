//! The "i-quant" types built on 8-dimensional lattice grids and sharing ggml's `iq2xs_init_impl`
//! tables: IQ2_XXS (2.06 bpw), IQ2_XS (2.31 bpw), IQ2_S (2.56 bpw), IQ1_S (1.56 bpw) and IQ1_M
//! (1.75 bpw).
//!
//! Every 256-value super-block is cut into groups of 8 values; each group is stored as the index
//! of a point on a fixed grid (levels 0..2 per coordinate), plus signs (IQ2) or a ±δ shift (IQ1),
//! under a small per-sub-block scale and an f16 super-block scale. The quantizers search scales
//! and grid points to minimise an importance-weighted squared error, bit-exact with
//! `ggml-quants.c` (`quantize_row_iq2_xxs_impl`, `_iq2_xs_impl`, `_iq2_s_impl`, `_iq1_s_impl`,
//! `_iq1_m_impl`): plain f32 operations in ggml's order, sums from left to right.
//!
//! IQ2_XXS, IQ2_XS and IQ1_S require an importance matrix; IQ2_S falls back to `σ²/4 + x²` and
//! IQ1_M to `x²` without one.

use kiln_types::GgmlType;

use super::Kernel;

mod grids;
mod iq1;
mod iq2_xs;
mod iq2_xxs;
mod lattice;
#[cfg(test)]
mod tests;

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        ty: GgmlType::IQ2_XXS,
        quantize_row: iq2_xxs::quantize,
        dequantize: iq2_xxs::dequantize,
        requires_imatrix: true,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ2_XS,
        quantize_row: iq2_xs::quantize_iq2_xs,
        dequantize: iq2_xs::dequantize_iq2_xs,
        requires_imatrix: true,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ2_S,
        quantize_row: iq2_xs::quantize_iq2_s,
        dequantize: iq2_xs::dequantize_iq2_s,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ1_S,
        quantize_row: iq1::quantize_iq1_s,
        dequantize: iq1::dequantize_iq1_s,
        requires_imatrix: true,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ1_M,
        quantize_row: iq1::quantize_iq1_m,
        dequantize: iq1::dequantize_iq1_m,
        requires_imatrix: false,
        uses_imatrix: true,
    },
];

/// Values per super-block (`QK_K`).
const QK_K: usize = 256;

/// `Σ x²` over a super-block, accumulated in order.
fn sum_squares(x: &[f32]) -> f32 {
    x.iter().fold(0.0f32, |s, &v| s + v * v)
}

/// ggml's `MAX(a, b)` (`a > b ? a : b`), which differs from `f32::max` on NaN.
fn max_f32(a: f32, b: f32) -> f32 {
    if a > b {
        a
    } else {
        b
    }
}

/// The importance-matrix weights of one sub-block: `qw_i·√(σ² + x_i²)`. The three types that
/// require an importance matrix are never called without one through `quantize_rows`; a direct
/// call without one weighs as an all-ones matrix would, rather than failing.
fn imatrix_weights(weight: &mut [f32], x: &[f32], qw: Option<&[f32]>, sigma2: f32) {
    for (i, (w, &v)) in weight.iter_mut().zip(x).enumerate() {
        let q = qw.map_or(1.0, |qw| qw[i]);
        *w = q * (sigma2 + v * v).sqrt();
    }
}

/// Folds the signs of a group of 8 into `xval = |x|` and returns the sign mask (bit `i` set for a
/// negative `x_i`; −0.0 counts as positive).
///
/// With `even_parity` (IQ2_XXS, IQ2_XS store only 7 sign bits), an odd number of negatives is made
/// even by flipping the element with the smallest `(w·x)·x` (the first on ties): its `xval`
/// becomes `−|x|` and its bit toggles. That one entry then takes part in the fits with its sign.
fn fold_signs(x: &[f32], weight: &[f32], xval: &mut [f32], even_parity: bool) -> u8 {
    let mut signs = 0u8;
    for (i, (xv, &v)) in xval.iter_mut().zip(x).enumerate() {
        if v >= 0.0 {
            *xv = v;
        } else {
            *xv = -v;
            signs |= 1 << i;
        }
    }
    if even_parity && signs.count_ones() % 2 == 1 {
        let cost = |i: usize| weight[i] * x[i] * x[i];
        let mut imin = 0;
        let mut min = cost(0);
        for i in 1..8 {
            let c = cost(i);
            if c < min {
                min = c;
                imin = i;
            }
        }
        xval[imin] = -xval[imin];
        signs ^= 1 << imin;
    }
    signs
}

/// The least-squares sums of levels against `xval`: `Σ (w·x)·q` and `Σ (w·q)·q` with
/// `q = 2·level + 1`, in order.
fn fit(xval: &[f32], weight: &[f32], levels: &[u8]) -> (f32, f32) {
    xval.iter()
        .zip(weight)
        .zip(levels)
        .fold((0.0f32, 0.0f32), |(sumqx, sumq2), ((&x, &w), &l)| {
            let q = f32::from(2 * l + 1);
            (sumqx + w * x * q, sumq2 + w * q * q)
        })
}

/// The 4-bit sub-block scale code `clamp(rne(0.5·(id·scale − 1)), 0, max)`.
fn scale_code(id: f32, scale: f32, max: i32) -> u8 {
    crate::scalar::nearest_int(0.5 * (id * scale - 1.0)).clamp(0, max) as u8
}
