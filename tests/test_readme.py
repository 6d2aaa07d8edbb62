"""The README's quick-start commands run as written (those that need no terminal)."""

import re
import shlex

from conftest import ROOT, localai


def quickstart_commands() -> list[list[str]]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- quickstart.*?-->\s*```sh\n(.*?)```", text, re.S)
    assert block, "README lost its quick-start block"
    cmds = []
    for line in block.group(1).splitlines():
        line = line.split("  #")[0].strip()
        if line:
            args = shlex.split(line)
            assert args[0] == "localai", line
            cmds.append(args[1:])
    return cmds


def test_readme_starts_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:400]
    assert "make run" in head and "make test" in head


def test_quickstart_commands_run(home):
    cmds = quickstart_commands()
    assert len(cmds) >= 3
    for args in cmds:
        r = localai(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert "Traceback" not in r.stderr
