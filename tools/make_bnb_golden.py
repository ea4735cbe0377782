#!/usr/bin/env python3
"""Regenerate (or check) the bitsandbytes 4-bit golden file `fixtures/golden/bnb-4bit.safetensors`.

Why this exists: `crates/quant/tests/bnb.rs` and `tests/packed.rs` compare kiln's NF4/FP4
quantizer and bitsandbytes writer with bytes that bitsandbytes itself produced. The fixture was
handed to the project as a finished file (`shared/golden/bnb/`); this script is the recipe that makes
it, so the oracle can be rebuilt, extended to more weights or checked against a new bitsandbytes
release instead of being trusted blindly.

What goes in the file, for each weight W in WEIGHTS (read from the bf16 checkpoint and widened to
f32, as a user quantizing an f32 copy would):

- `W.input_f32`                      the f32 input;
- for each case in CASES (`nf4`, `nf4_dq`, `fp4`, `fp4_dq`; `_dq` = `compress_statistics=True`):
  `W.<case>.packed`                  the uint8 codes `quantize_4bit` returns, shape (n/2, 1);
  `W.<case>.state.<key>`             `QuantState.as_dict(packed=True)`, i.e. exactly the tensors
                                     transformers writes beside a 4-bit weight (`absmax`, `quant_map`,
                                     `nested_absmax`, `nested_quant_map`,
                                     `quant_state.bitsandbytes__<type>` = UTF-8 JSON bytes);
  `W.<case>.dequant_f32`             what `dequantize_4bit` gives back;
- `__metadata__["cases"]`: JSON (Python's default `json.dumps`) of
  `{"W.<case>": {"blocksize", "quant_type", "double_quant", "packed_shape"}}`.

Only bitsandbytes 0.50.2 on CPU is known to reproduce the shipped file (its `quantize_4bit` is the
pure-torch "default" backend there); another version may legitimately differ, which is what
`--check` is for.

Usage (from the repository root, in a venv with tools/requirements-python-checks.txt):

    python tools/make_bnb_golden.py --out /tmp/bnb-4bit.safetensors
    python tools/make_bnb_golden.py --out /tmp/bnb-4bit.safetensors \
        --check fixtures/golden/bnb-4bit.safetensors

`--check FILE` compares the generated tensors with FILE tensor by tensor (names, dtypes, shapes,
bytes) and the metadata, reports whether the two files are byte-identical, and exits 1 on any
difference. Without `--out` the generated file goes to a temporary directory (useful with --check).
No network access: the checkpoint is read from the local folder.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
from pathlib import Path

WEIGHTS = [
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.3.mlp.down_proj.weight",
]
# Insertion order matters: it is the order of the `cases` metadata JSON.
CASES = [
    ("nf4", "nf4", False),
    ("nf4_dq", "nf4", True),
    ("fp4", "fp4", False),
    ("fp4_dq", "fp4", True),
]
BLOCKSIZE = 64
EXPECTED_BNB = "0.50.2"


def load_checkpoint_tensor(model_dir: Path, name: str):
    """One tensor of a (possibly sharded) Hugging Face checkpoint, as stored (bf16 here)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shard = json.loads(index.read_text())["weight_map"][name]
    else:
        shard = "model.safetensors"
    with safe_open(str(model_dir / shard), framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def generate(model_dir: Path):
    import torch
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    if bnb.__version__ != EXPECTED_BNB:
        print(
            f"warning: bitsandbytes {bnb.__version__}, the golden file was made with {EXPECTED_BNB}",
            file=sys.stderr,
        )
    tensors: dict[str, torch.Tensor] = {}
    cases: dict[str, dict] = {}
    for name in WEIGHTS:
        x = load_checkpoint_tensor(model_dir, name).to(torch.float32).contiguous()
        tensors[f"{name}.input_f32"] = x
        for case, quant_type, dq in CASES:
            packed, state = F.quantize_4bit(
                x, blocksize=BLOCKSIZE, quant_type=quant_type, compress_statistics=dq
            )
            key = f"{name}.{case}"
            tensors[f"{key}.packed"] = packed
            for k, v in state.as_dict(packed=True).items():
                tensors[f"{key}.state.{k}"] = v
            tensors[f"{key}.dequant_f32"] = F.dequantize_4bit(packed, state)
            cases[key] = {
                "blocksize": BLOCKSIZE,
                "quant_type": quant_type,
                "double_quant": dq,
                "packed_shape": list(packed.shape),
            }
    # save_file refuses tensors that share storage (bnb may hand back views of one code table);
    # private contiguous copies change no byte.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return tensors, {"cases": json.dumps(cases)}


def read_raw(path: Path):
    """Header JSON and data section of a safetensors file, read without any framework."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    return header, data[8 + n :], data


def compare(new: Path, ref: Path) -> list[str]:
    h_new, d_new, raw_new = read_raw(new)
    h_ref, d_ref, raw_ref = read_raw(ref)
    problems: list[str] = []
    m_new, m_ref = h_new.pop("__metadata__", None), h_ref.pop("__metadata__", None)
    if m_new != m_ref:
        for k in sorted(set(m_new or {}) | set(m_ref or {})):
            a, b = (m_new or {}).get(k), (m_ref or {}).get(k)
            if a != b:
                problems.append(f"metadata[{k!r}]: generated {a!r:.200} vs reference {b!r:.200}")
    for k in sorted(set(h_ref) - set(h_new)):
        problems.append(f"{k}: missing from generated file")
    for k in sorted(set(h_new) - set(h_ref)):
        problems.append(f"{k}: not in reference file")
    for k in sorted(set(h_new) & set(h_ref)):
        a, b = h_new[k], h_ref[k]
        if a["dtype"] != b["dtype"] or a["shape"] != b["shape"]:
            problems.append(f"{k}: {a['dtype']}{a['shape']} vs reference {b['dtype']}{b['shape']}")
            continue
        ba = d_new[a["data_offsets"][0] : a["data_offsets"][1]]
        bb = d_ref[b["data_offsets"][0] : b["data_offsets"][1]]
        if ba != bb:
            problems.append(f"{k}: bytes differ ({describe_diff(ba, bb, a['dtype'])})")
    identical = raw_new == raw_ref
    print(
        f"files byte-identical: {'yes' if identical else 'no'} "
        f"(sha256 {hashlib.sha256(raw_new).hexdigest()[:16]} vs {hashlib.sha256(raw_ref).hexdigest()[:16]})"
    )
    if not identical and not problems:
        # Same tensors and metadata, different file: header layout (order, padding) differs.
        problems.append("tensors and metadata identical but file bytes differ (header layout)")
    return problems


def describe_diff(a: bytes, b: bytes, dtype: str) -> str:
    import numpy as np

    np_dtype = {"F32": np.float32, "U8": np.uint8, "I32": np.int32, "F16": np.float16}.get(dtype)
    if np_dtype is None:
        return f"{sum(x != y for x, y in zip(a, b))} bytes"
    x, y = np.frombuffer(a, np_dtype), np.frombuffer(b, np_dtype)
    diff = np.nonzero(x != y)[0]
    first = diff[0]
    extra = ""
    if np.issubdtype(np_dtype, np.floating):
        extra = f", max |diff| {np.max(np.abs(x.astype(np.float64) - y.astype(np.float64))):.3g}"
    return f"{len(diff)} of {len(x)} elements, first at {first}: {x[first]} vs {y[first]}{extra}"


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=root / "fixtures" / "tiny-llama")
    ap.add_argument("--out", type=Path, help="where to write the generated file")
    ap.add_argument("--check", type=Path, metavar="FILE", help="compare with FILE, exit 1 on difference")
    args = ap.parse_args()
    if args.out is None and args.check is None:
        ap.error("give --out, --check, or both")

    from safetensors.torch import save_file

    tensors, metadata = generate(args.model)
    tmp = None
    out = args.out
    if out is None:
        tmp = tempfile.TemporaryDirectory(prefix="pycheck-bnb-")
        out = Path(tmp.name) / "bnb-4bit.safetensors"
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out), metadata=metadata)
    print(f"wrote {out} ({os.path.getsize(out)} bytes, {len(tensors)} tensors)")

    status = 0
    if args.check is not None:
        problems = compare(out, args.check)
        for p in problems:
            print("DIFF", p)
        print(f"check against {args.check}: {'OK' if not problems else f'{len(problems)} difference(s)'}")
        status = 1 if problems else 0
    if tmp is not None:
        tmp.cleanup()
    return status


if __name__ == "__main__":
    sys.exit(main())
