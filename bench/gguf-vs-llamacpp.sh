#!/usr/bin/env bash
# Tessera and llama.cpp side by side on the same GGUF files, one engine after the other in one run,
# with the memory read bandwidth measured right before each engine (the machines are shared and
# noisy, so only ratios and roofline fractions within one run mean much):
#   smollm2-q4_1      SmolLM2-135M-Instruct Q4_1 (tied embedding, Q8_0), from scripts/fetch_smollm2.sh
#   llama2048-q4_k_m  random Llama, hidden 2048, 16 layers, llama.cpp's Q4_K_M mix (Q4_K + Q6_K)
#   llama2048-q6_k    the same checkpoint, Q6_K
# The llama2048 files are made by bench/make_llama2048_gguf.py under target/bench-gguf/ when missing
# (about 3 minutes). llama.cpp: ../shared/bench/peers/lcpp_bench.py (prefill 512, decode b1 of 128
# tokens after a 128-token prompt); Tessera: the tessera-model `model` bench (the same, plus decode
# b8) on a directory holding only the GGUF (a symlink).
#
# Per file, a table: decode b1 both engines, Tessera decode b8, prefill 512 both, the Tessera /
# llama.cpp ratios, and the decode roofline: bandwidth / bytes one decode token reads, which is
# every tensor of the file but the token embedding (one row of it is read), or with a tied
# embedding (no output.weight) every tensor, as the embedding is the output projection too.
#
# usage: bench/gguf-vs-llamacpp.sh [RUNS]            (RUNS default 3)
# env:   LCPP_PYTHON (default /opt/lcpp/bin/python) with llama-cpp-python,
#        PEER_SCRIPTS (default ../shared/bench/peers),
#        NO_EXTRA_BUFTS=1 to give llama.cpp no AMX / CPU_REPACK weight buffers (the default on
#        CPUs with AMX, where its AMX kernels have crashed on batches > 1; elsewhere they are on).
set -euo pipefail
cd "$(dirname "$0")/.."
RUNS=${1:-3}
LCPP_PYTHON=${LCPP_PYTHON:-/opt/lcpp/bin/python}
SCRIPTS=${PEER_SCRIPTS:-../shared/bench/peers}
# Absolute: cargo runs a bench binary in its package directory.
OUT_DIR=$PWD/target/bench-gguf
export RAYON_NUM_THREADS=2 OMP_NUM_THREADS=2

flags=$(grep -m1 '^flags' /proc/cpuinfo | cut -d: -f2)
has() { [[ " $flags " == *" $1 "* ]] && echo yes || echo no; }
avx512=$(tr ' ' '\n' <<<"$flags" | grep '^avx512' | tr '\n' ' ' || true)
amx=$(tr ' ' '\n' <<<"$flags" | grep '^amx' | tr '\n' ' ' || true)
if [[ -n "$amx" && -z "${NO_EXTRA_BUFTS+x}" ]]; then export NO_EXTRA_BUFTS=1; fi
echo "cpu: $(grep -m1 '^model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //'), $(nproc) cpus visible, 2 threads per engine"
echo "cpu flags: avx2 $(has avx2), fma $(has fma), f16c $(has f16c), avx512: ${avx512:-none}, amx: ${amx:-none}"
echo "llama.cpp extra weight buffers (CPU_REPACK/AMX): $([[ -n "${NO_EXTRA_BUFTS:-}" ]] && echo off || echo on)"

smollm2=$(scripts/fetch_smollm2.sh)
if [[ ! -f $OUT_DIR/llama2048-q4_k_m.gguf || ! -f $OUT_DIR/llama2048-q6_k.gguf ]]; then
  python3 bench/make_llama2048_gguf.py "$OUT_DIR" >&2
fi
# Tessera's bench takes a directory holding one .gguf.
mkdir -p "$OUT_DIR/smollm2-q4_1"
ln -sfn "$(realpath "$smollm2")" "$OUT_DIR/smollm2-q4_1/smollm2-q4_1.gguf"
for q in q4_k_m q6_k; do
  mkdir -p "$OUT_DIR/llama2048-$q"
  ln -sfn "../llama2048-$q.gguf" "$OUT_DIR/llama2048-$q/llama2048-$q.gguf"
done

# Built once, copied and run directly, so every Tessera row of the run is the same build even when
# the tree (or target/) changes underneath; `cargo bench` per row would rebuild.
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
bench_exe() {
  local exe
  exe=$(cargo bench -p tessera-model --bench "$1" --no-run 2>&1 | sed -n 's/.*Executable .* (\(.*\))$/\1/p' | tail -n 1)
  [[ -x $exe ]] || { echo "building the tessera-model $1 bench failed" >&2; exit 1; }
  cp "$exe" "$tmp/$1" && echo "$tmp/$1"
}
model_exe=$(bench_exe model)
bandwidth_exe=$(bench_exe bandwidth)
echo "tessera: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- worker model-files 2>/dev/null || echo ' + uncommitted changes')"
out=$tmp/out
err=$tmp/err
# Best of 3 passes over 1 GiB, right before each engine.
bw() {
  "$bandwidth_exe" 1024 3 2>/dev/null | grep '^RESULT' | tee -a "$out" ||
    echo "RESULT bandwidth read_gbs=nan (measurement failed)" | tee -a "$out"
}
# Runs one engine; its RESULT and first-ids lines go to the summary, or, when it printed no RESULT,
# the tail of what it said goes to the terminal and an ERROR line to the summary.
engine() {
  local name=$1 rc=0; shift
  RUST_BACKTRACE=0 "$@" >"$err.log" 2>"$err" || rc=$?
  if grep -q '^RESULT' "$err.log"; then
    grep '^RESULT\|^first\|^loaded\|^use_extra' "$err.log" | sed "s/^first/FIRST $name/" | tee -a "$out"
  else
    echo "$name failed (exit status $rc); the end of its output:"
    cat "$err.log" "$err" | tail -n 15 | sed 's/^/    /'
    echo "ERROR $name exit status $rc: $( (grep -m1 '^Error' "$err" || tail -n 1 "$err") | tr -d '\n')" >>"$out"
  fi
}
for f in smollm2-q4_1 llama2048-q4_k_m llama2048-q6_k; do
  gguf=$(realpath "$OUT_DIR/$f/$f.gguf")
  echo "== $f ($gguf, $(( $(stat -Lc %s "$gguf") / 1000000 )) MB)"
  echo "FILE $f $gguf" >>"$out"
  bw; engine llama.cpp "$LCPP_PYTHON" "$SCRIPTS/lcpp_bench.py" "$gguf" "$RUNS"
  bw; engine tessera "$model_exe" "$OUT_DIR/$f" f32 "$RUNS"
done

python3 - "$out" <<'PY'
import re, struct, sys

# ggml type -> (elements per block, bytes per block)
TYPES = {0: (1, 4), 1: (1, 2), 2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34),
         9: (32, 36), 10: (256, 84), 11: (256, 110), 12: (256, 144), 13: (256, 176), 14: (256, 210),
         15: (256, 292), 24: (1, 1), 25: (1, 2), 26: (1, 4), 27: (1, 8), 28: (1, 8), 30: (1, 2)}

def tensor_bytes(path):
    """{name: (bytes, dims)} from a GGUF header."""
    f = open(path, "rb")
    rd = lambda fmt: struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]
    rs = lambda: f.read(rd("Q")).decode("utf-8", "replace")
    scalar = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
    def value(t):
        if t == 8:
            return rs()
        if t == 9:
            sub, n = rd("I"), rd("Q")
            return [value(sub) for _ in range(n)]
        return rd(scalar[t])
    assert f.read(4) == b"GGUF", path
    _, n_tensors, n_kv = rd("I"), rd("Q"), rd("Q")
    kv = {}
    for _ in range(n_kv):
        key = rs()
        kv[key] = value(rd("I"))
    infos = []
    for _ in range(n_tensors):
        name = rs()
        dims = [rd("Q") for _ in range(rd("I"))]
        infos.append((name, dims, rd("I"), rd("Q")))
    align = kv.get("general.alignment", 32)
    data = -(-f.tell() // align) * align
    end = f.seek(0, 2) - data
    offsets = sorted(o for *_, o in infos) + [end]
    sizes = {}
    for name, dims, t, off in infos:
        n = 1
        for d in dims:
            n *= d
        if t in TYPES:
            block, size = TYPES[t]
            sizes[name] = (n // block * size, dims)
        else:  # unknown type: the distance to the next tensor (includes alignment padding)
            sizes[name] = (offsets[offsets.index(off) + 1] - off, dims)
    return sizes

def per_token_bytes(path):
    sizes = tensor_bytes(path)
    total = sum(b for b, _ in sizes.values())
    embd, dims = sizes["token_embd.weight"]
    if "output.weight" in sizes:
        return total - embd + embd // dims[1], total, False
    return total, total, True

files, cur, bandwidth = {}, None, None
for line in open(sys.argv[1]):
    f = line.split()
    if not f:
        continue
    if f[0] == "FILE":
        cur = files.setdefault(f[1], {"path": f[2]})
    elif f[0] == "RESULT" and f[1] == "bandwidth":
        bandwidth = float(f[2].split("=")[1])
    elif f[0] == "RESULT":
        kv = {k: float(v) for k, v in re.findall(r"(\w+)=([\d.]+|nan)", line)}
        kv["bandwidth"] = bandwidth
        cur[f[1]] = kv
    elif f[0] == "FIRST":
        cur.setdefault("first", {})[f[1]] = line.split(":", 1)[1].strip()
    elif f[0] == "ERROR":
        cur.setdefault("error", {})[f[1]] = line.split(None, 2)[2].strip() if len(f) > 2 else "no output"

def fmt(x, d=1):
    return "–" if x is None else f"{x:.{d}f}"

def ratio(a, b):
    return "–" if a is None or b is None or b == 0 else f"{a / b:.2f}x"

bws = []
for name, r in files.items():
    per_tok, total, tied = per_token_bytes(r["path"])
    lc, ts = r.get("llama.cpp", {}), r.get("tessera", {})
    lc_d, lc_p = lc.get("decode_median"), lc.get("prefill512_median")
    ts_d, ts_d8, ts_p = ts.get("decode_median"), ts.get("decode_b8_median"), ts.get("prefill512_median")
    bws += [x["bandwidth"] for x in (lc, ts) if x.get("bandwidth") and x["bandwidth"] == x["bandwidth"]]
    what = "tied embedding read whole as the output projection" if tied else "one token-embedding row"
    print(f"\n### {name}\n\n{total / 1e6:.0f} MB of tensors; decode reads {per_tok / 1e6:.0f} MB per token ({what})\n")
    print("| | llama.cpp | Tessera | Tessera / llama.cpp |")
    print("|---|---:|---:|---:|")
    print(f"| decode b1 tok/s | {fmt(lc_d, 2)} | {fmt(ts_d, 2)} | {ratio(ts_d, lc_d)} |")
    print(f"| decode b8 tok/s | – | {fmt(ts_d8, 2)} | |")
    print(f"| prefill 512 tok/s | {fmt(lc_p)} | {fmt(ts_p)} | {ratio(ts_p, lc_p)} |")
    roofs = {}
    for eng, kv, d in (("llama.cpp", lc, lc_d), ("tessera", ts, ts_d)):
        if kv.get("bandwidth"):
            roofs[eng] = kv["bandwidth"] * 1e9 / per_tok
    print("| bandwidth just before, GB/s | " + " | ".join(fmt(x.get("bandwidth")) for x in (lc, ts)) + " | |")
    print("| decode b1 roofline tok/s | " + " | ".join(fmt(roofs.get(e)) for e in ("llama.cpp", "tessera")) + " | |")
    pct = lambda d, e: "–" if d is None or e not in roofs else f"{d / roofs[e] * 100:.0f}%"
    print(f"| decode b1 ÷ roofline | {pct(lc_d, 'llama.cpp')} | {pct(ts_d, 'tessera')} | |")
    for eng, ids in r.get("first", {}).items():
        print(f"\n{eng} first 8 greedy ids: {ids}", end="")
    print()
    for eng, e in r.get("error", {}).items():
        print(f"\n**{eng} failed**: {e}")
if bws:
    print(f"\nmemory read bandwidth {min(bws):.1f}–{max(bws):.1f} GB/s over the run (best of 3 passes over 1 GiB before each engine)")
PY
