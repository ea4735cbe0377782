//! TQ1_0 and TQ2_0: ternary types for BitNet b1.58 / TriLM weights (`quantize_row_tq1_0_ref`,
//! `quantize_row_tq2_0_ref`).
//!
//! Every element of a super-block of 256 becomes a digit t ∈ {0, 1, 2} meaning (t − 1)·d, where
//! d = max|x| is stored as f16. TQ2_0 spends two bits per digit; TQ1_0 packs five digits into a
//! byte as a base-3 number (1.6875 bits per weight). Importance matrices are ignored, as in ggml.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::Kernel;
use crate::blocks::Block;
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel::plain(GgmlType::TQ1_0, quantize_tq1_0, dequantize_tq1_0),
    Kernel::plain(GgmlType::TQ2_0, quantize_tq2_0, dequantize_tq2_0),
];

/// `block_tq1_0`: 256 ternary digits packed five (or four) per byte, and an f16 scale (54 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockTq1_0 {
    /// Byte `m < 32` packs elements `m + 32n` (n = 0..5); byte `32 + m` packs elements
    /// `160 + m + 16n`; first element most significant, stored as ⌈v·256/243⌉.
    pub(crate) qs: [u8; 48],
    /// Byte `j` packs elements `240 + j + 4n` (n = 0..4), shifted up one digit, mapped as `qs`.
    pub(crate) qh: [u8; 4],
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockTq1_0>() == 54);

impl Block for BlockTq1_0 {
    const TYPE: GgmlType = GgmlType::TQ1_0;
    const ELEMENTS: usize = 256;
}

/// `block_tq2_0`: 256 two-bit ternary digits and an f16 scale (66 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockTq2_0 {
    /// Byte `32c + m`, bits `2n..2n+1`: the digit of element `128c + 32n + m`.
    pub(crate) qs: [u8; 64],
    /// Scale `d`, f16 bits, little-endian.
    pub(crate) d: [u8; 2],
}
const _: () = assert!(std::mem::size_of::<BlockTq2_0>() == 66);

impl Block for BlockTq2_0 {
    const TYPE: GgmlType = GgmlType::TQ2_0;
    const ELEMENTS: usize = 256;
}

/// Elements per super-block (both types).
const QK: usize = 256;

/// The f16 scale and the inverse scale used for the digits: d = max|x|, id = 1/d (0 for d = 0).
fn scale(x: &[f32]) -> (f32, f32) {
    let d = x
        .iter()
        .fold(0.0f32, |m, v| if m > v.abs() { m } else { v.abs() });
    let id = if d != 0.0 { 1.0 / d } else { 0.0 };
    (d, id)
}

/// `lroundf(x·id) + 1`, the digit in {0, 1, 2} for finite x·id. When `id` overflowed to +inf
/// (a block whose max|x| is below 2⁻¹²⁸, stored as a zero f16 scale anyway) x·id is ±inf or NaN;
/// glibc's `lroundf` then returns `LONG_MIN`, whose low 32 bits (the `int` ggml keeps) are 0, so
/// the digit is 1. The result is reduced mod 256 like ggml's `uint8_t` accumulators.
fn digit(x: f32, id: f32) -> u8 {
    const LONG_RANGE: f32 = 9_223_372_036_854_775_808.0; // 2^63
    let r = (x * id).round();
    let l = if (-LONG_RANGE..LONG_RANGE).contains(&r) {
        r as i64
    } else {
        i64::MIN
    };
    (l as i32).wrapping_add(1) as u8
}

/// Five (or fewer) digits as a base-3 number, first digit most significant, mapped onto a byte
/// as ⌈v·256/243⌉ so that the decoder can extract digit n with a multiply and a shift.
fn pack_base3(digits: impl Iterator<Item = u8>, shift_one_more: bool) -> u8 {
    let mut v = 0u8;
    for t in digits {
        v = v.wrapping_mul(3).wrapping_add(t);
    }
    if shift_one_more {
        v = v.wrapping_mul(3);
    }
    (u16::from(v) * 256).div_ceil(243) as u8
}

fn quantize_tq1_0(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockTq1_0] = bytemuck::cast_slice_mut(dst);
    for (x, block) in src.chunks_exact(QK).zip(blocks) {
        let (d, id) = scale(x);
        block.d = f32_to_f16_bits(d).to_le_bytes();
        let (head, tail) = block.qs.split_at_mut(32);
        for (m, q) in head.iter_mut().enumerate() {
            *q = pack_base3((0..5).map(|n| digit(x[m + 32 * n], id)), false);
        }
        for (m, q) in tail.iter_mut().enumerate() {
            *q = pack_base3((0..5).map(|n| digit(x[160 + m + 16 * n], id)), false);
        }
        for (j, q) in block.qh.iter_mut().enumerate() {
            *q = pack_base3((0..4).map(|n| digit(x[240 + j + 4 * n], id)), true);
        }
    }
}

fn quantize_tq2_0(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockTq2_0] = bytemuck::cast_slice_mut(dst);
    for (x, block) in src.chunks_exact(QK).zip(blocks) {
        let (d, id) = scale(x);
        block.d = f32_to_f16_bits(d).to_le_bytes();
        for (qs, xc) in block.qs.chunks_exact_mut(32).zip(x.chunks_exact(128)) {
            for (m, q) in qs.iter_mut().enumerate() {
                let mut byte = 0u8;
                for n in 0..4 {
                    byte = byte.wrapping_add((digit(xc[m + 32 * n], id) & 3) << (2 * n));
                }
                *q = byte;
            }
        }
    }
}

/// Digit n (0 = most significant) of a byte written by [`pack_base3`].
fn unpack_base3(q: u8, n: usize) -> f32 {
    const POW3: [u8; 5] = [1, 3, 9, 27, 81];
    let shifted = q.wrapping_mul(POW3[n]);
    let t = (u16::from(shifted) * 3) >> 8;
    f32::from(t as i16 - 1)
}

fn dequantize_tq1_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockTq1_0] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (m, &q) in block.qs[..32].iter().enumerate() {
            for n in 0..5 {
                out[m + 32 * n] = unpack_base3(q, n) * d;
            }
        }
        for (m, &q) in block.qs[32..].iter().enumerate() {
            for n in 0..5 {
                out[160 + m + 16 * n] = unpack_base3(q, n) * d;
            }
        }
        for (j, &q) in block.qh.iter().enumerate() {
            for n in 0..4 {
                out[240 + j + 4 * n] = unpack_base3(q, n) * d;
            }
        }
    }
}

fn dequantize_tq2_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockTq2_0] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (qs, out) in block.qs.chunks_exact(32).zip(out.chunks_exact_mut(128)) {
            for (m, &q) in qs.iter().enumerate() {
                for n in 0..4 {
                    let t = (q >> (2 * n)) & 3;
                    out[m + 32 * n] = f32::from(i16::from(t) - 1) * d;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(ty: GgmlType, x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let k = crate::kernel(ty).unwrap();
        let mut q = vec![0u8; k.row_bytes(x.len()).unwrap()];
        crate::quantize_rows(ty, x, x.len(), None, &mut q).unwrap();
        let mut y = vec![0.0f32; x.len()];
        crate::dequantize_rows(ty, &q, &mut y).unwrap();
        (q, y)
    }

    #[test]
    fn zero_blocks_have_the_reference_bytes() {
        // §2.6 / §7 fact 5: every digit is 1 (zero). TQ2_0: qs 0x55; TQ1_0: 11111₃ = 121 maps
        // to ⌈121·256/243⌉ = 128, 1111₃·3 = 120 maps to 127.
        let x = [0.0f32; 512];
        let (q, y) = round_trip(GgmlType::TQ2_0, &x);
        for block in q.chunks_exact(66) {
            assert!(block[..64].iter().all(|&b| b == 0x55));
            assert_eq!(block[64..], [0, 0]);
        }
        assert!(y.iter().all(|&v| v == 0.0));
        let (q, y) = round_trip(GgmlType::TQ1_0, &x);
        for block in q.chunks_exact(54) {
            assert!(block[..48].iter().all(|&b| b == 0x80));
            assert!(block[48..52].iter().all(|&b| b == 0x7f));
            assert_eq!(block[52..], [0, 0]);
        }
        assert!(y.iter().all(|&v| v == 0.0));
    }

    #[test]
    fn ternary_rows_are_reproduced_exactly() {
        // Values that are already -1, 0, 1 (times a power-of-two scale) come back unchanged,
        // which checks every digit position of both packings.
        let x: Vec<f32> = (0..512u32)
            .map(|i| (((i * 7 + i / 3) % 3) as f32 - 1.0) * 0.5)
            .collect();
        for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
            let (_, y) = round_trip(ty, &x);
            assert_eq!(y, x, "{ty}");
        }
    }

    #[test]
    fn tq1_0_packs_known_digits() {
        // Element 0 = +1 (digit 2), the rest of byte 0's digits zero (digit 1): 21111₃ = 202,
        // ⌈202·256/243⌉ = 213. Element 240 = -1 (digit 0) in qh[0]: 0111₃·3 = 39, ⌈39·256/243⌉
        // = 42.
        let mut x = [0.0f32; 256];
        x[0] = 2.0;
        x[240] = -2.0;
        let (q, _) = round_trip(GgmlType::TQ1_0, &x);
        assert_eq!(q[0], 213);
        assert_eq!(q[48], 42);
        assert_eq!(u16::from_le_bytes([q[52], q[53]]), f32_to_f16_bits(2.0));
        let (q, _) = round_trip(GgmlType::TQ2_0, &x);
        // Element 0 -> byte 0 bits 0..1 = 2; element 240 = chunk 1, n = 3, m = 16 -> byte
        // 32 + 16, bits 6..7 = 0.
        assert_eq!(q[0], 0x56);
        assert_eq!(q[48], 0x15);
    }

    #[test]
    fn digit_matches_lroundf() {
        assert_eq!(digit(0.5, 1.0), 2); // half away from zero
        assert_eq!(digit(-0.5, 1.0), 0);
        assert_eq!(digit(0.49, 1.0), 1);
        assert_eq!(digit(1.0, f32::INFINITY), 1);
        assert_eq!(digit(0.0, f32::INFINITY), 1);
    }

    fn interesting_row() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0e3f32..1.0e3, 512),
            Just(vec![0.0; 512]),
            (0usize..512, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
                let mut v = vec![1.0e-3; 512];
                v[i] = big;
                v
            }),
            prop::collection::vec(-1.0e-38f32..1.0e-38, 512),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 512),
            prop::collection::vec(
                prop_oneof![
                    Just(f32::MAX),
                    Just(-f32::MAX),
                    Just(1e-45f32),
                    -1e30f32..1e30
                ],
                512,
            ),
        ]
    }

    proptest! {
        #[test]
        fn round_trip_error_is_bounded(x in interesting_row()) {
            for ty in [GgmlType::TQ1_0, GgmlType::TQ2_0] {
                let (_, y) = round_trip(ty, &x);
                for (xs, ys) in x.chunks_exact(256).zip(y.chunks_exact(256)) {
                    let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                    if amax > 65504.0 {
                        continue; // the f16 scale overflows; only "no panic" is claimed
                    }
                    // Rounding x/amax to {-1, 0, 1} errs by at most amax/2; the f16 scale adds
                    // a relative 2^-11, or 2^-25 absolute when it is subnormal.
                    let bound = amax * 0.5 + amax * 2.0f32.powi(-11) + 2.0f32.powi(-25);
                    for (a, b) in xs.iter().zip(ys) {
                        prop_assert!((a - b).abs() <= bound, "{ty}: {a} vs {b}, bound {bound}");
                    }
                }
            }
        }
    }
}
