#!/usr/bin/env python3
"""Writes recipes/presets/*.toml: llama.cpp's llama-quantize presets as kiln recipes.

Each preset is llama-quantize's per-tensor type rules for one file type (src/llama-quant.cpp,
`llama_tensor_get_type_impl`), written out as an ordered rule list in the recipe language. The
output files are committed; this script is how they were made, and how to remake them after
changing it. Each file stands alone, so a user can copy one and edit it.

Usage: python3 tools/gen_presets.py   (from the repository root)
"""

from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "recipes" / "presets"

# ftype -> (base type, general.file_type name)
PRESETS = {
    "Q4_0": "Q4_0", "Q4_1": "Q4_1", "Q5_0": "Q5_0", "Q5_1": "Q5_1", "Q8_0": "Q8_0",
    "Q2_K": "Q2_K", "Q2_K_S": "Q2_K", "Q3_K_S": "Q3_K", "Q3_K_M": "Q3_K", "Q3_K_L": "Q3_K",
    "Q4_K_S": "Q4_K", "Q4_K_M": "Q4_K", "Q5_K_S": "Q5_K", "Q5_K_M": "Q5_K", "Q6_K": "Q6_K",
    "IQ4_NL": "IQ4_NL", "IQ4_XS": "IQ4_XS", "IQ3_XXS": "IQ3_XXS", "IQ3_S": "IQ3_S",
    "IQ3_M": "IQ3_S", "IQ2_XXS": "IQ2_XXS", "IQ2_XS": "IQ2_XS", "IQ2_S": "IQ2_XS",
    "IQ2_M": "IQ2_S", "IQ1_S": "IQ1_S", "IQ1_M": "IQ1_M", "TQ1_0": "TQ1_0", "TQ2_0": "TQ2_0",
    "MXFP4_MOE": "MXFP4",
    "F16": "F16", "BF16": "BF16", "F32": "F32",
}

# tensor_type_fallback: used when a row is not a multiple of the type's block size.
FALLBACK = [
    ("IQ1_S", "IQ4_NL"), ("IQ1_M", "IQ4_NL"), ("IQ2_XXS", "IQ4_NL"), ("IQ2_XS", "IQ4_NL"),
    ("IQ2_S", "IQ4_NL"), ("IQ3_XXS", "IQ4_NL"), ("IQ3_S", "IQ4_NL"), ("IQ4_XS", "IQ4_NL"),
    ("Q2_K", "Q4_0"), ("Q3_K", "Q4_0"), ("TQ1_0", "Q4_0"), ("TQ2_0", "Q4_0"),
    ("Q4_K", "Q5_0"), ("Q5_K", "Q5_1"), ("Q6_K", "Q8_0"),
]

REQUIRE = ["IQ3_XXS", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_M", "IQ1_S"]

ATTN_V = ["*attn_v.weight*", "*attn_qkv.weight*", "*attn_kv_b.weight*"]
ATTN_K = ["*attn_k.weight*"]
ATTN_Q = ["*attn_q.weight*"]
ATTN_OUT = ["*attn_output.weight*"]
FFN_DOWN = ["*ffn_down*"]
FFN_GATE_UP = ["*ffn_gate*", "*ffn_up*"]
OUTPUT = ["output.weight"]
TOKEN_EMBD = ["token_embd.weight", "per_layer_token_embd.weight"]
BIG70 = {"block-count": 80, "gqa-min": 2}

VERY_LOW = {"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}
# Branch I: attn_output goes to Q5_K with 8 experts for these file types.
ATTN_OUT_MOE = {"Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M",
                "IQ3_S", "IQ3_M", "IQ4_XS"}


def rule(label, tensors, ty, when=None, layers=None, nth=None, imatrix=None, fallback=None):
    return dict(label=label, tensors=tensors, type=ty, when=when or {}, layers=layers, nth=nth,
                imatrix=imatrix, fallback=fallback)


def rules_for(ftype, base):
    if ftype in ("F16", "BF16", "F32"):
        return []  # llama-quantize applies no mixing rules to float file types
    r = []

    # Branch A: the output tensor (and token_embd when the embeddings are tied).
    def output_rules(tensors, when_extra, what):
        when = dict(when_extra)
        out = []
        if ftype == "MXFP4_MOE":
            out.append(rule(f"{what}: Q8_0 in MXFP4_MOE files", tensors, "Q8_0", when, imatrix="optional"))
            return out
        out.append(rule(f"{what}: Q8_0 when rows do not fit {base} blocks", tensors, "Q8_0",
                        dict(when, **{"default-fits": False}), imatrix="optional"))
        if ftype in {"IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"}:
            out.append(rule(f"{what}: Q5_K", tensors, "Q5_K", when, imatrix="optional"))
        elif base != "Q8_0":
            out.append(rule(f"{what}: Q6_K", tensors, "Q6_K", when, imatrix="optional"))
        else:
            out.append(rule(f"{what}: default", tensors, "default", when, imatrix="optional"))
        return out

    r += output_rules(OUTPUT, {}, "output")
    r += output_rules(["token_embd.weight", "per_layer_token_embd.weight"],
                      {"tied-embeddings": True}, "tied token_embd")

    # Branch B: MXFP4_MOE.
    if ftype == "MXFP4_MOE":
        r.append(rule("token_embd: Q8_0", TOKEN_EMBD, "Q8_0", imatrix="optional"))
        r.append(rule("expert tensors: MXFP4", ["*"], "MXFP4", {"expert-tensor": True}))
        r.append(rule("everything else: Q8_0", ["*"], "Q8_0"))
        return r

    # Branch C: untied token_embd.
    emb = {"IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ1_S": "Q2_K", "IQ1_M": "Q2_K",
           "IQ2_S": "IQ3_S", "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S",
           "TQ1_0": "Q4_K", "TQ2_0": "Q4_K"}.get(ftype, "default")
    r.append(rule(f"token_embd: {emb}", TOKEN_EMBD, emb, imatrix="optional"))

    # Branch D: the very-low-bit presets share one branch, entered by every other tensor.
    if ftype in VERY_LOW:
        hi = "IQ3_S" if ftype in ("IQ2_S", "IQ2_M") else "Q2_K"
        r.append(rule("attn_v: Q4_K with GQA >= 4", ATTN_V, "Q4_K", {"gqa-min": 4}))
        r.append(rule("attn_v: Q4_K with 4+ experts", ATTN_V, "Q4_K", {"experts-min": 4}))
        r.append(rule(f"attn_v: {hi}", ATTN_V, hi))
        r.append(rule("attn_k: Q4_K with 8 experts", ATTN_K, "Q4_K", {"experts": 8}))
        r.append(rule("attn_k: default", ATTN_K, "default"))
        # llama.cpp counts ffn_down tensors here (i_ffn_down < n_layer/8); kiln uses the layer.
        r.append(rule(f"ffn_down: {hi} in the first eighth of the layers", FFN_DOWN, hi, layers="..n/8"))
        r.append(rule("ffn_down: default", FFN_DOWN, "default"))
        r.append(rule("attn_output: Q5_K with 8 experts", ATTN_OUT, "Q5_K", {"experts": 8}))
        ao = {"IQ2_M": "IQ3_S", "IQ2_S": "IQ3_S", "IQ1_M": "IQ2_XXS", "IQ1_S": "IQ2_XXS"}.get(ftype, "default")
        r.append(rule(f"attn_output: {ao}", ATTN_OUT, ao))
        return r

    # Branch E: attn_v-like tensors. The 8-expert and 70B adjustments apply after the choice,
    # so they are written first (first match wins).
    r.append(rule("attn_v: Q8_0 with 8 experts", ATTN_V, "Q8_0", {"experts": 8}))
    e = []  # (label, type, when, nth)
    if ftype == "Q2_K":
        e += [("Q4_K with GQA >= 4", "Q4_K", {"gqa-min": 4}, None), ("Q3_K", "Q3_K", {}, None)]
    elif ftype == "Q2_K_S":
        e += [("Q4_K with GQA >= 4", "Q4_K", {"gqa-min": 4}, None)]
    elif ftype == "IQ3_XXS":
        e += [("Q4_K with GQA >= 4", "Q4_K", {"gqa-min": 4}, None),
              ("IQ3_S without imatrix", "IQ3_S", {"imatrix": False}, None)]
    elif ftype == "IQ3_S":
        e += [("Q4_K with GQA >= 4", "Q4_K", {"gqa-min": 4}, None)]
    elif ftype == "IQ3_M":
        e += [("Q4_K", "Q4_K", {}, None)]
    elif ftype == "Q3_K_M":
        e += [("Q5_K for the first two", "Q5_K", {}, "..2"), ("Q4_K", "Q4_K", {}, None)]
    elif ftype == "Q3_K_L":
        e += [("Q5_K", "Q5_K", {}, None)]
    elif ftype in ("IQ4_NL", "IQ4_XS"):
        e += [("Q5_K with GQA >= 4", "Q5_K", {"gqa-min": 4}, None)]
    elif ftype in ("Q4_K_M", "Q5_K_M"):
        e += [("Q6_K on more-bits tensors", "Q6_K", {}, "more-bits")]
    elif ftype == "Q4_K_S":
        e += [("Q5_K for the first four", "Q5_K", {}, "..4")]
    for label, ty, when, nth in e:
        if ty in ("Q3_K", "Q4_K"):
            r.append(rule(f"attn_v: {label}, Q5_K on 70B models", ATTN_V, "Q5_K", dict(when, **BIG70), nth=nth))
        r.append(rule(f"attn_v: {label}", ATTN_V, ty, when, nth=nth))
    if base in ("Q3_K", "Q4_K"):
        r.append(rule("attn_v: Q5_K on 70B models", ATTN_V, "Q5_K", BIG70))
    r.append(rule("attn_v: default", ATTN_V, "default"))

    # Branch F / G: attn_k, attn_q.
    r.append(rule("attn_k: Q8_0 with 8 experts", ATTN_K, "Q8_0", {"experts": 8}))
    if ftype == "IQ3_XXS":
        r.append(rule("attn_k: IQ2_S", ATTN_K, "IQ2_S"))
        r.append(rule("attn_q: IQ2_S", ATTN_Q, "IQ2_S"))

    # Branch H: ffn_down, by layer index (llama.cpp's counter equals it for these models).
    h = []  # (label, type, when, layers)
    if ftype == "Q2_K":
        h += [("Q3_K", "Q3_K", {}, None)]
    elif ftype == "Q2_K_S":
        h += [("Q4_K in the first eighth", "Q4_K", {}, "..n/8")]
    elif ftype == "IQ3_XXS":
        h += [("Q4_K in the first eighth without imatrix", "Q4_K", {"imatrix": False}, "..n/8"),
              ("Q3_K without imatrix", "Q3_K", {"imatrix": False}, None)]
    elif ftype == "Q3_K_M":
        h += [("Q5_K in the first sixteenth", "Q5_K", {}, "..n/16"), ("Q4_K", "Q4_K", {}, None)]
    elif ftype == "IQ3_M":
        h += [("Q4_K in the first eighth", "Q4_K", {}, "..n/8"),
              ("Q4_K on more-bits layers with 8 experts", "Q4_K", {"experts": 8}, "more-bits")]
    elif ftype == "Q3_K_L":
        h += [("Q5_K", "Q5_K", {}, None)]
    elif ftype in ("Q4_K_M", "Q5_K_M"):
        h += [("Q6_K on more-bits layers", "Q6_K", {}, "more-bits")]
    elif ftype in ("IQ4_NL", "IQ4_XS"):
        h += [("Q5_K in the first eighth without imatrix", "Q5_K", {"imatrix": False}, "..n/8")]
    elif ftype == "Q4_K_S":
        h += [("Q5_K in the first eighth", "Q5_K", {}, "..n/8")]
    elif ftype == "Q4_0":
        h += [("Q4_1 in the first eighth with imatrix", "Q4_1", {"imatrix": True}, "..n/8")]
    elif ftype == "Q5_0":
        h += [("Q5_1 in the first eighth with imatrix", "Q5_1", {"imatrix": True}, "..n/8")]
    for label, ty, when, layers in h:
        r.append(rule(f"ffn_down: {label}", FFN_DOWN, ty, when, layers=layers))
    if h:
        r.append(rule("ffn_down: default", FFN_DOWN, "default"))

    # Branch I: attn_output.
    if ftype in ATTN_OUT_MOE:
        r.append(rule("attn_output: Q5_K with 8 experts", ATTN_OUT, "Q5_K", {"experts": 8}))
    ao = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(ftype)
    if ao:
        r.append(rule(f"attn_output: {ao}", ATTN_OUT, ao))
    return r


def toml_value(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, list):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return '"' + str(v) + '"'


def render(ftype, base):
    lines = [
        f"# llama.cpp's {ftype} preset as a kiln recipe: the same per-tensor types as",
        f"# `llama-quantize MODEL OUT {ftype}`. Generated by tools/gen_presets.py from llama.cpp's rules",
        "# (src/llama-quant.cpp); copy it and edit the rules to make your own mixture.",
        "# Rules are tried in order and the first whose selectors and conditions all hold decides;",
        "# tensors no rule matches get the default. See docs/recipes.md.",
        f"# Usage: kiln build recipes/presets/{ftype.lower()}.toml --input MODEL --output OUT.gguf [--imatrix FILE]",
        "kiln = 1",
        "",
        "[quantize]",
        f'default = "{base}"',
        f'file-type = "{ftype}"',
    ]
    if ftype not in ("F16", "BF16", "F32"):
        req = REQUIRE + (["Q2_K"] if ftype == "Q2_K_S" else [])
        lines.append("require-imatrix = " + toml_value(req))
        lines += ["", "# When a row is not a multiple of a type's block size (e.g. hidden size 896).", "[fallback]"]
        lines += [f'{a} = "{b}"' for a, b in FALLBACK]
    for rl in rules_for(ftype, base):
        lines += ["", "[[rules]]", f'label = "{rl["label"]}"', f"tensors = {toml_value(rl['tensors'])}"]
        if rl["layers"]:
            lines.append(f'layers = "{rl["layers"]}"')
        if rl["nth"]:
            lines.append(f'nth = "{rl["nth"]}"')
        if rl["when"]:
            lines.append("when = { " + ", ".join(f"{k} = {toml_value(v)}" for k, v in rl["when"].items()) + " }")
        if rl["imatrix"] is not None:
            lines.append(f"imatrix = {toml_value(rl['imatrix'])}")
        lines.append(f'type = "{rl["type"]}"')
    return "\n".join(lines) + "\n"


OVERRIDES = """
# llama-quantize's command-line overrides, written as rules placed before the preset's own:
#   --token-embedding-type q4_0 --output-tensor-type q8_0 (no shape fallback for these two)
#   --tensor-type attn_v=q8_0 --tensor-type ffn_down=q6_k (regexes, matched anywhere in the name)
[[rules]]
label = "--token-embedding-type q4_0"
tensors = ["token_embd.weight", "per_layer_token_embd.weight"]
fallback = false
imatrix = "optional"
type = "Q4_0"

[[rules]]
label = "--output-tensor-type q8_0"
tensors = ["output.weight"]
fallback = false
imatrix = "optional"
type = "Q8_0"

[[rules]]
label = "--tensor-type attn_v=q8_0"
regex = "attn_v"
type = "Q8_0"

[[rules]]
label = "--tensor-type ffn_down=q6_k"
regex = "ffn_down"
type = "Q6_K"
"""


def examples():
    out = OUT.parent / "examples"
    out.mkdir(parents=True, exist_ok=True)
    pure = render("Q4_K_M", "Q4_K")
    pure = pure[: pure.index("\n[[rules]]")] + "\n"
    pure = pure.replace(
        "# llama.cpp's Q4_K_M preset as a kiln recipe",
        "# llama-quantize --pure Q4_K_M: the default type everywhere, no mixing rules (the shape\n"
        "# fallback still applies). From the Q4_K_M preset",
    )
    (out / "q4_k_m-pure.toml").write_text(pure)
    over = render("Q4_K_S", "Q4_K")
    cut = over.index("\n[[rules]]")
    over = over[:cut] + "\n" + OVERRIDES.strip("\n") + "\n" + over[cut:]
    over = over.replace(
        "# llama.cpp's Q4_K_S preset as a kiln recipe",
        "# llama-quantize Q4_K_S with per-tensor overrides (see the rules below). From the Q4_K_S preset",
    )
    (out / "q4_k_s-overrides.toml").write_text(over)


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for ftype, base in PRESETS.items():
        (OUT / f"{ftype.lower()}.toml").write_text(render(ftype, base))
    examples()
    print(f"wrote {len(PRESETS)} presets to {OUT} and 2 examples")


if __name__ == "__main__":
    main()
