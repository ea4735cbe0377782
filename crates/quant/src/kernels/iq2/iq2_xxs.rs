//! IQ2_XXS: 2.0625 bits per weight. Each 32-value sub-block stores four 8-bit indices into the
//! 256-point grid, four 7-bit sign fields (the 8th sign is implied by even parity) and a 4-bit
//! scale.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::lattice::{Grid, IQ2XXS_GRID, KSIGNS_IQ2XS};
use super::{fit, fold_signs, imatrix_weights, max_f32, scale_code, sum_squares, QK_K};
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// `block_iq2_xxs` (66 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq2Xxs {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Per 32-value sub-block `ib`, two little-endian u32 words at bytes `8·ib`: word A holds the
    /// grid index of group `k` in byte `k`; word B holds the 7 sign bits of group `k` at bits
    /// `7k..7k+7` and the sub-block scale in bits 28..32.
    pub(crate) qs: [u8; 64],
}
const _: () = assert!(std::mem::size_of::<BlockIq2Xxs>() == 66);

impl Block for BlockIq2Xxs {
    const TYPE: GgmlType = GgmlType::IQ2_XXS;
    const ELEMENTS: usize = QK_K;
}

/// `quantize_iq2_xxs` for one row.
pub(super) fn quantize(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockIq2Xxs] = bytemuck::cast_slice_mut(dst);
    for (ibl, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let qw = imatrix.map(|w| &w[QK_K * ibl..][..QK_K]);
        *block = quantize_block(x, qw);
    }
}

/// One super-block of `quantize_row_iq2_xxs_impl`.
fn quantize_block(x: &[f32], qw: Option<&[f32]>) -> BlockIq2Xxs {
    let lattice = Grid::Iq2Xxs.lattice();
    let sigma2 = sum_squares(x) / QK_K as f32;
    let mut words = [0u32; 16];
    let mut scales = [0.0f32; 8];
    let mut max_scale = 0.0f32;

    for (ib, xb) in x.chunks_exact(32).enumerate() {
        let mut weight = [0.0f32; 32];
        imatrix_weights(&mut weight, xb, qw.map(|q| &q[32 * ib..][..32]), sigma2);
        let waux = weight.map(f32::sqrt);
        let mut xval = [0.0f32; 32];
        let mut signs = [0u8; 4];
        for (k, s) in signs.iter_mut().enumerate() {
            let g = 8 * k..8 * k + 8;
            *s = fold_signs(&xb[g.clone()], &weight[g.clone()], &mut xval[g], true) & 127;
        }
        let max = xval[1..].iter().fold(xval[0], |m, &v| max_f32(m, v));
        if max < 1e-15 {
            continue;
        }
        let mut scale = qp_scale(&xval, &weight);
        let eff_max = scale * 3.0;
        if eff_max <= 0.0 {
            continue;
        }

        let mut levels = [0u8; 32];
        let mut trial = [0u8; 32];
        let mut best = 0.0f32;
        for is in -6..=6 {
            let id = (5.0 + is as f32 * 0.1) / eff_max;
            let this_scale = 1.0 / id;
            for k in 0..4 {
                let g = 8 * k..8 * k + 8;
                lattice.snap(
                    &xval[g.clone()],
                    &waux[g.clone()],
                    id,
                    this_scale,
                    &mut trial[g],
                );
            }
            let (sumqx, sumq2) = fit(&xval, &weight, &trial);
            if sumq2 > 0.0 && sumqx * sumqx > best * sumq2 {
                scale = sumqx / sumq2;
                best = scale * sumqx;
                levels = trial;
            }
        }
        // Every group is snapped again at the chosen scale, on the grid or not.
        if scale > 0.0 {
            let id = 1.0 / scale;
            for k in 0..4 {
                let g = 8 * k..8 * k + 8;
                lattice.snap(
                    &xval[g.clone()],
                    &waux[g.clone()],
                    id,
                    scale,
                    &mut levels[g],
                );
            }
            let (sumqx, sumq2) = fit(&xval, &weight, &levels);
            if sumq2 > 0.0 {
                scale = sumqx / sumq2;
            }
        }
        if scale < 0.0 {
            scale = -scale;
            for s in &mut signs {
                *s = !*s & 127;
            }
        }
        for (k, &s) in signs.iter().enumerate() {
            let index = lattice.index_of(&levels[8 * k..8 * k + 8]);
            words[2 * ib] |= u32::from(index) << (8 * k);
            words[2 * ib + 1] |= u32::from(s) << (7 * k);
        }
        scales[ib] = scale;
        max_scale = max_f32(max_scale, scale);
    }

    if max_scale == 0.0 {
        return BlockIq2Xxs::zeroed();
    }
    let d = max_scale / 31.0;
    let id = 1.0 / d;
    for (ib, &scale) in scales.iter().enumerate() {
        words[2 * ib + 1] |= u32::from(scale_code(id, scale, 15)) << 28;
    }
    let mut block = BlockIq2Xxs {
        d: f32_to_f16_bits(d).to_le_bytes(),
        qs: [0; 64],
    };
    for (out, word) in block.qs.chunks_exact_mut(4).zip(words) {
        out.copy_from_slice(&word.to_le_bytes());
    }
    block
}

/// The scale `make_qp_quants(32, 4, xval, L, weight)` returns (IQ2_XXS only needs the scale).
///
/// The levels live in a `u8` array, so the level of the one parity-negated (negative) value wraps
/// (−1 → 255, …) and later refinement steps read the wrapped value; the shared helper reproduces
/// that, and the `u8` wrap regression test pins it down.
fn qp_scale(x: &[f32], w: &[f32]) -> f32 {
    let mut levels = [0u8; 32];
    crate::kernels::search::make_qp_quants(4, x, &mut levels, w)
}

/// `dequantize_row_iq2_xxs`.
pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockIq2Xxs] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (words, y) in block.qs.chunks_exact(8).zip(out.chunks_exact_mut(32)) {
            let indices = [words[0], words[1], words[2], words[3]];
            let aux = u32::from_le_bytes([words[4], words[5], words[6], words[7]]);
            let db = d * (0.5 + (aux >> 28) as f32) * 0.25;
            for (k, y) in y.chunks_exact_mut(8).enumerate() {
                let grid = IQ2XXS_GRID[usize::from(indices[k])].to_le_bytes();
                let signs = KSIGNS_IQ2XS[((aux >> (7 * k)) & 127) as usize];
                for (j, y) in y.iter_mut().enumerate() {
                    let sign = if signs & (1 << j) != 0 { -1.0 } else { 1.0 };
                    *y = db * f32::from(grid[j]) * sign;
                }
            }
        }
    }
}
