//! The kernel table: what kiln can quantize to and decode from.

use kiln_types::GgmlType;

use crate::QuantError;

mod iq2;
mod iq3;
mod iq4;
mod kquants;
mod legacy;
mod mxfp4;
mod plain;
mod q8_0;
pub(crate) mod search;
mod ternary;

/// Quantizes one row; `dst` has exactly the row's byte size; `imatrix`, when given, has one weight
/// per element of the row.
pub(crate) type QuantizeRowFn = fn(src: &[f32], dst: &mut [u8], imatrix: Option<&[f32]>);
/// Dequantizes whole blocks.
pub(crate) type DequantizeFn = fn(src: &[u8], dst: &mut [f32]);

/// A type kiln can produce and decode.
#[derive(Debug, Clone, Copy)]
pub struct Kernel {
    /// The ggml type.
    pub ty: GgmlType,
    /// Quantizes one row.
    pub quantize_row: QuantizeRowFn,
    /// Dequantizes blocks.
    pub dequantize: DequantizeFn,
    /// Whether the type is refused without an importance matrix.
    pub requires_imatrix: bool,
    /// Whether an importance matrix changes the output at all.
    pub uses_imatrix: bool,
}

impl Kernel {
    /// A kernel that ignores importance matrices.
    pub(crate) const fn plain(
        ty: GgmlType,
        quantize_row: QuantizeRowFn,
        dequantize: DequantizeFn,
    ) -> Kernel {
        Kernel {
            ty,
            quantize_row,
            dequantize,
            requires_imatrix: false,
            uses_imatrix: false,
        }
    }

    /// Elements per block.
    pub fn block_size(&self) -> usize {
        self.ty.block_size().unwrap_or(1) as usize
    }

    /// Bytes per block.
    pub fn type_size(&self) -> usize {
        self.ty.type_size().unwrap_or(0) as usize
    }

    /// Bytes of one row of `n` elements.
    pub fn row_bytes(&self, n: usize) -> Result<usize, QuantError> {
        let block = self.block_size();
        if n % block != 0 {
            return Err(QuantError::RowNotMultipleOfBlock {
                ty: self.ty,
                n,
                block,
            });
        }
        Ok(n / block * self.type_size())
    }
}

/// The kernel families; each lists the kernels it implements.
const FAMILIES: &[&[Kernel]] = &[
    plain::KERNELS,
    q8_0::KERNELS,
    legacy::KERNELS,
    kquants::KERNELS,
    iq4::KERNELS,
    ternary::KERNELS,
    mxfp4::KERNELS,
    iq2::KERNELS,
    iq3::KERNELS,
];

/// Every kernel kiln has.
pub fn kernels() -> impl Iterator<Item = &'static Kernel> {
    FAMILIES.iter().flat_map(|f| f.iter())
}

/// The kernel for `ty`, if kiln has one.
pub fn kernel(ty: GgmlType) -> Option<&'static Kernel> {
    kernels().find(|k| k.ty == ty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};
    use crate::{dequantize_rows, quantize_rows};
    use proptest::prelude::*;

    #[test]
    fn table_is_consistent() {
        for k in kernels() {
            let info = k.ty.info().expect("kernel type in the type table");
            assert_eq!(k.block_size(), info.block_size as usize);
            assert_eq!(k.type_size(), info.type_size as usize);
            assert_eq!(kernel(k.ty).map(|k| k.ty), Some(k.ty));
        }
    }

    /// Every kernel, fed NaN, infinities, extremes, subnormals and signed zeros (with and without
    /// importance weights, themselves extreme), returns without panicking and decodes its own
    /// output. (The values need not be meaningful; ggml aborts on such inputs.)
    #[test]
    fn every_kernel_survives_extreme_inputs() {
        let specials = [
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            f32::MAX,
            -f32::MAX,
            f32::MIN_POSITIVE,
            1.0e-45,
            0.0,
            -0.0,
            1.0,
        ];
        let n = 256;
        for (a, &s) in specials.iter().enumerate() {
            let mixed: Vec<f32> = (0..n)
                .map(|i| {
                    if i % 7 == a % 7 {
                        s
                    } else {
                        specials[(i + a) % specials.len()]
                    }
                })
                .collect();
            let weights: Vec<f32> = (0..n)
                .map(|i| specials[(i * 3 + a) % specials.len()].abs())
                .collect();
            let uniform = vec![s; n];
            for k in kernels() {
                let mut out = vec![0u8; k.row_bytes(n).expect("256 fits every block size")];
                let mut back = vec![0.0f32; n];
                for (x, w) in [
                    (&mixed, None),
                    (&mixed, Some(&weights)),
                    (&uniform, Some(&uniform)),
                ] {
                    let w = w.or(k.requires_imatrix.then_some(&weights));
                    quantize_rows(k.ty, x, n, w.map(Vec::as_slice), &mut out).expect("quantize");
                    dequantize_rows(k.ty, &out, &mut back).expect("dequantize");
                }
            }
        }
    }

    #[test]
    fn q8_0_known_block() {
        let mut x = [0.0f32; 32];
        x[0] = 1.27;
        x[1] = -0.635;
        x[2] = 0.005;
        let mut out = [0u8; 34];
        quantize_rows(GgmlType::Q8_0, &x, 32, None, &mut out).unwrap();
        let d = f16_bits_to_f32(u16::from_le_bytes([out[0], out[1]]));
        assert_eq!(u16::from_le_bytes([out[0], out[1]]), f32_to_f16_bits(0.01));
        assert_eq!(out[2] as i8, 127);
        assert_eq!(out[3] as i8, -64); // -63.5 rounds away from zero
        assert_eq!(out[4] as i8, 1); // 0.5 rounds away from zero
        assert!((d - 0.01).abs() < 1e-5);
    }

    #[test]
    fn q8_0_zero_block_is_zero_bytes() {
        let x = [0.0f32; 64];
        let mut out = [0xffu8; 68];
        quantize_rows(GgmlType::Q8_0, &x, 64, None, &mut out).unwrap();
        assert!(out.iter().all(|&b| b == 0));
    }

    #[test]
    fn rejects_bad_rows() {
        let x = [0.0f32; 33];
        let mut out = [0u8; 34];
        assert!(matches!(
            quantize_rows(GgmlType::Q8_0, &x, 33, None, &mut out),
            Err(QuantError::RowNotMultipleOfBlock {
                n: 33,
                block: 32,
                ..
            })
        ));
        assert!(matches!(
            quantize_rows(GgmlType::NVFP4, &x, 33, None, &mut out),
            Err(QuantError::Unsupported(_))
        ));
        let x = [0.0f32; 32];
        assert!(matches!(
            quantize_rows(GgmlType::Q8_0, &x, 32, None, &mut out[..30]),
            Err(QuantError::BufferSize { .. })
        ));
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
            prop::collection::vec(-1.0e-38f32..1.0e-38, 64),
            prop::collection::vec(-1.0e-6f32..1.0e-6, 64),
        ]
    }

    proptest! {
        #[test]
        fn q8_0_round_trip_error_is_bounded(x in interesting_block()) {
            let mut q = vec![0u8; 68];
            quantize_rows(GgmlType::Q8_0, &x, 64, None, &mut q).unwrap();
            let mut y = vec![0.0f32; 64];
            dequantize_rows(GgmlType::Q8_0, &q, &mut y).unwrap();
            for block in 0..2 {
                let xs = &x[block * 32..][..32];
                let amax = xs.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                // Half a step of amax/127, plus the f16 rounding of the scale (relative 2^-11
                // over up to 127 steps) and slack for f16 subnormal scales.
                let bound = amax / 127.0 * 0.5 + amax * 2.0f32.powi(-10) + 1e-7 * 127.0;
                for (a, b) in xs.iter().zip(&y[block * 32..][..32]) {
                    prop_assert!((a - b).abs() <= bound, "{a} vs {b}, bound {bound}");
                }
            }
        }

        #[test]
        fn plain_types_round_trip(x in interesting_block()) {
            for ty in [GgmlType::F32, GgmlType::F16, GgmlType::BF16] {
                let k = kernel(ty).unwrap();
                let mut q = vec![0u8; k.row_bytes(64).unwrap()];
                quantize_rows(ty, &x, 64, None, &mut q).unwrap();
                let mut y = vec![0.0f32; 64];
                dequantize_rows(ty, &q, &mut y).unwrap();
                let rel = match ty { GgmlType::F32 => 0.0, GgmlType::F16 => 2.0f32.powi(-11), _ => 2.0f32.powi(-8) };
                for (a, b) in x.iter().zip(&y) {
                    // Below the normal range both formats lose relative precision: f16's subnormal
                    // step is 2^-24 (6e-8), bf16's is 2^-133 (9.2e-41).
                    let abs = match ty { GgmlType::F16 => 6.0e-8, GgmlType::BF16 => 1.0e-40, _ => 0.0 };
                    prop_assert!((a - b).abs() <= a.abs() * rel + abs, "{ty}: {a} vs {b}");
                }
            }
        }
    }
}
