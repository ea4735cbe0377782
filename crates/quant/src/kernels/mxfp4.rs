//! MXFP4 (OCP microscaling FP4): blocks of 32 E2M1 values sharing one E8M0 exponent
//! (`quantize_row_mxfp4_ref`). Importance matrices are ignored, as in ggml.
//!
//! ggml stores the E2M1 values doubled (`kvalues_mxfp4`, integers up to ±12) and halves the
//! exponent instead (`ggml_e8m0_to_fp32_half`: 2^(e−128)), so element values are
//! `F[nibble] · 2^(e−128)`.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

use super::Kernel;
use crate::blocks::Block;

pub(crate) const KERNELS: &[Kernel] = &[Kernel::plain(
    GgmlType::MXFP4,
    quantize_mxfp4,
    dequantize_mxfp4,
)];

/// `block_mxfp4`: an E8M0 exponent and 32 four-bit E2M1 codes (17 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub(crate) struct BlockMxfp4 {
    /// Shared exponent `e`: the block scale is 2^(e−128) for the doubled values.
    pub(crate) e: u8,
    /// Byte `j`: low nibble codes element `j`, high nibble element `j + 16`.
    pub(crate) qs: [u8; 16],
}
const _: () = assert!(std::mem::size_of::<BlockMxfp4>() == 17);

impl Block for BlockMxfp4 {
    const TYPE: GgmlType = GgmlType::MXFP4;
    const ELEMENTS: usize = 32;
}

/// `kvalues_mxfp4`: E2M1 values times two, indexed by the 4-bit code (bit 3 = sign).
const KVALUES: [i8; 16] = [0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12];

/// `ggml_e8m0_to_fp32_half`: 2^(e−128), built from bits (e = 0, 1 are f32 subnormals).
fn e8m0_to_f32_half(e: u8) -> f32 {
    let bits = if e < 2 {
        0x0020_0000u32 << e
    } else {
        u32::from(e - 1) << 23
    };
    f32::from_bits(bits)
}

/// The exponent byte for a block whose largest magnitude is `amax`:
/// `(uint8_t)(floorf(log2f(amax)) − 2 + 127)`, so the largest doubled value 12 = 1.5·2³ lands
/// near amax.
///
/// `floorf(log2f(amax))` is not the f32 exponent field: just below a power of two, log2f rounds
/// up to the integer (e.g. log2f(8·(1 − 2⁻²⁴)) = 3.0), which happens for 7456 positive f32s.
/// Taking log2 in f64 and rounding it to f32 gives the same floor as glibc's `log2f` for every
/// positive finite f32 (checked exhaustively), independently of the platform's `log2f`.
///
/// The float-to-`uint8_t` cast is out of range for amax < 2⁻¹²⁵; x86-64 converts through a
/// 32-bit integer and keeps the low byte (−1 → 255), which `as i32 as u8` reproduces. Such
/// blocks decode to zeros either way.
fn shared_exponent(amax: f32) -> u8 {
    if amax > 0.0 {
        let log2 = (f64::from(amax).log2() as f32).floor();
        (log2 - 2.0 + 127.0) as i32 as u8
    } else {
        0
    }
}

/// `best_index_mxfp4`: the code whose value `F[i]·s` is nearest to `x`, the lowest code winning
/// ties (so zero maps to code 0, never to the negative zero code 8).
fn best_index(x: f32, s: f32) -> u8 {
    let mut best = 0u8;
    let mut best_err = (f32::from(KVALUES[0]) * s - x).abs();
    for (i, &k) in KVALUES.iter().enumerate().skip(1) {
        let err = (f32::from(k) * s - x).abs();
        if err < best_err {
            best = i as u8;
            best_err = err;
        }
    }
    best
}

fn quantize_mxfp4(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockMxfp4] = bytemuck::cast_slice_mut(dst);
    for (x, block) in src.chunks_exact(BlockMxfp4::ELEMENTS).zip(blocks) {
        let amax = x
            .iter()
            .fold(0.0f32, |m, v| if m < v.abs() { v.abs() } else { m });
        let e = shared_exponent(amax);
        let s = e8m0_to_f32_half(e);
        block.e = e;
        let (lo, hi) = x.split_at(BlockMxfp4::ELEMENTS / 2);
        for ((q, &a), &b) in block.qs.iter_mut().zip(lo).zip(hi) {
            *q = best_index(a, s) | (best_index(b, s) << 4);
        }
    }
}

fn dequantize_mxfp4(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockMxfp4] = bytemuck::cast_slice(src);
    for (block, out) in blocks
        .iter()
        .zip(dst.chunks_exact_mut(BlockMxfp4::ELEMENTS))
    {
        let s = e8m0_to_f32_half(block.e);
        let (lo, hi) = out.split_at_mut(BlockMxfp4::ELEMENTS / 2);
        for ((q, a), b) in block.qs.iter().zip(lo).zip(hi) {
            *a = f32::from(KVALUES[usize::from(q & 0xf)]) * s;
            *b = f32::from(KVALUES[usize::from(q >> 4)]) * s;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn round_trip(x: &[f32]) -> (Vec<u8>, Vec<f32>) {
        let k = crate::kernel(GgmlType::MXFP4).unwrap();
        let mut q = vec![0u8; k.row_bytes(x.len()).unwrap()];
        crate::quantize_rows(GgmlType::MXFP4, x, x.len(), None, &mut q).unwrap();
        let mut y = vec![0.0f32; x.len()];
        crate::dequantize_rows(GgmlType::MXFP4, &q, &mut y).unwrap();
        (q, y)
    }

    #[test]
    fn e8m0_half_is_two_to_the_e_minus_128() {
        assert_eq!(e8m0_to_f32_half(0), 2.0f32.powi(-128));
        assert_eq!(e8m0_to_f32_half(1), 2.0f32.powi(-127));
        assert_eq!(e8m0_to_f32_half(2), 2.0f32.powi(-126));
        assert_eq!(e8m0_to_f32_half(127), 0.5);
        assert_eq!(e8m0_to_f32_half(128), 1.0);
        assert_eq!(e8m0_to_f32_half(255), 2.0f32.powi(127));
    }

    #[test]
    fn shared_exponent_follows_floor_log2() {
        assert_eq!(shared_exponent(0.0), 0);
        assert_eq!(shared_exponent(1.0), 125); // 2^(125-128) · 12 = 1.5
        assert_eq!(shared_exponent(6.0), 127);
        assert_eq!(shared_exponent(8.0), 128);
        // Just below 8, log2f rounds to 3.0: e = 128, not the exponent field's 127.
        assert_eq!(shared_exponent(f32::from_bits(0x40ff_ffff)), 128);
        // One more ulp down, log2f stays below 3.
        assert_eq!(shared_exponent(f32::from_bits(0x40ff_fff0)), 127);
        assert_eq!(shared_exponent(f32::MAX), 253);
        assert_eq!(shared_exponent(2.0f32.powi(-125)), 0);
        // Out of the byte's range: x86-64's cast keeps the low byte of the int.
        assert_eq!(shared_exponent(2.0f32.powi(-126)), 255);
        assert_eq!(shared_exponent(f32::from_bits(1)), (-24i32) as u8);
    }

    #[test]
    fn known_block_by_hand() {
        // amax = 6: floor(log2 6) = 2, e = 127, s = 1/2, grid F·s = 0, .5, 1, 1.5, 2, 3, 4, 6.
        let mut x = [0.0f32; 32];
        let cases: [(f32, u8); 14] = [
            (6.0, 7),
            (0.25, 0),  // tie 0 / 0.5: the lower code
            (-0.25, 0), // tie 0 / -0.5: code 0 beats code 9
            (2.5, 4),   // tie 2 / 3
            (5.0, 6),   // tie 4 / 6
            (-5.0, 14), // tie -4 / -6
            (-6.0, 15),
            (0.75, 1), // tie 0.5 / 1
            (-0.0, 0),
            (0.1, 0),
            (-0.3, 9),
            (1.4, 3),
            (-2.9, 13),
            (3.6, 6),
        ];
        for (i, &(v, _)) in cases.iter().enumerate() {
            x[2 * i] = v;
        }
        let (q, y) = round_trip(&x);
        assert_eq!(q[0], 127);
        for (i, &(v, code)) in cases.iter().enumerate() {
            let j = 2 * i;
            let nibble = if j < 16 {
                q[1 + j] & 0xf
            } else {
                q[1 + j - 16] >> 4
            };
            assert_eq!(nibble, code, "x = {v}");
            assert_eq!(y[j], f32::from(KVALUES[usize::from(code)]) * 0.5);
        }
    }

    #[test]
    fn zero_block_is_zero_bytes() {
        let (q, y) = round_trip(&[0.0; 64]);
        assert!(q.iter().all(|&b| b == 0));
        assert!(y.iter().all(|&v| v == 0.0));
    }

    /// An independent reading of the spec: scale 2^(⌊log2 amax⌋ − 3) from the f32 exponent
    /// field, moved up one power where the platform's `log2f` (glibc's on Linux, the one ggml
    /// calls) rounds up to the next integer, and the code of least |F·s − x|.
    fn spec_block(x: &[f32]) -> (u8, [u8; 32]) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let mut codes = [0u8; 32];
        if amax == 0.0 {
            return (0, codes);
        }
        let mut k = if amax >= f32::MIN_POSITIVE {
            (amax.to_bits() >> 23) as i32 - 127
        } else {
            31 - amax.to_bits().leading_zeros() as i32 - 149
        };
        if amax.log2() == (k + 1) as f32 {
            k += 1;
        }
        let e = (k - 2 + 127) as u8;
        let s = e8m0_to_f32_half(e);
        for (c, &v) in codes.iter_mut().zip(x) {
            let mut best = f32::INFINITY;
            for (i, &f) in KVALUES.iter().enumerate() {
                let err = (f32::from(f) * s - v).abs();
                if err < best {
                    best = err;
                    *c = i as u8;
                }
            }
        }
        (e, codes)
    }

    fn interesting_block() -> impl Strategy<Value = Vec<f32>> {
        prop_oneof![
            prop::collection::vec(-1.0e3f32..1.0e3, 64),
            Just(vec![0.0; 64]),
            (0usize..64, -1.0e4f32..1.0e4).prop_map(|(i, big)| {
                let mut v = vec![1.0e-3; 64];
                v[i] = big;
                v
            }),
            prop::collection::vec(-1.0e-37f32..1.0e-37, 64),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 64),
            // Powers of two and their neighbours, where the exponent choice is delicate.
            prop::collection::vec((-20i32..20, -2i32..=2, any::<bool>()), 64).prop_map(|v| {
                v.into_iter()
                    .map(|(p, ulps, neg)| {
                        let b = 2.0f32.powi(p).to_bits() as i32 + ulps;
                        let x = f32::from_bits(b as u32);
                        if neg {
                            -x
                        } else {
                            x
                        }
                    })
                    .collect()
            }),
        ]
    }

    proptest! {
        #[test]
        fn matches_the_spec_and_error_is_bounded(x in interesting_block()) {
            let (q, y) = round_trip(&x);
            for (b, (block, xs)) in q.chunks_exact(17).zip(x.chunks_exact(32)).enumerate() {
                let (e, codes) = spec_block(xs);
                prop_assert_eq!(block[0], e);
                for j in 0..16 {
                    prop_assert_eq!(block[1 + j], codes[j] | (codes[j + 16] << 4));
                }
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Inside the grid the spacing is at most 4s, so half of it is 2s ≤ amax/4; past
                // 12s (1.5·2^k ≤ amax < 2^(k+1)) clipping loses less than 2^k/2 ≤ amax/2. Blocks
                // with amax < 2^-125 decode to zero.
                let bound = amax * 0.5 + 2.0f32.powi(-125);
                for (a, c) in xs.iter().zip(&y[32 * b..][..32]) {
                    prop_assert!((a - c).abs() <= bound, "{a} vs {c}, bound {bound}");
                }
            }
        }

        #[test]
        fn extreme_values_do_not_panic(
            x in prop::collection::vec(
                prop_oneof![Just(f32::MAX), Just(-f32::MAX), Just(1e-45f32), -1e38f32..1e38],
                32,
            ),
        ) {
            round_trip(&x);
        }
    }
}
