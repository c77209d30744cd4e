"""Import time: ``import fastapi`` against ``import fastapi, fastapi_once`` in fresh processes."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from .config import Config

ROOT = Path(__file__).resolve().parent.parent
COMMANDS = {"fastapi": "import fastapi", "fastapi_once": "import fastapi, fastapi_once"}

# Times the two imports inside one fresh process: fastapi's own, then what fastapi_once adds.
_SPLIT = """
import json, time
t0 = time.perf_counter()
import fastapi
t1 = time.perf_counter()
import fastapi_once
t2 = time.perf_counter()
print(json.dumps([t1 - t0, t2 - t1]))
"""


def _wall(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return time.perf_counter() - start


def run(config: Config) -> dict[str, Any]:
    """Median wall time of each command over interleaved runs, and the in-process split."""
    walls: dict[str, list[float]] = {name: [] for name in COMMANDS}
    split: list[list[float]] = []
    for round_ in range(config.import_runs):
        names = list(COMMANDS) if round_ % 2 == 0 else list(reversed(COMMANDS))
        for name in names:
            walls[name].append(_wall(COMMANDS[name]))
        out = subprocess.run(
            [sys.executable, "-c", _SPLIT], cwd=ROOT, check=True, stdout=subprocess.PIPE, text=True
        ).stdout
        split.append(json.loads(out))
    medians = {name: statistics.median(values) for name, values in walls.items()}
    return {
        "runs": config.import_runs,
        "process_wall_s": medians,
        "added_wall_s": medians["fastapi_once"] - medians["fastapi"],
        "in_process_fastapi_s": statistics.median(s[0] for s in split),
        "in_process_fastapi_once_added_s": statistics.median(s[1] for s in split),
        "wall_rounds": walls,
    }
