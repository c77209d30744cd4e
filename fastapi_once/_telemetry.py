"""What an operator sees of a once: OpenTelemetry spans and metrics, and the fields of its logs.

The state machine calls the hooks below at its transitions; none is on the hot path (a hit, a
join and an eviction only count, and the counts are read by observable instruments when a
reader collects).

OpenTelemetry is used through ``opentelemetry-api`` when it can be imported; without it every
hook does nothing. The tracer and the meter's instruments are obtained once, at import, from the
API's proxies, which bind to an SDK's providers installed later. An attempt is observed by the
providers set when it starts (:func:`traced`, which reads the API's globals: no environment
read, no provider look-up): it gets a span if a real tracer provider is set, and is counted by
the metrics if a meter provider is set; with neither it costs no telemetry call after that one.
Every hook checks ``OTEL`` first, so switching it off (the bench does) compiles the telemetry
out.

Spans (instrumentation scope ``fastapi_once``) never carry an exception message, only its type,
nor a key, only its digest (see :mod:`fastapi_once._keys`), unless the once has ``log_keys=True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
import weakref
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Sequence
from typing import Any, Protocol, cast

from ._keys import NOKEY, key_digest, shared_key_digest
from ._logs import error_type as error_type  # re-exported: the core imports them here
from ._logs import fields as fields

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
    from opentelemetry.metrics import _internal as otel_metrics_state
except ImportError:  # pragma: no cover - tested in a subprocess that hides opentelemetry
    OTEL = False
else:
    OTEL = True

logger = logging.getLogger("fastapi_once")

SCOPE = "fastapi_once"

NAME = "fastapi_once.name"
KEY = "fastapi_once.key_digest"
KEY_SHOWN = "fastapi_once.key"  # only for a once made with log_keys=True
ATTEMPT = "fastapi_once.attempt"
REFRESH = "fastapi_once.refresh"
OUTCOME = "fastapi_once.outcome"
ROLE = "fastapi_once.role"
BACKEND = "fastapi_once.backend"
STATE = "fastapi_once.state"
ERROR_TYPE = "error.type"

STATES = ("idle", "running", "ready", "refreshing", "failed")


class Traced(Protocol):
    """What the hooks read of an attempt (the core's ``Attempt``)."""

    name: str
    key: object
    show_key: bool
    number: int
    span: Any
    watched: bool  # set by traced(): whether ended() records its metrics (and span)
    error: BaseException | None


class Source(Protocol):
    """What the metrics read of a once's store in one loop (the core's ``Store``)."""

    name: str
    hits: int
    joins: int
    evictions: int

    def census(self) -> tuple[int, Sequence[str]]:
        """How many values it holds, and the state of each record (read from any thread)."""


# Every store alive, registered by the core when it makes one; read by the observable
# instruments from the reader's thread.
_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def register(source: Source) -> None:
    """Count ``source`` (a once's store in one loop) in the metrics while it lives."""
    _sources.add(source)


# --- tracing --------------------------------------------------------------------------------------

_tracer_for: tuple[object, Any] = (None, None)  # (provider, its tracer or None): one tuple, so
# a reader in another thread never pairs one provider with another's tracer.

if OTEL:
    from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, StatusCode

    # The attempt whose span is current in a library task (with the span), in that task's context.
    _CURRENT = otel_context.create_key("fastapi_once.attempt")
    # Once, at import: loads a provider named by OTEL_PYTHON_TRACER_PROVIDER, if any; after
    # this the API's global holds every provider set, and reading it is all an attempt does.
    otel_trace.get_tracer_provider()
    _GLOBAL = hasattr(otel_trace, "_TRACER_PROVIDER")


def tracer() -> Any:
    """The package's tracer while a real tracer provider is set, else None (no spans at all)."""
    global _tracer_for
    if not OTEL:
        return None
    # The API's global provider (None until one is set), read without the environment look-up
    # that get_tracer_provider() makes while none is set. An API without that global (a later
    # version) is asked the public way.
    provider = otel_trace._TRACER_PROVIDER if _GLOBAL else otel_trace.get_tracer_provider()
    seen, found = _tracer_for
    if provider is not seen:
        real = provider is not None and not isinstance(
            provider, (ProxyTracerProvider, NoOpTracerProvider)
        )
        found = provider.get_tracer(SCOPE) if real else None  # type: ignore[union-attr]
        _tracer_for = (provider, found)
    return found


def _root(name: str, attributes: dict[str, Any]) -> Any:
    """Start span ``name`` as its own trace's root, linked to the span current here, if any."""
    caller = otel_trace.get_current_span().get_span_context()
    links = [Link(caller)] if caller.is_valid else None
    return tracer().start_span(
        name, context=otel_context.Context(), links=links, attributes=attributes
    )


def _current(span: Any) -> contextlib.AbstractContextManager[Any]:
    # Made current, but left to the caller to end; an exception is recorded by its type only.
    return otel_trace.use_span(
        span, end_on_exit=False, record_exception=False, set_status_on_exception=False
    )


def _named(attempt: Traced) -> dict[str, Any]:
    attributes: dict[str, Any] = {NAME: attempt.name}
    if attempt.key is not NOKEY:
        attributes[KEY] = key_digest(attempt.key)
        if attempt.show_key:
            attributes[KEY_SHOWN] = repr(attempt.key)
    return attributes


def traced(
    attempt: Traced, refresh: bool, work: Coroutine[Any, Any, None]
) -> Coroutine[Any, Any, None]:
    """Run ``work`` (an attempt's library task) inside the attempt's span, if tracing is on.

    Called by the caller that starts the attempt, so the span links to that caller's span; the
    task then runs with the attempt's span current, so spans made by the once's function are
    its children rather than the (possibly long gone) first request's. Marks the attempt
    ``watched`` if a meter provider or a real tracer provider is set: :func:`ended` is called
    for watched attempts only.
    """
    if not OTEL:
        return work
    attempt.watched = not _METER_GLOBAL or otel_metrics_state._METER_PROVIDER is not None
    # No SDK's provider set (the API's global still None): no look-up, not even tracer()'s.
    if (_GLOBAL and otel_trace._TRACER_PROVIDER is None) or tracer() is None:
        return work
    attempt.watched = True
    attributes = {**_named(attempt), ATTEMPT: attempt.number, REFRESH: refresh}
    span = _root("fastapi_once.refresh" if refresh else "fastapi_once.attempt", attributes)
    attempt.span = span.get_span_context()
    return _within(span, attempt, work)


async def _within(span: Any, attempt: Traced, work: Coroutine[Any, Any, None]) -> None:
    context = otel_trace.set_span_in_context(span, otel_context.Context())
    token = otel_context.attach(otel_context.set_value(_CURRENT, (attempt, span), context))
    try:
        await work
    finally:
        if span.is_recording():  # the work ended without an outcome (its loop ended)
            span.end()
        # The finished task stays referenced for a moment (asyncio's done callbacks): its
        # context must not keep the attempt, with its error and that error's frames.
        otel_context.detach(token)


def carry(into: contextvars.Context) -> None:
    """Make the current span current in ``into`` too (work handed to another loop's task).

    A caller that waits in the process scope's loop then links its span to the attempt's, and
    an attempt it starts links back to it, as in the caller's own loop.
    """
    if OTEL:
        into.run(otel_context.attach, otel_context.get_current())


def waits(attempt: Traced, joined: bool) -> None:
    """A caller is about to wait for ``attempt``: link the caller's span to the attempt's."""
    if attempt.span is None or not OTEL:
        return
    span = otel_trace.get_current_span()
    if span.is_recording():
        span.add_link(attempt.span, {NAME: attempt.name, "fastapi_once.joined": joined})


def _ended_span(attempt: Traced, error: BaseException | None) -> None:
    current = otel_context.get_value(_CURRENT)
    if not (isinstance(current, tuple) and current[0] is attempt):
        return
    span = current[1]
    if error is None:
        span.set_attribute(OUTCOME, "success")
    else:
        kind = error_type(error)
        span.set_attributes({OUTCOME: "failure", ERROR_TYPE: kind})
        span.add_event("exception", {"exception.type": kind})
        span.set_status(StatusCode.ERROR, kind)
    span.end()


@contextlib.contextmanager
def _cleanup_span(label: object) -> Iterator[None]:
    # A value's label is the attempt that made it, or (a pinned value) the once's name.
    # An attempt has a key; a pinned value's label is the once's name.
    attributes = _named(cast(Traced, label)) if hasattr(label, "key") else {NAME: str(label)}
    span = _root("fastapi_once.cleanup", attributes)
    try:
        with _current(span):  # spans of the cleanup code are its children
            yield
    except BaseException as exc:
        kind = error_type(exc)
        span.set_attributes({OUTCOME: "failure", ERROR_TYPE: kind})
        span.set_status(StatusCode.ERROR, kind)
        raise
    else:
        span.set_attribute(OUTCOME, "success")
    finally:
        span.end()


def cleanup_span(label: object) -> contextlib.AbstractContextManager[None]:
    """One span around a value's cleanup, linked to the span current in the task doing it."""
    if tracer() is None:
        return contextlib.nullcontext()
    return _cleanup_span(label)


async def across(
    backend: Any,
    name: str,
    work: Callable[[], Awaitable[Any]],
    policy: Any,
    key: object = NOKEY,
    kept: bool = False,
) -> Any:
    """Run ``work`` once across processes through ``backend``; trace, time and log the role.

    The span is a child of the attempt's (it runs in the attempt's task). This process led if
    the backend called ``work`` here; otherwise it followed and waited for another's result.
    The record lives ``policy.ttl``; with a ``key`` (a keyed once) the backend keeps one record
    per key, named by the key's digest, with the policy's cooldown and refresh too, and the span
    carries the key's digest. With ``kept`` (the record keeps a value a failure leaves served),
    the backend never falls back to making the value here.
    """
    led = fell_back = False
    shared = None if key is NOKEY else shared_key_digest(name, key)

    async def lead() -> Any:
        nonlocal led
        led = True
        return await work()

    def fall_back() -> None:
        nonlocal fell_back
        fell_back = True
        if OTEL:
            _fallbacks.add(1, {NAME: name})

    tracing = tracer()
    span = None
    if tracing is not None:
        span = tracing.start_span("fastapi_once.across", attributes={NAME: name})
        span.set_attribute(BACKEND, backend.describe())
        if shared is not None:
            span.set_attribute(KEY, key_digest(key))
    started, error = time.monotonic(), None
    try:
        with _current(span) if span else contextlib.nullcontext():
            return await backend.share(
                shared,
                lead,
                ttl=policy.ttl,
                cooldown=policy.cooldown,
                refresh=policy.refresh,
                fell_back=fall_back,
                kept=kept,
            )
    except BaseException as exc:
        error = exc
        raise
    finally:
        took = time.monotonic() - started
        role = "local" if fell_back else "leader" if led else "follower"
        if role == "follower" and OTEL:
            _follower_wait.record(took, {NAME: name})
        if span is not None:
            span.set_attribute(ROLE, role)
            if error is not None:
                kind = error_type(error)
                span.set_attributes({ERROR_TYPE: kind})
                span.set_status(StatusCode.ERROR, kind)
            span.end()
        logger.info(
            "%s: %s across %s in %.2f s",
            name,
            {"local": "made locally", "leader": "led"}.get(role, "followed"),
            backend.describe(),
            took,
            extra=fields(name, f"across_{role}", duration_s=took, error_type=error_type(error)),
        )


# --- metrics --------------------------------------------------------------------------------------


def _stores() -> list[Any]:
    """Every store alive (copied first: the loops' threads add to the set meanwhile)."""
    while True:
        try:
            return list(_sources)
        except RuntimeError:  # pragma: no cover - a store was added meanwhile: again
            continue


def _summed(read: Callable[[Any], int]) -> Iterable[Any]:
    totals: dict[str, int] = {}
    for store in _stores():
        try:
            count = read(store)
        except RuntimeError:  # pragma: no cover - its records changed meanwhile: next time
            continue
        totals[store.name] = totals.get(store.name, 0) + count
    return [otel_metrics.Observation(count, {NAME: name}) for name, count in totals.items()]


def _observe_hits(options: Any) -> Iterable[Any]:
    return _summed(lambda store: store.hits)


def _observe_joins(options: Any) -> Iterable[Any]:
    return _summed(lambda store: store.joins)


def _observe_evictions(options: Any) -> Iterable[Any]:
    return _summed(lambda store: store.evictions)


def _observe_values(options: Any) -> Iterable[Any]:
    return _summed(lambda store: store.census()[0])


def _observe_states(options: Any) -> Iterable[Any]:
    totals: dict[str, dict[str, int]] = {}
    for store in _stores():
        counts = totals.setdefault(store.name, dict.fromkeys(STATES, 0))
        try:
            states = store.census()[1]
        except RuntimeError:  # pragma: no cover - changed by its loop meanwhile
            continue
        for state in states:
            counts[state] += 1
        if not states:
            counts["idle"] += 1
    return [
        otel_metrics.Observation(count, {NAME: name, STATE: state})
        for name, counts in totals.items()
        for state, count in counts.items()
    ]


#: Bucket boundaries (seconds) of the duration histograms: 1 ms to 10 minutes, about three per
#: decade (the SDK's default, 0 to 10,000 in the histogram's unit, would put every attempt under
#: 5 s in one bucket and resolve nothing past 10,000 s). An advice: a view set by the
#: application takes precedence.
DURATION_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
)  # fmt: skip


def _duration_histogram(name: str, description: str) -> Any:
    try:
        return _meter.create_histogram(
            name, "s", description, explicit_bucket_boundaries_advisory=DURATION_BUCKETS
        )
    except TypeError:  # pragma: no cover - opentelemetry-api before 1.30 takes no advice
        return _meter.create_histogram(name, "s", description)


if OTEL:
    # Once, at import, as for the tracer: a provider named by OTEL_PYTHON_METER_PROVIDER loads.
    otel_metrics.get_meter_provider()
    _METER_GLOBAL = hasattr(otel_metrics_state, "_METER_PROVIDER")
    _meter = otel_metrics.get_meter(SCOPE)
    _attempts = _meter.create_counter(
        "fastapi_once.attempts", "{attempt}", "Attempts and refreshes that ended, by outcome"
    )
    _duration = _duration_histogram(
        "fastapi_once.attempt.duration", "How long an attempt or refresh took"
    )
    _refresh_failures = _meter.create_counter(
        "fastapi_once.refresh.failures", "{refresh}", "Refreshes that failed (the value is kept)"
    )
    _fast_failures = _meter.create_counter(
        "fastapi_once.fast_failures", "{call}", "Calls failed fast within a failure's cooldown"
    )
    _follower_wait = _duration_histogram(
        "fastapi_once.follower.wait", "How long a process waited for another to lead"
    )
    _fallbacks = _meter.create_counter(
        "fastapi_once.backend.fallbacks",
        "{call}",
        "Values made in this process because the backend could not be reached",
    )
    _ping_failures = _meter.create_counter(
        "fastapi_once.ping.failures", "{ping}", "Readiness pings that failed or timed out"
    )
    _meter.create_observable_counter(
        "fastapi_once.hits", [_observe_hits], "{call}", "Calls served from a made value"
    )
    _meter.create_observable_counter(
        "fastapi_once.joins", [_observe_joins], "{call}", "Calls that joined an attempt"
    )
    _meter.create_observable_counter(
        "fastapi_once.evictions",
        [_observe_evictions],
        "{value}",
        "Keyed values evicted (least recently used)",
    )
    _meter.create_observable_up_down_counter(
        "fastapi_once.values", [_observe_values], "{value}", "Values held"
    )
    _meter.create_observable_gauge(
        "fastapi_once.state", [_observe_states], "{record}", "Records (keys) in each state"
    )


def _metering() -> bool:
    """Whether a meter provider is set (the instruments' proxies do nothing until one is)."""
    return not _METER_GLOBAL or otel_metrics_state._METER_PROVIDER is not None


def ended(store: Any, attempt: Traced, took: float, refresh: bool) -> None:
    """A watched attempt's work ended after ``took`` s; ``attempt`` holds what its waiters got."""
    if not OTEL or (
        attempt.span is None and _METER_GLOBAL and not otel_metrics_state._METER_PROVIDER
    ):
        return
    error = attempt.error
    attributes: dict[str, Any] = {
        NAME: store.name,
        OUTCOME: "success" if error is None else "failure",
        REFRESH: refresh,
    }
    if error is not None:
        attributes[ERROR_TYPE] = error_type(error)
        if refresh:
            _refresh_failures.add(1, {NAME: store.name})
    _attempts.add(1, attributes)
    _duration.record(took, attributes)
    if attempt.span is not None:
        _ended_span(attempt, error)


def fast_failed(store: Any) -> None:
    """A call failed fast with the error whose cooldown is on."""
    if OTEL and _metering():
        _fast_failures.add(1, {NAME: store.name})


def ping_failed(name: str, kind: str) -> None:
    """A readiness ping of once ``name`` failed with an exception of type ``kind``."""
    if OTEL:
        _ping_failures.add(1, {NAME: name, ERROR_TYPE: kind})
