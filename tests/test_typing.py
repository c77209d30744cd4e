"""Types of direct calls, checked by mypy --strict against a file of expected passes and errors."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "typing" / "cases.py"
# mypy's own cache, the one `mypy --strict fastapi_once` (lint, and CI's step before the tests)
# fills: the dependencies (FastAPI, Starlette, pydantic) are then read from it rather than
# checked again, while a changed cases.py or package module is checked afresh.
CACHE = Path(__file__).parent.parent / ".mypy_cache"


def test_direct_calls_have_exact_types() -> None:
    """An unkeyed once takes no arguments; a keyed once takes its key function's; T is kept."""
    api = pytest.importorskip("mypy.api", reason="mypy is part of the test extra")
    out, _err, _status = api.run(
        [
            *("--strict", "--cache-dir", str(CACHE)),
            *("--show-error-codes", "--no-error-summary", str(CASES)),
        ]
    )
    found: dict[int, str] = {}
    for line in out.splitlines():
        match = re.match(r".*cases\.py:(\d+): error: (.*)", line)
        if match:
            found[int(match[1])] = found.get(int(match[1]), "") + match[2]
    expected = {
        n: text.split("# E: ", 1)[1]
        for n, text in enumerate(CASES.read_text().splitlines(), start=1)
        if "# E: " in text
    }
    assert sorted(found) == sorted(expected), out
    for n, fragment in expected.items():
        assert fragment in found[n], (n, fragment, found[n])
