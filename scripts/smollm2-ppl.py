#!/usr/bin/env python3
"""Reference perplexity of SmolLM2-135M-Instruct (the Q4_1 GGUF of scripts/fetch-smollm2.sh)
as transformers computes it: the GGUF dequantized to float32 by `from_pretrained(dir,
gguf_file=...)`, the same text and the same windows as `cocomix eval ppl`.

    python scripts/smollm2-ppl.py --write-sample data/smollm2-sample.txt
    python scripts/smollm2-ppl.py --text data/smollm2-sample.txt --seq-len 512
    cocomix eval ppl --model data/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text data/smollm2-sample.txt --seq-len 512 --json

Rules shared with `cocomix eval ppl` (crates/eval: lm-evaluation-harness's
`loglikelihood_rolling`):
- the whole file is tokenized once with no special token added (SmolLM2's GGUF says
  `add_bos_token = false`), and the end-of-text token (`<|endoftext|>`, id 0) is put in front
  as the context of the first token, so every token of the text is predicted once;
- rolling windows (`get_rolling_token_windows`, context_len 1): window k predicts tokens
  [1 + k·L, 1 + (k+1)·L) from the tokens just before them; the last, shorter window reads the
  L tokens before its end and scores only its new tokens;
- perplexity = exp(mean NLL over all predictions).

Tokenizer: transformers 5.x builds the GGUF's tokenizer but has no mapping for llama.cpp's
`smollm` pre-tokenizer kind and falls back to GPT-2's split; SmolLM2's own tokenizer.json and
llama.cpp isolate every digit first. The script sets that pre-tokenizer (as cocomix does);
`--unpatched` scores transformers' fallback tokenization too, for comparison.

Needs torch, transformers, gguf and accelerate (transformers' GGUF loader requires it; e.g.
a venv with `pip install torch transformers gguf accelerate`).
"""
import argparse
import gzip
import hashlib
import itertools
import json
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GGUF = os.path.join(ROOT, "data/models/SmolLM2-135M-Instruct.Q4_1.gguf")
CORPUS = os.path.join(ROOT, "assets/corpus/default.jsonl.gz")


def write_sample(path, n_chars):
    """The first documents of the bundled corpus, whole, joined by blank lines."""
    docs, size = [], 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            docs.append(json.loads(line)["text"])
            size += len(docs[-1])
            if size >= n_chars:
                break
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        f.write("\n\n".join(docs))
    print(f"{path}: {len(docs)} documents, {size} characters")


def windows(n, seq_len):
    """(input start, input length, scored) of each window over n tokens, as cocomix."""
    out = []
    for a in range(1, n, seq_len):
        b = min(a + seq_len, n)
        length = min(seq_len, b - 1)
        out.append((b - 1 - length, length, b - a))
    return out


def perplexity(model, ids, seq_len, batch):
    import torch

    ws = windows(len(ids), seq_len)
    total, count, i = 0.0, 0, 0
    while i < len(ws):
        group = list(itertools.takewhile(lambda w: w[1:] == ws[i][1:], ws[i : i + batch]))
        _, length, m = ws[i]
        x = torch.tensor([ids[s : s + length] for s, _, _ in group])
        y = torch.tensor([ids[s + 1 + length - m : s + 1 + length] for s, _, _ in group])
        with torch.no_grad():
            logits = model(x).logits.float()[:, length - m :]
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum")
        total += nll.item()
        count += y.numel()
        i += len(group)
    return total / count, count


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--gguf", default=GGUF)
    ap.add_argument("--text")
    ap.add_argument("--write-sample", metavar="PATH")
    ap.add_argument("--sample-chars", type=int, default=40_000)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--unpatched", action="store_true")
    args = ap.parse_args()
    if args.write_sample:
        write_sample(args.write_sample, args.sample_chars)
        if not args.text:
            return

    import torch
    from tokenizers import pre_tokenizers
    from transformers import AutoTokenizer, LlamaForCausalLM

    d, name = os.path.split(os.path.abspath(args.gguf))
    with open(args.text, encoding="utf-8", newline="") as f:
        text = f.read()
    model = LlamaForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    encode = lambda: [eot] + list(tok(text, add_special_tokens=False)["input_ids"])
    runs = [("transformers-unpatched", encode())] if args.unpatched else []
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    runs.insert(0, ("smollm", encode()))
    for kind, ids in runs:
        nll, n = perplexity(model, ids, args.seq_len, args.batch)
        sha = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        print(json.dumps({"tokenizer": kind, "tokens": n, "nll": nll, "ppl": math.exp(nll), "seq_len": args.seq_len, "ids_sha256_16": sha}))


if __name__ == "__main__":
    main()
