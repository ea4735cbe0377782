//! SentencePiece `tokenizer.model` → llama.cpp vocabulary.
//!
//! The model is a protobuf `ModelProto`; kiln decodes only the pieces (field 1: piece, score,
//! type) with `prost`, and skips everything else, which `prost` does for unknown fields.

use kiln_types::{MetaArray, MetaValue};
use prost::Message;

use super::token_type;
use crate::hparams::HParams;
use crate::{ArchError, SideFiles};

#[derive(Clone, PartialEq, Message)]
struct ModelProto {
    #[prost(message, repeated, tag = "1")]
    pieces: Vec<SentencePiece>,
}

#[derive(Clone, PartialEq, Message)]
struct SentencePiece {
    #[prost(string, optional, tag = "1")]
    piece: Option<String>,
    #[prost(float, optional, tag = "2")]
    score: Option<f32>,
    #[prost(int32, optional, tag = "3")]
    kind: Option<i32>,
}

// sentencepiece_model.proto `SentencePiece.Type`.
const SP_NORMAL: i32 = 1;
const SP_UNKNOWN: i32 = 2;
const SP_CONTROL: i32 = 3;
const SP_UNUSED: i32 = 5;
const SP_BYTE: i32 = 6;

/// A vocabulary: parallel arrays.
#[derive(Debug, Clone, PartialEq)]
pub struct Vocab {
    /// Token strings.
    pub tokens: Vec<String>,
    /// Scores.
    pub scores: Vec<f32>,
    /// llama.cpp token types.
    pub types: Vec<i32>,
}

impl Vocab {
    /// `tokenizer.ggml.tokens`, `.scores`, `.token_type`.
    pub fn into_metadata(self) -> Vec<(String, MetaValue)> {
        vec![
            (
                "tokenizer.ggml.tokens".into(),
                MetaValue::Array(MetaArray::String(self.tokens)),
            ),
            (
                "tokenizer.ggml.scores".into(),
                MetaValue::Array(MetaArray::F32(self.scores)),
            ),
            (
                "tokenizer.ggml.token_type".into(),
                MetaValue::Array(MetaArray::I32(self.types)),
            ),
        ]
    }
}

/// Parses the pieces of a SentencePiece model: (piece, score, SentencePiece type).
pub fn parse_pieces(bytes: &[u8]) -> Result<Vec<(String, f32, i32)>, ArchError> {
    let model =
        ModelProto::decode(bytes).map_err(|e| ArchError::BadSentencePiece(e.to_string()))?;
    if model.pieces.is_empty() {
        return Err(ArchError::BadSentencePiece(
            "the model has no pieces".into(),
        ));
    }
    Ok(model
        .pieces
        .into_iter()
        .map(|p| {
            (
                p.piece.unwrap_or_default(),
                p.score.unwrap_or(0.0),
                p.kind.unwrap_or(SP_NORMAL),
            )
        })
        .collect())
}

/// A SentencePiece model holding `pieces` (piece, score, SentencePiece type), for tests.
#[cfg(test)]
pub(crate) fn encode_model(pieces: &[(&str, f32, i32)]) -> Vec<u8> {
    ModelProto {
        pieces: pieces
            .iter()
            .map(|(p, s, k)| SentencePiece {
                piece: Some(p.to_string()),
                score: Some(*s),
                kind: Some(*k),
            })
            .collect(),
    }
    .encode_to_vec()
}

/// The llama.cpp token type of a SentencePiece piece type. USER_DEFINED pieces count as NORMAL,
/// as in the converter (it asks only IsUnknown / IsControl / IsUnused / IsByte).
pub fn piece_type(kind: i32) -> i32 {
    match kind {
        SP_UNKNOWN => token_type::UNKNOWN,
        SP_CONTROL => token_type::CONTROL,
        SP_UNUSED => token_type::UNUSED,
        SP_BYTE => token_type::BYTE,
        _ => token_type::NORMAL,
    }
}

/// Builds the vocabulary the way `_create_vocab_sentencepiece` does: `vocab_size` from
/// `config.json` (else the model's size) entries, unknown ids as `[PAD{i}]`, then
/// `added_tokens.json` and `tokenizer_config.json` `added_tokens_decoder` overrides.
pub fn vocab(
    model: &[u8],
    hp: &HParams,
    files: &SideFiles,
    tokenizer_config: Option<&serde_json::Value>,
) -> Result<Vocab, ArchError> {
    let pieces = parse_pieces(model)?;
    let vocab_size = hp
        .u64("vocab_size")
        .map(|n| n as usize)
        .unwrap_or(pieces.len());
    let mut tokens: Vec<String> = (0..vocab_size).map(|i| format!("[PAD{i}]")).collect();
    let mut scores = vec![-10000.0f32; vocab_size];
    let mut types = vec![token_type::UNUSED; vocab_size];
    for (id, (piece, score, kind)) in pieces.into_iter().enumerate().take(vocab_size) {
        types[id] = piece_type(kind);
        tokens[id] = piece;
        scores[id] = score;
    }
    if let Some(added) = files.json("added_tokens.json")? {
        if let Some(map) = added.as_object() {
            for (token, id) in map {
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
    }
    if let Some(decoder) = tokenizer_config
        .and_then(|c| c.get("added_tokens_decoder"))
        .and_then(|d| d.as_object())
    {
        for (id, data) in decoder {
            let Ok(id) = id.parse::<usize>() else {
                continue;
            };
            let Some(content) = data.get("content").and_then(|c| c.as_str()) else {
                continue;
            };
            if id >= vocab_size {
                continue;
            }
            let special = data.get("special").and_then(|s| s.as_bool()) == Some(true);
            if special || looks_special(content) {
                types[id] = token_type::CONTROL;
                tokens[id] = content.to_string();
            } else {
                types[id] = token_type::USER_DEFINED;
                tokens[id] = content.replace('\u{2581}', " ");
            }
            scores[id] = -1000.0;
        }
    }
    Ok(Vocab {
        tokens,
        scores,
        types,
    })
}

/// The converter's `does_token_look_special`.
pub fn looks_special(token: &str) -> bool {
    matches!(token, "<pad>" | "<mask>" | "<2mass>" | "[@BOS@]")
        || (token.starts_with("<|") && token.ends_with("|>"))
        || (token.starts_with("<｜") && token.ends_with("｜>"))
        || (token.starts_with("<unused") && token.ends_with('>'))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(pieces: &[(&str, f32, i32)]) -> Vec<u8> {
        ModelProto {
            pieces: pieces
                .iter()
                .map(|(p, s, k)| SentencePiece {
                    piece: Some(p.to_string()),
                    score: Some(*s),
                    kind: Some(*k),
                })
                .collect(),
        }
        .encode_to_vec()
    }

    #[test]
    fn builds_vocab_with_padding_and_types() {
        let model = encode(&[
            ("<unk>", 0.0, 2),
            ("<s>", 0.0, 3),
            ("<0x0A>", 0.0, 6),
            ("▁a", -1.5, 1),
            ("x", -2.0, 4),
        ]);
        let hp = HParams::from_config(&serde_json::json!({"vocab_size": 7})).unwrap();
        let v = vocab(&model, &hp, &SideFiles::new(), None).unwrap();
        assert_eq!(
            v.tokens,
            ["<unk>", "<s>", "<0x0A>", "▁a", "x", "[PAD5]", "[PAD6]"]
        );
        assert_eq!(v.types, [2, 3, 6, 1, 1, 5, 5]);
        assert_eq!(v.scores[3], -1.5);
        assert_eq!(v.scores[6], -10000.0);
    }

    #[test]
    fn rejects_garbage() {
        assert!(matches!(
            parse_pieces(&[0xff, 0xff, 0xff]),
            Err(ArchError::BadSentencePiece(_))
        ));
        assert!(matches!(
            parse_pieces(&[]),
            Err(ArchError::BadSentencePiece(_))
        ));
    }
}
