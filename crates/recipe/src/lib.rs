//! The kiln recipe: what to build, as a strict TOML file, and the validated [`Recipe`] it becomes.
//!
//! Parsing has two phases. [`raw::RecipeFile`] is what the user wrote (every struct rejects
//! unknown keys, every field is documented); [`Recipe::from_toml`] validates it into a [`Recipe`]:
//! type names resolved, globs and regexes compiled, layer ranges checked, paths resolved against
//! the recipe's folder. Nothing touches the model until that succeeds.
//!
//! A recipe decides a type per tensor with [`Recipe::assign`]: the first [`Rule`] whose selectors
//! and conditions all hold wins, else the default. (Architecture constraints, such as norms staying F32, and
//! block-size fallbacks are applied afterwards by the pipeline and reported as such.)
//!
//! Command-line values override recipe values ([`Overrides`]); see `docs/recipes.md`.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod error;
pub mod packed;
pub mod presets;
pub mod raw;
mod rule;

use std::path::{Path, PathBuf};

use kiln_types::{FileType, GgmlType};

pub use error::RecipeError;
pub use packed::{EstimatorChoice, Method, OutputFormat, PackedOptions, PackedType};
pub use rule::{use_more_bits, LayerSet, ModelFacts, Rule, TensorNames};

/// The recipe format version this kiln reads.
pub const RECIPE_VERSION: u32 = 1;

/// What a rule or the default asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeChoice {
    /// Store the tensor in this ggml type.
    Type(GgmlType),
    /// Keep the source's own type (bytes copied when nothing else changes them).
    Keep,
    /// The recipe's default type (a rule that says "no change from the default").
    Default,
    /// A packed safetensors type (compressed-tensors integers, bitsandbytes NF4/FP4).
    Packed(PackedType),
}

impl TypeChoice {
    /// Parses `keep` or a ggml type name, ignoring case.
    pub fn parse(s: &str) -> Option<TypeChoice> {
        if s.eq_ignore_ascii_case("keep") {
            return Some(TypeChoice::Keep);
        }
        if s.eq_ignore_ascii_case("default") {
            return Some(TypeChoice::Default);
        }
        GgmlType::from_name(s)
            .map(TypeChoice::Type)
            .or_else(|| PackedType::parse(s).map(TypeChoice::Packed))
    }
}

impl std::fmt::Display for TypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeChoice::Type(t) => write!(f, "{t}"),
            TypeChoice::Keep => f.write_str("keep"),
            TypeChoice::Default => f.write_str("default"),
            TypeChoice::Packed(p) => write!(f, "{p}"),
        }
    }
}

/// `general.*` metadata the recipe sets, in the order llama.cpp's converter writes those keys.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneralMetadata {
    /// `(key, value)` pairs for string keys (`general.name`, ...), in writing order.
    pub strings: Vec<(String, String)>,
    /// `general.tags`, `general.languages`.
    pub string_arrays: Vec<(String, Vec<String>)>,
    /// Extra keys of any name, appended after everything else.
    pub extra: Vec<(String, kiln_types::MetaValue)>,
}

impl GeneralMetadata {
    /// The value of a string key such as `general.name`.
    pub fn string(&self, key: &str) -> Option<&str> {
        self.strings
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Values given on the command line, which take precedence over the recipe's.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Overrides {
    /// `--input`.
    pub input: Option<PathBuf>,
    /// `--output`.
    pub output: Option<PathBuf>,
    /// `--imatrix`.
    pub imatrix: Option<PathBuf>,
    /// `--calibration`.
    pub calibration: Option<PathBuf>,
    /// `--split-max-tensors`.
    pub split_max_tensors: Option<usize>,
    /// `--split-max-size`.
    pub split_max_size: Option<String>,
}

/// A validated recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    /// Where the recipe came from (`None` for recipes built in code, e.g. by `kiln convert`).
    pub source: Option<PathBuf>,
    /// The checkpoint to read.
    pub input: Option<PathBuf>,
    /// The artifact to write.
    pub output: Option<PathBuf>,
    /// Type for tensors no rule matches.
    pub default: TypeChoice,
    /// `general.file_type` to record; `None` derives it from `default`.
    pub file_type: Option<FileType>,
    /// Per-tensor rules, first match wins.
    pub rules: Vec<Rule>,
    /// GGUF alignment.
    pub alignment: u64,
    /// `general.*` metadata to set.
    pub metadata: GeneralMetadata,
    /// The importance matrix file.
    pub imatrix: Option<PathBuf>,
    /// Keep only imatrix entries whose names contain one of these.
    pub imatrix_include: Vec<String>,
    /// Drop imatrix entries whose names contain one of these.
    pub imatrix_exclude: Vec<String>,
    /// Types that need importance data.
    pub require_imatrix: Vec<GgmlType>,
    /// Whether already-quantized inputs may be requantized.
    pub allow_requantize: bool,
    /// Shape fallbacks, `(type, fallback)`.
    pub fallbacks: Vec<(GgmlType, GgmlType)>,
    /// Whether to record provenance (`kiln.*` keys and a manifest).
    pub provenance: bool,
    /// What kind of artifact is built.
    pub format: OutputFormat,
    /// Packed outputs: the largest shard, as written (`5G`).
    pub max_shard_size: Option<String>,
    /// The activation statistics file for calibration-aware methods.
    pub calibration: Option<PathBuf>,
    /// Packed-type options of the default (and the base of every rule's).
    pub packed_default: PackedOptions,
    /// The recipe as written (kept to record and rebuild it).
    pub raw: raw::RecipeFile,
}

/// Per tensor, its (position, count) among the tensors a rule's names match, if it is one.
type Ordinals = Vec<Option<(u32, u32)>>;

/// The decision for one tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Assignment {
    /// The rule that matched, if any.
    pub rule: Option<usize>,
    /// The requested type (`Default` already resolved to the recipe's default).
    pub choice: TypeChoice,
    /// Whether the importance matrix applies.
    pub use_imatrix: bool,
    /// Whether `require_imatrix` applies.
    pub imatrix_required: bool,
    /// Whether the fallback table applies.
    pub fallback: bool,
    /// Packed-type options (method, estimator, group size, …).
    pub packed: PackedOptions,
}

impl Recipe {
    /// Reads and validates a recipe file. Relative paths inside it are relative to its folder.
    pub fn load(path: &Path) -> Result<Recipe, RecipeError> {
        let text = std::fs::read_to_string(path).map_err(|e| RecipeError::Io {
            path: path.to_path_buf(),
            source: e,
        })?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut recipe = Recipe::from_toml(&text, base).map_err(|e| e.in_file(path))?;
        recipe.source = Some(path.to_path_buf());
        Ok(recipe)
    }

    /// Validates recipe text; relative paths are resolved against `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<Recipe, RecipeError> {
        let raw: raw::RecipeFile = toml::from_str(text).map_err(RecipeError::from_toml)?;
        Recipe::from_raw(raw, base)
    }

    /// Validates a parsed recipe.
    pub fn from_raw(raw: raw::RecipeFile, base: &Path) -> Result<Recipe, RecipeError> {
        let original = raw.clone();
        if raw.kiln != RECIPE_VERSION {
            return Err(RecipeError::UnsupportedVersion(raw.kiln));
        }
        let resolve = |p: PathBuf| if p.is_absolute() { p } else { base.join(p) };
        let default =
            TypeChoice::parse(&raw.quantize.default).ok_or_else(|| RecipeError::UnknownType {
                context: "quantize.default".into(),
                name: raw.quantize.default.clone(),
            })?;
        let file_type = match &raw.quantize.file_type {
            Some(name) => Some(
                FileType::from_name(name)
                    .ok_or_else(|| RecipeError::UnknownFileType { name: name.clone() })?,
            ),
            None => None,
        };
        let format = match raw.output.as_ref().and_then(|o| o.format.as_deref()) {
            None => OutputFormat::Gguf,
            Some(f) => OutputFormat::parse(f).ok_or_else(|| RecipeError::BadValue {
                context: "output.format".into(),
                value: f.to_string(),
                expected: "gguf, compressed-tensors or bitsandbytes".into(),
            })?,
        };
        if format == OutputFormat::Gguf {
            check_gguf_fields("quantize", &raw.quantize.packed_fields())?;
            for (i, r) in raw.rules.iter().enumerate() {
                check_gguf_fields(&format!("rules[{i}]"), &r.packed_fields())?;
            }
        }
        let packed_default = raw
            .quantize
            .packed_fields()
            .resolve(PackedOptions::default(), "quantize")?;
        let rules = raw
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(i, r, packed_default))
            .collect::<Result<Vec<_>, _>>()?;
        let calibration = raw.calibration.as_ref().map(|c| resolve(c.stats.clone()));
        let choices = std::iter::once(("quantize.default".to_string(), default, packed_default))
            .chain(
                rules
                    .iter()
                    .map(|r| (format!("rules[{}].type", r.index), r.choice, r.packed)),
            );
        // Whether a method finds its statistics is checked when the build is planned: the file
        // may come from `--calibration`, and only the tensors a method applies to need it.
        for (context, choice, options) in choices {
            check_choice(format, &context, choice)?;
            if let TypeChoice::Packed(p @ (PackedType::Nf4 | PackedType::Fp4)) = choice {
                if options.static_input_int8 {
                    return Err(RecipeError::Conflict(format!(
                        "{context}: input-activations = \"int8\" is a compressed-tensors scheme; \
                         {p} weights keep their activations in floating point"
                    )));
                }
            }
        }
        let type_list = |context: &str, names: &[String]| -> Result<Vec<GgmlType>, RecipeError> {
            names
                .iter()
                .map(|n| {
                    GgmlType::from_name(n).ok_or_else(|| RecipeError::UnknownType {
                        context: context.to_string(),
                        name: n.clone(),
                    })
                })
                .collect()
        };
        let require_imatrix = type_list("quantize.require-imatrix", &raw.quantize.require_imatrix)?;
        let mut fallbacks = Vec::new();
        for (from, to) in &raw.fallback {
            let from_ty = type_list("fallback", std::slice::from_ref(from))?[0];
            let to_ty = type_list(&format!("fallback.{from}"), std::slice::from_ref(to))?[0];
            fallbacks.push((from_ty, to_ty));
        }
        if !raw.quantize.imatrix_include.is_empty() && !raw.quantize.imatrix_exclude.is_empty() {
            return Err(RecipeError::Conflict(
                "quantize.imatrix-include and quantize.imatrix-exclude cannot both be set".into(),
            ));
        }
        let alignment = raw.output.as_ref().and_then(|o| o.alignment).unwrap_or(32);
        let provenance = raw
            .output
            .as_ref()
            .and_then(|o| o.provenance)
            .unwrap_or(true);
        if alignment == 0 || !alignment.is_power_of_two() || alignment % 8 != 0 {
            return Err(RecipeError::InvalidAlignment(alignment));
        }
        Ok(Recipe {
            source: None,
            input: raw.input.map(|i| resolve(i.path)),
            output: raw.output.and_then(|o| o.path).map(resolve),
            default,
            file_type,
            rules,
            alignment,
            metadata: raw.metadata.unwrap_or_default().validate()?,
            imatrix: raw.quantize.imatrix.map(resolve),
            imatrix_include: raw.quantize.imatrix_include,
            imatrix_exclude: raw.quantize.imatrix_exclude,
            require_imatrix,
            allow_requantize: raw.quantize.allow_requantize,
            fallbacks,
            provenance,
            format,
            max_shard_size: original
                .output
                .as_ref()
                .and_then(|o| o.max_shard_size.clone()),
            calibration,
            packed_default,
            raw: original,
        })
    }

    /// A recipe with a default type and no rules, as `kiln convert` uses.
    pub fn plain(default: TypeChoice) -> Recipe {
        let raw = raw::RecipeFile {
            kiln: RECIPE_VERSION,
            input: None,
            output: None,
            quantize: raw::QuantizeSection {
                default: default.to_string(),
                file_type: None,
                imatrix: None,
                imatrix_include: Vec::new(),
                imatrix_exclude: Vec::new(),
                require_imatrix: Vec::new(),
                allow_requantize: false,
                method: None,
                estimator: None,
                group_size: None,
                symmetric: None,
                double_quant: None,
                act_order: None,
                input_activations: None,
                activation_estimator: None,
            },
            rules: Vec::new(),
            calibration: None,
            metadata: None,
            fallback: Default::default(),
        };
        Recipe {
            source: None,
            input: None,
            output: None,
            default,
            file_type: None,
            rules: Vec::new(),
            alignment: 32,
            metadata: GeneralMetadata::default(),
            imatrix: None,
            imatrix_include: Vec::new(),
            imatrix_exclude: Vec::new(),
            require_imatrix: Vec::new(),
            allow_requantize: false,
            fallbacks: Vec::new(),
            provenance: true,
            format: OutputFormat::Gguf,
            max_shard_size: None,
            calibration: None,
            packed_default: PackedOptions::default(),
            raw,
        }
    }

    /// Sets `general.name` (as `[metadata] name` would).
    pub fn set_name(&mut self, name: &str) {
        self.metadata.strings.retain(|(k, _)| k != "general.name");
        self.metadata
            .strings
            .insert(0, ("general.name".into(), name.to_string()));
        self.raw.metadata.get_or_insert_with(Default::default).name = Some(name.to_string());
    }

    /// Allows requantizing already-quantized inputs (as `quantize.allow-requantize` would).
    pub fn set_allow_requantize(&mut self, allow: bool) {
        self.allow_requantize = allow;
        self.raw.quantize.allow_requantize = allow;
    }

    /// The recipe as canonical JSON without anything that depends on where files are: input,
    /// output and imatrix paths are left out (the manifest records inputs by content instead).
    /// Equal recipes give equal text, whatever the working directory or file locations.
    pub fn normalized(&self) -> String {
        let mut raw = self.raw.clone();
        raw.input = None;
        if let Some(out) = raw.output.as_mut() {
            out.path = None;
        }
        raw.quantize.imatrix = None;
        raw.calibration = None;
        serde_json::to_string(&raw).unwrap_or_default()
    }

    /// Applies command-line overrides (they win over the recipe).
    pub fn with_overrides(mut self, overrides: &Overrides) -> Recipe {
        if let Some(p) = &overrides.input {
            self.input = Some(p.clone());
        }
        if let Some(p) = &overrides.output {
            self.output = Some(p.clone());
        }
        if let Some(p) = &overrides.imatrix {
            self.imatrix = Some(p.clone());
        }
        if let Some(p) = &overrides.calibration {
            self.calibration = Some(p.clone());
        }
        // Splitting changes the output bytes, so it is part of the recorded recipe.
        if overrides.split_max_tensors.is_some() || overrides.split_max_size.is_some() {
            let out = self.raw.output.get_or_insert(raw::OutputSection {
                path: None,
                alignment: None,
                provenance: None,
                split_max_tensors: None,
                split_max_size: None,
                format: None,
                max_shard_size: None,
            });
            out.split_max_tensors = overrides.split_max_tensors;
            out.split_max_size = overrides.split_max_size.clone();
        }
        self
    }

    /// The split setting: at most this many tensors, or at most this size, per shard.
    pub fn split(&self) -> (Option<usize>, Option<&str>) {
        let out = self.raw.output.as_ref();
        (
            out.and_then(|o| o.split_max_tensors),
            out.and_then(|o| o.split_max_size.as_deref()),
        )
    }

    /// The fallback listed for `ty`, if any.
    pub fn fallback_for(&self, ty: GgmlType) -> Option<GgmlType> {
        self.fallbacks
            .iter()
            .find(|(from, _)| *from == ty)
            .map(|(_, to)| *to)
    }

    /// Decides every tensor: the first rule whose selectors and conditions hold, else the
    /// default. `tensors` may be in any order; ordinals (`nth`) are counted in llama.cpp's order
    /// (block number, then name, tensors outside blocks first), so the result does not depend on
    /// the order given.
    pub fn assign(&self, tensors: &[TensorNames<'_>], model: &ModelFacts) -> Vec<Assignment> {
        let mut order: Vec<usize> = (0..tensors.len()).collect();
        order.sort_by(|&a, &b| {
            let (ta, tb) = (&tensors[a], &tensors[b]);
            (ta.layer.map_or(-1, i64::from), ta.gguf)
                .cmp(&(tb.layer.map_or(-1, i64::from), tb.gguf))
        });
        // ordinals[rule][tensor] = (position, count) among tensors matching the rule's names.
        let ordinals: Vec<Option<Ordinals>> = self
            .rules
            .iter()
            .map(|rule| {
                rule.uses_ordinals().then(|| {
                    let matching: Vec<usize> = order
                        .iter()
                        .copied()
                        .filter(|&i| rule.name_matches(&tensors[i]))
                        .collect();
                    let mut out = vec![None; tensors.len()];
                    for (pos, &i) in matching.iter().enumerate() {
                        out[i] = Some((pos as u32, matching.len() as u32));
                    }
                    out
                })
            })
            .collect();
        let default_block = match self.default {
            TypeChoice::Type(t) => t.block_size().unwrap_or(1),
            _ => 1,
        };
        tensors
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let hit = self.rules.iter().find(|rule| {
                    let ordinal = ordinals[rule.index].as_ref().and_then(|o| o[i]);
                    rule.matches(t, model, ordinal, default_block)
                });
                let (rule, choice, use_imatrix, imatrix_required, fallback, packed) = match hit {
                    Some(r) => (
                        Some(r.index),
                        r.choice,
                        r.use_imatrix,
                        r.imatrix_required,
                        r.fallback,
                        r.packed,
                    ),
                    None => (None, self.default, true, true, true, self.packed_default),
                };
                let choice = match choice {
                    TypeChoice::Default => self.default,
                    other => other,
                };
                Assignment {
                    rule,
                    choice,
                    use_imatrix,
                    imatrix_required,
                    fallback,
                    packed,
                }
            })
            .collect()
    }
}

/// GGUF block types take their scales from the block format, so of the packed-type fields only
/// `method` (`rtn` or `gptq`) and `act-order` mean anything for them; the others are refused
/// rather than ignored.
fn check_gguf_fields(context: &str, fields: &packed::PackedFields) -> Result<(), RecipeError> {
    let packed_only = [
        ("estimator", fields.estimator.is_some()),
        ("group-size", fields.group_size.is_some()),
        ("symmetric", fields.symmetric.is_some()),
        ("double-quant", fields.double_quant.is_some()),
        ("input-activations", fields.input_activations.is_some()),
        (
            "activation-estimator",
            fields.activation_estimator.is_some(),
        ),
    ];
    if let Some((key, _)) = packed_only.iter().find(|(_, set)| *set) {
        return Err(RecipeError::Conflict(format!(
            "{context}.{key} applies to packed safetensors outputs; GGUF block types fix their own \
             scales (set `[output] format` to use it)"
        )));
    }
    match fields.method.as_deref().map(|m| (m, Method::parse(m))) {
        Some((m, Some(Method::Awq | Method::Lsq))) => Err(RecipeError::Conflict(format!(
            "{context}.method = {m:?} is for packed safetensors outputs; GGUF block types take \
             `rtn` or `gptq`"
        ))),
        _ => Ok(()),
    }
}

/// Packed types only in packed formats, and only the ones that format stores; GGUF block types
/// only in GGUF.
fn check_choice(
    format: OutputFormat,
    context: &str,
    choice: TypeChoice,
) -> Result<(), RecipeError> {
    let problem = match (format, choice) {
        (OutputFormat::Gguf, TypeChoice::Packed(p)) => Some(format!(
            "{p} is a packed safetensors type; set `[output] format = \"{}\"`",
            match p.format() {
                OutputFormat::Bitsandbytes => "bitsandbytes",
                _ => "compressed-tensors",
            }
        )),
        (f, TypeChoice::Packed(p)) if p.format() != f => {
            Some(format!("{p} cannot be stored in this output format"))
        }
        (f, TypeChoice::Type(t)) if f.is_packed() && t.is_block_quantized() => Some(format!(
            "{t} is a GGUF block type; packed outputs store F32, F16, BF16 or a packed type"
        )),
        _ => None,
    };
    match problem {
        Some(p) => Err(RecipeError::Conflict(format!("{context}: {p}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests;
