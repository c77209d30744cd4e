"""store_errors: how every store turns its driver's errors into the store's, without their text."""

from __future__ import annotations

import pytest

from fastapi_once.backends import BackendError
from fastapi_once.backends._base import store_errors
from fastapi_once.backends._store import StoreUnavailableError


class DriverError(Exception):
    pass


class LoginRefused(DriverError):
    pass


class OperationalError(DriverError, OSError):
    pass


def translated(exc: Exception) -> Exception:
    """What the block's ``exc`` becomes, through a store whose outages are OSErrors."""
    try:
        with store_errors(
            "Store(x://***@h)",
            "claiming n",
            DriverError,
            outage=lambda e: isinstance(e, OSError) or e.args == ("gone",),
            refused=LoginRefused,
        ):
            raise exc
    except Exception as error:
        return error
    raise AssertionError("nothing raised")


def test_an_outage_is_store_unavailable_naming_the_type_and_code_never_the_text() -> None:
    """A lost connection is StoreUnavailableError; the message has the store, what it did, the
    error's type and code, and none of the driver's text; the driver's error is the cause."""
    cause = OperationalError(2013, "Lost connection to s3cret-host with password hunter2")
    error = translated(cause)
    assert type(error) is StoreUnavailableError
    assert (
        str(error)
        == "Store(x://***@h): failed claiming n: cannot be reached (OperationalError 2013)"
    )
    assert error.__cause__ is cause


def test_any_other_failure_is_a_backend_error_without_the_driver_text() -> None:
    """The server refusing a statement (or the driver failing) is a plain BackendError."""
    error = translated(DriverError("syntax error near 'key of a client'"))
    assert type(error) is BackendError
    assert str(error) == (
        "Store(x://***@h): failed claiming n: the server answered with an error (DriverError)"
    )


def test_a_refused_login_says_what_to_check_and_is_no_outage() -> None:
    """A refused login or database will not heal by waiting: a BackendError saying what to
    check, even where the driver counts it as a connection error."""
    error = translated(LoginRefused("gone"))
    assert type(error) is BackendError
    assert "refused the login or the database (LoginRefused)" in str(error)
    assert "check the user, password and database in the URL" in str(error)


@pytest.mark.parametrize("exc", [BackendError("mine"), KeyError("not the driver's")])
def test_the_store_own_errors_and_others_go_on_unchanged(exc: Exception) -> None:
    """A BackendError raised inside, and an exception that is not the driver's, are not
    translated."""
    assert translated(exc) is exc
