#!/usr/bin/env bash
# Offline checks of deploy/ (no cluster, no Docker): renders every kustomization with
# `kubectl kustomize`, validates every object against the Kubernetes JSON schemas (strict), and
# checks that manifests, compose file and Dockerfiles agree with `tessera <role> --help`
# (scripts/check_deploy.py says what exactly). Installs what is missing: kubectl
# (apt-get kubernetes-client), python3-venv, and kubernetes-validate from PyPI into
# target/deploy-venv/ (ignored by git).
#   KUBECTL=path        use this kubectl (default: the one on PATH)
#   TESSERA_BIN=path    use this tessera binary (default: cargo build -p tessera, debug)
set -euo pipefail
cd "$(dirname "$0")/.."

kv_version=1.37.0
venv=target/deploy-venv

missing=()
[ -n "${KUBECTL:-}" ] || command -v kubectl >/dev/null 2>&1 || missing+=(kubernetes-client)
command -v python3 >/dev/null 2>&1 || missing+=(python3)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)

if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  sudo_cmd=()
  [ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
kubectl="${KUBECTL:-$(command -v kubectl)}"

if ! "$venv/bin/python" -c "import kubernetes_validate, yaml" >/dev/null 2>&1; then
  echo "installing kubernetes-validate $kv_version into $venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$kv_version"
fi

tessera="${TESSERA_BIN:-}"
if [ -z "$tessera" ]; then
  cargo build -q --locked -p tessera
  tessera=target/debug/tessera
fi

"$venv/bin/python" scripts/check_deploy.py --kubectl "$kubectl" --tessera "$tessera"
