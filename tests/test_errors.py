"""Bad input gets a clear error at the point of the mistake, naming what is wrong and the fix."""

from __future__ import annotations

from typing import Any

import pytest

from fastapi_once import once
from fastapi_once.backends import Backend


def test_once_of_something_that_is_not_a_function_is_a_type_error() -> None:
    """once(42) says it takes a function."""
    with pytest.raises(TypeError, match=r"once\(\) takes a function.*got int 42"):
        once(42)  # type: ignore[call-overload]


@pytest.mark.parametrize(
    ("maxsize", "error"),
    [(-1, ValueError), (0, ValueError), (1.5, TypeError), (True, TypeError), ("10", TypeError)],
)
def test_a_maxsize_that_is_not_a_positive_integer_is_refused(
    maxsize: Any, error: type[Exception]
) -> None:
    """maxsize must be a positive integer: another type is a TypeError, a number below 1 a
    ValueError; the message shows the value given."""

    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(error, match=rf"maxsize={maxsize!r}.*positive integer"):
        once(get_stuff, key=lambda url: url, maxsize=maxsize)


def test_asking_again_with_other_options_names_both_option_sets() -> None:
    """A second once() of the same function with other options is an error naming both."""

    async def get_stuff(url: str) -> str:
        return url

    def first_key(url: str) -> str:
        return url

    first = once(get_stuff, key=first_key, maxsize=10)
    with pytest.raises(ValueError, match=r"maxsize=10.*maxsize=20") as info:
        once(get_stuff, key=first_key, maxsize=20)
    assert "first_key" in str(info.value)
    assert once(get_stuff) is first


def test_options_on_an_existing_once_object_must_match_too() -> None:
    """once(a_once, **other_options) is the same mistake as once(fn, **other_options)."""

    @once
    async def load() -> int:
        return 1

    with pytest.raises(ValueError, match=r"\(none\).*name='other'"):
        once(load, name="other")


def test_maxsize_without_key_is_a_type_error() -> None:
    """maxsize= only means something with key=."""

    async def load() -> int:
        return 1

    with pytest.raises(TypeError, match="maxsize= applies only with key="):
        once(load, maxsize=3)


def test_a_key_that_is_not_callable_is_a_type_error() -> None:
    """key= takes a function; a plain value gets an example of the right form."""

    async def get_stuff(url: str) -> str:
        return url

    with pytest.raises(TypeError, match="key= takes a function"):
        once(get_stuff, key="url")  # type: ignore[arg-type]


def test_a_key_for_a_function_without_request_data_is_a_type_error() -> None:
    """key= on a function with nothing to key by says to drop key=."""

    async def load() -> int:
        return 1

    with pytest.raises(TypeError, match=r"no request-data parameters.*drop key="):
        once(load, key=lambda: 1)


def test_an_unknown_option_is_a_type_error_listing_the_options() -> None:
    """A misspelt option is named, with the valid ones."""

    async def load() -> int:
        return 1

    with pytest.raises(TypeError, match=r"unknown option\(s\) max_size; the options are"):
        once(load, max_size=3)  # type: ignore[call-overload]


def test_a_name_that_is_not_a_string_is_a_type_error() -> None:
    """name= must be a non-empty string."""

    async def load() -> int:
        return 1

    with pytest.raises(TypeError, match="name= must be a non-empty string"):
        once(load, name="")


def test_version_is_part_of_the_name() -> None:
    """version= makes a new identity: name@version."""

    async def migrate() -> None:
        return None

    assert once(migrate, name="migrate", version=3).name == "migrate@3"


class _Stub(Backend):
    async def run_once(self, name: str, work: Any, *, ttl: float | None = None) -> Any:
        return await work()

    async def reset(self, name: str) -> None:
        return None

    def describe(self) -> str:
        return "stub"


def test_across_takes_a_backend_a_url_or_a_factory() -> None:
    """across= with something else, or a URL of an unknown scheme, names the fix."""

    async def migrate() -> None:
        return None

    with pytest.raises(TypeError, match="across= takes a backend"):
        once(migrate, across=42)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown scheme; give file:///path") as info:
        once(migrate, across="mssql://root:hunter2@db/app", name="tests.errors.url")
    assert "hunter2" not in str(info.value)


def test_across_refuses_keyed_without_ttl_and_generator_functions() -> None:
    """A keyed cross-process once needs ttl= (its records must expire); no per-process cleanup."""

    async def get_stuff(url: str) -> str:
        return url

    async def client() -> Any:
        yield 1

    with pytest.raises(TypeError, match="keyed once across processes needs ttl="):
        once(get_stuff, key=lambda url: url, across=_Stub())
    with pytest.raises(TypeError, match="generator's cleanup would run in one process"):
        once(client, across=_Stub())
