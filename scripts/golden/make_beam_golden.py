#!/usr/bin/env python3
"""Reference beam-search results from Hugging Face transformers, for Tessera's beam search tests.

usage: python scripts/golden/make_beam_golden.py FIXTURES_DIR OUT_JSON [--fixture NAME]

Runs `model.generate(num_beams=...)` (greedy beam search, f32, CPU) on one fixture's golden
prompt for a handful of settings (beam width, length penalty, each early-stopping mode,
num_return_sequences, and with repetition_penalty + no_repeat_ngram_size) and writes, per case,
the generated ids of every returned hypothesis (up to and including its end token) and its
score. The end token is the 4th token of a plain 4-beam search, so that hypotheses end early;
the configured EOS is ignored (requests send it as a stop token with ignore_eos).

The JSON records model_sha256 and config_sha256 of the fixture, and the test
(tests/tests/cluster/beams.rs) checks them against the freshly written fixture.
"""
import argparse
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM

from golden_util import sha256_file


CASES = [
    dict(name="four-beams", num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=4, max_new_tokens=12),
    dict(name="never-sum", num_beams=3, length_penalty=0.0, early_stopping="never", num_return_sequences=2, max_new_tokens=10),
    dict(name="first-long", num_beams=2, length_penalty=2.0, early_stopping=True, num_return_sequences=1, max_new_tokens=12),
    dict(name="never-long", num_beams=3, length_penalty=1.5, early_stopping="never", num_return_sequences=3, max_new_tokens=8),
    dict(name="penalised", num_beams=4, length_penalty=1.0, early_stopping=False, num_return_sequences=2, max_new_tokens=16,
         repetition_penalty=1.5, no_repeat_ngram_size=2),
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("fixtures_dir")
    ap.add_argument("out_json")
    ap.add_argument("--fixture", default="llama-gqa")
    args = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)

    d = os.path.join(args.fixtures_dir, args.fixture)
    meta = json.load(open(os.path.join(d, "tessera_fixture.json")))
    prompt = meta["prompt_ids"]
    model = AutoModelForCausalLM.from_pretrained(d, torch_dtype=torch.float32, attn_implementation="eager")
    model.eval()
    ids = torch.tensor([prompt], dtype=torch.long)
    # The end token: the 4th token of a plain 4-beam search's best hypothesis, so that beams
    # really meet it (random weights never pick the configured EOS).
    with torch.no_grad():
        plain = model.generate(ids, do_sample=False, num_beams=4, max_new_tokens=6, eos_token_id=None, pad_token_id=0)
    end = int(plain[0, len(prompt) + 3])

    out = {
        "fixture": args.fixture,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "model_sha256": sha256_file(os.path.join(d, "model.safetensors")),
        "config_sha256": sha256_file(os.path.join(d, "config.json")),
        "prompt_ids": prompt,
        "end_token": end,
        "cases": [],
    }
    for case in CASES:
        kw = {k: v for k, v in case.items() if k != "name"}
        with torch.no_grad():
            r = model.generate(ids, do_sample=False, eos_token_id=end, pad_token_id=end, output_scores=True,
                               return_dict_in_generate=True, **kw)
        hyps = []
        for seq, score in zip(r.sequences, r.sequences_scores):
            gen = seq[len(prompt):].tolist()
            if end in gen:
                gen = gen[: gen.index(end) + 1]
            hyps.append({"ids": gen, "score": float(score)})
        out["cases"].append({**case, "hypotheses": hyps})
        print(case["name"], [(h["ids"], round(h["score"], 4)) for h in hyps])
    with open(args.out_json, "w") as f:
        json.dump(out, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
