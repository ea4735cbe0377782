//! The full GGUF key/value list of a converted model, in `convert_hf_to_gguf.py`'s order.

use kiln_types::MetaValue;

use crate::family::{self, Family, Kind};
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
    let mut kv = Kv {
        arch,
        hp,
        items: vec![(
            "general.architecture".into(),
            MetaValue::String(arch.into()),
        )],
    };
    // Written while the converter prepares tensors, which happens before the rest of the
    // metadata: it lands right after `general.architecture`.
    if family.kind == Kind::Phi3 {
        if let Some(factor) = phi3_attn_factor(hp)? {
            kv.push_arch("rope.scaling.attn_factor", MetaValue::F32(factor));
        }
    }
    kv.items
        .push(("general.type".into(), MetaValue::String("model".into())));
    kv.items.extend(sampling_keys(inputs.files)?);
    let mut general = inputs.general;
    general.sort_by_key(|(k, _)| {
        GENERAL_ORDER
            .iter()
            .position(|o| o == k)
            .unwrap_or(usize::MAX)
    });
    kv.items.extend(general);

    match family.kind {
        Kind::Gemma2 => gemma2_params(&mut kv, inputs.file_type)?,
        Kind::Phi3 => phi3_params(&mut kv, inputs.file_type)?,
        _ => {
            shared_params(&mut kv, inputs.file_type)?;
            family_params(family.kind, &mut kv, inputs.files)?;
        }
    }
    kv.items
        .push(("general.quantization_version".into(), MetaValue::U32(2)));

    let vocab = match family.kind {
        Kind::Llama => tokenizer::llama_vocab(hp, inputs.files)?,
        Kind::Qwen2 | Kind::Qwen3 => tokenizer::qwen_vocab(hp, inputs.files)?,
        Kind::Qwen2Moe | Kind::Qwen3Moe => tokenizer::gpt2_vocab(hp, inputs.files)?,
        Kind::Gemma2 | Kind::Gemma3 => tokenizer::gemma_vocab(hp, inputs.files)?,
        Kind::Phi3 => tokenizer::phi3_vocab(hp, inputs.files)?,
        Kind::Bert => tokenizer::bert_vocab(hp, inputs.files)?,
    };
    kv.items.extend(vocab);
    let mut items = kv.items;
    // Empty strings and arrays are not written by gguf-py.
    items.retain(|(_, v)| match v {
        MetaValue::String(s) => !s.is_empty(),
        MetaValue::Array(a) => !a.is_empty(),
        _ => true,
    });
    Ok(items)
}

/// How a sampling setting is stored.
#[derive(Clone, Copy)]
enum SamplingType {
    Str,
    I32,
    F32,
}

/// gguf-py's `Metadata.load` / `set_gguf_meta_model`: these `generation_config.json` keys become
/// `general.sampling.*`, in this order, just before `general.name`. (Only these spellings:
/// transformers' `repetition_penalty` is not read, as gguf-py does not read it.)
const SAMPLING_KEYS: &[(&str, &str, SamplingType)] = &[
    ("sequence", "sequence", SamplingType::Str),
    ("top_k", "top_k", SamplingType::I32),
    ("top_p", "top_p", SamplingType::F32),
    ("min_p", "min_p", SamplingType::F32),
    ("xtc_probability", "xtc_probability", SamplingType::F32),
    ("xtc_threshold", "xtc_threshold", SamplingType::F32),
    ("temperature", "temp", SamplingType::F32),
    ("penalty_last_n", "penalty_last_n", SamplingType::I32),
    ("penalty_repeat", "penalty_repeat", SamplingType::F32),
    ("mirostat", "mirostat", SamplingType::I32),
    ("mirostat_tau", "mirostat_tau", SamplingType::F32),
    ("mirostat_eta", "mirostat_eta", SamplingType::F32),
];

/// The recommended sampling settings of `generation_config.json` as `general.sampling.*` keys
/// (absent or `null` settings are left out). A value of the wrong type is an error rather than a
/// silently dropped setting (gguf-py fails on it too).
fn sampling_keys(files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let Some(config) = files.json("generation_config.json")? else {
        return Ok(Vec::new());
    };
    let mut out = Vec::new();
    for &(hf, gguf, ty) in SAMPLING_KEYS {
        let Some(v) = config.get(hf).filter(|v| !v.is_null()) else {
            continue;
        };
        let bad = |expected: &str| ArchError::InvalidJson {
            file: "generation_config.json".into(),
            message: format!("`{hf}` must be {expected}, not {v}"),
        };
        let value = match ty {
            SamplingType::Str => {
                MetaValue::String(v.as_str().ok_or_else(|| bad("a string"))?.into())
            }
            SamplingType::I32 => MetaValue::I32(
                v.as_i64()
                    .and_then(|i| i32::try_from(i).ok())
                    .ok_or_else(|| bad("a 32-bit integer"))?,
            ),
            // Rounded once from the JSON number to f32, as `struct.pack("<f", x)` does.
            SamplingType::F32 => MetaValue::F32(v.as_f64().ok_or_else(|| bad("a number"))? as f32),
        };
        out.push((format!("general.sampling.{gguf}"), value));
    }
    Ok(out)
}

/// The key list being built, with gguf-py's rule that writing a key again replaces its value but
/// keeps its first position.
struct Kv<'a> {
    arch: &'a str,
    hp: &'a HParams,
    items: Vec<(String, MetaValue)>,
}

impl Kv<'_> {
    fn set(&mut self, key: String, value: MetaValue) {
        match self.items.iter_mut().find(|(k, _)| *k == key) {
            Some(slot) => slot.1 = value,
            None => self.items.push((key, value)),
        }
    }

    fn push_arch(&mut self, key: &str, value: MetaValue) {
        let key = format!("{}.{key}", self.arch);
        self.set(key, value);
    }

    /// `{arch}.{key}` as u32 from the first present of `keys`, if any.
    fn u32_from(&mut self, key: &str, keys: &[&str]) -> Result<(), ArchError> {
        if let Some(v) = self.hp.find_u32(keys)? {
            self.push_arch(key, MetaValue::U32(v));
        }
        Ok(())
    }

    /// `{arch}.{key}` as f32 from the first present of `keys`, if any.
    fn f32_from(&mut self, key: &str, keys: &[&str]) -> Result<(), ArchError> {
        if let Some(v) = self.hp.find_f64(keys)? {
            self.push_arch(key, MetaValue::F32(v as f32));
        }
        Ok(())
    }

    fn require_u32(&mut self, key: &str, keys: &[&str]) -> Result<(), ArchError> {
        let v = self.hp.require_u32(keys)?;
        self.push_arch(key, MetaValue::U32(v));
        Ok(())
    }

    fn require_f32(&mut self, key: &str, keys: &[&str]) -> Result<(), ArchError> {
        let v = self
            .hp
            .find_f64(keys)?
            .ok_or_else(|| ArchError::BadHParam {
                key: keys.join(" / "),
                problem: "is missing".into(),
            })?;
        self.push_arch(key, MetaValue::F32(v as f32));
        Ok(())
    }
}

const BLOCK_COUNT: &[&str] = &["n_layers", "num_hidden_layers", "n_layer", "num_layers"];
const CONTEXT_LENGTH: &[&str] = &[
    "max_position_embeddings",
    "n_ctx",
    "n_positions",
    "max_length",
    "max_sequence_length",
    "model_max_length",
];
const EMBEDDING_LENGTH: &[&str] = &["hidden_size", "n_embd", "dim"];
const FEED_FORWARD_LENGTH: &[&str] = &[
    "prefix_dense_intermediate_size",
    "dense_intermediate_size",
    "intermediate_size",
    "n_inner",
    "hidden_dim",
];
const HEAD_COUNT: &[&str] = &["num_attention_heads", "n_head", "n_heads"];
const HEAD_COUNT_KV: &[&str] = &["num_key_value_heads", "n_kv_heads"];
const RMS_EPS: &[&str] = &["rms_norm_eps", "norm_eps"];

/// `TextModel.set_gguf_parameters`: the writer most families share.
fn shared_params(kv: &mut Kv<'_>, file_type: u32) -> Result<(), ArchError> {
    let hp = kv.hp;
    kv.require_u32("block_count", BLOCK_COUNT)?;
    kv.u32_from("context_length", CONTEXT_LENGTH)?;
    kv.u32_from("embedding_length", EMBEDDING_LENGTH)?;
    kv.u32_from("feed_forward_length", FEED_FORWARD_LENGTH)?;
    kv.u32_from("attention.head_count", HEAD_COUNT)?;
    kv.u32_from("attention.head_count_kv", HEAD_COUNT_KV)?;
    if hp.get("is_causal").and_then(|v| v.as_bool()) == Some(false) {
        kv.push_arch("attention.causal", MetaValue::Bool(false));
    }
    let rope = hp.rope_main();
    let rope_num = |k: &str| rope.get(k).and_then(|v| v.as_f64());
    match rope.get("rope_type").and_then(|v| v.as_str()) {
        Some("linear") if rope_num("factor").is_some() => {
            kv.push_arch("rope.scaling.type", MetaValue::String("linear".into()));
            kv.push_arch(
                "rope.scaling.factor",
                MetaValue::F32(rope_num("factor").unwrap_or(1.0) as f32),
            );
        }
        Some("yarn") if rope_num("factor").is_some() => {
            kv.push_arch("rope.scaling.type", MetaValue::String("yarn".into()));
            kv.push_arch(
                "rope.scaling.factor",
                MetaValue::F32(rope_num("factor").unwrap_or(1.0) as f32),
            );
            let orig = rope
                .get("original_max_position_embeddings")
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| ArchError::BadHParam {
                    key: "rope_parameters.original_max_position_embeddings".into(),
                    problem: "is required for yarn scaling".into(),
                })?;
            kv.push_arch("rope.scaling.original_context_length", MetaValue::U32(orig));
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
                    kv.push_arch(dst, MetaValue::F32(v as f32));
                }
            }
        }
        Some("su") | Some("longrope") => {
            kv.push_arch("rope.scaling.type", MetaValue::String("longrope".into()));
        }
        _ => {}
    }
    if let Some(theta) = rope_num("rope_theta") {
        kv.push_arch("rope.freq_base", MetaValue::F32(theta as f32));
    }
    if let Some(theta) = hp.rope_swa_theta() {
        kv.push_arch("rope.freq_base_swa", MetaValue::F32(theta as f32));
    }
    kv.f32_from("attention.layer_norm_rms_epsilon", RMS_EPS)?;
    kv.f32_from(
        "attention.layer_norm_epsilon",
        &["layer_norm_eps", "layer_norm_epsilon", "norm_epsilon"],
    )?;
    kv.u32_from(
        "expert_count",
        &["num_local_experts", "num_experts", "n_routed_experts"],
    )?;
    kv.u32_from(
        "expert_used_count",
        &[
            "num_experts_per_tok",
            "num_experts_per_token",
            "top_k_experts",
        ],
    )?;
    if let Some(head_dim) = hp.find_u32(&["head_dim"])? {
        kv.push_arch("attention.key_length", MetaValue::U32(head_dim));
        kv.push_arch("attention.value_length", MetaValue::U32(head_dim));
    }
    kv.items
        .push(("general.file_type".into(), MetaValue::U32(file_type)));
    Ok(())
}

/// What each converter class appends after the shared writer.
fn family_params(kind: Kind, kv: &mut Kv<'_>, files: &SideFiles) -> Result<(), ArchError> {
    let hp = kv.hp;
    match kind {
        Kind::Llama => {
            kv.u32_from("vocab_size", &["vocab_size"])?;
            kv.push_arch("rope.dimension_count", MetaValue::U32(hp.head_dim()?));
        }
        Kind::Qwen2 | Kind::Qwen3 => {
            if let Some(pooling) = pooling_type(files)? {
                kv.push_arch("pooling_type", MetaValue::U32(pooling));
            }
        }
        Kind::Qwen2Moe | Kind::Qwen3Moe => {
            kv.u32_from("expert_feed_forward_length", &["moe_intermediate_size"])?;
            kv.u32_from(
                "expert_shared_feed_forward_length",
                &["shared_expert_intermediate_size"],
            )?;
        }
        Kind::Gemma3 => {
            if hp.get("attn_logit_softcapping").is_some() {
                return Err(ArchError::BadHParam {
                    key: "attn_logit_softcapping".into(),
                    problem: "must be null for Gemma 3 (llama.cpp's gemma3 has no attention \
                              soft-capping)"
                        .into(),
                });
            }
            // Gemma3Model writes these again; the values are the ones already written unless
            // the shared writer found nothing, and the first position is kept.
            let or = |v: Option<u32>, d: u32| MetaValue::U32(v.unwrap_or(d));
            kv.push_arch(
                "context_length",
                or(hp.find_u32(&["max_position_embeddings"])?, 131072),
            );
            kv.push_arch(
                "attention.head_count",
                or(hp.find_u32(&["num_attention_heads"])?, 8),
            );
            kv.push_arch(
                "attention.layer_norm_rms_epsilon",
                MetaValue::F32(hp.find_f64(&["rms_norm_eps"])?.unwrap_or(1e-6) as f32),
            );
            let head_dim = hp.find_u32(&["head_dim"])?.unwrap_or(256);
            kv.push_arch("attention.key_length", MetaValue::U32(head_dim));
            kv.push_arch("attention.value_length", MetaValue::U32(head_dim));
            let theta = hp
                .rope_main()
                .get("rope_theta")
                .and_then(|v| v.as_f64())
                .unwrap_or(1e6);
            kv.push_arch("rope.freq_base", MetaValue::F32(theta as f32));
            kv.push_arch(
                "attention.head_count_kv",
                or(hp.find_u32(&["num_key_value_heads"])?, 4),
            );
            if let Some(cap) = hp.find_f64(&["final_logit_softcapping"])? {
                if cap != 0.0 {
                    kv.push_arch("final_logit_softcapping", MetaValue::F32(cap as f32));
                }
            }
            if hp.u64("sliding_window_pattern") != Some(1) {
                kv.u32_from("attention.sliding_window", &["sliding_window"])?;
            }
        }
        Kind::Bert => {
            kv.push_arch("attention.causal", MetaValue::Bool(false));
            if let Some(pooling) = pooling_type(files)? {
                kv.push_arch("pooling_type", MetaValue::U32(pooling));
            }
        }
        Kind::Gemma2 | Kind::Phi3 => {}
    }
    Ok(())
}

/// `Gemma2Model.set_gguf_parameters` (its own list; the shared writer is not used).
fn gemma2_params(kv: &mut Kv<'_>, file_type: u32) -> Result<(), ArchError> {
    kv.require_u32("context_length", &["max_position_embeddings"])?;
    kv.require_u32("embedding_length", &["hidden_size"])?;
    kv.require_u32("block_count", &["num_hidden_layers"])?;
    kv.require_u32("feed_forward_length", &["intermediate_size"])?;
    kv.require_u32("attention.head_count", &["num_attention_heads"])?;
    kv.require_u32(
        "attention.head_count_kv",
        &["num_key_value_heads", "num_attention_heads"],
    )?;
    kv.require_f32("attention.layer_norm_rms_epsilon", &["rms_norm_eps"])?;
    kv.require_u32("attention.key_length", &["head_dim"])?;
    kv.require_u32("attention.value_length", &["head_dim"])?;
    kv.items
        .push(("general.file_type".into(), MetaValue::U32(file_type)));
    kv.require_f32("attn_logit_softcapping", &["attn_logit_softcapping"])?;
    kv.require_f32("final_logit_softcapping", &["final_logit_softcapping"])?;
    kv.require_u32("attention.sliding_window", &["sliding_window"])?;
    Ok(())
}

/// `Phi3MiniModel.set_gguf_parameters`.
fn phi3_params(kv: &mut Kv<'_>, file_type: u32) -> Result<(), ArchError> {
    let hp = kv.hp;
    kv.require_u32(
        "context_length",
        &["n_positions", "max_position_embeddings"],
    )?;
    let orig = hp
        .rope_parameters()
        .get("original_max_position_embeddings")
        .and_then(|v| v.as_u64())
        .and_then(|v| u32::try_from(v).ok())
        .ok_or_else(|| ArchError::BadHParam {
            key: "original_max_position_embeddings".into(),
            problem: "is missing".into(),
        })?;
    kv.push_arch("rope.scaling.original_context_length", MetaValue::U32(orig));
    kv.require_u32("embedding_length", &["hidden_size", "n_embd"])?;
    kv.require_u32("feed_forward_length", &["intermediate_size"])?;
    kv.require_u32("block_count", BLOCK_COUNT)?;
    kv.require_u32("attention.head_count", &["num_attention_heads", "n_head"])?;
    kv.require_u32(
        "attention.head_count_kv",
        &["num_key_value_heads", "n_head_kv"],
    )?;
    kv.require_f32("attention.layer_norm_rms_epsilon", &["rms_norm_eps"])?;
    kv.push_arch(
        "rope.dimension_count",
        MetaValue::U32(family::phi3_rope_dims(hp)?),
    );
    let theta = hp
        .rope_main()
        .get("rope_theta")
        .and_then(|v| v.as_f64())
        .ok_or_else(|| ArchError::BadHParam {
            key: "rope_theta".into(),
            problem: "is missing".into(),
        })?;
    kv.push_arch("rope.freq_base", MetaValue::F32(theta as f32));
    kv.items
        .push(("general.file_type".into(), MetaValue::U32(file_type)));
    let window = hp.find_u32(&["sliding_window"])?.unwrap_or(0);
    kv.push_arch("attention.sliding_window", MetaValue::U32(window));
    Ok(())
}

/// Phi-3 long-context attention factor, when the model carries rope factor lists.
fn phi3_attn_factor(hp: &HParams) -> Result<Option<f32>, ArchError> {
    let rope = hp.rope_parameters();
    if rope
        .get("long_factor")
        .and_then(|v| v.as_array())
        .is_none_or(|l| l.is_empty())
    {
        return Ok(None);
    }
    let max = hp.find_f64(&["max_position_embeddings"])?.unwrap_or(0.0);
    let orig = hp
        .find_f64(&["original_max_position_embeddings"])?
        .unwrap_or(0.0);
    let scale = max / orig;
    let kind = rope
        .get("rope_type")
        .and_then(|v| v.as_str())
        .unwrap_or("")
        .to_lowercase();
    let factor = match kind.as_str() {
        "su" | "longrope" => {
            if scale > 1.0 {
                (1.0 + scale.ln() / orig.ln()).sqrt()
            } else {
                1.0
            }
        }
        "yarn" => {
            if scale > 1.0 {
                0.1 * scale.ln() + 1.0
            } else {
                1.0
            }
        }
        other => {
            return Err(ArchError::BadHParam {
                key: "rope_scaling.type".into(),
                problem: format!("`{other}` is not a Phi-3 long-context scaling kind"),
            })
        }
    };
    Ok(Some(factor as f32))
}

/// Sentence-transformers pooling (`modules.json` + the Pooling module's config): mean 1, cls 2,
/// last token 3.
fn pooling_type(files: &SideFiles) -> Result<Option<u32>, ArchError> {
    let Some(modules) = files.json("modules.json")? else {
        return Ok(None);
    };
    let pooling = modules.as_array().and_then(|m| {
        m.iter().find(|m| {
            m.get("type")
                .and_then(|t| t.as_str())
                .is_some_and(|t| t.ends_with(".Pooling"))
        })
    });
    let Some(pooling) = pooling else {
        return Ok(None);
    };
    let path = pooling.get("path").and_then(|p| p.as_str()).unwrap_or("");
    let name = format!("{path}/config.json");
    let Some(config) = files.json(&name)? else {
        return Err(ArchError::BadHParam {
            key: "modules.json".into(),
            problem: format!("names a Pooling module whose {name} is missing"),
        });
    };
    let on = |k: &str| config.get(k).and_then(|v| v.as_bool()) == Some(true);
    if on("pooling_mode_mean_tokens") {
        Ok(Some(1))
    } else if on("pooling_mode_cls_token") {
        Ok(Some(2))
    } else if on("pooling_mode_lasttoken") {
        Ok(Some(3))
    } else {
        Err(ArchError::BadHParam {
            key: name,
            problem: "selects a pooling mode llama.cpp does not support".into(),
        })
    }
}
