"""A once whose return annotation names a class defined after it (a forward reference)."""

from __future__ import annotations

import dataclasses


async def make() -> Later:
    return Later(n=1)


async def follow() -> Later:
    raise AssertionError("the follower ran the work")


@dataclasses.dataclass
class Later:
    n: int
