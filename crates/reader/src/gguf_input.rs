//! A memory-mapped GGUF file used as a conversion input.

use std::path::{Path, PathBuf};

use kiln_types::MetaValue;

use crate::gguf::{GgufFile, GgufTensorInfo};
use crate::{MappedFile, MmapAccess, ReadError};

/// A GGUF file opened for reading tensors: metadata and tensor infos parsed once and owned, tensor
/// bytes borrowed from the map on demand.
#[derive(Debug)]
pub struct GgufInput {
    path: PathBuf,
    file: MappedFile,
    version: u32,
    metadata: Vec<(String, MetaValue)>,
    tensors: Vec<GgufTensorInfo>,
    data_offset: u64,
    alignment: u64,
}

impl GgufInput {
    /// Maps and parses `path`.
    pub fn open(access: &MmapAccess, path: &Path) -> Result<GgufInput, ReadError> {
        let file = MappedFile::open(access, path).map_err(|e| ReadError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let parsed = GgufFile::parse(file.bytes()).map_err(|e| ReadError::Gguf {
            path: path.to_path_buf(),
            source: e,
        })?;
        let (version, metadata, tensors, data_offset, alignment) = (
            parsed.version,
            parsed.metadata.clone(),
            parsed.tensors.clone(),
            parsed.data_offset,
            parsed.alignment,
        );
        Ok(GgufInput {
            path: path.to_path_buf(),
            file,
            version,
            metadata,
            tensors,
            data_offset,
            alignment,
        })
    }

    /// The mapped file.
    pub fn file(&self) -> &MappedFile {
        &self.file
    }

    /// The file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version.
    pub fn version(&self) -> u32 {
        self.version
    }

    /// Metadata in file order.
    pub fn metadata(&self) -> &[(String, MetaValue)] {
        &self.metadata
    }

    /// A metadata value.
    pub fn get(&self, key: &str) -> Option<&MetaValue> {
        self.metadata.iter().find(|(k, _)| k == key).map(|(_, v)| v)
    }

    /// Tensor infos in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// Data alignment.
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The bytes of tensor `index` (empty for an unknown index or a tensor of unknown type).
    pub fn data(&self, index: usize) -> &[u8] {
        self.range(index)
            .and_then(|(start, len)| self.file.bytes().get(start..start + len))
            .unwrap_or(&[])
    }

    fn range(&self, index: usize) -> Option<(usize, usize)> {
        let t = self.tensors.get(index)?;
        let start = usize::try_from(self.data_offset.checked_add(t.offset)?).ok()?;
        Some((start, usize::try_from(t.nbytes?).ok()?))
    }

    /// Lets the pages of bytes `start..end` of tensor `index` leave the resident set.
    pub fn release_range(&self, index: usize, start: usize, end: usize) {
        if let Some((base, len)) = self.range(index) {
            let end = end.min(len);
            if start < end {
                self.file.release(base + start, end - start);
            }
        }
    }
}
