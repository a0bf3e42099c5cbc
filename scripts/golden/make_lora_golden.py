#!/usr/bin/env python3
"""Reference ("golden") outputs of Hugging Face PEFT LoRA adapters on Tessera's test fixtures.

usage: python scripts/golden/make_lora_golden.py FIXTURES_DIR [OUT_DIR]     (OUT_DIR: tests/golden/lora)

FIXTURES_DIR is what `tessera-fixtures` writes (see make_golden.py). For every adapter in ADAPTERS
below this wraps the fixture's model with `peft.get_peft_model`, fills every lora_A / lora_B weight
from a seeded generator (normal, std 0.1; B is not zero, so the adapter changes the output) and writes

    OUT_DIR/<adapter>/adapter_config.json         PEFT's own files, from save_pretrained
    OUT_DIR/<adapter>/adapter_model.safetensors   (f32; PEFT's tensor names)
    OUT_DIR/<adapter>.safetensors                 the golden, laid out as make_golden.py's:
        prompt_ids      int64   [P]
        prefill_logits  float32 [P, V]
        greedy_ids      int64   [S]
        decode_logits   float32 [S, V]
      with string metadata fixture, adapter, r, lora_alpha, use_rslora, target_modules (comma-joined),
      transformers_version, torch_version, peft_version, config_sha256, model_sha256 (of the base
      fixture's config.json and model.safetensors) and adapter_sha256 (of adapter_model.safetensors).

adapter_config.json is rewritten after save_pretrained with two changes, so that it does not depend on
the run: `target_modules` sorted (PEFT writes the list from a set, in hash order) and
`base_model_name_or_path` set to the fixture name (instead of FIXTURES_DIR/<fixture>).

Checks (exit status 1 when one fails):
  (a) the adapter changes the output: max |prefill logits with - without the adapter| > 1e-3;
  (b) PeftModel.from_pretrained(fresh base, OUT_DIR/<adapter>) reproduces the prefill logits to 1e-6;
  (c) informational: how many greedy ids differ from the base model's.
"""
import argparse
import json
import os
import sys

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

from golden_util import sha256_file
from make_golden import FIXTURE_FILE, load_model, prefill_and_decode

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ALL = ATTN + MLP

# name, base fixture, r, lora_alpha, use_rslora, target_modules, seed
ADAPTERS = [
    ("r8-attn",        "llama-gqa",  8,  16, False, ATTN,                 1),
    ("r16-all-rslora", "llama-gqa",  16, 32, True,  ALL,                  2),
    ("r8-mlp",         "llama-gqa",  8,  8,  False, MLP,                  3),
    ("r8-qv",          "qwen2-tied", 8,  16, False, ["q_proj", "v_proj"], 4),
    ("r16-all",        "qwen2-tied", 16, 16, False, ALL,                  5),
]

STD_A = 0.1
STD_B = 0.1
CHANGE_MIN = 1e-3   # (a): smallest acceptable max |logits with adapter - without|
RELOAD_TOL = 1e-6   # (b): largest acceptable max |logits reloaded - original|

ADAPTER_NAME = "default"  # PEFT's adapter name; it does not appear in the saved tensor names


def fill_lora_weights(model, seed):
    """Every LoRA module, in sorted module-name order: lora_A weight [r, in] ~ N(0, STD_A²),
    then lora_B weight [out, r] ~ N(0, STD_B²), all drawn from one torch.Generator seeded `seed`."""
    gen = torch.Generator().manual_seed(seed)
    modules = sorted(
        (name, mod) for name, mod in model.named_modules() if isinstance(mod, LoraLayer)
    )
    if not modules:
        sys.exit("error: no LoRA modules were injected")
    with torch.no_grad():
        for _, mod in modules:
            a = mod.lora_A[ADAPTER_NAME].weight
            b = mod.lora_B[ADAPTER_NAME].weight
            a.copy_(torch.randn(a.shape, generator=gen, dtype=torch.float32) * STD_A)
            b.copy_(torch.randn(b.shape, generator=gen, dtype=torch.float32) * STD_B)
    return [name for name, _ in modules]


def tidy_adapter_dir(adir, fixture):
    """Keep only adapter_config.json and adapter_model.safetensors; make the config run-independent."""
    for entry in os.listdir(adir):
        if entry not in ("adapter_config.json", "adapter_model.safetensors"):
            os.remove(os.path.join(adir, entry))
    cpath = os.path.join(adir, "adapter_config.json")
    with open(cpath) as f:
        cfg = json.load(f)
    cfg["target_modules"] = sorted(cfg["target_modules"])
    cfg["base_model_name_or_path"] = fixture
    with open(cpath, "w") as f:
        f.write(json.dumps(cfg, indent=2, sort_keys=True))  # PEFT's own formatting
    wpath = os.path.join(adir, "adapter_model.safetensors")
    with safe_open(wpath, "pt") as f:
        for key in f.keys():
            t = f.get_tensor(key)
            if t.dtype != torch.float32:
                sys.exit(f"error: {wpath}: {key} is {t.dtype}, not float32")
    return wpath


def prefill(model, prompt_ids):
    P = len(prompt_ids)
    out = model(
        input_ids=torch.tensor([prompt_ids], dtype=torch.long),
        position_ids=torch.arange(P, dtype=torch.long).unsqueeze(0),
        use_cache=False,
    )
    return out.logits[0].float().clone()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("fixtures_dir")
    ap.add_argument("out_dir", nargs="?", default=os.path.join("tests", "golden", "lora"))
    args = ap.parse_args()

    transformers.utils.logging.disable_progress_bar()
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    print(f"transformers {transformers.__version__} torch {torch.__version__} peft {peft.__version__}")

    os.makedirs(args.out_dir, exist_ok=True)
    failed = []
    for name, fixture, r, alpha, rslora, targets, seed in ADAPTERS:
        fdir = os.path.join(args.fixtures_dir, fixture)
        spec_path = os.path.join(fdir, FIXTURE_FILE)
        if not os.path.isfile(spec_path):
            sys.exit(f"error: {fdir} has no {FIXTURE_FILE}")
        with open(spec_path) as f:
            spec = json.load(f)
        prompt_ids = [int(t) for t in spec["prompt_ids"]]
        steps = int(spec.get("decode_steps", 32))

        config = LoraConfig(
            r=r,
            lora_alpha=alpha,
            use_rslora=rslora,
            target_modules=list(targets),
            lora_dropout=0.0,
            bias="none",
            task_type="CAUSAL_LM",
            init_lora_weights=False,
        )
        model = get_peft_model(load_model(fdir), config)
        lora_modules = fill_lora_weights(model, seed)
        model.eval()

        adir = os.path.join(args.out_dir, name)
        model.save_pretrained(adir)
        wpath = tidy_adapter_dir(adir, fixture)

        with torch.inference_mode():
            # The injected model itself (LoRA layers in place of the Linear layers) runs the decode
            # loop: make_golden's loop finds the cache argument/field from the transformers model's
            # signature, which PeftModel's **kwargs forward hides. PEFT's own forward is checked in (b).
            inner = model.get_base_model()
            prefill_logits, greedy_ids, decode_logits = prefill_and_decode(inner, prompt_ids, steps)
            with model.disable_adapter():
                base_prefill, base_greedy, _ = prefill_and_decode(inner, prompt_ids, steps)
            reloaded = PeftModel.from_pretrained(load_model(fdir), adir)
            reloaded.eval()
            reload_prefill = prefill(reloaded, prompt_ids)
            del reloaded

        change = (prefill_logits - base_prefill).abs().max().item()
        reload_diff = (reload_prefill - prefill_logits).abs().max().item()
        greedy_changed = int((greedy_ids != base_greedy).sum().item())
        ok_a = change > CHANGE_MIN
        ok_b = reload_diff <= RELOAD_TOL

        P, V = prefill_logits.shape
        assert decode_logits.shape == (steps, V), decode_logits.shape
        tensors = {
            "prompt_ids": torch.tensor(prompt_ids, dtype=torch.int64),
            "prefill_logits": prefill_logits.to(torch.float32).contiguous(),
            "greedy_ids": greedy_ids.to(torch.int64).contiguous(),
            "decode_logits": decode_logits.to(torch.float32).contiguous(),
        }
        metadata = {
            "fixture": fixture,
            "adapter": name,
            "r": str(r),
            "lora_alpha": str(alpha),
            "use_rslora": "true" if rslora else "false",
            "target_modules": ",".join(targets),
            "transformers_version": transformers.__version__,
            "torch_version": torch.__version__,
            "peft_version": peft.__version__,
            "config_sha256": sha256_file(os.path.join(fdir, "config.json")),
            "model_sha256": sha256_file(os.path.join(fdir, "model.safetensors")),
            "adapter_sha256": sha256_file(wpath),
        }
        save_file(tensors, os.path.join(args.out_dir, f"{name}.safetensors"), metadata=metadata)

        print(
            f"{name}: fixture={fixture} r={r} alpha={alpha} rslora={rslora} lora_modules={len(lora_modules)}"
            f" P={P} V={V} S={steps}\n"
            f"  (a) max|adapter - base| prefill = {change:.6g} {'ok' if ok_a else 'FAIL'} (> {CHANGE_MIN:g})\n"
            f"  (b) max|reloaded - original| prefill = {reload_diff:.3g} {'ok' if ok_b else 'FAIL'} (<= {RELOAD_TOL:g})\n"
            f"  (c) greedy ids differing from base: {greedy_changed}/{steps}"
            f"  adapter greedy[:8]={greedy_ids[:8].tolist()} base greedy[:8]={base_greedy[:8].tolist()}",
            flush=True,
        )
        if not (ok_a and ok_b):
            failed.append(name)
        del model
    if failed:
        print(f"check failed for: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
