#!/usr/bin/env python3
"""Build kiln's packed Hugging Face folders and load them in transformers: do they load, and do they
compute what the files say?

Why this exists: kiln's compressed-tensors (`pack-quantized`, `int-quantized`) and bitsandbytes
4-bit writers are tested in Rust against the layouts in `docs/packed.md` and
`shared/docs/ecosystem.md`, but nothing in CI loads a folder in the Python stack users run. This
script closes that loop on the tiny-llama fixture, on CPU (docs/python-checks.md has the results):

1. for every case (a TOML recipe written into a temporary directory; `--extra-recipe` adds more,
   `--folder` checks a folder built elsewhere), run `kiln build` (and `kiln calibrate` once when a
   built-in case needs statistics);
2. load the folder with `AutoModelForCausalLM.from_pretrained(folder, dtype=..., device_map="cpu")`
   and fail on missing, unexpected or mismatched keys;
3. decode every packed layer of the written files with numpy only (its own safetensors reader, no
   torch, compressed-tensors or bitsandbytes) and compare with what the loaded model really
   multiplies by, exactly (tolerance 0):
   - compressed-tensors: the module's `weight` once the library decompressed it (transformers
     keeps `weight_packed`; compressed-tensors decompresses on the first forward), the weights of a
     second load through `CompressedTensorsConfig(dequantize=True)` (transformers' load-time
     dequantization), and each module applied to an identity matrix;
   - bitsandbytes: `bitsandbytes.functional.dequantize_4bit` on the loaded `Params4bit` and its
     `QuantState`, and each module applied to an identity matrix (as loaded, and computing in the
     load dtype);
4. cross-check the bytes against the libraries' own writers: compressed-tensors'
   `PackedQuantizationCompressor.compress` on the decoded weights with the file's scales must give
   the file's `weight_packed` / `weight_zero_point`; for bitsandbytes the same checkpoint is
   quantized by transformers + bitsandbytes on load and saved with `save_pretrained`, and every
   tensor must be identical;
5. run a forward pass on a few token ids and compare the logits with the original checkpoint (the
   quantization error: small, not zero; large on this fixture, whose random heavy-tailed weights
   amplify errors) and with the original checkpoint whose linear weights were replaced by the
   numpy-decoded ones (the loader's arithmetic: should agree to ~1e-6, in practice exactly).

"Effective" weights are rounded as each runtime rounds them: compressed-tensors dequantizes in the
scale's dtype after loading (the load dtype) on the default route and in the file's scale dtype on
the dequantize=True route; bitsandbytes' `dequantize_4bit` returns the quant state's `dtype`, its
forward dequantizes straight to the compute dtype.

Status per case: `ok`; `warn` for differences that do not change a loaded value and for known
limits of the loaders that the libraries' own output hits the same way (each explained in the
notes; `--strict` turns them into failures); `FAIL` otherwise. Exit status 1 when any case fails.

vLLM is not used: it does not install on a CPU-only machine without building it from source.

Usage (repository root, venv from tools/requirements-python-checks.txt):

    CARGO_TARGET_DIR=/work/target-py cargo build --release -p kiln-cli
    python tools/check_packed_load.py --kiln /work/target-py/release/kiln --model fixtures/tiny-llama

Options: `--case NAME` (repeatable) runs a subset; `--extra-recipe FILE` (repeatable) adds a recipe
(its input and output paths are overridden, its `[calibration] stats` path is used as written;
`int-quantized` W8A8 folders are decoded too, the reference model quantizing its linear inputs with
the static `input_scale` as compressed-tensors does); `--folder DIR` (repeatable) checks a built
folder; `--stats FILE` reuses calibration statistics; `--dtype float32|bfloat16` is the load dtype
(default float32); `--keep DIR` builds into DIR and keeps it. No network: the hub is switched off
before transformers is imported.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

RULE_SELECTOR = "model.layers.*.*_proj.weight"
TOKENS = [1, 17, 243, 88, 401, 5, 311, 29, 150, 77, 460, 3, 222, 64, 199, 2]

# Tolerances. Weights: the loader must reproduce the files' values exactly (same formula, same
# rounding); any non-zero difference is reported as a failure. Logits against the decoded
# reference: only summation order differs.
WEIGHT_ATOL = 0.0
REF_LOGITS_RTOL = 1e-4


@dataclass
class Case:
    name: str
    fmt: str  # "compressed-tensors" or "bitsandbytes"
    quantize: dict
    rule_type: str
    needs_stats: bool = False
    recipe_file: Path | None = None  # --extra-recipe
    folder: Path | None = None  # --folder: already built


CASES = [
    Case("ct-w4-g128-sym-rtn", "compressed-tensors", {"method": "rtn", "group-size": 128}, "int4"),
    Case("ct-w4-g128-sym-gptq", "compressed-tensors", {"method": "gptq", "group-size": 128}, "int4", True),
    Case("ct-w8-channel-sym", "compressed-tensors", {"method": "rtn", "group-size": "channel"}, "int8"),
    Case("ct-w4-g128-asym", "compressed-tensors",
         {"method": "rtn", "group-size": 128, "symmetric": False}, "int4"),
    Case("bnb-nf4", "bitsandbytes", {}, "nf4"),
    Case("bnb-nf4-dq", "bitsandbytes", {"double-quant": True}, "nf4"),
    Case("bnb-fp4", "bitsandbytes", {}, "fp4"),
]


def toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))


def write_recipe(case: Case, model: Path, out: Path, stats: Path | None, path: Path) -> None:
    lines = [
        "kiln = 1",
        "",
        "[input]",
        f"path = {toml_value(model)}",
        "",
        "[output]",
        f"path = {toml_value(out)}",
        f"format = {toml_value(case.fmt)}",
        "",
    ]
    if case.needs_stats:
        lines += ["[calibration]", f"stats = {toml_value(stats)}", ""]
    lines += ["[quantize]", 'default = "keep"']
    lines += [f"{k} = {toml_value(v)}" for k, v in case.quantize.items()]
    lines += ["", "[[rules]]", f"hf-tensors = {toml_value(RULE_SELECTOR)}", f"type = {toml_value(case.rule_type)}", ""]
    path.write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------
# numpy-only reading and decoding of the written files

NP_DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
    "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
}


FILE_DTYPES: dict[str, str] = {}  # tensor name -> safetensors dtype of the last files read
ST_TO_TORCH_NAME = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of one file; BF16 widened to float32 exactly (numpy has no bfloat16)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + n])
    header.pop("__metadata__", None)
    body = memoryview(data)[8 + n :]
    out = {}
    for name, info in header.items():
        s, e = info["data_offsets"]
        raw = body[s:e]
        FILE_DTYPES[name] = ST_TO_TORCH_NAME.get(info["dtype"], info["dtype"])
        if info["dtype"] == "BF16":
            arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, np.dtype(NP_DTYPES[info["dtype"]]).newbyteorder("<"))
        out[name] = arr.reshape(info["shape"]).copy()
    return out


def read_folder(folder: Path) -> dict[str, np.ndarray]:
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    tensors = {}
    for f in files:
        tensors.update(read_safetensors(folder / f))
    return tensors


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values rounded (to nearest even) to `dtype` and widened back to float32."""
    x = np.asarray(x, np.float32)
    if dtype in ("float32", "torch.float32"):
        return x
    if dtype in ("float16", "torch.float16"):
        return x.astype(np.float16).astype(np.float32)
    if dtype in ("bfloat16", "torch.bfloat16"):
        u = x.view(np.uint32).astype(np.uint64)
        u = (u + 0x7FFF + ((u >> 16) & 1)) >> 16 << 16
        return u.astype(np.uint32).view(np.float32)
    raise ValueError(dtype)


def unpack_int32_rows(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """compressed-tensors' packing: each row a little-endian bit stream, element i at bits
    [i*bits, (i+1)*bits), stored value = signed value + 2**(bits-1)."""
    rows = packed.astype("<i4").view(np.uint8).reshape(packed.shape[0], -1)
    stream = np.unpackbits(rows, axis=1, bitorder="little")[:, : count * bits]
    weights = (1 << np.arange(bits)).astype(np.int64)
    u = (stream.reshape(packed.shape[0], count, bits).astype(np.int64) * weights).sum(axis=2)
    return u - (1 << (bits - 1))


def ct_schemes(qconfig: dict) -> list[tuple[list[str], dict]]:
    return [(g["targets"], g) for _, g in sorted(qconfig["config_groups"].items())]


def decode_compressed_tensors(tensors: dict, qconfig: dict, dtypes: dict):
    """prefix -> (weight float32 (out, in), info). Dequantization `(q - zp) * scale` computed in
    float32, which is exact for bf16/f16/f32 scales and <= 8-bit integers; the caller rounds it to
    the dtype a given loader computes in (`info["scale_dtype"]` is the file's)."""
    groups = ct_schemes(qconfig)
    out = {}
    for key in sorted(tensors):
        if key.endswith(".weight_packed"):
            prefix, kind = key[: -len(".weight_packed")], "pack-quantized"
        elif key.endswith(".weight_scale") and tensors.get(key[: -len("_scale")], np.zeros(0)).dtype == np.int8:
            prefix, kind = key[: -len(".weight_scale")], "int-quantized"
        else:
            continue
        scheme = pick_scheme(prefix, groups)
        wargs = scheme["weights"]
        bits = wargs["num_bits"]
        scale = tensors[prefix + ".weight_scale"].astype(np.float32)
        if kind == "pack-quantized":
            out_f, in_f = (int(v) for v in tensors[prefix + ".weight_shape"])
            q = unpack_int32_rows(tensors[prefix + ".weight_packed"], bits, in_f)
        else:
            q = tensors[prefix + ".weight"].astype(np.int64)
            out_f, in_f = q.shape
        strategy = wargs["strategy"]
        if strategy == "group":
            gsize = wargs["group_size"]
        elif strategy == "channel":
            gsize = in_f
        elif strategy == "tensor":
            gsize = in_f
            scale = np.broadcast_to(scale.reshape(1, 1), (out_f, 1))
        else:
            raise ValueError(f"{prefix}: strategy {strategy} not decoded here")
        zp = np.zeros(scale.shape, np.int64)
        zkey = prefix + ".weight_zero_point"
        if zkey in tensors:
            z = tensors[zkey]
            if kind == "pack-quantized":
                zp = unpack_int32_rows(z.T.copy(), bits, out_f).T
            else:
                zp = z.astype(np.int64).reshape(scale.shape)
        elif not wargs["symmetric"]:
            raise ValueError(f"{prefix}: asymmetric scheme but no weight_zero_point")
        col_group = np.arange(in_f) // gsize
        w = (q - zp[:, col_group]).astype(np.float32) * scale[:, col_group]
        info = {"kind": kind, "bits": bits, "strategy": strategy, "group": gsize,
                "symmetric": wargs["symmetric"], "has_zp": zkey in tensors,
                "scale_dtype": dtypes[prefix + ".weight_scale"]}
        if scheme.get("input_activations"):
            info["input_scale"] = float(tensors[prefix + ".input_scale"].reshape(-1)[0])
            info["input_args"] = scheme["input_activations"]
        out[prefix] = (w, info)
    return out


def pick_scheme(prefix: str, groups):
    import re

    for targets, g in groups:
        for t in targets:
            if t == prefix or (t.startswith("re:") and re.match(t[3:], prefix)):
                return g
    for targets, g in groups:
        if "Linear" in targets:
            return g
    raise ValueError(f"{prefix}: no config group targets it")


def decode_bnb(tensors: dict):
    """prefix -> (weight float32 (out, in), info): bitsandbytes' table lookup
    `quant_map[code] * absmax[block]` in float32, absmax first rebuilt from its 8-bit codes with
    double quantization. Not rounded: `dequantize_4bit` rounds to the state's `dtype`
    (`info["dtype"]`), a forward pass to the layer's compute dtype."""
    out = {}
    for key in sorted(tensors):
        if ".weight.quant_state.bitsandbytes__" not in key:
            continue
        wkey = key.split(".quant_state.")[0]
        prefix = wkey[: -len(".weight")]
        state = json.loads(bytes(tensors[key]).decode("utf-8"))
        shape = state["shape"]
        n = int(np.prod(shape))
        packed = tensors[wkey].reshape(-1)
        codes = np.empty(packed.size * 2, np.int64)
        codes[0::2] = packed >> 4
        codes[1::2] = packed & 0x0F
        codes = codes[:n]
        qmap = tensors[wkey + ".quant_map"].astype(np.float32)
        absmax = tensors[wkey + ".absmax"]
        nested = "nested_blocksize" in state
        if nested:
            nqmap = tensors[wkey + ".nested_quant_map"].astype(np.float32)
            nabs = tensors[wkey + ".nested_absmax"].astype(np.float32)
            blk = np.arange(absmax.size) // state["nested_blocksize"]
            absmax = nqmap[absmax.astype(np.int64)] * nabs[blk] + np.float32(state["nested_offset"])
        absmax = absmax.astype(np.float32)
        w = qmap[codes] * absmax[np.arange(n) // state["blocksize"]]
        info = {"kind": state["quant_type"], "nested": nested, "dtype": state["dtype"], "blocksize": state["blocksize"]}
        out[prefix] = (w.reshape(shape).astype(np.float32), info)
    return out


# ---------------------------------------------------------------------------------------------
# torch side


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_model(folder: Path, dtype: str, **kw):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(dtype), device_map="cpu", output_loading_info=True, **kw
    )
    model.eval()
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")}
    return model, bad


def logits(model, ids):
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a.astype(np.float64) - b.astype(np.float64)) / np.linalg.norm(b.astype(np.float64)))


def max_abs(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) if a.size else 0.0


def identity_weights(module, in_features: int, dtype) -> np.ndarray:
    """What the module multiplies by, seen from outside: module(I) = I @ W^T = W^T, exact because
    every output element is one product with 1.0 plus zeros."""
    import torch

    with torch.no_grad():
        y = module(torch.eye(in_features, dtype=dtype))
    return y.float().numpy().T


@dataclass
class Result:
    name: str
    fmt: str = ""
    status: str = "FAIL"
    layers: int = 0
    w_loaded: float | None = None
    w_alt: float | None = None
    w_identity: float | None = None
    rel_orig: float | None = None
    rel_orig_asloaded: float | None = None
    rel_ref: float | None = None
    cross: str = "-"
    as_loaded_logits: object = None
    w_alt_upstream: bool = False
    notes: list[str] = field(default_factory=list)


def reference_model(original, decoded: dict, dtype):
    """The original checkpoint with its linear weights replaced by the numpy-decoded ones; with
    static input scales (W8A8), inputs are fake-quantized the way compressed-tensors does."""
    import torch

    ref = copy.deepcopy(original)
    modules = dict(ref.named_modules())
    for prefix, (w, info) in decoded.items():
        m = modules[prefix]
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(w).to(m.weight.dtype))
        if "input_scale" in info:
            s = info["input_scale"]
            bits = info["input_args"]["num_bits"]
            lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1

            def hook(mod, args, s=s, lo=lo, hi=hi):
                x = args[0]
                return (torch.clamp(torch.round(x / s), lo, hi) * s,)

            m.register_forward_pre_hook(hook)
    return ref


def ct_repack(files: dict, decoded: dict, qcfg: dict):
    """compressed-tensors' own packer on the decoded weights: `PackedQuantizationCompressor.compress`
    with the file's scales and zero points must give back the file's `weight_packed` (and
    `weight_zero_point`) bytes. (q - zp) * scale is exact in float32, so the library's quantize
    step recovers the same integers and any difference is a packing difference.
    Returns (tensors compared, [differences])."""
    import torch
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme

    groups = ct_schemes(qcfg)
    compared, diffs = 0, []
    for prefix, (w, info) in decoded.items():
        if info["kind"] != "pack-quantized":
            continue
        g = pick_scheme(prefix, groups)
        scheme = QuantizationScheme(targets=g["targets"], weights=g["weights"])
        scale = torch.from_numpy(files[prefix + ".weight_scale"].astype(np.float32))
        local = {"weight": torch.from_numpy(w), "weight_scale": scale}
        if info["has_zp"]:
            zp = unpack_int32_rows(files[prefix + ".weight_zero_point"].T.copy(), info["bits"], w.shape[0]).T
            local["weight_zero_point"] = torch.from_numpy(np.ascontiguousarray(zp)).to(torch.int8)
        out = PackedQuantizationCompressor.compress(local, scheme)
        for key in ("weight_packed", "weight_zero_point", "weight_shape"):
            if key not in out and prefix + "." + key not in files:
                continue
            compared += 1
            if key not in out or prefix + "." + key not in files:
                diffs.append(f"{prefix}.{key}: {'only in the file' if key not in out else 'not in the file'}")
                continue
            mine = out[key].numpy()
            theirs = files[prefix + "." + key]
            if mine.dtype != theirs.dtype or mine.shape != theirs.shape or mine.tobytes() != theirs.tobytes():
                n = int((mine != theirs).sum()) if mine.shape == theirs.shape else -1
                diffs.append(f"{prefix}.{key}: library {mine.dtype}{list(mine.shape)} vs file "
                             f"{theirs.dtype}{list(theirs.shape)}, {n} elements differ")
    return compared, diffs


def bnb_hf_reference(model_dir: Path, qcfg: dict, out: Path) -> Path:
    """The same checkpoint quantized by transformers + bitsandbytes on load and saved with
    `save_pretrained`: what a user would otherwise have produced."""
    if (out / "config.json").exists():
        return out
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    cfg = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=qcfg["bnb_4bit_quant_type"],
        bnb_4bit_use_double_quant=qcfg["bnb_4bit_use_double_quant"],
        bnb_4bit_compute_dtype=torch_dtype(qcfg["bnb_4bit_compute_dtype"]),
        llm_int8_skip_modules=qcfg.get("llm_int8_skip_modules"),
    )
    m = AutoModelForCausalLM.from_pretrained(str(model_dir), quantization_config=cfg, device_map="cpu")
    m.save_pretrained(str(out))
    del m
    return out


def compare_folders(mine: Path, ref: Path):
    """Tensor-by-tensor comparison (names, dtypes, shapes, bytes) and config differences."""
    FILE_DTYPES.clear()
    a = read_folder(mine)
    da = dict(FILE_DTYPES)
    FILE_DTYPES.clear()
    b = read_folder(ref)
    db = dict(FILE_DTYPES)
    diffs = [f"{k}: only in kiln's folder" for k in sorted(set(a) - set(b))]
    diffs += [f"{k}: only in transformers' folder" for k in sorted(set(b) - set(a))]
    text_only = []
    for k in sorted(set(a) & set(b)):
        if da[k] != db[k] or a[k].shape != b[k].shape or a[k].tobytes() != b[k].tobytes():
            if ".quant_state.bitsandbytes__" in k:
                ta, tb = bytes(a[k]).decode("utf-8", "replace"), bytes(b[k]).decode("utf-8", "replace")
                try:
                    same_values = json.loads(ta) == json.loads(tb)
                except ValueError:
                    same_values = False
                if same_values:
                    text_only.append(f"{k}: same values, different JSON text: kiln {ta!r} vs transformers {tb!r}")
                    continue
            n = int((a[k] != b[k]).sum()) if a[k].shape == b[k].shape else -1
            diffs.append(f"{k}: kiln {da[k]}{list(a[k].shape)} vs transformers {db[k]}{list(b[k].shape)}, {n} elements differ")
    ca = json.loads((mine / "config.json").read_text()).get("quantization_config", {})
    cb = json.loads((ref / "config.json").read_text()).get("quantization_config", {})
    cfg_diffs = [f"quantization_config.{k}: kiln {ca.get(k)!r} vs transformers {cb.get(k)!r}"
                 for k in sorted(set(ca) | set(cb)) if ca.get(k) != cb.get(k)]
    return len(set(a) & set(b)), diffs, text_only, cfg_diffs


def load_failure_details(folder: Path, dtype: str) -> dict:
    """After a failed load: the keys transformers could not load as they are (retrying with
    `ignore_mismatched_sizes=True` only to get its report; that model is thrown away)."""
    try:
        _, info = load_model(folder, dtype, ignore_mismatched_sizes=True)
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    out = {}
    for k, v in info.items():
        if v:
            out[k] = sorted(" ".join(map(str, x)) if isinstance(x, tuple) else str(x) for x in v)
    return out


def worst(pairs):
    """max |got - expected| over layers, and the layer where it occurs (None: nothing compared)."""
    best, where = None, ""
    for p, got, exp in pairs:
        best = 0.0 if best is None else best
        d = max_abs(got, exp) if got.shape == exp.shape else float("inf")
        if d > best:
            best, where = d, p
    return best, where


def check_folder(case: Case, folder: Path, original, orig_logits, dtype: str, res: Result,
                 model_dir: Path, work: Path):

    cfg = json.loads((folder / "config.json").read_text())
    qcfg = cfg.get("quantization_config")
    if not qcfg:
        res.notes.append("config.json has no quantization_config")
        return
    FILE_DTYPES.clear()
    files = read_folder(folder)
    method = qcfg["quant_method"]
    res.fmt = method if method != "compressed-tensors" else f"ct/{qcfg.get('format')}"
    if method == "compressed-tensors":
        decoded = decode_compressed_tensors(files, qcfg, dict(FILE_DTYPES))
    elif method == "bitsandbytes":
        decoded = decode_bnb(files)
    else:
        res.notes.append(f"quant_method {method} not checked")
        return
    res.layers = len(decoded)
    if not decoded:
        res.notes.append("no packed layer found in the files")
        return
    t0 = time.time()
    if method == "compressed-tensors":
        model, failures, warnings, extra_checks = check_ct(folder, files, decoded, qcfg, dtype, res)
    else:
        model, failures, warnings, extra_checks = check_bnb(folder, files, decoded, qcfg, dtype, res, model_dir, work)
    if model is None:
        res.status = "FAIL"
        return
    forward_w, quantized = extra_checks

    extra = sorted(quantized - set(decoded))
    if extra:
        failures.append(f"loader quantized modules the files store dense: {extra[:4]}")
    lost = sorted(set(decoded) - quantized)
    if lost:
        failures.append(f"packed in the files but dense in the loaded model: {lost[:4]}")

    q_logits = logits(model, TOKENS)
    ref = reference_model(original, {p: (forward_w[p], decoded[p][1]) for p in decoded}, torch_dtype(dtype))
    res.rel_orig = rel_err(q_logits, orig_logits)
    res.rel_ref = rel_err(q_logits, logits(ref, TOKENS))
    # bnb: the as-loaded compute dtype; compressed-tensors: the tight model is the as-loaded one.
    as_loaded = res.as_loaded_logits if res.as_loaded_logits is not None else q_logits
    res.rel_orig_asloaded = rel_err(as_loaded, orig_logits)
    res.as_loaded_logits = None
    del model, ref
    for name, v in (("w loaded", res.w_loaded), ("w alt", None if res.w_alt_upstream else res.w_alt),
                    ("w I-fwd", res.w_identity)):
        if v is not None and v > WEIGHT_ATOL:
            failures.append(f"{name}: max difference {v:.3g} > {WEIGHT_ATOL}")
    if res.rel_ref > REF_LOGITS_RTOL:
        failures.append(f"logits differ from the decoded reference by {res.rel_ref:.3g} > {REF_LOGITS_RTOL}")
    if not 0.0 < res.rel_orig < 1.0:
        failures.append(f"logits vs the original model: relative error {res.rel_orig:.3g} (expected in (0, 1))")
    res.notes += [f"FAIL: {f}" for f in failures] + [f"WARN: {w}" for w in warnings]
    res.status = "FAIL" if failures else ("warn" if warnings else "ok")
    res.notes.append(f"checked in {time.time() - t0:.1f}s")


def check_ct(folder, files, decoded, qcfg, dtype, res):
    from transformers import CompressedTensorsConfig

    failures, warnings = [], []
    # compressed-tensors' own packer on the same values: tells kiln's layout from a loader's limits.
    n, repack_diffs = ct_repack(files, decoded, qcfg)
    res.cross = f"{n - len(repack_diffs)}/{n} same" if n else "-"
    failures += [f"repack: {d}" for d in repack_diffs[:6]]

    # The route users take: transformers keeps the packed layout, compressed-tensors decompresses
    # on the first forward pass.
    model = None
    try:
        model, bad = load_model(folder, dtype)
        if bad:
            failures.append(f"loading info: {json.dumps({k: sorted(map(str, v))[:8] for k, v in bad.items()})}")
    except Exception as e:
        details = load_failure_details(folder, dtype)
        msg = f"default load failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}; report: {json.dumps(details)[:600]}"
        mism = details.get("mismatched_keys", [])
        zp_only = mism and all(".weight_zero_point" in m for m in mism) and set(details) == {"mismatched_keys"}
        if zp_only and not repack_diffs:
            # compressed-tensors writes exactly these tensors itself (the repack check), so the
            # loader, not the file, is at fault: transformers builds the compressed modules on the
            # meta device, where PackedQuantizationCompressor.compress leaves weight_zero_point
            # unpacked (out, groups) while the checkpoint holds it packed along dim 0.
            warnings.append(msg + " -- known upstream limitation (compressed-tensors' own output fails the same way); "
                            "checked through CompressedTensorsConfig(dequantize=True) instead")
        else:
            failures.append(msg)

    forward_w = {p: round_to(w, dtype) for p, (w, info) in decoded.items()}
    # transformers' other route dequantizes the checkpoint tensors as stored (the scale in the
    # file's dtype) and then casts to the load dtype.
    try:
        m2, bad2 = load_model(folder, dtype, quantization_config=CompressedTensorsConfig(dequantize=True))
        mods2 = dict(m2.named_modules())
        per_layer = {
            p: max_abs(mods2[p].weight.detach().float().numpy(), round_to(round_to(w, info["scale_dtype"]), dtype))
            if tuple(mods2[p].weight.shape) == w.shape else float("inf")
            for p, (w, info) in decoded.items()
        }
        res.w_alt = max(per_layer.values())
        bad_layers = sorted(p for p, d in per_layer.items() if d > WEIGHT_ATOL)
        if bad_layers:
            # transformers' load-time dequantization (CompressedTensorsDequantize) decompresses every
            # dense module with one scheme, `get_dense_scheme`: the first config group that does
            # not target experts. With several groups, layers of the other groups come out wrong.
            groups = ct_schemes(qcfg)
            first = next((g for t, g in groups if not any(x.startswith("re:") and "experts" in x for x in t)), None)
            other_group = [p for p in bad_layers if pick_scheme(p, groups)["weights"] != first["weights"]]
            msg = (f"dequantize=True: {len(bad_layers)} layers differ (max {res.w_alt:.3g}), "
                   f"e.g. {bad_layers[0]}")
            if len(groups) > 1 and len(other_group) == len(bad_layers):
                warnings.append(msg + " -- all of them in config groups other than the first: transformers' "
                                "dequantize=True applies the first group's scheme to every dense layer "
                                "(known upstream limitation; the default route is checked above)")
                res.w_alt_upstream = True
            else:
                failures.append(msg)
        if bad2:
            # Dense weights need no activation scales: dropping them is what dequantize=True means.
            unexpected = bad2.get("unexpected_keys", [])
            if set(bad2) == {"unexpected_keys"} and all(k.endswith((".input_scale", ".input_zero_point")) for k in unexpected):
                res.notes.append(f"dequantize=True ignores the {len(unexpected)} input scales (dense model, no activation quantization)")
            else:
                failures.append(f"dequantize=True loading info: {bad2}")
        if any(decoded[p][1]["scale_dtype"] != dtype for p in decoded):
            res.notes.append(
                "dequantize=True dequantizes in the file's scale dtype "
                f"({sorted({i['scale_dtype'] for _, i in decoded.values()})}), the default route in {dtype}"
            )
    except Exception as e:
        failures.append(f"dequantize=True load failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
        m2 = None

    if model is None:
        if m2 is None:
            return None, failures, warnings, None
        # Only the dequantize=True model is left: its weights are dense, dequantized in the file's
        # scale dtype, and no module carries a quantization scheme.
        model = m2
        forward_w = {p: round_to(round_to(w, i["scale_dtype"]), dtype) for p, (w, i) in decoded.items()}
        quantized = set(decoded)
    else:
        del m2
        modules = dict(model.named_modules())
        missing = [p for p in decoded if p not in modules]
        if missing:
            failures.append(f"modules not in the loaded model: {missing[:4]}")
            return None, failures, warnings, None
        quantized = {n for n, m in modules.items() if getattr(m, "quantization_scheme", None) is not None}
        logits(model, TOKENS)  # the first forward decompresses
        still_packed = [p for p in decoded if hasattr(modules[p], "weight_packed")]
        if still_packed:
            failures.append(f"still compressed after a forward: {still_packed[:3]}")
        # compressed-tensors dequantizes in the scale's dtype, which after loading is the load dtype.
        res.w_loaded, where = worst((p, modules[p].weight.detach().float().numpy(), forward_w[p]) for p in decoded)
        if (res.w_loaded or 0.0) > WEIGHT_ATOL:
            failures.append(f"largest loaded-weight difference in {where}")
    modules = dict(model.named_modules())
    res.w_identity, where_i = worst(
        (p, identity_weights(modules[p], w.shape[1], torch_dtype(dtype)), forward_w[p])
        for p, (w, info) in decoded.items() if "input_scale" not in info
    )
    if (res.w_identity or 0.0) > WEIGHT_ATOL:
        failures.append(f"largest identity-forward difference in {where_i}")
    return model, failures, warnings, (forward_w, quantized)


def check_bnb(folder, files, decoded, qcfg, dtype, res, model_dir, work):
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    failures, warnings = [], []
    try:
        ref_dir = bnb_hf_reference(model_dir, qcfg, work / f"hf-{folder.name}")
        n, diffs, text_only, cfg_diffs = compare_folders(folder, ref_dir)
        res.cross = f"{n - len(diffs) - len(text_only)}/{n} same"
        failures += [f"vs transformers' save: {d}" for d in diffs[:6]]
        if text_only:
            res.cross += f", {len(text_only)} JSON text"
            warnings += [f"vs transformers' save: {d}" for d in text_only[:6]]
        res.notes += [f"vs transformers' save (not a failure): {d}" for d in cfg_diffs]
    except Exception as e:
        failures.append(f"transformers' own bnb save failed: {type(e).__name__}: {e}")

    try:
        model, bad = load_model(folder, dtype)
    except Exception as e:
        failures.append(f"load failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}; "
                        f"report: {json.dumps(load_failure_details(folder, dtype))[:600]}")
        return None, failures, warnings, None
    if bad:
        failures.append(f"loading info: {json.dumps({k: sorted(map(str, v))[:8] for k, v in bad.items()})}")
    modules = dict(model.named_modules())
    missing = [p for p in decoded if p not in modules]
    if missing:
        failures.append(f"modules not in the loaded model: {missing[:4]}")
        return None, failures, warnings, None
    quantized = {n for n, m in modules.items() if isinstance(m, bnb.nn.Linear4bit)}
    # Before any forward: on AVX512-BF16 CPUs the first forward repacks the weight.
    res.w_loaded, where = worst(
        (p, F.dequantize_4bit(modules[p].weight.data, modules[p].weight.quant_state).float().numpy(),
         round_to(w, info["dtype"]))
        for p, (w, info) in decoded.items()
    )
    if (res.w_loaded or 0.0) > WEIGHT_ATOL:
        failures.append(f"largest loaded-weight difference in {where}")
    compute = {p: str(modules[p].compute_dtype).replace("torch.", "") for p in decoded}
    res.notes.append(f"bnb compute dtype as loaded: {sorted(set(compute.values()))}")
    # As loaded, a forward dequantizes straight to the compute dtype (not via the state's dtype).
    w_ident_loaded, where_i = worst(
        (p, identity_weights(modules[p], w.shape[1], torch_dtype(dtype)), round_to(round_to(w, compute[p]), dtype))
        for p, (w, info) in decoded.items()
    )
    res.as_loaded_logits = logits(model, TOKENS)
    # transformers leaves every non-quantized weight of a pre-quantized bnb checkpoint in the
    # checkpoint's dtype whatever `dtype` asks (its own save_pretrained output loads the same way);
    # for the tight comparison bring them to the load dtype, as the reference has them.
    kept = sorted({str(p.dtype).replace("torch.", "") for n, p in model.named_parameters()
                   if p.is_floating_point() and p.dtype != torch_dtype(dtype)})
    if kept:
        res.notes.append(f"dense weights loaded as {kept}, not {dtype} (transformers' bnb loader); upcast for the tight check")
        for n, prm in model.named_parameters():
            if prm.is_floating_point() and prm.dtype != torch_dtype(dtype):
                prm.data = prm.data.to(torch_dtype(dtype))
    # The tight comparison: compute in the load dtype so that nothing but summation order differs.
    for p in decoded:
        modules[p].compute_dtype = torch_dtype(dtype)
        modules[p].compute_type_is_set = True
    forward_w = {p: round_to(w, dtype) for p, (w, info) in decoded.items()}
    w_ident, where_j = worst(
        (p, identity_weights(modules[p], w.shape[1], torch_dtype(dtype)), forward_w[p])
        for p, (w, info) in decoded.items()
    )
    res.w_identity = max(w_ident or 0.0, w_ident_loaded or 0.0)
    if (res.w_identity or 0.0) > WEIGHT_ATOL:
        failures.append(f"largest identity-forward difference in {where_i if (w_ident_loaded or 0.0) >= (w_ident or 0.0) else where_j}")
    return model, failures, warnings, (forward_w, quantized)


def fmt(v, spec=".2e"):
    return "-" if v is None else (f"{v:{spec}}" if v != 0 else "0")


def print_table(results: list[Result]):
    head = ["case", "format", "layers", "w loaded", "w alt", "w I-fwd", "cross-check", "logits vs orig", "(as loaded)", "vs decoded", "status"]
    rows = [[r.name, r.fmt, str(r.layers), fmt(r.w_loaded), fmt(r.w_alt), fmt(r.w_identity), r.cross,
             fmt(r.rel_orig), fmt(r.rel_orig_asloaded), fmt(r.rel_ref), r.status] for r in results]
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    print(line(head))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print(line(r))
    print()
    print("w loaded: max |loaded effective weight - numpy decode| over all packed layers "
          "(ct: decompressed module.weight; bnb: dequantize_4bit on the loaded params)")
    print("w alt: ct only, the same through CompressedTensorsConfig(dequantize=True); "
          "w I-fwd: each module applied to an identity matrix")
    print("cross-check: ct = tensors compressed-tensors' own packer reproduces byte for byte from the decoded "
          "weights and the file's scales; bnb = tensors identical to transformers' own quantize-and-save_pretrained")
    print("logits: relative L2 error; vs orig = against the unquantized checkpoint, "
          "vs decoded = against it with numpy-decoded linear weights")
    for r in results:
        for n in r.notes:
            print(f"  {r.name}: {n}")


def run(cmd: list[str], log: Path) -> bool:
    with open(log, "a") as f:
        f.write("$ " + " ".join(map(str, cmd)) + "\n")
        f.flush()
        p = subprocess.run(list(map(str, cmd)), stdout=f, stderr=subprocess.STDOUT)
    return p.returncode == 0


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--kiln", type=Path, help="kiln binary (needed unless only --folder is given)")
    ap.add_argument("--model", type=Path, default=root / "fixtures" / "tiny-llama")
    ap.add_argument("--tokens", type=Path, default=root / "fixtures" / "calib" / "tiny-llama-calib.tokens",
                    help="calibration tokens for cases that need statistics")
    ap.add_argument("--chunks", type=int, default=30)
    ap.add_argument("--stats", type=Path, help="reuse these statistics instead of running kiln calibrate")
    ap.add_argument("--case", action="append", help="run only these cases (repeatable)")
    ap.add_argument("--extra-recipe", action="append", type=Path, default=[], metavar="FILE",
                    help="another recipe to build and check (repeatable)")
    ap.add_argument("--folder", action="append", type=Path, default=[], metavar="DIR",
                    help="check an already-built packed folder as well (repeatable; no kiln build)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--keep", type=Path, help="build into this directory and keep it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--strict", action="store_true",
                    help="fail on warnings too (known upstream loader limits, JSON text-only differences)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model_dir = args.model.resolve()
    cases = [c for c in CASES if not args.case or c.name in args.case]
    if args.folder and not args.case and not args.extra_recipe and args.kiln is None:
        cases = []  # only the given folders
    if (cases or args.extra_recipe) and args.kiln is None:
        ap.error("--kiln is needed to build the cases")
    if args.case and len(cases) != len(args.case):
        ap.error(f"unknown case; known: {', '.join(c.name for c in CASES)}")
    for f in args.extra_recipe:
        doc = tomllib.loads(f.read_text())
        # An extra recipe's [calibration] stats path is used as written (relative to the recipe).
        cases.append(Case(f"extra:{f.stem}", doc.get("output", {}).get("format", "gguf"), {}, "",
                          False, recipe_file=f.resolve()))

    for d in args.folder:
        cases.append(Case(f"folder:{d.name}", "", {}, "", folder=d.resolve()))

    work = args.keep.resolve() if args.keep else Path(tempfile.mkdtemp(prefix="pycheck-packed-"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "kiln.log"
    print(f"work dir {work}; kiln output in {log}")

    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype(args.dtype), device_map="cpu")
    original.eval()
    orig_logits = logits(original, TOKENS)

    stats = args.stats.resolve() if args.stats else None
    results = []
    for case in cases:
        res = Result(case.name, case.fmt)
        results.append(res)
        out = work / case.name.replace(":", "-")
        if case.needs_stats and stats is None:
            stats = work / "tiny-llama.stats.safetensors"
            if not run([args.kiln, "calibrate", model_dir, "--tokens", args.tokens.resolve(),
                        "--chunks", args.chunks, "-o", stats], log):
                res.notes.append(f"kiln calibrate failed (see {log})")
                stats = None
                continue
        if case.folder is not None:
            out = case.folder
        elif case.recipe_file is not None:
            recipe = case.recipe_file
            cmd = [args.kiln, "build", recipe, "--input", model_dir, "--output", out]
        else:
            recipe = work / f"{case.name}.toml"
            write_recipe(case, model_dir, out, stats, recipe)
            cmd = [args.kiln, "build", recipe]
        if case.folder is None and not run(cmd, log):
            res.notes.append(f"kiln build failed (see {log})")
            continue
        try:
            check_folder(case, out, original, orig_logits, args.dtype, res, model_dir, work)
        except Exception as e:
            traceback.print_exc()
            res.notes.append(f"check crashed: {type(e).__name__}: {e}")
            res.status = "FAIL"
    print()
    print_table(results)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [r.name for r in results if r.status == "FAIL" or (args.strict and r.status != "ok")]
    warned = [r.name for r in results if r.status == "warn"]
    if warned:
        print(f"\nwarnings (known upstream limits or text-only differences; --strict fails on them): {', '.join(warned)}")
    print(f"\n{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
