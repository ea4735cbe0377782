//! ggml tensor types: one table, everything else derived from it.

use std::fmt;

/// Static facts about one ggml tensor type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TypeInfo {
    /// The id stored in GGUF tensor-info records.
    pub id: u32,
    /// The upper-case name llama.cpp prints (`Q8_0`, `BF16`, ...).
    pub name: &'static str,
    /// Elements per block (1 for plain scalar types).
    pub block_size: u32,
    /// Bytes per block.
    pub type_size: u32,
}

macro_rules! ggml_type_table {
    ($( $konst:ident = $id:literal, $block:literal, $size:literal; )*) => {
        impl GgmlType {
            $(
                #[doc = concat!("ggml type `", stringify!($konst), "` (id ", stringify!($id), ").")]
                pub const $konst: GgmlType = GgmlType($id);
            )*
        }

        /// Every ggml type this tree of llama.cpp knows (ids 4, 5, 31–33 and 36–38 are retired),
        /// in id order.
        pub const GGML_TYPES: &[TypeInfo] = &[
            $( TypeInfo { id: $id, name: stringify!($konst), block_size: $block, type_size: $size }, )*
        ];
    };
}

// Sizes from ggml-common.h / type_traits in ggml.c (ggml 0.25.3).
ggml_type_table! {
    F32 = 0, 1, 4;
    F16 = 1, 1, 2;
    Q4_0 = 2, 32, 18;
    Q4_1 = 3, 32, 20;
    Q5_0 = 6, 32, 22;
    Q5_1 = 7, 32, 24;
    Q8_0 = 8, 32, 34;
    Q8_1 = 9, 32, 36;
    Q2_K = 10, 256, 84;
    Q3_K = 11, 256, 110;
    Q4_K = 12, 256, 144;
    Q5_K = 13, 256, 176;
    Q6_K = 14, 256, 210;
    Q8_K = 15, 256, 292;
    IQ2_XXS = 16, 256, 66;
    IQ2_XS = 17, 256, 74;
    IQ3_XXS = 18, 256, 98;
    IQ1_S = 19, 256, 50;
    IQ4_NL = 20, 32, 18;
    IQ3_S = 21, 256, 110;
    IQ2_S = 22, 256, 82;
    IQ4_XS = 23, 256, 136;
    I8 = 24, 1, 1;
    I16 = 25, 1, 2;
    I32 = 26, 1, 4;
    I64 = 27, 1, 8;
    F64 = 28, 1, 8;
    IQ1_M = 29, 256, 56;
    BF16 = 30, 1, 2;
    TQ1_0 = 34, 256, 54;
    TQ2_0 = 35, 256, 66;
    MXFP4 = 39, 32, 17;
    NVFP4 = 40, 64, 36;
    Q1_0 = 41, 128, 18;
    Q2_0 = 42, 64, 18;
}

/// A ggml tensor type id as found in a GGUF file.
///
/// This is an open newtype rather than an enum so that a file holding a type kiln does not know can
/// still be listed by `kiln inspect`; [`GgmlType::info`] is `None` for such ids.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct GgmlType(pub u32);

impl GgmlType {
    /// The table entry for this id, if the id is a known, non-retired type.
    pub fn info(self) -> Option<&'static TypeInfo> {
        GGML_TYPES.iter().find(|t| t.id == self.0)
    }

    /// The upper-case name, or `"UNKNOWN"` for ids outside the table.
    pub fn name(self) -> &'static str {
        self.info().map_or("UNKNOWN", |t| t.name)
    }

    /// Looks a type up by name, ignoring ASCII case (`q8_0` = `Q8_0`), as llama.cpp's tools do.
    pub fn from_name(name: &str) -> Option<GgmlType> {
        GGML_TYPES
            .iter()
            .find(|t| t.name.eq_ignore_ascii_case(name))
            .map(|t| GgmlType(t.id))
    }

    /// Elements per block, if known.
    pub fn block_size(self) -> Option<u64> {
        self.info().map(|t| u64::from(t.block_size))
    }

    /// Bytes per block, if known.
    pub fn type_size(self) -> Option<u64> {
        self.info().map(|t| u64::from(t.type_size))
    }

    /// Whether this type packs elements into blocks of more than one element.
    pub fn is_block_quantized(self) -> bool {
        self.info().is_some_and(|t| t.block_size > 1)
    }

    /// Byte size of one row of `n` elements, or `None` if the type is unknown, `n` is not a multiple
    /// of the block size, or the size overflows.
    pub fn row_bytes(self, n: u64) -> Option<u64> {
        let info = self.info()?;
        let block = u64::from(info.block_size);
        if n % block != 0 {
            return None;
        }
        (n / block).checked_mul(u64::from(info.type_size))
    }

    /// Byte size of a tensor with dimensions `ne` (fastest first), with the same conditions as
    /// [`GgmlType::row_bytes`] on `ne[0]`. An empty `ne` is a scalar.
    pub fn tensor_bytes(self, ne: &[u64]) -> Option<u64> {
        let row_len = ne.first().copied().unwrap_or(1);
        let rows = ne
            .iter()
            .skip(1)
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))?;
        self.row_bytes(row_len)?.checked_mul(rows)
    }

    /// Bits per weight of this type (`type_size * 8 / block_size`).
    pub fn bits_per_weight(self) -> Option<f64> {
        self.info()
            .map(|t| f64::from(t.type_size) * 8.0 / f64::from(t.block_size))
    }
}

impl fmt::Debug for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.info() {
            Some(t) => f.write_str(t.name),
            None => write!(f, "GgmlType({})", self.0),
        }
    }
}

impl fmt::Display for GgmlType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.info() {
            Some(t) => f.write_str(t.name),
            None => write!(f, "UNKNOWN({})", self.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ids_are_unique_and_sorted() {
        for pair in GGML_TYPES.windows(2) {
            assert!(pair[0].id < pair[1].id, "{:?} then {:?}", pair[0], pair[1]);
        }
    }

    #[test]
    fn names_round_trip_case_insensitively() {
        for t in GGML_TYPES {
            let ty = GgmlType(t.id);
            assert_eq!(ty.name(), t.name);
            assert_eq!(GgmlType::from_name(t.name), Some(ty));
            assert_eq!(GgmlType::from_name(&t.name.to_ascii_lowercase()), Some(ty));
        }
        assert_eq!(GgmlType::from_name("Q4_K_M"), None);
    }

    #[test]
    fn retired_ids_are_unknown() {
        for id in [4, 5, 31, 32, 33, 36, 37, 38, 43, u32::MAX] {
            assert_eq!(GgmlType(id).info(), None);
            assert_eq!(GgmlType(id).name(), "UNKNOWN");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(GgmlType::Q8_0.row_bytes(64), Some(68));
        assert_eq!(GgmlType::Q8_0.row_bytes(33), None);
        assert_eq!(GgmlType::Q4_K.tensor_bytes(&[256, 10]), Some(1440));
        assert_eq!(GgmlType::F32.tensor_bytes(&[]), Some(4));
        assert_eq!(GgmlType::F16.tensor_bytes(&[u64::MAX, 3]), None);
        assert_eq!(GgmlType::Q8_0.bits_per_weight(), Some(8.5));
    }
}
