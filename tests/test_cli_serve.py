"""`localai serve` flags and `localai run` going through a running daemon."""

from __future__ import annotations

import json
import os
import stat

from conftest import TEST_MODEL, localai


def test_print_token_creates_a_private_token_once(home):
    first = localai("serve", "--print-token")
    assert first.returncode == 0, first.stderr
    token = first.stdout.strip()
    assert len(token) >= 32
    assert stat.S_IMODE((home / "token").stat().st_mode) == 0o600
    assert localai("serve", "--print-token").stdout.strip() == token


def test_no_token_on_a_public_address_is_refused(home):
    r = localai("serve", "--host", "0.0.0.0", "--no-auth", "--model", TEST_MODEL)
    assert r.returncode == 1 and "refusing to serve on 0.0.0.0 without a token" in r.stderr
    assert "Traceback" not in r.stderr


def test_run_uses_the_daemon_when_one_is_up(daemon):
    env = dict(os.environ, LOCALAI_HOME=str(daemon.home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    env.pop("LOCALAI_MODEL", None)
    daemon.wait_idle()
    before = daemon.health()["served"]
    args = ("run", "Say hello.", "-t", "0", "--max-tokens", "4", "--json")
    r = localai(*args, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert daemon.wait_idle()["served"] == before + 1  # answered by the daemon
    assert out["model"] == TEST_MODEL and out["text"]
    assert out["stats"]["completion_tokens"] == 4 and out["stats"]["finish_reason"] == "length"
    local = localai(*args, "--no-daemon", "--model", TEST_MODEL, "--ctx", "1024", env=env)
    assert local.returncode == 0, local.stderr
    mine = json.loads(local.stdout)
    assert daemon.health()["served"] == before + 1  # --no-daemon loaded the model here
    assert mine.keys() == out.keys() and mine["stats"].keys() == out["stats"].keys()
    assert mine["text"] == out["text"]  # greedy: same model, same prompt, same answer
    over = localai("run", "word " * 1200, env=env)
    assert over.returncode == 1 and "model context is 1,024" in over.stderr


def test_ask_without_documents_says_so(home):
    r = localai("ask", "What is in my notes?", "--model", TEST_MODEL, "--no-daemon")
    assert r.returncode == 1 and "no documents are indexed" in r.stderr
    assert "Traceback" not in r.stderr


def test_ask_through_the_daemon(daemon):
    env = dict(os.environ, LOCALAI_HOME=str(daemon.home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    q = "Who built the Brightwater lighthouse, and when?"
    r = localai("ask", q, "--json", "-k", "2", "-t", "0", "--max-tokens", "48", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["answer"] and "Sources:" not in out["answer"]
    assert out["stats"]["sources"]["used"] >= 1 and out["stats"]["completion_tokens"] > 0
    st = out["stats"]  # where the prompt's KV came from, through the daemon too
    assert st["prefill_tokens"] + st["cached_tokens"] == st["prompt_tokens"] and st["ttft_s"] > 0
    assert sum(st["cached_from"].values()) == st["cached_tokens"]
    for c in out["citations"]:
        assert c.keys() >= {"path", "start_line", "end_line", "quote", "verified"}
    text = localai("ask", q, "-t", "0", "--max-tokens", "48", "--source", str(daemon.docs),
                   env=env)  # fmt: skip
    assert text.returncode == 0 and "Sources:" in text.stdout
    assert "reading" in text.stderr and "lighthouse.md" in text.stderr  # before the answer


def test_ask_layout_goes_through_the_daemon(daemon):
    env = dict(os.environ, LOCALAI_HOME=str(daemon.home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    args = ("ask", "Who built the Brightwater lighthouse?", "--json", "-k", "2", "-t", "0",
            "--max-tokens", "2")  # fmt: skip
    prompt = {}
    for layout in ("system", "oneshot"):
        r = localai(*args, "--layout", layout, env=env)
        assert r.returncode == 0, r.stderr
        prompt[layout] = json.loads(r.stdout)["stats"]["prompt_tokens"]
    assert prompt["oneshot"] > prompt["system"]  # the example exchange was sent
    bad = localai(*args, "--layout", "sideways", env=env)
    assert bad.returncode == 2 and "'system', 'oneshot'" in bad.stderr


def test_status_shows_the_running_daemon(daemon):
    env = dict(os.environ, LOCALAI_HOME=str(daemon.home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    r = localai("status", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["daemon"] == {"url": daemon.url, "model": TEST_MODEL}


def test_search_through_the_daemon(daemon, tmp_path):
    """POST /localai/search answers from the daemon's index, and `localai search` uses it. The
    CLI runs in an empty home holding a copy of the daemon's token: only the daemon's index can
    hold the passage."""
    import shutil

    home = tmp_path / "empty-home"
    home.mkdir()
    shutil.copy(daemon.home / "token", home / "token")
    env = dict(os.environ, LOCALAI_HOME=str(home), LOCALAI_HOST=daemon.host,
               LOCALAI_PORT=str(daemon.port))  # fmt: skip
    q = "Who built the Brightwater lighthouse?"
    status, body = daemon.request("POST", "/localai/search", {"query": q, "k": 2})
    assert status == 200, body
    hits = body["hits"]
    assert 1 <= len(hits) <= 2 and hits[0]["verified"] and "lighthouse" in hits[0]["text"].lower()
    assert hits[0].keys() >= {"path", "start_line", "end_line", "score", "text", "where"}
    r = localai("search", q, "-k", "2", "--json", env=env)
    assert r.returncode == 0, r.stderr
    assert [h["chunk_id"] for h in json.loads(r.stdout)] == [h["chunk_id"] for h in hits]
    r = localai("search", q, "-k", "2", "--mode", "bm25", env=env)  # printed, from the daemon
    assert r.returncode == 0 and "1. " in r.stdout and "lighthouse" in r.stdout.lower(), r.stderr
    r = localai("search", q, "--json", "--under", str(daemon.docs), env=env)
    assert r.returncode == 0 and json.loads(r.stdout), r.stderr
    r = localai("search", q, "--json", "--under", str(tmp_path), env=env)
    assert r.returncode == 0 and json.loads(r.stdout) == [], r.stderr
    local = localai("search", q, "--no-daemon", "--mode", "bm25", env=env)  # this empty home
    assert local.returncode == 0 and "the index is empty" in local.stderr, local.stderr
    for bad in ({"query": ""}, {"query": q, "k": 0}, {"query": q, "unit": "page"},
                {"q": q}, {"query": q, "k": 3, "x": 1}, {"query": q, "under": "~\u0000x"},
                {"query": q, "under": "~no-such-user-here/notes"}):  # fmt: skip
        status, body = daemon.request("POST", "/localai/search", bad)
        assert status == 400, (bad, body)
    status, body = daemon.request("POST", "/localai/search", {"query": q}, token="wrong")
    assert status == 401
    raw = b'{"query": "lighthouse \\ud800 keeper", "k": 2.0}'  # a lone surrogate; k a float
    status, body = daemon.request("POST", "/localai/search", raw=raw)
    assert status == 200 and body["hits"], body
