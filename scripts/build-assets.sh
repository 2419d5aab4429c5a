#!/usr/bin/env bash
# Rebuilds the default job's pretrained teacher and SAE in assets/ (docs/results.md):
#   1. trains them with the teacher and SAE stages of configs/cpu-teacher.toml
#      (a 6-layer d = 256 GPT-2 on the bundled corpus's training split, 400 steps x 32 x 128
#      tokens; a 4096-latent TopK SAE, k = 16, on the output of its block 2), ~1 h on 2 cores;
#   2. stores them as f16 safetensors (assets/teacher/, assets/sae/) with the teacher's
#      config.json and tokenizer.json, and writes assets/SHA256SUMS.
# Needs a Python with numpy and safetensors (pip install numpy safetensors).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

cargo xtask train --config configs/cpu-teacher.toml --set concept.labels=online --prepare-only

teacher=runs/cpu-teacher/teacher/final
sae=runs/cpu-teacher/sae/L2-256x4096-k16.safetensors
mkdir -p assets/teacher assets/sae
cp "$teacher/config.json" "$teacher/tokenizer.json" assets/teacher/
"$PY" - "$teacher/model.safetensors" assets/teacher/model.safetensors \
    "$sae" assets/sae/sae.safetensors <<'PY'
import sys
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

args = sys.argv[1:]
for src, dst in zip(args[0::2], args[1::2]):
    with safe_open(src, "np") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in tensors.items()}
    save_file(out, dst, metadata={**meta, "converted_from": "f32"})
    print(f"{dst}: {sum(v.nbytes for v in out.values()) / 1e6:.1f} MB")
PY
(cd assets && sha256sum teacher/config.json teacher/tokenizer.json teacher/model.safetensors \
    sae/sae.safetensors > SHA256SUMS)
cat assets/SHA256SUMS
