use std::path::Path;

use kiln_types::{GgmlType, MetaValue};

use super::*;

fn parse(text: &str) -> Result<Recipe, RecipeError> {
    Recipe::from_toml(text, Path::new("/recipes"))
}

const FULL: &str = r#"
kiln = 1
[input]
path = "../fixtures/tiny-llama"
[output]
path = "out.gguf"
alignment = 32
[quantize]
default = "q8_0"
file-type = "q8_0"
[[rules]]
tensors = "blk.*.attn_v.weight"
layers = "0..2"
type = "f16"
label = "early attn_v"
[[rules]]
hf-tensors = ["model.layers.*.mlp.down_proj.weight", "lm_head.weight"]
type = "keep"
[[rules]]
regex = '^blk\.\d+\.ffn_(up|gate)\.weight$'
layers = [4, 5]
type = "BF16"
[[rules]]
hf-regex = "embed"
type = "F32"
[metadata]
name = "Tiny Llama"
size-label = "3.8M"
tags = ["a", "b"]
[metadata.extra]
"kiln.note" = "hello"
"kiln.count" = { u32 = 5 }
"kiln.flag" = true
"#;

#[test]
fn full_recipe_parses() {
    let r = parse(FULL).unwrap();
    assert_eq!(
        r.input.as_deref(),
        Some(Path::new("/recipes/../fixtures/tiny-llama"))
    );
    assert_eq!(r.output.as_deref(), Some(Path::new("/recipes/out.gguf")));
    assert_eq!(r.default, TypeChoice::Type(GgmlType::Q8_0));
    assert_eq!(r.file_type.map(|f| f.id), Some(7));
    assert_eq!(r.rules.len(), 4);
    assert_eq!(r.rules[0].label, "early attn_v");
    assert_eq!(r.rules[1].label, "rules[1]");
    assert_eq!(r.metadata.string("general.name"), Some("Tiny Llama"));
    assert_eq!(
        r.metadata
            .strings
            .iter()
            .map(|(k, _)| k.as_str())
            .collect::<Vec<_>>(),
        ["general.name", "general.size_label"]
    );
    assert!(r
        .metadata
        .extra
        .contains(&("kiln.count".into(), MetaValue::U32(5))));
}

#[test]
fn first_matching_rule_wins() {
    let r = parse(FULL).unwrap();
    let t = |hf, gguf, layer| TensorNames { hf, gguf, layer };
    let pick = |n| r.choose(&n);
    assert_eq!(
        pick(t(
            "model.layers.1.self_attn.v_proj.weight",
            "blk.1.attn_v.weight",
            Some(1)
        )),
        (Some(0), TypeChoice::Type(GgmlType::F16))
    );
    assert_eq!(
        pick(t(
            "model.layers.2.self_attn.v_proj.weight",
            "blk.2.attn_v.weight",
            Some(2)
        )),
        (None, TypeChoice::Type(GgmlType::Q8_0))
    );
    assert_eq!(
        pick(t(
            "model.layers.5.mlp.down_proj.weight",
            "blk.5.ffn_down.weight",
            Some(5)
        )),
        (Some(1), TypeChoice::Keep)
    );
    assert_eq!(
        pick(t(
            "model.layers.5.mlp.up_proj.weight",
            "blk.5.ffn_up.weight",
            Some(5)
        ))
        .1,
        TypeChoice::Type(GgmlType::BF16)
    );
    assert_eq!(
        pick(t(
            "model.layers.3.mlp.up_proj.weight",
            "blk.3.ffn_up.weight",
            Some(3)
        ))
        .0,
        None
    );
    assert_eq!(
        pick(t("model.embed_tokens.weight", "token_embd.weight", None)).0,
        Some(3)
    );
}

#[test]
fn layer_ranges() {
    let r = |s: &str| LayerSet::parse(&raw::LayersSpec::Range(s.into()));
    assert_eq!(
        r("3"),
        Some(LayerSet::Range {
            start: 3,
            end: Some(4)
        })
    );
    assert_eq!(
        r("0..=3"),
        Some(LayerSet::Range {
            start: 0,
            end: Some(4)
        })
    );
    assert_eq!(
        r("8.."),
        Some(LayerSet::Range {
            start: 8,
            end: None
        })
    );
    assert_eq!(r("4..4"), None);
    assert_eq!(r("x"), None);
    assert!(r("2..5").unwrap().contains(4));
    assert!(!r("2..5").unwrap().contains(5));
}

#[test]
fn unknown_keys_are_rejected_everywhere() {
    for (text, key) in [
        ("kiln = 1\ntypo = 1\n[quantize]\ndefault = \"f16\"", "typo"),
        ("kiln = 1\n[quantize]\ndefault = \"f16\"\ndefualt = \"x\"", "defualt"),
        ("kiln = 1\n[quantize]\ndefault = \"f16\"\n[[rules]]\ntensors = \"a\"\ntpye = \"f16\"\ntype = \"f16\"", "tpye"),
        ("kiln = 1\n[quantize]\ndefault = \"f16\"\n[input]\npath = \"x\"\nshards = 2", "shards"),
        ("kiln = 1\n[quantize]\ndefault = \"f16\"\n[metadata]\nnmae = \"x\"", "nmae"),
    ] {
        match parse(text) {
            Err(RecipeError::UnknownKey { key: k, .. }) => assert_eq!(k, key),
            other => panic!("{text}: {other:?}"),
        }
    }
}

#[test]
fn unknown_key_in_file_reports_file_and_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.toml");
    std::fs::write(
        &path,
        "kiln = 1\n[quantize]\ndefault = \"f16\"\nbogus = 2\n",
    )
    .unwrap();
    match Recipe::load(&path) {
        Err(RecipeError::UnknownKey {
            file, key, line, ..
        }) => {
            assert_eq!(file.as_deref(), Some(path.as_path()));
            assert_eq!(key, "bogus");
            assert_eq!(line, Some(4));
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn each_mistake_has_its_own_error() {
    assert!(matches!(
        parse("kiln = 2\n[quantize]\ndefault = \"f16\""),
        Err(RecipeError::UnsupportedVersion(2))
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"q9_9\""),
        Err(RecipeError::UnknownType { .. })
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"f16\"\nfile-type = \"nope\""),
        Err(RecipeError::UnknownFileType { .. })
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"f16\"\n[[rules]]\ntype = \"f16\""),
        Err(RecipeError::EmptySelector { rule: 0 })
    ));
    assert!(matches!(
        parse(
            "kiln = 1\n[quantize]\ndefault = \"f16\"\n[[rules]]\ntensors = \"a[\"\ntype = \"f16\""
        ),
        Err(RecipeError::BadGlob { .. })
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"f16\"\n[[rules]]\nregex = \"(\"\ntype = \"f16\""),
        Err(RecipeError::BadRegex { .. })
    ));
    assert!(matches!(
        parse(
            "kiln = 1\n[quantize]\ndefault = \"f16\"\n[[rules]]\nlayers = \"5..2\"\ntype = \"f16\""
        ),
        Err(RecipeError::BadLayers { .. })
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"f16\"\n[output]\nalignment = 24"),
        Err(RecipeError::InvalidAlignment(24))
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = \"f16\"\n[metadata.extra]\nk = 5"),
        Err(RecipeError::BadMetadata(_))
    ));
    assert!(matches!(
        parse("kiln = 1\n[quantize]\ndefault = 5"),
        Err(RecipeError::Syntax { .. })
    ));
    assert!(matches!(parse("kiln = 1"), Err(RecipeError::Syntax { .. })));
}

#[test]
fn overrides_win() {
    let r = parse(FULL).unwrap().with_overrides(&Overrides {
        input: Some("/elsewhere".into()),
        output: None,
    });
    assert_eq!(r.input.as_deref(), Some(Path::new("/elsewhere")));
    assert_eq!(r.output.as_deref(), Some(Path::new("/recipes/out.gguf")));
}
