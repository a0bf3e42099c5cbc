#!/usr/bin/env bash
# Builds Tessera and streams a completion from a model sharded over two tensor-parallel ranks.
# Without --model the demo model (random weights, real tokenizer) is used.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p tessera
exec target/release/tessera run --tp 2 --max-new-tokens 48 "${@:-Tessera streams tokens:}"
