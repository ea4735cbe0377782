//! Which `config.json` keys kiln understands, so that a report can name the ones it does not.
//!
//! A key is understood when a family's metadata writer reads it, or when it is known not to
//! matter for a GGUF file (training settings, dropout, generation flags, values llama.cpp's
//! runtime fixes per architecture). Everything else is listed by `kiln inspect` and in the error
//! for an unsupported checkpoint: an unfamiliar key is how a new architecture variant usually
//! shows itself.

use serde_json::Value;

use crate::family::{Family, Kind};

/// Keys the shared writer and the family writers read (any family).
const READ: &[&str] = &[
    "architectures",
    "model_type",
    "text_config",
    "n_layers",
    "num_hidden_layers",
    "n_layer",
    "num_layers",
    "max_position_embeddings",
    "n_ctx",
    "n_positions",
    "max_length",
    "max_sequence_length",
    "model_max_length",
    "hidden_size",
    "n_embd",
    "dim",
    "prefix_dense_intermediate_size",
    "dense_intermediate_size",
    "intermediate_size",
    "n_inner",
    "hidden_dim",
    "num_attention_heads",
    "n_head",
    "n_heads",
    "num_key_value_heads",
    "n_kv_heads",
    "n_head_kv",
    "is_causal",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "rope_local_base_freq",
    "partial_rotary_factor",
    "original_max_position_embeddings",
    "rms_norm_eps",
    "norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "norm_epsilon",
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "num_experts_per_tok",
    "num_experts_per_token",
    "top_k_experts",
    "head_dim",
    "vocab_size",
    "moe_intermediate_size",
    "shared_expert_intermediate_size",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "sliding_window",
    "sliding_window_pattern",
    "use_bidirectional_attention",
    "type_vocab_size",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
];

/// Keys that do not change a GGUF file: training and framework settings, and choices llama.cpp's
/// runtime makes itself for the architecture.
const IGNORED: &[&str] = &[
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "initializer_range",
    "attention_dropout",
    "hidden_dropout",
    "hidden_dropout_prob",
    "attention_probs_dropout_prob",
    "classifier_dropout",
    "embd_pdrop",
    "resid_pdrop",
    "tie_word_embeddings",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
    "is_decoder",
    "add_cross_attention",
    "chunk_size_feed_forward",
    "pretraining_tp",
    "attention_bias",
    "mlp_bias",
    "layer_types",
    "use_sliding_window",
    "max_window_layers",
    "norm_topk_prob",
    "router_aux_loss_coef",
    "output_router_logits",
    "router_jitter_noise",
    "decoder_sparse_step",
    "query_pre_attn_scalar",
    "bos_token",
    "eos_token",
    "quantization_config",
    "auto_map",
    "unk_token_id",
];

/// Activations llama.cpp's runtime hard-codes per family; a checkpoint asking for another one
/// would convert "successfully" and then compute the wrong thing.
fn expected_activation(kind: Kind) -> (&'static [&'static str], &'static [&'static str]) {
    match kind {
        Kind::Llama | Kind::Qwen2 | Kind::Qwen3 | Kind::Qwen2Moe | Kind::Qwen3Moe | Kind::Phi3 => {
            (&["hidden_act"], &["silu"])
        }
        Kind::Gemma2 | Kind::Gemma3 => (
            &["hidden_activation", "hidden_act"],
            &["gelu_pytorch_tanh", "gelu"],
        ),
        Kind::Bert => (&["hidden_act"], &["gelu"]),
    }
}

/// The top-level `config.json` keys (and `text_config` keys) kiln does not understand, with a
/// reason, in file order. With no family (an unsupported architecture) only the shared lists
/// apply.
pub fn unknown_config_keys(family: Option<&Family>, config: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut visit = |prefix: &str, obj: &serde_json::Map<String, Value>| {
        for (key, value) in obj {
            let activation = family.map(|f| expected_activation(f.kind));
            if let Some((keys, allowed)) = activation {
                if keys.contains(&key.as_str()) {
                    if let Some(v) = value.as_str() {
                        if !allowed.contains(&v) {
                            out.push(format!(
                                "{prefix}{key} = \"{v}\" (llama.cpp's `{}` uses {})",
                                family.map_or("", |f| f.gguf_arch),
                                allowed.join(" / ")
                            ));
                        }
                    }
                    continue;
                }
            }
            if READ.contains(&key.as_str())
                || IGNORED.contains(&key.as_str())
                || key == "hidden_act"
                || key == "hidden_activation"
                || value.is_null()
            {
                continue;
            }
            out.push(format!("{prefix}{key}"));
        }
    };
    if let Some(obj) = config.as_object() {
        visit("", obj);
        if let Some(Value::Object(text)) = obj.get("text_config") {
            visit("text_config.", text);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_unknown_keys_and_wrong_activations() {
        let llama = Family::by_gguf_arch("llama").unwrap();
        let config = json!({
            "architectures": ["LlamaForCausalLM"], "hidden_size": 64, "hidden_act": "gelu",
            "use_cache": true, "mystery_gate": 3, "rope_scaling": null
        });
        let unknown = unknown_config_keys(Some(llama), &config);
        assert_eq!(unknown.len(), 2, "{unknown:?}");
        assert!(unknown[0].starts_with("hidden_act = \"gelu\""));
        assert_eq!(unknown[1], "mystery_gate");
        let fine = json!({"architectures": ["LlamaForCausalLM"], "hidden_act": "silu"});
        assert!(unknown_config_keys(Some(llama), &fine).is_empty());
    }
}
