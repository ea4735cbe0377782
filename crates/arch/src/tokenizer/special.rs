//! Special tokens, `add_*_token` flags and chat templates, following gguf-py's `SpecialVocab`.
//!
//! Precedence, as llama.cpp's converter applies it (and kiln copies, so the same checkpoint gives
//! the same ids):
//! 1. `tokenizer.json`'s post-processor decides `add_bos` / `add_eos` / `add_sep`
//!    (`RobertaProcessing`: all true; `TemplateProcessing`: from the single-sequence template).
//! 2. `tokenizer_config.json`: `<type>_token` strings are looked up among `tokenizer.json`'s
//!    `added_tokens` to get ids; explicit `add_<type>_token` booleans fill flags not yet decided.
//! 3. `config.json`: `<type>_token_id` integers (or the same key in its `text_config` block when
//!    the top level has none), for types still without an id.
//!
//! The first id found for a type wins; ids outside the vocabulary are ignored. The chat template
//! comes from `tokenizer_config.json`'s `chat_template`, else `chat_template.jinja`, else
//! `chat_template.json` (only when `tokenizer_config.json` exists, as in the converter).
//!
//! Written in gguf-py's order: merges, ids, add flags, chat template(s), then the normalizer flags
//! from `tokenizer.json` (`normalizer.lowercase` when a `Lowercase` or lowercasing
//! `BertNormalizer` is present, `normalizer.strip_accents` when a `StripAccents` or a
//! `BertNormalizer` with a non-null `strip_accents` is). gguf-py has no writer for a `cls` id, so
//! that type is tracked (it feeds bos/eos discovery) but never written.

use kiln_types::{MetaArray, MetaValue};
use serde_json::Value;

use crate::{ArchError, SideFiles};

const DEFAULT_TYPES: &[&str] = &["bos", "eos", "unk", "sep", "pad", "cls", "mask"];

/// GGUF key of a special token id (`GGUFWriter.add_<type>_token_id`; there is none for `cls`).
fn id_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.bos_token_id",
        "eos" => "tokenizer.ggml.eos_token_id",
        "unk" => "tokenizer.ggml.unknown_token_id",
        "sep" => "tokenizer.ggml.seperator_token_id",
        "pad" => "tokenizer.ggml.padding_token_id",
        "mask" => "tokenizer.ggml.mask_token_id",
        "eot" => "tokenizer.ggml.eot_token_id",
        "eom" => "tokenizer.ggml.eom_token_id",
        _ => return None,
    })
}

/// GGUF key of an add flag (gguf-py only has writers for these three).
fn add_key(typ: &str) -> Option<&'static str> {
    Some(match typ {
        "bos" => "tokenizer.ggml.add_bos_token",
        "eos" => "tokenizer.ggml.add_eos_token",
        "sep" => "tokenizer.ggml.add_sep_token",
        _ => return None,
    })
}

/// Chat template(s).
#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// One template.
    Single(String),
    /// Named templates (`default` becomes `tokenizer.chat_template`).
    Named(Vec<(String, String)>),
}

/// Special-token information of a checkpoint, in discovery order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SpecialVocab {
    /// BPE merges (loaded only on request).
    pub merges: Vec<String>,
    /// `(type, id)` in discovery order.
    pub ids: Vec<(String, u32)>,
    /// `(type, flag)` in discovery order.
    pub add: Vec<(String, bool)>,
    /// The chat template.
    pub chat_template: Option<ChatTemplate>,
    /// `tokenizer.ggml.normalizer.lowercase` (written only when true, as gguf-py does).
    pub normalizer_lowercase: bool,
    /// `tokenizer.ggml.normalizer.strip_accents`, when the normalizer says.
    pub normalizer_strip_accents: Option<bool>,
    types: Vec<String>,
    n_vocab: usize,
}

impl SpecialVocab {
    /// Reads the special-token information from the side files.
    pub fn load(
        files: &SideFiles,
        n_vocab: usize,
        load_merges: bool,
    ) -> Result<SpecialVocab, ArchError> {
        let mut sv = SpecialVocab {
            types: DEFAULT_TYPES.iter().map(|s| s.to_string()).collect(),
            n_vocab,
            ..Default::default()
        };
        sv.read_tokenizer_files(files, load_merges)?;
        if load_merges && sv.merges.is_empty() {
            if let Some(text) = files.text("merges.txt")? {
                sv.merges = merges_txt(&text);
            }
        }
        if let Some(config) = files.json("config.json")? {
            for typ in sv.types.clone() {
                let key = format!("{typ}_token_id");
                let id = match config.get(&key).filter(|v| !v.is_null()) {
                    Some(v) => Some(v),
                    None => config.get("text_config").and_then(|t| t.get(&key)),
                };
                sv.set_id(&typ, id);
            }
        }
        // Last, and only for ids nothing above gave: `generation_config.json` (gguf-py does not
        // read it, so a file that llama.cpp would leave without an eos id gets one here; where
        // llama.cpp writes an id, kiln writes the same). A list means several stop tokens; the
        // first is the primary one.
        if let Some(generation) = files.json("generation_config.json")? {
            for typ in ["bos", "eos", "pad"] {
                let id = match generation.get(format!("{typ}_token_id")) {
                    Some(Value::Array(ids)) => ids.first().cloned(),
                    other => other.cloned(),
                };
                sv.set_id(typ, id.as_ref());
            }
        }
        Ok(sv)
    }

    fn set_id(&mut self, typ: &str, id: Option<&Value>) {
        // Python's isinstance(tid, int) is also true for booleans; JSON booleans are not ids here.
        let Some(id) = id.and_then(Value::as_u64) else {
            return;
        };
        if (id as usize) < self.n_vocab && !self.ids.iter().any(|(t, _)| t == typ) {
            self.ids.push((typ.to_string(), id as u32));
        }
    }

    fn set_add(&mut self, typ: &str, value: bool) {
        match self.add.iter_mut().find(|(t, _)| t == typ) {
            Some(entry) => entry.1 = value,
            None => self.add.push((typ.to_string(), value)),
        }
    }

    fn read_tokenizer_files(
        &mut self,
        files: &SideFiles,
        load_merges: bool,
    ) -> Result<(), ArchError> {
        let tokenizer = files.json("tokenizer.json")?;
        let mut config = files.json("tokenizer_config.json")?;
        let added_tokens: Vec<Value> = tokenizer
            .as_ref()
            .and_then(|t| t.get("added_tokens"))
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if let Some(tok) = &tokenizer {
            if load_merges {
                self.merges = read_merges(tok)?;
            }
            if let Some(norm) = tok.get("normalizer").filter(|n| !n.is_null()) {
                self.parse_normalizer(norm);
            }
            self.post_processor_flags(tok, config.as_mut());
        }
        let Some(config) = config else {
            return Ok(());
        };
        self.chat_template = chat_template(files, &config)?;
        for typ in self.types.clone() {
            if let Some(flag) = config
                .get(format!("add_{typ}_token"))
                .and_then(Value::as_bool)
            {
                if !self.add.iter().any(|(t, _)| *t == typ) {
                    self.add.push((typ.clone(), flag));
                }
            }
            let content = match config.get(format!("{typ}_token")) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Object(o)) => match o.get("content") {
                    Some(Value::String(s)) => s.clone(),
                    _ => continue,
                },
                _ => continue,
            };
            let id = added_tokens
                .iter()
                .find(|t| t.get("content").and_then(Value::as_str) == Some(content.as_str()))
                .and_then(|t| t.get("id"))
                .cloned();
            self.set_id(&typ, id.as_ref());
        }
        Ok(())
    }

    /// `SpecialVocab._parse_normalizer`: lowercasing and accent stripping, also inside a
    /// `Sequence`.
    fn parse_normalizer(&mut self, norm: &Value) {
        match norm.get("type").and_then(Value::as_str) {
            Some("Lowercase") => self.normalizer_lowercase = true,
            Some("StripAccents") => self.normalizer_strip_accents = Some(true),
            Some("BertNormalizer") => {
                // `normalizer.get('lowercase', True)`: missing means true, `null` is falsy.
                let lowercase = match norm.get("lowercase") {
                    None => true,
                    Some(v) => v.as_bool().unwrap_or(false),
                };
                if lowercase {
                    self.normalizer_lowercase = true;
                }
                if let Some(b) = norm.get("strip_accents").and_then(Value::as_bool) {
                    self.normalizer_strip_accents = Some(b);
                }
            }
            Some("Sequence") => {
                for n in norm
                    .get("normalizers")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                {
                    self.parse_normalizer(n);
                }
            }
            _ => {}
        }
    }

    /// The post-processor rules of `SpecialVocab._try_load_from_tokenizer_json`.
    fn post_processor_flags(&mut self, tokenizer: &Value, mut config: Option<&mut Value>) {
        let get = |c: &Option<&mut Value>, k: &str| {
            c.as_ref()
                .and_then(|c| c.get(k))
                .and_then(Value::as_str)
                .map(str::to_string)
        };
        let mut special_bos = get(&config, "bos_token");
        let mut special_cls = get(&config, "cls_token");
        let mut special_eos = get(&config, "eos_token");
        let mut special_sep = get(&config, "sep_token");
        if let Some(cfg) = config.as_deref_mut() {
            if special_bos.is_none() && special_cls.is_some() {
                special_bos = special_cls.clone();
                cfg["bos_token"] = Value::from(special_bos.clone());
            }
            if special_eos.is_none() && special_sep.is_some() {
                special_eos = special_sep.clone();
                cfg["eos_token"] = Value::from(special_eos.clone());
            }
        }
        let Some(pp) = tokenizer.get("post_processor").filter(|p| !p.is_null()) else {
            return;
        };
        let processors: Vec<Value> = match pp.get("processors").and_then(Value::as_array) {
            Some(list) => list.clone(),
            None => vec![pp.clone()],
        };
        let has_config = config.is_some();
        for processor in processors {
            match processor.get("type").and_then(Value::as_str) {
                Some("RobertaProcessing") => {
                    self.set_add("bos", true);
                    self.set_add("eos", true);
                    self.set_add("sep", true);
                    if let Some(cfg) = config.as_deref_mut() {
                        if special_cls.is_none() {
                            special_cls = processor
                                .get("cls")
                                .and_then(|c| c.get(0))
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .or(special_bos.clone());
                            cfg["cls_token"] = Value::from(special_cls.clone());
                        }
                        if special_sep.is_none() {
                            special_sep = processor
                                .get("sep")
                                .and_then(|c| c.get(0))
                                .and_then(Value::as_str)
                                .map(str::to_string)
                                .or(special_eos.clone());
                            cfg["sep_token"] = Value::from(special_sep.clone());
                        }
                    }
                }
                Some("TemplateProcessing") => {
                    let single = processor
                        .get("single")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let pair = processor
                        .get("pair")
                        .and_then(Value::as_array)
                        .cloned()
                        .unwrap_or_default();
                    let special_id = |v: Option<&Value>| {
                        v.and_then(|e| e.get("SpecialToken"))
                            .and_then(|s| s.get("id"))
                            .and_then(Value::as_str)
                            .map(str::to_string)
                    };
                    let mut first = None;
                    let mut last = None;
                    if single.len() > 1 {
                        first = special_id(single.first());
                        if let Some(f) = &first {
                            if !has_config {
                                special_bos = Some(f.clone());
                            }
                            let is_bos =
                                Some(f) == special_bos.as_ref() || Some(f) == special_cls.as_ref();
                            self.set_add("bos", is_bos);
                        }
                        last = special_id(single.last());
                        if let Some(l) = &last {
                            if !has_config {
                                special_eos = Some(l.clone());
                            } else if Some(l) != special_eos.as_ref() {
                                let extra = if !self.types.iter().any(|t| t == "eot") {
                                    Some("eot")
                                } else if !self.types.iter().any(|t| t == "eom") {
                                    Some("eom")
                                } else {
                                    None
                                };
                                if let (Some(extra), Some(cfg)) = (extra, config.as_deref_mut()) {
                                    self.types.push(extra.to_string());
                                    cfg[format!("{extra}_token")] =
                                        Value::from(special_eos.clone());
                                }
                                if let Some(cfg) = config.as_deref_mut() {
                                    cfg["eos_token"] = Value::from(l.clone());
                                }
                                special_eos = Some(l.clone());
                            }
                            self.set_add("eos", Some(l) == special_eos.as_ref());
                        }
                    }
                    if !pair.is_empty() {
                        let start =
                            usize::from(first.is_some() && special_id(pair.first()) == first);
                        let stop = if last.is_some() && special_id(pair.last()) == last {
                            pair.len().saturating_sub(1)
                        } else {
                            pair.len()
                        };
                        let middle = pair.get(start..stop).unwrap_or(&[]);
                        if !middle.is_empty() {
                            let seq = |v: Option<&Value>| {
                                v.and_then(|e| e.get("Sequence"))
                                    .and_then(|s| s.get("id"))
                                    .and_then(Value::as_str)
                                    .map(str::to_string)
                            };
                            let inner_len = middle.len().saturating_sub(2);
                            if seq(middle.first()).as_deref() == Some("A")
                                && seq(middle.last()).as_deref() == Some("B")
                                && inner_len > 0
                            {
                                // "A [sep] B" adds a separator only when the single template
                                // does not already end with one; "A [sep] [eos] B" always does.
                                let inner = &middle[1..1 + inner_len];
                                let is_sep = |e: Option<String>| {
                                    e.is_some() && (e == special_sep || e == special_eos)
                                };
                                let mut add_sep =
                                    is_sep(special_id(inner.first())) && last.is_none();
                                if inner.len() == 2 && is_sep(special_id(inner.get(1))) {
                                    add_sep = true;
                                }
                                self.set_add("sep", add_sep);
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// The `tokenizer.*` keys, in gguf-py's order: merges, ids, add flags, chat template,
    /// normalizer flags.
    pub fn into_metadata(self) -> Vec<(String, MetaValue)> {
        let mut kv = Vec::new();
        if !self.merges.is_empty() {
            kv.push((
                "tokenizer.ggml.merges".into(),
                MetaValue::Array(MetaArray::String(self.merges)),
            ));
        }
        for (typ, id) in &self.ids {
            if let Some(key) = id_key(typ) {
                kv.push((key.into(), MetaValue::U32(*id)));
            }
        }
        for (typ, flag) in &self.add {
            if let Some(key) = add_key(typ) {
                kv.push((key.into(), MetaValue::Bool(*flag)));
            }
        }
        match self.chat_template {
            Some(ChatTemplate::Single(t)) if !t.is_empty() => {
                kv.push(("tokenizer.chat_template".into(), MetaValue::String(t)));
            }
            Some(ChatTemplate::Named(list)) => {
                let mut names = Vec::new();
                let mut default = None;
                for (name, template) in list {
                    let name: String = name
                        .chars()
                        .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
                        .collect();
                    if name.is_empty() {
                        continue;
                    }
                    if name == "default" {
                        default = Some(template);
                    } else {
                        kv.push((
                            format!("tokenizer.chat_template.{name}"),
                            MetaValue::String(template),
                        ));
                        names.push(name);
                    }
                }
                if !names.is_empty() {
                    // gguf-py collects the names in a set (unordered); kiln sorts them.
                    names.sort();
                    names.dedup();
                    kv.push((
                        "tokenizer.chat_templates".into(),
                        MetaValue::Array(MetaArray::String(names)),
                    ));
                }
                if let Some(t) = default {
                    kv.push(("tokenizer.chat_template".into(), MetaValue::String(t)));
                }
            }
            _ => {}
        }
        if self.normalizer_lowercase {
            kv.push((
                "tokenizer.ggml.normalizer.lowercase".into(),
                MetaValue::Bool(true),
            ));
        }
        if let Some(b) = self.normalizer_strip_accents {
            kv.push((
                "tokenizer.ggml.normalizer.strip_accents".into(),
                MetaValue::Bool(b),
            ));
        }
        kv
    }
}

fn chat_template(files: &SideFiles, config: &Value) -> Result<Option<ChatTemplate>, ArchError> {
    let from_value = |v: &Value| -> Option<ChatTemplate> {
        match v {
            Value::String(s) => Some(ChatTemplate::Single(s.clone())),
            Value::Array(list) => Some(ChatTemplate::Named(
                list.iter()
                    .filter_map(|e| {
                        Some((
                            e.get("name")?.as_str()?.to_string(),
                            e.get("template")?.as_str()?.to_string(),
                        ))
                    })
                    .collect(),
            )),
            _ => None,
        }
    };
    if let Some(v) = config.get("chat_template") {
        return Ok(from_value(v));
    }
    if let Some(text) = files.text("chat_template.jinja")? {
        return Ok(Some(ChatTemplate::Single(text)));
    }
    if let Some(json) = files.json("chat_template.json")? {
        return Ok(json.get("chat_template").and_then(from_value));
    }
    Ok(None)
}

/// `model.merges` of `tokenizer.json`. The first entry decides the format, as in gguf-py:
/// `"a b"` strings are taken as they are; `["a", "b"]` pairs (transformers 4.45+) are joined with
/// a space after encoding spaces inside a part as U+0120 (the byte-level form of a space).
pub(crate) fn read_merges(tokenizer: &Value) -> Result<Vec<String>, ArchError> {
    let Some(merges) = tokenizer
        .get("model")
        .and_then(|m| m.get("merges"))
        .and_then(Value::as_array)
    else {
        return Ok(Vec::new());
    };
    let unknown = || ArchError::BadTokenizerJson("unknown `model.merges` format".into());
    match merges.first() {
        None => Ok(Vec::new()),
        Some(Value::String(_)) => merges
            .iter()
            .map(|m| m.as_str().map(str::to_string).ok_or_else(unknown))
            .collect(),
        Some(Value::Array(first)) if first.len() == 2 && first[0].is_string() => merges
            .iter()
            .map(|m| {
                let parts = m.as_array().ok_or_else(unknown)?;
                let parts: Vec<String> = parts
                    .iter()
                    .map(|p| {
                        p.as_str()
                            .map(|s| s.replace(' ', "\u{120}"))
                            .ok_or_else(unknown)
                    })
                    .collect::<Result<_, _>>()?;
                Ok(parts.join(" "))
            })
            .collect(),
        Some(_) => Err(unknown()),
    }
}

/// `merges.txt` (the slow tokenizers' file), read when `tokenizer.json` has no merges: an
/// optional `#` header line, then one `a b` pair per line; malformed lines are skipped.
fn merges_txt(text: &str) -> Vec<String> {
    let mut lines = text.lines().peekable();
    if lines.peek().is_some_and(|l| l.trim().starts_with('#')) {
        lines.next();
    }
    lines
        .filter_map(|line| {
            let parts: Vec<&str> = line.split_whitespace().collect();
            (parts.len() == 2).then(|| format!("{} {}", parts[0], parts[1]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn files(entries: &[(&str, Value)]) -> SideFiles {
        let mut f = SideFiles::new();
        for (name, v) in entries {
            f.insert(name, serde_json::to_vec(v).unwrap());
        }
        f
    }

    #[test]
    fn llama_style_ids_come_from_config_json() {
        let f = files(&[
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}),
            ),
            (
                "config.json",
                json!({"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": null}),
            ),
        ]);
        let sv = SpecialVocab::load(&f, 512, false).unwrap();
        assert_eq!(sv.ids, vec![("bos".to_string(), 1), ("eos".to_string(), 2)]);
        assert!(sv.add.is_empty());
    }

    #[test]
    fn tokenizer_json_ids_win_over_config_json() {
        let f = files(&[
            (
                "tokenizer.json",
                json!({"added_tokens": [{"id": 7, "content": "<s>"}], "post_processor": null}),
            ),
            (
                "tokenizer_config.json",
                json!({"bos_token": "<s>", "add_bos_token": true, "chat_template": "T"}),
            ),
            ("config.json", json!({"bos_token_id": 1, "eos_token_id": 2})),
        ]);
        let sv = SpecialVocab::load(&f, 512, false).unwrap();
        assert_eq!(sv.ids, vec![("bos".to_string(), 7), ("eos".to_string(), 2)]);
        assert_eq!(sv.add, vec![("bos".to_string(), true)]);
        let kv = sv.into_metadata();
        assert_eq!(
            kv.last().unwrap(),
            &(
                "tokenizer.chat_template".to_string(),
                MetaValue::String("T".into())
            )
        );
    }

    #[test]
    fn generation_config_fills_only_missing_ids() {
        let sv = SpecialVocab::load(
            &files(&[
                ("config.json", json!({"bos_token_id": 1})),
                (
                    "generation_config.json",
                    json!({"bos_token_id": 7, "eos_token_id": [2, 3], "pad_token_id": null}),
                ),
            ]),
            100,
            false,
        )
        .unwrap();
        assert_eq!(sv.ids, [("bos".to_string(), 1), ("eos".to_string(), 2)]);
    }

    #[test]
    fn template_processing_sets_add_flags() {
        let f = files(&[
            (
                "tokenizer.json",
                json!({
                    "added_tokens": [{"id": 101, "content": "[CLS]"}, {"id": 102, "content": "[SEP]"}],
                    "post_processor": {"type": "TemplateProcessing",
                        "single": [{"SpecialToken": {"id": "[CLS]"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "[SEP]"}}],
                        "pair": [{"SpecialToken": {"id": "[CLS]"}}, {"Sequence": {"id": "A"}}, {"SpecialToken": {"id": "[SEP]"}}, {"Sequence": {"id": "B"}}, {"SpecialToken": {"id": "[SEP]"}}]}
                }),
            ),
            (
                "tokenizer_config.json",
                json!({"cls_token": "[CLS]", "sep_token": "[SEP]"}),
            ),
        ]);
        let sv = SpecialVocab::load(&f, 30522, false).unwrap();
        assert_eq!(
            sv.add,
            vec![
                ("bos".to_string(), true),
                ("eos".to_string(), true),
                ("sep".to_string(), false)
            ]
        );
        // bos := cls and eos := sep when only cls/sep are configured.
        assert_eq!(
            sv.ids.iter().find(|(t, _)| t == "bos").map(|x| x.1),
            Some(101)
        );
        assert_eq!(
            sv.ids.iter().find(|(t, _)| t == "eos").map(|x| x.1),
            Some(102)
        );
    }

    #[test]
    fn normalizer_flags_follow_the_converter() {
        let f = files(&[(
            "tokenizer.json",
            json!({"normalizer": {"type": "Sequence", "normalizers": [
                {"type": "NFD"}, {"type": "Lowercase"}, {"type": "StripAccents"}]}}),
        )]);
        let kv = SpecialVocab::load(&f, 10, false).unwrap().into_metadata();
        assert_eq!(
            kv,
            vec![
                (
                    "tokenizer.ggml.normalizer.lowercase".to_string(),
                    MetaValue::Bool(true)
                ),
                (
                    "tokenizer.ggml.normalizer.strip_accents".to_string(),
                    MetaValue::Bool(true)
                ),
            ]
        );
        // A cased BertNormalizer with strip_accents unset writes nothing.
        let f = files(&[(
            "tokenizer.json",
            json!({"normalizer": {"type": "BertNormalizer", "lowercase": false,
                                  "strip_accents": null}}),
        )]);
        assert!(SpecialVocab::load(&f, 10, false)
            .unwrap()
            .into_metadata()
            .is_empty());
    }

    #[test]
    fn cls_ids_are_tracked_but_not_written() {
        let f = files(&[(
            "config.json",
            json!({"cls_token_id": 5, "text_config": {"bos_token_id": 7}}),
        )]);
        let sv = SpecialVocab::load(&f, 10, false).unwrap();
        assert_eq!(sv.ids, vec![("bos".to_string(), 7), ("cls".to_string(), 5)]);
        let kv = sv.into_metadata();
        assert_eq!(
            kv,
            vec![("tokenizer.ggml.bos_token_id".to_string(), MetaValue::U32(7))]
        );
    }

    #[test]
    fn merges_formats() {
        let tok = json!({"model": {"merges": ["a b", "ab c"]}});
        assert_eq!(read_merges(&tok).unwrap(), ["a b", "ab c"]);
        let tok = json!({"model": {"merges": [["a", "b c"]]}});
        assert_eq!(read_merges(&tok).unwrap(), ["a b\u{120}c"]);
        let tok = json!({"model": {"merges": [1, 2]}});
        assert!(matches!(
            read_merges(&tok),
            Err(ArchError::BadTokenizerJson(_))
        ));
        assert_eq!(
            merges_txt("#version: 0.2\nh e\n\nhe llo\nbad\n"),
            ["h e", "he llo"]
        );
        // merges.txt is the fallback when tokenizer.json has none.
        let mut f = SideFiles::new();
        f.insert("merges.txt", b"x y\n".to_vec());
        assert_eq!(SpecialVocab::load(&f, 10, true).unwrap().merges, ["x y"]);
    }
}
