//! Provenance: what an artifact was made from, recorded so it can be checked and rebuilt.
//!
//! Every build (unless the recipe sets `output.provenance = false`) records:
//! - in the GGUF, three `kiln.*` keys: the tool version, the xxh3 of the normalized recipe, and
//!   the xxh3 of the input list (names, sizes and hashes of every file read);
//! - beside it, a manifest `<artifact>.kiln.json` ([`Manifest`]) with the normalized recipe, every
//!   input file, every output file (size, whole-file and header hashes) and every tensor (source
//!   name, output name, type, shape, byte range and hash).
//!
//! Packed safetensors folders get the same manifest beside the folder (`<folder>.kiln.json`, files
//! named `<folder>/<file>`); their files carry no `kiln.*` keys, so that they stay what the Python
//! libraries would write.
//!
//! Nothing in either depends on the machine, the clock, the working directory or where the input
//! lives: inputs are named by file name within the checkpoint folder and identified by content.

use std::path::Path;

use kiln_types::MetaValue;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::{xxh3_64, Xxh3};

/// The manifest format version.
pub const MANIFEST_VERSION: u32 = 1;

/// The file name suffix of manifests: `model.gguf` → `model.gguf.kiln.json`.
pub const MANIFEST_SUFFIX: &str = ".kiln.json";

/// kiln's version, as recorded.
pub const TOOL: &str = concat!("kiln ", env!("CARGO_PKG_VERSION"));

/// xxh3-64 of bytes, as 16 hex digits.
pub fn xxh3_hex(bytes: &[u8]) -> String {
    format!("{:016x}", xxh3_64(bytes))
}

/// One file the build read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputRecord {
    /// `weights`, `side-file`, `gguf` or `imatrix`.
    pub role: String,
    /// File name (within the checkpoint folder for checkpoints; never a full path).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// xxh3-64 of the whole file.
    pub xxh3: String,
}

impl InputRecord {
    /// Hashes a mapped file in 16 MiB pieces, letting each piece's pages go once hashed, so
    /// hashing a large shard never makes it resident as a whole.
    pub(crate) fn from_mapped(
        role: &str,
        path: &Path,
        file: &kiln_reader::MappedFile,
    ) -> InputRecord {
        const PIECE: usize = 16 << 20;
        let bytes = file.bytes();
        let mut hasher = Xxh3::new();
        for (i, piece) in bytes.chunks(PIECE).enumerate() {
            hasher.update(piece);
            file.release(i * PIECE, piece.len());
        }
        InputRecord {
            role: role.to_string(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: bytes.len() as u64,
            xxh3: format!("{:016x}", hasher.digest()),
        }
    }

    pub(crate) fn new(role: &str, path: &Path, bytes: &[u8]) -> InputRecord {
        InputRecord {
            role: role.to_string(),
            name: path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: bytes.len() as u64,
            xxh3: xxh3_hex(bytes),
        }
    }
}

/// The recipe as recorded.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecipeRecord {
    /// xxh3-64 of `normalized`.
    pub xxh3: String,
    /// The recipe as canonical JSON, without paths.
    pub normalized: String,
}

/// One output file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileRecord {
    /// File name (beside the manifest).
    pub name: String,
    /// Size in bytes.
    pub bytes: u64,
    /// xxh3-64 of the whole file.
    pub xxh3: String,
    /// Size of the header (metadata, tensor infos and padding): where tensor data starts.
    pub header_bytes: u64,
    /// xxh3-64 of the header.
    pub header_xxh3: String,
}

/// One output tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorRecord {
    /// Output name.
    pub name: String,
    /// Name in the input.
    pub source: String,
    /// ggml type name.
    #[serde(rename = "type")]
    pub ty: String,
    /// Dimensions, fastest first.
    pub shape: Vec<u64>,
    /// Index into [`Manifest::files`].
    pub file: usize,
    /// Absolute byte offset in that file.
    pub offset: u64,
    /// Byte size (without padding).
    pub bytes: u64,
    /// xxh3-64 of the tensor's bytes.
    pub xxh3: String,
}

/// Everything needed to check an artifact, and to rebuild it from the same inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    /// [`MANIFEST_VERSION`].
    pub kiln_manifest: u32,
    /// The tool that wrote it ([`TOOL`]).
    pub tool: String,
    /// The recipe.
    pub recipe: RecipeRecord,
    /// Every file read, in reading order.
    pub inputs: Vec<InputRecord>,
    /// Every file written.
    pub files: Vec<FileRecord>,
    /// Every tensor, in file order.
    pub tensors: Vec<TensorRecord>,
}

impl Manifest {
    /// The manifest as written: pretty JSON with a final newline.
    pub fn to_json(&self) -> String {
        let mut s = serde_json::to_string_pretty(self).unwrap_or_default();
        s.push('\n');
        s
    }

    /// Where the manifest of `artifact` lives.
    pub fn path_for(artifact: &Path) -> std::path::PathBuf {
        // Rebuilt from components so that a folder given as `out/model/` still maps to
        // `out/model.kiln.json`.
        let artifact: std::path::PathBuf = artifact.components().collect();
        let mut name = artifact.into_os_string();
        name.push(MANIFEST_SUFFIX);
        name.into()
    }
}

/// The digest of an input list, as recorded in `kiln.inputs.xxh3`.
pub(crate) fn inputs_digest(inputs: &[InputRecord]) -> String {
    let mut h = Xxh3::new();
    for i in inputs {
        h.update(format!("{}\t{}\t{}\t{}\n", i.role, i.name, i.bytes, i.xxh3).as_bytes());
    }
    format!("{:016x}", h.digest())
}

/// The `kiln.*` keys.
pub(crate) fn kiln_keys(recipe_xxh3: &str, inputs: &[InputRecord]) -> Vec<(String, MetaValue)> {
    vec![
        ("kiln.version".into(), MetaValue::String(TOOL.into())),
        (
            "kiln.recipe.xxh3".into(),
            MetaValue::String(recipe_xxh3.into()),
        ),
        (
            "kiln.inputs.xxh3".into(),
            MetaValue::String(inputs_digest(inputs)),
        ),
    ]
}
