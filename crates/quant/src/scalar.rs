//! Scalar conversions and rounding, bit-exact with ggml's reference C (`ggml-impl.h`,
//! `ggml-quants.c`).

use half::f16;

/// f32 → IEEE binary16 bits, round-to-nearest-even, subnormals kept, overflow to ±inf.
#[inline]
pub fn f32_to_f16_bits(x: f32) -> u16 {
    f16::from_f32(x).to_bits()
}

/// IEEE binary16 bits → f32 (exact).
#[inline]
pub fn f16_bits_to_f32(bits: u16) -> f32 {
    f16::from_bits(bits).to_f32()
}

/// f32 → bf16 bits as ggml's `ggml_compute_fp32_to_bf16`: NaN becomes a quiet NaN with the upper
/// bits kept; everything else rounds to nearest even on the upper half, subnormals not flushed.
#[inline]
pub fn f32_to_bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    if (bits & 0x7fff_ffff) > 0x7f80_0000 {
        return ((bits >> 16) | 64) as u16;
    }
    ((bits + (0x7fff + ((bits >> 16) & 1))) >> 16) as u16
}

/// bf16 bits → f32 (exact).
#[inline]
pub fn bf16_bits_to_f32(bits: u16) -> f32 {
    f32::from_bits(u32::from(bits) << 16)
}

/// ggml's `nearest_int`: round half to even through the 1.5·2²³ trick (valid for |x| < 2²²).
#[inline]
pub fn nearest_int(x: f32) -> i32 {
    let val = x + 12_582_912.0;
    let bits = val.to_bits() as i32;
    (bits & 0x007f_ffff) - 0x0040_0000
}

/// C's `roundf`: round half away from zero (what Rust's `f32::round` does).
#[inline]
pub fn roundf(x: f32) -> f32 {
    x.round()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bf16_matches_half_for_non_nan() {
        for bits in (0u32..=u32::MAX).step_by(65_521) {
            let x = f32::from_bits(bits);
            if x.is_nan() {
                assert_eq!(f32_to_bf16_bits(x) & 0x7fc0, 0x7fc0);
                continue;
            }
            assert_eq!(
                f32_to_bf16_bits(x),
                half::bf16::from_f32(x).to_bits(),
                "{bits:#x}"
            );
        }
    }

    #[test]
    fn bf16_round_trips() {
        for bits in 0u16..=u16::MAX {
            let x = bf16_bits_to_f32(bits);
            if !x.is_nan() {
                assert_eq!(f32_to_bf16_bits(x), bits);
            }
        }
    }

    #[test]
    fn f16_round_trips_and_rounds_to_even() {
        for bits in 0u16..=u16::MAX {
            let x = f16_bits_to_f32(bits);
            if !x.is_nan() {
                assert_eq!(f32_to_f16_bits(x), bits);
            }
        }
        // 1 + 2^-11 is halfway between 1 and the next f16; ties go to even (1.0).
        assert_eq!(f32_to_f16_bits(1.0 + f32::powi(2.0, -11)), 0x3c00);
        assert_eq!(f32_to_f16_bits(65520.0), 0x7c00);
        assert_eq!(f32_to_f16_bits(-0.0), 0x8000);
    }

    #[test]
    fn nearest_int_is_half_to_even() {
        assert_eq!(nearest_int(0.5), 0);
        assert_eq!(nearest_int(1.5), 2);
        assert_eq!(nearest_int(2.5), 2);
        assert_eq!(nearest_int(-0.5), 0);
        assert_eq!(nearest_int(-1.5), -2);
        assert_eq!(nearest_int(-3.7), -4);
        assert_eq!(roundf(2.5), 3.0);
        assert_eq!(roundf(-2.5), -3.0);
    }
}
