//! bitsandbytes 4-bit (NF4/FP4) weights as transformers serializes them (`Linear4bit.
//! _save_to_state_dict` and `QuantState.as_dict(packed=True)` in bitsandbytes 0.50,
//! `ecosystem.md` §2.1, §2.4).
//!
//! # Tensors per quantized linear weight `P.weight` of `n = out·in` elements
//!
//! | tensor | dtype | shape | content |
//! |---|---|---|---|
//! | `P.weight` | U8 | `(ceil(n/2), 1)` | codes of the flattened weight, first of each pair in the **high** nibble |
//! | `P.weight.absmax` | F32, or U8 when nested | `(ceil(n/B),)` | per-block absmax (8-bit codes when nested) |
//! | `P.weight.quant_map` | F32 | `(16,)` | the NF4 or FP4 table |
//! | `P.weight.nested_absmax` | F32 | `(ceil(ceil(n/B)/256),)` | nested only |
//! | `P.weight.nested_quant_map` | F32 | `(256,)` | nested only: the signed dynamic map |
//! | `P.weight.quant_state.bitsandbytes__nf4` (or `__fp4`) | U8 | `(len,)` | UTF-8 JSON of the non-tensor state |
//!
//! in that order (the state dict's). `B` is the block size (64 in transformers). The bias stays
//! as it is and is the caller's. The quant-state JSON (`quant_type`, `blocksize`, `dtype`,
//! `shape`, and when nested `nested_blocksize`, `nested_dtype`, `nested_offset`) is taken as
//! produced by `kiln_quant::bnb::quant_state_json` (byte for byte what bitsandbytes writes) and
//! checked here against the tensor it describes.
//!
//! Its length, and so the declared shape of the quant-state tensor, depends on the nested
//! offset's digits when double quantization is used; a caller laying out a file before
//! quantizing computes the offsets first (they need only the block maxima) or pads the JSON with
//! trailing spaces to a fixed width (`json.loads` ignores them, at the cost of bytes that differ
//! from bitsandbytes').

use serde_json::{Map, Value};

use super::{check_len, elements, PackedError, PackedTensor};
use crate::safetensors::{Dtype, TensorDecl};

/// Top-level keys of the `quantization_config` block, sorted (transformers'
/// `BitsAndBytesConfig.to_dict`, written with `sort_keys=True`).
pub const QUANTIZATION_CONFIG_KEYS: [&str; 13] = [
    "_load_in_4bit",
    "_load_in_8bit",
    "bnb_4bit_compute_dtype",
    "bnb_4bit_quant_storage",
    "bnb_4bit_quant_type",
    "bnb_4bit_use_double_quant",
    "llm_int8_enable_fp32_cpu_offload",
    "llm_int8_has_fp16_weight",
    "llm_int8_skip_modules",
    "llm_int8_threshold",
    "load_in_4bit",
    "load_in_8bit",
    "quant_method",
];

/// Keys of the quant-state JSON without double quantization, in bitsandbytes' order.
pub const QUANT_STATE_KEYS: [&str; 4] = ["quant_type", "blocksize", "dtype", "shape"];
/// Keys the quant-state JSON adds with double quantization, in order.
pub const NESTED_QUANT_STATE_KEYS: [&str; 3] =
    ["nested_blocksize", "nested_dtype", "nested_offset"];

/// Block size of the second-level quantization of the absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// Which 4-bit table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4.
    Nf4,
    /// bitsandbytes' FP4.
    Fp4,
}

impl QuantType {
    /// `"nf4"` / `"fp4"`: the `quant_type` value and the quant-state tensor's suffix.
    pub const fn name(self) -> &'static str {
        match self {
            QuantType::Nf4 => "nf4",
            QuantType::Fp4 => "fp4",
        }
    }
}

/// Double-quantized absmax values (bitsandbytes' nested quant state).
#[derive(Debug, Clone, Copy)]
pub struct NestedAbsmax<'a> {
    /// One 8-bit code per 4-bit block.
    pub codes: &'a [u8],
    /// One f32 absmax per 256 codes.
    pub nested_absmax: &'a [f32],
    /// The 256-entry signed dynamic map (`kiln_quant::bnb::dynamic_map()`).
    pub nested_quant_map: &'a [f32],
    /// The mean subtracted before quantizing (the JSON's `nested_offset`).
    pub offset: f32,
}

/// The absmax values of a 4-bit weight.
#[derive(Debug, Clone, Copy)]
pub enum Absmax<'a> {
    /// One f32 per block.
    Plain(&'a [f32]),
    /// Double-quantized.
    Nested(NestedAbsmax<'a>),
}

/// One bitsandbytes 4-bit weight (fields mirror `kiln_quant::bnb`'s outputs).
#[derive(Debug, Clone, Copy)]
pub struct Bnb4Weight<'a> {
    /// Rows (output features).
    pub rows: usize,
    /// Columns (input features).
    pub cols: usize,
    /// Elements per absmax block.
    pub blocksize: usize,
    /// The table.
    pub quant_type: QuantType,
    /// `ceil(rows·cols/2)` packed bytes.
    pub packed: &'a [u8],
    /// Block absmax values.
    pub absmax: Absmax<'a>,
    /// The 16-entry table as serialized (`Bnb4Kind::quant_map()`).
    pub quant_map: &'a [f32],
    /// The quant-state JSON.
    pub quant_state: &'a str,
}

fn check_blocksize(tensor: &str, blocksize: usize) -> Result<(), PackedError> {
    if blocksize.is_power_of_two() && (32..=4096).contains(&blocksize) {
        Ok(())
    } else {
        Err(PackedError::BadBlockSize {
            tensor: tensor.to_string(),
            blocksize,
        })
    }
}

/// The declarations for one weight, in the order [`encode`] returns them. `quant_state_len` is
/// the quant-state JSON's length in bytes.
pub fn tensor_decls(
    weight_name: &str,
    rows: usize,
    cols: usize,
    blocksize: usize,
    quant_type: QuantType,
    nested: bool,
    quant_state_len: usize,
) -> Result<Vec<TensorDecl>, PackedError> {
    if weight_name.is_empty() {
        return Err(PackedError::BadWeightName(String::new()));
    }
    check_blocksize(weight_name, blocksize)?;
    let n = elements(weight_name, rows, cols)?;
    let blocks = n.div_ceil(blocksize) as u64;
    let p = weight_name;
    let mut decls = vec![
        TensorDecl::new(p, Dtype::U8, vec![n.div_ceil(2) as u64, 1]),
        TensorDecl::new(
            format!("{p}.absmax"),
            if nested { Dtype::U8 } else { Dtype::F32 },
            vec![blocks],
        ),
        TensorDecl::new(format!("{p}.quant_map"), Dtype::F32, vec![16]),
    ];
    if nested {
        decls.push(TensorDecl::new(
            format!("{p}.nested_absmax"),
            Dtype::F32,
            vec![blocks.div_ceil(NESTED_BLOCKSIZE as u64)],
        ));
        decls.push(TensorDecl::new(
            format!("{p}.nested_quant_map"),
            Dtype::F32,
            vec![256],
        ));
    }
    decls.push(TensorDecl::new(
        format!("{p}.quant_state.bitsandbytes__{}", quant_type.name()),
        Dtype::U8,
        vec![quant_state_len as u64],
    ));
    Ok(decls)
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Checks that the quant-state JSON describes this weight: exactly bitsandbytes' keys in its
/// order, the quant type, block size and shape, a dtype name, and for nested state the nested
/// block size, dtype and the exact offset.
fn check_quant_state(tensor: &str, w: &Bnb4Weight<'_>) -> Result<(), PackedError> {
    let fail = |problem: String| PackedError::QuantState {
        tensor: tensor.to_string(),
        problem,
    };
    let v: Value = serde_json::from_str(w.quant_state).map_err(|e| fail(e.to_string()))?;
    let Value::Object(m) = &v else {
        return Err(fail("not a JSON object".into()));
    };
    let nested = match w.absmax {
        Absmax::Plain(_) => None,
        Absmax::Nested(n) => Some(n),
    };
    let expected: Vec<&str> = QUANT_STATE_KEYS
        .iter()
        .chain(nested.map_or(&[][..], |_| &NESTED_QUANT_STATE_KEYS[..]))
        .copied()
        .collect();
    let keys: Vec<&str> = m.keys().map(String::as_str).collect();
    if keys != expected {
        return Err(fail(format!("keys {keys:?}, expected {expected:?}")));
    }
    if m["quant_type"] != w.quant_type.name() {
        return Err(fail(format!(
            "quant_type {}, expected {:?}",
            m["quant_type"],
            w.quant_type.name()
        )));
    }
    if m["blocksize"].as_u64() != Some(w.blocksize as u64) {
        return Err(fail(format!(
            "blocksize {}, expected {}",
            m["blocksize"], w.blocksize
        )));
    }
    if !m["dtype"].is_string() {
        return Err(fail("dtype is not a string".into()));
    }
    let shape = [Value::from(w.rows), Value::from(w.cols)];
    if m["shape"].as_array().map(Vec::as_slice) != Some(&shape[..]) {
        return Err(fail(format!(
            "shape {}, expected [{}, {}]",
            m["shape"], w.rows, w.cols
        )));
    }
    if let Some(n) = nested {
        if m["nested_blocksize"].as_u64() != Some(NESTED_BLOCKSIZE as u64) {
            return Err(fail(format!("nested_blocksize {}", m["nested_blocksize"])));
        }
        if m["nested_dtype"] != "float32" {
            return Err(fail(format!("nested_dtype {}", m["nested_dtype"])));
        }
        // bitsandbytes reads the offset back into an f32 tensor, so f32 equality is the check
        // that matters (and it is immune to the last-bit error serde_json's default float
        // parser may make on 17-digit numbers).
        if m["nested_offset"].as_f64().map(|x| x as f32) != Some(n.offset) {
            return Err(fail(format!(
                "nested_offset {}, expected {}",
                m["nested_offset"], n.offset
            )));
        }
    }
    Ok(())
}

/// The tensors transformers saves for one 4-bit weight (see the module docs), after checking
/// every buffer's length and the quant-state JSON.
pub fn encode(weight_name: &str, w: &Bnb4Weight<'_>) -> Result<Vec<PackedTensor>, PackedError> {
    let nested = matches!(w.absmax, Absmax::Nested(_));
    let decls = tensor_decls(
        weight_name,
        w.rows,
        w.cols,
        w.blocksize,
        w.quant_type,
        nested,
        w.quant_state.len(),
    )?;
    let n = elements(weight_name, w.rows, w.cols)?;
    let blocks = n.div_ceil(w.blocksize);
    check_len(weight_name, "packed codes", w.packed.len(), n.div_ceil(2))?;
    check_len(weight_name, "quant_map", w.quant_map.len(), 16)?;
    match w.absmax {
        Absmax::Plain(a) => check_len(weight_name, "absmax", a.len(), blocks)?,
        Absmax::Nested(nst) => {
            check_len(weight_name, "absmax codes", nst.codes.len(), blocks)?;
            check_len(
                weight_name,
                "nested_absmax",
                nst.nested_absmax.len(),
                blocks.div_ceil(NESTED_BLOCKSIZE),
            )?;
            check_len(
                weight_name,
                "nested_quant_map",
                nst.nested_quant_map.len(),
                256,
            )?;
        }
    }
    check_quant_state(weight_name, w)?;
    let mut contents: Vec<Vec<u8>> = vec![w.packed.to_vec()];
    match w.absmax {
        Absmax::Plain(a) => {
            contents.push(f32_bytes(a));
            contents.push(f32_bytes(w.quant_map));
        }
        Absmax::Nested(nst) => {
            contents.push(nst.codes.to_vec());
            contents.push(f32_bytes(w.quant_map));
            contents.push(f32_bytes(nst.nested_absmax));
            contents.push(f32_bytes(nst.nested_quant_map));
        }
    }
    contents.push(w.quant_state.as_bytes().to_vec());
    Ok(decls
        .into_iter()
        .zip(contents)
        .map(|(decl, bytes)| PackedTensor { decl, bytes })
        .collect())
}

/// Settings of the `quantization_config` block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BnbConfig {
    /// The table every quantized weight uses.
    pub quant_type: QuantType,
    /// Whether the absmax values are double-quantized.
    pub double_quant: bool,
    /// `bnb_4bit_compute_dtype`: `"float16"`, `"bfloat16"` or `"float32"` (usually the model's
    /// dtype).
    pub compute_dtype: String,
    /// `llm_int8_skip_modules`: modules kept dense; `None` writes `null` (transformers then keeps
    /// the output head dense by itself).
    pub skip_modules: Option<Vec<String>>,
}

/// The `quantization_config` block transformers writes for a pre-quantized 4-bit model
/// (`BitsAndBytesConfig.to_dict`): exactly [`QUANTIZATION_CONFIG_KEYS`], storage `uint8`, the
/// LLM.int8 fields at their defaults.
pub fn quantization_config(config: &BnbConfig) -> Result<Value, PackedError> {
    if !matches!(
        config.compute_dtype.as_str(),
        "float16" | "bfloat16" | "float32"
    ) {
        return Err(PackedError::Config(format!(
            "bnb_4bit_compute_dtype `{}` is not float16, bfloat16 or float32",
            config.compute_dtype
        )));
    }
    // Inserted in sorted order.
    let mut m = Map::new();
    m.insert("_load_in_4bit".into(), Value::Bool(true));
    m.insert("_load_in_8bit".into(), Value::Bool(false));
    m.insert(
        "bnb_4bit_compute_dtype".into(),
        Value::from(config.compute_dtype.as_str()),
    );
    m.insert("bnb_4bit_quant_storage".into(), Value::from("uint8"));
    m.insert(
        "bnb_4bit_quant_type".into(),
        Value::from(config.quant_type.name()),
    );
    m.insert(
        "bnb_4bit_use_double_quant".into(),
        Value::Bool(config.double_quant),
    );
    m.insert(
        "llm_int8_enable_fp32_cpu_offload".into(),
        Value::Bool(false),
    );
    m.insert("llm_int8_has_fp16_weight".into(), Value::Bool(false));
    m.insert(
        "llm_int8_skip_modules".into(),
        match &config.skip_modules {
            Some(list) => Value::Array(list.iter().cloned().map(Value::String).collect()),
            None => Value::Null,
        },
    );
    m.insert("llm_int8_threshold".into(), Value::from(6.0));
    m.insert("load_in_4bit".into(), Value::Bool(true));
    m.insert("load_in_8bit".into(), Value::Bool(false));
    m.insert("quant_method".into(), Value::from("bitsandbytes"));
    Ok(Value::Object(m))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::safetensors::to_python_json;

    const STATE: &str =
        r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 40]}"#;

    fn weight<'a>(absmax: Absmax<'a>, state: &'a str) -> Bnb4Weight<'a> {
        Bnb4Weight {
            rows: 2,
            cols: 40,
            blocksize: 64,
            quant_type: QuantType::Nf4,
            packed: &[0x7F; 40],
            absmax,
            quant_map: &[0.5; 16],
            quant_state: state,
        }
    }

    #[test]
    fn plain_layout() {
        let t = encode("m.weight", &weight(Absmax::Plain(&[1.0, 2.0]), STATE)).unwrap();
        let got: Vec<(&str, Dtype, &[u64])> = t
            .iter()
            .map(|t| (t.decl.name.as_str(), t.decl.dtype, t.decl.shape.as_slice()))
            .collect();
        assert_eq!(
            got,
            [
                ("m.weight", Dtype::U8, &[40u64, 1][..]),
                ("m.weight.absmax", Dtype::F32, &[2][..]),
                ("m.weight.quant_map", Dtype::F32, &[16][..]),
                (
                    "m.weight.quant_state.bitsandbytes__nf4",
                    Dtype::U8,
                    &[STATE.len() as u64][..]
                ),
            ]
        );
        for x in &t {
            assert_eq!(x.bytes.len() as u64, x.decl.nbytes().unwrap());
        }
        assert_eq!(t[3].bytes, STATE.as_bytes());
    }

    #[test]
    fn nested_layout_and_checks() {
        let state = r#"{"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [2, 40], "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": 0.5}"#;
        let map = [0.0f32; 256];
        let nested = |offset| {
            Absmax::Nested(NestedAbsmax {
                codes: &[3, 4],
                nested_absmax: &[0.25],
                nested_quant_map: &map,
                offset,
            })
        };
        let t = encode("w", &weight(nested(0.5), state)).unwrap();
        let names: Vec<&str> = t.iter().map(|t| t.decl.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "w",
                "w.absmax",
                "w.quant_map",
                "w.nested_absmax",
                "w.nested_quant_map",
                "w.quant_state.bitsandbytes__nf4"
            ]
        );
        assert_eq!(t[1].decl.dtype, Dtype::U8);
        assert_eq!(t[1].bytes, [3, 4]);
        let decls = tensor_decls("w", 2, 40, 64, QuantType::Nf4, true, state.len()).unwrap();
        assert_eq!(t.iter().map(|t| t.decl.clone()).collect::<Vec<_>>(), decls);

        let err = |w: Bnb4Weight<'_>| encode("w", &w).unwrap_err();
        assert!(matches!(
            err(weight(nested(0.25), state)),
            PackedError::QuantState { .. }
        ));
        assert!(matches!(
            err(weight(Absmax::Plain(&[1.0, 2.0]), state)),
            PackedError::QuantState { .. }
        ));
        assert!(matches!(
            err(weight(nested(0.5), STATE)),
            PackedError::QuantState { .. }
        ));
        let fp4 = Bnb4Weight {
            quant_type: QuantType::Fp4,
            ..weight(Absmax::Plain(&[1.0, 2.0]), STATE)
        };
        assert!(matches!(err(fp4), PackedError::QuantState { .. }));
        assert!(matches!(
            err(weight(Absmax::Plain(&[1.0]), STATE)),
            PackedError::Length {
                what: "absmax",
                expected: 2,
                actual: 1,
                ..
            }
        ));
        assert!(matches!(
            err(Bnb4Weight {
                packed: &[0; 39],
                ..weight(Absmax::Plain(&[1.0, 2.0]), STATE)
            }),
            PackedError::Length {
                what: "packed codes",
                ..
            }
        ));
        assert!(matches!(
            err(Bnb4Weight {
                blocksize: 48,
                ..weight(Absmax::Plain(&[1.0, 2.0]), STATE)
            }),
            PackedError::BadBlockSize { blocksize: 48, .. }
        ));
    }

    #[test]
    fn config_block_matches_ecosystem_example() {
        let v = quantization_config(&BnbConfig {
            quant_type: QuantType::Nf4,
            double_quant: true,
            compute_dtype: "bfloat16".into(),
            skip_modules: None,
        })
        .unwrap();
        let keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(keys, QUANTIZATION_CONFIG_KEYS);
        let expected = r#"{
  "_load_in_4bit": true,
  "_load_in_8bit": false,
  "bnb_4bit_compute_dtype": "bfloat16",
  "bnb_4bit_quant_storage": "uint8",
  "bnb_4bit_quant_type": "nf4",
  "bnb_4bit_use_double_quant": true,
  "llm_int8_enable_fp32_cpu_offload": false,
  "llm_int8_has_fp16_weight": false,
  "llm_int8_skip_modules": null,
  "llm_int8_threshold": 6.0,
  "load_in_4bit": true,
  "load_in_8bit": false,
  "quant_method": "bitsandbytes"
}"#;
        assert_eq!(to_python_json(&v, false), expected);
        assert!(quantization_config(&BnbConfig {
            quant_type: QuantType::Fp4,
            double_quant: false,
            compute_dtype: "half".into(),
            skip_modules: Some(vec!["lm_head".into()]),
        })
        .is_err());
    }
}
