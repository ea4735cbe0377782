//! From recipe to build plan: every decision made, nothing written.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_arch::{HParams, Mapped, MetadataInputs, ParamCounts, SideFiles, Transform};
use kiln_reader::{Checkpoint, MmapAccess};
use kiln_recipe::{Recipe, TensorNames, TypeChoice};
use kiln_types::{FileType, GgmlType, MetaArray, MetaValue};

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
    /// The model family requires F32 here, overriding the recipe's choice.
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
            Decision::Pinned { reason, .. } => write!(f, "pinned F32 ({reason})"),
            Decision::Fallback { wanted, reason } => write!(f, "fallback from {wanted} ({reason})"),
        }
    }
}

/// What happens to one tensor.
#[derive(Debug, Clone)]
pub struct TensorPlan {
    /// Name in the checkpoint.
    pub source_name: String,
    /// Name in the output.
    pub name: String,
    /// Layer, if any.
    pub layer: Option<u32>,
    /// Source element type (F32, F16 or BF16).
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
    pub(crate) entry: usize,
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
    /// The checkpoint.
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
    pub(crate) checkpoint: Checkpoint,
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

/// Decides everything about a build without writing anything.
pub fn plan(recipe: &Recipe, access: &MmapAccess) -> Result<BuildPlan, PipelineError> {
    let input = recipe.input.clone().ok_or(PipelineError::NoInput)?;
    let output = recipe.output.clone().ok_or(PipelineError::NoOutput)?;
    let checkpoint = Checkpoint::open(access, &input)?;
    let arch_err = |source| PipelineError::Arch {
        path: checkpoint.folder().to_path_buf(),
        source,
    };
    if let Ok(out) = output.canonicalize() {
        if checkpoint
            .shard_paths()
            .any(|p| p.canonicalize().ok().as_deref() == Some(out.as_path()))
        {
            return Err(PipelineError::OutputIsInput(output));
        }
    }

    let mut files = SideFiles::new();
    for name in kiln_arch::SIDE_FILE_NAMES {
        if let Some(bytes) = checkpoint.read_side_file(name)? {
            files.insert(name, bytes);
        }
    }
    let config = files
        .json("config.json")
        .map_err(arch_err)?
        .ok_or_else(|| arch_err(kiln_arch::ArchError::MissingConfig))?;
    let hp = HParams::from_config(&config).map_err(arch_err)?;
    let family = kiln_arch::detect(&hp).map_err(arch_err)?;

    let mut tensors = Vec::new();
    let mut unmapped = Vec::new();
    for (index, entry) in checkpoint.tensors().iter().enumerate() {
        let mapping = match family
            .map_tensor(&hp, &entry.name, &entry.shape)
            .map_err(arch_err)?
        {
            Mapped::Tensor(m) => m,
            Mapped::Skip => continue,
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
        let ne: Vec<u64> = entry.shape.iter().rev().copied().collect();
        if ne.is_empty() || ne.len() > 4 {
            return Err(PipelineError::BadShape {
                path,
                tensor: entry.name.clone(),
                problem: format!("{} dimensions (GGUF stores 1 to 4)", ne.len()),
            });
        }
        if mapping.transform != Transform::None && ne.len() > 2 {
            return Err(PipelineError::BadShape {
                path,
                tensor: entry.name.clone(),
                problem: "row permutation of a tensor with more than 2 dimensions".into(),
            });
        }
        let names = TensorNames {
            hf: &entry.name,
            gguf: &mapping.gguf_name,
            layer: mapping.layer,
        };
        let (rule, choice) = recipe.choose(&names);
        let mut decision = match rule {
            Some(i) => Decision::Rule {
                index: i,
                label: recipe.rules[i].label.clone(),
            },
            None => Decision::Default,
        };
        let mut ty = match choice {
            TypeChoice::Type(t) => t,
            TypeChoice::Keep => source_type,
        };
        if let Some(reason) = mapping.pin_f32 {
            if ty != GgmlType::F32 {
                decision = Decision::Pinned {
                    reason,
                    wanted: choice,
                };
            }
            ty = GgmlType::F32;
        }
        if kiln_quant::kernel(ty).is_none() {
            return Err(PipelineError::UnsupportedType {
                tensor: mapping.gguf_name,
                ty,
            });
        }
        if ty.row_bytes(ne[0]).is_none() {
            // llama.cpp's converter stores such tensors as F16 (`QuantError` fallback).
            decision = Decision::Fallback {
                wanted: ty,
                reason: format!(
                    "row of {} is not a multiple of the block size {}",
                    ne[0],
                    ty.block_size().unwrap_or(1)
                ),
            };
            ty = GgmlType::F16;
        }
        let nbytes = ty
            .tensor_bytes(&ne)
            .ok_or_else(|| PipelineError::BadShape {
                path: checkpoint.tensor_path(entry).to_path_buf(),
                tensor: entry.name.clone(),
                problem: "size overflows".into(),
            })?;
        tensors.push(TensorPlan {
            source_name: entry.name.clone(),
            name: mapping.gguf_name,
            layer: mapping.layer,
            source_type,
            ne,
            ty,
            decision,
            nbytes,
            transform: mapping.transform,
            entry: index,
        });
    }
    if !unmapped.is_empty() {
        return Err(PipelineError::UnmappedTensors {
            path: checkpoint.folder().to_path_buf(),
            arch: family.gguf_arch.into(),
            names: unmapped,
        });
    }

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
        let total: u64 = tensors.iter().map(TensorPlan::elements).sum();
        let counts = ParamCounts {
            total,
            shared: total,
            expert: 0,
            expert_count: 0,
        };
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
    for (k, v) in &recipe.metadata.extra {
        metadata.retain(|(key, _)| key != k);
        metadata.push((k.clone(), v.clone()));
    }

    Ok(BuildPlan {
        input,
        output,
        arch: family.gguf_arch.to_string(),
        file_type,
        tensors,
        metadata,
        alignment: recipe.alignment,
        checkpoint,
    })
}

/// `general.file_type` when the recipe does not set it: the file type of the default type, or
/// (for `keep`) of the most common type among tensors of two or more dimensions.
fn infer_file_type(recipe: &Recipe, tensors: &[TensorPlan]) -> FileType {
    let from_default = match recipe.default {
        TypeChoice::Type(t) => FileType::for_single_type(t),
        TypeChoice::Keep => None,
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

impl BuildPlan {
    /// The checkpoint folder.
    pub fn input_folder(&self) -> &Path {
        self.checkpoint.folder()
    }
}
