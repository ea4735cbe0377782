//! Tokenizer export: the `tokenizer.*` GGUF keys.
//!
//! - [`sentencepiece`]: `tokenizer.model` (SentencePiece protobuf) → tokens, scores, token types,
//!   as `convert_hf_to_gguf.py`'s `_create_vocab_sentencepiece` builds them.
//! - [`special`]: special token ids, `add_*_token` flags and chat templates, with gguf-py's
//!   `SpecialVocab` precedence (documented in `docs/tokenizers.md`).

pub mod sentencepiece;
pub mod special;

use kiln_types::MetaValue;

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
