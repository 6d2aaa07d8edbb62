"""`--engine torch` and `localai perplexity` through the real command, in subprocesses."""

import json
import os
from pydoc_data.topics import topics

import pytest
from conftest import TEST_MODEL, localai


@pytest.fixture
def env(home):
    return dict(os.environ)


def test_run_torch_json_stats_and_kv_bits(env):
    r = localai("run", "Say hello.", "--model", TEST_MODEL, "--engine", "torch", "-t", "0",
                "--max-tokens", "8", "--ctx", "2048", "--kv-bits", "4", "--v-bits", "2",
                "--json", "--no-daemon", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    st = out["stats"]
    assert out["text"].strip() and 0 < st["completion_tokens"] <= 8
    for key in ("tokens_per_s", "ttft_s", "kv_bytes", "peak_rss_bytes"):
        assert st[key] > 0, key
    # 4-bit K, 2-bit V pages (0.2) + a 384-token fp16 buffer (K groups of 256) and the 256
    # newest quantized tokens held in fp16 (0.31), against fp16 for all 2,048 tokens
    assert st["kv_bytes"] < 0.55 * 30 * 3 * 64 * 2 * 2 * 2048
    assert "Traceback" not in r.stderr and "llama_context" not in r.stderr


def test_run_torch_sparse_attention_stats_and_bad_budgets(env):
    """A prompt past the attention budget, read within it too (its pages partly on disk): the
    answer comes with what its steps read."""
    prompt = "Summarize this text:\n\n" + topics["assignment"][:4000]
    r = localai("run", prompt, "--model", TEST_MODEL, "--engine", "torch", "-t", "0",
                "--max-tokens", "4", "--ctx", "2048", "--attn-budget", "25%", "--kv-budget",
                "14M", "--sparse-prefill", "--json", "--no-daemon", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)["stats"]
    assert st["prompt_tokens"] > 512 and st["attn_sparse_steps"] >= 1
    # the KV budget: the cache's RAM under 14 MiB, the rest of its pages on disk
    assert st["kv_resident_bytes"] <= 14 << 20 and st["kv_offloaded_bytes"] > 0
    assert st["kv_disk_bytes_read_per_token"] >= 0
    assert 3 <= st["attn_pages_selected"] <= 512 // 16 and st["kv_resident_bytes"] > 0
    fp16_all = 30 * 3 * 64 * 2 * 2 * st["prompt_tokens"]  # dense: every token's K and V
    assert 0 < st["kv_bytes_read_per_token"] < 0.7 * fp16_all
    for budget, says in (("5%", "below 512 tokens"), ("many", "is tokens (4096, 4K)")):
        r = localai("run", "Hi", "--model", TEST_MODEL, "--engine", "torch", "--ctx", "2048",
                    "--attn-budget", budget, "--no-daemon", env=env)  # fmt: skip
        assert r.returncode != 0 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = localai("run", "Hi", "--model", TEST_MODEL, "--attn-budget", "4K", "--no-daemon", env=env)
    assert r.returncode != 0 and "needs --engine torch" in r.stderr, r.stderr
    r = localai("run", "Hi", "--model", TEST_MODEL, "--engine", "torch", "--kv-budget", "64M",
                "--no-daemon", env=env)  # fmt: skip
    assert r.returncode != 0 and "needs an attention budget" in r.stderr, r.stderr


def test_run_torch_streams_and_refuses_overflow(env):
    r = localai("run", "--model", TEST_MODEL, "--engine", "torch", "-t", "0", "--max-tokens", "6",
                "--no-daemon", input="Say hello.", env=env)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() and "tok/s" in r.stderr
    r = localai("run", "word " * 700, "--model", TEST_MODEL, "--engine", "torch", "--ctx", "512",
                "--no-daemon", env=env)  # fmt: skip
    assert r.returncode == 1 and "model context is 512" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_perplexity_command_both_engines(env, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text(topics["assignment"][:1800])
    rows = {}
    for engine in ("llama", "torch"):
        r = localai("perplexity", str(text), "--model", TEST_MODEL, "--engine", engine, "--ctx",
                    "256", "--threads", "1", "--json", env=env)  # fmt: skip
        assert r.returncode == 0, r.stderr
        rows[engine] = json.loads(r.stdout)
    for row in rows.values():
        assert set(row) >= {"ppl", "tokens", "seconds"} and 1 < row["ppl"] < 1000
    assert rows["llama"]["tokens"] == rows["torch"]["tokens"] > 250
    assert abs(rows["torch"]["ppl"] / rows["llama"]["ppl"] - 1) < 0.03
