"""The public surface: a curated, sorted __all__, each name documented."""

from __future__ import annotations

from types import ModuleType

import fastapi_once
import fastapi_once.backends


def test_exported_members_are_sorted_and_documented() -> None:
    """__all__ lists exactly the public names, sorted, each with a docstring."""
    assert fastapi_once.__all__ == sorted(fastapi_once.__all__)
    public = {
        name
        for name in dir(fastapi_once)
        if not name.startswith("_") and not isinstance(getattr(fastapi_once, name), ModuleType)
    }
    assert set(fastapi_once.__all__) == public
    for name in fastapi_once.__all__:
        assert getattr(fastapi_once, name).__doc__, name


def test_the_core_does_not_import_fastapi() -> None:
    """The primitive is anyio-only: _core has no FastAPI or Starlette import."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(fastapi_once._core.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert not imported & {"fastapi", "starlette", "pydantic"}
