//! HF → GGUF tensor-name tables (from gguf-py's `tensor_mapping.py`), one per family.

/// Llama / Mistral (and Qwen2, which uses the same HF names). `{bid}` is the block number.
pub(crate) const LLAMA_TENSORS: &[(&str, &str)] = &[
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
    ("model.layers.{bid}.mlp.gate_proj", "blk.{bid}.ffn_gate"),
    ("model.layers.{bid}.mlp.up_proj", "blk.{bid}.ffn_up"),
    ("model.layers.{bid}.mlp.down_proj", "blk.{bid}.ffn_down"),
    ("model.layers.{bid}.self_attn.rotary_emb.inv_freq", ""),
    (
        "model.layers.{bid}.block_sparse_moe.gate",
        "blk.{bid}.ffn_gate_inp",
    ),
];

/// Tensors the converter drops by suffix.
pub(crate) const DROPPED_SUFFIXES: &[&str] = &[
    ".attention.masked_bias",
    ".attention.bias",
    ".rotary_emb.inv_freq",
];

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
            lookup(LLAMA_TENSORS, "model.layers.12.self_attn.q_proj.weight"),
            Some(("blk.12.attn_q.weight".into(), Some(12)))
        );
        assert_eq!(
            lookup(LLAMA_TENSORS, "model.layers.0.self_attn.k_proj.bias"),
            Some(("blk.0.attn_k.bias".into(), Some(0)))
        );
        assert_eq!(
            lookup(LLAMA_TENSORS, "lm_head.weight"),
            Some(("output.weight".into(), None))
        );
        assert_eq!(lookup(LLAMA_TENSORS, "model.layers.0.mystery.weight"), None);
    }
}
