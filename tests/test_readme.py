"""Every Python example in README.md runs, and the main ones do what the text says."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from fastapi import Request
from fastapi.testclient import TestClient

README = Path(__file__).parent.parent / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def run(block: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(block, f"README.md:{name}", "exec"), namespace)
    return namespace


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index: int) -> None:
    """Each ```python block of the README executes without error."""
    run(BLOCKS[index], f"readme_{index}")


def _block_defining(name: str) -> str:
    return next(b for b in BLOCKS if f"def {name}(" in b)


def test_the_first_example_serves_the_model_made_once() -> None:
    """The opening example: the lifespan warms load_model and the route returns it."""
    namespace = run(BLOCKS[0], "readme_first")
    with TestClient(namespace["app"]) as http:
        assert http.get("/predict").json() == {"weights": "..."}


def test_the_keyed_example_keeps_one_value_per_url() -> None:
    """The get_stuff(url) example answers per URL."""
    namespace = run(_block_defining("get_stuff"), "readme_keyed")
    with TestClient(namespace["app"]) as http:
        assert http.get("/stuff", params={"url": "/a"}).json() == "fetched /a"
        assert http.get("/stuff", params={"url": "/b"}).json() == "fetched /b"


def test_the_lifespan_example_passes_state_to_requests() -> None:
    """The once_lifespan example warms its onces and its user state reaches requests."""
    namespace = run(_block_defining("run_migrations"), "readme_lifespan")
    app = namespace["app"]
    seen: list[Any] = []

    @app.get("/state")
    async def state(request: Request) -> None:
        seen.append(request.state.started)

    with TestClient(app) as http:
        http.get("/state")
    assert seen == [True]


def test_the_across_example_builds_its_backend_from_the_environment_at_startup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The once-per-deployment example reads ONCE_BACKEND_URL when the lifespan first needs it."""
    namespace = run(_block_defining("migrate"), "readme_across")
    monkeypatch.setenv("ONCE_BACKEND_URL", f"file://{tmp_path}/locks")
    with TestClient(namespace["app"]):
        pass
    assert [p.suffix for p in sorted((tmp_path / "locks").iterdir())] == [".json", ".lock"]


def test_the_methods_example_serves_the_instances_pool() -> None:
    """The Methods example: Depends(store.pool) serves that instance's value."""
    namespace = run(_block_defining("_connect"), "readme_methods")
    with TestClient(namespace["app"]) as http:
        assert http.get("/pool").json() == "pool for postgresql://db/app"
