"""The upstream of ``bench.fleet``: a tiny HTTP server that counts fetches per path, and its client.

``python -m bench.upstream --port P --delay S`` serves on 127.0.0.1:P and prints ``ready``. A
``GET /any/path`` is one fetch: the server counts it, waits ``S`` seconds (so that overlapping
fetches really overlap) and answers ``/any/path v<n>``, ``n`` being that path's count so far;
``GET /_counts?prefix=/r1/`` answers the JSON ``{path: fetches}`` of the paths under a prefix.
Every exchange is one HTTP/1.1 request on its own connection (``Connection: close``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
from urllib.parse import parse_qs, urlsplit

COUNTS_PATH = "/_counts"


async def get(port: int, target: str, host: str = "127.0.0.1") -> tuple[int, str]:
    """GET ``target`` (a path and query) from ``host:port``; return the status and the body.

    Just enough HTTP/1.1 for the bench's own servers: the body has a Content-Length.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n".encode()
        )
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length)
    finally:
        writer.close()
        with contextlib.suppress(OSError):  # the server closed first: nothing left to say
            await writer.wait_closed()
    return int(head.split(b" ", 2)[1]), body.decode()


async def counts(port: int, prefix: str) -> dict[str, int]:
    """The fetches the upstream on ``port`` has served, per path, for the paths under ``prefix``."""
    status, body = await get(port, f"{COUNTS_PATH}?prefix={prefix}")
    if status != 200:
        raise RuntimeError(f"the upstream answered {status} to {COUNTS_PATH}")
    found: dict[str, int] = json.loads(body)
    return found


async def serve(port: int, delay: float) -> None:
    """Serve fetches on 127.0.0.1:``port`` until cancelled; print ``ready`` once listening."""
    # One event loop: the counter needs no lock.
    fetched: dict[str, int] = {}

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            target = head.split(b" ", 2)[1].decode()
            parts = urlsplit(target)
            if parts.path == COUNTS_PATH:
                prefix = parse_qs(parts.query).get("prefix", [""])[0]
                body = json.dumps({p: n for p, n in fetched.items() if p.startswith(prefix)})
            else:
                fetched[target] = n = fetched.get(target, 0) + 1
                await asyncio.sleep(delay)
                body = f"{target} v{n}"
            data = body.encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                + f"Content-Length: {len(data)}\r\n\r\n".encode()
                + data
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError):
            pass  # the client went away: its fetch is counted all the same
        finally:
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=4096)
    async with server:
        print("ready", flush=True)
        await server.serve_forever()


def main() -> None:
    """Run the upstream until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m bench.upstream", description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds each fetch takes")
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(args.port, args.delay))


if __name__ == "__main__":
    main()
