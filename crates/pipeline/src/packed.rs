//! Packed safetensors outputs: a Hugging Face folder whose linear weights are compressed-tensors
//! `pack-quantized` integers or bitsandbytes NF4/FP4, chosen per tensor by the recipe, with the
//! quantization method (RTN, GPTQ, AWQ, LSQ) the rule asks for.
//!
//! Everything is decided before anything is written: which tensors are packed, with which
//! scheme, the calibration statistics each method needs, and every output tensor's name, dtype and
//! size (packed sizes follow from shapes; a bitsandbytes weight's quant-state JSON is computed
//! once up front because its length depends on the data). Then tensors are processed one at a
//! time in checkpoint order and streamed into the shards, so memory follows the largest tensor.
//! Names stay the checkpoint's own; `config.json` gains `quantization_config`, the tokenizer and
//! generation files are copied, and all files are committed together.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_arch::{HParams, Mapped};
use kiln_quant::affine::{Granularity, QuantScheme, Range};
use kiln_quant::bnb::{self as qbnb, Bnb4Kind};
use kiln_quant::estimators::{self, Estimator};
use kiln_quant::methods::{self, Calibration, GptqConfig, Method as QMethod};
use kiln_reader::{Checkpoint, MmapAccess, TensorEntry};
use kiln_recipe::{
    EstimatorChoice, Method, OutputFormat, PackedOptions, PackedType, Recipe, TensorNames,
    TypeChoice,
};
use kiln_types::GgmlType;
use kiln_writer::packed::{bnb as wbnb, compressed_tensors as ct, PackedTensor};
use kiln_writer::safetensors::{
    Dtype, FolderWriter, SafetensorsSet, SetOptions, SideFile, TensorDecl, TensorOrder,
};
use serde::Serialize;

use crate::provenance::{
    xxh3_hex, FileRecord, InputRecord, Manifest, RecipeRecord, TensorRecord, MANIFEST_VERSION, TOOL,
};
use crate::stats::{module_name, LoadedStats};
use crate::PipelineError;

/// What happens to one checkpoint tensor.
#[derive(Debug, Clone, PartialEq)]
enum Treatment {
    /// Bytes copied as they are.
    Copy,
    /// Converted to another float type.
    Convert(GgmlType),
    /// compressed-tensors integers.
    Int {
        bits: u8,
        options: PackedOptions,
        /// The static input activation scale (W8A8), rounded to the scale dtype.
        input_scale: Option<f32>,
    },
    /// bitsandbytes 4-bit.
    Bnb {
        kind: Bnb4Kind,
        options: PackedOptions,
        /// The quant-state JSON (its length is part of the layout).
        quant_state: String,
    },
}

/// One tensor of a packed build.
#[derive(Debug, Clone, Serialize)]
pub struct PackedTensorReport {
    /// The checkpoint's tensor name (also the output's, for unpacked tensors).
    pub name: String,
    /// `copy`, a float type, `int4`, `nf4`, …
    pub stored_as: String,
    /// Why, when the recipe asked for something else (`1-D tensor`, `not a linear weight`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pinned: Option<String>,
    /// `rtn`, `gptq`, `awq` or `lsq` for packed integers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Output error ‖XWᵀ − XQᵀ‖² / n of round-to-nearest min–max, when calibration data exists.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error_before: Option<f64>,
    /// The same for the stored weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error_after: Option<f64>,
    /// ‖XWᵀ‖² / n, to read the errors as fractions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_energy: Option<f64>,
    /// Weight RMSE of round-to-nearest min–max.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_rmse_before: Option<f64>,
    /// Weight RMSE of the stored weights.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight_rmse_after: Option<f64>,
    /// The static input activation scale (W8A8), as stored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub input_scale: Option<f32>,
}

/// What a packed build did.
#[derive(Debug, Clone, Serialize)]
pub struct PackedReport {
    /// The output folder.
    pub output: PathBuf,
    /// `compressed-tensors` or `bitsandbytes`.
    pub format: String,
    /// Per checkpoint tensor, in order.
    pub tensors: Vec<PackedTensorReport>,
    /// Weight files written.
    pub files: Vec<String>,
    /// Bytes of tensor data written.
    pub tensor_bytes: u64,
    /// The manifest written beside the folder, when provenance is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
}

impl PackedReport {
    /// Mean over packed tensors with calibration data of (error after / error before).
    pub fn mean_error_ratio(&self) -> Option<f64> {
        crate::build::mean_error_ratio(
            self.tensors
                .iter()
                .map(|t| (t.output_error_before, t.output_error_after)),
        )
        .map(|(_, mean)| mean)
    }
}

struct PlannedTensor {
    entry: usize,
    treatment: Treatment,
    pinned: Option<String>,
    /// Rows and columns, for 2-D tensors.
    rows: usize,
    cols: usize,
}

/// Files next to the weights that a Hugging Face folder carries over unchanged.
const COPIED_SIDE_FILES: &[&str] = &[
    "generation_config.json",
    "tokenizer_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "added_tokens.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "merges.txt",
    "vocab.txt",
    "vocab.json",
];

/// Builds a packed safetensors folder as the recipe says (`[output] format` other than `gguf`).
pub fn build_packed(
    recipe: &Recipe,
    access: &MmapAccess,
    threads: Option<usize>,
) -> Result<PackedReport, PipelineError> {
    let input = recipe.input.clone().ok_or(PipelineError::NoInput)?;
    let output = recipe.output.clone().ok_or(PipelineError::NoOutput)?;
    let checkpoint = Checkpoint::open(access, &input)?;
    let files = crate::plan::side_files(&checkpoint)?;
    let arch_err = |source| PipelineError::Arch {
        path: checkpoint.folder().to_path_buf(),
        source,
    };
    let config = files
        .json("config.json")
        .map_err(arch_err)?
        .ok_or_else(|| arch_err(kiln_arch::ArchError::MissingConfig))?;
    let hp = HParams::from_config(&config).map_err(arch_err)?;
    let family = match kiln_arch::detect(&hp) {
        Ok(f) => f,
        Err(kiln_arch::ArchError::UnsupportedArchitecture(..)) => {
            return Err(PipelineError::NotUnderstood {
                path: checkpoint.folder().to_path_buf(),
                report: Box::new(crate::model_report(&checkpoint, &files)),
            })
        }
        Err(e) => return Err(arch_err(e)),
    };

    // Rules see the GGUF names too, so one recipe's selectors work for both output families.
    let mut gguf_names = Vec::new();
    let mut layers = Vec::new();
    let mut nes = Vec::new();
    for t in checkpoint.tensors() {
        let (name, layer) = match family
            .map_tensor(&hp, &t.name, &t.shape)
            .map_err(arch_err)?
        {
            Mapped::Tensor(m) => (m.gguf_name, m.layer),
            _ => (t.name.clone(), layer_of(&t.name)),
        };
        gguf_names.push(name);
        layers.push(layer);
        nes.push(t.shape.iter().rev().copied().collect::<Vec<u64>>());
    }
    let names: Vec<TensorNames<'_>> = checkpoint
        .tensors()
        .iter()
        .enumerate()
        .map(|(i, t)| TensorNames {
            hf: &t.name,
            gguf: &gguf_names[i],
            layer: layers[i],
            ne: &nes[i],
        })
        .collect();
    let model =
        crate::plan::model_facts(&hp, !gguf_names.iter().any(|n| n == "output.weight"), false)
            .map_err(arch_err)?;
    let assignments = recipe.assign(&names, &model);

    let stats = recipe
        .calibration
        .as_ref()
        .map(|path| LoadedStats::load(access, path))
        .transpose()?;
    let model_dtype = model_dtype(&config);

    // Decide every tensor.
    let mut planned = Vec::new();
    let mut decls = Vec::new();
    // Output tensor → (the checkpoint tensor it comes from, its declaration), for the manifest.
    let mut sources: BTreeMap<String, (String, TensorDecl)> = BTreeMap::new();
    for (i, (t, a)) in checkpoint.tensors().iter().zip(&assignments).enumerate() {
        let source_type = t
            .dtype
            .ggml()
            .ok_or_else(|| PipelineError::UnsupportedDtype {
                path: checkpoint.tensor_path(t).to_path_buf(),
                tensor: t.name.clone(),
                dtype: t.dtype.name(),
            })?;
        let linear = t.shape.len() == 2
            && t.name.ends_with(".weight")
            && layers[i].is_some()
            && gguf_names[i] != "token_embd.weight";
        let (rows, cols) = match t.shape.as_slice() {
            [r, c] => (*r as usize, *c as usize),
            _ => (0, 0),
        };
        let (treatment, pinned) = match a.choice {
            TypeChoice::Keep | TypeChoice::Default => (Treatment::Copy, None),
            TypeChoice::Type(ty) if ty == source_type => (Treatment::Copy, None),
            TypeChoice::Type(ty) => (Treatment::Convert(ty), None),
            TypeChoice::Packed(p) if !linear => (
                Treatment::Copy,
                Some(if t.shape.len() < 2 {
                    format!("{p} asked; 1-D tensors stay as they are")
                } else {
                    format!("{p} asked; only linear weights inside blocks are packed")
                }),
            ),
            TypeChoice::Packed(PackedType::Int(bits)) => {
                if let Some(g) = a.packed.group_size {
                    if cols % g as usize != 0 {
                        return Err(PipelineError::BadShape {
                            path: checkpoint.tensor_path(t).to_path_buf(),
                            tensor: t.name.clone(),
                            problem: format!(
                                "{cols} columns are not a multiple of the group size {g}"
                            ),
                        });
                    }
                }
                let input_scale = if a.packed.static_input_int8 {
                    let Some(s) = &stats else {
                        return Err(PipelineError::NoCalibration {
                            tensor: t.name.clone(),
                            method: "input-activations = \"int8\"".into(),
                        });
                    };
                    Some(static_input_scale(
                        s,
                        &t.name,
                        cols,
                        &a.packed,
                        model_dtype,
                    )?)
                } else {
                    None
                };
                (
                    Treatment::Int {
                        bits,
                        options: a.packed,
                        input_scale,
                    },
                    None,
                )
            }
            TypeChoice::Packed(p @ (PackedType::Nf4 | PackedType::Fp4)) => {
                let kind = if p == PackedType::Nf4 {
                    Bnb4Kind::Nf4
                } else {
                    Bnb4Kind::Fp4
                };
                let values = read_f32(&checkpoint, t, source_type)?;
                let quant_state =
                    bnb_encode(&t.name, &values, rows, cols, kind, a.packed, model_dtype)?.1;
                (
                    Treatment::Bnb {
                        kind,
                        options: a.packed,
                        quant_state,
                    },
                    None,
                )
            }
        };
        if let Treatment::Int { options, .. } = &treatment {
            if options.method.needs_calibration() {
                let method = format!("{:?}", options.method).to_lowercase();
                match &stats {
                    Some(s) => {
                        s.gram_for(&t.name, cols, &method)?;
                    }
                    None => {
                        return Err(PipelineError::NoCalibration {
                            tensor: t.name.clone(),
                            method,
                        })
                    }
                }
            }
        }
        for decl in tensor_decls(t, source_type, &treatment, rows, cols, model_dtype)? {
            sources.insert(decl.name.clone(), (t.name.clone(), decl.clone()));
            decls.push(decl);
        }
        planned.push(PlannedTensor {
            entry: i,
            treatment,
            pinned,
            rows,
            cols,
        });
    }

    // The folder: shards, index, config.json with quantization_config, tokenizer files.
    let max_shard_bytes = recipe
        .max_shard_size
        .as_deref()
        .map(kiln_writer::split::parse_size)
        .transpose()
        .map_err(|source| PipelineError::Split { source })?;
    let set = SafetensorsSet::plan(
        decls,
        &SetOptions {
            max_shard_bytes,
            // Tensors are produced one source tensor at a time, in checkpoint order.
            order: TensorOrder::Declared,
            ..SetOptions::default()
        },
    )
    .map_err(|source| PipelineError::WriteSafetensors {
        path: output.clone(),
        source,
    })?;
    let mut config_out = config.clone();
    let block = quantization_config(recipe.format, &planned, checkpoint.tensors(), model_dtype)?;
    kiln_writer::packed::set_quantization_config(&mut config_out, block)?;
    let mut side = vec![SideFile {
        name: "config.json".into(),
        bytes: kiln_writer::packed::config_json_bytes(&config_out),
    }];
    for name in COPIED_SIDE_FILES {
        if let Some(bytes) = files
            .get(name)
            .map(<[u8]>::to_vec)
            .or_else(|| checkpoint.read_side_file(name).ok().flatten())
        {
            side.push(SideFile {
                name: name.to_string(),
                bytes,
            });
        }
    }
    let write_err = |source| PipelineError::WriteSafetensors {
        path: output.clone(),
        source,
    };
    let mut writer = FolderWriter::create(&output, set, side).map_err(write_err)?;

    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().map_err(|e| PipelineError::Threads {
        threads: threads.unwrap_or(0),
        message: e.to_string(),
    })?;
    let mut reports = Vec::new();
    let mut tensor_bytes = 0u64;
    for p in &planned {
        let t = &checkpoint.tensors()[p.entry];
        let source_type = t.dtype.ggml().unwrap_or(GgmlType::F32);
        let (out, report) =
            pool.install(|| produce(&checkpoint, t, source_type, p, stats.as_ref(), model_dtype))?;
        for packed in out {
            tensor_bytes += packed.bytes.len() as u64;
            let index = writer.set().position(&packed.decl.name).ok_or_else(|| {
                PipelineError::PackedRecipe(format!("{} was not planned", packed.decl.name))
            })?;
            writer
                .write_tensor(index, &packed.bytes)
                .map_err(write_err)?;
        }
        checkpoint.release_range(t, 0, t.byte_len());
        reports.push(PackedTensorReport {
            pinned: p.pinned.clone(),
            ..report
        });
    }
    let written = writer.finish().map_err(write_err)?;
    let manifest = if recipe.provenance {
        let mut inputs = crate::plan::hash_files(
            checkpoint
                .shard_files()
                .map(|(path, file)| ("weights", path, file))
                .collect(),
        );
        for name in kiln_arch::SIDE_FILE_NAMES
            .iter()
            .chain(COPIED_SIDE_FILES)
            .copied()
            .collect::<std::collections::BTreeSet<_>>()
        {
            let bytes = match files.get(name) {
                Some(b) => Some(b.to_vec()),
                None => checkpoint.read_side_file(name).ok().flatten(),
            };
            if let Some(bytes) = bytes {
                inputs.push(InputRecord::new("side-file", Path::new(name), &bytes));
            }
        }
        if let Some(s) = &stats {
            inputs.push(s.record().clone());
        }
        let manifest = folder_manifest(recipe, &output, inputs, &written, &sources);
        let path = Manifest::path_for(&output);
        crate::verify::write_manifest_file(&path, &manifest)?;
        Some(path)
    } else {
        None
    };
    Ok(PackedReport {
        manifest,
        output,
        format: match recipe.format {
            OutputFormat::Bitsandbytes => "bitsandbytes",
            _ => "compressed-tensors",
        }
        .into(),
        tensors: reports,
        files: written.shards.iter().map(|s| s.file_name.clone()).collect(),
        tensor_bytes,
    })
}

/// The static per-tensor int8 scale of a linear layer's input: the estimator's clipping
/// threshold from the statistics (the largest |x| of any column, and the |x| histogram for the
/// other estimators), turned into a scale as compressed-tensors does for a symmetric 8-bit range
/// (`a / 127.5`), rounded to the dtype it is stored in.
fn static_input_scale(
    stats: &LoadedStats,
    weight: &str,
    cols: usize,
    options: &PackedOptions,
    model_dtype: Dtype,
) -> Result<f32, PipelineError> {
    let module = stats.input_stats(weight, cols, "input-activations = \"int8\"")?;
    let absmax = module
        .min()
        .iter()
        .chain(module.max())
        .filter(|v| v.is_finite())
        .fold(0.0f32, |m, v| m.max(v.abs()));
    let histogram = module.histogram();
    let threshold = estimators::activation_threshold(
        absmax,
        histogram.map(|h| estimators::MagnitudeHistogram {
            counts: h.counts(),
            max: h.spec().max,
        }),
        8,
        estimator_of(options.activation_estimator),
    )
    .map_err(|e| PipelineError::PackedRecipe(format!("{weight}: input activation range: {e}")))?;
    let scheme = QuantScheme {
        bits: 8,
        symmetric: true,
        granularity: Granularity::Tensor,
    };
    let (scale, _) = kiln_quant::affine::qparams(Range::new(-threshold, threshold), &scheme);
    Ok(kiln_writer::packed::round_scale(scale, model_dtype).unwrap_or(scale))
}

/// The manifest of a folder: files are named by their path from the manifest's directory
/// (`<folder>/model.safetensors`), weight files first (their header being the safetensors
/// header), then the index and the side files (no header: their whole content is the check).
fn folder_manifest(
    recipe: &Recipe,
    output: &Path,
    inputs: Vec<InputRecord>,
    written: &kiln_writer::safetensors::WrittenSet,
    sources: &BTreeMap<String, (String, TensorDecl)>,
) -> Manifest {
    let folder = output
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let in_folder = |name: &str| format!("{folder}/{name}");
    let mut files = Vec::new();
    let mut tensors = Vec::new();
    for shard in &written.shards {
        for t in &shard.file.tensors {
            let (source, decl) = sources
                .get(&t.name)
                .map(|(s, d)| (s.clone(), Some(d)))
                .unwrap_or_else(|| (t.name.clone(), None));
            tensors.push(TensorRecord {
                name: t.name.clone(),
                source,
                ty: decl.map(|d| format!("{:?}", d.dtype)).unwrap_or_default(),
                shape: decl.map(|d| d.shape.clone()).unwrap_or_default(),
                file: files.len(),
                offset: t.file_offset,
                bytes: t.nbytes,
                xxh3: t.xxh3.to_string(),
            });
        }
        files.push(FileRecord {
            name: in_folder(&shard.file_name),
            bytes: shard.file.len,
            xxh3: shard.file.xxh3.to_string(),
            header_bytes: shard.header_len,
            header_xxh3: shard.header_xxh3.to_string(),
        });
    }
    for side in written.index.iter().chain(&written.side_files) {
        files.push(FileRecord {
            name: in_folder(&side.file_name),
            bytes: side.len,
            xxh3: side.xxh3.to_string(),
            header_bytes: 0,
            header_xxh3: xxh3_hex(&[]),
        });
    }
    let normalized = recipe.normalized();
    Manifest {
        kiln_manifest: MANIFEST_VERSION,
        tool: TOOL.to_string(),
        recipe: RecipeRecord {
            xxh3: xxh3_hex(normalized.as_bytes()),
            normalized,
        },
        inputs,
        files,
        tensors,
    }
}

/// The first numeric component of a name, for rules on tensors the family does not map.
fn layer_of(name: &str) -> Option<u32> {
    name.split('.').find_map(|p| p.parse().ok())
}

/// The dtype scales are stored in: the model's (`torch_dtype` / `dtype`), else F32.
fn model_dtype(config: &serde_json::Value) -> Dtype {
    let name = config
        .get("torch_dtype")
        .or_else(|| config.get("dtype"))
        .and_then(|v| v.as_str())
        .unwrap_or("float32");
    match name {
        "bfloat16" => Dtype::BF16,
        "float16" => Dtype::F16,
        _ => Dtype::F32,
    }
}

fn dtype_name(dtype: Dtype) -> &'static str {
    match dtype {
        Dtype::BF16 => "bfloat16",
        Dtype::F16 => "float16",
        _ => "float32",
    }
}

fn float_dtype(ty: GgmlType) -> Dtype {
    match ty {
        GgmlType::F16 => Dtype::F16,
        GgmlType::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    }
}

fn read_f32(
    checkpoint: &Checkpoint,
    t: &TensorEntry,
    source_type: GgmlType,
) -> Result<Vec<f32>, PipelineError> {
    let mut values = vec![0.0f32; t.element_count() as usize];
    kiln_quant::dequantize_rows(source_type, checkpoint.data(t), &mut values).map_err(
        |source| PipelineError::Quant {
            tensor: t.name.clone(),
            source,
        },
    )?;
    Ok(values)
}

fn scheme_of(bits: u8, options: &PackedOptions) -> QuantScheme {
    QuantScheme {
        bits,
        symmetric: options.symmetric,
        granularity: match options.group_size {
            Some(g) => Granularity::Group(g as usize),
            None => Granularity::Channel,
        },
    }
}

fn estimator_of(e: EstimatorChoice) -> Estimator {
    match e {
        EstimatorChoice::MinMax => Estimator::MinMax,
        EstimatorChoice::Percentile => Estimator::Percentile { percentile: 99.9 },
        EstimatorChoice::Mse => Estimator::MSE_DEFAULT,
        EstimatorChoice::Kl => Estimator::KL_DEFAULT,
    }
}

fn method_of(options: &PackedOptions) -> QMethod {
    let estimator = estimator_of(options.estimator);
    match options.method {
        Method::Rtn => QMethod::Rtn { estimator },
        Method::Gptq => QMethod::Gptq(GptqConfig {
            act_order: options.act_order,
            estimator,
            ..GptqConfig::default()
        }),
        Method::Awq => QMethod::Awq(methods::AwqConfig {
            estimator,
            ..methods::AwqConfig::default()
        }),
        Method::Lsq => QMethod::Lsq(methods::LsqConfig {
            estimator,
            ..methods::LsqConfig::default()
        }),
    }
}

fn strategy_of(options: &PackedOptions) -> ct::Strategy {
    match options.group_size {
        Some(g) => ct::Strategy::Group(g as usize),
        None => ct::Strategy::Channel,
    }
}

fn bnb_type(kind: Bnb4Kind) -> wbnb::QuantType {
    match kind {
        Bnb4Kind::Nf4 => wbnb::QuantType::Nf4,
        Bnb4Kind::Fp4 => wbnb::QuantType::Fp4,
    }
}

/// The output declarations of one tensor.
fn tensor_decls(
    t: &TensorEntry,
    source_type: GgmlType,
    treatment: &Treatment,
    rows: usize,
    cols: usize,
    model_dtype: Dtype,
) -> Result<Vec<TensorDecl>, PipelineError> {
    Ok(match treatment {
        Treatment::Copy => vec![TensorDecl::new(
            t.name.clone(),
            float_dtype(source_type),
            t.shape.clone(),
        )],
        Treatment::Convert(ty) => vec![TensorDecl::new(
            t.name.clone(),
            float_dtype(*ty),
            t.shape.clone(),
        )],
        Treatment::Int {
            bits,
            options,
            input_scale,
        } => {
            let args = ct::WeightArgs {
                num_bits: *bits,
                symmetric: options.symmetric,
                strategy: strategy_of(options),
            };
            match input_scale {
                Some(_) => ct::int_quantized_decls(&t.name, rows, cols, &args, model_dtype)?,
                None => ct::pack_quantized_decls(&t.name, rows, cols, &args, model_dtype)?,
            }
        }
        Treatment::Bnb {
            kind,
            options,
            quant_state,
        } => wbnb::tensor_decls(
            &t.name,
            rows,
            cols,
            qbnb::DEFAULT_BLOCKSIZE,
            bnb_type(*kind),
            options.double_quant,
            quant_state.len(),
        )?,
    })
}

/// bitsandbytes 4-bit encoding of one weight: the tensors and the quant-state JSON.
fn bnb_encode(
    name: &str,
    values: &[f32],
    rows: usize,
    cols: usize,
    kind: Bnb4Kind,
    options: PackedOptions,
    model_dtype: Dtype,
) -> Result<(Vec<PackedTensor>, String), PipelineError> {
    let blocksize = qbnb::DEFAULT_BLOCKSIZE;
    let q = qbnb::quantize_4bit(values, blocksize, kind).map_err(|source| PipelineError::Bnb {
        tensor: name.to_string(),
        source,
    })?;
    let nested = options
        .double_quant
        .then(|| qbnb::double_quantize(&q.absmax));
    let quant_state = qbnb::quant_state_json(
        kind,
        blocksize,
        dtype_name(model_dtype),
        &[rows, cols],
        nested.as_ref().map(|n| n.offset),
    );
    let dynamic = qbnb::dynamic_map();
    let absmax = match &nested {
        Some(n) => wbnb::Absmax::Nested(wbnb::NestedAbsmax {
            codes: &n.codes,
            nested_absmax: &n.nested_absmax,
            nested_quant_map: &dynamic,
            offset: n.offset,
        }),
        None => wbnb::Absmax::Plain(&q.absmax),
    };
    let tensors = wbnb::encode(
        name,
        &wbnb::Bnb4Weight {
            rows,
            cols,
            blocksize,
            quant_type: bnb_type(kind),
            packed: &q.packed,
            absmax,
            quant_map: kind.quant_map(),
            quant_state: &quant_state,
        },
    )?;
    Ok((tensors, quant_state))
}

/// Converts, quantizes or copies one tensor.
fn produce(
    checkpoint: &Checkpoint,
    t: &TensorEntry,
    source_type: GgmlType,
    p: &PlannedTensor,
    stats: Option<&LoadedStats>,
    model_dtype: Dtype,
) -> Result<(Vec<PackedTensor>, PackedTensorReport), PipelineError> {
    let mut report = PackedTensorReport {
        name: t.name.clone(),
        stored_as: String::new(),
        pinned: None,
        method: None,
        output_error_before: None,
        output_error_after: None,
        output_energy: None,
        weight_rmse_before: None,
        weight_rmse_after: None,
        input_scale: None,
    };
    let quant_err = |source| PipelineError::Quant {
        tensor: t.name.clone(),
        source,
    };
    let out = match &p.treatment {
        Treatment::Copy => {
            report.stored_as = "copy".into();
            vec![PackedTensor {
                decl: TensorDecl::new(t.name.clone(), float_dtype(source_type), t.shape.clone()),
                bytes: checkpoint.data(t).to_vec(),
            }]
        }
        Treatment::Convert(ty) => {
            report.stored_as = ty.to_string();
            let values = read_f32(checkpoint, t, source_type)?;
            let row = t.shape.last().copied().unwrap_or(1).max(1);
            let mut bytes =
                vec![0u8; ty.tensor_bytes(&[values.len() as u64]).unwrap_or(0) as usize];
            kiln_quant::quantize_rows(*ty, &values, row as usize, None, &mut bytes)
                .map_err(quant_err)?;
            vec![PackedTensor {
                decl: TensorDecl::new(t.name.clone(), float_dtype(*ty), t.shape.clone()),
                bytes,
            }]
        }
        Treatment::Int {
            bits,
            options,
            input_scale,
        } => {
            report.stored_as = format!("int{bits}");
            report.input_scale = *input_scale;
            let method = method_of(options);
            report.method = Some(method.name().to_string());
            let values = read_f32(checkpoint, t, source_type)?;
            let module = stats.and_then(|s| s.with_gram(&t.name));
            let calib = module.and_then(|m| {
                m.gram().map(|gram| Calibration {
                    gram,
                    n: m.count().max(1),
                    act_abs_mean: None,
                })
            });
            let scheme = scheme_of(*bits, options);
            let result =
                methods::quantize_affine(&method, &values, p.rows, p.cols, &scheme, calib.as_ref())
                    .map_err(|source| PipelineError::Method {
                        tensor: t.name.clone(),
                        source,
                    })?;
            // Scales are stored in the model's dtype; round them first so the reported error is
            // the error of what is stored.
            let mut q = result.quantized;
            for s in &mut q.scales {
                *s = kiln_writer::packed::round_scale(*s, model_dtype).unwrap_or(*s);
            }
            let stored = q.dequantize();
            report.weight_rmse_before = Some(result.weight_rmse_before);
            report.weight_rmse_after = Some(methods::weight_rmse(&values, &stored));
            if let Some(c) = &calib {
                report.output_error_before = result.error_before;
                report.output_energy = result.output_energy;
                let error = methods::output_error(&values, &stored, p.rows, p.cols, c.gram)
                    .map_err(|source| PipelineError::Method {
                        tensor: t.name.clone(),
                        source,
                    })?;
                report.output_error_after = Some(error / c.n as f64);
            }
            let linear = ct::QuantizedLinear {
                rows: p.rows,
                cols: p.cols,
                weights: ct::WeightArgs {
                    num_bits: *bits,
                    symmetric: options.symmetric,
                    strategy: strategy_of(options),
                },
                q: &q.q,
                scales: &q.scales,
                zero_points: &q.zero_points,
            };
            match input_scale {
                Some(scale) => ct::int_quantized(&t.name, &linear, *scale, model_dtype)?,
                None => ct::pack_quantized(&t.name, &linear, model_dtype)?,
            }
        }
        Treatment::Bnb { kind, options, .. } => {
            report.stored_as = match kind {
                Bnb4Kind::Nf4 => "nf4",
                Bnb4Kind::Fp4 => "fp4",
            }
            .into();
            let values = read_f32(checkpoint, t, source_type)?;
            bnb_encode(
                &t.name,
                &values,
                p.rows,
                p.cols,
                *kind,
                *options,
                model_dtype,
            )?
            .0
        }
    };
    Ok((out, report))
}

/// The `quantization_config` block: one config group per distinct integer scheme (targets are
/// the module names using it), or the bitsandbytes block.
fn quantization_config(
    format: OutputFormat,
    planned: &[PlannedTensor],
    tensors: &[TensorEntry],
    model_dtype: Dtype,
) -> Result<serde_json::Value, PipelineError> {
    let packed_modules = |keep: &dyn Fn(&Treatment) -> bool| -> Vec<String> {
        planned
            .iter()
            .filter(|p| keep(&p.treatment))
            .map(|p| module_name(&tensors[p.entry].name).to_string())
            .collect()
    };
    // Linear modules left dense (so that loaders that target every Linear skip them).
    let dense: Vec<String> = planned
        .iter()
        .filter(|p| {
            let t = &tensors[p.entry];
            t.shape.len() == 2
                && t.name.ends_with(".weight")
                && matches!(p.treatment, Treatment::Copy | Treatment::Convert(_))
                && !t.name.contains("embed")
        })
        .map(|p| module_name(&tensors[p.entry].name).to_string())
        .collect();
    match format {
        OutputFormat::Bitsandbytes => {
            let first = planned.iter().find_map(|p| match &p.treatment {
                Treatment::Bnb { kind, options, .. } => Some((*kind, *options)),
                _ => None,
            });
            let (kind, options) = first.unwrap_or((Bnb4Kind::Nf4, PackedOptions::default()));
            let mixed = packed_modules(
                &|t| matches!(t, Treatment::Bnb { kind: k, options: o, .. } if *k != kind || o.double_quant != options.double_quant),
            );
            if !mixed.is_empty() {
                return Err(PipelineError::PackedRecipe(format!(
                    "bitsandbytes outputs use one 4-bit type and double-quantization setting for \
                     every weight; these differ: {}",
                    mixed.join(", ")
                )));
            }
            Ok(wbnb::quantization_config(&wbnb::BnbConfig {
                quant_type: bnb_type(kind),
                double_quant: options.double_quant,
                compute_dtype: dtype_name(model_dtype).into(),
                skip_modules: Some(dense),
            })?)
        }
        _ => {
            let mut groups: BTreeMap<(u8, bool, Option<u32>, bool), Vec<String>> = BTreeMap::new();
            for p in planned {
                if let Treatment::Int {
                    bits,
                    options,
                    input_scale,
                } = &p.treatment
                {
                    groups
                        .entry((
                            *bits,
                            options.symmetric,
                            options.group_size,
                            input_scale.is_some(),
                        ))
                        .or_default()
                        .push(module_name(&tensors[p.entry].name).to_string());
                }
            }
            // Sorted, so a layer's modules read the same whichever shard they came from.
            groups.values_mut().for_each(|m| m.sort());
            let single = groups.len() == 1;
            let config_groups: Vec<ct::ConfigGroup> = groups
                .into_iter()
                .map(
                    |((bits, symmetric, group, w8a8), modules)| ct::ConfigGroup {
                        // One scheme for all: the usual `["Linear"]` target with the rest ignored.
                        targets: if single {
                            vec!["Linear".into()]
                        } else {
                            modules
                        },
                        scheme: ct::Scheme {
                            weights: ct::WeightArgs {
                                num_bits: bits,
                                symmetric,
                                strategy: match group {
                                    Some(g) => ct::Strategy::Group(g as usize),
                                    None => ct::Strategy::Channel,
                                },
                            },
                            input_activations: w8a8.then_some(ct::StaticInputArgs { num_bits: 8 }),
                        },
                    },
                )
                .collect();
            let mut ignore = dense;
            if !ignore.iter().any(|m| m == "lm_head") {
                ignore.push("lm_head".into());
            }
            Ok(ct::quantization_config(&config_groups, &ignore)?)
        }
    }
}
