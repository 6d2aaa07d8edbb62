"""The Ollama-compatible API of a real `localai serve`, through the official `ollama` client."""

from __future__ import annotations

import json
import urllib.request

import numpy as np
import ollama
import pytest
from conftest import EMBED_MODEL, TEST_MODEL


@pytest.fixture(scope="module")
def client(daemon):
    return ollama.Client(host=daemon.url, headers=daemon.headers())


def test_list_ps_show_version(client, daemon):
    names = [m.model for m in client.list().models]
    assert TEST_MODEL in names and EMBED_MODEL in names
    mine = next(m for m in client.list().models if m.model == TEST_MODEL)
    assert mine.size > 0 and mine.details.format == "gguf" and len(mine.digest) == 64
    loaded = client.ps().models
    assert [m.model for m in loaded] == [TEST_MODEL]
    shown = client.show(TEST_MODEL)
    assert shown.details.family == "llama" and "completion" in shown.capabilities
    assert daemon.request("GET", "/api/version")[1]["version"]


def test_chat_stream_and_not(client):
    msgs = [{"role": "user", "content": "Say hello."}]
    r = client.chat(model=TEST_MODEL, messages=msgs, options={"num_predict": 5, "temperature": 0})
    assert r.message.role == "assistant" and r.message.content
    assert r.done and r.done_reason == "length" and r.eval_count == 5 and r.prompt_eval_count > 0
    parts = list(client.chat(model=TEST_MODEL + ":latest", messages=msgs, stream=True,
                             options={"num_predict": 5, "temperature": 0}))  # fmt: skip
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts) == r.message.content


def test_generate(client, daemon):
    r = client.generate(model=TEST_MODEL, prompt="Say hello.",
                        options={"num_predict": 4, "temperature": 0})  # fmt: skip
    assert r.response and r.done and r.eval_count == 4
    parts = list(client.generate(model=TEST_MODEL, prompt="Say hello.", stream=True,
                                 options={"num_predict": 4, "temperature": 0}))  # fmt: skip
    assert "".join(p.response for p in parts) == r.response
    # the raw NDJSON: one object per line, the last one done
    req = urllib.request.Request(daemon.url + "/api/generate", json.dumps(
        {"model": TEST_MODEL, "prompt": "Hi", "options": {"num_predict": 2}}).encode(),
        daemon.headers() | {"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=300) as resp:
        assert resp.headers["Content-Type"].startswith("application/x-ndjson")
        lines = [json.loads(x) for x in resp.read().decode().splitlines()]
    assert lines[-1]["done"] is True and all(x["done"] is False for x in lines[:-1])
    # an empty prompt is Ollama's "load the model" request
    assert client.generate(model=TEST_MODEL, prompt="").done_reason == "load"


def test_embed(client, embedder):
    r = client.embed(model=EMBED_MODEL, input=["first text", "second text"])
    got = np.array(r.embeddings, dtype=np.float32)
    np.testing.assert_allclose(got, embedder.embed(["first text", "second text"]), atol=1e-5)


def test_errors_use_ollama_shape(client, daemon):
    with pytest.raises(ollama.ResponseError) as e:
        client.chat(model="no-such-model", messages=[{"role": "user", "content": "hi"}])
    assert e.value.status_code == 404 and "no-such-model" in e.value.error
    status, body = daemon.request("POST", "/api/generate", {"model": TEST_MODEL, "prompt": 3})
    assert status == 400 and isinstance(body["error"], str)
    status, body = daemon.request(
        "POST", "/api/generate", {"model": TEST_MODEL, "prompt": "x", "suffix": "y"}
    )
    assert status == 400 and "fill-in-the-middle" in body["error"]


def test_chat_from_documents(client, daemon):
    msgs = [{"role": "user", "content": "How much sun do tomatoes need?"}]
    r = client.chat(model=TEST_MODEL + "+docs", messages=msgs, stream=False,
                    options={"num_predict": 32, "temperature": 0})  # fmt: skip
    assert "Sources:" in r.message.content
    raw = daemon.request("POST", "/api/chat", {"model": TEST_MODEL + "+docs", "messages": msgs,
                         "stream": False, "options": {"num_predict": 8}})[1]  # fmt: skip
    assert isinstance(raw["citations"], list) and raw["sources"]["used"] >= 1
    text = daemon.request("POST", "/api/chat", {"model": TEST_MODEL + "+docs", "messages": msgs,
                          "options": {"num_predict": 2}})[1]  # fmt: skip
    lines = [json.loads(x) for x in text.splitlines()]  # NDJSON: the passages come first
    assert lines[0]["sources"]["passages"] and lines[0]["message"]["content"] == ""
    assert lines[-1]["done"] and "citations" in lines[-1]
