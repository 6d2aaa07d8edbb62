"""Memory that gives itself back, on a real `localai serve` with SmolLM2: idle unloads after
`keep_alive` (and the reload that follows), `keep_alive: 0` per request, `localai ps` / `localai
stop`, and a simulated pressure signal (a meminfo file reporting low MemAvailable) that makes the
governor shrink while a streaming answer completes. Waits are bounded polls; nothing asserts
on speed."""

from __future__ import annotations

import json
import os
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

import ollama
import openai
import pytest
from conftest import TEST_MODEL, localai
from daemon_helpers import start_daemon, write_docs

from localai.durations import parse_duration

pytestmark = pytest.mark.slow
PLENTY = "MemTotal:       16000000 kB\nMemAvailable:   12000000 kB\n"
SCARCE = "MemTotal:       16000000 kB\nMemAvailable:      50000 kB\n"


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def wait_for(cond, what: str, tries: int = 300, every: float = 0.1):
    for _ in range(tries):
        got = cond()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}")


def clients(d):
    oc = ollama.Client(host=d.url, headers=d.headers())
    ai = openai.OpenAI(base_url=d.url + "/v1", api_key=d.token, max_retries=0)
    return oc, ai


def cli_env(d) -> dict:
    return dict(os.environ, LOCALAI_HOME=str(d.home), LOCALAI_MODELS=os.environ["LOCALAI_MODELS"],
                LOCALAI_HOST=d.host, LOCALAI_PORT=str(d.port))  # fmt: skip


def test_durations_as_ollama_writes_them():
    assert parse_duration("5m") == 300 and parse_duration("30s") == 30
    assert parse_duration("1h30m") == 5400 and parse_duration("300ms") == 0.3
    assert parse_duration(120) == 120 and parse_duration("45") == 45 and parse_duration(0) == 0
    assert parse_duration(-1) is None and parse_duration("-1m") is None
    for bad in ("5 minutes", "", "m", True):
        with pytest.raises(ValueError):
            parse_duration(bad)


def test_idle_model_unloads_and_the_next_request_reloads_it(home, models_dir):
    with start_daemon(home, models_dir, TEST_MODEL, "--keep-alive", "2s") as d:
        oc, ai = clients(d)
        assert [m.model for m in oc.ps().models] == [TEST_MODEL]
        loaded = rss_bytes(d.proc.pid)
        wait_for(lambda: not oc.ps().models, "the idle unload", tries=600)
        unloaded = rss_bytes(d.proc.pid)
        assert unloaded < loaded - 50 * 2**20, (loaded, unloaded)  # weights 94 MiB + KV 22 MiB
        r = oc.generate(model=TEST_MODEL, prompt="Say hello.", options={"num_predict": 4})
        assert r.response and r.done and r.load_duration > 0
        assert [m.model for m in oc.ps().models] == [TEST_MODEL]
        wait_for(lambda: not oc.ps().models, "the second idle unload", tries=600)
        c = ai.chat.completions.create(model=TEST_MODEL, max_tokens=4, extra_body={"stats": True},
                                       messages=[{"role": "user", "content": "Hi"}])  # fmt: skip
        assert c.choices[0].message.content and c.model_extra["stats"]["load_s"] > 0
        assert "unloaded smollm2-135m (idle for 2s)" in d.log.read_text()


def test_keep_alive_per_request(home, models_dir):
    with start_daemon(home, models_dir, TEST_MODEL) as d:  # the default: 5 minutes
        oc, ai = clients(d)
        (m,) = oc.ps().models
        left = (m.expires_at - datetime.now(UTC)).total_seconds()
        assert 200 < left <= 300 and m.size_vram == 0 and m.size > 90e6
        r = oc.generate(model=TEST_MODEL, prompt="Hi", keep_alive=0, options={"num_predict": 3})
        assert r.done and r.response
        wait_for(lambda: not oc.ps().models, "the unload after a keep_alive 0 request")
        # OpenAI clients set it with an extension field, as Ollama's requests do
        c = ai.completions.create(model=TEST_MODEL, prompt="One, two,", max_tokens=3,
                                  extra_body={"keep_alive": "1h", "stats": True})  # fmt: skip
        assert c.choices[0].text and c.model_extra["stats"]["load_s"] > 0
        (m,) = oc.ps().models
        assert 3000 < (m.expires_at - datetime.now(UTC)).total_seconds() <= 3600
        oc.chat(model=TEST_MODEL, messages=[], keep_alive=-1)  # load / keep forever
        assert oc.ps().models[0].expires_at.year > 2100
        # `ollama stop`'s request: nothing to generate, keep_alive 0 → unloaded before the answer
        r = oc.generate(model=TEST_MODEL, prompt="", keep_alive=0)
        assert r.done_reason == "unload" and not oc.ps().models
        status, body = d.request("POST", "/api/chat", {"model": TEST_MODEL, "keep_alive": "soon",
                                                       "messages": []})  # fmt: skip
        assert status == 400 and "keep_alive" in body["error"]


def test_localai_ps_and_stop(home, models_dir):
    with start_daemon(home, models_dir, TEST_MODEL) as d:
        env = cli_env(d)
        r = localai("ps", env=env)
        assert r.returncode == 0, r.stderr
        assert TEST_MODEL in r.stdout and "minutes from now" in r.stdout and "weights" in r.stdout
        r = localai("status", "--json", env=env)
        mem = json.loads(r.stdout)["memory"]
        assert mem["holders"]["weights"] > 0 and mem["budget_bytes"] > 0 and "pressure" in mem
        r = localai("stop", TEST_MODEL, env=env)
        assert r.returncode == 0 and "unloaded" in r.stdout, r.stderr
        r = localai("ps", "--json", env=env)
        assert json.loads(r.stdout)["models"] == []
        r = localai("stop", "no-such-model", env=env)
        assert r.returncode == 1 and "no-such-model" in r.stderr
        r = localai("stop", env=env)
        assert r.returncode == 0 and "stopped" in r.stdout, r.stderr
        assert d.proc.wait(timeout=30) == 0
        with socket.socket() as s:  # the port is free again, for a new `localai serve`
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as daemon.bind does
            s.bind((d.host, d.port))
        assert "no localai daemon" in localai("stop", env=env).stdout


def test_pressure_shrinks_caches_while_a_stream_completes(home, models_dir, tmp_path, monkeypatch):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(PLENTY)
    monkeypatch.setenv("LOCALAI_MEMINFO_PATH", str(meminfo))
    monkeypatch.setenv("LOCALAI_PSI_PATH", str(tmp_path / "no-psi"))
    monkeypatch.setenv("LOCALAI_PRESSURE_INTERVAL", "0.2s")
    docs = write_docs(tmp_path / "docs")
    with start_daemon(home, models_dir, TEST_MODEL, "--keep-alive=-1", docs=docs) as d:
        oc, ai = clients(d)
        ai.chat.completions.create(model=TEST_MODEL + "+docs", max_tokens=4, messages=[
            {"role": "user", "content": "Who built the Brightwater lighthouse?"}])  # fmt: skip
        mem = d.request("GET", "/localai/status")[1]["memory"]
        assert mem["holders"]["passage_cache"] > 0 and mem["last_pressure"] is None
        assert mem["holders"]["prompt_prefixes"] > 0  # the RAG head's KV snapshot
        stream = ai.completions.create(model=TEST_MODEL, prompt="1, 2, 3, 4, 5, 6,",
                                       max_tokens=200, temperature=0, stream=True)  # fmt: skip
        chunks = [next(stream)]
        meminfo.write_text(SCARCE)  # the rest of the laptop wants memory now
        chunks += list(stream)
        ended = time.time()
        assert chunks[-1].choices[0].finish_reason == "length"
        assert "".join(c.choices[0].text for c in chunks)

        def events():
            return d.request("GET", "/localai/status")[1]["memory"]["pressure_events"]

        got = wait_for(lambda: [e for e in events() if "model" in e["freed"]], "the idle unload")
        first = events()[0]
        assert "passage_cache" in first["freed"] and "model" not in first["freed"]
        assert "prompt_prefixes" in first["freed"]
        assert first["at"] < got[0]["at"]  # caches first, the model only once it was idle
        assert got[0]["at"] >= ended - 1.0  # never while the stream ran (1 s for clock skew)
        assert not oc.ps().models
        assert "memory pressure (" in d.log.read_text()
        meminfo.write_text(PLENTY)
        r = oc.generate(model=TEST_MODEL, prompt="Say hello.", options={"num_predict": 3})
        assert r.response and r.load_duration > 0


def test_a_daemon_the_tui_starts_exits_once_unused(home, models_dir, monkeypatch):
    """After the TUI quits, its daemon unloads the model (keep_alive), then exits (idle exit);
    what holds the port afterwards is nothing."""
    from daemon_helpers import free_port
    from localai_tui.connect import find_or_start

    from localai.config import load_settings

    port = free_port()
    monkeypatch.setenv("LOCALAI_PORT", str(port))
    monkeypatch.setenv("LOCALAI_KEEP_ALIVE", "1s")
    monkeypatch.setenv("LOCALAI_DAEMON_IDLE_EXIT", "4s")
    ep = find_or_start(load_settings(), TEST_MODEL, ["--ctx", "1024", "--threads", "2"])
    assert ep.model == TEST_MODEL

    def port_free() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return False
        except OSError:
            return True

    wait_for(port_free, "the idle daemon to exit", tries=600)
    log = (home / "logs" / "daemon.log").read_text()
    assert "unloaded smollm2-135m (idle for 1s)" in log and "no requests for 4s: exiting" in log


def test_the_tui_memory_pane_counts_down_to_the_unload(home, models_dir, tmp_path):
    import asyncio

    from localai_tui.app import LocalaiApp
    from localai_tui.client import DaemonClient
    from localai_tui.store import Store

    with start_daemon(home, models_dir, TEST_MODEL, "--keep-alive", "4s") as d:

        async def go():
            app = LocalaiApp(DaemonClient(d.url, d.token), Store(tmp_path / "c.db"), d.model)
            async with app.run_test(size=(120, 40)) as pilot:
                seen = []
                for _ in range(300):  # bounded: the pane refreshes every 2 s
                    await pilot.pause(0.1)
                    text = str(app.query_one("#memory-text").render())
                    if not seen or seen[-1] != text:
                        seen.append(text)
                    if "unloaded (loads again" in text:
                        break
                assert any(f"{TEST_MODEL}  loaded, unloads in " in t for t in seen), seen
                assert "unloaded (loads again" in seen[-1], seen

        asyncio.run(go())
