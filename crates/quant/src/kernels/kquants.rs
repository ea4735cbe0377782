//! The k-quants Q2_K, Q3_K, Q4_K, Q5_K, Q6_K: super-blocks of 256 elements split into sub-blocks
//! of 16 (Q2_K, Q3_K, Q6_K) or 32 (Q4_K, Q5_K), each with a small integer scale (and, for Q2_K,
//! Q4_K and Q5_K, an integer minimum) relative to the super-block's f16 `d` (and `dmin`).
//!
//! Without an importance matrix each type follows ggml's reference row
//! (`quantize_row_q*_K_ref`); with one, the per-row `quantize_row_q*_K_impl`. The two differ in
//! their sub-block weights (§2.7 of the format notes): the references weigh by |x| (Q2_K), x²
//! (Q3_K, Q6_K) or √(mean x²) + |x| (Q4_K, Q5_K); the impls by qw·√(σ² + x²) with σ² the mean
//! of x² over the super-block (Q2_K) or twice it (Q3_K, Q4_K, Q5_K), except Q6_K, which uses the
//! raw imatrix weight. The impls also choose the super-block scales by search (`make_qp_quants`,
//! `make_qx_quants`) rather than from the largest sub-block scale.
//!
//! Every type finishes the same way: the sub-block scale codes and the f16 super-block scales are
//! fixed first, and the levels are then recomputed from those *stored* values, so that decoding
//! sees the same scales the levels were chosen for. A sub-block whose stored scale is zero keeps
//! the levels of its own search (all zero for an all-zero sub-block).

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::search::{
    make_q3_quants, make_qkx2_quants, make_qkx3_quants, make_qp_quants, make_qx_quants,
    sum_squares, AffineGrid, GROUP_MAX_EPS,
};
use super::Kernel;
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits, nearest_int};

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        ty: GgmlType::Q2_K,
        quantize_row: quantize_q2_k,
        dequantize: dequantize_q2_k,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q3_K,
        quantize_row: quantize_q3_k,
        dequantize: dequantize_q3_k,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q4_K,
        quantize_row: quantize_q4_k,
        dequantize: dequantize_q4_k,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q5_K,
        quantize_row: quantize_q5_k,
        dequantize: dequantize_q5_k,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q6_K,
        quantize_row: quantize_q6_k,
        dequantize: dequantize_q6_k,
        requires_imatrix: false,
        uses_imatrix: true,
    },
];

/// Elements per super-block (`QK_K`).
const QK_K: usize = 256;

/// `block_q2_K` (84 bytes). Value = d·(scale code)·q − dmin·(min code), q in 0..=3.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ2K {
    /// Per sub-block of 16: low nibble the scale code, high nibble the min code.
    pub(crate) scales: [u8; 16],
    /// 2-bit levels: element `128h + 32s + l` in `qs[32h + l]` bits `2s..2s+1`.
    pub(crate) qs: [u8; 64],
    /// Super-block scale, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Super-block scale of the mins, f16 bits, little-endian.
    pub(crate) dmin: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ2K>() == 84);

impl Block for BlockQ2K {
    const TYPE: GgmlType = GgmlType::Q2_K;
    const ELEMENTS: usize = QK_K;
}

/// `block_q3_K` (110 bytes). Value = d·(c − 32)·(q − 4), q in 0..=7, c a 6-bit scale code.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ3K {
    /// Bit 2 of the levels: element `k` in `hmask[k % 32]` bit `k / 32`.
    pub(crate) hmask: [u8; 32],
    /// Low 2 bits of the levels, packed as in [`BlockQ2K`].
    pub(crate) qs: [u8; 64],
    /// Sixteen 6-bit scale codes: low nibbles in bytes 0..8 (codes 0..8 low, 8..16 high), top
    /// two bits of code `s` in byte `8 + s % 4` at bit `2·(s / 4)`.
    pub(crate) scales: [u8; 12],
    /// Super-block scale, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ3K>() == 110);

impl Block for BlockQ3K {
    const TYPE: GgmlType = GgmlType::Q3_K;
    const ELEMENTS: usize = QK_K;
}

/// `block_q4_K` (144 bytes). Value = d·ls·q − dmin·lm, q in 0..=15.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ4K {
    /// Super-block scale, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Super-block scale of the mins, f16 bits, little-endian.
    pub(crate) dmin: [u8; 2],
    /// Eight 6-bit scale codes and eight 6-bit min codes (see [`scale_min_k4`]).
    pub(crate) scales: [u8; 12],
    /// Nibbles: byte `32c + l` holds element `64c + l` (low) and `64c + 32 + l` (high).
    pub(crate) qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ4K>() == 144);

impl Block for BlockQ4K {
    const TYPE: GgmlType = GgmlType::Q4_K;
    const ELEMENTS: usize = QK_K;
}

/// `block_q5_K` (176 bytes). Value = d·ls·q − dmin·lm, q in 0..=31.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ5K {
    /// Super-block scale, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Super-block scale of the mins, f16 bits, little-endian.
    pub(crate) dmin: [u8; 2],
    /// Scale and min codes as in [`BlockQ4K`].
    pub(crate) scales: [u8; 12],
    /// Bit 4 of the levels: element `64c + l` in `qh[l]` bit `2c`, `64c + 32 + l` in bit `2c + 1`.
    pub(crate) qh: [u8; 32],
    /// Low 4 bits, packed as in [`BlockQ4K`].
    pub(crate) qs: [u8; 128],
}
const _: () = assert!(std::mem::size_of::<BlockQ5K>() == 176);

impl Block for BlockQ5K {
    const TYPE: GgmlType = GgmlType::Q5_K;
    const ELEMENTS: usize = QK_K;
}

/// `block_q6_K` (210 bytes). Value = d·scales[k / 16]·(q − 32), q in 0..=63.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ6K {
    /// Low 4 bits of the levels (see [`pack_q6`]).
    pub(crate) ql: [u8; 128],
    /// High 2 bits of the levels.
    pub(crate) qh: [u8; 64],
    /// Signed 8-bit sub-block scales.
    pub(crate) scales: [i8; 16],
    /// Super-block scale, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockQ6K>() == 210);

impl Block for BlockQ6K {
    const TYPE: GgmlType = GgmlType::Q6_K;
    const ELEMENTS: usize = QK_K;
}

fn to_f16(x: f32) -> [u8; 2] {
    f32_to_f16_bits(x).to_le_bytes()
}

fn from_f16(bytes: [u8; 2]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes(bytes))
}

/// The weight slice of super-block `i` of a row.
fn block_weights(imatrix: Option<&[f32]>, i: usize) -> Option<&[f32]> {
    imatrix.map(|w| &w[i * QK_K..][..QK_K])
}

/// ggml's imatrix weights qw·√(σ² + x²).
fn imatrix_weights(w: &mut [f32], qw: &[f32], x: &[f32], sigma2: f32) {
    for ((w, &q), &v) in w.iter_mut().zip(qw).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
    }
}

/// Σ of a sub-block's weights, accumulated from 0 in element order.
fn sum(w: &[f32]) -> f32 {
    w.iter().fold(0.0f32, |s, &v| s + v)
}

/// The grid of `make_qkx3_quants` in every k-quant impl.
const IMPL_GRID: AffineGrid = AffineGrid {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

/// Packs 2-bit levels (Q2_K, and the low bits of Q3_K): within each half of 128, byte `l` holds
/// elements `l`, `l + 32`, `l + 64`, `l + 96` from the low bits up.
fn pack_2bit(levels: &[u8; QK_K], qs: &mut [u8; 64]) {
    for (qs, l) in qs.chunks_exact_mut(32).zip(levels.chunks_exact(128)) {
        for (j, q) in qs.iter_mut().enumerate() {
            *q = l[j] | (l[j + 32] << 2) | (l[j + 64] << 4) | (l[j + 96] << 6);
        }
    }
}

/// The 2-bit level of element `k` from a Q2_K/Q3_K `qs`.
fn unpack_2bit(qs: &[u8; 64], k: usize) -> u8 {
    let (h, r) = (k / 128, k % 128);
    (qs[32 * h + r % 32] >> (2 * (r / 32))) & 3
}

// ---------------------------------------------------------------------------------------------
// Q2_K

fn quantize_q2_k(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ2K] = bytemuck::cast_slice_mut(dst);
    for (i, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        match block_weights(imatrix, i) {
            None => q2_k_ref(x, block),
            Some(qw) => q2_k_impl(x, qw, block),
        }
    }
}

/// `quantize_row_q2_K_ref` for one super-block.
fn q2_k_ref(x: &[f32], block: &mut BlockQ2K) {
    const GRID: AffineGrid = AffineGrid {
        rmin: -0.5,
        rdelta: 0.1,
        nstep: 15,
        use_mad: true,
    };
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut weights = [0.0f32; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_min = 0.0f32;
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        for (w, &v) in weights.iter_mut().zip(xs) {
            *w = v.abs();
        }
        let fit = make_qkx2_quants(3, xs, &weights, ls, &mut aux, GRID);
        scales[j] = fit.scale;
        mins[j] = fit.min;
        if fit.scale > max_scale {
            max_scale = fit.scale;
        }
        if fit.min > max_min {
            max_min = fit.min;
        }
    }

    if max_scale > 0.0 {
        let iscale = 15.0 / max_scale;
        for (code, &s) in block.scales.iter_mut().zip(&scales) {
            *code = nearest_int(iscale * s) as u8;
        }
        block.d = to_f16(max_scale / 15.0);
    } else {
        block.scales = [0; 16];
        block.d = to_f16(0.0);
    }
    if max_min > 0.0 {
        let iscale = 15.0 / max_min;
        for (code, &m) in block.scales.iter_mut().zip(&mins) {
            *code |= (nearest_int(iscale * m) << 4) as u8;
        }
        block.dmin = to_f16(max_min / 15.0);
    } else {
        block.dmin = to_f16(0.0);
    }
    q2_k_finish(x, block, &mut levels);
}

/// `quantize_row_q2_K_impl` for one super-block.
fn q2_k_impl(x: &[f32], qw: &[f32], block: &mut BlockQ2K) {
    let mut levels = [0u8; QK_K];
    let mut aux = [0u8; 16];
    let mut weights = [0.0f32; 16];
    let mut scales = [0.0f32; 16];
    let mut mins = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = sum_squares(x) / QK_K as f32;
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        imatrix_weights(&mut weights, &qw[16 * j..][..16], xs, sigma2);
        sw[j] = sum(&weights);
        let fit = make_qkx3_quants(3, xs, Some(&weights), ls, &mut aux, IMPL_GRID);
        scales[j] = fit.scale;
        mins[j] = fit.min;
    }
    let mut ls = [0u8; 16];
    let mut lm = [0u8; 16];
    let dm = make_qp_quants(15, &scales, &mut ls, &sw);
    let mm = make_qp_quants(15, &mins, &mut lm, &sw);
    block.d = to_f16(dm);
    block.dmin = to_f16(mm);
    for ((code, &s), &m) in block.scales.iter_mut().zip(&ls).zip(&lm) {
        *code = s | (m << 4);
    }
    q2_k_finish(x, block, &mut levels);
}

/// Requantizes with the stored scales and packs (shared tail of both Q2_K paths).
fn q2_k_finish(x: &[f32], block: &mut BlockQ2K, levels: &mut [u8; QK_K]) {
    let dm = from_f16(block.d);
    let mm = from_f16(block.dmin);
    for ((xs, ls), &code) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .zip(&block.scales)
    {
        let d = dm * f32::from(code & 0x0f);
        if d == 0.0 {
            continue;
        }
        let m = mm * f32::from(code >> 4);
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = nearest_int((v + m) / d).clamp(0, 3) as u8;
        }
    }
    pack_2bit(levels, &mut block.qs);
}

fn dequantize_q2_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ2K] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = from_f16(block.d);
        let min = from_f16(block.dmin);
        for (k, o) in out.iter_mut().enumerate() {
            let sc = block.scales[k / 16];
            let dl = d * f32::from(sc & 0x0f);
            let ml = min * f32::from(sc >> 4);
            *o = dl * f32::from(unpack_2bit(&block.qs, k)) - ml;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q3_K

fn quantize_q3_k(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ3K] = bytemuck::cast_slice_mut(dst);
    for (i, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        match block_weights(imatrix, i) {
            None => q3_k_ref(x, block),
            Some(qw) => q3_k_impl(x, qw, block),
        }
    }
}

/// Stores the 6-bit scale code (0..=63) of sub-block `j` into Q3_K's 12 scale bytes (which
/// start zeroed).
fn set_q3_scale(scales: &mut [u8; 12], j: usize, code: u8) {
    if j < 8 {
        scales[j] = code & 0x0f;
    } else {
        scales[j - 8] |= (code & 0x0f) << 4;
    }
    scales[8 + j % 4] |= (code >> 4) << (2 * (j / 4));
}

/// The signed scale (code − 32) of sub-block `j` of a Q3_K block.
fn q3_scale(scales: &[u8; 12], j: usize) -> i32 {
    let low = if j < 8 {
        scales[j] & 0x0f
    } else {
        scales[j - 8] >> 4
    };
    let high = (scales[8 + j % 4] >> (2 * (j / 4))) & 3;
    i32::from(low | (high << 4)) - 32
}

/// `quantize_row_q3_K_ref` for one super-block.
fn q3_k_ref(x: &[f32], block: &mut BlockQ3K) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut amax = 0.0f32;
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        scales[j] = make_q3_quants(4, xs, ls);
        let a = scales[j].abs();
        if a > amax {
            amax = a;
            max_scale = scales[j];
        }
    }
    block.scales = [0; 12];
    if max_scale != 0.0 {
        let iscale = -32.0 / max_scale;
        for (j, &s) in scales.iter().enumerate() {
            // ggml stores the rounded value in an int8_t before clamping.
            let l = (nearest_int(iscale * s) as i8).clamp(-32, 31) + 32;
            set_q3_scale(&mut block.scales, j, l as u8);
        }
        block.d = to_f16(1.0 / iscale);
    } else {
        block.d = to_f16(0.0);
    }
    q3_k_finish(x, block, &mut levels);
}

/// `quantize_row_q3_K_impl` for one super-block.
fn q3_k_impl(x: &[f32], qw: &[f32], block: &mut BlockQ3K) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut weights = [0.0f32; 16];
    let mut sw = [0.0f32; 16];
    let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        imatrix_weights(&mut weights, &qw[16 * j..][..16], xs, sigma2);
        sw[j] = sum(&weights);
        scales[j] = make_qx_quants(4, xs, ls, Some(&weights));
    }
    block.scales = [0; 12];
    let mut codes = [0u8; 16];
    let d_block = make_qx_quants(32, &scales, &mut codes, Some(&sw));
    for (j, &code) in codes.iter().enumerate() {
        set_q3_scale(&mut block.scales, j, code);
    }
    block.d = to_f16(d_block);
    q3_k_finish(x, block, &mut levels);
}

/// Requantizes with the stored scales, splits off the high bit and packs (shared tail of both
/// Q3_K paths). `levels` hold codes 0..=7 (level + 4).
fn q3_k_finish(x: &[f32], block: &mut BlockQ3K, levels: &mut [u8; QK_K]) {
    let d_all = from_f16(block.d);
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        let d = d_all * q3_scale(&block.scales, j) as f32;
        if d == 0.0 {
            continue;
        }
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = (nearest_int(v / d).clamp(-4, 3) + 4) as u8;
        }
    }
    block.hmask = [0; 32];
    for (k, l) in levels.iter_mut().enumerate() {
        if *l > 3 {
            block.hmask[k % 32] |= 1 << (k / 32);
            *l -= 4;
        }
    }
    pack_2bit(levels, &mut block.qs);
}

fn dequantize_q3_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ3K] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d_all = from_f16(block.d);
        for (j, out) in out.chunks_exact_mut(16).enumerate() {
            let dl = d_all * q3_scale(&block.scales, j) as f32;
            for (ii, o) in out.iter_mut().enumerate() {
                let k = 16 * j + ii;
                let high = block.hmask[k % 32] & (1 << (k / 32)) != 0;
                let q = i32::from(unpack_2bit(&block.qs, k)) - if high { 0 } else { 4 };
                *o = dl * q as f32;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q4_K and Q5_K

/// Stores the 6-bit scale and min codes of sub-block `j` (of 8) into the 12 scale bytes of
/// Q4_K/Q5_K, with ggml's byte arithmetic (codes are not masked, as in ggml).
fn set_scale_min_k4(scales: &mut [u8; 12], j: usize, ls: u8, lm: u8) {
    if j < 4 {
        scales[j] = ls;
        scales[j + 4] = lm;
    } else {
        scales[j + 4] = (ls & 0x0f) | ((lm & 0x0f) << 4);
        scales[j - 4] |= (ls >> 4) << 6;
        scales[j] |= (lm >> 4) << 6;
    }
}

/// `get_scale_min_k4`: the scale and min codes of sub-block `j` (of 8).
fn scale_min_k4(scales: &[u8; 12], j: usize) -> (u8, u8) {
    if j < 4 {
        (scales[j] & 63, scales[j + 4] & 63)
    } else {
        (
            (scales[j + 4] & 0x0f) | ((scales[j - 4] >> 6) << 4),
            (scales[j + 4] >> 4) | ((scales[j] >> 6) << 4),
        )
    }
}

/// The fields Q4_K and Q5_K share.
struct ScaledK<'a> {
    d: &'a mut [u8; 2],
    dmin: &'a mut [u8; 2],
    scales: &'a mut [u8; 12],
}

/// Sub-block scales and levels of Q4_K/Q5_K (`nmax` 15 or 31), through the reference or the impl
/// path, with scales and levels written as ggml does before packing.
fn quantize_k4_like(
    x: &[f32],
    qw: Option<&[f32]>,
    nmax: i32,
    out: ScaledK<'_>,
    levels: &mut [u8; QK_K],
) {
    let mut aux = [0u8; 32];
    let mut weights = [0.0f32; 32];
    let mut scales = [0.0f32; 8];
    let mut mins = [0.0f32; 8];
    match qw {
        None => {
            let grid = if nmax == 15 {
                AffineGrid {
                    rmin: -1.0,
                    rdelta: 0.1,
                    nstep: 20,
                    use_mad: false,
                }
            } else {
                AffineGrid {
                    rmin: -0.5,
                    rdelta: 0.1,
                    nstep: 15,
                    use_mad: false,
                }
            };
            let mut max_scale = 0.0f32;
            let mut max_min = 0.0f32;
            for (j, (xs, ls)) in x
                .chunks_exact(32)
                .zip(levels.chunks_exact_mut(32))
                .enumerate()
            {
                let av_x = (sum_squares(xs) / 32.0).sqrt();
                for (w, &v) in weights.iter_mut().zip(xs) {
                    *w = av_x + v.abs();
                }
                let fit = make_qkx2_quants(nmax, xs, &weights, ls, &mut aux, grid);
                scales[j] = fit.scale;
                mins[j] = fit.min;
                if fit.scale > max_scale {
                    max_scale = fit.scale;
                }
                if fit.min > max_min {
                    max_min = fit.min;
                }
            }
            let inv_scale = if max_scale > 0.0 {
                63.0 / max_scale
            } else {
                0.0
            };
            let inv_min = if max_min > 0.0 { 63.0 / max_min } else { 0.0 };
            for j in 0..8 {
                // ggml converts to uint8_t before taking the min with 63.
                let ls = (nearest_int(inv_scale * scales[j]) as u8).min(63);
                let lm = (nearest_int(inv_min * mins[j]) as u8).min(63);
                set_scale_min_k4(out.scales, j, ls, lm);
            }
            *out.d = to_f16(max_scale / 63.0);
            *out.dmin = to_f16(max_min / 63.0);
        }
        Some(qw) => {
            let mut sw = [0.0f32; 8];
            let sigma2 = 2.0 * sum_squares(x) / QK_K as f32;
            for (j, (xs, ls)) in x
                .chunks_exact(32)
                .zip(levels.chunks_exact_mut(32))
                .enumerate()
            {
                imatrix_weights(&mut weights, &qw[32 * j..][..32], xs, sigma2);
                sw[j] = sum(&weights);
                let fit = make_qkx3_quants(nmax, xs, Some(&weights), ls, &mut aux, IMPL_GRID);
                scales[j] = fit.scale;
                mins[j] = fit.min;
            }
            let mut ls = [0u8; 8];
            let mut lm = [0u8; 8];
            let d_block = make_qp_quants(63, &scales, &mut ls, &sw);
            let m_block = make_qp_quants(63, &mins, &mut lm, &sw);
            for j in 0..8 {
                // Q5_K's impl clamps the codes to 63; Q4_K's stores them as they come.
                let (s, m) = if nmax == 31 {
                    (ls[j].min(63), lm[j].min(63))
                } else {
                    (ls[j], lm[j])
                };
                set_scale_min_k4(out.scales, j, s, m);
            }
            *out.d = to_f16(d_block);
            *out.dmin = to_f16(m_block);
        }
    }

    let d_all = from_f16(*out.d);
    let dmin_all = from_f16(*out.dmin);
    for (j, (xs, ls)) in x
        .chunks_exact(32)
        .zip(levels.chunks_exact_mut(32))
        .enumerate()
    {
        let (sc, m) = scale_min_k4(out.scales, j);
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        let dm = dmin_all * f32::from(m);
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = nearest_int((v + dm) / d).clamp(0, nmax) as u8;
        }
    }
}

fn quantize_q4_k(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ4K] = bytemuck::cast_slice_mut(dst);
    let mut levels = [0u8; QK_K];
    for (i, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let out = ScaledK {
            d: &mut block.d,
            dmin: &mut block.dmin,
            scales: &mut block.scales,
        };
        quantize_k4_like(x, block_weights(imatrix, i), 15, out, &mut levels);
        for (q, l) in block.qs.chunks_exact_mut(32).zip(levels.chunks_exact(64)) {
            for (j, q) in q.iter_mut().enumerate() {
                *q = l[j] | (l[j + 32] << 4);
            }
        }
    }
}

fn quantize_q5_k(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ5K] = bytemuck::cast_slice_mut(dst);
    let mut levels = [0u8; QK_K];
    for (i, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        let out = ScaledK {
            d: &mut block.d,
            dmin: &mut block.dmin,
            scales: &mut block.scales,
        };
        quantize_k4_like(x, block_weights(imatrix, i), 31, out, &mut levels);
        block.qh = [0; 32];
        for (c, (q, l)) in block
            .qs
            .chunks_exact_mut(32)
            .zip(levels.chunks_exact(64))
            .enumerate()
        {
            for (j, q) in q.iter_mut().enumerate() {
                let (mut l1, mut l2) = (l[j], l[j + 32]);
                if l1 > 15 {
                    l1 -= 16;
                    block.qh[j] |= 1 << (2 * c);
                }
                if l2 > 15 {
                    l2 -= 16;
                    block.qh[j] |= 2 << (2 * c);
                }
                *q = l1 | (l2 << 4);
            }
        }
    }
}

fn dequantize_q4_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4K] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = from_f16(block.d);
        let min = from_f16(block.dmin);
        for (c, (out, q)) in out
            .chunks_exact_mut(64)
            .zip(block.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(&block.scales, 2 * c);
            let (sc2, m2) = scale_min_k4(&block.scales, 2 * c + 1);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            for (l, &q) in q.iter().enumerate() {
                out[l] = d1 * f32::from(q & 0x0f) - m1;
                out[l + 32] = d2 * f32::from(q >> 4) - m2;
            }
        }
    }
}

fn dequantize_q5_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5K] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = from_f16(block.d);
        let min = from_f16(block.dmin);
        for (c, (out, q)) in out
            .chunks_exact_mut(64)
            .zip(block.qs.chunks_exact(32))
            .enumerate()
        {
            let (sc1, m1) = scale_min_k4(&block.scales, 2 * c);
            let (sc2, m2) = scale_min_k4(&block.scales, 2 * c + 1);
            let (d1, m1) = (d * f32::from(sc1), min * f32::from(m1));
            let (d2, m2) = (d * f32::from(sc2), min * f32::from(m2));
            for (l, &q) in q.iter().enumerate() {
                let h1 = if block.qh[l] & (1 << (2 * c)) != 0 {
                    16
                } else {
                    0
                };
                let h2 = if block.qh[l] & (2 << (2 * c)) != 0 {
                    16
                } else {
                    0
                };
                out[l] = d1 * f32::from((q & 0x0f) + h1) - m1;
                out[l + 32] = d2 * f32::from((q >> 4) + h2) - m2;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Q6_K

fn quantize_q6_k(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ6K] = bytemuck::cast_slice_mut(dst);
    for (i, (x, block)) in src.chunks_exact(QK_K).zip(blocks).enumerate() {
        q6_k_block(x, block_weights(imatrix, i), block);
    }
}

/// `quantize_row_q6_K_ref` (no weights: x²) or `quantize_row_q6_K_impl` (the raw imatrix
/// weights, with no σ² term) for one super-block.
fn q6_k_block(x: &[f32], qw: Option<&[f32]>, block: &mut BlockQ6K) {
    let mut levels = [0u8; QK_K];
    let mut scales = [0.0f32; 16];
    let mut max_scale = 0.0f32;
    let mut max_abs_scale = 0.0f32;
    for (j, (xs, ls)) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .enumerate()
    {
        let w = qw.map(|w| &w[16 * j..][..16]);
        let scale = make_qx_quants(32, xs, ls, w);
        scales[j] = scale;
        if scale.abs() > max_abs_scale {
            max_abs_scale = scale.abs();
            max_scale = scale;
        }
    }
    if max_abs_scale < GROUP_MAX_EPS {
        *block = BlockQ6K::zeroed();
        return;
    }
    let iscale = -128.0 / max_scale;
    block.d = to_f16(1.0 / iscale);
    for (code, &s) in block.scales.iter_mut().zip(&scales) {
        *code = nearest_int(iscale * s).min(127) as i8;
    }
    let d_all = from_f16(block.d);
    for ((xs, ls), &sc) in x
        .chunks_exact(16)
        .zip(levels.chunks_exact_mut(16))
        .zip(&block.scales)
    {
        let d = d_all * f32::from(sc);
        if d == 0.0 {
            continue;
        }
        for (l, &v) in ls.iter_mut().zip(xs) {
            *l = (nearest_int(v / d).clamp(-32, 31) + 32) as u8;
        }
    }
    pack_q6(&levels, block);
}

/// Packs 6-bit levels: within each half of 128, element `32g + l` has its low nibble in
/// `ql[64h + l + 32·(g odd)]` (low nibble for g < 2, high for g ≥ 2) and its high two bits in
/// `qh[32h + l]` bits `2g..2g+1`.
fn pack_q6(levels: &[u8; QK_K], block: &mut BlockQ6K) {
    for (h, l) in levels.chunks_exact(128).enumerate() {
        let ql = &mut block.ql[64 * h..][..64];
        let qh = &mut block.qh[32 * h..][..32];
        for j in 0..32 {
            let (q1, q2, q3, q4) = (l[j], l[j + 32], l[j + 64], l[j + 96]);
            ql[j] = (q1 & 0x0f) | ((q3 & 0x0f) << 4);
            ql[j + 32] = (q2 & 0x0f) | ((q4 & 0x0f) << 4);
            qh[j] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6);
        }
    }
}

fn dequantize_q6_k(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ6K] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
        let d = from_f16(block.d);
        for (h, out) in out.chunks_exact_mut(128).enumerate() {
            let ql = &block.ql[64 * h..][..64];
            let qh = &block.qh[32 * h..][..32];
            let sc = &block.scales[8 * h..][..8];
            for l in 0..32 {
                let is = l / 16;
                let q1 = i32::from((ql[l] & 0x0f) | ((qh[l] & 3) << 4)) - 32;
                let q2 = i32::from((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
                let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
                out[l] = d * f32::from(sc[is]) * q1 as f32;
                out[l + 32] = d * f32::from(sc[is + 2]) * q2 as f32;
                out[l + 64] = d * f32::from(sc[is + 4]) * q3 as f32;
                out[l + 96] = d * f32::from(sc[is + 6]) * q4 as f32;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const TYPES: [GgmlType; 5] = [
        GgmlType::Q2_K,
        GgmlType::Q3_K,
        GgmlType::Q4_K,
        GgmlType::Q5_K,
        GgmlType::Q6_K,
    ];

    fn run(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>) -> (Vec<u8>, Vec<f32>) {
        let k = KERNELS.iter().find(|k| k.ty == ty).unwrap();
        let mut q = vec![0u8; x.len() / QK_K * k.type_size()];
        (k.quantize_row)(x, &mut q, imatrix);
        let mut y = vec![0.0f32; x.len()];
        (k.dequantize)(&q, &mut y);
        (q, y)
    }

    #[test]
    fn block_sizes_match_the_type_table() {
        crate::blocks::assert_matches_type_table::<BlockQ2K>();
        crate::blocks::assert_matches_type_table::<BlockQ3K>();
        crate::blocks::assert_matches_type_table::<BlockQ4K>();
        crate::blocks::assert_matches_type_table::<BlockQ5K>();
        crate::blocks::assert_matches_type_table::<BlockQ6K>();
    }

    #[test]
    fn all_zero_super_blocks_are_zero_bytes() {
        let x = vec![0.0f32; 256];
        let w = vec![1.0f32; 256];
        for ty in TYPES {
            for imatrix in [None, Some(&w[..])] {
                let (q, y) = run(ty, &x, imatrix);
                assert!(q.iter().all(|&b| b == 0), "{ty} {imatrix:?}");
                assert!(y.iter().all(|&v| v == 0.0));
            }
        }
    }

    // §7 fact 5: a zero sub-block inside a non-zero super-block keeps level code 0 rather than
    // the zero point (32 for Q6_K, 4 for Q3_K); its scale code is zero, so it still decodes to 0.
    #[test]
    fn zero_sub_block_keeps_code_zero() {
        let mut x: Vec<f32> = (0..256).map(|i| ((i * 37) % 17) as f32 - 8.0).collect();
        x[..16].fill(0.0);
        let (q, y) = run(GgmlType::Q6_K, &x, None);
        let block: &BlockQ6K = bytemuck::from_bytes(&q);
        assert_eq!(block.scales[0], 0);
        assert!(block.ql[..16].iter().all(|&b| b & 0x0f == 0));
        assert!(block.qh[..16].iter().all(|&b| b & 3 == 0));
        assert!(y[..16].iter().all(|&v| v == 0.0));
        let (q, y) = run(GgmlType::Q3_K, &x, None);
        let block: &BlockQ3K = bytemuck::from_bytes(&q);
        assert!(block.qs[..16].iter().all(|&b| b & 3 == 0));
        assert!(block.hmask[..16].iter().all(|&b| b & 1 == 0));
        assert!(y[..16].iter().all(|&v| v == 0.0));
    }

    #[test]
    fn scale_codes_round_trip() {
        let mut q3 = [0u8; 12];
        for j in 0..16 {
            set_q3_scale(&mut q3, j, (j * 4 + 3) as u8);
        }
        for j in 0..16 {
            assert_eq!(q3_scale(&q3, j), (j * 4 + 3) as i32 - 32);
        }
        let mut k4 = [0u8; 12];
        for j in 0..8 {
            set_scale_min_k4(&mut k4, j, (j * 9) as u8, (63 - j * 5) as u8);
        }
        for j in 0..8 {
            assert_eq!(scale_min_k4(&k4, j), ((j * 9) as u8, (63 - j * 5) as u8));
        }
    }

    /// One super-block: random, all-zero, one outlier, denormal, tiny values, and half zero.
    fn rows() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0e3f32..1.0e3, 256),
            Just(vec![0.0; 256]),
            (0usize..256, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
                let mut v = vec![1.0e-3; 256];
                v[i] = big;
                v
            }),
            prop::collection::vec(-1.0e-38f32..1.0e-38, 256),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 256),
            prop::collection::vec(-1.0f32..1.0, 128).prop_map(|mut v| {
                v.extend([0.0; 128]);
                v
            }),
        ]
    }

    /// RMSE over the super-block relative to its max |x|: about twice the worst seen on uniform,
    /// cubed-uniform and half-zero data (Q2_K 0.17, Q3_K 0.08, Q4_K 0.035, Q5_K 0.018, Q6_K
    /// 0.009), which sits above one level step's uniform error (step/√12) because the sub-block
    /// scale codes and the f16 super-block scales round too.
    fn bound(ty: GgmlType) -> f32 {
        match ty {
            GgmlType::Q2_K => 0.3,
            GgmlType::Q3_K => 0.16,
            GgmlType::Q4_K => 0.07,
            GgmlType::Q5_K => 0.035,
            _ => 0.018,
        }
    }

    fn check(ty: GgmlType, x: &[f32], y: &[f32]) -> Result<(), TestCaseError> {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mse = x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>() / x.len() as f32;
        // f16 subnormal scales: the product of a 2^-24 step and the largest level code.
        let slack = 64.0 * 6.0e-8 * 63.0;
        prop_assert!(
            mse.sqrt() <= bound(ty) * amax + slack,
            "{ty}: rmse {} vs amax {amax}",
            mse.sqrt()
        );
        Ok(())
    }

    proptest! {
        #[test]
        fn reference_round_trip(x in rows()) {
            for ty in TYPES {
                let (_, y) = run(ty, &x, None);
                check(ty, &x, &y)?;
            }
        }

        #[test]
        fn imatrix_round_trip(x in rows(), w in prop::collection::vec(0.01f32..10.0, 256)) {
            for ty in TYPES {
                let (_, y) = run(ty, &x, Some(&w));
                check(ty, &x, &y)?;
            }
        }
    }
}
