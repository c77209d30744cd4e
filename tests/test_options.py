"""Every option of once(), once_lifespan() and readiness_router() is checked when it is made.

A wrong type (a bool is not a number) is a TypeError, a value out of range (NaN, an infinity,
a negative, an integer too large for a float, a path without a leading "/") a ValueError; the
message names the function, the option, the value and the fix.
"""

from __future__ import annotations

import math
import re
from typing import Any

import pytest

from fastapi_once import once, once_lifespan, readiness_router

HUGE = 10**400  # an int no float can hold
HUGER = 10**5000  # one whose digits repr() refuses to print


async def load() -> str:
    return "value"  # pragma: no cover - never called


# What each timing option of once() needs beside it to be allowed at all.
NEEDS = {
    "timeout": {},
    "cooldown": {},
    "ttl": {},
    "refresh": {},
    "stale_if_error": {"ttl": 10},
    "jitter": {"ttl": 10},
    "backoff": {"retries": 1},
}


@pytest.mark.parametrize("value", [HUGE, -HUGE, HUGER], ids=["10**400", "-10**400", "10**5000"])
@pytest.mark.parametrize("option", sorted(NEEDS))
def test_an_integer_too_large_for_seconds_is_a_value_error_naming_the_once(
    option: str, value: int
) -> None:
    """once(f, ttl=10**400) (any timing option) is a ValueError naming the once and the option,
    not a bare OverflowError."""
    with pytest.raises(ValueError, match=rf"once\(tests\.load, {option}=") as info:
        once(load, name="tests.load", **{option: value, **NEEDS[option]})  # type: ignore[call-overload]
    message = str(info.value)
    assert re.search(r"<an integer of \d+ digits>", message)
    least = "zero or more" if option == "backoff" else "a positive number"
    assert ("too large" if value > 0 else f"must be {least}") in message
    assert not isinstance(info.value, OverflowError)


@pytest.mark.parametrize("option", sorted(NEEDS))
def test_a_bool_is_not_a_number_of_seconds(option: str) -> None:
    """ttl=True is a TypeError, not one second."""
    with pytest.raises(TypeError, match=rf"{option}=True\): {option} takes seconds as a number"):
        once(load, name="tests.load", **{option: True, **NEEDS[option]})  # type: ignore[call-overload]


@pytest.mark.parametrize("value", [True, 1.5, "2"])
def test_retries_takes_a_whole_number(value: Any) -> None:
    """retries=True, 1.5 or "2" is a TypeError naming the option."""
    with pytest.raises(TypeError, match=rf"retries={value!r}\): retries must be a whole number"):
        once(load, name="tests.load", retries=value)


@pytest.mark.parametrize("value", [True, 1.5, b"v2"])
def test_version_takes_a_string_or_an_int(value: Any) -> None:
    """version= is appended to the name: a bool, a float or bytes are refused."""
    with pytest.raises(TypeError, match=r"version= takes a string or an int"):
        once(load, name="tests.load", version=value)


def test_the_checked_options_still_make_the_once() -> None:
    """Large but finite numbers are fine (an int is taken as its float)."""
    made = once(load, name="tests.load.big", ttl=10**300, timeout=1e300, version="2")
    assert made.name == "tests.load.big@2"


# --- once_lifespan ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        (HUGE, ValueError, "too large"),
        (HUGER, ValueError, "too large"),
        (math.inf, ValueError, "finite"),
        (math.nan, ValueError, "finite"),
        (0, ValueError, "positive"),
        (-1, ValueError, "positive"),
        (True, TypeError, "takes seconds as a number"),
        ("10", TypeError, "takes seconds as a number"),
        (None, TypeError, "takes seconds as a number"),
    ],
    ids=["10**400", "10**5000", "inf", "nan", "zero", "negative", "True", "string", "None"],
)
def test_a_shutdown_timeout_that_is_not_positive_finite_seconds_is_refused(
    value: Any, error: type[Exception], says: str
) -> None:
    """shutdown_timeout=10**400 was accepted and then failed at shutdown with no cleanup;
    shutdown_timeout=True was taken as 1 s. Both, and the rest, are refused at once."""
    with pytest.raises(error, match=r"once_lifespan\(shutdown_timeout=") as info:
        once_lifespan(shutdown_timeout=value)
    assert says in str(info.value)
    assert "e.g. shutdown_timeout=10" in str(info.value)


def test_a_lifespan_that_is_not_callable_is_a_type_error() -> None:
    """lifespan=3 is refused, naming what lifespan= takes."""
    with pytest.raises(TypeError, match=r"once_lifespan\(lifespan=3\): lifespan= takes"):
        once_lifespan(lifespan=3)  # type: ignore[arg-type]


@pytest.mark.parametrize("value", ["no", 0, None])
def test_reset_process_scope_takes_a_bool(value: Any) -> None:
    """reset_process_scope="no" (truthy!) is refused."""
    with pytest.raises(
        TypeError, match=rf"reset_process_scope={value!r}\): reset_process_scope takes True"
    ):
        once_lifespan(reset_process_scope=value)


# --- readiness_router ---------------------------------------------------------------------------


@pytest.mark.parametrize("option", ["ping_timeout", "ping_every"])
@pytest.mark.parametrize(
    ("value", "error", "says"),
    [
        (math.nan, ValueError, "finite"),
        (math.inf, ValueError, "finite"),
        (HUGE, ValueError, "too large"),
        (0, ValueError, "positive"),
        (True, TypeError, "takes seconds as a number"),
    ],
    ids=["nan", "inf", "10**400", "zero", "True"],
)
def test_a_ping_interval_that_is_not_positive_finite_seconds_is_refused(
    option: str, value: Any, error: type[Exception], says: str
) -> None:
    """ping_timeout=nan made every probe 503, ping_every=nan pinged on every probe, inf kept
    the first result forever or let a hung ping hang the probe: all refused at once."""
    with pytest.raises(error, match=rf"readiness_router\({option}=") as info:
        readiness_router(load, **{option: value})
    assert says in str(info.value)
    assert f"e.g. {option}=" in str(info.value)


def test_a_path_without_a_leading_slash_is_refused_with_the_fixed_path() -> None:
    """path="ready" would never be reached (the probe answered 404 forever)."""
    with pytest.raises(ValueError, match=r"path='ready'\).*use path='/ready'"):
        readiness_router(load, path="ready")
    with pytest.raises(TypeError, match=r"path takes the route's path as a string"):
        readiness_router(load, path=None)  # type: ignore[arg-type]


@pytest.mark.parametrize("option", ["warm", "details"])
def test_warm_and_details_take_a_bool(option: str) -> None:
    """warm="no" would turn warming on: refused."""
    with pytest.raises(TypeError, match=rf"{option}='no'\): {option} takes True or False"):
        readiness_router(load, **{option: "no"})


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (-1, ValueError),
        (86_401, ValueError),
        (HUGE, ValueError),
        (True, TypeError),
        (1.5, TypeError),
    ],
    ids=["negative", "over-a-day", "10**400", "True", "float"],
)
def test_retry_after_takes_whole_seconds_up_to_a_day(value: Any, error: type[Exception]) -> None:
    """retry_after= is whole seconds from 0 to 86400; the message shows the value."""
    with pytest.raises(error, match=r"retry_after=.*retry_after must be whole seconds"):
        readiness_router(load, retry_after=value)


def test_the_options_are_checked_before_the_onces() -> None:
    """A bad option is named even when the onces are fine (or missing)."""
    with pytest.raises(ValueError, match=r"path='ready'"):
        readiness_router(path="ready")
