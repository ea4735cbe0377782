//! A Hugging Face checkpoint: one safetensors file or a folder of shards.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use kiln_types::GgmlType;
use safetensors::tensor::Dtype;

use crate::error::ReadError;
use crate::mmap::{MappedFile, MmapAccess};
use crate::safetensors::SafetensorsFile;

const INDEX_FILE: &str = "model.safetensors.index.json";

/// The element type of a checkpoint tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SourceDtype(pub Dtype);

impl SourceDtype {
    /// The ggml type with the same element encoding, for the dtypes kiln can convert
    /// (F32, F16, BF16). Every other dtype is listed but not converted.
    pub fn ggml(self) -> Option<GgmlType> {
        match self.0 {
            Dtype::F32 => Some(GgmlType::F32),
            Dtype::F16 => Some(GgmlType::F16),
            Dtype::BF16 => Some(GgmlType::BF16),
            _ => None,
        }
    }

    /// The name as safetensors writes it (`BF16`, `F8_E4M3`, ...).
    pub fn name(self) -> String {
        format!("{:?}", self.0)
    }
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone)]
pub struct TensorEntry {
    /// Name as stored in the checkpoint.
    pub name: String,
    /// Element type.
    pub dtype: SourceDtype,
    /// Shape, slowest dimension first (PyTorch order).
    pub shape: Vec<u64>,
    shard: usize,
    start: usize,
    len: usize,
}

impl TensorEntry {
    /// Number of elements.
    pub fn element_count(&self) -> u64 {
        self.shape.iter().product()
    }

    /// Byte length of the tensor's data.
    pub fn byte_len(&self) -> usize {
        self.len
    }
}

#[derive(Debug)]
struct Shard {
    path: PathBuf,
    file: MappedFile,
}

/// A memory-mapped Hugging Face checkpoint.
///
/// Tensors are listed in the order llama.cpp's `convert_hf_to_gguf.py` visits them: shard files
/// sorted by file name, then tensor names sorted within each shard. Side files (`config.json`,
/// tokenizer files) are read from the checkpoint's folder with [`Checkpoint::read_side_file`].
#[derive(Debug)]
pub struct Checkpoint {
    folder: PathBuf,
    shards: Vec<Shard>,
    tensors: Vec<TensorEntry>,
}

impl Checkpoint {
    /// Opens a checkpoint folder (sharded with an index, or with `*.safetensors` files) or a single
    /// `.safetensors` file, mapping every shard and validating every header.
    pub fn open(access: &MmapAccess, path: &Path) -> Result<Checkpoint, ReadError> {
        let io = |e| ReadError::Io {
            path: path.to_path_buf(),
            source: e,
        };
        let meta = std::fs::metadata(path).map_err(io)?;
        let (folder, shard_paths, index) = if meta.is_dir() {
            let index_path = path.join(INDEX_FILE);
            if index_path.is_file() {
                let index = read_index(&index_path)?;
                let names: BTreeSet<&String> = index.values().collect();
                let mut shard_paths = Vec::new();
                for shard in names {
                    let p = path.join(shard);
                    if !p.is_file() {
                        let mut holding = index.iter().filter(|(_, s)| *s == shard);
                        let tensor = holding.next().map(|(t, _)| t.clone()).unwrap_or_default();
                        return Err(ReadError::MissingShard {
                            index: index_path,
                            shard: shard.clone(),
                            tensor,
                            more: holding.count(),
                        });
                    }
                    shard_paths.push(p);
                }
                (path.to_path_buf(), shard_paths, Some((index_path, index)))
            } else {
                (path.to_path_buf(), list_safetensors(path)?, None)
            }
        } else {
            let folder = path
                .parent()
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."));
            (folder, vec![path.to_path_buf()], None)
        };

        let mut shards = Vec::with_capacity(shard_paths.len());
        let mut tensors = Vec::new();
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for (shard_index, shard_path) in shard_paths.into_iter().enumerate() {
            let file = MappedFile::open(access, &shard_path).map_err(|e| ReadError::Io {
                path: shard_path.clone(),
                source: e,
            })?;
            let parsed =
                SafetensorsFile::parse(file.bytes()).map_err(|e| ReadError::Safetensors {
                    path: shard_path.clone(),
                    source: e,
                })?;
            for view in parsed.tensors {
                if let Some(&first) = seen.get(&view.name) {
                    return Err(ReadError::DuplicateTensor {
                        tensor: view.name,
                        first: shards
                            .get(first)
                            .map(|s: &Shard| s.path.clone())
                            .unwrap_or_else(|| shard_path.clone()),
                        second: shard_path,
                    });
                }
                if let Some((_, index)) = &index {
                    let listed = index.get(&view.name).map(|s| folder.join(s));
                    if listed.as_deref() != Some(shard_path.as_path()) {
                        return Err(ReadError::TensorNotInIndex {
                            path: shard_path,
                            tensor: view.name,
                        });
                    }
                }
                seen.insert(view.name.clone(), shard_index);
                tensors.push(TensorEntry {
                    name: view.name,
                    dtype: SourceDtype(view.dtype),
                    shape: view.shape.iter().map(|&d| d as u64).collect(),
                    shard: shard_index,
                    start: view.file_offset,
                    len: view.data.len(),
                });
            }
            shards.push(Shard {
                path: shard_path,
                file,
            });
        }
        if let Some((index_path, index)) = &index {
            if let Some((tensor, shard)) = index.iter().find(|(t, _)| !seen.contains_key(*t)) {
                return Err(ReadError::TensorMissingFromShard {
                    index: index_path.clone(),
                    tensor: tensor.clone(),
                    shard: shard.clone(),
                });
            }
        }
        Ok(Checkpoint {
            folder,
            shards,
            tensors,
        })
    }

    /// The folder holding the checkpoint and its side files.
    pub fn folder(&self) -> &Path {
        &self.folder
    }

    /// The shard files with their mapped bytes, in visiting order.
    pub fn shard_files(&self) -> impl Iterator<Item = (&Path, &MappedFile)> {
        self.shards.iter().map(|s| (s.path.as_path(), &s.file))
    }

    /// Paths of the shard files, in visiting order.
    pub fn shard_paths(&self) -> impl Iterator<Item = &Path> {
        self.shards.iter().map(|s| s.path.as_path())
    }

    /// All tensors, in converter order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    /// Finds a tensor by name.
    pub fn tensor(&self, name: &str) -> Option<&TensorEntry> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// The shard file a tensor lives in.
    pub fn tensor_path(&self, entry: &TensorEntry) -> &Path {
        &self.shards[entry.shard].path
    }

    /// The bytes of a tensor, borrowed from the map.
    pub fn data(&self, entry: &TensorEntry) -> &[u8] {
        // Ranges were validated against the file when the shard was parsed.
        &self.shards[entry.shard].file.bytes()[entry.start..entry.start + entry.len]
    }

    /// Lets the pages of bytes `start..end` of a tensor leave the resident set once kiln is done
    /// with them (out-of-range parts are ignored).
    pub fn release_range(&self, entry: &TensorEntry, start: usize, end: usize) {
        let end = end.min(entry.len);
        if start < end {
            self.shards[entry.shard]
                .file
                .release(entry.start + start, end - start);
        }
    }

    /// Lets the pages of a tensor leave the resident set once kiln is done with it.
    pub fn release(&self, entry: &TensorEntry) {
        self.shards[entry.shard]
            .file
            .release(entry.start, entry.len);
    }

    /// Reads a small side file (`config.json`, `tokenizer.model`, ...) from the checkpoint folder;
    /// `Ok(None)` when it does not exist.
    pub fn read_side_file(&self, name: &str) -> Result<Option<Vec<u8>>, ReadError> {
        let path = self.folder.join(name);
        match std::fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ReadError::Io { path, source: e }),
        }
    }

    /// Reads and parses a JSON side file; `Ok(None)` when it does not exist.
    pub fn read_side_json(&self, name: &str) -> Result<Option<serde_json::Value>, ReadError> {
        let Some(bytes) = self.read_side_file(name)? else {
            return Ok(None);
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ReadError::InvalidJson {
                path: self.folder.join(name),
                source: e,
            })
    }
}

fn read_index(path: &Path) -> Result<BTreeMap<String, String>, ReadError> {
    let bytes = std::fs::read(path).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let invalid = |reason: String| ReadError::InvalidIndex {
        path: path.to_path_buf(),
        reason,
    };
    let value: serde_json::Value =
        serde_json::from_slice(&bytes).map_err(|e| invalid(e.to_string()))?;
    let map = value
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| invalid("no `weight_map` object".into()))?;
    let mut out = BTreeMap::new();
    for (tensor, shard) in map {
        let shard = shard
            .as_str()
            .ok_or_else(|| invalid(format!("shard of `{tensor}` is not a string")))?;
        // A shard name is a file in the checkpoint folder, never a path elsewhere.
        if shard.is_empty() || shard.contains('/') || shard.contains('\\') || shard == ".." {
            return Err(invalid(format!(
                "shard name `{shard}` is not a plain file name"
            )));
        }
        out.insert(tensor.clone(), shard.to_owned());
    }
    Ok(out)
}

fn list_safetensors(dir: &Path) -> Result<Vec<PathBuf>, ReadError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ReadError::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    let mut all = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| ReadError::Io {
            path: dir.to_path_buf(),
            source: e,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".safetensors") && entry.path().is_file() {
            all.push(name);
        }
    }
    all.sort();
    // The converter reads `model*.safetensors`; fall back to any safetensors file.
    let preferred: Vec<&String> = all.iter().filter(|n| n.starts_with("model")).collect();
    let chosen: Vec<PathBuf> = if preferred.is_empty() {
        all.iter().map(|n| dir.join(n)).collect()
    } else {
        preferred.into_iter().map(|n| dir.join(n)).collect()
    };
    if chosen.is_empty() {
        return Err(ReadError::NoWeights {
            path: dir.to_path_buf(),
        });
    }
    Ok(chosen)
}
