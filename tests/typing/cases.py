"""Typed direct calls: a line whose comment starts "E:" must be a mypy error containing the rest."""

import functools
from collections.abc import AsyncIterator, Iterator
from typing import Annotated

from fastapi import Depends

from fastapi_once import Once, once, once_lifespan


class Settings: ...


class Client: ...


def get_settings() -> Settings:
    return Settings()


@once
async def settings() -> Settings:
    return Settings()


@once
async def client(s: Annotated[Settings, Depends(get_settings)]) -> AsyncIterator[Client]:
    yield Client()


@once(timeout=5)
async def client_with_default(s: Settings = Depends(get_settings)) -> Client:
    return Client()


@once
def sync_client() -> Iterator[Client]:
    yield Client()


def url_key(url: str) -> str:
    return url


@once(key=url_key, maxsize=10)
async def get_stuff(url: str) -> bytes:
    return url.encode()


@once(scope="process")
def model() -> Iterator[Settings]:
    yield Settings()


@once(key=url_key, scope="process")
def parsed(url: str) -> Settings:
    return Settings()


def sync_calls() -> None:
    m: Settings = model.get_sync()
    p: Settings = parsed.get_sync("/a")
    model.get_sync(1)  # E: Too many arguments
    parsed.get_sync(2)  # E: incompatible type "int"
    once(model, scope="thread")  # E: No overload variant of "once" matches
    once_lifespan(model, reset_process_scope=True)
    once_lifespan(model, reset_process_scope="yes")  # E: incompatible type "str"
    print(m, p)


async def process_calls() -> None:
    m: Settings = await model()
    p: Settings = await parsed("/a")
    await model.reset()
    await parsed.reset("/a")
    print(m, p)


class Service:
    @once
    async def client(self) -> Client:
        return Client()

    async def _connect(self, role: str) -> Client:
        return Client()

    def _open(self, role: str) -> AsyncIterator[Client]:
        raise NotImplementedError

    replica = once(functools.partialmethod(_connect, "replica"))
    primary = once(functools.partialmethod(_open, "primary"), ttl=10, stale_if_error=30)

    async def _fetch(self, role: str, url: str) -> bytes:
        return url.encode()

    by_url = once(functools.partialmethod(_fetch, "reader"), key=url_key)

    @once(key=url_key)
    async def fetch(self, url: str) -> bytes:
        return url.encode()


async def method_calls(service: Service) -> None:
    c: Client = await service.client()
    c = await service.replica()
    c = await service.primary()
    await service.replica.reset()
    await service.replica("x")  # E: Too many arguments
    fetched: bytes = await service.by_url("/a")
    await service.by_url(1)  # E: incompatible type "int"
    b: bytes = await service.fetch("/a")
    await service.fetch.reset("/a")
    wrong: int = await service.client()  # E: Incompatible types in assignment
    await service.client(1)  # E: Too many arguments
    await Service.client(service)  # E: Too many arguments
    print(c, b, fetched, wrong)


async def calls() -> None:
    s: Settings = await settings()
    c: Client = await client()
    c = await client_with_default()
    c = await sync_client()
    b: bytes = await get_stuff("/a")
    b = await get_stuff(url="/a")
    await get_stuff.reset("/a")
    await client.reset()
    unkeyed: Once[[], Settings] = settings
    wrong: int = await settings()  # E: Incompatible types in assignment
    await client(Settings())  # E: Too many arguments
    await client_with_default(s=Settings())  # E: Unexpected keyword argument
    await get_stuff()  # E: Missing positional argument
    await get_stuff(1)  # E: incompatible type "int"
    await settings.reset("x")  # E: Too many arguments
    print(s, c, b, unkeyed, wrong)
