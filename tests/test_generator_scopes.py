"""A generator that holds a task group across its ``yield`` is cleaned up where it entered it.

The code after ``yield`` exits the task group (or cancel scope) the code before it entered, so it
must run in the same task with that scope innermost: the cleanup runs in the task that made the
value and opens no scope of its own around the generator.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import anyio
import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI

from fastapi_once import once, once_lifespan

pytestmark = pytest.mark.anyio


class Pool:
    """What the generators below make, and what happened to it."""

    def __init__(self) -> None:
        self.log: list[str] = []
        self.tasks: list[object] = []  # the task that entered, then the one that cleaned up

    def generator(self) -> Callable[[], AsyncIterator[str]]:
        """An async generator function holding a task group, with a worker in it, across yield."""

        async def pool() -> AsyncIterator[str]:
            self.tasks.append(anyio.get_current_task().id)
            async with anyio.create_task_group() as tg:
                tg.start_soon(self.worker)
                yield "pool"
                await anyio.sleep(0.001)  # the cleanup may await
                self.tasks.append(anyio.get_current_task().id)
                self.log.append("cleanup")
                tg.cancel_scope.cancel()
            self.log.append("task group exited")

        return pool

    async def worker(self) -> None:
        try:
            await anyio.sleep_forever()
        finally:
            self.log.append("worker cancelled")

    @property
    def cleaned_up(self) -> bool:
        """The cleanup ran to the end, in the task that entered the task group."""
        return (
            self.log == ["cleanup", "worker cancelled", "task group exited"]
            and len(self.tasks) == 2
            and self.tasks[0] == self.tasks[1]
        )


async def test_reset_cleans_up_a_generator_that_holds_a_task_group_across_its_yield() -> None:
    """reset() runs the code after yield in the task that entered the task group: no error."""
    pool = Pool()
    get = once(pool.generator())
    assert await get() == "pool"
    assert pool.log == []
    await get.reset()
    assert pool.cleaned_up, pool.log


async def test_a_timeout_and_retries_keep_the_task_group_generator_cleanable() -> None:
    """With timeout= (a scope around the attempt) and retries=, the cleanup still exits it."""
    pool = Pool()
    get = once(pool.generator(), timeout=30, retries=1)
    assert await get() == "pool"
    await get.reset()
    assert pool.cleaned_up, pool.log


async def test_a_sub_dependency_holding_a_task_group_is_cleaned_up_with_the_value() -> None:
    """A generator sub-dependency's task group is exited by reset, in the task that entered it."""
    pool = Pool()
    sub = pool.generator()

    @once
    async def service(conn: str = Depends(sub)) -> str:
        return f"service on {conn}"

    assert await service() == "service on pool"
    await service.reset()
    assert pool.cleaned_up, pool.log


async def test_a_failing_function_releases_its_task_group_sub_dependency() -> None:
    """When fn fails after its sub-dependency entered a task group, that one is cleaned up."""
    pool = Pool()
    sub = pool.generator()

    @once
    async def service(conn: str = Depends(sub)) -> str:
        raise ConnectionError(f"nothing answers on {conn}")

    with pytest.raises(ConnectionError, match="nothing answers"):
        await service()
    assert pool.cleaned_up, pool.log


async def test_shutdown_cleans_up_a_generator_that_holds_a_task_group_across_its_yield() -> None:
    """once_lifespan's shutdown runs the task-group generator's cleanup without an error."""
    pool, lazy_pool = Pool(), Pool()
    warm, lazy = once(pool.generator()), once(lazy_pool.generator())
    app = FastAPI(lifespan=once_lifespan(warm))

    @app.get("/")
    async def root(a: str = Depends(warm), b: str = Depends(lazy)) -> Any:
        return [a, b]

    async with LifespanManager(app) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            assert (await http.get("/")).json() == ["pool", "pool"]
        assert pool.log == lazy_pool.log == []
    assert pool.cleaned_up, pool.log
    assert lazy_pool.cleaned_up, lazy_pool.log
