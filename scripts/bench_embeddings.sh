#!/usr/bin/env bash
# Embeddings/s of Tessera's BERT encoder vs sentence-transformers on all-MiniLM-L6-v2, batches of
# 1, 32 and 256 short English/Chinese texts (scripts/bench/embed_texts.json), one engine after the
# other in one run (never at once; the machine is shared and noisy, so compare the ratios).
#
# usage: scripts/bench_embeddings.sh
#   ST_PYTHON=/path/to/python   the interpreter with sentence-transformers (default /opt/peers/hf/bin/python)
#   THREADS=2                   threads for both engines (default 2)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${ST_PYTHON:-/opt/peers/hf/bin/python}
THREADS=${THREADS:-2}
export RAYON_NUM_THREADS=$THREADS OMP_NUM_THREADS=$THREADS MKL_NUM_THREADS=$THREADS

dir=$(scripts/fetch_minilm.sh)
[ -x "$PY" ] || { echo "no python at $PY (set ST_PYTHON)" >&2; exit 1; }
cargo bench -q -p tessera-model --bench embed --no-run >/dev/null 2>&1 ||
  cargo bench -p tessera-model --bench embed --no-run   # show the build error
out=$(mktemp)
trap 'rm -f "$out"' EXIT

echo "load before: $(uptime)" >&2
cargo bench -q -p tessera-model --bench embed -- "$dir" | tee -a "$out"
"$PY" scripts/bench/st_embed.py "$dir" 2> >(grep -v 'Loading weights' >&2) | tee -a "$out"
echo "load after: $(uptime)" >&2

python3 - "$out" "$THREADS" <<'PY'
import re, sys
res = {}
for line in open(sys.argv[1]):
    if line.startswith("RESULT "):
        kv = dict(re.findall(r"(\w+)=(\S+)", line))
        res[(kv["engine"], int(kv["batch"]))] = float(kv["emb_per_s"])
print(f"\nall-MiniLM-L6-v2, {sys.argv[2]} threads, medians; ratio = Tessera / sentence-transformers\n")
print("| batch | Tessera emb/s | sentence-transformers emb/s | ratio |")
print("|---:|---:|---:|---:|")
for b in sorted({b for _, b in res}):
    t, s = res.get(("tessera", b)), res.get(("sentence-transformers", b))
    ratio = f"{t / s:.2f}×" if t and s else "n/a"
    fmt = lambda v: f"{v:.1f}" if v else "n/a"
    print(f"| {b} | {fmt(t)} | {fmt(s)} | {ratio} |")
PY
