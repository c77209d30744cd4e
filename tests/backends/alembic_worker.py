"""App processes whose lifespan upgrades the database with fastapi_once.alembic.

This process imports everything and prints ``ready``; then, for each line it reads from stdin,
JSON ``{"n": n, "gate": dir or null, "spec": {"project": dir, "url": sqlalchemy_url, "locks":
dir or null, "loop": "asyncio" or "trio", "per_revision": bool}}``, it forks ``n`` app processes
at once (so that they start together without paying for the imports each time, and read the
scripts as they are then), with ``$GATE`` set to ``gate``. Each builds the once, runs its app's
startup and shutdown, and writes one JSON line: ``{"pid": pid, "ok": heads}`` or ``{"pid": pid,
"error": type, "message": text}``; for a child killed by a signal this process writes ``{"pid":
pid, "killed": signal}``. When every child has ended it writes ``done``. It exits at the end of
stdin.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import anyio
from alembic_project import config_of
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from fastapi_once import once_lifespan
from fastapi_once.alembic import upgrade
from fastapi_once.backends import FileLockBackend

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup


def app_process(spec: dict[str, Any]) -> dict[str, Any]:
    """Start and stop one app whose lifespan runs the upgrade; say how it went."""
    config = config_of(Path(spec["project"]), spec["url"], spec.get("per_revision", False))
    across = FileLockBackend(spec["locks"]) if spec.get("locks") else None
    migrate = upgrade(config, across=across)
    app = FastAPI(lifespan=once_lifespan(migrate))

    async def start() -> list[str]:
        async with LifespanManager(app, startup_timeout=60, shutdown_timeout=10):
            return await migrate()

    try:
        return {"ok": anyio.run(start, backend=spec.get("loop", "asyncio"))}
    except BaseException as exc:
        while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]  # trio's nursery around the lifespan's error
        return {"error": type(exc).__name__, "message": str(exc)}


def main() -> None:
    print("ready", flush=True)
    for line in sys.stdin:
        launch: dict[str, Any] = json.loads(line)
        children = []
        for _ in range(launch["n"]):
            pid = os.fork()
            if pid == 0:
                if launch["gate"]:
                    os.environ["GATE"] = launch["gate"]
                report = {"pid": os.getpid(), **app_process(launch["spec"])}
                os.write(1, (json.dumps(report) + "\n").encode())
                os._exit(0)
            children.append(pid)
        for pid in children:
            _, status = os.waitpid(pid, 0)
            if os.WIFSIGNALED(status):
                print(json.dumps({"pid": pid, "killed": os.WTERMSIG(status)}), flush=True)
        print("done", flush=True)


if __name__ == "__main__":
    main()
