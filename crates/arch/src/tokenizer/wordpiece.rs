//! BERT's WordPiece vocabulary (`BertModel.set_vocab`).
//!
//! The tokens come from `get_vocab_base` (see [`super::bpe`]) and are rewritten to llama.cpp's
//! "phantom space" form: CONTROL tokens stay as they are, a `##` continuation loses its prefix,
//! and every other token gets a leading `▁` (U+2581), the word-start marker llama.cpp's WordPiece
//! tokenizer matches. `tokenizer.ggml.token_type_count` (`type_vocab_size`, default 1) is written
//! before everything else; the special-token keys follow with the vocabulary size as `n_vocab`.

use kiln_types::{MetaArray, MetaValue};

use super::bpe::vocab_base;
use super::special::SpecialVocab;
use super::token_type;
use crate::hparams::HParams;
use crate::{ArchError, SideFiles};

/// The phantom-space form of one token.
pub fn phantom(token: &str, typ: i32) -> String {
    if typ == token_type::CONTROL {
        token.to_string()
    } else if let Some(rest) = token.strip_prefix("##") {
        rest.to_string()
    } else {
        format!("\u{2581}{token}")
    }
}

/// The `tokenizer.*` keys of a BERT checkpoint, in the converter's order.
pub fn bert_keys(hp: &HParams, files: &SideFiles) -> Result<Vec<(String, MetaValue)>, ArchError> {
    let base = vocab_base(hp, files)?;
    let type_count = hp.find_u32(&["type_vocab_size"])?.unwrap_or(1);
    let tokens: Vec<String> = base
        .tokens
        .iter()
        .zip(&base.types)
        .map(|(t, ty)| phantom(t, *ty))
        .collect();
    let n_vocab = tokens.len();
    let mut kv = vec![
        (
            "tokenizer.ggml.token_type_count".to_string(),
            MetaValue::U32(type_count),
        ),
        (
            "tokenizer.ggml.model".to_string(),
            MetaValue::String("bert".into()),
        ),
        (
            "tokenizer.ggml.pre".to_string(),
            MetaValue::String(base.pre),
        ),
        (
            "tokenizer.ggml.tokens".to_string(),
            MetaValue::Array(MetaArray::String(tokens)),
        ),
        (
            "tokenizer.ggml.token_type".to_string(),
            MetaValue::Array(MetaArray::I32(base.types)),
        ),
    ];
    kv.extend(SpecialVocab::load(files, n_vocab, false)?.into_metadata());
    Ok(kv)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phantom_space_form() {
        assert_eq!(phantom("[CLS]", token_type::CONTROL), "[CLS]");
        assert_eq!(phantom("##ing", token_type::NORMAL), "ing");
        assert_eq!(phantom("the", token_type::NORMAL), "\u{2581}the");
        assert_eq!(
            phantom("[unused0]", token_type::NORMAL),
            "\u{2581}[unused0]"
        );
    }
}
