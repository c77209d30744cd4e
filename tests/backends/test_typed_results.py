"""Results typed by the function's return annotation: every process gets the type, not JSON."""

from __future__ import annotations

import dataclasses
import datetime
import enum
import secrets
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from fastapi_once import once
from fastapi_once.backends import FileLockBackend

pytestmark = pytest.mark.anyio


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Schema(BaseModel):
    version: int
    applied_at: datetime.datetime


@dataclasses.dataclass
class Plan:
    steps: tuple[str, ...]
    color: Color


class Pool:
    """Not something JSON can carry."""


WHEN = datetime.datetime(2026, 11, 25, 18, 0, tzinfo=datetime.timezone.utc)

Anything = Any  # an alias: the annotation's text is not "Any", what it names is


def two_processes(
    tmp_path: Path, fn: Any, follower_fn: Any = None, name: str = ""
) -> tuple[Any, Any]:
    """The same once in two "processes": two functions, two backends, one lock directory."""
    name = name or f"tests.typed@{secrets.token_hex(4)}"
    if follower_fn is None:

        async def follower_fn() -> Any:
            raise AssertionError("the follower ran the work")

        follower_fn.__annotations__ = dict(fn.__annotations__)
    leader = once(fn, across=FileLockBackend(tmp_path / "locks"), name=name)
    follower = once(follower_fn, across=FileLockBackend(tmp_path / "locks"), name=name)
    return leader, follower


@pytest.mark.parametrize(
    ("annotation", "value"),
    [
        (tuple[int, str], (1, "a")),
        (datetime.datetime, WHEN),
        (Color, Color.BLUE),
        (Schema, Schema(version=3, applied_at=WHEN)),
        (Plan, Plan(("create", "index"), Color.RED)),
        (dict[str, tuple[datetime.date, Color]], {"a": (WHEN.date(), Color.RED)}),
    ],
)
async def test_the_leader_and_a_follower_get_the_annotated_type(
    tmp_path: Path, annotation: Any, value: Any
) -> None:
    """Tuples, datetimes, enums, models and dataclasses come back as themselves."""

    async def make() -> Any:
        return value

    make.__annotations__ = {"return": annotation}
    leader, follower = two_processes(tmp_path, make)
    assert await leader() == value
    got = await follower()
    assert got == value
    assert type(got) is type(value)


async def test_without_an_annotation_followers_get_plain_json(tmp_path: Path) -> None:
    """No annotation: JSON as it decodes (a tuple becomes a list)."""

    async def make():  # type: ignore[no-untyped-def]
        return {"pair": (1, 2)}

    leader, follower = two_processes(tmp_path, make)
    assert await leader() == {"pair": [1, 2]}
    assert await follower() == {"pair": [1, 2]}


async def test_a_result_that_does_not_match_its_annotation_is_refused_and_not_recorded(
    tmp_path: Path,
) -> None:
    """The TypeError names the once and the types, never the value; the next call retries."""
    values: list[Any] = [{"token": "s3cret-value"}, 7]

    async def make() -> int:
        return values.pop(0)  # type: ignore[no-any-return]

    leader, _ = two_processes(tmp_path, make)
    with pytest.raises(TypeError, match="as its return annotation int: got a dict") as info:
        await leader()
    assert "s3cret-value" not in str(info.value)
    assert leader.name in str(info.value)
    assert await leader() == 7


def test_an_annotation_pydantic_cannot_serialise_is_refused_when_the_once_is_made(
    tmp_path: Path,
) -> None:
    """An arbitrary class cannot travel as JSON: the error says so at once() time."""

    async def make() -> Pool:
        return Pool()

    with pytest.raises(TypeError, match="which pydantic cannot serialise"):
        once(make, across=FileLockBackend(tmp_path), name="t.pool")


@pytest.mark.parametrize("anyio_backend", ["asyncio"])  # once(make) is made once per process
async def test_a_class_defined_after_the_function_is_resolved_at_first_use(
    tmp_path: Path,
) -> None:
    """A forward reference in the annotation does not break ``once()``."""
    import typed_later

    leader, follower = two_processes(
        tmp_path, typed_later.make, typed_later.follow, name="tests.typed.later"
    )
    assert await leader() == typed_later.Later(n=1)
    assert type(await follower()) is typed_later.Later


async def test_a_record_of_another_shape_says_to_change_the_version(tmp_path: Path) -> None:
    """A result recorded by a version with another annotation is not silently mistyped."""
    name = f"tests.typed.stale@{secrets.token_hex(4)}"

    async def old() -> dict[str, str]:
        return {"when": "never"}

    async def new() -> datetime.datetime:
        return WHEN

    await once(old, across=FileLockBackend(tmp_path), name=name)()
    with pytest.raises(TypeError, match="give the once a new version="):
        await once(new, across=FileLockBackend(tmp_path), name=name)()


def test_the_annotation_is_found_through_partials_and_callable_objects() -> None:
    """``functools.partial`` and objects with an annotated ``__call__`` are typed too; ``Any``
    (also by another name) and no annotation share plain JSON."""
    import functools

    from fastapi_once.backends._codec import JSON, ResultCodec

    async def pair(n: int) -> tuple[int, int]:
        return n, n

    class Maker:
        async def __call__(self) -> tuple[int, int]:
            return 1, 1

    async def anything() -> Any:
        return 1

    async def bare():  # type: ignore[no-untyped-def]
        return 1

    async def aliased() -> Anything:
        return 1

    for fn in (functools.partial(pair, 1), Maker()):
        codec = ResultCodec.for_function(fn, "t")
        assert codec.typed
        assert codec.from_data(codec.to_data("t", (1, 2), "b")) == (1, 2)
    assert ResultCodec.for_function(anything, "t") is JSON
    assert ResultCodec.for_function(bare, "t") is JSON
    assert ResultCodec.for_function(aliased, "t") is JSON
    assert JSON.to_data("t", (1, 2), "b") == (1, 2)
    assert JSON.from_data([1, 2]) == [1, 2]


async def test_an_annotation_that_never_resolves_is_a_type_error_at_first_use(
    tmp_path: Path,
) -> None:
    """A name that is still undefined when the once runs: the error says how to fix it."""

    async def make() -> Undefined:  # type: ignore[name-defined]  # noqa: F821
        return 1

    made = once(make, across=FileLockBackend(tmp_path), name=f"t.undef@{secrets.token_hex(4)}")
    with pytest.raises(TypeError, match="Undefined cannot be resolved"):
        await made()
