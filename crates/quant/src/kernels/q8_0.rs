//! Q8_0: blocks of 32 signed bytes and an f16 scale (`quantize_row_q8_0_ref`).

use kiln_types::GgmlType;

use super::Kernel;
use crate::blocks::{Block, BlockQ8_0};
use crate::scalar::{f16_bits_to_f32, f32_to_f16_bits};

pub(crate) const KERNELS: &[Kernel] = &[Kernel::plain(
    GgmlType::Q8_0,
    quantize_q8_0,
    dequantize_q8_0,
)];

/// `quantize_row_q8_0_ref`: d = max|x| / 127, q = roundf(x / d). The importance matrix is ignored,
/// as in ggml.
fn quantize_q8_0(src: &[f32], dst: &mut [u8], _imatrix: Option<&[f32]>) {
    let blocks: &mut [BlockQ8_0] = bytemuck::cast_slice_mut(dst);
    for (x, block) in src.chunks_exact(BlockQ8_0::ELEMENTS).zip(blocks) {
        let amax = x.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let d = amax / 127.0;
        let id = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f32_to_f16_bits(d).to_le_bytes();
        for (q, v) in block.qs.iter_mut().zip(x) {
            *q = (v * id).round() as i8;
        }
    }
}

fn dequantize_q8_0(src: &[u8], dst: &mut [f32]) {
    let blocks: &[BlockQ8_0] = bytemuck::cast_slice(src);
    for (block, out) in blocks.iter().zip(dst.chunks_exact_mut(BlockQ8_0::ELEMENTS)) {
        let d = f16_bits_to_f32(u16::from_le_bytes(block.d));
        for (o, q) in out.iter_mut().zip(block.qs) {
            *o = f32::from(q) * d;
        }
    }
}
