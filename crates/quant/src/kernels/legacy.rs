//! Q4_0, Q4_1, Q5_0, Q5_1: blocks of 32 with an f16 scale (and, for the `_1` types, an f16
//! offset `m`), 4 or 5 bits per element.
//!
//! Without an importance matrix these follow ggml's reference rows (`quantize_row_q4_0_ref` and
//! friends): a fixed scale from the block's extreme value(s) and truncating "add ½" rounding. With
//! one they follow the per-row `quantize_row_*_impl`: weights w = qw·√(σ² + x²), σ² the mean of x²
//! over the whole row, and a searched scale (`make_qx_quants` for the symmetric `_0` types,
//! `make_qkx3_quants` for the affine `_1` types).

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::search::{abs_max, make_qkx3_quants, make_qx_quants, sum_squares, AffineGrid};
use super::Kernel;
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        ty: GgmlType::Q4_0,
        quantize_row: quantize_q4_0,
        dequantize: dequantize_q4_0,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q4_1,
        quantize_row: quantize_q4_1,
        dequantize: dequantize_q4_1,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q5_0,
        quantize_row: quantize_q5_0,
        dequantize: dequantize_q5_0,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::Q5_1,
        quantize_row: quantize_q5_1,
        dequantize: dequantize_q5_1,
        requires_imatrix: false,
        uses_imatrix: true,
    },
];

/// Elements per block of every type here.
const QK: usize = 32;

/// `block_q4_0`: an f16 scale and 32 four-bit codes (18 bytes). Value = (code − 8)·d.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ4_0 {
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Byte `j`: low nibble is element `j`, high nibble element `j + 16`.
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_0>() == 18);

impl Block for BlockQ4_0 {
    const TYPE: GgmlType = GgmlType::Q4_0;
    const ELEMENTS: usize = QK;
}

/// `block_q4_1`: f16 scale and offset, 32 four-bit codes (20 bytes). Value = code·d + m.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ4_1 {
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Offset `m`, f16 bits, little-endian.
    pub(crate) m: [u8; 2],
    /// Nibbles as in [`BlockQ4_0`].
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ4_1>() == 20);

impl Block for BlockQ4_1 {
    const TYPE: GgmlType = GgmlType::Q4_1;
    const ELEMENTS: usize = QK;
}

/// `block_q5_0`: an f16 scale and 32 five-bit codes (22 bytes). Value = (code − 16)·d.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ5_0 {
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// u32, little-endian: bit `j` is bit 4 of element `j`'s code.
    pub(crate) qh: [u8; 4],
    /// Low four bits of the codes, nibbles as in [`BlockQ4_0`].
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_0>() == 22);

impl Block for BlockQ5_0 {
    const TYPE: GgmlType = GgmlType::Q5_0;
    const ELEMENTS: usize = QK;
}

/// `block_q5_1`: f16 scale and offset, 32 five-bit codes (24 bytes). Value = code·d + m.
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockQ5_1 {
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
    /// Offset `m`, f16 bits, little-endian.
    pub(crate) m: [u8; 2],
    /// High bits as in [`BlockQ5_0`].
    pub(crate) qh: [u8; 4],
    /// Low four bits of the codes, nibbles as in [`BlockQ4_0`].
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockQ5_1>() == 24);

impl Block for BlockQ5_1 {
    const TYPE: GgmlType = GgmlType::Q5_1;
    const ELEMENTS: usize = QK;
}

/// The search grid ggml's `_1` impls pass to `make_qkx3_quants`.
const QKX3_GRID: AffineGrid = AffineGrid {
    rmin: -0.9,
    rdelta: 0.05,
    nstep: 36,
    use_mad: false,
};

/// Packs 32 codes (< 16) into Q4-style nibbles.
fn pack_nibbles(codes: &[u8; QK], qs: &mut [u8; 16]) {
    for (j, q) in qs.iter_mut().enumerate() {
        *q = (codes[j] & 0x0f) | ((codes[j + 16] & 0x0f) << 4);
    }
}

/// Packs bit 4 of 32 codes into Q5's `qh`.
fn pack_high_bits(codes: &[u8; QK]) -> [u8; 4] {
    let qh = codes
        .iter()
        .enumerate()
        .fold(0u32, |qh, (j, &c)| qh | (u32::from((c & 0x10) >> 4) << j));
    qh.to_le_bytes()
}

/// The 5-bit codes of a Q5 block.
fn q5_codes(qh: [u8; 4], qs: &[u8; 16]) -> [u8; QK] {
    let qh = u32::from_le_bytes(qh);
    let mut codes = [0u8; QK];
    for (j, c) in codes.iter_mut().enumerate() {
        let nibble = if j < 16 {
            qs[j] & 0x0f
        } else {
            qs[j - 16] >> 4
        };
        *c = nibble | ((((qh >> j) & 1) as u8) << 4);
    }
    codes
}

/// σ² of the `*_impl` routines: the mean of x² over the whole row.
fn row_sigma2(src: &[f32]) -> f32 {
    sum_squares(src) / src.len() as f32
}

/// Fills `w` with ggml's imatrix weights qw·√(σ² + x²).
fn impl_weights(w: &mut [f32; QK], qw: &[f32], x: &[f32], sigma2: f32) {
    for ((w, &q), &v) in w.iter_mut().zip(qw).zip(x) {
        *w = q * (sigma2 + v * v).sqrt();
    }
}

/// The code of the symmetric reference rows: C's `(int8_t)(v·id + bias)` truncation, then
/// `MIN(top, ·)`.
fn truncated_code(scaled: f32, bias: f32, top: i8) -> u8 {
    ((scaled + bias) as i32 as i8).min(top) as u8
}

/// Min and max of a block as the `_1` references find them (from ±FLT_MAX).
fn min_max(x: &[f32]) -> (f32, f32) {
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
    (min, max)
}

/// `quantize_q4_0`: the reference row without an imatrix, `quantize_row_q4_0_impl` with one.
fn quantize_q4_0(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ4_0] = bytemuck::cast_slice_mut(dst);
    let mut codes = [0u8; QK];
    match imatrix {
        None => {
            for (x, block) in src.chunks_exact(QK).zip(blocks) {
                let (_, max) = abs_max(x);
                let d = max / -8.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block.d = f32_to_f16_bits(d).to_le_bytes();
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = truncated_code(v * id, 8.5, 15);
                }
                pack_nibbles(&codes, &mut block.qs);
            }
        }
        Some(qw) => {
            let sigma2 = row_sigma2(src);
            let mut w = [0.0f32; QK];
            for ((x, qw), block) in src.chunks_exact(QK).zip(qw.chunks_exact(QK)).zip(blocks) {
                impl_weights(&mut w, qw, x, sigma2);
                let d = make_qx_quants(8, x, &mut codes, Some(&w));
                block.d = f32_to_f16_bits(d).to_le_bytes();
                pack_nibbles(&codes, &mut block.qs);
            }
        }
    }
}

/// `quantize_q4_1`: the min/max reference row without an imatrix, `quantize_row_q4_1_impl`
/// with one.
fn quantize_q4_1(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ4_1] = bytemuck::cast_slice_mut(dst);
    let mut codes = [0u8; QK];
    match imatrix {
        None => {
            for (x, block) in src.chunks_exact(QK).zip(blocks) {
                let (min, max) = min_max(x);
                let d = (max - min) / 15.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block.d = f32_to_f16_bits(d).to_le_bytes();
                block.m = f32_to_f16_bits(min).to_le_bytes();
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = truncated_code((v - min) * id, 0.5, 15);
                }
                pack_nibbles(&codes, &mut block.qs);
            }
        }
        Some(qw) => {
            let sigma2 = row_sigma2(src);
            let mut w = [0.0f32; QK];
            let mut aux = [0u8; QK];
            for ((x, qw), block) in src.chunks_exact(QK).zip(qw.chunks_exact(QK)).zip(blocks) {
                impl_weights(&mut w, qw, x, sigma2);
                let fit = make_qkx3_quants(15, x, Some(&w), &mut codes, &mut aux, QKX3_GRID);
                block.d = f32_to_f16_bits(fit.scale).to_le_bytes();
                block.m = f32_to_f16_bits(-fit.min).to_le_bytes();
                pack_nibbles(&codes, &mut block.qs);
            }
        }
    }
}

/// `quantize_q5_0`: the reference row without an imatrix, `quantize_row_q5_0_impl` with one.
fn quantize_q5_0(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ5_0] = bytemuck::cast_slice_mut(dst);
    let mut codes = [0u8; QK];
    match imatrix {
        None => {
            for (x, block) in src.chunks_exact(QK).zip(blocks) {
                let (_, max) = abs_max(x);
                let d = max / -16.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block.d = f32_to_f16_bits(d).to_le_bytes();
                for (c, &v) in codes.iter_mut().zip(x) {
                    *c = truncated_code(v * id, 16.5, 31);
                }
                pack_nibbles(&codes, &mut block.qs);
                block.qh = pack_high_bits(&codes);
            }
        }
        Some(qw) => {
            let sigma2 = row_sigma2(src);
            let mut w = [0.0f32; QK];
            for ((x, qw), block) in src.chunks_exact(QK).zip(qw.chunks_exact(QK)).zip(blocks) {
                impl_weights(&mut w, qw, x, sigma2);
                let d = make_qx_quants(16, x, &mut codes, Some(&w));
                block.d = f32_to_f16_bits(d).to_le_bytes();
                pack_nibbles(&codes, &mut block.qs);
                block.qh = pack_high_bits(&codes);
            }
        }
    }
}

/// `quantize_q5_1`: the min/max reference row without an imatrix, `quantize_row_q5_1_impl`
/// with one.
fn quantize_q5_1(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ5_1] = bytemuck::cast_slice_mut(dst);
    let mut codes = [0u8; QK];
    match imatrix {
        None => {
            for (x, block) in src.chunks_exact(QK).zip(blocks) {
                let (min, max) = min_max(x);
                let d = (max - min) / 31.0;
                let id = if d != 0.0 { 1.0 / d } else { 0.0 };
                block.d = f32_to_f16_bits(d).to_le_bytes();
                block.m = f32_to_f16_bits(min).to_le_bytes();
                for (c, &v) in codes.iter_mut().zip(x) {
                    // `(uint8_t)(v + 0.5f)`, with no clamp in ggml.
                    *c = (((v - min) * id + 0.5) as i32) as u8;
                }
                pack_nibbles(&codes, &mut block.qs);
                block.qh = pack_high_bits(&codes);
            }
        }
        Some(qw) => {
            let sigma2 = row_sigma2(src);
            let mut w = [0.0f32; QK];
            let mut aux = [0u8; QK];
            for ((x, qw), block) in src.chunks_exact(QK).zip(qw.chunks_exact(QK)).zip(blocks) {
                impl_weights(&mut w, qw, x, sigma2);
                let fit = make_qkx3_quants(31, x, Some(&w), &mut codes, &mut aux, QKX3_GRID);
                block.d = f32_to_f16_bits(fit.scale).to_le_bytes();
                block.m = f32_to_f16_bits(-fit.min).to_le_bytes();
                pack_nibbles(&codes, &mut block.qs);
                block.qh = pack_high_bits(&codes);
            }
        }
    }
}

fn f16_field(bytes: [u8; 2]) -> f32 {
    f16_bits_to_f32(u16::from_le_bytes(bytes))
}

fn dequantize_q4_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4_0] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_field(block.d);
        for (j, &q) in block.qs.iter().enumerate() {
            out[j] = (i32::from(q & 0x0f) - 8) as f32 * d;
            out[j + 16] = (i32::from(q >> 4) - 8) as f32 * d;
        }
    }
}

fn dequantize_q4_1(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ4_1] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_field(block.d);
        let m = f16_field(block.m);
        for (j, &q) in block.qs.iter().enumerate() {
            out[j] = f32::from(q & 0x0f) * d + m;
            out[j + 16] = f32::from(q >> 4) * d + m;
        }
    }
}

fn dequantize_q5_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5_0] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_field(block.d);
        for (o, c) in out.iter_mut().zip(q5_codes(block.qh, &block.qs)) {
            *o = (i32::from(c) - 16) as f32 * d;
        }
    }
}

fn dequantize_q5_1(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ5_1] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_field(block.d);
        let m = f16_field(block.m);
        for (o, c) in out.iter_mut().zip(q5_codes(block.qh, &block.qs)) {
            *o = f32::from(c) * d + m;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn run(ty: GgmlType, x: &[f32], imatrix: Option<&[f32]>) -> (Vec<u8>, Vec<f32>) {
        let k = KERNELS.iter().find(|k| k.ty == ty).unwrap();
        let mut q = vec![0u8; x.len() / QK * k.type_size()];
        (k.quantize_row)(x, &mut q, imatrix);
        let mut y = vec![0.0f32; x.len()];
        (k.dequantize)(&q, &mut y);
        (q, y)
    }

    const TYPES: [GgmlType; 4] = [
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
    ];

    #[test]
    fn block_sizes_match_the_type_table() {
        crate::blocks::assert_matches_type_table::<BlockQ4_0>();
        crate::blocks::assert_matches_type_table::<BlockQ4_1>();
        crate::blocks::assert_matches_type_table::<BlockQ5_0>();
        crate::blocks::assert_matches_type_table::<BlockQ5_1>();
    }

    // §7 fact 5: the reference rows do not give zero bytes for a zero block; the imatrix paths do.
    #[test]
    fn all_zero_blocks() {
        let x = [0.0f32; 32];
        let w = [1.0f32; 32];
        let (q, _) = run(GgmlType::Q4_0, &x, None);
        assert_eq!(q[..2], [0x00, 0x80]);
        assert!(q[2..].iter().all(|&b| b == 0x88));
        let (q, _) = run(GgmlType::Q4_0, &x, Some(&w));
        assert!(q.iter().all(|&b| b == 0));

        let (q, _) = run(GgmlType::Q5_0, &x, None);
        assert_eq!(q[..2], [0x00, 0x80]);
        assert_eq!(q[2..6], [0xff; 4]);
        assert!(q[6..].iter().all(|&b| b == 0));
        let (q, _) = run(GgmlType::Q5_0, &x, Some(&w));
        assert!(q.iter().all(|&b| b == 0));

        for ty in [GgmlType::Q4_1, GgmlType::Q5_1] {
            for imatrix in [None, Some(&w[..])] {
                let (q, y) = run(ty, &x, imatrix);
                assert!(q.iter().all(|&b| b == 0), "{ty} {imatrix:?}");
                assert!(y.iter().all(|&v| v == 0.0));
            }
        }
    }

    #[test]
    fn known_q4_0_block() {
        // max = −8 → d = 1, id = 1: codes are x + 8 truncated after adding ½.
        let mut x = [0.0f32; 32];
        x[0] = -8.0;
        x[1] = 7.0;
        x[2] = 2.4;
        x[16] = -1.6;
        let (q, y) = run(GgmlType::Q4_0, &x, None);
        assert_eq!(u16::from_le_bytes([q[0], q[1]]), 0x3c00);
        assert_eq!(q[2], 0x60); // elem 0 → 0, elem 16 → 6 (−1.6 + 8.5 = 6.9)
        assert_eq!(q[3], 0x8f); // elem 1 → 15, elem 17 → 8
        assert_eq!(q[4], 0x8a); // elem 2 → 10
        assert_eq!(&y[..3], &[-8.0, 7.0, 2.0]);
        assert_eq!(y[16], -2.0);
    }

    /// Rows of two blocks: random, all-zero, one outlier, denormal and tiny values.
    fn rows() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0e3f32..1.0e3, 64),
            Just(vec![0.0; 64]),
            (0usize..64, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
                let mut v = vec![1.0e-3; 64];
                v[i] = big;
                v
            }),
            prop::collection::vec(-1.0e-38f32..1.0e-38, 64),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 64),
            prop::collection::vec(-1.0f32..1.0, 32).prop_map(|mut v| {
                v.extend([0.0; 32]);
                v
            }),
        ]
    }

    /// Per-block RMSE bound: `steps` quantization steps of the block's range, plus the f16
    /// rounding of `d` and `m` (relative 2^-11 of up to 32 steps) and f16's subnormal spacing.
    fn check_rmse(ty: GgmlType, x: &[f32], y: &[f32], steps: f32) -> Result<(), TestCaseError> {
        let levels = match ty {
            GgmlType::Q4_0 | GgmlType::Q4_1 => 15.0,
            _ => 31.0,
        };
        for (xs, ys) in x.chunks_exact(QK).zip(y.chunks_exact(QK)) {
            let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let mse = xs
                .iter()
                .zip(ys)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                / QK as f32;
            let bound = 2.0 * amax / levels * steps + amax * 2.0f32.powi(-9) + 1.0e-6;
            prop_assert!(
                mse.sqrt() <= bound,
                "{ty}: rmse {} > {bound} on {xs:?} → {ys:?}",
                mse.sqrt()
            );
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn reference_round_trip(x in rows()) {
            for ty in TYPES {
                let (_, y) = run(ty, &x, None);
                // Half a step on average, one full step for the clipped top level of Q4_0/Q5_0.
                check_rmse(ty, &x, &y, 1.0)?;
            }
        }

        #[test]
        fn imatrix_round_trip(x in rows(), w in prop::collection::vec(0.01f32..10.0, 64)) {
            for ty in TYPES {
                let (_, y) = run(ty, &x, Some(&w));
                // The weighted search may trade error on lightly weighted elements for heavily
                // weighted ones, so allow half a step more than the reference.
                check_rmse(ty, &x, &y, 1.5)?;
            }
        }

        #[test]
        fn unit_imatrix_is_no_worse_than_twice_the_reference(x in prop::collection::vec(-1.0f32..1.0, 64)) {
            let w = vec![1.0f32; 64];
            for ty in TYPES {
                let (_, yr) = run(ty, &x, None);
                let (_, yi) = run(ty, &x, Some(&w));
                let err = |y: &[f32]| x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f32>();
                prop_assert!(err(&yi) <= 2.0 * err(&yr) + 1e-9, "{ty}");
            }
        }
    }
}
