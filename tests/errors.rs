//! Bad input: each failure is a distinct typed error naming the file and tensor, the binary exits
//! non-zero, and no output file (nor a temporary one) is left behind.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use kiln_pipeline::{build, plan, BuildOptions, Overrides, PipelineError, Recipe, TypeChoice};
use kiln_reader::safetensors::SafetensorsError;
use kiln_reader::ReadError;
use kiln_recipe::RecipeError;
use kiln_types::GgmlType;

const SHARD_2: &str = "model-00002-of-00002.safetensors";

fn q8_recipe(input: &Path, output: &Path) -> Recipe {
    Recipe::plain(TypeChoice::Type(GgmlType::Q8_0)).with_overrides(&Overrides {
        input: Some(input.to_path_buf()),
        output: Some(output.to_path_buf()),
        ..Overrides::default()
    })
}

fn run_library(input: &Path, output: &Path) -> PipelineError {
    let recipe = q8_recipe(input, output);
    let result = plan(&recipe, &access()).and_then(|p| build(&p, &BuildOptions::default(), &()));
    result.expect_err("conversion of a damaged checkpoint must fail")
}

/// Runs `kiln convert`, returning the exit code; asserts nothing was written next to `output`.
fn run_binary(input: &Path, output: &Path) -> i32 {
    let status = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["convert", "--type", "q8_0", "--quiet"])
        .arg(input)
        .arg(output)
        .status()
        .expect("run kiln");
    assert_no_output(output);
    status.code().expect("exit code")
}

fn assert_no_output(output: &Path) {
    assert!(
        !output.exists(),
        "{} exists after a failed run",
        output.display()
    );
    let dir = output.parent().expect("parent");
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("out dir")
        .map(|e| e.expect("entry").path())
        .collect();
    assert!(leftovers.is_empty(), "left behind: {leftovers:?}");
}

fn out_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.gguf");
    (dir, out)
}

#[test]
fn truncated_shard() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    let shard = ckpt.join(SHARD_2);
    let len = std::fs::metadata(&shard).expect("shard").len();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .expect("open");
    f.set_len(len - 1000).expect("truncate");
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::Read(ReadError::Safetensors {
            path,
            source: SafetensorsError::Truncated { tensor, .. },
        }) => {
            assert_eq!(path, shard);
            // The last tensor of the shard by offset is the one cut short.
            assert!(tensor.starts_with("model."), "{tensor}");
        }
        other => panic!("expected a truncation error, got {other:?}"),
    }
    assert_no_output(&out);
    assert_eq!(run_binary(&ckpt, &out), 3);
}

#[test]
fn missing_shard() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    std::fs::remove_file(ckpt.join(SHARD_2)).expect("remove");
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::Read(ReadError::MissingShard { shard, tensor, .. }) => {
            assert_eq!(shard, SHARD_2);
            assert!(!tensor.is_empty());
        }
        other => panic!("expected a missing-shard error, got {other:?}"),
    }
    assert_eq!(run_binary(&ckpt, &out), 3);
}

/// Rewrites one tensor's shape in a shard header, keeping its byte range.
fn corrupt_shape(shard: &Path, tensor: &str, shape: &[u64]) {
    let bytes = std::fs::read(shard).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("len")) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    header[tensor]["shape"] = serde_json::json!(shape);
    let mut text = serde_json::to_string(&header).expect("json");
    while (text.len() + 8) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(&bytes[8 + n..]);
    std::fs::write(shard, out).expect("write");
}

#[test]
fn shape_and_byte_size_disagree() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    let shard = ckpt.join(SHARD_2);
    corrupt_shape(&shard, "model.norm.weight", &[255]);
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::Read(ReadError::Safetensors {
            path,
            source:
                SafetensorsError::ShapeMismatch {
                    tensor,
                    expected,
                    declared,
                    ..
                },
        }) => {
            assert_eq!(path, shard);
            assert_eq!(tensor, "model.norm.weight");
            assert_eq!((expected, declared), (510, 512));
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert_eq!(run_binary(&ckpt, &out), 3);
}

#[test]
fn recipe_with_unknown_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let recipe = dir.path().join("bad.toml");
    let out = dir.path().join("out").join("x.gguf");
    std::fs::create_dir(out.parent().expect("parent")).expect("mkdir");
    std::fs::write(
        &recipe,
        format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {:?}\n[quantize]\ndefault = \"q8_0\"\ndefualt-type = \"f16\"\n",
            fixture("tiny-llama"),
            out
        ),
    )
    .expect("write recipe");
    match Recipe::load(&recipe) {
        Err(RecipeError::UnknownKey { key, line, .. }) => {
            assert_eq!(key, "defualt-type");
            assert_eq!(line, Some(8));
        }
        other => panic!("expected an unknown-key error, got {other:?}"),
    }
    let status = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["build", "--quiet"])
        .arg(&recipe)
        .status()
        .expect("run kiln");
    assert_eq!(status.code(), Some(2));
    assert_no_output(&out);
}

#[test]
fn unsupported_architecture_and_dtype() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    let config = ckpt.join("config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    std::fs::write(&config, text.replace("LlamaForCausalLM", "FooForCausalLM")).expect("write");
    let (_o, out) = out_dir();
    assert!(matches!(
        run_library(&ckpt, &out),
        PipelineError::NotUnderstood { report, .. }
            if report.family.is_none()
                && report.architecture.as_deref() == Some("FooForCausalLM")
                && report.closest_family == Some(("llama".into(), 57))
                && report.unmapped_tensors.is_empty()
    ));
    assert_eq!(run_binary(&ckpt, &out), 3);
}

#[test]
fn existing_output_survives_a_failed_run() {
    let (_keep, ckpt) = copy_fixture("tiny-llama");
    std::fs::remove_file(ckpt.join(SHARD_2)).expect("remove");
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("out.gguf");
    std::fs::write(&out, b"previous release").expect("write");
    let status = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["convert", "--quiet"])
        .arg(&ckpt)
        .arg(&out)
        .status()
        .expect("run kiln");
    assert_ne!(status.code(), Some(0));
    assert_eq!(
        std::fs::read(&out).expect("still there"),
        b"previous release"
    );
}

/// Appends a zero-filled BF16 tensor to a single-file safetensors checkpoint.
fn add_tensor(file: &Path, name: &str, shape: &[u64]) {
    let bytes = std::fs::read(file).expect("read");
    let n = u64::from_le_bytes(bytes[..8].try_into().expect("8 bytes")) as usize;
    let mut header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&bytes[8..8 + n]).expect("header");
    let data = &bytes[8 + n..];
    let len = shape.iter().product::<u64>() * 2;
    header.insert(
        name.into(),
        serde_json::json!({"dtype": "BF16", "shape": shape, "data_offsets": [data.len() as u64, data.len() as u64 + len]}),
    );
    let mut text = serde_json::to_string(&header).expect("json");
    while (8 + text.len()) % 8 != 0 {
        text.push(' ');
    }
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out.extend_from_slice(data);
    out.resize(out.len() + len as usize, 0);
    std::fs::write(file, out).expect("write");
}

/// A tensor the family does not know stops the build before anything is written, with a report
/// that names it (and says everything else was understood).
#[test]
fn extra_unknown_tensor_is_reported() {
    let (_keep, ckpt) = copy_fixture("tiny-qwen2");
    let extra = "model.layers.1.mlp.mystery_proj.weight";
    add_tensor(&ckpt.join("model.safetensors"), extra, &[64, 64]);
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::NotUnderstood { report, .. } => {
            assert_eq!(report.family.as_deref(), Some("qwen2"));
            assert_eq!(report.unmapped_tensors, [extra]);
            assert!(report.unknown_config_keys.is_empty());
            assert_eq!(report.tokenizer.pre.as_deref(), Some("smollm"));
            assert_eq!(report.tensors, 27);
        }
        other => panic!("expected a not-understood report, got {other:?}"),
    }
    let output = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["convert", "--type", "q8_0", "--quiet"])
        .arg(&ckpt)
        .arg(&out)
        .output()
        .expect("run kiln");
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains(extra), "{stderr}");
    assert!(stderr.contains("tensors not understood (1)"), "{stderr}");
    assert_no_output(&out);
}

/// An architecture kiln does not know: the report names it, the closest family, and the config
/// keys nothing reads; `kiln inspect` shows the same without failing.
#[test]
fn unknown_architecture_report_names_config_keys() {
    let (_keep, ckpt) = copy_fixture("tiny-qwen2");
    let config = ckpt.join("config.json");
    let text = std::fs::read_to_string(&config).expect("config");
    let text = text
        .replace("Qwen2ForCausalLM", "NovelForCausalLM")
        .replace(
            "\"model_type\": \"qwen2\"",
            "\"model_type\": \"novel\", \"novel_gate_scale\": 2.0",
        );
    std::fs::write(&config, text).expect("write");
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::NotUnderstood { report, .. } => {
            assert_eq!(report.family, None);
            assert_eq!(report.architecture.as_deref(), Some("NovelForCausalLM"));
            assert_eq!(report.unknown_config_keys, ["novel_gate_scale"]);
            assert!(report.closest_family.is_some());
        }
        other => panic!("expected a not-understood report, got {other:?}"),
    }
    assert_eq!(run_binary(&ckpt, &out), 3);
    let inspect = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("inspect")
        .arg(&ckpt)
        .output()
        .expect("run kiln");
    assert!(inspect.status.success());
    let text = String::from_utf8_lossy(&inspect.stdout);
    assert!(text.contains("NovelForCausalLM"), "{text}");
    assert!(text.contains("novel_gate_scale"), "{text}");
    assert!(text.contains("cannot convert"), "{text}");
}

/// A BPE tokenizer llama.cpp's table does not know is refused with the digest and what to do;
/// naming the pre-tokenizer in the recipe lets the build go ahead with that name.
#[test]
fn unknown_pre_tokenizer_is_refused_unless_the_recipe_names_it() {
    let (_keep, ckpt) = copy_fixture("tiny-qwen2");
    let path = ckpt.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).expect("tokenizer.json")).expect("json");
    // Without its first merge ("Ġ t") the tokenizer splits " there" and " tea" differently: a
    // different tokenizer, so an unknown fingerprint.
    let merges = tokenizer["model"]["merges"].as_array_mut().expect("merges");
    assert_eq!(merges[0], serde_json::json!(["Ġ", "t"]));
    merges.remove(0);
    std::fs::write(&path, serde_json::to_vec(&tokenizer).expect("json")).expect("write");
    let (_o, out) = out_dir();
    match run_library(&ckpt, &out) {
        PipelineError::Arch {
            source: kiln_arch::ArchError::UnknownPreTokenizer { hash },
            ..
        } => {
            assert_eq!(hash.len(), 64);
            let message = kiln_arch::ArchError::UnknownPreTokenizer { hash }.to_string();
            assert!(message.contains("tokenizer.ggml.pre"), "{message}");
        }
        other => panic!("expected an unknown pre-tokenizer, got {other:?}"),
    }
    assert_eq!(run_binary(&ckpt, &out), 3);

    let text = format!(
        "kiln = 1\n[input]\npath = {ckpt:?}\n[output]\npath = {out:?}\nprovenance = false\n[quantize]\ndefault = \"f16\"\n[metadata.extra]\n\"tokenizer.ggml.pre\" = \"smollm\"\n"
    );
    let recipe = Recipe::from_toml(&text, Path::new(".")).expect("recipe");
    run_recipe(&recipe);
    let bytes = std::fs::read(&out).expect("output");
    let file = kiln_reader::gguf::GgufFile::parse(&bytes).expect("parses");
    let pre: Vec<_> = file
        .metadata
        .iter()
        .filter(|(k, _)| k == "tokenizer.ggml.pre")
        .collect();
    assert_eq!(pre.len(), 1, "written once");
    assert_eq!(pre[0].1, kiln_types::MetaValue::String("smollm".into()));
}
