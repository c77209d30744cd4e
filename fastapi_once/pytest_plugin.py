"""The pytest plugin: the ``once_reset`` fixture.

Installed with the package, pytest loads this module by itself (entry point ``fastapi_once`` in the
``pytest11`` group) in every project that has the package installed. It only adds the fixture: no
hooks, no options, and nothing runs unless a test asks for ``once_reset``. ``-p no:fastapi_once``
turns it off; ``pytest_plugins = ["fastapi_once.pytest_plugin"]`` in a root ``conftest.py`` loads it
where automatic loading is off.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from ._loops import forget_everything

__all__ = ["once_reset"]


@pytest.fixture
def once_reset() -> Iterator[None]:
    """After the test, forget every once's values in every event loop and run their cleanups.

    Cleanups run in a fresh event loop (the test's own has ended); their errors are logged,
    not raised. An app tested with ``with TestClient(app)`` and ``once_lifespan`` is already
    reset by its shutdown.
    """
    yield
    forget_everything()
