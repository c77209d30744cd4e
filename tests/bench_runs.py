"""Running a bench command from the tests: in a process group of its own, ended on timeout."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: The packages of the bench group that ``python -m bench`` (and bench.outage) import.
BENCH_PACKAGES = ("async_lru", "fastapi_singleton", "matplotlib", "uvicorn")


def skip_without(packages: tuple[str, ...], what: str) -> None:
    """Skip the test unless every one of ``packages`` is installed, saying what needs them."""
    missing = [name for name in packages if importlib.util.find_spec(name) is None]
    if missing:
        pytest.skip(f"{what} needs {', '.join(missing)}: pip install -e . --group bench")


def run_bench(
    args: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a bench command in a process group of its own; past ``timeout``, end the group
    (the bench's servers and apps too, which a timeout of the command alone would leave)."""
    with subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise
    return subprocess.CompletedProcess(args, proc.returncode, out, err)
