//! JSON text as Python's `json.dumps(value, indent=2, ensure_ascii=True)` writes it, which is how
//! transformers writes `config.json` and `model.safetensors.index.json` (plus a final newline,
//! added by the callers), and how llm-compressor writes the `quantization_config` block.
//!
//! `serde_json`'s pretty printer differs in three ways that matter for identical files: floats
//! (`1e-5` where Python writes `1e-05`), non-ASCII text (written raw where Python escapes it as
//! `\uXXXX`) and DEL (`\u007f` in Python). Hence this small serializer.

use serde_json::Value;

/// `json.dumps(value, indent=2, sort_keys=sort_keys)` with Python's defaults otherwise:
/// separators `,` and `: ` (the defaults when indenting), ASCII-only output, floats as Python's
/// `repr`. Object keys keep their stored order unless `sort_keys`. No final
/// newline.
pub fn to_python_json(value: &Value, sort_keys: bool) -> String {
    let mut out = String::new();
    write_value(&mut out, value, 0, sort_keys);
    out
}

fn newline(out: &mut String, level: usize) {
    out.push('\n');
    for _ in 0..level {
        out.push_str("  ");
    }
}

fn write_value(out: &mut String, value: &Value, level: usize, sort_keys: bool) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                out.push_str(&i.to_string());
            } else if let Some(u) = n.as_u64() {
                out.push_str(&u.to_string());
            } else if let Some(f) = n.as_f64() {
                out.push_str(&kiln_types::python_float_repr(f));
            } else {
                // Only reachable with serde_json's arbitrary-precision numbers; their text is
                // already a JSON number.
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => kiln_types::push_python_json_string(out, s),
        Value::Array(items) => {
            if items.is_empty() {
                out.push_str("[]");
                return;
            }
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                write_value(out, item, level + 1, sort_keys);
            }
            newline(out, level);
            out.push(']');
        }
        Value::Object(map) => {
            if map.is_empty() {
                out.push_str("{}");
                return;
            }
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            if sort_keys {
                // Python sorts str keys by code point, which is UTF-8 byte order.
                entries.sort_by(|a, b| a.0.cmp(b.0));
            }
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                newline(out, level + 1);
                kiln_types::push_python_json_string(out, k);
                out.push_str(": ");
                write_value(out, v, level + 1, sort_keys);
            }
            newline(out, level);
            out.push('}');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_as_python_repr() {
        for (x, s) in [
            (1e-5, "1e-05"),
            (1e-4, "0.0001"),
            (6.0, "6.0"),
            (10000.0, "10000.0"),
            (1e16, "1e+16"),
            (1234567890123456.0, "1234567890123456.0"),
            (0.1, "0.1"),
            (-2.5e-7, "-2.5e-07"),
            (0.027300000190734863, "0.027300000190734863"),
            (-0.0, "-0.0"),
            (1.5e300, "1.5e+300"),
        ] {
            assert_eq!(kiln_types::python_float_repr(x), s, "{x}");
        }
    }

    #[test]
    fn layout_matches_json_dumps() {
        // json.dumps({"b": [1, 2.0, None, True], "a": {}, "c": [], "é\x7f": "x\u2028"},
        //            indent=2, sort_keys=...)
        let v: Value = serde_json::from_str(
            r#"{"b": [1, 2.0, null, true], "a": {}, "c": [], "é\u007f": "x\u2028", "d": {"z": -3}}"#,
        )
        .unwrap();
        assert_eq!(
            to_python_json(&v, false),
            "{\n  \"b\": [\n    1,\n    2.0,\n    null,\n    true\n  ],\n  \"a\": {},\n  \
             \"c\": [],\n  \"\\u00e9\\u007f\": \"x\\u2028\",\n  \"d\": {\n    \"z\": -3\n  }\n}"
        );
        assert!(to_python_json(&v, true).starts_with("{\n  \"a\": {},\n  \"b\": ["));
        assert_eq!(
            to_python_json(&Value::String("\u{1F600}\u{1}".into()), false),
            "\"\\ud83d\\ude00\\u0001\""
        );
    }
}
