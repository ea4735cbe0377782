//! Reproducible, verifiable artifacts: manifests, `kiln verify`, determinism across threads,
//! working directories and input paths, and interrupted builds.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use kiln_pipeline::verify::{verify, VerifyFailure};

fn kiln() -> Command {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
}

/// Builds tiny-llama to `out` with `kiln convert`, from `cwd`, reading `input` as given.
fn convert(cwd: &Path, input: &Path, out: &Path, ty: &str, threads: usize) {
    let status = kiln()
        .current_dir(cwd)
        .args([
            "convert",
            "--quiet",
            "--type",
            ty,
            "--threads",
            &threads.to_string(),
        ])
        .arg(input)
        .arg(out)
        .status()
        .expect("run kiln");
    assert!(status.success());
}

fn q8_artifact() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.gguf");
    convert(dir.path(), &fixture("tiny-llama"), &out, "q8_0", 2);
    (dir, out)
}

fn manifest(out: &Path) -> serde_json::Value {
    let path = PathBuf::from(format!("{}.kiln.json", out.display()));
    serde_json::from_slice(&std::fs::read(path).expect("manifest")).expect("JSON")
}

#[test]
fn verify_passes_on_a_fresh_artifact() {
    let (_dir, out) = q8_artifact();
    let report = verify(&out, None, &access()).expect("verify");
    assert!(report.ok, "{:?}", report.failures);
    assert_eq!(report.tensors, 57);
    let status = kiln()
        .arg("verify")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success());
}

#[test]
fn verify_names_the_tensor_of_a_flipped_byte() {
    let (_dir, out) = q8_artifact();
    let m = manifest(&out);
    let tensor = &m["tensors"][20];
    let (name, start, len) = (
        tensor["name"].as_str().expect("name").to_string(),
        tensor["offset"].as_u64().expect("offset"),
        tensor["bytes"].as_u64().expect("bytes"),
    );
    let mut bytes = std::fs::read(&out).expect("read");
    bytes[(start + len / 2) as usize] ^= 0x40;
    std::fs::write(&out, bytes).expect("write");
    let report = verify(&out, None, &access()).expect("verify");
    assert!(!report.ok);
    match &report.failures[0] {
        VerifyFailure::TensorMismatch {
            tensor,
            start: s,
            end,
            ..
        } => {
            assert_eq!(
                (tensor.as_str(), *s, *end),
                (name.as_str(), start, start + len)
            );
        }
        other => panic!("expected the tensor first, got {other:?}"),
    }
    let status = kiln()
        .arg("verify")
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert_eq!(status.code(), Some(5));
}

#[test]
fn verify_detects_truncation() {
    let (_dir, out) = q8_artifact();
    let len = std::fs::metadata(&out).expect("meta").len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .and_then(|f| f.set_len(len - 100_000))
        .expect("truncate");
    let report = verify(&out, None, &access()).expect("verify");
    assert!(
        matches!(report.failures[0], VerifyFailure::SizeMismatch { expected, actual, .. } if expected == len && actual == len - 100_000)
    );
    assert!(report
        .failures
        .iter()
        .any(|f| matches!(f, VerifyFailure::TensorMismatch { actual, .. } if actual == "missing")));
}

#[test]
fn verify_detects_a_metadata_edit() {
    let (_dir, out) = q8_artifact();
    let mut bytes = std::fs::read(&out).expect("read");
    // Change one letter of the architecture string, keeping every length.
    let at = bytes
        .windows(5)
        .position(|w| w == b"llama")
        .expect("architecture value");
    bytes[at] = b'L';
    std::fs::write(&out, bytes).expect("write");
    let report = verify(&out, None, &access()).expect("verify");
    assert!(
        report
            .failures
            .iter()
            .any(|f| matches!(f, VerifyFailure::HeaderMismatch { .. })),
        "{:?}",
        report.failures
    );
    assert!(report
        .failures
        .iter()
        .all(|f| !matches!(f, VerifyFailure::TensorMismatch { .. })));
}

#[test]
fn rebuild_reproduces_the_artifact() {
    let (_dir, out) = q8_artifact();
    let status = kiln()
        .args(["verify", "--rebuild", "--input"])
        .arg(fixture("tiny-llama"))
        .arg(&out)
        .stdout(Stdio::null())
        .status()
        .expect("run");
    assert!(status.success());
}

/// Same recipe and inputs: same artifact and manifest bytes, with 1, 2 and 8 threads, from two
/// working directories, reading the input through a relative and an absolute path.
#[test]
fn artifacts_and_manifests_do_not_depend_on_threads_paths_or_directories() {
    let (_keep, copy) = copy_fixture("tiny-llama");
    let a = tempfile::tempdir().expect("tempdir");
    let b = tempfile::tempdir().expect("tempdir");
    let mut runs = Vec::new();
    for (cwd, input, threads) in [
        (a.path().to_path_buf(), fixture("tiny-llama"), 1),
        (b.path().to_path_buf(), copy.clone(), 2),
        (
            copy.parent().expect("parent").to_path_buf(),
            PathBuf::from("tiny-llama"),
            8,
        ),
    ] {
        let out_dir = tempfile::tempdir().expect("tempdir");
        let out = out_dir.path().join("model.gguf");
        convert(&cwd, &input, &out, "q4_k_m", threads);
        let artifact = std::fs::read(&out).expect("artifact");
        let manifest = std::fs::read(format!("{}.kiln.json", out.display())).expect("manifest");
        runs.push((artifact, manifest));
        drop(out_dir);
    }
    for (i, (artifact, manifest)) in runs.iter().enumerate().skip(1) {
        assert!(artifact == &runs[0].0, "artifact {i} differs");
        assert!(manifest == &runs[0].1, "manifest {i} differs");
    }
    let text = String::from_utf8(runs[0].1.clone()).expect("utf-8");
    assert!(
        !text.contains("/tmp") && !text.contains(&std::env::temp_dir().display().to_string()),
        "a path leaked into the manifest"
    );
}

/// A build killed at any point leaves nothing that looks finished; the next build succeeds.
#[test]
fn killed_builds_leave_no_finished_looking_artifact() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("model.gguf");
    let manifest = PathBuf::from(format!("{}.kiln.json", out.display()));
    for delay_ms in [50u64, 400, 1500] {
        let mut child = kiln()
            .args([
                "convert",
                "--quiet",
                "--threads",
                "1",
                "--type",
                "iq2_xs",
                "--imatrix",
            ])
            .arg(repo().join("fixtures/golden/tiny-llama-imatrix.gguf"))
            .arg(fixture("tiny-llama"))
            .arg(&out)
            .spawn()
            .expect("spawn");
        std::thread::sleep(Duration::from_millis(delay_ms));
        child.kill().expect("SIGKILL");
        let _ = child.wait();
        if out.exists() {
            // The build finished before the kill: then it must be complete and verifiable.
            let report = verify(&out, None, &access()).expect("verify");
            assert!(
                report.ok,
                "a finished-looking artifact after a kill at {delay_ms} ms: {:?}",
                report.failures
            );
        } else {
            assert!(
                !manifest.exists(),
                "a manifest without its artifact after {delay_ms} ms"
            );
        }
        // Whatever else is there must be hidden temporary files.
        for entry in std::fs::read_dir(dir.path()).expect("dir") {
            let name = entry
                .expect("entry")
                .file_name()
                .to_string_lossy()
                .into_owned();
            assert!(
                name == "model.gguf"
                    || name == "model.gguf.kiln.json"
                    || (name.starts_with('.') && name.ends_with(".kiln-tmp")),
                "unexpected {name} after a kill at {delay_ms} ms"
            );
        }
    }
    convert(dir.path(), &fixture("tiny-llama"), &out, "q8_0", 2);
    assert!(verify(&out, None, &access()).expect("verify").ok);
}

fn build_with(
    recipe: kiln_pipeline::Recipe,
    shard: Option<(usize, usize)>,
) -> kiln_pipeline::Report {
    let plan = kiln_pipeline::plan(&recipe, &access()).expect("plan");
    let options = kiln_pipeline::BuildOptions {
        shard,
        ..Default::default()
    };
    kiln_pipeline::build(&plan, &options, &()).expect("build")
}

fn preset(
    name: &str,
    input: &Path,
    output: &Path,
    split: Option<usize>,
    provenance: bool,
) -> kiln_pipeline::Recipe {
    let mut r = preset_recipe(name, input, output);
    if let Some(n) = split {
        r = r.with_overrides(&kiln_pipeline::Overrides {
            split_max_tensors: Some(n),
            ..Default::default()
        });
    }
    r.provenance = provenance;
    r
}

/// kiln's BF16 conversion of the fixture, identical to convert_hf_to_gguf.py's (the input of
/// llama.cpp's goldens), optionally split.
fn bf16_gguf(dir: &Path, split: Option<usize>) -> PathBuf {
    let out = dir.join("bf16.gguf");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nprovenance = false\n{}[quantize]\ndefault = \"bf16\"\n[metadata]\nname = \"Tiny Llama\"\n",
        fixture("tiny-llama"),
        split.map(|n| format!("split-max-tensors = {n}\n")).unwrap_or_default()
    );
    let recipe = kiln_pipeline::Recipe::from_toml(&text, Path::new(".")).expect("recipe");
    let report = build_with(recipe, None);
    report.files[0].path.clone()
}

#[test]
fn split_output_is_byte_identical_to_gguf_split() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bf16 = bf16_gguf(dir.path(), None);
    let report = build_with(
        preset(
            "Q4_K_M",
            &bf16,
            &dir.path().join("split-Q4_K_M.gguf"),
            Some(20),
            false,
        ),
        None,
    );
    let golden = golden("tiny-llama");
    assert_eq!(report.files.len(), 3);
    for (i, f) in report.files.iter().enumerate() {
        let name = format!("split-Q4_K_M-0000{}-of-00003.gguf", i + 1);
        assert_eq!(
            f.path.file_name().and_then(|n| n.to_str()),
            Some(name.as_str())
        );
        let bytes = std::fs::read(&f.path).expect("shard");
        assert_eq!(
            sha256_hex(&bytes),
            golden[&name]["file_sha256"].as_str().expect("sha"),
            "{name}"
        );
    }
}

#[test]
fn split_checkpoint_build_has_golden_tensors_and_split_keys_and_verifies() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = build_with(
        preset(
            "Q4_K_M",
            &fixture("tiny-llama"),
            &dir.path().join("model.gguf"),
            Some(20),
            true,
        ),
        None,
    );
    let golden = golden("tiny-llama");
    let mut expected = std::collections::BTreeMap::new();
    for i in 1..=3 {
        for t in golden[format!("split-Q4_K_M-0000{i}-of-00003.gguf")]["tensors"]
            .as_array()
            .expect("tensors")
        {
            expected.insert(
                t["name"].as_str().expect("name").to_string(),
                t["sha256"].as_str().expect("sha").to_string(),
            );
        }
    }
    let mut seen = 0;
    for (i, f) in report.files.iter().enumerate() {
        let bytes = std::fs::read(&f.path).expect("shard");
        let file = kiln_reader::gguf::GgufFile::parse(&bytes).expect("parse");
        let g = &golden[format!("split-Q4_K_M-0000{}-of-00003.gguf", i + 1)]["metadata"];
        for key in ["split.no", "split.count", "split.tensors.count"] {
            assert!(
                meta_matches(file.get(key).expect(key), &g[key]),
                "shard {i}: {key}"
            );
        }
        for (j, t) in file.tensors.iter().enumerate() {
            assert_eq!(
                sha256_hex(file.tensor_data(j).expect("data")),
                expected[&t.name],
                "{}",
                t.name
            );
            seen += 1;
        }
    }
    assert_eq!(seen, 57);
    let manifest = report.manifest.expect("manifest");
    assert_eq!(
        manifest.file_name().and_then(|n| n.to_str()),
        Some("model.kiln.json")
    );
    for f in &report.files {
        let v = verify(&f.path, None, &access()).expect("verify");
        assert!(v.ok && v.files == 3, "{:?}", v.failures);
    }
}

#[test]
fn shard_builds_equal_the_single_build_and_their_manifests_merge() {
    let full_dir = tempfile::tempdir().expect("tempdir");
    let full = build_with(
        preset(
            "Q4_K_M",
            &fixture("tiny-llama"),
            &full_dir.path().join("model.gguf"),
            Some(20),
            true,
        ),
        None,
    );
    let mut manifests = Vec::new();
    let dirs: Vec<tempfile::TempDir> = (0..3)
        .map(|_| tempfile::tempdir().expect("tempdir"))
        .collect();
    for (i, dir) in dirs.iter().enumerate().rev() {
        let one = build_with(
            preset(
                "Q4_K_M",
                &fixture("tiny-llama"),
                &dir.path().join("model.gguf"),
                Some(20),
                true,
            ),
            Some((i + 1, 3)),
        );
        assert_eq!(one.files.len(), 1);
        let ours = std::fs::read(&one.files[0].path).expect("shard");
        assert!(
            ours == std::fs::read(&full.files[i].path).expect("full shard"),
            "shard {} differs",
            i + 1
        );
        manifests.push(one.manifest.expect("shard manifest"));
    }
    let merged = kiln_pipeline::verify::merge_manifests(&manifests).expect("merge");
    let single = std::fs::read_to_string(full.manifest.expect("manifest")).expect("read");
    assert_eq!(
        merged.to_json(),
        single,
        "merged manifest differs from the single build's"
    );
    let wrong = kiln_pipeline::plan(
        &preset(
            "Q4_K_M",
            &fixture("tiny-llama"),
            &dirs[0].path().join("x.gguf"),
            Some(20),
            true,
        ),
        &access(),
    )
    .and_then(|p| {
        kiln_pipeline::build(
            &p,
            &kiln_pipeline::BuildOptions {
                shard: Some((1, 4)),
                ..Default::default()
            },
            &(),
        )
    });
    assert!(matches!(
        wrong,
        Err(kiln_pipeline::PipelineError::BadShard { .. })
    ));
}

#[test]
fn split_inputs_are_read_as_one_model() {
    let dir = tempfile::tempdir().expect("tempdir");
    let first = bf16_gguf(dir.path(), Some(20));
    assert!(first
        .to_string_lossy()
        .ends_with("bf16-00001-of-00003.gguf"));
    let out = dir.path().join("q4.gguf");
    let report = build_with(preset("Q4_K_M", &first, &out, None, false), None);
    let golden = golden("tiny-llama");
    let bytes = std::fs::read(&report.files[0].path).expect("output");
    assert_eq!(
        sha256_hex(&bytes),
        golden["quant-Q4_K_M.gguf"]["file_sha256"]
            .as_str()
            .expect("sha")
    );
}
