//! The tokenizer `transformers.AutoTokenizer.from_pretrained(folder)` builds, reproduced.
//!
//! llama.cpp's converter never reads `tokenizer.json` directly for BPE and WordPiece vocabularies:
//! it asks `transformers` (4.57 series, with `tokenizers` 0.22) for a tokenizer, then reads the
//! vocabulary and encodes a test text with it. What that object holds is `tokenizer.json` *after*
//! the tokenizer class's constructor has edited it, so this module loads `tokenizer.json` with the
//! same Rust library (`tokenizers` 0.22, the code behind the Python package) and replays those
//! edits:
//!
//! 1. The class is `tokenizer_config.json`'s `tokenizer_class`, else `config.json`'s, else the
//!    one transformers maps `model_type` to; unknown names behave like `PreTrainedTokenizerFast`.
//! 2. Special tokens (class defaults, `tokenizer_config.json`, or `special_tokens_map.json` when
//!    the config has no `added_tokens_decoder`) and every `added_tokens_decoder` entry are added
//!    to the backend with one `add_tokens` call, as `PreTrainedTokenizerFast.__init__` does.
//! 3. A top-level pre-tokenizer whose `add_prefix_space` differs from the constructor's value
//!    (`tokenizer_config.json`, else the class default, else false) is rebuilt with it.
//! 4. Class-specific edits: `BertTokenizerFast` rebuilds a `BertNormalizer` from `do_lower_case` /
//!    `strip_accents` / `tokenize_chinese_chars`; the Llama-style classes (Llama, CodeLlama, Gemma,
//!    Cohere, GPT-NeoX) replace the post-processor with a bos/eos template from `add_bos_token` /
//!    `add_eos_token`; `RobertaTokenizerFast` rewrites its post-processor's `add_prefix_space` /
//!    `trim_offsets`; `CohereTokenizerFast` forces `add_prefix_space` into the pre-tokenizer and
//!    decoder.
//! 5. `encode` runs without truncation or padding (transformers turns off what `tokenizer.json`
//!    configures for plain `encode` calls).
//!
//! Not reproduced: re-conversion from a slow (SentencePiece) tokenizer, which `LlamaTokenizerFast`
//! does when `add_prefix_space` is set (reported as an error rather than guessed), custom
//! tokenizer code (`auto_map`), and the constructors of classes not listed above.

use std::collections::HashMap;

use serde_json::Value;
use tokenizers::{
    AddedToken, DecoderWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    Tokenizer,
};

use crate::{ArchError, SideFiles};

/// Special-token attributes in transformers' `SPECIAL_TOKENS_ATTRIBUTES` order (the order
/// `all_special_tokens_extended` lists them in, which decides the ids of tokens it adds).
const SPECIAL_ATTRS: &[&str] = &[
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// What a tokenizer class's constructor does beyond `PreTrainedTokenizerFast`'s.
struct ClassSpec {
    /// Class name without the `Fast` suffix.
    name: &'static str,
    /// Default special tokens (`(attribute, content)`), used when the config does not set them.
    defaults: &'static [(&'static str, &'static str)],
    /// Extra `additional_special_tokens` the constructor always appends.
    additional: &'static [&'static str],
    /// `add_prefix_space` passed to the base constructor when `tokenizer_config.json` has none:
    /// `Some(false)` for most classes, `None` for `LlamaTokenizerFast` (whose default is `None`).
    add_prefix_space: Option<bool>,
    /// `update_post_processor` with these `(add_bos_token, add_eos_token)` defaults.
    template: Option<(bool, bool)>,
    /// `BertTokenizerFast`'s normalizer rebuild.
    bert_normalizer: bool,
    /// `RobertaTokenizerFast`'s post-processor rewrite.
    roberta_post_processor: bool,
    /// `CohereTokenizerFast`'s forced `add_prefix_space`.
    cohere_prefix: bool,
    /// `LlamaTokenizerFast` re-converts from the slow tokenizer when `add_prefix_space` is set.
    from_slow_on_prefix: bool,
}

const fn spec(name: &'static str) -> ClassSpec {
    ClassSpec {
        name,
        defaults: &[],
        additional: &[],
        add_prefix_space: Some(false),
        template: None,
        bert_normalizer: false,
        roberta_post_processor: false,
        cohere_prefix: false,
        from_slow_on_prefix: false,
    }
}

const ENDOFTEXT: &str = "<|endoftext|>";
const BERT_DEFAULTS: &[(&str, &str)] = &[
    ("unk_token", "[UNK]"),
    ("sep_token", "[SEP]"),
    ("pad_token", "[PAD]"),
    ("cls_token", "[CLS]"),
    ("mask_token", "[MASK]"),
];

/// The transformers 4.57 fast tokenizer classes whose constructors matter here.
const CLASSES: &[ClassSpec] = &[
    ClassSpec {
        defaults: &[
            ("unk_token", ENDOFTEXT),
            ("bos_token", ENDOFTEXT),
            ("eos_token", ENDOFTEXT),
        ],
        ..spec("GPT2Tokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", ENDOFTEXT),
            ("eos_token", ENDOFTEXT),
            ("pad_token", ENDOFTEXT),
        ],
        ..spec("Qwen2Tokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", "<unk>"),
            ("bos_token", "<s>"),
            ("eos_token", "</s>"),
        ],
        add_prefix_space: None,
        template: Some((true, false)),
        from_slow_on_prefix: true,
        ..spec("LlamaTokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", "<unk>"),
            ("bos_token", "<s>"),
            ("eos_token", "</s>"),
        ],
        additional: &["▁<PRE>", "▁<MID>", "▁<SUF>", "▁<EOT>"],
        template: Some((true, false)),
        ..spec("CodeLlamaTokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", "<unk>"),
            ("bos_token", "<bos>"),
            ("eos_token", "<eos>"),
            ("pad_token", "<pad>"),
        ],
        template: Some((true, false)),
        ..spec("GemmaTokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", "<UNK>"),
            ("bos_token", "<BOS_TOKEN>"),
            ("eos_token", "<|END_OF_TURN_TOKEN|>"),
        ],
        template: Some((true, false)),
        cohere_prefix: true,
        ..spec("CohereTokenizer")
    },
    ClassSpec {
        defaults: &[
            ("unk_token", ENDOFTEXT),
            ("bos_token", ENDOFTEXT),
            ("eos_token", ENDOFTEXT),
        ],
        template: Some((false, false)),
        ..spec("GPTNeoXTokenizer")
    },
    ClassSpec {
        defaults: BERT_DEFAULTS,
        bert_normalizer: true,
        ..spec("BertTokenizer")
    },
    ClassSpec {
        defaults: BERT_DEFAULTS,
        bert_normalizer: true,
        ..spec("DistilBertTokenizer")
    },
    ClassSpec {
        defaults: &[
            ("bos_token", "<s>"),
            ("eos_token", "</s>"),
            ("sep_token", "</s>"),
            ("cls_token", "<s>"),
            ("unk_token", "<unk>"),
            ("pad_token", "<pad>"),
            ("mask_token", "<mask>"),
        ],
        roberta_post_processor: true,
        ..spec("RobertaTokenizer")
    },
    spec("PreTrainedTokenizer"),
];

/// What unknown class names are treated as: the base class, no constructor edits.
static GENERIC: ClassSpec = spec("PreTrainedTokenizer");

/// transformers' `TOKENIZER_MAPPING_NAMES` (fast classes) for the model types kiln meets.
const MODEL_TYPE_CLASSES: &[(&str, &str)] = &[
    ("llama", "LlamaTokenizer"),
    ("mistral", "LlamaTokenizer"),
    ("mixtral", "LlamaTokenizer"),
    ("mistral3", "LlamaTokenizer"),
    ("phi3", "LlamaTokenizer"),
    ("qwen2", "Qwen2Tokenizer"),
    ("qwen2_moe", "Qwen2Tokenizer"),
    ("qwen3", "Qwen2Tokenizer"),
    ("qwen3_moe", "Qwen2Tokenizer"),
    ("gemma", "GemmaTokenizer"),
    ("gemma2", "GemmaTokenizer"),
    ("gemma3", "GemmaTokenizer"),
    ("gemma3_text", "GemmaTokenizer"),
    ("bert", "BertTokenizer"),
    ("distilbert", "DistilBertTokenizer"),
    ("roberta", "RobertaTokenizer"),
    ("gpt2", "GPT2Tokenizer"),
    ("starcoder2", "GPT2Tokenizer"),
    ("gpt_neox", "GPTNeoXTokenizer"),
    ("cohere", "CohereTokenizer"),
];

/// A special-token value as transformers holds it: a plain string, or an `AddedToken` with flags.
#[derive(Debug, Clone, PartialEq)]
enum Special {
    Str(String),
    Token(AddedToken),
}

impl Special {
    fn content(&self) -> &str {
        match self {
            Special::Str(s) => s,
            Special::Token(t) => &t.content,
        }
    }
}

/// `AddedToken(**d)` for a JSON object; `special` and `normalized` default as in `tokenizers`
/// (`normalized` is `not special` unless given).
fn added_token_from_json(v: &Value, force_special: Option<bool>) -> Option<AddedToken> {
    let obj = v.as_object()?;
    let content = obj.get("content")?.as_str()?;
    let flag = |k: &str| obj.get(k).and_then(Value::as_bool);
    let special = force_special.unwrap_or(flag("special").unwrap_or(false));
    Some(
        AddedToken::from(content, special)
            .single_word(flag("single_word").unwrap_or(false))
            .lstrip(flag("lstrip").unwrap_or(false))
            .rstrip(flag("rstrip").unwrap_or(false))
            .normalized(flag("normalized").unwrap_or(!special)),
    )
}

/// A special-token value from `tokenizer_config.json`: strings stay strings, serialized
/// `AddedToken`s (`"__type": "AddedToken"`) become tokens; anything else is ignored by
/// transformers' setters.
fn special_from_config(v: &Value) -> Option<Special> {
    match v {
        Value::String(s) => Some(Special::Str(s.clone())),
        Value::Object(o) if o.get("__type").and_then(Value::as_str) == Some("AddedToken") => {
            added_token_from_json(v, None).map(Special::Token)
        }
        _ => None,
    }
}

/// The tokenizer transformers' `AutoTokenizer` would build for a checkpoint folder.
pub(crate) struct HfTokenizer {
    tok: Tokenizer,
    /// The resolved class name (without `Fast`); `PreTrainedTokenizer` for unknown classes.
    pub(crate) class: String,
    /// Whether the class name was one of those whose constructor is reproduced.
    pub(crate) class_known: bool,
    clean_up_tokenization_spaces: bool,
}

fn bad(msg: impl Into<String>) -> ArchError {
    ArchError::BadTokenizerJson(msg.into())
}

/// The tokenizer class `AutoTokenizer` picks, without the `Fast` suffix.
fn resolve_class(tc: Option<&Value>, config: Option<&Value>) -> String {
    let named = |v: Option<&Value>| {
        v.and_then(|v| v.get("tokenizer_class"))
            .and_then(Value::as_str)
            .map(str::to_string)
    };
    let name = named(tc).or_else(|| named(config)).or_else(|| {
        let model_type = config?.get("model_type")?.as_str()?;
        MODEL_TYPE_CLASSES
            .iter()
            .find(|(t, _)| *t == model_type)
            .map(|(_, c)| c.to_string())
    });
    let name = name.unwrap_or_else(|| "PreTrainedTokenizer".into());
    name.strip_suffix("Fast").unwrap_or(&name).to_string()
}

impl HfTokenizer {
    /// Loads `tokenizer.json` and applies what the tokenizer class's constructor would.
    pub(crate) fn load(files: &SideFiles) -> Result<HfTokenizer, ArchError> {
        let Some(bytes) = files.get("tokenizer.json") else {
            return Err(ArchError::NoTokenizer(
                "this vocabulary is read through tokenizer.json, which is missing".into(),
            ));
        };
        let tc = files.json("tokenizer_config.json")?;
        let config = files.json("config.json")?;
        let class = resolve_class(tc.as_ref(), config.as_ref());
        let known = CLASSES.iter().find(|c| c.name == class);
        let class_known = known.is_some();
        let spec = known.unwrap_or(&GENERIC);
        let empty = Value::Object(Default::default());
        let tc_ref = tc.as_ref().unwrap_or(&empty);

        let mut tok =
            Tokenizer::from_bytes(bytes).map_err(|e| bad(format!("cannot be loaded: {e}")))?;
        tok.with_truncation(None)
            .map_err(|e| bad(format!("cannot disable truncation: {e}")))?;
        tok.with_padding(None);
        if tc_ref.get("split_special_tokens").and_then(Value::as_bool) == Some(true) {
            tok.set_encode_special_tokens(true);
        }

        // `add_prefix_space` as the base constructor sees it (`None` = Python `None`).
        let add_prefix_space = match tc_ref.get("add_prefix_space") {
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => None,
            None => spec.add_prefix_space,
        };
        if spec.from_slow_on_prefix && tc_ref.get("add_prefix_space").is_some_and(|v| !v.is_null())
        {
            return Err(bad(format!(
                "{}Fast with `add_prefix_space` set rebuilds the tokenizer from the slow \
                 SentencePiece tokenizer, which kiln does not reproduce",
                spec.name
            )));
        }

        let specials = special_values(spec, tc_ref, files, &tok)?;
        add_config_tokens(&mut tok, tc_ref, files, &specials)?;
        fix_pre_tokenizer_prefix(&mut tok, add_prefix_space)?;
        if spec.bert_normalizer {
            fix_bert_normalizer(&mut tok, tc_ref)?;
        }
        if spec.roberta_post_processor {
            fix_roberta_post_processor(&mut tok, tc_ref)?;
        }
        if spec.cohere_prefix && add_prefix_space == Some(true) {
            force_cohere_prefix(&mut tok)?;
        }
        if let Some((bos_default, eos_default)) = spec.template {
            let flag = |k: &str, default: bool| match tc_ref.get(k) {
                None => default,
                // Python truthiness: `null` (None) counts as false.
                Some(v) => v.as_bool().unwrap_or(false),
            };
            let add_bos = flag("add_bos_token", bos_default);
            let add_eos = flag("add_eos_token", eos_default);
            let content = |attr: &str| {
                specials
                    .iter()
                    .find(|(a, _)| *a == attr)
                    .map(|(_, s)| s.content().to_string())
            };
            bos_eos_template(
                &mut tok,
                add_bos.then(|| content("bos_token")),
                add_eos.then(|| content("eos_token")),
                content("unk_token"),
            )?;
        }
        let clean_up_tokenization_spaces = tc_ref
            .get("clean_up_tokenization_spaces")
            .and_then(Value::as_bool)
            .unwrap_or(false);
        Ok(HfTokenizer {
            tok,
            class,
            class_known,
            clean_up_tokenization_spaces,
        })
    }

    /// `tokenizer.encode(text)`: with the post-processor's special tokens, no truncation.
    pub(crate) fn encode(
        &self,
        text: &str,
        add_special_tokens: bool,
    ) -> Result<Vec<u32>, ArchError> {
        self.tok
            .encode_char_offsets(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| bad(format!("cannot encode text: {e}")))
    }

    /// `tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))`, which the converter
    /// applies to added tokens that are not `normalized`.
    pub(crate) fn round_trip(&self, token: &str) -> Result<String, ArchError> {
        let ids = self.encode(token, false)?;
        let text = self
            .tok
            .decode(&ids, false)
            .map_err(|e| bad(format!("cannot decode: {e}")))?;
        Ok(if self.clean_up_tokenization_spaces {
            clean_up_tokenization(&text)
        } else {
            text
        })
    }

    /// `tokenizer.vocab`: the model vocabulary plus added tokens.
    pub(crate) fn vocab(&self) -> HashMap<String, u32> {
        self.tok.get_vocab(true)
    }

    /// `tokenizer.added_tokens_decoder`: id → added token, sorted by id.
    pub(crate) fn added_tokens(&self) -> Vec<(u32, AddedToken)> {
        let mut list: Vec<(u32, AddedToken)> =
            self.tok.get_added_tokens_decoder().into_iter().collect();
        list.sort_by_key(|(id, _)| *id);
        list
    }

    /// Number of entries of `tokenizer.vocab`.
    pub(crate) fn vocab_len(&self) -> usize {
        self.tok.get_vocab_size(true)
    }
}

/// transformers' `clean_up_tokenization`.
fn clean_up_tokenization(s: &str) -> String {
    s.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
}

/// The special-token values the constructor ends up with, `(attribute, value)` in
/// `SPECIAL_TOKENS_ATTRIBUTES` order, `additional_special_tokens` entries last (attribute "").
fn special_values(
    spec: &ClassSpec,
    tc: &Value,
    files: &SideFiles,
    tok: &Tokenizer,
) -> Result<Vec<(&'static str, Special)>, ArchError> {
    let has_decoder = tc.get("added_tokens_decoder").is_some();
    // `special_tokens_map.json` overrides `tokenizer_config.json` only when the config has no
    // `added_tokens_decoder` (older checkpoints); its dicts are special `AddedToken`s.
    let stm = if has_decoder {
        None
    } else {
        files.json("special_tokens_map.json")?
    };
    // Values whose content names an added token are replaced by that token (with its flags).
    let added_map: HashMap<String, AddedToken> =
        if let Some(dec) = tc.get("added_tokens_decoder").and_then(Value::as_object) {
            dec.values()
                .filter_map(|v| added_token_from_json(v, None))
                .map(|t| (t.content.clone(), t))
                .collect()
        } else {
            tok.get_added_tokens_decoder()
                .into_values()
                .map(|t| (t.content.clone(), t))
                .collect()
        };
    // Only values coming from the files are swapped for the added token of the same content
    // (`_from_pretrained` edits `init_kwargs`); class defaults stay plain strings.
    let from_files = |value: Special| match added_map.get(value.content()) {
        Some(t) => Special::Token(t.clone()),
        None => value,
    };
    let mut out: Vec<(&'static str, Special)> = Vec::new();
    for &attr in SPECIAL_ATTRS {
        let value = if let Some(v) = stm.as_ref().and_then(|m| m.get(attr)) {
            match v {
                Value::Object(_) => added_token_from_json(v, Some(true)).map(Special::Token),
                other => special_from_config(other),
            }
            .map(from_files)
        } else if let Some(v) = tc.get(attr) {
            special_from_config(v).map(from_files)
        } else {
            spec.defaults
                .iter()
                .find(|(a, _)| *a == attr)
                .map(|(_, c)| Special::Str(c.to_string()))
        };
        if let Some(value) = value {
            out.push((attr, value));
        }
    }
    // `additional_special_tokens`: the config's list, then entries of special_tokens_map.json
    // that are not in it yet.
    let mut additional: Vec<Special> = tc
        .get("additional_special_tokens")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(special_from_config)
        .collect();
    if let Some(list) = stm
        .as_ref()
        .and_then(|m| m.get("additional_special_tokens"))
        .and_then(Value::as_array)
    {
        for v in list {
            let value = match v {
                Value::Object(_) => added_token_from_json(v, Some(true)).map(Special::Token),
                other => special_from_config(other),
            };
            if let Some(value) = value {
                if !additional.contains(&value) {
                    additional.push(value);
                }
            }
        }
    }
    out.extend(additional.into_iter().map(|s| ("", s)));
    for extra in spec.additional {
        out.push(("", Special::Str(extra.to_string())));
    }
    Ok(out)
}

/// The `add_tokens` call at the end of `PreTrainedTokenizerFast.__init__`.
fn add_config_tokens(
    tok: &mut Tokenizer,
    tc: &Value,
    files: &SideFiles,
    specials: &[(&'static str, Special)],
) -> Result<(), ArchError> {
    // `all_special_tokens_extended`: first value per distinct content.
    let mut extended: Vec<&Special> = Vec::new();
    for (_, s) in specials {
        if !extended.iter().any(|e| e.content() == s.content()) {
            extended.push(s);
        }
    }
    let special_strings: Vec<&str> = extended.iter().map(|s| s.content()).collect();

    // The `added_tokens_decoder` the constructor receives, by id.
    let mut decoder: Vec<(i64, AddedToken)> = Vec::new();
    if let Some(dec) = tc.get("added_tokens_decoder").and_then(Value::as_object) {
        for (id, v) in dec {
            let id: i64 = id
                .parse()
                .map_err(|_| bad(format!("added_tokens_decoder key `{id}` is not an id")))?;
            let t = added_token_from_json(v, None)
                .ok_or_else(|| bad(format!("added_tokens_decoder entry {id} has no content")))?;
            decoder.retain(|(i, _)| *i != id);
            decoder.push((id, t));
        }
    } else {
        if let Some(added) = files.json("added_tokens.json")? {
            for (content, id) in added.as_object().into_iter().flatten() {
                let Some(id) = id.as_i64() else { continue };
                let special = special_strings.contains(&content.as_str());
                decoder.retain(|(i, _)| *i != id);
                decoder.push((id, AddedToken::from(content.clone(), special)));
            }
        }
        // Entries of tokenizer.json itself (already in the backend, so `add_tokens` skips them
        // unless `added_tokens.json` gave the same id another token).
        let mut existing: Vec<(u32, AddedToken)> =
            tok.get_added_tokens_decoder().into_iter().collect();
        existing.sort_by_key(|(id, _)| *id);
        for (id, t) in existing {
            decoder.retain(|(i, _)| *i != i64::from(id));
            decoder.push((i64::from(id), t));
        }
    }
    decoder.sort_by_key(|(id, _)| *id);

    // transformers compares the config's tokens against `hash(repr(...))` of the backend's
    // `added_tokens_decoder` *keys* (ints), so every entry is passed on; `add_tokens` then skips
    // the ones identical to a token the backend already has.
    let from_decoder: Vec<AddedToken> = decoder.into_iter().map(|(_, t)| t).collect();
    let mut encoder: Vec<String> = {
        let mut existing: Vec<(u32, AddedToken)> =
            tok.get_added_tokens_decoder().into_iter().collect();
        existing.sort_by_key(|(id, _)| *id);
        existing.into_iter().map(|(_, t)| t.content).collect()
    };
    encoder.extend(from_decoder.iter().map(|t| t.content.clone()));
    let mut extra: Vec<AddedToken> = Vec::new();
    for s in extended {
        match s {
            // Strings are skipped when an added token already has that content.
            Special::Str(c) => {
                if !encoder.iter().any(|e| e == c) {
                    extra.push(AddedToken::from(c.clone(), true));
                }
            }
            // An `AddedToken` never equals a string in Python, so it is skipped only when an
            // identical token is already in the list.
            Special::Token(t) => {
                if !from_decoder.iter().any(|x| x == t) {
                    extra.push(t.clone());
                }
            }
        }
    }
    let to_add: Vec<AddedToken> = from_decoder
        .into_iter()
        .chain(extra)
        .map(|mut t| {
            t.special = t.special || special_strings.contains(&t.content.as_str());
            t
        })
        .collect();
    if !to_add.is_empty() {
        tok.add_tokens(&to_add);
    }
    Ok(())
}

fn to_json<T: serde::Serialize>(v: &T) -> Result<Value, ArchError> {
    serde_json::to_value(v).map_err(|e| bad(format!("cannot serialize a component: {e}")))
}

fn from_json<T: serde::de::DeserializeOwned>(v: Value) -> Result<T, ArchError> {
    serde_json::from_value(v).map_err(|e| bad(format!("cannot rebuild a component: {e}")))
}

/// The base constructor's `add_prefix_space` rewrite of a top-level pre-tokenizer.
fn fix_pre_tokenizer_prefix(tok: &mut Tokenizer, value: Option<bool>) -> Result<(), ArchError> {
    let Some(pre) = tok.get_pre_tokenizer() else {
        return Ok(());
    };
    let mut state = to_json(pre)?;
    let Some(current) = state.get("add_prefix_space") else {
        return Ok(());
    };
    // With `None` the Python rebuild raises a TypeError, which the constructor swallows.
    let Some(value) = value else { return Ok(()) };
    if current != &Value::Bool(value) {
        state["add_prefix_space"] = Value::Bool(value);
        let rebuilt: PreTokenizerWrapper = from_json(state)?;
        tok.with_pre_tokenizer(Some(rebuilt));
    }
    Ok(())
}

/// `BertTokenizerFast`: a normalizer disagreeing with `do_lower_case` / `strip_accents` /
/// `tokenize_chinese_chars` is rebuilt from them (the constructor's arguments win).
fn fix_bert_normalizer(tok: &mut Tokenizer, tc: &Value) -> Result<(), ArchError> {
    let Some(norm) = tok.get_normalizer() else {
        return Err(bad(
            "BertTokenizerFast needs a normalizer (transformers fails without one)",
        ));
    };
    let mut state = to_json(norm)?;
    let wanted = [
        (
            "lowercase",
            tc.get("do_lower_case")
                .cloned()
                .unwrap_or(Value::Bool(true)),
        ),
        (
            "strip_accents",
            tc.get("strip_accents").cloned().unwrap_or(Value::Null),
        ),
        (
            "handle_chinese_chars",
            tc.get("tokenize_chinese_chars")
                .cloned()
                .unwrap_or(Value::Bool(true)),
        ),
    ];
    let differs = wanted
        .iter()
        .any(|(k, v)| state.get(*k).is_some_and(|cur| cur != v));
    if differs {
        for (k, v) in wanted {
            state[k] = v;
        }
        let rebuilt: NormalizerWrapper = from_json(state)?;
        tok.with_normalizer(Some(rebuilt));
    }
    Ok(())
}

/// `RobertaTokenizerFast`: the post-processor's `add_prefix_space` / `trim_offsets` follow the
/// constructor's arguments.
fn fix_roberta_post_processor(tok: &mut Tokenizer, tc: &Value) -> Result<(), ArchError> {
    let Some(pp) = tok.get_post_processor() else {
        return Ok(());
    };
    let mut state = to_json(pp)?;
    let mut changed = false;
    for (key, default) in [("add_prefix_space", false), ("trim_offsets", true)] {
        let wanted = tc.get(key).cloned().unwrap_or(Value::Bool(default));
        if state.get(key).is_some_and(|cur| cur != &wanted) {
            state[key] = wanted;
            changed = true;
        }
    }
    if changed {
        let rebuilt: PostProcessorWrapper = from_json(state)?;
        tok.with_post_processor(Some(rebuilt));
    }
    Ok(())
}

/// `CohereTokenizerFast` with `add_prefix_space=True` patches every `"add_prefix_space":false`
/// in the pickled pre-tokenizer and decoder to true.
fn force_cohere_prefix(tok: &mut Tokenizer) -> Result<(), ArchError> {
    fn force(v: &mut Value) {
        match v {
            Value::Object(o) => {
                for (k, x) in o.iter_mut() {
                    if k == "add_prefix_space" && *x == Value::Bool(false) {
                        *x = Value::Bool(true);
                    } else {
                        force(x);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(force),
            _ => {}
        }
    }
    if let Some(pre) = tok.get_pre_tokenizer() {
        let mut state = to_json(pre)?;
        force(&mut state);
        let rebuilt: PreTokenizerWrapper = from_json(state)?;
        tok.with_pre_tokenizer(Some(rebuilt));
    }
    if let Some(dec) = tok.get_decoder() {
        let mut state = to_json(dec)?;
        force(&mut state);
        let rebuilt: DecoderWrapper = from_json(state)?;
        tok.with_decoder(Some(rebuilt));
    }
    Ok(())
}

/// `update_post_processor` of the Llama-style classes: `bos $A eos` from the add flags.
/// `bos`/`eos` are `Some(None)` when the flag is on but the token is unset (an error in Python).
fn bos_eos_template(
    tok: &mut Tokenizer,
    bos: Option<Option<String>>,
    eos: Option<Option<String>>,
    unk: Option<String>,
) -> Result<(), ArchError> {
    let resolve =
        |name: &str, t: Option<Option<String>>| -> Result<Option<(String, u32)>, ArchError> {
            let Some(t) = t else { return Ok(None) };
            let Some(t) = t else {
                return Err(bad(format!(
                    "add_{name}_token = True but {name}_token = None"
                )));
            };
            // `convert_tokens_to_ids` falls back to the unknown token's id.
            let id = tok
                .token_to_id(&t)
                .or_else(|| unk.as_deref().and_then(|u| tok.token_to_id(u)))
                .ok_or_else(|| bad(format!("{name} token `{t}` has no id")))?;
            Ok(Some((t, id)))
        };
    let bos = resolve("bos", bos)?;
    let eos = resolve("eos", eos)?;
    let mut single = String::new();
    if let Some((b, _)) = &bos {
        single.push_str(&format!("{b}:0 "));
    }
    single.push_str("$A:0");
    if let Some((e, _)) = &eos {
        single.push_str(&format!(" {e}:0"));
    }
    let mut pair = single.clone();
    if let Some((b, _)) = &bos {
        pair.push_str(&format!(" {b}:1"));
    }
    pair.push_str(" $B:1");
    if let Some((e, _)) = &eos {
        pair.push_str(&format!(" {e}:1"));
    }
    let special: Vec<(String, u32)> = bos.into_iter().chain(eos).collect();
    let template = tokenizers::processors::template::TemplateProcessing::builder()
        .try_single(single)
        .map_err(|e| bad(format!("bos/eos template: {e}")))?
        .try_pair(pair)
        .map_err(|e| bad(format!("bos/eos template: {e}")))?
        .special_tokens(special)
        .build()
        .map_err(|e| bad(format!("bos/eos template: {e}")))?;
    tok.with_post_processor(Some(template));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn class_resolution() {
        assert_eq!(
            resolve_class(
                Some(&json!({"tokenizer_class": "LlamaTokenizerFast"})),
                None
            ),
            "LlamaTokenizer"
        );
        assert_eq!(
            resolve_class(Some(&json!({})), Some(&json!({"model_type": "qwen3"}))),
            "Qwen2Tokenizer"
        );
        assert_eq!(resolve_class(None, None), "PreTrainedTokenizer");
    }

    #[test]
    fn clean_up_matches_transformers() {
        assert_eq!(clean_up_tokenization("a , b . I 'm"), "a, b. I'm");
    }
}
