//! Every quantization kernel against llama-quantize: for each golden `quant-*.gguf` of tiny-llama
//! and each tensor stored there in the type under test, kiln quantizes the same source values
//! (the fixture, converted to F32 by kiln exactly as `convert_hf_to_gguf.py` does), with the
//! importance matrix where the golden file used one, and must produce the same bytes.
//!
//! This checks kernels type by type, independently of the preset rules that choose the types.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::OnceLock;

use common::*;
use kiln_pipeline::{build, plan, BuildOptions, Recipe};
use kiln_reader::gguf::GgufFile;
use kiln_types::GgmlType;

/// Source tensors by GGUF name: dimensions and f32 values.
type Sources = BTreeMap<String, (Vec<u64>, Vec<f32>)>;

fn sources() -> &'static Sources {
    static SOURCES: OnceLock<Sources> = OnceLock::new();
    SOURCES.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let out = dir.path().join("f32.gguf");
        let text = format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[quantize]\ndefault = \"f32\"\n",
            fixture("tiny-llama")
        );
        let recipe = Recipe::from_toml(&text, Path::new(".")).expect("recipe");
        build(&plan(&recipe, &access()).expect("plan"), &BuildOptions::default(), &()).expect("build");
        let bytes = std::fs::read(&out).expect("read");
        let file = GgufFile::parse(&bytes).expect("parse");
        (0..file.tensors.len())
            .map(|i| {
                let t = &file.tensors[i];
                let data = file.tensor_data(i).expect("data");
                let values = data
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                    .collect();
                (t.name.clone(), (t.ne.clone(), values))
            })
            .collect()
    })
}

/// The golden importance matrix as llama-quantize hands it to ggml: per tensor, the mean of the
/// squared activations per column (`in_sum2 / counts`, a zero count giving 1).
fn imatrix() -> &'static BTreeMap<String, Vec<f32>> {
    static IMATRIX: OnceLock<BTreeMap<String, Vec<f32>>> = OnceLock::new();
    IMATRIX.get_or_init(|| {
        let bytes =
            std::fs::read(repo().join("fixtures/golden/tiny-llama-imatrix.gguf")).expect("imatrix");
        let file = GgufFile::parse(&bytes).expect("imatrix parses");
        let f32s = |i: usize| -> Vec<f32> {
            file.tensor_data(i)
                .expect("data")
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect()
        };
        let mut out = BTreeMap::new();
        for (i, t) in file.tensors.iter().enumerate() {
            let Some(name) = t.name.strip_suffix(".in_sum2") else {
                continue;
            };
            let counts_index = file
                .tensor_index(&format!("{name}.counts"))
                .expect("counts");
            let sums = f32s(i);
            let counts = f32s(counts_index);
            let ne0 = t.ne[0] as usize;
            let means = sums
                .iter()
                .enumerate()
                .map(|(j, s)| {
                    let c = counts[j / ne0];
                    if c == 0.0 {
                        1.0
                    } else {
                        s / c
                    }
                })
                .collect();
            out.insert(name.to_string(), means);
        }
        out
    })
}

/// Checks every golden tensor stored as `ty`, in files made with (or without) an imatrix.
fn check(ty: GgmlType, with_imatrix: bool) {
    let golden = golden("tiny-llama");
    let kernel = kiln_quant::kernel(ty).unwrap_or_else(|| panic!("no kernel for {ty}"));
    let mut checked = 0;
    let mut failures = Vec::new();
    let mut cache: BTreeMap<(String, bool), String> = BTreeMap::new();
    for (file, summary) in golden.as_object().expect("golden") {
        if !file.starts_with("quant-") || file.contains("-imatrix") != with_imatrix {
            continue;
        }
        for t in summary["tensors"].as_array().expect("tensors") {
            if t["type"].as_str() != Some(ty.name()) {
                continue;
            }
            let name = t["name"].as_str().expect("name");
            let (ne, values) = &sources()[name];
            let weights = if with_imatrix {
                imatrix().get(name)
            } else {
                None
            };
            let key = (name.to_string(), weights.is_some());
            let hash = cache.entry(key).or_insert_with(|| {
                let row = ne[0] as usize;
                let mut out = vec![0u8; kernel.row_bytes(row).expect("row") * (values.len() / row)];
                kiln_quant::quantize_rows(ty, values, row, weights.map(Vec::as_slice), &mut out)
                    .expect("quantize");
                sha256_hex(&out)
            });
            checked += 1;
            if hash != t["sha256"].as_str().expect("sha") {
                failures.push(format!("{file}: {name}"));
            }
        }
    }
    assert!(
        checked > 0,
        "no golden tensor of type {ty} (imatrix: {with_imatrix})"
    );
    assert!(
        failures.is_empty(),
        "{ty}: {} of {checked} tensors differ from llama-quantize: {:?}",
        failures.len(),
        &failures[..failures.len().min(8)]
    );
}

macro_rules! golden_kernel_tests {
    ($($name:ident: $ty:ident, $imatrix:expr;)*) => {
        $(
            #[test]
            fn $name() {
                check(GgmlType::$ty, $imatrix);
            }
        )*
    };
}

golden_kernel_tests! {
    q8_0: Q8_0, false;
    q4_0: Q4_0, false;
    q4_0_imatrix: Q4_0, true;
    q4_1: Q4_1, false;
    q5_0: Q5_0, false;
    q5_1: Q5_1, false;
    q2_k: Q2_K, false;
    q2_k_imatrix: Q2_K, true;
    q3_k: Q3_K, false;
    q3_k_imatrix: Q3_K, true;
    q4_k: Q4_K, false;
    q4_k_imatrix: Q4_K, true;
    q5_k: Q5_K, false;
    q5_k_imatrix: Q5_K, true;
    q6_k: Q6_K, false;
    q6_k_imatrix: Q6_K, true;
    iq4_nl: IQ4_NL, false;
    iq4_nl_imatrix: IQ4_NL, true;
    iq4_xs: IQ4_XS, false;
    iq4_xs_imatrix: IQ4_XS, true;
    tq1_0: TQ1_0, false;
    tq2_0: TQ2_0, false;
    iq3_xxs_imatrix: IQ3_XXS, true;
    iq3_s_imatrix: IQ3_S, true;
    iq2_xxs_imatrix: IQ2_XXS, true;
    iq2_xs_imatrix: IQ2_XS, true;
    iq2_s_imatrix: IQ2_S, true;
    iq1_s_imatrix: IQ1_S, true;
    iq1_m_imatrix: IQ1_M, true;
}
