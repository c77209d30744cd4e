"""Backends bound late: built from a URL or a factory at first use, and bound to one once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeAlias
from urllib.parse import unquote, urlsplit

from anyio.lowlevel import RunVar

from .._logs import error_type, fields
from ._base import Backend, Scrubber
from ._codec import ResultCodec
from ._lease import Forget, OnBackendError, StoreBackend, logger
from ._store import UNKEYED

#: What ``once(across=)`` takes: a backend, a backend URL, or a function returning either.
Across: TypeAlias = Backend | str | Callable[[], Backend | str]

_SCHEMES = ("file", "redis", "rediss", "postgresql", "postgres", "mysql", "mariadb")


def backend_from_url(url: str, **options: Any) -> Backend:
    """Build the backend that ``url`` names; nothing is connected or created until first use.

    - ``file:///var/lib/myapp/locks``: :class:`~fastapi_once.backends.FileLockBackend` in that
      directory; ``file://`` alone: its default private directory under the system temp dir.
    - ``redis://[:password@]host[:port][/db]``, ``rediss://...`` (TLS):
      :class:`~fastapi_once.backends.RedisBackend`.
    - ``postgresql://user:password@host[:port]/db``, ``postgres://...``:
      :class:`~fastapi_once.backends.PostgresBackend`.
    - ``mysql://user:password@host[:port]/db``, ``mariadb://...``:
      :class:`~fastapi_once.backends.MySQLBackend`.

    Args:
        url: the backend's URL; its password never appears in errors, logs or ``describe()``.
        options: keyword arguments for the backend's constructor (``wait_timeout=``, ``ttl=``,
            ``namespace=``, ``table=``...).

    Raises:
        ValueError: the URL's scheme is none of the above, a ``file:`` URL names a host, or a
            Redis URL's database part is not a number.
        ImportError: the backend's driver is not installed (the message names the extra).
    """
    scheme = _scheme(url)
    if scheme == "file":
        from ._file import FileLockBackend

        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost"):
            raise ValueError(
                f"backend URL {url!r}: a file: URL names a local directory, "
                "file:///absolute/path (three slashes), not a host"
            )
        return FileLockBackend(unquote(parts.path) or None, **options)
    if scheme in ("redis", "rediss"):
        from ._redis import RedisBackend

        return RedisBackend(url, **options)
    if scheme in ("mysql", "mariadb"):
        from ._mysql import MySQLBackend

        return MySQLBackend(url, **options)
    from ._postgres import PostgresBackend

    return PostgresBackend(url, **options)


def _scheme(url: str) -> str:
    scheme, sep, _ = url.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in _SCHEMES:
        raise ValueError(
            f"backend URL {Scrubber(url).shown!r}: unknown scheme; give file:///path, "
            "redis://host:6379/0, rediss://host:6380/0, postgresql://user@host/db or "
            "mysql://user@host/db"
        )
    if scheme in ("redis", "rediss"):
        db = urlsplit(url).path.strip("/")
        if db and not db.isdigit():  # the driver would silently use database 0
            raise ValueError(
                f"backend URL {Scrubber(url).shown!r}: the database part /{db} is not a "
                "number; give the Redis database index, e.g. redis://host:6379/0"
            )
    return scheme


class BoundBackend:
    """The backend of one once, built at first use from a URL or factory, and decoding results
    into the type the once's function is annotated to return.

    A URL's scheme is checked at once; the backend is built at the first call of the once (or
    of its reset) in each event loop. Every once given the same URL string or factory shares
    the backend built from it in that loop; a new loop (a test's new ``TestClient``) builds a
    new one, reading the configuration again.

    Args:
        across: a :class:`Backend`, a backend URL (see :func:`backend_from_url`), or a function
            of no arguments returning either.
        fn: the once's function, whose return annotation types the shared result.
        name: the once's name, for messages.
        on_error: ``once(on_backend_error=)``, for a backend of the lease algorithm.
        forget: the core's callback for resets heard from other processes.

    Raises:
        TypeError: ``across`` is none of these, or the annotation is not one pydantic serialises.
        ValueError: a URL with an unknown scheme.
    """

    def __init__(
        self,
        across: Across,
        *,
        fn: Callable[..., Any],
        name: str,
        on_error: OnBackendError = "raise",
        forget: Forget | None = None,
    ) -> None:
        if isinstance(across, str):
            try:
                _scheme(across)
            except ValueError as exc:
                raise ValueError(f"once({name}, across=...): {exc}") from None
        elif not isinstance(across, Backend) and not callable(across):
            raise TypeError(
                f"once({name}, across={across!r}): across= takes a backend from "
                "fastapi_once.backends (e.g. FileLockBackend()), a backend URL "
                "('redis://host:6379/0'), or a function of no arguments returning either"
            )
        self._source = across
        self._name = name
        self.on_error: OnBackendError = on_error
        self._forget = forget
        self.codec = ResultCodec.for_function(fn, name)
        if isinstance(across, Backend) and forget is not None:
            across.attach(forget)

    @property
    def backend(self) -> Backend:
        """The backend itself, built now (in the running loop) if given as a URL or factory.

        Raises:
            TypeError: the factory returned something else than a backend or a URL.
            ValueError: the URL names no backend (the message names the once).
        """
        source = self._source
        if isinstance(source, Backend):
            return source
        built = _built.get({})
        if source not in built:
            made = source() if callable(source) else source
            if isinstance(made, str):
                try:
                    made = backend_from_url(made)
                except ValueError as exc:
                    raise ValueError(f"once({self._name}, across=...): {exc}") from None
            if not isinstance(made, Backend):
                what = getattr(source, "__qualname__", repr(source))
                raise TypeError(
                    f"once({self._name}, across={what}): the factory returned a "
                    f"{type(made).__qualname__}; it must return a backend from "
                    "fastapi_once.backends or a backend URL string"
                )
            if self._forget is not None:
                made.attach(self._forget)
            built[source] = made
            _built.set(built)
        return built[source]

    async def share(
        self,
        key: str | None,
        work: Callable[[], Awaitable[Any]],
        *,
        ttl: float | None,
        cooldown: float | None = None,
        refresh: float | None = None,
        fell_back: Callable[[], None] | None = None,
        kept: bool = False,
    ) -> Any:
        """Run ``work`` once across processes (for ``key``, a digest, if given); return its
        result as the annotated type.

        A backend of the lease algorithm applies the once's ``on_backend_error`` (calling
        ``fell_back`` at each fallback; never while the once ``kept`` a value, which its
        failure leaves served); another backend runs as it always did.

        Raises:
            TypeError: the result does not match the annotation or cannot be encoded, the
                recorded result does not match it, or the backend does not keep keyed records.
        """
        backend, codec = self.backend, self.codec

        async def made() -> Any:
            return codec.to_data(self._name, await work(), backend.describe())

        if isinstance(backend, StoreBackend):
            on_error = "fail" if kept and self.on_error == "local" else self.on_error
            data = await backend.share(
                self._name,
                UNKEYED if key is None else key,
                made,
                ttl=backend.ttl if ttl is None else ttl,  # the backend's ttl= is the default
                cooldown=cooldown,
                refresh=refresh,
                on_error=on_error,
                fell_back=fell_back,
            )
        elif key is None:
            data = await backend.run_once(self._name, made, ttl=ttl)
        else:
            assert ttl is not None  # a keyed once across processes has a ttl
            data = await backend.run_keyed(
                self._name, key, made, ttl=ttl, cooldown=cooldown, refresh=refresh
            )
        return codec.from_data(data)

    async def reset(self, name: str) -> None:
        """Clear ``name``'s record in the backend."""
        await self.backend.reset(name)

    async def reset_keyed(self, name: str, key: str | None) -> None:
        """Clear ``name``'s record for ``key`` (every key's, if None) in the backend."""
        await self.backend.reset_keyed(name, key)

    def describe(self) -> str:
        """The backend's description; before it is built (in this loop), where it comes from."""
        source = self._source
        try:
            built = source if isinstance(source, Backend) else _built.get({}).get(source)
        except RuntimeError:  # no event loop running
            built = None
        if built is not None:
            return built.describe()
        if isinstance(source, str):
            return f"backend at {Scrubber(source).shown} (built at first use)"
        what = getattr(source, "__qualname__", type(source).__qualname__)
        return f"backend from {what}() (built at first use)"

    def __repr__(self) -> str:
        return f"<{self.describe()}>"


# The backends built in the running event loop, by the URL or factory they came from. Only the
# loop's thread touches them, never across an await; a built backend is never replaced.
_built: RunVar[dict[object, Backend]] = RunVar("fastapi_once.backends.built")


async def close_built() -> None:
    """Close the backends built from URLs and factories in the running event loop.

    ``once_lifespan`` calls it at shutdown, after the values' cleanups, so that a served app
    never leaves a store's listener or connections to the loop's last-resort cancellation. The
    backends are forgotten first: a later call in this loop builds new ones. Backend objects
    the app made itself are the app's to close. Never raises; a failure is logged by its type
    (a driver's message may hold a DSN).
    """
    built = _built.get({})
    _built.set({})
    for backend in built.values():
        try:
            await backend.aclose()
        except Exception as exc:
            kind = error_type(exc)
            logger.warning(
                "closing %s failed with %s",
                backend.describe(),
                kind,
                extra=fields(None, "backend_close_failed", error_type=kind),
            )
