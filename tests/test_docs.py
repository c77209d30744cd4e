"""Every Python example in README.md and the documentation site (docs/) runs, and the main ones
do what the text says."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from docblocks import DOCS, README, Block, python_blocks
from fastapi import Request
from fastapi.testclient import TestClient

BLOCKS = python_blocks()


def run(block: str, name: str) -> dict[str, Any]:
    namespace: dict[str, Any] = {"__name__": name}
    exec(compile(block, name, "exec"), namespace)
    return namespace


@pytest.mark.parametrize("block", BLOCKS, ids=[b.where for b in BLOCKS])
def test_documented_example_runs(block: Block) -> None:
    """Each ```python block of the README and of every docs/ page executes without error."""
    run(block.code, block.where)


def test_every_page_of_the_site_is_read() -> None:
    """The blocks come from README.md and every docs/*.md page that has one."""
    pages = {b.where.split(":")[0] for b in BLOCKS}
    assert "README.md" in pages
    assert {f"docs/{p.name}" for p in DOCS.glob("*.md") if "```python" in p.read_text()} <= pages
    assert len(pages) > 10


def _block_defining(name: str, page: str) -> str:
    return next(b.code for b in BLOCKS if b.where.startswith(page) and f"def {name}(" in b.code)


def test_the_first_example_serves_the_model_made_once() -> None:
    """The README's opening example: the lifespan warms load_model and the route returns it."""
    first = next(b for b in BLOCKS if b.where.startswith(f"{README.name}:"))
    namespace = run(first.code, "readme_first")
    with TestClient(namespace["app"]) as http:
        assert http.get("/predict").json() == {"weights": "..."}


def test_the_keyed_example_keeps_one_value_per_url() -> None:
    """The get_stuff(url) example answers per URL."""
    namespace = run(_block_defining("get_stuff", "docs/keyed.md"), "readme_keyed")
    with TestClient(namespace["app"]) as http:
        assert http.get("/stuff", params={"url": "/a"}).json() == "fetched /a"
        assert http.get("/stuff", params={"url": "/b"}).json() == "fetched /b"


def test_the_lifespan_example_passes_state_to_requests() -> None:
    """The once_lifespan example warms its onces and its user state reaches requests."""
    namespace = run(_block_defining("run_migrations", "docs/lifespan.md"), "readme_lifespan")
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
    namespace = run(_block_defining("migrate", "docs/across.md"), "readme_across")
    monkeypatch.setenv("ONCE_BACKEND_URL", f"file://{tmp_path}/locks")
    with TestClient(namespace["app"]):
        pass
    assert [p.suffix for p in sorted((tmp_path / "locks").iterdir())] == [".json", ".lock"]


def test_the_methods_example_serves_the_instances_pool() -> None:
    """The Methods example: Depends(store.pool) serves that instance's value."""
    namespace = run(_block_defining("_connect", "docs/methods.md"), "readme_methods")
    with TestClient(namespace["app"]) as http:
        assert http.get("/pool").json() == "pool for postgresql://db/app"
