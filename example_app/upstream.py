"""A slow upstream API that lives in the same process, so the example runs offline.

The example's shared ``httpx.AsyncClient`` reaches it through ``httpx.ASGITransport``: no socket,
no server, but every fetch still pays a simulated network round trip.
"""

from __future__ import annotations

from typing import Any

import anyio
from fastapi import FastAPI, HTTPException

#: How long the upstream takes to answer, in seconds.
LATENCY = 0.05

#: Item ids the upstream knows; any other id is a 404.
ITEMS = range(1, 101)

upstream = FastAPI(title="upstream")


@upstream.get("/items/{item_id}")
async def get_item(item_id: int) -> dict[str, Any]:
    """Return one item, slowly."""
    await anyio.sleep(LATENCY)
    if item_id not in ITEMS:
        raise HTTPException(status_code=404, detail=f"no item {item_id}")
    return {"id": item_id, "name": f"item {item_id}", "price_cents": 100 * item_id + 99}
