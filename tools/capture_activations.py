#!/usr/bin/env python3
"""Capture activation statistics with PyTorch, in kiln's activation-statistics format.

For users who have PyTorch and transformers: runs a Hugging Face causal LM over a kiln tokens
file and records, with a forward hook on every `torch.nn.Linear`, the statistics of each layer's
input, then writes the same safetensors file `kiln calibrate` writes (docs/calibration.md), so
the two can be merged and used interchangeably. Unlike kiln's own capture (Llama, Mistral and
Qwen2 only) this works for any architecture transformers can run.

Usage:

    pip install torch transformers numpy
    python tools/capture_activations.py MODEL_DIR TOKENS OUTPUT.safetensors \\
        [--ctx 128] [--chunks N] [--no-gram] [--hist-bins B --hist-max M] [--lm-head] \\
        [--dtype float32] [--device cpu]

What it does, exactly as `kiln calibrate` does:

- TOKENS is a kiln tokens file (whitespace-separated ids with `#` comment lines, or a JSON
  array; `tools/tokenize_calib.py` writes one). It is cut into chunks of `--ctx` tokens,
  trailing tokens dropped, at most `--chunks` chunks; the first token of every chunk is replaced
  by `config.bos_token_id`; each chunk is one forward pass on its own (batch of 1, positions
  from 0, no cache).
- Every nn.Linear's input is recorded (the LM head only with `--lm-head`), flattened to rows
  of `in_features`. Modules that receive the very same input tensor in a forward pass (q/k/v,
  gate/up) are stored once, under the first one called, with the others as aliases.
- Per chunk, partial statistics are formed in float64 (count, Σx², Σx, Gram XᵀX) and float32
  (min, max), plus a histogram of |x| (bin = floor(|x|·bins/max) in float64, clamped to the last
  bin, non-finite values skipped); partials are added to the totals in chunk order.

The numbers are those of PyTorch's forward pass in `--dtype` (default float32, eager attention)
and of numpy's summation order, so they agree with kiln's to rounding, not bit for bit.

Checked: on fixtures/tiny-llama with the committed calibration tokens (30 chunks of 128), with
torch 2.15.0 and transformers 5.23.0 (tools/requirements-python-checks.txt), this script writes
the same 144 tensors under the same names and aliases as `kiln calibrate`, with counts equal and
every other statistic (sums, sums of squares, Gram matrices, minima, maxima) within 2.3e-6 of
kiln's, relative to the largest magnitude of that statistic (docs/calibration.md).
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

FORMAT_NAME = "kiln.activation-stats"
FORMAT_VERSION = "1"


def read_tokens(path):
    """Token ids from a kiln tokens file (plain or JSON form)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        return [int(v) for v in json.loads(text)]
    ids = []
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        ids.extend(int(w) for w in line.split())
    return ids


class Stats:
    """Statistics of one linear layer's input, as sums (kiln's `ModuleStats`)."""

    def __init__(self, cols, gram, hist):
        self.cols = cols
        self.count = 0
        self.sum_sq = np.zeros(cols, dtype=np.float64)
        self.sum = np.zeros(cols, dtype=np.float64)
        self.min = np.full(cols, np.inf, dtype=np.float32)
        self.max = np.full(cols, -np.inf, dtype=np.float32)
        self.gram = np.zeros((cols, cols), dtype=np.float64) if gram else None
        self.hist = hist  # (bins, max) or None
        self.hist_counts = np.zeros(hist[0], dtype=np.int64) if hist else None

    def add_batch(self, x):
        """Adds one chunk's rows: `x` is a (rows, cols) float32 array."""
        x = np.asarray(x, dtype=np.float32).reshape(-1, self.cols)
        xd = x.astype(np.float64)
        self.count += x.shape[0]
        self.sum_sq += np.sum(xd * xd, axis=0)
        self.sum += np.sum(xd, axis=0)
        # fmin/fmax ignore NaN, as Rust's f32::min/max do.
        self.min = np.fmin(self.min, np.nanmin(np.where(np.isnan(x), np.inf, x), axis=0))
        self.max = np.fmax(self.max, np.nanmax(np.where(np.isnan(x), -np.inf, x), axis=0))
        if self.gram is not None:
            self.gram += xd.T @ xd
        if self.hist is not None:
            bins, hmax = self.hist
            a = np.abs(xd[np.isfinite(xd)])
            idx = np.minimum(np.floor(a * bins / float(np.float32(hmax))), bins - 1)
            self.hist_counts += np.bincount(idx.astype(np.int64), minlength=bins)


def safetensors_bytes(tensors, metadata):
    """A safetensors file: `tensors` maps name -> numpy array (little-endian F64/F32/I64),
    8-byte types first, then by name, as the Rust `safetensors` crate lays them out."""
    dtype_names = {np.dtype("<f8"): "F64", np.dtype("<i8"): "I64", np.dtype("<f4"): "F32"}
    order = sorted(tensors, key=lambda n: (-tensors[n].dtype.itemsize, n))
    header = {"__metadata__": metadata}
    data = []
    offset = 0
    for name in order:
        arr = np.ascontiguousarray(tensors[name])
        raw = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": dtype_names[arr.dtype.newbyteorder("<")],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        data.append(raw)
        offset += len(raw)
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(data)


def write_stats(path, modules, aliases, chunk_size, chunk_count, datasets):
    """Writes kiln's activation-statistics file (docs/calibration.md) atomically."""
    tensors = {}
    for name, s in modules.items():
        tensors[f"{name}.count"] = np.array([s.count], dtype=np.int64)
        tensors[f"{name}.sum_sq"] = s.sum_sq
        tensors[f"{name}.sum"] = s.sum
        tensors[f"{name}.min"] = s.min
        tensors[f"{name}.max"] = s.max
        if s.gram is not None:
            # Exactly symmetric, as kiln stores it.
            g = np.triu(s.gram)
            tensors[f"{name}.gram"] = g + np.triu(g, 1).T
        if s.hist is not None:
            tensors[f"{name}.hist"] = s.hist_counts
            tensors[f"{name}.hist_max"] = np.array([s.hist[1]], dtype=np.float32)
    metadata = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "chunk_size": str(chunk_size),
        "chunk_count": str(chunk_count),
        "datasets": json.dumps(datasets, separators=(",", ":")),
        "aliases": json.dumps(dict(sorted(aliases.items())), separators=(",", ":")),
    }
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(safetensors_bytes(tensors, metadata))
    os.replace(tmp, path)


def capture(model, ids, args):
    """Runs the model over the chunks and returns (modules, aliases, chunks)."""
    import torch

    bos = model.config.bos_token_id
    if bos is None:
        sys.exit("config.bos_token_id is not set: every chunk starts with BOS")
    n_ctx = args.ctx
    n_chunks = len(ids) // n_ctx
    if args.chunks is not None:
        n_chunks = min(n_chunks, args.chunks)
    if n_chunks == 0:
        sys.exit(f"{len(ids)} tokens do not fill one chunk of {n_ctx}")
    hist = (args.hist_bins, args.hist_max) if args.hist_bins else None

    modules = {}  # canonical name -> Stats (totals)
    aliases = {}  # alias -> canonical name
    partial = {}  # this chunk's Stats
    seen = []  # (input tensor, canonical name) in this forward pass

    def hook(name):
        def record(module, inputs, output):
            x = inputs[0]
            for t, first in seen:
                if t is x:  # the very same tensor object: an alias
                    if name != first:
                        aliases[name] = first
                    return
            seen.append((x, name))
            rows = x.detach().reshape(-1, module.in_features).to(torch.float32).cpu().numpy()
            s = Stats(module.in_features, not args.no_gram, hist)
            s.add_batch(rows)
            partial[name] = s

        return record

    handles = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if name == "lm_head" and not args.lm_head:
                continue
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for c in range(n_chunks):
                chunk = list(ids[c * n_ctx : (c + 1) * n_ctx])
                chunk[0] = bos
                partial.clear()
                seen.clear()
                model(torch.tensor([chunk], device=args.device), use_cache=False)
                for name, p in partial.items():
                    if name not in modules:
                        modules[name] = Stats(p.cols, p.gram is not None, p.hist)
                    t = modules[name]
                    t.count += p.count
                    t.sum_sq += p.sum_sq
                    t.sum += p.sum
                    t.min = np.fmin(t.min, p.min)
                    t.max = np.fmax(t.max, p.max)
                    if t.gram is not None:
                        t.gram += p.gram
                    if t.hist is not None:
                        t.hist_counts += p.hist_counts
                print(f"chunk {c + 1}/{n_chunks}", file=sys.stderr)
    finally:
        for h in handles:
            h.remove()
    return modules, aliases, n_chunks


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="Hugging Face model folder (or hub id)")
    parser.add_argument("tokens", help="kiln tokens file")
    parser.add_argument("output", help="statistics file to write (.safetensors)")
    parser.add_argument("--ctx", type=int, default=128, help="tokens per chunk")
    parser.add_argument("--chunks", type=int, default=None, help="at most this many chunks")
    parser.add_argument("--no-gram", action="store_true", help="skip the Gram matrices")
    parser.add_argument("--hist-bins", type=int, default=None, help="histogram bins")
    parser.add_argument("--hist-max", type=float, default=None, help="histogram range end")
    parser.add_argument("--lm-head", action="store_true", help="also record lm_head's input")
    parser.add_argument("--dtype", default="float32", help="torch dtype to run in")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if (args.hist_bins is None) != (args.hist_max is None):
        parser.error("--hist-bins and --hist-max go together")

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        args.model, torch_dtype=getattr(torch, args.dtype), attn_implementation="eager"
    ).to(args.device)
    model.eval()
    ids = read_tokens(args.tokens)
    modules, aliases, n_chunks = capture(model, ids, args)
    write_stats(
        args.output,
        modules,
        aliases,
        args.ctx,
        n_chunks,
        [os.path.basename(args.tokens)],
    )
    print(f"{args.output}: {len(modules)} inputs, {len(aliases)} aliases", file=sys.stderr)


if __name__ == "__main__":
    main()
