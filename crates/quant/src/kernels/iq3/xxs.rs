//! IQ3_XXS: 3.0625 bits per weight (`quantize_row_iq3_xxs_impl(256, …)`, `dequantize_row_iq3_xxs`).

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::grid::{Grid, IQ3XXS_GRID, KSIGNS};
use super::sub_block::{c_max, scale_nibble, sigma2, weights, Inputs, Search, GROUPS, SUB};
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// `block_iq3_xxs` (98 bytes): an f16 super-scale, one grid index per 4 values, and per
/// 32 values a word of four 7-bit sign fields and a 4-bit scale.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq3Xxs {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// `iq3xxs_grid` index of each group of 4 values.
    pub(crate) grid: [u8; 64],
    /// Per 32 values, a little-endian u32: bits `7k..7k+7` are the stored signs of values
    /// `8k..8k+8` (the 8th sign is implied by even parity), bits 28..32 the scale `s`.
    pub(crate) signs_scale: [[u8; 4]; 8],
}
const _: () = assert!(std::mem::size_of::<BlockIq3Xxs>() == 98);

impl Block for BlockIq3Xxs {
    const TYPE: GgmlType = GgmlType::IQ3_XXS;
    const ELEMENTS: usize = 256;
}

/// IQ3_XXS's scale search: 31 trial scales, groups start on the grid, only off-grid groups are
/// re-snapped at the end.
fn search() -> Search {
    Search {
        grid: Grid::xxs(),
        steps: 15,
        start_on_grid: true,
        resnap_all: false,
    }
}

/// Bytes per block.
const BYTES: usize = std::mem::size_of::<BlockIq3Xxs>();

/// Sub-blocks whose largest folded magnitude is below this are left empty.
const GROUP_MAX_EPS: f32 = 1e-8;
/// ggml's fudge factor on the stored super-scale.
const FUDGE: f32 = 1.0125;

/// Quantizes one row; `imatrix`, when given, has one weight per column (ggml weights by `x²`
/// otherwise).
pub(super) fn quantize(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let search = search();
    let blocks = dst.chunks_exact_mut(BYTES);
    for (ibl, (x, out)) in src
        .chunks_exact(BlockIq3Xxs::ELEMENTS)
        .zip(blocks)
        .enumerate()
    {
        let range = ibl * BlockIq3Xxs::ELEMENTS..(ibl + 1) * BlockIq3Xxs::ELEMENTS;
        // `quantize_rows` checks the imatrix length; a short one cannot panic here.
        let qw = imatrix.and_then(|q| q.get(range));
        *bytemuck::from_bytes_mut(out) = quantize_block(&search, x, qw);
    }
}

/// Quantizes one 256-value super-block; `qw` is its slice of the importance matrix.
fn quantize_block(search: &Search, x: &[f32], qw: Option<&[f32]>) -> BlockIq3Xxs {
    let mut block = BlockIq3Xxs::zeroed();
    let sigma2 = sigma2(x);
    let mut scales = [0.0f32; 8];
    let mut words = [0u32; 8];
    let mut max_scale = 0.0f32;
    for ib in 0..8 {
        let xb = &x[SUB * ib..SUB * (ib + 1)];
        let (weight, waux) = weights(xb, qw.map(|q| &q[SUB * ib..SUB * (ib + 1)]), sigma2);
        let (xval, signs) = fold_signs(xb, &weight);
        let max = xval.iter().skip(1).fold(xval[0], |m, &v| c_max(m, v));
        if max < GROUP_MAX_EPS {
            continue;
        }
        let inputs = Inputs {
            xval: &xval,
            weight: &weight,
            waux: &waux,
        };
        let (mut scale, points) = search.run(&inputs, max);
        let mut signs = signs;
        if scale < 0.0 {
            // Defensive in ggml: keep the scale positive by flipping every sign instead.
            scale = -scale;
            signs = signs.map(|s| !s & 127);
        }
        for (k, &p) in points.iter().enumerate() {
            block.grid[GROUPS * ib + k] = p as u8;
        }
        words[ib] = signs
            .iter()
            .enumerate()
            .fold(0, |w, (k, &s)| w | u32::from(s) << (7 * k));
        scales[ib] = scale;
        max_scale = c_max(max_scale, scale);
    }
    if max_scale == 0.0 {
        return BlockIq3Xxs::zeroed();
    }
    let d = max_scale / 31.0;
    block.d = f32_to_f16_bits(d * FUDGE).to_le_bytes();
    // The nibbles are relative to the unrounded, unfudged d.
    let id = 1.0 / d;
    for ((out, word), &scale) in block.signs_scale.iter_mut().zip(words).zip(&scales) {
        *out = (word | u32::from(scale_nibble(id, scale)) << 28).to_le_bytes();
    }
    block
}

/// Folds a sub-block to magnitudes with ggml's parity rule: per group of 8, if the number of
/// negative values is odd, the element with the smallest `(w·x)·x` (first on ties) keeps its
/// sign flipped wrongly (its magnitude becomes `≤ 0`) so that only 7 sign bits need storing.
fn fold_signs(xb: &[f32], weight: &[f32; SUB]) -> ([f32; SUB], [u8; 4]) {
    let mut xval = [0.0f32; SUB];
    let mut signs = [0u8; 4];
    for (k, s) in signs.iter_mut().enumerate() {
        let group = 8 * k..8 * k + 8;
        let mut flips = 0u32;
        for (i, (v, &x)) in xval[group.clone()]
            .iter_mut()
            .zip(&xb[group.clone()])
            .enumerate()
        {
            if x >= 0.0 {
                *v = x;
            } else {
                *v = -x;
                flips += 1;
                *s |= 1 << i;
            }
        }
        if flips % 2 == 1 {
            let cost = |i: usize| weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i];
            let mut imin = 0;
            let mut min = cost(0);
            for i in 1..8 {
                let c = cost(i);
                if c < min {
                    min = c;
                    imin = i;
                }
            }
            xval[8 * k + imin] = -xval[8 * k + imin];
            *s ^= 1 << imin;
        }
        *s &= 127;
    }
    (xval, signs)
}

/// Decodes whole blocks: value = `((d·(0.5 + s))·0.5)·grid byte`, signed.
pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (bytes, out) in src
        .chunks_exact(BYTES)
        .zip(dst.chunks_exact_mut(BlockIq3Xxs::ELEMENTS))
    {
        let block: &BlockIq3Xxs = bytemuck::from_bytes(bytes);
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (ib, out) in out.chunks_exact_mut(SUB).enumerate() {
            let word = u32::from_le_bytes(block.signs_scale[ib]);
            let db = d * (0.5 + (word >> 28) as f32) * 0.5;
            for (l, out) in out.chunks_exact_mut(8).enumerate() {
                let signs = KSIGNS[((word >> (7 * l)) & 127) as usize];
                for (h, out) in out.chunks_exact_mut(4).enumerate() {
                    let point = &IQ3XXS_GRID[usize::from(block.grid[GROUPS * ib + 2 * l + h])];
                    for (j, (o, &g)) in out.iter_mut().zip(point).enumerate() {
                        let sign = if signs & (1 << (4 * h + j)) != 0 {
                            -1.0
                        } else {
                            1.0
                        };
                        *o = db * f32::from(g) * sign;
                    }
                }
            }
        }
    }
}
