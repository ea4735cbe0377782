//! Model families and per-tensor mapping.

use crate::hparams::HParams;
use crate::names::{self, lookup_in, DROPPED_SUFFIXES};
use crate::{ArchError, SideFiles};

/// Which converter class a family follows; selects the hyperparameter writer, the vocabulary
/// routine and the per-family quirks in `metadata.rs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kind {
    Llama,
    Qwen2,
    Qwen3,
    Qwen2Moe,
    Qwen3Moe,
    Gemma2,
    Gemma3,
    Phi3,
    Bert,
}

/// Per-expert matrices that are stacked into one 3-D tensor per layer.
#[derive(Debug)]
struct Experts {
    /// The part of the HF name between the block number and the expert number.
    marker: &'static str,
    /// HF suffix after `{marker}{x}.` → GGUF name (`{bid}` for the block), in the order the
    /// converter emits the stacked tensors.
    parts: &'static [(&'static str, &'static str)],
}

/// A model family: which HF architectures it covers and how their tensors map to GGUF.
#[derive(Debug)]
pub struct Family {
    /// `general.architecture` of the output.
    pub gguf_arch: &'static str,
    /// `config.json` `architectures[0]` values this family converts.
    pub hf_architectures: &'static [&'static str],
    /// HF base name (block number as `{bid}`) → GGUF base name, searched table by table; an
    /// empty GGUF name drops the tensor.
    tensor_names: &'static [&'static [(&'static str, &'static str)]],
    /// Whether q/k projections get the rotary row permutation (`LlamaModel.undo_permute`).
    permute_qk: bool,
    /// Expert stacking, for mixture-of-experts families.
    experts: Option<Experts>,
    /// Gemma stores RMSNorm weights as `w` and multiplies by `1 + w`; the converter adds the 1.
    norm_plus_one: bool,
    pub(crate) kind: Kind,
}

/// Every family kiln converts.
pub static FAMILIES: &[Family] = &[
    Family {
        gguf_arch: "llama",
        hf_architectures: &[
            "LlamaForCausalLM",
            "MistralForCausalLM",
            "LLaMAForCausalLM",
            "MixtralForCausalLM",
            "LlamaModel",
        ],
        tensor_names: &[names::DECODER_TENSORS, names::DENSE_FFN, names::LLAMA_EXTRA],
        permute_qk: true,
        // Mixtral: w1 = gate, w2 = down, w3 = up, emitted in that order.
        experts: Some(Experts {
            marker: "block_sparse_moe.experts.",
            parts: &[
                ("w1.weight", "blk.{bid}.ffn_gate_exps.weight"),
                ("w2.weight", "blk.{bid}.ffn_down_exps.weight"),
                ("w3.weight", "blk.{bid}.ffn_up_exps.weight"),
            ],
        }),
        norm_plus_one: false,
        kind: Kind::Llama,
    },
    Family {
        gguf_arch: "qwen2",
        hf_architectures: &["Qwen2ForCausalLM", "Qwen2Model"],
        tensor_names: &[names::DECODER_TENSORS, names::DENSE_FFN],
        permute_qk: false,
        experts: None,
        norm_plus_one: false,
        kind: Kind::Qwen2,
    },
    Family {
        gguf_arch: "qwen3",
        hf_architectures: &["Qwen3ForCausalLM", "Qwen3Model"],
        tensor_names: &[names::DECODER_TENSORS, names::DENSE_FFN, names::QK_NORM],
        permute_qk: false,
        experts: None,
        norm_plus_one: false,
        kind: Kind::Qwen3,
    },
    Family {
        gguf_arch: "qwen2moe",
        hf_architectures: &["Qwen2MoeForCausalLM"],
        tensor_names: &[
            names::DECODER_TENSORS,
            names::QWEN_MOE_ROUTER,
            names::QWEN2_MOE_SHARED,
        ],
        permute_qk: false,
        experts: Some(QWEN_EXPERTS),
        norm_plus_one: false,
        kind: Kind::Qwen2Moe,
    },
    Family {
        gguf_arch: "qwen3moe",
        hf_architectures: &["Qwen3MoeForCausalLM"],
        tensor_names: &[
            names::DECODER_TENSORS,
            names::QK_NORM,
            names::QWEN_MOE_ROUTER,
        ],
        permute_qk: false,
        experts: Some(QWEN_EXPERTS),
        norm_plus_one: false,
        kind: Kind::Qwen3Moe,
    },
    Family {
        gguf_arch: "gemma2",
        hf_architectures: &["Gemma2ForCausalLM"],
        tensor_names: &[names::GEMMA_TENSORS, names::GEMMA2_HEAD],
        permute_qk: false,
        experts: None,
        norm_plus_one: true,
        kind: Kind::Gemma2,
    },
    Family {
        gguf_arch: "gemma3",
        hf_architectures: &["Gemma3ForCausalLM", "Gemma3ForConditionalGeneration"],
        tensor_names: &[names::GEMMA_TENSORS, names::GEMMA3_HEAD, names::QK_NORM],
        permute_qk: false,
        experts: None,
        norm_plus_one: true,
        kind: Kind::Gemma3,
    },
    Family {
        gguf_arch: "phi3",
        hf_architectures: &["Phi3ForCausalLM"],
        tensor_names: &[names::PHI3_TENSORS],
        permute_qk: false,
        experts: None,
        norm_plus_one: false,
        kind: Kind::Phi3,
    },
    Family {
        gguf_arch: "bert",
        hf_architectures: &[
            "BertModel",
            "BertForMaskedLM",
            "CamembertModel",
            "BertForSequenceClassification",
        ],
        tensor_names: &[names::BERT_TENSORS],
        permute_qk: false,
        experts: None,
        norm_plus_one: false,
        kind: Kind::Bert,
    },
];

/// Qwen-MoE experts are emitted down, gate, up (`Qwen2MoeModel.modify_tensors`).
const QWEN_EXPERTS: Experts = Experts {
    marker: "mlp.experts.",
    parts: &[
        ("down_proj.weight", "blk.{bid}.ffn_down_exps.weight"),
        ("gate_proj.weight", "blk.{bid}.ffn_gate_exps.weight"),
        ("up_proj.weight", "blk.{bid}.ffn_up_exps.weight"),
    ],
};

/// HF architectures whose checkpoints store names without the `model.` prefix.
const BARE_NAME_ARCHITECTURES: &[&str] = &["LlamaModel", "Qwen2Model", "Qwen3Model"];

/// A tensor kiln makes itself rather than reading it from the checkpoint (1-D, F32).
#[derive(Debug, Clone, PartialEq)]
pub struct GeneratedTensor {
    /// The GGUF name.
    pub name: String,
    /// Its values.
    pub values: Vec<f32>,
}

/// Picks the family from `config.json`'s `architectures[0]`.
pub fn detect(hp: &HParams) -> Result<&'static Family, ArchError> {
    let arch = hp
        .get("architectures")
        .and_then(|a| a.get(0))
        .and_then(|a| a.as_str())
        .ok_or_else(|| ArchError::BadHParam {
            key: "architectures".into(),
            problem: "is missing or empty".into(),
        })?;
    FAMILIES
        .iter()
        .find(|f| f.hf_architectures.contains(&arch))
        .ok_or_else(|| {
            let known: Vec<&str> = FAMILIES
                .iter()
                .flat_map(|f| f.hf_architectures.iter().copied())
                .collect();
            ArchError::UnsupportedArchitecture(arch.to_string(), known.join(", "))
        })
}

/// A change applied to a tensor's rows on the way from checkpoint to GGUF. Rows are the
/// slowest-varying dimension of the HF tensor (the output features of a linear layer).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transform {
    /// Rows are copied as they are.
    None,
    /// Llama's rotary permutation: within each of `n_head` heads of `D` rows, row `2i + s` of the
    /// output is row `s·D/2 + i` of the input (HF "rotate half" → ggml's adjacent pairs).
    PermuteHeads {
        /// Number of heads the rows split into.
        n_head: u32,
    },
    /// Takes `len` rows out of every `period` rows, starting at `offset` (one half of fused
    /// gate/up expert matrices: per expert, gate is the first `len` rows, up the next).
    RowBlocks {
        /// Rows per source block (one expert's fused matrix).
        period: u64,
        /// First row taken in each block.
        offset: u64,
        /// Rows taken per block.
        len: u64,
    },
}

impl Transform {
    /// The input row that becomes output row `row` of a tensor with `rows` rows.
    pub fn source_row(self, row: u64, rows: u64) -> u64 {
        match self {
            Transform::None => row,
            Transform::PermuteHeads { n_head } => {
                let head_dim = rows / u64::from(n_head);
                let half = head_dim / 2;
                let (head, j) = (row / head_dim, row % head_dim);
                head * head_dim + (j % 2) * half + j / 2
            }
            Transform::RowBlocks {
                period,
                offset,
                len,
            } => (row / len) * period + offset + row % len,
        }
    }

    /// How many output rows a source with `rows` rows gives.
    pub fn output_rows(self, rows: u64) -> u64 {
        match self {
            Transform::RowBlocks { period, len, .. } => rows / period * len,
            _ => rows,
        }
    }
}

/// What one checkpoint tensor becomes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorMapping {
    /// The GGUF tensor name.
    pub gguf_name: String,
    /// The block number, for tensors inside a block.
    pub layer: Option<u32>,
    /// Row transform.
    pub transform: Transform,
    /// Set when the tensor must be stored as F32 (llama.cpp's converter rule).
    pub pin_f32: Option<&'static str>,
    /// Add 1 to every value (Gemma's norm weights), in the source precision when that is F16
    /// and in F32 otherwise, as the converter's torch arithmetic does.
    pub plus_one: bool,
}

/// The outcome of mapping one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Converted as described.
    Tensor(TensorMapping),
    /// Deliberately left out (e.g. cached rotary frequencies, vision towers).
    Skip,
    /// One expert's matrix, to be stacked with the others of its layer into `stacked`.
    Expert {
        /// The stacked tensor's GGUF name.
        stacked: String,
        /// Position of the stacked tensor among the layer's stacked tensors (emission order).
        part: usize,
        /// The layer.
        layer: u32,
        /// The expert index.
        expert: u32,
    },
    /// One source tensor that becomes several (pre-stacked fused expert matrices).
    Split(Vec<TensorMapping>),
    /// Not understood by this family.
    Unknown,
}

impl Family {
    /// Finds a family by its GGUF architecture name.
    pub fn by_gguf_arch(arch: &str) -> Option<&'static Family> {
        FAMILIES.iter().find(|f| f.gguf_arch == arch)
    }

    /// The HF name as the converter's `filter_tensors` / `modify_tensors` see it, or `None` when
    /// the converter drops the tensor outright.
    fn normalize_name(&self, hp: &HParams, name: &str) -> Option<String> {
        let mut hf = name
            .replace("language_model.", "")
            .replace("text_model.", "");
        // Multimodal wrappers: the vision half belongs to a separate projector file.
        if hf.starts_with("vision_tower.")
            || hf.starts_with("multi_modal_projector.")
            || hf.starts_with("model.vision_tower.")
            || hf.starts_with("model.multi_modal_projector.")
        {
            return None;
        }
        if self.kind == Kind::Bert {
            if let Some(rest) = hf.strip_prefix("bert.") {
                hf = rest.to_string();
            }
            if let Some(stem) = hf.strip_suffix(".gamma") {
                hf = format!("{stem}.weight");
            } else if let Some(stem) = hf.strip_suffix(".beta") {
                hf = format!("{stem}.bias");
            }
            if hf == "embeddings.position_ids"
                || hf.starts_with("pooler.dense.")
                || hf.starts_with("cls.predictions.")
                || hf.starts_with("cls.seq_relationship.")
            {
                return None;
            }
            return Some(hf);
        }
        let arch = hp
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str());
        if arch.is_some_and(|a| BARE_NAME_ARCHITECTURES.contains(&a))
            && !hf.starts_with("model.")
            && hf != "lm_head.weight"
        {
            hf = format!("model.{hf}");
        }
        if DROPPED_SUFFIXES.iter().any(|s| hf.ends_with(s)) {
            return None;
        }
        Some(hf)
    }

    /// Maps one checkpoint tensor. `shape` is the HF shape (slowest first).
    pub fn map_tensor(&self, hp: &HParams, name: &str, shape: &[u64]) -> Result<Mapped, ArchError> {
        let Some(hf) = self.normalize_name(hp, name) else {
            return Ok(Mapped::Skip);
        };
        if let Some(m) = self.map_prestacked(name, &hf, shape)? {
            return Ok(m);
        }
        if let Some(m) = self.map_expert(&hf) {
            return Ok(m);
        }
        let Some((gguf_name, layer)) = lookup_in(self.tensor_names, &hf) else {
            return Ok(Mapped::Unknown);
        };
        if gguf_name.is_empty() {
            return Ok(Mapped::Skip);
        }
        let mut transform = Transform::None;
        if self.permute_qk {
            let n_head = hp.require_u32(&["n_heads", "num_attention_heads"])?;
            let n_kv = hp
                .find_u32(&["n_kv_heads", "num_key_value_heads"])?
                .unwrap_or(n_head);
            let heads = if hf.ends_with("q_proj.weight") || hf.ends_with("q_proj.bias") {
                Some(n_head)
            } else if hf.ends_with("k_proj.weight") || hf.ends_with("k_proj.bias") {
                Some(n_kv)
            } else {
                None
            };
            if let Some(n_head) = heads {
                let rows = shape.first().copied().unwrap_or(0);
                if n_head == 0 || rows % (2 * u64::from(n_head)) != 0 {
                    return Err(ArchError::BadTensorShape {
                        tensor: name.to_string(),
                        problem: format!(
                            "{rows} rows cannot be split into {n_head} heads of even size"
                        ),
                    });
                }
                transform = Transform::PermuteHeads { n_head };
            }
        }
        let pin_f32 = pin_reason(&gguf_name, shape);
        Ok(Mapped::Tensor(TensorMapping {
            gguf_name,
            layer,
            transform,
            pin_f32,
            plus_one: self.norm_plus_one && hf.ends_with("norm.weight"),
        }))
    }

    /// Newer transformers checkpoints store a Qwen-MoE layer's experts already stacked:
    /// `experts.gate_up_proj` (`[E, 2·F, n_embd]`, gate rows first per expert) is split in two,
    /// `experts.down_proj` is taken as it is.
    fn map_prestacked(
        &self,
        name: &str,
        hf: &str,
        shape: &[u64],
    ) -> Result<Option<Mapped>, ArchError> {
        if self.experts.as_ref().map(|e| e.marker) != Some("mlp.experts.") {
            return Ok(None);
        }
        let Some(rest) = hf.strip_prefix("model.layers.") else {
            return Ok(None);
        };
        let Some((bid, rest)) = rest.split_once('.') else {
            return Ok(None);
        };
        let Ok(layer) = bid.parse::<u32>() else {
            return Ok(None);
        };
        let rest = rest.strip_suffix(".weight").unwrap_or(rest);
        let mapping = |gguf: &str, transform| TensorMapping {
            gguf_name: format!("blk.{layer}.{gguf}.weight"),
            layer: Some(layer),
            transform,
            pin_f32: None,
            plus_one: false,
        };
        match rest {
            "mlp.experts.gate_up_proj" => {
                let (Some(&fused), 3) = (shape.get(1), shape.len()) else {
                    return Err(ArchError::BadTensorShape {
                        tensor: name.to_string(),
                        problem: format!("fused gate/up experts must be 3-D, found {shape:?}"),
                    });
                };
                if fused % 2 != 0 {
                    return Err(ArchError::BadTensorShape {
                        tensor: name.to_string(),
                        problem: format!("{fused} fused gate/up rows cannot be halved"),
                    });
                }
                let half = |offset| Transform::RowBlocks {
                    period: fused,
                    offset,
                    len: fused / 2,
                };
                Ok(Some(Mapped::Split(vec![
                    mapping("ffn_gate_exps", half(0)),
                    mapping("ffn_up_exps", half(fused / 2)),
                ])))
            }
            "mlp.experts.down_proj" => {
                if shape.len() != 3 {
                    return Err(ArchError::BadTensorShape {
                        tensor: name.to_string(),
                        problem: format!("stacked down experts must be 3-D, found {shape:?}"),
                    });
                }
                Ok(Some(Mapped::Tensor(mapping(
                    "ffn_down_exps",
                    Transform::None,
                ))))
            }
            _ => Ok(None),
        }
    }

    /// `model.layers.{bid}.{marker}{x}.{part}` → the stacked tensor it belongs to.
    fn map_expert(&self, hf: &str) -> Option<Mapped> {
        let experts = self.experts.as_ref()?;
        let rest = hf.strip_prefix("model.layers.")?;
        let (bid, rest) = rest.split_once('.')?;
        let rest = rest.strip_prefix(experts.marker)?;
        let (xid, suffix) = rest.split_once('.')?;
        let (layer, expert) = (bid.parse().ok()?, xid.parse().ok()?);
        let (part, (_, gguf)) = experts
            .parts
            .iter()
            .enumerate()
            .find(|(_, (s, _))| *s == suffix)?;
        Some(Mapped::Expert {
            stacked: gguf.replace("{bid}", bid),
            part,
            layer,
            expert,
        })
    }

    /// How many stacked tensors each layer's experts form.
    pub fn expert_parts(&self) -> usize {
        self.experts.as_ref().map_or(0, |e| e.parts.len())
    }

    /// How many rows of the token embedding the converter keeps, when it truncates it (Gemma 3
    /// without `tokenizer.model`: the `tokenizer.json` vocabulary plus its added tokens).
    pub fn embedding_rows(&self, files: &SideFiles) -> Result<Option<u64>, ArchError> {
        if self.kind != Kind::Gemma3 || files.get("tokenizer.model").is_some() {
            return Ok(None);
        }
        let Some(tokenizer) = files.json("tokenizer.json")? else {
            return Ok(None);
        };
        let vocab = tokenizer
            .get("model")
            .and_then(|m| m.get("vocab"))
            .and_then(|v| v.as_object())
            .map_or(0, |v| v.len());
        let added = tokenizer
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .map_or(0, Vec::len);
        Ok(Some((vocab + added) as u64))
    }

    /// Tensors the converter generates before the checkpoint's own (Phi-3's long-context rope
    /// factors).
    pub fn generated_tensors(&self, hp: &HParams) -> Result<Vec<GeneratedTensor>, ArchError> {
        match self.kind {
            Kind::Phi3 => phi3_rope_factors(hp),
            Kind::Llama => llama3_rope_freqs(hp),
            _ => Ok(Vec::new()),
        }
    }
}

/// Llama 3.1-style rope scaling: the converter stores per-frequency factors as `rope_freqs`.
/// Computed in f32 step by step as the converter's torch code does (Python scalars meet f32
/// tensors, so each operation rounds to f32).
fn llama3_rope_freqs(hp: &HParams) -> Result<Vec<GeneratedTensor>, ArchError> {
    let rope = hp.rope_main();
    let is_llama3 = rope
        .get("rope_type")
        .and_then(|v| v.as_str())
        .is_some_and(|t| t.eq_ignore_ascii_case("llama3"));
    if !is_llama3 {
        return Ok(Vec::new());
    }
    let num = |k: &str, d: f64| rope.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let base = num("rope_theta", 10000.0) as f32;
    let dim = hp.head_dim()?;
    let factor = num("factor", 8.0);
    let low = num("low_freq_factor", 1.0);
    let high = num("high_freq_factor", 4.0);
    let old_context = num("original_max_position_embeddings", 8192.0);
    let low_wavelen = (old_context / low) as f32;
    let high_wavelen = (old_context / high) as f32;
    let values = (0..dim)
        .step_by(2)
        .map(|i| {
            let freq = 1.0f32 / base.powf(i as f32 / dim as f32);
            let wavelen = (2.0 * std::f64::consts::PI) as f32 / freq;
            if wavelen < high_wavelen {
                1.0
            } else if wavelen > low_wavelen {
                factor as f32
            } else {
                let smooth = (old_context as f32 / wavelen - low as f32) / (high - low) as f32;
                1.0 / ((1.0 - smooth) / factor as f32 + smooth)
            }
        })
        .collect();
    Ok(vec![GeneratedTensor {
        name: "rope_freqs.weight".into(),
        values,
    }])
}

/// Phi-3 long-context models carry per-dimension rope factors in `rope_scaling`.
fn phi3_rope_factors(hp: &HParams) -> Result<Vec<GeneratedTensor>, ArchError> {
    let rope = hp.rope_parameters();
    let long = rope.get("long_factor").and_then(|v| v.as_array());
    if long.is_none_or(|l| l.is_empty()) {
        return Ok(Vec::new());
    }
    let rope_dims = phi3_rope_dims(hp)?;
    let mut out = Vec::new();
    for (key, name) in [
        ("long_factor", "rope_factors_long.weight"),
        ("short_factor", "rope_factors_short.weight"),
    ] {
        let values: Option<Vec<f32>> = rope
            .get(key)
            .and_then(|v| v.as_array())
            .map(|a| a.iter().map(|x| x.as_f64().map(|x| x as f32)).collect())
            .and_then(|v: Option<Vec<f32>>| v);
        match values {
            Some(v) if v.len() as u64 == u64::from(rope_dims / 2) => out.push(GeneratedTensor {
                name: name.into(),
                values: v,
            }),
            _ => {
                return Err(ArchError::BadHParam {
                    key: format!("rope_scaling.{key}"),
                    problem: format!("must be a list of {} numbers", rope_dims / 2),
                })
            }
        }
    }
    Ok(out)
}

/// `int(partial_rotary_factor * hidden_size) // num_attention_heads`.
pub(crate) fn phi3_rope_dims(hp: &HParams) -> Result<u32, ArchError> {
    let hidden = hp.require_u32(&["hidden_size", "n_embd"])?;
    let heads = hp.require_u32(&["num_attention_heads", "n_head"])?;
    let partial = hp.find_f64(&["partial_rotary_factor"])?.unwrap_or(1.0);
    if heads == 0 {
        return Err(ArchError::BadHParam {
            key: "num_attention_heads".into(),
            problem: "must not be 0".into(),
        });
    }
    Ok(((partial * f64::from(hidden)) as u32) / heads)
}

/// llama.cpp's converter keeps these F32 for every output type (`ModelBase.prepare_tensors`).
fn pin_reason(gguf_name: &str, shape: &[u64]) -> Option<&'static str> {
    const ALWAYS_F32: &[&str] = &[
        "ffn_gate_inp",
        "ffn_gate_inp_shexp",
        "position_embd",
        "token_types",
    ];
    if shape.len() <= 1 {
        return Some("1-D tensor");
    }
    if gguf_name.ends_with("_norm.weight") {
        return Some("norm weight");
    }
    if !gguf_name.ends_with(".weight") {
        return Some("not a weight");
    }
    let base = gguf_name.trim_end_matches(".weight");
    let short = base.rsplit('.').next().unwrap_or(base);
    if ALWAYS_F32.contains(&short) {
        return Some("kept F32 by llama.cpp");
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn hp() -> HParams {
        HParams::from_config(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 256, "num_attention_heads": 4, "num_key_value_heads": 2
        }))
        .unwrap()
    }

    #[test]
    fn permutation_matches_the_converter() {
        // Reshape to (H, 2, D/2) and swap the last two axes: rows [h, s, i] go to [h, i, s].
        let t = Transform::PermuteHeads { n_head: 2 };
        let rows = 8; // 2 heads of 4 rows: half = 2
        let order: Vec<u64> = (0..rows).map(|r| t.source_row(r, rows)).collect();
        assert_eq!(order, [0, 2, 1, 3, 4, 6, 5, 7]);
    }

    #[test]
    fn maps_q_and_k_with_their_head_counts() {
        let f = detect(&hp()).unwrap();
        let q = f
            .map_tensor(&hp(), "model.layers.0.self_attn.q_proj.weight", &[256, 256])
            .unwrap();
        let k = f
            .map_tensor(&hp(), "model.layers.0.self_attn.k_proj.weight", &[128, 256])
            .unwrap();
        let n = f
            .map_tensor(&hp(), "model.layers.0.input_layernorm.weight", &[256])
            .unwrap();
        assert!(matches!(
            q,
            Mapped::Tensor(TensorMapping {
                transform: Transform::PermuteHeads { n_head: 4 },
                ..
            })
        ));
        assert!(matches!(
            k,
            Mapped::Tensor(TensorMapping {
                transform: Transform::PermuteHeads { n_head: 2 },
                ..
            })
        ));
        assert!(matches!(
            n,
            Mapped::Tensor(TensorMapping {
                pin_f32: Some(_),
                layer: Some(0),
                ..
            })
        ));
        assert_eq!(
            f.map_tensor(&hp(), "model.layers.0.self_attn.rotary_emb.inv_freq", &[32])
                .unwrap(),
            Mapped::Skip
        );
        assert_eq!(
            f.map_tensor(&hp(), "model.layers.0.extra.weight", &[3, 3])
                .unwrap(),
            Mapped::Unknown
        );
        assert!(matches!(
            f.map_tensor(&hp(), "model.layers.0.self_attn.q_proj.weight", &[250, 256]),
            Err(ArchError::BadTensorShape { .. })
        ));
    }

    #[test]
    fn llama3_rope_freqs_follow_the_wavelength_bands() {
        // Llama 3.1 8B's settings: head_dim 128, theta 500000, factor 8, bands 1..4, 8192.
        let hp = HParams::from_config(&json!({
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": 4096, "num_attention_heads": 32, "rope_theta": 500000.0,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
        }))
        .unwrap();
        let generated = detect(&hp).unwrap().generated_tensors(&hp).unwrap();
        assert_eq!(generated.len(), 1);
        let f = &generated[0].values;
        assert_eq!(generated[0].name, "rope_freqs.weight");
        assert_eq!(f.len(), 64);
        // Short wavelengths are kept, long ones scaled by the full factor, and the band between
        // rises smoothly.
        assert_eq!(f[0], 1.0);
        assert_eq!(f[63], 8.0);
        assert!(f.windows(2).all(|w| w[0] <= w[1]), "{f:?}");
        let between = f.iter().filter(|&&x| x > 1.0 && x < 8.0).count();
        assert!((1..20).contains(&between), "{between} smoothed entries");
        // No llama3 rope type, nothing generated.
        assert!(detect(&self::hp())
            .unwrap()
            .generated_tensors(&self::hp())
            .unwrap()
            .is_empty());
    }

    #[test]
    fn unknown_architecture() {
        let hp = HParams::from_config(&json!({"architectures": ["FooForCausalLM"]})).unwrap();
        assert!(matches!(
            detect(&hp),
            Err(ArchError::UnsupportedArchitecture(..))
        ));
    }
}
