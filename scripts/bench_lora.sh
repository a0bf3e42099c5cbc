#!/usr/bin/env bash
# Serving throughput with LoRA adapters: `tessera bench` at concurrency 16 against one
# `tessera up --workers 1` on the SmolLM-135M-shaped fixture with 8 random rank-16 adapters
# (all seven projections) served, with requests naming no adapter, one adapter, and 8 distinct
# adapters in turn. The three modes run against the same cluster, interleaved, ROUNDS times
# (the machine is shared and noisy: compare within a run).
#
# usage: scripts/bench_lora.sh [OUT_DIR]   (default /tmp/lora-bench)
# Env: PROMPTS (48), INPUT_LEN (64), OUTPUT_LEN (64), CONCURRENCY (16), ROUNDS (2), DTYPE (f32).
# Writes OUT_DIR/MODE-rN.json and prints one markdown table.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/lora-bench}
PROMPTS=${PROMPTS:-48}
INPUT_LEN=${INPUT_LEN:-64}
OUTPUT_LEN=${OUTPUT_LEN:-64}
CONCURRENCY=${CONCURRENCY:-16}
ROUNDS=${ROUNDS:-2}
DTYPE=${DTYPE:-f32}
mkdir -p "$OUT"

cargo build -q --release -p tessera -p tessera-model --bin tessera --bin tessera-fixtures
BIN=target/release/tessera
MODEL=$OUT/smol135
if [ ! -f "$MODEL/tokenizer.json" ] || [ ! -d "$OUT/smol135-lora-7" ]; then
  target/release/tessera-fixtures "$OUT" smol135 --adapters 8 >"$OUT/written.txt"
  MODEL=$(head -1 "$OUT/written.txt")
  # The benchmark sends token ids; the coordinator still wants a tokenizer to detokenize.
  text_side=$(target/release/tessera-fixtures "$OUT/text-side" demo | tail -1)
  cp "$text_side/tokenizer.json" "$text_side/tokenizer_config.json" "$MODEL/"
fi
lora=()
names=()
for i in 0 1 2 3 4 5 6 7; do
  lora+=(--lora "lora-$i=$OUT/smol135-lora-$i")
  names+=("lora-$i")
done
all=$(IFS=,; echo "${names[*]}")

log="$OUT/up.log"
coproc UP { exec "$BIN" up --model "$MODEL" --workers 1 --port 0 --dtype "$DTYPE" --max-batch 32 "${lora[@]}" 2>"$log"; }
read -r line <&"${UP[0]}"
url=${line##* }
echo "== serving on $url ($DTYPE)" >&2
for r in $(seq 1 "$ROUNDS"); do
  for mode in base one eight; do
    adapters=()
    [ "$mode" = one ] && adapters=(--adapter lora-0)
    [ "$mode" = eight ] && adapters=(--adapter "$all")
    "$BIN" bench --addr "$url" --num-prompts "$PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
      --vocab-range 49152 --max-concurrency "$CONCURRENCY" --seed "$r" "${adapters[@]}" \
      --label "$mode r$r" --json "$OUT/$mode-r$r.json" >&2
  done
done
kill -INT "$UP_PID"
wait "$UP_PID" || true

echo "| round | adapters | output tok/s | ÷ base (same round) | TPOT p50 (ms) | TTFT p50 (ms) |"
echo "|---:|---|---:|---:|---:|---:|"
for r in $(seq 1 "$ROUNDS"); do
  base=$(jq '.output_throughput' "$OUT/base-r$r.json")
  for mode in base one eight; do
    label=$([ "$mode" = base ] && echo none || ([ "$mode" = one ] && echo 1 || echo "8 distinct"))
    jq -r --arg r "$r" --arg what "$label" --argjson base "$base" \
      '"| \($r) | \($what) | \(.output_throughput*10|round/10) | \(.output_throughput/$base*1000|round/1000)× | \(.tpot.p50_ms*10|round/10) | \(.ttft.p50_ms|round) |"' \
      "$OUT/$mode-r$r.json"
  done
done
