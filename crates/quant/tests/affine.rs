//! compressed-tensors `pack-quantized` round trip through an independent decoder.
//!
//! The decoder below reads the documented layout (`docs/ecosystem.md` §1.3) the slow, literal
//! way: the int32 words of a row as little-endian bytes, one bit at a time, element `i` at bits
//! `[i*b, (i+1)*b)`, minus `2^(b-1)`; zero points the same way down each column of the
//! `(ceil(out*b/32), groups)` tensor. It shares no code with `kiln_quant::affine`'s packers.

mod common;

use common::Rng;
use kiln_quant::affine::{
    pack_to_int32, pack_zero_points, packed_words, quantize, Granularity, QuantScheme,
};
use kiln_quant::estimators::{estimate_ranges, Estimator};

/// Bit `k` of a little-endian stream of int32 words.
fn bit(words: &[i32], k: usize) -> u32 {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    u32::from((bytes[k / 8] >> (k % 8)) & 1)
}

/// Element `i` of a packed stream, in the signed domain.
fn read(words: &[i32], i: usize, bits: usize) -> i32 {
    let u: u32 = (0..bits).map(|j| bit(words, i * bits + j) << j).sum();
    u as i32 - (1 << (bits - 1))
}

#[test]
fn packed_tensors_decode_to_the_dequantized_weights() {
    let (rows, cols) = (6, 200);
    let x: Vec<f32> = Rng::new(5).gaussians(rows * cols);
    for bits in [2u8, 3, 4, 5, 6, 7, 8] {
        for symmetric in [true, false] {
            for granularity in [Granularity::Channel, Granularity::Group(64)] {
                let s = QuantScheme::new(bits, symmetric, granularity).unwrap();
                let ranges = estimate_ranges(&x, rows, cols, &s, Estimator::MinMax).unwrap();
                let q = quantize(&x, rows, cols, &s, &ranges).unwrap();
                let groups = s.groups_per_row(cols);
                let packed = pack_to_int32(&q.q, rows, cols, bits).unwrap();
                let words = packed_words(cols, bits);
                assert_eq!(words, (cols * usize::from(bits)).div_ceil(32));
                assert_eq!(packed.len(), rows * words);
                let zp_packed = pack_zero_points(&q.zero_points, rows, groups, bits).unwrap();
                let zp_words = packed_words(rows, bits);
                assert_eq!(zp_packed.len(), zp_words * groups);

                let b = usize::from(bits);
                let reference = q.dequantize();
                for r in 0..rows {
                    let row = &packed[r * words..(r + 1) * words];
                    for c in 0..cols {
                        let g = match granularity {
                            Granularity::Group(size) => c / size,
                            _ => 0,
                        };
                        let column: Vec<i32> =
                            (0..zp_words).map(|w| zp_packed[w * groups + g]).collect();
                        let zp = if symmetric { 0 } else { read(&column, r, b) };
                        let scale = q.scales[r * groups + g];
                        let v = (read(row, c, b) - zp) as f32 * scale;
                        let i = r * cols + c;
                        assert_eq!(v.to_bits(), reference[i].to_bits(), "{s:?} [{r}, {c}]");
                        // Min-max ranges never clip: the error is at most half a step.
                        assert!((v - x[i]).abs() <= scale * 0.5001, "{s:?} [{r}, {c}]");
                    }
                }
            }
        }
    }
}

#[test]
fn symmetric_zero_points_are_all_zero() {
    let x: Vec<f32> = Rng::new(9).gaussians(4 * 64);
    let s = QuantScheme::new(4, true, Granularity::Group(32)).unwrap();
    let ranges = estimate_ranges(&x, 4, 64, &s, Estimator::MSE_DEFAULT).unwrap();
    let q = quantize(&x, 4, 64, &s, &ranges).unwrap();
    assert!(q.zero_points.iter().all(|&z| z == 0));
    assert!(q.q.iter().all(|&v| (-8..=7).contains(&v)));
}
