"""End to end: ``uvicorn --workers 2`` runs a once-per-deployment task once in total."""

from __future__ import annotations

import http.client
import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from backend_servers import HERE, ROOT, free_port, read_log

WORKERS = 2  # more workers would each be one more interpreter that imports the app


def get(port: int) -> dict[str, Any] | None:
    """One request on a new connection (so the kernel may hand it to any worker)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        if response.status != 200:
            return None
        body: dict[str, Any] = json.loads(response.read())
        return body
    except OSError:
        return None
    finally:
        conn.close()


@pytest.mark.timeout(90)
@pytest.mark.kinds("file")  # the lease algorithm is the same on every store
def test_uvicorn_workers_run_the_deployment_task_once_in_total(
    kind: str, spec: dict[str, Any], tmp_path: Path
) -> None:
    """Every worker serves the task's result; the task itself ran in one process only."""
    log = tmp_path / "events.log"
    config = {"spec": spec, "log": str(log), "name": f"tests.e2e.migrate@{secrets.token_hex(4)}"}
    port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "uvicorn", "e2e_app:app", "--app-dir", str(HERE)),
            *("--host", "127.0.0.1", "--port", str(port), "--workers", str(WORKERS)),
            "--no-access-log",
        ],
        env={**os.environ, "PYTHONPATH": str(ROOT), "FASTAPI_ONCE_E2E": json.dumps(config)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    pids: set[int] = set()
    try:
        deadline = time.monotonic() + 40
        while len(pids) < WORKERS and time.monotonic() < deadline:
            assert server.poll() is None, f"uvicorn exited: {server.communicate()[1][-3000:]}"
            body = get(port)
            if body is None:
                time.sleep(0.05)
                continue
            assert body["schema"] == {"schema": 3}
            pids.add(body["pid"])
    finally:
        server.send_signal(signal.SIGINT)
        try:
            _, errors = server.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            _, errors = server.communicate()
    assert len(pids) == WORKERS, f"served by {sorted(pids)} only; uvicorn said: {errors[-3000:]}"
    events = read_log(log)
    assert [e["event"] for e in events] == ["start", "end"], events
    assert "Traceback" not in errors, errors[-3000:]
