#!/usr/bin/env bash
# The prepared GPU check, run on the GPU machine from the repository root with the CUDA
# binary built by scripts/build-cuda.sh (carry target/cuda/release/cocomix). Two stages:
#   quick  parity (the golden batch on CUDA against the CPU and the golden values, f32),
#          then one tiny NTP training run (configs/default.toml shape, bf16): minutes;
#   all    quick, then one optimizer step of every objective at the default and the 69M
#          shapes (T = 1024, bf16, batch $BATCH): tokens/s, peak GPU memory (nvidia-smi,
#          sampled) and MFU against the card's dense bf16 peak (989 TFLOP/s, H100 SXM/H200),
#          and, where the machine's python3 has torch with CUDA, the same steps in PyTorch
#          eager (scripts/bench-pytorch.py --device cuda) and our ratio to them.
#   nccl   (with a binary from scripts/build-cuda.sh --nccl and libnccl.so.2 on the GPU machine;
#          also run at the end of `all` when the binary links NCCL) two short runs of the
#          default job's students, 20 steps, one plain and one through NCCL as a world of one:
#          their per-step losses must agree (nccl.json).
# STAGE=quick runs the first stage alone (do that first). Every step has its own timeout, so
# a hang costs minutes, not the whole GPU budget; any failure stops the script with a
# non-zero exit and a message. Results go to $OUT (default ./gpu-check): gpu.csv,
# parity.json, quick-train.json, and for `all` train.json, mem.log, torch.json, mfu.json.
set -euo pipefail
bin=${COCOMIX_BIN:-target/cuda/release/cocomix}
out=${OUT:-gpu-check}
stage=${STAGE:-all}
# Batch 4: at 16 the 69M KD and CoCoMix cases run out of memory on 80 GB (docs/performance.md).
batch=${BATCH:-4}
peak=${PEAK_TFLOPS:-989}

die() {
  echo "gpu-check: FAILED: $*" >&2
  exit 1
}

# step NAME SECONDS COMMAND...: runs COMMAND under its own timeout; stops on any failure.
step() {
  local name=$1 limit=$2 rc=0
  shift 2
  echo "gpu-check: $name (at most ${limit}s)" >&2
  timeout --kill-after=10 "$limit" "$@" || rc=$?
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    die "$name timed out after ${limit}s"
  elif [ "$rc" -ne 0 ]; then
    die "$name exited with status $rc (see the lines above)"
  fi
}

case $stage in
  quick | all | nccl) ;;
  *) die "STAGE=$stage: expected quick, all or nccl" ;;
esac
[ -x "$bin" ] || die "$bin: no cocomix binary (build it with scripts/build-cuda.sh or set COCOMIX_BIN)"
mkdir -p "$out"

# The CUDA 13 libraries the binary needs (cuBLAS, cuRAND, NVRTC, and NCCL for an --nccl
# build) often come only inside the machine's Python wheels (PyTorch's nvidia-* packages),
# not on the loader's path: add each wheel folder that holds one the loader cannot find.
for so in libcublas.so.13 libcublasLt.so.13 libcurand.so.10 libnvrtc.so.13 libnccl.so.2; do
  # (grep without -q: an early exit would kill ldconfig with SIGPIPE, failing the pipeline.)
  ldconfig -p 2>/dev/null | grep -F "$so" >/dev/null && continue
  dir=$(python3 - "$so" 2>/dev/null <<'PY'
import pathlib, site, sys
roots = site.getsitepackages() + [site.getusersitepackages()]
hits = [p for r in roots for p in pathlib.Path(r).glob(f"nvidia/**/{sys.argv[1]}")]
print(hits[0].parent if hits else "")
PY
  ) || true
  case ":${LD_LIBRARY_PATH:-}:" in
    *":$dir:"*) ;;
    *) [ -n "$dir" ] && export LD_LIBRARY_PATH="${LD_LIBRARY_PATH:+$LD_LIBRARY_PATH:}$dir" ;;
  esac
done
echo "gpu-check: LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" >&2

# nccl_check: the default job's students (NTP, CoCoMix), 20 steps, plain and over NCCL.
nccl_check() {
  local runs="$out/nccl-runs" mode
  for mode in single nccl; do
    step "20 steps, dist.backend = $mode" "${NCCL_TIMEOUT:-240}" "$bin" train \
      --config configs/default.toml --set run.out_dir="$runs" --set run.name="$mode" \
      --set run.seeds=1 --set optim.steps=20 --set eval.every=10 --set concept.cache_windows=320 \
      --set dist.backend="$mode"
  done
  step "compare" 30 python3 - "$runs" "$out/nccl.json" <<'PY'
import json, pathlib, sys
runs, out = pathlib.Path(sys.argv[1]), sys.argv[2]
rows, worst = [], 0.0
for arm in ("ntp", "cocomix"):
    def losses(mode):
        p = runs / mode / arm / "seed-22" / "metrics.jsonl"
        return [json.loads(l)["loss"] for l in p.read_text().splitlines()]
    a, b = losses("single"), losses("nccl")
    assert len(a) == len(b) == 20, (arm, len(a), len(b))
    d = max(abs(x - y) for x, y in zip(a, b))
    worst = max(worst, d)
    rows.append({"arm": arm, "steps": len(a), "max_abs_loss_diff": d, "final": [a[-1], b[-1]]})
json.dump({"rows": rows}, open(out, "w"), indent=1)
print(json.dumps(rows, indent=1))
# CUDA runs are not bit-reproducible (atomic adds in some kernels): a loose tolerance.
assert worst <= 1e-3, f"NCCL world of one differs from the plain run by {worst}"
PY
  echo "gpu-check: NCCL world of one matches the plain run" >&2
}

if [ "$stage" = nccl ]; then
  nccl_check
  exit 0
fi

step "GPU" 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv > "$out/gpu.csv"
cat "$out/gpu.csv"
# `cocomix parity` exits non-zero naming each failing tensor (missing, extra, shape,
# NaN/Inf, tolerance) on stderr; its JSON report is kept either way.
echo "gpu-check: parity report: $out/parity.json" >&2
step "parity" "${PARITY_TIMEOUT:-150}" "$bin" parity --json > "$out/parity.json"
echo "gpu-check: parity passed" >&2
step "one tiny NTP run" "${QUICK_TIMEOUT:-150}" \
  "$bin" bench train --case train-default-ntp --precision bf16 > "$out/quick-train.json"
cat "$out/quick-train.json"
if [ "$stage" = quick ]; then
  echo "gpu-check: quick stage passed" >&2
  exit 0
fi

nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$out/mem.log" &
smi=$!
trap 'kill "$smi" 2>/dev/null || true' EXIT
step "bench train" "${TRAIN_TIMEOUT:-420}" \
  "$bin" bench train --batch "$batch" --precision bf16 --json > "$out/train.json"
kill "$smi" 2>/dev/null || true
# The same steps in PyTorch eager on this GPU, when its python3 has torch.
# Optional: a failure here is reported and the check goes on without the ratios.
if python3 -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  echo "gpu-check: PyTorch side by side (at most ${TORCH_TIMEOUT:-300}s)" >&2
  timeout --kill-after=10 "${TORCH_TIMEOUT:-300}" python3 scripts/bench-pytorch.py \
    --device cuda --precision bf16 --batch "$batch" --json > "$out/torch.json" || {
    echo "gpu-check: PyTorch side by side failed (status $?); going on without it" >&2
    rm -f "$out/torch.json"
  }
fi
step "MFU" 30 python3 - "$out" "$peak" <<'PY'
import json, os, sys
out, peak = sys.argv[1], float(sys.argv[2]) * 1e12
r = json.load(open(f"{out}/train.json"))
mem = [int(x) for x in open(f"{out}/mem.log").read().split() if x.strip().isdigit()]
torch = {}
if os.path.exists(f"{out}/torch.json"):
    torch = {c["case"]: c["tokens_per_s"] for c in json.load(open(f"{out}/torch.json"))["results"]}
rows = [{"case": c["case"], "config": c.get("config"), "tokens_per_s": c["tokens_per_s"],
         "mfu": c["tokens_per_s"] * c["flops_per_token"] / peak,
         "pytorch_tokens_per_s": torch.get(c["case"]),
         "ratio": c["tokens_per_s"] / torch[c["case"]] if c["case"] in torch else None}
        for c in r["results"]]
res = {"device": r.get("device"), "peak_gpu_memory_mib": max(mem, default=0), "rows": rows,
       "ratios": r.get("ratios")}
json.dump(res, open(f"{out}/mfu.json", "w"), indent=1)
print(json.dumps(res, indent=1))
PY
if readelf -d "$bin" 2>/dev/null | grep -q libnccl; then
  nccl_check
fi
echo "gpu-check: all stages passed" >&2
