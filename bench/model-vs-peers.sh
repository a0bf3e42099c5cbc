#!/usr/bin/env bash
# Tessera TP=1 side by side with HF transformers, candle-transformers and llama.cpp on the same
# SmolLM-135M-shaped random checkpoint, one engine after another in one run (the machine is
# shared and noisy, so only ratios within one run mean much).
#
# The q8_0 rows: llama.cpp on smol135-q8_0.gguf, Tessera on that same GGUF (a directory with the
# f32 checkpoint's config.json and the GGUF linked in; no tokenizer: the benchmarks feed ids), and
# Tessera quantizing the f32 safetensors to q8_0 on load. The Tessera lines also print the first
# 8 greedy ids, to compare with the f32 run.
#
# usage: bench/model-vs-peers.sh [RUNS]
# Needs the peer engines set up as in ../shared/bench/peers/README.md under $PEERS (default
# /opt/peers): $PEERS/hf (venv), $PEERS/ckpt/smol135-{f32,bf16}, $PEERS/candle-bench,
# $PEERS/lcpp (venv) and $PEERS/smol135-{f32,bf16,q8_0}.gguf.
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
PEERS=${PEERS:-/opt/peers}
SCRIPTS=${PEER_SCRIPTS:-../shared/bench/peers}
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2

cargo bench -p tessera-model --bench model --no-run >/dev/null 2>&1
cargo bench -p tessera-model --bench bandwidth --no-run >/dev/null 2>&1
out=$(mktemp)
# Memory read bandwidth right before every engine: on these shared machines it switches between
# about 35 and 55 GB/s from minute to minute, so each row's decode roofline uses the measurement
# taken just before it (best of 3 passes over 1 GiB).
bw() { cargo bench -q -p tessera-model --bench bandwidth -- 1024 3 2>/dev/null | grep '^RESULT' | tee -a "$out"; }
for dt in f32 bf16; do
  ckpt=$PEERS/ckpt/smol135-$dt
  bw; "$PEERS/hf/bin/python" "$SCRIPTS/hf_bench.py" "$ckpt" "$dt" "$RUNS" 2>/dev/null | grep '^RESULT' | tee -a "$out"
  bw; "$PEERS/candle-bench/target/release/candle-bench" "$ckpt" "$dt" "$RUNS" 2>&1 | grep '^RESULT' | tee -a "$out"
  bw; NO_EXTRA_BUFTS=1 "$PEERS/lcpp/bin/python" "$SCRIPTS/lcpp_bench.py" "$PEERS/smol135-$dt.gguf" "$RUNS" 2>/dev/null | grep '^RESULT' | tee -a "$out"
  bw; cargo bench -q -p tessera-model --bench model -- "$ckpt" "$dt" "$RUNS" 2>/dev/null | grep '^RESULT\|^first\|^model allocations' | tee -a "$out"
done

gguf_dir=$(mktemp -d)
cp "$PEERS/ckpt/smol135-f32/config.json" "$gguf_dir/"
ln -s "$PEERS/smol135-q8_0.gguf" "$gguf_dir/model.gguf"
bw; NO_EXTRA_BUFTS=1 "$PEERS/lcpp/bin/python" "$SCRIPTS/lcpp_bench.py" "$PEERS/smol135-q8_0.gguf" "$RUNS" 2>/dev/null | grep '^RESULT' | tee -a "$out"
bw; cargo bench -q -p tessera-model --bench model -- "$gguf_dir" f32 "$RUNS" 2>/dev/null | grep '^RESULT\|^first\|^model allocations' | tee -a "$out"
bw; cargo bench -q -p tessera-model --bench model -- "$PEERS/ckpt/smol135-f32" q8_0 "$RUNS" 2>/dev/null | grep '^RESULT\|^first\|^model allocations' | tee -a "$out"
rm -rf "$gguf_dir"

python3 - "$out" "$PEERS/ckpt/smol135-f32/config.json" <<'PY'
import json, re, sys
rows = {}
bandwidth = []
for line in open(sys.argv[1]):
    if not line.startswith("RESULT"):
        continue
    f = line.split()
    if f[1] == "bandwidth":
        bandwidth.append(float(f[2].split("=")[1]))
        continue
    # Each engine's row keeps the bandwidth measured just before it.
    engine, dtype = f[1], f[2].lower()
    if engine == "llama.cpp":
        dtype = next(d for d in ("bf16", "q8_0", "f32") if d in dtype)
    elif engine == "tessera" and dtype == "q8_0":
        # Quantized on load from the f32 safetensors; the q8_0 reference row is the same GGUF.
        engine = "tessera (q8_0 on load)"
    elif engine == "tessera" and dtype == "f32-gguf":
        dtype = "q8_0"
    kv = dict(re.findall(r"(\w+)=([\d.]+)", line))
    kv["bandwidth"] = bandwidth[-1]
    rows[(engine, dtype)] = kv
print("\n| engine | dtype | prefill512 tok/s | decode b1 tok/s | decode b8 tok/s | Tessera/engine prefill | Tessera/engine decode |")
print("|---|---|---:|---:|---:|---:|---:|")
for (engine, dtype), kv in rows.items():
    t = rows.get(("tessera", dtype), {})
    pre, dec = float(kv["prefill512_median"]), float(kv["decode_median"])
    rp = float(t.get("prefill512_median", "nan")) / pre
    rd = float(t.get("decode_median", "nan")) / dec
    b8 = kv.get("decode_b8_median", "")
    print(f"| {engine} | {dtype} | {pre:.1f} | {dec:.2f} | {b8} | {rp:.2f}x | {rd:.2f}x |")

# Decode reads every parameter once per token (the tied embedding as the lm_head); norms are
# noise. q8_0 stores 34 bytes per 32 weights.
c = json.load(open(sys.argv[2]))
h, inter, layers, vocab = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
d = c.get("head_dim", h // c["num_attention_heads"])
q, kv = c["num_attention_heads"] * d, c["num_key_value_heads"] * d
params = vocab * h + layers * ((q + 2 * kv) * h + h * q + 3 * inter * h)
print(f"\nmemory read bandwidth {min(bandwidth):.1f}–{max(bandwidth):.1f} GB/s over the run; {params / 1e6:.1f} M parameters read per decode step")
print("\n| engine | dtype | bandwidth just before, GB/s | decode roofline tok/s | decode b1 ÷ roofline |")
print("|---|---|---:|---:|---:|")
for (engine, dtype), kv in rows.items():
    per_token = params * {"f32": 4, "bf16": 2, "q8_0": 34 / 32}[dtype]
    roof = kv["bandwidth"] * 1e9 / per_token
    print(f"| {engine} | {dtype} | {kv['bandwidth']:.1f} | {roof:.1f} | {float(kv['decode_median']) / roof * 100:.0f}% |")
PY
rm -f "$out"
