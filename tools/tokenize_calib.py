#!/usr/bin/env python3
"""Tokenize calibration text into a kiln tokens file, for `kiln calibrate --tokens`.

Usage:

    pip install sentencepiece
    python tools/tokenize_calib.py TOKENIZER.model TEXT.txt OUTPUT.tokens [--bos] [--llama-cpp]
        [--limit N]

What it does, exactly (default mode):

    sp = sentencepiece.SentencePieceProcessor(model_file=TOKENIZER.model)
    ids = sp.encode(open(TEXT, encoding="utf-8").read())   # one call on the whole text

`encode` applies the model's own normalizer (the fixture's collapses runs of whitespace, newlines
and tabs included, into one space) and adds the model's dummy prefix; nothing else is prepended
or appended. With `--bos` the BOS id is put in front; kiln's capture replaces the first token of
every chunk with BOS either way.

`--llama-cpp` tokenizes as llama.cpp's SentencePiece tokenizer (`llm_tokenizer_spm`) does
instead, which is what `llama-imatrix` evaluates: BOS first (llama.cpp's default for
SentencePiece vocabularies), then no normalizer: every space becomes U+2581, one U+2581 is put in
front of the text, the UTF-8 characters are merged pairwise by the highest piece score (the
leftmost pair on ties) as long as the merged text is a piece, and whatever is left that is not a
piece is spelled as byte tokens (`<0x0A>` for a newline, `<0x09>` for a tab). With these ids
`kiln calibrate` evaluates exactly the chunks `llama-imatrix -c N` did (same tokens, same chunk
boundaries).

`--limit N` keeps only the first N ids (after BOS, if any, is added).

Output format (see docs/calibration.md): UTF-8 text; `#` comment lines (this header: the
tokenizer, the text's SHA-256, the mode and the token count), then the ids as decimal integers
separated by spaces, 32 per line.

The committed fixtures were made with:

    python tools/tokenize_calib.py fixtures/tiny-llama/tokenizer.model \
        ../shared/golden/calib.txt fixtures/calib/tiny-llama-calib.tokens
    python tools/tokenize_calib.py fixtures/tiny-llama/tokenizer.model \
        ../shared/golden/calib.txt fixtures/calib/tiny-llama-calib.llamacpp.tokens \
        --llama-cpp --limit 3840
"""

import argparse
import hashlib
import heapq
import os
import sys


def llama_cpp_spm(sp, text):
    """llama.cpp's SentencePiece tokenization of `text` (`llm_tokenizer_spm`), without BOS."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.vocab_size())}
    score = [sp.get_score(i) for i in range(sp.vocab_size())]
    symbols = list("\u2581" + text.replace(" ", "\u2581"))
    n = len(symbols)
    prev = list(range(-1, n - 1))
    nxt = list(range(1, n + 1))
    nxt[-1] = -1
    alive = [True] * n
    queue = []

    def try_pair(left, right):
        if left >= 0 and right >= 0:
            merged = symbols[left] + symbols[right]
            if merged in vocab:
                # Highest score first, then leftmost (llama.cpp's llm_bigram_spm comparator).
                heapq.heappush(queue, (-score[vocab[merged]], left, right, merged))

    for i in range(n - 1):
        try_pair(i, i + 1)
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        # Skip pairs that an earlier merge has changed.
        if not (alive[left] and alive[right]) or nxt[left] != right:
            continue
        if symbols[left] + symbols[right] != merged:
            continue
        symbols[left] = merged
        alive[right] = False
        nxt[left] = nxt[right]
        if nxt[right] >= 0:
            prev[nxt[right]] = left
        try_pair(prev[left], left)
        try_pair(left, nxt[left])
    ids = []
    i = 0 if n else -1
    while i != -1:
        piece = symbols[i]
        if piece in vocab:
            ids.append(vocab[piece])
        else:
            ids.extend(vocab["<0x%02X>" % b] for b in piece.encode("utf-8"))
        i = nxt[i]
    return ids


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("tokenizer", help="SentencePiece tokenizer.model")
    parser.add_argument("text", help="calibration text (UTF-8)")
    parser.add_argument("output", help="tokens file to write")
    parser.add_argument("--bos", action="store_true", help="prepend the BOS id")
    parser.add_argument(
        "--llama-cpp", action="store_true", help="tokenize as llama.cpp does (BOS first)"
    )
    parser.add_argument("--limit", type=int, default=None, help="keep the first N ids")
    args = parser.parse_args()

    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=args.tokenizer)
    with open(args.text, "rb") as f:
        raw = f.read()
    text = raw.decode("utf-8")
    if args.llama_cpp:
        ids = [sp.bos_id()] + llama_cpp_spm(sp, text)
        call = "llama.cpp's SentencePiece algorithm (--llama-cpp), BOS first"
    else:
        ids = sp.encode(text)
        call = "SentencePieceProcessor.encode(text)"
        if args.bos:
            ids = [sp.bos_id()] + ids
            call += ", BOS prepended"
    if args.limit is not None:
        ids = ids[: args.limit]
        call += f", first {args.limit} ids"

    with open(args.tokenizer, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    lines = [
        "# kiln tokens: whitespace-separated token ids (docs/calibration.md)",
        f"# tokenizer: {os.path.basename(args.tokenizer)} "
        f"(sentencepiece {spm.__version__}, vocab {sp.vocab_size()}, sha256 {tok_hash})",
        f"# text: {os.path.basename(args.text)} (sha256 {hashlib.sha256(raw).hexdigest()})",
        f"# call: {call}",
        f"# tokens: {len(ids)}",
    ]
    for i in range(0, len(ids), 32):
        lines.append(" ".join(str(t) for t in ids[i : i + 32]))
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8", newline="\n") as f:
        f.write("\n".join(lines) + "\n")
    os.replace(tmp, args.output)
    print(f"{args.output}: {len(ids)} tokens", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
