"""The FastAPI layer: Depends(o) everywhere, sub-dependencies resolved once, parameter checks."""

from collections.abc import AsyncIterator
from typing import Annotated, Any

import httpx
import pytest
from fastapi import (
    APIRouter,
    BackgroundTasks,
    Body,
    Cookie,
    Depends,
    FastAPI,
    Header,
    Query,
    Request,
    Response,
    WebSocket,
)
from fastapi.security import SecurityScopes
from fastapi.testclient import TestClient
from starlette.requests import HTTPConnection

from fastapi_once import once

pytestmark = pytest.mark.anyio


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


async def test_depends_in_two_routes_means_one_setup() -> None:
    """The same once in two routes (and a router) is one setup shared by all."""
    runs = 0

    @once
    async def load_model() -> dict[str, int]:
        nonlocal runs
        runs += 1
        return {"id": runs}

    app = FastAPI()
    router = APIRouter()

    @app.get("/a")
    async def a(model: Annotated[dict[str, int], Depends(load_model)]) -> dict[str, int]:
        return model

    @router.get("/b")
    async def b(model: dict[str, int] = Depends(load_model)) -> dict[str, int]:
        return model

    app.include_router(router, prefix="/r")
    async with client(app) as http:
        for path in ["/a", "/r/b", "/a", "/r/b"]:
            assert (await http.get(path)).json() == {"id": 1}
    assert runs == 1


async def test_a_mounted_sub_app_initialises_lazily_through_depends() -> None:
    """A once used by a mounted sub-app (whose lifespan never runs) is made on first request."""
    runs = 0

    @once
    async def load_model() -> str:
        nonlocal runs
        runs += 1
        return "model"

    sub = FastAPI()

    @sub.get("/predict")
    async def predict(model: str = Depends(load_model)) -> str:
        return model

    host = FastAPI()
    host.mount("/sub", sub)
    async with client(host) as http:
        assert (await http.get("/sub/predict")).json() == "model"
        assert (await http.get("/sub/predict")).json() == "model"
    assert runs == 1


def test_a_websocket_route_can_depend_on_a_once() -> None:
    """Depends(o) works in a WebSocket route, with and without sub-dependencies."""

    def get_settings() -> str:
        return "settings"

    @once
    async def load_model(settings: str = Depends(get_settings)) -> str:
        return f"model with {settings}"

    app = FastAPI()

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, model: str = Depends(load_model)) -> None:
        await websocket.accept()
        await websocket.send_text(model)
        await websocket.close()

    with TestClient(app) as http, http.websocket_connect("/ws") as websocket:
        assert websocket.receive_text() == "model with settings"


async def test_sub_dependencies_are_resolved_once_not_per_request() -> None:
    """Depends() parameters of fn (nested, sync and generator) run once, when the value is made."""
    calls: dict[str, int] = {"settings": 0, "engine": 0, "engine closed": 0}

    def get_settings() -> dict[str, str]:
        calls["settings"] += 1
        return {"dsn": "sqlite://"}

    async def get_engine(
        settings: Annotated[dict[str, str], Depends(get_settings)],
    ) -> AsyncIterator[str]:
        calls["engine"] += 1
        yield f"engine({settings['dsn']})"
        calls["engine closed"] += 1

    @once
    async def get_db(
        engine: Annotated[str, Depends(get_engine)],
        settings: dict[str, str] = Depends(get_settings),
    ) -> str:
        return f"db on {engine} / {settings['dsn']}"

    app = FastAPI()

    @app.get("/")
    async def root(db: Annotated[str, Depends(get_db)]) -> str:
        return db

    async with client(app) as http:
        for _ in range(5):
            assert (await http.get("/")).json() == "db on engine(sqlite://) / sqlite://"
    # get_settings is cached within the one resolution, as FastAPI caches it within a request.
    assert calls == {"settings": 1, "engine": 1, "engine closed": 0}
    await get_db.reset()
    assert calls["engine closed"] == 1


async def test_dependency_overrides_of_sub_dependencies_are_honoured() -> None:
    """app.dependency_overrides replaces a sub-dependency when the value is made."""

    def get_settings() -> str:
        return "production"

    @once
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return f"db for {settings}"

    app = FastAPI()

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    app.dependency_overrides[get_settings] = lambda: "test"
    async with client(app) as http:
        assert (await http.get("/")).json() == "db for test"


async def test_an_override_that_is_itself_a_once_is_made_once() -> None:
    """A sub-dependency overridden by a once resolves through that once."""
    runs = 0

    def get_settings() -> str:
        return "production"

    @once
    async def test_settings() -> str:
        nonlocal runs
        runs += 1
        return "test"

    @once
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return f"db for {settings}"

    app = FastAPI()
    app.dependency_overrides[get_settings] = test_settings

    @app.get("/")
    async def root(db: str = Depends(get_db), settings: str = Depends(test_settings)) -> str:
        return f"{db}, {settings}"

    async with client(app) as http:
        assert (await http.get("/")).json() == "db for test, test"
    assert runs == 1


async def test_an_override_that_reads_the_request_is_refused() -> None:
    """An override of a sub-dependency may not read the request either."""

    def get_settings() -> str:
        return "production"

    @once
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return settings

    def from_header(x_env: str = Header()) -> str:
        return x_env

    app = FastAPI()
    app.dependency_overrides[get_settings] = from_header

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    async with client(app) as http:
        with pytest.raises(TypeError, match=r"override.*reads the request"):
            await http.get("/")


async def test_dependency_overrides_of_the_once_itself_work() -> None:
    """app.dependency_overrides[o] replaces the once in routes, as for any dependency."""
    runs = 0

    @once
    async def load_model() -> str:
        nonlocal runs
        runs += 1
        return "real"

    app = FastAPI()

    @app.get("/")
    async def root(model: str = Depends(load_model)) -> str:
        return model

    app.dependency_overrides[load_model] = lambda: "fake"
    async with client(app) as http:
        assert (await http.get("/")).json() == "fake"
    assert runs == 0


async def test_a_once_with_sub_dependencies_can_be_awaited_directly() -> None:
    """Outside a request, sub-dependencies are resolved without overrides."""

    def get_settings() -> str:
        return "settings"

    @once
    async def get_db(settings: str = Depends(get_settings)) -> str:
        return f"db with {settings}"

    assert await get_db() == "db with settings"


async def test_a_keyed_once_takes_request_data_and_keeps_one_value_per_key() -> None:
    """Query parameters are allowed with key=: one value per distinct key."""
    runs: list[str] = []

    def get_settings() -> str:
        return "s"

    @once(key=lambda url: url)
    async def get_stuff(url: str, settings: str = Depends(get_settings)) -> str:
        runs.append(url)
        return f"{url} ({settings})"

    app = FastAPI()

    @app.get("/stuff")
    async def stuff(value: str = Depends(get_stuff)) -> str:
        return value

    async with client(app) as http:
        assert (await http.get("/stuff", params={"url": "/a"})).json() == "/a (s)"
        assert (await http.get("/stuff", params={"url": "/b"})).json() == "/b (s)"
        assert (await http.get("/stuff", params={"url": "/a"})).json() == "/a (s)"
        assert (await http.get("/stuff")).status_code == 422
    assert runs == ["/a", "/b"]


@pytest.mark.parametrize(
    "default",
    [Query(), Header(), Cookie(), Body()],
    ids=["query", "header", "cookie", "body"],
)
def test_request_data_without_key_is_refused(default: Any) -> None:
    """Without key=, a request-data parameter is a TypeError: its value would be shared."""

    async def get_stuff(url: str = default) -> str:
        return url

    with pytest.raises(TypeError, match=r"parameter 'url' is request data.*shared with every"):
        once(get_stuff)


@pytest.mark.parametrize(
    ("annotation", "label"),
    [
        (Request, "Request"),
        (WebSocket, "WebSocket"),
        (HTTPConnection, "HTTPConnection"),
        (Response, "Response"),
        (BackgroundTasks, "BackgroundTasks"),
        (SecurityScopes, "SecurityScopes"),
    ],
)
def test_per_request_objects_are_refused_naming_the_parameter(annotation: Any, label: str) -> None:
    """Request, WebSocket, Response... belong to one request: TypeError at once() time."""

    async def make(conn: Any) -> None:
        return None

    make.__annotations__["conn"] = annotation
    with pytest.raises(TypeError, match=rf"parameter 'conn' is a {label}"):
        once(make)


def test_a_sub_dependency_tree_that_reads_the_request_is_refused() -> None:
    """A sub-dependency (however deep) that reads the request: TypeError naming the chain."""

    def get_token(authorization: str = Header()) -> str:
        return authorization

    def get_user(token: str = Depends(get_token)) -> str:
        return token

    async def make(user: str = Depends(get_user)) -> str:
        return user

    with pytest.raises(
        TypeError, match=r"parameter user -> token depends on .*get_token.*'authorization'"
    ):
        once(make)


def test_a_keyed_once_as_a_sub_dependency_is_refused() -> None:
    """A keyed once needs request data, so it cannot be a once's sub-dependency."""

    @once(key=lambda url: url)
    async def get_stuff(url: str) -> str:
        return url

    async def make(stuff: str = Depends(get_stuff)) -> str:
        return stuff

    with pytest.raises(TypeError, match="keyed"):
        once(make)


def test_fastapi_sees_only_what_it_must_resolve_per_request() -> None:
    """The dependency signature hides sub-dependencies behind one connection parameter."""
    import inspect

    def get_settings() -> str:
        return "s"

    @once
    async def plain() -> str:
        return "p"

    @once
    async def with_sub(settings: str = Depends(get_settings)) -> str:
        return settings

    @once(key=lambda url: url)
    async def keyed(url: str, settings: str = Depends(get_settings)) -> str:
        return url

    assert list(inspect.signature(plain).parameters) == []
    assert list(inspect.signature(with_sub).parameters) == ["fastapi_once_connection"]
    assert list(inspect.signature(keyed).parameters) == ["url", "fastapi_once_connection"]


def test_parameters_fastapi_cannot_read_are_a_type_error() -> None:
    """A parameter FastAPI cannot interpret fails at once() time, naming the once."""

    class Opaque:
        pass

    async def make(thing: Opaque) -> None:
        return None

    with pytest.raises(TypeError, match=r"once\(.*make\): FastAPI cannot read"):
        once(make)


def test_a_sub_dependency_taking_the_request_is_refused() -> None:
    """A sub-dependency with a Request parameter is named in the error."""

    def client_ip(request: Request) -> str:
        return str(request.client)

    async def make(ip: str = Depends(client_ip)) -> str:
        return ip

    with pytest.raises(TypeError, match=r"parameter ip depends on .*client_ip.*is a Request"):
        once(make)
