//! Block formats and quantization kernels for ggml tensor types. No file I/O.
//!
//! - [`blocks`]: each block format as a `#[repr(C)]` plain-bytes struct with a compile-time size
//!   check, tied to its [`GgmlType`] through the [`blocks::Block`] trait.
//! - [`kernel`] / [`Kernel`]: the one table of what kiln can produce and decode. A kernel quantizes
//!   one row of `f32` into the type's bytes (optionally weighted by an importance matrix) and
//!   dequantizes it back. Rows are independent, so callers may split work across threads by rows
//!   without changing a single output byte.
//! - [`scalar`]: the f32 ↔ f16 / bf16 conversions and ggml's rounding primitives, bit-exact with
//!   ggml's reference C.
//! - [`decode_row`]: source checkpoint elements (F32, F16, BF16) to `f32`.
//!
//! Every kernel here is the scalar reference; any faster path added later must agree with it
//! byte for byte (tested).

#![deny(unsafe_code)]
#![deny(missing_docs)]

pub mod affine;
pub mod blocks;
pub mod bnb;
pub mod estimators;
mod kernels;
pub mod methods;
pub mod scalar;

use kiln_types::GgmlType;

pub use kernels::{kernel, kernels, Kernel};

/// Why a quantization call was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum QuantError {
    /// kiln has no kernel for this type (yet).
    #[error("no kernel for type {0}")]
    Unsupported(GgmlType),
    /// The row length is not a multiple of the type's block size.
    #[error("row of {n} elements is not a multiple of the {ty} block size {block}")]
    RowNotMultipleOfBlock {
        /// Target type.
        ty: GgmlType,
        /// Row length.
        n: usize,
        /// Block size.
        block: usize,
    },
    /// Source and destination buffers disagree in size.
    #[error(
        "buffer size mismatch for {ty}: {elements} elements need {expected} bytes, got {actual}"
    )]
    BufferSize {
        /// Target type.
        ty: GgmlType,
        /// Elements.
        elements: usize,
        /// Bytes needed.
        expected: usize,
        /// Bytes given.
        actual: usize,
    },
    /// The importance matrix does not have one weight per column.
    #[error("importance matrix has {actual} weights for rows of {expected}")]
    ImatrixLength {
        /// Row length.
        expected: usize,
        /// Weights given.
        actual: usize,
    },
    /// The type cannot be produced without an importance matrix.
    #[error("type {0} requires an importance matrix")]
    ImatrixRequired(GgmlType),
}

/// Quantizes `src` (whole rows of `n_per_row` elements) into `dst`, row by row.
pub fn quantize_rows(
    ty: GgmlType,
    src: &[f32],
    n_per_row: usize,
    imatrix: Option<&[f32]>,
    dst: &mut [u8],
) -> Result<(), QuantError> {
    let k = kernel(ty).ok_or(QuantError::Unsupported(ty))?;
    let row_bytes = k.row_bytes(n_per_row)?;
    if n_per_row == 0 {
        return Ok(());
    }
    let rows = src.len() / n_per_row;
    if src.len() % n_per_row != 0 || rows * row_bytes != dst.len() {
        return Err(QuantError::BufferSize {
            ty,
            elements: src.len(),
            expected: rows * row_bytes,
            actual: dst.len(),
        });
    }
    if let Some(w) = imatrix {
        if w.len() != n_per_row {
            return Err(QuantError::ImatrixLength {
                expected: n_per_row,
                actual: w.len(),
            });
        }
    } else if k.requires_imatrix {
        return Err(QuantError::ImatrixRequired(ty));
    }
    for (row, out) in src
        .chunks_exact(n_per_row)
        .zip(dst.chunks_exact_mut(row_bytes))
    {
        (k.quantize_row)(row, out, imatrix);
    }
    Ok(())
}

/// Dequantizes whole rows of `ty` bytes in `src` into `dst`.
pub fn dequantize_rows(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    let k = kernel(ty).ok_or(QuantError::Unsupported(ty))?;
    let block = k.block_size();
    let bytes = k.type_size();
    if dst.len() % block != 0 || dst.len() / block * bytes != src.len() {
        return Err(QuantError::BufferSize {
            ty,
            elements: dst.len(),
            expected: dst.len() / block * bytes,
            actual: src.len(),
        });
    }
    (k.dequantize)(src, dst);
    Ok(())
}

/// Decodes source elements of a plain type (F32, F16, BF16) into `f32`. This is exact.
pub fn decode_row(ty: GgmlType, src: &[u8], dst: &mut [f32]) -> Result<(), QuantError> {
    match ty {
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => dequantize_rows(ty, src, dst),
        other => Err(QuantError::Unsupported(other)),
    }
}
