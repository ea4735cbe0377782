//! Compiled rules.

use globset::{Glob, GlobSet, GlobSetBuilder};
use kiln_types::MetaValue;
use regex::Regex;

use crate::raw::{LayersSpec, MetadataSection, RuleSection};
use crate::{GeneralMetadata, RecipeError, TypeChoice};

/// The names a rule can match a tensor by.
#[derive(Debug, Clone, Copy)]
pub struct TensorNames<'a> {
    /// Name in the checkpoint.
    pub hf: &'a str,
    /// Name in the GGUF output.
    pub gguf: &'a str,
    /// Layer (block) number, if the tensor belongs to one.
    pub layer: Option<u32>,
}

/// A set of layer numbers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LayerSet {
    /// `start..end`, end excluded; `None` is unbounded.
    Range {
        /// First layer.
        start: u32,
        /// One past the last layer, or unbounded.
        end: Option<u32>,
    },
    /// Explicit layers.
    List(Vec<u32>),
}

impl LayerSet {
    /// Whether `layer` is in the set.
    pub fn contains(&self, layer: u32) -> bool {
        match self {
            LayerSet::Range { start, end } => layer >= *start && end.is_none_or(|e| layer < e),
            LayerSet::List(v) => v.contains(&layer),
        }
    }

    pub(crate) fn parse(spec: &LayersSpec) -> Option<LayerSet> {
        match spec {
            LayersSpec::List(v) if !v.is_empty() => Some(LayerSet::List(v.clone())),
            LayersSpec::List(_) => None,
            LayersSpec::Range(s) => {
                let s = s.trim();
                if let Some((a, b)) = s.split_once("..=") {
                    let (a, b) = (a.trim().parse().ok()?, b.trim().parse::<u32>().ok()?);
                    (a <= b).then_some(LayerSet::Range {
                        start: a,
                        end: Some(b.checked_add(1)?),
                    })
                } else if let Some((a, b)) = s.split_once("..") {
                    let a = a.trim().parse().ok()?;
                    if b.trim().is_empty() {
                        return Some(LayerSet::Range {
                            start: a,
                            end: None,
                        });
                    }
                    let b = b.trim().parse().ok()?;
                    (a < b).then_some(LayerSet::Range {
                        start: a,
                        end: Some(b),
                    })
                } else {
                    let n: u32 = s.parse().ok()?;
                    Some(LayerSet::Range {
                        start: n,
                        end: Some(n.checked_add(1)?),
                    })
                }
            }
        }
    }
}

/// A validated rule.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Position in the recipe (0-based).
    pub index: usize,
    /// `label`, or `rules[N]`.
    pub label: String,
    /// What the rule asks for.
    pub choice: TypeChoice,
    gguf_globs: Option<GlobSet>,
    hf_globs: Option<GlobSet>,
    gguf_regex: Option<Regex>,
    hf_regex: Option<Regex>,
    layers: Option<LayerSet>,
}

fn globs(rule: usize, patterns: &[String]) -> Result<GlobSet, RecipeError> {
    let mut b = GlobSetBuilder::new();
    for p in patterns {
        let g = Glob::new(p).map_err(|e| RecipeError::BadGlob {
            rule,
            glob: p.clone(),
            message: e.kind().to_string(),
        })?;
        b.add(g);
    }
    b.build().map_err(|e| RecipeError::BadGlob {
        rule,
        glob: patterns.join(", "),
        message: e.to_string(),
    })
}

fn regex(rule: usize, pattern: &str) -> Result<Regex, RecipeError> {
    Regex::new(pattern).map_err(|e| RecipeError::BadRegex {
        rule,
        regex: pattern.to_string(),
        message: e.to_string(),
    })
}

impl Rule {
    pub(crate) fn compile(index: usize, raw: RuleSection) -> Result<Rule, RecipeError> {
        let choice = TypeChoice::parse(&raw.type_).ok_or_else(|| RecipeError::UnknownType {
            context: format!("rules[{index}].type"),
            name: raw.type_.clone(),
        })?;
        if raw.tensors.is_none()
            && raw.hf_tensors.is_none()
            && raw.regex.is_none()
            && raw.hf_regex.is_none()
            && raw.layers.is_none()
        {
            return Err(RecipeError::EmptySelector { rule: index });
        }
        let layers = match &raw.layers {
            Some(spec) => Some(LayerSet::parse(spec).ok_or_else(|| RecipeError::BadLayers {
                rule: index,
                layers: match spec {
                    LayersSpec::Range(s) => s.clone(),
                    LayersSpec::List(v) => format!("{v:?}"),
                },
            })?),
            None => None,
        };
        Ok(Rule {
            index,
            label: raw.label.unwrap_or_else(|| format!("rules[{index}]")),
            choice,
            gguf_globs: raw.tensors.map(|g| globs(index, &g.to_vec())).transpose()?,
            hf_globs: raw
                .hf_tensors
                .map(|g| globs(index, &g.to_vec()))
                .transpose()?,
            gguf_regex: raw.regex.map(|r| regex(index, &r)).transpose()?,
            hf_regex: raw.hf_regex.map(|r| regex(index, &r)).transpose()?,
            layers,
        })
    }

    /// Whether every selector of the rule matches the tensor.
    pub fn matches(&self, t: &TensorNames<'_>) -> bool {
        self.gguf_globs.as_ref().is_none_or(|g| g.is_match(t.gguf))
            && self.hf_globs.as_ref().is_none_or(|g| g.is_match(t.hf))
            && self.gguf_regex.as_ref().is_none_or(|r| r.is_match(t.gguf))
            && self.hf_regex.as_ref().is_none_or(|r| r.is_match(t.hf))
            && self
                .layers
                .as_ref()
                .is_none_or(|l| t.layer.is_some_and(|n| l.contains(n)))
    }
}

impl MetadataSection {
    pub(crate) fn validate(self) -> Result<GeneralMetadata, RecipeError> {
        // The order is that of gguf-py's `Metadata.set_gguf_meta_model`, so a recipe that sets the
        // same keys as the converter gets the same KV order.
        let strings: Vec<(String, String)> = [
            ("general.name", self.name),
            ("general.author", self.author),
            ("general.version", self.version),
            ("general.organization", self.organization),
            ("general.finetune", self.finetune),
            ("general.basename", self.basename),
            ("general.description", self.description),
            ("general.quantized_by", self.quantized_by),
            ("general.size_label", self.size_label),
            ("general.license", self.license),
            ("general.url", self.url),
            ("general.repo_url", self.repo_url),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
        let string_arrays = [
            ("general.tags", self.tags),
            ("general.languages", self.languages),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.map(|v| (k.to_string(), v)))
        .collect();
        let mut extra = Vec::new();
        for (key, value) in self.extra {
            if key.is_empty() {
                return Err(RecipeError::BadMetadata(
                    "empty key in metadata.extra".into(),
                ));
            }
            extra.push((key.clone(), extra_value(&key, &value)?));
        }
        Ok(GeneralMetadata {
            strings,
            string_arrays,
            extra,
        })
    }
}

fn extra_value(key: &str, value: &toml::Value) -> Result<MetaValue, RecipeError> {
    let bad = |why: &str| RecipeError::BadMetadata(format!("metadata.extra.\"{key}\": {why}"));
    Ok(match value {
        toml::Value::String(s) => MetaValue::String(s.clone()),
        toml::Value::Boolean(b) => MetaValue::Bool(*b),
        toml::Value::Table(t) if t.len() == 1 => {
            let (ty, v) = t.iter().next().ok_or_else(|| bad("empty table"))?;
            let int = || v.as_integer().ok_or_else(|| bad("expected an integer"));
            let float = || {
                v.as_float()
                    .or_else(|| v.as_integer().map(|i| i as f64))
                    .ok_or_else(|| bad("expected a number"))
            };
            let range = |_| bad("integer out of range for its type");
            match ty.as_str() {
                "u8" => MetaValue::U8(int()?.try_into().map_err(range)?),
                "i8" => MetaValue::I8(int()?.try_into().map_err(range)?),
                "u16" => MetaValue::U16(int()?.try_into().map_err(range)?),
                "i16" => MetaValue::I16(int()?.try_into().map_err(range)?),
                "u32" => MetaValue::U32(int()?.try_into().map_err(range)?),
                "i32" => MetaValue::I32(int()?.try_into().map_err(range)?),
                "u64" => MetaValue::U64(int()?.try_into().map_err(range)?),
                "i64" => MetaValue::I64(int()?),
                "f32" => MetaValue::F32(float()? as f32),
                "f64" => MetaValue::F64(float()?),
                other => return Err(bad(&format!("unknown GGUF type `{other}`"))),
            }
        }
        _ => {
            return Err(bad(
                "expected a string, a boolean, or a table such as { u32 = 5 }",
            ))
        }
    })
}
