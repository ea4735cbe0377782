//! Importance matrices as the pipeline uses them: loaded and filtered once at plan time, then
//! looked up per tensor.

use std::path::Path;

use kiln_calib::Imatrix;
use kiln_reader::{MappedFile, MmapAccess, ReadError};
use kiln_types::MetaValue;

use crate::provenance::InputRecord;
use crate::PipelineError;

/// A loaded importance matrix.
#[derive(Debug)]
pub(crate) struct LoadedImatrix {
    imatrix: Imatrix,
    record: InputRecord,
}

impl LoadedImatrix {
    /// Reads an imatrix file (llama.cpp GGUF or legacy `.dat`) and applies include/exclude
    /// filters (llama-quantize's `--include-weights` / `--exclude-weights`).
    pub(crate) fn load(
        access: &MmapAccess,
        path: &Path,
        include: &[String],
        exclude: &[String],
    ) -> Result<LoadedImatrix, PipelineError> {
        let file = MappedFile::open(access, path).map_err(|e| ReadError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let mut imatrix =
            kiln_reader::imatrix::parse(file.bytes()).map_err(|source| PipelineError::Imatrix {
                path: path.to_path_buf(),
                source,
            })?;
        imatrix.filter_entries(include, exclude).map_err(|source| {
            PipelineError::ImatrixFilter {
                path: path.to_path_buf(),
                source,
            }
        })?;
        let record = InputRecord::new("imatrix", path, file.bytes());
        Ok(LoadedImatrix { imatrix, record })
    }

    /// The file as a provenance record.
    pub(crate) fn record(&self) -> &InputRecord {
        &self.record
    }

    /// The weights llama-quantize would pass to ggml for a tensor known by its GGUF and its
    /// checkpoint name.
    pub(crate) fn weights(&self, gguf: &str, hf: &str) -> Option<Vec<f32>> {
        self.imatrix.quant_weights_for(gguf, hf)
    }

    /// The `quantize.imatrix.*` keys llama-quantize records, except the file path: kiln never
    /// writes paths into artifacts.
    pub(crate) fn metadata_keys(&self) -> Vec<(String, MetaValue)> {
        let mut kv = Vec::new();
        if let Some(d) = self.imatrix.datasets.as_ref().and_then(|d| d.first()) {
            kv.push((
                kiln_calib::keys::QUANTIZE_IMATRIX_DATASET.into(),
                MetaValue::String(d.clone()),
            ));
        }
        kv.push((
            kiln_calib::keys::QUANTIZE_IMATRIX_ENTRIES_COUNT.into(),
            MetaValue::U32(self.imatrix.len() as u32),
        ));
        if let Some(c) = self.imatrix.chunk_count.filter(|&c| c > 0) {
            kv.push((
                kiln_calib::keys::QUANTIZE_IMATRIX_CHUNKS_COUNT.into(),
                MetaValue::U32(c),
            ));
        }
        kv
    }
}
