//! GGUF metadata as JSON, for `--json` outputs.

use kiln_types::{MetaArray, MetaValue};
use serde_json::{json, Value};

/// A metadata value as JSON: scalars as numbers, booleans and strings; arrays as lists.
pub fn meta_to_json(v: &MetaValue) -> Value {
    match v {
        MetaValue::U8(x) => json!(x),
        MetaValue::I8(x) => json!(x),
        MetaValue::U16(x) => json!(x),
        MetaValue::I16(x) => json!(x),
        MetaValue::U32(x) => json!(x),
        MetaValue::I32(x) => json!(x),
        MetaValue::F32(x) => json!(x),
        MetaValue::Bool(x) => json!(x),
        MetaValue::String(x) => json!(x),
        MetaValue::U64(x) => json!(x),
        MetaValue::I64(x) => json!(x),
        MetaValue::F64(x) => json!(x),
        MetaValue::Array(a) => match a {
            MetaArray::U8(x) => json!(x),
            MetaArray::I8(x) => json!(x),
            MetaArray::U16(x) => json!(x),
            MetaArray::I16(x) => json!(x),
            MetaArray::U32(x) => json!(x),
            MetaArray::I32(x) => json!(x),
            MetaArray::F32(x) => json!(x),
            MetaArray::Bool(x) => json!(x),
            MetaArray::String(x) => json!(x),
            MetaArray::U64(x) => json!(x),
            MetaArray::I64(x) => json!(x),
            MetaArray::F64(x) => json!(x),
        },
    }
}
