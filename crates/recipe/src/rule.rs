//! Compiled rules.

use globset::{Glob, GlobSet, GlobSetBuilder};
use kiln_types::MetaValue;

use regex::Regex;

use crate::raw::{ImatrixUse, LayersSpec, MetadataSection, RuleSection};
use crate::{GeneralMetadata, RecipeError, TypeChoice};

/// What rules can see of one tensor.
#[derive(Debug, Clone, Copy)]
pub struct TensorNames<'a> {
    /// Name in the checkpoint (for GGUF inputs, the GGUF name).
    pub hf: &'a str,
    /// Name in the GGUF output.
    pub gguf: &'a str,
    /// Layer (block) number, if the tensor belongs to one.
    pub layer: Option<u32>,
    /// Output dimensions, fastest first (empty when unknown).
    pub ne: &'a [u64],
}

/// What rules can see of the model.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ModelFacts {
    /// Number of blocks.
    pub block_count: u32,
    /// `n_head / n_head_kv` of the first layer (1 without grouped-query attention).
    pub gqa: u32,
    /// Number of experts (0 for dense models).
    pub experts: u32,
    /// Whether there is no `output.weight` (the output reuses the token embedding).
    pub tied_embeddings: bool,
    /// Whether an importance matrix is in use.
    pub imatrix: bool,
}

/// An integer expression in `n`: `7*n/8`, `n/16`, `2`. Evaluated left to right with C's
/// truncating division, as llama.cpp writes these bounds.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Expr(Vec<(char, Term)>);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Term {
    N,
    Int(u64),
}

impl Expr {
    fn parse(s: &str) -> Option<Expr> {
        let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        if s.is_empty() {
            return None;
        }
        let mut out = Vec::new();
        let mut op = '*';
        let mut rest = s.as_str();
        loop {
            let end = rest.find(['*', '/']).unwrap_or(rest.len());
            let term = match &rest[..end] {
                "n" => Term::N,
                digits => Term::Int(digits.parse().ok()?),
            };
            out.push((op, term));
            if end == rest.len() {
                break;
            }
            op = rest[end..].chars().next()?;
            rest = &rest[end + 1..];
        }
        Some(Expr(out))
    }

    fn eval(&self, n: u64) -> u64 {
        self.0.iter().fold(1u64, |acc, &(op, term)| {
            let v = match term {
                Term::N => n,
                Term::Int(i) => i,
            };
            match op {
                '/' => acc.checked_div(v).unwrap_or(0),
                _ => acc.saturating_mul(v),
            }
        })
    }
}

/// A set of layer numbers (or ordinals), possibly relative to a count `n`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSet(LayerSetKind);

#[derive(Debug, Clone, PartialEq, Eq)]
enum LayerSetKind {
    /// `start..end`, end excluded; `None` is unbounded.
    Range { start: Expr, end: Option<Expr> },
    /// Explicit numbers.
    List(Vec<u32>),
    /// llama.cpp's `use_more_bits(i, n)`.
    MoreBits,
}

/// llama.cpp's `use_more_bits`: the first and last eighth of the layers, and every third layer in
/// between.
pub fn use_more_bits(i: u64, n: u64) -> bool {
    // Short-circuiting keeps `i - n / 8` from underflowing.
    i < n / 8 || i >= 7 * n / 8 || (i - n / 8) % 3 == 2
}

impl LayerSet {
    /// Whether `i` is in the set, for a count of `n`.
    pub fn contains(&self, i: u32, n: u32) -> bool {
        let (i, n) = (u64::from(i), u64::from(n));
        match &self.0 {
            LayerSetKind::Range { start, end } => {
                i >= start.eval(n) && end.as_ref().is_none_or(|e| i < e.eval(n))
            }
            LayerSetKind::List(v) => v.iter().any(|&x| u64::from(x) == i),
            LayerSetKind::MoreBits => use_more_bits(i, n),
        }
    }

    pub(crate) fn parse(spec: &LayersSpec) -> Option<LayerSet> {
        let kind = match spec {
            LayersSpec::List(v) if !v.is_empty() => LayerSetKind::List(v.clone()),
            LayersSpec::List(_) => return None,
            LayersSpec::Range(s) => {
                let s = s.trim();
                if s == "more-bits" {
                    LayerSetKind::MoreBits
                } else if let Some((a, b)) = s.split_once("..=") {
                    let start = if a.trim().is_empty() {
                        Expr(vec![('*', Term::Int(0))])
                    } else {
                        Expr::parse(a)?
                    };
                    let mut end = Expr::parse(b)?;
                    // `a..=b` is `a..b+1`; only plain numbers may be inclusive ends.
                    let [(_, Term::Int(last))] = end.0.as_slice() else {
                        return None;
                    };
                    end = Expr(vec![('*', Term::Int(last.checked_add(1)?))]);
                    LayerSetKind::Range {
                        start,
                        end: Some(end),
                    }
                } else if let Some((a, b)) = s.split_once("..") {
                    let start = if a.trim().is_empty() {
                        Expr(vec![('*', Term::Int(0))])
                    } else {
                        Expr::parse(a)?
                    };
                    let end = if b.trim().is_empty() {
                        None
                    } else {
                        Some(Expr::parse(b)?)
                    };
                    LayerSetKind::Range { start, end }
                } else {
                    let n: u64 = s.parse().ok()?;
                    LayerSetKind::Range {
                        start: Expr(vec![('*', Term::Int(n))]),
                        end: Some(Expr(vec![('*', Term::Int(n.checked_add(1)?))])),
                    }
                }
            }
        };
        // Constant ranges must not be empty (a typo such as "4..2"); ranges in `n` may be empty
        // for small models by design.
        if let LayerSetKind::Range {
            start,
            end: Some(end),
        } = &kind
        {
            let constant = |e: &Expr| e.0.iter().all(|(_, t)| matches!(t, Term::Int(_)));
            if constant(start) && constant(end) && start.eval(0) >= end.eval(0) {
                return None;
            }
        }
        Some(LayerSet(kind))
    }
}

/// Conditions on the model.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct When {
    gqa_min: Option<u32>,
    gqa_max: Option<u32>,
    experts: Option<u32>,
    experts_min: Option<u32>,
    block_count: Option<u32>,
    imatrix: Option<bool>,
    tied_embeddings: Option<bool>,
    expert_tensor: Option<bool>,
    default_fits: Option<bool>,
}

impl When {
    fn holds(&self, t: &TensorNames<'_>, m: &ModelFacts, default_block: u64) -> bool {
        let expert_tensor = t.ne.len() >= 3 && t.ne[2] > 1;
        let fits =
            t.ne.first()
                .is_none_or(|ne0| ne0 % default_block.max(1) == 0);
        self.gqa_min.is_none_or(|v| m.gqa >= v)
            && self.gqa_max.is_none_or(|v| m.gqa <= v)
            && self.experts.is_none_or(|v| m.experts == v)
            && self.experts_min.is_none_or(|v| m.experts >= v)
            && self.block_count.is_none_or(|v| m.block_count == v)
            && self.imatrix.is_none_or(|v| m.imatrix == v)
            && self.tied_embeddings.is_none_or(|v| m.tied_embeddings == v)
            && self.expert_tensor.is_none_or(|v| expert_tensor == v)
            && self.default_fits.is_none_or(|v| fits == v)
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
    /// Whether matching tensors use the importance matrix.
    pub use_imatrix: bool,
    /// Whether `quantize.require-imatrix` applies to matching tensors.
    pub imatrix_required: bool,
    /// Whether the fallback table applies to matching tensors.
    pub fallback: bool,
    /// Packed-type options for matching tensors.
    pub packed: crate::packed::PackedOptions,
    gguf_globs: Option<GlobSet>,
    hf_globs: Option<GlobSet>,
    gguf_regex: Option<Regex>,
    hf_regex: Option<Regex>,
    layers: Option<LayerSet>,
    nth: Option<LayerSet>,
    when: When,
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

fn layer_set(rule: usize, spec: &Option<LayersSpec>) -> Result<Option<LayerSet>, RecipeError> {
    spec.as_ref()
        .map(|spec| {
            LayerSet::parse(spec).ok_or_else(|| RecipeError::BadLayers {
                rule,
                layers: match spec {
                    LayersSpec::Range(s) => s.clone(),
                    LayersSpec::List(v) => format!("{v:?}"),
                },
            })
        })
        .transpose()
}

impl Rule {
    pub(crate) fn compile(
        index: usize,
        raw: RuleSection,
        packed_default: crate::packed::PackedOptions,
    ) -> Result<Rule, RecipeError> {
        let packed = raw
            .packed_fields()
            .resolve(packed_default, &format!("rules[{index}]"))?;
        let choice = TypeChoice::parse(&raw.type_).ok_or_else(|| RecipeError::UnknownType {
            context: format!("rules[{index}].type"),
            name: raw.type_.clone(),
        })?;
        if raw.tensors.is_none()
            && raw.hf_tensors.is_none()
            && raw.regex.is_none()
            && raw.hf_regex.is_none()
            && raw.layers.is_none()
            && raw.nth.is_none()
            && raw.when.is_none()
        {
            return Err(RecipeError::EmptySelector { rule: index });
        }
        let w = raw.when.unwrap_or_default();
        let (use_imatrix, imatrix_required) = match &raw.imatrix {
            None | Some(ImatrixUse::Flag(true)) => (true, true),
            Some(ImatrixUse::Flag(false)) => (false, false),
            Some(ImatrixUse::Word(w)) if w == "optional" => (true, false),
            Some(ImatrixUse::Word(w)) => {
                return Err(RecipeError::BadValue {
                    context: format!("rules[{index}].imatrix"),
                    value: w.clone(),
                    expected: "true, false or \"optional\"".into(),
                })
            }
        };
        Ok(Rule {
            index,
            label: raw.label.unwrap_or_else(|| format!("rules[{index}]")),
            choice,
            use_imatrix,
            imatrix_required,
            fallback: raw.fallback.unwrap_or(true),
            packed,
            gguf_globs: raw.tensors.map(|g| globs(index, &g.to_vec())).transpose()?,
            hf_globs: raw
                .hf_tensors
                .map(|g| globs(index, &g.to_vec()))
                .transpose()?,
            gguf_regex: raw.regex.map(|r| regex(index, &r)).transpose()?,
            hf_regex: raw.hf_regex.map(|r| regex(index, &r)).transpose()?,
            layers: layer_set(index, &raw.layers)?,
            nth: layer_set(index, &raw.nth)?,
            when: When {
                gqa_min: w.gqa_min,
                gqa_max: w.gqa_max,
                experts: w.experts,
                experts_min: w.experts_min,
                block_count: w.block_count,
                imatrix: w.imatrix,
                tied_embeddings: w.tied_embeddings,
                expert_tensor: w.expert_tensor,
                default_fits: w.default_fits,
            },
        })
    }

    /// Whether the rule's name selectors (globs and regexes) match.
    pub fn name_matches(&self, t: &TensorNames<'_>) -> bool {
        self.gguf_globs.as_ref().is_none_or(|g| g.is_match(t.gguf))
            && self.hf_globs.as_ref().is_none_or(|g| g.is_match(t.hf))
            && self.gguf_regex.as_ref().is_none_or(|r| r.is_match(t.gguf))
            && self.hf_regex.as_ref().is_none_or(|r| r.is_match(t.hf))
    }

    /// Whether the rule uses ordinal selection (`nth`).
    pub fn uses_ordinals(&self) -> bool {
        self.nth.is_some()
    }

    /// Whether every selector and condition holds. `ordinal` is the tensor's position and the
    /// count among tensors matching this rule's names (needed only when [`Rule::uses_ordinals`]).
    pub fn matches(
        &self,
        t: &TensorNames<'_>,
        model: &ModelFacts,
        ordinal: Option<(u32, u32)>,
        default_block: u64,
    ) -> bool {
        self.name_matches(t)
            && self
                .layers
                .as_ref()
                .is_none_or(|l| t.layer.is_some_and(|i| l.contains(i, model.block_count)))
            && self
                .nth
                .as_ref()
                .is_none_or(|s| ordinal.is_some_and(|(i, n)| s.contains(i, n)))
            && self.when.holds(t, model, default_block)
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
