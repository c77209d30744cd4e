"""@once on methods: one value per instance, bound through the descriptor protocol."""

from __future__ import annotations

import dataclasses
import functools
import gc
import weakref
from collections.abc import AsyncIterator, Iterator
from typing import Annotated, Any

import anyio
import anyio.lowlevel
import anyio.to_thread
import pytest
from crowd import crowd
from fastapi import Depends, FastAPI
from fastapi.testclient import TestClient
from timekeeping import FakeClock, wait_until

from fastapi_once import Once, once, registry, reset_all

pytestmark = pytest.mark.anyio


def get_prefix() -> str:
    """A sub-dependency of a once method."""
    return "made with "


class Service:
    """A service with once methods of every kind."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.runs = 0
        self.closed: list[str] = []

    @once
    async def client(self) -> str:
        self.runs += 1
        await anyio.lowlevel.checkpoint()
        return f"client of {self.dsn}"

    @once
    async def pool(self) -> AsyncIterator[str]:
        closed = self.closed  # the code after yield must not need self: it may be gone then
        yield f"pool of {self.dsn}"
        closed.append("pool")

    @once
    def settings(self) -> dict[str, str]:
        return {"dsn": self.dsn}

    @once
    def handle(self) -> Iterator[str]:
        closed = self.closed
        yield f"handle of {self.dsn}"
        closed.append("handle")

    @once(key=lambda path: path)
    async def fetch(self, path: str) -> str:
        return f"{self.dsn}{path}"

    async def _connect(self, role: str, *, port: int = 5432) -> str:
        return f"{role} of {self.dsn}:{port}"

    replica = once(functools.partialmethod(_connect, "replica", port=5433))


async def test_each_instance_has_its_own_value_made_once() -> None:
    """obj.method() makes one value per instance, single-flight per instance."""
    a, b = Service("a"), Service("b")
    assert await crowd(a.client, 10) == ["client of a"] * 10
    assert await b.client() == "client of b"
    assert (a.runs, b.runs) == (1, 1)


async def test_the_attribute_is_the_instances_once_for_as_long_as_it_lives() -> None:
    """obj.method is one Once per instance, named after the method; the class has the descriptor."""
    a = Service("a")
    assert isinstance(a.client, Once)
    assert a.client is a.client
    assert a.client is not Service("b").client
    assert a.client.name == f"{__name__}.Service.client"
    assert Service.__dict__["client"] is Service.client
    assert once(Service.client) is Service.client


def test_the_registry_lists_an_instances_once_only_once_it_is_bound() -> None:
    """Defining the class checks the options but leaves no once behind; binding makes one."""

    class Lazy:
        @once(ttl=5)
        async def value(self) -> int:
            return 1

    assert [o for o in registry() if ".Lazy." in o.name] == []
    lazy = Lazy()
    bound = lazy.value
    assert [o for o in registry() if ".Lazy." in o.name] == [bound]


async def test_calling_through_the_class_serves_the_instances_value() -> None:
    """type(obj).method(obj) is obj.method(): the same value, made once."""
    a = Service("a")
    assert await Service.client(a) == "client of a"
    assert await a.client() == "client of a"
    assert await Service.fetch(a, "/x") == "a/x"
    assert a.runs == 1


async def test_every_kind_of_method_is_bound() -> None:
    """async def, def, async generator and generator methods all make the instance's value."""
    a = Service("a")
    assert await a.client() == "client of a"
    assert await a.settings() == {"dsn": "a"}
    assert await a.pool() == "pool of a"
    assert await a.handle() == "handle of a"
    await reset_all()
    assert sorted(a.closed) == ["handle", "pool"]


async def test_a_keyed_method_keeps_one_value_per_key_per_instance() -> None:
    """key= takes the method's arguments without self; each instance has its own keys."""
    a, b = Service("a"), Service("b")
    assert await a.fetch("/x") == "a/x"
    assert await b.fetch("/x") == "b/x"
    assert await a.fetch(path="/y") == "a/y"
    keys = a.fetch.status().keys
    assert keys is not None
    assert keys["ready"] == 2


async def test_a_partialmethod_binds_like_a_method() -> None:
    """once(functools.partialmethod(m, ...)) in a class body: one value per instance."""
    a, b = Service("a"), Service("b")
    assert await a.replica() == "replica of a:5433"
    assert await b.replica() == "replica of b:5433"
    assert await Service.replica(a) == "replica of a:5433"
    assert a.replica.name == f"{__name__}.Service.replica"


async def test_a_collected_instance_has_its_value_cleaned_up_once() -> None:
    """del obj; gc.collect(): nothing keeps the instance alive, and its cleanup runs once."""
    a = Service("a")
    closed = a.closed
    assert await a.pool() == "pool of a"
    assert await a.handle() == "handle of a"
    gone = weakref.ref(a)
    del a
    gc.collect()
    assert gone() is None
    await wait_until(lambda: sorted(closed) == ["handle", "pool"])
    await reset_all()
    await anyio.sleep(0.01)
    assert sorted(closed) == ["handle", "pool"]


async def test_an_instance_collected_in_another_thread_is_cleaned_up_in_its_loop() -> None:
    """A collection in a worker thread hands the cleanup to the loop that made the value."""
    a = Service("a")
    a.myself = a  # type: ignore[attr-defined]  # a cycle: only the collector frees it
    closed = a.closed
    assert await a.pool() == "pool of a"
    gone = weakref.ref(a)
    del a
    await anyio.to_thread.run_sync(gc.collect)
    assert gone() is None
    await wait_until(lambda: closed == ["pool"])


async def test_a_collected_instance_leaves_no_once_behind() -> None:
    """Once its values are cleaned up, the instance's once is forgotten too."""
    a = Service("a")
    await a.pool()
    made = weakref.ref(a.pool)
    del a

    def forgotten() -> bool:
        gc.collect()
        return made() is None

    await wait_until(forgotten)


async def test_reset_all_cleans_up_every_instances_values() -> None:
    """reset_all() retires each instance's value; the next call makes a new one."""
    a, b = Service("a"), Service("b")
    await a.pool()
    await b.pool()
    await reset_all()
    assert (a.closed, b.closed) == (["pool"], ["pool"])
    assert await a.pool() == "pool of a"


async def test_reset_and_status_work_on_the_instances_once() -> None:
    """obj.method.reset() and obj.method.status() concern that instance only."""
    a, b = Service("a"), Service("b")
    await a.pool()
    await b.pool()
    await a.pool.reset()
    assert (a.closed, b.closed) == (["pool"], [])
    assert (a.pool.status().state, b.pool.status().state) == ("idle", "ready")
    await reset_all()


async def test_options_apply_to_every_instances_once(clock: FakeClock) -> None:
    """@once(ttl=...) on a method: each instance's value expires on its own."""

    class Token:
        def __init__(self) -> None:
            self.made = 0

        @once(ttl=10)
        async def get(self) -> int:
            self.made += 1
            return self.made

    a, b = Token(), Token()
    assert (await a.get(), await b.get()) == (1, 1)
    clock.advance(5)
    assert (await a.get(), await b.get()) == (1, 1)
    clock.advance(5)
    assert (await a.get(), await b.get()) == (2, 2)
    assert a.get.options == {"ttl": 10}


def test_bad_options_on_a_method_are_refused_when_the_class_is_defined() -> None:
    """A wrong option raises at decoration, not at the first instance."""
    with pytest.raises(ValueError, match="ttl must be a positive number"):

        class Broken:
            @once(ttl=-1)
            async def get(self) -> int:
                return 1


def test_across_on_a_method_is_refused_with_the_fix() -> None:
    """across= shares one result by name; a method's value is per instance: refused at once."""
    with pytest.raises(TypeError, match="module-level function with across="):

        class Migrations:
            @once(across="file:///tmp/never-used")
            async def run(self) -> None:
                return None


def test_asking_again_with_other_options_is_refused() -> None:
    """once(method, **other_options) names both option sets, as for functions."""

    async def get(self: Any) -> int:
        return 1

    get.__qualname__ = "Holder.get"
    first = once(get, ttl=5)
    assert once(get) is first
    assert once(get, ttl=5) is first
    with pytest.raises(ValueError, match="already exists with options"):
        once(get, ttl=6)


def test_a_route_depends_on_an_instances_once() -> None:
    """Depends(obj.method) in a route: made once, shared by requests."""
    service = Service("db")

    class Clients:
        @once
        async def client(self, prefix: Annotated[str, Depends(get_prefix)]) -> str:
            return prefix + service.dsn

    clients = Clients()
    app = FastAPI()

    @app.get("/")
    async def route(client: str = Depends(clients.client)) -> str:
        return client

    @app.get("/keyed")
    async def keyed(value: str = Depends(service.fetch)) -> str:
        return value

    with TestClient(app) as http:
        assert http.get("/").json() == "made with db"
        assert http.get("/").json() == "made with db"
        assert http.get("/keyed", params={"path": "/p"}).json() == "db/p"
    assert clients.client.status().attempts == 1


async def test_an_unhashable_instance_is_bound_too() -> None:
    """A dataclass with eq=True (so no __hash__) still gets its own once."""

    @dataclasses.dataclass
    class Config:
        url: str

        @once
        async def load(self) -> str:
            return f"loaded {self.url}"

    one = Config("b")
    assert await one.load() == "loaded b"
    assert one.load is one.load


def test_an_instance_without_weak_references_is_refused_with_the_fix() -> None:
    """__slots__ without __weakref__: a TypeError that says to add it."""

    class Slotted:
        __slots__ = ()

        @once
        async def get(self) -> int:
            return 1

    with pytest.raises(TypeError, match="add '__weakref__' to its __slots__"):
        Slotted().get  # noqa: B018


async def test_a_function_outside_a_class_with_a_self_parameter_is_not_a_method() -> None:
    """Only a function defined in a class body is bound: a local one with self stays a function."""

    async def local(self: int) -> int:  # a parameter named self, nothing more
        return self

    with pytest.raises(TypeError, match="request data"):
        once(local)


async def test_a_generator_method_gets_a_weak_proxy_as_self() -> None:
    """The suspended generator must not keep its instance alive: its self is a proxy."""
    seen: list[type] = []

    class Holder:
        @once
        async def value(self) -> AsyncIterator[int]:
            seen.append(type(self))
            yield 1

    holder = Holder()
    assert await holder.value() == 1
    assert seen == [weakref.ProxyType]
    await reset_all()


async def test_a_call_on_a_temporary_instance_says_to_keep_a_reference() -> None:
    """Service(dsn).client(): the instance is gone before the work runs; ReferenceError says why."""
    with pytest.raises(ReferenceError, match="keep a reference to the instance"):
        await Service("temporary").client()


def test_the_descriptor_names_its_method() -> None:
    """repr(Class.method) names the method, for debugging."""
    assert repr(Service.client) == f"<OnceMethod {__name__}.Service.client>"
