//! `config.json` as llama.cpp's converter sees it.

use serde_json::{Map, Value};

use crate::ArchError;

/// The hyperparameters of a checkpoint: `config.json`, with the defaults that the matching
/// `transformers` config class would add (llama.cpp's converter reads configs through
/// `AutoConfig(...).to_dict()`, so class defaults end up in its output).
#[derive(Debug, Clone)]
pub struct HParams {
    map: Map<String, Value>,
}

impl HParams {
    /// Reads a `config.json` value. A `text_config` block (multimodal wrappers) is merged into the
    /// top level, as the converter does.
    pub fn from_config(config: &Value) -> Result<HParams, ArchError> {
        let Some(obj) = config.as_object() else {
            return Err(ArchError::BadHParam {
                key: "config.json".into(),
                problem: "is not a JSON object".into(),
            });
        };
        let mut map = obj.clone();
        if let Some(Value::Object(text)) = obj.get("text_config") {
            for (k, v) in text {
                map.insert(k.clone(), v.clone());
            }
        }
        let mut hp = HParams { map };
        hp.apply_class_defaults();
        Ok(hp)
    }

    /// Fills in what the matching `transformers` config class (4.57) would: only the defaults
    /// that change what the converter writes (see docs/families.md).
    fn apply_class_defaults(&mut self) {
        let model_type = self.str("model_type").unwrap_or("").to_string();
        let mut d: Vec<(&str, Value)> = Vec::new();
        let mut kv_from_heads = true;
        let mut derive_head_dim = false;
        match model_type.as_str() {
            "llama" => {
                d.extend([
                    ("rms_norm_eps", Value::from(1e-6)),
                    ("max_position_embeddings", Value::from(2048)),
                    ("rope_theta", Value::from(10000.0)),
                ]);
                derive_head_dim = true;
            }
            "mistral" => {
                d.extend([
                    ("rms_norm_eps", Value::from(1e-6)),
                    ("max_position_embeddings", Value::from(4096 * 32)),
                    ("rope_theta", Value::from(10000.0)),
                ]);
                derive_head_dim = true;
            }
            "mixtral" => d.extend([
                ("rms_norm_eps", Value::from(1e-5)),
                ("max_position_embeddings", Value::from(4096 * 32)),
                ("rope_theta", Value::from(1e6)),
            ]),
            "qwen2" => d.extend([
                ("rms_norm_eps", Value::from(1e-6)),
                ("max_position_embeddings", Value::from(32768)),
                ("rope_theta", Value::from(10000.0)),
            ]),
            "qwen3" => d.extend([
                ("rms_norm_eps", Value::from(1e-6)),
                ("max_position_embeddings", Value::from(32768)),
                ("rope_theta", Value::from(10000.0)),
                ("head_dim", Value::from(128)),
            ]),
            "qwen2_moe" => {
                kv_from_heads = false;
                d.extend([
                    ("rms_norm_eps", Value::from(1e-6)),
                    ("max_position_embeddings", Value::from(32768)),
                    ("rope_theta", Value::from(10000.0)),
                    ("num_key_value_heads", Value::from(16)),
                    ("moe_intermediate_size", Value::from(1408)),
                    ("shared_expert_intermediate_size", Value::from(5632)),
                    ("num_experts", Value::from(60)),
                    ("num_experts_per_tok", Value::from(4)),
                ]);
            }
            "qwen3_moe" => {
                kv_from_heads = false;
                d.extend([
                    ("rms_norm_eps", Value::from(1e-6)),
                    ("max_position_embeddings", Value::from(32768)),
                    ("rope_theta", Value::from(10000.0)),
                    ("num_key_value_heads", Value::from(4)),
                    ("moe_intermediate_size", Value::from(768)),
                    ("num_experts", Value::from(128)),
                    ("num_experts_per_tok", Value::from(8)),
                ]);
            }
            "gemma2" => d.extend([
                ("rms_norm_eps", Value::from(1e-6)),
                ("max_position_embeddings", Value::from(8192)),
                ("rope_theta", Value::from(10000.0)),
                ("head_dim", Value::from(256)),
                ("attn_logit_softcapping", Value::from(50.0)),
                ("final_logit_softcapping", Value::from(30.0)),
                ("sliding_window", Value::from(4096)),
            ]),
            "gemma3" | "gemma3_text" => {
                kv_from_heads = false;
                // Gemma3TextConfig halves the window of bidirectional (embedding) variants.
                let mut window = self.u64("sliding_window").unwrap_or(4096);
                if self
                    .get("use_bidirectional_attention")
                    .and_then(Value::as_bool)
                    == Some(true)
                {
                    window = window / 2 + 1;
                    self.map
                        .insert("sliding_window".into(), Value::from(window));
                }
                d.extend([
                    ("rms_norm_eps", Value::from(1e-6)),
                    ("max_position_embeddings", Value::from(131072)),
                    ("rope_theta", Value::from(1e6)),
                    ("rope_local_base_freq", Value::from(10000.0)),
                    ("head_dim", Value::from(256)),
                    ("sliding_window", Value::from(window)),
                    ("num_attention_heads", Value::from(8)),
                    ("num_key_value_heads", Value::from(4)),
                ]);
            }
            "phi3" => {
                d.extend([
                    ("rms_norm_eps", Value::from(1e-5)),
                    ("max_position_embeddings", Value::from(4096)),
                    ("original_max_position_embeddings", Value::from(4096)),
                    ("partial_rotary_factor", Value::from(1.0)),
                    ("rope_theta", Value::from(10000.0)),
                ]);
                // Phi3Config renames the old long-context scaling types.
                for key in ["rope_scaling", "rope_parameters"] {
                    if let Some(Value::Object(scaling)) = self.map.get_mut(key) {
                        for field in ["type", "rope_type"] {
                            if matches!(
                                scaling.get(field).and_then(Value::as_str),
                                Some("su" | "yarn")
                            ) {
                                scaling.insert(field.into(), Value::from("longrope"));
                            }
                        }
                    }
                }
            }
            "bert" => {
                kv_from_heads = false;
                d.extend([
                    ("layer_norm_eps", Value::from(1e-12)),
                    ("max_position_embeddings", Value::from(512)),
                    ("type_vocab_size", Value::from(2)),
                ]);
            }
            _ => return,
        }
        let set_default = |map: &mut Map<String, Value>, k: &str, v: Value| {
            if map.get(k).is_none_or(Value::is_null) {
                map.insert(k.to_string(), v);
            }
        };
        for (k, v) in d {
            // A theta inside `rope_parameters` wins over the class default at the top level.
            if k == "rope_theta" && self.rope_parameters().get("rope_theta").is_some() {
                continue;
            }
            set_default(&mut self.map, k, v);
        }
        if let Some(heads) = self.u64("num_attention_heads") {
            if kv_from_heads {
                set_default(&mut self.map, "num_key_value_heads", Value::from(heads));
            }
            if derive_head_dim {
                if let Some(head_dim) = self
                    .u64("hidden_size")
                    .and_then(|hidden| hidden.checked_div(heads))
                {
                    set_default(&mut self.map, "head_dim", Value::from(head_dim));
                }
            }
        }
    }

    /// A raw value (`null` counts as absent).
    pub fn get(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|v| !v.is_null())
    }

    /// A string value.
    pub fn str(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }

    /// A non-negative integer value.
    pub fn u64(&self, key: &str) -> Option<u64> {
        self.get(key).and_then(Value::as_u64)
    }

    /// The first of `keys` that is present (the converter's `find_hparam`), with that key.
    pub fn find<'k>(&self, keys: &[&'k str]) -> Option<(&'k str, &Value)> {
        keys.iter().find_map(|k| self.get(k).map(|v| (*k, v)))
    }

    /// The first of `keys` as a `u32`, with a typed error when present but not one.
    pub fn find_u32(&self, keys: &[&str]) -> Result<Option<u32>, ArchError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, v)) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| ArchError::BadHParam {
                    key: k.to_string(),
                    problem: format!("must be a non-negative 32-bit integer, found {v}"),
                }),
        }
    }

    /// Like [`HParams::find_u32`] but required.
    pub fn require_u32(&self, keys: &[&str]) -> Result<u32, ArchError> {
        self.find_u32(keys)?.ok_or_else(|| ArchError::BadHParam {
            key: keys.join(" / "),
            problem: "is missing".into(),
        })
    }

    /// `head_dim`, or `hidden_size / num_attention_heads` when the config has none (the
    /// converter's rule for Llama's rope dimension and rope factors).
    pub fn head_dim(&self) -> Result<u32, ArchError> {
        if let Some(d) = self.find_u32(&["head_dim"])? {
            return Ok(d);
        }
        let hidden = self.require_u32(&["hidden_size"])?;
        let heads = self.require_u32(&["num_attention_heads"])?;
        hidden
            .checked_div(heads)
            .ok_or_else(|| ArchError::BadHParam {
                key: "num_attention_heads".into(),
                problem: "must not be 0".into(),
            })
    }

    /// The first of `keys` as a number.
    pub fn find_f64(&self, keys: &[&str]) -> Result<Option<f64>, ArchError> {
        match self.find(keys) {
            None => Ok(None),
            Some((k, v)) => v.as_f64().map(Some).ok_or_else(|| ArchError::BadHParam {
                key: k.to_string(),
                problem: format!("must be a number, found {v}"),
            }),
        }
    }

    /// RoPE parameters as `TextModel.__init__` normalizes them: the `rope_parameters` block if the
    /// key exists (even as `null`), else `rope_scaling`, completed with the top-level theta,
    /// sliding-window theta, `type` → `rope_type`, partial rotary factor and original context,
    /// unless it is already split into `full_attention` / `sliding_attention` blocks.
    pub fn rope_parameters(&self) -> Map<String, Value> {
        let block = if self.map.contains_key("rope_parameters") {
            self.get("rope_parameters")
        } else {
            self.get("rope_scaling")
        };
        let mut p = block
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if p.contains_key("full_attention") || p.contains_key("sliding_attention") {
            return p;
        }
        let first = |keys: &[&str]| keys.iter().find_map(|k| self.get(k).cloned());
        if let Some(theta) = first(&[
            "local_rope_theta",
            "rope_local_theta",
            "rope_theta_local",
            "swa_rope_theta",
            "rope_local_base_freq",
        ]) {
            let mut swa = Map::new();
            swa.insert("rope_theta".into(), theta);
            p.insert("sliding_attention".into(), Value::Object(swa));
        }
        let fill = |p: &mut Map<String, Value>, key: &str, value: Option<Value>| {
            if !p.contains_key(key) {
                if let Some(v) = value {
                    p.insert(key.into(), v);
                }
            }
        };
        let theta = first(&[
            "global_rope_theta",
            "rope_global_theta",
            "rope_theta_global",
            "rope_theta",
            "rotary_emb_base",
        ]);
        fill(&mut p, "rope_theta", theta);
        let rope_type = p.get("type").cloned();
        fill(&mut p, "rope_type", rope_type);
        let partial = first(&["partial_rotary_factor", "rope_pct", "rope_percent"]);
        fill(&mut p, "partial_rotary_factor", partial);
        let orig = self.get("original_max_position_embeddings").cloned();
        fill(&mut p, "original_max_position_embeddings", orig);
        p
    }

    /// The block the shared writer reads scaling and `rope_theta` from: `full_attention` when the
    /// parameters are split per attention kind, else the whole block.
    pub fn rope_main(&self) -> Map<String, Value> {
        let p = self.rope_parameters();
        match p.get("full_attention") {
            Some(Value::Object(full)) => full.clone(),
            _ => p,
        }
    }

    /// The sliding-window layers' `rope_theta`, if the model has one.
    pub fn rope_swa_theta(&self) -> Option<f64> {
        self.rope_parameters()
            .get("sliding_attention")?
            .get("rope_theta")?
            .as_f64()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn llama_defaults() {
        let hp = HParams::from_config(&json!({
            "model_type": "llama", "hidden_size": 256, "num_attention_heads": 4,
            "rope_theta": 500000.0
        }))
        .unwrap();
        assert_eq!(hp.u64("head_dim"), Some(64));
        assert_eq!(hp.u64("num_key_value_heads"), Some(4));
        assert_eq!(
            hp.rope_parameters().get("rope_theta"),
            Some(&json!(500000.0))
        );
        assert_eq!(hp.find_f64(&["rms_norm_eps"]).unwrap(), Some(1e-6));
    }

    #[test]
    fn rope_parameters_forms() {
        let new = HParams::from_config(&json!({
            "model_type": "llama", "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}
        }))
        .unwrap();
        assert_eq!(
            new.rope_parameters().get("rope_theta"),
            Some(&json!(10000.0))
        );
        let old = HParams::from_config(&json!({
            "model_type": "llama", "rope_theta": 1000.0, "rope_scaling": {"type": "linear", "factor": 2.0}
        }))
        .unwrap();
        let p = old.rope_parameters();
        assert_eq!(p.get("rope_theta"), Some(&json!(1000.0)));
        assert_eq!(p.get("rope_type"), Some(&json!("linear")));
    }

    #[test]
    fn typed_errors() {
        let hp = HParams::from_config(&json!({"num_hidden_layers": -1})).unwrap();
        assert!(matches!(
            hp.find_u32(&["num_hidden_layers"]),
            Err(ArchError::BadHParam { .. })
        ));
        assert!(matches!(
            hp.require_u32(&["hidden_size"]),
            Err(ArchError::BadHParam { .. })
        ));
    }
}
