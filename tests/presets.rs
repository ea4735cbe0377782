//! The presets against llama-quantize: for every `quant-*.gguf` golden of tiny-llama, kiln run on
//! the fixture checkpoint with the matching preset recipe (and the golden's importance matrix, as
//! GGUF and as legacy `.dat`) must choose the same type for every tensor and write the same bytes.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use common::*;
use kiln_pipeline::{build, plan, BuildOptions, Overrides, Recipe};
use kiln_reader::gguf::GgufFile;

enum Imatrix {
    None,
    Gguf,
    Dat,
}

fn recipe_for(golden_file: &str, imatrix: &Imatrix, out: &Path) -> Recipe {
    let stem = golden_file
        .strip_prefix("quant-")
        .and_then(|s| s.strip_suffix(".gguf"))
        .expect("golden name");
    let stem = stem.trim_end_matches("-imatrix");
    let base = match stem {
        "Q4_K_M-pure" => {
            Recipe::load(&repo().join("recipes/examples/q4_k_m-pure.toml")).expect("pure")
        }
        "Q4_K_S-overrides" => {
            Recipe::load(&repo().join("recipes/examples/q4_k_s-overrides.toml")).expect("overrides")
        }
        preset => kiln_recipe::presets::get(preset)
            .unwrap_or_else(|| panic!("no preset {preset}"))
            .expect("preset parses"),
    };
    let imatrix: Option<PathBuf> = match imatrix {
        Imatrix::None => None,
        Imatrix::Gguf => Some(repo().join("fixtures/golden/tiny-llama-imatrix.gguf")),
        Imatrix::Dat => Some(repo().join("fixtures/golden/tiny-llama-imatrix.dat")),
    };
    base.with_overrides(&Overrides {
        input: Some(fixture("tiny-llama")),
        output: Some(out.to_path_buf()),
        imatrix,
        ..Default::default()
    })
}

fn check(golden_file: &str, imatrix: Imatrix) {
    let golden = golden("tiny-llama");
    let g = &golden[golden_file]["tensors"];
    let expected: BTreeMap<&str, (&str, &str)> = g
        .as_array()
        .expect("tensors")
        .iter()
        .map(|t| {
            (
                t["name"].as_str().expect("name"),
                (
                    t["type"].as_str().expect("type"),
                    t["sha256"].as_str().expect("sha"),
                ),
            )
        })
        .collect();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.gguf");
    let recipe = recipe_for(golden_file, &imatrix, &out);
    let plan = plan(&recipe, &access()).unwrap_or_else(|e| panic!("{golden_file}: plan: {e}"));

    // Types first: a wrong type would make every byte comparison below fail anyway.
    let mut wrong_types = Vec::new();
    for t in &plan.tensors {
        let (ty, _) = expected
            .get(t.name.as_str())
            .unwrap_or_else(|| panic!("{golden_file}: extra tensor {}", t.name));
        if t.ty.name() != *ty {
            wrong_types.push(format!(
                "{}: kiln {} ({}), llama.cpp {ty}",
                t.name, t.ty, t.decision
            ));
        }
    }
    assert_eq!(
        plan.tensors.len(),
        expected.len(),
        "{golden_file}: tensor count"
    );
    assert!(
        wrong_types.is_empty(),
        "{golden_file}: types differ: {wrong_types:#?}"
    );

    build(&plan, &BuildOptions::default(), &())
        .unwrap_or_else(|e| panic!("{golden_file}: build: {e}"));
    let bytes = std::fs::read(&out).expect("output");
    let file = GgufFile::parse(&bytes).expect("parse");
    let mut wrong_bytes = Vec::new();
    for (i, t) in file.tensors.iter().enumerate() {
        let (_, sha) = expected[t.name.as_str()];
        if sha256_hex(file.tensor_data(i).expect("data")) != sha {
            wrong_bytes.push(format!("{} ({})", t.name, t.ty));
        }
    }
    assert!(
        wrong_bytes.is_empty(),
        "{golden_file}: tensor bytes differ: {wrong_bytes:?}"
    );
}

macro_rules! preset_tests {
    ($($name:ident: $file:literal, $imatrix:ident;)*) => {
        $(
            #[test]
            fn $name() {
                check($file, Imatrix::$imatrix);
            }
        )*
    };
}

preset_tests! {
    bf16: "quant-BF16.gguf", None;
    f16: "quant-F16.gguf", None;
    q8_0: "quant-Q8_0.gguf", None;
    q4_0: "quant-Q4_0.gguf", None;
    q4_1: "quant-Q4_1.gguf", None;
    q5_0: "quant-Q5_0.gguf", None;
    q5_1: "quant-Q5_1.gguf", None;
    q2_k: "quant-Q2_K.gguf", None;
    q3_k_s: "quant-Q3_K_S.gguf", None;
    q3_k_m: "quant-Q3_K_M.gguf", None;
    q3_k_l: "quant-Q3_K_L.gguf", None;
    q4_k_s: "quant-Q4_K_S.gguf", None;
    q4_k_m: "quant-Q4_K_M.gguf", None;
    q5_k_s: "quant-Q5_K_S.gguf", None;
    q5_k_m: "quant-Q5_K_M.gguf", None;
    q6_k: "quant-Q6_K.gguf", None;
    iq4_nl: "quant-IQ4_NL.gguf", None;
    iq4_xs: "quant-IQ4_XS.gguf", None;
    tq1_0: "quant-TQ1_0.gguf", None;
    tq2_0: "quant-TQ2_0.gguf", None;
    mxfp4_moe: "quant-MXFP4_MOE.gguf", None;
    q4_k_m_pure: "quant-Q4_K_M-pure.gguf", None;
    q4_k_s_overrides: "quant-Q4_K_S-overrides.gguf", None;
    q4_0_imatrix: "quant-Q4_0-imatrix.gguf", Gguf;
    q2_k_imatrix: "quant-Q2_K-imatrix.gguf", Gguf;
    q2_k_s_imatrix: "quant-Q2_K_S-imatrix.gguf", Gguf;
    q3_k_s_imatrix: "quant-Q3_K_S-imatrix.gguf", Gguf;
    q4_k_m_imatrix: "quant-Q4_K_M-imatrix.gguf", Gguf;
    q5_k_s_imatrix: "quant-Q5_K_S-imatrix.gguf", Gguf;
    q6_k_imatrix: "quant-Q6_K-imatrix.gguf", Gguf;
    iq4_nl_imatrix: "quant-IQ4_NL-imatrix.gguf", Gguf;
    iq4_xs_imatrix: "quant-IQ4_XS-imatrix.gguf", Gguf;
    iq3_xxs_imatrix: "quant-IQ3_XXS-imatrix.gguf", Gguf;
    iq3_s_imatrix: "quant-IQ3_S-imatrix.gguf", Gguf;
    iq3_m_imatrix: "quant-IQ3_M-imatrix.gguf", Gguf;
    iq2_xxs_imatrix: "quant-IQ2_XXS-imatrix.gguf", Gguf;
    iq2_xs_imatrix: "quant-IQ2_XS-imatrix.gguf", Gguf;
    iq2_s_imatrix: "quant-IQ2_S-imatrix.gguf", Gguf;
    iq2_m_imatrix: "quant-IQ2_M-imatrix.gguf", Gguf;
    iq1_s_imatrix: "quant-IQ1_S-imatrix.gguf", Gguf;
    iq1_m_imatrix: "quant-IQ1_M-imatrix.gguf", Gguf;
    q4_0_imatrix_dat: "quant-Q4_0-imatrix.gguf", Dat;
    q2_k_s_imatrix_dat: "quant-Q2_K_S-imatrix.gguf", Dat;
    q4_k_m_imatrix_dat: "quant-Q4_K_M-imatrix.gguf", Dat;
    q6_k_imatrix_dat: "quant-Q6_K-imatrix.gguf", Dat;
    iq4_xs_imatrix_dat: "quant-IQ4_XS-imatrix.gguf", Dat;
    iq3_xxs_imatrix_dat: "quant-IQ3_XXS-imatrix.gguf", Dat;
    iq2_xs_imatrix_dat: "quant-IQ2_XS-imatrix.gguf", Dat;
    iq1_m_imatrix_dat: "quant-IQ1_M-imatrix.gguf", Dat;
}

#[test]
fn every_golden_quant_file_has_a_test() {
    let golden = golden("tiny-llama");
    let source = std::fs::read_to_string(repo().join("tests/presets.rs")).expect("this file");
    for file in golden.as_object().expect("golden").keys() {
        if file.starts_with("quant-") {
            assert!(
                source.contains(&format!("\"{file}\"")),
                "no test for {file}"
            );
        }
    }
}

/// Requantizing a GGUF: from the BF16 file kiln makes (identical to convert_hf_to_gguf.py's), a
/// preset gives llama-quantize's whole output file, metadata and layout included.
#[test]
fn requantizing_a_gguf_reproduces_llama_quantize_files() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bf16 = dir.path().join("convert-bf16.gguf");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {bf16:?}\nprovenance = false\n[quantize]\ndefault = \"bf16\"\n[metadata]\nname = \"Tiny Llama\"\n",
        fixture("tiny-llama")
    );
    let recipe = Recipe::from_toml(&text, Path::new(".")).expect("recipe");
    run_recipe(&recipe);
    let golden = golden("tiny-llama");
    for preset in [
        "Q8_0", "Q4_0", "Q4_K_M", "Q5_K_S", "Q6_K", "IQ4_XS", "TQ2_0",
    ] {
        let out = dir.path().join(format!("{preset}.gguf"));
        let mut recipe = preset_recipe(preset, &bf16, &out);
        recipe.provenance = false;
        run_recipe(&recipe);
        let bytes = std::fs::read(&out).expect("output");
        assert_eq!(
            sha256_hex(&bytes),
            golden[format!("quant-{preset}.gguf")]["file_sha256"]
                .as_str()
                .expect("sha"),
            "{preset}: whole file"
        );
    }
}

#[test]
fn requantizing_a_quantized_gguf_needs_permission() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q8 = dir.path().join("q8.gguf");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {q8:?}\n[quantize]\ndefault = \"q8_0\"\n",
        fixture("tiny-llama")
    );
    let recipe = Recipe::from_toml(&text, Path::new(".")).expect("recipe");
    run_recipe(&recipe);
    let out = dir.path().join("q4.gguf");
    let mut recipe = preset_recipe("Q4_K_M", &q8, &out);
    match plan(&recipe, &access()) {
        Err(kiln_pipeline::PipelineError::RequantizeNotAllowed { from, .. }) => {
            assert_eq!(from, kiln_types::GgmlType::Q8_0)
        }
        other => panic!("expected a requantize refusal, got {other:?}"),
    }
    recipe.allow_requantize = true;
    let p = plan(&recipe, &access()).expect("plan with permission");
    assert!(
        p.tensors
            .iter()
            .any(|t| t.source_type == kiln_types::GgmlType::Q8_0
                && t.ty == kiln_types::GgmlType::Q4_K)
    );
    build(&p, &BuildOptions::default(), &()).expect("build");
    assert!(out.exists());
}

/// tiny-bert (hidden size 128, not a multiple of 256): the k-quant shape fallbacks. llama.cpp made
/// these goldens from its F16 conversion, so kiln requantizes that same GGUF.
#[test]
fn tiny_bert_fallbacks_match_llama_quantize() {
    let golden = golden("tiny-bert");
    let dir = tempfile::tempdir().expect("tempdir");
    for preset in ["Q4_K_M", "Q5_0", "Q8_0"] {
        let out = dir.path().join(format!("{preset}.gguf"));
        let mut recipe = preset_recipe(
            preset,
            &repo().join("fixtures/golden/tiny-bert-f16.gguf"),
            &out,
        );
        recipe.provenance = false;
        let p = plan(&recipe, &access()).expect("plan");
        let g = &golden[format!("quant-{preset}.gguf")];
        for t in g["tensors"].as_array().expect("tensors") {
            let name = t["name"].as_str().expect("name");
            let ours = p
                .tensors
                .iter()
                .find(|x| x.name == name)
                .expect("tensor planned");
            assert_eq!(
                ours.ty.name(),
                t["type"].as_str().expect("type"),
                "{preset}: {name} ({})",
                ours.decision
            );
        }
        if preset == "Q4_K_M" {
            assert!(p
                .tensors
                .iter()
                .any(|t| matches!(t.decision, kiln_pipeline::Decision::Fallback { .. })));
        }
        build(&p, &BuildOptions::default(), &()).expect("build");
        let bytes = std::fs::read(&out).expect("output");
        assert_eq!(
            sha256_hex(&bytes),
            g["file_sha256"].as_str().expect("sha"),
            "{preset}: whole file"
        );
    }
}

/// Types that cannot be made without importance data are refused up front, naming the tensor.
#[test]
fn imatrix_types_are_refused_without_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    for preset in ["IQ2_XS", "IQ1_S", "Q2_K_S", "IQ3_XXS"] {
        let recipe = preset_recipe(preset, &fixture("tiny-llama"), &dir.path().join("x.gguf"));
        match plan(&recipe, &access()) {
            Err(kiln_pipeline::PipelineError::ImatrixRequired {
                tensor,
                have_file: false,
                ..
            }) => {
                assert!(tensor.starts_with("blk."), "{preset}: {tensor}")
            }
            other => panic!("{preset}: expected ImatrixRequired, got {other:?}"),
        }
    }
    // IQ3_S never needs one (llama.cpp accepts it without an imatrix).
    let recipe = preset_recipe("IQ3_S", &fixture("tiny-llama"), &dir.path().join("x.gguf"));
    assert!(plan(&recipe, &access()).is_ok());
}

/// Every recipe shipped in `recipes/` and `recipes/examples/` is valid (the schema is strict, so a
/// renamed key would otherwise go unnoticed until someone runs the example).
#[test]
fn every_shipped_recipe_is_valid() {
    let mut checked = 0;
    for dir in ["recipes", "recipes/examples"] {
        let mut paths: Vec<PathBuf> = std::fs::read_dir(repo().join(dir))
            .expect("recipes folder")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|x| x == "toml"))
            .collect();
        paths.sort();
        for path in paths {
            Recipe::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            checked += 1;
        }
    }
    assert!(checked >= 6, "{checked} recipes");
}
