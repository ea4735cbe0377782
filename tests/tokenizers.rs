//! Tokenizer export against llama.cpp: the `tokenizer.*` keys kiln builds for the BPE (tiny-qwen2,
//! SmolLM2's byte-level BPE) and WordPiece (tiny-bert, bert-base-uncased) fixtures must equal
//! `convert_hf_to_gguf.py`'s, value for value and in the same order; and the pre-tokenizer
//! fingerprint must follow what transformers' `AutoTokenizer` does to a `tokenizer.json`.
//!
//! The expected digests of the edited tokenizers below were computed with transformers 4.57.6 /
//! tokenizers 0.22.2 (`AutoTokenizer.from_pretrained(dir).encode(chktxt)`, hashed as the converter
//! does) on the same edits of the fixture files.

mod common;

use common::*;
use kiln_arch::tokenizer::{self, pretokenizer};
use kiln_arch::{ArchError, HParams, SideFiles};
use kiln_reader::gguf::GgufFile;
use kiln_types::{MetaArray, MetaValue};
use serde_json::{json, Value};

/// The side files of a fixture, as JSON values where they are JSON (so tests can edit them).
fn fixture_files(name: &str) -> Vec<(String, Vec<u8>)> {
    let dir = fixture(name);
    kiln_arch::SIDE_FILE_NAMES
        .iter()
        .filter_map(|f| {
            std::fs::read(dir.join(f))
                .ok()
                .map(|bytes| (f.to_string(), bytes))
        })
        .collect()
}

/// A fixture's side files after `edit` has changed its JSON files (`None` deletes a file).
fn edited(name: &str, edit: impl FnOnce(&mut Vec<(String, Option<Value>)>)) -> SideFiles {
    let mut json_files: Vec<(String, Option<Value>)> = Vec::new();
    let mut files = SideFiles::new();
    for (f, bytes) in fixture_files(name) {
        if f.ends_with(".json") {
            json_files.push((
                f,
                Some(serde_json::from_slice(&bytes).expect("fixture JSON")),
            ));
        } else {
            files.insert(&f, bytes);
        }
    }
    edit(&mut json_files);
    for (f, v) in json_files {
        if let Some(v) = v {
            files.insert(&f, serde_json::to_vec(&v).expect("JSON"));
        }
    }
    files
}

fn file<'a>(files: &'a mut [(String, Option<Value>)], name: &str) -> &'a mut Value {
    files
        .iter_mut()
        .find(|(f, _)| f == name)
        .and_then(|(_, v)| v.as_mut())
        .unwrap_or_else(|| panic!("{name} in the fixture"))
}

fn hparams(files: &SideFiles) -> HParams {
    let config = files
        .json("config.json")
        .expect("JSON")
        .expect("config.json");
    HParams::from_config(&config).expect("hparams")
}

/// The pre-tokenizer digest kiln computes for a set of side files.
fn digest(files: &SideFiles) -> String {
    pretokenizer::fingerprint(files).expect("tokenizer loads")
}

/// Compares every `tokenizer.*` key with the golden summary and the key order with `order`.
fn check_against_golden(name: &str, ours: &[(String, MetaValue)], order: &[&str]) {
    let golden = golden(name);
    let meta = golden["convert-f16.gguf"]["metadata"]
        .as_object()
        .expect("golden metadata");
    let golden_keys: Vec<&String> = meta
        .keys()
        .filter(|k| k.starts_with("tokenizer."))
        .collect();
    for key in &golden_keys {
        let (_, value) = ours
            .iter()
            .find(|(k, _)| k == *key)
            .unwrap_or_else(|| panic!("{name}: kiln does not write {key}"));
        assert!(
            meta_matches(value, &meta[key.as_str()]),
            "{name}: {key} differs from llama.cpp's"
        );
    }
    let our_keys: Vec<&str> = ours.iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(our_keys, order, "{name}: key order");
    assert_eq!(our_keys.len(), golden_keys.len(), "{name}: extra keys");
}

/// The `tokenizer.*` key order of a golden GGUF file (`path` relative to the repository), when it
/// is there (`shared/` sits next to the repository on CI; the orders are also written out below).
fn golden_file_order(path: &str) -> Option<Vec<String>> {
    let bytes = std::fs::read(repo().join(path)).ok()?;
    let gguf = GgufFile::parse(&bytes).expect("golden GGUF parses");
    Some(
        gguf.metadata
            .iter()
            .map(|(k, _)| k.clone())
            .filter(|k| k.starts_with("tokenizer."))
            .collect(),
    )
}

const QWEN2_ORDER: &[&str] = &[
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.chat_template",
];

const BERT_ORDER: &[&str] = &[
    "tokenizer.ggml.token_type_count",
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.mask_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_sep_token",
    "tokenizer.ggml.normalizer.lowercase",
];

#[test]
fn tiny_qwen2_bpe_vocabulary_matches_llama_cpp() {
    let files = edited("tiny-qwen2", |_| {});
    let kv = tokenizer::gpt2_vocab(&hparams(&files), &files).expect("gpt2 vocab");
    check_against_golden("tiny-qwen2", &kv, QWEN2_ORDER);
    if let Some(order) = golden_file_order("../shared/golden/tiny-qwen2/convert-bf16.gguf") {
        assert_eq!(order, QWEN2_ORDER);
    }
    // qwen_vocab takes the same path without a tokenizer.model.
    let kv2 = tokenizer::qwen_vocab(&hparams(&files), &files).expect("qwen vocab");
    assert_eq!(kv, kv2);
}

#[test]
fn tiny_bert_wordpiece_vocabulary_matches_llama_cpp() {
    let files = edited("tiny-bert", |_| {});
    let kv = tokenizer::bert_vocab(&hparams(&files), &files).expect("bert vocab");
    check_against_golden("tiny-bert", &kv, BERT_ORDER);
    let order = golden_file_order("fixtures/golden/tiny-bert-f16.gguf").expect("golden GGUF");
    assert_eq!(order, BERT_ORDER);
}

#[test]
fn fixtures_get_their_pre_tokenizer_names() {
    let qwen = edited("tiny-qwen2", |_| {});
    assert_eq!(
        digest(&qwen),
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    );
    let summary = tokenizer::describe(&qwen);
    assert_eq!(summary.kind, "bpe");
    assert_eq!(summary.pre, Ok("smollm".to_string()));
    assert_eq!(summary.vocab_size, Some(49152));

    let bert = edited("tiny-bert", |_| {});
    let summary = tokenizer::describe(&bert);
    assert_eq!(summary.kind, "wordpiece");
    assert_eq!(summary.pre, Ok("jina-v2-en".to_string()));
    assert_eq!(summary.vocab_size, Some(30522));

    assert_eq!(tokenizer::describe(&SideFiles::new()).kind, "none");
}

#[test]
fn unknown_fingerprint_is_refused_with_its_digest() {
    // Keeping a top-level ByteLevel pre-tokenizer's add_prefix_space (the config asks for it)
    // changes the ids; llama.cpp has no name for the result.
    let files = edited("tiny-qwen2", |f| {
        file(f, "tokenizer.json")["pre_tokenizer"] = json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        });
        file(f, "tokenizer_config.json")["add_prefix_space"] = json!(true);
    });
    let err = tokenizer::gpt2_vocab(&hparams(&files), &files).expect_err("unknown digest");
    assert_eq!(
        err,
        ArchError::UnknownPreTokenizer {
            hash: "3b38ca8258382ca89be948dc3fee8914ec8df5c69161c1d48dde3ca22b7259b8".into()
        }
    );
    assert!(err.to_string().contains("3b38ca82"));
    let summary = tokenizer::describe(&files);
    assert!(summary.pre.as_ref().is_err_and(|e| e.contains("3b38ca82")));

    // A perturbed vocabulary (two tokens trading ids) is not recognized either.
    let files = edited("tiny-qwen2", |f| {
        let vocab = file(f, "tokenizer.json")["model"]["vocab"]
            .as_object_mut()
            .expect("vocab");
        let a = vocab["Ġ("].clone();
        let b = vocab["Ġ)"].clone();
        vocab.insert("Ġ(".into(), b);
        vocab.insert("Ġ)".into(), a);
    });
    assert!(matches!(
        tokenizer::gpt2_vocab(&hparams(&files), &files),
        Err(ArchError::UnknownPreTokenizer { .. })
    ));
}

#[test]
fn gpt2_class_resets_a_byte_level_prefix_space() {
    // GPT2TokenizerFast rebuilds a top-level ByteLevel pre-tokenizer with the config's
    // add_prefix_space (false here), so this is still SmolLM's fingerprint.
    let files = edited("tiny-qwen2", |f| {
        file(f, "tokenizer.json")["pre_tokenizer"] = json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        });
    });
    assert_eq!(
        digest(&files),
        "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249"
    );
}

#[test]
fn llama_tokenizer_class_replaces_the_post_processor() {
    // LlamaTokenizerFast (named, or implied by model_type "llama") puts BOS in front
    // (add_bos_token defaults to true) although tokenizer.json has no post-processor.
    let bos_first = "41101604d9690d943d35bedcfb2840ff3dc6c416674a14e62dcbe804ab7fd398";
    let files = edited("tiny-qwen2", |f| {
        let tc = file(f, "tokenizer_config.json");
        tc["tokenizer_class"] = json!("LlamaTokenizerFast");
        tc.as_object_mut()
            .expect("object")
            .remove("add_prefix_space");
    });
    assert_eq!(digest(&files), bos_first);
    let files = edited("tiny-qwen2", |f| {
        let tc = file(f, "tokenizer_config.json")
            .as_object_mut()
            .expect("object");
        tc.remove("tokenizer_class");
        tc.remove("add_prefix_space");
        file(f, "config.json")["model_type"] = json!("llama");
    });
    assert_eq!(digest(&files), bos_first);

    // add_eos_token without add_bos_token: EOS (<|im_end|>, id 2) at the end instead.
    let files = edited("tiny-qwen2", |f| {
        let tc = file(f, "tokenizer_config.json");
        tc["tokenizer_class"] = json!("LlamaTokenizerFast");
        tc["add_bos_token"] = json!(false);
        tc["add_eos_token"] = json!(true);
        tc.as_object_mut()
            .expect("object")
            .remove("add_prefix_space");
    });
    assert_eq!(
        digest(&files),
        "dc45503f494a0aeb1646d143033612e23fd6fc7215f00bb14b04b9d125ee66be"
    );

    // A bos_token missing from the vocabulary is added as a new token (id 49152) first.
    let files = edited("tiny-qwen2", |f| {
        let tc = file(f, "tokenizer_config.json");
        tc["tokenizer_class"] = json!("LlamaTokenizerFast");
        tc["bos_token"] = json!("<s>");
        tc.as_object_mut()
            .expect("object")
            .remove("add_prefix_space");
    });
    assert_eq!(
        digest(&files),
        "b77c85a2f637c22292cb24e0983893f19ddd7762a002816e8283eb1a62ef650f"
    );

    // LlamaTokenizerFast passes add_prefix_space=None, and the rebuild of a ByteLevel
    // pre-tokenizer with None fails silently in Python: its add_prefix_space=true stays.
    let files = edited("tiny-qwen2", |f| {
        let tc = file(f, "tokenizer_config.json");
        tc["tokenizer_class"] = json!("LlamaTokenizerFast");
        tc.as_object_mut()
            .expect("object")
            .remove("add_prefix_space");
        file(f, "tokenizer.json")["pre_tokenizer"] = json!({
            "type": "ByteLevel", "add_prefix_space": true, "trim_offsets": true, "use_regex": true
        });
    });
    assert_eq!(
        digest(&files),
        "89927e6a348619bb23a1f1ed06a228e7cc449c45e986acefe6f1c868b414a192"
    );

    // With add_prefix_space set, transformers rebuilds the tokenizer from the SentencePiece
    // model; kiln does not, and says so instead of guessing.
    let files = edited("tiny-qwen2", |f| {
        file(f, "tokenizer_config.json")["tokenizer_class"] = json!("LlamaTokenizerFast");
    });
    assert!(matches!(
        pretokenizer::fingerprint(&files),
        Err(ArchError::BadTokenizerJson(m)) if m.contains("slow")
    ));
}

#[test]
fn bert_class_normalizer_and_special_tokens() {
    let jina = "0876d13b50744004aa9aeae05e7b0647eac9d801b5ba4668afc01e709c15e19f";
    // BertTokenizerFast lowercases (do_lower_case defaults to true) even when tokenizer.json's
    // normalizer does not; a generic PreTrainedTokenizerFast keeps the file's normalizer.
    let files = edited("tiny-bert", |f| {
        file(f, "tokenizer.json")["normalizer"]["lowercase"] = json!(false);
    });
    assert_eq!(digest(&files), jina);
    let files = edited("tiny-bert", |f| {
        file(f, "tokenizer.json")["normalizer"]["lowercase"] = json!(false);
        file(f, "tokenizer_config.json")["tokenizer_class"] = json!("PreTrainedTokenizerFast");
    });
    assert_eq!(
        digest(&files),
        "c7dfc88b62df31147376ac735d2e20c7fc3f53e467c5ee94c2968348ed1aa979"
    );
    // Without tokenizer_config.json the class comes from config.json's model_type.
    let files = edited("tiny-bert", |f| {
        f.retain(|(n, _)| n != "tokenizer_config.json");
    });
    assert_eq!(digest(&files), jina);

    // [MASK] dropped from added_tokens comes back as a special added token (so CONTROL).
    let files = edited("tiny-bert", |f| {
        let added = file(f, "tokenizer.json")["added_tokens"]
            .as_array_mut()
            .expect("added_tokens");
        added.retain(|t| t["content"] != "[MASK]");
    });
    assert_eq!(digest(&files), jina);
    let base = tokenizer::bpe::vocab_base(&hparams(&files), &files).expect("vocab");
    assert_eq!(base.tokens[103], "[MASK]");
    assert_eq!(base.types[103], 3);
}

#[test]
fn config_added_tokens_decoder_entries_are_added() {
    // An added_tokens_decoder entry the tokenizer.json lacks becomes a new added token: it
    // changes the encoding of the test text (it occurs there) and gets a USER_DEFINED slot.
    let files = edited("tiny-qwen2", |f| {
        file(f, "tokenizer_config.json")["added_tokens_decoder"] = json!({
            "49152": {"content": "天～", "lstrip": false, "normalized": false, "rstrip": false,
                      "single_word": false, "special": false}
        });
        file(f, "config.json")["vocab_size"] = json!(49160);
    });
    assert_eq!(
        digest(&files),
        "8499b0c0a006a67b9f2d08b55938d20c44eb11bb63cc8ff3e79baec05142857a"
    );
    // The hash is unknown to llama.cpp, so read the vocabulary on its own.
    let err = tokenizer::bpe::vocab_base(&hparams(&files), &files).expect_err("unknown");
    assert!(matches!(err, ArchError::UnknownPreTokenizer { .. }));
}

#[test]
fn merges_in_string_and_pair_forms_agree() {
    let pairs = edited("tiny-qwen2", |_| {});
    let strings = edited("tiny-qwen2", |f| {
        let merges = file(f, "tokenizer.json")["model"]["merges"]
            .as_array_mut()
            .expect("merges");
        for m in merges.iter_mut() {
            let joined = format!(
                "{} {}",
                m[0].as_str().expect("part"),
                m[1].as_str().expect("part")
            );
            *m = Value::String(joined);
        }
    });
    let get = |files: &SideFiles| {
        let kv = tokenizer::gpt2_vocab(&hparams(files), files).expect("vocab");
        kv.into_iter()
            .find(|(k, _)| k == "tokenizer.ggml.merges")
            .map(|(_, v)| v)
            .expect("merges")
    };
    let a = get(&pairs);
    assert_eq!(a, get(&strings));
    let MetaValue::Array(MetaArray::String(list)) = a else {
        panic!("merges are strings")
    };
    assert_eq!(list.len(), 48900);
    assert_eq!(list[0], "Ġ t");
}

#[test]
fn pair_merges_encode_spaces_as_u0120() {
    let tok = json!({"model": {"merges": [["a b", "c"], ["d", " "]]}});
    let files = {
        let mut f = SideFiles::new();
        f.insert("tokenizer.json", serde_json::to_vec(&tok).expect("JSON"));
        f
    };
    let sv = tokenizer::special::SpecialVocab::load(&files, usize::MAX, true).expect("load");
    assert_eq!(sv.merges, ["a\u{120}b c", "d \u{120}"]);
}

#[test]
fn sentencepiece_fixtures_are_unchanged() {
    // The shared special-token code also serves llama_vocab; the SentencePiece fixtures must
    // keep llama.cpp's keys (no tokenizer.json there, so no normalizer or merges keys).
    for name in ["tiny-llama", "tiny-mixtral"] {
        let files = edited(name, |_| {});
        let kv = tokenizer::llama_vocab(&hparams(&files), &files).expect("llama vocab");
        let golden = golden(name);
        let meta = golden["convert-f16.gguf"]["metadata"]
            .as_object()
            .expect("golden metadata");
        let golden_keys: Vec<&String> = meta
            .keys()
            .filter(|k| k.starts_with("tokenizer."))
            .collect();
        assert_eq!(kv.len(), golden_keys.len(), "{name}: key count");
        for (key, value) in &kv {
            assert!(
                meta_matches(value, &meta[key.as_str()]),
                "{name}: {key} differs from llama.cpp's"
            );
        }
        assert_eq!(tokenizer::describe(&files).kind, "sentencepiece");
        assert_eq!(tokenizer::describe(&files).pre, Ok("default".to_string()));
    }
}
