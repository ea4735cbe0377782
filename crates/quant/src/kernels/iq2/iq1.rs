//! IQ1_S (1.5625 bpw) and IQ1_M (1.75 bpw): ternary grids with a shift. A group of 8 decodes to
//! `dl·(g_j + δ)`, `g_j ∈ {−1, 0, 1}` from the 2048-point `iq1s_grid` and `δ = ±0.125`.
//!
//! The quantizers solve the 3-level weighted least-squares split exactly: sorted by value, every
//! pair of boundaries `(i1, i2)` is scored from prefix sums, then groups off the grid are moved to
//! their nearest grid neighbour. IQ1_S has one shift per 32 values; IQ1_M one per group of 8 and a
//! final least-squares refit of the super-block scale.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::lattice::{key_of, Grid, Lattice, Lookup, IQ1S_GRID};
use super::{imatrix_weights, max_f32, scale_code, sum_squares, QK_K};
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// `IQ1S_DELTA` / `IQ1M_DELTA`.
const DELTA: f32 = 0.125;
/// The model values of levels 0, 1, 2 with shift +δ (`x_p`): −0.875, 0.125, 1.125.
const X_P: [f32; 3] = [-1.0 + DELTA, DELTA, 1.0 + DELTA];
/// The model values with shift −δ (`x_m`): −1.125, −0.125, 0.875.
const X_M: [f32; 3] = [-1.0 - DELTA, -DELTA, 1.0 - DELTA];

/// `block_iq1_s` (50 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq1S {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Low 8 bits of the grid index of each group of 8.
    pub(crate) qs: [u8; 32],
    /// One little-endian u16 per 32 values: bits `3k..3k+3` the high index bits of group `k`,
    /// bits 12..15 the scale, bit 15 set for shift −δ.
    pub(crate) qh: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockIq1S>() == 50);

impl Block for BlockIq1S {
    const TYPE: GgmlType = GgmlType::IQ1_S;
    const ELEMENTS: usize = QK_K;
}

/// `block_iq1_m` (56 bytes; the f16 super-block scale is spread over the top nibbles of
/// `scales`).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq1M {
    /// Low 8 bits of the grid index of each group of 8.
    pub(crate) qs: [u8; 32],
    /// One byte per 16 values: bits 0..3 the high index bits of the first group, bit 3 its −δ
    /// flag, bits 4..7 and bit 7 the same for the second group.
    pub(crate) qh: [u8; 16],
    /// Four little-endian u16: bits 0..12 of word `t` the 3-bit scales of 16-value sub-blocks
    /// `4t..4t+4`; bits 12..16 of words 0..4 the f16 scale, lowest nibble first.
    pub(crate) scales: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<BlockIq1M>() == 56);

impl Block for BlockIq1M {
    const TYPE: GgmlType = GgmlType::IQ1_M;
    const ELEMENTS: usize = QK_K;
}

/// The value order of a sub-block: indices sorted by `x` ascending, equal values (−0.0 = +0.0)
/// keeping index order. ggml uses `qsort`, which glibc implements as a stable merge sort; an
/// insertion sort gives the same order, and never fails on NaN.
fn sorted_order<const N: usize>(x: &[f32]) -> [usize; N] {
    let mut order: [usize; N] = std::array::from_fn(|i| i);
    for i in 1..N {
        let mut j = i;
        while j > 0 && x[order[j - 1]] > x[order[j]] {
            order.swap(j - 1, j);
            j -= 1;
        }
    }
    order
}

/// Levels of a sub-block from a split of its sorted order: 0 below `i1`, 1 in `[i1, i2)`, 2 from
/// `i2` on.
fn split_levels<const N: usize>(order: &[usize; N], i1: usize, i2: usize) -> [u8; N] {
    let mut levels = [0u8; N];
    for (j, &i) in order.iter().enumerate() {
        levels[i] = u8::from(j >= i1) + u8::from(j >= i2);
    }
    levels
}

/// Puts a group of 8 on the grid: its own index if its levels are a point, else the nearest
/// neighbour at `scale` under the value table `xx`. Returns the index and whether it was on the
/// grid.
fn snap_group(
    lattice: &Lattice,
    levels: &[u8],
    x: &[f32],
    weight: &[f32],
    scale: f32,
    xx: &[f32; 3],
) -> (u16, bool) {
    match lattice.lookup(key_of(levels)) {
        Lookup::OnGrid(index) => (index, true),
        Lookup::Neighbours(list) => (lattice.nearest_iq1(list, x, weight, scale, xx), false),
    }
}

/// Adds `Σ (w·q)·x` and `Σ (w·q)·q` of a group decoded at grid point `index` to the running sums,
/// with `q = xx[level]·mult` (IQ1_S refits with `mult = 1`, which is exact).
fn refit_group(
    lattice: &Lattice,
    index: u16,
    xx: &[f32; 3],
    mult: f32,
    x: &[f32],
    weight: &[f32],
    sums: &mut (f32, f32),
) {
    for ((&l, &v), &w) in lattice.levels(index).iter().zip(x).zip(weight) {
        let q = xx[usize::from(l)] * mult;
        sums.0 += w * q * v;
        sums.1 += w * q * q;
    }
}

/// `quantize_iq1_s` for one row.
pub(super) fn quantize_iq1_s(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockIq1S] = bytemuck::cast_slice_mut(dst);
    for (ibl, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let qw = imatrix.map(|w| &w[QK_K * ibl..][..QK_K]);
        *block = quantize_iq1_s_block(x, qw);
    }
}

/// One super-block of `quantize_row_iq1_s_impl`.
fn quantize_iq1_s_block(x: &[f32], qw: Option<&[f32]>) -> BlockIq1S {
    let lattice = Grid::Iq1.lattice();
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut block = BlockIq1S::zeroed();
    let mut qh = [0u16; 8];
    let mut scales = [0.0f32; 8];
    let mut shifts = [1i8; 8];
    let mut max_scale = 0.0f32;

    for (ib, xb) in x.chunks_exact(32).enumerate() {
        let mut weight = [0.0f32; 32];
        imatrix_weights(&mut weight, xb, qw.map(|q| &q[32 * ib..][..32]), sigma2);
        let max = xb[1..]
            .iter()
            .fold(xb[0].abs(), |m, &v| max_f32(m, v.abs()));
        if max < 1e-12 {
            continue;
        }
        let order = sorted_order::<32>(xb);
        let mut sumx = [0.0f32; 33];
        let mut sumw = [0.0f32; 33];
        for (j, &i) in order.iter().enumerate() {
            sumx[j + 1] = sumx[j] + weight[i] * xb[i];
            sumw[j + 1] = sumw[j] + weight[i];
        }
        let mut best_score = f32::MIN;
        let mut scale = max;
        let mut best = None;
        for i1 in 0..=32 {
            for i2 in i1..=32 {
                for (xx, shift) in [(&X_P, 1i8), (&X_M, -1)] {
                    let sumqx = (sumx[i1] - sumx[0]) * xx[0]
                        + (sumx[i2] - sumx[i1]) * xx[1]
                        + (sumx[32] - sumx[i2]) * xx[2];
                    let sumq2 = (sumw[i1] - sumw[0]) * xx[0] * xx[0]
                        + (sumw[i2] - sumw[i1]) * xx[1] * xx[1]
                        + (sumw[32] - sumw[i2]) * xx[2] * xx[2];
                    if sumq2 > 0.0 && sumqx * sumqx > best_score * sumq2 {
                        scale = sumqx / sumq2;
                        best_score = scale * sumqx;
                        best = Some((i1, i2, shift));
                    }
                }
            }
        }
        let Some((i1, i2, mut shift)) = best else {
            continue;
        };
        let mut levels = split_levels(&order, i1, i2);
        if scale < 0.0 {
            levels = levels.map(|l| 2 - l);
            scale = -scale;
            shift = -shift;
        }
        let xx = if shift == 1 { &X_P } else { &X_M };
        let mut index = [0u16; 4];
        let mut all_on_grid = true;
        for (k, index) in index.iter_mut().enumerate() {
            let g = 8 * k..8 * k + 8;
            let (i, on) = snap_group(
                lattice,
                &levels[g.clone()],
                &xb[g.clone()],
                &weight[g],
                scale,
                xx,
            );
            *index = i;
            all_on_grid &= on;
        }
        if !all_on_grid {
            let mut sums = (0.0f32, 0.0f32);
            for (k, &i) in index.iter().enumerate() {
                let g = 8 * k..8 * k + 8;
                refit_group(lattice, i, xx, 1.0, &xb[g.clone()], &weight[g], &mut sums);
            }
            if sums.0 > 0.0 && sums.1 > 0.0 {
                scale = sums.0 / sums.1;
            }
        }
        for (k, &i) in index.iter().enumerate() {
            block.qs[4 * ib + k] = (i & 255) as u8;
            qh[ib] |= (i >> 8) << (3 * k);
        }
        scales[ib] = scale;
        shifts[ib] = shift;
        max_scale = max_f32(max_scale, scale);
    }

    if max_scale != 0.0 {
        let d = max_scale / 15.0;
        // 1.125 is one of ggml's empirical fudge factors.
        block.d = f32_to_f16_bits(d * 1.125).to_le_bytes();
        let id = 1.0 / d;
        for ib in 0..8 {
            let mut l = u16::from(scale_code(id, scales[ib], 7));
            if shifts[ib] == -1 {
                l |= 8;
            }
            qh[ib] |= l << 12;
        }
    }
    for (out, h) in block.qh.chunks_exact_mut(2).zip(qh) {
        out.copy_from_slice(&h.to_le_bytes());
    }
    block
}

/// `quantize_iq1_m` for one row.
pub(super) fn quantize_iq1_m(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockIq1M] = bytemuck::cast_slice_mut(dst);
    for (ibl, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let qw = imatrix.map(|w| &w[QK_K * ibl..][..QK_K]);
        *block = quantize_iq1_m_block(x, qw);
    }
}

/// The value table of group `k` (0 or 1) of an IQ1_M sub-block under shift code `code`
/// (0: +,+  1: +,−  2: −,+  3: −,−).
fn iq1m_values(code: u8, k: usize) -> &'static [f32; 3] {
    let minus = if k == 0 { code >= 2 } else { code % 2 == 1 };
    if minus {
        &X_M
    } else {
        &X_P
    }
}

/// The best split of a 16-value sub-block over the four shift combinations, scored with ggml's
/// per-half prefix sums: since `v0 = v2 − 2` and `v1 = v2 − 1` for both tables, a half's
/// `Σ (w·x)·v` collapses to `T·v2 − S[i1] − S[i2]`. These short-cuts round differently from a
/// direct three-group sum, so they are kept exactly. Returns the scale and `(i1, i2, code)`.
fn iq1m_split(
    xb: &[f32],
    weight: &[f32],
    order: &[usize; 16],
    max: f32,
) -> (f32, Option<(usize, usize, u8)>) {
    let mut px = [[0.0f32; 17]; 2];
    let mut pw = [[0.0f32; 17]; 2];
    for (j, &i) in order.iter().enumerate() {
        let h = usize::from(i >= 8);
        px[h][j + 1] = px[h][j] + weight[i] * xb[i];
        px[1 - h][j + 1] = px[1 - h][j];
        pw[h][j + 1] = pw[h][j] + weight[i];
        pw[1 - h][j + 1] = pw[1 - h][j];
    }
    let txs = [px[0][16], px[1][16]];
    let tws = [pw[0][16], pw[1][16]];
    let (p2, m2) = (X_P[2], X_M[2]);
    let cp1 = X_P[0] * X_P[0] - X_P[1] * X_P[1];
    let cp2 = X_P[1] * X_P[1] - X_P[2] * X_P[2];
    let cm1 = X_M[0] * X_M[0] - X_M[1] * X_M[1];
    let cm2 = X_M[1] * X_M[1] - X_M[2] * X_M[2];

    let mut best_score = f32::MIN;
    let mut scale = max;
    let mut best = None;
    for i1 in 0..=16 {
        for i2 in i1..=16 {
            let mut qx_p = [0.0f32; 2];
            let mut qx_m = [0.0f32; 2];
            let mut q2_p = [0.0f32; 2];
            let mut q2_m = [0.0f32; 2];
            for h in 0..2 {
                let sx = px[h][i1] + px[h][i2];
                qx_p[h] = txs[h] * p2 - sx;
                qx_m[h] = txs[h] * m2 - sx;
                q2_p[h] = tws[h] * p2 * p2 + pw[h][i1] * cp1 + pw[h][i2] * cp2;
                q2_m[h] = tws[h] * m2 * m2 + pw[h][i1] * cm1 + pw[h][i2] * cm2;
            }
            let sumqx = [
                qx_p[0] + qx_p[1],
                qx_p[0] + qx_m[1],
                qx_m[0] + qx_p[1],
                qx_m[0] + qx_m[1],
            ];
            let sumq2 = [
                q2_p[0] + q2_p[1],
                q2_p[0] + q2_m[1],
                q2_m[0] + q2_p[1],
                q2_m[0] + q2_m[1],
            ];
            for (code, (&sqx, &sq2)) in sumqx.iter().zip(&sumq2).enumerate() {
                if sq2 > 0.0 && sqx * sqx > best_score * sq2 {
                    scale = sqx / sq2;
                    best_score = scale * sqx;
                    best = Some((i1, i2, code as u8));
                }
            }
        }
    }
    (scale, best)
}

/// One super-block of `quantize_row_iq1_m_impl`.
fn quantize_iq1_m_block(x: &[f32], qw: Option<&[f32]>) -> BlockIq1M {
    const MASKS: [u8; 4] = [0x00, 0x80, 0x08, 0x88];
    let lattice = Grid::Iq1.lattice();
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    let mut weights = [0.0f32; QK_K];
    match qw {
        Some(qw) => imatrix_weights(&mut weights, x, Some(qw), sigma2),
        None => {
            for (w, &v) in weights.iter_mut().zip(x) {
                *w = v * v;
            }
        }
    }
    let mut block = BlockIq1M::zeroed();
    let mut scales = [0.0f32; 16];
    let mut shifts = [0u8; 16];
    let mut max_scale = 0.0f32;

    for (ib, (xb, weight)) in x.chunks_exact(16).zip(weights.chunks_exact(16)).enumerate() {
        let max = xb[1..]
            .iter()
            .fold(xb[0].abs(), |m, &v| max_f32(m, v.abs()));
        if max < 1e-7 {
            continue;
        }
        let order = sorted_order::<16>(xb);
        let (mut scale, best) = iq1m_split(xb, weight, &order, max);
        let Some((i1, i2, mut code)) = best else {
            continue;
        };
        let mut levels = split_levels(&order, i1, i2);
        if scale < 0.0 {
            levels = levels.map(|l| 2 - l);
            scale = -scale;
            code = 3 - code;
        }
        let mut index = [0u16; 2];
        let mut all_on_grid = true;
        for (k, index) in index.iter_mut().enumerate() {
            let g = 8 * k..8 * k + 8;
            let xx = iq1m_values(code, k);
            let (i, on) = snap_group(
                lattice,
                &levels[g.clone()],
                &xb[g.clone()],
                &weight[g],
                scale,
                xx,
            );
            *index = i;
            all_on_grid &= on;
        }
        if !all_on_grid {
            let mut sums = (0.0f32, 0.0f32);
            for (k, &i) in index.iter().enumerate() {
                let g = 8 * k..8 * k + 8;
                refit_group(
                    lattice,
                    i,
                    iq1m_values(code, k),
                    1.0,
                    &xb[g.clone()],
                    &weight[g],
                    &mut sums,
                );
            }
            if sums.0 > 0.0 && sums.1 > 0.0 {
                scale = sums.0 / sums.1;
            }
        }
        block.qs[2 * ib] = (index[0] & 255) as u8;
        block.qs[2 * ib + 1] = (index[1] & 255) as u8;
        block.qh[ib] = ((index[0] >> 8) | (index[1] >> 8) << 4) as u8;
        scales[ib] = scale;
        shifts[ib] = code;
        max_scale = max_f32(max_scale, scale);
    }

    if max_scale == 0.0 {
        return block;
    }
    // Refit the super-block scale over all 256 values with the quantized sub-block scales,
    // zero sub-blocks included (they decode as grid point 0 under shift +δ).
    let mut sc = [0u16; 4];
    let mut d = max_scale / 15.0;
    let id = 1.0 / d;
    let mut sums = (0.0f32, 0.0f32);
    for (ib, (xb, weight)) in x.chunks_exact(16).zip(weights.chunks_exact(16)).enumerate() {
        let l = scale_code(id, scales[ib], 7);
        sc[ib / 4] |= u16::from(l) << (3 * (ib % 4));
        block.qh[ib] |= MASKS[usize::from(shifts[ib])];
        let mult = f32::from(2 * l + 1);
        for k in 0..2 {
            let high = (u16::from(block.qh[ib]) << (8 - 4 * k)) & 0x700;
            let index = u16::from(block.qs[2 * ib + k]) + high;
            let g = 8 * k..8 * k + 8;
            let xx = iq1m_values(shifts[ib], k);
            refit_group(
                lattice,
                index,
                xx,
                mult,
                &xb[g.clone()],
                &weight[g],
                &mut sums,
            );
        }
    }
    if sums.1 > 0.0 {
        d = sums.0 / sums.1;
    }
    // 1.1125 is one of ggml's empirical fudge factors.
    let s = f32_to_f16_bits(d * 1.1125);
    sc[0] |= (s & 0x000f) << 12;
    sc[1] |= (s & 0x00f0) << 8;
    sc[2] |= (s & 0x0f00) << 4;
    sc[3] |= s & 0xf000;
    for (out, w) in block.scales.chunks_exact_mut(2).zip(sc) {
        out.copy_from_slice(&w.to_le_bytes());
    }
    block
}

/// Decodes one group of 8: `dl·(g_j + δ)`.
fn decode_group(y: &mut [f32], dl: f32, index: usize, delta: f32) {
    for (y, byte) in y.iter_mut().zip(IQ1S_GRID[index].to_le_bytes()) {
        *y = dl * (f32::from(byte as i8) + delta);
    }
}

/// `dequantize_row_iq1_s`.
pub(super) fn dequantize_iq1_s(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq1S] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (ib, y) in out.chunks_exact_mut(32).enumerate() {
            let h = u16::from_le_bytes([block.qh[2 * ib], block.qh[2 * ib + 1]]);
            let dl = d * f32::from(2 * ((h >> 12) & 7) + 1);
            let delta = if h & 0x8000 != 0 { -DELTA } else { DELTA };
            for (k, y) in y.chunks_exact_mut(8).enumerate() {
                let index =
                    usize::from(block.qs[4 * ib + k]) | usize::from((h >> (3 * k)) & 7) << 8;
                decode_group(y, dl, index, delta);
            }
        }
    }
}

/// `dequantize_row_iq1_m`.
pub(super) fn dequantize_iq1_m(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq1M] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let sc: [u16; 4] = std::array::from_fn(|t| {
            u16::from_le_bytes([block.scales[2 * t], block.scales[2 * t + 1]])
        });
        let bits =
            (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | (sc[3] & 0xf000);
        let d = f16_bits_to_f32(bits);
        for (ib, y) in out.chunks_exact_mut(32).enumerate() {
            let w = sc[ib / 2] >> (6 * (ib % 2));
            let dl = [
                d * f32::from(2 * (w & 7) + 1),
                d * f32::from(2 * ((w >> 3) & 7) + 1),
            ];
            for (g, y) in y.chunks_exact_mut(8).enumerate() {
                let h = block.qh[2 * ib + g / 2] >> (4 * (g % 2));
                let index = usize::from(block.qs[4 * ib + g]) | usize::from(h & 7) << 8;
                let delta = if h & 8 != 0 { -DELTA } else { DELTA };
                decode_group(y, dl[g / 2], index, delta);
            }
        }
    }
}
