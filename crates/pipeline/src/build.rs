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

/// Quantization error of a chunk, accumulated into a tensor's.
#[derive(Debug, Clone, Copy, Default)]
struct ErrorSums {
    /// Σ (x − q)².
    squared: f64,
    /// Σ w·(x − q)², with importance weights w.
    weighted: f64,
    /// Σ w.
    weights: f64,
    /// Elements measured.
    count: u64,
}

impl ErrorSums {
    fn add(&mut self, other: &ErrorSums) {
        self.squared += other.squared;
        self.weighted += other.weighted;
        self.weights += other.weights;
        self.count += other.count;
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
    /// Root-mean-square error of the stored values against the source values (0 for exact
    /// conversions).
    pub rmse: f64,
    /// Importance-weighted RMSE (`sqrt(Σ w·d² / Σ w)`, w the imatrix weight of each column),
    /// when an importance matrix applied to this tensor.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weighted_rmse: Option<f64>,
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
    /// RMSE over all elements of all tensors.
    pub rmse: f64,
    /// Worker threads used.
    pub threads: usize,
    /// Wall time.
    pub seconds: f64,
    /// Per tensor, in file order.
    pub tensors: Vec<TensorReport>,
    /// The manifest written beside the artifact, when provenance is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
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
    let header = FileHeader {
        bytes: layout.data_offset(),
        xxh3: crate::provenance::xxh3_hex(layout.header()),
    };

    let source_bytes: u64 = plan
        .tensors
        .iter()
        .map(|t| plan.source.data(t.entry).len() as u64)
        .sum();
    progress.begin(plan.tensors.len(), source_bytes);
    let mut errors: Vec<ErrorSums> = Vec::with_capacity(plan.tensors.len());
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
            let tensor_errors = write_tensor(
                plan,
                tensor,
                index,
                &mut writer,
                &pool,
                threads,
                options,
                progress,
            )?;
            errors.push(tensor_errors);
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
    let manifest = if plan.provenance {
        Some(write_manifest(plan, &written, &header)?)
    } else {
        None
    };

    let mut total = ErrorSums::default();
    errors.iter().for_each(|e| total.add(e));
    let tensors = plan
        .tensors
        .iter()
        .zip(&written.tensors)
        .zip(&errors)
        .map(|((t, w), e)| TensorReport {
            name: t.name.clone(),
            source: t.source_name.clone(),
            ty: t.ty.to_string(),
            shape: t.ne.clone(),
            decision: t.decision.to_string(),
            offset: w.file_offset,
            bytes: w.nbytes,
            bpw: w.nbytes as f64 * 8.0 / t.elements().max(1) as f64,
            xxh3: w.xxh3.to_string(),
            rmse: (e.squared / e.count.max(1) as f64).sqrt(),
            weighted_rmse: (e.weights > 0.0).then(|| (e.weighted / e.weights).sqrt()),
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
        rmse: (total.squared / parameters.max(1) as f64).sqrt(),
        threads,
        seconds: started.elapsed().as_secs_f64(),
        tensors,
        manifest,
    })
}

struct FileHeader {
    bytes: u64,
    xxh3: String,
}

/// Writes `<artifact>.kiln.json` (atomically, after the artifact itself is in place, so a
/// manifest always describes a complete artifact).
fn write_manifest(
    plan: &BuildPlan,
    written: &kiln_writer::WrittenFile,
    header: &FileHeader,
) -> Result<PathBuf, PipelineError> {
    use crate::provenance::{FileRecord, Manifest, TensorRecord, MANIFEST_VERSION, TOOL};
    let manifest = Manifest {
        kiln_manifest: MANIFEST_VERSION,
        tool: TOOL.to_string(),
        recipe: plan.recipe.clone(),
        inputs: plan.inputs.clone(),
        files: vec![FileRecord {
            name: plan
                .output
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: written.len,
            xxh3: written.xxh3.to_string(),
            header_bytes: header.bytes,
            header_xxh3: header.xxh3.clone(),
        }],
        tensors: plan
            .tensors
            .iter()
            .zip(&written.tensors)
            .map(|(t, w)| TensorRecord {
                name: t.name.clone(),
                source: t.source_name.clone(),
                ty: t.ty.to_string(),
                shape: t.ne.clone(),
                file: 0,
                offset: w.file_offset,
                bytes: w.nbytes,
                xxh3: w.xxh3.to_string(),
            })
            .collect(),
    };
    let path = Manifest::path_for(&plan.output);
    let write_err = |source| PipelineError::Write {
        path: path.clone(),
        source,
    };
    let mut file = AtomicFile::create(&path).map_err(write_err)?;
    file.file()
        .write_all(manifest.to_json().as_bytes())
        .map_err(|e| write_err(kiln_writer::WriteError::Stream(e)))?;
    file.commit().map_err(write_err)?;
    Ok(path)
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
) -> Result<ErrorSums, PipelineError> {
    let source = plan.source.data(tensor.entry);
    let mut errors = ErrorSums::default();
    let rows: u64 = tensor.ne.iter().skip(1).product();
    let src_row_bytes = source.len() as u64 / rows.max(1);
    let rows_per_chunk = (options.chunk_bytes as u64 / src_row_bytes.max(1)).max(1);
    let chunks: Vec<(u64, u64)> = (0..rows)
        .step_by(rows_per_chunk as usize)
        .map(|start| (start, (start + rows_per_chunk).min(rows)))
        .collect();
    let window = (2 * threads).max(1);
    for group in chunks.chunks(window) {
        let results: Vec<Result<(Vec<u8>, ErrorSums), PipelineError>> = pool.install(|| {
            group
                .par_iter()
                .map(|&(start, end)| {
                    convert_rows(tensor, source, src_row_bytes as usize, start, end)
                })
                .collect()
        });
        for (result, &(start, end)) in results.into_iter().zip(group) {
            let (bytes, chunk_errors) = result?;
            errors.add(&chunk_errors);
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
                plan.source.release_range(
                    tensor.entry,
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
    plan.source.release_range(tensor.entry, 0, source.len());
    Ok(errors)
}

/// Produces the output bytes of output rows `start..end` of a tensor.
fn convert_rows(
    tensor: &TensorPlan,
    source: &[u8],
    src_row_bytes: usize,
    start: u64,
    end: u64,
) -> Result<(Vec<u8>, ErrorSums), PipelineError> {
    let row_len = tensor.ne[0] as usize;
    let (start, end) = (start as usize, end as usize);
    let gathered: Cow<'_, [u8]> = match tensor.transform {
        Transform::None => Cow::Borrowed(&source[start * src_row_bytes..end * src_row_bytes]),
        transform => {
            // The permutation moves HF rows: for a 2-D weight one HF row is one output row; for a
            // 1-D bias each element is a "row" and the whole tensor is a single output row.
            // (Permuted tensors always come from F32/F16/BF16 checkpoints.)
            let elem = tensor.source_type.type_size().unwrap_or(4) as usize;
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
        return Ok((gathered.into_owned(), ErrorSums::default()));
    }
    let quant_err = |source| PipelineError::Quant {
        tensor: tensor.name.clone(),
        source,
    };
    let mut values = vec![0.0f32; (end - start) * row_len];
    kiln_quant::dequantize_rows(tensor.source_type, &gathered, &mut values).map_err(quant_err)?;
    let out_row = tensor
        .ty
        .row_bytes(row_len as u64)
        .map(|b| b as usize)
        .unwrap_or(0);
    let mut out = vec![0u8; out_row * (end - start)];
    match tensor.imatrix.as_deref() {
        // Stacked experts: row r of expert e uses that expert's slice of the weights.
        Some(w) if w.len() > row_len => {
            let rows_per_expert = tensor.ne.get(1).copied().unwrap_or(1).max(1) as usize;
            for (i, (src, dst)) in values
                .chunks_exact(row_len)
                .zip(out.chunks_exact_mut(out_row))
                .enumerate()
            {
                let expert = (start + i) / rows_per_expert;
                let slice = w.get(expert * row_len..(expert + 1) * row_len);
                kiln_quant::quantize_rows(tensor.ty, src, row_len, slice, dst)
                    .map_err(quant_err)?;
            }
        }
        weights => {
            kiln_quant::quantize_rows(tensor.ty, &values, row_len, weights, &mut out)
                .map_err(quant_err)?;
        }
    }
    let errors = if tensor.ty == kiln_types::GgmlType::F32 {
        // Widening to f32 is exact.
        ErrorSums::default()
    } else {
        measure(tensor, &values, &out, start).map_err(quant_err)?
    };
    Ok((out, errors))
}

/// Dequantizes what was just produced and compares it with the source values.
fn measure(
    tensor: &TensorPlan,
    values: &[f32],
    out: &[u8],
    first_row: usize,
) -> Result<ErrorSums, kiln_quant::QuantError> {
    let row_len = tensor.ne[0] as usize;
    let mut back = vec![0.0f32; values.len()];
    kiln_quant::dequantize_rows(tensor.ty, out, &mut back)?;
    let rows_per_expert = tensor.ne.get(1).copied().unwrap_or(1).max(1) as usize;
    let mut sums = ErrorSums {
        count: values.len() as u64,
        ..ErrorSums::default()
    };
    for (r, (x, q)) in values
        .chunks_exact(row_len)
        .zip(back.chunks_exact(row_len))
        .enumerate()
    {
        let weights = tensor.imatrix.as_deref().and_then(|w| {
            let expert = if w.len() > row_len {
                (first_row + r) / rows_per_expert
            } else {
                0
            };
            w.get(expert * row_len..(expert + 1) * row_len)
        });
        for (j, (a, b)) in x.iter().zip(q).enumerate() {
            let d = f64::from(*a) - f64::from(*b);
            sums.squared += d * d;
            if let Some(w) = weights {
                let w = f64::from(w[j]);
                sums.weighted += w * d * d;
                sums.weights += w;
            }
        }
    }
    Ok(sums)
}

impl TensorPlan {
    /// Whether the tensor's bytes are copied unchanged from the input.
    pub fn is_copy(&self) -> bool {
        self.ty == self.source_type && self.transform == Transform::None
    }
}
