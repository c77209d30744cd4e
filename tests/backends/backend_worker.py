"""A process that calls a once with ``across=`` when told to; the backend tests start several.

Usage: ``python backend_worker.py CONFIG_JSON``. It builds the backend, prints ``ready``, waits
for a line on stdin, awaits the once, and prints one JSON line: ``{"ok": result, ...}`` or
``{"error": type, "message": ...}``. The work appends ``start``/``end`` events to the log file
(one JSON object a line), from which the tests count the runs.
"""

from __future__ import annotations

import dataclasses
import datetime
import enum
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio

from fastapi_once import once
from fastapi_once.backends import Backend, fencing_token


def build_backend(spec: dict[str, Any], **options: Any) -> Backend:
    """Build the backend ``spec`` describes (see the ``spec`` fixture), with extra options.

    Only that backend's driver is imported, so the file backend needs neither.
    """
    kind = spec["kind"]
    if kind == "file":
        from fastapi_once.backends import FileLockBackend

        return FileLockBackend(spec["directory"], **options)
    if kind == "redis":
        from fastapi_once.backends import RedisBackend

        options = {"lease": spec["lease"], **options}
        return RedisBackend(spec["url"], namespace=spec["namespace"], **options)
    if kind == "mysql":
        from fastapi_once.backends import MySQLBackend

        return MySQLBackend(spec["url"], table=spec["table"], **options)
    from fastapi_once.backends import PostgresBackend

    return PostgresBackend(spec["dsn"], table=spec["table"], lock=spec["lock"], **options)


def append(log: Path, **event: Any) -> None:
    """Append one event to ``log`` in a single write, so that processes do not interleave."""
    line = json.dumps({"pid": os.getpid(), "t": time.time(), **event}) + "\n"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def count_starts(log: Path) -> int:
    """How many times the work has started, in every process so far."""
    return sum(1 for line in log.read_text().splitlines() if '"start"' in line)


class Channel(enum.Enum):
    STABLE = "stable"
    BETA = "beta"


@dataclasses.dataclass
class Release:
    """A typed result: followers must get this class back, not a dict."""

    version: tuple[int, int]
    at: datetime.datetime
    channel: Channel


RELEASE = Release(
    (1, 2), datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc), Channel.STABLE
)


def main() -> None:
    config = json.loads(sys.argv[1])
    log = Path(config["log"])
    backend = build_backend(config["spec"], **config.get("options", {}))
    ran = False

    async def work() -> Any:
        nonlocal ran
        ran = True
        append(log, event="start", fence=fencing_token())
        starts = count_starts(log)
        if config.get("fail_first") and starts == 1:
            append(log, event="fail")
            raise RuntimeError("the first run fails")
        first = starts == 1 and "first_sleep" in config
        await anyio.sleep(config["first_sleep"] if first else config.get("sleep", 0))
        append(log, event="end")
        return config.get("result")

    async def release() -> Release:
        nonlocal ran
        ran = True
        append(log, event="start", fence=fencing_token())
        await anyio.sleep(config.get("sleep", 0))
        append(log, event="end")
        return RELEASE

    fn = release if config.get("typed") else work
    fn.__qualname__ = config["name"]
    shared = once(fn, across=backend, name=config["name"])

    async def run() -> dict[str, Any]:
        try:
            if config.get("action") == "reset":
                await shared.reset()
                report: dict[str, Any] = {"ok": "reset"}
            elif config.get("typed"):
                got = await shared()
                parts = (got, got.version, got.at, got.channel)
                report = {"ok": [got == RELEASE, *(type(p).__name__ for p in parts)]}
            else:
                report = {"ok": await shared()}
        except Exception as exc:
            report = {"error": type(exc).__name__, "message": str(exc)}
        report["t"] = time.time()  # when this process learnt the outcome
        await backend.aclose()
        return {**report, "ran": ran}

    print("ready", flush=True)
    sys.stdin.readline()
    report = anyio.run(run, backend=config.get("loop", "asyncio"))
    print(json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
