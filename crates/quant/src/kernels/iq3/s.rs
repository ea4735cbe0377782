//! IQ3_S: 3.4375 bits per weight (`quantize_row_iq3_s_impl(32, …)`, `dequantize_row_iq3_s`).

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::grid::{Grid, IQ3S_GRID};
use super::sub_block::{c_max, scale_nibble, sigma2, weights, Inputs, Search, GROUPS, SUB};
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

/// `block_iq3_s` (110 bytes): an f16 super-scale, 9-bit grid indices (low bytes in `qs`, high
/// bits in `qh`), a full sign byte per 8 values and a 4-bit scale per 32 values.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockIq3S {
    /// Super-block scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Low 8 bits of the `iq3s_grid` index of each group of 4 values.
    pub(crate) qs: [u8; 64],
    /// Byte `ib`, bit `k`: the 9th index bit of group `k` of 32-value sub-block `ib`.
    pub(crate) qh: [u8; 8],
    /// One byte per 8 values; bit `j` set means value `j` is negative.
    pub(crate) signs: [u8; 32],
    /// Byte `t`: low nibble = scale of sub-block `2t`, high nibble = sub-block `2t + 1`.
    pub(crate) scales: [u8; 4],
}
const _: () = assert!(std::mem::size_of::<BlockIq3S>() == 110);

impl Block for BlockIq3S {
    const TYPE: GgmlType = GgmlType::IQ3_S;
    const ELEMENTS: usize = 256;
}

/// Bytes per block.
const BYTES: usize = std::mem::size_of::<BlockIq3S>();
/// ggml's fudge factor on the stored super-scale.
const FUDGE: f32 = 1.033;

/// IQ3_S's scale search: 19 trial scales, and every group is re-snapped at the fitted scale
/// (ggml starts all groups "off the grid" and has the on-grid skip commented out).
fn search() -> Search {
    Search {
        grid: Grid::s(),
        steps: 9,
        start_on_grid: false,
        resnap_all: true,
    }
}

/// Quantizes one row; `imatrix`, when given, has one weight per column (ggml weights by `x²`
/// otherwise).
pub(super) fn quantize(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let search = search();
    for (ibl, (x, out)) in src
        .chunks_exact(BlockIq3S::ELEMENTS)
        .zip(dst.chunks_exact_mut(BYTES))
        .enumerate()
    {
        let range = ibl * BlockIq3S::ELEMENTS..(ibl + 1) * BlockIq3S::ELEMENTS;
        // `quantize_rows` checks the imatrix length; a short one cannot panic here.
        let qw = imatrix.and_then(|q| q.get(range));
        *bytemuck::from_bytes_mut(out) = quantize_block(&search, x, qw);
    }
}

/// Quantizes one 256-value super-block; `qw` is its slice of the importance matrix.
fn quantize_block(search: &Search, x: &[f32], qw: Option<&[f32]>) -> BlockIq3S {
    let mut block = BlockIq3S::zeroed();
    let sigma2 = sigma2(x);
    let mut scales = [0.0f32; 8];
    let mut max_scale = 0.0f32;
    // ggml writes index bytes and sign bytes through cursors that only advance for non-empty
    // sub-blocks, while `qh` is indexed by sub-block. After an exactly-zero sub-block the later
    // ones therefore land one slot early and no longer pair up with their high bits; the output
    // must reproduce that.
    let mut qs_at = 0;
    let mut signs_at = 0;
    for ib in 0..8 {
        let xb = &x[SUB * ib..SUB * (ib + 1)];
        let (weight, waux) = weights(xb, qw.map(|q| &q[SUB * ib..SUB * (ib + 1)]), sigma2);
        let mut xval = [0.0f32; SUB];
        let mut signs = [0u8; 4];
        for (i, (v, &x)) in xval.iter_mut().zip(xb).enumerate() {
            if x >= 0.0 {
                *v = x;
            } else {
                *v = -x;
                signs[i / 8] |= 1 << (i % 8);
            }
        }
        let max = xval.iter().skip(1).fold(xval[0], |m, &v| c_max(m, v));
        if max == 0.0 {
            continue;
        }
        let inputs = Inputs {
            xval: &xval,
            weight: &weight,
            waux: &waux,
        };
        let (mut scale, points) = search.run(&inputs, max);
        if scale < 0.0 {
            // Defensive in ggml: keep the scale positive by flipping every sign instead.
            scale = -scale;
            signs = signs.map(|s| !s);
        }
        for (k, &p) in points.iter().enumerate() {
            block.qs[qs_at + k] = p as u8;
            block.qh[ib] |= ((p >> 8) as u8) << k;
        }
        qs_at += GROUPS;
        block.signs[signs_at..signs_at + 4].copy_from_slice(&signs);
        signs_at += 4;
        scales[ib] = scale;
        max_scale = c_max(max_scale, scale);
    }
    if max_scale == 0.0 {
        // Only d and the scales stay zero; any index and sign bytes already written remain.
        return block;
    }
    let d = max_scale / 31.0;
    block.d = f32_to_f16_bits(d * FUDGE).to_le_bytes();
    // The nibbles are relative to the unrounded, unfudged d.
    let id = 1.0 / d;
    for (out, pair) in block.scales.iter_mut().zip(scales.chunks_exact(2)) {
        *out = scale_nibble(id, pair[0]) | scale_nibble(id, pair[1]) << 4;
    }
    block
}

/// Decodes whole blocks: value = `(d·(1 + 2s))·grid byte`, signed.
pub(super) fn dequantize(src: &[u8], dst: &mut [f32]) {
    for (bytes, out) in src
        .chunks_exact(BYTES)
        .zip(dst.chunks_exact_mut(BlockIq3S::ELEMENTS))
    {
        let block: &BlockIq3S = bytemuck::from_bytes(bytes);
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (ib, out) in out.chunks_exact_mut(SUB).enumerate() {
            let s = (block.scales[ib / 2] >> (4 * (ib % 2))) & 15;
            let db = d * f32::from(1 + 2 * s);
            for (m, out) in out.chunks_exact_mut(4).enumerate() {
                let high = usize::from((block.qh[ib] >> m) & 1) << 8;
                let point = &IQ3S_GRID[usize::from(block.qs[GROUPS * ib + m]) | high];
                let signs = block.signs[4 * ib + m / 2] >> (4 * (m % 2));
                for (j, (o, &g)) in out.iter_mut().zip(point).enumerate() {
                    let sign = if signs & (1 << j) != 0 { -1.0 } else { 1.0 };
                    *o = db * f32::from(g) * sign;
                }
            }
        }
    }
}
