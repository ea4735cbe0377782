//! Helpers shared by the end-to-end tests.
//! (Each test binary includes this module; not every binary uses every helper.)
#![allow(dead_code, unreachable_pub)]

use std::path::{Path, PathBuf};

use kiln_types::{MetaArray, MetaValue};
use sha2::{Digest, Sha256};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A fixture checkpoint shipped in `fixtures/`.
pub fn fixture(name: &str) -> PathBuf {
    repo().join("fixtures").join(name)
}

/// The golden summary of a fixture (`fixtures/golden/<name>.json`).
pub fn golden(name: &str) -> serde_json::Value {
    let path = repo().join("fixtures/golden").join(format!("{name}.json"));
    serde_json::from_slice(&std::fs::read(&path).expect("golden summary")).expect("golden JSON")
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

pub fn access() -> kiln_pipeline::MmapAccess {
    // SAFETY: tests map fixture files that nothing modifies while they run.
    #[allow(unsafe_code)]
    unsafe {
        kiln_pipeline::MmapAccess::new()
    }
}

/// Copies a fixture folder into a fresh temporary directory (so a test can damage it).
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let dst = dir.path().join(name);
    std::fs::create_dir_all(&dst).expect("mkdir");
    for entry in std::fs::read_dir(fixture(name)).expect("fixture") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), dst.join(entry.file_name())).expect("copy");
    }
    (dir, dst)
}

/// A llama-quantize preset as a recipe reading `input` and writing `output`.
pub fn preset_recipe(name: &str, input: &Path, output: &Path) -> kiln_pipeline::Recipe {
    kiln_recipe::presets::get(name)
        .expect("preset")
        .expect("parses")
        .with_overrides(&kiln_pipeline::Overrides {
            input: Some(input.to_path_buf()),
            output: Some(output.to_path_buf()),
            ..Default::default()
        })
}

/// Plans and builds a recipe with default options.
pub fn run_recipe(recipe: &kiln_pipeline::Recipe) -> kiln_pipeline::Report {
    let plan = kiln_pipeline::plan(recipe, &access()).expect("plan");
    kiln_pipeline::build(&plan, &kiln_pipeline::BuildOptions::default(), &()).expect("build")
}

/// Python's `repr(float)`: shortest round-trip digits, exponent form below 1e-4 or from 1e16.
pub fn py_float(x: f64) -> String {
    if x == 0.0 {
        return if x.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let s = format!("{x:e}");
    let (mant, exp) = s.split_once('e').expect("exponent");
    let exp: i32 = exp.parse().expect("exponent digits");
    let (sign, mant) = match mant.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mant),
    };
    let digits: String = mant.chars().filter(|c| *c != '.').collect();
    if !(-4..16).contains(&exp) {
        let m = if digits.len() == 1 {
            digits
        } else {
            format!("{}.{}", &digits[..1], &digits[1..])
        };
        format!(
            "{sign}{m}e{}{:02}",
            if exp < 0 { '-' } else { '+' },
            exp.abs()
        )
    } else if exp >= 0 {
        let int_len = exp as usize + 1;
        if digits.len() <= int_len {
            format!("{sign}{digits}{}.0", "0".repeat(int_len - digits.len()))
        } else {
            format!("{sign}{}.{}", &digits[..int_len], &digits[int_len..])
        }
    } else {
        format!("{sign}0.{}{digits}", "0".repeat((-exp - 1) as usize))
    }
}

/// Python's `json.dumps` of a string (ensure_ascii).
pub fn py_json_str(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            ' '..='~' => out.push(c),
            _ => {
                let mut buf = [0u16; 2];
                for unit in c.encode_utf16(&mut buf) {
                    out.push_str(&format!("\\u{unit:04x}"));
                }
            }
        }
    }
    out.push('"');
    out
}

/// `json.dumps(list)` of a GGUF array, as the golden summaries hash long arrays.
pub fn py_json_array(a: &MetaArray) -> String {
    let items: Vec<String> = match a {
        MetaArray::String(v) => v.iter().map(|s| py_json_str(s)).collect(),
        MetaArray::F32(v) => v.iter().map(|x| py_float(f64::from(*x))).collect(),
        MetaArray::F64(v) => v.iter().map(|x| py_float(*x)).collect(),
        MetaArray::I32(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::U32(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::I64(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::U64(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::U8(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::I8(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::U16(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::I16(v) => v.iter().map(|x| x.to_string()).collect(),
        MetaArray::Bool(v) => v
            .iter()
            .map(|x| if *x { "true" } else { "false" }.to_string())
            .collect(),
    };
    format!("[{}]", items.join(", "))
}

/// Whether a metadata value equals its golden summary (`{len, sha256}` for arrays over 16 items).
pub fn meta_matches(ours: &MetaValue, golden: &serde_json::Value) -> bool {
    use serde_json::Value;
    match (ours, golden) {
        (MetaValue::Array(a), Value::Object(o)) => {
            o.get("len").and_then(Value::as_u64) == Some(a.len() as u64)
                && o.get("sha256").and_then(Value::as_str)
                    == Some(sha256_hex(py_json_array(a).as_bytes()).as_str())
        }
        (MetaValue::Array(a), Value::Array(_)) => {
            let ours: Value = serde_json::from_str(&py_json_array(a)).expect("valid JSON");
            &ours == golden
        }
        (MetaValue::String(s), Value::String(g)) => s == g,
        (MetaValue::Bool(b), Value::Bool(g)) => b == g,
        (MetaValue::F32(x), Value::Number(n)) => n.as_f64() == Some(f64::from(*x)),
        (MetaValue::F64(x), Value::Number(n)) => n.as_f64() == Some(*x),
        (v, Value::Number(n)) => v.as_u64().is_some() && v.as_u64() == n.as_u64(),
        _ => false,
    }
}

#[test]
fn python_float_repr() {
    assert_eq!(py_float(9.999999747378752e-06), "9.999999747378752e-06");
    assert_eq!(py_float(-1000.0), "-1000.0");
    assert_eq!(py_float(0.0001), "0.0001");
    assert_eq!(py_float(1e16), "1e+16");
    assert_eq!(py_float(12.5), "12.5");
    assert_eq!(py_float(-0.25), "-0.25");
    assert_eq!(
        py_json_str("▁a\"\u{7f}🚀"),
        "\"\\u2581a\\\"\\u007f\\ud83d\\ude80\""
    );
}
