//! IQ2_XS (2.3125 bpw) and IQ2_S (2.5625 bpw). Both quantize 16-value sub-blocks (two groups of
//! 8) with the same scale sweep; IQ2_XS indexes a 512-point grid and keeps 7 sign bits per group
//! under the even-parity rule, IQ2_S indexes a 1024-point grid and keeps all 8 sign bits.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::lattice::{Grid, IQ2S_GRID, IQ2XS_GRID, KSIGNS_IQ2XS};
use super::{fit, fold_signs, imatrix_weights, max_f32, scale_code, sum_squares, QK_K};
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// `block_iq2_xs` (74 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq2Xs {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// One little-endian u16 per group of 8: bits 0..9 the grid index, bits 9..16 the 7 stored
    /// sign bits.
    pub(crate) qs: [u8; 64],
    /// Per 32 values: low nibble the scale of the first 16, high nibble of the second 16.
    pub(crate) scales: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<BlockIq2Xs>() == 74);

impl Block for BlockIq2Xs {
    const TYPE: GgmlType = GgmlType::IQ2_XS;
    const ELEMENTS: usize = QK_K;
}

/// `block_iq2_s` (82 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq2S {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// The low 8 bits of the 32 grid indices, then the 32 full sign bytes (one per group of 8).
    pub(crate) qs: [u8; 64],
    /// The two high index bits of groups `4b..4b+4` in byte `b`, group `g` at bits `2·(g % 4)`.
    pub(crate) qh: [u8; 8],
    /// Scale nibbles as in IQ2_XS.
    pub(crate) scales: [u8; 8],
}
const _: () = assert!(std::mem::size_of::<BlockIq2S>() == 82);

impl Block for BlockIq2S {
    const TYPE: GgmlType = GgmlType::IQ2_S;
    const ELEMENTS: usize = QK_K;
}

/// What a 16-value sub-block quantizes to.
#[derive(Debug, Clone, Copy, Default)]
struct SubBlock {
    /// The fitted scale (≥ 0 unless the inputs are not finite).
    scale: f32,
    /// Grid index of each group of 8.
    index: [u16; 2],
    /// Sign mask of each group of 8.
    signs: [u8; 2],
}

/// The parts of the shared algorithm that differ between the two types.
struct Variant {
    /// The grid slot.
    grid: Grid,
    /// Whether signs follow the even-parity rule (IQ2_XS) or are stored whole (IQ2_S).
    even_parity: bool,
    /// Sub-blocks with `max |x|` below this stay zero.
    eps: f32,
}

/// The shared body of `quantize_row_iq2_xs_impl` / `quantize_row_iq2_s_impl` for one
/// super-block, given the importance weights of its 256 values: the scale, grid indices and signs
/// of each 16-value sub-block.
fn quantize_sub_blocks(x: &[f32], weights: &[f32], variant: &Variant) -> [SubBlock; 16] {
    let lattice = variant.grid.lattice();
    let sign_mask = if variant.even_parity { 0x7f } else { 0xff };
    let mut out = [SubBlock::default(); 16];
    for ((xb, weight), sub) in x
        .chunks_exact(16)
        .zip(weights.chunks_exact(16))
        .zip(&mut out)
    {
        let waux: [f32; 16] = std::array::from_fn(|i| weight[i].sqrt());
        let mut xval = [0.0f32; 16];
        let mut signs = [0u8; 2];
        for (k, s) in signs.iter_mut().enumerate() {
            let g = 8 * k..8 * k + 8;
            let folded = fold_signs(
                &xb[g.clone()],
                &weight[g.clone()],
                &mut xval[g],
                variant.even_parity,
            );
            *s = folded & sign_mask;
        }
        let max = xval[1..].iter().fold(xval[0], |m, &v| max_f32(m, v));
        if max < variant.eps {
            continue;
        }

        let mut levels = [0u8; 16];
        let mut trial = [0u8; 16];
        let mut on_grid = [true; 2];
        let mut trial_on_grid = [true; 2];
        let mut best = 0.0f32;
        let mut scale = max / 5.0;
        for is in -9..=9 {
            let id = (5.0 + is as f32 * 0.1) / max;
            let this_scale = 1.0 / id;
            for (k, on) in trial_on_grid.iter_mut().enumerate() {
                let g = 8 * k..8 * k + 8;
                (_, *on) = lattice.snap(
                    &xval[g.clone()],
                    &waux[g.clone()],
                    id,
                    this_scale,
                    &mut trial[g],
                );
            }
            let (sumqx, sumq2) = fit(&xval, weight, &trial);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                levels = trial;
                on_grid = trial_on_grid;
            }
        }
        // Only the groups the best sweep step had to move onto the grid are snapped again.
        if on_grid.contains(&false) && scale > 0.0 {
            let id = 1.0 / scale;
            for k in (0..2).filter(|&k| !on_grid[k]) {
                let g = 8 * k..8 * k + 8;
                lattice.snap(
                    &xval[g.clone()],
                    &waux[g.clone()],
                    id,
                    scale,
                    &mut levels[g],
                );
            }
            let (sumqx, sumq2) = fit(&xval, weight, &levels);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            scale = -scale;
            for s in &mut signs {
                *s = !*s & sign_mask;
            }
        }
        *sub = SubBlock {
            scale,
            index: [
                lattice.index_of(&levels[..8]),
                lattice.index_of(&levels[8..]),
            ],
            signs,
        };
    }
    out
}

/// The super-block scale `d = max_scale/31` (before any fudge factor) and the packed 4-bit
/// sub-block scales, or `None` when every sub-block scale is zero.
fn super_scale(subs: &[SubBlock; 16]) -> Option<(f32, [u8; 8])> {
    let max_scale = subs.iter().fold(0.0f32, |m, s| max_f32(m, s.scale));
    if max_scale == 0.0 {
        return None;
    }
    let d = max_scale / 31.0;
    let id = 1.0 / d;
    let mut nibbles = [0u8; 8];
    for (ib, sub) in subs.iter().enumerate() {
        nibbles[ib / 2] |= scale_code(id, sub.scale, 15) << (4 * (ib % 2));
    }
    Some((d, nibbles))
}

/// `quantize_iq2_xs` for one row.
pub(super) fn quantize_iq2_xs(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let variant = Variant {
        grid: Grid::Iq2Xs,
        even_parity: true,
        eps: 1e-15,
    };
    let blocks: &mut [BlockIq2Xs] = bytemuck::cast_slice_mut(dst);
    for (ibl, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let sigma2 = sum_squares(x) / QK_K as f32;
        let mut weights = [0.0f32; QK_K];
        let qw = imatrix.map(|w| &w[QK_K * ibl..][..QK_K]);
        imatrix_weights(&mut weights, x, qw, sigma2);
        let subs = quantize_sub_blocks(x, &weights, &variant);
        *block = BlockIq2Xs::zeroed();
        let Some((d, nibbles)) = super_scale(&subs) else {
            continue;
        };
        block.d = f32_to_f16_bits(d).to_le_bytes();
        block.scales = nibbles;
        for (out, sub) in block.qs.chunks_exact_mut(4).zip(&subs) {
            for k in 0..2 {
                let word = sub.index[k] | u16::from(sub.signs[k]) << 9;
                out[2 * k..2 * k + 2].copy_from_slice(&word.to_le_bytes());
            }
        }
    }
}

/// `quantize_iq2_s` for one row.
pub(super) fn quantize_iq2_s(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let variant = Variant {
        grid: Grid::Iq2S,
        even_parity: false,
        eps: 1e-8,
    };
    let blocks: &mut [BlockIq2S] = bytemuck::cast_slice_mut(dst);
    for (ibl, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
        let mut weights = [0.0f32; QK_K];
        match imatrix {
            Some(w) => imatrix_weights(&mut weights, x, Some(&w[QK_K * ibl..][..QK_K]), sigma2),
            None => {
                for (w, &v) in weights.iter_mut().zip(x) {
                    *w = 0.25 * sigma2 + v * v;
                }
            }
        }
        let subs = quantize_sub_blocks(x, &weights, &variant);
        // Unlike IQ2_XS, ggml writes each sub-block's indices and signs as it goes and leaves them
        // in place even when every scale ends up zero.
        *block = BlockIq2S::zeroed();
        for (i8, (sub, k)) in subs.iter().flat_map(|s| [(s, 0), (s, 1)]).enumerate() {
            let index = sub.index[k];
            block.qs[i8] = (index & 255) as u8;
            block.qh[i8 / 4] |= ((index >> 8) as u8) << (2 * (i8 % 4));
            block.qs[32 + i8] = sub.signs[k];
        }
        if let Some((d, nibbles)) = super_scale(&subs) {
            block.d = f32_to_f16_bits(d * 0.9875).to_le_bytes();
            block.scales = nibbles;
        }
    }
}

/// The two sub-block scales `(d·(0.5 + nibble))·0.25` of a 32-value block.
fn half_scales(d: f32, nibbles: u8) -> [f32; 2] {
    [
        d * (0.5 + f32::from(nibbles & 0xf)) * 0.25,
        d * (0.5 + f32::from(nibbles >> 4)) * 0.25,
    ]
}

/// Decodes one group of 8: `(db·grid byte)·(±1)`.
fn decode_group(y: &mut [f32], db: f32, grid: u64, signs: u8) {
    for (j, (y, byte)) in y.iter_mut().zip(grid.to_le_bytes()).enumerate() {
        let sign = if signs & (1 << j) != 0 { -1.0 } else { 1.0 };
        *y = db * f32::from(byte) * sign;
    }
}

/// `dequantize_row_iq2_xs`.
pub(super) fn dequantize_iq2_xs(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq2Xs] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (ib, y) in out.chunks_exact_mut(32).enumerate() {
            let db = half_scales(d, block.scales[ib]);
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let g = 4 * ib + l;
                let word = u16::from_le_bytes([block.qs[2 * g], block.qs[2 * g + 1]]);
                let grid = IQ2XS_GRID[usize::from(word & 511)];
                decode_group(y, db[l / 2], grid, KSIGNS_IQ2XS[usize::from(word >> 9)]);
            }
        }
    }
}

/// `dequantize_row_iq2_s`.
pub(super) fn dequantize_iq2_s(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq2S] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (ib, y) in out.chunks_exact_mut(32).enumerate() {
            let db = half_scales(d, block.scales[ib]);
            for (l, y) in y.chunks_exact_mut(8).enumerate() {
                let g = 4 * ib + l;
                let high = (usize::from(block.qh[ib]) >> (2 * l)) & 3;
                let grid = IQ2S_GRID[usize::from(block.qs[g]) | high << 8];
                decode_group(y, db[l / 2], grid, block.qs[32 + g]);
            }
        }
    }
}
