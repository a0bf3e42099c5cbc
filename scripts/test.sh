#!/usr/bin/env bash
# Runs the lint gates (rustfmt, clippy -D warnings), then the whole test suite: unit, parity
# (golden HF logits, TP across threads and processes), failure and tidy tests, after the offline checks of deploy/ (scripts/check_deploy.sh: kubectl
# from apt, a Python venv with kubernetes-validate). The network only for crates.io, apt and
# PyPI (kubernetes-validate; via setup.sh the all-MiniLM-L6-v2 and SmolLM2 wheels and the
# openai package the HTTP API's SDK test runs).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
scripts/check_deploy.sh
# Lint gates: formatting (rustfmt.toml) and every clippy warning, before anything runs.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Benchmarks and examples too, so they cannot rot unnoticed (the tests build only their own).
cargo build --workspace --all-targets --locked
# SIMD kernel tests check every path this CPU has and record the ones it cannot run
# (worker/model/src/kernels/kernel_paths.rs); one line at the end names them, pass or fail.
export TESSERA_UNEXERCISED_PATHS="$PWD/target/unexercised-kernel-paths.txt"
rm -f "$TESSERA_UNEXERCISED_PATHS"
report_paths() {
  local flags
  flags=$(grep -m1 -o -w -E 'avx2|avx512f|avx512bf16|avx512_bf16|avx512vnni|avx512_vnni|amx_tile' /proc/cpuinfo 2>/dev/null | sort -u | paste -sd' ' || true)
  if [ -s "$TESSERA_UNEXERCISED_PATHS" ]; then
    echo "Kernel paths this CPU (${flags:-flags unknown}) could not exercise: $(sort -u "$TESSERA_UNEXERCISED_PATHS" | paste -sd';' | sed 's/;/; /g')"
  else
    echo "No test recorded a SIMD kernel path this CPU (${flags:-flags unknown}) could not run."
  fi
}
trap report_paths EXIT
cargo test --workspace --locked "$@"
