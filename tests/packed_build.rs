//! Packed safetensors outputs built from recipes: a compressed-tensors or bitsandbytes folder
//! whose weights decode (with a decoder written here from the documented layouts) to exactly what
//! kiln's quantizers produced, with `quantization_config`, the tokenizer files, and nothing left
//! behind when a build fails. Also the calibration-aware builds on tiny-llama's captured
//! statistics: GPTQ and LSQ into packed folders, and GPTQ into GGUF block types.

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use common::*;
use kiln_pipeline::{build_packed, PipelineError, Recipe};
use kiln_quant::affine::{Granularity, QuantScheme};
use kiln_quant::estimators::Estimator;

fn recipe(text: &str) -> Recipe {
    Recipe::from_toml(text, Path::new(".")).expect("recipe")
}

fn w4_recipe(out: &Path, extra: &str) -> Recipe {
    recipe(&format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"compressed-tensors\"\n[quantize]\ndefault = \"keep\"\n{extra}\n[[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"int4\"\n",
        fixture("tiny-llama")
    ))
}

/// Reads a safetensors file into (name → (dtype, shape, bytes)).
fn tensors(path: &Path) -> std::collections::BTreeMap<String, (String, Vec<usize>, Vec<u8>)> {
    let bytes = std::fs::read(path).expect("read");
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("parses");
    st.tensors()
        .into_iter()
        .map(|(n, v)| {
            (
                n,
                (
                    format!("{:?}", v.dtype()),
                    v.shape().to_vec(),
                    v.data().to_vec(),
                ),
            )
        })
        .collect()
}

/// Statistics captured once per test run from the golden calibration text (30 chunks of 128
/// tokens), shared by the tests that need them.
fn tiny_llama_stats() -> &'static Path {
    static STATS: OnceLock<(tempfile::TempDir, PathBuf)> = OnceLock::new();
    let (_, path) = STATS.get_or_init(|| {
        let dir = tempfile::tempdir().expect("tempdir");
        let stats = dir.path().join("stats.safetensors");
        kiln_pipeline::calibrate::calibrate_to_file(
            &access(),
            &fixture("tiny-llama"),
            &repo().join("fixtures/calib/tiny-llama-calib.tokens"),
            &stats,
            &kiln_pipeline::calibrate::CalibrateOptions {
                chunks: Some(30),
                ..Default::default()
            },
        )
        .expect("capture");
        (dir, stats)
    });
    path
}

/// Runs the `kiln` binary.
fn kiln(args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .output()
        .expect("runs")
}

fn bf16_to_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(2)
        .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

#[test]
fn compressed_tensors_int4_decodes_to_the_quantizers_output() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("w4");
    let report = build_packed(&w4_recipe(&out, ""), &access(), Some(2)).expect("build");
    assert_eq!(report.format, "compressed-tensors");

    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "compressed-tensors");
    assert_eq!(q["format"], "pack-quantized");
    let weights = &q["config_groups"]["group_0"]["weights"];
    assert_eq!(weights["num_bits"], 4);
    assert_eq!(weights["group_size"], 128);
    assert_eq!(weights["symmetric"], true);
    for side in [
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert_eq!(
            std::fs::read(out.join(side)).expect("side file"),
            std::fs::read(fixture("tiny-llama").join(side)).expect("source"),
            "{side} copied"
        );
    }

    let written = tensors(&out.join("model.safetensors"));
    let source = {
        let mut all = tensors(&fixture("tiny-llama").join("model-00001-of-00002.safetensors"));
        all.extend(tensors(
            &fixture("tiny-llama").join("model-00002-of-00002.safetensors"),
        ));
        all
    };
    let scheme = QuantScheme {
        bits: 4,
        symmetric: true,
        granularity: Granularity::Group(128),
    };
    let mut packed = 0;
    for (name, (dtype, shape, bytes)) in &source {
        let Some(prefix) = name
            .strip_suffix(".weight")
            .filter(|_| name.contains("_proj."))
        else {
            assert_eq!(
                &written[name],
                &(dtype.clone(), shape.clone(), bytes.clone()),
                "{name} copied"
            );
            continue;
        };
        packed += 1;
        assert!(
            !written.contains_key(name),
            "{name} replaced by its packed form"
        );
        let (rows, cols) = (shape[0], shape[1]);
        // Independent decoding of the documented layout: int32 words, element i of a row at
        // bits 4·(i mod 8) of word i/8, stored as q + 8; one bf16 scale per 128 columns.
        let (pdt, pshape, pbytes) = &written[&format!("{prefix}.weight_packed")];
        assert_eq!(
            (pdt.as_str(), pshape.as_slice()),
            ("I32", &[rows, cols / 8][..])
        );
        let (sdt, sshape, sbytes) = &written[&format!("{prefix}.weight_scale")];
        assert_eq!(
            (sdt.as_str(), sshape.as_slice()),
            ("BF16", &[rows, cols / 128][..])
        );
        let (_, wshape, wbytes) = &written[&format!("{prefix}.weight_shape")];
        assert_eq!(wshape, &[2]);
        assert_eq!(wbytes[..8], (rows as i64).to_le_bytes());
        let scales = bf16_to_f32(sbytes);
        let words: Vec<u32> = pbytes
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let decoded: Vec<f32> = (0..rows * cols)
            .map(|i| {
                let (r, c) = (i / cols, i % cols);
                let word = words[r * (cols / 8) + c / 8];
                let q = ((word >> (4 * (c % 8))) & 0xf) as i32 - 8;
                q as f32 * scales[r * (cols / 128) + c / 128]
            })
            .collect();
        // What RTN min–max gives, with scales rounded to bf16 as stored.
        let w = bf16_to_f32(bytes);
        let mut expected =
            kiln_quant::methods::rtn(&w, rows, cols, &scheme, Estimator::MinMax).expect("rtn");
        for s in &mut expected.scales {
            *s = half::bf16::from_f32(*s).to_f32();
        }
        assert_eq!(decoded, expected.dequantize(), "{name}");
    }
    assert_eq!(packed, 42);
}

#[test]
fn bitsandbytes_nf4_with_double_quant() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nf4");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"bitsandbytes\"\n[quantize]\ndefault = \"keep\"\ndouble-quant = true\n[[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"nf4\"\n",
        fixture("tiny-llama")
    );
    build_packed(&recipe(&text), &access(), Some(1)).expect("build");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    let q = &config["quantization_config"];
    assert_eq!(q["quant_method"], "bitsandbytes");
    assert_eq!(q["bnb_4bit_quant_type"], "nf4");
    assert_eq!(q["bnb_4bit_use_double_quant"], true);
    let written = tensors(&out.join("model.safetensors"));
    let name = "model.layers.0.self_attn.q_proj.weight";
    let (dt, shape, packed) = &written[name];
    assert_eq!(
        (dt.as_str(), shape.as_slice()),
        ("U8", &[256 * 256 / 2, 1][..])
    );
    let state = &written[&format!("{name}.quant_state.bitsandbytes__nf4")].2;
    let state: serde_json::Value = serde_json::from_slice(state).expect("quant state json");
    assert_eq!(state["blocksize"], 64);
    assert_eq!(state["shape"], serde_json::json!([256, 256]));
    // Decode independently: nested absmax codes through the stored map, then NF4 codes.
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let codes = &written[&format!("{name}.absmax")].2;
    let nested_absmax = f32s(&written[&format!("{name}.nested_absmax")].2);
    let nested_map = f32s(&written[&format!("{name}.nested_quant_map")].2);
    let quant_map = f32s(&written[&format!("{name}.quant_map")].2);
    let offset = state["nested_offset"].as_f64().expect("offset") as f32;
    let absmax: Vec<f32> = codes
        .iter()
        .enumerate()
        .map(|(i, &c)| nested_map[c as usize] * nested_absmax[i / 256] + offset)
        .collect();
    let decoded: Vec<f32> = (0..256 * 256)
        .map(|i| {
            let byte = packed[i / 2];
            let code = if i % 2 == 0 { byte >> 4 } else { byte & 0xf };
            quant_map[code as usize] * absmax[i / 64]
        })
        .collect();
    // Within NF4's resolution of the source (the nested absmax is itself 8-bit).
    let source = tensors(&fixture("tiny-llama").join("model-00001-of-00002.safetensors"));
    let w = bf16_to_f32(&source[name].2);
    let err: f32 = w
        .iter()
        .zip(&decoded)
        .map(|(a, b)| (a - b) * (a - b))
        .sum::<f32>()
        / w.len() as f32;
    let var: f32 = w.iter().map(|a| a * a).sum::<f32>() / w.len() as f32;
    assert!(err < 0.02 * var, "relative MSE {}", err / var);
}

#[test]
fn refusals_leave_nothing_behind() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("w4");
    // GPTQ without calibration data is refused when the build is planned, before anything is
    // written (the statistics may still come from `--calibration`, so the recipe itself is valid).
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"compressed-tensors\"\n[quantize]\ndefault = \"keep\"\nmethod = \"gptq\"\n[[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"int4\"\n",
        fixture("tiny-llama")
    );
    match build_packed(&recipe(&text), &access(), Some(1)) {
        Err(e @ PipelineError::NoCalibration { .. }) => {
            assert!(e.to_string().contains("[calibration] stats"), "{e}")
        }
        other => panic!("expected NoCalibration, got {other:?}"),
    }
    assert!(!out.exists());
    // A GGUF type in a packed output, and a packed type in a GGUF output.
    for (format, ty) in [
        ("compressed-tensors", "q4_0"),
        ("gguf", "int4"),
        ("bitsandbytes", "int4"),
    ] {
        let text =
            format!("kiln = 1\n[output]\nformat = \"{format}\"\n[quantize]\ndefault = \"{ty}\"\n");
        assert!(
            Recipe::from_toml(&text, Path::new(".")).is_err(),
            "{format} {ty}"
        );
    }
    // A group size that does not divide the rows: refused at plan time, no folder.
    let r = w4_recipe(&out, "group-size = 96");
    match build_packed(&r, &access(), Some(1)) {
        Err(PipelineError::BadShape { tensor, .. }) => assert!(tensor.contains("_proj")),
        other => panic!("expected a shape error, got {other:?}"),
    }
    assert!(!out.exists());
}

#[test]
fn output_does_not_depend_on_threads() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut hashes = Vec::new();
    for threads in [1, 2] {
        let out = dir.path().join(format!("w4-{threads}"));
        build_packed(
            &w4_recipe(&out, "estimator = \"mse\""),
            &access(),
            Some(threads),
        )
        .expect("build");
        hashes.push(sha256_hex(
            &std::fs::read(out.join("model.safetensors")).expect("weights"),
        ));
    }
    assert_eq!(hashes[0], hashes[1]);
}

/// The acceptance: on tiny-llama with activations captured from the golden calibration
/// text, 4-bit group-128 GPTQ and LSQ each cut the mean output error ‖XWᵀ − XQ(W)ᵀ‖² over all
/// linear layers by at least 20% against round-to-nearest min–max, and the files do not depend on
/// the thread count.
#[test]
fn gptq_and_lsq_beat_round_to_nearest_on_tiny_llama() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats = tiny_llama_stats();
    for method in ["gptq", "lsq"] {
        let mut files = Vec::new();
        for threads in [1, 2] {
            let out = dir.path().join(format!("{method}-{threads}"));
            let extra = format!("method = \"{method}\"\n[calibration]\nstats = {stats:?}\n");
            let text = format!(
                "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"compressed-tensors\"\n[quantize]\ndefault = \"keep\"\n{extra}\n[[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"int4\"\n",
                fixture("tiny-llama")
            );
            let report = build_packed(&recipe(&text), &access(), Some(threads)).expect("build");
            let packed: Vec<_> = report
                .tensors
                .iter()
                .filter(|t| t.method.is_some())
                .collect();
            assert_eq!(packed.len(), 42);
            let before: f64 = packed
                .iter()
                .map(|t| t.output_error_before.expect("before"))
                .sum();
            let after: f64 = packed
                .iter()
                .map(|t| t.output_error_after.expect("after"))
                .sum();
            let mean_ratio = report.mean_error_ratio().expect("ratio");
            assert!(
                after <= 0.8 * before && mean_ratio <= 0.8,
                "{method}: total {after:.4e} vs {before:.4e}, mean ratio {mean_ratio:.3}"
            );
            files.push(std::fs::read(out.join("model.safetensors")).expect("weights"));
        }
        assert!(files[0] == files[1], "{method}: 1 and 2 threads differ");
    }
}

fn gguf_recipe(out: &Path, quantize: &str, rules: &str) -> Recipe {
    recipe(&format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[calibration]\nstats = {:?}\n[quantize]\n{quantize}\n{rules}",
        fixture("tiny-llama"),
        tiny_llama_stats()
    ))
}

/// The checkpoint module whose input feeds a GGUF linear weight of tiny-llama.
fn hf_module(gguf: &str) -> String {
    let rest = gguf.strip_prefix("blk.").expect("block tensor");
    let (layer, name) = rest.split_once('.').expect("layer");
    let module = match name {
        "attn_q.weight" => "self_attn.q_proj",
        "attn_k.weight" => "self_attn.k_proj",
        "attn_v.weight" => "self_attn.v_proj",
        "attn_output.weight" => "self_attn.o_proj",
        "ffn_gate.weight" => "mlp.gate_proj",
        "ffn_up.weight" => "mlp.up_proj",
        "ffn_down.weight" => "mlp.down_proj",
        other => panic!("not a linear weight: {other}"),
    };
    format!("model.layers.{layer}.{module}")
}

/// Every tensor of a GGUF file, dequantized to f32, with its type.
fn gguf_values(
    path: &Path,
) -> std::collections::BTreeMap<String, (kiln_types::GgmlType, Vec<f32>)> {
    let bytes = std::fs::read(path).expect("read");
    let file = kiln_reader::gguf::GgufFile::parse(&bytes).expect("parses");
    file.tensors
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let data = file.tensor_data(i).expect("data");
            let mut values = vec![0.0f32; t.ne.iter().product::<u64>() as usize];
            kiln_quant::dequantize_rows(t.ty, data, &mut values).expect("dequantize");
            (t.name.clone(), (t.ty, values))
        })
        .collect()
}

/// ‖(W − Q)·X‖² / n from the Gram matrix G = XᵀX over n rows, summed over W's rows.
fn output_error(w: &[f32], q: &[f32], gram: &[f64], n: u64) -> f64 {
    let cols = (gram.len() as f64).sqrt() as usize;
    let mut total = 0.0;
    for (wr, qr) in w.chunks_exact(cols).zip(q.chunks_exact(cols)) {
        let d: Vec<f64> = wr
            .iter()
            .zip(qr)
            .map(|(a, b)| f64::from(*a) - f64::from(*b))
            .collect();
        for (i, di) in d.iter().enumerate() {
            let row = &gram[i * cols..(i + 1) * cols];
            total += di * row.iter().zip(&d).map(|(g, dj)| g * dj).sum::<f64>();
        }
    }
    total / n as f64
}

/// GPTQ into GGUF block types: on tiny-llama with the captured statistics, Q4_0 (and Q4_1, Q5_0,
/// Q5_1, Q8_0 by rule) from GPTQ has a lower output error than the kernel's own rounding, measured
/// here from the files (f32 conversion as W, the statistics' Gram matrices) and equal to what the
/// report says; the bytes do not depend on the thread count; tensors without input statistics
/// keep the kernel's rounding and are reported as such.
#[test]
fn gptq_into_gguf_block_types_beats_the_kernel() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats_bytes = std::fs::read(tiny_llama_stats()).expect("stats");
    let stats = kiln_calib::ActivationStats::from_safetensors(&stats_bytes).expect("stats parse");
    let rules = "[[rules]]\ntensors = \"blk.0.*\"\ntype = \"q4_1\"\n\
                 [[rules]]\ntensors = \"blk.1.ffn_*\"\ntype = \"q5_0\"\n\
                 [[rules]]\ntensors = \"blk.2.*\"\ntype = \"q5_1\"\n\
                 [[rules]]\ntensors = \"blk.3.attn_*\"\ntype = \"q8_0\"\n";
    let reference = dir.path().join("f32.gguf");
    run_recipe(&gguf_recipe(&reference, "default = \"f32\"", ""));
    let w = gguf_values(&reference);

    let rtn = dir.path().join("rtn.gguf");
    run_recipe(&gguf_recipe(&rtn, "default = \"q4_0\"", rules));
    let rtn_values = gguf_values(&rtn);

    let mut files = Vec::new();
    for threads in [1, 2] {
        let out = dir.path().join(format!("gptq-{threads}.gguf"));
        let r = gguf_recipe(&out, "default = \"q4_0\"\nmethod = \"gptq\"", rules);
        let plan = kiln_pipeline::plan(&r, &access()).expect("plan");
        let report = kiln_pipeline::build(
            &plan,
            &kiln_pipeline::BuildOptions {
                threads: Some(threads),
                ..Default::default()
            },
            &(),
        )
        .expect("build");
        let values = gguf_values(&out);
        let mut seen_types = std::collections::BTreeSet::new();
        let (mut sum_rtn, mut sum_gptq, mut gptq_tensors) = (0.0, 0.0, 0);
        for t in &report.tensors {
            if !t.name.starts_with("blk.") || t.shape.len() != 2 {
                if t.name == "token_embd.weight" {
                    let m = t.method.as_deref().expect("reported");
                    assert!(m.starts_with("rtn (gptq asked"), "{m}");
                    assert_eq!(values[&t.name].1, rtn_values[&t.name].1, "kernel rounding");
                }
                continue;
            }
            gptq_tensors += 1;
            assert_eq!(t.method.as_deref(), Some("gptq"), "{}", t.name);
            let (ty, q) = &values[&t.name];
            seen_types.insert(*ty);
            let module = stats.get(&hf_module(&t.name)).expect("module stats");
            let gram = module.gram().expect("gram");
            let (n, wv) = (module.count(), &w[&t.name].1);
            let before = output_error(wv, &rtn_values[&t.name].1, gram, n);
            let after = output_error(wv, q, gram, n);
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-6 * b.abs().max(1e-30);
            assert!(
                close(t.output_error_before.expect("before"), before),
                "{}",
                t.name
            );
            assert!(
                close(t.output_error_after.expect("after"), after),
                "{}",
                t.name
            );
            sum_rtn += before;
            sum_gptq += after;
        }
        assert_eq!(gptq_tensors, 42, "7 linear weights × 6 layers");
        assert_eq!(seen_types.len(), 5, "{seen_types:?}");
        let (_, mean) = report.mean_output_error_ratio().expect("ratio");
        assert!(
            sum_gptq <= 0.8 * sum_rtn && mean <= 0.8,
            "GPTQ {sum_gptq:.4e} vs kernel {sum_rtn:.4e}, mean ratio {mean:.3}"
        );
        files.push(std::fs::read(&out).expect("file"));
    }
    assert!(files[0] == files[1], "1 and 2 threads differ");
}

/// What GGUF recipes cannot ask of GPTQ fails before anything is written, naming the problem.
#[test]
fn gguf_method_refusals() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("x.gguf");
    // Packed-only fields and methods are recipe errors.
    for (quantize, needle) in [
        ("default = \"q4_0\"\nmethod = \"awq\"", "rtn` or `gptq"),
        ("default = \"q4_0\"\ngroup-size = 64", "group-size"),
        ("default = \"q4_0\"\nestimator = \"mse\"", "estimator"),
    ] {
        let text = format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[quantize]\n{quantize}\n",
            fixture("tiny-llama")
        );
        let err = Recipe::from_toml(&text, Path::new(".")).expect_err(quantize);
        assert!(err.to_string().contains(needle), "{err}");
    }
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[quantize]\ndefault = \"q4_0\"\nmethod = \"gptq\"\n",
        fixture("tiny-llama")
    );
    match kiln_pipeline::plan(&recipe(&text), &access()) {
        Err(e @ PipelineError::NoCalibration { .. }) => {
            assert!(e.to_string().contains("--calibration"), "{e}")
        }
        other => panic!("expected NoCalibration, got {other:?}"),
    }

    // A k-quant from GPTQ, and statistics without the module, are plan errors.
    let r = gguf_recipe(&out, "default = \"q4_k\"\nmethod = \"gptq\"", "");
    match kiln_pipeline::plan(&r, &access()) {
        Err(PipelineError::MethodNotApplicable { tensor, problem }) => {
            assert!(tensor.starts_with("blk."), "{tensor}");
            assert!(
                problem.contains("Q4_0") && problem.contains("Q4_K"),
                "{problem}"
            );
        }
        other => panic!("expected MethodNotApplicable, got {other:?}"),
    }
    // Statistics are keyed by checkpoint names, so a GGUF input cannot take GPTQ.
    let f16 = dir.path().join("f16.gguf");
    run_recipe(&gguf_recipe(&f16, "default = \"f16\"", ""));
    let text = format!(
        "kiln = 1\n[input]\npath = {f16:?}\n[output]\npath = {out:?}\n[calibration]\nstats = {:?}\n[quantize]\ndefault = \"q8_0\"\nmethod = \"gptq\"\n",
        tiny_llama_stats()
    );
    match kiln_pipeline::plan(&recipe(&text), &access()) {
        Err(PipelineError::MethodNotApplicable { problem, .. }) => {
            assert!(problem.contains("checkpoint"), "{problem}")
        }
        other => panic!("expected MethodNotApplicable for a GGUF input, got {other:?}"),
    }
    let partial = dir.path().join("partial.safetensors");
    let mut only_one = kiln_calib::ActivationStats::new();
    only_one
        .insert(
            "model.layers.0.self_attn.q_proj",
            kiln_calib::ModuleStats::from_rows(&[1.0; 256], 256, true, None).expect("stats"),
        )
        .expect("insert");
    std::fs::write(&partial, only_one.to_safetensors().expect("encode")).expect("write");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[calibration]\nstats = {partial:?}\n[quantize]\ndefault = \"q8_0\"\nmethod = \"gptq\"\n",
        fixture("tiny-llama")
    );
    match kiln_pipeline::plan(&recipe(&text), &access()) {
        Err(PipelineError::MissingCalibration { module, .. }) => {
            assert!(module.starts_with("model.layers."), "{module}")
        }
        other => panic!("expected MissingCalibration, got {other:?}"),
    }
    let mut narrow = kiln_calib::ActivationStats::new();
    narrow
        .insert(
            "model.layers.0.mlp.down_proj",
            kiln_calib::ModuleStats::from_rows(&[1.0; 64], 64, true, None).expect("stats"),
        )
        .expect("insert");
    std::fs::write(&partial, narrow.to_safetensors().expect("encode")).expect("write");
    let text = format!(
        "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[calibration]\nstats = {partial:?}\n[quantize]\ndefault = \"f16\"\n[[rules]]\nhf-tensors = \"model.layers.0.mlp.down_proj.weight\"\ntype = \"q8_0\"\nmethod = \"gptq\"\n",
        fixture("tiny-llama")
    );
    match kiln_pipeline::plan(&recipe(&text), &access()) {
        Err(PipelineError::CalibrationShape {
            expected, actual, ..
        }) => assert_eq!((expected, actual), (512, 64)),
        other => panic!("expected CalibrationShape, got {other:?}"),
    }
    assert!(!out.exists());
}

/// A GPTQ artifact records its statistics file as an input and rebuilds byte for byte from the
/// recorded recipe when `kiln verify --rebuild` is given the same statistics (`--calibration`, as
/// `kiln build` takes it); without them the rebuild stops with a recipe error (exit 2).
#[test]
fn gptq_gguf_artifact_verifies_by_rebuilding() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("q8.gguf");
    let recipe_path = dir.path().join("q8-gptq.toml");
    std::fs::write(
        &recipe_path,
        format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\n[quantize]\ndefault = \"f16\"\n\
             [[rules]]\ntensors = \"blk.*.ffn_*.weight\"\ntype = \"q8_0\"\nmethod = \"gptq\"\nact-order = true\n",
            fixture("tiny-llama")
        ),
    )
    .expect("recipe");
    let stats = tiny_llama_stats().to_str().expect("utf-8");
    let recipe_arg = recipe_path.to_str().expect("utf-8");
    let built = kiln(&[
        "build",
        recipe_arg,
        "--calibration",
        stats,
        "--quiet",
        "--json",
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&built.stdout).expect("json");
    let gptq = report["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .filter(|t| t["method"] == "gptq (act-order)")
        .count();
    assert_eq!(gptq, 18, "3 FFN weights × 6 layers");

    let manifest: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("q8.gguf.kiln.json")).expect("manifest"),
    )
    .expect("json");
    let stats_hash = kiln_pipeline::provenance::xxh3_hex(&std::fs::read(stats).expect("stats"));
    assert!(
        manifest["inputs"]
            .as_array()
            .expect("inputs")
            .iter()
            .any(|i| i["role"] == "calibration" && i["xxh3"] == stats_hash.as_str()),
        "{}",
        manifest["inputs"]
    );

    let out_arg = out.to_str().expect("utf-8");
    let input = fixture("tiny-llama");
    let input_arg = input.to_str().expect("utf-8");
    let verified = kiln(&[
        "verify",
        out_arg,
        "--rebuild",
        "--input",
        input_arg,
        "--calibration",
        stats,
    ]);
    assert!(
        verified.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verified.stdout),
        String::from_utf8_lossy(&verified.stderr)
    );
    let without = kiln(&["verify", out_arg, "--rebuild", "--input", input_arg]);
    assert_eq!(without.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&without.stderr).contains("--calibration"));
}

/// W8A8 from a recipe: int8 per-channel weights plus a static per-tensor input scale per layer
/// (compressed-tensors `int-quantized`), the scale computed from the captured statistics. With
/// min–max it is the largest |x| the layer's input reached over 127.5 (compressed-tensors'
/// symmetric 8-bit scale), checked here from the statistics file; percentile (from the |x|
/// histogram) clips below it; a histogram estimator without a histogram is refused before
/// anything is written.
#[test]
fn w8a8_static_input_scales_from_statistics() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stats_path = dir.path().join("hist.safetensors");
    kiln_pipeline::calibrate::calibrate_to_file(
        &access(),
        &fixture("tiny-llama"),
        &repo().join("fixtures/calib/tiny-llama-calib.tokens"),
        &stats_path,
        &kiln_pipeline::calibrate::CalibrateOptions {
            chunks: Some(6),
            histogram: Some(kiln_calib::HistogramSpec {
                bins: 2048,
                max: 64.0,
            }),
            ..Default::default()
        },
    )
    .expect("capture");
    let stats =
        kiln_calib::ActivationStats::from_safetensors(&std::fs::read(&stats_path).expect("stats"))
            .expect("parse");
    let w8a8 = |out: &Path, stats: &Path, estimator: &str| {
        recipe(&format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"compressed-tensors\"\n\
             [calibration]\nstats = {stats:?}\n[quantize]\ndefault = \"keep\"\n\
             [[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"int8\"\n\
             group-size = \"channel\"\ninput-activations = \"int8\"\nactivation-estimator = \"{estimator}\"\n",
            fixture("tiny-llama")
        ))
    };

    let out = dir.path().join("minmax");
    let report =
        build_packed(&w8a8(&out, &stats_path, "minmax"), &access(), Some(2)).expect("build");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).expect("config"))
            .expect("json");
    let qc = &config["quantization_config"];
    assert_eq!(qc["format"], "int-quantized");
    let group = &qc["config_groups"]["group_0"];
    assert_eq!(group["format"], "int-quantized");
    assert_eq!(group["input_activations"]["num_bits"], 8);
    assert_eq!(group["input_activations"]["strategy"], "tensor");
    assert_eq!(group["input_activations"]["dynamic"], false);
    assert_eq!(group["input_activations"]["symmetric"], true);
    assert_eq!(group["weights"]["strategy"], "channel");

    let written = tensors(&out.join("model.safetensors"));
    let mut minmax_scales = std::collections::BTreeMap::new();
    let mut layers = 0;
    for t in report.tensors.iter().filter(|t| t.stored_as == "int8") {
        layers += 1;
        let prefix = t.name.strip_suffix(".weight").expect("weight");
        let (wdt, wshape, _) = &written[&format!("{prefix}.weight")];
        assert_eq!(wdt, "I8");
        let (sdt, sshape, sbytes) = &written[&format!("{prefix}.input_scale")];
        assert_eq!((sdt.as_str(), sshape.as_slice()), ("BF16", &[1usize][..]));
        let (_, scale_shape, _) = &written[&format!("{prefix}.weight_scale")];
        assert_eq!(scale_shape, &[wshape[0], 1]);
        let stored = bf16_to_f32(sbytes)[0];
        assert_eq!(Some(stored), t.input_scale, "{}", t.name);
        // The module's statistics (q/k/v share the attention input).
        let module = stats.get(prefix).expect("module");
        let absmax = module
            .min()
            .iter()
            .chain(module.max())
            .fold(0.0f32, |m, v| m.max(v.abs()));
        let expected = half::bf16::from_f32(absmax / 127.5).to_f32();
        assert_eq!(stored, expected, "{}", t.name);
        minmax_scales.insert(t.name.clone(), stored);
    }
    assert_eq!(layers, 42);

    let out = dir.path().join("percentile");
    let report =
        build_packed(&w8a8(&out, &stats_path, "percentile"), &access(), Some(1)).expect("build");
    let clipped = report
        .tensors
        .iter()
        .filter_map(|t| Some((t.input_scale?, minmax_scales[&t.name])))
        .filter(|(p, m)| p < m)
        .count();
    assert_eq!(
        clipped, 42,
        "99.9th percentile below the maximum everywhere"
    );

    // The shared statistics have no histogram.
    let out = dir.path().join("no-histogram");
    match build_packed(&w8a8(&out, tiny_llama_stats(), "kl"), &access(), Some(1)) {
        Err(e @ PipelineError::PackedRecipe(_)) => {
            assert!(e.to_string().contains("--hist-bins"), "{e}")
        }
        other => panic!("expected a histogram error, got {other:?}"),
    }
    assert!(!out.exists());
}

/// A packed folder is as verifiable as a GGUF file: `<folder>.kiln.json` records the recipe, the
/// inputs (shards, side files, statistics) and every file and tensor; `kiln verify FOLDER` checks
/// it (exit 5 naming the tensor or file on a change), and `--rebuild` rebuilds it byte for byte.
#[test]
fn packed_folder_manifest_verifies_and_rebuilds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("w4");
    let recipe_path = dir.path().join("w4.toml");
    std::fs::write(
        &recipe_path,
        format!(
            "kiln = 1\n[input]\npath = {:?}\n[output]\npath = {out:?}\nformat = \"compressed-tensors\"\n\
             max-shard-size = \"2M\"\n[calibration]\nstats = {:?}\n[quantize]\ndefault = \"keep\"\nmethod = \"gptq\"\n\
             [[rules]]\nhf-tensors = \"model.layers.*.*_proj.weight\"\ntype = \"int4\"\n",
            fixture("tiny-llama"),
            tiny_llama_stats()
        ),
    )
    .expect("recipe");
    let built = kiln(&["build", recipe_path.to_str().expect("utf-8"), "--quiet"]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let manifest_path = dir.path().join("w4.kiln.json");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&manifest_path).expect("manifest")).expect("json");
    let files: Vec<&str> = manifest["files"]
        .as_array()
        .expect("files")
        .iter()
        .map(|f| f["name"].as_str().expect("name"))
        .collect();
    assert!(files.len() > 3, "{files:?}");
    assert!(
        files.contains(&"w4/model.safetensors.index.json"),
        "{files:?}"
    );
    assert!(files.contains(&"w4/config.json"), "{files:?}");
    let roles: Vec<&str> = manifest["inputs"]
        .as_array()
        .expect("inputs")
        .iter()
        .map(|i| i["role"].as_str().expect("role"))
        .collect();
    assert!(
        roles.contains(&"weights")
            && roles.contains(&"side-file")
            && roles.contains(&"calibration")
    );
    let packed = manifest["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["name"] == "model.layers.0.self_attn.q_proj.weight_packed")
        .expect("packed tensor recorded");
    assert_eq!(packed["source"], "model.layers.0.self_attn.q_proj.weight");
    assert_eq!(packed["type"], "I32");

    let folder = out.to_str().expect("utf-8");
    let ok = kiln(&["verify", folder]);
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stdout)
    );
    let input = fixture("tiny-llama");
    let stats = tiny_llama_stats().to_str().expect("utf-8");
    let rebuilt = kiln(&[
        "verify",
        &format!("{folder}/"),
        "--rebuild",
        "--input",
        input.to_str().expect("utf-8"),
        "--calibration",
        stats,
    ]);
    assert!(
        rebuilt.status.success(),
        "{}{}",
        String::from_utf8_lossy(&rebuilt.stdout),
        String::from_utf8_lossy(&rebuilt.stderr)
    );

    // One flipped byte in a packed tensor, then an edited config.json.
    let shard = out.join(files[0].strip_prefix("w4/").expect("in folder"));
    let record = manifest["tensors"]
        .as_array()
        .expect("tensors")
        .iter()
        .find(|t| t["file"] == 0)
        .expect("a tensor in the first shard");
    let mut bytes = std::fs::read(&shard).expect("shard");
    let at = record["offset"].as_u64().expect("offset") as usize;
    bytes[at] ^= 1;
    std::fs::write(&shard, &bytes).expect("write");
    let bad = kiln(&["verify", folder, "--json"]);
    assert_eq!(bad.status.code(), Some(5));
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    assert!(report["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .any(|f| f["kind"] == "tensor-mismatch" && f["tensor"] == record["name"]));
    bytes[at] ^= 1;
    std::fs::write(&shard, &bytes).expect("write");
    let config = out.join("config.json");
    let mut text = std::fs::read_to_string(&config).expect("config");
    text.push(' ');
    std::fs::write(&config, text).expect("write");
    let bad = kiln(&["verify", folder, "--json"]);
    assert_eq!(bad.status.code(), Some(5));
    let report: serde_json::Value = serde_json::from_slice(&bad.stdout).expect("json");
    let kinds: Vec<(&str, &str)> = report["failures"]
        .as_array()
        .expect("failures")
        .iter()
        .map(|f| {
            (
                f["kind"].as_str().unwrap_or(""),
                f["file"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert!(
        kinds.contains(&("size-mismatch", "w4/config.json")),
        "{kinds:?}"
    );
}
