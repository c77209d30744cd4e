"""A process calling a keyed once with ``across=`` on command; the fleet tests start several.

Usage: ``python keyed_worker.py CONFIG_JSON``. It builds the backend and the once
``get_stuff(url)``, prints ``ready``, then runs one command per line of stdin and prints one
JSON line per command:

- ``{"call": [url, ...], "each": n}``: n concurrent callers per url, all at once; replies
  ``{"results": [[outcome of each caller] per url]}``, an outcome being ``{"ok": value}`` or
  ``{"error": type, "message": ...}``.
- ``{"reset": url}`` (``null``: every key): ``await get_stuff.reset(...)``; replies
  ``{"ok": "reset"}``.

With ``"unkeyed": true`` in the config the once is unkeyed (its url is always ``"one"``).

The function appends ``start``/``end`` events with the url to the log file (one JSON object a
line), from which the tests count the runs per key. Its value is a ``Stuff`` (a dataclass of a
tuple and a datetime), so that the typed round trip is checked too; ``run`` is the how-manieth
run of that url it was, fleet-wide.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import sys
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from backend_worker import append, build_backend

from fastapi_once import once

AT = datetime.datetime(2026, 11, 25, 12, 0, tzinfo=datetime.timezone.utc)


@dataclasses.dataclass
class Stuff:
    """What get_stuff returns: followers must get this class back, not a dict."""

    url: str
    run: int
    span: tuple[int, int]
    at: datetime.datetime
    pad: str = ""


def runs_of(log: Path, url: str) -> int:
    """How many runs of ``url`` have started, in every process so far."""
    if not log.exists():
        return 0
    events = (json.loads(line) for line in log.read_text().splitlines() if line.strip())
    return sum(1 for e in events if e["event"] == "start" and e["url"] == url)


def outcome(value: Any) -> dict[str, Any]:
    if isinstance(value, BaseException):
        return {"error": type(value).__name__, "message": str(value)}
    assert type(value) is Stuff
    assert type(value.span) is tuple
    assert type(value.at) is AT.__class__
    return {"ok": {"url": value.url, "run": value.run, "bytes": len(value.pad)}}


def main() -> None:
    config = json.loads(sys.argv[1])
    log = Path(config["log"])
    backend = build_backend(config["spec"], **config.get("backend", {}))
    sleeps = {int(k): v for k, v in config.get("sleeps", {}).items()}  # by run number
    fails = config.get("fail", {})  # url -> run numbers that raise

    async def get_stuff(url: str) -> Stuff:
        run = runs_of(log, url) + 1
        append(log, event="start", url=url, run=run)
        await anyio.sleep(sleeps.get(run, config.get("sleep", 0.2)))
        if run in fails.get(url, []):
            append(log, event="fail", url=url)
            raise RuntimeError(f"fetching {url} failed: token=hunter2")
        append(log, event="end", url=url)
        pad = "x" * config.get("pad", {}).get(url, 0)
        return Stuff(url, run, (run, run + 1), AT, pad)

    unkeyed = config.get("unkeyed", False)  # an unkeyed once whose url is always "one"

    async def get_one() -> Stuff:
        return await get_stuff("one")

    shared: Any = (
        once(get_one, across=backend, name=config["name"], **config.get("once", {}))
        if unkeyed
        else once(
            get_stuff,
            key=lambda url: url,
            across=backend,
            name=config["name"],
            **config.get("once", {"ttl": 60}),
        )
    )

    async def serve() -> None:
        while True:
            line = await anyio.to_thread.run_sync(sys.stdin.readline)
            if not line:
                break
            command = json.loads(line)
            if "call" in command:
                results: list[list[dict[str, Any]]] = []
                got: dict[tuple[int, int], Any] = {}

                async def call(i: int, j: int, url: str, got: dict[Any, Any] = got) -> None:
                    try:
                        got[i, j] = await (shared() if unkeyed else shared(url))
                    except Exception as exc:
                        got[i, j] = exc

                async with anyio.create_task_group() as tg:
                    for i, url in enumerate(command["call"]):
                        for j in range(command.get("each", 1)):
                            tg.start_soon(call, i, j, url)
                for i in range(len(command["call"])):
                    results.append([outcome(got[i, j]) for j in range(command.get("each", 1))])
                reply: dict[str, Any] = {"results": results}
            else:
                await shared.reset(*([] if command["reset"] is None else [command["reset"]]))
                reply = {"ok": "reset"}
            print(json.dumps(reply), flush=True)
        await backend.aclose()

    print("ready", flush=True)
    anyio.run(serve)


if __name__ == "__main__":
    main()
