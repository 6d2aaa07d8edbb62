"""Plugins through real entry points: the bundled calculator (installed by `make`), and broken
plugins made on the fly as real distributions on PYTHONPATH."""

import json
import os

import pytest
from conftest import localai

from localai import plugins
from localai.tools import Tool


def test_bundled_calculator_is_loaded_through_its_entry_point():
    p = plugins.Plugins()
    info = {r["name"]: r for r in p.report()}
    assert info["calc"]["source"].startswith("localai-calc ")
    assert info["calc"]["hooks"] == ["localai_register_tools"] and not info["calc"]["errors"]
    assert info["builtin"]["source"] == "localai"
    tools = plugins.tools()
    assert {"calculator", "current_time"} <= set(tools)
    calc = tools["calculator"]
    assert calc.schema()["function"]["parameters"]["required"] == ["expression"]
    assert calc.call({"expression": "2*(3+4)**2"}) == "98"
    assert calc.call({"expression": "round(sqrt(2)/pi, 4)"}) == "0.4502"


@pytest.mark.parametrize(
    "expr, words",
    [
        ("__import__('os').system('true')", "not allowed"),
        ("9**9**9", "too large"),
        ("(1).__class__", "not allowed"),
        ("1/0", "division by zero"),
        ("2 +", "not an arithmetic"),
    ],
)
def test_calculator_refuses_what_is_not_arithmetic(expr, words):
    out = plugins.tools()["calculator"].call({"expression": expr})
    assert out.startswith("error:") and words in out


def test_tool_failure_is_returned_not_raised():
    t = Tool("boom", "fails", fn=lambda: 1 / 0)
    assert t.call({}).startswith("error: ZeroDivisionError")
    assert t.call({"unexpected": 1}).startswith("error: TypeError")


def make_dist(root, name, module_source):
    """A minimal installed distribution with a `localai` entry point, found via PYTHONPATH."""
    (root / f"{name}.py").write_text(module_source)
    info = root / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[localai]\n{name} = {name}\n")


def test_broken_plugins_are_reported_and_skipped(tmp_path, home):
    make_dist(tmp_path, "broken_import", "raise RuntimeError('cannot start')\n")
    make_dist(
        tmp_path,
        "broken_hook",
        "import pluggy\nhookimpl = pluggy.HookimplMarker('localai')\n"
        "@hookimpl\ndef localai_register_tools(register):\n    raise ValueError('bad tool')\n",
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    r = localai("plugins", "--json", env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    info = {p["name"]: p for p in out["plugins"]}
    assert "RuntimeError: cannot start" in info["broken_import"]["errors"][0]
    assert "ValueError: bad tool" in info["broken_hook"]["errors"][0]
    assert "calculator" in out["tools"]  # the healthy plugins still work
    r = localai("status", "--json", env=env)  # and other commands are unaffected
    assert r.returncode == 0, r.stderr
