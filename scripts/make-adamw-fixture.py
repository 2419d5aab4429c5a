#!/usr/bin/env python3
"""Writes testdata/adamw/torch-3-steps.json: three AdamW steps of torch.optim.AdamW with
gradient-norm clipping (torch.nn.utils.clip_grad_norm_), as the reference release trains
(betas (0.9, 0.95), eps 1e-8, weight decay 0.1 on every parameter, clip 1.0), with a
different learning rate per step (a schedule). The Rust test feeds the same gradients and
learning rates to cocomix's AdamW and clipping and compares every parameter after each step.

Run: python3 scripts/make-adamw-fixture.py  (needs torch; any 2.x)
"""
import json
import pathlib

import torch

torch.set_default_dtype(torch.float32)
p1 = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
p2 = torch.nn.Parameter(torch.tensor([[0.3, -0.7], [1.5, 0.0]]))
params = [p1, p2]
opt = torch.optim.AdamW(params, lr=0.1, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
# Step 1's gradient norm (≈ 5.6) is clipped to 1; steps 2 and 3 are below the clip; step 3
# flips signs so the moments' history (the betas) matters.
grads = [
    ([3.0, -4.0, 1.0], [[0.5, 2.0], [-1.0, 0.25]]),
    ([0.2, 0.1, -0.3], [[0.05, -0.4], [0.1, 0.0]]),
    ([-0.5, 0.3, 0.2], [[-0.1, 0.3], [0.2, -0.05]]),
]
lrs = [0.1, 0.05, 0.02]
steps = []
for (g1, g2), lr in zip(grads, lrs):
    p1.grad = torch.tensor(g1)
    p2.grad = torch.tensor(g2)
    norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    for group in opt.param_groups:
        group["lr"] = lr
    opt.step()
    steps.append(
        {
            "lr": lr,
            "grads": [g1, g2],
            "grad_norm": float(norm),
            "params": [p1.detach().tolist(), p2.detach().tolist()],
        }
    )
out = {
    "torch": torch.__version__,
    "betas": [0.9, 0.95],
    "eps": 1e-8,
    "weight_decay": 0.1,
    "clip": 1.0,
    "init": [[1.0, -2.0, 0.5], [[0.3, -0.7], [1.5, 0.0]]],
    "steps": steps,
}
path = pathlib.Path(__file__).resolve().parent.parent / "testdata/adamw/torch-3-steps.json"
path.write_text(json.dumps(out, indent=1) + "\n")
print(path)
