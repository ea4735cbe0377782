//! The full GGUF key/value list of a converted model, in `convert_hf_to_gguf.py`'s order.

use kiln_types::MetaValue;

use crate::family::Family;
use crate::hparams::HParams;
use crate::{tokenizer, ArchError, SideFiles};

/// gguf-py's `Metadata.set_gguf_meta_model` order for `general.*` keys.
const GENERAL_ORDER: &[&str] = &[
    "general.name",
    "general.author",
    "general.version",
    "general.organization",
    "general.finetune",
    "general.basename",
    "general.description",
    "general.quantized_by",
    "general.size_label",
    "general.license",
    "general.license.name",
    "general.license.link",
    "general.url",
    "general.doi",
    "general.uuid",
    "general.repo_url",
    "general.source.url",
    "general.source.doi",
    "general.source.uuid",
    "general.source.repo_url",
    "general.tags",
    "general.languages",
];

/// What [`gguf_metadata`] needs besides the family.
#[derive(Debug, Clone)]
pub struct MetadataInputs<'a> {
    /// Parsed `config.json`.
    pub hparams: &'a HParams,
    /// The checkpoint's side files.
    pub files: &'a SideFiles,
    /// `general.*` keys from the recipe (and a computed size label), any order.
    pub general: Vec<(String, MetaValue)>,
    /// `general.file_type`.
    pub file_type: u32,
}

/// Builds every key of the output file except recipe extras: `general.architecture`,
/// `general.type`, the `general.*` block, hyperparameters (with `general.file_type` where the
/// converter puts it), `general.quantization_version`, and the tokenizer.
pub fn gguf_metadata(
    family: &Family,
    inputs: MetadataInputs<'_>,
) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let hp = inputs.hparams;
    let arch = family.gguf_arch;
    let mut kv: Vec<(String, MetaValue)> = vec![
        (
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        ),
        ("general.type".into(), MetaValue::String("model".into())),
    ];
    let mut general = inputs.general;
    general.sort_by_key(|(k, _)| {
        GENERAL_ORDER
            .iter()
            .position(|o| o == k)
            .unwrap_or(usize::MAX)
    });
    kv.extend(general);

    let u32_key =
        |kv: &mut Vec<(String, MetaValue)>, key: &str, keys: &[&str]| -> Result<(), ArchError> {
            if let Some(v) = hp.find_u32(keys)? {
                kv.push((format!("{arch}.{key}"), MetaValue::U32(v)));
            }
            Ok(())
        };
    let f32_key =
        |kv: &mut Vec<(String, MetaValue)>, key: &str, keys: &[&str]| -> Result<(), ArchError> {
            if let Some(v) = hp.find_f64(keys)? {
                kv.push((format!("{arch}.{key}"), MetaValue::F32(v as f32)));
            }
            Ok(())
        };

    kv.push((
        format!("{arch}.block_count"),
        MetaValue::U32(hp.require_u32(&[
            "n_layers",
            "num_hidden_layers",
            "n_layer",
            "num_layers",
        ])?),
    ));
    u32_key(
        &mut kv,
        "context_length",
        &[
            "max_position_embeddings",
            "n_ctx",
            "n_positions",
            "max_length",
            "max_sequence_length",
            "model_max_length",
        ],
    )?;
    u32_key(
        &mut kv,
        "embedding_length",
        &["hidden_size", "n_embd", "dim"],
    )?;
    u32_key(
        &mut kv,
        "feed_forward_length",
        &[
            "intermediate_size",
            "prefix_dense_intermediate_size",
            "n_inner",
            "hidden_dim",
        ],
    )?;
    u32_key(
        &mut kv,
        "attention.head_count",
        &["num_attention_heads", "n_head", "n_heads"],
    )?;
    u32_key(
        &mut kv,
        "attention.head_count_kv",
        &["num_key_value_heads", "n_kv_heads"],
    )?;
    if hp.get("is_causal").and_then(|v| v.as_bool()) == Some(false) {
        kv.push((format!("{arch}.attention.causal"), MetaValue::Bool(false)));
    }
    let rope = hp.rope_parameters();
    let rope_num = |k: &str| rope.get(k).and_then(|v| v.as_f64());
    match rope.get("rope_type").and_then(|v| v.as_str()) {
        Some("linear") if rope_num("factor").is_some() => {
            kv.push((
                format!("{arch}.rope.scaling.type"),
                MetaValue::String("linear".into()),
            ));
            kv.push((
                format!("{arch}.rope.scaling.factor"),
                MetaValue::F32(rope_num("factor").unwrap_or(1.0) as f32),
            ));
        }
        Some("yarn") if rope_num("factor").is_some() => {
            kv.push((
                format!("{arch}.rope.scaling.type"),
                MetaValue::String("yarn".into()),
            ));
            kv.push((
                format!("{arch}.rope.scaling.factor"),
                MetaValue::F32(rope_num("factor").unwrap_or(1.0) as f32),
            ));
            let orig = rope
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| ArchError::BadHParam {
                    key: "rope_parameters.original_max_position_embeddings".into(),
                    problem: "is required for yarn scaling".into(),
                })?;
            kv.push((
                format!("{arch}.rope.scaling.original_context_length"),
                MetaValue::U32(orig),
            ));
            for (src, dst) in [
                ("extrapolation_factor", "rope.scaling.yarn_ext_factor"),
                ("attention_factor", "rope.scaling.yarn_attn_factor"),
                ("beta_fast", "rope.scaling.yarn_beta_fast"),
                ("beta_slow", "rope.scaling.yarn_beta_slow"),
            ] {
                let v = rope_num(src).or_else(|| {
                    (src == "attention_factor")
                        .then(|| rope_num("attn_factor"))
                        .flatten()
                });
                if let Some(v) = v {
                    kv.push((format!("{arch}.{dst}"), MetaValue::F32(v as f32)));
                }
            }
        }
        Some("su") | Some("longrope") => {
            kv.push((
                format!("{arch}.rope.scaling.type"),
                MetaValue::String("longrope".into()),
            ));
        }
        _ => {}
    }
    if let Some(theta) = rope_num("rope_theta") {
        kv.push((
            format!("{arch}.rope.freq_base"),
            MetaValue::F32(theta as f32),
        ));
    }
    f32_key(
        &mut kv,
        "attention.layer_norm_rms_epsilon",
        &["rms_norm_eps", "norm_eps"],
    )?;
    f32_key(
        &mut kv,
        "attention.layer_norm_epsilon",
        &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"],
    )?;
    u32_key(
        &mut kv,
        "expert_count",
        &["num_local_experts", "num_experts", "n_routed_experts"],
    )?;
    u32_key(
        &mut kv,
        "expert_used_count",
        &[
            "num_experts_per_tok",
            "num_experts_per_token",
            "top_k_experts",
        ],
    )?;
    if let Some(head_dim) = hp.find_u32(&["head_dim"])? {
        kv.push((
            format!("{arch}.attention.key_length"),
            MetaValue::U32(head_dim),
        ));
        kv.push((
            format!("{arch}.attention.value_length"),
            MetaValue::U32(head_dim),
        ));
    }
    kv.push(("general.file_type".into(), MetaValue::U32(inputs.file_type)));

    // LlamaModel.set_gguf_parameters.
    if let Some(v) = hp.find_u32(&["vocab_size"])? {
        kv.push((format!("{arch}.vocab_size"), MetaValue::U32(v)));
    }
    let rope_dim = match hp.find_u32(&["head_dim"])? {
        Some(d) => d,
        None => {
            let hidden = hp.require_u32(&["hidden_size"])?;
            let heads = hp.require_u32(&["num_attention_heads"])?;
            if heads == 0 {
                return Err(ArchError::BadHParam {
                    key: "num_attention_heads".into(),
                    problem: "must not be 0".into(),
                });
            }
            hidden / heads
        }
    };
    kv.push((
        format!("{arch}.rope.dimension_count"),
        MetaValue::U32(rope_dim),
    ));
    kv.push(("general.quantization_version".into(), MetaValue::U32(2)));

    kv.extend(tokenizer::llama_vocab(hp, inputs.files)?);
    // Empty strings and arrays are not written by gguf-py.
    kv.retain(|(_, v)| match v {
        MetaValue::String(s) => !s.is_empty(),
        MetaValue::Array(a) => !a.is_empty(),
        _ => true,
    });
    Ok(kv)
}
