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

/// The manifest of an artifact: `<artifact>.kiln.json`, or for a shard of a split output
/// (`<prefix>-0000N-of-0000M.gguf`) the split's `<prefix>.kiln.json` when the former is absent.
pub fn default_manifest(artifact: &Path) -> PathBuf {
    let own = Manifest::path_for(artifact);
    if own.exists() {
        return own;
    }
    match split_prefix(&artifact.to_string_lossy()) {
        Some(prefix) => PathBuf::from(format!("{prefix}{}", crate::provenance::MANIFEST_SUFFIX)),
        None => own,
    }
}

/// `model` for `model-00002-of-00003.gguf`; `None` for names without a shard suffix.
fn split_prefix(name: &str) -> Option<String> {
    let stem = name.strip_suffix(".gguf")?;
    let parts: Vec<&str> = stem.rsplitn(4, '-').collect();
    match parts.as_slice() {
        [count, "of", no, prefix]
            if count.len() == 5
                && no.len() == 5
                && count.chars().chain(no.chars()).all(|c| c.is_ascii_digit()) =>
        {
            Some((*prefix).to_string())
        }
        _ => None,
    }
}

/// Combines the manifests of single-shard builds (`--shard I/N`) into the manifest of the whole
/// split artifact. They must record the same tool, recipe and inputs; files are ordered by name
/// (`-00001-of-…` first) and tensors follow their files.
pub fn merge_manifests(paths: &[PathBuf]) -> Result<Manifest, PipelineError> {
    let mut manifests = paths
        .iter()
        .map(|p| read_manifest(p))
        .collect::<Result<Vec<_>, _>>()?;
    let Some(first) = manifests.first().cloned() else {
        return Err(PipelineError::ManifestMerge("no manifests given".into()));
    };
    for (m, p) in manifests.iter().zip(paths) {
        if m.kiln_manifest != first.kiln_manifest || m.tool != first.tool {
            return Err(PipelineError::ManifestMerge(format!(
                "{}: written by another kiln",
                p.display()
            )));
        }
        if m.recipe != first.recipe {
            return Err(PipelineError::ManifestMerge(format!(
                "{}: records another recipe",
                p.display()
            )));
        }
        if m.inputs != first.inputs {
            return Err(PipelineError::ManifestMerge(format!(
                "{}: records other inputs",
                p.display()
            )));
        }
    }
    manifests.sort_by(|a, b| {
        let name = |m: &Manifest| m.files.first().map(|f| f.name.clone()).unwrap_or_default();
        name(a).cmp(&name(b))
    });
    let mut merged = Manifest {
        files: Vec::new(),
        tensors: Vec::new(),
        ..first
    };
    for m in manifests {
        let base = merged.files.len();
        for f in m.files {
            if merged.files.iter().any(|g| g.name == f.name) {
                return Err(PipelineError::ManifestMerge(format!(
                    "{} appears twice",
                    f.name
                )));
            }
            merged.files.push(f);
        }
        merged.tensors.extend(m.tensors.into_iter().map(|mut t| {
            t.file += base;
            t
        }));
    }
    Ok(merged)
}

/// Writes a manifest atomically.
pub fn write_manifest_file(path: &Path, manifest: &Manifest) -> Result<(), PipelineError> {
    use std::io::Write;
    let err = |source| PipelineError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = kiln_writer::AtomicFile::create(path).map_err(err)?;
    file.file()
        .write_all(manifest.to_json().as_bytes())
        .map_err(|e| err(kiln_writer::WriteError::Stream(e)))?;
    file.commit().map_err(err)
}

/// Checks `artifact` against its manifest (`manifest`, or [`default_manifest`]).
pub fn verify(
    artifact: &Path,
    manifest: Option<&Path>,
    access: &MmapAccess,
) -> Result<VerifyReport, PipelineError> {
    let manifest_path = manifest.map_or_else(|| default_manifest(artifact), Path::to_path_buf);
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
        // Only the first file carries metadata; later shards hold just the split keys.
        if let Some(gguf) = (index == 0)
            .then(|| kiln_reader::gguf::GgufFile::parse(bytes).ok())
            .flatten()
        {
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
    calibration: Option<&Path>,
    options: &BuildOptions,
    access: &MmapAccess,
) -> Result<VerifyReport, PipelineError> {
    let manifest_path = manifest.map_or_else(|| default_manifest(artifact), Path::to_path_buf);
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
    // A packed folder's files are named `<folder>/<file>`; a split GGUF is rebuilt from its
    // prefix, as it was built.
    let packed_folder = name.split_once('/').map(|(folder, _)| folder.to_string());
    let output_name = match &packed_folder {
        Some(folder) => folder.clone(),
        None => split_prefix(&name).map_or_else(|| name.clone(), |p| format!("{p}.gguf")),
    };
    let recipe = Recipe::from_raw(raw, Path::new(""))?.with_overrides(&Overrides {
        input: Some(input.to_path_buf()),
        output: Some(scratch.path().join(&output_name)),
        imatrix: imatrix.map(Path::to_path_buf),
        calibration: calibration.map(Path::to_path_buf),
        ..Default::default()
    });
    let mut failures = Vec::new();
    let mut check_inputs = |now: &[crate::provenance::InputRecord]| {
        for recorded in &m.inputs {
            let found = now
                .iter()
                .find(|i| i.role == recorded.role && i.name == recorded.name);
            if found.map(|i| &i.xxh3) != Some(&recorded.xxh3) {
                failures.push(VerifyFailure::InputMismatch {
                    input: recorded.name.clone(),
                    expected: recorded.xxh3.clone(),
                    actual: found.map_or_else(|| "missing".into(), |i| i.xxh3.clone()),
                });
            }
        }
    };
    // The rebuilt artifact's first file and manifest, once the inputs match.
    let rebuilt = if recipe.format.is_packed() {
        // Packed builds have no separate plan: build, then compare the inputs it recorded.
        let folder = scratch.path().join(&output_name);
        crate::build_packed(&recipe, access, options.threads)?;
        let again = read_manifest(&Manifest::path_for(&folder))?;
        check_inputs(&again.inputs);
        failures.is_empty().then(|| {
            (
                folder,
                Manifest::path_for(&scratch.path().join(&output_name)),
            )
        })
    } else {
        let rebuilt_plan = plan(&recipe, access)?;
        check_inputs(&rebuilt_plan.inputs);
        if failures.is_empty() {
            build(&rebuilt_plan, options, &())?;
            let first = scratch.path().join(&name);
            let manifest = default_manifest(&first);
            Some((first, manifest))
        } else {
            None
        }
    };
    if let Some((rebuilt_artifact, rebuilt_manifest)) = rebuilt {
        failures.extend(verify(&rebuilt_artifact, Some(&rebuilt_manifest), access)?.failures);
        // The rebuilt manifest must describe the same bytes as the recorded one.
        let again = read_manifest(&rebuilt_manifest)?;
        for (a, b) in m.tensors.iter().zip(&again.tensors) {
            if a != b {
                failures.push(VerifyFailure::TensorMismatch {
                    file: m
                        .files
                        .get(a.file)
                        .map_or_else(|| name.clone(), |f| f.name.clone()),
                    tensor: a.name.clone(),
                    start: a.offset,
                    end: a.offset + a.bytes,
                    expected: a.xxh3.clone(),
                    actual: b.xxh3.clone(),
                });
            }
        }
        if m.tensors.len() != again.tensors.len() || m.files.len() != again.files.len() {
            failures.push(VerifyFailure::FileMismatch {
                file: name.clone(),
                expected: format!("{} files, {} tensors", m.files.len(), m.tensors.len()),
                actual: format!(
                    "{} files, {} tensors",
                    again.files.len(),
                    again.tensors.len()
                ),
            });
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
