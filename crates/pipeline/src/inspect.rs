//! Describing files without converting them.

use std::path::{Path, PathBuf};

use kiln_reader::gguf::GgufFile;
use kiln_reader::{Checkpoint, MappedFile, MmapAccess, ReadError};
use kiln_types::MetaValue;
use serde::Serialize;

use crate::PipelineError;

/// One tensor of an inspected file.
#[derive(Debug, Clone, Serialize)]
pub struct InspectedTensor {
    /// Name.
    pub name: String,
    /// Type (ggml type name or safetensors dtype).
    #[serde(rename = "type")]
    pub ty: String,
    /// Shape as the format stores it: GGUF `ne` (fastest first) or safetensors (slowest first).
    pub shape: Vec<u64>,
    /// Absolute offset in its file, for GGUF.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    /// Byte size, when known.
    pub bytes: Option<u64>,
    /// The shard file, for sharded checkpoints.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
}

/// What `kiln inspect` shows.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The inspected path.
    pub path: PathBuf,
    /// `gguf` or `safetensors`.
    pub format: String,
    /// GGUF version.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<u32>,
    /// GGUF alignment.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub alignment: Option<u64>,
    /// Metadata in file order (GGUF: typed values; safetensors: `__metadata__` strings).
    #[serde(skip)]
    pub metadata: Vec<(String, MetaValue)>,
    /// Tensors in file order.
    pub tensors: Vec<InspectedTensor>,
    /// Total parameters.
    pub parameters: u64,
    /// For a Hugging Face checkpoint folder with a `config.json`: what kiln understands of it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<crate::ModelReport>,
}

/// Reads a GGUF file, a `.safetensors` file or a checkpoint folder and describes it.
pub fn inspect(path: &Path, access: &MmapAccess) -> Result<Inspection, PipelineError> {
    if path.is_dir() || path.extension().is_some_and(|e| e == "safetensors") {
        return inspect_checkpoint(path, access);
    }
    let file = MappedFile::open(access, path).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    if !file.bytes().starts_with(b"GGUF") {
        return Err(PipelineError::UnknownFormat(path.to_path_buf()));
    }
    let gguf = GgufFile::parse(file.bytes()).map_err(|e| ReadError::Gguf {
        path: path.to_path_buf(),
        source: e,
    })?;
    let tensors: Vec<InspectedTensor> = gguf
        .tensors
        .iter()
        .map(|t| InspectedTensor {
            name: t.name.clone(),
            ty: t.ty.to_string(),
            shape: t.ne.clone(),
            offset: Some(gguf.data_offset + t.offset),
            bytes: t.nbytes,
            file: None,
        })
        .collect();
    let parameters = gguf
        .tensors
        .iter()
        .map(|t| t.ne.iter().product::<u64>())
        .sum();
    Ok(Inspection {
        path: path.to_path_buf(),
        format: "gguf".into(),
        version: Some(gguf.version),
        alignment: Some(gguf.alignment),
        metadata: gguf.metadata.clone(),
        tensors,
        parameters,
        model: None,
    })
}

fn inspect_checkpoint(path: &Path, access: &MmapAccess) -> Result<Inspection, PipelineError> {
    let ck = Checkpoint::open(access, path)?;
    let several = ck.shard_paths().count() > 1;
    let tensors = ck
        .tensors()
        .iter()
        .map(|t| InspectedTensor {
            name: t.name.clone(),
            ty: t.dtype.name(),
            shape: t.shape.clone(),
            offset: None,
            bytes: Some(t.byte_len() as u64),
            file: several.then(|| {
                ck.tensor_path(t)
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }),
        })
        .collect();
    let parameters = ck.tensors().iter().map(|t| t.element_count()).sum();
    let files = crate::plan::side_files(&ck)?;
    let model = files
        .get("config.json")
        .is_some()
        .then(|| crate::model_report(&ck, &files));
    Ok(Inspection {
        path: path.to_path_buf(),
        format: "safetensors".into(),
        version: None,
        alignment: None,
        metadata: Vec::new(),
        tensors,
        parameters,
        model,
    })
}
