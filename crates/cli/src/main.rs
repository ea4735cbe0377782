//! `kiln`: a thin command-line shell over `kiln-pipeline`.
//!
//! `main` parses arguments, builds or loads a recipe, calls the pipeline, hands the result to
//! [`output`] for printing, and maps errors to exit codes in [`exit_code`]. Policy lives in the
//! libraries.

mod output;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use kiln_pipeline::{BuildOptions, MmapAccess, Overrides, PipelineError, Recipe, TypeChoice};
use kiln_recipe::RecipeError;

/// Model-format conversion: Hugging Face checkpoints to GGUF, driven by recipes.
#[derive(Debug, Parser)]
#[command(name = "kiln", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Build the artifact a recipe describes.
    Build {
        /// The recipe (TOML).
        recipe: PathBuf,
        #[command(flatten)]
        io: IoOverrides,
        #[command(flatten)]
        run: RunOptions,
    },
    /// Show, per tensor, the rule that matched, the type and the size, without writing anything.
    Plan {
        /// The recipe (TOML).
        recipe: PathBuf,
        #[command(flatten)]
        io: IoOverrides,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Convert a checkpoint to one type without a recipe file.
    Convert {
        /// Checkpoint folder or .safetensors file.
        input: PathBuf,
        /// GGUF file to write.
        output: PathBuf,
        /// Output type: a ggml type (F16, BF16, Q8_0, Q4_K, ...), a llama.cpp preset (Q4_K_M,
        /// IQ2_XS, ...; the recipe in recipes/presets/), or `keep`. Case-insensitive.
        #[arg(long = "type", short = 't', default_value = "keep")]
        ty: String,
        /// Importance matrix (llama.cpp GGUF or legacy .dat).
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// Allow requantizing tensors that are already quantized (GGUF inputs).
        #[arg(long)]
        allow_requantize: bool,
        /// `general.name` of the output.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        run: RunOptions,
    },
    /// Check an artifact against its manifest (ARTIFACT.kiln.json), or rebuild it and compare.
    Verify {
        /// The artifact (a GGUF file, or a packed safetensors folder).
        artifact: PathBuf,
        /// The manifest (default: ARTIFACT.kiln.json).
        #[arg(long)]
        manifest: Option<PathBuf>,
        /// Rebuild from the recorded recipe and the given inputs, and compare byte for byte.
        #[arg(long, requires = "input")]
        rebuild: bool,
        /// The checkpoint to rebuild from (with --rebuild).
        #[arg(long)]
        input: Option<PathBuf>,
        /// The importance matrix to rebuild with, if the build used one (with --rebuild).
        #[arg(long)]
        imatrix: Option<PathBuf>,
        /// The activation statistics to rebuild with, if the build used GPTQ (with --rebuild).
        #[arg(long)]
        calibration: Option<PathBuf>,
        #[command(flatten)]
        run: RunOptions,
    },
    /// Show metadata and tensor differences between two GGUF files, numeric ones included.
    Diff {
        /// First file.
        a: PathBuf,
        /// Second file.
        b: PathBuf,
        /// Compare metadata and bytes only (no dequantization).
        #[arg(long)]
        no_numeric: bool,
        /// Worker threads.
        #[arg(long)]
        threads: Option<usize>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Manifest tools.
    #[command(subcommand)]
    Manifest(ManifestCommand),
    /// Capture calibration statistics: run a Llama-family checkpoint over tokenized text and
    /// write every linear layer's input statistics (docs/calibration.md).
    Calibrate {
        /// Checkpoint folder or .safetensors file.
        checkpoint: PathBuf,
        /// Token ids: whitespace-separated (tools/tokenize_calib.py) or a JSON array.
        #[arg(long)]
        tokens: PathBuf,
        /// Statistics file to write (safetensors).
        #[arg(long, short)]
        output: PathBuf,
        /// Tokens per chunk; each chunk starts with BOS and is evaluated on its own.
        #[arg(long, default_value_t = 128)]
        ctx: usize,
        /// Use at most N chunks.
        #[arg(long)]
        chunks: Option<usize>,
        /// Do not collect the Gram matrices XᵀX (GPTQ needs them).
        #[arg(long)]
        no_gram: bool,
        /// Also collect a histogram of |x| per input, with this many bins (needs --hist-max).
        #[arg(long, requires = "hist_max")]
        hist_bins: Option<usize>,
        /// Upper end of the histogram range; larger values count in the last bin.
        #[arg(long, requires = "hist_bins")]
        hist_max: Option<f32>,
        /// Worker threads (default: all cores). The statistics do not depend on it.
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Describe a GGUF file, a .safetensors file or a checkpoint folder.
    Inspect {
        /// The file or folder.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Print every metadata array in full.
        #[arg(long)]
        full: bool,
    },
}

#[derive(Debug, Subcommand)]
enum ManifestCommand {
    /// Combine the manifests of `kiln build --shard I/N` runs into the manifest of the whole
    /// split artifact (the same bytes a single-machine build writes).
    Merge {
        /// The shard manifests, in any order.
        manifests: Vec<PathBuf>,
        /// Where to write the merged manifest.
        #[arg(long, short)]
        output: PathBuf,
    },
}

#[derive(Debug, Args)]
struct IoOverrides {
    /// Checkpoint to read (overrides the recipe's input path).
    #[arg(long)]
    input: Option<PathBuf>,
    /// Artifact to write (overrides the recipe's output path).
    #[arg(long)]
    output: Option<PathBuf>,
    /// Importance matrix, llama.cpp GGUF or legacy .dat (overrides the recipe's quantize.imatrix).
    #[arg(long)]
    imatrix: Option<PathBuf>,
    /// Activation statistics from `kiln calibrate` (overrides the recipe's calibration.stats).
    #[arg(long)]
    calibration: Option<PathBuf>,
    /// Split the output into shards of at most N tensors (gguf-split's --split-max-tensors).
    #[arg(long, conflicts_with = "split_max_size")]
    split_max_tensors: Option<usize>,
    /// Split the output into shards of at most SIZE bytes of tensor data, e.g. 2G or 500M.
    #[arg(long)]
    split_max_size: Option<String>,
}

#[derive(Debug, Args)]
struct RunOptions {
    /// Build only shard I of N of a split output (1-based, e.g. 2/3): the same bytes as that
    /// shard of a full build. Combine the shard manifests with `kiln manifest merge`.
    #[arg(long, value_parser = parse_shard)]
    shard: Option<(usize, usize)>,
    /// Worker threads (default: all cores, or RAYON_NUM_THREADS). The output does not depend on it.
    #[arg(long)]
    threads: Option<usize>,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
    /// Print the build report as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            output::error(&e);
            ExitCode::from(exit_code(&e))
        }
    }
}

/// Exit codes: 2 recipe or usage, 3 input, 4 output, 1 anything else; `kiln verify` exits 5 when
/// the artifact does not match, `kiln diff` 1 when the files differ (as `diff` does).
fn exit_code(e: &PipelineError) -> u8 {
    match e {
        PipelineError::Recipe(_)
        | PipelineError::NoInput
        | PipelineError::NoOutput
        | PipelineError::ImatrixRequired { .. }
        | PipelineError::RequantizeNotAllowed { .. }
        | PipelineError::PackedRecipe(_)
        | PipelineError::NoCalibration { .. }
        | PipelineError::MethodNotApplicable { .. } => 2,
        PipelineError::Read(_)
        | PipelineError::Arch { .. }
        | PipelineError::NotUnderstood { .. }
        | PipelineError::UnsupportedDtype { .. }
        | PipelineError::BadShape { .. }
        | PipelineError::UnsupportedType { .. }
        | PipelineError::Imatrix { .. }
        | PipelineError::ImatrixFilter { .. }
        | PipelineError::ImatrixShape { .. }
        | PipelineError::UnknownFormat(_)
        | PipelineError::Calibration { .. }
        | PipelineError::Tokens { .. }
        | PipelineError::ActivationStats { .. }
        | PipelineError::MissingCalibration { .. }
        | PipelineError::CalibrationShape { .. } => 3,
        PipelineError::Write { .. } | PipelineError::OutputIsInput(_) => 4,
        _ => 1,
    }
}

fn run(cli: Cli) -> Result<(), PipelineError> {
    // SAFETY: kiln maps its input files read-only. If another process truncates or rewrites a
    // checkpoint while kiln reads it, kiln may die with SIGBUS or read a mix of old and new bytes.
    // Checkpoints are large, written once and then only read, and copying them into memory instead
    // would defeat kiln's bounded-memory design; the output's per-tensor hashes let a user check
    // the result. We accept the risk, as llama.cpp and safetensors users do.
    #[allow(unsafe_code)]
    let access = unsafe { MmapAccess::new() };
    match cli.command {
        Command::Build { recipe, io, run } => {
            let recipe = Recipe::load(&recipe)?.with_overrides(&overrides(io));
            build(&recipe, &access, &run)
        }
        Command::Plan { recipe, io, json } => {
            let recipe = Recipe::load(&recipe)?.with_overrides(&overrides(io));
            let plan = kiln_pipeline::plan(&recipe, &access)?;
            output::plan(&plan, json);
            Ok(())
        }
        Command::Convert {
            input,
            output,
            ty,
            imatrix,
            allow_requantize,
            name,
            run,
        } => {
            let base = match kiln_recipe::presets::get(&ty) {
                Some(preset) => preset?,
                None => Recipe::plain(TypeChoice::parse(&ty).ok_or_else(|| {
                    RecipeError::UnknownType {
                        context: "--type".into(),
                        name: ty.clone(),
                    }
                })?),
            };
            let mut recipe = base.with_overrides(&Overrides {
                input: Some(input),
                output: Some(output),
                imatrix,
                ..Default::default()
            });
            if let Some(name) = name {
                recipe.set_name(&name);
            }
            if allow_requantize {
                recipe.set_allow_requantize(true);
            }
            build(&recipe, &access, &run)
        }
        Command::Verify {
            artifact,
            manifest,
            rebuild,
            input,
            imatrix,
            calibration,
            run,
        } => {
            let report = match (rebuild, input) {
                (true, Some(input)) => kiln_pipeline::verify::verify_rebuild(
                    &artifact,
                    manifest.as_deref(),
                    &input,
                    imatrix.as_deref(),
                    calibration.as_deref(),
                    &BuildOptions {
                        threads: run.threads,
                        ..BuildOptions::default()
                    },
                    &access,
                )?,
                _ => kiln_pipeline::verify::verify(&artifact, manifest.as_deref(), &access)?,
            };
            output::verify(&artifact, &report, run.json);
            if report.ok {
                Ok(())
            } else {
                std::process::exit(5);
            }
        }
        Command::Diff {
            a,
            b,
            no_numeric,
            threads,
            json,
        } => {
            let options = kiln_pipeline::diff::DiffOptions {
                numeric: !no_numeric,
                threads,
                ..Default::default()
            };
            let report = kiln_pipeline::diff::diff(&a, &b, &access, &options)?;
            output::diff(&report, json);
            if report.identical {
                Ok(())
            } else {
                std::process::exit(1);
            }
        }
        Command::Manifest(ManifestCommand::Merge { manifests, output }) => {
            let merged = kiln_pipeline::verify::merge_manifests(&manifests)?;
            kiln_pipeline::verify::write_manifest_file(&output, &merged)?;
            Ok(())
        }
        Command::Calibrate {
            checkpoint,
            tokens,
            output,
            ctx,
            chunks,
            no_gram,
            hist_bins,
            hist_max,
            threads,
        } => {
            use kiln_pipeline::calibrate::{calibrate_to_file, CalibrateOptions, HistogramSpec};
            let options = CalibrateOptions {
                n_ctx: ctx,
                chunks,
                gram: !no_gram,
                histogram: hist_bins
                    .zip(hist_max)
                    .map(|(bins, max)| HistogramSpec { bins, max }),
                threads,
            };
            let report = calibrate_to_file(&access, &checkpoint, &tokens, &output, &options)?;
            // Kept here rather than in `output` so the subcommand stays in one place.
            #[allow(clippy::print_stdout)]
            {
                println!(
                    "{}: {} chunks × {ctx} tokens = {} tokens in {:.2}s on {} threads ({:.0} tokens/s)",
                    output.display(),
                    report.chunks,
                    report.tokens,
                    report.seconds,
                    report.threads,
                    report.tokens_per_second()
                );
            }
            Ok(())
        }
        Command::Inspect { path, json, full } => {
            let inspection = kiln_pipeline::inspect(&path, &access)?;
            output::inspection(&inspection, json, full);
            Ok(())
        }
    }
}

fn parse_shard(s: &str) -> Result<(usize, usize), String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N, e.g. 2/3")?;
    let i = i
        .trim()
        .parse()
        .map_err(|_| format!("`{i}` is not a shard number"))?;
    let n = n
        .trim()
        .parse()
        .map_err(|_| format!("`{n}` is not a shard count"))?;
    Ok((i, n))
}

fn overrides(io: IoOverrides) -> Overrides {
    Overrides {
        input: io.input,
        output: io.output,
        imatrix: io.imatrix,
        calibration: io.calibration,
        split_max_tensors: io.split_max_tensors,
        split_max_size: io.split_max_size,
    }
}

fn build(recipe: &Recipe, access: &MmapAccess, run: &RunOptions) -> Result<(), PipelineError> {
    if recipe.format.is_packed() {
        let report = kiln_pipeline::build_packed(recipe, access, run.threads)?;
        output::packed_report(&report, run.json, run.quiet);
        return Ok(());
    }
    let plan = kiln_pipeline::plan(recipe, access)?;
    let progress = progress::Bar::new(run.quiet);
    let options = BuildOptions {
        threads: run.threads,
        shard: run.shard,
        ..BuildOptions::default()
    };
    let report = kiln_pipeline::build(&plan, &options, &progress)?;
    output::report(&report, run.json, run.quiet);
    Ok(())
}
