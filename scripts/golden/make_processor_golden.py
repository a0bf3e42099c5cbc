#!/usr/bin/env python3
"""Reference outputs of Hugging Face transformers' logits processors, for Tessera's own.

usage: python scripts/golden/make_processor_golden.py [OUT_FILE]   (default tests/golden/processors.safetensors)

Builds, from a fixed seed, random f32 logits rows (vocab 320 and 32000) and token histories with
repeated n-grams, runs transformers' processors on them, and writes one safetensors file:

    <case>.logits     float32 [V]  the input row
    <case>.input_ids  int64   [L]  prompt + generated tokens (the processors' `input_ids`)
    <case>.expected   float32 [V]  transformers' output row (masked tokens are -inf)

and string metadata: transformers_version, torch_version, seed, and `cases`, a JSON list of
    {"name", "vocab", "prompt_len", "do_sample", "params": {...}, "processors": [class names]}
where `params` uses Tessera's SamplingParams field names (temperature, top_k, top_p, min_p,
repetition_penalty, no_repeat_ngram_size) with the exact f32 values the processors were given,
and `processors` is the chain in the order it ran.

Single-processor cases call one processor class directly. Chain cases ("chain_*") take their
processor list from `GenerationMixin._get_logits_processor` of a tiny random Llama model, i.e. the
chain `generate()` itself builds for that GenerationConfig, so its order is transformers' order.

Cut-offs (top-p, min-p, top-k) are checked to sit at least MARGIN away from the nearest token, so
that float rounding cannot move a token across them; single-processor cases move their top_p /
min_p to the middle of the gap they fall in when too close, chain cases fail loudly instead.
"""
import json
import sys

import numpy as np
import torch
import transformers
from safetensors.torch import save_file
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

SEED = 20240611
MARGIN = 1e-5


def f32(x):
    """The f32 value nearest x, as a Python float (what both sides are given)."""
    return float(np.float32(x))


def logits_row(gen, vocab, scale):
    row = torch.randn(vocab, generator=gen, dtype=torch.float32) * scale
    # A few exact zeros: the repetition penalty divides (does not multiply) at 0.
    row[torch.randint(0, vocab, (3,), generator=gen)] = 0.0
    return row


def history(gen, vocab, length, chunk_len, repeats, tail, pool=None):
    """Random tokens with `chunk` inserted `repeats` times, ending with chunk[:tail], so that the
    next token could complete n-grams that occurred before. `pool` narrows the ids drawn (more
    accidental repeats)."""
    hi = pool or vocab
    chunk = torch.randint(0, hi, (chunk_len,), generator=gen).tolist()
    out = []
    for _ in range(repeats):
        out += torch.randint(0, hi, (max(1, length // (repeats + 1)),), generator=gen).tolist()
        out += chunk
        # A different successor each time, so the ban hits several tokens.
        out.append(int(torch.randint(0, hi, (1,), generator=gen)))
    out += torch.randint(0, hi, (3,), generator=gen).tolist()
    out += chunk[:tail]
    return out


def sorted_cums(scores):
    """Cumulative probabilities in float64, ascending order, as TopPLogitsWarper sorts."""
    s = np.sort(scores.double().numpy())
    finite = s[np.isfinite(s)]
    p = np.exp(finite - finite.max())
    return np.cumsum(p / p.sum())


def check_top_p(scores, top_p, name):
    cums = sorted_cums(scores)[:-1]
    gap = np.abs(cums - (1.0 - top_p)).min() if len(cums) else 1.0
    if gap < MARGIN:
        sys.exit(f"error: {name}: top_p={top_p} is {gap:.2g} from a cumulative probability; pick another")


def widest_nearby(points, target, ok):
    """Midpoint of the gap between neighbouring `points` (plus 0 and 1) nearest `target` among
    those for which ok(lo, hi) holds."""
    edges = np.concatenate([[0.0], np.sort(points), [1.0]])
    best = None
    for lo, hi in zip(edges[:-1], edges[1:]):
        mid = (lo + hi) / 2
        if ok(lo, hi, mid) and (best is None or abs(mid - target) < abs(best - target)):
            best = mid
    if best is None:
        sys.exit("error: no gap wide enough for a cut-off")
    return best


def safe_top_p(scores, top_p):
    """top_p itself when no cumulative probability is within MARGIN of 1 - top_p; else the
    centre of the nearest gap between them that is wide enough."""
    cums = sorted_cums(scores)[:-1]
    if np.abs(cums - (1.0 - top_p)).min() >= MARGIN:
        return f32(top_p)
    cut = widest_nearby(cums, 1.0 - top_p, lambda lo, hi, mid: hi - lo >= 4 * MARGIN)
    return f32(1.0 - cut)


def ratios(scores):
    s = scores.double().numpy()
    finite = s[np.isfinite(s)]
    return np.exp(finite - finite.max())


def check_min_p(scores, min_p, name):
    gap = np.abs(ratios(scores) - min_p).min() / min_p
    if gap < MARGIN:
        sys.exit(f"error: {name}: min_p={min_p} is {gap:.2g} (relative) from a probability ratio; pick another")


def safe_min_p(scores, min_p):
    """min_p itself when no probability ratio is within MARGIN (relative) of it; else the centre
    of the nearest gap between ratios that is wide enough."""
    r = ratios(scores)
    if np.abs(r - min_p).min() / min_p >= MARGIN:
        return f32(min_p)
    return f32(widest_nearby(r, min_p, lambda lo, hi, mid: hi - lo >= 4 * MARGIN * mid and mid > 0))


def check_top_k(scores, k, name):
    s = np.sort(scores.numpy())[::-1]
    if k < len(s) and s[k - 1] == s[k]:
        sys.exit(f"error: {name}: the {k}th and {k + 1}th logits tie")


def run_chain(chain, ids, row, name):
    """Applies the processors one by one (as LogitsProcessorList does), checking every cut-off
    against the scores it actually sees; returns the output and the masked count after each."""
    scores = row.clone().unsqueeze(0)
    input_ids = torch.tensor([ids], dtype=torch.long)
    masked = []
    for proc in chain:
        if isinstance(proc, TopPLogitsWarper):
            check_top_p(scores[0], proc.top_p, name)
        elif isinstance(proc, MinPLogitsWarper):
            check_min_p(scores[0], proc.min_p, name)
        elif isinstance(proc, TopKLogitsWarper):
            check_top_k(scores[0], proc.top_k, name)
        scores = proc(input_ids, scores)
        masked.append(int(torch.isinf(scores).sum()))
    # The same through LogitsProcessorList, which is what generate() calls.
    via_list = LogitsProcessorList(chain)(input_ids, row.clone().unsqueeze(0))
    assert torch.equal(via_list, scores), f"{name}: LogitsProcessorList disagrees with the step-by-step run"
    return scores[0], masked


def params_of(chain, do_sample):
    """Tessera SamplingParams fields for a chain, read back from the processor objects."""
    p = {}
    for proc in chain:
        if isinstance(proc, RepetitionPenaltyLogitsProcessor):
            p["repetition_penalty"] = proc.penalty
        elif isinstance(proc, NoRepeatNGramLogitsProcessor):
            p["no_repeat_ngram_size"] = proc.ngram_size
        elif isinstance(proc, TemperatureLogitsWarper):
            p["temperature"] = proc.temperature
        elif isinstance(proc, TopKLogitsWarper):
            p["top_k"] = proc.top_k
        elif isinstance(proc, TopPLogitsWarper):
            p["top_p"] = proc.top_p
        elif isinstance(proc, MinPLogitsWarper):
            p["min_p"] = proc.min_p
        else:
            sys.exit(f"error: unexpected processor {type(proc).__name__} in a chain")
    if do_sample and "temperature" not in p:
        p["temperature"] = 1.0
    return p


def tiny_model():
    cfg = LlamaConfig(
        vocab_size=320, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
        num_attention_heads=1, num_key_value_heads=1,
    )
    return LlamaForCausalLM(cfg).eval()


def main():
    out_path = sys.argv[1] if len(sys.argv) > 1 else "tests/golden/processors.safetensors"
    transformers.utils.logging.set_verbosity_error()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(SEED)
    print(f"transformers {transformers.__version__} torch {torch.__version__}")

    tensors, cases = {}, []

    def add(name, vocab, row, ids, prompt_len, chain, do_sample):
        expected, masked = run_chain(chain, ids, row, name)
        tensors[f"{name}.logits"] = row.contiguous()
        tensors[f"{name}.input_ids"] = torch.tensor(ids, dtype=torch.int64)
        tensors[f"{name}.expected"] = expected.to(torch.float32).contiguous()
        cases.append({
            "name": name, "vocab": vocab, "prompt_len": prompt_len, "do_sample": do_sample,
            "params": params_of(chain, do_sample), "processors": [type(p).__name__ for p in chain],
        })
        print(f"{name}: V={vocab} L={len(ids)} params={cases[-1]['params']} masked after each step={masked}")

    def single(name, vocab, scale, make_proc, do_sample, hist=(40, 4, 2, 3), pool=None, extra_ids=(), ids=None):
        row = logits_row(gen, vocab, scale)
        if ids is None:
            ids = history(gen, vocab, *hist, pool=pool) + list(extra_ids)
        proc = make_proc(row)
        add(name, vocab, row, ids, len(ids) // 2, [proc], do_sample)

    # Vocabulary 32000 only where the size matters (sorting and summing many tail tokens), to
    # keep the file small; the rest use 320.

    # Repetition penalty (greedy-compatible processor): penalise, reward, ids outside the row.
    single("rep_1.3_v320", 320, 2.5, lambda r: RepetitionPenaltyLogitsProcessor(f32(1.3)), False, pool=64)
    single("rep_0.8_v32000", 32000, 3.0, lambda r: RepetitionPenaltyLogitsProcessor(f32(0.8)), False, hist=(300, 6, 3, 4))
    single("rep_1.5_oov_v320", 320, 2.5, lambda r: RepetitionPenaltyLogitsProcessor(f32(1.5)), False, extra_ids=(400, 319, 1000))

    # No-repeat n-gram, n = 1..4.
    single("ngram1_v320", 320, 2.5, lambda r: NoRepeatNGramLogitsProcessor(1), False, hist=(30, 3, 2, 1))
    single("ngram2_v320", 320, 2.5, lambda r: NoRepeatNGramLogitsProcessor(2), False, hist=(60, 3, 3, 3), pool=48)
    single("ngram3_v320", 320, 2.5, lambda r: NoRepeatNGramLogitsProcessor(3), False, hist=(200, 4, 5, 4))
    single("ngram4_v320", 320, 2.5, lambda r: NoRepeatNGramLogitsProcessor(4), False, hist=(50, 3, 5, 3))
    # Shorter than n: nothing to ban yet.
    single("ngram3_short_v320", 320, 2.5, lambda r: NoRepeatNGramLogitsProcessor(3), False, ids=[7, 7])

    # Warpers alone (sampling).
    single("temperature_0.7_v320", 320, 2.5, lambda r: TemperatureLogitsWarper(f32(0.7)), True)
    single("temperature_1.6_v320", 320, 2.5, lambda r: TemperatureLogitsWarper(f32(1.6)), True)
    single("top_k_1_v320", 320, 2.5, lambda r: TopKLogitsWarper(1), True)
    single("top_k_5_v320", 320, 2.5, lambda r: TopKLogitsWarper(5), True)
    single("top_k_50_v320", 320, 2.5, lambda r: TopKLogitsWarper(50), True)
    single("top_p_0.9_v320", 320, 2.5, lambda r: TopPLogitsWarper(safe_top_p(r, 0.9)), True)
    single("top_p_0.3_v320", 320, 1.0, lambda r: TopPLogitsWarper(safe_top_p(r, 0.3)), True)
    single("top_p_0.92_v32000", 32000, 3.0, lambda r: TopPLogitsWarper(safe_top_p(r, 0.92)), True)
    single("min_p_0.05_v320", 320, 1.0, lambda r: MinPLogitsWarper(safe_min_p(r, 0.05)), True)
    single("min_p_0.1_v320", 320, 2.5, lambda r: MinPLogitsWarper(safe_min_p(r, 0.1)), True)

    # Chains exactly as generate() builds them.
    model = tiny_model()
    chains = [
        ("chain_sample_v320", 320, 1.0, (60, 4, 3, 4), 48,
         dict(do_sample=True, repetition_penalty=1.2, no_repeat_ngram_size=3, temperature=0.8, top_k=40, top_p=0.9, min_p=0.05)),
        ("chain_sample_v32000", 32000, 3.0, (400, 6, 4, 6), None,
         dict(do_sample=True, repetition_penalty=1.1, no_repeat_ngram_size=2, temperature=1.3, top_k=200, top_p=0.95, min_p=0.02)),
        ("chain_top_p_min_p_v320", 320, 1.0, (40, 3, 3, 2), 64,
         dict(do_sample=True, repetition_penalty=1.4, temperature=0.6, top_p=0.8, min_p=0.1)),
        ("chain_min_p_after_temperature_v320", 320, 1.5, (30, 2, 2, 1), None,
         dict(do_sample=True, temperature=2.0, min_p=0.2)),
        ("chain_greedy_v32000", 32000, 3.0, (300, 5, 4, 5), None,
         dict(do_sample=False, repetition_penalty=1.3, no_repeat_ngram_size=3)),
    ]
    for name, vocab, scale, hist, pool, cfg in chains:
        row = logits_row(gen, vocab, scale)
        ids = history(gen, vocab, *hist, pool=pool)
        gc = GenerationConfig(**{k: (f32(v) if isinstance(v, float) else v) for k, v in cfg.items()})
        chain = list(model._get_logits_processor(generation_config=gc, input_ids_seq_length=len(ids)))
        add(name, vocab, row, ids, len(ids) - len(ids) // 3, chain, cfg["do_sample"])

    metadata = {
        "generator": "scripts/golden/make_processor_golden.py",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "seed": str(SEED),
        "cases": json.dumps(cases),
    }
    save_file(tensors, out_path, metadata=metadata)
    print(f"wrote {len(cases)} cases to {out_path}")


if __name__ == "__main__":
    main()
