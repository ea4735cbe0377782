//! Recipe errors.

use std::path::{Path, PathBuf};

/// Why a recipe was rejected. Each variant is one kind of mistake.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RecipeError {
    /// The recipe file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A key the schema does not have (a typo, or a field from a newer kiln).
    #[error("{}unknown key `{key}`{}", file_prefix(.file), location(.line))]
    UnknownKey {
        /// The recipe file, when known.
        file: Option<PathBuf>,
        /// The unknown key.
        key: String,
        /// 1-based line, when known.
        line: Option<usize>,
        /// The parser's full message (lists the keys allowed there).
        message: String,
    },
    /// The TOML is malformed or a value has the wrong type.
    #[error("{}{message}", file_prefix(.file))]
    Syntax {
        /// The recipe file, when known.
        file: Option<PathBuf>,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The `kiln` version key names a format this kiln does not read.
    #[error("recipe format version {0} is not supported (this kiln reads version 1)")]
    UnsupportedVersion(u32),
    /// A type name is not a ggml type (or `keep`).
    #[error("{context}: unknown type `{name}` (expected a ggml type such as F16, BF16, Q8_0, or `keep`)")]
    UnknownType {
        /// Where it was given.
        context: String,
        /// What was given.
        name: String,
    },
    /// `quantize.file-type` is not a llama.cpp file type.
    #[error("quantize.file-type: unknown file type `{name}`")]
    UnknownFileType {
        /// What was given.
        name: String,
    },
    /// A rule has no selector at all.
    #[error("rules[{rule}]: a rule needs at least one of `tensors`, `hf-tensors`, `regex`, `hf-regex`, `layers`")]
    EmptySelector {
        /// Rule index.
        rule: usize,
    },
    /// A glob does not compile.
    #[error("rules[{rule}]: invalid glob `{glob}`: {message}")]
    BadGlob {
        /// Rule index.
        rule: usize,
        /// The glob.
        glob: String,
        /// Why.
        message: String,
    },
    /// A regular expression does not compile.
    #[error("rules[{rule}]: invalid regex `{regex}`: {message}")]
    BadRegex {
        /// Rule index.
        rule: usize,
        /// The regex.
        regex: String,
        /// Why.
        message: String,
    },
    /// A layer range is malformed or empty.
    #[error("rules[{rule}]: invalid layers `{layers}` (use \"3\", \"0..4\", \"0..=3\", \"8..\" or a list of numbers)")]
    BadLayers {
        /// Rule index.
        rule: usize,
        /// What was given.
        layers: String,
    },
    /// The output alignment is not a power of two that is a multiple of 8.
    #[error("output.alignment {0} must be a power of two and a multiple of 8")]
    InvalidAlignment(u64),
    /// A value is not one of those allowed.
    #[error("{context}: `{value}` is not allowed (expected {expected})")]
    BadValue {
        /// Where.
        context: String,
        /// What was given.
        value: String,
        /// What is allowed.
        expected: String,
    },
    /// Two settings contradict each other.
    #[error("{0}")]
    Conflict(String),
    /// A metadata key or value is not acceptable.
    #[error("metadata: {0}")]
    BadMetadata(String),
}

fn file_prefix(file: &Option<PathBuf>) -> String {
    file.as_ref()
        .map(|f| format!("{}: ", f.display()))
        .unwrap_or_default()
}

fn location(line: &Option<usize>) -> String {
    line.map(|l| format!(" at line {l}")).unwrap_or_default()
}

impl RecipeError {
    pub(crate) fn from_toml(e: toml::de::Error) -> RecipeError {
        let message = e.message().to_string();
        // serde reports `deny_unknown_fields` violations as "unknown field `x`, expected ...".
        if let Some(rest) = message.strip_prefix("unknown field `") {
            if let Some(key) = rest.split('`').next() {
                return RecipeError::UnknownKey {
                    file: None,
                    key: key.to_string(),
                    line: None,
                    message: e.to_string(),
                };
            }
        }
        RecipeError::Syntax {
            file: None,
            message: e.to_string(),
        }
    }

    pub(crate) fn in_file(self, path: &Path) -> RecipeError {
        match self {
            RecipeError::UnknownKey {
                key, message, line, ..
            } => {
                // The message from `toml` carries the line; recover it for the short form.
                let line = line.or_else(|| {
                    message
                        .split("line ")
                        .nth(1)
                        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
                        .and_then(|n| n.parse().ok())
                });
                RecipeError::UnknownKey {
                    file: Some(path.to_path_buf()),
                    key,
                    line,
                    message,
                }
            }
            RecipeError::Syntax { message, .. } => RecipeError::Syntax {
                file: Some(path.to_path_buf()),
                message,
            },
            other => other,
        }
    }
}
