//! From recipe to build plan: every decision made, nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use kiln_arch::{HParams, Mapped, MetadataInputs, ParamCounts, SideFiles, Transform};
use kiln_reader::{Checkpoint, MmapAccess};
use kiln_recipe::{Method, ModelFacts, Recipe, TensorNames, TypeChoice};
use kiln_types::{FileType, GgmlType, MetaArray, MetaValue};

use crate::imatrix::LoadedImatrix;
use crate::input::Input;
use crate::provenance::{kiln_keys, xxh3_hex, InputRecord, RecipeRecord};
use crate::stats::LoadedStats;
use crate::PipelineError;

/// Why a tensor gets its type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A recipe rule matched.
    Rule {
        /// Its index.
        index: usize,
        /// Its label.
        label: String,
    },
    /// No rule matched; the recipe default applies.
    Default,
    /// llama.cpp never quantizes this tensor (norms, biases, routers...): it is stored as F32
    /// (from a checkpoint) or kept in its stored type (from a GGUF input), whatever the recipe
    /// asked.
    Pinned {
        /// Why.
        reason: &'static str,
        /// What the recipe asked for.
        wanted: TypeChoice,
    },
    /// The requested type cannot store this shape; a fallback type is used.
    Fallback {
        /// What the recipe asked for.
        wanted: GgmlType,
        /// Why it could not be used.
        reason: String,
    },
}

impl std::fmt::Display for Decision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Rule { label, .. } => f.write_str(label),
            Decision::Default => f.write_str("default"),
            Decision::Pinned { reason, .. } => write!(f, "pinned ({reason})"),
            Decision::Fallback { wanted, reason } => write!(f, "fallback from {wanted} ({reason})"),
        }
    }
}

/// How a quantized tensor's values are chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WeightMethod {
    /// The block kernel's own rounding (with the importance matrix, when one applies).
    Kernel,
    /// The recipe asked for GPTQ, but it does not apply to this tensor; the kernel's rounding is
    /// used.
    KernelInstead {
        /// Why GPTQ does not apply.
        reason: &'static str,
    },
    /// GPTQ with the Gram matrix of the input of this checkpoint module.
    Gptq {
        /// The checkpoint name of the weight, which names the statistics' module.
        weight: String,
        /// Columns in order of decreasing Hessian diagonal.
        act_order: bool,
    },
}

impl std::fmt::Display for WeightMethod {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WeightMethod::Kernel => f.write_str("rtn"),
            WeightMethod::KernelInstead { reason } => write!(f, "rtn (gptq asked; {reason})"),
            WeightMethod::Gptq {
                act_order: false, ..
            } => f.write_str("gptq"),
            WeightMethod::Gptq {
                act_order: true, ..
            } => f.write_str("gptq (act-order)"),
        }
    }
}

/// What happens to one tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Name in the input.
    pub source_name: String,
    /// Name in the output.
    pub name: String,
    /// Layer, if any.
    pub layer: Option<u32>,
    /// Source element type.
    pub source_type: GgmlType,
    /// Output dimensions, fastest first.
    pub ne: Vec<u64>,
    /// Output type.
    pub ty: GgmlType,
    /// Why that type.
    pub decision: Decision,
    /// Output byte size (without padding).
    pub nbytes: u64,
    /// Row transform on the way.
    pub transform: Transform,
    /// Importance weights (one per column, or per column and expert), when used.
    pub imatrix: Option<Arc<[f32]>>,
    /// 1 is added to every value on the way (Gemma norm weights).
    pub plus_one: bool,
    /// How quantized values are chosen.
    pub method: WeightMethod,
    /// Bytes of a tensor kiln generates rather than reads (little-endian F32).
    pub(crate) generated: Option<Arc<[u8]>>,
    pub(crate) entry: usize,
    /// Every source tensor, in order (several for stacked expert tensors).
    pub(crate) entries: Vec<usize>,
}

impl TensorPlan {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.ne.iter().product()
    }
}

/// A fully decided build.
#[derive(Debug)]
pub struct BuildPlan {
    /// The input (checkpoint folder, safetensors file or GGUF file).
    pub input: PathBuf,
    /// The artifact.
    pub output: PathBuf,
    /// `general.architecture`.
    pub arch: String,
    /// `general.file_type`.
    pub file_type: FileType,
    /// Tensors in output order.
    pub tensors: Vec<TensorPlan>,
    /// All metadata in output order.
    pub metadata: Vec<(String, MetaValue)>,
    /// GGUF alignment.
    pub alignment: u64,
    /// Every file read, with its size and hash.
    pub inputs: Vec<InputRecord>,
    /// The recipe as recorded.
    pub recipe: RecipeRecord,
    /// Whether a manifest is written beside the artifact.
    pub provenance: bool,
    /// How the output is split into shards, if it is.
    pub split: Option<kiln_writer::split::SplitLimit>,
    pub(crate) source: Input,
    /// Activation statistics, when a tensor is quantized with GPTQ.
    pub(crate) stats: Option<Arc<LoadedStats>>,
}

impl BuildPlan {
    /// Total output bytes of tensor data (without padding).
    pub fn tensor_bytes(&self) -> u64 {
        self.tensors.iter().map(|t| t.nbytes).sum()
    }

    /// Total parameters.
    pub fn parameters(&self) -> u64 {
        self.tensors.iter().map(TensorPlan::elements).sum()
    }
}

/// A tensor before the recipe decided its type.
struct Candidate {
    entry: usize,
    entries: Vec<usize>,
    source_name: String,
    name: String,
    layer: Option<u32>,
    source_type: GgmlType,
    ne: Vec<u64>,
    transform: Transform,
    pin: Option<&'static str>,
    plus_one: bool,
    generated: Option<Arc<[u8]>>,
}

/// Decides everything about a build without writing anything.
pub fn plan(recipe: &Recipe, access: &MmapAccess) -> Result<BuildPlan, PipelineError> {
    let input_path = recipe.input.clone().ok_or(PipelineError::NoInput)?;
    let output = recipe.output.clone().ok_or(PipelineError::NoOutput)?;
    let imatrix = match &recipe.imatrix {
        Some(path) => Some(LoadedImatrix::load(
            access,
            path,
            &recipe.imatrix_include,
            &recipe.imatrix_exclude,
        )?),
        None => None,
    };
    // Read only when a tensor may use them: they are an input of the artifact once read.
    let wants_stats = recipe.packed_default.method == Method::Gptq
        || recipe.rules.iter().any(|r| r.packed.method == Method::Gptq);
    let stats = match &recipe.calibration {
        Some(path) if wants_stats => Some(LoadedStats::load(access, path)?),
        _ => None,
    };
    let calibration = Calibration {
        imatrix: imatrix.as_ref(),
        stats: stats.as_ref(),
    };
    let mut planned = if is_gguf(&input_path) {
        plan_gguf(recipe, access, &input_path, calibration)?
    } else {
        plan_checkpoint(recipe, access, &input_path, calibration)?
    };
    if let Some(m) = &imatrix {
        planned.inputs.push(m.record().clone());
    }
    // Kept only if a tensor uses them (a recipe may ask for GPTQ where it does not apply).
    if let Some(s) = stats.filter(|_| {
        planned
            .tensors
            .iter()
            .any(|t| matches!(t.method, WeightMethod::Gptq { .. }))
    }) {
        planned.inputs.push(s.record().clone());
        planned.stats = Some(Arc::new(s));
    }
    let normalized = recipe.normalized();
    planned.recipe = RecipeRecord {
        xxh3: xxh3_hex(normalized.as_bytes()),
        normalized,
    };
    planned.provenance = recipe.provenance;
    planned.split = match recipe.split() {
        (Some(n), _) => Some(kiln_writer::split::SplitLimit::MaxTensors(n)),
        (None, Some(size)) => Some(kiln_writer::split::SplitLimit::MaxBytes(
            kiln_writer::split::parse_size(size)
                .map_err(|source| PipelineError::Split { source })?,
        )),
        (None, None) => None,
    };
    if recipe.provenance {
        let keys = kiln_keys(&planned.recipe.xxh3, &planned.inputs);
        planned
            .metadata
            .retain(|(k, _)| !keys.iter().any(|(key, _)| key == k));
        planned.metadata.extend(keys);
    }
    if let Ok(out) = output.canonicalize() {
        if planned
            .source
            .files()
            .iter()
            .any(|p| p.canonicalize().ok().as_deref() == Some(out.as_path()))
        {
            return Err(PipelineError::OutputIsInput(output));
        }
    }
    Ok(BuildPlan {
        input: input_path,
        output,
        ..planned
    })
}

fn is_gguf(path: &Path) -> bool {
    use std::io::Read;
    let mut magic = [0u8; 4];
    path.is_file()
        && std::fs::File::open(path)
            .and_then(|mut f| f.read_exact(&mut magic))
            .is_ok()
        && &magic == b"GGUF"
}

/// The calibration inputs a plan reads.
#[derive(Clone, Copy)]
struct Calibration<'a> {
    imatrix: Option<&'a LoadedImatrix>,
    stats: Option<&'a LoadedStats>,
}

/// Turns candidates into tensor plans: recipe rules, pins, requantization policy, kernel
/// availability, shape fallbacks, importance weights and the method.
fn decide(
    recipe: &Recipe,
    source: &Input,
    candidates: Vec<Candidate>,
    model: &ModelFacts,
    calibration: Calibration<'_>,
    keep_pinned_type: bool,
) -> Result<Vec<TensorPlan>, PipelineError> {
    let imatrix = calibration.imatrix;
    let names: Vec<TensorNames<'_>> = candidates
        .iter()
        .map(|c| TensorNames {
            hf: &c.source_name,
            gguf: &c.name,
            layer: c.layer,
            ne: &c.ne,
        })
        .collect();
    let assignments = recipe.assign(&names, model);
    let mut plans = Vec::with_capacity(candidates.len());
    for (c, a) in candidates.into_iter().zip(assignments) {
        let path = || source.tensor_path(c.entry).to_path_buf();
        let mut decision = match a.rule {
            Some(i) => Decision::Rule {
                index: i,
                label: recipe.rules[i].label.clone(),
            },
            None => Decision::Default,
        };
        let mut ty = match a.choice {
            TypeChoice::Type(t) => t,
            TypeChoice::Keep | TypeChoice::Default => c.source_type,
            // Recipe validation keeps packed types out of GGUF outputs.
            TypeChoice::Packed(p) => {
                return Err(PipelineError::Recipe(kiln_recipe::RecipeError::Conflict(
                    format!(
                        "{}: {p} is a packed safetensors type, not a GGUF type",
                        c.name
                    ),
                )))
            }
        };
        if let Some(reason) = c.pin {
            let pinned = if keep_pinned_type {
                c.source_type
            } else {
                GgmlType::F32
            };
            if ty != pinned {
                decision = Decision::Pinned {
                    reason,
                    wanted: a.choice,
                };
            }
            ty = pinned;
        }
        if ty != c.source_type && c.source_type.is_block_quantized() && !recipe.allow_requantize {
            return Err(PipelineError::RequantizeNotAllowed {
                path: path(),
                tensor: c.name,
                from: c.source_type,
                to: ty,
            });
        }
        if ty != c.source_type && kiln_quant::kernel(c.source_type).is_none() {
            return Err(PipelineError::UnsupportedType {
                tensor: c.name,
                ty: c.source_type,
            });
        }
        if ty.row_bytes(c.ne[0]).is_none() {
            if !a.fallback {
                return Err(PipelineError::BadShape {
                    path: path(),
                    tensor: c.name.clone(),
                    problem: format!(
                        "rows of {} do not fit {ty} blocks of {}, and the rule disables fallbacks",
                        c.ne[0],
                        ty.block_size().unwrap_or(1)
                    ),
                });
            }
            let wanted = ty;
            // One step through the recipe's table, then F16, as llama.cpp does.
            ty = recipe
                .fallback_for(ty)
                .filter(|f| f.row_bytes(c.ne[0]).is_some())
                .unwrap_or(GgmlType::F16);
            decision = Decision::Fallback {
                wanted,
                reason: format!(
                    "rows of {} are not a multiple of the block size {}",
                    c.ne[0],
                    wanted.block_size().unwrap_or(1)
                ),
            };
        }
        let Some(kernel) = kiln_quant::kernel(ty) else {
            return Err(PipelineError::UnsupportedType { tensor: c.name, ty });
        };
        let weights = match imatrix {
            Some(m) if a.use_imatrix && ty != c.source_type => m.weights(&c.name, &c.source_name),
            _ => None,
        };
        if let Some(w) = &weights {
            let expected = c.ne[0] * c.ne.get(2).copied().unwrap_or(1);
            if w.len() as u64 != expected && w.len() as u64 != c.ne[0] {
                return Err(PipelineError::ImatrixShape {
                    tensor: c.name,
                    expected,
                    actual: w.len() as u64,
                });
            }
        }
        let needs =
            kernel.requires_imatrix || (a.imatrix_required && recipe.require_imatrix.contains(&ty));
        if needs && weights.is_none() && ty != c.source_type {
            return Err(PipelineError::ImatrixRequired {
                tensor: c.name,
                ty,
                have_file: imatrix.is_some(),
            });
        }
        let method =
            if a.packed.method == Method::Gptq && ty != c.source_type && ty.is_block_quantized() {
                gptq_method(
                    &c,
                    ty,
                    a.packed.act_order,
                    &decision,
                    calibration.stats,
                    source,
                )?
            } else {
                WeightMethod::Kernel
            };
        let nbytes = ty
            .tensor_bytes(&c.ne)
            .ok_or_else(|| PipelineError::BadShape {
                path: path(),
                tensor: c.name.clone(),
                problem: "size overflows".into(),
            })?;
        plans.push(TensorPlan {
            source_name: c.source_name,
            name: c.name,
            layer: c.layer,
            source_type: c.source_type,
            ne: c.ne,
            ty,
            decision,
            nbytes,
            transform: c.transform,
            // Kept even for kernels that ignore it: the report weighs errors with it.
            imatrix: weights.map(Arc::from),
            plus_one: c.plus_one,
            method,
            generated: c.generated,
            entry: c.entry,
            entries: c.entries,
        });
    }
    Ok(plans)
}

fn plan_checkpoint(
    recipe: &Recipe,
    access: &MmapAccess,
    input: &Path,
    calibration: Calibration<'_>,
) -> Result<BuildPlan, PipelineError> {
    let imatrix = calibration.imatrix;
    let checkpoint = Checkpoint::open(access, input)?;
    let arch_err = |source| PipelineError::Arch {
        path: checkpoint.folder().to_path_buf(),
        source,
    };
    let mut files = side_files(&checkpoint)?;
    // `[metadata.extra] "tokenizer.ggml.pre"` names the pre-tokenizer instead of the fingerprint
    // (for tokenizers llama.cpp's table does not know yet).
    if let Some((_, MetaValue::String(pre))) = recipe
        .metadata
        .extra
        .iter()
        .find(|(k, _)| k == "tokenizer.ggml.pre")
    {
        files.set_pre_tokenizer(pre);
    }
    let config = files
        .json("config.json")
        .map_err(arch_err)?
        .ok_or_else(|| arch_err(kiln_arch::ArchError::MissingConfig))?;
    let hp = HParams::from_config(&config).map_err(arch_err)?;
    let not_understood = |unmapped: Option<Vec<String>>| {
        let mut report = crate::model_report(&checkpoint, &files);
        if let Some(names) = unmapped {
            report.unmapped_tensors = names;
        }
        PipelineError::NotUnderstood {
            path: checkpoint.folder().to_path_buf(),
            report: Box::new(report),
        }
    };
    let family = match kiln_arch::detect(&hp) {
        Ok(f) => f,
        Err(kiln_arch::ArchError::UnsupportedArchitecture(..)) => {
            return Err(not_understood(None));
        }
        Err(e) => return Err(arch_err(e)),
    };

    // Tensors the converter generates come first (they precede the checkpoint's in its stream).
    let mut candidates: Vec<Candidate> = family
        .generated_tensors(&hp)
        .map_err(arch_err)?
        .into_iter()
        .map(|g| Candidate {
            entry: 0,
            entries: Vec::new(),
            source_name: g.name.clone(),
            name: g.name,
            layer: None,
            source_type: GgmlType::F32,
            ne: vec![g.values.len() as u64],
            transform: Transform::None,
            pin: Some("1-D tensor"),
            plus_one: false,
            generated: Some(g.values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        })
        .collect();
    let embedding_rows = family.embedding_rows(&files).map_err(arch_err)?;
    let mut unmapped = Vec::new();
    // Expert matrices per layer, until the layer has all of them (then they are stacked, at the
    // position of the last one, as the converter does).
    let mut experts: BTreeMap<u32, Vec<(usize, u32, usize, String)>> = BTreeMap::new();
    let n_experts = hp
        .find_u32(&["num_local_experts", "num_experts"])
        .map_err(arch_err)?
        .unwrap_or(0) as usize;
    for (index, entry) in checkpoint.tensors().iter().enumerate() {
        let mapping = match family
            .map_tensor(&hp, &entry.name, &entry.shape)
            .map_err(arch_err)?
        {
            Mapped::Tensor(m) => vec![m],
            Mapped::Split(parts) => parts,
            Mapped::Skip => continue,
            Mapped::Expert {
                stacked,
                part,
                layer,
                expert,
            } => {
                let members = experts.entry(layer).or_default();
                members.push((part, expert, index, stacked));
                if members.len() == n_experts * family.expert_parts() {
                    let members = experts.remove(&layer).unwrap_or_default();
                    candidates.extend(stack_experts(&checkpoint, members, layer, n_experts)?);
                }
                continue;
            }
            Mapped::Unknown => {
                unmapped.push(entry.name.clone());
                continue;
            }
        };
        let path = checkpoint.tensor_path(entry).to_path_buf();
        let source_type = entry
            .dtype
            .ggml()
            .ok_or_else(|| PipelineError::UnsupportedDtype {
                path: path.clone(),
                tensor: entry.name.clone(),
                dtype: entry.dtype.name(),
            })?;
        for mapping in mapping {
            let mut ne: Vec<u64> = entry.shape.iter().rev().copied().collect();
            if mapping.gguf_name == "token_embd.weight" && ne.len() == 2 {
                // Rows are the slowest dimension, so keeping the first ones is a prefix of the data.
                if let Some(rows) = embedding_rows {
                    ne[1] = ne[1].min(rows);
                }
            }
            if ne.is_empty() || ne.len() > 4 {
                return Err(PipelineError::BadShape {
                    path,
                    tensor: entry.name.clone(),
                    problem: format!("{} dimensions (GGUF stores 1 to 4)", ne.len()),
                });
            }
            if matches!(mapping.transform, Transform::PermuteHeads { .. }) && ne.len() > 2 {
                return Err(PipelineError::BadShape {
                    path,
                    tensor: entry.name.clone(),
                    problem: "row permutation of a tensor with more than 2 dimensions".into(),
                });
            }
            if let Transform::RowBlocks { period, len, .. } = mapping.transform {
                // The split halves the rows within each expert (ne[1]); experts (ne[2]) stay.
                if ne.len() < 2 || ne[1] != period {
                    return Err(PipelineError::BadShape {
                        path,
                        tensor: entry.name.clone(),
                        problem: format!("cannot take {len} of every {period} rows"),
                    });
                }
                ne[1] = len;
            }
            candidates.push(Candidate {
                entry: index,
                entries: vec![index],
                source_name: entry.name.clone(),
                name: mapping.gguf_name,
                layer: mapping.layer,
                source_type,
                ne,
                transform: mapping.transform,
                pin: mapping.pin_f32,
                plus_one: mapping.plus_one,
                generated: None,
            });
        }
    }
    for (_, members) in experts {
        // A layer whose experts are not all there (or more than the config says).
        unmapped.extend(
            members
                .into_iter()
                .map(|(_, _, i, _)| checkpoint.tensors()[i].name.clone()),
        );
    }
    if !unmapped.is_empty() {
        return Err(not_understood(Some(unmapped)));
    }
    let model = model_facts(
        &hp,
        !candidates.iter().any(|c| c.name == "output.weight"),
        imatrix.is_some(),
    )
    .map_err(arch_err)?;
    let mut inputs = hash_files(
        checkpoint
            .shard_files()
            .map(|(path, file)| ("weights", path, file))
            .collect(),
    );
    for name in kiln_arch::SIDE_FILE_NAMES {
        if let Some(bytes) = files.get(name) {
            inputs.push(InputRecord::new("side-file", Path::new(name), bytes));
        }
    }
    let source = Input::Hf(checkpoint);
    let tensors = decide(recipe, &source, candidates, &model, calibration, false)?;
    let Input::Hf(checkpoint) = &source else {
        unreachable!("constructed as a checkpoint above")
    };
    let arch_err = |source| PipelineError::Arch {
        path: checkpoint.folder().to_path_buf(),
        source,
    };

    let file_type = match recipe.file_type {
        Some(f) => f,
        None => infer_file_type(recipe, &tensors),
    };
    let mut general: Vec<(String, MetaValue)> = recipe
        .metadata
        .strings
        .iter()
        .map(|(k, v)| (k.clone(), MetaValue::String(v.clone())))
        .collect();
    for (k, v) in &recipe.metadata.string_arrays {
        general.push((k.clone(), MetaValue::Array(MetaArray::String(v.clone()))));
    }
    if recipe.metadata.string("general.size_label").is_none() {
        // gguf-py's get_total_parameter_count: expert tensors count once per expert.
        let mut counts = ParamCounts::default();
        let (mut expert_sum, mut expert_tensors) = (0u64, 0u64);
        for t in &tensors {
            let n = t.elements();
            counts.total += n;
            match t
                .name
                .contains("_exps.")
                .then(|| t.ne.get(2).copied())
                .flatten()
            {
                Some(e) if e > 0 => {
                    counts.expert += n / e;
                    expert_sum += e;
                    expert_tensors += 1;
                }
                _ => counts.shared += n,
            }
        }
        counts.expert_count = expert_sum.checked_div(expert_tensors).unwrap_or(0);
        general.push((
            "general.size_label".into(),
            MetaValue::String(kiln_arch::size_label(&counts)),
        ));
    }
    let mut metadata = kiln_arch::gguf_metadata(
        family,
        MetadataInputs {
            hparams: &hp,
            files: &files,
            general,
            file_type: file_type.id,
        },
    )
    .map_err(arch_err)?;
    if let Some(m) = imatrix {
        metadata.extend(m.metadata_keys());
    }
    apply_extra(recipe, &mut metadata);
    Ok(BuildPlan {
        input: PathBuf::new(),
        output: PathBuf::new(),
        arch: family.gguf_arch.to_string(),
        file_type,
        tensors,
        metadata,
        alignment: recipe.alignment,
        inputs,
        recipe: RecipeRecord {
            xxh3: String::new(),
            normalized: String::new(),
        },
        provenance: false,
        split: None,
        source,
        stats: None,
    })
}

/// What recipe conditions can see of a Hugging Face checkpoint's model.
pub(crate) fn model_facts(
    hp: &HParams,
    tied_embeddings: bool,
    imatrix: bool,
) -> Result<ModelFacts, kiln_arch::ArchError> {
    let n_head = hp.find_u32(&["num_attention_heads"])?.unwrap_or(1);
    let n_head_kv = hp.find_u32(&["num_key_value_heads"])?.unwrap_or(n_head);
    Ok(ModelFacts {
        block_count: hp
            .find_u32(&["n_layers", "num_hidden_layers", "n_layer", "num_layers"])?
            .unwrap_or(0),
        gqa: n_head.checked_div(n_head_kv).unwrap_or(1),
        experts: hp
            .find_u32(&["num_local_experts", "num_experts"])?
            .unwrap_or(0),
        tied_embeddings,
        imatrix,
    })
}

/// The side files of a checkpoint folder that the model families read.
pub(crate) fn side_files(checkpoint: &Checkpoint) -> Result<SideFiles, PipelineError> {
    let mut files = SideFiles::new();
    for name in kiln_arch::SIDE_FILE_NAMES {
        if let Some(bytes) = checkpoint.read_side_file(name)? {
            files.insert(name, bytes);
        }
    }
    Ok(files)
}

/// Stacks one layer's expert matrices into 3-D tensors (`[cols, rows, n_experts]`), one per part
/// (w1, w2, w3 order), each with its experts in order as sources.
fn stack_experts(
    checkpoint: &Checkpoint,
    mut members: Vec<(usize, u32, usize, String)>,
    layer: u32,
    n_experts: usize,
) -> Result<Vec<Candidate>, PipelineError> {
    members.sort_by_key(|(part, expert, _, _)| (*part, *expert));
    let mut out = Vec::new();
    for part in members.chunk_by(|a, b| a.0 == b.0) {
        let first = &checkpoint.tensors()[part[0].2];
        let bad = |problem: String| PipelineError::BadShape {
            path: checkpoint.tensor_path(first).to_path_buf(),
            tensor: first.name.clone(),
            problem,
        };
        if part.len() != n_experts || part.iter().enumerate().any(|(i, m)| m.1 as usize != i) {
            return Err(bad(format!(
                "layer {layer} does not have experts 0..{n_experts}"
            )));
        }
        for m in part {
            let t = &checkpoint.tensors()[m.2];
            if t.shape != first.shape || t.dtype != first.dtype {
                return Err(bad(format!(
                    "`{}` differs in shape or dtype from expert 0",
                    t.name
                )));
            }
        }
        let source_type = first
            .dtype
            .ggml()
            .ok_or_else(|| PipelineError::UnsupportedDtype {
                path: checkpoint.tensor_path(first).to_path_buf(),
                tensor: first.name.clone(),
                dtype: first.dtype.name(),
            })?;
        if first.shape.len() != 2 {
            return Err(bad("expert matrices must be 2-D".into()));
        }
        let mut ne: Vec<u64> = first.shape.iter().rev().copied().collect();
        ne.push(n_experts as u64);
        out.push(Candidate {
            entry: part[0].2,
            entries: part.iter().map(|m| m.2).collect(),
            source_name: first.name.clone(),
            name: part[0].3.clone(),
            layer: Some(layer),
            source_type,
            ne,
            transform: Transform::None,
            pin: None,
            plus_one: false,
            generated: None,
        });
    }
    Ok(out)
}

/// Hashes input files (in parallel; the records keep the given order), releasing their pages.
pub(crate) fn hash_files(files: Vec<(&str, &Path, &kiln_reader::MappedFile)>) -> Vec<InputRecord> {
    use rayon::prelude::*;
    files
        .par_iter()
        .map(|(role, path, file)| InputRecord::from_mapped(role, path, file))
        .collect()
}

/// llama-quantize's `tensor_allows_quantization`, for GGUF inputs: tensors it never converts.
fn gguf_pin(name: &str, ne: &[u64]) -> Option<&'static str> {
    const NEVER: &[&str] = &[
        "ffn_gate_inp.weight",
        "ffn_gate_tid2eid.weight",
        "altup",
        "laurel",
        "per_layer_model_proj",
        "ssm_conv1d",
        "shortconv.conv.weight",
        "indexer.k_proj.weight",
        "indexer.q_proj.weight",
        "attn_rel_b.weight",
        "time_mix_first.weight",
        "time_mix_w0.weight",
        "time_mix_w1.weight",
        "time_mix_w2.weight",
        "time_mix_v0.weight",
        "time_mix_v1.weight",
        "time_mix_v2.weight",
        "time_mix_a0.weight",
        "time_mix_a1.weight",
        "time_mix_a2.weight",
        "time_mix_g1.weight",
        "time_mix_g2.weight",
        "time_mix_decay_w1.weight",
        "time_mix_decay_w2.weight",
        "time_mix_lerp_fused.weight",
    ];
    // ggml_n_dims: trailing dimensions of 1 do not count.
    let n_dims = ne.iter().rposition(|&d| d != 1).map_or(1, |i| i + 1);
    if n_dims < 2 {
        return Some("1-D tensor");
    }
    if !name.ends_with("weight") {
        return Some("not a weight");
    }
    if name.contains("_norm.weight") {
        return Some("norm weight");
    }
    if name == "position_embd.weight" || name == "token_types.weight" {
        return Some("kept by llama.cpp");
    }
    NEVER
        .iter()
        .any(|n| name.contains(n))
        .then_some("kept by llama.cpp")
}

fn plan_gguf(
    recipe: &Recipe,
    access: &MmapAccess,
    input: &Path,
    calibration: Calibration<'_>,
) -> Result<BuildPlan, PipelineError> {
    let imatrix = calibration.imatrix;
    let gguf = kiln_reader::split::SplitGguf::open(access, input).map_err(|source| {
        PipelineError::SplitInput {
            path: input.to_path_buf(),
            source: Box::new(source),
        }
    })?;
    let arch = gguf
        .get("general.architecture")
        .and_then(MetaValue::as_str)
        .unwrap_or("unknown")
        .to_string();
    let key_u32 = |k: &str| {
        gguf.get(&format!("{arch}.{k}"))
            .and_then(MetaValue::as_u64)
            .map(|v| v as u32)
    };
    let mut candidates = Vec::new();
    for index in 0..gguf.tensors().len() {
        let Some(t) = gguf.tensor_info(index) else {
            continue;
        };
        if t.nbytes.is_none() {
            return Err(PipelineError::UnsupportedType {
                tensor: t.name.clone(),
                ty: t.ty,
            });
        }
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse().ok());
        candidates.push(Candidate {
            entry: index,
            entries: vec![index],
            source_name: t.name.clone(),
            name: t.name.clone(),
            layer,
            source_type: t.ty,
            ne: t.ne.clone(),
            transform: Transform::None,
            pin: gguf_pin(&t.name, &t.ne),
            plus_one: false,
            generated: None,
        });
    }
    // llama-quantize writes tensors sorted by block number (none first), then by name.
    candidates.sort_by(|a, b| {
        (a.layer.map_or(-1, i64::from), &a.name).cmp(&(b.layer.map_or(-1, i64::from), &b.name))
    });
    let n_head = key_u32("attention.head_count").unwrap_or(1);
    let model = ModelFacts {
        block_count: key_u32("block_count").unwrap_or(0),
        gqa: n_head
            .checked_div(key_u32("attention.head_count_kv").unwrap_or(n_head))
            .unwrap_or(1),
        experts: key_u32("expert_count").unwrap_or(0),
        tied_embeddings: !candidates.iter().any(|c| c.name == "output.weight"),
        imatrix: imatrix.is_some(),
    };
    let inputs = hash_files(
        gguf.paths()
            .iter()
            .zip(gguf.shards())
            .map(|(path, shard)| ("gguf", path.as_path(), shard.file()))
            .collect(),
    );
    let source = Input::Gguf(gguf);
    let tensors = decide(recipe, &source, candidates, &model, calibration, true)?;
    let Input::Gguf(gguf) = &source else {
        unreachable!("constructed as a GGUF input above")
    };
    let file_type = match recipe.file_type {
        Some(f) => f,
        None => infer_file_type(recipe, &tensors),
    };
    // llama-quantize: copy every key in order, drop split keys, then re-set the quantization
    // version and file type (which moves them to the end).
    let mut metadata: Vec<(String, MetaValue)> = gguf
        .metadata()
        .iter()
        .filter(|(k, _)| {
            // A previous build's provenance would describe another artifact.
            !k.starts_with("split.")
                && !k.starts_with("kiln.")
                && k != "general.alignment"
                && k != "general.quantization_version"
                && k != "general.file_type"
        })
        .cloned()
        .collect();
    for (k, v) in &recipe.metadata.strings {
        set_in_place(&mut metadata, k, MetaValue::String(v.clone()));
    }
    for (k, v) in &recipe.metadata.string_arrays {
        set_in_place(
            &mut metadata,
            k,
            MetaValue::Array(MetaArray::String(v.clone())),
        );
    }
    metadata.push(("general.quantization_version".into(), MetaValue::U32(2)));
    metadata.push(("general.file_type".into(), MetaValue::U32(file_type.id)));
    if let Some(m) = imatrix {
        metadata.extend(m.metadata_keys());
    }
    apply_extra(recipe, &mut metadata);
    Ok(BuildPlan {
        input: PathBuf::new(),
        output: PathBuf::new(),
        arch,
        file_type,
        tensors,
        metadata,
        alignment: recipe.alignment,
        inputs,
        recipe: RecipeRecord {
            xxh3: String::new(),
            normalized: String::new(),
        },
        provenance: false,
        split: None,
        source,
        stats: None,
    })
}

/// GPTQ for one tensor the recipe asks it for: linear weights inside blocks, in a block type GPTQ
/// can encode, with the input's Gram matrix in the statistics file. Tensors GPTQ has no input
/// statistics for by construction (embedding lookups, the output head, norms, stacked experts)
/// keep the kernel's rounding, and the plan says so; anything else it cannot do is an error.
fn gptq_method(
    c: &Candidate,
    ty: GgmlType,
    act_order: bool,
    decision: &Decision,
    stats: Option<&LoadedStats>,
    source: &Input,
) -> Result<WeightMethod, PipelineError> {
    if matches!(source, Input::Gguf(_)) {
        return Err(PipelineError::MethodNotApplicable {
            tensor: c.name.clone(),
            problem: "GPTQ needs the checkpoint the GGUF was converted from: activation \
                      statistics are keyed by checkpoint tensor names"
                .into(),
        });
    }
    let reason = if c.layer.is_none() || c.ne.len() != 2 {
        Some("only linear weights inside blocks have input statistics")
    } else if c.entries.len() != 1 || c.generated.is_some() {
        Some("stacked expert tensors are not supported")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Ok(WeightMethod::KernelInstead { reason });
    }
    if !kiln_quant::methods::GGUF_GPTQ_TYPES.contains(&ty) {
        let names: Vec<String> = kiln_quant::methods::GGUF_GPTQ_TYPES
            .iter()
            .map(ToString::to_string)
            .collect();
        return Err(PipelineError::MethodNotApplicable {
            tensor: c.name.clone(),
            problem: format!(
                "GPTQ writes {} in GGUF, and this tensor gets {ty} ({decision}); \
                 choose one of those types or `method = \"rtn\"` for it",
                names.join(", ")
            ),
        });
    }
    let Some(stats) = stats else {
        return Err(PipelineError::NoCalibration {
            tensor: c.name.clone(),
            method: "gptq".into(),
        });
    };
    stats.gram_for(&c.source_name, c.ne[0] as usize, "gptq")?;
    Ok(WeightMethod::Gptq {
        weight: c.source_name.clone(),
        act_order,
    })
}

fn set_in_place(metadata: &mut Vec<(String, MetaValue)>, key: &str, value: MetaValue) {
    match metadata.iter_mut().find(|(k, _)| k == key) {
        Some(entry) => entry.1 = value,
        None => metadata.push((key.to_string(), value)),
    }
}

fn apply_extra(recipe: &Recipe, metadata: &mut Vec<(String, MetaValue)>) {
    for (k, v) in &recipe.metadata.extra {
        metadata.retain(|(key, _)| key != k);
        metadata.push((k.clone(), v.clone()));
    }
}

/// `general.file_type` when the recipe does not set it: the file type of the default type, or
/// (for `keep`) of the most common type among tensors of two or more dimensions.
fn infer_file_type(recipe: &Recipe, tensors: &[TensorPlan]) -> FileType {
    let from_default = match recipe.default {
        TypeChoice::Type(t) => FileType::for_single_type(t),
        _ => None,
    };
    from_default.unwrap_or_else(|| {
        let mut counts: BTreeMap<u32, usize> = BTreeMap::new();
        for t in tensors.iter().filter(|t| t.ne.len() >= 2) {
            *counts.entry(t.ty.0).or_default() += 1;
        }
        // Ties go to the lower type id, so the choice never depends on iteration order.
        let most = counts
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(id, _)| GgmlType(*id))
            .unwrap_or(GgmlType::F32);
        FileType::for_single_type(most).unwrap_or(kiln_types::FILE_TYPES[0])
    })
}
