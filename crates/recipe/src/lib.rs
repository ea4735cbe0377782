//! The kiln recipe: what to build, as a strict TOML file, and the validated [`Recipe`] it becomes.
//!
//! Parsing has two phases. [`raw::RecipeFile`] is what the user wrote (every struct rejects
//! unknown keys, every field is documented); [`Recipe::from_toml`] validates it into a [`Recipe`]:
//! type names resolved, globs and regexes compiled, layer ranges checked, paths resolved against
//! the recipe's folder. Nothing touches the model until that succeeds.
//!
//! A recipe decides a type per tensor with [`Recipe::choose`]: the first [`Rule`] whose selectors
//! all match wins, else the default. (Architecture constraints, such as norms staying F32, and
//! block-size fallbacks are applied afterwards by the pipeline and reported as such.)
//!
//! Command-line values override recipe values ([`Overrides`]); see `docs/recipes.md`.

#![deny(unsafe_code)]
#![deny(missing_docs)]

mod error;
pub mod raw;
mod rule;

use std::path::{Path, PathBuf};

use kiln_types::{FileType, GgmlType};

pub use error::RecipeError;
pub use rule::{LayerSet, Rule, TensorNames};

/// The recipe format version this kiln reads.
pub const RECIPE_VERSION: u32 = 1;

/// What a rule or the default asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TypeChoice {
    /// Store the tensor in this ggml type.
    Type(GgmlType),
    /// Keep the source's own type (bytes copied when nothing else changes them).
    Keep,
}

impl TypeChoice {
    /// Parses `keep` or a ggml type name, ignoring case.
    pub fn parse(s: &str) -> Option<TypeChoice> {
        if s.eq_ignore_ascii_case("keep") {
            return Some(TypeChoice::Keep);
        }
        GgmlType::from_name(s).map(TypeChoice::Type)
    }
}

impl std::fmt::Display for TypeChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TypeChoice::Type(t) => write!(f, "{t}"),
            TypeChoice::Keep => f.write_str("keep"),
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
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `--input`.
    pub input: Option<PathBuf>,
    /// `--output`.
    pub output: Option<PathBuf>,
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
        let rules = raw
            .rules
            .into_iter()
            .enumerate()
            .map(|(i, r)| Rule::compile(i, r))
            .collect::<Result<Vec<_>, _>>()?;
        let alignment = raw.output.as_ref().and_then(|o| o.alignment).unwrap_or(32);
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
        })
    }

    /// A recipe with a default type and no rules, as `kiln convert` uses.
    pub fn plain(default: TypeChoice) -> Recipe {
        Recipe {
            source: None,
            input: None,
            output: None,
            default,
            file_type: None,
            rules: Vec::new(),
            alignment: 32,
            metadata: GeneralMetadata::default(),
        }
    }

    /// Applies command-line overrides (they win over the recipe).
    pub fn with_overrides(mut self, overrides: &Overrides) -> Recipe {
        if let Some(p) = &overrides.input {
            self.input = Some(p.clone());
        }
        if let Some(p) = &overrides.output {
            self.output = Some(p.clone());
        }
        self
    }

    /// The recipe's choice for a tensor: the first matching rule (its index) or the default.
    pub fn choose(&self, names: &TensorNames<'_>) -> (Option<usize>, TypeChoice) {
        self.rules
            .iter()
            .enumerate()
            .find(|(_, r)| r.matches(names))
            .map_or((None, self.default), |(i, r)| (Some(i), r.choice))
    }
}

#[cfg(test)]
mod tests;
