#!/usr/bin/env bash
# The prepared GPU check of issue 8, run on the GPU machine from the repository root with the
# CUDA binary built by scripts/build-cuda.sh (carry target/cuda/release/cocomix). Meant to
# finish in well under 15 minutes on one H100/H200:
#   1. parity: the golden batch on the CPU and on CUDA (losses, gradients, labels), f32;
#   2. speed: one optimizer step of NTP and CoCoMix (cached and online labels) at the 69M
#      config, T = 1024, bf16, batch $BATCH; tokens/s, peak GPU memory (nvidia-smi, sampled);
#   3. MFU against the card's dense bf16 peak (989 TFLOP/s for H100 SXM and H200).
# Results go to $OUT (default ./gpu-check): gpu.csv, parity.json, train.json, mem.log, mfu.json.
set -euo pipefail
bin=${COCOMIX_BIN:-target/cuda/release/cocomix}
out=${OUT:-gpu-check}
batch=${BATCH:-16}
peak=${PEAK_TFLOPS:-989}
mkdir -p "$out"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv"
cat "$out/gpu.csv"
timeout 120 "$bin" parity --json > "$out/parity.json" || echo "parity FAILED (see $out/parity.json)"
nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/mem.log" &
smi=$!
timeout 480 "$bin" bench train --batch "$batch" --precision bf16 --json > "$out/train.json" || echo "bench train failed or timed out"
kill "$smi" || true
python3 - "$out" "$peak" <<'PY'
import json, sys
out, peak = sys.argv[1], float(sys.argv[2]) * 1e12
r = json.load(open(f"{out}/train.json"))
mem = [int(x) for x in open(f"{out}/mem.log").read().split() if x.strip().isdigit()]
rows = [{"case": c["case"], "tokens_per_s": c["tokens_per_s"], "mfu": c["tokens_per_s"] * c["flops_per_token"] / peak} for c in r["results"]]
res = {"device": r.get("device"), "peak_gpu_memory_mib": max(mem, default=0), "rows": rows, "ratios": r.get("ratios")}
json.dump(res, open(f"{out}/mfu.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
