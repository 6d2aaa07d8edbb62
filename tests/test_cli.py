"""The real `localai` command in subprocesses, with an isolated LOCALAI_HOME."""

import json
import os
import re

import pytest
from conftest import TEST_MODEL, localai

from localai import __version__


@pytest.fixture
def env(home):
    return dict(os.environ)


def test_version():
    r = localai("--version")
    assert r.returncode == 0 and __version__ in r.stdout


def test_run_json_shape(env):
    r = localai("run", "Say hello.", "--model", TEST_MODEL, "--temperature", "0", "--max-tokens",
                "8", "--ctx", "1024", "--json", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["model"] == TEST_MODEL and out["text"].strip()
    st = out["stats"]
    for key in ("prompt_tokens", "completion_tokens", "ttft_s", "tokens_per_s", "finish_reason"):
        assert key in st, key
    assert 0 < st["completion_tokens"] <= 8 and st["finish_reason"] in ("stop", "length")


def test_run_streams_text_and_reads_stdin(env):
    r = localai("run", "--model", TEST_MODEL, "-t", "0", "--max-tokens", "8", "--seed", "1",
                input="Say hello.", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr


def test_run_overflow_is_a_message_not_a_traceback(env):
    r = localai("run", "word " * 1200, "--model", TEST_MODEL, "--ctx", "512", env=env)
    assert r.returncode == 1
    assert "Error:" in r.stderr and "model context is 512" in r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_model_and_engine_errors(env):
    r = localai("run", "hi", "--model", "no-such-model", env=env)
    assert r.returncode == 1 and "unknown model 'no-such-model'" in r.stderr
    r = localai("run", "hi", "--model", TEST_MODEL, "--engine", "torch", "--kv-bits", "3", env=env)
    assert r.returncode == 2 and "--kv-bits" in r.stderr  # the torch runner itself: test_cli_torch


def test_models_list_path_status(env, models_dir):
    r = localai("models", "list", "--json", env=env)
    rows = {m["name"]: m for m in json.loads(r.stdout)}
    assert rows[TEST_MODEL]["installed"] is True and rows[TEST_MODEL]["license"] == "Apache-2.0"
    r = localai("models", "list", env=env)
    assert TEST_MODEL in r.stdout and "licence" in r.stdout
    r = localai("models", "path", TEST_MODEL, env=env)
    assert r.stdout.strip().startswith(str(models_dir)) and r.stdout.strip().endswith(".gguf")
    r = localai("status", "--json", env=env)
    st = json.loads(r.stdout)
    assert st["home"] == env["LOCALAI_HOME"] and TEST_MODEL in st["models"]
    assert st["memory"]["budget_bytes"] > 0
    r = localai("status", env=env)
    assert "RAM budget" in r.stdout


def test_home_flag_and_config_file(tmp_path, env):
    h = tmp_path / "other"
    h.mkdir()
    (h / "config.toml").write_text('threads = 1\nmodel = "smollm2-135m"\n')
    env = {k: v for k, v in env.items() if k != "LOCALAI_HOME"}
    st = json.loads(localai("--home", str(h), "status", "--json", env=env).stdout)
    assert st["home"] == str(h) and st["settings"]["threads"] == 1
    assert st["settings"]["model"] == "smollm2-135m"
    (h / "config.toml").write_text("threads = 'x'\n")
    r = localai("--home", str(h), "status", env=env)
    assert r.returncode == 1 and "threads" in r.stderr


def test_chat_keeps_history_until_reset(env):
    script = "My name is Ada.\nWhat is my name?\n/reset\n/nope\nWhat is my name?\n"
    r = localai("chat", "--model", TEST_MODEL, "-t", "0", "--max-tokens", "16", input=script,
                env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "conversation cleared" in r.stderr and "unknown command /nope" in r.stderr
    assert r.stdout.count(">>> ") == 6
    in_context = [int(n) for n in re.findall(r"(\d+) in context", r.stderr)]
    first, second, after_reset = in_context
    assert second > first + 10  # the second turn carries the first question and answer
    assert after_reset < second
