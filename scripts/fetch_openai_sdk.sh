#!/usr/bin/env bash
# Installs the official `openai` Python package, pinned, from PyPI into target/openai-venv/
# (ignored by git) for the HTTP API's SDK test (tests/tests/cluster/openai_sdk.rs runs
# tests/openai_sdk/test_openai_sdk.py with it). Idempotent: a venv that already imports the
# pinned version is kept. Installs python3-venv with apt-get when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

openai_version=3.63.0
venv=target/openai-venv

if ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends python3-venv
fi
if ! "$venv/bin/python" -c "import openai, sys; sys.exit(openai.__version__ != '$openai_version')" >/dev/null 2>&1; then
  echo "installing openai $openai_version into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "openai==$openai_version"
fi
