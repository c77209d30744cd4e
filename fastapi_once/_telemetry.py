"""What an operator sees of a once: OpenTelemetry spans and metrics, and the fields of its logs.

The state machine calls the hooks below at its transitions; none is on the hot path (a hit only
counts, as before, and the counts are read by observable instruments when a reader collects).

OpenTelemetry is used through ``opentelemetry-api`` when it can be imported; without it every
hook does nothing. Spans are made only while a real tracer provider is set: the provider is
looked up at each use, so one set after this module was imported is seen, and with the API's
default provider an attempt costs a look-up and a comparison. Metric instruments are created at
import on the API's meter, which forwards to a provider set later and does nothing until then.

Spans (instrumentation scope ``fastapi_once``) never carry an exception message, only its type,
nor a key, only its digest (see :mod:`fastapi_once._keys`), unless the once has ``log_keys=True``.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._attempts import Attempt
from ._keys import NOKEY, key_digest, shared_key_digest
from ._logs import error_type as error_type  # re-exported: the core imports them here
from ._logs import fields as fields

if TYPE_CHECKING:
    from ._policy import Policy
    from ._records import Store

try:
    from opentelemetry import context as otel_context
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
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


# --- tracing --------------------------------------------------------------------------------------

_tracer_for: tuple[object, Any] = (None, None)  # (provider, its tracer or None): one tuple, so
# a reader in another thread never pairs one provider with another's tracer.

if OTEL:
    from opentelemetry.trace import Link, NoOpTracerProvider, ProxyTracerProvider, StatusCode

    # The attempt whose span is current in a library task (with the span), in that task's context.
    _CURRENT = otel_context.create_key("fastapi_once.attempt")


def tracer() -> Any:
    """The package's tracer while a real tracer provider is set, else None (no spans at all)."""
    global _tracer_for
    if not OTEL:  # pragma: no cover
        return None
    provider = otel_trace.get_tracer_provider()
    seen, found = _tracer_for
    if provider is not seen:
        real = not isinstance(provider, (ProxyTracerProvider, NoOpTracerProvider))
        found = provider.get_tracer(SCOPE) if real else None
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


def _named(attempt: Attempt) -> dict[str, Any]:
    attributes: dict[str, Any] = {NAME: attempt.name}
    if attempt.key is not NOKEY:
        attributes[KEY] = key_digest(attempt.key)
        if attempt.show_key:
            attributes[KEY_SHOWN] = repr(attempt.key)
    return attributes


def traced(
    attempt: Attempt, refresh: bool, work: Coroutine[Any, Any, None]
) -> Coroutine[Any, Any, None]:
    """Run ``work`` (an attempt's library task) inside the attempt's span, if tracing is on.

    Called by the caller that starts the attempt, so the span links to that caller's span; the
    task then runs with the attempt's span current, so spans made by the once's function are
    its children rather than the (possibly long gone) first request's.
    """
    if tracer() is None:
        return work
    attributes = {**_named(attempt), ATTEMPT: attempt.number, REFRESH: refresh}
    span = _root("fastapi_once.refresh" if refresh else "fastapi_once.attempt", attributes)
    attempt.span = span.get_span_context()
    return _within(span, attempt, work)


async def _within(span: Any, attempt: Attempt, work: Coroutine[Any, Any, None]) -> None:
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


def waits(attempt: Attempt, joined: bool) -> None:
    """A caller is about to wait for ``attempt``: link the caller's span to the attempt's."""
    if attempt.span is None:
        return
    span = otel_trace.get_current_span()
    if span.is_recording():
        span.add_link(attempt.span, {NAME: attempt.name, "fastapi_once.joined": joined})


def _ended_span(attempt: Attempt, error: BaseException | None) -> None:
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
    attributes = _named(label) if isinstance(label, Attempt) else {NAME: str(label)}
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
    policy: Policy,
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


def _stores() -> Iterable[Store]:
    """Every once's store in every event loop alive (read from any thread, so copied first)."""
    from ._loops import every_state

    for state in every_state():
        try:
            stores = list(state.stores.values())
        except RuntimeError:  # pragma: no cover - its loop added a store meanwhile: next time
            continue
        yield from stores  # type: ignore[misc]


def _summed(read: Callable[[Store], int]) -> Iterable[Any]:
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


def _observe_values(options: Any) -> Iterable[Any]:
    return _summed(lambda store: sum(1 for r in list(store.records.values()) if r.made))


def _observe_states(options: Any) -> Iterable[Any]:
    from ._records import monotonic

    now, totals = monotonic(), dict[str, dict[str, int]]()
    for store in _stores():
        counts = totals.setdefault(store.name, dict.fromkeys(STATES, 0))
        try:
            records = list(store.records.values())
        except RuntimeError:  # pragma: no cover - changed by its loop meanwhile
            continue
        for rec in records:
            counts[rec.due(now)] += 1
        if not records:
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
    _evictions = _meter.create_counter(
        "fastapi_once.evictions", "{value}", "Keyed values evicted (least recently used)"
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
    _meter.create_observable_up_down_counter(
        "fastapi_once.values", [_observe_values], "{value}", "Values held"
    )
    _meter.create_observable_gauge(
        "fastapi_once.state", [_observe_states], "{record}", "Records (keys) in each state"
    )


def ended(store: Store, attempt: Attempt, took: float, refresh: bool) -> None:
    """An attempt's work ended after ``took`` s; ``attempt`` holds what its waiters got."""
    if not OTEL:  # pragma: no cover
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
    _ended_span(attempt, error)


def fast_failed(store: Store) -> None:
    """A call failed fast with the error whose cooldown is on."""
    if OTEL:
        _fast_failures.add(1, {NAME: store.name})


def evicted(store: Store, count: int) -> None:
    """``count`` keyed records were evicted."""
    if OTEL and count:
        _evictions.add(count, {NAME: store.name})


def ping_failed(name: str, kind: str) -> None:
    """A readiness ping of once ``name`` failed with an exception of type ``kind``."""
    if OTEL:
        _ping_failures.add(1, {NAME: name, ERROR_TYPE: kind})
