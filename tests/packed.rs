//! Packed safetensors outputs end to end: model folders written with `kiln_writer::safetensors`
//! and `kiln_writer::packed`, then read back with the `safetensors` crate and decoded by
//! implementations written here from the documented layouts (`docs/packed.md`,
//! `../shared/docs/ecosystem.md` §1.3–1.5 and §2), never by the writer's or the quantizer's own
//! unpacking code. The expected values come from `kiln-quant` (what the pipeline would store).
//!
//! - compressed-tensors `pack-quantized`, group 128, 4 and 8 bits, symmetric and asymmetric, with
//!   BF16 and F32 scales; `int-quantized` W8A8 with a static input scale. Dequantized weights are
//!   reproduced bit for bit; `quantization_config` has exactly compressed-tensors' keys.
//! - bitsandbytes NF4 (and FP4), with and without double quantization: decoded from the written
//!   tensors, equal to `kiln_quant::bnb::dequantize_4bit`.
//! - Sharding: the fixture checkpoint's two shards and index, as transformers wrote them, are
//!   reproduced byte for byte; a packed model split into many shards has a consistent index.
//! - Failures leave nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use kiln_quant::affine::{self, AffineQuantized, Granularity, QuantScheme, Range};
use kiln_quant::bnb as qbnb;
use kiln_writer::packed::{self, bnb, compressed_tensors as ct, PackedTensor};
use kiln_writer::safetensors::{
    Dtype, FolderWriter, SafetensorsError, SafetensorsSet, SetOptions, SideFile, TensorDecl,
    WrittenSet, INDEX_FILE_NAME, SINGLE_FILE_NAME,
};
use safetensors::SafeTensors;
use serde_json::Value;

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/tiny-llama")
}

// ---------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------

/// Deterministic bell-shaped weights with a few outliers, varying in scale from row to row.
fn weights(seed: u64, rows: usize, cols: usize) -> Vec<f32> {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut uniform = move || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((state >> 40) as f32) / (1u64 << 24) as f32
    };
    (0..rows * cols)
        .map(|i| {
            let g: f32 = (0..4).map(|_| uniform()).sum::<f32>() - 2.0;
            let row_scale = 0.02 * (1.0 + (i / cols) as f32 % 5.0);
            let outlier = if i % 97 == 13 { 6.0 } else { 1.0 };
            g * row_scale * outlier
        })
        .collect()
}

/// Min-max quantization per group of 128 with scales rounded to `scale_dtype` first (as a
/// pipeline storing bf16 scales must do), using kiln-quant's compressed-tensors arithmetic.
fn quantize(
    w: &[f32],
    rows: usize,
    cols: usize,
    bits: u8,
    symmetric: bool,
    scale_dtype: Dtype,
) -> AffineQuantized {
    let scheme = QuantScheme::new(bits, symmetric, Granularity::Group(128)).unwrap();
    let mut scales = Vec::new();
    let mut zero_points = Vec::new();
    for row in w.chunks(cols) {
        for group in row.chunks(128) {
            let lo = group.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = group.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let (s, z) = affine::qparams(Range::new(lo, hi), &scheme);
            scales.push(packed::round_scale(s, scale_dtype).unwrap());
            zero_points.push(z);
        }
    }
    affine::quantize_with_params(w, rows, cols, &scheme, &scales, &zero_points).unwrap()
}

fn ct_linear(aq: &AffineQuantized) -> ct::QuantizedLinear<'_> {
    let strategy = match aq.scheme.granularity {
        Granularity::Tensor => ct::Strategy::Tensor,
        Granularity::Channel => ct::Strategy::Channel,
        Granularity::Group(g) => ct::Strategy::Group(g),
    };
    ct::QuantizedLinear {
        rows: aq.rows,
        cols: aq.cols,
        weights: ct::WeightArgs {
            num_bits: aq.scheme.bits,
            symmetric: aq.scheme.symmetric,
            strategy,
        },
        q: &aq.q,
        scales: &aq.scales,
        zero_points: &aq.zero_points,
    }
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values
        .iter()
        .flat_map(|&v| half::bf16::from_f32(v).to_bits().to_le_bytes())
        .collect()
}

fn dense(name: &str, shape: &[u64], values: &[f32]) -> PackedTensor {
    PackedTensor {
        decl: TensorDecl::new(name, Dtype::BF16, shape.to_vec()),
        bytes: bf16_bytes(values),
    }
}

/// The fixture's config, tokenizer and generation files as side files, with `config.json`
/// carrying `quantization_config`.
fn side_files(quantization_config: Value) -> Vec<SideFile> {
    let mut config: Value =
        serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
    packed::set_quantization_config(&mut config, quantization_config).unwrap();
    let mut files = vec![SideFile {
        name: "config.json".into(),
        bytes: packed::config_json_bytes(&config),
    }];
    for name in [
        "tokenizer.model",
        "tokenizer_config.json",
        "generation_config.json",
        "chat_template.jinja",
    ] {
        files.push(SideFile {
            name: name.into(),
            bytes: std::fs::read(fixture().join(name)).unwrap(),
        });
    }
    files
}

/// Declares `tensors` (in the given order), writes them in small chunks, commits.
fn write_folder(
    dir: &Path,
    tensors: &[PackedTensor],
    options: &SetOptions,
    side: Vec<SideFile>,
) -> WrittenSet {
    let decls: Vec<TensorDecl> = tensors.iter().map(|t| t.decl.clone()).collect();
    let data: HashMap<&str, &[u8]> = tensors
        .iter()
        .map(|t| (t.decl.name.as_str(), t.bytes.as_slice()))
        .collect();
    let set = SafetensorsSet::plan(decls, options).unwrap();
    let order: Vec<String> = set
        .write_order()
        .map(|(_, s)| s.decl.name.clone())
        .collect();
    let mut writer = FolderWriter::create(dir, set, side).unwrap();
    for (i, name) in order.iter().enumerate() {
        let bytes = data[name.as_str()];
        if bytes.is_empty() {
            writer.write_tensor(i, bytes).unwrap();
        }
        for chunk in bytes.chunks(1000) {
            writer.write_tensor_chunk(i, chunk).unwrap();
        }
    }
    writer.finish().unwrap()
}

// ---------------------------------------------------------------------------------------------
// Reading back (independent of kiln's unpacking code)
// ---------------------------------------------------------------------------------------------

/// Tensors read back: name → (dtype name, shape, bytes).
type Stored = BTreeMap<String, (String, Vec<usize>, Vec<u8>)>;

/// Every tensor of a model folder: name → (dtype name, shape, bytes), through the index when
/// there is one.
fn read_folder(dir: &Path) -> Stored {
    let files: BTreeSet<String> = if dir.join(INDEX_FILE_NAME).exists() {
        let index: Value =
            serde_json::from_slice(&std::fs::read(dir.join(INDEX_FILE_NAME)).unwrap()).unwrap();
        index["weight_map"]
            .as_object()
            .unwrap()
            .values()
            .map(|v| v.as_str().unwrap().to_string())
            .collect()
    } else {
        BTreeSet::from([SINGLE_FILE_NAME.to_string()])
    };
    let mut out = BTreeMap::new();
    for f in files {
        let bytes = std::fs::read(dir.join(&f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let old = out.insert(
                name.clone(),
                (
                    view.dtype().to_string(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ),
            );
            assert!(old.is_none(), "{name} stored twice");
        }
    }
    out
}

fn le_i32(b: &[u8]) -> Vec<i32> {
    b.chunks_exact(4)
        .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn le_f32(b: &[u8]) -> Vec<f32> {
    b.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn scale_values(dtype: &str, b: &[u8]) -> Vec<f32> {
    match dtype {
        "BF16" => b
            .chunks_exact(2)
            .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        "F16" => b
            .chunks_exact(2)
            .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
            .collect(),
        "F32" => le_f32(b),
        other => panic!("scale dtype {other}"),
    }
}

/// Value `i` of a densely packed little-endian int32 bit stream starting at word `start`,
/// `bits` wide, offset back from `[0, 2^b)` to the signed range.
fn unpack_one(words: &[i32], start: usize, i: usize, bits: usize) -> i32 {
    let bit = i * bits;
    let lo = words[start + bit / 32] as u32 as u64;
    let hi = words
        .get(start + bit / 32 + 1)
        .map_or(0, |&w| w as u32 as u64);
    let u = ((lo | (hi << 32)) >> (bit % 32)) & ((1 << bits) - 1);
    u as i32 - (1 << (bits - 1))
}

/// compressed-tensors `pack-quantized` decompression of layer `p`, written from the layout:
/// `weight_packed` rows of `ceil(in·b/32)` words; `weight_zero_point` packed along dim 0 as
/// `(ceil(out·b/32), groups)`; `(q - zp) · scale` per group of `group_size` columns.
fn ct_dequantize(tensors: &Stored, p: &str, weights: &Value) -> Vec<f32> {
    let bits = weights["num_bits"].as_u64().unwrap() as usize;
    let group = weights["group_size"].as_u64().unwrap() as usize;
    assert_eq!(weights["strategy"], "group");
    let (dt, shape_shape, shape_bytes) = &tensors[&format!("{p}.weight_shape")];
    assert_eq!((dt.as_str(), shape_shape.as_slice()), ("I64", &[2][..]));
    let out = i64::from_le_bytes(shape_bytes[..8].try_into().unwrap()) as usize;
    let inp = i64::from_le_bytes(shape_bytes[8..].try_into().unwrap()) as usize;
    let (dt, packed_shape, packed) = &tensors[&format!("{p}.weight_packed")];
    let per_row = (inp * bits).div_ceil(32);
    assert_eq!(
        (dt.as_str(), packed_shape.as_slice()),
        ("I32", &[out, per_row][..])
    );
    let packed = le_i32(packed);
    let groups = inp.div_ceil(group);
    let (sdt, scale_shape, scale_bytes) = &tensors[&format!("{p}.weight_scale")];
    assert_eq!(scale_shape.as_slice(), &[out, groups]);
    let scales = scale_values(sdt, scale_bytes);
    let zp = if weights["symmetric"] == Value::Bool(true) {
        assert!(!tensors.contains_key(&format!("{p}.weight_zero_point")));
        vec![0; out * groups]
    } else {
        let (dt, zshape, zbytes) = &tensors[&format!("{p}.weight_zero_point")];
        let zwords = (out * bits).div_ceil(32);
        assert_eq!(
            (dt.as_str(), zshape.as_slice()),
            ("I32", &[zwords, groups][..])
        );
        // Column g of the (words × groups) matrix is the stream of row zero points of group g.
        let column_major: Vec<i32> = {
            let z = le_i32(zbytes);
            (0..groups)
                .flat_map(|g| (0..zwords).map(move |w| (g, w)))
                .map(|(g, w)| z[w * groups + g])
                .collect()
        };
        let mut zp = vec![0; out * groups];
        for g in 0..groups {
            for r in 0..out {
                zp[r * groups + g] = unpack_one(&column_major, g * zwords, r, bits);
            }
        }
        zp
    };
    let mut w = Vec::with_capacity(out * inp);
    for r in 0..out {
        for c in 0..inp {
            let q = unpack_one(&packed, r * per_row, c, bits);
            let g = r * groups + c / group;
            w.push((q - zp[g]) as f32 * scales[g]);
        }
    }
    w
}

fn assert_bits_eq(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: length");
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert_eq!(x.to_bits(), y.to_bits(), "{what}[{i}]: {x} vs {y}");
    }
}

fn keys(v: &Value) -> Vec<&str> {
    v.as_object().unwrap().keys().map(String::as_str).collect()
}

// The keys compressed-tensors' models accept, written out here from ecosystem.md §1.5 and
// compressed-tensors' `QuantizationConfig`, `QuantizationScheme` and `QuantizationArgs`
// (independently of the writer's constants, which are checked against these too).
const CT_TOP_KEYS: [&str; 11] = [
    "config_groups",
    "format",
    "global_compression_ratio",
    "ignore",
    "kv_cache_scheme",
    "moe_sparsity_config",
    "quant_method",
    "quantization_status",
    "sparsity_config",
    "transform_config",
    "version",
];
const CT_SCHEME_KEYS: [&str; 5] = [
    "format",
    "input_activations",
    "output_activations",
    "targets",
    "weights",
];
/// `QuantizationArgs` fields (extra="forbid"): what an args block may contain at most.
const CT_ARGS_ACCEPTED: [&str; 12] = [
    "num_bits",
    "type",
    "symmetric",
    "group_size",
    "strategy",
    "block_structure",
    "dynamic",
    "actorder",
    "scale_dtype",
    "zp_dtype",
    "observer",
    "observer_kwargs",
];

const LINEARS: [(&str, usize, usize); 3] = [
    ("model.layers.0.self_attn.q_proj", 64, 256),
    ("model.layers.0.mlp.down_proj", 40, 384),
    // Columns not a multiple of 128: the last group of each row is short.
    ("model.layers.0.mlp.up_proj", 24, 200),
];

// ---------------------------------------------------------------------------------------------
// compressed-tensors
// ---------------------------------------------------------------------------------------------

#[test]
fn compressed_tensors_pack_quantized_round_trip() {
    for (bits, symmetric, scale_dtype) in [
        (4, false, Dtype::BF16),
        (4, true, Dtype::BF16),
        (8, false, Dtype::BF16),
        (8, true, Dtype::F32),
    ] {
        let what = format!("{bits}-bit symmetric={symmetric} {scale_dtype}");
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("out");
        let mut tensors = Vec::new();
        let mut expected = HashMap::new();
        for (i, &(p, rows, cols)) in LINEARS.iter().enumerate() {
            let w = weights(i as u64 + 1, rows, cols);
            let aq = quantize(&w, rows, cols, bits, symmetric, scale_dtype);
            let layer =
                ct::pack_quantized(&format!("{p}.weight"), &ct_linear(&aq), scale_dtype).unwrap();
            // The writer's packing agrees with kiln-quant's packer (a second implementation).
            let words = affine::pack_to_int32(&aq.q, rows, cols, bits).unwrap();
            assert_eq!(
                layer[0].bytes,
                words
                    .iter()
                    .flat_map(|w| w.to_le_bytes())
                    .collect::<Vec<_>>()
            );
            if !symmetric {
                let zp = affine::pack_zero_points(&aq.zero_points, rows, cols.div_ceil(128), bits)
                    .unwrap();
                assert_eq!(
                    layer[2].bytes,
                    zp.iter().flat_map(|w| w.to_le_bytes()).collect::<Vec<_>>()
                );
            }
            tensors.extend(layer);
            expected.insert(p, aq.dequantize());
        }
        tensors.push(dense("model.norm.weight", &[256], &vec![1.0; 256]));
        tensors.push(dense("lm_head.weight", &[16, 256], &weights(9, 16, 256)));
        let scheme = ct::Scheme {
            weights: ct::WeightArgs {
                num_bits: bits,
                symmetric,
                strategy: ct::Strategy::Group(128),
            },
            input_activations: None,
        };
        let qc = ct::quantization_config(
            &[ct::ConfigGroup {
                targets: vec!["Linear".into()],
                scheme,
            }],
            &["lm_head".into()],
        )
        .unwrap();
        let written = write_folder(&dir, &tensors, &SetOptions::default(), side_files(qc));
        assert_eq!(written.shards.len(), 1);

        // config.json: the fixture's keys in their order, quantization_config added in its
        // sorted place with exactly compressed-tensors' keys.
        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let source: Value =
            serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
        let mut source_keys = keys(&source);
        source_keys.push("quantization_config");
        source_keys.sort();
        assert_eq!(keys(&config), source_keys);
        let qc = &config["quantization_config"];
        assert_eq!(keys(qc), CT_TOP_KEYS);
        assert_eq!(keys(qc), ct::QUANTIZATION_CONFIG_KEYS);
        assert_eq!(qc["quant_method"], "compressed-tensors");
        assert_eq!(qc["format"], "pack-quantized");
        assert_eq!(qc["quantization_status"], "compressed");
        assert_eq!(qc["ignore"], serde_json::json!(["lm_head"]));
        let group = &qc["config_groups"]["group_0"];
        assert_eq!(keys(group), CT_SCHEME_KEYS);
        assert_eq!(group["targets"], serde_json::json!(["Linear"]));
        assert!(keys(&group["weights"])
            .iter()
            .all(|k| CT_ARGS_ACCEPTED.contains(k)));
        assert_eq!(keys(&group["weights"]), ct::ARGS_KEYS);
        assert_eq!(group["weights"]["type"], "int");
        assert_eq!(group["input_activations"], Value::Null);

        // Decode every layer from the files, with the parameters config.json states.
        let stored = read_folder(&dir);
        for &(p, _, _) in &LINEARS {
            assert!(
                !stored.contains_key(&format!("{p}.weight")),
                "{what}: dense {p}.weight left"
            );
            let got = ct_dequantize(&stored, p, &group["weights"]);
            assert_bits_eq(&got, &expected[p], &format!("{what} {p}"));
        }
        // Dense tensors pass through untouched.
        let lm = &stored["lm_head.weight"];
        assert_eq!((lm.0.as_str(), lm.1.as_slice()), ("BF16", &[16, 256][..]));
        assert_eq!(lm.2, bf16_bytes(&weights(9, 16, 256)));
        assert_eq!(stored["model.norm.weight"].0, "BF16");
        // Side files are copied byte for byte.
        for f in [
            "tokenizer.model",
            "tokenizer_config.json",
            "generation_config.json",
            "chat_template.jinja",
        ] {
            assert_eq!(
                std::fs::read(dir.join(f)).unwrap(),
                std::fs::read(fixture().join(f)).unwrap(),
                "{f}"
            );
        }
    }
}

#[test]
fn compressed_tensors_w8a8_int_quantized() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("w8a8");
    let (p, rows, cols) = LINEARS[0];
    let w = weights(3, rows, cols);
    let scheme = QuantScheme::new(8, true, Granularity::Channel).unwrap();
    let ranges: Vec<Range> = w
        .chunks(cols)
        .map(|r| {
            Range::new(
                r.iter().copied().fold(0.0, f32::min),
                r.iter().copied().fold(0.0, f32::max),
            )
        })
        .collect();
    let (scales, zps): (Vec<f32>, Vec<i32>) = ranges
        .iter()
        .map(|&r| {
            let (s, z) = affine::qparams(r, &scheme);
            (packed::round_scale(s, Dtype::BF16).unwrap(), z)
        })
        .unzip();
    let aq = affine::quantize_with_params(&w, rows, cols, &scheme, &scales, &zps).unwrap();
    let input_scale = packed::round_scale(0.0123, Dtype::BF16).unwrap();
    let mut tensors = ct::int_quantized(
        &format!("{p}.weight"),
        &ct_linear(&aq),
        input_scale,
        Dtype::BF16,
    )
    .unwrap();
    tensors.push(dense("model.norm.weight", &[256], &vec![1.0; 256]));
    let qc = ct::quantization_config(
        &[ct::ConfigGroup {
            targets: vec!["Linear".into()],
            scheme: ct::Scheme {
                weights: ct::WeightArgs {
                    num_bits: 8,
                    symmetric: true,
                    strategy: ct::Strategy::Channel,
                },
                input_activations: Some(ct::StaticInputArgs { num_bits: 8 }),
            },
        }],
        &["lm_head".into()],
    )
    .unwrap();
    write_folder(&dir, &tensors, &SetOptions::default(), side_files(qc));

    let config: Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    let qc = &config["quantization_config"];
    assert_eq!(keys(qc), CT_TOP_KEYS);
    assert_eq!(qc["format"], "int-quantized");
    let group = &qc["config_groups"]["group_0"];
    assert_eq!(group["format"], "int-quantized");
    for block in ["weights", "input_activations"] {
        assert!(
            keys(&group[block])
                .iter()
                .all(|k| CT_ARGS_ACCEPTED.contains(k)),
            "{block}"
        );
    }
    assert_eq!(group["weights"]["strategy"], "channel");
    assert_eq!(group["weights"]["group_size"], Value::Null);
    assert_eq!(group["input_activations"]["strategy"], "tensor");
    assert_eq!(group["input_activations"]["dynamic"], false);

    // int-quantized: the weight is int8 itself, scales (out, 1), one input scale (1,).
    let stored = read_folder(&dir);
    let (dt, shape, q) = &stored[&format!("{p}.weight")];
    assert_eq!((dt.as_str(), shape.as_slice()), ("I8", &[rows, cols][..]));
    let (sdt, sshape, s) = &stored[&format!("{p}.weight_scale")];
    assert_eq!(sshape.as_slice(), &[rows, 1]);
    let s = scale_values(sdt, s);
    let got: Vec<f32> = q
        .iter()
        .enumerate()
        .map(|(i, &b)| f32::from(b as i8) * s[i / cols])
        .collect();
    assert_bits_eq(&got, &aq.dequantize(), "w8a8");
    assert!(!stored.contains_key(&format!("{p}.weight_zero_point")));
    let (idt, ishape, i) = &stored[&format!("{p}.input_scale")];
    assert_eq!(ishape.as_slice(), &[1]);
    assert_eq!(scale_values(idt, i), [input_scale]);
}

// ---------------------------------------------------------------------------------------------
// bitsandbytes
// ---------------------------------------------------------------------------------------------

/// bitsandbytes 4-bit decoding of weight `name`, written from the layout: codes two per byte,
/// first in the high nibble; `quant_map[code] · absmax[block]`; nested absmax restored as
/// `nested_quant_map[c] · nested_absmax[j / 256] + nested_offset`.
fn bnb_dequantize(tensors: &Stored, name: &str) -> (Vec<f32>, Value) {
    let state_key = tensors
        .keys()
        .find(|k| k.starts_with(&format!("{name}.quant_state.bitsandbytes__")))
        .unwrap();
    let (dt, _, state) = &tensors[state_key];
    assert_eq!(dt, "U8");
    let state: Value = serde_json::from_slice(state).unwrap();
    assert!(state_key.ends_with(state["quant_type"].as_str().unwrap()));
    let shape = state["shape"].as_array().unwrap();
    let n = shape
        .iter()
        .map(|d| d.as_u64().unwrap() as usize)
        .product::<usize>();
    let blocksize = state["blocksize"].as_u64().unwrap() as usize;
    let (dt, wshape, packed) = &tensors[name];
    assert_eq!(
        (dt.as_str(), wshape.as_slice()),
        ("U8", &[n.div_ceil(2), 1][..])
    );
    let (_, _, map) = &tensors[&format!("{name}.quant_map")];
    let table = le_f32(map);
    assert_eq!(table.len(), 16);
    let (adt, ashape, absmax) = &tensors[&format!("{name}.absmax")];
    assert_eq!(ashape.as_slice(), &[n.div_ceil(blocksize)]);
    let absmax: Vec<f32> =
        if let Some((_, _, nested)) = tensors.get(&format!("{name}.nested_absmax")) {
            assert_eq!(adt, "U8");
            let nested = le_f32(nested);
            let nmap = le_f32(&tensors[&format!("{name}.nested_quant_map")].2);
            assert_eq!(nmap.len(), 256);
            assert_eq!(state["nested_blocksize"], 256);
            let offset = state["nested_offset"].as_f64().unwrap() as f32;
            absmax
                .iter()
                .enumerate()
                .map(|(j, &c)| nmap[usize::from(c)] * nested[j / 256] + offset)
                .collect()
        } else {
            assert_eq!(adt, "F32");
            le_f32(absmax)
        };
    let values = (0..n)
        .map(|k| {
            let byte = packed[k / 2];
            let code = if k % 2 == 0 { byte >> 4 } else { byte & 0x0F };
            table[usize::from(code)] * absmax[k / blocksize]
        })
        .collect();
    (values, state)
}

#[test]
fn bitsandbytes_round_trip() {
    for (kind, ours, double_quant) in [
        (qbnb::Bnb4Kind::Nf4, bnb::QuantType::Nf4, false),
        (qbnb::Bnb4Kind::Nf4, bnb::QuantType::Nf4, true),
        (qbnb::Bnb4Kind::Fp4, bnb::QuantType::Fp4, true),
    ] {
        let what = format!("{} double_quant={double_quant}", kind.name());
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("bnb");
        let dynamic = qbnb::dynamic_map();
        // Odd element count and a short last block in the second layer.
        let layers = [
            (LINEARS[0].0, 64usize, 256usize),
            ("model.layers.0.mlp.gate_proj", 9, 37),
        ];
        let mut tensors = Vec::new();
        let mut expected = HashMap::new();
        for (i, &(p, rows, cols)) in layers.iter().enumerate() {
            let name = format!("{p}.weight");
            let w = weights(i as u64 + 11, rows, cols);
            let q = qbnb::quantize_4bit(&w, 64, kind).unwrap();
            let nested = double_quant.then(|| qbnb::double_quantize(&q.absmax));
            let state = qbnb::quant_state_json(
                kind,
                64,
                "bfloat16",
                &[rows, cols],
                nested.as_ref().map(|n| n.offset),
            );
            let absmax = match &nested {
                None => bnb::Absmax::Plain(&q.absmax),
                Some(n) => bnb::Absmax::Nested(bnb::NestedAbsmax {
                    codes: &n.codes,
                    nested_absmax: &n.nested_absmax,
                    nested_quant_map: &dynamic,
                    offset: n.offset,
                }),
            };
            let weight = bnb::Bnb4Weight {
                rows,
                cols,
                blocksize: 64,
                quant_type: ours,
                packed: &q.packed,
                absmax,
                quant_map: kind.quant_map(),
                quant_state: &state,
            };
            tensors.extend(bnb::encode(&name, &weight).unwrap());
            let restored = match &nested {
                None => q.absmax.clone(),
                Some(n) => qbnb::dequantize_nested_absmax(n).unwrap(),
            };
            expected.insert(
                name,
                qbnb::dequantize_4bit(&q.packed, &restored, rows * cols, 64, kind).unwrap(),
            );
        }
        tensors.push(dense("lm_head.weight", &[16, 256], &weights(9, 16, 256)));
        let qc = bnb::quantization_config(&bnb::BnbConfig {
            quant_type: ours,
            double_quant,
            compute_dtype: "bfloat16".into(),
            skip_modules: None,
        })
        .unwrap();
        write_folder(&dir, &tensors, &SetOptions::default(), side_files(qc));

        let config: Value =
            serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
        let qc = &config["quantization_config"];
        assert_eq!(keys(qc), bnb::QUANTIZATION_CONFIG_KEYS);
        assert_eq!(qc["quant_method"], "bitsandbytes");
        assert_eq!(qc["bnb_4bit_quant_type"], kind.name());
        assert_eq!(qc["bnb_4bit_use_double_quant"], double_quant);

        let stored = read_folder(&dir);
        for (name, want) in &expected {
            let (got, state) = bnb_dequantize(&stored, name);
            assert_eq!(state["dtype"], "bfloat16");
            assert_eq!(state.get("nested_offset").is_some(), double_quant);
            if kind == qbnb::Bnb4Kind::Nf4 {
                assert_bits_eq(&got, want, &format!("{what} {name}"));
            } else {
                // The serialized FP4 table has +0 at code 8 where bitsandbytes' kernels decode
                // -0 (kiln-quant reproduces the kernels); the values are equal.
                assert_eq!(got, *want, "{what} {name}");
            }
        }
    }
}

#[test]
fn bitsandbytes_tensors_equal_bitsandbytes_serialization() {
    // fixtures/golden/bnb-4bit.safetensors holds, per case, what bitsandbytes 0.50 produced for
    // `input_f32`: the packed weight as `<W>.<case>.packed` and `QuantState.as_dict(packed=True)`
    // as `<W>.<case>.state.<key>`; transformers saves these as `<W>` and `<W>.<key>`. kiln's
    // quantizer output, encoded by the writer, must give the same tensors: names, dtypes, shapes
    // and bytes.
    let path =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/golden/bnb-4bit.safetensors");
    let bytes = std::fs::read(path).unwrap();
    let golden = SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
    let cases: Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["cases"]).unwrap();
    let dynamic = qbnb::dynamic_map();
    let mut checked = 0;
    for (case_name, case) in cases.as_object().unwrap() {
        let (weight_name, _) = case_name.rsplit_once('.').unwrap();
        let input = golden.tensor(&format!("{weight_name}.input_f32")).unwrap();
        let (rows, cols) = (input.shape()[0], input.shape()[1]);
        let x = le_f32(input.data());
        let (kind, ours) = match case["quant_type"].as_str().unwrap() {
            "nf4" => (qbnb::Bnb4Kind::Nf4, bnb::QuantType::Nf4),
            _ => (qbnb::Bnb4Kind::Fp4, bnb::QuantType::Fp4),
        };
        let blocksize = case["blocksize"].as_u64().unwrap() as usize;
        let q = qbnb::quantize_4bit(&x, blocksize, kind).unwrap();
        let nested = (case["double_quant"] == true).then(|| qbnb::double_quantize(&q.absmax));
        let state_key = format!(
            "{case_name}.state.quant_state.bitsandbytes__{}",
            kind.name()
        );
        let golden_state: Value =
            serde_json::from_slice(golden.tensor(&state_key).unwrap().data()).unwrap();
        let state = qbnb::quant_state_json(
            kind,
            blocksize,
            golden_state["dtype"].as_str().unwrap(),
            &[rows, cols],
            nested.as_ref().map(|n| n.offset),
        );
        let absmax = match &nested {
            None => bnb::Absmax::Plain(&q.absmax),
            Some(n) => bnb::Absmax::Nested(bnb::NestedAbsmax {
                codes: &n.codes,
                nested_absmax: &n.nested_absmax,
                nested_quant_map: &dynamic,
                offset: n.offset,
            }),
        };
        let encoded = bnb::encode(
            weight_name,
            &bnb::Bnb4Weight {
                rows,
                cols,
                blocksize,
                quant_type: ours,
                packed: &q.packed,
                absmax,
                quant_map: kind.quant_map(),
                quant_state: &state,
            },
        )
        .unwrap();
        let golden_names: BTreeSet<String> = golden
            .names()
            .into_iter()
            .filter(|n| {
                n.starts_with(&format!("{case_name}.state.")) || *n == format!("{case_name}.packed")
            })
            .map(|n| match n.strip_prefix(&format!("{case_name}.state.")) {
                Some(key) => format!("{weight_name}.{key}"),
                None => weight_name.to_string(),
            })
            .collect();
        let ours_names: BTreeSet<String> = encoded.iter().map(|t| t.decl.name.clone()).collect();
        assert_eq!(ours_names, golden_names, "{case_name}");
        for t in &encoded {
            let golden_name = match t.decl.name.strip_prefix(&format!("{weight_name}.")) {
                Some(key) => format!("{case_name}.state.{key}"),
                None => format!("{case_name}.packed"),
            };
            let g = golden.tensor(&golden_name).unwrap();
            assert_eq!(t.decl.dtype.name(), g.dtype().to_string(), "{golden_name}");
            let shape: Vec<u64> = g.shape().iter().map(|&d| d as u64).collect();
            assert_eq!(t.decl.shape, shape, "{golden_name}");
            assert!(t.bytes == g.data(), "{golden_name}: bytes differ");
            checked += 1;
        }
        assert_eq!(
            case["packed_shape"],
            serde_json::json!(encoded[0].decl.shape)
        );
    }
    assert_eq!(checked, 4 * (4 + 6));
}

// ---------------------------------------------------------------------------------------------
// Sharding
// ---------------------------------------------------------------------------------------------

/// transformers' state-dict order for a Llama model (module registration order).
fn llama_state_dict_order(layers: usize) -> Vec<String> {
    let mut order = vec!["model.embed_tokens.weight".to_string()];
    for i in 0..layers {
        let p = format!("model.layers.{i}.");
        for m in ["q", "k", "v", "o"] {
            order.push(format!("{p}self_attn.{m}_proj.weight"));
        }
        for m in ["gate", "up", "down"] {
            order.push(format!("{p}mlp.{m}_proj.weight"));
        }
        order.push(format!("{p}input_layernorm.weight"));
        order.push(format!("{p}post_attention_layernorm.weight"));
    }
    order.push("model.norm.weight".into());
    order.push("lm_head.weight".into());
    order
}

#[test]
fn reproduces_transformers_shards_and_index_byte_for_byte() {
    // fixtures/tiny-llama was saved by transformers 5.23 with max_shard_size="4MB": two shards
    // and an index with total_parameters. Same tensors in the same state-dict order, same limit
    // → the same three files.
    let mut data = HashMap::new();
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ] {
        let bytes = std::fs::read(fixture().join(f)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let dtype = Dtype::from_name(&view.dtype().to_string()).unwrap();
            let shape: Vec<u64> = view.shape().iter().map(|&d| d as u64).collect();
            let decl = TensorDecl::new(name.clone(), dtype, shape);
            let bytes = view.data().to_vec();
            data.insert(name, PackedTensor { decl, bytes });
        }
    }
    let tensors: Vec<PackedTensor> = llama_state_dict_order(6)
        .into_iter()
        .map(|n| data.remove(&n).unwrap())
        .collect();
    assert!(data.is_empty());
    let config = std::fs::read(fixture().join("config.json")).unwrap();
    // config.json itself goes through the Python-style serializer unchanged.
    let parsed: Value = serde_json::from_slice(&config).unwrap();
    assert_eq!(packed::config_json_bytes(&parsed), config);

    let tmp = tempfile::tempdir().unwrap();
    let options = SetOptions {
        max_shard_bytes: Some(4_000_000),
        total_parameters: Some(3_804_416),
        ..SetOptions::default()
    };
    let written = write_folder(
        tmp.path(),
        &tensors,
        &options,
        vec![SideFile {
            name: "config.json".into(),
            bytes: packed::config_json_bytes(&parsed),
        }],
    );
    for f in [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        INDEX_FILE_NAME,
        "config.json",
    ] {
        assert!(
            std::fs::read(tmp.path().join(f)).unwrap() == std::fs::read(fixture().join(f)).unwrap(),
            "{f} differs from transformers' file"
        );
    }
    // The reported digests are those of the files on disk.
    for s in &written.shards {
        let bytes = std::fs::read(tmp.path().join(&s.file_name)).unwrap();
        assert_eq!(s.file.len, bytes.len() as u64);
        assert_eq!(s.file.xxh3.0, xxh3(&bytes));
        for t in &s.file.tensors {
            let range = t.file_offset as usize..(t.file_offset + t.nbytes) as usize;
            assert_eq!(t.xxh3.0, xxh3(&bytes[range]), "{}", t.name);
        }
    }
}

/// xxh3-64 through the writer's public hashing adapter (the test binary has no direct
/// dependency on the hash crate).
fn xxh3(bytes: &[u8]) -> u64 {
    use std::io::Write;
    let mut h = kiln_writer::HashingWriter::new(std::io::sink());
    h.write_all(bytes).unwrap();
    h.digest().0
}

#[test]
fn packed_model_in_many_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = Vec::new();
    for (i, &(p, rows, cols)) in LINEARS.iter().enumerate() {
        let aq = quantize(
            &weights(i as u64, rows, cols),
            rows,
            cols,
            4,
            false,
            Dtype::BF16,
        );
        tensors.extend(
            ct::pack_quantized(&format!("{p}.weight"), &ct_linear(&aq), Dtype::BF16).unwrap(),
        );
    }
    tensors.push(dense("model.norm.weight", &[256], &vec![1.0; 256]));
    tensors.push(dense("lm_head.weight", &[16, 256], &weights(9, 16, 256)));
    let total: u64 = tensors.iter().map(|t| t.bytes.len() as u64).sum();
    let options = SetOptions {
        max_shard_bytes: Some(6000),
        ..SetOptions::default()
    };
    let written = write_folder(tmp.path(), &tensors, &options, vec![]);
    let count = written.shards.len();
    assert!(count > 3, "{count} shards");

    let index: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join(INDEX_FILE_NAME)).unwrap()).unwrap();
    assert_eq!(keys(&index), ["metadata", "weight_map"]);
    assert_eq!(keys(&index["metadata"]), ["total_size"]);
    assert_eq!(index["metadata"]["total_size"], total);
    let map = index["weight_map"].as_object().unwrap();
    let names: BTreeSet<&str> = tensors.iter().map(|t| t.decl.name.as_str()).collect();
    assert_eq!(
        map.keys().map(String::as_str).collect::<BTreeSet<_>>(),
        names
    );
    let mut mapped_keys: Vec<&String> = map.keys().collect();
    mapped_keys.sort();
    assert_eq!(
        mapped_keys,
        map.keys().collect::<Vec<_>>(),
        "weight_map keys sorted"
    );
    // Every shard parses, holds exactly the tensors the index sends to it, once each.
    let mut seen = BTreeSet::new();
    for (i, s) in written.shards.iter().enumerate() {
        assert_eq!(
            s.file_name,
            format!("model-{:05}-of-{count:05}.safetensors", i + 1)
        );
        let bytes = std::fs::read(tmp.path().join(&s.file_name)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let format = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("format").cloned());
        assert_eq!(format.as_deref(), Some("pt"));
        for name in st.names() {
            assert_eq!(map[name], s.file_name.as_str(), "{name}");
            assert!(seen.insert(name.to_string()), "{name} in two shards");
            let t = tensors.iter().find(|t| t.decl.name == name).unwrap();
            assert_eq!(
                st.tensor(name).unwrap().data(),
                t.bytes.as_slice(),
                "{name}"
            );
        }
    }
    assert_eq!(seen.len(), tensors.len());
    // And the 4-bit asymmetric weights still decode.
    let stored = read_folder(tmp.path());
    let group = serde_json::json!({"num_bits": 4, "group_size": 128, "strategy": "group", "symmetric": false});
    let (p, rows, cols) = LINEARS[2];
    let aq = quantize(&weights(2, rows, cols), rows, cols, 4, false, Dtype::BF16);
    assert_bits_eq(&ct_dequantize(&stored, p, &group), &aq.dequantize(), p);
}

// ---------------------------------------------------------------------------------------------
// Failures
// ---------------------------------------------------------------------------------------------

fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn small_set() -> (SafetensorsSet, Vec<PackedTensor>) {
    let tensors = vec![
        dense("a.weight", &[64], &[0.5; 64]),
        dense("b.weight", &[64], &[0.25; 64]),
        dense("c.weight", &[64], &[0.125; 64]),
    ];
    let set = SafetensorsSet::plan(
        tensors.iter().map(|t| t.decl.clone()).collect(),
        &SetOptions {
            max_shard_bytes: Some(256),
            ..SetOptions::default()
        },
    )
    .unwrap();
    (set, tensors)
}

#[test]
fn failures_leave_nothing() {
    let tmp = tempfile::tempdir().unwrap();

    // Dropped before finishing, after one shard is complete and the next started.
    let dir = tmp.path().join("dropped");
    {
        let (set, tensors) = small_set();
        assert_eq!(set.shards().len(), 2);
        let mut w = FolderWriter::create(&dir, set, side_files(Value::Null)).unwrap();
        w.write_tensor(0, &tensors[0].bytes).unwrap();
        w.write_tensor(1, &tensors[1].bytes).unwrap();
        w.write_tensor_chunk(2, &tensors[2].bytes[..10]).unwrap();
        assert!(
            !listing(&dir).is_empty(),
            "temporary files exist while writing"
        );
    }
    assert!(!dir.exists(), "{:?}", listing(&dir));

    // An error mid-way (a tensor with the wrong size), then the caller gives up.
    let dir = tmp.path().join("error");
    {
        let (set, tensors) = small_set();
        let mut w = FolderWriter::create(&dir, set, vec![]).unwrap();
        w.write_tensor(0, &tensors[0].bytes).unwrap();
        let err = w.write_tensor(1, &tensors[1].bytes[1..]).unwrap_err();
        assert!(
            matches!(err, SafetensorsError::WrongTensorSize { ref tensor, .. } if tensor == "b.weight")
        );
        let err = w.finish().unwrap_err();
        assert!(matches!(err, SafetensorsError::Incomplete { ref next, .. } if next == "b.weight"));
    }
    assert!(!dir.exists());

    // A failed run over an existing artifact leaves the artifact as it was, and no temporary
    // files.
    let dir = tmp.path().join("existing");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("model.safetensors"), b"old weights").unwrap();
    std::fs::write(dir.join("config.json"), b"old config").unwrap();
    {
        let (set, tensors) = small_set();
        let mut w = FolderWriter::create(&dir, set, side_files(Value::Null)).unwrap();
        w.write_tensor(0, &tensors[0].bytes).unwrap();
        assert!(matches!(
            w.finish(),
            Err(SafetensorsError::Incomplete {
                written: 1,
                total: 3,
                ..
            })
        ));
    }
    assert_eq!(listing(&dir), ["config.json", "model.safetensors"]);
    assert_eq!(
        std::fs::read(dir.join("model.safetensors")).unwrap(),
        b"old weights"
    );
    assert_eq!(
        std::fs::read(dir.join("config.json")).unwrap(),
        b"old config"
    );

    // The same build, completed, replaces it (the stale single file goes, the shards and the
    // index appear).
    let (set, tensors) = small_set();
    let mut w = FolderWriter::create(&dir, set, side_files(Value::Null)).unwrap();
    for (i, t) in tensors.iter().enumerate() {
        w.write_tensor(i, &t.bytes).unwrap();
    }
    let written = w.finish().unwrap();
    assert_eq!(written.removed, ["model.safetensors"]);
    assert_eq!(
        listing(&dir),
        [
            "chat_template.jinja",
            "config.json",
            "generation_config.json",
            "model-00001-of-00002.safetensors",
            "model-00002-of-00002.safetensors",
            INDEX_FILE_NAME,
            "tokenizer.model",
            "tokenizer_config.json",
        ]
    );
}
