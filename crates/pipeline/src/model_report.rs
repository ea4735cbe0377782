//! What kiln understands of a Hugging Face checkpoint folder, without converting it: the
//! detected family, tokenizer, parameters and dtypes, and exactly which tensors and config keys
//! it does not understand. `kiln inspect` prints it; a build that cannot proceed fails with it.

use std::collections::BTreeMap;
use std::fmt;

use kiln_arch::{HParams, Mapped, SideFiles, FAMILIES};
use kiln_reader::Checkpoint;
use serde::Serialize;

/// The tokenizer part of a [`ModelReport`].
#[derive(Debug, Clone, Serialize)]
pub struct TokenizerReport {
    /// `sentencepiece`, `bpe`, `wordpiece`, `unigram`, … or `none`.
    pub kind: String,
    /// The `tokenizer.ggml.pre` name kiln would write.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre: Option<String>,
    /// Why no pre-tokenizer name can be given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pre_problem: Option<String>,
    /// Number of tokens, when readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vocab_size: Option<usize>,
}

/// Parameters per source dtype.
#[derive(Debug, Clone, Serialize)]
pub struct DtypeCount {
    /// The safetensors dtype.
    pub dtype: String,
    /// Tensors of that dtype.
    pub tensors: usize,
    /// Their elements.
    pub parameters: u64,
}

/// A checkpoint as kiln understands it.
#[derive(Debug, Clone, Serialize)]
pub struct ModelReport {
    /// `config.json` `architectures[0]`.
    pub architecture: Option<String>,
    /// `config.json` `model_type`.
    pub model_type: Option<String>,
    /// The GGUF architecture kiln converts it to, when supported.
    pub family: Option<String>,
    /// For an unsupported architecture: the supported family whose tensor names cover the most
    /// of the checkpoint, with how many of its tensors it maps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closest_family: Option<(String, usize)>,
    /// What kiln found wrong with the configuration, if anything.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The tokenizer.
    pub tokenizer: TokenizerReport,
    /// Total parameters in the checkpoint.
    pub parameters: u64,
    /// Tensors in the checkpoint.
    pub tensors: usize,
    /// Parameters per dtype, by dtype name.
    pub dtypes: Vec<DtypeCount>,
    /// Checkpoint tensors the family (or, if unsupported, the closest family) does not map.
    pub unmapped_tensors: Vec<String>,
    /// `config.json` keys kiln does not understand (see `kiln_arch::unknown_config_keys`).
    pub unknown_config_keys: Vec<String>,
}

impl ModelReport {
    /// Whether kiln can convert this checkpoint as it is.
    pub fn convertible(&self) -> bool {
        self.family.is_some() && self.problem.is_none() && self.unmapped_tensors.is_empty()
    }
}

/// Reads what a checkpoint is. Never fails: what cannot be read becomes part of the report.
pub fn model_report(checkpoint: &Checkpoint, files: &SideFiles) -> ModelReport {
    let config = files.json("config.json");
    let (config, mut problem) = match config {
        Ok(Some(c)) => (Some(c), None),
        Ok(None) => (None, Some("config.json not found".to_string())),
        Err(e) => (None, Some(e.to_string())),
    };
    let hp = config.as_ref().and_then(|c| match HParams::from_config(c) {
        Ok(hp) => Some(hp),
        Err(e) => {
            problem.get_or_insert(e.to_string());
            None
        }
    });
    let text = |key: &str| {
        hp.as_ref().and_then(|h| h.get(key)).and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.get(0).and_then(|a| a.as_str()).map(str::to_string))
        })
    };
    let (architecture, model_type) = (text("architectures"), text("model_type"));
    let family = hp.as_ref().and_then(|h| kiln_arch::detect(h).ok());

    let names_unmapped = |f: &kiln_arch::Family, hp: &HParams| -> Vec<String> {
        checkpoint
            .tensors()
            .iter()
            .filter(|t| {
                matches!(
                    f.map_tensor(hp, &t.name, &t.shape),
                    Ok(Mapped::Unknown) | Err(_)
                )
            })
            .map(|t| t.name.clone())
            .collect()
    };
    let mut closest_family = None;
    let unmapped_tensors = match (&hp, family) {
        (Some(hp), Some(f)) => names_unmapped(f, hp),
        (Some(hp), None) => {
            // Which known family's names fit best: a hint for someone adding the architecture.
            let best = FAMILIES
                .iter()
                .map(|f| (f, names_unmapped(f, hp)))
                .min_by_key(|(_, unmapped)| unmapped.len());
            match best {
                Some((f, unmapped)) => {
                    closest_family = Some((
                        f.gguf_arch.to_string(),
                        checkpoint.tensors().len() - unmapped.len(),
                    ));
                    unmapped
                }
                None => Vec::new(),
            }
        }
        (None, _) => Vec::new(),
    };
    if family.is_none() && problem.is_none() {
        if let Some(hp) = &hp {
            if let Err(e) = kiln_arch::detect(hp) {
                problem = Some(e.to_string());
            }
        }
    }
    let unknown_config_keys = config
        .as_ref()
        .map(|c| kiln_arch::unknown_config_keys(family, c))
        .unwrap_or_default();

    let summary = kiln_arch::tokenizer::describe(files);
    let (pre, pre_problem) = match summary.pre {
        Ok(name) => (Some(name), None),
        Err(why) => (None, Some(why)),
    };
    let tokenizer = TokenizerReport {
        kind: summary.kind.to_string(),
        pre,
        pre_problem,
        vocab_size: summary.vocab_size,
    };

    let mut dtypes: BTreeMap<String, (usize, u64)> = BTreeMap::new();
    for t in checkpoint.tensors() {
        let slot = dtypes.entry(t.dtype.name()).or_default();
        slot.0 += 1;
        slot.1 += t.element_count();
    }
    ModelReport {
        architecture,
        model_type,
        family: family.map(|f| f.gguf_arch.to_string()),
        closest_family,
        problem,
        tokenizer,
        parameters: checkpoint.tensors().iter().map(|t| t.element_count()).sum(),
        tensors: checkpoint.tensors().len(),
        dtypes: dtypes
            .into_iter()
            .map(|(dtype, (tensors, parameters))| DtypeCount {
                dtype,
                tensors,
                parameters,
            })
            .collect(),
        unmapped_tensors,
        unknown_config_keys,
    }
}

impl fmt::Display for ModelReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let arch = self.architecture.as_deref().unwrap_or("(none)");
        let model_type = self.model_type.as_deref().unwrap_or("(none)");
        match (&self.family, &self.closest_family) {
            (Some(family), _) => writeln!(
                f,
                "  architecture:  {arch} (model_type {model_type}) → GGUF `{family}`"
            )?,
            (None, Some((closest, mapped))) => writeln!(
                f,
                "  architecture:  {arch} (model_type {model_type}) is not supported; closest \
                 family `{closest}` maps {mapped} of {} tensors",
                self.tensors
            )?,
            (None, None) => writeln!(
                f,
                "  architecture:  {arch} (model_type {model_type}) is not supported"
            )?,
        }
        if let Some(problem) = &self.problem {
            writeln!(f, "  problem:       {problem}")?;
        }
        let pre = match (&self.tokenizer.pre, &self.tokenizer.pre_problem) {
            (Some(p), _) => format!("pre-tokenizer `{p}`"),
            (None, Some(why)) => format!("pre-tokenizer unknown: {why}"),
            (None, None) => "no pre-tokenizer".into(),
        };
        let vocab = self
            .tokenizer
            .vocab_size
            .map(|n| format!(", {n} tokens"))
            .unwrap_or_default();
        writeln!(f, "  tokenizer:     {}{vocab}, {pre}", self.tokenizer.kind)?;
        let dtypes: Vec<String> = self
            .dtypes
            .iter()
            .map(|d| {
                format!(
                    "{} ({} tensors, {} params)",
                    d.dtype, d.tensors, d.parameters
                )
            })
            .collect();
        writeln!(
            f,
            "  parameters:    {} in {} tensors; {}",
            self.parameters,
            self.tensors,
            dtypes.join(", ")
        )?;
        if self.unmapped_tensors.is_empty() {
            writeln!(f, "  tensors not understood: none")?;
        } else {
            writeln!(
                f,
                "  tensors not understood ({}):",
                self.unmapped_tensors.len()
            )?;
            for name in &self.unmapped_tensors {
                writeln!(f, "    {name}")?;
            }
        }
        if self.unknown_config_keys.is_empty() {
            write!(f, "  config keys not understood: none")
        } else {
            writeln!(
                f,
                "  config keys not understood ({}):",
                self.unknown_config_keys.len()
            )?;
            let keys: Vec<String> = self
                .unknown_config_keys
                .iter()
                .map(|k| format!("    {k}"))
                .collect();
            write!(f, "{}", keys.join("\n"))
        }
    }
}
