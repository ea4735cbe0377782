//! llama.cpp's `general.file_type` (`enum llama_ftype` in `include/llama.h`).

use crate::GgmlType;

/// One `llama_ftype` value: the id written to `general.file_type`, the name llama-quantize accepts,
/// and the ggml type that dominates such a file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileType {
    /// Value of `general.file_type`.
    pub id: u32,
    /// Name as llama-quantize spells it (`Q4_K_M`, `MXFP4_MOE`, ...).
    pub name: &'static str,
    /// The base ggml type of that file type.
    pub base: GgmlType,
}

/// Every file type of this llama.cpp tree (`LLAMA_FTYPE_*`), retired ones excluded.
pub const FILE_TYPES: &[FileType] = &[
    FileType {
        id: 0,
        name: "F32",
        base: GgmlType::F32,
    },
    FileType {
        id: 1,
        name: "F16",
        base: GgmlType::F16,
    },
    FileType {
        id: 2,
        name: "Q4_0",
        base: GgmlType::Q4_0,
    },
    FileType {
        id: 3,
        name: "Q4_1",
        base: GgmlType::Q4_1,
    },
    FileType {
        id: 7,
        name: "Q8_0",
        base: GgmlType::Q8_0,
    },
    FileType {
        id: 8,
        name: "Q5_0",
        base: GgmlType::Q5_0,
    },
    FileType {
        id: 9,
        name: "Q5_1",
        base: GgmlType::Q5_1,
    },
    FileType {
        id: 10,
        name: "Q2_K",
        base: GgmlType::Q2_K,
    },
    FileType {
        id: 11,
        name: "Q3_K_S",
        base: GgmlType::Q3_K,
    },
    FileType {
        id: 12,
        name: "Q3_K_M",
        base: GgmlType::Q3_K,
    },
    FileType {
        id: 13,
        name: "Q3_K_L",
        base: GgmlType::Q3_K,
    },
    FileType {
        id: 14,
        name: "Q4_K_S",
        base: GgmlType::Q4_K,
    },
    FileType {
        id: 15,
        name: "Q4_K_M",
        base: GgmlType::Q4_K,
    },
    FileType {
        id: 16,
        name: "Q5_K_S",
        base: GgmlType::Q5_K,
    },
    FileType {
        id: 17,
        name: "Q5_K_M",
        base: GgmlType::Q5_K,
    },
    FileType {
        id: 18,
        name: "Q6_K",
        base: GgmlType::Q6_K,
    },
    FileType {
        id: 19,
        name: "IQ2_XXS",
        base: GgmlType::IQ2_XXS,
    },
    FileType {
        id: 20,
        name: "IQ2_XS",
        base: GgmlType::IQ2_XS,
    },
    FileType {
        id: 21,
        name: "Q2_K_S",
        base: GgmlType::Q2_K,
    },
    FileType {
        id: 22,
        name: "IQ3_XS",
        base: GgmlType::IQ3_S,
    },
    FileType {
        id: 23,
        name: "IQ3_XXS",
        base: GgmlType::IQ3_XXS,
    },
    FileType {
        id: 24,
        name: "IQ1_S",
        base: GgmlType::IQ1_S,
    },
    FileType {
        id: 25,
        name: "IQ4_NL",
        base: GgmlType::IQ4_NL,
    },
    FileType {
        id: 26,
        name: "IQ3_S",
        base: GgmlType::IQ3_S,
    },
    FileType {
        id: 27,
        name: "IQ3_M",
        base: GgmlType::IQ3_S,
    },
    FileType {
        id: 28,
        name: "IQ2_S",
        base: GgmlType::IQ2_XS,
    },
    FileType {
        id: 29,
        name: "IQ2_M",
        base: GgmlType::IQ2_S,
    },
    FileType {
        id: 30,
        name: "IQ4_XS",
        base: GgmlType::IQ4_XS,
    },
    FileType {
        id: 31,
        name: "IQ1_M",
        base: GgmlType::IQ1_M,
    },
    FileType {
        id: 32,
        name: "BF16",
        base: GgmlType::BF16,
    },
    FileType {
        id: 36,
        name: "TQ1_0",
        base: GgmlType::TQ1_0,
    },
    FileType {
        id: 37,
        name: "TQ2_0",
        base: GgmlType::TQ2_0,
    },
    FileType {
        id: 38,
        name: "MXFP4_MOE",
        base: GgmlType::MXFP4,
    },
];

impl FileType {
    /// Looks a file type up by name, ignoring ASCII case.
    pub fn from_name(name: &str) -> Option<FileType> {
        FILE_TYPES
            .iter()
            .find(|f| f.name.eq_ignore_ascii_case(name))
            .copied()
    }

    /// Looks a file type up by its `general.file_type` value (the "guessed" bit 1024 is ignored).
    pub fn from_id(id: u32) -> Option<FileType> {
        let id = id & !1024;
        FILE_TYPES.iter().find(|f| f.id == id).copied()
    }

    /// The file type whose files are made of `ty` alone, when there is one (`Q8_0` → 7).
    pub fn for_single_type(ty: GgmlType) -> Option<FileType> {
        FILE_TYPES
            .iter()
            .find(|f| f.base == ty && f.name == ty.name())
            .copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups() {
        assert_eq!(FileType::from_name("q4_k_m").map(|f| f.id), Some(15));
        assert_eq!(FileType::from_id(1024 | 7).map(|f| f.name), Some("Q8_0"));
        assert_eq!(
            FileType::for_single_type(GgmlType::BF16).map(|f| f.id),
            Some(32)
        );
        assert_eq!(FileType::for_single_type(GgmlType::Q3_K), None);
        for f in FILE_TYPES {
            assert_eq!(FileType::from_id(f.id), Some(*f));
            assert_eq!(FileType::from_name(f.name), Some(*f));
        }
    }
}
