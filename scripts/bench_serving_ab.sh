#!/usr/bin/env bash
# Serving A/B: the working tree's `tessera` against the one built from REV, on the same model and
# the same seeded requests, alternating base and new ROUNDS times in one run (the machine is
# shared and noisy: compare within a run, and read the spread across rounds).
#
# Each run is `tessera up --workers 1` on the SmolLM-135M-shaped f32 fixture and `tessera bench
# --num-prompts PROMPTS --input-len INPUT_LEN --output-len OUTPUT_LEN --max-concurrency c` for
# each c in CONCURRENCY (decode-heavy by default: 16-token prompts, 64 new tokens).
#
# usage: scripts/bench_serving_ab.sh REV [OUT_DIR]   (default OUT_DIR /tmp/serving-ab)
# Env: ROUNDS (2), PROMPTS (16), INPUT_LEN (16), OUTPUT_LEN (64), CONCURRENCY ("1 16").
# Both servers are driven by this tree's `tessera bench`. REV is built once under target/ab/REV (its sources from `git archive`, its build directory
# seeded from this tree's release build so only the workspace crates compile).
set -euo pipefail
cd "$(dirname "$0")/.."
REV=${1:?usage: scripts/bench_serving_ab.sh REV [OUT_DIR]}
OUT=${2:-/tmp/serving-ab}
ROUNDS=${ROUNDS:-2}
PROMPTS=${PROMPTS:-16}
INPUT_LEN=${INPUT_LEN:-16}
OUTPUT_LEN=${OUTPUT_LEN:-64}
CONCURRENCY=${CONCURRENCY:-1 16}
mkdir -p "$OUT"

cargo build -q --release -p tessera -p tessera-model --bin tessera --bin tessera-fixtures
NEW=target/release/tessera

short=$(git rev-parse --short "$REV")
base_dir=$PWD/target/ab/$short
BASE=$base_dir/bin/tessera
if [ ! -x "$BASE" ]; then
  rm -rf "$base_dir/src"
  mkdir -p "$base_dir/src" "$base_dir/bin"
  git archive "$REV" | tar -x -C "$base_dir/src"
  [ -d "$base_dir/target/release" ] || { mkdir -p "$base_dir/target" && cp -a target/release "$base_dir/target/"; }
  (cd "$base_dir/src" && CARGO_TARGET_DIR="$base_dir/target" cargo build -q --release -p tessera --bin tessera)
  cp "$base_dir/target/release/tessera" "$BASE"
fi

MODEL=$OUT/smol135
if [ ! -f "$MODEL/tokenizer.json" ]; then
  MODEL=$(target/release/tessera-fixtures "$OUT" smol135 | tail -1)
  # The benchmark sends token ids; the coordinator still wants a tokenizer to detokenize.
  text_side=$(target/release/tessera-fixtures "$OUT/text-side" demo | tail -1)
  cp "$text_side/tokenizer.json" "$text_side/tokenizer_config.json" "$MODEL/"
fi

run() { # variant binary round
  local variant=$1 bin=$2 round=$3
  coproc UP { exec "$bin" up --model "$MODEL" --workers 1 --port 0 2>"$OUT/up-$variant-$round.log"; }
  read -r line <&"${UP[0]}"
  local url=${line##* }
  for c in $CONCURRENCY; do
    # One client for both, so only the servers differ.
    "$NEW" bench --addr "$url" --num-prompts "$PROMPTS" --input-len "$INPUT_LEN" --output-len "$OUTPUT_LEN" \
      --vocab-range 49152 --max-concurrency "$c" --seed 1 --label "$variant r$round c=$c" \
      --json "$OUT/$variant-r$round-c$c.json" >&2
  done
  kill -INT "$UP_PID"
  wait "$UP_PID" || true
}

for round in $(seq 1 "$ROUNDS"); do
  run base "$BASE" "$round"
  run new "$NEW" "$round"
done

echo "| round | max concurrency | base output tok/s | new output tok/s | new ÷ base | base TPOT p50 (ms) | new TPOT p50 (ms) | base TTFT p50 (ms) | new TTFT p50 (ms) |"
echo "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
for round in $(seq 1 "$ROUNDS"); do
  for c in $CONCURRENCY; do
    jq -rs --arg r "$round" --arg c "$c" \
      '"| \($r) | \($c) | \(.[0].output_throughput*10|round/10) | \(.[1].output_throughput*10|round/10) | \(.[1].output_throughput/.[0].output_throughput*100|round/100)× | \(.[0].tpot.p50_ms*10|round/10) | \(.[1].tpot.p50_ms*10|round/10) | \(.[0].ttft.p50_ms|round) | \(.[1].ttft.p50_ms|round) |"' \
      "$OUT/base-r$round-c$c.json" "$OUT/new-r$round-c$c.json"
  done
done
