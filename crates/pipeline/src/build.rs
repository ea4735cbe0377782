//! Executes a build plan.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::time::Instant;

use kiln_arch::Transform;
use kiln_writer::{AtomicFile, GgufLayout, GgufWriter, TensorSpec};
use rayon::prelude::*;
use serde::Serialize;

use crate::plan::{BuildPlan, TensorPlan};
use crate::PipelineError;

/// Receives progress events. Implementations must be cheap; calls come from the writing thread.
pub trait Progress: Sync {
    /// The build starts: `bytes` of source data in `tensors` tensors.
    fn begin(&self, _tensors: usize, _bytes: u64) {}
    /// Tensor `index` (`name`) starts.
    fn tensor(&self, _index: usize, _name: &str) {}
    /// `bytes` more source bytes are done.
    fn advance(&self, _bytes: u64) {}
    /// The build ended (successfully or not).
    fn finish(&self) {}
}

/// A progress sink that ignores everything.
impl Progress for () {}

/// How to run a build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Worker threads; `None` means rayon's default (all cores, or `RAYON_NUM_THREADS`).
    pub threads: Option<usize>,
    /// Target size of one unit of parallel work, in source bytes. Peak memory is about
    /// `2 × threads × chunk_bytes` (in flight) plus the output buffer, whatever the model size.
    pub chunk_bytes: usize,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            threads: None,
            chunk_bytes: 4 << 20,
        }
    }
}

/// One written tensor.
#[derive(Debug, Clone, Serialize)]
pub struct TensorReport {
    /// Output name.
    pub name: String,
    /// Checkpoint name.
    pub source: String,
    /// Output type.
    #[serde(rename = "type")]
    pub ty: String,
    /// Dimensions, fastest first.
    pub shape: Vec<u64>,
    /// Why that type.
    pub decision: String,
    /// Absolute offset in the file.
    pub offset: u64,
    /// Byte size.
    pub bytes: u64,
    /// Bits per weight.
    pub bpw: f64,
    /// xxh3-64 of the tensor bytes, hex.
    pub xxh3: String,
}

/// The outcome of a build.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The written artifact.
    pub output: PathBuf,
    /// Its size.
    pub file_bytes: u64,
    /// xxh3-64 of the whole file, hex.
    pub file_xxh3: String,
    /// `general.file_type` name.
    pub file_type: String,
    /// Parameters written.
    pub parameters: u64,
    /// Bits per weight over all tensors.
    pub bpw: f64,
    /// Worker threads used.
    pub threads: usize,
    /// Wall time.
    pub seconds: f64,
    /// Per tensor, in file order.
    pub tensors: Vec<TensorReport>,
}

/// Runs a plan: writes the artifact atomically and reports what was written.
pub fn build(
    plan: &BuildPlan,
    options: &BuildOptions,
    progress: &dyn Progress,
) -> Result<Report, PipelineError> {
    let started = Instant::now();
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = options.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().map_err(|e| PipelineError::Threads {
        threads: options.threads.unwrap_or(0),
        message: e.to_string(),
    })?;
    let threads = pool.current_num_threads();

    let write_err = |source| PipelineError::Write {
        path: plan.output.clone(),
        source,
    };
    let specs = plan
        .tensors
        .iter()
        .map(|t| TensorSpec {
            name: t.name.clone(),
            ne: t.ne.clone(),
            ty: t.ty,
        })
        .collect();
    let layout =
        GgufLayout::new(plan.metadata.clone(), specs, plan.alignment).map_err(write_err)?;

    let source_bytes: u64 = plan
        .tensors
        .iter()
        .map(|t| plan.checkpoint.tensors()[t.entry].byte_len() as u64)
        .sum();
    progress.begin(plan.tensors.len(), source_bytes);
    let result = (|| -> Result<kiln_writer::WrittenFile, PipelineError> {
        if let Some(dir) = plan.output.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| {
                write_err(kiln_writer::WriteError::Io {
                    path: dir.to_path_buf(),
                    source: e,
                })
            })?;
        }
        let mut file = AtomicFile::create(&plan.output).map_err(write_err)?;
        let out = BufWriter::with_capacity(1 << 20, file.file());
        let mut writer = GgufWriter::new(out, layout).map_err(write_err)?;
        for (index, tensor) in plan.tensors.iter().enumerate() {
            progress.tensor(index, &tensor.name);
            write_tensor(
                plan,
                tensor,
                index,
                &mut writer,
                &pool,
                threads,
                options,
                progress,
            )?;
        }
        let (out, written) = writer.finish().map_err(write_err)?;
        out.into_inner()
            .map_err(|e| write_err(kiln_writer::WriteError::Stream(e.into_error())))?
            .flush()
            .map_err(|e| write_err(kiln_writer::WriteError::Stream(e)))?;
        file.commit().map_err(write_err)?;
        Ok(written)
    })();
    progress.finish();
    let written = result?;

    let tensors = plan
        .tensors
        .iter()
        .zip(&written.tensors)
        .map(|(t, w)| TensorReport {
            name: t.name.clone(),
            source: t.source_name.clone(),
            ty: t.ty.to_string(),
            shape: t.ne.clone(),
            decision: t.decision.to_string(),
            offset: w.file_offset,
            bytes: w.nbytes,
            bpw: w.nbytes as f64 * 8.0 / t.elements().max(1) as f64,
            xxh3: w.xxh3.to_string(),
        })
        .collect();
    let parameters = plan.parameters();
    Ok(Report {
        output: plan.output.clone(),
        file_bytes: written.len,
        file_xxh3: written.xxh3.to_string(),
        file_type: plan.file_type.name.to_string(),
        parameters,
        bpw: plan.tensor_bytes() as f64 * 8.0 / parameters.max(1) as f64,
        threads,
        seconds: started.elapsed().as_secs_f64(),
        tensors,
    })
}

#[allow(clippy::too_many_arguments)]
fn write_tensor<W: Write>(
    plan: &BuildPlan,
    tensor: &TensorPlan,
    index: usize,
    writer: &mut GgufWriter<W>,
    pool: &rayon::ThreadPool,
    threads: usize,
    options: &BuildOptions,
    progress: &dyn Progress,
) -> Result<(), PipelineError> {
    let entry = &plan.checkpoint.tensors()[tensor.entry];
    let source = plan.checkpoint.data(entry);
    let row_len = tensor.ne[0];
    let rows: u64 = tensor.ne.iter().skip(1).product();
    let src_elem = tensor.source_type.type_size().unwrap_or(4);
    let src_row_bytes = row_len * src_elem;
    let rows_per_chunk = (options.chunk_bytes as u64 / src_row_bytes.max(1)).max(1);
    let chunks: Vec<(u64, u64)> = (0..rows)
        .step_by(rows_per_chunk as usize)
        .map(|start| (start, (start + rows_per_chunk).min(rows)))
        .collect();
    let window = (2 * threads).max(1);
    for group in chunks.chunks(window) {
        let results: Vec<Result<Vec<u8>, PipelineError>> = pool.install(|| {
            group
                .par_iter()
                .map(|&(start, end)| convert_rows(tensor, source, start, end))
                .collect()
        });
        for (result, &(start, end)) in results.into_iter().zip(group) {
            let bytes = result?;
            writer
                .write_tensor_chunk(index, &bytes)
                .map_err(|source| PipelineError::Write {
                    path: plan.output.clone(),
                    source,
                })?;
            progress.advance((end - start) * src_row_bytes);
        }
        // Unpermuted rows are read in order, so the group's source pages are done with; this
        // keeps resident memory at the chunks in flight even for the largest tensor.
        if tensor.transform == Transform::None {
            if let (Some(first), Some(last)) = (group.first(), group.last()) {
                plan.checkpoint.release_range(
                    entry,
                    (first.0 * src_row_bytes) as usize,
                    (last.1 * src_row_bytes) as usize,
                );
            }
        }
    }
    if rows == 0 {
        writer
            .write_tensor(index, &[])
            .map_err(|source| PipelineError::Write {
                path: plan.output.clone(),
                source,
            })?;
    }
    plan.checkpoint.release(entry);
    Ok(())
}

/// Produces the output bytes of output rows `start..end` of a tensor.
fn convert_rows(
    tensor: &TensorPlan,
    source: &[u8],
    start: u64,
    end: u64,
) -> Result<Vec<u8>, PipelineError> {
    let row_len = tensor.ne[0] as usize;
    let elem = tensor.source_type.type_size().unwrap_or(4) as usize;
    let (start, end) = (start as usize, end as usize);
    let gathered: Cow<'_, [u8]> = match tensor.transform {
        Transform::None => Cow::Borrowed(&source[start * row_len * elem..end * row_len * elem]),
        transform => {
            // The permutation moves HF rows: for a 2-D weight one HF row is one output row; for a
            // 1-D bias each element is a "row" and the whole tensor is a single output row.
            let (unit, units_total) = if tensor.ne.len() == 1 {
                (1usize, row_len)
            } else {
                (row_len, tensor.ne[1] as usize)
            };
            let unit_bytes = unit * elem;
            let first = start * row_len / unit;
            let last = end * row_len / unit;
            let mut buf = Vec::with_capacity((last - first) * unit_bytes);
            for u in first..last {
                let src = transform.source_row(u as u64, units_total as u64) as usize;
                buf.extend_from_slice(&source[src * unit_bytes..(src + 1) * unit_bytes]);
            }
            Cow::Owned(buf)
        }
    };
    if tensor.ty == tensor.source_type {
        return Ok(gathered.into_owned());
    }
    let quant_err = |source| PipelineError::Quant {
        tensor: tensor.name.clone(),
        source,
    };
    let mut values = vec![0.0f32; gathered.len() / elem];
    kiln_quant::decode_row(tensor.source_type, &gathered, &mut values).map_err(quant_err)?;
    let out_len = tensor
        .ty
        .row_bytes(row_len as u64)
        .map(|b| b as usize * (end - start))
        .unwrap_or(0);
    let mut out = vec![0u8; out_len];
    kiln_quant::quantize_rows(tensor.ty, &values, row_len, None, &mut out).map_err(quant_err)?;
    Ok(out)
}

impl TensorPlan {
    /// Whether the tensor's bytes are copied unchanged from the checkpoint.
    pub fn is_copy(&self) -> bool {
        self.ty == self.source_type && self.transform == Transform::None
    }
}
