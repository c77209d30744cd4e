"""Where the 0.3 features meet: the 503 handler, the options module, the first-hour errors."""

from __future__ import annotations

import asyncio
import warnings
from collections.abc import Callable, Coroutine
from decimal import Decimal
from fractions import Fraction
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager
from fastapi import Depends, FastAPI, WebSocket
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketDenialResponse

from fastapi_once import OnceLoopWarning, once, once_lifespan, reset_all
from fastapi_once._loops import close


async def _status_after_shutdown(app: FastAPI, path: str) -> tuple[int, str | None]:
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
        async with LifespanManager(app):
            pass  # started, then shut down: the loop's onces are closed
        response = await http.get(path)
    return response.status_code, response.headers.get("retry-after")


@pytest.mark.anyio
async def test_a_mounted_sub_apps_request_after_shutdown_began_gets_503() -> None:
    """A FastAPI app mounted under the app whose lifespan is once_lifespan answers 503 too."""

    @once(name="meetings.mounted.db")
    async def get_db() -> str:
        return "db"

    sub = FastAPI()

    @sub.get("/x")
    async def x(db: str = Depends(get_db)) -> str:
        return db

    app = FastAPI(lifespan=once_lifespan())
    app.mount("/sub", sub)
    assert await _status_after_shutdown(app, "/sub/x") == (503, "1")


@pytest.mark.anyio
async def test_a_mounted_sub_apps_own_handler_for_once_errors_is_kept() -> None:
    """A sub-app that handles OnceError itself keeps its handler; the outer app gets the 503."""
    from fastapi import Request
    from fastapi.responses import PlainTextResponse

    from fastapi_once import OnceError

    @once(name="meetings.mounted.own")
    async def get_db() -> str:
        return "db"

    sub = FastAPI()

    async def mine(request: Request, exc: Exception) -> PlainTextResponse:
        return PlainTextResponse("mine", status_code=418)

    sub.add_exception_handler(OnceError, mine)

    @sub.get("/x")
    async def x(db: str = Depends(get_db)) -> str:
        return db

    app = FastAPI(lifespan=once_lifespan())

    @app.get("/y")
    async def y(db: str = Depends(get_db)) -> str:
        return db

    app.mount("/sub", sub)
    assert await _status_after_shutdown(app, "/sub/x") == (418, None)
    assert await _status_after_shutdown(app, "/y") == (503, "1")


@pytest.mark.parametrize(
    ("made_with", "asked", "error", "says"),
    [
        ({"ttl": 1}, {"ttl": True}, TypeError, "ttl takes seconds as a number"),
        ({"retries": 1}, {"retries": True}, TypeError, "retries must be"),
        ({"ttl": 1}, {"ttl": 10**5000}, ValueError, "ttl is too large"),
        ({"version": 1}, {"version": True}, TypeError, "version= takes a string or an int"),
    ],
)
def test_asking_an_existing_once_again_checks_the_options_as_a_new_one(
    made_with: dict[str, object], asked: dict[str, object], error: type[Exception], says: str
) -> None:
    """once(fn, ttl=True) on a function that already has once(fn, ttl=1) is refused as a bool,
    not returned because True == 1; a huge integer is named, not a bare conversion error."""

    async def fn() -> int:
        return 1

    made = once(fn, **made_with)  # type: ignore[call-overload]
    with pytest.raises(error, match=says):
        once(fn, **asked)  # type: ignore[call-overload]
    assert once(fn) is made  # kept alive until here: onces are interned weakly


def test_a_version_too_long_to_write_is_refused_naming_the_option() -> None:
    """version=10**5000 (more digits than Python writes as text) is a ValueError naming the once
    and the option, not a bare conversion error."""

    async def fn() -> int:
        return 1

    with pytest.raises(ValueError, match=r"once\(.*fn, version=<an integer of 5001 digits>\)"):
        once(fn, version=10**5000)


def test_asking_an_existing_once_method_again_checks_the_options_as_a_new_one() -> None:
    """once(Cls.method, ttl=True) on a method made with ttl=1 is refused as a bool."""

    class Service:
        @once(ttl=1)
        async def client(self) -> int:
            return 1

    with pytest.raises(TypeError, match="ttl takes seconds as a number"):
        once(Service.client, ttl=True)  # type: ignore[call-overload]
    assert once(Service.client, ttl=1) is Service.__dict__["client"]


def _loop_warnings(run: object) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert callable(run)
        run()
    return [w for w in caught if issubclass(w.category, OnceLoopWarning)]


def test_a_once_reset_by_its_own_reset_before_its_loop_ends_is_not_reported() -> None:
    """A loop per test whose teardown is ``await the_once.reset()``: the next loop making the
    value again is expected, as after reset_all(); without that reset it is reported."""

    @once(name="meetings.perloop.client")
    async def client() -> str:
        return "client"

    async def with_teardown() -> None:
        assert await client() == "client"
        await client.reset()

    async def without_teardown() -> None:
        assert await client() == "client"

    def loops(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
        for _ in range(3):
            asyncio.run(main())

    assert _loop_warnings(lambda: loops(with_teardown)) == []
    (report, *_) = _loop_warnings(lambda: loops(without_teardown))
    assert "meetings.perloop.client: its value is made again" in str(report.message)


def test_process_scope_onces_used_from_several_loops_are_not_reported() -> None:
    """A CLI calling asyncio.run() several times: a scope="process" once keeps one value in its
    own loop, so no loop's end is a mistake."""

    @once(scope="process", name="meetings.perloop.model")
    def model() -> str:
        return "model"

    async def main() -> None:
        assert await model() == "model"

    def loops() -> None:
        for _ in range(3):
            asyncio.run(main())

    assert _loop_warnings(loops) == []


@pytest.mark.anyio
async def test_an_app_with_its_own_middleware_gets_503_after_shutdown_began() -> None:
    """BaseHTTPMiddleware and @app.middleware layers between the app and its exception
    middleware: the handler still reaches the stack built before startup."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.middleware.gzip import GZipMiddleware

    @once(name="meetings.middleware.db")
    async def get_db() -> str:
        return "db"

    app = FastAPI(lifespan=once_lifespan())
    app.add_middleware(GZipMiddleware)
    app.add_middleware(BaseHTTPMiddleware, dispatch=lambda request, call_next: call_next(request))

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    assert await _status_after_shutdown(app, "/") == (503, "1")


def test_a_websocket_after_shutdown_began_is_denied_with_503() -> None:
    """A WebSocket route whose dependency is a once: the handshake is refused with 503 (the
    denial response), not left hanging or answered 500."""

    @once(name="meetings.websocket.db")
    async def get_db() -> str:
        return "db"

    app = FastAPI(lifespan=once_lifespan())

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, db: str = Depends(get_db)) -> None:
        await websocket.accept()
        await websocket.send_text(db)
        await websocket.close()

    with TestClient(app) as http:
        with http.websocket_connect("/ws") as socket:
            assert socket.receive_text() == "db"
        assert http.portal is not None
        http.portal.call(close, 1.0)  # shutdown began: the loop's onces are closed
        with pytest.raises(WebSocketDenialResponse) as denied, http.websocket_connect("/ws"):
            pass
        assert denied.value.status_code == 503
        http.portal.call(reset_all)


_SECONDS = ("timeout", "cooldown", "ttl", "refresh", "stale_if_error", "jitter", "backoff")
_BAD = {
    "bool": True,
    "nan": float("nan"),
    "inf": float("inf"),
    "-0.0": -0.0,
    "10**400": 10**400,
    "-10**400": -(10**400),
    "str": "1",
    "Decimal": Decimal("1.5"),
    "Fraction": Fraction(3, 2),
}


@pytest.mark.parametrize("option", _SECONDS)
@pytest.mark.parametrize("bad", list(_BAD), ids=list(_BAD))
def test_every_seconds_option_of_once_refuses_every_bad_value_naming_it(
    option: str, bad: str
) -> None:
    """Each duration option x {bool, NaN, inf, -0.0, huge ints, str, number types that are
    not int or float}: a TypeError or ValueError naming once, the option and the value."""
    value = _BAD[bad]

    async def fn() -> int:
        return 1

    options: dict[str, object] = {option: value}
    if option in ("refresh", "stale_if_error", "jitter"):
        options["ttl"] = 10**6
    if option == "backoff":
        options["retries"] = 1
        if bad == "-0.0":  # backoff=0 is allowed (no delay between retries), and -0.0 == 0
            assert once(fn, **options).status().state == "idle"  # type: ignore[call-overload]
            return
    with pytest.raises((TypeError, ValueError)) as caught:
        once(fn, **options)  # type: ignore[call-overload]
    message = str(caught.value)
    assert message.startswith("once(")
    assert f"{option}=" in message
    assert "seconds" in message


@pytest.mark.parametrize(
    ("function", "option", "value"),
    [
        ("once_lifespan", "shutdown_timeout", value)
        for value in (True, float("nan"), float("inf"), -0.0, 10**400, "1")
    ]
    + [
        ("readiness_router", option, value)
        for option in ("ping_timeout", "ping_every")
        for value in (True, float("nan"), float("inf"), -0.0, 10**400, "1")
    ]
    + [("readiness_router", "retry_after", value) for value in (True, 1.5, 10**400, "1")],
)
def test_lifespan_and_readiness_options_refuse_bad_values_naming_them(
    function: str, option: str, value: object
) -> None:
    """The same values for once_lifespan() and readiness_router(): refused at construction."""
    from fastapi_once import readiness_router

    async def fn() -> int:
        return 1

    def make() -> object:
        if function == "once_lifespan":
            return once_lifespan(**{option: value})  # type: ignore[arg-type]
        return readiness_router(once(fn), **{option: value})  # type: ignore[arg-type]

    with pytest.raises((TypeError, ValueError)) as caught:
        make()
    assert str(caught.value).startswith(f"{function}({option}=")


def test_numpy_floats_are_taken_and_other_numpy_numbers_refused_naming_the_fix() -> None:
    """numpy.float64 is a float and works as seconds; numpy.float32 and numpy.int64 are neither
    int nor float: a TypeError that says to give an int or float."""
    numpy = pytest.importorskip("numpy")

    async def fn() -> int:
        return 1

    made = once(fn, ttl=numpy.float64(1.5))
    assert made.status().state == "idle"
    for value in (numpy.float32(1.5), numpy.int64(2)):

        async def other() -> int:
            return 1

        with pytest.raises(TypeError, match=r"ttl takes seconds as a number \(int or float\)"):
            once(other, ttl=value)
