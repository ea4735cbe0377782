//! Pipeline errors.

use std::path::PathBuf;

use kiln_types::GgmlType;

/// Why a plan or build failed. Each variant says which file and tensor were involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PipelineError {
    /// The recipe is invalid.
    #[error(transparent)]
    Recipe(#[from] kiln_recipe::RecipeError),
    /// Neither the recipe nor the command line names an input.
    #[error("no input: set [input] path in the recipe or pass --input")]
    NoInput,
    /// Neither the recipe nor the command line names an output.
    #[error("no output: set [output] path in the recipe or pass --output")]
    NoOutput,
    /// The output path is one of the input files.
    #[error("output {0} would overwrite an input file")]
    OutputIsInput(PathBuf),
    /// The checkpoint could not be read.
    #[error(transparent)]
    Read(#[from] kiln_reader::ReadError),
    /// The model family rejected the checkpoint.
    #[error("{path}: {source}")]
    Arch {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        source: kiln_arch::ArchError,
    },
    /// The checkpoint has an architecture, tensors or settings kiln does not understand; the
    /// report names each of them.
    #[error("{path}: kiln does not understand this checkpoint, so it converts nothing:\n{report}")]
    NotUnderstood {
        /// The checkpoint folder.
        path: PathBuf,
        /// What kiln understood and what it did not.
        report: Box<crate::model_report::ModelReport>,
    },
    /// A tensor's element type cannot be converted.
    #[error(
        "{path}: tensor `{tensor}` has unsupported dtype {dtype} (kiln reads F32, F16 and BF16)"
    )]
    UnsupportedDtype {
        /// The shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its dtype.
        dtype: String,
    },
    /// A tensor asks for a type kiln cannot produce.
    #[error("tensor `{tensor}`: kiln cannot produce type {ty} yet")]
    UnsupportedType {
        /// The tensor (GGUF name).
        tensor: String,
        /// The type.
        ty: GgmlType,
    },
    /// A tensor's shape cannot be stored.
    #[error("{path}: tensor `{tensor}`: {problem}")]
    BadShape {
        /// The shard file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// What is wrong.
        problem: String,
    },
    /// Quantizing a tensor failed.
    #[error("tensor `{tensor}`: {source}")]
    Quant {
        /// The tensor (GGUF name).
        tensor: String,
        /// What failed.
        source: kiln_quant::QuantError,
    },
    /// Writing the output failed.
    #[error("{path}: {source}")]
    Write {
        /// The output file.
        path: PathBuf,
        /// What failed.
        source: kiln_writer::WriteError,
    },
    /// The thread pool could not be created.
    #[error("cannot start {threads} worker threads: {message}")]
    Threads {
        /// Threads asked for.
        threads: usize,
        /// Why.
        message: String,
    },
    /// The importance-matrix file is malformed.
    #[error("{path}: {source}")]
    Imatrix {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: kiln_reader::imatrix::ImatrixError,
    },
    /// The importance-matrix filters are invalid.
    #[error("{path}: {source}")]
    ImatrixFilter {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: kiln_calib::CalibError,
    },
    /// A tensor is already quantized and the recipe does not allow requantizing it.
    #[error("{path}: tensor `{tensor}` is already {from}; converting it to {to} would quantize it twice (set quantize.allow-requantize = true to allow it)")]
    RequantizeNotAllowed {
        /// The input file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Its stored type.
        from: GgmlType,
        /// The requested type.
        to: GgmlType,
    },
    /// A type that needs importance data has none for a tensor.
    #[error("tensor `{tensor}`: type {ty} requires an importance matrix{}", if *have_file { " entry for this tensor, and the imatrix file has none" } else { " (give one with --imatrix or quantize.imatrix)" })]
    ImatrixRequired {
        /// The tensor.
        tensor: String,
        /// The type.
        ty: GgmlType,
        /// Whether an imatrix file was given at all.
        have_file: bool,
    },
    /// An imatrix entry does not match the tensor's row length.
    #[error("tensor `{tensor}`: the importance matrix has {actual} weights, the tensor needs {expected}")]
    ImatrixShape {
        /// The tensor.
        tensor: String,
        /// Weights needed.
        expected: u64,
        /// Weights present.
        actual: u64,
    },
    /// A split GGUF input is inconsistent.
    #[error("{path}: {source}")]
    SplitInput {
        /// The file given.
        path: PathBuf,
        /// What is wrong.
        source: Box<kiln_reader::split::SplitReadError>,
    },
    /// The split setting is invalid.
    #[error("split: {source}")]
    Split {
        /// What is wrong.
        source: kiln_writer::split::SplitError,
    },
    /// `--shard I/N` does not fit the plan.
    #[error("--shard {shard}/{count}: {problem}")]
    BadShard {
        /// I.
        shard: usize,
        /// N.
        count: usize,
        /// What is wrong.
        problem: String,
    },
    /// Manifests cannot be merged.
    #[error("cannot merge manifests: {0}")]
    ManifestMerge(String),
    /// A manifest cannot be read.
    #[error("{path}: not a kiln manifest: {message}")]
    BadManifest {
        /// The manifest.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A file to inspect is neither GGUF nor safetensors.
    #[error("{0}: not a GGUF file, a safetensors file or a checkpoint folder")]
    UnknownFormat(PathBuf),
    /// The calibration capture cannot run this checkpoint (configuration, tensors or tokens).
    #[error("{path}: calibration: {source}")]
    Calibration {
        /// The checkpoint folder.
        path: PathBuf,
        /// What is wrong.
        source: kiln_calib::capture::CaptureError,
    },
    /// A tokens file is malformed.
    #[error("{path}: {problem}")]
    Tokens {
        /// The tokens file.
        path: PathBuf,
        /// What is wrong, and where.
        problem: String,
    },
    /// An activation-statistics file is malformed (or the statistics cannot be serialized).
    #[error("{path}: {source}")]
    ActivationStats {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: kiln_calib::ActivationsError,
    },
    /// A packed output needs calibration statistics that the file does not have.
    #[error("{path}: no activation statistics for `{module}` (needed by {method}); capture them with `kiln calibrate`")]
    MissingCalibration {
        /// The statistics file.
        path: PathBuf,
        /// The linear module.
        module: String,
        /// The method that needs them.
        method: String,
    },
    /// A method needs activation statistics and the recipe names no file.
    #[error("{tensor}: method {method} needs activation statistics: set `[calibration] stats` (or pass --calibration) to a file made by `kiln calibrate`")]
    NoCalibration {
        /// The first tensor that needs them.
        tensor: String,
        /// The method.
        method: String,
    },
    /// A statistics file's module has a different number of input columns than the weight.
    #[error("{path}: activation statistics for `{module}` have {actual} input columns, the weight has {expected} (statistics of another model?)")]
    CalibrationShape {
        /// The statistics file.
        path: PathBuf,
        /// The linear module.
        module: String,
        /// The weight's input columns.
        expected: u64,
        /// The statistics' columns.
        actual: u64,
    },
    /// The recipe asks for a method that cannot produce this tensor's type or shape.
    #[error("tensor `{tensor}`: {problem}")]
    MethodNotApplicable {
        /// The tensor.
        tensor: String,
        /// Why, and what to do.
        problem: String,
    },
    /// A quantization method failed on a tensor.
    #[error("tensor `{tensor}`: {source}")]
    Method {
        /// The tensor.
        tensor: String,
        /// What went wrong.
        source: kiln_quant::methods::MethodError,
    },
    /// A packed tensor could not be encoded.
    #[error("{source}")]
    Packed {
        /// What went wrong (it names the tensor).
        #[from]
        source: kiln_writer::packed::PackedError,
    },
    /// Writing a safetensors folder failed.
    #[error("{path}: {source}")]
    WriteSafetensors {
        /// The output folder.
        path: PathBuf,
        /// What went wrong.
        source: kiln_writer::safetensors::SafetensorsError,
    },
    /// bitsandbytes quantization refused a tensor.
    #[error("tensor `{tensor}`: {source}")]
    Bnb {
        /// The tensor.
        tensor: String,
        /// What went wrong.
        source: kiln_quant::bnb::BnbError,
    },
    /// The recipe asks for packed weights the format cannot hold together.
    #[error("{0}")]
    PackedRecipe(String),
}
