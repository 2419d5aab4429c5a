#!/usr/bin/env python3
"""Write tiny SAEs in the exact on-disk layouts of SAELens and EleutherAI sparsify, with the
libraries themselves, plus each library's own encode/decode of a few inputs, for
crates/sae/tests/ecosystem.rs and crates/attribution/tests/ecosystem.rs.

Needs `sae-lens` (6.54.12) and `eai-sparsify` (1.3.3) from PyPI, e.g.
    python3 -m venv venv-sae && venv-sae/bin/pip install sae-lens==6.54.12 eai-sparsify==1.3.3
Run from the repository root:
    venv-sae/bin/python scripts/make-sae-ecosystem-fixtures.py

Writes crates/sae/tests/fixtures/ecosystem/<name>/ (the SAE folder, written by the library's
own save function) and crates/sae/tests/fixtures/ecosystem/reference/<name>.safetensors with
`x [N, d]`, the dense latents `z [N, C]` and the reconstruction `recon [N, d]`, computed by
loading the folder back with the library (as a user would) and calling its encode/decode.
"""
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

# sparsify decodes with a Triton kernel when Triton is installed, which needs a GPU; this is
# the library's own switch to its CPU implementation.
os.environ["SPARSIFY_DISABLE_TRITON"] = "1"

import sae_lens
from sae_lens import (
    SAE,
    JumpReLUSAE,
    JumpReLUSAEConfig,
    StandardSAE,
    StandardSAEConfig,
    TopKSAE,
    TopKSAEConfig,
)
from sae_lens.training.activation_scaler import ActivationScaler
from sparsify import SparseCoder, SparseCoderConfig

assert sae_lens.__version__ == "6.54.12", sae_lens.__version__

OUT = Path("crates/sae/tests/fixtures/ecosystem")
D, C, N = 16, 64, 12


def inputs(seed):
    """Residual-like inputs: a per-token offset and scale, so that every normalisation
    (mean removal, norm rescaling) matters."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g)
    scale = 0.5 + 2.0 * torch.rand(N, 1, generator=g)
    offset = 0.5 * torch.randn(N, 1, generator=g)
    return (x * scale + offset).float()


def fill(sae, seed, b_enc_shift=0.0):
    """Random weights (the libraries' own inits leave biases at zero, which would hide a
    missing bias term), decoder rows of varied norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(D, C, generator=g) / D**0.5)
        sae.b_enc.copy_(0.3 * torch.randn(C, generator=g) + b_enc_shift)
        sae.W_dec.copy_(torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g)))
        sae.b_dec.copy_(0.2 * torch.randn(D, generator=g))


def reference(name, x, z, recon):
    (OUT / "reference").mkdir(parents=True, exist_ok=True)
    save_file(
        {"x": x.contiguous(), "z": z.contiguous(), "recon": recon.contiguous()},
        OUT / "reference" / f"{name}.safetensors",
    )
    active = (z > 0).sum(-1)
    print(f"{name}: active latents per token {active.min().item()}..{active.max().item()}")


def saelens(name, sae, seed, scaler=None):
    """Save with SAELens, load back with SAELens, and record its encode/decode."""
    folder = OUT / name
    shutil.rmtree(folder, ignore_errors=True)
    sae.save_model(folder)
    if scaler is not None:
        # A training checkpoint keeps the scaling factor beside the SAE, under this name.
        scaler.save(str(folder / "activation_scaler.json"))
    back = SAE.load_from_disk(folder)
    x = inputs(seed)
    with torch.no_grad():
        xin = scaler.scale(x) if scaler is not None else x
        z = back.encode(xin)
        recon = back.decode(z)
        if scaler is not None:
            recon = scaler.unscale(recon)
    reference(name, x, z, recon)
    return back, x, z, recon


def main():
    torch.manual_seed(0)
    shutil.rmtree(OUT, ignore_errors=True)
    OUT.mkdir(parents=True)

    # TopK, raw inputs, b_dec not subtracted from the input.
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=C, k=5, apply_b_dec_to_input=False))
    fill(sae, 1)
    saelens("saelens-topk", sae, 101)

    # TopK on layer-normalised inputs, b_dec subtracted, and pre-activations rescaled by the
    # decoder norms (SAELens folds those only when it saves an inference model).
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=D,
            d_sae=C,
            k=6,
            apply_b_dec_to_input=True,
            normalize_activations="layer_norm",
            rescale_acts_by_decoder_norm=True,
        )
    )
    fill(sae, 2)
    saelens("saelens-topk-layernorm", sae, 102)

    # ReLU ("standard"): a variable number of active latents per token.
    sae = StandardSAE(StandardSAEConfig(d_in=D, d_sae=C, apply_b_dec_to_input=True))
    fill(sae, 3, b_enc_shift=-0.4)
    saelens("saelens-relu", sae, 103)

    # ReLU with expected_average_only_in: the factor lives in activation_scaler.json.
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=D,
            d_sae=C,
            apply_b_dec_to_input=False,
            normalize_activations="expected_average_only_in",
        )
    )
    fill(sae, 4, b_enc_shift=-0.2)
    scaler = ActivationScaler(scaling_factor=0.37)
    back, x, z, recon = saelens("saelens-relu-scaled", sae, 104, scaler)
    # The same SAE with the factor folded into the weights, as SAELens' from_pretrained does.
    back.fold_activation_norm_scaling_factor(0.37)
    with torch.no_grad():
        z2 = back.encode(x)
        assert torch.allclose(z, z2, atol=1e-5) and torch.allclose(recon, back.decode(z2), atol=1e-5)

    # JumpReLU with per-latent thresholds, on norm-rescaled inputs.
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(
            d_in=D,
            d_sae=C,
            apply_b_dec_to_input=False,
            normalize_activations="constant_norm_rescale",
        )
    )
    fill(sae, 5)
    with torch.no_grad():
        g = torch.Generator().manual_seed(55)
        sae.threshold.copy_(0.1 + 0.6 * torch.rand(C, generator=g))
    back, x, _, _ = saelens("saelens-jumprelu", sae, 105)
    # The thresholds must matter: some latents pass the ReLU but not their threshold.
    with torch.no_grad():
        pre = back.process_sae_in(x) @ back.W_enc + back.b_enc
        assert ((pre > 0) & (pre <= back.threshold)).sum() > 0, "thresholds cut nothing"

    # A SAELens < 6 config (as many hub releases still have): no `architecture`, the
    # activation in `activation_fn_str` / `activation_fn_kwargs`, a boolean
    # `normalize_activations`. SAELens converts it when it loads the folder.
    sae = TopKSAE(TopKSAEConfig(d_in=D, d_sae=C, k=4, apply_b_dec_to_input=True))
    fill(sae, 6)
    folder = OUT / "saelens-legacy-topk"
    sae.save_model(folder)
    cfg = json.loads((folder / "cfg.json").read_text())
    legacy = {
        "d_in": D,
        "d_sae": C,
        "dtype": "float32",
        "device": "cpu",
        "model_name": "gpt2-small",
        "hook_point": "blocks.1.hook_resid_post",
        "hook_point_layer": 1,
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 4},
        "apply_b_dec_to_input": cfg["apply_b_dec_to_input"],
        "normalize_activations": False,
        "finetuning_scaling_factor": False,
        "context_size": 128,
        "sae_lens_training_version": "3.13.0",
    }
    (folder / "cfg.json").write_text(json.dumps(legacy))
    back = SAE.load_from_disk(folder)
    assert isinstance(back, TopKSAE) and back.cfg.k == 4
    x = inputs(106)
    with torch.no_grad():
        z = back.encode(x)
        reference("saelens-legacy-topk", x, z, back.decode(z))

    # EleutherAI sparsify: a repository of hookpoint folders; this is one of them.
    coder = SparseCoder(D, SparseCoderConfig(num_latents=C, k=6))
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        coder.encoder.weight.copy_(torch.randn(C, D, generator=g) / D**0.5)
        coder.encoder.bias.copy_(0.3 * torch.randn(C, generator=g))
        coder.W_dec.copy_(torch.randn(C, D, generator=g) * (0.5 + torch.rand(C, 1, generator=g)))
        coder.b_dec.copy_(0.2 * torch.randn(D, generator=g))
    folder = OUT / "sparsify" / "layers.1"
    coder.save_to_disk(folder)
    back = SparseCoder.load_from_disk(folder)
    x = inputs(107)
    with torch.no_grad():
        top_acts, top_indices, _ = back.encode(x)
        z = torch.zeros(N, C).scatter_(-1, top_indices, top_acts)
        recon = back.decode(top_acts, top_indices)
    reference("sparsify", x, z, recon)


if __name__ == "__main__":
    main()
