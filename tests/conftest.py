"""Shared fixtures: every anyio test runs on asyncio and on trio; a watchdog for hung tests."""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
from collections.abc import Iterator

import pytest
from timekeeping import FakeClock

# The interpreters the tests start (the multi-process tests' workers, uvicorn, pytest runs)
# cache what they compile, as Python does by default, even where the environment turns that
# off: otherwise each of them compiles the package anew.
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# pytest-timeout fails a test past its timeout by raising in the main thread. A hang that
# survives that (a task the event loop's shutdown cannot cancel, say) would hold the run until
# CI gives up on it: this long after the timeout the watchdog prints every thread's stack and
# ends the run. Under pytest-xdist it ends its worker process; the stacks still reach the
# terminal (capture is suspended first), xdist reports the test as crashed, and with
# --max-worker-restart 0 (pyproject.toml) that ends the run too.
WATCHDOG_GRACE = 120.0


def _give_up(item: pytest.Item, after: float) -> None:
    capture = item.config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=True)
    sys.stderr.write(f"\n{item.nodeid} still runs {after:.0f} s after it started; the stacks:\n")
    sys.stderr.flush()
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(1)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
    """Run the test under the watchdog: its timeout (as pytest-timeout reads it) plus
    WATCHDOG_GRACE."""
    marker = item.get_closest_marker("timeout")
    timeout = (
        float(marker.args[0]) if marker and marker.args else float(item.config.getini("timeout"))
    )
    after = timeout + WATCHDOG_GRACE
    watchdog = threading.Timer(after, _give_up, args=(item, after))
    watchdog.daemon = True
    watchdog.start()
    try:
        return (yield)
    finally:
        watchdog.cancel()


# What the README promises of every record of the "fastapi_once" logger.
LOG_FIELDS = ("once", "event", "duration_s", "error_type", "attempt")


class _FieldCheck(logging.Handler):
    """Notes the records of the package's logger that lack one of LOG_FIELDS."""

    def __init__(self) -> None:
        super().__init__()
        self.lacking: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not all(hasattr(record, name) for name in LOG_FIELDS):
            self.lacking.append(record.getMessage())


@pytest.fixture(autouse=True)
def log_records_carry_the_documented_fields() -> Iterator[None]:
    """Fail a test during which the package logged a record without the five extra fields (at
    the levels the test lets through)."""
    check = _FieldCheck()
    logger = logging.getLogger("fastapi_once")
    logger.addHandler(check)
    try:
        yield
    finally:
        logger.removeHandler(check)
    assert not check.lacking, f"records without the fields {LOG_FIELDS}: {check.lacking}"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    """Run each ``@pytest.mark.anyio`` test on both backends."""
    return str(request.param)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Replace the clock of expiry, refresh and cooldown with one the test moves."""
    from fastapi_once import _clock

    fake = FakeClock()
    monkeypatch.setattr(_clock, "monotonic", fake)
    return fake
