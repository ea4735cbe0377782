//! HF → GGUF tensor-name tables (from gguf-py's `tensor_mapping.py`), one per family.

/// The decoder names Llama, Mistral, Qwen2 and Qwen3 share (gguf-py `tensor_mapping.py`).
/// `{bid}` is the block number.
pub(crate) const DECODER_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{bid}.input_layernorm", "blk.{bid}.attn_norm"),
    ("model.layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q"),
    ("model.layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k"),
    ("model.layers.{bid}.self_attn.v_proj", "blk.{bid}.attn_v"),
    (
        "model.layers.{bid}.self_attn.o_proj",
        "blk.{bid}.attn_output",
    ),
    (
        "model.layers.{bid}.post_attention_layernorm",
        "blk.{bid}.ffn_norm",
    ),
];

/// A dense SwiGLU feed-forward block.
pub(crate) const DENSE_FFN: &[(&str, &str)] = &[
    ("model.layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate"),
    ("model.layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up"),
    ("model.layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
];

/// Llama extras: the Mixtral router.
pub(crate) const LLAMA_EXTRA: &[(&str, &str)] = &[(
    "model.layers.{bid}.block_sparse_moe.gate",
    "blk.{bid}.ffn_gate_inp",
)];

/// Qwen3's per-head q/k RMS norms (also Gemma 3's).
pub(crate) const QK_NORM: &[(&str, &str)] = &[
    (
        "model.layers.{bid}.self_attn.q_norm",
        "blk.{bid}.attn_q_norm",
    ),
    (
        "model.layers.{bid}.self_attn.k_norm",
        "blk.{bid}.attn_k_norm",
    ),
];

/// The Qwen MoE router.
pub(crate) const QWEN_MOE_ROUTER: &[(&str, &str)] =
    &[("model.layers.{bid}.mlp.gate", "blk.{bid}.ffn_gate_inp")];

/// Qwen2-MoE's shared expert and its gate.
pub(crate) const QWEN2_MOE_SHARED: &[(&str, &str)] = &[
    (
        "model.layers.{bid}.mlp.shared_expert.gate_proj",
        "blk.{bid}.ffn_gate_shexp",
    ),
    (
        "model.layers.{bid}.mlp.shared_expert.up_proj",
        "blk.{bid}.ffn_up_shexp",
    ),
    (
        "model.layers.{bid}.mlp.shared_expert.down_proj",
        "blk.{bid}.ffn_down_shexp",
    ),
    (
        "model.layers.{bid}.mlp.shared_expert_gate",
        "blk.{bid}.ffn_gate_inp_shexp",
    ),
];

/// Gemma 2 / 3: sandwich norms around attention and the feed-forward block. Gemma 2 has no
/// output tensor, so its `lm_head` is dropped (an empty GGUF name).
pub(crate) const GEMMA_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("model.layers.{bid}.input_layernorm", "blk.{bid}.attn_norm"),
    ("model.layers.{bid}.self_attn.q_proj", "blk.{bid}.attn_q"),
    ("model.layers.{bid}.self_attn.k_proj", "blk.{bid}.attn_k"),
    ("model.layers.{bid}.self_attn.v_proj", "blk.{bid}.attn_v"),
    (
        "model.layers.{bid}.self_attn.o_proj",
        "blk.{bid}.attn_output",
    ),
    (
        "model.layers.{bid}.post_attention_layernorm",
        "blk.{bid}.post_attention_norm",
    ),
    (
        "model.layers.{bid}.pre_feedforward_layernorm",
        "blk.{bid}.ffn_norm",
    ),
    (
        "model.layers.{bid}.post_feedforward_layernorm",
        "blk.{bid}.post_ffw_norm",
    ),
    ("model.layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate"),
    ("model.layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up"),
    ("model.layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
];

/// Gemma 2 drops `lm_head`; Gemma 3 keeps it as `output`.
pub(crate) const GEMMA2_HEAD: &[(&str, &str)] = &[("lm_head", "")];
/// See [`GEMMA2_HEAD`].
pub(crate) const GEMMA3_HEAD: &[(&str, &str)] = &[("lm_head", "output")];

/// Phi-3 keeps q/k/v and gate/up fused.
pub(crate) const PHI3_TENSORS: &[(&str, &str)] = &[
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("model.layers.{bid}.input_layernorm", "blk.{bid}.attn_norm"),
    (
        "model.layers.{bid}.self_attn.qkv_proj",
        "blk.{bid}.attn_qkv",
    ),
    (
        "model.layers.{bid}.self_attn.o_proj",
        "blk.{bid}.attn_output",
    ),
    (
        "model.layers.{bid}.post_attention_layernorm",
        "blk.{bid}.ffn_norm",
    ),
    ("model.layers.{bid}.mlp.gate_up_proj", "blk.{bid}.ffn_up"),
    ("model.layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
];

/// BERT encoders (names after the `bert.` prefix is removed).
pub(crate) const BERT_TENSORS: &[(&str, &str)] = &[
    ("embeddings.word_embeddings", "token_embd"),
    ("embeddings.position_embeddings", "position_embd"),
    ("embeddings.token_type_embeddings", "token_types"),
    ("embeddings.LayerNorm", "token_embd_norm"),
    (
        "encoder.layer.{bid}.attention.self.query",
        "blk.{bid}.attn_q",
    ),
    ("encoder.layer.{bid}.attention.self.key", "blk.{bid}.attn_k"),
    (
        "encoder.layer.{bid}.attention.self.value",
        "blk.{bid}.attn_v",
    ),
    (
        "encoder.layer.{bid}.attention.output.dense",
        "blk.{bid}.attn_output",
    ),
    (
        "encoder.layer.{bid}.attention.output.LayerNorm",
        "blk.{bid}.attn_output_norm",
    ),
    ("encoder.layer.{bid}.intermediate.dense", "blk.{bid}.ffn_up"),
    ("encoder.layer.{bid}.output.dense", "blk.{bid}.ffn_down"),
    (
        "encoder.layer.{bid}.output.LayerNorm",
        "blk.{bid}.layer_output_norm",
    ),
    ("classifier.dense", "cls"),
    ("classifier.out_proj", "cls.output"),
];

/// Tensors the converter drops by suffix.
pub(crate) const DROPPED_SUFFIXES: &[&str] = &[
    ".attention.masked_bias",
    ".attention.bias",
    ".rotary_emb.inv_freq",
];

/// Looks `name` up in each table in turn.
pub(crate) fn lookup_in(tables: &[&[(&str, &str)]], name: &str) -> Option<(String, Option<u32>)> {
    tables.iter().find_map(|t| lookup(t, name))
}

/// Splits an HF name into (base with the block number replaced by `{bid}`, block number, suffix).
/// The suffix is `.weight` or `.bias` when present.
pub(crate) fn split_name(name: &str) -> (String, Option<u32>, &str) {
    let (stem, suffix) = [".weight", ".bias"]
        .iter()
        .find_map(|s| name.strip_suffix(s).map(|stem| (stem, &name[stem.len()..])))
        .unwrap_or((name, ""));
    let mut bid = None;
    let parts: Vec<String> = stem
        .split('.')
        .map(|p| {
            if bid.is_none() && !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
                if let Ok(n) = p.parse::<u32>() {
                    bid = Some(n);
                    return "{bid}".to_string();
                }
            }
            p.to_string()
        })
        .collect();
    (parts.join("."), bid, suffix)
}

/// Looks `name` up in `table`; `Some("")` means "drop this tensor".
pub(crate) fn lookup(table: &[(&str, &str)], name: &str) -> Option<(String, Option<u32>)> {
    let (base, bid, suffix) = split_name(name);
    let (_, gguf) = table.iter().find(|(hf, _)| *hf == base)?;
    if gguf.is_empty() {
        return Some((String::new(), bid));
    }
    let gguf = match bid {
        Some(n) => gguf.replace("{bid}", &n.to_string()),
        None => gguf.to_string(),
    };
    Some((format!("{gguf}{suffix}"), bid))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_llama_names() {
        assert_eq!(
            lookup(DECODER_TENSORS, "model.layers.12.self_attn.q_proj.weight"),
            Some(("blk.12.attn_q.weight".into(), Some(12)))
        );
        assert_eq!(
            lookup(DECODER_TENSORS, "model.layers.0.self_attn.k_proj.bias"),
            Some(("blk.0.attn_k.bias".into(), Some(0)))
        );
        assert_eq!(
            lookup(DECODER_TENSORS, "lm_head.weight"),
            Some(("output.weight".into(), None))
        );
        assert_eq!(
            lookup(DECODER_TENSORS, "model.layers.0.mystery.weight"),
            None
        );
    }
}
