//! `tokenizer.json` vocabularies read through `transformers`, as the converter's `get_vocab_base`
//! does (shared by the BPE path `_set_vocab_gpt2` and BERT's WordPiece path).
//!
//! For ids `0..vocab_size` (`config.json`'s `vocab_size`, else the tokenizer's vocabulary length):
//! - an id no token has becomes `[PAD{id}]`, type UNUSED;
//! - an added token is first passed through `decode(encode(token))` when it is not `normalized`,
//!   then typed CONTROL if it is `special` or looks special (`<|…|>`, `<pad>`, `<unused…>` …),
//!   else USER_DEFINED with `▁` replaced by a space;
//! - any other token is NORMAL.

use std::collections::HashMap;

use kiln_types::{MetaArray, MetaValue};

use super::special::SpecialVocab;
use super::transformers::HfTokenizer;
use super::{pretokenizer, sentencepiece::looks_special, token_type};
use crate::hparams::HParams;
use crate::{ArchError, SideFiles};

/// Tokens, their llama.cpp types and the pre-tokenizer name (`get_vocab_base`'s result).
#[derive(Debug, Clone, PartialEq)]
pub struct BaseVocab {
    /// Token strings, one per id.
    pub tokens: Vec<String>,
    /// llama.cpp token types.
    pub types: Vec<i32>,
    /// `tokenizer.ggml.pre`.
    pub pre: String,
}

/// `TextModel.get_vocab_base`.
pub fn vocab_base(hp: &HParams, files: &SideFiles) -> Result<BaseVocab, ArchError> {
    let tok = HfTokenizer::load(files)?;
    let vocab = tok.vocab();
    let vocab_size = match hp.u64("vocab_size") {
        Some(n) => usize::try_from(n).map_err(|_| ArchError::BadHParam {
            key: "vocab_size".into(),
            problem: format!("{n} is too large"),
        })?,
        None => tok.vocab_len(),
    };
    if let Some(max) = vocab.values().max() {
        if *max as usize >= vocab_size {
            return Err(ArchError::BadTokenizerJson(format!(
                "token id {max} is not below the vocabulary size {vocab_size} (config.json \
                 `vocab_size`); the converter asserts this too"
            )));
        }
    }
    // A name the user chose in the recipe wins; the fingerprint is then not needed.
    let pre = match files.pre_tokenizer() {
        Some(name) => name.to_string(),
        None => pretokenizer::pre_name(&tok)?,
    };

    let added = tok.added_tokens();
    // `get_added_vocab()`: content → id.
    let added_vocab: HashMap<&str, u32> = added
        .iter()
        .map(|(id, t)| (t.content.as_str(), *id))
        .collect();
    let added_by_id: HashMap<u32, &tokenizers::AddedToken> =
        added.iter().map(|(id, t)| (*id, t)).collect();
    // id → token, from `tokenizer.vocab` (added tokens override model entries of the same
    // string). Python builds this from a dict whose order comes from a Rust HashMap, so when an
    // added token and a different model token share an id either may win there; kiln takes the
    // added token, the string the tokenizer actually emits for that id.
    let mut reverse: Vec<Option<String>> = vec![None; vocab_size];
    for (token, id) in vocab {
        let Some(slot) = reverse.get_mut(id as usize) else {
            continue;
        };
        let is_added = added_by_id.get(&id).is_some_and(|t| t.content == token);
        if slot.is_none() || is_added {
            *slot = Some(token);
        }
    }

    let mut tokens = Vec::with_capacity(vocab_size);
    let mut types = Vec::with_capacity(vocab_size);
    for (i, entry) in reverse.into_iter().enumerate() {
        let Some(mut token) = entry else {
            tokens.push(format!("[PAD{i}]"));
            types.push(token_type::UNUSED);
            continue;
        };
        if added_vocab.contains_key(token.as_str()) {
            let Some(info) = added_by_id.get(&(i as u32)) else {
                return Err(ArchError::BadTokenizerJson(format!(
                    "`{token}` is an added token but id {i} is not (the converter fails here too)"
                )));
            };
            // llama.cpp expects CONTROL and USER_DEFINED tokens pre-normalized.
            if !info.normalized {
                token = tok.round_trip(&token)?;
            }
            if info.special || looks_special(&token) {
                types.push(token_type::CONTROL);
            } else {
                token = token.replace('\u{2581}', " ");
                types.push(token_type::USER_DEFINED);
            }
        } else {
            types.push(token_type::NORMAL);
        }
        tokens.push(token);
    }
    Ok(BaseVocab { tokens, types, pre })
}

/// `_set_vocab_gpt2`: model `gpt2`, pre, tokens, token types, then `SpecialVocab` with merges
/// (and no vocabulary-size check on special ids, as the converter passes no `n_vocab`).
pub fn gpt2_keys(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let base = vocab_base(hp, files)?;
    let mut kv = vec![
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("gpt2".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::String(base.pre),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(MetaArray::String(base.tokens)),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(MetaArray::I32(base.types)),
        ),
    ];
    kv.extend(SpecialVocab::load(files, usize::MAX, true)?.into_metadata());
    Ok(kv)
}
