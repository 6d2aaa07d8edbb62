"""The remote engine against real servers on loopback: the session's `localai serve` (SmolLM2,
ctx 1024) as the model server, a second `localai serve` whose engine is remote (a localai in
front of another), and llama-cpp-python's own OpenAI server where its extras are installed.
Nothing is mocked; what the engine reports is checked against what the server itself says."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import threading
import urllib.request

import pytest
from conftest import TEST_MODEL, localai
from daemon_helpers import TEST_CTX, free_port, start_daemon, write_docs

from localai.engine import ContextOverflowError, Delta, Done, EngineError, Message, SamplingParams
from localai.engine.base import chat
from localai.engine.remote import RemoteEngine

QUESTION = "Why is the sky blue?"
GREEDY = {"temperature": 0, "seed": 1}


def remote(daemon, **kw) -> RemoteEngine:
    return RemoteEngine(daemon.url + "/v1", daemon.token, TEST_MODEL, log=lambda _m: None, **kw)


def run(events) -> tuple[list[str], Done]:
    deltas, done = [], None
    for ev in events:
        if isinstance(ev, Delta):
            deltas.append(ev.text)
        elif isinstance(ev, Done):
            done = ev
    assert done is not None
    return deltas, done


def test_streams_a_chat_with_stop_and_the_servers_own_counts(daemon):
    eng = remote(daemon)
    info = eng.info()
    assert info["backend"] == "remote" and info["url"] == daemon.url
    assert (info["tokenizer"], info["chat_template"]) == ("server", "server")
    assert (eng.context_length, info["weights_bytes"]) == (TEST_CTX, 0)
    # a raw prompt goes to /v1/completions; a prompt that shares no prefix with the chats
    # also makes the daemon compute each chat's prompt whole, so both answers are alike
    raw = SamplingParams(max_tokens=4, **GREEDY)
    _, done = run(eng.generate("The capital of France is", raw))
    assert done.stats.completion_tokens == 4 and done.stats.finish_reason == "length"
    status, direct = daemon.request("POST", "/v1/chat/completions", {
        "model": TEST_MODEL, "messages": [{"role": "user", "content": QUESTION}],
        "max_tokens": 24, "stop": ["."], **GREEDY})  # fmt: skip
    assert status == 200, direct
    run(eng.generate("The capital of France is", raw))
    params = SamplingParams(max_tokens=24, stop=["."], **GREEDY)
    deltas, done = run(chat(eng, [Message("user", QUESTION)], params))
    assert "".join(deltas) == done.text == direct["choices"][0]["message"]["content"]
    assert "." not in done.text and done.text
    usage = direct["usage"]
    assert done.stats.prompt_tokens == usage["prompt_tokens"]
    assert done.stats.completion_tokens == usage["completion_tokens"]
    assert done.stats.as_dict()["usage_from"] == "server"
    eng.close()


def test_closing_or_cancelling_frees_the_upstream_slot(daemon):
    eng = remote(daemon)
    prompt = eng.apply_chat_template([Message("user", "Write a long story about a dragon.")])
    params = SamplingParams(max_tokens=400, temperature=0.8, seed=3)
    before = daemon.wait_idle()["cancelled"]
    events = eng.generate(prompt, params)
    next(ev for ev in events if isinstance(ev, Delta))
    events.close()  # closes the HTTP stream: the daemon sees its client leave
    assert daemon.wait_idle()["cancelled"] == before + 1
    cancel = threading.Event()
    done = None
    for ev in eng.generate(prompt, params, cancel):
        cancel.set()
        done = ev
    assert isinstance(done, Done) and done.stats.finish_reason == "cancelled"
    assert daemon.wait_idle()["cancelled"] == before + 2
    eng.close()


def test_a_prompt_over_the_context_is_counted_by_the_servers_tokenizer(daemon):
    eng = remote(daemon)
    text = "lighthouse keeper " * 700
    served = daemon.wait_idle()["served"]
    with pytest.raises(ContextOverflowError) as e:
        run(chat(eng, [Message("user", text)], SamplingParams(max_tokens=16)))
    status, body = daemon.request("POST", "/v1/chat/completions", {
        "model": TEST_MODEL, "messages": [{"role": "user", "content": text}],
        "max_tokens": 16})  # fmt: skip
    assert status == 400  # the daemon's own refusal names the same count
    assert f"prompt is {e.value.prompt_tokens:,} tokens" in body["error"]["message"]
    assert e.value.context_length == TEST_CTX
    assert daemon.health()["served"] == served  # nothing was generated
    eng.close()


def test_errors_name_the_server_the_status_and_its_message(daemon):
    with pytest.raises(EngineError) as e:
        RemoteEngine(daemon.url, "wrong-key", TEST_MODEL)
    msg = str(e.value)
    assert daemon.url in msg and "401" in msg and "LOCALAI_REMOTE_API_KEY" in msg
    eng = remote(daemon)
    with pytest.raises(EngineError) as e:  # the daemon refuses temperature 3 with a 400
        run(chat(eng, [Message("user", "hi")], SamplingParams(temperature=3.0, max_tokens=4)))
    assert "400" in str(e.value) and "temperature" in str(e.value)
    eng.close()


def test_cli_run_with_the_remote_engine_and_a_server_that_is_down(daemon, home):
    import os

    env = dict(os.environ, LOCALAI_REMOTE_URL=daemon.url, LOCALAI_REMOTE_API_KEY=daemon.token)
    r = localai("run", QUESTION, "--engine", "remote", "--max-tokens", "6", "-t", "0",
                "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == TEST_MODEL and out["stats"]["remote_url"] == daemon.url
    assert out["stats"]["completion_tokens"] == 6
    down = f"http://127.0.0.1:{free_port()}"
    r = localai("run", "hi", "--engine", "remote", "--remote-url", down, env=env)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot reach the model server at {down}" in r.stderr


@pytest.fixture(scope="module")
def front(daemon, models_dir, tmp_path_factory):
    """A `localai serve` whose engine is the session daemon (remote_url, its token as
    remote_api_key in config.toml), with a small indexed folder of its own."""
    root = tmp_path_factory.mktemp("front")
    home = root / "home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'engine = "remote"\nremote_url = "{daemon.url}/v1"\nremote_api_key = "{daemon.token}"\n'
    )
    with start_daemon(home, models_dir, TEST_MODEL, "--engine", "remote", "--keep-alive=-1",
                      docs=write_docs(root / "docs")) as d:  # fmt: skip
        yield d


def test_a_daemon_in_front_serves_the_openai_client(front, daemon):
    import openai

    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.token)
    msgs = [{"role": "user", "content": QUESTION}]
    chunks = list(client.chat.completions.create(
        model=TEST_MODEL, messages=msgs, max_tokens=12, stream=True,
        stream_options={"include_usage": True}, **GREEDY))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    direct = openai.OpenAI(base_url=daemon.url + "/v1", api_key=daemon.token)
    want = direct.chat.completions.create(model=TEST_MODEL, messages=msgs, max_tokens=12,
                                          **GREEDY)  # fmt: skip
    assert text == want.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == want.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == want.usage.completion_tokens


TOOL_MODEL = "qwen2.5-coder-0.5b"  # SmolLM2-135M writes no valid calls (see test_tools.py)
CALCULATOR = {"type": "function", "function": {
    "name": "calculator", "description": "Evaluate an arithmetic expression.",
    "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                   "required": ["expression"]}}}  # fmt: skip


@pytest.fixture(scope="module")
def tool_front(models_dir, tmp_path_factory):
    """A localai in front of a localai serving a model that calls tools."""
    from localai.catalog import Catalog

    Catalog(models_dir).ensure(TOOL_MODEL)
    root = tmp_path_factory.mktemp("tool_front")
    with start_daemon(root / "up", models_dir, TOOL_MODEL, "--keep-alive=-1") as up:
        home = root / "front"
        home.mkdir()
        (home / "config.toml").write_text(f'remote_url = "{up.url}"\n'
                                          f'remote_api_key = "{up.token}"\n')  # fmt: skip
        with start_daemon(home, models_dir, TOOL_MODEL, "--engine", "remote") as front:
            yield front, up


@pytest.mark.slow
def test_a_daemon_in_front_passes_tool_calls_and_says_when_its_remote_is_gone(tool_front):
    import openai

    front, up = tool_front
    client = openai.OpenAI(base_url=front.url + "/v1", api_key=front.token, max_retries=0)
    msgs = [{"role": "user", "content": "What is 1234 * 5678? Use the calculator."}]
    for choice in ("auto", {"type": "function", "function": {"name": "calculator"}}):
        r = client.chat.completions.create(
            model=TOOL_MODEL,
            messages=msgs,
            tools=[CALCULATOR],
            tool_choice=choice,
            max_tokens=48,
            temperature=0,
        )
        assert r.choices[0].finish_reason == "tool_calls", r.choices[0].message
        call = r.choices[0].message.tool_calls[0]
        assert call.function.name == "calculator"
        assert "1234" in json.loads(call.function.arguments)["expression"]
    up.proc.terminate()
    up.proc.wait(timeout=20)
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model=TOOL_MODEL, messages=msgs, max_tokens=4)
    assert e.value.status_code == 502
    assert f"cannot reach the model server at {up.url}" in e.value.message


def test_status_and_ps_show_the_remote_never_its_key(front, daemon, models_dir):
    env = _cli_env(front, models_dir)
    r = localai("ps", env=env)
    assert r.returncode == 0, r.stderr
    assert f"remote {daemon.url}" in r.stdout
    r = localai("status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert daemon.token not in r.stdout
    status = json.loads(r.stdout)
    assert status["settings"]["remote_api_key"] == "(set)"
    assert status["memory"]["holders"].get("weights", 0) == 0
    assert status["residency"]["models"][0]["remote_url"] == daemon.url
    r = localai("status", env=env)
    assert f"engine remote at {daemon.url}" in r.stdout and daemon.token not in r.stdout


def test_ask_over_an_index_through_the_remote_engine(front, models_dir):
    env = _cli_env(front, models_dir)
    q = "Who built the Brightwater lighthouse?"
    for extra in ([], ["--no-daemon"]):  # through the daemon in front, then in-process
        r = localai("ask", q, "--json", "--max-tokens", "32", "-t", "0", *extra, env=env)
        assert r.returncode == 0, r.stderr
        out = json.loads(r.stdout)
        assert out["answer"] and out["stats"]["sources"]["used"] >= 1
        assert out["stats"]["usage_from"] == "server"


def _cli_env(d, models_dir) -> dict:
    import os

    return dict(os.environ, LOCALAI_HOME=str(d.home), LOCALAI_PORT=str(d.port),
                LOCALAI_MODELS=str(models_dir))  # fmt: skip


# llama-cpp-python's own OpenAI server: a server with a tokenizer but no template route -------

SERVER_EXTRAS = ("fastapi", "sse_starlette", "starlette_context", "pydantic_settings")


@pytest.fixture(scope="module")
def llama_server(model_path, tmp_path_factory):
    missing = [m for m in SERVER_EXTRAS if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"llama-cpp-python's server needs its [server] extras ({', '.join(missing)}"
                    " missing): pip install 'llama-cpp-python[server]'")  # fmt: skip
    port = free_port()
    cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(model_path), "--model_alias",
           TEST_MODEL, "--n_ctx", str(TEST_CTX), "--n_threads", "2", "--host", "127.0.0.1",
           "--port", str(port)]  # fmt: skip
    log = tmp_path_factory.mktemp("llama_server") / "server.log"
    with open(log, "w") as out:  # a file, not a pipe: its load log would fill a pipe and stall
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited {proc.returncode}: {log.read_text()}")
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=2).close()
                break
            except OSError:
                threading.Event().wait(0.1)
        else:
            pytest.fail(f"llama_cpp.server did not start: {log.read_text()[-2000:]}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def test_llama_cpp_python_server(llama_server):
    eng = RemoteEngine(llama_server, "", TEST_MODEL, context_length=TEST_CTX, log=lambda _m: None)
    info = eng.info()
    assert (info["tokenizer"], info["chat_template"]) == ("server", "estimate")
    assert info["context_from"].startswith("settings")
    params = SamplingParams(max_tokens=16, stop=["."], **GREEDY)
    deltas, done = run(chat(eng, [Message("user", QUESTION)], params))
    assert "".join(deltas) == done.text and done.text and "." not in done.text
    assert done.stats.prompt_tokens > 0 and 0 < done.stats.completion_tokens <= 16
    with pytest.raises(ContextOverflowError) as e:
        run(chat(eng, [Message("user", "lighthouse keeper " * 700)], params))
    assert "estimate" in str(e.value)  # counted by its tokenizer, on a guess at its template
    eng.close()
