"""``python -m bench.keyed_flood``: a keyed once with ``across=`` hit by a flood of distinct keys.

One process calls ``get_stuff(url)`` (``key=lambda url: url``, ``ttl=``, ``maxsize=128``) for
``--keys`` distinct urls (1,000,000 by default), ``--concurrency`` at a time, through a real
redis-server or PostgreSQL started for the run (as the backend tests start them). Every call is a
miss: the process leads each key, records it, and the in-process LRU evicts it again. It samples
the process's RSS and the store's size (Redis ``DBSIZE``, rows of PostgreSQL's keyed table) as it
goes, and prints one JSON line per backend: RSS before and after, the store's largest and final
size, and keys per second. The store stays near ``rate x ttl`` keys; memory stays flat.

Usage: ``python -m bench.keyed_flood [--backend redis|postgres] [--keys N] [--ttl S]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import secrets
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "backends"))

from backend_servers import start_postgres, start_redis  # noqa: E402

from fastapi_once import once  # noqa: E402
from fastapi_once.backends import Backend  # noqa: E402

from .memory import rss_kib  # noqa: E402


async def flood(
    backend: Backend, size: Any, keys: int, concurrency: int, ttl: float
) -> dict[str, Any]:
    """Call a fresh keyed once for ``keys`` distinct urls; sample RSS and the store's size."""

    async def get_stuff(url: str) -> dict[str, str]:
        return {"url": url, "body": "x" * 200}

    stuff = once(
        get_stuff,
        key=lambda url: url,
        ttl=ttl,
        across=backend,
        name=f"bench.flood.{secrets.token_hex(4)}",
    )
    queue = iter(range(keys))
    largest, samples = 0, []

    async def caller() -> None:
        for i in queue:
            await stuff(f"https://example.test/stuff/{i}?token={i * 7919}")

    await stuff("https://example.test/warm-up")
    before = rss_kib()
    started = time.monotonic()
    workers = [asyncio.create_task(caller()) for _ in range(concurrency)]
    while not all(w.done() for w in workers):
        await asyncio.sleep(1.0)
        count = await size()
        largest = max(largest, count)
        samples.append((round(time.monotonic() - started, 1), rss_kib(), count))
    await asyncio.gather(*workers)
    took = time.monotonic() - started
    result = {
        "keys": keys,
        "ttl_s": ttl,
        "concurrency": concurrency,
        "seconds": round(took, 1),
        "keys_per_s": round(keys / took),
        "rss_before_mib": round(before / 1024, 1),
        "rss_after_mib": round(rss_kib() / 1024, 1),
        "rss_max_mib": round(max(s[1] for s in samples) / 1024, 1) if samples else None,
        "store_largest": largest,
        "store_final": await size(),
        # (seconds, RSS MiB, store size) about every tenth of the run
        "samples": [
            (t, round(rss / 1024, 1), n) for t, rss, n in samples[:: max(1, len(samples) // 10)]
        ],
        "in_process_values": sum((stuff.status().keys or {}).values()),
    }
    await backend.aclose()
    return result


def run_redis(keys: int, concurrency: int, ttl: float) -> dict[str, Any]:
    import redis.asyncio as aioredis

    from fastapi_once.backends import RedisBackend

    server = start_redis()
    try:
        backend = RedisBackend(server.url, namespace="flood")

        async def main() -> dict[str, Any]:
            client = aioredis.Redis.from_url(server.url)

            async def size() -> int:
                return int(await client.dbsize())

            try:
                return await flood(backend, size, keys, concurrency, ttl)
            finally:
                await client.aclose()

        return {"backend": "redis", "store": "keys (DBSIZE)", **asyncio.run(main())}
    finally:
        server.stop()
        shutil.rmtree(server.directory, ignore_errors=True)


def run_postgres(keys: int, concurrency: int, ttl: float) -> dict[str, Any]:
    import asyncpg  # type: ignore[import-untyped]

    from fastapi_once.backends import PostgresBackend

    server = start_postgres()
    try:
        backend = PostgresBackend(server.dsn, table="flood")

        async def main() -> dict[str, Any]:
            conn = await asyncpg.connect(server.dsn)

            async def size() -> int:
                exists = await conn.fetchval("SELECT to_regclass('flood_keyed') IS NOT NULL")
                return int(await conn.fetchval("SELECT count(*) FROM flood_keyed")) if exists else 0

            try:
                return await flood(backend, size, keys, concurrency, ttl)
            finally:
                await conn.close()

        return {"backend": "postgres", "store": "rows (flood_keyed)", **asyncio.run(main())}
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("redis", "postgres"), action="append")
    parser.add_argument("--keys", type=int, default=1_000_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--ttl", type=float, default=10.0)
    args = parser.parse_args(argv)
    for kind in args.backend or ["redis", "postgres"]:
        runner = run_redis if kind == "redis" else run_postgres
        print(json.dumps(runner(args.keys, args.concurrency, args.ttl)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
