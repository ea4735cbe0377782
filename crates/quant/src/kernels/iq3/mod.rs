//! The 3-bit grid types sharing ggml's `iq3xs_init_impl` tables: IQ3_XXS and IQ3_S.
//!
//! Both split a 256-value super-block into 32-value sub-blocks with a 4-bit scale each, and
//! encode every group of 4 magnitudes as one point of a fixed grid (256 points for IQ3_XXS, 512
//! for IQ3_S) of 4 levels `0..=7`; signs are stored separately. The quantizers search trial scales
//! per sub-block, snapping off-grid groups to their nearest grid neighbours through precomputed
//! lists ([`grid`]). An importance matrix is optional: without one ggml weights each value by
//! `x²`.

use kiln_types::GgmlType;

use super::Kernel;

mod grid;
mod s;
mod sub_block;
#[cfg(test)]
mod tests;
mod xxs;

/// IQ3_XXS and IQ3_S; both accept an importance matrix but, unlike the IQ2/IQ1 types, do not
/// require one at ggml level.
pub(crate) const KERNELS: &[Kernel] = &[
    Kernel {
        ty: GgmlType::IQ3_XXS,
        quantize_row: xxs::quantize,
        dequantize: xxs::dequantize,
        requires_imatrix: false,
        uses_imatrix: true,
    },
    Kernel {
        ty: GgmlType::IQ3_S,
        quantize_row: s::quantize,
        dequantize: s::dequantize,
        requires_imatrix: false,
        uses_imatrix: true,
    },
];
