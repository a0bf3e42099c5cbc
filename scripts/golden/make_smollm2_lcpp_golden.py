"""llama.cpp's own logits on SmolLM2-135M-Instruct's Q4_1 GGUF file, teacher-forced over the
token sequences of tests/golden/smollm2-greedy.json, for the quantized-weights test
(worker/model/tests/smollm2.rs): per position, llama.cpp's argmax and its top-2 margin.

llama.cpp comes from llama-cpp-python built from source (see ../shared/bench/peers/README.md):
    /opt/lcpp/bin/python scripts/golden/make_smollm2_lcpp_golden.py "$(scripts/fetch_smollm2.sh)" \
        tests/golden/smollm2-greedy.json tests/golden/smollm2-q4_1-llamacpp.json
"""

import json
import sys

import llama_cpp
import numpy as np


def main():
    gguf, greedy_path, out = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(greedy_path, encoding="utf-8") as f:
        golden = json.load(f)
    # An f32 KV cache (llama.cpp defaults to f16) so the comparison is of the matrix arithmetic.
    llm = llama_cpp.Llama(
        model_path=gguf, n_ctx=512, n_threads=2, logits_all=True, verbose=False, type_k=0, type_v=0
    )
    cases = []
    for case in golden["cases"]:
        tokens = case["prompt_ids"] + case["greedy"][:-1]
        llm.reset()
        llm.eval(tokens)
        start = len(case["prompt_ids"]) - 1
        scores = np.array(llm.scores[start : len(tokens)], dtype=np.float32)
        top2 = np.sort(scores, axis=-1)[:, -2:]
        cases.append(
            {
                "tokens": tokens,
                "from": start,
                "argmax": [int(i) for i in scores.argmax(axis=-1)],
                "top2_gap": [float(v) for v in top2[:, 1] - top2[:, 0]],
            }
        )
        print(repr(case["text"][-30:]), sum(a == g for a, g in zip(cases[-1]["argmax"], case["greedy"])), "/", len(case["greedy"]))
    doc = {"llama_cpp_python": llama_cpp.__version__, "gguf_sha256": golden["gguf_sha256"], "cases": cases}
    with open(out, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
