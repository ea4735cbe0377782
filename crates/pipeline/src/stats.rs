//! Activation statistics as builds use them: read once at plan time (so a missing module is
//! reported before anything is written), recorded as an input of the artifact, then looked up per
//! linear layer by its checkpoint name.

use std::path::{Path, PathBuf};

use kiln_calib::{ActivationStats, ModuleStats};
use kiln_reader::{MappedFile, MmapAccess, ReadError};

use crate::provenance::InputRecord;
use crate::PipelineError;

/// A loaded statistics file (`kiln calibrate`'s output).
#[derive(Debug)]
pub(crate) struct LoadedStats {
    path: PathBuf,
    stats: ActivationStats,
    record: InputRecord,
}

impl LoadedStats {
    /// Reads and validates a statistics file. The parsed statistics are owned (they are summed
    /// into and compared), so the mapping is dropped once they are read.
    pub(crate) fn load(access: &MmapAccess, path: &Path) -> Result<LoadedStats, PipelineError> {
        let file = MappedFile::open(access, path).map_err(|e| ReadError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let stats = ActivationStats::from_safetensors(file.bytes()).map_err(|source| {
            PipelineError::ActivationStats {
                path: path.to_path_buf(),
                source,
            }
        })?;
        Ok(LoadedStats {
            path: path.to_path_buf(),
            record: InputRecord::new("calibration", path, file.bytes()),
            stats,
        })
    }

    /// The file as a provenance record.
    pub(crate) fn record(&self) -> &InputRecord {
        &self.record
    }

    /// The statistics of the module whose weight this is, if the file has its Gram matrix.
    pub(crate) fn with_gram(&self, weight: &str) -> Option<&ModuleStats> {
        self.stats
            .get(module_name(weight))
            .filter(|m| m.gram().is_some())
    }

    /// The statistics of the module whose weight this is, for a use that needs only the
    /// per-column figures (ranges, histogram) over `cols` input columns.
    pub(crate) fn input_stats(
        &self,
        weight: &str,
        cols: usize,
        what: &str,
    ) -> Result<&ModuleStats, PipelineError> {
        self.lookup(weight, cols, what, false)
    }

    /// The statistics of the module whose weight this is, for a method that needs its Gram
    /// matrix over `cols` input columns; a typed error naming the module otherwise.
    pub(crate) fn gram_for(
        &self,
        weight: &str,
        cols: usize,
        method: &str,
    ) -> Result<&ModuleStats, PipelineError> {
        self.lookup(weight, cols, method, true)
    }

    fn lookup(
        &self,
        weight: &str,
        cols: usize,
        what: &str,
        gram: bool,
    ) -> Result<&ModuleStats, PipelineError> {
        let module = module_name(weight);
        let stats = self
            .stats
            .get(module)
            .filter(|m| !gram || m.gram().is_some())
            .ok_or_else(|| PipelineError::MissingCalibration {
                path: self.path.clone(),
                module: module.to_string(),
                method: what.to_string(),
            })?;
        if stats.cols() != cols {
            return Err(PipelineError::CalibrationShape {
                path: self.path.clone(),
                module: module.to_string(),
                expected: cols as u64,
                actual: stats.cols() as u64,
            });
        }
        Ok(stats)
    }
}

/// `model.layers.3.self_attn.q_proj.weight` → `model.layers.3.self_attn.q_proj`.
pub(crate) fn module_name(weight: &str) -> &str {
    weight.strip_suffix(".weight").unwrap_or(weight)
}
