#!/usr/bin/env python3
"""Write the Llama fixtures of crates/model/tests/fixtures/llama/ and the GGUF tokenizer
fixtures of crates/data/tests/fixtures/gguf/, each with values computed by the reference
tools (transformers + PyTorch for models and tokenizers, llama.cpp's gguf-py for GGUF files
and their dequantization).

Run from the repository root with the project venv (torch, transformers 5.x, gguf 0.19,
tokenizers):

    /work/venv/bin/python scripts/make-llama-fixtures.py [SmolLM2-135M-Instruct.Q4_1.gguf]

With the SmolLM2 GGUF (scripts/fetch-smollm2.sh), it also writes the reference token ids of
that file's tokenizer on a sample of the bundled corpus (smollm2-ids.json).

What is written (model fixtures, all from one tiny random LlamaForCausalLM with GQA and an
untied head, weights rounded to f16 so that the f16 files hold them exactly):
- hf/          config.json + model.safetensors (f16) + tokenizer.json, by save_pretrained
- hf-sharded/  the same weights in two shards with model.safetensors.index.json
- tiny-<type>.gguf for F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1: the same weights,
  quantized by gguf-py, Q/K permuted as llama.cpp's convert_hf_to_gguf.py permutes them, a
  byte-level BPE tokenizer in the metadata
- tiny-llama3-q8_0.gguf: the same weights with llama.cpp's `rope_freqs.weight` for Llama 3
  rope scaling
- kquants.gguf: random blocks of Q2_K..Q6_K (dequantization only: gguf-py cannot quantize them)
- bad-iq4_nl.gguf, bad-q8_1.gguf, bad-arch.gguf: files to refuse
- reference.safetensors: input ids; PyTorch logits of the HF model, of transformers'
  load of each quantized GGUF, of the HF model with llama3 and linear rope scaling; the
  hidden state after block LAYER and dL/dx there for the mean next-token loss
- dequant.json: sha256 of gguf-py's float32 dequantization of every tensor of every file
"""
import copy
import hashlib
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch
import gguf
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "crates/model/tests/fixtures/llama")
TOK_OUT = os.path.join(ROOT, "crates/data/tests/fixtures/gguf")
CORPUS = os.path.join(ROOT, "assets/corpus/default.jsonl.gz")

VOCAB = 272
D, LAYERS, HEADS, KV_HEADS, FFN = 32, 3, 4, 2, 32
LAYER = 1  # the block whose output (hidden state, residual gradient) is checked
CONTEXT = 64
THETA = 1000.0
B, T = 2, 8
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def corpus_text(n_chars):
    import gzip

    out, size = [], 0
    with gzip.open(CORPUS, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            out.append(text)
            size += len(text)
            if size >= n_chars:
                break
    return "\n\n".join(out)[:n_chars]


def train_bpe(vocab_size, text):
    """A byte-level BPE trained with GPT-2's pre-tokenizer (so digit runs get merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([text[i : i + 2000] for i in range(0, len(text), 2000)], trainer)
    return tok


def vocab_and_merges(tok):
    model = json.loads(tok.to_str())["model"]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    tokens = [t for t, _ in vocab]
    assert [i for _, i in vocab] == list(range(len(tokens)))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def add_tokenizer(w, tokens, merges, pre, user_defined=()):
    """tokenizer.ggml.* as llama.cpp's convert_hf_to_gguf.py writes a byte-level BPE."""
    types = [gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens]
    tokens = list(tokens) + list(user_defined)
    types += [gguf.TokenType.USER_DEFINED] * len(user_defined)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tokens.index("<|im_start|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_unk_token_id(tokens.index("<|endoftext|>"))
    w.add_pad_token_id(tokens.index("<|im_end|>"))
    w.add_add_bos_token(False)


def permute(w, n_head, n_head_kv):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: HF's rotate-half rows → interleaved."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(hf):
    if hf in GGUF_NAMES:
        return GGUF_NAMES[hf]
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{LAYER_NAMES[rest]}"


def encode(arr, qtype):
    """(data, raw_dtype) as convert_hf_to_gguf.py hands them to GGUFWriter.add_tensor."""
    if qtype == Q.F32:
        return arr.astype(np.float32), None
    if qtype == Q.F16:
        return arr.astype(np.float16), None
    return gguf.quants.quantize(arr.astype(np.float32), qtype), qtype


def write_model_gguf(path, state, qtype, tokens, merges, rope_freqs=None):
    w = gguf.GGUFWriter(path, "llama")
    w.add_name("tiny-llama")
    w.add_block_count(LAYERS)
    w.add_context_length(CONTEXT)
    w.add_embedding_length(D)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_freq_base(THETA)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(VOCAB)
    w.add_rope_dimension_count(D // HEADS)
    add_tokenizer(w, tokens, merges, "smollm")
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs.astype(np.float32))
    for name, t in state.items():
        arr = t.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            arr = permute(arr, HEADS, HEADS)
        elif name.endswith("k_proj.weight"):
            arr = permute(arr, HEADS, KV_HEADS)
        # llama.cpp keeps 1-D tensors (norms) in F32.
        data, raw = encode(arr, qtype if arr.ndim == 2 else Q.F32)
        w.add_tensor(gguf_name(name), data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def dequant_hashes(path):
    """sha256 of gguf-py's float32 dequantization (row-major, GGUF's own row order)."""
    r = gguf.GGUFReader(path)
    out = {}
    for t in r.tensors:
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        shape = [int(s) for s in reversed(t.shape.tolist())]
        x = np.ascontiguousarray(x.reshape(shape))
        out[t.name] = {"type": t.tensor_type.name, "shape": shape, "sha256": hashlib.sha256(x.tobytes()).hexdigest()}
    return out


def gguf_state(path, cfg_heads, cfg_kv):
    """HF-named float32 state dict from a GGUF: gguf-py's dequantization, Q/K un-permuted."""
    inv = {v: k for k, v in GGUF_NAMES.items()}
    r = gguf.GGUFReader(path)
    state = {}
    for t in r.tensors:
        if t.name == "rope_freqs.weight":
            continue
        x = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        x = x.reshape([int(s) for s in reversed(t.shape.tolist())])
        if t.name in inv:
            name = inv[t.name]
        else:
            _, i, rest = t.name.split(".", 2)
            name = f"model.layers.{i}." + {v: k for k, v in LAYER_NAMES.items()}[rest]
        if ".attn_q." in t.name or ".attn_k." in t.name:
            n = cfg_heads if ".attn_q." in t.name else cfg_kv
            hd2 = x.shape[0] // n // 2
            x = x.reshape(n, hd2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)
        state[name] = torch.from_numpy(np.ascontiguousarray(x))
    return state


def logits_of(model, ids):
    with torch.no_grad():
        return model(ids).logits.float().numpy()


def llama3_rope_freqs(theta, dim, factor, low, high, old_ctx):
    """llama.cpp convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_freqs)."""
    freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for f in freqs.tolist():
        wavelen = 2 * math.pi / f
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def write_simple_gguf(path, arch, tensors):
    w = gguf.GGUFWriter(path, arch)
    for name, data, raw in tensors:
        w.add_tensor(name, data, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def model_fixtures(ref, hashes):
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    tiny_tok = train_bpe(VOCAB, corpus_text(200_000))
    tokens, merges = vocab_and_merges(tiny_tok)
    assert len(tokens) == VOCAB, len(tokens)

    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=D, intermediate_size=FFN, num_hidden_layers=LAYERS,
        num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=CONTEXT,
        rms_norm_eps=1e-5, rope_theta=THETA, tie_word_embeddings=False,
        bos_token_id=tokens.index("<|im_start|>"), eos_token_id=tokens.index("<|im_end|>"),
    )
    model = LlamaForCausalLM(cfg).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            # Random norms (HF initialises them to 1), std 0.2 elsewhere so attention is not
            # uniform; then rounded to f16 so the f16 files hold the weights exactly.
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
            p.copy_(p.half().float())

    hf = os.path.join(OUT, "hf")
    # A half-precision copy is saved: converting the model itself would also round its
    # rotary `inv_freq` buffer.
    copy.deepcopy(model).half().save_pretrained(hf)
    tiny_tok.save(os.path.join(hf, "tokenizer.json"))
    sharded = os.path.join(OUT, "hf-sharded")
    copy.deepcopy(model).half().save_pretrained(sharded, max_shard_size="40KB")
    assert os.path.exists(os.path.join(sharded, "model.safetensors.index.json")), "not sharded"

    ids = torch.from_numpy(rng.integers(0, VOCAB, size=(B, T))).long()
    ref["input_ids"] = ids.numpy().astype(np.int64)
    ref["logits"] = logits_of(model, ids)

    # Hidden state after block LAYER and dL/dx there (L: mean next-token cross-entropy).
    saved = {}

    def hook(_m, _inp, out):
        x = out[0] if isinstance(out, tuple) else out
        x.retain_grad()
        saved["x"] = x

    h = model.model.layers[LAYER].register_forward_hook(hook)
    logits = model(ids).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    h.remove()
    ref["hidden"] = saved["x"].detach().numpy()
    ref["residual_grad"] = saved["x"].grad.numpy()
    ref["loss"] = np.array([loss.item()], dtype=np.float32)
    model.zero_grad()

    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]
    for qt in types:
        name = f"tiny-{qt.name.lower()}.gguf"
        path = os.path.join(OUT, name)
        write_model_gguf(path, state, qt, tokens, merges)
        hashes[name] = dequant_hashes(path)
        # transformers' own GGUF loader (gguf-py dequantization, its un-permute).
        m = LlamaForCausalLM.from_pretrained(OUT, gguf_file=name, dtype=torch.float32).eval()
        lg = logits_of(m, ids)
        # Independent check of our un-permute: the same weights through gguf-py directly.
        m2 = LlamaForCausalLM(cfg).float().eval()
        m2.load_state_dict(gguf_state(path, HEADS, KV_HEADS))
        assert np.allclose(lg, logits_of(m2, ids), atol=1e-5), name
        if qt in (Q.F32, Q.F16):
            assert np.allclose(lg, ref["logits"], atol=1e-5), name
        else:
            ref[f"logits_{qt.name.lower()}"] = lg
        print(f"{name}: {os.path.getsize(path)} bytes, max |Δ logits| vs f32 {np.abs(lg - ref['logits']).max():.4f}")

    # Rope scaling: llama3 (HF config, and llama.cpp's rope_freqs tensor in a GGUF) and linear.
    r3 = dict(rope_type="llama3", rope_theta=THETA, factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
    for kind, params in [("llama3", r3), ("linear", dict(rope_type="linear", rope_theta=THETA, factor=2.0))]:
        c = LlamaConfig(**{**cfg.to_dict(), "rope_parameters": params})
        m = LlamaForCausalLM(c).float().eval()
        m.load_state_dict(state)
        ref[f"logits_{kind}"] = logits_of(m, ids)
        with open(os.path.join(OUT, f"config-{kind}.json"), "w") as f:
            # The hub's older spelling (rope_theta + rope_scaling) that most configs still use.
            d = json.load(open(os.path.join(hf, "config.json")))
            d.pop("rope_parameters", None)
            d["rope_theta"] = THETA
            d["rope_scaling"] = {k: v for k, v in params.items() if k != "rope_theta"}
            json.dump(d, f, indent=2)
    name = "tiny-llama3-q8_0.gguf"
    path = os.path.join(OUT, name)
    freqs = llama3_rope_freqs(THETA, D // HEADS, 4.0, 1.0, 4.0, 32)
    write_model_gguf(path, state, Q.Q8_0, tokens, merges, rope_freqs=freqs)
    hashes[name] = dequant_hashes(path)
    c = LlamaConfig(**{**cfg.to_dict(), "rope_parameters": r3})
    m = LlamaForCausalLM(c).float().eval()
    m.load_state_dict(gguf_state(path, HEADS, KV_HEADS))
    ref["logits_llama3_q8_0"] = logits_of(m, ids)

    # K-quants: random blocks (with sane f16 scales) that gguf-py dequantizes.
    kq = []
    for qt in [Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]:
        bsize, tsize = gguf.GGML_QUANT_SIZES[qt]
        raw = rng.integers(0, 256, size=(2, 2 * tsize), dtype=np.uint8)
        # Every f16 scale (d, dmin) of these layouts sits at the end of the block: keep them
        # finite and small.
        n_scales = 2 if qt in (Q.Q2_K, Q.Q4_K, Q.Q5_K) else 1
        for row in raw.reshape(-1, tsize):
            if qt in (Q.Q4_K, Q.Q5_K):
                pos = [0, 2]  # d, dmin lead the block
            else:
                pos = [tsize - 2 * k for k in range(1, n_scales + 1)]
            for p in pos:
                row[p : p + 2] = np.frombuffer(np.float16(rng.uniform(0.01, 0.1)).tobytes(), np.uint8)
        kq.append((f"{qt.name.lower()}.weight", raw, qt))
    path = os.path.join(OUT, "kquants.gguf")
    write_simple_gguf(path, "llama", kq)
    hashes["kquants.gguf"] = dequant_hashes(path)

    # Files to refuse: a type candle does not know (IQ4_NL), one it knows that a weight never
    # has (Q8_1), an architecture that is not Llama.
    one = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), dtype=np.uint8)
    write_simple_gguf(os.path.join(OUT, "bad-iq4_nl.gguf"), "llama", [("token_embd.weight", one, Q.IQ4_NL)])
    one = np.zeros((1, gguf.GGML_QUANT_SIZES[Q.Q8_1][1]), dtype=np.uint8)
    write_simple_gguf(os.path.join(OUT, "bad-q8_1.gguf"), "llama", [("token_embd.weight", one, Q.Q8_1)])
    write_simple_gguf(os.path.join(OUT, "bad-arch.gguf"), "mamba", [("token_embd.weight", np.zeros((2, 32), np.float32), None)])


# Sample texts for the tokenizer fixtures: contractions, digit runs (the smollm pre-tokenizer
# isolates every digit), runs of spaces and newlines, non-ASCII, special tokens in the text.
SAMPLES = [
    "The year 1776, and 2021's budget of $4,500,000.25 — isn't it?",
    "  two  spaces\n\nand newlines\r\n\tand a tab   ",
    "I'm, you're, we'll, they'd, it's: DON'T SHOUT",
    "<|im_start|>user\nHello<|im_end|>\n<|endoftext|>12345 <think>",
    "naïve café — “quotes” 東京 🙂 ₂ ½",
]


def smollm_pre_tokenizer():
    """SmolLM2's tokenizer.json pre-tokenizer, and llama.cpp's `smollm` pre type: every digit
    alone, then GPT-2's split."""
    return pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    )


def tokenizer_fixtures():
    os.makedirs(TOK_OUT, exist_ok=True)
    # Mostly prose, plus every number of the corpus and the samples themselves, so that digit
    # runs, contractions and punctuation get merges and the pre-tokenizers differ in the ids.
    import re

    numbers = " ".join(re.findall(r"\$?[0-9][0-9,.]*", corpus_text(13_000_000)))
    text = corpus_text(300_000) + "\n" + numbers + "\n" + "\n".join(SAMPLES * 50)
    tok = train_bpe(1024, text)
    tokens, merges = vocab_and_merges(tok)
    sample = corpus_text(3000) + "\n" + "\n".join(SAMPLES)
    ref = {"samples": SAMPLES + [sample], "ids": {}}
    for pre in ["gpt2", "smollm", "llama-bpe", "default"]:
        name = f"tok-{pre}.gguf"
        path = os.path.join(TOK_OUT, name)
        w = gguf.GGUFWriter(path, "llama")
        add_tokenizer(w, tokens, merges, pre, user_defined=["<think>"])
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        t = AutoTokenizer.from_pretrained(TOK_OUT, gguf_file=name)
        if pre == "smollm":
            # transformers 5.x has no mapping for `smollm` and falls back to GPT-2's split;
            # llama.cpp and SmolLM2's own tokenizer.json isolate digits first.
            ref["ids"]["smollm-transformers-unpatched"] = [t(s, add_special_tokens=False)["input_ids"] for s in ref["samples"]]
            t.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
        ref["ids"][pre] = [t(s, add_special_tokens=False)["input_ids"] for s in ref["samples"]]
        for s, i in zip(ref["samples"], ref["ids"][pre]):
            assert t.decode(i) == s, (pre, s)
        print(f"{name}: {os.path.getsize(path)} bytes")
    with open(os.path.join(TOK_OUT, "reference.json"), "w") as f:
        json.dump(ref, f)


def smollm2_ids(path):
    """Reference ids of the real SmolLM2 GGUF's tokenizer (transformers, smollm split)."""
    d, name = os.path.split(os.path.abspath(path))
    t = AutoTokenizer.from_pretrained(d, gguf_file=name)
    unpatched = t
    t = AutoTokenizer.from_pretrained(d, gguf_file=name)
    t.backend_tokenizer.pre_tokenizer = smollm_pre_tokenizer()
    sample = corpus_text(6000) + "\n" + "\n".join(SAMPLES)
    ids = t(sample, add_special_tokens=False)["input_ids"]
    assert t.decode(ids) == sample
    out = {
        "gguf_sha256": hashlib.sha256(open(path, "rb").read()).hexdigest(),
        "text": sample,
        "ids": ids,
        "transformers_unpatched_ids": unpatched(sample, add_special_tokens=False)["input_ids"],
    }
    with open(os.path.join(TOK_OUT, "smollm2-ids.json"), "w") as f:
        json.dump(out, f)
    print(f"smollm2-ids.json: {len(ids)} ids")


def main():
    for d in [OUT]:
        if os.path.isdir(d):
            shutil.rmtree(d)
        os.makedirs(d)
    ref, hashes = {}, {}
    model_fixtures(ref, hashes)
    save_file(ref, os.path.join(OUT, "reference.safetensors"))
    with open(os.path.join(OUT, "dequant.json"), "w") as f:
        json.dump(hashes, f, indent=1, sort_keys=True)
    tokenizer_fixtures()
    if len(sys.argv) > 1:
        smollm2_ids(sys.argv[1])
    total = sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(OUT) for f in fs)
    print(f"{OUT}: {total} bytes")


if __name__ == "__main__":
    main()
