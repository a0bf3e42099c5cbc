#!/usr/bin/env bash
# The main job: builds Tessera, starts a local cluster (`tessera up`: a coordinator plus two
# worker processes forming one tensor-parallel group of 2, on the embedded in-memory registry),
# streams one completion through it with `tessera generate`, then stops the cluster.
# Extra arguments go to `tessera up`, e.g. `scripts/demo.sh --model ~/models/SmolLM2-135M`.
# Without --model the demo model (random weights, real tokenizer) is used, so its text is noise.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p tessera
bin=target/release/tessera

coproc UP { exec "$bin" up --workers 2 --tp 2 --port 0 "$@"; }
up_pid=$UP_PID
trap 'kill -INT "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true' EXIT
# `tessera up` prints "serving NAME on URL" on stdout once every group has loaded.
if ! read -r -t 600 line <&"${UP[0]}"; then
    echo "the cluster did not come up" >&2
    exit 1
fi
url=${line##* }
"$bin" generate --addr "$url" --max-new-tokens 48 "${PROMPT:-Tessera streams tokens:}"
