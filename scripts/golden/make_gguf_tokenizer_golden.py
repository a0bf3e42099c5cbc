#!/usr/bin/env python3
"""Golden tokenizations of GGUF files, from the tokenizer transformers builds out of their metadata.

usage:
  python scripts/golden/make_gguf_tokenizer_golden.py                   # regenerate every committed golden
  python scripts/golden/make_gguf_tokenizer_golden.py GGUF OUT.json     # one file, as it is
  python scripts/golden/make_gguf_tokenizer_golden.py --write-spm OUT.gguf

With no arguments it writes
  tests/golden/smollm2-tokenizer.json       SmolLM2-135M-Instruct (scripts/fetch_smollm2.sh), byte-level BPE
  tests/golden/gguf-tokenizer-spm.gguf      a small sentencepiece vocabulary, written here
  tests/golden/gguf-tokenizer-spm.json      its golden

Each golden holds "variants": the file as it is, then copies whose metadata differs in a few keys
("overrides", e.g. another `tokenizer.ggml.pre`), so one real vocabulary exercises every
pre-tokenizer. A variant is written to a temporary GGUF with the same metadata (no tensors) and
loaded with `AutoTokenizer.from_pretrained(dir, gguf_file=name)`; for every text the golden records
`encode(text)` (the tokenizer's default add_special_tokens) and `decode(ids)`. For the file as it is
it also records the added tokens `[id, content, special]`, and, when the file lists no merges, the
merge ranking transformers recovers from the scores.

Needs: torch transformers gguf sentencepiece protobuf (see the golden README for a venv).

Where transformers does not build the tokenizer the file describes, the variant's reference is
transformers' tokenizer with that one part replaced ("reference_patch" says which), and each case
whose ids differ from transformers' own keeps those as "transformers_gguf_ids":
  * `tokenizer.ggml.pre = smollm`: transformers (5.25) uses GPT-2's plain ByteLevel; SmolLM2's own
    tokenizer.json, and llama.cpp (its smollm pre-type splits on \\p{N} first), isolate every digit:
    Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, use_regex=True)].
    They differ on runs of spaces before a digit ("x  3") and on a space before a numeral such as "½".
  * `tokenizer.ggml.add_space_prefix = false` on a sentencepiece vocabulary: transformers ignores
    the key and always prepends "\u2581"; llama.cpp does not, and transformers' own LlamaTokenizer with
    add_prefix_space=False uses Metaspace(prepend_scheme="never") and no Strip decoder.
worker/model/tests/gguf_tokenizer.rs checks tessera_model::gguf_tokenizer against these files.
"""
import importlib.metadata
import io
import json
import os
import subprocess
import sys
import tempfile

import gguf
import numpy as np
import sentencepiece as spm
import tokenizers
import transformers
from sentencepiece import sentencepiece_model_pb2
from tokenizers import decoders, pre_tokenizers
from transformers import AutoTokenizer

from golden_util import sha256_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
GOLDEN = os.path.join(ROOT, "tests", "golden")

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    " one leading space",
    "   three leading spaces and two trailing  ",
    "12345 3.14",
    "x  3 and   42, 1000000",
    "def add(a, b):\n\treturn a + b\n\n\n# done\r\n",
    "你好，世界",
    "emoji: 😀 👍🏽 🇫🇷!",
    "<|im_start|>user\nhi<|im_end|>",
    "multiple    spaces   between     words",
    "I'm sure they've said it's ALL'S well, DON'T worry",
    "naïve café, Ærøskøbing ½ ² Ⅻ",
    "\n\n\tmixed\u00a0whitespace \u3000end",
    "",
    "the tokenizer merges bytes; workers serve prompts, decoders sample streams",
]

# A small sentencepiece vocabulary: BPE with byte fallback, trained here on a fixed text.
SPM_VOCAB = 640
SPM_CONTROL = ["<|im_start|>", "<|im_end|>"]
SPM_USER_DEFINED = ["<tool>"]
SPM_WORDS = (
    "the world hello model token tokens tokenizer inference cluster worker workers request requests "
    "serve serves served server prompt prompts layer layers weight weights tensor tensors parallel "
    "rank ranks step steps group groups stream streams sample samples sampling decode decoder "
    "encode encoder byte bytes merge merges vocabulary score scores quick brown fox jumps over lazy dog"
).split()

# Per file: the variants besides the file as it is.
SMOLLM2_VARIANTS = [
    {"tokenizer.ggml.pre": "gpt-2"},
    {"tokenizer.ggml.pre": "no-such-pre"},
    {"tokenizer.ggml.pre": "llama-bpe", "tokenizer.ggml.add_bos_token": True},
    {"tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.add_eos_token": True},
    {"tokenizer.ggml.pre": "qwen35"},
    {"tokenizer.ggml.pre": "tekken"},
    {"tokenizer.ggml.pre": "gpt-4o"},
]
SPM_VARIANTS = [
    {"tokenizer.ggml.add_space_prefix": False},
    {"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True},
    {"general.architecture": "phi3"},
]


def read_metadata(path):
    """Every key of the file as (value, type, sub_type), in file order, ready for GGUFWriter."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        out[key] = (field.contents(), vtype, sub)
    return out


def value_type(value):
    if isinstance(value, bool):
        return gguf.GGUFValueType.BOOL
    if isinstance(value, str):
        return gguf.GGUFValueType.STRING
    raise TypeError(f"no GGUF type for override {value!r}")


def write_metadata_only(metadata, overrides, path):
    """A GGUF with `metadata` plus `overrides` and no tensors: all the tokenizer loader reads."""
    meta = dict(metadata)
    arch = overrides.get("general.architecture")
    if arch is not None:
        # The model keys are named after the architecture; rename them so the config still loads.
        old = meta["general.architecture"][0]
        meta = {(arch + k[len(old):] if k.startswith(old + ".") else k): v for k, v in meta.items()}
    for key, value in overrides.items():
        meta[key] = (value, value_type(value), None)
    writer = gguf.GGUFWriter(path, meta["general.architecture"][0])
    for key, (value, vtype, sub) in meta.items():
        if key != "general.architecture":
            writer.add_key_value(key, value, vtype, sub)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()


def reference_patch(tok, metadata, overrides):
    """Replace the part of transformers' tokenizer that does not follow the file; its description."""
    meta = {k: v[0] for k, v in metadata.items()} | overrides
    backend = tok.backend_tokenizer
    if meta.get("tokenizer.ggml.model") == "gpt2" and meta.get("tokenizer.ggml.pre") == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )
        return "pre_tokenizer: Sequence[Digits(individual_digits), ByteLevel(use_regex)] as SmolLM2's tokenizer.json"
    if meta.get("tokenizer.ggml.model") == "llama" and meta.get("tokenizer.ggml.add_space_prefix") is False:
        assert meta["general.architecture"] != "phi3", "phi3 with add_space_prefix=false is not covered"
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never", split=False)
        backend.decoder = decoders.Sequence(
            [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        )
        return "pre_tokenizer Metaspace(prepend_scheme=never), decoder without Strip: LlamaTokenizer(add_prefix_space=False)"
    return None


def variant(metadata, overrides, tmp):
    path = os.path.join(tmp, "variant.gguf")
    write_metadata_only(metadata, overrides, path)
    tok = AutoTokenizer.from_pretrained(tmp, gguf_file="variant.gguf")
    plain = [tok.encode(text) for text in TEXTS]
    patch = reference_patch(tok, metadata, overrides)
    cases = []
    for text, theirs in zip(TEXTS, plain):
        ids = tok.encode(text)
        case = {"text": text, "ids": ids, "decoded": tok.decode(ids)}
        if ids != theirs:
            case["transformers_gguf_ids"] = theirs
        cases.append(case)
    out = {"overrides": overrides, "class": type(tok).__name__, "cases": cases}
    if not overrides:
        # What the ids alone may not show: which tokens are matched whole, and the merge ranking
        # recovered from the scores when the file lists no merges.
        backend = json.loads(tok.backend_tokenizer.to_str())
        out["added_tokens"] = [[t["id"], t["content"], t["special"]] for t in backend["added_tokens"]]
        if "tokenizer.ggml.merges" not in metadata:
            out["merges"] = backend["model"]["merges"]
    if patch is not None:
        out["reference_patch"] = patch
    differ = sum("transformers_gguf_ids" in c for c in cases)
    print(f"  {overrides or 'as is'}: {len(cases)} cases" + (f", {differ} differ from transformers" if patch else ""))
    return out


def golden_for(gguf_path, out, variants):
    metadata = read_metadata(gguf_path)
    print(f"{gguf_path}:")
    with tempfile.TemporaryDirectory() as tmp:
        runs = [variant(metadata, overrides, tmp) for overrides in [{}] + variants]
    golden = {
        "generator": "scripts/golden/make_gguf_tokenizer_golden.py",
        "gguf_file": os.path.basename(gguf_path),
        "gguf_sha256": sha256_file(gguf_path),
        "versions": {
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "gguf": importlib.metadata.version("gguf"),
        },
        "variants": runs,
    }
    with open(out, "w", encoding="utf-8") as f:
        json.dump(golden, f, ensure_ascii=False, indent=1)
        f.write("\n")
    print(f"wrote {out}")


def spm_corpus():
    """Deterministic sentences over a small word list, with digits, punctuation and a little Chinese."""
    lines = []
    n = len(SPM_WORDS)
    for i in range(2000):
        words = [SPM_WORDS[(i * 7 + j * j * 3 + j) % n] for j in range(3 + i % 9)]
        if i % 5 == 0:
            words[0] = words[0].capitalize()
        line = " ".join(words) + (".", "!", "?", ",", ":")[i % 5]
        if i % 11 == 0:
            line += f" {i} {i * 37 % 1000}.{i % 10}"
        if i % 13 == 0:
            line += " 你好世界"
        lines.append(line)
    return lines


def write_spm_gguf(path):
    """A llama-architecture GGUF whose vocabulary is a freshly trained sentencepiece BPE model,
    written as llama.cpp's converter writes one (`_create_vocab_sentencepiece`)."""
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(spm_corpus()),
        model_writer=model,
        model_type="bpe",
        vocab_size=SPM_VOCAB,
        byte_fallback=True,
        character_coverage=1.0,
        control_symbols=SPM_CONTROL,
        user_defined_symbols=SPM_USER_DEFINED,
        num_threads=1,
        minloglevel=2,
    )
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model.getvalue())
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    # sentencepiece's piece types are numbered as llama.cpp's token types:
    # 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
    token_types = [p.type for p in proto.pieces]

    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tessera gguf-tokenizer-spm")
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_block_count(1)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(2)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(4)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(token_types)
    writer.add_bos_token_id(tokens.index("<s>"))
    writer.add_eos_token_id(tokens.index("</s>"))
    writer.add_unk_token_id(tokens.index("<unk>"))
    writer.add_eot_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    # One tiny tensor, so the file is a model file like any other.
    writer.add_tensor("token_embd.weight", np.zeros((len(tokens), 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    print(f"wrote {path}: {len(tokens)} pieces, {os.path.getsize(path)} bytes")


def main():
    args = sys.argv[1:]
    if args[:1] == ["--write-spm"] and len(args) == 2:
        write_spm_gguf(args[1])
    elif len(args) == 2:
        golden_for(args[0], args[1], [])
    elif not args:
        smollm2 = subprocess.check_output([os.path.join(ROOT, "scripts", "fetch_smollm2.sh")], text=True).strip()
        golden_for(smollm2, os.path.join(GOLDEN, "smollm2-tokenizer.json"), SMOLLM2_VARIANTS)
        spm_path = os.path.join(GOLDEN, "gguf-tokenizer-spm.gguf")
        write_spm_gguf(spm_path)
        golden_for(spm_path, os.path.join(GOLDEN, "gguf-tokenizer-spm.json"), SPM_VARIANTS)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
