"""A small HTTP/1.1 load generator on asyncio streams, for when ``wrk`` is not installed.

``python -m bench.loadgen URL --seconds S --connections C`` keeps C keep-alive connections busy
with GET requests for S seconds and prints ``{"requests": ..., "seconds": ..., "errors": ...}``.
It speaks just enough HTTP/1.1 for the bench's server (Content-Length bodies).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from urllib.parse import urlsplit


async def _connection(host: str, port: int, path: str, deadline: float) -> tuple[int, int]:
    reader, writer = await asyncio.open_connection(host, port)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    done = errors = 0
    try:
        while time.perf_counter() < deadline:
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if head.startswith(b"HTTP/1.1 200 "):
                done += 1
            else:
                errors += 1
    finally:
        writer.close()
        await writer.wait_closed()
    return done, errors


async def load(url: str, seconds: float, connections: int) -> dict[str, float]:
    """Run the load against ``url``; return requests completed, seconds and errors."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    start = time.perf_counter()
    deadline = start + seconds
    results = await asyncio.gather(
        *(_connection(host, port, parts.path or "/", deadline) for _ in range(connections))
    )
    elapsed = time.perf_counter() - start
    return {
        "requests": sum(r[0] for r in results),
        "seconds": elapsed,
        "errors": sum(r[1] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    parser.add_argument("url")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(load(args.url, args.seconds, args.connections))))


if __name__ == "__main__":
    main()
