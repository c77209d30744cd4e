"""How big each scenario is: the full run and the tiny ``--smoke`` run."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Config:
    """The sizes of every scenario; each contender runs the same rounds, interleaved."""

    smoke: bool = False
    # 1. warm hot path through FastAPI, in-process ASGI calls
    hot_rounds: int = 200
    hot_requests: int = 300
    # 2. cold burst
    burst_sizes: tuple[int, ...] = (100, 1_000, 10_000)
    burst_rounds: int = 9
    burst_sleep_s: float = 0.05
    busy_tasks: int = 100
    # 3. failure burst
    failure_callers: int = 200
    failure_after_s: float = 0.02
    failure_rounds: int = 7
    # 4. real HTTP through uvicorn
    http_rounds: int = 10
    http_seconds: float = 2.0
    http_connections: int = 32
    http_warm_up: bool = True  # a round on each route before the measured ones
    # 5. memory of a keyed once
    memory_keys: int = 1_000_000
    memory_maxsize: int = 1_000
    # 6. keyed once against async-lru, CPU time per call
    keyed_rounds: int = 60
    keyed_calls: int = 5_000
    keyed_maxsize: int = 1_000
    # import time
    import_runs: int = 15

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


FULL = Config()

SMOKE = Config(
    smoke=True,
    hot_rounds=2,
    hot_requests=50,
    burst_sizes=(10, 100),
    burst_rounds=1,
    burst_sleep_s=0.01,
    busy_tasks=10,
    failure_callers=10,
    failure_rounds=1,
    http_rounds=1,
    http_seconds=0.3,
    http_connections=4,
    http_warm_up=False,
    memory_keys=2_000,
    memory_maxsize=100,
    keyed_rounds=2,
    keyed_calls=200,
    keyed_maxsize=50,
    import_runs=1,
)
