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

    /// Fills in what `LlamaConfig` / `MistralConfig` / `MixtralConfig` (transformers 4.57) would.
    fn apply_class_defaults(&mut self) {
        let model_type = self.str("model_type").unwrap_or("").to_string();
        let (rms_eps, ctx, theta, derive_head_dim) = match model_type.as_str() {
            "llama" => (1e-6, 2048, 10000.0, true),
            "mistral" => (1e-6, 4096 * 32, 10000.0, true),
            "mixtral" => (1e-5, 4096 * 32, 1e6, false),
            _ => return,
        };
        let set_default = |map: &mut Map<String, Value>, k: &str, v: Value| {
            if map.get(k).is_none_or(Value::is_null) {
                map.insert(k.to_string(), v);
            }
        };
        set_default(&mut self.map, "rms_norm_eps", Value::from(rms_eps));
        set_default(&mut self.map, "max_position_embeddings", Value::from(ctx));
        if self.rope_parameters().get("rope_theta").is_none() {
            set_default(&mut self.map, "rope_theta", Value::from(theta));
        }
        if let Some(heads) = self.u64("num_attention_heads") {
            set_default(&mut self.map, "num_key_value_heads", Value::from(heads));
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

    /// RoPE parameters: the newer `rope_parameters` block, else the older `rope_scaling`, with a
    /// top-level `rope_theta` and `type` → `rope_type` folded in, as the converter normalizes them.
    pub fn rope_parameters(&self) -> Map<String, Value> {
        let mut p = self
            .get("rope_parameters")
            .or_else(|| self.get("rope_scaling"))
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default();
        if p.get("rope_theta").is_none() {
            if let Some(theta) = self.get("rope_theta") {
                p.insert("rope_theta".into(), theta.clone());
            }
        }
        if p.get("rope_type").is_none() {
            if let Some(t) = p.get("type").cloned() {
                p.insert("rope_type".into(), t);
            }
        }
        p
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
