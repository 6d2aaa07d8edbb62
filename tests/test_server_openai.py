"""The OpenAI-compatible API of a real `localai serve`, through the official `openai` client.

Every body is also validated against the OpenAI OpenAPI schemas (tests/data/openai-openapi),
including each streamed chunk. Generations are short (a few tokens) to keep the suite fast.
"""

from __future__ import annotations

import base64
import json
import sys
import urllib.request

import numpy as np
import openai
import pytest
from conftest import EMBED_MODEL, TEST_MODEL
from openai_schema import check

CHAT = [{"role": "user", "content": "Say hello."}]


@pytest.fixture(scope="module")
def client(daemon):
    return openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.token, max_retries=0)


def sse(daemon, path: str, body: dict) -> list[dict | str]:
    """The raw SSE events of a streamed request (JSON objects, then the final "[DONE]")."""
    headers = daemon.headers() | {"Content-Type": "application/json"}
    req = urllib.request.Request(daemon.url + path, json.dumps(body).encode(), headers)
    out = []
    with urllib.request.urlopen(req, timeout=300) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        for line in r:
            line = line.decode().strip()
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_models_list(client, daemon):
    ids = [m.id for m in client.models.list()]
    assert TEST_MODEL in ids and EMBED_MODEL in ids
    status, body = daemon.request("GET", "/v1/models")
    check("ListModelsResponse", body)
    assert client.models.retrieve(TEST_MODEL).id == TEST_MODEL


def test_chat_completion(client, daemon):
    r = client.chat.completions.create(model=TEST_MODEL, messages=CHAT, max_tokens=6,
                                       temperature=0, seed=1)  # fmt: skip
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and 0 < r.usage.completion_tokens <= 6
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    three = {"model": TEST_MODEL, "messages": CHAT, "max_tokens": 3}
    status, body = daemon.request("POST", "/v1/chat/completions", three)
    assert status == 200
    check("CreateChatCompletionResponse", body)
    assert (
        body["usage"]["completion_tokens"] == 3 and body["choices"][0]["finish_reason"] == "length"
    )


def test_greedy_chat_is_reproducible_and_stop_strings_cut(client):
    kw = dict(model=TEST_MODEL, messages=CHAT, max_tokens=8, temperature=0)
    a = client.chat.completions.create(**kw).choices[0].message.content
    b = client.chat.completions.create(**kw).choices[0].message.content
    assert a == b and len(a) > 2
    stop = a[2:4]
    c = client.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert stop not in c.message.content and c.finish_reason == "stop"


def test_chat_stream_shape(client, daemon):
    events = sse(daemon, "/v1/chat/completions",
                 {"model": TEST_MODEL, "messages": CHAT, "max_tokens": 5, "stream": True,
                  "stream_options": {"include_usage": True}})  # fmt: skip
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    for c in chunks:
        check("CreateChatCompletionStreamResponse", c)
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = chunks[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 5
    finals = [c for c in chunks[:-1] if c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0] is chunks[-2]
    assert finals[0]["choices"][0]["finish_reason"] == "length"
    # the official client reads the same stream
    stream = client.chat.completions.create(model=TEST_MODEL, messages=CHAT, max_tokens=5,
                                            stream=True)  # fmt: skip
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text


def test_completions(client, daemon):
    r = client.completions.create(model=TEST_MODEL, prompt="The capital of France is",
                                  max_tokens=4, temperature=0)  # fmt: skip
    assert r.choices[0].text and r.usage.completion_tokens <= 4
    status, body = daemon.request("POST", "/v1/completions",
                                  {"model": TEST_MODEL, "prompt": "One, two,", "echo": True,
                                   "max_tokens": 2})  # fmt: skip
    check("CreateCompletionResponse", body)
    assert body["choices"][0]["text"].startswith("One, two,")
    events = sse(
        daemon,
        "/v1/completions",
        {"model": TEST_MODEL, "prompt": "One, two,", "max_tokens": 3, "stream": True},
    )
    assert events[-1] == "[DONE]"
    assert len({c["id"] for c in events[:-1]}) == 1
    # completions share one schema for chunks and bodies; only the last chunk has finish_reason
    check("CreateCompletionResponse", events[-2])
    assert events[-2]["usage"]["completion_tokens"] == 3
    text = "".join(c.choices[0].text for c in client.completions.create(
        model=TEST_MODEL, prompt="One, two,", max_tokens=3, stream=True))  # fmt: skip
    assert text


def test_empty_prompt_is_a_400(daemon):  # found by the fuzz run
    status, body = daemon.request("POST", "/v1/completions", {"model": TEST_MODEL, "prompt": ""})
    assert status == 400 and body["error"]["param"] == "prompt"


def test_a_lone_surrogate_in_the_body_is_text_not_a_500(daemon):
    """JSON may carry "\\ud800" unpaired; no tokenizer can encode it, so it is read as "?"."""
    for path, body in (
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi \\ud800"}]'),
        ("/v1/completions", b'{"prompt": "a \\udfff b"'),
        ("/api/chat", b'{"stream": false, "messages": [{"role": "user", "content": "\\ud800"}]'),
    ):
        raw = body + b', "model": "' + daemon.model.encode() + b'", "max_tokens": 2}'
        status, out = daemon.request("POST", path, raw=raw)
        assert status == 200, (path, out)


def test_suffix_needs_a_model_with_fill_in_the_middle_tokens(daemon):
    status, body = daemon.request(
        "POST", "/v1/completions", {"model": TEST_MODEL, "prompt": "def f(", "suffix": "\n"}
    )
    assert status == 400 and body["error"]["code"] == "fim_unsupported"
    assert "fill-in-the-middle" in body["error"]["message"]
    check("ErrorResponse", body)


def test_embeddings_float_and_base64(client, daemon, embedder):
    texts = ["a cat sat on the mat", "quarterly revenue grew"]
    r = client.embeddings.create(model=EMBED_MODEL, input=texts)  # the client asks for base64
    got = np.array([d.embedding for d in r.data], dtype=np.float32)
    assert got.shape == (2, 384) and r.usage.prompt_tokens > 0
    np.testing.assert_allclose(got, embedder.embed(texts), atol=1e-5)
    status, body = daemon.request("POST", "/v1/embeddings",
                                  {"model": EMBED_MODEL, "input": texts[0],
                                   "encoding_format": "float"})  # fmt: skip
    check("CreateEmbeddingResponse", body)
    np.testing.assert_allclose(body["data"][0]["embedding"], got[0], atol=1e-6)
    status, body = daemon.request("POST", "/v1/embeddings",
                                  {"model": EMBED_MODEL, "input": texts[1],
                                   "encoding_format": "base64"})  # fmt: skip
    vec = np.frombuffer(base64.b64decode(body["data"][0]["embedding"]), dtype="<f4")
    np.testing.assert_allclose(vec, got[1], atol=1e-6)


LIGHTHOUSE = [{"role": "user", "content": "Who built the Brightwater lighthouse, and when?"}]


def test_answer_from_documents_with_checked_citations(client, daemon):
    ids = [m.id for m in client.models.list()]
    assert TEST_MODEL + "+docs" in ids
    raw = client.chat.completions.with_raw_response.create(
        model=TEST_MODEL + "+docs", messages=LIGHTHOUSE, max_tokens=48, temperature=0
    )
    r, body = raw.parse(), raw.http_response.json()
    check("CreateChatCompletionResponse", body)
    assert "\n\nSources:\n" in r.choices[0].message.content
    assert body["sources"]["used"] >= 1 and body["sources"]["dropped_stale"] == 0
    for c in body["citations"]:
        assert c.keys() >= {"path", "start_line", "end_line", "quote", "verified"}
        if c["verified"]:
            assert c["quote"] in (daemon.docs / c["path"].rsplit("/", 1)[1]).read_text()
            assert c["path"].startswith(str(daemon.docs))
    if not body["citations"]:  # a 135M model may cite nothing; then the list says so
        assert "cites none of the passages" in r.choices[0].message.content


def test_answer_from_documents_streams_citations_last(daemon):
    events = sse(daemon, "/v1/chat/completions",
                 {"model": TEST_MODEL, "docs": {"k": 2, "source": str(daemon.docs)},
                  "messages": LIGHTHOUSE, "max_tokens": 24, "stream": True})  # fmt: skip
    assert events[-1] == "[DONE]"
    for c in events[:-1]:
        check("CreateChatCompletionStreamResponse", c)
    first = events[0]  # the passages, known before the model has read them
    assert first["choices"][0]["delta"]["role"] == "assistant"
    given = first["sources"]["passages"]
    assert given and all(p["path"].startswith(str(daemon.docs)) for p in given)
    assert [p["n"] for p in given] == list(range(1, len(given) + 1))
    last = events[-2]
    assert last["choices"][0]["finish_reason"] and "citations" in last and "sources" in last
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-1])
    assert "Sources:" in text


def test_the_prompt_head_outlives_a_chat_in_between(daemon):
    """Two questions from the documents with a plain chat between them: the second restores
    the head (system message up to the passages) instead of computing it."""
    ask = {"model": TEST_MODEL + "+docs", "max_tokens": 2, "temperature": 0, "stats": True}
    status, one = daemon.request("POST", "/v1/chat/completions", ask | {"messages": LIGHTHOUSE})
    assert status == 200, one
    head = one["stats"]["prefix_tokens"]
    assert head > 10 and one["stats"]["prefix_source"] in ("computed", "disk", "memory", "live")
    daemon.request("POST", "/v1/chat/completions", {"model": TEST_MODEL, "max_tokens": 2,
                   "messages": [{"role": "user", "content": "Say hi."}]})  # fmt: skip
    tomato = [{"role": "user", "content": "How much sun do tomatoes need?"}]
    status, two = daemon.request("POST", "/v1/chat/completions", ask | {"messages": tomato})
    s = two["stats"]
    assert s["prefix_source"] == "memory" and s["cached_from"]["prefix"] == head
    assert two["usage"]["prompt_tokens_details"]["cached_tokens"] == s["cached_tokens"] >= head
    assert s["prefill_tokens"] == s["prompt_tokens"] - s["cached_tokens"]


def test_answer_layout_is_the_models_unless_the_request_names_one(daemon):
    body = {"model": TEST_MODEL, "messages": LIGHTHOUSE, "max_tokens": 2, "temperature": 0}
    prompt = {}
    for layout in (None, "system", "oneshot"):
        docs = {"k": 2} | ({"layout": layout} if layout else {})
        status, out = daemon.request("POST", "/v1/chat/completions", body | {"docs": docs})
        assert status == 200, out
        prompt[layout] = out["usage"]["prompt_tokens"]
    assert prompt[None] == prompt["system"]  # SmolLM2's catalog entry
    assert prompt["oneshot"] > prompt["system"]  # the same passages plus the example exchange
    status, out = daemon.request("POST", "/v1/chat/completions",
                                 body | {"docs": {"layout": "sideways"}})  # fmt: skip
    assert status == 400 and out["error"]["param"].startswith("docs"), out
    check("ErrorResponse", out)


@pytest.mark.slow
def test_fill_in_the_middle_with_a_code_model(models_dir, tmp_path):
    """Qwen2.5-Coder's FIM tokens, through both APIs (the 491 MB model is pulled once into the
    test models dir, like the test model)."""
    from daemon_helpers import start_daemon

    from localai.catalog import Catalog

    Catalog(models_dir).ensure("qwen2.5-coder-0.5b", log=lambda m: print(m, file=sys.stderr))
    body = {"model": "qwen2.5-coder-0.5b", "prompt": "def fibonacci(n):\n    ",
            "suffix": "\n    return a\n", "max_tokens": 48, "temperature": 0}  # fmt: skip
    with start_daemon(tmp_path / "home", models_dir, "qwen2.5-coder-0.5b") as d:
        status, out = d.request("POST", "/v1/completions", body)
        assert status == 200, out
        check("CreateCompletionResponse", out)
        middle = out["choices"][0]["text"]
        assert "a, b" in middle and "return a" not in middle  # stops where the suffix begins
        ollama_body = {k: body[k] for k in ("model", "prompt", "suffix")} | {
            "stream": False, "options": {"num_predict": 48, "temperature": 0}}  # fmt: skip
        status, gen = d.request("POST", "/api/generate", ollama_body)
        assert status == 200 and gen["response"] == middle
