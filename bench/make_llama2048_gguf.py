#!/usr/bin/env python3
"""Random-weight Llama checkpoint with 256-block-friendly widths, as llama.cpp Q4_K_M and Q6_K GGUFs.

usage: python3 bench/make_llama2048_gguf.py [OUT] [--keep-f16] [--seed N]
       (OUT defaults to target/bench-gguf; any Python 3 runs this driver)

Shape: Llama architecture, hidden 2048, intermediate 5632 (22 x 256), 32 query heads, 4 KV heads
(head_dim 64), 16 layers, untied output (`output.weight`), rope theta 10000, context 2048,
rms eps 1e-5; vocab (49152) and the gpt2 BPE tokenizer: all `tokenizer.*` keys copied from the
SmolLM2-135M GGUF (scripts/fetch_smollm2.sh fetches it). About 906 M parameters, 202 M of them in
the token embedding and the output projection.

Weights: normal(0, 0.02), seeded (--seed, default 0), stored F16 (norm weights 1.0, F32) in
OUT/llama2048-f16.gguf (1.81 GB), which llama.cpp's own quantizer (llama-cpp-python's
`llama_model_quantize`, default parameters) turns into
  OUT/llama2048-q4_k_m.gguf   562 MB: Q4_K, Q6_K for output.weight and half the layers'
                              attn_v / ffn_down (llama.cpp's Q4_K_M mix), norms F32
  OUT/llama2048-q6_k.gguf     745 MB: Q6_K everywhere, norms F32
The f16 intermediate is deleted unless --keep-f16. Idempotent: existing outputs are kept.
About 3 minutes on 2 cores. Prints the tensor types llama.cpp chose in each file.

For Tessera, which takes a directory holding one .gguf (the `model` bench lists the directory),
OUT/llama2048-q4_k_m/ and OUT/llama2048-q6_k/ each hold a symlink to their file.

Two interpreters do the work (override with the environment variables):
  GGUF_PYTHON  (default /opt/golden/bin/python): has the `gguf` package; writes and inspects files
  LCPP_PYTHON  (default /opt/lcpp/bin/python):   has llama_cpp; quantizes
"""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GGUF_PYTHON = os.environ.get("GGUF_PYTHON", "/opt/golden/bin/python")
LCPP_PYTHON = os.environ.get("LCPP_PYTHON", "/opt/lcpp/bin/python")

HIDDEN, INTER, HEADS, KV_HEADS, LAYERS, CTX = 2048, 5632, 32, 4, 16, 2048
HEAD_DIM = HIDDEN // HEADS
ROPE_THETA, RMS_EPS, STD = 10000.0, 1e-5, 0.02
# name -> llama_cpp ftype constant
QUANTS = {"q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M", "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K"}


def tensors(vocab):
    """(name, numpy shape [rows=out, cols=in]) in file order."""
    kv = KV_HEADS * HEAD_DIM
    yield "token_embd.weight", (vocab, HIDDEN)
    for i in range(LAYERS):
        b = f"blk.{i}."
        yield b + "attn_norm.weight", (HIDDEN,)
        yield b + "attn_q.weight", (HEADS * HEAD_DIM, HIDDEN)
        yield b + "attn_k.weight", (kv, HIDDEN)
        yield b + "attn_v.weight", (kv, HIDDEN)
        yield b + "attn_output.weight", (HIDDEN, HEADS * HEAD_DIM)
        yield b + "ffn_norm.weight", (HIDDEN,)
        yield b + "ffn_gate.weight", (INTER, HIDDEN)
        yield b + "ffn_up.weight", (INTER, HIDDEN)
        yield b + "ffn_down.weight", (HIDDEN, INTER)
    yield "output_norm.weight", (HIDDEN,)
    yield "output.weight", (vocab, HIDDEN)


def step_write(smollm2, out, seed):
    """Under GGUF_PYTHON: writes the F16 GGUF, one tensor at a time (never all in memory)."""
    import gguf
    import numpy as np

    src = gguf.GGUFReader(smollm2)
    tok_keys = [k for k in src.fields if k.startswith("tokenizer.")]
    vocab = len(src.fields["tokenizer.ggml.tokens"].data)

    tmp = out + ".part"
    w = gguf.GGUFWriter(tmp, "llama")
    w.add_name("llama2048 random")
    w.add_context_length(CTX)
    w.add_embedding_length(HIDDEN)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(INTER)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(ROPE_THETA)
    w.add_layer_norm_rms_eps(RMS_EPS)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for k in tok_keys:
        f = src.fields[k]
        sub = f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(k, f.contents(), f.types[0], sub_type=sub)

    layout = list(tensors(vocab))
    for name, shape in layout:
        dt = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dt), int(np.prod(shape)) * np.dtype(dt).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(seed)
    for name, shape in layout:
        if len(shape) == 1:
            t = np.ones(shape, dtype=np.float32)
        else:
            t = (rng.standard_normal(shape, dtype=np.float32) * STD).astype(np.float16)
        w.write_tensor_data(t)
    w.close()
    os.replace(tmp, out)
    print(f"wrote {out}: {len(layout)} tensors, vocab {vocab}, {len(tok_keys)} tokenizer keys, "
          f"{os.path.getsize(out) / 1e9:.2f} GB", flush=True)


def step_quantize(src, out, ftype_name):
    """Under LCPP_PYTHON: llama.cpp's quantizer, default parameters but the file type."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftype_name)
    params.nthread = os.cpu_count() or 1
    tmp = out + ".part"
    rc = llama_cpp.llama_model_quantize(src.encode(), tmp.encode(), params)
    if rc != 0:
        sys.exit(f"llama_model_quantize({ftype_name}) returned {rc}")
    os.replace(tmp, out)


def step_types(*paths):
    """Under GGUF_PYTHON: each file's size and tensor types (count and bytes)."""
    import collections
    import gguf

    for p in paths:
        r = gguf.GGUFReader(p)
        count, size = collections.Counter(), collections.Counter()
        for t in r.tensors:
            count[t.tensor_type.name] += 1
            size[t.tensor_type.name] += int(t.n_bytes)
        mix = ", ".join(f"{k} x{count[k]} ({size[k] / 1e6:.0f} MB)" for k in sorted(count, key=lambda k: -size[k]))
        special = {t.name: t.tensor_type.name for t in r.tensors if t.name in ("token_embd.weight", "output.weight")}
        per_kind = collections.defaultdict(collections.Counter)
        for t in r.tensors:
            if t.name.startswith("blk."):
                per_kind[t.name.split(".", 2)[2]][t.tensor_type.name] += 1
        kinds = "; ".join(f"{k}: " + " ".join(f"{n}x{c}" for n, c in v.items()) for k, v in sorted(per_kind.items()))
        print(f"{Path(p).name}: {os.path.getsize(p) / 1e6:.0f} MB; {mix}")
        print(f"  {special}; per layer kind: {kinds}")


def main(argv):
    argv = list(argv)
    seed = 0
    if "--seed" in argv:
        i = argv.index("--seed")
        seed = int(argv[i + 1])
        del argv[i:i + 2]
    keep = "--keep-f16" in argv
    args = [a for a in argv if not a.startswith("--")]
    out_dir = Path(args[0] if args else ROOT / "target" / "bench-gguf").resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    f16 = out_dir / "llama2048-f16.gguf"
    outs = {q: out_dir / f"llama2048-{q}.gguf" for q in QUANTS}
    missing = [q for q, p in outs.items() if not p.exists()]
    if missing:
        if not f16.exists():
            smollm2 = subprocess.run([str(ROOT / "scripts" / "fetch_smollm2.sh")], check=True,
                                     stdout=subprocess.PIPE, text=True).stdout.strip()
            subprocess.run([GGUF_PYTHON, __file__, "--step", "write", smollm2, str(f16), str(seed)], check=True)
        for q in missing:
            print(f"quantizing to {outs[q].name} with llama.cpp", flush=True)
            subprocess.run([LCPP_PYTHON, __file__, "--step", "quantize", str(f16), str(outs[q]), QUANTS[q]], check=True)
    else:
        print(f"{', '.join(p.name for p in outs.values())} exist in {out_dir}; nothing to make")
    if f16.exists() and not keep:
        f16.unlink()
    for q, p in outs.items():
        d = out_dir / f"llama2048-{q}"
        d.mkdir(exist_ok=True)
        link = d / p.name
        if not link.is_symlink():
            link.symlink_to(Path("..") / p.name)
    subprocess.run([GGUF_PYTHON, __file__, "--step", "types", *map(str, outs.values())], check=True)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--step":
        step, rest = sys.argv[2], sys.argv[3:]
        if step == "write":
            step_write(rest[0], rest[1], int(rest[2]))
        elif step == "quantize":
            step_quantize(*rest)
        elif step == "types":
            step_types(*rest)
        else:
            sys.exit(f"unknown step {step}")
    else:
        main(sys.argv[1:])
