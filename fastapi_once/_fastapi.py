"""The FastAPI layer: ``once()``, the dependency signature, and sub-dependency resolution."""

from __future__ import annotations

import functools
import inspect
import sys
import threading
import weakref
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Hashable,
    Iterator,
)
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, overload

from fastapi.dependencies.models import Dependant
from fastapi.dependencies.utils import get_dependant, get_typed_signature
from starlette.requests import HTTPConnection

from ._core import Once, make_with
from ._kinds import invoke, kind_of
from ._methods import OnceMethod, classmethod_refused, first_in_class, is_method, method_once
from ._options import Options, check_across, once_options
from ._records import Resolve

if sys.version_info >= (3, 12):  # pragma: no cover
    from typing import ParamSpec, Unpack
else:  # pragma: no cover
    from typing_extensions import ParamSpec, Unpack

if TYPE_CHECKING:
    from .backends._late import BoundBackend

P = ParamSpec("P")
T = TypeVar("T")

# The hidden keyword argument through which FastAPI hands a once the connection, so that
# sub-dependencies are resolved with the app's dependency_overrides.
CONNECTION_PARAM = "fastapi_once_connection"

_SPECIAL_PARAMS = (
    ("request_param_name", "Request"),
    ("websocket_param_name", "WebSocket"),
    ("http_connection_param_name", "HTTPConnection"),
    ("response_param_name", "Response"),
    ("background_tasks_param_name", "BackgroundTasks"),
    ("security_scopes_param_name", "SecurityScopes"),
)


def _call_name(call: Any) -> str:
    return getattr(call, "__qualname__", None) or getattr(call, "__name__", None) or repr(call)


def _request_data(dependant: Dependant) -> list[tuple[str, str]]:
    """(name, kind) of each parameter ``dependant`` reads from the request itself."""
    fields = [
        *dependant.path_params,
        *dependant.query_params,
        *dependant.header_params,
        *dependant.cookie_params,
        *dependant.body_params,
    ]
    return [(f.name, type(f.field_info).__name__.lower()) for f in fields]


def _reads_request(dependant: Dependant) -> str | None:
    """Say which parameter of ``dependant`` reads the request, or None when none does."""
    for attr, label in _SPECIAL_PARAMS:
        name = getattr(dependant, attr)
        if name is not None:
            return f"parameter {name!r} is a {label}"
    data = _request_data(dependant)
    if data:
        name, where = data[0]
        return f"parameter {name!r} is request data ({where})"
    return None


def _check_sub_dependency(owner: str, sub: Dependant, chain: list[str]) -> None:
    """Raise TypeError if the tree under ``sub`` reads the request."""
    call = sub.call
    if isinstance(call, Once):
        if call.keyed:
            raise TypeError(
                f"once({owner}): parameter {chain[0]!r} depends on {call.name}, which is keyed "
                "by request data; a once's sub-dependencies are resolved once for every request"
            )
        return
    reason = _reads_request(sub)
    if reason is not None:
        via = " -> ".join(chain)
        raise TypeError(
            f"once({owner}): parameter {via} depends on {_call_name(call)}, whose {reason}; "
            "a once's sub-dependencies are resolved once and shared by every request, so none "
            "of them may read the request. Read it in the route instead"
        )
    for child in sub.dependencies:
        _check_sub_dependency(owner, child, [*chain, str(child.name)])


def _analyse(fn: Callable[..., Any], name: str) -> Dependant:
    try:
        return get_dependant(path="", call=fn)
    except Exception as exc:
        raise TypeError(f"once({name}): FastAPI cannot read its parameters: {exc}") from exc


def adapt(
    fn: Callable[..., Any], name: str, keyed: bool
) -> tuple[inspect.Signature, SubDependencies | None]:
    """Check ``fn``'s parameters; return its signature as a dependency and its injector.

    The signature FastAPI sees holds only request-data parameters (for keyed onces) and, when
    ``fn`` has sub-dependencies, the hidden connection: FastAPI resolves nothing else per request.
    """
    dependant = _analyse(fn, name)
    for attr, label in _SPECIAL_PARAMS:
        param = getattr(dependant, attr)
        if param is not None:
            raise TypeError(
                f"once({name}): parameter {param!r} is a {label}, which belongs to one request; a "
                "once's value is made once and shared by every request. Use it in the route "
                "instead, or pass what you need from it as request data with key="
            )
    data = _request_data(dependant)
    if data and not keyed:
        param, where = data[0]
        raise TypeError(
            f"once({name}): parameter {param!r} is request data ({where}); without key= the first "
            f"request's {param!r} would be shared with every request. Pass key= to keep one value "
            f"per distinct {param!r} (e.g. once({name}, key=lambda {param}: {param})), or make "
            "it a sub-dependency with Depends()"
        )
    if keyed and not data:
        raise TypeError(
            f"once({name}, key=...): {name} has no request-data parameters to make a key from; "
            "drop key= to keep a single value"
        )
    for sub in dependant.dependencies:
        _check_sub_dependency(name, sub, [str(sub.name)])
    names = {param for param, _ in data}
    params = [p for p in get_typed_signature(fn).parameters.values() if p.name in names]
    injector = None
    if dependant.dependencies:
        injector = SubDependencies(dependant)
        params.append(
            inspect.Parameter(
                CONNECTION_PARAM, inspect.Parameter.KEYWORD_ONLY, annotation=HTTPConnection
            )
        )
    return inspect.Signature(params), injector


class SubDependencies:
    """Resolves ``Depends()`` parameters once, honouring the app's ``dependency_overrides``."""

    param = CONNECTION_PARAM

    def __init__(self, dependant: Dependant) -> None:
        # Only the sub-dependencies: the dependant's own call may be a bound method, which
        # must not be kept alive through here.
        self._dependencies = dependant.dependencies

    def bind(self, context: object) -> Resolve:
        """Return what resolves the sub-dependencies for a connection (or an app)."""
        app = context.scope.get("app") if isinstance(context, HTTPConnection) else context
        overrides = getattr(app, "dependency_overrides", None) or {}

        async def resolve(stack: AsyncExitStack) -> dict[str, Any]:
            return await _solve(self._dependencies, app, overrides, stack, {})

        return resolve


async def _solve(
    dependencies: list[Dependant],
    app: object,
    overrides: dict[Any, Any],
    stack: AsyncExitStack,
    cache: dict[Any, Any],
) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for sub in dependencies:
        assert sub.call is not None
        assert sub.name is not None
        name, call = sub.name, overrides.get(sub.call, sub.call)
        if sub.use_cache and call in cache:
            values[name] = cache[call]
            continue
        if isinstance(call, Once):
            value = await make_with(call, app)
        else:
            if call is not sub.call:
                sub = get_dependant(path="", call=call, name=sub.name, use_cache=sub.use_cache)
                reason = _reads_request(sub)
                if reason is not None:
                    raise TypeError(
                        f"the override {_call_name(call)} of a once's sub-dependency reads the "
                        f"request ({reason}); a once's sub-dependencies are shared by every request"
                    )
            kwargs = await _solve(sub.dependencies, app, overrides, stack, cache)
            value = await invoke(call, kind_of(call), (), kwargs, stack, _call_name(call))
        cache[call] = value
        values[name] = value
    return values


# --- once() ---------------------------------------------------------------------------------------

# Interned onces, held weakly: a once lives as long as someone uses it (a route, a loop's store),
# and a bound method's once does not keep its object alive.
_onces: weakref.WeakValueDictionary[Hashable, Once[Any, Any]] = weakref.WeakValueDictionary()
_onces_lock = threading.Lock()


def _intern_key(fn: Callable[..., Any]) -> Hashable:
    """What identifies ``fn`` for interning: a bound method by (its object, weakly; function)."""
    owner, func = getattr(fn, "__self__", None), getattr(fn, "__func__", None)
    if owner is None or func is None or isinstance(owner, type):
        return fn
    try:
        return (weakref.ref(owner), func)
    except TypeError:  # an object without weak references: interned by the method itself
        return fn


# The types of a call: an unkeyed once takes no arguments (whatever fn's sub-dependencies);
# a keyed once takes what its key= function takes.
class _Decorator(Protocol):
    @overload
    def __call__(self, fn: Once[P, T], /) -> Once[P, T]: ...  # type: ignore[overload-overlap]
    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, T]], /) -> Once[[], T]: ...
    @overload
    def __call__(self, fn: Callable[..., AsyncIterator[T]], /) -> Once[[], T]: ...
    @overload
    def __call__(self, fn: Callable[..., Iterator[T]], /) -> Once[[], T]: ...
    @overload
    def __call__(self, fn: Callable[..., T], /) -> Once[[], T]: ...


class _KeyedDecorator(Protocol[P]):
    @overload
    def __call__(self, fn: Callable[..., Coroutine[Any, Any, T]], /) -> Once[P, T]: ...
    @overload
    def __call__(self, fn: Callable[..., AsyncIterator[T]], /) -> Once[P, T]: ...
    @overload
    def __call__(self, fn: Callable[..., Iterator[T]], /) -> Once[P, T]: ...
    @overload
    def __call__(self, fn: Callable[..., T], /) -> Once[P, T]: ...


@overload
def once(fn: Once[P, T], /, **options: Unpack[Options]) -> Once[P, T]: ...  # type: ignore[overload-overlap]
@overload
def once(
    fn: functools.partialmethod[Coroutine[Any, Any, T]],
    /,
    *,
    key: None = None,
    **options: Unpack[Options],
) -> Once[[], T]: ...
@overload
def once(
    fn: functools.partialmethod[AsyncIterator[T]],
    /,
    *,
    key: None = None,
    **options: Unpack[Options],
) -> Once[[], T]: ...
@overload
def once(
    fn: functools.partialmethod[Iterator[T]], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: functools.partialmethod[T], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: functools.partialmethod[Coroutine[Any, Any, T]],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: functools.partialmethod[AsyncIterator[T]],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: functools.partialmethod[Iterator[T]],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: functools.partialmethod[T],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: Callable[..., Coroutine[Any, Any, T]], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: Callable[..., AsyncIterator[T]], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: Callable[..., Iterator[T]], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: Callable[..., T], /, *, key: None = None, **options: Unpack[Options]
) -> Once[[], T]: ...
@overload
def once(
    fn: Callable[..., Coroutine[Any, Any, T]],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: Callable[..., AsyncIterator[T]],
    /,
    *,
    key: Callable[P, Hashable],
    **options: Unpack[Options],
) -> Once[P, T]: ...
@overload
def once(
    fn: Callable[..., Iterator[T]], /, *, key: Callable[P, Hashable], **options: Unpack[Options]
) -> Once[P, T]: ...
@overload
def once(
    fn: Callable[..., T], /, *, key: Callable[P, Hashable], **options: Unpack[Options]
) -> Once[P, T]: ...
@overload
def once(*, key: None = None, **options: Unpack[Options]) -> _Decorator: ...
@overload
def once(*, key: Callable[P, Hashable], **options: Unpack[Options]) -> _KeyedDecorator[P]: ...
def once(fn: Any = None, /, **options: Any) -> Any:
    """Make ``fn``'s value once per event loop and share it: a single-flight FastAPI dependency.

    ``once(fn)``, ``@once`` and ``@once(**options)`` all return the same :class:`Once` for the
    same function: ``once(fn) is once(fn)`` and ``once(a_once) is a_once``.

    Args:
        fn: an ``async def``, a ``def`` (run in a worker thread), or an (async) generator function
            whose single ``yield`` gives the value and whose code after it is the cleanup. Its
            ``Depends()`` parameters are resolved once, when the value is made.
        key: a function of ``fn``'s request-data parameters (query, path, header, cookie, body)
            that returns a hashable key; the once then keeps one value per key. Required when
            ``fn`` has request-data parameters.
        maxsize: with ``key=``, how many values to keep (least recently used go first; their
            cleanup runs). Default 128.
        across: a backend from :mod:`fastapi_once.backends`, a backend URL
            (``"redis://host:6379/0"``, see :func:`~fastapi_once.backends.backend_from_url`), or
            a function of no arguments returning either (called at first use): run ``fn`` once
            across every process sharing it (leader runs, followers wait and get its result, as
            JSON typed by ``fn``'s return annotation). With ``key=``, once per key (``ttl=`` is
            then required).
        on_backend_error: with ``across=``, what a call does when the backend cannot be
            reached (or does not answer within its ``wait_timeout``): ``"local"`` makes the
            value in this process (one run per key per process, one WARNING per outage, the
            counter ``fastapi_once.backend.fallbacks``) and goes fleet-wide again once the
            backend answers; ``"raise"`` raises BackendError. Default ``"local"`` with
            ``key=``, ``"raise"`` without (an unkeyed once is often a migration that must
            never run unguarded).
        name: the once's name in messages, logs and backends. Default: module.qualname of fn.
        version: appended to the name (``name@version``), so a new deployment runs it again.
        timeout: seconds one attempt may take (retries included); past it the attempt is
            cancelled and its waiters get :class:`OnceTimeoutError`.
        retries: extra tries of ``fn`` within one attempt, after exponential, jittered sleeps;
            waiters keep waiting on the one attempt and get the last error if all fail.
        backoff: with ``retries``, the first sleep's ceiling in seconds (default 0.1), doubling.
        retry_on: with ``retries``, the exception class(es) worth retrying (default
            ``Exception``; a cancellation is never retried).
        cooldown: seconds after a failed attempt during which calls fail fast with its error.
        ttl: seconds a value lives; the next call after that makes a new one.
        refresh: seconds (less than ``ttl``) after which the first call starts one background
            refresh while every caller keeps getting the current value.
        jitter: with ``ttl`` or ``refresh``, up to this many seconds (uniform, one draw per
            value) added to both, so that values made together do not expire together.
        stale_if_error: with ``ttl``, seconds past the ttl during which the old value is still
            served if making a new one fails (the first call past the ttl waits for one attempt
            as usual; if it fails, its callers and later ones get the old value while one
            attempt at a time runs in the background). Past them the old value is retired.
        log_keys: with ``key=``, show keys verbatim in logs, errors and spans (by default a key
            is shown as a short digest, since keys often come from request data).
        ping: ``check(value)``, sync or async, that :func:`readiness_router` runs on the value
            to see that the dependency still answers; it fails by raising or returning False.
        scope: ``"loop"`` (default): one value per event loop, right for loop-bound resources
            (clients, pools). ``"process"``: one value per process, shared by every event loop
            and thread, for loop-independent ones (a model, parsed settings, a lookup table);
            sync code gets it with :meth:`Once.get_sync`. Not for async generators.

    Raises:
        TypeError: ``fn`` is not callable; a parameter reads the request; options do not fit.
        ValueError: ``maxsize`` or a timing option is out of range; ``fn`` already has a once
            with other options.
    """
    if fn is None:
        return lambda f: once(f, **options)
    if isinstance(fn, Once):
        _check_same_options(fn, options)
        return fn
    if isinstance(fn, OnceMethod):
        return fn.again(options)
    if is_method(fn):  # before callable(): a partialmethod is not callable
        return method_once(fn, options, _make)
    if isinstance(fn, classmethod) or first_in_class(fn) == "cls":
        raise classmethod_refused(fn)  # either order of @once and @classmethod, keyed or not
    if not callable(fn):
        raise TypeError(
            f"once() takes a function (async def, def, or generator function), got "
            f"{type(fn).__name__} {fn!r}; use @once on the function that makes the value"
        )
    with _onces_lock:
        existing = _onces.get(_intern_key(fn))
        if existing is not None:
            _check_same_options(existing, options)
            return existing
        made = _onces[_intern_key(fn)] = _make(fn, options)
        return made


def _check_same_options(existing: Once[Any, Any], options: dict[str, Any]) -> None:
    if options and options != existing.options:
        raise ValueError(
            f"once({existing.name}) already exists with options {_show(existing.options)}; asking "
            f"again with {_show(options)} would need a second, different once. Pass the same "
            f"options, or call once({existing.name}) without options to get the existing one"
        )


def _bind_across(fn: Callable[..., Any], name: str, options: dict[str, Any]) -> BoundBackend:
    """Return the once's backend: ``across=`` (a backend, URL or factory) bound to ``fn``."""
    from ._handles import forget_elsewhere
    from .backends._late import BoundBackend

    on_error = check_across(fn, name, options)
    return BoundBackend(
        options["across"], fn=fn, name=name, on_error=on_error, forget=forget_elsewhere
    )


def _show(options: dict[str, Any]) -> str:
    if not options:
        return "(none)"
    return ", ".join(f"{k}={v!r}" for k, v in sorted(options.items()))


def _make(fn: Callable[..., Any], options: dict[str, Any]) -> Once[Any, Any]:
    checked = once_options(
        fn, f"{getattr(fn, '__module__', None) or '?'}.{_call_name(fn)}", options
    )
    name = checked.name
    across = None if options.get("across") is None else _bind_across(fn, name, options)
    signature, injector = adapt(fn, name, keyed=checked.key is not None)
    made: Once[Any, Any] = Once(
        fn,
        name=name,
        key=checked.key,
        maxsize=checked.maxsize,
        injector=injector,
        across=across,
        policy=checked.policy,
        options=options,
        scope=checked.scope,
    )
    made.__signature__ = signature  # type: ignore[attr-defined]
    return made
