//! kiln's bitsandbytes 4-bit quantization against bitsandbytes 0.50.2's own outputs.
//!
//! `fixtures/golden/bnb-4bit.safetensors` (a copy of `../shared/golden/bnb/`) holds, for two
//! tiny-llama weights, the f32 input and what `quantize_4bit(x, blocksize=64, quant_type,
//! compress_statistics)` returned for NF4 and FP4 with and without double quantization: packed
//! codes, the serialized quant state and `dequantize_4bit`'s f32 output. The file's
//! `__metadata__["cases"]` lists the cases. Every comparison here is bit for bit.

use std::collections::BTreeMap;

use kiln_quant::bnb::{
    dequantize_4bit, dequantize_nested_absmax, double_quantize, dynamic_map, quant_state_json,
    quantize_4bit, Bnb4Kind, NestedAbsmax, DEFAULT_BLOCKSIZE,
};
use safetensors::SafeTensors;

const GOLDEN: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../fixtures/golden/bnb-4bit.safetensors"
);

struct Golden {
    bytes: Vec<u8>,
}

impl Golden {
    fn load() -> Self {
        let bytes = std::fs::read(GOLDEN).unwrap_or_else(|e| panic!("reading {GOLDEN}: {e}"));
        Self { bytes }
    }

    fn tensors(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).expect("golden file parses")
    }

    /// `__metadata__["cases"]`, ordered by case name.
    fn cases(&self) -> BTreeMap<String, Case> {
        let (_, meta) = SafeTensors::read_metadata(&self.bytes).expect("golden header");
        let md = meta.metadata().as_ref().expect("golden has __metadata__");
        let cases: serde_json::Value =
            serde_json::from_str(md.get("cases").expect("cases key")).expect("cases is JSON");
        cases
            .as_object()
            .expect("cases is an object")
            .iter()
            .map(|(name, c)| {
                let kind = match c["quant_type"].as_str() {
                    Some("nf4") => Bnb4Kind::Nf4,
                    Some("fp4") => Bnb4Kind::Fp4,
                    other => panic!("unknown quant_type {other:?}"),
                };
                let case = Case {
                    kind,
                    blocksize: c["blocksize"].as_u64().expect("blocksize") as usize,
                    double_quant: c["double_quant"].as_bool().expect("double_quant"),
                };
                (name.clone(), case)
            })
            .collect()
    }

    fn raw(&self, name: &str) -> (Vec<u8>, Vec<usize>) {
        let st = self.tensors();
        let t = st
            .tensor(name)
            .unwrap_or_else(|e| panic!("tensor {name}: {e}"));
        (t.data().to_vec(), t.shape().to_vec())
    }

    fn f32s(&self, name: &str) -> (Vec<f32>, Vec<usize>) {
        let (data, shape) = self.raw(name);
        let v = data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        (v, shape)
    }

    fn u8s(&self, name: &str) -> Vec<u8> {
        self.raw(name).0
    }
}

#[derive(Debug, Clone, Copy)]
struct Case {
    kind: Bnb4Kind,
    blocksize: usize,
    double_quant: bool,
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// `<weight>.<case>` → (`<weight>`, `<case>`).
fn split_case(name: &str) -> (&str, &str) {
    name.rsplit_once('.')
        .expect("case names are <weight>.<case>")
}

#[test]
fn golden_has_the_eight_documented_cases() {
    let g = Golden::load();
    let cases = g.cases();
    assert_eq!(cases.len(), 8);
    for (name, case) in &cases {
        assert_eq!(case.blocksize, DEFAULT_BLOCKSIZE, "{name}");
    }
}

#[test]
fn tables_equal_the_stored_quant_maps() {
    let g = Golden::load();
    for (name, case) in g.cases() {
        let (map, _) = g.f32s(&format!("{name}.state.quant_map"));
        assert_eq!(bits(&map), bits(case.kind.quant_map()), "{name}: quant_map");
        if case.double_quant {
            let (nested, _) = g.f32s(&format!("{name}.state.nested_quant_map"));
            assert_eq!(
                bits(&nested),
                bits(&dynamic_map()),
                "{name}: nested_quant_map"
            );
        }
    }
}

#[test]
fn packed_codes_absmax_and_dequant_are_bit_exact() {
    let g = Golden::load();
    for (name, case) in g.cases() {
        let (weight, _) = split_case(&name);
        let (x, shape) = g.f32s(&format!("{weight}.input_f32"));
        let q = quantize_4bit(&x, case.blocksize, case.kind).unwrap();

        let packed = g.u8s(&format!("{name}.packed"));
        assert_eq!(q.packed.len(), packed.len(), "{name}: packed length");
        let first_diff = q.packed.iter().zip(&packed).position(|(a, b)| a != b);
        assert_eq!(first_diff, None, "{name}: packed bytes differ");

        let (dequant, dshape) = g.f32s(&format!("{name}.dequant_f32"));
        assert_eq!(dshape, shape);
        let json = g.u8s(&format!(
            "{name}.state.quant_state.bitsandbytes__{}",
            case.kind.name()
        ));
        let json = String::from_utf8(json).expect("quant state is UTF-8");

        if case.double_quant {
            let codes = g.u8s(&format!("{name}.state.absmax"));
            let (nested_absmax, _) = g.f32s(&format!("{name}.state.nested_absmax"));
            let n = double_quantize(&q.absmax);
            assert_eq!(n.codes, codes, "{name}: nested codes");
            assert_eq!(
                bits(&n.nested_absmax),
                bits(&nested_absmax),
                "{name}: nested_absmax"
            );
            let want =
                quant_state_json(case.kind, case.blocksize, "float32", &shape, Some(n.offset));
            assert_eq!(json, want, "{name}: quant state JSON");

            let absmax = dequantize_nested_absmax(&n).unwrap();
            let d =
                dequantize_4bit(&q.packed, &absmax, x.len(), case.blocksize, case.kind).unwrap();
            assert_eq!(bits(&d), bits(&dequant), "{name}: dequant_f32");
        } else {
            let (absmax, _) = g.f32s(&format!("{name}.state.absmax"));
            assert_eq!(bits(&q.absmax), bits(&absmax), "{name}: absmax");
            let want = quant_state_json(case.kind, case.blocksize, "float32", &shape, None);
            assert_eq!(json, want, "{name}: quant state JSON");

            let d =
                dequantize_4bit(&q.packed, &q.absmax, x.len(), case.blocksize, case.kind).unwrap();
            assert_eq!(bits(&d), bits(&dequant), "{name}: dequant_f32");
        }
    }
}

/// Dequantizing bitsandbytes' stored state (rather than kiln's own) gives bitsandbytes' output:
/// the decoder is checked independently of the encoder.
#[test]
fn dequantizing_the_stored_state_reproduces_bitsandbytes() {
    let g = Golden::load();
    for (name, case) in g.cases() {
        let packed = g.u8s(&format!("{name}.packed"));
        let (dequant, _) = g.f32s(&format!("{name}.dequant_f32"));
        let absmax = if case.double_quant {
            let json = String::from_utf8(g.u8s(&format!(
                "{name}.state.quant_state.bitsandbytes__{}",
                case.kind.name()
            )))
            .unwrap();
            let state: serde_json::Value = serde_json::from_str(&json).unwrap();
            let offset = state["nested_offset"].as_f64().expect("nested_offset") as f32;
            let nested = NestedAbsmax {
                codes: g.u8s(&format!("{name}.state.absmax")),
                nested_absmax: g.f32s(&format!("{name}.state.nested_absmax")).0,
                offset,
            };
            dequantize_nested_absmax(&nested).unwrap()
        } else {
            g.f32s(&format!("{name}.state.absmax")).0
        };
        let d =
            dequantize_4bit(&packed, &absmax, dequant.len(), case.blocksize, case.kind).unwrap();
        assert_eq!(bits(&d), bits(&dequant), "{name}");
    }
}

/// The acceptance criterion in the words: NF4 dequantized values equal the table entry
/// times absmax, to the bit.
#[test]
fn nf4_dequant_is_table_times_absmax() {
    let g = Golden::load();
    for (name, case) in g.cases() {
        if case.kind != Bnb4Kind::Nf4 || case.double_quant {
            continue;
        }
        let packed = g.u8s(&format!("{name}.packed"));
        let (absmax, _) = g.f32s(&format!("{name}.state.absmax"));
        let (dequant, _) = g.f32s(&format!("{name}.dequant_f32"));
        for (i, &d) in dequant.iter().enumerate() {
            let byte = packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            let want =
                kiln_quant::bnb::NF4_QUANT_MAP[usize::from(code)] * absmax[i / case.blocksize];
            assert_eq!(d.to_bits(), want.to_bits(), "{name}[{i}]");
        }
    }
}

/// Other block sizes and a ragged length work end to end (no golden for these; the round trip
/// must stay within half a table step of each block's absmax).
#[test]
fn other_block_sizes_round_trip() {
    let x: Vec<f32> = (0..1001)
        .map(|i| ((i * 37 % 101) as f32 - 50.0) / 7.0)
        .collect();
    for blocksize in [32, 128, 256, 4096] {
        for kind in [Bnb4Kind::Nf4, Bnb4Kind::Fp4] {
            let q = quantize_4bit(&x, blocksize, kind).unwrap();
            assert_eq!(q.packed.len(), 501);
            assert_eq!(q.absmax.len(), x.len().div_ceil(blocksize));
            let d = dequantize_4bit(&q.packed, &q.absmax, x.len(), blocksize, kind).unwrap();
            for (i, (a, b)) in x.iter().zip(&d).enumerate() {
                let am = q.absmax[i / blocksize];
                // The widest gap in either table is 1/3 of the range (FP4 between 2/3 and 1).
                assert!(
                    (a - b).abs() <= am / 6.0 + 1e-6,
                    "{blocksize} {kind:?} [{i}]"
                );
            }
        }
    }
}
