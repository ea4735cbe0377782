//! Executes a build plan.

use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use crate::provenance::{
    FileRecord, Manifest, TensorRecord, MANIFEST_SUFFIX, MANIFEST_VERSION, TOOL,
};
use std::time::Instant;

use kiln_arch::Transform;
use kiln_writer::{AtomicFile, GgufLayout, GgufWriter, TensorSpec};
use rayon::prelude::*;
use serde::Serialize;

use crate::plan::{BuildPlan, TensorPlan, WeightMethod};
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
    /// Build only shard `I` of `N` (1-based) of a split output: the same bytes as that shard of a
    /// full build, so shards can be built on different machines.
    pub shard: Option<(usize, usize)>,
}

impl Default for BuildOptions {
    fn default() -> Self {
        BuildOptions {
            threads: None,
            chunk_bytes: 4 << 20,
            shard: None,
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

/// Output errors on calibration data (each `/ n`, the number of calibration rows), for tensors
/// a calibration-aware method produced.
#[derive(Debug, Clone, Copy)]
struct OutputErrors {
    /// ‖XWᵀ − XQᵀ‖² of the kernel's own rounding.
    before: f64,
    /// The same for the stored values.
    after: f64,
    /// ‖XWᵀ‖².
    energy: f64,
}

/// What writing one tensor measured.
#[derive(Debug, Clone, Copy, Default)]
struct TensorOutcome {
    errors: ErrorSums,
    output: Option<OutputErrors>,
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
    /// How the values were chosen, when the recipe asked for a method (`gptq`, or `rtn (...)`
    /// where GPTQ does not apply).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// Output error ‖XWᵀ − XQᵀ‖² / n on calibration data of the kernel's own rounding.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error_before: Option<f64>,
    /// The same for the stored values.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_error_after: Option<f64>,
    /// ‖XWᵀ‖² / n, to read the errors as fractions.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_energy: Option<f64>,
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
    /// Every file written, in shard order.
    pub files: Vec<OutputFile>,
    /// The manifest written beside the artifact, when provenance is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub manifest: Option<PathBuf>,
}

impl Report {
    /// Over tensors with output errors on calibration data (those GPTQ produced): how many, and
    /// the mean of (error after / error of the kernel's rounding).
    pub fn mean_output_error_ratio(&self) -> Option<(usize, f64)> {
        mean_error_ratio(
            self.tensors
                .iter()
                .map(|t| (t.output_error_before, t.output_error_after)),
        )
    }
}

/// Over (before, after) output errors, where both exist and `before > 0`: how many, and the mean
/// of `after / before`. Shared by GGUF and packed reports.
pub(crate) fn mean_error_ratio(
    errors: impl Iterator<Item = (Option<f64>, Option<f64>)>,
) -> Option<(usize, f64)> {
    let ratios: Vec<f64> = errors
        .filter_map(|e| match e {
            (Some(b), Some(a)) if b > 0.0 => Some(a / b),
            _ => None,
        })
        .collect();
    (!ratios.is_empty()).then(|| {
        (
            ratios.len(),
            ratios.iter().sum::<f64>() / ratios.len() as f64,
        )
    })
}

/// One file written by a build.
#[derive(Debug, Clone, Serialize)]
pub struct OutputFile {
    /// Where it is.
    pub path: PathBuf,
    /// Its size.
    pub bytes: u64,
    /// xxh3-64 of the whole file, hex.
    pub xxh3: String,
}

/// One output file to write: which tensors, with which metadata.
struct Target {
    path: PathBuf,
    tensors: std::ops::Range<usize>,
    layout: GgufLayout,
    header: FileHeader,
}

/// Runs a plan: writes the artifact (one file, or every shard of a split output, or the one shard
/// `options.shard` selects) through temporary files renamed into place only when all of them are
/// complete, then the manifest, and reports what was written.
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

    let write_err = |path: &Path| {
        let path = path.to_path_buf();
        move |source| PipelineError::Write { path, source }
    };
    let n = plan.tensors.len();
    let sizes: Vec<u64> = plan.tensors.iter().map(|t| t.nbytes).collect();
    let ranges = match plan.split {
        Some(limit) => kiln_writer::split::plan_shards(&sizes, plan.alignment, limit),
        // The whole output in one file.
        None => std::iter::once(0..n).collect(),
    };
    let count = ranges.len();
    if plan.split.is_some() {
        kiln_writer::split::check_split(count, n)
            .map_err(|source| PipelineError::Split { source })?;
    }
    let selected: Vec<usize> = match options.shard {
        None => (0..count).collect(),
        Some((i, total)) => {
            let problem = if plan.split.is_none() {
                Some("the recipe does not split its output (set --split-max-tensors or --split-max-size)".to_string())
            } else if total != count {
                Some(format!("this build has {count} shards"))
            } else if i == 0 || i > count {
                Some(format!("shards are numbered 1 to {count}"))
            } else {
                None
            };
            if let Some(problem) = problem {
                return Err(PipelineError::BadShard {
                    shard: i,
                    count: total,
                    problem,
                });
            }
            vec![i - 1]
        }
    };
    let mut targets = Vec::with_capacity(selected.len());
    for &shard in &selected {
        let range = ranges[shard].clone();
        let (path, metadata) = match plan.split {
            Some(_) => (
                kiln_writer::split::shard_path(&plan.output, shard, count),
                kiln_writer::split::shard_metadata(&plan.metadata, shard, count, n)
                    .map_err(|source| PipelineError::Split { source })?,
            ),
            None => (plan.output.clone(), plan.metadata.clone()),
        };
        let specs = plan.tensors[range.clone()]
            .iter()
            .map(|t| TensorSpec {
                name: t.name.clone(),
                ne: t.ne.clone(),
                ty: t.ty,
            })
            .collect();
        let layout = GgufLayout::new(metadata, specs, plan.alignment).map_err(write_err(&path))?;
        let header = FileHeader {
            bytes: layout.data_offset(),
            xxh3: crate::provenance::xxh3_hex(layout.header()),
        };
        targets.push(Target {
            path,
            tensors: range,
            layout,
            header,
        });
    }

    let source_bytes: u64 = targets
        .iter()
        .flat_map(|t| plan.tensors[t.tensors.clone()].iter())
        .flat_map(|t| t.entries.iter())
        .map(|&e| plan.source.data(e).len() as u64)
        .sum();
    let written_tensors: usize = targets.iter().map(|t| t.tensors.len()).sum();
    progress.begin(written_tensors, source_bytes);
    let mut outcomes: Vec<TensorOutcome> = Vec::with_capacity(written_tensors);
    let result = (|| -> Result<Vec<kiln_writer::WrittenFile>, PipelineError> {
        let mut pending = Vec::with_capacity(targets.len());
        for target in &targets {
            if let Some(dir) = target.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|e| PipelineError::Write {
                    path: dir.to_path_buf(),
                    source: kiln_writer::WriteError::Io {
                        path: dir.to_path_buf(),
                        source: e,
                    },
                })?;
            }
            let mut file = AtomicFile::create(&target.path).map_err(write_err(&target.path))?;
            let out = BufWriter::with_capacity(1 << 20, file.file());
            let mut writer =
                GgufWriter::new(out, target.layout.clone()).map_err(write_err(&target.path))?;
            for (local, index) in target.tensors.clone().enumerate() {
                let tensor = &plan.tensors[index];
                progress.tensor(index, &tensor.name);
                let outcome = write_tensor(
                    plan,
                    tensor,
                    local,
                    &target.path,
                    &mut writer,
                    &pool,
                    threads,
                    options,
                    progress,
                )?;
                outcomes.push(outcome);
            }
            let (out, written) = writer.finish().map_err(write_err(&target.path))?;
            out.into_inner()
                .map_err(|e| {
                    write_err(&target.path)(kiln_writer::WriteError::Stream(e.into_error()))
                })?
                .flush()
                .map_err(|e| write_err(&target.path)(kiln_writer::WriteError::Stream(e)))?;
            pending.push((file, written));
        }
        // Every file is complete before any appears under its real name.
        let mut done = Vec::with_capacity(pending.len());
        for (file, written) in pending {
            let path = file.destination().to_path_buf();
            file.commit().map_err(write_err(&path))?;
            done.push(written);
        }
        Ok(done)
    })();
    progress.finish();
    let written = result?;
    let manifest = if plan.provenance {
        Some(write_manifest(
            plan,
            &targets,
            &written,
            options.shard.is_some(),
        )?)
    } else {
        None
    };

    let mut total = ErrorSums::default();
    outcomes.iter().for_each(|o| total.add(&o.errors));
    let tensors: Vec<TensorReport> = targets
        .iter()
        .zip(&written)
        .flat_map(|(target, w)| plan.tensors[target.tensors.clone()].iter().zip(&w.tensors))
        .zip(&outcomes)
        .map(|((t, w), o)| (t, w, &o.errors, o.output))
        .map(|(t, w, e, output)| TensorReport {
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
            method: (t.method != WeightMethod::Kernel).then(|| t.method.to_string()),
            output_error_before: output.map(|o| o.before),
            output_error_after: output.map(|o| o.after),
            output_energy: output.map(|o| o.energy),
        })
        .collect();
    let parameters: u64 = targets
        .iter()
        .flat_map(|t| plan.tensors[t.tensors.clone()].iter())
        .map(TensorPlan::elements)
        .sum();
    let tensor_bytes: u64 = tensors.iter().map(|t| t.bytes).sum();
    let files: Vec<OutputFile> = targets
        .iter()
        .zip(&written)
        .map(|(t, w)| OutputFile {
            path: t.path.clone(),
            bytes: w.len,
            xxh3: w.xxh3.to_string(),
        })
        .collect();
    Ok(Report {
        output: files
            .first()
            .map_or_else(|| plan.output.clone(), |f| f.path.clone()),
        file_bytes: files.iter().map(|f| f.bytes).sum(),
        file_xxh3: files.first().map(|f| f.xxh3.clone()).unwrap_or_default(),
        file_type: plan.file_type.name.to_string(),
        parameters,
        bpw: tensor_bytes as f64 * 8.0 / parameters.max(1) as f64,
        rmse: (total.squared / parameters.max(1) as f64).sqrt(),
        threads,
        seconds: started.elapsed().as_secs_f64(),
        tensors,
        files,
        manifest,
    })
}

struct FileHeader {
    bytes: u64,
    xxh3: String,
}

/// Where a build's manifest goes: `<artifact>.kiln.json`; for a split output
/// `<prefix>.kiln.json` (one manifest for all shards); for a single-shard build
/// `<shard file>.kiln.json` (merged later with `kiln manifest merge`).
fn manifest_path(plan: &BuildPlan, targets: &[Target], shard_only: bool) -> PathBuf {
    match (plan.split, targets.first()) {
        (Some(_), Some(t)) if shard_only => Manifest::path_for(&t.path),
        (Some(_), _) => {
            let s = plan.output.to_string_lossy();
            let prefix = s.strip_suffix(".gguf").unwrap_or(&s);
            PathBuf::from(format!("{prefix}{MANIFEST_SUFFIX}"))
        }
        (None, _) => Manifest::path_for(&plan.output),
    }
}

/// Writes the manifest (atomically, after the artifact files are in place, so a manifest always
/// describes a complete artifact).
fn write_manifest(
    plan: &BuildPlan,
    targets: &[Target],
    written: &[kiln_writer::WrittenFile],
    shard_only: bool,
) -> Result<PathBuf, PipelineError> {
    let files = targets
        .iter()
        .zip(written)
        .map(|(t, w)| FileRecord {
            name: t
                .path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            bytes: w.len,
            xxh3: w.xxh3.to_string(),
            header_bytes: t.header.bytes,
            header_xxh3: t.header.xxh3.clone(),
        })
        .collect();
    let tensors = targets
        .iter()
        .zip(written)
        .enumerate()
        .flat_map(|(file, (t, w))| {
            plan.tensors[t.tensors.clone()]
                .iter()
                .zip(&w.tensors)
                .map(move |(t, w)| TensorRecord {
                    name: t.name.clone(),
                    source: t.source_name.clone(),
                    ty: t.ty.to_string(),
                    shape: t.ne.clone(),
                    file,
                    offset: w.file_offset,
                    bytes: w.nbytes,
                    xxh3: w.xxh3.to_string(),
                })
        })
        .collect();
    let manifest = Manifest {
        kiln_manifest: MANIFEST_VERSION,
        tool: TOOL.to_string(),
        recipe: plan.recipe.clone(),
        inputs: plan.inputs.clone(),
        files,
        tensors,
    };
    let path = manifest_path(plan, targets, shard_only);
    let mut file = AtomicFile::create(&path).map_err(|source| PipelineError::Write {
        path: path.clone(),
        source,
    })?;
    file.file()
        .write_all(manifest.to_json().as_bytes())
        .map_err(|e| PipelineError::Write {
            path: path.clone(),
            source: kiln_writer::WriteError::Stream(e),
        })?;
    file.commit().map_err(|source| PipelineError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}

#[allow(clippy::too_many_arguments)]
fn write_tensor<W: Write>(
    plan: &BuildPlan,
    tensor: &TensorPlan,
    index: usize,
    output: &Path,
    writer: &mut GgufWriter<W>,
    pool: &rayon::ThreadPool,
    threads: usize,
    options: &BuildOptions,
    progress: &dyn Progress,
) -> Result<TensorOutcome, PipelineError> {
    // Stacked expert tensors read their rows from one source tensor per expert, in order.
    let sources: Vec<&[u8]> = match &tensor.generated {
        Some(bytes) => vec![bytes],
        None => tensor
            .entries
            .iter()
            .map(|&e| plan.source.data(e))
            .collect(),
    };
    let mut errors = ErrorSums::default();
    let rows: u64 = tensor.ne.iter().skip(1).product();
    // From the shape, not the source length: a truncated embedding reads only its first rows.
    let src_row_bytes = tensor.source_type.row_bytes(tensor.ne[0]).unwrap_or(0);
    let write_err = |source| PipelineError::Write {
        path: output.to_path_buf(),
        source,
    };
    let mut calibration_errors = None;
    if let WeightMethod::Gptq { weight, act_order } = &tensor.method {
        let (bytes, outcome) = pool.install(|| {
            gptq_tensor(
                plan,
                tensor,
                &sources,
                src_row_bytes as usize,
                weight,
                *act_order,
            )
        })?;
        writer.write_tensor(index, &bytes).map_err(write_err)?;
        progress.advance(rows * src_row_bytes);
        errors = outcome.errors;
        calibration_errors = outcome.output;
    } else {
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
                        convert_rows(tensor, &sources, src_row_bytes as usize, start, end)
                    })
                    .collect()
            });
            for (result, &(start, end)) in results.into_iter().zip(group) {
                let (bytes, chunk_errors) = result?;
                errors.add(&chunk_errors);
                writer
                    .write_tensor_chunk(index, &bytes)
                    .map_err(write_err)?;
                progress.advance((end - start) * src_row_bytes);
            }
            // Unpermuted rows are read in order, so the group's source pages are done with; this
            // keeps resident memory at the chunks in flight even for the largest tensor.
            if tensor.transform == Transform::None
                && sources.len() == 1
                && tensor.generated.is_none()
            {
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
            writer.write_tensor(index, &[]).map_err(write_err)?;
        }
    }
    for (&e, s) in tensor.entries.iter().zip(&sources) {
        plan.source.release_range(e, 0, s.len());
    }
    Ok(TensorOutcome {
        errors,
        output: calibration_errors,
    })
}

/// GPTQ over a whole tensor: error compensation runs across all columns of every row, so the
/// tensor is held in memory at once (as f32), unlike the chunked kernel path. Rows are
/// independent in GPTQ, so the row permutation of Q/K weights commutes with it.
fn gptq_tensor(
    plan: &BuildPlan,
    tensor: &TensorPlan,
    sources: &[&[u8]],
    src_row_bytes: usize,
    weight: &str,
    act_order: bool,
) -> Result<(Vec<u8>, TensorOutcome), PipelineError> {
    let cols = tensor.ne[0] as usize;
    let rows: usize = tensor.ne[1..].iter().product::<u64>() as usize;
    let stats = plan
        .stats
        .as_deref()
        .ok_or_else(|| PipelineError::NoCalibration {
            tensor: tensor.name.clone(),
            method: "gptq".into(),
        })?
        .gram_for(weight, cols, "gptq")?;
    let quant_err = |source| PipelineError::Quant {
        tensor: tensor.name.clone(),
        source,
    };
    let gathered = gather_rows(tensor, sources, src_row_bytes, 0, rows);
    let mut values = vec![0.0f32; rows * cols];
    kiln_quant::dequantize_rows(tensor.source_type, &gathered, &mut values).map_err(quant_err)?;
    drop(gathered);
    if tensor.plus_one {
        add_one(tensor.source_type, &mut values);
    }
    let calibration = kiln_quant::methods::Calibration {
        // Present: `gram_for` checked it.
        gram: stats.gram().unwrap_or(&[]),
        n: stats.count().max(1),
        act_abs_mean: None,
    };
    let config = kiln_quant::methods::GptqConfig {
        act_order,
        ..kiln_quant::methods::GptqConfig::default()
    };
    let result =
        kiln_quant::methods::gptq_gguf(tensor.ty, &values, rows, cols, &config, &calibration)
            .map_err(|source| PipelineError::Method {
                tensor: tensor.name.clone(),
                source,
            })?;
    let errors = measure(tensor, &values, &result.bytes, 0).map_err(quant_err)?;
    Ok((
        result.bytes,
        TensorOutcome {
            errors,
            output: Some(OutputErrors {
                before: result.error_before,
                after: result.error_after,
                energy: result.output_energy,
            }),
        },
    ))
}

/// The source bytes of output rows `start..end`, in output order (borrowed when no row moves).
fn gather_rows<'a>(
    tensor: &TensorPlan,
    sources: &[&'a [u8]],
    src_row_bytes: usize,
    start: usize,
    end: usize,
) -> Cow<'a, [u8]> {
    let row_len = tensor.ne[0] as usize;
    let source = sources.first().copied().unwrap_or(&[]);
    match tensor.transform {
        Transform::None if sources.len() == 1 => {
            Cow::Borrowed(&source[start * src_row_bytes..end * src_row_bytes])
        }
        Transform::None => {
            // Rows per source tensor: the expert matrices' row count.
            let per_source = (tensor.ne[1] as usize).max(1);
            let mut buf = Vec::with_capacity((end - start) * src_row_bytes);
            for r in start..end {
                let (s, local) = (r / per_source, r % per_source);
                buf.extend_from_slice(
                    &sources[s][local * src_row_bytes..(local + 1) * src_row_bytes],
                );
            }
            Cow::Owned(buf)
        }
        transform => {
            // The permutation moves HF rows: for a 2-D weight one HF row is one output row; for a
            // 1-D bias each element is a "row" and the whole tensor is a single output row.
            // (Permuted tensors always come from F32/F16/BF16 checkpoints.)
            let elem = tensor.source_type.type_size().unwrap_or(4) as usize;
            let (unit, units_total) = if tensor.ne.len() == 1 {
                (1usize, row_len)
            } else {
                (row_len, tensor.ne[1..].iter().product::<u64>() as usize)
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
    }
}

/// Produces the output bytes of output rows `start..end` of a tensor.
fn convert_rows(
    tensor: &TensorPlan,
    sources: &[&[u8]],
    src_row_bytes: usize,
    start: u64,
    end: u64,
) -> Result<(Vec<u8>, ErrorSums), PipelineError> {
    let row_len = tensor.ne[0] as usize;
    let (start, end) = (start as usize, end as usize);
    let gathered = gather_rows(tensor, sources, src_row_bytes, start, end);
    if tensor.ty == tensor.source_type && !tensor.plus_one {
        return Ok((gathered.into_owned(), ErrorSums::default()));
    }
    let quant_err = |source| PipelineError::Quant {
        tensor: tensor.name.clone(),
        source,
    };
    let mut values = vec![0.0f32; (end - start) * row_len];
    kiln_quant::dequantize_rows(tensor.source_type, &gathered, &mut values).map_err(quant_err)?;
    if tensor.plus_one {
        add_one(tensor.source_type, &mut values);
    }
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

/// Gemma's `w + 1`, computed as the converter's torch code does: in half precision for F16
/// checkpoints (the sum is rounded to F16), in F32 otherwise.
fn add_one(source_type: kiln_types::GgmlType, values: &mut [f32]) {
    if source_type == kiln_types::GgmlType::F16 {
        for v in values {
            // The exact sum of two halves rounded once to F32 and again to F16 equals the sum
            // rounded to F16 directly (F32 has more than 2·11 + 2 significand bits).
            *v = half::f16::from_f32(*v + 1.0).to_f32();
        }
    } else {
        for v in values {
            *v += 1.0;
        }
    }
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
        self.ty == self.source_type && self.transform == Transform::None && !self.plus_one
    }
}
