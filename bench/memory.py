"""Scenario 5: resident memory of a keyed once hit with many distinct keys.

Each store runs in its own process (``python -m bench.memory --store once|dict``) so its RSS is
its own. The keyed once keeps at most ``maxsize`` values; an unbounded dict is the context.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import resource
import subprocess
import sys
import time
import weakref
from pathlib import Path
from typing import Any

from fastapi_once import once

from .config import Config

ROOT = Path(__file__).resolve().parent.parent
VALUE_BYTES = 256
CHECKPOINTS = 10


def rss_kib() -> int:
    """This process's resident set size in KiB (peak RSS where /proc is missing)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak // 1024 if sys.platform == "darwin" else peak


class Value:
    """What each key maps to: ``VALUE_BYTES`` of payload, weakly referenceable for counting."""

    __slots__ = ("__weakref__", "data")

    def __init__(self) -> None:
        self.data = bytearray(VALUE_BYTES)


async def _fill_once(
    keys: int, maxsize: int, alive: weakref.WeakSet[Value]
) -> tuple[list[list[int]], int, int]:
    @once(key=lambda k: k, maxsize=maxsize)
    async def value(k: int) -> Value:
        made = Value()
        alive.add(made)
        return made

    checkpoints: list[list[int]] = []
    step = max(keys // CHECKPOINTS, 1)
    for k in range(keys):
        await value(k)
        if (k + 1) % step == 0:
            checkpoints.append([k + 1, rss_kib()])
    # Measured while the event loop, and so the once's values, are still alive.
    gc.collect()
    return checkpoints, len(alive), rss_kib()


def _fill_dict(keys: int) -> tuple[list[list[int]], int, int]:
    store: dict[int, Value] = {}
    checkpoints: list[list[int]] = []
    step = max(keys // CHECKPOINTS, 1)
    for k in range(keys):
        store[k] = Value()
        if (k + 1) % step == 0:
            checkpoints.append([k + 1, rss_kib()])
    gc.collect()
    return checkpoints, len(store), rss_kib()


def measure(store: str, keys: int, maxsize: int) -> dict[str, Any]:
    """Fill ``store`` with ``keys`` distinct keys in this process; report RSS along the way."""
    before = rss_kib()
    start = time.perf_counter()
    if store == "once":
        # The values still alive at the end are the ones the once keeps.
        alive: weakref.WeakSet[Value] = weakref.WeakSet()
        checkpoints, kept, after = asyncio.run(_fill_once(keys, maxsize, alive))
    else:
        checkpoints, kept, after = _fill_dict(keys)
    return {
        "store": store,
        "keys": keys,
        "maxsize": maxsize if store == "once" else None,
        "values_kept": kept,
        "rss_before_kib": before,
        "rss_after_kib": after,
        "seconds": time.perf_counter() - start,
        "checkpoints": checkpoints,
    }


def run(config: Config) -> dict[str, Any]:
    """Run the keyed once and the unbounded dict, each in a fresh subprocess."""
    results: dict[str, Any] = {}
    labels = {"once": f"keyed once, maxsize={config.memory_maxsize}", "dict": "unbounded dict"}
    for store in ("once", "dict"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "bench.memory",
                "--store",
                store,
                "--keys",
                str(config.memory_keys),
                "--maxsize",
                str(config.memory_maxsize),
            ],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
            check=True,
        ).stdout
        results[store] = {"label": labels[store], **json.loads(out)}
    return {"keys": config.memory_keys, "value_bytes": VALUE_BYTES, "contenders": results}


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--store", choices=["once", "dict"], required=True)
    parser.add_argument("--keys", type=int, required=True)
    parser.add_argument("--maxsize", type=int, default=1000)
    args = parser.parse_args()
    print(json.dumps(measure(args.store, args.keys, args.maxsize)))


if __name__ == "__main__":
    main()
