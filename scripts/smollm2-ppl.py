#!/usr/bin/env python3
"""Reference perplexity of SmolLM2-135M-Instruct (the Q4_1 GGUF of scripts/fetch-smollm2.sh)
as transformers computes it: the GGUF dequantized to float32 by `from_pretrained(dir,
gguf_file=...)`, the same text and the same windows as `cocomix eval ppl`.

    python scripts/smollm2-ppl.py --write-sample data/smollm2-sample.txt
    python scripts/smollm2-ppl.py --text data/smollm2-sample.txt --seq-len 512
    cocomix eval ppl --model data/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --text data/smollm2-sample.txt --seq-len 512 --json

Rules shared with `cocomix eval ppl` (crates/trainer/src/eval.rs):
- the whole file is tokenized once, with no BOS or other special token added (SmolLM2's GGUF
  says `add_bos_token = false`);
- non-overlapping windows: window i reads tokens [i·L, i·L + L) and predicts
  [i·L + 1, i·L + L + 1), so every token after the first is predicted once; the last window
  may be shorter;
- perplexity = exp(mean NLL over all predictions).

Tokenizer: transformers 5.x builds the GGUF's tokenizer but has no mapping for llama.cpp's
`smollm` pre-tokenizer kind and falls back to GPT-2's split; SmolLM2's own tokenizer.json and
llama.cpp isolate every digit first. The script sets that pre-tokenizer (as cocomix does);
`--unpatched` scores transformers' fallback tokenization too, for comparison.

Needs torch, transformers, gguf and accelerate (transformers' GGUF loader requires it).
"""
import argparse
import gzip
import hashlib
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


def perplexity(model, ids, seq_len, batch):
    import torch

    starts = list(range(0, len(ids) - 1, seq_len))
    total, count = 0.0, 0
    i = 0
    while i < len(starts):
        n = min(seq_len, len(ids) - 1 - starts[i])
        group = [starts[i]]
        while len(group) < batch and i + len(group) < len(starts) and min(seq_len, len(ids) - 1 - starts[i + len(group)]) == n:
            group.append(starts[i + len(group)])
        x = torch.tensor([ids[s : s + n] for s in group])
        y = torch.tensor([ids[s + 1 : s + 1 + n] for s in group])
        with torch.no_grad():
            logits = model(x).logits.float()
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
    runs = [("transformers-unpatched", list(tok(text, add_special_tokens=False)["input_ids"]))] if args.unpatched else []
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )
    runs.insert(0, ("smollm", list(tok(text, add_special_tokens=False)["input_ids"])))
    for kind, ids in runs:
        nll, n = perplexity(model, ids, args.seq_len, args.batch)
        sha = hashlib.sha256(json.dumps(ids).encode()).hexdigest()[:16]
        print(json.dumps({"tokenizer": kind, "tokens": n, "nll": nll, "ppl": math.exp(nll), "seq_len": args.seq_len, "ids_sha256_16": sha}))


if __name__ == "__main__":
    main()
