//! F32, F16 and BF16: element-wise conversions (ggml's `ggml_fp32_to_fp16_row`,
//! `ggml_fp32_to_bf16_row_ref`). The importance matrix is ignored.

use kiln_types::GgmlType;

use super::Kernel;
use crate::scalar::{bf16_bits_to_f32, f16_bits_to_f32, f32_to_bf16_bits, f32_to_f16_bits};

pub(crate) const KERNELS: &[Kernel] = &[
    Kernel::plain(GgmlType::F32, quantize_f32, dequantize_f32),
    Kernel::plain(GgmlType::F16, quantize_f16, dequantize_f16),
    Kernel::plain(GgmlType::BF16, quantize_bf16, dequantize_bf16),
];

fn quantize_f32(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(4)) {
        out.copy_from_slice(&x.to_le_bytes());
    }
}

fn dequantize_f32(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(4).zip(dst.iter_mut()) {
        *out = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

fn quantize_f16(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f32_to_f16_bits(*x).to_le_bytes());
    }
}

fn dequantize_f16(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *out = f16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}

fn quantize_bf16(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    for (x, out) in src.iter().zip(dst.chunks_exact_mut(2)) {
        out.copy_from_slice(&f32_to_bf16_bits(*x).to_le_bytes());
    }
}

fn dequantize_bf16(src: &[u8], dst: &mut [f32]) {
    for (b, out) in src.chunks_exact(2).zip(dst.iter_mut()) {
        *out = bf16_bits_to_f32(u16::from_le_bytes([b[0], b[1]]));
    }
}
