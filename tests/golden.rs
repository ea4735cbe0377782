//! kiln against llama.cpp: the fixture checkpoint converted to each type must match
//! `convert_hf_to_gguf.py`'s output tensor for tensor, key for key, and (with the recipe setting
//! `general.name` as the converter derived it) byte for byte as a whole file.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::*;
use kiln_pipeline::{build, plan, BuildOptions, Recipe};
use kiln_reader::gguf::GgufFile;

fn recipe(ty: &str, input: &Path, output: &Path) -> Recipe {
    let text = format!(
        "kiln = 1\n[input]\npath = {input:?}\n[output]\npath = {output:?}\nprovenance = false\n[quantize]\ndefault = \"{ty}\"\n[metadata]\nname = \"Tiny Llama\"\n"
    );
    Recipe::from_toml(&text, Path::new(".")).expect("recipe")
}

fn convert(ty: &str, threads: usize, chunk_bytes: usize) -> (tempfile::TempDir, Vec<u8>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join(format!("tiny-llama-{ty}.gguf"));
    let recipe = recipe(ty, &fixture("tiny-llama"), &out);
    let plan = plan(&recipe, &access()).expect("plan");
    let options = BuildOptions {
        threads: Some(threads),
        chunk_bytes,
        shard: None,
    };
    build(&plan, &options, &()).expect("build");
    let bytes = std::fs::read(&out).expect("output");
    (dir, bytes)
}

fn check_against_golden(ty: &str) {
    let golden = golden("tiny-llama");
    let g = &golden[format!("convert-{ty}.gguf")];
    let (_dir, bytes) = convert(ty, 2, 4 << 20);
    let file = GgufFile::parse(&bytes).expect("kiln output parses");

    // Tensors: same set of names; per tensor the same type, shape and data bytes.
    let ours: BTreeMap<&str, usize> = file
        .tensors
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.as_str(), i))
        .collect();
    let gt = g["tensors"].as_array().expect("tensors");
    assert_eq!(ours.len(), gt.len(), "{ty}: tensor count");
    for t in gt {
        let name = t["name"].as_str().expect("name");
        let &i = ours
            .get(name)
            .unwrap_or_else(|| panic!("{ty}: missing tensor {name}"));
        let info = &file.tensors[i];
        assert_eq!(
            info.ty.name(),
            t["type"].as_str().expect("type"),
            "{ty}: {name} type"
        );
        let shape: Vec<u64> = t["shape"]
            .as_array()
            .expect("shape")
            .iter()
            .map(|d| d.as_u64().expect("dim"))
            .collect();
        assert_eq!(info.ne, shape, "{ty}: {name} shape");
        let data = file.tensor_data(i).expect("data");
        assert_eq!(
            sha256_hex(data),
            t["sha256"].as_str().expect("sha"),
            "{ty}: {name} data bytes"
        );
    }

    // Metadata: every golden key present with an equal value.
    for (key, value) in g["metadata"].as_object().expect("metadata") {
        let ours = file
            .get(key)
            .unwrap_or_else(|| panic!("{ty}: missing key {key}"));
        assert!(
            meta_matches(ours, value),
            "{ty}: {key} = {ours} vs golden {value}"
        );
    }

    // And the strongest form: the very same file.
    assert_eq!(
        sha256_hex(&bytes),
        g["file_sha256"].as_str().expect("file sha"),
        "{ty}: whole-file bytes"
    );
}

#[test]
fn tiny_llama_f32_matches_llama_cpp() {
    check_against_golden("f32");
}

#[test]
fn tiny_llama_f16_matches_llama_cpp() {
    check_against_golden("f16");
}

#[test]
fn tiny_llama_bf16_matches_llama_cpp() {
    check_against_golden("bf16");
}

#[test]
fn tiny_llama_q8_0_matches_llama_cpp() {
    check_against_golden("q8_0");
}

#[test]
fn output_does_not_depend_on_threads_or_chunking() {
    let (_a, one) = convert("q8_0", 1, 4 << 20);
    let (_b, two) = convert("q8_0", 2, 4 << 20);
    // 1 KiB chunks split every tensor into many pieces processed out of order by the pool.
    let (_c, small) = convert("q8_0", 2, 1 << 10);
    let (_d, eight) = convert("q8_0", 8, 1 << 12);
    assert!(one == two, "1 vs 2 threads differ");
    assert!(one == small, "chunking changes bytes");
    assert!(one == eight, "8 threads differ");
}

#[test]
fn independent_reader_gguf_rs_sees_every_tensor_and_key() {
    let (dir, bytes) = convert("q8_0", 2, 4 << 20);
    let ours = GgufFile::parse(&bytes).expect("parse");
    let path = dir.path().join("tiny-llama-q8_0.gguf");
    let mut container =
        gguf_rs::get_gguf_container_array_size(path.to_str().expect("utf-8 path"), u64::MAX)
            .expect("gguf-rs opens the file");
    let model = container.decode().expect("gguf-rs decodes the file");
    assert_eq!(model.num_tensor(), ours.tensors.len() as u64);
    assert_eq!(model.data_offset(), ours.data_offset);
    let theirs: BTreeMap<&str, &gguf_rs::Tensor> = model
        .tensors()
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    for t in &ours.tensors {
        let other = theirs
            .get(t.name.as_str())
            .unwrap_or_else(|| panic!("gguf-rs lacks {}", t.name));
        assert_eq!(other.kind, t.ty.0, "{}", t.name);
        assert_eq!(other.shape, t.ne, "{}", t.name);
        assert_eq!(other.offset, t.offset, "{}", t.name);
        assert_eq!(Some(other.size), t.nbytes, "{}", t.name);
    }
    let metadata = model.metadata();
    for (key, value) in &ours.metadata {
        let other = metadata
            .get(key)
            .unwrap_or_else(|| panic!("gguf-rs lacks key {key}"));
        assert_eq!(other, &kiln_pipeline::meta_to_json(value), "{key}");
    }
}

#[test]
fn rayon_num_threads_is_honoured_and_cli_flag_wins() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("t.gguf");
    let run = |env: Option<&str>, flag: Option<&str>| -> serde_json::Value {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kiln"));
        cmd.args(["convert", "--type", "q8_0", "--json"])
            .arg(fixture("tiny-llama"))
            .arg(&out);
        if let Some(n) = env {
            cmd.env("RAYON_NUM_THREADS", n);
        }
        if let Some(n) = flag {
            cmd.args(["--threads", n]);
        }
        let output = cmd.output().expect("run kiln");
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        serde_json::from_slice(&output.stdout).expect("JSON report")
    };
    assert_eq!(run(Some("1"), None)["threads"], 1);
    assert_eq!(run(Some("1"), Some("3"))["threads"], 3);
    let a = run(Some("1"), None)["file_xxh3"].clone();
    let b = run(None, Some("2"))["file_xxh3"].clone();
    assert_eq!(a, b);
}

/// A Mistral-style config (older top-level `rope_theta`, no `head_dim`, `rope_scaling` null) over
/// the same weights: the tensors must be identical to the Llama golden, and the metadata derived
/// from the other config form.
#[test]
fn mistral_config_with_top_level_rope_theta() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    let path = ckpt.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("config")).expect("json");
    let obj = config.as_object_mut().expect("object");
    obj.insert(
        "architectures".into(),
        serde_json::json!(["MistralForCausalLM"]),
    );
    obj.insert("model_type".into(), serde_json::json!("mistral"));
    obj.remove("rope_parameters");
    obj.remove("head_dim");
    obj.remove("max_position_embeddings");
    obj.insert("rope_theta".into(), serde_json::json!(500000.0));
    obj.insert("rope_scaling".into(), serde_json::Value::Null);
    obj.insert("sliding_window".into(), serde_json::json!(4096));
    std::fs::write(&path, serde_json::to_vec_pretty(&config).expect("json")).expect("write");

    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("m.gguf");
    let plan = plan(&recipe("q8_0", &ckpt, &out), &access()).expect("plan");
    build(&plan, &BuildOptions::default(), &()).expect("build");
    let bytes = std::fs::read(&out).expect("output");
    let file = GgufFile::parse(&bytes).expect("parse");
    let get = |k: &str| file.get(k).unwrap_or_else(|| panic!("missing {k}")).clone();
    use kiln_types::MetaValue;
    assert_eq!(
        get("general.architecture"),
        MetaValue::String("llama".into())
    );
    assert_eq!(get("llama.rope.freq_base"), MetaValue::F32(500000.0));
    // MistralConfig derives head_dim and defaults max_position_embeddings to 4096 * 32.
    assert_eq!(get("llama.attention.key_length"), MetaValue::U32(64));
    assert_eq!(get("llama.context_length"), MetaValue::U32(131072));
    assert_eq!(get("llama.rope.dimension_count"), MetaValue::U32(64));

    let golden = golden("tiny-llama");
    for t in golden["convert-q8_0.gguf"]["tensors"]
        .as_array()
        .expect("tensors")
    {
        let i = file
            .tensor_index(t["name"].as_str().expect("name"))
            .expect("tensor");
        assert_eq!(
            sha256_hex(file.tensor_data(i).expect("data")),
            t["sha256"].as_str().expect("sha")
        );
    }
}

/// Mixtral: per-expert matrices stacked into 3-D `*_exps` tensors (at the converter's position),
/// the router kept F32, expert metadata, and the `4x1.1M` size label: every conversion golden is
/// reproduced as a whole file, and so is every llama-quantize golden made from its BF16 file.
/// Converts `fixture` to each of `converts` and requantizes the `base` conversion with each of
/// `presets` (as the golden files were made: llama-quantize from the converter's output); every
/// file must be byte-identical to llama.cpp's.
fn whole_files_match(
    fixture_name: &str,
    name: &str,
    converts: &[&str],
    base: &str,
    presets: &[&str],
) {
    let golden = golden(fixture_name);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut base_file = None;
    for ty in converts {
        let out = dir.path().join(format!("convert-{ty}.gguf"));
        let text = format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nprovenance = false\n[quantize]\ndefault = \"{ty}\"\n[metadata]\nname = \"{name}\"\n",
            fixture(fixture_name)
        );
        let recipe = Recipe::from_toml(&text, Path::new(".")).expect("recipe");
        run_recipe(&recipe);
        let bytes = std::fs::read(&out).expect("output");
        assert_eq!(
            sha256_hex(&bytes),
            golden[format!("convert-{ty}.gguf")]["file_sha256"]
                .as_str()
                .expect("sha"),
            "{fixture_name}: convert {ty}"
        );
        if *ty == base {
            base_file = Some(out);
        }
    }
    let base_file = base_file.expect("base conversion built");
    for preset in presets {
        let out = dir.path().join(format!("{preset}.gguf"));
        let mut recipe = preset_recipe(preset, &base_file, &out);
        recipe.provenance = false;
        run_recipe(&recipe);
        let bytes = std::fs::read(&out).expect("output");
        assert_eq!(
            sha256_hex(&bytes),
            golden[format!("quant-{preset}.gguf")]["file_sha256"]
                .as_str()
                .expect("sha"),
            "{fixture_name}: quant {preset}"
        );
    }
}

#[test]
fn tiny_mixtral_matches_llama_cpp() {
    whole_files_match(
        "tiny-mixtral",
        "Tiny Mixtral",
        &["f32", "f16", "bf16", "q8_0"],
        "bf16",
        &["Q4_K_M", "Q3_K_M", "Q8_0", "IQ4_XS"],
    );
}

/// Qwen2: attention biases, tied embeddings (no `output.weight`), and a byte-level BPE
/// tokenizer.json whose pre-tokenizer is identified as `smollm`.
#[test]
fn tiny_qwen2_matches_llama_cpp() {
    whole_files_match(
        "tiny-qwen2",
        "Tiny Qwen2",
        &["f32", "f16", "bf16", "q8_0"],
        "bf16",
        &["Q4_0", "Q4_K_M", "Q8_0"],
    );
}

/// BERT: WordPiece vocabulary in phantom-space form, token types, position embeddings, and
/// k-quant fallbacks (hidden size 128 is not a multiple of 256).
#[test]
fn tiny_bert_matches_llama_cpp() {
    whole_files_match(
        "tiny-bert",
        "Tiny Bert",
        &["f32", "f16", "q8_0"],
        "f16",
        &["Q8_0", "Q4_K_M", "Q5_0"],
    );
}

/// A layer missing one expert matrix is refused, naming the orphaned tensors.
#[test]
fn incomplete_experts_are_reported() {
    let (_keep, ckpt) = copy_fixture("tiny-mixtral");
    let path = ckpt.join("config.json");
    let text = std::fs::read_to_string(&path).expect("config");
    // Claim five experts where the checkpoint has four.
    std::fs::write(
        &path,
        text.replace("\"num_local_experts\": 4", "\"num_local_experts\": 5"),
    )
    .expect("write");
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = recipe("q8_0", &ckpt, &dir.path().join("x.gguf"));
    match plan(&recipe, &access()) {
        Err(kiln_pipeline::PipelineError::NotUnderstood { report, .. }) => {
            assert!(
                report
                    .unmapped_tensors
                    .iter()
                    .all(|n| n.contains("block_sparse_moe.experts.")),
                "{:?}",
                report.unmapped_tensors
            )
        }
        other => panic!("expected unmapped expert tensors, got {other:?}"),
    }
}
