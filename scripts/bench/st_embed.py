#!/usr/bin/env python3
"""Embeddings per second of sentence-transformers on all-MiniLM-L6-v2, the peer side of
worker/model/benches/embed.rs (scripts/bench_embeddings.sh runs both and prints the table).

usage: st_embed.py MODEL_DIR [TEXTS_JSON]
Same texts (scripts/bench/embed_texts.json), batches and scheme as the Rust bench: call k of a
batch size embeds texts k*batch, k*batch+1, ... (cycled); a few warm-up calls, then a fixed number
of timed calls; emb/s = batch / median call time. 2 torch threads. Note that encode() includes
tokenization (the Rust side tokenizes before timing; tokenizing all 24 texts takes < 1 ms there).
Prints one `RESULT engine=sentence-transformers batch=...` line per batch size.
"""
import json
import os
import statistics
import sys
import time

import torch
from sentence_transformers import SentenceTransformer, __version__ as st_version

# (batch, warm-up calls, timed calls): the same numbers as PLAN in embed.rs.
PLAN = [(1, 3, 48), (32, 3, 15), (256, 2, 7)]


def main():
    if len(sys.argv) < 2:
        sys.exit("usage: st_embed.py MODEL_DIR [TEXTS_JSON]  (scripts/fetch_minilm.sh prints MODEL_DIR)")
    model_dir = sys.argv[1]
    if not os.path.isfile(os.path.join(model_dir, "model.safetensors")):
        sys.exit(f"{model_dir} has no model.safetensors: run scripts/fetch_minilm.sh")
    texts_path = sys.argv[2] if len(sys.argv) > 2 else os.path.join(os.path.dirname(__file__), "embed_texts.json")
    with open(texts_path, encoding="utf-8") as f:
        texts = json.load(f)["texts"]

    torch.set_num_threads(2)
    t0 = time.perf_counter()
    model = SentenceTransformer(model_dir, device="cpu")
    print(
        f"loaded {model_dir} in {time.perf_counter() - t0:.2f} s; sentence-transformers {st_version}, "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}; {len(texts)} texts",
        file=sys.stderr,
    )

    dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dim_of()
    for batch, warmup, timed in PLAN:
        def call(k):
            b = [texts[(k * batch + i) % len(texts)] for i in range(batch)]
            start = time.perf_counter()
            out = model.encode(b, batch_size=len(b))
            s = time.perf_counter() - start
            assert out.shape == (batch, dim)
            return s

        with torch.inference_mode():
            for k in range(warmup):
                call(k)
            times = [call(k) for k in range(timed)]
        med = statistics.median_high(times)  # the same element as the Rust side's v[len / 2]
        eps = batch / med
        print(
            f"sentence-transformers batch {batch:>3}: {eps:>9.1f} emb/s (median {med * 1e3:.2f} ms per call, "
            f"min {min(times) * 1e3:.2f}, max {max(times) * 1e3:.2f}, {timed} calls)"
        )
        print(f"RESULT engine=sentence-transformers batch={batch} emb_per_s={eps:.2f} median_ms={med * 1e3:.3f} calls={timed}")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
