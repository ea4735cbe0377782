//! Tokenizer export: the `tokenizer.*` GGUF keys.
//!
//! - [`sentencepiece`]: `tokenizer.model` (SentencePiece protobuf) → tokens, scores, token types,
//!   as `convert_hf_to_gguf.py`'s `_create_vocab_sentencepiece` builds them.
//! - [`bpe`]: `tokenizer.json` vocabularies read the way the converter reads them through
//!   `transformers` (`get_vocab_base`), and the byte-level BPE path (`_set_vocab_gpt2`).
//! - [`wordpiece`]: BERT's WordPiece vocabulary in llama.cpp's phantom-space form.
//! - [`pretokenizer`]: the `tokenizer.ggml.pre` name, from the fingerprint of a test text.
//! - [`special`]: special token ids, `add_*_token` flags, chat templates and normalizer flags,
//!   with gguf-py's `SpecialVocab` precedence (documented in `docs/tokenizers.md`).
//!
//! The entry points below are the converter's per-family `set_vocab` routines.

pub mod bpe;
pub mod pretokenizer;
pub mod sentencepiece;
pub mod special;
mod transformers;
pub mod wordpiece;

use kiln_types::{MetaArray, MetaValue};

use crate::hparams::HParams;
use crate::{ArchError, SideFiles};

/// llama.cpp token types (`llama_token_type`).
#[allow(missing_docs)]
pub mod token_type {
    pub const NORMAL: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
    pub const UNUSED: i32 = 5;
    pub const BYTE: i32 = 6;
}

/// The `tokenizer.*` keys for a Llama-family checkpoint, in the converter's order.
pub fn llama_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let tokenizer_config = files.json("tokenizer_config.json")?;
    let mut kv = Vec::new();
    if let Some(cfg) = &tokenizer_config {
        if let Some(b) = cfg.get("add_prefix_space").and_then(|v| v.as_bool()) {
            kv.push(("tokenizer.ggml.add_space_prefix".into(), MetaValue::Bool(b)));
        }
    }
    let Some(model) = files.get("tokenizer.model") else {
        return Err(ArchError::NoTokenizer(
            "this family needs a SentencePiece tokenizer.model (tokenizer.json BPE vocabularies are not supported yet)".into(),
        ));
    };
    let vocab = sentencepiece::vocab(model, hp, files, tokenizer_config.as_ref())?;
    let n_vocab = vocab.tokens.len();
    kv.push((
        "tokenizer.ggml.model".into(),
        MetaValue::String("llama".into()),
    ));
    kv.push((
        "tokenizer.ggml.pre".into(),
        MetaValue::String("default".into()),
    ));
    kv.extend(vocab.into_metadata());
    kv.extend(special::SpecialVocab::load(files, n_vocab, false)?.into_metadata());
    // The converter forces add_bos off for granite-small vocabularies (49152 entries).
    if hp.u64("vocab_size") == Some(49152) {
        kv.retain(|(k, _)| k != "tokenizer.ggml.add_bos_token");
        kv.push((
            "tokenizer.ggml.add_bos_token".into(),
            MetaValue::Bool(false),
        ));
    }
    Ok(kv)
}

/// `_set_vocab_gpt2`: a `tokenizer.json` read through transformers → model `gpt2`, `pre` by
/// fingerprint, tokens, token types, then the special-token keys with merges.
pub fn gpt2_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    bpe::gpt2_keys(hp, files)
}

/// `BertModel.set_vocab`: `token_type_count`, model `bert`, `pre` by fingerprint, phantom-space
/// tokens, token types, then the special-token keys (no merges) and normalizer flags.
pub fn bert_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    wordpiece::bert_keys(hp, files)
}

/// `_set_vocab_sentencepiece`: model `llama`, pre `default`, tokens, scores, token types from
/// `tokenizer.model` (with `added_tokens.json` / `added_tokens_decoder` overrides), then the
/// special-token keys with the token count as the id limit.
fn sentencepiece_vocab(
    model: &[u8],
    hp: &HParams,
    files: &SideFiles,
) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let tokenizer_config = files.json("tokenizer_config.json")?;
    let vocab = sentencepiece::vocab(model, hp, files, tokenizer_config.as_ref())?;
    let n_vocab = vocab.tokens.len();
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::String("default".into()),
        ),
    ];
    kv.extend(vocab.into_metadata());
    kv.extend(special::SpecialVocab::load(files, n_vocab, false)?.into_metadata());
    Ok(kv)
}

/// Gemma 2 / Gemma 3: `_set_vocab_sentencepiece`, then `tokenizer.ggml.add_space_prefix = false`
/// (after the chat template). Gemma 3 without `tokenizer.model` takes the `gpt2` path instead
/// (which needs its fingerprint in llama.cpp's table); Gemma 2 requires `tokenizer.model`.
pub fn gemma_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let Some(model) = files.get("tokenizer.model") else {
        let gemma3 = hp
            .str("model_type")
            .is_some_and(|t| t.starts_with("gemma3"))
            || hp
                .get("architectures")
                .and_then(|a| a.get(0))
                .and_then(|a| a.as_str())
                .is_some_and(|a| a.starts_with("Gemma3"));
        if gemma3 {
            return gpt2_vocab(hp, files);
        }
        return Err(ArchError::NoTokenizer(
            "Gemma 2 needs its SentencePiece tokenizer.model".into(),
        ));
    };
    let mut kv = sentencepiece_vocab(model, hp, files)?;
    kv.push((
        "tokenizer.ggml.add_space_prefix".into(),
        MetaValue::Bool(false),
    ));
    Ok(kv)
}

/// Qwen2 / Qwen3: `_set_vocab_sentencepiece` when a `tokenizer.model` exists, else
/// `_set_vocab_gpt2`.
pub fn qwen_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    match files.get("tokenizer.model") {
        Some(model) => sentencepiece_vocab(model, hp, files),
        None => gpt2_vocab(hp, files),
    }
}

/// Phi-3: `gpt2_vocab` when `tokenizer_config.json` names `GPT2Tokenizer` (Phi-4), else Phi-3's
/// own SentencePiece routine: tokens padded to `vocab_size`, SentencePiece pieces, then
/// `added_tokens.json`, `added_tokens_decoder` and `tokenizer.json`'s `added_tokens` as
/// USER_DEFINED (CONTROL when flagged special; no "looks special" rule, no `▁` rewrite), score
/// -1000. An added id past the vocabulary is an error, as it is an `IndexError` in the converter.
pub fn phi3_vocab(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let tokenizer_config = files.json("tokenizer_config.json")?;
    if let Some(cfg) = &tokenizer_config {
        // The converter indexes `tokenizer_class` directly (a KeyError when missing).
        match cfg.get("tokenizer_class").and_then(|c| c.as_str()) {
            Some("GPT2Tokenizer") => return gpt2_vocab(hp, files),
            Some(_) => {}
            None => {
                return Err(ArchError::BadTokenizerJson(
                    "tokenizer_config.json has no `tokenizer_class`, which Phi-3's converter \
                     requires"
                        .into(),
                ))
            }
        }
    }
    let Some(model) = files.get("tokenizer.model") else {
        return Err(ArchError::NoTokenizer(
            "Phi-3 needs its SentencePiece tokenizer.model".into(),
        ));
    };
    let pieces = sentencepiece::parse_pieces(model)?;
    let vocab_size = hp
        .u64("vocab_size")
        .map(|n| n as usize)
        .unwrap_or(pieces.len());
    if pieces.len() > vocab_size {
        return Err(ArchError::BadSentencePiece(format!(
            "{} pieces do not fit config.json `vocab_size` {vocab_size}",
            pieces.len()
        )));
    }
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![token_type::UNUSED; vocab_size];
    for (id, (piece, score, kind)) in pieces.into_iter().enumerate() {
        tokens[id] = piece;
        scores[id] = score;
        types[id] = sentencepiece::piece_type(kind);
    }
    if let Some(added) = files.json("added_tokens.json")? {
        for (token, id) in added.as_object().into_iter().flatten() {
            let Some(id) = id.as_u64().map(|i| i as usize) else {
                continue;
            };
            if id < vocab_size {
                tokens[id] = token.clone();
                scores[id] = -1000.0;
                types[id] = token_type::USER_DEFINED;
            }
        }
    }
    let mut set = |id: usize, data: &serde_json::Value, what: &str| -> Result<(), ArchError> {
        let content = data
            .get("content")
            .and_then(|c| c.as_str())
            .ok_or_else(|| {
                ArchError::BadTokenizerJson(format!("{what} entry {id} has no content"))
            })?;
        if id >= vocab_size {
            return Err(ArchError::BadTokenizerJson(format!(
                "{what} id {id} is outside the vocabulary of {vocab_size} tokens"
            )));
        }
        tokens[id] = content.to_string();
        scores[id] = -1000.0;
        types[id] = if data.get("special").and_then(|s| s.as_bool()) == Some(true) {
            token_type::CONTROL
        } else {
            token_type::USER_DEFINED
        };
        Ok(())
    };
    if let Some(decoder) = tokenizer_config
        .as_ref()
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(|d| d.as_object())
    {
        for (id, data) in decoder {
            let id: usize = id.parse().map_err(|_| {
                ArchError::BadTokenizerJson(format!("added_tokens_decoder key `{id}` is not an id"))
            })?;
            set(id, data, "added_tokens_decoder")?;
        }
    }
    if let Some(tok) = files.json("tokenizer.json")? {
        for data in tok
            .get("added_tokens")
            .and_then(|a| a.as_array())
            .into_iter()
            .flatten()
        {
            let id = data
                .get("id")
                .and_then(|i| i.as_u64())
                .ok_or_else(|| ArchError::BadTokenizerJson("an added token has no id".into()))?;
            set(id as usize, data, "tokenizer.json added_tokens")?;
        }
    }
    let n_vocab = tokens.len();
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("llama".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::String("default".into()),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(MetaArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.scores".to_string(),
            MetaValue::Array(MetaArray::F32(scores)),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(MetaArray::I32(types)),
        ),
    ];
    kv.extend(special::SpecialVocab::load(files, n_vocab, false)?.into_metadata());
    Ok(kv)
}

/// What tokenizer a checkpoint folder has, for `kiln inspect`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSummary {
    /// `sentencepiece` (a `tokenizer.model`), the `tokenizer.json` model type in lower case
    /// (`bpe`, `wordpiece`, `unigram`, `wordlevel`), or `none`.
    pub kind: &'static str,
    /// The `tokenizer.ggml.pre` name, or why none can be given (for an unknown fingerprint: the
    /// digest and what to do about it).
    pub pre: Result<String, String>,
    /// Number of tokens (SentencePiece pieces, or `tokenizer.json`'s vocabulary with added
    /// tokens), when readable.
    pub vocab_size: Option<usize>,
}

/// Summarizes a folder's tokenizer. A `tokenizer.model` takes precedence (the SentencePiece
/// families use it when present, with pre `default`); otherwise `tokenizer.json` is loaded as
/// transformers would and fingerprinted.
pub fn describe(files: &SideFiles) -> TokenizerSummary {
    if let Some(model) = files.get("tokenizer.model") {
        return match sentencepiece::parse_pieces(model) {
            Ok(pieces) => TokenizerSummary {
                kind: "sentencepiece",
                pre: Ok("default".into()),
                vocab_size: Some(pieces.len()),
            },
            Err(e) => TokenizerSummary {
                kind: "sentencepiece",
                pre: Err(e.to_string()),
                vocab_size: None,
            },
        };
    }
    if files.get("tokenizer.json").is_none() {
        return TokenizerSummary {
            kind: "none",
            pre: Err("no tokenizer.model or tokenizer.json".into()),
            vocab_size: None,
        };
    }
    let kind = match files
        .json("tokenizer.json")
        .ok()
        .flatten()
        .as_ref()
        .and_then(|t| t.get("model"))
        .and_then(|m| m.get("type"))
        .and_then(|t| t.as_str())
    {
        Some("BPE") => "bpe",
        Some("WordPiece") => "wordpiece",
        Some("Unigram") => "unigram",
        Some("WordLevel") => "wordlevel",
        _ => "unknown",
    };
    match transformers::HfTokenizer::load(files) {
        Ok(tok) => {
            let pre = pretokenizer::pre_name(&tok).map_err(|e| {
                if tok.class_known {
                    e.to_string()
                } else {
                    format!(
                        "{e} (note: tokenizer class `{}` is not one whose transformers \
                         constructor kiln reproduces, so this fingerprint may differ from the \
                         converter's)",
                        tok.class
                    )
                }
            });
            TokenizerSummary {
                kind,
                pre,
                vocab_size: Some(tok.vocab_len()),
            }
        }
        Err(e) => TokenizerSummary {
            kind,
            pre: Err(e.to_string()),
            vocab_size: None,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn sp_files(tokenizer_config: serde_json::Value) -> SideFiles {
        let mut f = SideFiles::new();
        f.insert(
            "tokenizer.model",
            sentencepiece::encode_model(&[
                ("<unk>", 0.0, 2),
                ("<s>", 0.0, 3),
                ("</s>", 0.0, 3),
                ("\u{2581}a", -1.0, 1),
                ("b", -2.0, 4),
            ]),
        );
        f.insert(
            "tokenizer_config.json",
            serde_json::to_vec(&tokenizer_config).unwrap(),
        );
        f
    }

    fn keys(kv: &[(String, MetaValue)]) -> Vec<&str> {
        kv.iter().map(|(k, _)| k.as_str()).collect()
    }

    fn get<'a>(kv: &'a [(String, MetaValue)], key: &str) -> &'a MetaValue {
        &kv.iter().find(|(k, _)| k == key).unwrap().1
    }

    #[test]
    fn gemma_writes_add_space_prefix_last() {
        let hp = HParams::from_config(&json!({"model_type": "gemma2", "vocab_size": 6})).unwrap();
        let files = sp_files(json!({
            "bos_token": "<s>", "add_bos_token": true, "chat_template": "T",
            "added_tokens_decoder": {"4": {"content": "<unused0>", "special": false},
                                     "5": {"content": "\u{2581}x", "special": false}}
        }));
        let kv = gemma_vocab(&hp, &files).unwrap();
        assert_eq!(
            keys(&kv),
            [
                "tokenizer.ggml.model",
                "tokenizer.ggml.pre",
                "tokenizer.ggml.tokens",
                "tokenizer.ggml.scores",
                "tokenizer.ggml.token_type",
                "tokenizer.ggml.add_bos_token",
                "tokenizer.chat_template",
                "tokenizer.ggml.add_space_prefix",
            ]
        );
        // "<unused0>" looks special; "▁x" becomes " x" (USER_DEFINED).
        assert_eq!(
            get(&kv, "tokenizer.ggml.tokens"),
            &MetaValue::Array(MetaArray::String(
                ["<unk>", "<s>", "</s>", "\u{2581}a", "<unused0>", " x"]
                    .map(String::from)
                    .to_vec()
            ))
        );
        assert_eq!(
            get(&kv, "tokenizer.ggml.token_type"),
            &MetaValue::Array(MetaArray::I32(vec![2, 3, 3, 1, 3, 4]))
        );

        // Gemma 2 has no fallback; Gemma 3 falls back to the tokenizer.json path.
        let none = SideFiles::new();
        assert!(matches!(
            gemma_vocab(&hp, &none),
            Err(ArchError::NoTokenizer(m)) if m.contains("Gemma 2")
        ));
        let hp3 = HParams::from_config(&json!({"model_type": "gemma3_text"})).unwrap();
        assert!(matches!(
            gemma_vocab(&hp3, &none),
            Err(ArchError::NoTokenizer(m)) if m.contains("tokenizer.json")
        ));
    }

    #[test]
    fn phi3_has_its_own_added_token_rules() {
        let hp = HParams::from_config(&json!({"model_type": "phi3", "vocab_size": 7})).unwrap();
        let files = sp_files(json!({
            "tokenizer_class": "LlamaTokenizer",
            "added_tokens_decoder": {"5": {"content": "<|end|>", "special": false},
                                     "6": {"content": "\u{2581}y", "special": true}}
        }));
        let kv = phi3_vocab(&hp, &files).unwrap();
        // No "looks special" rule and no ▁ rewrite, unlike _set_vocab_sentencepiece.
        assert_eq!(
            get(&kv, "tokenizer.ggml.tokens"),
            &MetaValue::Array(MetaArray::String(
                [
                    "<unk>",
                    "<s>",
                    "</s>",
                    "\u{2581}a",
                    "b",
                    "<|end|>",
                    "\u{2581}y"
                ]
                .map(String::from)
                .to_vec()
            ))
        );
        assert_eq!(
            get(&kv, "tokenizer.ggml.token_type"),
            &MetaValue::Array(MetaArray::I32(vec![2, 3, 3, 1, 1, 4, 3]))
        );
        assert!(!keys(&kv).contains(&"tokenizer.ggml.add_space_prefix"));

        let files = sp_files(json!({
            "tokenizer_class": "LlamaTokenizer",
            "added_tokens_decoder": {"9": {"content": "<|x|>", "special": true}}
        }));
        assert!(matches!(
            phi3_vocab(&hp, &files),
            Err(ArchError::BadTokenizerJson(_))
        ));
        let files = sp_files(json!({}));
        assert!(matches!(
            phi3_vocab(&hp, &files),
            Err(ArchError::BadTokenizerJson(m)) if m.contains("tokenizer_class")
        ));
    }

    #[test]
    fn qwen_prefers_a_sentencepiece_model() {
        let hp = HParams::from_config(&json!({"model_type": "qwen2"})).unwrap();
        let kv = qwen_vocab(&hp, &sp_files(json!({}))).unwrap();
        assert_eq!(
            get(&kv, "tokenizer.ggml.model"),
            &MetaValue::String("llama".into())
        );
        assert!(matches!(
            qwen_vocab(&hp, &SideFiles::new()),
            Err(ArchError::NoTokenizer(_))
        ));
        assert_eq!(describe(&sp_files(json!({}))).vocab_size, Some(5));
    }
}
