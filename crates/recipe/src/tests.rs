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

fn dense(block_count: u32) -> ModelFacts {
    ModelFacts {
        block_count,
        gqa: 2,
        experts: 0,
        tied_embeddings: false,
        imatrix: false,
    }
}

fn t<'a>(hf: &'a str, gguf: &'a str, layer: Option<u32>) -> TensorNames<'a> {
    TensorNames {
        hf,
        gguf,
        layer,
        ne: &[256, 256],
    }
}

#[test]
fn first_matching_rule_wins() {
    let r = parse(FULL).unwrap();
    let tensors = [
        t(
            "model.layers.1.self_attn.v_proj.weight",
            "blk.1.attn_v.weight",
            Some(1),
        ),
        t(
            "model.layers.2.self_attn.v_proj.weight",
            "blk.2.attn_v.weight",
            Some(2),
        ),
        t(
            "model.layers.5.mlp.down_proj.weight",
            "blk.5.ffn_down.weight",
            Some(5),
        ),
        t(
            "model.layers.5.mlp.up_proj.weight",
            "blk.5.ffn_up.weight",
            Some(5),
        ),
        t(
            "model.layers.3.mlp.up_proj.weight",
            "blk.3.ffn_up.weight",
            Some(3),
        ),
        t("model.embed_tokens.weight", "token_embd.weight", None),
    ];
    let a = r.assign(&tensors, &dense(6));
    let picks: Vec<(Option<usize>, TypeChoice)> = a.iter().map(|x| (x.rule, x.choice)).collect();
    assert_eq!(
        picks,
        [
            (Some(0), TypeChoice::Type(GgmlType::F16)),
            (None, TypeChoice::Type(GgmlType::Q8_0)),
            (Some(1), TypeChoice::Keep),
            (Some(2), TypeChoice::Type(GgmlType::BF16)),
            (None, TypeChoice::Type(GgmlType::Q8_0)),
            (Some(3), TypeChoice::Type(GgmlType::F32)),
        ]
    );
}

fn layers(s: &str) -> Option<LayerSet> {
    LayerSet::parse(&raw::LayersSpec::Range(s.into()))
}

fn members(s: &str, n: u32) -> Vec<u32> {
    let set = layers(s).unwrap();
    (0..n).filter(|&i| set.contains(i, n)).collect()
}

#[test]
fn layer_ranges() {
    assert_eq!(members("3", 8), [3]);
    assert_eq!(members("0..=3", 8), [0, 1, 2, 3]);
    assert_eq!(members("5..", 8), [5, 6, 7]);
    assert_eq!(members("..2", 8), [0, 1]);
    assert!(layers("4..4").is_none());
    assert!(layers("5..2").is_none());
    assert!(layers("x").is_none());
    assert!(layers("n/").is_none());
    // Expressions in n use C's truncating division, as llama.cpp writes them.
    assert_eq!(members("..n/8", 32), [0, 1, 2, 3]);
    assert_eq!(members("..n/8", 6), Vec::<u32>::new());
    assert_eq!(members("n/8..7*n/8", 16), (2..14).collect::<Vec<_>>());
    assert_eq!(members("..n/16", 32), [0, 1]);
}

#[test]
fn more_bits_matches_llama_cpp_examples() {
    // Examples from llama-quant.cpp's use_more_bits, as listed in the format notes.
    assert_eq!(
        members("more-bits", 32),
        [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29, 30, 31]
    );
    assert_eq!(
        members("more-bits", 28),
        [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]
    );
    assert_eq!(members("more-bits", 16), [0, 1, 4, 7, 10, 13, 14, 15]);
    assert_eq!(members("more-bits", 6), [2, 5]);
}

const PRESET_LIKE: &str = r#"
kiln = 1
[quantize]
default = "q4_k"
require-imatrix = ["iq2_xs"]
[fallback]
Q4_K = "Q5_0"
Q6_K = "Q8_0"
[[rules]]
tensors = "output.weight"
type = "q6_k"
[[rules]]
tensors = "token_embd.weight"
when = { tied-embeddings = true }
type = "q6_k"
[[rules]]
tensors = "*attn_v.weight"
when = { experts = 8 }
type = "q8_0"
[[rules]]
tensors = "*attn_v.weight"
nth = "..2"
type = "q5_k"
[[rules]]
tensors = "*attn_v.weight"
when = { gqa-min = 4 }
type = "q6_k"
[[rules]]
tensors = "*attn_v.weight"
type = "default"
[[rules]]
tensors = "*.weight"
when = { imatrix = true, default-fits = false }
type = "q8_0"
imatrix = false
fallback = false
"#;

#[test]
fn conditions_ordinals_and_default() {
    let r = parse(PRESET_LIKE).unwrap();
    assert_eq!(r.fallback_for(GgmlType::Q4_K), Some(GgmlType::Q5_0));
    assert_eq!(r.fallback_for(GgmlType::Q8_0), None);
    assert_eq!(r.require_imatrix, [GgmlType::IQ2_XS]);
    // Deliberately out of llama.cpp's order: ordinals are counted in (block, name) order.
    let names: Vec<(String, u32)> = (0..4)
        .rev()
        .map(|i| (format!("blk.{i}.attn_v.weight"), i))
        .collect();
    let mut tensors: Vec<TensorNames<'_>> = names.iter().map(|(n, i)| t(n, n, Some(*i))).collect();
    tensors.push(t("model.embed_tokens.weight", "token_embd.weight", None));
    let pick = |m: &ModelFacts| -> Vec<TypeChoice> {
        r.assign(&tensors, m).iter().map(|a| a.choice).collect()
    };
    let q = |t| TypeChoice::Type(t);
    // Layers 3, 2, 1, 0: the first two in llama.cpp's order are layers 0 and 1.
    assert_eq!(
        pick(&dense(4)),
        [
            q(GgmlType::Q4_K),
            q(GgmlType::Q4_K),
            q(GgmlType::Q5_K),
            q(GgmlType::Q5_K),
            q(GgmlType::Q4_K)
        ]
    );
    let moe = ModelFacts {
        experts: 8,
        tied_embeddings: true,
        ..dense(4)
    };
    assert_eq!(
        pick(&moe),
        [
            q(GgmlType::Q8_0),
            q(GgmlType::Q8_0),
            q(GgmlType::Q8_0),
            q(GgmlType::Q8_0),
            q(GgmlType::Q6_K)
        ]
    );
    // default-fits: rows of 128 do not fit Q4_K's 256-element blocks.
    let narrow = [TensorNames {
        hf: "x",
        gguf: "blk.0.ffn_up.weight",
        layer: Some(0),
        ne: &[128, 4],
    }];
    let a = r.assign(
        &narrow,
        &ModelFacts {
            imatrix: true,
            ..dense(4)
        },
    );
    assert_eq!(
        (a[0].rule, a[0].choice, a[0].use_imatrix, a[0].fallback),
        (Some(6), q(GgmlType::Q8_0), false, false)
    );
    let a = r.assign(&narrow, &dense(4));
    assert_eq!((a[0].rule, a[0].choice), (None, q(GgmlType::Q4_K)));
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
        imatrix: None,
        ..Default::default()
    });
    assert_eq!(r.input.as_deref(), Some(Path::new("/elsewhere")));
    assert_eq!(r.output.as_deref(), Some(Path::new("/recipes/out.gguf")));
}
