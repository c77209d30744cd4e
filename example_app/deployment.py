"""The backend of the example's once-per-deployment task, read from the environment at startup.

``EXAMPLE_BACKEND_URL`` names it (``redis://...``, ``rediss://...``, ``postgresql://...``,
``mysql://...``, ``mariadb://...`` or ``file:///dir``); without it, the migration locks files in
a ``fastapi_once-locks`` directory next to the database file ``$EXAMPLE_DB``. :func:`backend` is
given to ``once(across=)``, which calls it at first use, so importing the app needs neither a
server nor a driver.

The task is "migrate this database": a new database file (the burst's fresh one, or a test's)
is a new deployment, so on Redis, PostgreSQL and MySQL the markers live in a namespace (or table) of
that file, and without ``$EXAMPLE_DB`` (a private database per event loop) in a private
directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Mapping

from fastapi_once.backends import Backend, FileLockBackend, backend_from_url

#: The lock directory's name, next to the database file, unless ``EXAMPLE_BACKEND_URL`` is set.
LOCK_DIR_NAME = "fastapi_once-locks"


def backend(environ: Mapping[str, str] = os.environ) -> Backend:
    """Build the backend that ``$EXAMPLE_BACKEND_URL`` names, for the database ``$EXAMPLE_DB``.

    Raises:
        ValueError: the URL's scheme is not a backend's.
        ImportError: the backend's driver is not installed.
    """
    database = environ.get("EXAMPLE_DB")
    url = environ.get("EXAMPLE_BACKEND_URL", "").strip()
    if not url:
        if not database:
            return FileLockBackend(tempfile.mkdtemp(prefix="example_app-locks-"))
        directory = os.path.dirname(os.path.abspath(database))
        return FileLockBackend(os.path.join(directory, LOCK_DIR_NAME))
    scope = hashlib.sha256(os.path.abspath(database or "-").encode()).hexdigest()[:12]
    scheme = url.partition("://")[0].lower()
    if scheme in ("redis", "rediss"):
        return backend_from_url(url, namespace=f"example_app:{scope}")
    if scheme in ("postgresql", "postgres", "mysql", "mariadb"):
        return backend_from_url(url, table=f"example_app_{scope}")
    return backend_from_url(url)
