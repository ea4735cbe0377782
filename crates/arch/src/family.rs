//! Model families and per-tensor mapping.

use crate::hparams::HParams;
use crate::names::{lookup, DROPPED_SUFFIXES, LLAMA_TENSORS};
use crate::ArchError;

/// A model family: which HF architectures it covers and how their tensors map to GGUF.
#[derive(Debug)]
pub struct Family {
    /// `general.architecture` of the output.
    pub gguf_arch: &'static str,
    /// `config.json` `architectures[0]` values this family converts.
    pub hf_architectures: &'static [&'static str],
    /// HF base name (block number as `{bid}`) → GGUF base name; an empty GGUF name drops the
    /// tensor.
    tensor_names: &'static [(&'static str, &'static str)],
    /// Whether q/k projections get the rotary row permutation (`LlamaModel.undo_permute`).
    permute_qk: bool,
    /// Per-expert matrices stacked into one 3-D tensor per layer: HF suffix after
    /// `experts.{x}.` → GGUF base name (`{bid}` for the block).
    experts: &'static [(&'static str, &'static str)],
}

/// Every family kiln converts.
pub static FAMILIES: &[Family] = &[Family {
    gguf_arch: "llama",
    hf_architectures: &[
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "LLaMAForCausalLM",
        "MixtralForCausalLM",
    ],
    tensor_names: LLAMA_TENSORS,
    permute_qk: true,
    // Mixtral: w1 = gate, w2 = down, w3 = up, stacked in that order (LlamaModel.modify_tensors).
    experts: &[
        ("w1.weight", "blk.{bid}.ffn_gate_exps.weight"),
        ("w2.weight", "blk.{bid}.ffn_down_exps.weight"),
        ("w3.weight", "blk.{bid}.ffn_up_exps.weight"),
    ],
}];

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
}

/// The outcome of mapping one checkpoint tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mapped {
    /// Converted as described.
    Tensor(TensorMapping),
    /// Deliberately left out (e.g. cached rotary frequencies).
    Skip,
    /// One expert's matrix, to be stacked with the others of its layer into `stacked`.
    Expert {
        /// The stacked tensor's GGUF name.
        stacked: String,
        /// Position of the stacked tensor among the layer's stacked tensors (w1, w2, w3).
        part: usize,
        /// The layer.
        layer: u32,
        /// The expert index.
        expert: u32,
    },
    /// Not understood by this family.
    Unknown,
}

impl Family {
    /// Maps one checkpoint tensor. `shape` is the HF shape (slowest first).
    pub fn map_tensor(&self, hp: &HParams, name: &str, shape: &[u64]) -> Result<Mapped, ArchError> {
        let mut hf = name
            .replace("language_model.", "")
            .replace("text_model.", "");
        if hp
            .get("architectures")
            .and_then(|a| a.get(0))
            .and_then(|a| a.as_str())
            == Some("LlamaModel")
            && !hf.starts_with("model.")
        {
            hf = format!("model.{hf}");
        }
        if DROPPED_SUFFIXES.iter().any(|s| hf.ends_with(s)) {
            return Ok(Mapped::Skip);
        }
        if let Some(m) = self.map_expert(&hf) {
            return Ok(m);
        }
        let Some((gguf_name, layer)) = lookup(self.tensor_names, &hf) else {
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
        }))
    }
}

impl Family {
    /// `model.layers.{bid}.block_sparse_moe.experts.{x}.{w}` → the stacked tensor it belongs to.
    fn map_expert(&self, hf: &str) -> Option<Mapped> {
        let rest = hf.strip_prefix("model.layers.")?;
        let (bid, rest) = rest.split_once('.')?;
        let rest = rest.strip_prefix("block_sparse_moe.experts.")?;
        let (xid, suffix) = rest.split_once('.')?;
        let (layer, expert) = (bid.parse().ok()?, xid.parse().ok()?);
        let (part, (_, gguf)) = self
            .experts
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
        self.experts.len()
    }
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
    fn unknown_architecture() {
        let hp = HParams::from_config(&json!({"architectures": ["FooForCausalLM"]})).unwrap();
        assert!(matches!(
            detect(&hp),
            Err(ArchError::UnsupportedArchitecture(..))
        ));
    }
}
