//! Activation capture: a deterministic `f32` CPU forward pass of a Llama-family decoder that
//! records every linear layer's input into [`ActivationStats`].
//!
//! [`capture`] runs the Hugging Face `LlamaForCausalLM` computation (also `MistralForCausalLM`
//! with its sliding window, and `Qwen2ForCausalLM`, whose q/k/v biases are just present
//! tensors) on token ids, with weights handed in through the [`Weights`] trait and the shape of
//! the model in a [`ModelConfig`]. Per layer:
//!
//! ```text
//! x ─ RMSNorm ─┬ q_proj ─ RoPE ┐
//!              ├ k_proj ─ RoPE ┼ causal GQA attention (softmax in f32) ─ o_proj ─ + x ─┐
//!              └ v_proj ───────┘                                                     │
//!   ┌────────────────────────────────────────────────────────────────────────────────┘
//!   └ RMSNorm ─┬ gate_proj ─ SiLU ┐
//!              └ up_proj ──────── × ─ down_proj ─ + ─→ next layer
//! ```
//!
//! The LM head is not run (its input, the final norm's output, is recorded only with
//! [`CaptureOptions::lm_head`]). Biases are used where the checkpoint has them
//! (`{module}.bias`), so `attention_bias`, `mlp_bias` and Qwen2's q/k/v biases need no flag.
//!
//! # Chunks (as `llama-imatrix` makes them)
//!
//! The token ids are cut into `n_ctx`-token chunks: chunk `i` is tokens `i·n_ctx .. (i+1)·n_ctx`,
//! trailing tokens that do not fill a chunk are dropped, and at most
//! [`CaptureOptions::chunks`] chunks are used. The **first token of every chunk is replaced by
//! BOS** ([`ModelConfig::bos_token_id`]), and each chunk is evaluated on its own (positions from
//! 0, no attention across chunks), as `llama-imatrix` does. `llama-imatrix` tokenizes with a
//! leading BOS, so its chunk `i` starts one token earlier in the text than kiln's when the tokens
//! file holds the plain tokenizer output (as `tools/tokenize_calib.py` writes it); prepend the BOS
//! id to the file to get llama-imatrix's chunk boundaries exactly.
//!
//! # What is recorded
//!
//! For layer `l` (prefix `model.layers.{l}`): `self_attn.q_proj` (the attention norm's output;
//! `self_attn.k_proj` and `self_attn.v_proj` are aliases of it), `self_attn.o_proj` (the attention
//! output before the projection), `mlp.gate_proj` (the MLP norm's output; `mlp.up_proj` is an
//! alias) and `mlp.down_proj` (`silu(gate) · up`). With [`CaptureOptions::lm_head`], `lm_head`
//! too. Every statistic counts `n_ctx` rows per chunk. See [`crate::activations`] for the file.
//!
//! # Numerics and determinism
//!
//! Everything is `f32` except where noted: RMSNorm's mean square is summed in `f64` over the
//! hidden features in order, and the rotary angles `pos · θ^(-2i/d)` and their cosines and sines
//! are computed in `f64` and rounded to `f32` (Hugging Face computes them in `f32`; the
//! difference is below `f32` resolution for the angles that matter). Every matrix product sums
//! over the input features in order, one rounded multiply and one rounded add per step (Rust
//! never fuses them into an FMA); the tiled kernel and its plain twin give the same bits (tested).
//! Attention scores, the softmax's sum and the attention-weighted values are likewise summed in a
//! fixed order.
//!
//! Threads (rayon's current pool) only ever run **whole chunks**: the layers run one after
//! another over all chunks (so one layer's weights are in memory at a time, plus every chunk's
//! hidden state), a group of chunks runs in parallel, each producing its own partial statistics,
//! and the partials are added to the totals in chunk order. The result, and so the file, is the
//! same bytes for any number of threads.

use std::collections::BTreeMap;

use rayon::prelude::*;

use crate::activations::{ActivationStats, ActivationsError, HistogramSpec, ModuleStats};

/// A tensor handed to the capture: `f32` values, row-major, with their shape (PyTorch order,
/// slowest dimension first).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    /// Shape, slowest dimension first.
    pub shape: Vec<usize>,
    /// The values, row-major.
    pub data: Vec<f32>,
}

/// Where the capture gets weights: by Hugging Face tensor name (`model.layers.0.mlp.up_proj.weight`).
///
/// The capture asks for one layer's tensors at a time, in layer order, and drops them before the
/// next layer, so an implementation can dequantize on demand from a memory-mapped checkpoint.
pub trait Weights {
    /// The tensor called `name` as `f32`, or `None` if the checkpoint has no such tensor.
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, CaptureError>;
}

impl Weights for BTreeMap<String, Tensor> {
    fn tensor(&self, name: &str) -> Result<Option<Tensor>, CaptureError> {
        Ok(self.get(name).cloned())
    }
}

/// Why a capture failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaptureError {
    /// A tensor the model needs is not in the checkpoint.
    #[error("tensor `{tensor}` is missing")]
    MissingTensor {
        /// The tensor.
        tensor: String,
    },
    /// A tensor has an unexpected shape (or its data does not fill its shape).
    #[error("tensor `{tensor}` has shape {actual:?} ({values} values), expected {expected:?}")]
    TensorShape {
        /// The tensor.
        tensor: String,
        /// The shape the configuration implies.
        expected: Vec<usize>,
        /// The shape found.
        actual: Vec<usize>,
        /// Values handed over.
        values: usize,
    },
    /// The weights could not be read or decoded.
    #[error("tensor `{tensor}`: {message}")]
    Weights {
        /// The tensor.
        tensor: String,
        /// What went wrong.
        message: String,
    },
    /// The model configuration is unusable.
    #[error("model configuration: `{field}` {problem}")]
    BadConfig {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        problem: String,
    },
    /// The options are unusable.
    #[error("capture options: {0}")]
    BadOptions(String),
    /// A token id is outside the vocabulary.
    #[error("token {index} of the input has id {id}, outside the vocabulary of {vocab}")]
    TokenOutOfRange {
        /// Position in the token sequence.
        index: usize,
        /// The id.
        id: u32,
        /// Vocabulary size.
        vocab: usize,
    },
    /// Not even one chunk of tokens.
    #[error("{tokens} tokens do not fill one chunk of {n_ctx}")]
    TooFewTokens {
        /// Tokens given.
        tokens: usize,
        /// Tokens per chunk.
        n_ctx: usize,
    },
    /// The statistics could not be accumulated.
    #[error(transparent)]
    Stats(#[from] ActivationsError),
}

/// RoPE frequency scaling (`rope_parameters` / `rope_scaling` `rope_type`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// `default`: `inv_freq[i] = θ^(-2i/d)`.
    None,
    /// `linear`: every frequency divided by `factor` (positions interpolated).
    Linear {
        /// The factor.
        factor: f64,
    },
    /// `llama3` (Llama 3.1+): low frequencies divided by `factor`, high ones kept, a smooth
    /// blend between, as transformers' `_compute_llama3_parameters`.
    Llama3 {
        /// `factor`.
        factor: f64,
        /// `low_freq_factor`.
        low_freq_factor: f64,
        /// `high_freq_factor`.
        high_freq_factor: f64,
        /// `original_max_position_embeddings`.
        original_context: f64,
    },
}

/// The shape and constants of a Llama-family decoder.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    /// `hidden_size`.
    pub hidden_size: usize,
    /// `intermediate_size`.
    pub intermediate_size: usize,
    /// `num_hidden_layers`.
    pub num_layers: usize,
    /// `num_attention_heads`.
    pub num_heads: usize,
    /// `num_key_value_heads` (divides `num_heads`).
    pub num_kv_heads: usize,
    /// `head_dim` (even; need not be `hidden_size / num_heads`).
    pub head_dim: usize,
    /// `vocab_size`: rows of `model.embed_tokens.weight`.
    pub vocab_size: usize,
    /// `rms_norm_eps`.
    pub rms_norm_eps: f64,
    /// RoPE base `θ`.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Mistral's `sliding_window`: a token attends to itself and the `w - 1` tokens before it.
    pub sliding_window: Option<usize>,
    /// The id that replaces each chunk's first token.
    pub bos_token_id: u32,
}

impl ModelConfig {
    /// Checks that the sizes fit together.
    pub fn validate(&self) -> Result<(), CaptureError> {
        let bad = |field, problem: &str| {
            Err(CaptureError::BadConfig {
                field,
                problem: problem.to_owned(),
            })
        };
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_attention_heads", self.num_heads),
            ("num_key_value_heads", self.num_kv_heads),
            ("head_dim", self.head_dim),
            ("vocab_size", self.vocab_size),
        ] {
            if v == 0 {
                return bad(field, "must be positive");
            }
        }
        if self.num_heads % self.num_kv_heads != 0 {
            return bad("num_key_value_heads", "must divide num_attention_heads");
        }
        if self.head_dim % 2 != 0 {
            return bad("head_dim", "must be even (rotary pairs)");
        }
        if self.num_heads.checked_mul(self.head_dim).is_none() {
            return bad("head_dim", "times the heads overflows");
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps >= 0.0) {
            return bad("rms_norm_eps", "must be a finite non-negative number");
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return bad("rope_theta", "must be a finite positive number");
        }
        if self.sliding_window == Some(0) {
            return bad("sliding_window", "must be positive");
        }
        if self.bos_token_id as usize >= self.vocab_size {
            return bad("bos_token_id", "is outside the vocabulary");
        }
        match self.rope_scaling {
            RopeScaling::None => {}
            RopeScaling::Linear { factor } => {
                if !(factor.is_finite() && factor > 0.0) {
                    return bad("rope_scaling", "factor must be a finite positive number");
                }
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_context,
            } => {
                let ok = [factor, low_freq_factor, high_freq_factor, original_context]
                    .iter()
                    .all(|v| v.is_finite() && *v > 0.0)
                    && high_freq_factor > low_freq_factor;
                if !ok {
                    return bad(
                        "rope_scaling",
                        "llama3 needs positive factors with high_freq_factor > low_freq_factor",
                    );
                }
            }
        }
        Ok(())
    }

    fn q_dim(&self) -> usize {
        self.num_heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.num_kv_heads * self.head_dim
    }
}

/// How to cut the tokens and what to collect.
#[derive(Debug, Clone, PartialEq)]
pub struct CaptureOptions {
    /// Tokens per chunk (llama-imatrix's `-c`).
    pub n_ctx: usize,
    /// At most this many chunks (llama-imatrix's `--chunks`); `None`: every full chunk.
    pub chunks: Option<usize>,
    /// Collect each input's Gram matrix `XᵀX`.
    pub gram: bool,
    /// Collect a histogram of `|x|` per input, with these bins.
    pub histogram: Option<HistogramSpec>,
    /// Also record the LM head's input (the final norm's output) as module `lm_head`.
    pub lm_head: bool,
}

impl CaptureOptions {
    /// `n_ctx`-token chunks, all of them, with Gram matrices, without histograms or the LM head.
    pub fn new(n_ctx: usize) -> CaptureOptions {
        CaptureOptions {
            n_ctx,
            chunks: None,
            gram: true,
            histogram: None,
            lm_head: false,
        }
    }

    /// How many chunks `tokens` tokens give.
    pub fn chunk_count(&self, tokens: usize) -> usize {
        let full = tokens.checked_div(self.n_ctx).unwrap_or(0);
        self.chunks.map_or(full, |c| c.min(full))
    }
}

/// The linear modules of layer `l` whose inputs are recorded, with the aliases that share each
/// input, in the order the forward pass meets them.
pub fn layer_modules(l: usize) -> [(String, Vec<String>); 4] {
    let p = format!("model.layers.{l}");
    [
        (
            format!("{p}.self_attn.q_proj"),
            vec![
                format!("{p}.self_attn.k_proj"),
                format!("{p}.self_attn.v_proj"),
            ],
        ),
        (format!("{p}.self_attn.o_proj"), vec![]),
        (
            format!("{p}.mlp.gate_proj"),
            vec![format!("{p}.mlp.up_proj")],
        ),
        (format!("{p}.mlp.down_proj"), vec![]),
    ]
}

/// Runs the model over the chunks of `tokens` and returns every linear layer's input statistics
/// (see the module documentation). Runs on rayon's current thread pool; the result does not
/// depend on its size.
pub fn capture(
    config: &ModelConfig,
    weights: &dyn Weights,
    tokens: &[u32],
    options: &CaptureOptions,
) -> Result<ActivationStats, CaptureError> {
    config.validate()?;
    if options.n_ctx == 0 {
        return Err(CaptureError::BadOptions("n_ctx must be positive".into()));
    }
    if options.chunks == Some(0) {
        return Err(CaptureError::BadOptions("chunks must be positive".into()));
    }
    if let Some(h) = options.histogram {
        h.validate()?;
    }
    let n_chunks = options.chunk_count(tokens.len());
    if n_chunks == 0 {
        return Err(CaptureError::TooFewTokens {
            tokens: tokens.len(),
            n_ctx: options.n_ctx,
        });
    }
    let n_ctx = options.n_ctx;
    let d = config.hidden_size;
    if let Some((index, &id)) = tokens[..n_chunks * n_ctx]
        .iter()
        .enumerate()
        .find(|(i, &id)| i % n_ctx != 0 && id as usize >= config.vocab_size)
    {
        return Err(CaptureError::TokenOutOfRange {
            index,
            id,
            vocab: config.vocab_size,
        });
    }

    // Embeddings: each chunk's hidden state, the first token replaced by BOS.
    let embed = require(
        weights,
        "model.embed_tokens.weight",
        &[config.vocab_size, d],
    )?;
    let mut hidden: Vec<Vec<f32>> = tokens[..n_chunks * n_ctx]
        .chunks_exact(n_ctx)
        .map(|chunk| {
            let mut h = Vec::with_capacity(n_ctx * d);
            for (i, &id) in chunk.iter().enumerate() {
                let id = if i == 0 { config.bos_token_id } else { id } as usize;
                h.extend_from_slice(&embed[id * d..(id + 1) * d]);
            }
            h
        })
        .collect();
    drop(embed);

    let mut stats = ActivationStats::new();
    let rope = Rope::new(config, n_ctx);
    let group = rayon::current_num_threads().max(1);
    for l in 0..config.num_layers {
        let layer = LayerWeights::load(weights, config, l)?;
        let mut totals: Vec<ModuleStats> = Vec::new();
        for chunk_group in hidden.chunks_mut(group) {
            let partials = chunk_group
                .par_iter_mut()
                .map(|h| layer_forward(&layer, config, &rope, options, h))
                .collect::<Result<Vec<_>, _>>()?;
            for partial in partials {
                add_partials(&mut totals, partial)?;
            }
        }
        for ((name, aliases), total) in layer_modules(l).into_iter().zip(totals) {
            stats.insert(&name, total)?;
            for alias in aliases {
                stats.add_alias(&alias, &name)?;
            }
        }
    }
    if options.lm_head {
        let norm = require(weights, "model.norm.weight", &[d])?;
        let mut totals: Vec<ModuleStats> = Vec::new();
        for chunk_group in hidden.chunks(group) {
            let partials = chunk_group
                .par_iter()
                .map(|h| {
                    let x = rms_norm(h, &norm, config.rms_norm_eps);
                    ModuleStats::from_rows(&x, d, options.gram, options.histogram)
                })
                .collect::<Result<Vec<_>, _>>()?;
            for partial in partials {
                add_partials(&mut totals, [partial])?;
            }
        }
        for total in totals {
            stats.insert("lm_head", total)?;
        }
    }
    stats.chunk_size = u32::try_from(n_ctx).ok();
    stats.chunk_count = n_chunks as u64;
    Ok(stats)
}

/// Adds one chunk's partial statistics to the running totals (empty on the first chunk: the
/// totals then start from zero, exactly as [`ModuleStats::add_rows`] accumulates).
fn add_partials<const N: usize>(
    totals: &mut Vec<ModuleStats>,
    partials: [ModuleStats; N],
) -> Result<(), ActivationsError> {
    if totals.is_empty() {
        for p in &partials {
            totals.push(ModuleStats::new(
                p.cols(),
                p.gram().is_some(),
                p.histogram_spec(),
            )?);
        }
    }
    for (total, p) in totals.iter_mut().zip(&partials) {
        total.merge(p)?;
    }
    Ok(())
}

/// A required tensor with its shape checked.
fn require(weights: &dyn Weights, name: &str, shape: &[usize]) -> Result<Vec<f32>, CaptureError> {
    optional(weights, name, shape)?.ok_or_else(|| CaptureError::MissingTensor {
        tensor: name.to_owned(),
    })
}

/// An optional tensor (a bias) with its shape checked when present.
fn optional(
    weights: &dyn Weights,
    name: &str,
    shape: &[usize],
) -> Result<Option<Vec<f32>>, CaptureError> {
    let Some(t) = weights.tensor(name)? else {
        return Ok(None);
    };
    let elements = shape.iter().try_fold(1usize, |a, &b| a.checked_mul(b));
    if t.shape != shape || elements != Some(t.data.len()) {
        return Err(CaptureError::TensorShape {
            tensor: name.to_owned(),
            expected: shape.to_vec(),
            actual: t.shape,
            values: t.data.len(),
        });
    }
    Ok(Some(t.data))
}

/// Columns per packed weight panel: the matmul kernel keeps `ROWS × PANEL` sums in registers.
const PANEL: usize = 8;
/// Rows (tokens) per matmul tile. 6 × 8 sums fill 12 of x86-64's 16 baseline SIMD registers;
/// measured about 1.5× faster than 4 × 8, 4 × 12 or 3 × 16 on the fixture's shapes.
const ROWS: usize = 6;

/// One block of output rows for [`Linear::pack`]: the weight (`out × inp`), its bias if any,
/// and `out`.
type Part<'a> = (&'a [f32], Option<&'a [f32]>, usize);

/// A weight matrix `W` (`out × inp`, PyTorch layout) packed for [`Linear::forward`]: column panels of
/// [`PANEL`] outputs, each stored input-major (`panel[i·PANEL + b] = W[p·PANEL + b][i]`), the
/// last panel padded with zero columns; plus the optional bias.
struct Linear {
    inp: usize,
    out: usize,
    panels: Vec<f32>,
    bias: Option<Vec<f32>>,
}

impl Linear {
    /// Packs the concatenation (along the outputs) of `parts`.
    fn pack(inp: usize, parts: &[Part<'_>]) -> Linear {
        let out: usize = parts.iter().map(|p| p.2).sum();
        let n_panels = out.div_ceil(PANEL);
        let mut panels = vec![0.0f32; n_panels * inp * PANEL];
        let mut o = 0;
        for (w, _, rows) in parts {
            for r in 0..*rows {
                let (p, b) = ((o + r) / PANEL, (o + r) % PANEL);
                let panel = &mut panels[p * inp * PANEL..(p + 1) * inp * PANEL];
                for (i, &v) in w[r * inp..(r + 1) * inp].iter().enumerate() {
                    panel[i * PANEL + b] = v;
                }
            }
            o += rows;
        }
        let bias = if parts.iter().any(|p| p.1.is_some()) {
            let mut b = Vec::with_capacity(out);
            for (_, bias, rows) in parts {
                match bias {
                    Some(v) => b.extend_from_slice(v),
                    None => b.extend(std::iter::repeat_n(0.0, *rows)),
                }
            }
            Some(b)
        } else {
            None
        };
        Linear {
            inp,
            out,
            panels,
            bias,
        }
    }

    /// `y = x Wᵀ + b` for `x` of `rows × inp`; `y` is `rows × out`.
    ///
    /// Each output is `Σᵢ x[r][i]·W[o][i]` summed over `i` in order from 0, then the bias added;
    /// the tile shape never changes a bit (tested against [`Linear::forward_ref`]).
    fn forward(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        let mut y = vec![0.0f32; rows * out];
        let mut r0 = 0;
        while r0 < rows {
            let m = ROWS.min(rows - r0);
            for (p, panel) in self.panels.chunks_exact(inp * PANEL).enumerate() {
                let c0 = p * PANEL;
                let width = PANEL.min(out - c0);
                if m == ROWS {
                    let acc = tile::<ROWS>(&x[r0 * inp..(r0 + ROWS) * inp], inp, panel);
                    for (a, sums) in acc.iter().enumerate() {
                        y[(r0 + a) * out + c0..(r0 + a) * out + c0 + width]
                            .copy_from_slice(&sums[..width]);
                    }
                } else {
                    for a in 0..m {
                        let acc = tile::<1>(&x[(r0 + a) * inp..(r0 + a + 1) * inp], inp, panel);
                        y[(r0 + a) * out + c0..(r0 + a) * out + c0 + width]
                            .copy_from_slice(&acc[0][..width]);
                    }
                }
            }
            r0 += m;
        }
        if let Some(b) = &self.bias {
            for row in y.chunks_exact_mut(out) {
                for (v, b) in row.iter_mut().zip(b) {
                    *v += b;
                }
            }
        }
        y
    }

    /// The plain loop [`Linear::forward`] must agree with bit for bit.
    #[cfg(test)]
    fn forward_ref(&self, x: &[f32], rows: usize) -> Vec<f32> {
        let (inp, out) = (self.inp, self.out);
        let mut y = vec![0.0f32; rows * out];
        for r in 0..rows {
            for o in 0..out {
                let (p, b) = (o / PANEL, o % PANEL);
                let mut acc = 0.0f32;
                for i in 0..inp {
                    acc += x[r * inp + i] * self.panels[p * inp * PANEL + i * PANEL + b];
                }
                // Without a bias nothing is added (not even `+ 0.0`, which would turn -0 into +0).
                if let Some(bias) = &self.bias {
                    acc += bias[o];
                }
                y[r * out + o] = acc;
            }
        }
        y
    }
}

/// `M` rows of `x` (row-major, `inp` columns) times one packed panel: `M × PANEL` sums, each over
/// the inputs in order.
#[inline(always)]
fn tile<const M: usize>(x: &[f32], inp: usize, panel: &[f32]) -> [[f32; PANEL]; M] {
    let mut acc = [[0.0f32; PANEL]; M];
    let rows: [&[f32]; M] = std::array::from_fn(|a| &x[a * inp..(a + 1) * inp]);
    for (i, w) in panel.chunks_exact(PANEL).enumerate() {
        let Ok(w) = <&[f32; PANEL]>::try_from(w) else {
            continue; // unreachable: chunks_exact gives PANEL values
        };
        for a in 0..M {
            let xa = rows[a][i];
            for b in 0..PANEL {
                acc[a][b] += xa * w[b];
            }
        }
    }
    acc
}

/// One layer's weights, packed.
struct LayerWeights {
    input_norm: Vec<f32>,
    post_norm: Vec<f32>,
    /// q, k and v projections side by side (`q_dim + 2·kv_dim` outputs).
    qkv: Linear,
    o: Linear,
    /// gate and up side by side (`2·intermediate_size` outputs).
    gate_up: Linear,
    down: Linear,
}

impl LayerWeights {
    fn load(
        weights: &dyn Weights,
        c: &ModelConfig,
        l: usize,
    ) -> Result<LayerWeights, CaptureError> {
        let p = format!("model.layers.{l}");
        let (d, f, qd, kd) = (c.hidden_size, c.intermediate_size, c.q_dim(), c.kv_dim());
        let w = |m: &str, out: usize, inp: usize| {
            require(weights, &format!("{p}.{m}.weight"), &[out, inp])
        };
        let b = |m: &str, out: usize| optional(weights, &format!("{p}.{m}.bias"), &[out]);
        let (q, qb) = (w("self_attn.q_proj", qd, d)?, b("self_attn.q_proj", qd)?);
        let (k, kb) = (w("self_attn.k_proj", kd, d)?, b("self_attn.k_proj", kd)?);
        let (v, vb) = (w("self_attn.v_proj", kd, d)?, b("self_attn.v_proj", kd)?);
        let qkv = Linear::pack(
            d,
            &[
                (&q, qb.as_deref(), qd),
                (&k, kb.as_deref(), kd),
                (&v, vb.as_deref(), kd),
            ],
        );
        let (o, ob) = (w("self_attn.o_proj", d, qd)?, b("self_attn.o_proj", d)?);
        let o = Linear::pack(qd, &[(&o, ob.as_deref(), d)]);
        let (g, gb) = (w("mlp.gate_proj", f, d)?, b("mlp.gate_proj", f)?);
        let (u, ub) = (w("mlp.up_proj", f, d)?, b("mlp.up_proj", f)?);
        let gate_up = Linear::pack(d, &[(&g, gb.as_deref(), f), (&u, ub.as_deref(), f)]);
        let (dn, db) = (w("mlp.down_proj", d, f)?, b("mlp.down_proj", d)?);
        let down = Linear::pack(f, &[(&dn, db.as_deref(), d)]);
        Ok(LayerWeights {
            input_norm: require(weights, &format!("{p}.input_layernorm.weight"), &[d])?,
            post_norm: require(
                weights,
                &format!("{p}.post_attention_layernorm.weight"),
                &[d],
            )?,
            qkv,
            o,
            gate_up,
            down,
        })
    }
}

/// Rotary cosines and sines per position and frequency (`n_ctx × head_dim/2`).
struct Rope {
    half: usize,
    cos: Vec<f32>,
    sin: Vec<f32>,
}

impl Rope {
    fn new(c: &ModelConfig, n_ctx: usize) -> Rope {
        let half = c.head_dim / 2;
        let dim = c.head_dim as f64;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = 1.0 / c.rope_theta.powf((2 * i) as f64 / dim);
                scale_frequency(f, c.rope_scaling)
            })
            .collect();
        let mut cos = Vec::with_capacity(n_ctx * half);
        let mut sin = Vec::with_capacity(n_ctx * half);
        for pos in 0..n_ctx {
            for f in &inv_freq {
                let angle = pos as f64 * f;
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
        Rope { half, cos, sin }
    }

    /// Rotates one head's vector at position `pos`, in Hugging Face's rotate-half layout:
    /// `x[i]` pairs with `x[i + d/2]`.
    fn apply(&self, x: &mut [f32], pos: usize) {
        let h = self.half;
        let (cos, sin) = (
            &self.cos[pos * h..(pos + 1) * h],
            &self.sin[pos * h..(pos + 1) * h],
        );
        let (lo, hi) = x.split_at_mut(h);
        for i in 0..h {
            let (a, b) = (lo[i], hi[i]);
            lo[i] = a * cos[i] - b * sin[i];
            hi[i] = b * cos[i] + a * sin[i];
        }
    }
}

/// One rotary frequency after the configured scaling.
fn scale_frequency(f: f64, scaling: RopeScaling) -> f64 {
    match scaling {
        RopeScaling::None => f,
        RopeScaling::Linear { factor } => f / factor,
        RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_context,
        } => {
            let low_wavelen = original_context / low_freq_factor;
            let high_wavelen = original_context / high_freq_factor;
            let wavelen = 2.0 * std::f64::consts::PI / f;
            if wavelen < high_wavelen {
                f
            } else if wavelen > low_wavelen {
                f / factor
            } else {
                let smooth = (original_context / wavelen - low_freq_factor)
                    / (high_freq_factor - low_freq_factor);
                (1.0 - smooth) * f / factor + smooth * f
            }
        }
    }
}

/// RMSNorm of each row of `x` (`rows × w.len()`): `w · (x / sqrt(mean(x²) + eps))`, the mean
/// square summed in `f64`.
fn rms_norm(x: &[f32], w: &[f32], eps: f64) -> Vec<f32> {
    let d = w.len();
    let mut out = Vec::with_capacity(x.len());
    for row in x.chunks_exact(d) {
        let ss: f64 = row
            .iter()
            .fold(0.0, |s, &v| s + f64::from(v) * f64::from(v));
        let r = (1.0 / (ss / d as f64 + eps).sqrt()) as f32;
        out.extend(row.iter().zip(w).map(|(&v, &w)| w * (v * r)));
    }
    out
}

/// Runs one layer on one chunk's hidden state (`n_ctx × hidden`, updated in place) and returns
/// the partial statistics of the layer's four recorded inputs, in [`layer_modules`] order.
fn layer_forward(
    lw: &LayerWeights,
    c: &ModelConfig,
    rope: &Rope,
    opts: &CaptureOptions,
    h: &mut [f32],
) -> Result<[ModuleStats; 4], ActivationsError> {
    let (d, f, hd) = (c.hidden_size, c.intermediate_size, c.head_dim);
    let (qd, kd) = (c.q_dim(), c.kv_dim());
    let t = h.len() / d;
    let stats = |x: &[f32], cols: usize| ModuleStats::from_rows(x, cols, opts.gram, opts.histogram);

    // Attention.
    let x = rms_norm(h, &lw.input_norm, c.rms_norm_eps);
    let s_qkv = stats(&x, d)?;
    let mut qkv = lw.qkv.forward(&x, t);
    let width = qd + 2 * kd;
    for (pos, row) in qkv.chunks_exact_mut(width).enumerate() {
        for head in row[..qd + kd].chunks_exact_mut(hd) {
            rope.apply(head, pos);
        }
    }
    let attn = attention(&qkv, t, c);
    let s_o = stats(&attn, qd)?;
    let o = lw.o.forward(&attn, t);
    for (hv, ov) in h.iter_mut().zip(&o) {
        *hv += ov;
    }

    // MLP.
    let x = rms_norm(h, &lw.post_norm, c.rms_norm_eps);
    let s_gate = stats(&x, d)?;
    let gu = lw.gate_up.forward(&x, t);
    let mut m = Vec::with_capacity(t * f);
    for row in gu.chunks_exact(2 * f) {
        let (g, u) = row.split_at(f);
        m.extend(g.iter().zip(u).map(|(&g, &u)| g / (1.0 + (-g).exp()) * u));
    }
    let s_down = stats(&m, f)?;
    let dn = lw.down.forward(&m, t);
    for (hv, dv) in h.iter_mut().zip(&dn) {
        *hv += dv;
    }
    Ok([s_qkv, s_o, s_gate, s_down])
}

/// Causal grouped-query attention over one chunk. `qkv` holds, per token, the rotated queries
/// (`num_heads × head_dim`), keys and values (`num_kv_heads × head_dim` each); returns
/// `n_ctx × (num_heads · head_dim)`, heads side by side as `o_proj` reads them.
fn attention(qkv: &[f32], t: usize, c: &ModelConfig) -> Vec<f32> {
    let (hd, qd, kd) = (c.head_dim, c.q_dim(), c.kv_dim());
    let width = qd + 2 * kd;
    let group = c.num_heads / c.num_kv_heads;
    let scale = (hd as f32).powf(-0.5);
    let mut out = vec![0.0f32; t * qd];
    let mut kt = vec![0.0f32; hd * t];
    let mut scores = vec![0.0f32; t];
    for kvh in 0..c.num_kv_heads {
        // Keys transposed (head_dim × t), so scores for many keys accumulate side by side.
        for j in 0..t {
            let k = &qkv[j * width + qd + kvh * hd..j * width + qd + (kvh + 1) * hd];
            for (e, &v) in k.iter().enumerate() {
                kt[e * t + j] = v;
            }
        }
        for head in kvh * group..(kvh + 1) * group {
            for i in 0..t {
                let lo = c.sliding_window.map_or(0, |w| (i + 1).saturating_sub(w));
                let q = &qkv[i * width + head * hd..i * width + (head + 1) * hd];
                let s = &mut scores[lo..=i];
                s.fill(0.0);
                for (e, &qe) in q.iter().enumerate() {
                    for (sj, &kj) in s.iter_mut().zip(&kt[e * t + lo..=e * t + i]) {
                        *sj += qe * kj;
                    }
                }
                let mut max = f32::NEG_INFINITY;
                for sj in s.iter_mut() {
                    *sj *= scale;
                    max = max.max(*sj);
                }
                let mut sum = 0.0f32;
                for sj in s.iter_mut() {
                    *sj = (*sj - max).exp();
                    sum += *sj;
                }
                let o = &mut out[i * qd + head * hd..i * qd + (head + 1) * hd];
                for (j, &p) in (lo..=i).zip(s.iter()) {
                    let p = p / sum;
                    let v =
                        &qkv[j * width + qd + kd + kvh * hd..j * width + qd + kd + (kvh + 1) * hd];
                    for (oe, &ve) in o.iter_mut().zip(v) {
                        *oe += p * ve;
                    }
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// xorshift64 values in [-scale, scale).
    fn values(seed: u64, n: usize, scale: f32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                ((s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * scale
            })
            .collect()
    }

    fn tiny_config() -> ModelConfig {
        ModelConfig {
            hidden_size: 12,
            intermediate_size: 20,
            num_layers: 2,
            num_heads: 4,
            num_kv_heads: 2,
            head_dim: 4,
            vocab_size: 40,
            rms_norm_eps: 1e-5,
            rope_theta: 10000.0,
            rope_scaling: RopeScaling::None,
            sliding_window: None,
            bos_token_id: 1,
        }
    }

    /// A random model in Hugging Face names; biases on q/k/v (Qwen2-style) when `bias`.
    fn tiny_model(c: &ModelConfig, bias: bool) -> BTreeMap<String, Tensor> {
        let mut m = BTreeMap::new();
        let mut seed = 1;
        let mut add = |name: String, shape: Vec<usize>, centre: f32, scale: f32| {
            seed += 1;
            let n = shape.iter().product();
            let data = values(seed, n, scale).iter().map(|v| v + centre).collect();
            m.insert(name, Tensor { shape, data });
        };
        let (d, f) = (c.hidden_size, c.intermediate_size);
        let (qd, kd) = (c.q_dim(), c.kv_dim());
        add(
            "model.embed_tokens.weight".into(),
            vec![c.vocab_size, d],
            0.0,
            1.0,
        );
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            add(format!("{p}.input_layernorm.weight"), vec![d], 1.0, 0.2);
            add(
                format!("{p}.post_attention_layernorm.weight"),
                vec![d],
                1.0,
                0.2,
            );
            add(
                format!("{p}.self_attn.q_proj.weight"),
                vec![qd, d],
                0.0,
                0.5,
            );
            add(
                format!("{p}.self_attn.k_proj.weight"),
                vec![kd, d],
                0.0,
                0.5,
            );
            add(
                format!("{p}.self_attn.v_proj.weight"),
                vec![kd, d],
                0.0,
                0.5,
            );
            add(
                format!("{p}.self_attn.o_proj.weight"),
                vec![d, qd],
                0.0,
                0.3,
            );
            add(format!("{p}.mlp.gate_proj.weight"), vec![f, d], 0.0, 0.3);
            add(format!("{p}.mlp.up_proj.weight"), vec![f, d], 0.0, 0.3);
            add(format!("{p}.mlp.down_proj.weight"), vec![d, f], 0.0, 0.3);
            if bias {
                add(format!("{p}.self_attn.q_proj.bias"), vec![qd], 0.0, 0.1);
                add(format!("{p}.self_attn.k_proj.bias"), vec![kd], 0.0, 0.1);
                add(format!("{p}.self_attn.v_proj.bias"), vec![kd], 0.0, 0.1);
            }
        }
        add("model.norm.weight".into(), vec![d], 1.0, 0.2);
        m
    }

    fn tokens(n: usize, vocab: usize) -> Vec<u32> {
        values(77, n, 1.0)
            .iter()
            .map(|v| ((v + 1.0) * 0.5 * vocab as f32) as u32 % vocab as u32)
            .collect()
    }

    /// An independent, plain f64 implementation of the Hugging Face forward pass (no packing, no
    /// fused projections, weights read straight from the map), recording each layer's inputs.
    fn naive(
        c: &ModelConfig,
        w: &BTreeMap<String, Tensor>,
        chunk: &[u32],
    ) -> BTreeMap<String, Vec<Vec<f64>>> {
        let get = |n: &str| -> Vec<f64> { w[n].data.iter().map(|&v| f64::from(v)).collect() };
        let opt = |n: &str| {
            w.get(n)
                .map(|t| t.data.iter().map(|&v| f64::from(v)).collect::<Vec<f64>>())
        };
        let (d, hd) = (c.hidden_size, c.head_dim);
        let linear =
            |x: &[Vec<f64>], wt: &[f64], b: Option<Vec<f64>>, out: usize| -> Vec<Vec<f64>> {
                x.iter()
                    .map(|row| {
                        (0..out)
                            .map(|o| {
                                let s: f64 =
                                    (0..row.len()).map(|i| row[i] * wt[o * row.len() + i]).sum();
                                s + b.as_ref().map_or(0.0, |b| b[o])
                            })
                            .collect()
                    })
                    .collect()
            };
        let norm = |x: &[Vec<f64>], g: &[f64]| -> Vec<Vec<f64>> {
            x.iter()
                .map(|row| {
                    let ms = row.iter().map(|v| v * v).sum::<f64>() / d as f64;
                    row.iter()
                        .zip(g)
                        .map(|(v, g)| g * v / (ms + c.rms_norm_eps).sqrt())
                        .collect()
                })
                .collect()
        };
        let emb = get("model.embed_tokens.weight");
        let mut h: Vec<Vec<f64>> = chunk
            .iter()
            .enumerate()
            .map(|(i, &id)| {
                let id = if i == 0 { c.bos_token_id } else { id } as usize;
                emb[id * d..(id + 1) * d].to_vec()
            })
            .collect();
        let mut rec = BTreeMap::new();
        let t = chunk.len();
        for l in 0..c.num_layers {
            let p = format!("model.layers.{l}");
            let x = norm(&h, &get(&format!("{p}.input_layernorm.weight")));
            rec.insert(format!("{p}.self_attn.q_proj"), x.clone());
            let proj = |m: &str, out| {
                linear(
                    &x,
                    &get(&format!("{p}.self_attn.{m}.weight")),
                    opt(&format!("{p}.self_attn.{m}.bias")),
                    out,
                )
            };
            let mut q = proj("q_proj", c.q_dim());
            let mut k = proj("k_proj", c.kv_dim());
            let v = proj("v_proj", c.kv_dim());
            // rotate_half: out = x·cos + rotate_half(x)·sin, rotate_half(x) = [-x2, x1].
            let rot = |x: &mut Vec<Vec<f64>>| {
                for (pos, row) in x.iter_mut().enumerate() {
                    for head in row.chunks_mut(hd) {
                        let orig = head.to_vec();
                        for e in 0..hd {
                            let i = e % (hd / 2);
                            let theta = pos as f64 / c.rope_theta.powf(2.0 * i as f64 / hd as f64);
                            let rh = if e < hd / 2 {
                                -orig[e + hd / 2]
                            } else {
                                orig[e - hd / 2]
                            };
                            head[e] = orig[e] * theta.cos() + rh * theta.sin();
                        }
                    }
                }
            };
            rot(&mut q);
            rot(&mut k);
            let group = c.num_heads / c.num_kv_heads;
            let mut a = vec![vec![0.0; c.q_dim()]; t];
            for head in 0..c.num_heads {
                let kvh = head / group;
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..hd)
                                .map(|e| q[i][head * hd + e] * k[j][kvh * hd + e])
                                .sum::<f64>()
                                / (hd as f64).sqrt()
                        })
                        .collect();
                    let mx = s.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - mx).exp()).sum();
                    for e in 0..hd {
                        a[i][head * hd + e] = (0..=i)
                            .map(|j| (s[j] - mx).exp() / z * v[j][kvh * hd + e])
                            .sum();
                    }
                }
            }
            rec.insert(format!("{p}.self_attn.o_proj"), a.clone());
            let o = linear(&a, &get(&format!("{p}.self_attn.o_proj.weight")), None, d);
            for (hr, or) in h.iter_mut().zip(&o) {
                for (x, y) in hr.iter_mut().zip(or) {
                    *x += y;
                }
            }
            let x = norm(&h, &get(&format!("{p}.post_attention_layernorm.weight")));
            rec.insert(format!("{p}.mlp.gate_proj"), x.clone());
            let f = c.intermediate_size;
            let g = linear(&x, &get(&format!("{p}.mlp.gate_proj.weight")), None, f);
            let u = linear(&x, &get(&format!("{p}.mlp.up_proj.weight")), None, f);
            let m: Vec<Vec<f64>> = g
                .iter()
                .zip(&u)
                .map(|(g, u)| {
                    g.iter()
                        .zip(u)
                        .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
                        .collect()
                })
                .collect();
            rec.insert(format!("{p}.mlp.down_proj"), m.clone());
            let dn = linear(&m, &get(&format!("{p}.mlp.down_proj.weight")), None, d);
            for (hr, dr) in h.iter_mut().zip(&dn) {
                for (x, y) in hr.iter_mut().zip(dr) {
                    *x += y;
                }
            }
        }
        rec.insert("lm_head".into(), norm(&h, &get("model.norm.weight")));
        rec
    }

    fn options(n_ctx: usize) -> CaptureOptions {
        CaptureOptions {
            n_ctx,
            chunks: None,
            gram: true,
            histogram: Some(HistogramSpec { bins: 32, max: 4.0 }),
            lm_head: true,
        }
    }

    #[test]
    fn forward_pass_matches_an_independent_f64_implementation() {
        for bias in [false, true] {
            let c = tiny_config();
            let w = tiny_model(&c, bias);
            let n_ctx = 9;
            let toks = tokens(3 * n_ctx + 4, c.vocab_size);
            let stats = capture(&c, &w, &toks, &options(n_ctx)).unwrap();
            assert_eq!(stats.chunk_count, 3);
            // Sum the naive per-chunk inputs.
            let mut expected: BTreeMap<String, (Vec<f64>, Vec<f64>)> = BTreeMap::new();
            for chunk in toks.chunks_exact(n_ctx).take(3) {
                for (name, rows) in naive(&c, &w, chunk) {
                    let cols = rows[0].len();
                    let e = expected
                        .entry(name)
                        .or_insert_with(|| (vec![0.0; cols], vec![0.0; cols * cols]));
                    for r in &rows {
                        for i in 0..cols {
                            e.0[i] += r[i] * r[i];
                            for j in 0..cols {
                                e.1[i * cols + j] += r[i] * r[j];
                            }
                        }
                    }
                }
            }
            for (name, (sum_sq, gram)) in &expected {
                let s = stats.get(name).unwrap_or_else(|| panic!("{name} recorded"));
                assert_eq!(s.count(), 27, "{name}");
                for (a, b) in s.sum_sq().iter().zip(sum_sq) {
                    assert!(
                        (a - b).abs() <= 2e-5 * b.abs().max(1e-3),
                        "{name}: {a} vs {b}"
                    );
                }
                let scale = sum_sq.iter().cloned().fold(0.0, f64::max);
                for (a, b) in s.gram().unwrap().iter().zip(gram) {
                    assert!((a - b).abs() <= 2e-5 * scale, "{name} gram: {a} vs {b}");
                }
            }
            // Aliases and shapes.
            let k = stats.get("model.layers.1.self_attn.v_proj").unwrap();
            assert_eq!(k, stats.get("model.layers.1.self_attn.q_proj").unwrap());
            assert_eq!(
                stats.get("model.layers.0.mlp.down_proj").unwrap().cols(),
                20
            );
            assert_eq!(
                stats.get("model.layers.0.self_attn.o_proj").unwrap().cols(),
                16
            );
            assert_eq!(stats.names().len(), 2 * 7 + 1);
        }
    }

    #[test]
    fn first_layer_input_is_the_rms_norm_of_the_embeddings() {
        let c = tiny_config();
        let w = tiny_model(&c, false);
        let n_ctx = 5;
        let toks = tokens(2 * n_ctx, c.vocab_size);
        let mut opts = options(n_ctx);
        opts.histogram = None;
        let stats = capture(&c, &w, &toks, &opts).unwrap();
        let emb = &w["model.embed_tokens.weight"].data;
        let g = &w["model.layers.0.input_layernorm.weight"].data;
        let d = c.hidden_size;
        let mut total = vec![0.0f64; d];
        for chunk in toks.chunks_exact(n_ctx) {
            let mut part = vec![0.0f64; d];
            for (i, &id) in chunk.iter().enumerate() {
                let id = if i == 0 { 1 } else { id as usize };
                let row = &emb[id * d..(id + 1) * d];
                let ms: f64 = row
                    .iter()
                    .map(|&v| f64::from(v) * f64::from(v))
                    .sum::<f64>()
                    / d as f64;
                let r = (1.0 / (ms + 1e-5).sqrt()) as f32;
                for e in 0..d {
                    let y = f64::from(g[e] * (row[e] * r));
                    part[e] += y * y;
                }
            }
            for e in 0..d {
                total[e] += part[e];
            }
        }
        let s = stats.get("model.layers.0.self_attn.k_proj").unwrap();
        assert_eq!(s.sum_sq(), &total[..]);
    }

    #[test]
    fn packed_matmul_equals_the_plain_loop_bit_for_bit() {
        for (rows, inp, outs) in [
            (9usize, 7usize, [5usize, 11]),
            (4, 16, [8, 8]),
            (1, 3, [1, 2]),
        ] {
            let w0 = values(1, outs[0] * inp, 1.0);
            let w1 = values(2, outs[1] * inp, 1.0);
            let b1 = values(3, outs[1], 1.0);
            let x = values(4, rows * inp, 2.0);
            for bias in [None, Some(b1.as_slice())] {
                let lin = Linear::pack(inp, &[(&w0, None, outs[0]), (&w1, bias, outs[1])]);
                let y = lin.forward(&x, rows);
                let r = lin.forward_ref(&x, rows);
                assert_eq!(
                    y.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                    r.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                );
                // And it is x·Wᵀ + b: row 1, output 1 of the second part.
                if rows > 1 && outs[1] > 1 {
                    let dot = (0..inp).fold(0.0f32, |s, i| s + x[inp + i] * w1[inp + i]);
                    let expected = bias.map_or(dot, |b| dot + b[1]);
                    assert_eq!(y[lin.out + outs[0] + 1].to_bits(), expected.to_bits());
                }
            }
        }
    }

    #[test]
    fn thread_count_does_not_change_a_bit() {
        let c = tiny_config();
        let w = tiny_model(&c, true);
        let toks = tokens(7 * 6, c.vocab_size);
        let run = |threads| {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            pool.install(|| capture(&c, &w, &toks, &options(6)).unwrap())
                .to_safetensors()
                .unwrap()
        };
        let one = run(1);
        assert_eq!(one, run(2));
        assert_eq!(one, run(3));
    }

    #[test]
    fn chunks_merge_like_one_run() {
        let c = tiny_config();
        let w = tiny_model(&c, false);
        let n_ctx = 6;
        let toks = tokens(4 * n_ctx, c.vocab_size);
        let whole = capture(&c, &w, &toks, &options(n_ctx)).unwrap();
        let mut merged = capture(&c, &w, &toks[..3 * n_ctx], &options(n_ctx)).unwrap();
        merged
            .merge(&capture(&c, &w, &toks[3 * n_ctx..], &options(n_ctx)).unwrap())
            .unwrap();
        assert_eq!(merged, whole);
        // `chunks` limits the run to a prefix.
        let mut opts = options(n_ctx);
        opts.chunks = Some(3);
        let prefix = capture(&c, &w, &toks, &opts).unwrap();
        assert_eq!(
            prefix,
            capture(&c, &w, &toks[..3 * n_ctx], &options(n_ctx)).unwrap()
        );
    }

    #[test]
    fn sliding_window_and_rope_scaling_change_what_they_should() {
        let c = tiny_config();
        let w = tiny_model(&c, false);
        let toks = tokens(8, c.vocab_size);
        let base = capture(&c, &w, &toks, &options(8)).unwrap();
        let q0 = "model.layers.0.self_attn.q_proj";
        let o0 = "model.layers.0.self_attn.o_proj";
        // A window as long as the chunk changes nothing; a shorter one changes the attention.
        let mut wide = c.clone();
        wide.sliding_window = Some(8);
        assert_eq!(capture(&wide, &w, &toks, &options(8)).unwrap(), base);
        let mut narrow = c.clone();
        narrow.sliding_window = Some(2);
        let n = capture(&narrow, &w, &toks, &options(8)).unwrap();
        assert_eq!(n.get(q0), base.get(q0));
        assert_ne!(n.get(o0), base.get(o0));
        // Linear scaling by 1 is the identity; llama3 scaling keeps the high frequencies.
        let mut lin = c.clone();
        lin.rope_scaling = RopeScaling::Linear { factor: 1.0 };
        assert_eq!(capture(&lin, &w, &toks, &options(8)).unwrap(), base);
        let l3 = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_context: 8192.0,
        };
        assert_eq!(scale_frequency(1.0, l3), 1.0);
        assert_eq!(scale_frequency(1e-5, l3), 1e-5 / 8.0);
        let mid = 2.0 * std::f64::consts::PI / 4096.0; // wavelength between the two bounds
        let s = scale_frequency(mid, l3);
        assert!(s < mid && s > mid / 8.0);
    }

    #[test]
    fn bad_inputs_are_refused_with_names() {
        let c = tiny_config();
        let mut w = tiny_model(&c, false);
        let toks = tokens(12, c.vocab_size);
        assert!(matches!(
            capture(&c, &w, &toks[..5], &options(6)),
            Err(CaptureError::TooFewTokens {
                tokens: 5,
                n_ctx: 6
            })
        ));
        let mut bad = toks.clone();
        bad[7] = 40;
        assert!(matches!(
            capture(&c, &w, &bad, &options(6)),
            Err(CaptureError::TokenOutOfRange {
                index: 7,
                id: 40,
                vocab: 40
            })
        ));
        // The first token of a chunk is replaced by BOS, so its id does not matter.
        bad[7] = toks[7];
        bad[6] = 999;
        assert!(capture(&c, &w, &bad, &options(6)).is_ok());
        let name = "model.layers.1.mlp.up_proj.weight";
        if let Some(t) = w.get_mut(name) {
            t.shape = vec![4, 60];
        }
        assert!(matches!(
            capture(&c, &w, &toks, &options(6)),
            Err(CaptureError::TensorShape { tensor, .. }) if tensor == name
        ));
        w.remove(name);
        assert!(matches!(
            capture(&c, &w, &toks, &options(6)),
            Err(CaptureError::MissingTensor { tensor }) if tensor == name
        ));
        let mut c2 = c.clone();
        c2.num_kv_heads = 3;
        assert!(matches!(
            capture(&c2, &w, &toks, &options(6)),
            Err(CaptureError::BadConfig {
                field: "num_key_value_heads",
                ..
            })
        ));
    }
}
