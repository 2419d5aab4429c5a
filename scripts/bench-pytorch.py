#!/usr/bin/env python3
"""PyTorch eager mirror of `cocomix bench train`: one optimizer step per objective.

Each case builds the same model shapes, data sizes, dropout, optimizer, clipping and loss as
the Rust case of the same name (crates/bench/src/train.rs) and times the same thing: the
step from making the batch (and, for online labels, the teacher + SAE attribution) through
forward, backward, clipping and AdamW. Default shape: 6 steps, 69M shape: 4 steps; the first
and the last are not timed (exactly as the Rust bench). Tokens/s is the harmonic mean over the
timed steps.

Differences from the Rust side, all deliberate and all outside the timed math:
  * model code is HF-style GPT-2 written here (same parameter shapes, init N(0, 0.02),
    residual projections / sqrt(2 n_layer), tied head); attention is
    `F.scaled_dot_product_attention(..., dropout_p=0.1, is_causal=True)`;
  * random streams differ (weights, dropout masks, synthetic SAE), so losses differ;
  * tokens are the same synthetic formula `(i * 2654435761) % vocab`, windows at random
    offsets (online/NTP/KD) or aligned windows with labels (cached);
  * cached labels are drawn once up front (the Rust cache is built before timing too);
  * online labels: residual gradient of the frozen teacher (no weight gradients), SAE encode
    (unbiased LayerNorm, top-k, ReLU), sparse attribution `z * <g, W_dec[:, i]>`, then
    `torch.topk` over the dense score vector (ties in torch's order, not lowest index);
  * the teacher's work for a batch (KD logits, online labels) runs in sequence with the
    student's step here; the Rust trainer builds it one batch ahead on its own thread,
    overlapping the student's step (same numbers; `COCOMIX_OVERLAP=0` runs it in sequence);
  * the concept compress is the sparse form `sum_j z[i_j] W[:, i_j]` like ours (identical
    values and gradients); `--compress dense` runs the reference release's
    `compress_layer(mask * z)` instead.

Usage: bench-pytorch.py [--small] [--json] [--threads N] [--precision f32|bf16]
                        [--compress sparse|dense] [--device cpu|cuda] [--case CASE [--shapes JSON]]
With --device cuda (the GPU check) the same step runs on the GPU (bf16: torch.autocast on
CUDA); peak_gpu_mib is torch's peak allocation.
Needs torch (CPU wheel is enough): python3 -m venv venv && venv/bin/pip install torch \
    --index-url https://download.pytorch.org/whl/cpu
"""
import argparse
import json
import math
import os
import resource
import subprocess
import sys
import time

CASES_SMALL = [
    "train-default-ntp",
    "train-default-kd",
    "train-default-cocomix-cached",
    "train-default-cocomix-online",
]
CASES_BIG = [
    "train-69m-ntp",
    "train-69m-kd",
    "train-69m-cocomix-cached",
    "train-69m-cocomix-online",
]


def shapes(size, objective):
    """Student, concept, teacher, SAE shapes and batch of a case: those of configs/default.toml
    (with assets/teacher/config.json) and configs/gpt2-69m.toml as of this writing. `cargo
    xtask bench train --vs-pytorch` passes the Rust case's own shapes (`--shapes`) instead, so
    the comparison cannot drift from the configs."""
    cocomix = objective.startswith("cocomix")
    if size == "default":
        student = dict(vocab=2048, ctx=128, d=96 if cocomix else 128, layers=4, heads=4)
        concept = dict(c=4096, kc=16, insert=1, k_attr=4)
        teacher = dict(vocab=2048, ctx=128, d=256, layers=6, heads=8, layer=2)
        sae = dict(n_latents=4096, k=16)
        batch = 16
    else:
        student = dict(vocab=50257, ctx=1024, d=512 if cocomix else 624, layers=8, heads=8)
        concept = dict(c=32768, kc=32, insert=3, k_attr=4)
        teacher = dict(vocab=50257, ctx=1024, d=768, layers=12, heads=12, layer=5)
        sae = dict(n_latents=32768, k=32)
        batch = 1
    return dict(student=student, concept=concept if cocomix else None, teacher=teacher,
                sae=sae, batch=batch)


def run_case(case, args):
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    # Every tensor below is made on the bench device (`--device cuda` for the GPU check).
    torch.set_default_device(args.device)
    cuda = args.device.startswith("cuda")
    rest = case[len("train-"):]
    size, objective = rest.split("-", 1)
    cocomix = objective.startswith("cocomix")
    shp = json.loads(args.shapes) if args.shapes else shapes(size, objective)
    if args.batch and size == "69m" and not args.shapes:
        shp["batch"] = args.batch
    sc, cc, tc, batch = shp["student"], shp["concept"], shp["teacher"], shp["batch"]
    t = sc["ctx"]
    autocast = args.precision == "bf16"

    class Block(nn.Module):
        def __init__(self, d, heads, layers, p):
            super().__init__()
            self.heads, self.p = heads, p
            self.ln_1 = nn.LayerNorm(d, eps=1e-5)
            self.c_attn = nn.Linear(d, 3 * d)
            self.attn_proj = nn.Linear(d, d)
            self.ln_2 = nn.LayerNorm(d, eps=1e-5)
            self.c_fc = nn.Linear(d, 4 * d)
            self.mlp_proj = nn.Linear(4 * d, d)
            for lin in (self.c_attn, self.c_fc):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)
            for lin in (self.attn_proj, self.mlp_proj):
                nn.init.normal_(lin.weight, std=0.02 / math.sqrt(2 * layers))
                nn.init.zeros_(lin.bias)

        def forward(self, x):
            b, s, d = x.shape
            p = self.p if self.training else 0.0
            q, k, v = self.c_attn(self.ln_1(x)).split(d, dim=2)
            q, k, v = (z.view(b, s, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
            y = y.transpose(1, 2).reshape(b, s, d)
            x = x + F.dropout(self.attn_proj(y), p, self.training)
            h = F.gelu(self.c_fc(self.ln_2(x)), approximate="tanh")
            return x + F.dropout(self.mlp_proj(h), p, self.training)

    class Gpt2(nn.Module):
        def __init__(self, vocab, ctx, d, layers, heads, p):
            super().__init__()
            self.p = p
            self.wte = nn.Embedding(vocab, d)
            self.wpe = nn.Embedding(ctx, d)
            nn.init.normal_(self.wte.weight, std=0.02)
            nn.init.normal_(self.wpe.weight, std=0.02)
            self.h = nn.ModuleList(Block(d, heads, layers, p) for _ in range(layers))
            self.ln_f = nn.LayerNorm(d, eps=1e-5)

        def embed(self, ids):
            pos = torch.arange(ids.shape[1])
            return F.dropout(self.wte(ids) + self.wpe(pos), self.p, self.training)

        def head(self, h):
            return self.ln_f(h) @ self.wte.weight.t()

        def forward(self, ids):
            h = self.embed(ids)
            for blk in self.h:
                h = blk(h)
            return self.head(h)

    def unbiased_ln(x, eps=1e-5):
        mu = x.mean(-1, keepdim=True)
        std = x.std(-1, keepdim=True)  # unbiased (Bessel), as the SAE and the release
        return (x - mu) / (std + eps), mu, std

    class CoCoMix(Gpt2):
        def __init__(self, c, kc, insert, **kw):
            super().__init__(**kw)
            d = kw["d"]
            self.kc, self.insert = kc, insert
            self.pre_bias = nn.Parameter(torch.zeros(d))
            self.concept_predictor = nn.Linear(d, c)
            self.compress_layer = nn.Linear(c, d)
            for lin in (self.concept_predictor, self.compress_layer):
                nn.init.normal_(lin.weight, std=0.02)
                nn.init.zeros_(lin.bias)

        def forward(self, ids):
            b, t = ids.shape
            h = self.embed(ids)
            for blk in self.h[: self.insert]:
                h = blk(h)
            x, mu, std = unbiased_ln(h)
            d = h.shape[2]
            z = self.concept_predictor((x - self.pre_bias).reshape(b * t, d))  # [N, C]
            idx = torch.topk(z.detach(), self.kc, dim=1).indices
            if args.compress == "dense":
                mask = torch.zeros_like(z).scatter(1, idx, 1.0)
                c_hat = self.compress_layer(z * mask)
            else:
                vals = z.gather(1, idx)  # [N, Kc]
                cols = self.compress_layer.weight.t()[idx]  # [N, Kc, d]
                c_hat = (vals.unsqueeze(2) * cols).sum(1) + self.compress_layer.bias
            c = (c_hat + self.pre_bias).reshape(b, t, d) * std + mu
            h = torch.stack([h, c], 2).reshape(b, 2 * t, d)
            for blk in self.h[self.insert:]:
                h = blk(h)
            return self.head(h[:, 1::2]), z

    p = 0.1
    if cocomix:
        model = CoCoMix(cc["c"], cc["kc"], cc["insert"], vocab=sc["vocab"], ctx=t, d=sc["d"],
                        layers=sc["layers"], heads=sc["heads"], p=p)
    else:
        model = Gpt2(sc["vocab"], t, sc["d"], sc["layers"], sc["heads"], p)
    model.train()

    teacher = sae = None
    n_latents, k_sae = shp["sae"]["n_latents"], shp["sae"]["k"]
    layer = tc["layer"]
    if objective in ("kd", "cocomix-online"):
        teacher = Gpt2(tc["vocab"], tc["ctx"], tc["d"], tc["layers"], tc["heads"], 0.0).eval()
        for q in teacher.parameters():
            q.requires_grad_(False)
    if objective == "cocomix-online":
        dt = tc["d"]
        sae = dict(
            pre_bias=torch.zeros(dt),
            enc=torch.randn(n_latents, dt) * 0.05,
            lat_bias=torch.zeros(n_latents),
            dec=torch.randn(dt, n_latents) * 0.05,
        )

    n_tok = (batch * 4 + 1) * t + 1
    data = (torch.arange(n_tok, dtype=torch.int64) * 2654435761) % sc["vocab"]
    gen = torch.Generator(device=args.device).manual_seed(0)

    def online_labels(x):
        # Teacher blocks 0..=layer without a graph, then the upper blocks, ln_f and the head
        # from the leaf x_L; mean next-token loss; SAE codes of x_L; sparse attribution.
        with torch.no_grad():
            h = teacher.embed(x)
            for blk in teacher.h[: layer + 1]:
                h = blk(h)
        xl = h.detach().requires_grad_(True)
        h = xl
        for blk in teacher.h[layer + 1:]:
            h = blk(h)
        logits = teacher.head(h)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[2]), x[:, 1:].reshape(-1))
        (g,) = torch.autograd.grad(loss, xl)
        with torch.no_grad():
            dt = xl.shape[2]
            xn, _, _ = unbiased_ln(xl.reshape(-1, dt))
            pre = (xn - sae["pre_bias"]) @ sae["enc"].t() + sae["lat_bias"]
            val, idx = torch.topk(pre, k_sae, dim=1)
            val = val.relu()
            cols = sae["dec"].t()[idx]  # [N, k, d]
            scores = (cols * g.reshape(-1, 1, dt)).sum(2) * val
            dense = torch.zeros(idx.shape[0], n_latents).scatter(1, idx, scores)
            k_attr = cc["k_attr"]
            return torch.topk(dense, k_attr, dim=1).indices.reshape(x.shape[0], x.shape[1], k_attr)

    cached = None
    if objective == "cocomix-cached":
        n_windows = (n_tok - 1) // t
        cached = torch.randint(0, n_latents, (n_windows, t, cc["k_attr"]), generator=gen)

    def make_batch():
        if cached is not None:
            w = torch.randint(0, cached.shape[0], (batch,), generator=gen)
            starts = w * t
        else:
            starts = torch.randint(0, n_tok - t - 1, (batch,), generator=gen)
        ids = torch.stack([data[s: s + t + 1] for s in starts.tolist()])
        x, y = ids[:, :-1], ids[:, 1:]
        labels = None
        if cached is not None:
            labels = cached[w]
        elif objective == "cocomix-online":
            labels = online_labels(x)
        return x, y, labels

    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, betas=(0.9, 0.95), eps=1e-8,
                            weight_decay=0.1)
    lam, kd_tau = 0.1, 1.0

    def step():
        x, y, labels = make_batch()
        with torch.autocast(args.device.split(":")[0], dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        logits, z = (out if cocomix else (out, None))
        logits = logits.float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[2]), y.reshape(-1))
        loss = ce
        if cocomix:
            logp = F.log_softmax(z.float(), dim=1)
            loss = ce + lam * (-logp.gather(1, labels.reshape(-1, cc["k_attr"])).mean())
        elif objective == "kd":
            with torch.no_grad():
                tl = teacher(x)
            ls = F.log_softmax(logits / kd_tau, -1)
            lt = F.log_softmax(tl / kd_tau, -1)
            loss = (lt.exp() * (lt - ls)).sum(-1).mean() * kd_tau**2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.detach().item()

    # The steps and the timed ones as `cocomix bench train` (run_tokens_per_s): the first
    # (warm-up) and the last left out.
    steps = 6 if size == "default" else 4
    tps = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()  # ends in .item(): on a GPU the step has finished when it returns
        tps.append(batch * t / (time.perf_counter() - t0))
    timed = tps[int(len(tps) > 2):len(tps) - int(len(tps) > 3)]
    rate = len(timed) / sum(1.0 / r for r in timed)
    return {
        "case": case, "objective": objective, "size": size, "batch": batch, "seq_len": t,
        "precision": args.precision, "compress": args.compress, "tokens_per_s": rate,
        "step_s": batch * t / rate,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
        "device": args.device, "shapes": shp,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true", help="skip the 69M cases")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    ap.add_argument("--compress", choices=["sparse", "dense"], default="sparse")
    ap.add_argument("--batch", type=int, help="sequences per step of the 69M cases")
    ap.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    ap.add_argument("--case", help="run one case in this process")
    ap.add_argument("--shapes", help="the case's shapes as JSON (the `shapes` of `cocomix bench "
                    "train --case CASE`), instead of this script's table")
    args = ap.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    import torch

    results = []
    for case in CASES_SMALL + ([] if args.small else CASES_BIG):
        print(f"bench-pytorch: {case} …", file=sys.stderr)
        cmd = [sys.executable, __file__, "--case", case, "--threads", str(args.threads),
               "--precision", args.precision, "--compress", args.compress, "--device", args.device]
        if args.batch:
            cmd += ["--batch", str(args.batch)]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"case {case} failed:\n{out.stderr}")
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    report = {"bench": "train-pytorch", "torch": torch.__version__, "threads": args.threads,
              "results": results}
    if args.json:
        print(json.dumps(report))
    else:
        for r in results:
            print(json.dumps(r))


if __name__ == "__main__":
    main()
