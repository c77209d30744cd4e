"""Real uvicorn servers on 127.0.0.1 for tests: start one in a thread, fire a concurrent burst."""

import math
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import anyio
import httpx
import uvicorn
from fastapi import FastAPI

POOL_SIZE = 50  # httpcore scans its whole pool per request: many small pools are much faster


@contextmanager
def running(app: FastAPI, **options: Any) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a thread on a free port; yield its base URL; stop cleanly.

    ``options`` go to ``uvicorn.Config`` (e.g. ``timeout_graceful_shutdown=5``).
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    host, port = sock.getsockname()
    config = uvicorn.Config(
        app, log_level="warning", ws="none", lifespan="on", backlog=2048, **options
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert time.monotonic() < deadline, "uvicorn did not start in 10 s"
            time.sleep(0.01)
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()
    assert not thread.is_alive(), "uvicorn did not stop in 10 s"


def fire(base_url: str, paths: list[str]) -> list[httpx.Response]:
    """Send every request in ``paths`` at once over real TCP connections; return the responses."""

    async def main() -> list[httpx.Response]:
        responses: list[httpx.Response] = []
        limits = httpx.Limits(max_connections=POOL_SIZE, max_keepalive_connections=POOL_SIZE)
        async with AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30)
                )
                for _ in range(math.ceil(len(paths) / POOL_SIZE))
            ]

            async def get(client: httpx.AsyncClient, path: str) -> None:
                responses.append(await client.get(path))

            async with anyio.create_task_group() as group:
                for i, path in enumerate(paths):
                    group.start_soon(get, clients[i % len(clients)], path)
        return responses

    return anyio.run(main)
