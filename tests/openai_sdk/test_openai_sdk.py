#!/usr/bin/env python3
"""The official `openai` Python package against a running Tessera cluster's HTTP API.

Run by tests/tests/cluster/openai_sdk.rs, which starts `tessera up --http-port 0` serving a
decoder (SmolLM2-135M-Instruct) and an encoder (all-MiniLM-L6-v2) with one running sequence per
group (`--max-batch 1`) and a short queue (so a request beyond it is refused), writes the gRPC
`Embed` vectors of a few texts to a JSON file, and checks that this script exits 0.

usage: test_openai_sdk.py --base-url http://127.0.0.1:PORT/v1 --model NAME --encoder NAME
                          --grpc-embeddings FILE.json --queue-depth N
"""

import argparse
import base64
import json
import struct
import sys
import traceback

import openai


def f32(x):
    """x rounded to the nearest float32, as a Python float."""
    return struct.unpack("<f", struct.pack("<f", x))[0]


def has_cjk(text):
    return any("\u4e00" <= ch <= "\u9fff" for ch in text)


class Checks:
    def __init__(self, client, model, encoder, grpc_embeddings, queue_depth):
        self.client = client
        self.queue_depth = queue_depth
        self.model = model
        self.encoder = encoder
        self.grpc = grpc_embeddings

    def complete(self, **kwargs):
        return self.client.completions.create(model=self.model, **kwargs)

    def chat(self, **kwargs):
        return self.client.chat.completions.create(model=self.model, **kwargs)

    def test_models_list(self):
        models = self.client.models.list()
        ids = sorted(m.id for m in models.data)
        assert ids == sorted([self.model, self.encoder]), ids
        assert all(m.object == "model" and m.owned_by == "tessera" for m in models.data)

    def test_completion_whole_and_streamed(self):
        whole = self.complete(prompt="The capital of France is", max_tokens=8, temperature=0)
        choice = whole.choices[0]
        assert choice.text.startswith(" Paris"), choice.text
        assert whole.id.startswith("cmpl-") and whole.object == "text_completion", whole
        assert whole.system_fingerprint.startswith("fp_"), whole.system_fingerprint
        assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0
        assert whole.usage.total_tokens == whole.usage.prompt_tokens + whole.usage.completion_tokens
        stream = self.complete(prompt="The capital of France is", max_tokens=8, temperature=0, stream=True,
                               stream_options={"include_usage": True})
        pieces, usage, reasons, ids = [], None, [], set()
        for chunk in stream:
            ids.add(chunk.id)
            if chunk.usage is not None:
                usage = chunk.usage
            for c in chunk.choices:
                pieces.append(c.text)
                if c.finish_reason:
                    reasons.append(c.finish_reason)
        assert "".join(pieces) == choice.text, (pieces, choice.text)
        assert reasons == [choice.finish_reason], reasons
        assert len(ids) == 1, ids
        assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage
        assert usage.prompt_tokens == whole.usage.prompt_tokens, usage

    def test_chat_whole_and_streamed(self):
        messages = [{"role": "system", "content": "Answer briefly."},
                    {"role": "user", "content": "What is the capital of France?"}]
        whole = self.chat(messages=messages, max_tokens=16, temperature=0)
        message = whole.choices[0].message
        assert whole.id.startswith("chatcmpl-") and whole.object == "chat.completion", whole
        assert message.role == "assistant" and message.content.strip(), message
        deltas, roles = [], []
        for chunk in self.chat(messages=messages, max_tokens=16, temperature=0, stream=True):
            assert chunk.object == "chat.completion.chunk", chunk
            for c in chunk.choices:
                if c.delta.role:
                    roles.append(c.delta.role)
                if c.delta.content:
                    deltas.append(c.delta.content)
        assert roles == ["assistant"], roles
        assert "".join(deltas) == message.content, (deltas, message.content)

    def test_chinese_chat_streams_whole_characters(self):
        messages = [{"role": "user", "content": "请用中文回答：你好吗？"}]
        whole = self.chat(messages=messages, max_tokens=40, temperature=0).choices[0].message.content
        assert has_cjk(whole), whole
        deltas = []
        for chunk in self.chat(messages=messages, max_tokens=40, temperature=0, stream=True):
            for c in chunk.choices:
                if c.delta.content:
                    deltas.append(c.delta.content)
        assert all("\ufffd" not in d for d in deltas), deltas
        assert "".join(deltas) == whole, (deltas, whole)
        assert "\ufffd" not in whole, whole

    def test_n_with_a_seed(self):
        kwargs = dict(prompt="Once upon a time", max_tokens=16, temperature=0.9)
        both = self.complete(n=2, seed=7, **kwargs)
        assert [c.index for c in both.choices] == [0, 1], both.choices
        again = self.complete(n=2, seed=7, **kwargs)
        assert [c.text for c in again.choices] == [c.text for c in both.choices], "a seed reproduces every choice"
        # Choice i is the request seeded seed + i.
        for i, choice in enumerate(both.choices):
            alone = self.complete(seed=7 + i, **kwargs).choices[0]
            assert alone.text == choice.text, (i, alone.text, choice.text)
        other = self.complete(n=2, seed=1234, **kwargs)
        assert [c.text for c in other.choices] != [c.text for c in both.choices], "another seed, other samples"
        assert both.usage.completion_tokens == 32, both.usage

    def test_logprobs_both_shapes(self):
        whole = self.complete(prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=3)
        lp = whole.choices[0].logprobs
        n = len(lp.tokens)
        assert n == whole.usage.completion_tokens or n == whole.usage.completion_tokens - 1, (n, whole.usage)
        assert len(lp.token_logprobs) == n and len(lp.top_logprobs) == n and len(lp.text_offset) == n
        assert "".join(lp.tokens) == whole.choices[0].text, (lp.tokens, whole.choices[0].text)
        for token, logprob, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
            assert logprob <= 0 and 1 <= len(top) <= 3, (token, logprob, top)
            assert max(top.values()) == logprob, "greedy picks the most likely token"
        chat = self.chat(messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, temperature=0,
                         logprobs=True, top_logprobs=2)
        content = chat.choices[0].logprobs.content
        assert content, chat
        for t in content:
            assert len(t.top_logprobs) == 2 and t.logprob <= 0, t
        joined = b"".join(bytes(t.bytes) for t in content).decode("utf-8")
        assert joined == chat.choices[0].message.content, (joined, chat.choices[0].message.content)

    def test_stop_strings(self):
        kwargs = dict(prompt="List three fruits:", max_tokens=24, temperature=0)
        free = self.complete(**kwargs).choices[0].text
        # A stop string taken from the middle of the free text: the stopped text is what
        # came before its first occurrence.
        stop = next(free[i:i + 3] for i in range(4, len(free) - 3) if free[i:i + 3].strip() and free.find(free[i:i + 3]) == i)
        stopped = self.complete(stop=[stop], **kwargs).choices[0]
        assert stopped.text == free[:free.index(stop)], (stop, stopped.text, free)
        assert stopped.finish_reason == "stop", stopped.finish_reason
        streamed = "".join(c.choices[0].text for c in self.complete(stop=stop, stream=True, **kwargs) if c.choices)
        assert streamed == stopped.text, (streamed, stopped.text)

    def test_embeddings_equal_grpc(self):
        texts, vectors = self.grpc["texts"], self.grpc["vectors"]
        for fmt in ("base64", "float"):
            out = self.client.embeddings.create(model=self.encoder, input=texts, encoding_format=fmt)
            assert [d.index for d in out.data] == list(range(len(texts))), out.data
            for d, want in zip(out.data, vectors):
                if fmt == "base64":
                    # Asked for explicitly, the SDK hands the string over as it came.
                    raw = base64.b64decode(d.embedding)
                    got = list(struct.unpack(f"<{len(raw) // 4}f", raw))
                else:
                    got = [f32(x) for x in d.embedding]
                assert got == [f32(x) for x in want], f"{fmt}: text {d.index} differs from gRPC Embed"
            assert out.usage.prompt_tokens == self.grpc["tokens"], out.usage
        # The SDK's default (base64, decoded by the SDK) on one text gives gRPC's vector of that
        # text alone (batched with others, its padding differs, and so do the last bits).
        default = self.client.embeddings.create(model=self.encoder, input=texts[0])
        assert [f32(x) for x in default.data[0].embedding] == [f32(x) for x in self.grpc["single"]]

    def test_errors_are_typed_exceptions(self):
        def raises(kind, call):
            try:
                call()
            except kind as e:
                return e
            raise AssertionError(f"expected {kind.__name__}")

        e = raises(openai.BadRequestError, lambda: self.complete(prompt="Hi", temperature=-1))
        assert e.status_code == 400 and e.body["param"] == "temperature", e.body
        e = raises(openai.BadRequestError, lambda: self.complete(prompt="Hi", max_tokens="ten"))
        assert e.body["param"] == "max_tokens", e.body
        e = raises(openai.BadRequestError, lambda: self.chat(messages=[], max_tokens=4))
        assert e.body["param"] == "messages", e.body
        e = raises(openai.NotFoundError, lambda: self.client.completions.create(model="no-such-model", prompt="Hi"))
        assert e.status_code == 404 and e.body["code"] == "model_not_found", e.body
        raises(openai.BadRequestError, lambda: self.client.embeddings.create(model=self.model, input="a decoder"))
        raises(openai.NotFoundError, lambda: self.client.models.retrieve("no-such-model"))

    def test_a_full_queue_is_a_rate_limit(self):
        # One sequence runs per group here and `queue_depth` wait; the next request is refused.
        long = dict(prompt="Once upon a time", max_tokens=2000, temperature=0, stream=True,
                    extra_body={"ignore_eos": True})
        running = self.complete(**long)
        held = [running]
        try:
            next(iter(running))  # the first chunk: the request is admitted and running
            # Each stream is answered once its request is queued.
            held.extend(self.complete(**long) for _ in range(self.queue_depth))
            e = None
            try:
                self.complete(prompt="Hi", max_tokens=2)
            except openai.RateLimitError as caught:
                e = caught
            assert e is not None, "expected RateLimitError"
            assert e.status_code == 429 and e.body["code"] == "queue_full", e.body
        finally:
            for stream in held:
                stream.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--encoder", required=True)
    parser.add_argument("--grpc-embeddings", required=True)
    parser.add_argument("--queue-depth", type=int, required=True, help="the cluster's --queue-depth (--max-batch is 1)")
    args = parser.parse_args()
    with open(args.grpc_embeddings, encoding="utf-8") as f:
        grpc = json.load(f)
    # No retries: a refused request must surface as its exception, not be sent again.
    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0, timeout=300)
    checks = Checks(client, args.model, args.encoder, grpc, args.queue_depth)
    names = [n for n in dir(Checks) if n.startswith("test_")]
    # The queue check holds the decoder's group: it runs last.
    names.sort(key=lambda n: n == "test_a_full_queue_is_a_rate_limit")
    passed, failed = 0, 0
    for name in names:
        try:
            getattr(checks, name)()
            passed += 1
            print(f"ok {name}", flush=True)
        except Exception:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"FAILED {name}", flush=True)
            traceback.print_exc()
    print(f"openai {openai.__version__}: {passed} passed, {failed} failed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
