#!/usr/bin/env python3
"""Reference ("golden") logits for Tessera's test fixtures, computed with Hugging Face transformers.

usage: python scripts/golden/make_golden.py FIXTURES_DIR OUT_DIR [NAME ...] [--threads N] [--verify]

FIXTURES_DIR holds one sub-directory per fixture, in Hugging Face layout:
    config.json, model.safetensors (f32), tokenizer.json, tokenizer_config.json,
    tessera_fixture.json = {"prompt_ids": [...], "decode_steps": 32}
Every sub-directory that has a tessera_fixture.json is processed (or only the NAMEs given).

For each fixture this writes OUT_DIR/<name>.safetensors with
    prompt_ids      int64   [P]
    prefill_logits  float32 [P, V]  logits at every prompt position, one forward over the prompt
    greedy_ids      int64   [S]     greedy continuation, greedy_ids[0] = argmax(prefill_logits[-1])
    decode_logits   float32 [S, V]  row i: logits after feeding greedy_ids[i] at position P+i with the
                                    KV cache of everything before it; greedy_ids[i+1] = argmax(row i)
and string metadata: fixture, architecture, transformers_version, torch_version, config_sha256,
model_sha256 (sha256 of the bytes of config.json and model.safetensors).

--verify additionally recomputes every decode row with a full forward without cache over
prompt + greedy_ids[:i+1] (decode_maxdiff), compares prefill_logits with the first P rows of the
longest of those forwards (prefill_maxdiff), and exits with status 1 when either is above --tol
(default 1e-4). Expected to fail for `dynamic` RoPE once P+S > max_position_embeddings (see README).
"""
import argparse
import inspect
import json
import os
import sys

import torch
import transformers
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from golden_util import sha256_file

FIXTURE_FILE = "tessera_fixture.json"


def list_fixtures(fixtures_dir, names):
    if names:
        for n in names:
            if not os.path.isfile(os.path.join(fixtures_dir, n, FIXTURE_FILE)):
                sys.exit(f"error: {os.path.join(fixtures_dir, n)} has no {FIXTURE_FILE}")
        return list(names)
    found = sorted(
        n for n in os.listdir(fixtures_dir)
        if os.path.isfile(os.path.join(fixtures_dir, n, FIXTURE_FILE))
    )
    if not found:
        sys.exit(f"error: no fixture sub-directories (with {FIXTURE_FILE}) in {fixtures_dir}")
    return found


def load_model(path):
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    model.eval()
    return model


def cache_keyword(model):
    """Name of the KV-cache argument: `past_key_values`, renamed `cache` in newer transformers 5.x
    (where the old name still works but warns that it will be removed)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def prefill_and_decode(model, prompt_ids, steps):
    """One forward over the prompt, then `steps` single-token greedy steps through the KV cache."""
    kw = cache_keyword(model)
    P = len(prompt_ids)
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(
        input_ids=ids,
        position_ids=torch.arange(P, dtype=torch.long).unsqueeze(0),
        use_cache=True,
    )
    prefill_logits = out.logits[0].float().clone()  # [P, V]
    cache = getattr(out, kw)
    greedy, decode_rows = [], []
    nxt = int(prefill_logits[-1].argmax())
    for i in range(steps):
        greedy.append(nxt)
        out = model(
            input_ids=torch.tensor([[nxt]], dtype=torch.long),
            position_ids=torch.tensor([[P + i]], dtype=torch.long),
            use_cache=True,
            **{kw: cache},
        )
        cache = getattr(out, kw)
        row = out.logits[0, -1].float().clone()  # [V]
        decode_rows.append(row)
        nxt = int(row.argmax())
    V = prefill_logits.shape[-1]
    decode_logits = torch.stack(decode_rows) if decode_rows else torch.zeros((0, V))
    return prefill_logits, torch.tensor(greedy, dtype=torch.long), decode_logits


def verify(model, prompt_ids, prefill_logits, greedy_ids, decode_logits):
    """Max |diff| of the cached results against full no-cache forwards."""
    P = len(prompt_ids)
    full = list(prompt_ids) + greedy_ids.tolist()
    worst_decode, worst_step = 0.0, -1
    for i in range(len(greedy_ids)):
        ids = torch.tensor([full[: P + i + 1]], dtype=torch.long)
        out = model(
            input_ids=ids,
            position_ids=torch.arange(P + i + 1, dtype=torch.long).unsqueeze(0),
            use_cache=False,
        )
        d = (out.logits[0, -1].float() - decode_logits[i]).abs().max().item()
        if d > worst_decode:
            worst_decode, worst_step = d, i
        if i == len(greedy_ids) - 1:
            prefill_diff = (out.logits[0, :P].float() - prefill_logits).abs().max().item()
    if len(greedy_ids) == 0:
        prefill_diff = 0.0
    return worst_decode, worst_step, prefill_diff


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures_dir")
    ap.add_argument("out_dir")
    ap.add_argument("names", nargs="*", help="fixture sub-directory names (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--verify", action="store_true", help="compare cached decode with no-cache forwards")
    ap.add_argument("--tol", type=float, default=1e-4, help="--verify tolerance (max abs diff)")
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(args.threads)
    print(f"transformers {transformers.__version__} torch {torch.__version__} threads {torch.get_num_threads()}")

    names = list_fixtures(args.fixtures_dir, args.names)
    os.makedirs(args.out_dir, exist_ok=True)
    failed = []
    for name in names:
        fdir = os.path.join(args.fixtures_dir, name)
        with open(os.path.join(fdir, FIXTURE_FILE)) as f:
            spec = json.load(f)
        prompt_ids = [int(t) for t in spec["prompt_ids"]]
        steps = int(spec.get("decode_steps", 32))
        if not prompt_ids:
            sys.exit(f"error: {name}: empty prompt_ids")
        with open(os.path.join(fdir, "config.json")) as f:
            archs = json.load(f).get("architectures") or ["?"]

        model = load_model(fdir)
        with torch.inference_mode():
            prefill_logits, greedy_ids, decode_logits = prefill_and_decode(model, prompt_ids, steps)
            check = None
            if args.verify:
                # a fresh model: dynamic RoPE keeps state (the longest length seen) between calls
                check = verify(load_model(fdir), prompt_ids, prefill_logits, greedy_ids, decode_logits)

        P, V = prefill_logits.shape
        assert decode_logits.shape == (steps, V), decode_logits.shape
        tensors = {
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "prefill_logits": prefill_logits.to(torch.float32).contiguous(),
            "greedy_ids": greedy_ids.to(torch.int64).contiguous(),
            "decode_logits": decode_logits.to(torch.float32).contiguous(),
        }
        metadata = {
            "fixture": name,
            "architecture": archs[0],
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "config_sha256": sha256_file(os.path.join(fdir, "config.json")),
            "model_sha256": sha256_file(os.path.join(fdir, "model.safetensors")),
        }
        out_path = os.path.join(args.out_dir, f"{name}.safetensors")
        save_file(tensors, out_path, metadata=metadata)
        line = f"{name}: arch={archs[0]} P={P} V={V} S={steps} greedy[:8]={greedy_ids[:8].tolist()}"
        if check is not None:
            worst, step, pre = check
            ok = worst <= args.tol and pre <= args.tol
            line += f" verify: decode_maxdiff={worst:.3g} (step {step}) prefill_maxdiff={pre:.3g} {'ok' if ok else 'MISMATCH'}"
            if not ok:
                failed.append(name)
        print(line, flush=True)
        del model
    if failed:
        print(f"verify: cached decode differs from no-cache forward for: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
