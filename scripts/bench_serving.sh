#!/usr/bin/env bash
# Serving benchmark: `tessera bench` against `tessera up --workers 1` on the SmolLM-135M-shaped
# fixture, with continuous batching, then with --static-batching, then (mode tight-kv) with
# continuous batching under a KV budget small enough to force preemption, at several
# concurrencies, all in one run (the machine is shared and noisy: compare within a run).
#
# usage: scripts/bench_serving.sh [OUT_DIR]   (default /tmp/serving-bench)
# Env: PROMPTS (32), INPUT_LEN (128), OUTPUT_LEN (64), RANGE_RATIO (0.5), CONCURRENCY ("1 4 16 32"),
#      MODES ("continuous static tight-kv"), TIGHT_KV (KV tokens per worker in tight-kv: 1024),
#      MODEL (a model directory or GGUF file; default: the smol135 fixture written under OUT_DIR).
# Writes OUT_DIR/MODE-cN.json and prints one markdown table of all runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/serving-bench}
PROMPTS=${PROMPTS:-32}
INPUT_LEN=${INPUT_LEN:-128}
OUTPUT_LEN=${OUTPUT_LEN:-64}
RANGE_RATIO=${RANGE_RATIO:-0.5}
CONCURRENCY=${CONCURRENCY:-1 4 16 32}
MODES=${MODES:-continuous static tight-kv}
TIGHT_KV=${TIGHT_KV:-1024}
mkdir -p "$OUT"

cargo build -q --release -p tessera -p tessera-model --bin tessera --bin tessera-fixtures
BIN=target/release/tessera
# A MODEL given is served as it is (a directory or a GGUF file); the default fixture is made once.
if [ -z "${MODEL:-}" ]; then
  MODEL=$OUT/smol135
  if [ ! -f "$MODEL/tokenizer.json" ]; then
    MODEL=$(target/release/tessera-fixtures "$OUT" smol135 | tail -1)
    # The benchmark sends token ids; the coordinator still wants a tokenizer to detokenize.
    text_side=$(target/release/tessera-fixtures "$OUT/text-side" demo | tail -1)
    cp "$text_side/tokenizer.json" "$text_side/tokenizer_config.json" "$MODEL/"
  fi
fi

for mode in $MODES; do
  flags=()
  [ "$mode" = static ] && flags=(--static-batching)
  [ "$mode" = tight-kv ] && flags=(--kv-capacity-tokens "$TIGHT_KV")
  log="$OUT/up-$mode.log"
  # Port 0: a free port; `up` prints "serving NAME on URL" once the group has loaded.
  coproc UP { exec "$BIN" up --model "$MODEL" --workers 1 --port 0 "${flags[@]}" 2>"$log"; }
  read -r line <&"${UP[0]}"
  url=${line##* }
  echo "== $mode batching on $url" >&2
  for c in $CONCURRENCY; do
    "$BIN" bench --addr "$url" --num-prompts "$PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
      --range-ratio "$RANGE_RATIO" --vocab-range 49152 --max-concurrency "$c" --seed 1 \
      --slo-ttft-ms 2000 --slo-tpot-ms 100 --label "$mode c=$c" --json "$OUT/$mode-c$c.json" >&2
  done
  kill -INT "$UP_PID"
  wait "$UP_PID" || true
done

echo "| batching | max concurrency | req/s | output tok/s | ÷ same mode at c=1 | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) | ITL p50 / p99 (ms) | goodput (req/s) | preemptions |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for mode in $MODES; do
  base=$(jq '.output_throughput' "$OUT/$mode-c$(echo $CONCURRENCY | cut -d' ' -f1).json")
  for c in $CONCURRENCY; do
    jq -r --arg mode "$mode" --argjson base "$base" \
      '"| \($mode) | \(.max_concurrency) | \(.request_throughput*100|round/100) | \(.output_throughput*10|round/10) | \(.output_throughput/$base*100|round/100)× | \(.ttft.p50_ms|round) / \(.ttft.p99_ms|round) | \(.tpot.p50_ms*10|round/10) / \(.tpot.p99_ms*10|round/10) | \(.itl.p50_ms*10|round/10) / \(.itl.p99_ms*10|round/10) | \(.goodput*100|round/100) | \(.preemptions // "-") |"' \
      "$OUT/$mode-c$c.json"
  done
done
