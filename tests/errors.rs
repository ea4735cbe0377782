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
        PipelineError::Arch {
            source: kiln_arch::ArchError::UnsupportedArchitecture(..),
            ..
        }
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
