//! GGUF metadata values, typed as stored.

use std::fmt;

/// The GGUF value type ids (`enum gguf_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[allow(missing_docs)]
pub enum MetaValueType {
    U8 = 0,
    I8 = 1,
    U16 = 2,
    I16 = 3,
    U32 = 4,
    I32 = 5,
    F32 = 6,
    Bool = 7,
    String = 8,
    Array = 9,
    U64 = 10,
    I64 = 11,
    F64 = 12,
}

impl MetaValueType {
    /// Maps a raw id to a type, `None` for ids outside 0..=12.
    pub fn from_id(id: u32) -> Option<MetaValueType> {
        use MetaValueType::*;
        Some(match id {
            0 => U8,
            1 => I8,
            2 => U16,
            3 => I16,
            4 => U32,
            5 => I32,
            6 => F32,
            7 => Bool,
            8 => String,
            9 => Array,
            10 => U64,
            11 => I64,
            12 => F64,
            _ => return None,
        })
    }

    /// The id written to the file.
    pub fn id(self) -> u32 {
        self as u32
    }

    /// Lower-case name used by `kiln inspect` (`u32`, `string`, ...).
    pub fn name(self) -> &'static str {
        use MetaValueType::*;
        match self {
            U8 => "u8",
            I8 => "i8",
            U16 => "u16",
            I16 => "i16",
            U32 => "u32",
            I32 => "i32",
            F32 => "f32",
            Bool => "bool",
            String => "string",
            Array => "array",
            U64 => "u64",
            I64 => "i64",
            F64 => "f64",
        }
    }
}

/// One GGUF metadata value. The variant is the stored type: llama.cpp's loader checks types
/// strictly (a `u64` where it expects `u32` fails), so kiln never converts between them implicitly.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaValue {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    F32(f32),
    Bool(bool),
    String(String),
    Array(MetaArray),
    U64(u64),
    I64(i64),
    F64(f64),
}

/// A homogeneous GGUF array. Arrays of arrays are not representable, as llama.cpp rejects them.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)]
pub enum MetaArray {
    U8(Vec<u8>),
    I8(Vec<i8>),
    U16(Vec<u16>),
    I16(Vec<i16>),
    U32(Vec<u32>),
    I32(Vec<i32>),
    F32(Vec<f32>),
    Bool(Vec<bool>),
    String(Vec<String>),
    U64(Vec<u64>),
    I64(Vec<i64>),
    F64(Vec<f64>),
}

impl MetaValue {
    /// The stored type of this value.
    pub fn value_type(&self) -> MetaValueType {
        match self {
            MetaValue::U8(_) => MetaValueType::U8,
            MetaValue::I8(_) => MetaValueType::I8,
            MetaValue::U16(_) => MetaValueType::U16,
            MetaValue::I16(_) => MetaValueType::I16,
            MetaValue::U32(_) => MetaValueType::U32,
            MetaValue::I32(_) => MetaValueType::I32,
            MetaValue::F32(_) => MetaValueType::F32,
            MetaValue::Bool(_) => MetaValueType::Bool,
            MetaValue::String(_) => MetaValueType::String,
            MetaValue::Array(_) => MetaValueType::Array,
            MetaValue::U64(_) => MetaValueType::U64,
            MetaValue::I64(_) => MetaValueType::I64,
            MetaValue::F64(_) => MetaValueType::F64,
        }
    }

    /// The string, if this is a string value.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// Any integer value that fits in `u64`.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v.into()),
            MetaValue::U16(v) => Some(v.into()),
            MetaValue::U32(v) => Some(v.into()),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }
}

impl MetaArray {
    /// The element type.
    pub fn element_type(&self) -> MetaValueType {
        match self {
            MetaArray::U8(_) => MetaValueType::U8,
            MetaArray::I8(_) => MetaValueType::I8,
            MetaArray::U16(_) => MetaValueType::U16,
            MetaArray::I16(_) => MetaValueType::I16,
            MetaArray::U32(_) => MetaValueType::U32,
            MetaArray::I32(_) => MetaValueType::I32,
            MetaArray::F32(_) => MetaValueType::F32,
            MetaArray::Bool(_) => MetaValueType::Bool,
            MetaArray::String(_) => MetaValueType::String,
            MetaArray::U64(_) => MetaValueType::U64,
            MetaArray::I64(_) => MetaValueType::I64,
            MetaArray::F64(_) => MetaValueType::F64,
        }
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self {
            MetaArray::U8(v) => v.len(),
            MetaArray::I8(v) => v.len(),
            MetaArray::U16(v) => v.len(),
            MetaArray::I16(v) => v.len(),
            MetaArray::U32(v) => v.len(),
            MetaArray::I32(v) => v.len(),
            MetaArray::F32(v) => v.len(),
            MetaArray::Bool(v) => v.len(),
            MetaArray::String(v) => v.len(),
            MetaArray::U64(v) => v.len(),
            MetaArray::I64(v) => v.len(),
            MetaArray::F64(v) => v.len(),
        }
    }

    /// Whether the array has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl fmt::Display for MetaValue {
    /// A short human rendering: scalars as themselves, strings quoted and cut at 60 characters,
    /// arrays as `[type; len]` with their first items.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaValue::U8(v) => write!(f, "{v}"),
            MetaValue::I8(v) => write!(f, "{v}"),
            MetaValue::U16(v) => write!(f, "{v}"),
            MetaValue::I16(v) => write!(f, "{v}"),
            MetaValue::U32(v) => write!(f, "{v}"),
            MetaValue::I32(v) => write!(f, "{v}"),
            MetaValue::F32(v) => write!(f, "{v}"),
            MetaValue::Bool(v) => write!(f, "{v}"),
            MetaValue::U64(v) => write!(f, "{v}"),
            MetaValue::I64(v) => write!(f, "{v}"),
            MetaValue::F64(v) => write!(f, "{v}"),
            MetaValue::String(s) => {
                let cut: String = s.chars().take(60).collect();
                if cut.len() < s.len() {
                    write!(f, "{cut:?}…")
                } else {
                    write!(f, "{s:?}")
                }
            }
            MetaValue::Array(a) => {
                write!(f, "[{}; {}]", a.element_type().name(), a.len())?;
                let preview: Vec<String> = match a {
                    MetaArray::String(v) => v.iter().take(4).map(|s| format!("{s:?}")).collect(),
                    MetaArray::F32(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
                    MetaArray::I32(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
                    MetaArray::U32(v) => v.iter().take(4).map(|x| x.to_string()).collect(),
                    _ => Vec::new(),
                };
                if !preview.is_empty() {
                    write!(f, " {}", preview.join(", "))?;
                    if a.len() > preview.len() {
                        f.write_str(", …")?;
                    }
                }
                Ok(())
            }
        }
    }
}
