//! Calibration capture: runs a Llama-family checkpoint over tokenized calibration text and
//! collects every linear layer's input statistics ([`ActivationStats`]), the data GPTQ, AWQ, LSQ
//! and the activation range estimators work from.
//!
//! - [`calibrate`] opens the checkpoint (memory-mapped through `kiln-reader`), reads
//!   `config.json` into a [`ModelConfig`] ([`model_config`]), reads the token ids
//!   ([`read_tokens`]) and runs [`kiln_calib::capture::capture`] on a thread pool of
//!   [`CalibrateOptions::threads`] threads. Weights are dequantized to `f32` one layer at a time
//!   (`kiln_quant::dequantize_rows`), and their mapped pages released afterwards.
//! - [`calibrate_to_file`] does the same and writes the statistics file with [`write_stats`],
//!   atomically (nothing appears under the name until the whole file is written);
//!   [`read_stats`] reads one back.
//!
//! # Tokens file
//!
//! UTF-8 text, one of two forms:
//!
//! - **plain** (what `tools/tokenize_calib.py` writes): token ids as decimal integers separated
//!   by whitespace (spaces or newlines, any number per line); lines whose first non-blank
//!   character is `#` are comments;
//! - **JSON**: a single array of integers (`[1, 415, 2]`), recognised by a leading `[`.
//!
//! The ids are the tokenizer's output as it is: no BOS is added here; the capture puts BOS at the
//! start of every chunk (see [`kiln_calib::capture`]).
//!
//! # Supported checkpoints
//!
//! `LlamaForCausalLM`, `MistralForCausalLM` (sliding window honoured) and `Qwen2ForCausalLM`
//! (without `use_sliding_window`), with `hidden_act = "silu"` and RoPE type `default`, `linear`
//! or `llama3`, in F32, F16 or BF16. Anything else is refused before any computation.

use std::io::Write as _;
use std::path::Path;
use std::time::Instant;

use kiln_arch::HParams;
use kiln_calib::capture::{
    self, CaptureError, CaptureOptions, ModelConfig, RopeScaling, Tensor, Weights,
};
use kiln_reader::{Checkpoint, MmapAccess};
use serde_json::Value;

use crate::PipelineError;

pub use kiln_calib::{ActivationStats, HistogramSpec};

/// Architectures [`calibrate`] runs (`config.json` `architectures[0]`).
pub const SUPPORTED_ARCHITECTURES: &[&str] = &[
    "LlamaForCausalLM",
    "LLaMAForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
];

/// How to run a calibration capture.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateOptions {
    /// Tokens per chunk (llama-imatrix's `-c`; the fixture's golden imatrix used 128).
    pub n_ctx: usize,
    /// Use at most this many chunks (llama-imatrix's `--chunks`); `None`: all full chunks.
    pub chunks: Option<usize>,
    /// Collect the Gram matrix `XᵀX` of every input (needed by GPTQ; `cols²` f64 values each).
    pub gram: bool,
    /// Collect a histogram of `|x|` per input with these bins (for entropy calibration).
    pub histogram: Option<HistogramSpec>,
    /// Worker threads (`None`: rayon's default, all cores or `RAYON_NUM_THREADS`). The
    /// statistics do not depend on it.
    pub threads: Option<usize>,
}

impl Default for CalibrateOptions {
    fn default() -> CalibrateOptions {
        CalibrateOptions {
            n_ctx: 128,
            chunks: None,
            gram: true,
            histogram: None,
            threads: None,
        }
    }
}

/// What a capture did, for the caller to print.
#[derive(Debug, Clone, PartialEq)]
pub struct CalibrateReport {
    /// Chunks evaluated.
    pub chunks: usize,
    /// Tokens evaluated (`chunks · n_ctx`).
    pub tokens: usize,
    /// Threads used.
    pub threads: usize,
    /// Wall time of the forward passes (weights decoding included), in seconds.
    pub seconds: f64,
}

impl CalibrateReport {
    /// Throughput in tokens per second.
    pub fn tokens_per_second(&self) -> f64 {
        self.tokens as f64 / self.seconds.max(f64::MIN_POSITIVE)
    }
}

/// Runs the checkpoint at `checkpoint` over the token ids in the file `tokens` and returns the
/// statistics of every linear layer's input. The dataset name recorded is the tokens file's name
/// (never its folder: kiln writes no paths into its outputs).
pub fn calibrate(
    access: &MmapAccess,
    checkpoint: &Path,
    tokens: &Path,
    options: &CalibrateOptions,
) -> Result<ActivationStats, PipelineError> {
    run(access, checkpoint, tokens, options, None).map(|(stats, _)| stats)
}

/// [`calibrate`], then [`write_stats`] to `output`; returns what was done. Before computing
/// anything it checks that `output` is none of the inputs (the tokens file, the checkpoint's
/// files and `config.json`).
pub fn calibrate_to_file(
    access: &MmapAccess,
    checkpoint: &Path,
    tokens: &Path,
    output: &Path,
    options: &CalibrateOptions,
) -> Result<CalibrateReport, PipelineError> {
    let (stats, report) = run(access, checkpoint, tokens, options, Some(output))?;
    write_stats(output, &stats)?;
    Ok(report)
}

fn run(
    access: &MmapAccess,
    checkpoint: &Path,
    tokens: &Path,
    options: &CalibrateOptions,
    output: Option<&Path>,
) -> Result<(ActivationStats, CalibrateReport), PipelineError> {
    let ck = Checkpoint::open(access, checkpoint)?;
    let folder = ck.folder().to_path_buf();
    if let Some(out) = output.and_then(|p| p.canonicalize().ok()) {
        let mut inputs = vec![tokens.to_path_buf(), folder.join("config.json")];
        inputs.extend(ck.shard_paths().map(Path::to_path_buf));
        if inputs
            .iter()
            .any(|p| p.canonicalize().is_ok_and(|p| p == out))
        {
            return Err(PipelineError::OutputIsInput(out));
        }
    }
    let config = ck
        .read_side_json("config.json")?
        .ok_or_else(|| PipelineError::Arch {
            path: folder.clone(),
            source: kiln_arch::ArchError::MissingConfig,
        })?;
    let hp = HParams::from_config(&config).map_err(|source| PipelineError::Arch {
        path: folder.clone(),
        source,
    })?;
    let capture_err = |source| PipelineError::Calibration {
        path: folder.clone(),
        source,
    };
    let model = model_config(&hp).map_err(capture_err)?;
    let ids = read_tokens(tokens)?;

    let capture_options = CaptureOptions {
        n_ctx: options.n_ctx,
        chunks: options.chunks,
        gram: options.gram,
        histogram: options.histogram,
        lm_head: false,
    };
    let mut pool = rayon::ThreadPoolBuilder::new();
    if let Some(n) = options.threads {
        pool = pool.num_threads(n);
    }
    let pool = pool.build().map_err(|e| PipelineError::Threads {
        threads: options.threads.unwrap_or(0),
        message: e.to_string(),
    })?;
    let weights = CheckpointWeights { ck: &ck };
    let started = Instant::now();
    let mut stats = pool
        .install(|| capture::capture(&model, &weights, &ids, &capture_options))
        .map_err(capture_err)?;
    let seconds = started.elapsed().as_secs_f64();
    if let Some(name) = tokens.file_name() {
        stats.datasets = vec![name.to_string_lossy().into_owned()];
    }
    let chunks = capture_options.chunk_count(ids.len());
    let report = CalibrateReport {
        chunks,
        tokens: chunks * options.n_ctx,
        threads: pool.current_num_threads(),
        seconds,
    };
    Ok((stats, report))
}

/// The checkpoint's tensors, decoded to `f32` on request.
struct CheckpointWeights<'a> {
    ck: &'a Checkpoint,
}

impl Weights for CheckpointWeights<'_> {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, CaptureError> {
        let Some(entry) = self.ck.tensor(name) else {
            return Ok(None);
        };
        let fail = |message: String| CaptureError::Weights {
            tensor: name.to_owned(),
            message: format!("{}: {message}", self.ck.tensor_path(entry).display()),
        };
        let ty = entry.dtype.ggml().ok_or_else(|| {
            fail(format!(
                "dtype {} is not supported (F32, F16 and BF16 are)",
                entry.dtype.name()
            ))
        })?;
        let shape = entry
            .shape
            .iter()
            .map(|&d| usize::try_from(d))
            .collect::<Result<Vec<usize>, _>>()
            .map_err(|_| fail("shape does not fit in memory".into()))?;
        let n = shape
            .iter()
            .try_fold(1usize, |a, &b| a.checked_mul(b))
            .ok_or_else(|| fail("shape does not fit in memory".into()))?;
        let mut data = vec![0.0f32; n];
        kiln_quant::dequantize_rows(ty, self.ck.data(entry), &mut data)
            .map_err(|e| fail(e.to_string()))?;
        // The capture keeps its own f32 copy; the mapped pages are no longer needed.
        self.ck.release(entry);
        Ok(Some(Tensor { shape, data }))
    }
}

/// The capture's [`ModelConfig`] from a checkpoint's hyperparameters (`config.json` with the
/// `transformers` class defaults [`HParams`] adds). Refuses architectures, activations and RoPE
/// types the capture does not implement.
pub fn model_config(hp: &HParams) -> Result<ModelConfig, CaptureError> {
    let bad = |field: &'static str, problem: String| CaptureError::BadConfig { field, problem };
    let arch = hp
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(Value::as_str)
        .unwrap_or("");
    if !SUPPORTED_ARCHITECTURES.contains(&arch) {
        return Err(bad(
            "architectures",
            format!(
                "is {arch:?}; the capture runs {}",
                SUPPORTED_ARCHITECTURES.join(", ")
            ),
        ));
    }
    if let Some(act) = hp.str("hidden_act") {
        if act != "silu" {
            return Err(bad(
                "hidden_act",
                format!("is {act:?}; the capture runs silu"),
            ));
        }
    }
    let size = |field: &'static str| -> Result<usize, CaptureError> {
        hp.u64(field)
            .and_then(|v| usize::try_from(v).ok())
            .ok_or_else(|| bad(field, "is missing or not a non-negative integer".into()))
    };
    let hidden_size = size("hidden_size")?;
    let num_heads = size("num_attention_heads")?;
    let num_kv_heads = match hp.get("num_key_value_heads") {
        Some(_) => size("num_key_value_heads")?,
        None => num_heads,
    };
    let head_dim = match hp.get("head_dim") {
        Some(_) => size("head_dim")?,
        None => hidden_size.checked_div(num_heads).unwrap_or(0),
    };
    let number = |field: &'static str, default: f64| -> Result<f64, CaptureError> {
        match hp.get(field) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| bad(field, format!("must be a number, found {v}"))),
        }
    };
    let rope = hp.rope_main();
    let rope_num = |key: &str| rope.get(key).and_then(Value::as_f64);
    let rope_theta = rope_num("rope_theta").unwrap_or(10000.0);
    let rope_type = rope
        .get("rope_type")
        .and_then(Value::as_str)
        .unwrap_or("default");
    let need = |key: &'static str| {
        rope_num(key).ok_or_else(|| bad("rope_scaling", format!("{rope_type} needs `{key}`")))
    };
    let rope_scaling = match rope_type {
        "default" => RopeScaling::None,
        "linear" => RopeScaling::Linear {
            factor: need("factor")?,
        },
        "llama3" => RopeScaling::Llama3 {
            factor: need("factor")?,
            low_freq_factor: need("low_freq_factor")?,
            high_freq_factor: need("high_freq_factor")?,
            original_context: need("original_max_position_embeddings")?,
        },
        other => {
            return Err(bad(
                "rope_scaling",
                format!("type {other:?} is not implemented (default, linear and llama3 are)"),
            ))
        }
    };
    let sliding_window = match arch {
        "MistralForCausalLM" => match hp.get("sliding_window") {
            Some(_) => Some(size("sliding_window")?),
            None => None,
        },
        "Qwen2ForCausalLM" => {
            if hp.get("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                return Err(bad(
                    "use_sliding_window",
                    "Qwen2's per-layer sliding window is not implemented".into(),
                ));
            }
            None
        }
        _ => None,
    };
    let bos = hp
        .u64("bos_token_id")
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| {
            bad(
                "bos_token_id",
                "is missing: the capture starts every chunk with BOS".into(),
            )
        })?;
    let config = ModelConfig {
        hidden_size,
        intermediate_size: size("intermediate_size")?,
        num_layers: size("num_hidden_layers")?,
        num_heads,
        num_kv_heads,
        head_dim,
        vocab_size: size("vocab_size")?,
        rms_norm_eps: number("rms_norm_eps", 1e-6)?,
        rope_theta,
        rope_scaling,
        sliding_window,
        bos_token_id: bos,
    };
    config.validate()?;
    Ok(config)
}

/// Reads a tokens file (see the module documentation for the two forms).
pub fn read_tokens(path: &Path) -> Result<Vec<u32>, PipelineError> {
    let bytes = std::fs::read(path).map_err(|e| kiln_reader::ReadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    parse_tokens(&bytes).map_err(|problem| PipelineError::Tokens {
        path: path.to_path_buf(),
        problem,
    })
}

/// Parses the contents of a tokens file; the error says what is wrong and where.
pub fn parse_tokens(bytes: &[u8]) -> Result<Vec<u32>, String> {
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 text: {e}"))?;
    if text.trim_start().starts_with('[') {
        let values: Vec<Value> =
            serde_json::from_str(text).map_err(|e| format!("not a JSON array: {e}"))?;
        return values
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or_else(|| format!("element {i} ({v}) is not a token id"))
            })
            .collect();
    }
    let mut ids = Vec::new();
    for (line_no, line) in text.lines().enumerate() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        for word in line.split_whitespace() {
            let id = word
                .parse::<u32>()
                .map_err(|_| format!("line {}: `{word}` is not a token id", line_no + 1))?;
            ids.push(id);
        }
    }
    Ok(ids)
}

/// Writes statistics to `path` atomically: nothing appears under the name until the whole file
/// is written and synced, and a failure leaves an existing file there untouched.
pub fn write_stats(path: &Path, stats: &ActivationStats) -> Result<(), PipelineError> {
    let bytes = stats
        .to_safetensors()
        .map_err(|source| PipelineError::ActivationStats {
            path: path.to_path_buf(),
            source,
        })?;
    let err = |source| PipelineError::Write {
        path: path.to_path_buf(),
        source,
    };
    let mut file = kiln_writer::AtomicFile::create(path).map_err(err)?;
    file.file()
        .write_all(&bytes)
        .map_err(|e| err(kiln_writer::WriteError::Stream(e)))?;
    file.commit().map_err(err)
}

/// Reads a statistics file written by [`write_stats`] (or `tools/capture_activations.py`).
pub fn read_stats(path: &Path) -> Result<ActivationStats, PipelineError> {
    let bytes = std::fs::read(path).map_err(|e| kiln_reader::ReadError::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    ActivationStats::from_safetensors(&bytes).map_err(|source| PipelineError::ActivationStats {
        path: path.to_path_buf(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn tokens_parse_in_both_forms() {
        assert_eq!(
            parse_tokens(b"# kiln tokens\n1 2  3\n\n  # more\n4\t5\n").unwrap(),
            vec![1, 2, 3, 4, 5]
        );
        assert_eq!(parse_tokens(b" [1, 2, 3]").unwrap(), vec![1, 2, 3]);
        assert!(parse_tokens(b"1 2 x").unwrap_err().contains("line 1"));
        assert!(parse_tokens(b"1\n-2").unwrap_err().contains("line 2"));
        assert!(parse_tokens(b"[1, 4294967296]")
            .unwrap_err()
            .contains("element 1"));
        assert!(parse_tokens(&[0xff]).is_err());
    }

    #[test]
    fn config_is_read_with_class_defaults_and_rope_scaling() {
        let hp = HParams::from_config(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 6,
            "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 512,
            "bos_token_id": 1, "rms_norm_eps": 1e-5,
            "rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
                "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        let c = model_config(&hp).unwrap();
        assert_eq!(
            (c.head_dim, c.num_kv_heads, c.rope_theta),
            (64, 2, 500000.0)
        );
        assert_eq!(
            c.rope_scaling,
            RopeScaling::Llama3 {
                factor: 8.0,
                low_freq_factor: 1.0,
                high_freq_factor: 4.0,
                original_context: 8192.0
            }
        );
        let refused = [
            json!({"architectures": ["MixtralForCausalLM"], "model_type": "mixtral"}),
            json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "gelu"}),
            json!({"architectures": ["LlamaForCausalLM"], "model_type": "llama",
                "rope_scaling": {"type": "yarn", "factor": 4.0}}),
            json!({"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                "use_sliding_window": true}),
        ];
        for config in refused {
            let hp = HParams::from_config(&config).unwrap();
            assert!(matches!(
                model_config(&hp),
                Err(CaptureError::BadConfig { .. })
            ));
        }
    }
}
