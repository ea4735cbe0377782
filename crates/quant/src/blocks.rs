//! Block formats, byte for byte as in ggml-common.h.
//!
//! Fields that hold multi-byte numbers are stored as little-endian byte arrays (not `u16`), so the
//! structs have alignment 1, no padding, and the same meaning on any host; `bytemuck` casts a
//! `&[u8]` of the right length to a slice of blocks without `unsafe` in this crate.

use bytemuck::{Pod, Zeroable};
use kiln_types::GgmlType;

/// A ggml block format.
pub trait Block: Pod {
    /// The ggml type stored as these blocks.
    const TYPE: GgmlType;
    /// Elements per block.
    const ELEMENTS: usize;
}

/// `block_q8_0`: 32 signed 8-bit values and an f16 scale (34 bytes).
#[repr(C)]
#[derive(Debug, Clone, Copy, Pod, Zeroable)]
pub struct BlockQ8_0 {
    /// Scale `d`, f16 bits, little-endian.
    pub d: [u8; 2],
    /// Quantized values; element `j` is `qs[j] * d`.
    pub qs: [i8; 32],
}
const _: () = assert!(std::mem::size_of::<BlockQ8_0>() == 34);

impl Block for BlockQ8_0 {
    const TYPE: GgmlType = GgmlType::Q8_0;
    const ELEMENTS: usize = 32;
}

/// Asserts that a block struct agrees with the type table: byte size, elements, alignment 1.
/// Every family's tests call this for its blocks.
#[cfg(test)]
pub(crate) fn assert_matches_type_table<B: Block>() {
    let info = B::TYPE.info().expect("block type in table");
    assert_eq!(
        std::mem::size_of::<B>(),
        info.type_size as usize,
        "{}",
        info.name
    );
    assert_eq!(B::ELEMENTS, info.block_size as usize, "{}", info.name);
    assert_eq!(std::mem::align_of::<B>(), 1, "{}", info.name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_sizes_match_the_type_table() {
        assert_matches_type_table::<BlockQ8_0>();
    }
}
