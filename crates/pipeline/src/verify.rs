//! `kiln verify`: checks an artifact against its manifest, or rebuilds it and compares bytes.
//!
//! The checks, in order, for each file the manifest lists: it exists; its size is the recorded
//! size (truncation or appended bytes); its header (metadata and tensor infos) hashes to the
//! recorded value (a metadata edit); every tensor's byte range hashes to its recorded value (the
//! first failure names the tensor and its byte range); the whole file hashes to the recorded value.
//! The GGUF's own `kiln.recipe.xxh3` must also match the manifest's recipe.

use std::path::{Path, PathBuf};

use kiln_reader::{MappedFile, MmapAccess, ReadError};
use serde::Serialize;

use crate::provenance::{xxh3_hex, Manifest};
use crate::{build, plan, BuildOptions, Overrides, PipelineError, Recipe};

/// One discrepancy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum VerifyFailure {
    /// A file the manifest lists does not exist.
    MissingFile {
        /// The file.
        file: String,
    },
    /// The file is shorter (truncated) or longer than recorded.
    SizeMismatch {
        /// The file.
        file: String,
        /// Recorded size.
        expected: u64,
        /// Actual size.
        actual: u64,
    },
    /// The header (metadata or tensor infos) differs.
    HeaderMismatch {
        /// The file.
        file: String,
        /// Recorded hash.
        expected: String,
        /// Actual hash.
        actual: String,
    },
    /// A tensor's bytes differ (or lie past the end of a truncated file).
    TensorMismatch {
        /// The file.
        file: String,
        /// The tensor.
        tensor: String,
        /// First byte of the tensor in the file.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// Recorded hash.
        expected: String,
        /// Actual hash (`missing` when the range is not in the file).
        actual: String,
    },
    /// The whole file's hash differs.
    FileMismatch {
        /// The file.
        file: String,
        /// Recorded hash.
        expected: String,
        /// Actual hash.
        actual: String,
    },
    /// The recipe hash stored in the GGUF differs from the manifest's.
    RecipeMismatch {
        /// The file.
        file: String,
        /// Manifest's recipe hash.
        expected: String,
        /// The GGUF's `kiln.recipe.xxh3` (`missing` when absent).
        actual: String,
    },
    /// A rebuild read inputs that differ from the recorded ones.
    InputMismatch {
        /// The input file name.
        input: String,
        /// Recorded hash.
        expected: String,
        /// Hash of the file given now (`missing` when absent).
        actual: String,
    },
}

/// The outcome of `kiln verify`.
#[derive(Debug, Clone, Serialize)]
pub struct VerifyReport {
    /// The manifest used.
    pub manifest: PathBuf,
    /// Files checked.
    pub files: usize,
    /// Tensors checked.
    pub tensors: usize,
    /// Whether everything matched.
    pub ok: bool,
    /// What did not match, in file and tensor order.
    pub failures: Vec<VerifyFailure>,
    /// Whether the artifact was rebuilt from its inputs and compared byte for byte.
    pub rebuilt: bool,
}

/// Reads a manifest.
pub fn read_manifest(path: &Path) -> Result<Manifest, PipelineError> {
    let bytes = std::fs::read(path).map_err(|e| ReadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    serde_json::from_slice(&bytes).map_err(|e| PipelineError::BadManifest {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// Checks `artifact` against its manifest (`manifest`, or `<artifact>.kiln.json`).
pub fn verify(
    artifact: &Path,
    manifest: Option<&Path>,
    access: &MmapAccess,
) -> Result<VerifyReport, PipelineError> {
    let manifest_path = manifest.map_or_else(|| Manifest::path_for(artifact), Path::to_path_buf);
    let m = read_manifest(&manifest_path)?;
    let folder = artifact.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut failures = Vec::new();
    for (index, f) in m.files.iter().enumerate() {
        let path = folder.join(&f.name);
        if !path.is_file() {
            failures.push(VerifyFailure::MissingFile {
                file: f.name.clone(),
            });
            continue;
        }
        let mapped = MappedFile::open(access, &path).map_err(|e| ReadError::Io {
            path: path.clone(),
            source: e,
        })?;
        let bytes = mapped.bytes();
        if bytes.len() as u64 != f.bytes {
            failures.push(VerifyFailure::SizeMismatch {
                file: f.name.clone(),
                expected: f.bytes,
                actual: bytes.len() as u64,
            });
        }
        let header = bytes.get(..f.header_bytes as usize).map(xxh3_hex);
        if header.as_deref() != Some(f.header_xxh3.as_str()) {
            failures.push(VerifyFailure::HeaderMismatch {
                file: f.name.clone(),
                expected: f.header_xxh3.clone(),
                actual: header.unwrap_or_else(|| "missing".into()),
            });
        }
        if let Ok(gguf) = kiln_reader::gguf::GgufFile::parse(bytes) {
            let stored = gguf
                .get("kiln.recipe.xxh3")
                .and_then(|v| v.as_str())
                .unwrap_or("missing");
            if stored != m.recipe.xxh3 {
                failures.push(VerifyFailure::RecipeMismatch {
                    file: f.name.clone(),
                    expected: m.recipe.xxh3.clone(),
                    actual: stored.to_string(),
                });
            }
        }
        for t in m.tensors.iter().filter(|t| t.file == index) {
            let (start, end) = (t.offset, t.offset.saturating_add(t.bytes));
            let actual = usize::try_from(start)
                .ok()
                .zip(usize::try_from(end).ok())
                .and_then(|(s, e)| bytes.get(s..e))
                .map(xxh3_hex);
            if actual.as_deref() != Some(t.xxh3.as_str()) {
                failures.push(VerifyFailure::TensorMismatch {
                    file: f.name.clone(),
                    tensor: t.name.clone(),
                    start,
                    end,
                    expected: t.xxh3.clone(),
                    actual: actual.unwrap_or_else(|| "missing".into()),
                });
            }
        }
        let whole = xxh3_hex(bytes);
        if whole != f.xxh3 {
            failures.push(VerifyFailure::FileMismatch {
                file: f.name.clone(),
                expected: f.xxh3.clone(),
                actual: whole,
            });
        }
        mapped.release(0, bytes.len());
    }
    Ok(VerifyReport {
        manifest: manifest_path,
        files: m.files.len(),
        tensors: m.tensors.len(),
        ok: failures.is_empty(),
        failures,
        rebuilt: false,
    })
}

/// Rebuilds the artifact from the recipe recorded in its manifest and the given inputs, into a
/// temporary folder beside it, and compares: first the inputs against the recorded hashes, then
/// the rebuilt files against the artifact byte for byte.
pub fn verify_rebuild(
    artifact: &Path,
    manifest: Option<&Path>,
    input: &Path,
    imatrix: Option<&Path>,
    options: &BuildOptions,
    access: &MmapAccess,
) -> Result<VerifyReport, PipelineError> {
    let manifest_path = manifest.map_or_else(|| Manifest::path_for(artifact), Path::to_path_buf);
    let m = read_manifest(&manifest_path)?;
    let raw: kiln_recipe::raw::RecipeFile =
        serde_json::from_str(&m.recipe.normalized).map_err(|e| PipelineError::BadManifest {
            path: manifest_path.clone(),
            message: format!("recorded recipe: {e}"),
        })?;
    let folder = artifact
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf);
    let scratch = tempfile::Builder::new()
        .prefix(".kiln-rebuild-")
        .tempdir_in(&folder)
        .map_err(|e| ReadError::Io {
            path: folder.clone(),
            source: e,
        })?;
    let name = m.files.first().map(|f| f.name.clone()).unwrap_or_default();
    let recipe = Recipe::from_raw(raw, Path::new(""))?.with_overrides(&Overrides {
        input: Some(input.to_path_buf()),
        output: Some(scratch.path().join(&name)),
        imatrix: imatrix.map(Path::to_path_buf),
    });
    let rebuilt_plan = plan(&recipe, access)?;
    let mut failures = Vec::new();
    for recorded in &m.inputs {
        let now = rebuilt_plan
            .inputs
            .iter()
            .find(|i| i.role == recorded.role && i.name == recorded.name);
        if now.map(|i| &i.xxh3) != Some(&recorded.xxh3) {
            failures.push(VerifyFailure::InputMismatch {
                input: recorded.name.clone(),
                expected: recorded.xxh3.clone(),
                actual: now.map_or_else(|| "missing".into(), |i| i.xxh3.clone()),
            });
        }
    }
    if failures.is_empty() {
        build(&rebuilt_plan, options, &())?;
        let rebuilt = verify(
            &scratch.path().join(&name),
            Some(&Manifest::path_for(&scratch.path().join(&name))),
            access,
        )?;
        failures.extend(rebuilt.failures);
        // The rebuilt manifest must describe the same bytes as the recorded one.
        let again = read_manifest(&Manifest::path_for(&scratch.path().join(&name)))?;
        for (a, b) in m.tensors.iter().zip(&again.tensors) {
            if a != b {
                failures.push(VerifyFailure::TensorMismatch {
                    file: name.clone(),
                    tensor: a.name.clone(),
                    start: a.offset,
                    end: a.offset + a.bytes,
                    expected: a.xxh3.clone(),
                    actual: b.xxh3.clone(),
                });
            }
        }
        for (a, b) in m.files.iter().zip(&again.files) {
            if a.xxh3 != b.xxh3 {
                failures.push(VerifyFailure::FileMismatch {
                    file: a.name.clone(),
                    expected: a.xxh3.clone(),
                    actual: b.xxh3.clone(),
                });
            }
        }
        // And the artifact on disk must still be what the manifest says.
        failures.extend(verify(artifact, Some(&manifest_path), access)?.failures);
    }
    Ok(VerifyReport {
        manifest: manifest_path,
        files: m.files.len(),
        tensors: m.tensors.len(),
        ok: failures.is_empty(),
        failures,
        rebuilt: true,
    })
}
