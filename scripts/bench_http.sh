#!/usr/bin/env bash
# The OpenAI-compatible HTTP API (server-sent events from /v1/completions) against gRPC through
# one cluster: `tessera bench --protocol grpc|openai` against one `tessera up --workers 1
# --http-port 0`, the two protocols alternating at each concurrency, ROUNDS times over (the
# machine is shared and noisy: compare within a round). Both protocols send the same seeded
# requests (random token-id prompts, exactly OUTPUT_LEN tokens each, greedy).
#
# usage: scripts/bench_http.sh [OUT_DIR]   (default /tmp/http-bench)
# Env: MODEL (default: SmolLM2-135M-Instruct Q4_1 from scripts/fetch_smollm2.sh), ROUNDS (2),
#      CONCURRENCY ("1 16"), INPUT_LEN (16), OUTPUT_LEN (64), VOCAB (49152: SmolLM2's),
#      PROMPTS_PER_STREAM (4: each run sends 4 × concurrency requests, at least 16).
# Writes OUT_DIR/PROTOCOL-cN-rR.json and prints one markdown table of all runs.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/http-bench}
ROUNDS=${ROUNDS:-2}
CONCURRENCY=${CONCURRENCY:-1 16}
INPUT_LEN=${INPUT_LEN:-16}
OUTPUT_LEN=${OUTPUT_LEN:-64}
VOCAB=${VOCAB:-49152}
PROMPTS_PER_STREAM=${PROMPTS_PER_STREAM:-4}
mkdir -p "$OUT"

cargo build -q --release -p tessera --bin tessera
BIN=target/release/tessera
MODEL=${MODEL:-$(scripts/fetch_smollm2.sh)}

# Port 0: free ports; `up` prints "serving NAME on URL", then the HTTP API's URL.
coproc UP { exec "$BIN" up --model "$MODEL" --workers 1 --port 0 --http-port 0 2>"$OUT/up.log"; }
read -r line <&"${UP[0]}"
grpc=${line##* }
read -r line <&"${UP[0]}"
http=${line##* }
echo "== gRPC on $grpc, HTTP on $http" >&2

for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    # Enough requests that the concurrency is held for most of the run.
    prompts=$(( PROMPTS_PER_STREAM * c < 16 ? 16 : PROMPTS_PER_STREAM * c ))
    for protocol in grpc openai; do
      addr=$grpc
      [ "$protocol" = openai ] && addr=$http
      "$BIN" bench --protocol "$protocol" --addr "$addr" --num-prompts "$prompts" --input-len "$INPUT_LEN" \
        --output-len "$OUTPUT_LEN" --vocab-range "$VOCAB" --max-concurrency "$c" --seed 1 \
        --label "$protocol c=$c round $round" --json "$OUT/$protocol-c$c-r$round.json" >&2
    done
  done
done
kill -INT "$UP_PID"
wait "$UP_PID" || true

echo "| round | max concurrency | protocol | output tok/s | HTTP ÷ gRPC | TPOT p50 / p99 (ms) | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) |"
echo "|---:|---:|---|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    base=$(jq '.output_throughput' "$OUT/grpc-c$c-r$round.json")
    for protocol in grpc openai; do
      jq -r --arg round "$round" --argjson base "$base" \
        '"| \($round) | \(.max_concurrency) | \(.protocol) | \(.output_throughput*100|round/100) | \(.output_throughput/$base*1000|round/1000)× | \(.tpot.p50_ms*100|round/100) / \(.tpot.p99_ms*100|round/100) | \(.ttft.p50_ms*10|round/10) / \(.ttft.p99_ms*10|round/10) | \(.itl.p50_ms*100|round/100) / \(.itl.p99_ms*100|round/100) |"' \
        "$OUT/$protocol-c$c-r$round.json"
    done
  done
done
