"""An asyncio event loop that runs its ready callbacks in a shuffled order, chosen by a seed.

asyncio runs ready callbacks first in, first out; code that is only correct in that order has a
race. This loop shuffles each batch of ready callbacks with ``random.Random(seed)``, so one seed
is one reproducible interleaving.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class ShuffledLoop(asyncio.SelectorEventLoop):
    """A selector loop whose ready callbacks run in a seeded random order."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._shuffle = random.Random(seed).shuffle

    def _run_once(self) -> None:
        ready: Any = self._ready  # type: ignore[attr-defined]
        if len(ready) > 1:
            batch = list(ready)
            self._shuffle(batch)
            ready.clear()
            ready.extend(batch)
        super()._run_once()  # type: ignore[misc]


def run_shuffled(main: Callable[[], Awaitable[T]], seed: int) -> T:
    """Run ``main()`` to completion on a :class:`ShuffledLoop` seeded with ``seed``."""
    loop = ShuffledLoop(seed)
    try:
        return loop.run_until_complete(asyncio.wait_for(main(), 10))  # type: ignore[arg-type]
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()
