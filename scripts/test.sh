#!/usr/bin/env bash
# Runs the whole test suite: unit, parity (golden HF logits, TP across threads and processes),
# failure and tidy tests. Needs no Python and no network beyond crates.io.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace --locked "$@"
