"""Golden greedy tokens and chat renderings for SmolLM2-135M-Instruct, from Hugging Face
transformers loading the same GGUF file Tessera serves (transformers dequantizes its Q4_1
weights to f32, so Tessera is compared with its weights dequantized the same way).

Usage (see scripts/golden/README.md for the venv):
    .venv-golden/bin/python scripts/golden/make_smollm2_golden.py "$(scripts/fetch_smollm2.sh)" tests/golden/smollm2-greedy.json
"""

import json
import os
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from golden_util import sha256_file

NEW_TOKENS = 12

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "中国的首都是",
    "Once upon a time, there was a little",
    "1, 2, 3, 4, 5,",
    "The chemical symbol for gold is",
]

CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "用一句话介绍你自己。"}],
]

# Conversations whose rendering (add_generation_prompt=True) Tessera's template engine must
# reproduce exactly: default system prompt, explicit system prompt, several turns.
RENDERINGS = [
    [{"role": "user", "content": "Hello!"}],
    [{"role": "system", "content": "You answer in one word."}, {"role": "user", "content": "Sky colour?"}],
    [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ],
]


def main():
    gguf_path, out = sys.argv[1], sys.argv[2]
    torch.manual_seed(0)
    torch.set_num_threads(2)
    d, name = os.path.split(os.path.abspath(gguf_path))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.eval()

    cases = []
    texts = [(p, False) for p in PROMPTS] + [
        (tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False), True) for c in CHATS
    ]
    for text, chat in texts:
        ids = tok(text, add_special_tokens=True)["input_ids"]
        with torch.no_grad():
            out_ids = model.generate(
                torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None, pad_token_id=0
            )
            gen = out_ids[0, len(ids):].tolist()
            # Teacher-forced logits at every greedy step: each choice and its margin over the
            # runner-up, so a comparison can tell a real disagreement from a near tie.
            logits = model(torch.tensor([ids + gen[:-1]])).logits[0, len(ids) - 1 :]
        top = torch.topk(logits, 2, dim=-1)
        assert top.indices[:, 0].tolist() == gen, "teacher-forced argmax differs from generate()"
        cases.append(
            {
                "text": text,
                "chat": chat,
                "prompt_ids": ids,
                "greedy": gen,
                "greedy_text": tok.decode(gen),
                "top1_logit": [float(v) for v in top.values[:, 0]],
                "top2_gap": [float(v) for v in (top.values[:, 0] - top.values[:, 1])],
            }
        )
        print(repr(text[-40:]), "->", repr(tok.decode(gen)))

    renderings = [
        {"messages": m, "rendered": tok.apply_chat_template(m, add_generation_prompt=True, tokenize=False)}
        for m in RENDERINGS
    ]
    import transformers

    doc = {
        "model": name,
        "gguf_sha256": sha256_file(gguf_path),
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "new_tokens": NEW_TOKENS,
        "cases": cases,
        "renderings": renderings,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, ensure_ascii=False, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
