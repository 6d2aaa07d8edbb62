"""The repository on its own: a clone with nothing beside it has everything the tests read."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_openai_schemas_ship_with_the_tests(tmp_path):
    """The tests validate bodies against schemas kept in tests/data, with no folder beside the
    clone."""
    clone = tmp_path / "clone"
    shutil.copytree(TESTS, clone / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    code = (
        "import jsonschema, openai_schema\n"
        "openai_schema.check('ErrorResponse', {'error': {'message': 'm', 'type': 't', "
        "'param': None, 'code': None}})\n"
        "try:\n"
        "    openai_schema.check('ErrorResponse', {'error': 'a string'})\n"
        "except jsonschema.ValidationError:\n"
        "    print('refused')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], cwd=clone / "tests", capture_output=True,
                       text=True, timeout=120)  # fmt: skip
    assert r.returncode == 0 and r.stdout.strip() == "refused", r.stderr[-2000:]
    licence = (TESTS / "data" / "openai-openapi" / "LICENSE").read_text()
    assert "MIT License" in licence and "Copyright (c) OpenAI" in licence
