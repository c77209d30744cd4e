"""Telemetry with the real OpenTelemetry SDK: spans, links, metrics and the logs' fields.

The SDK's providers are installed once for this module (OpenTelemetry's global providers can be
set once per process; the package looks them up when it uses them) and shut down after it; each
test clears the span exporter and names its onces uniquely, so cumulative metrics do not mix.
"""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import test_exception
from docblocks import python_blocks
from fastapi import Depends, FastAPI
from opentelemetry import metrics, trace
from opentelemetry.metrics import _internal as metrics_api
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from opentelemetry.util._once import Once
from timekeeping import FakeClock, wait_until

from fastapi_once import OnceTimeoutError, once, once_lifespan, readiness_router
from fastapi_once._keys import key_digest
from fastapi_once.backends import FileLockBackend
from fastapi_once.backends._lease import StoreBackend
from fastapi_once.backends._store import StoreUnavailableError

pytestmark = pytest.mark.anyio

_serial = itertools.count()


def unique(stem: str) -> str:
    """A once name no other test uses: the metric streams of each test stay apart."""
    return f"telemetry.{stem}.{next(_serial)}"


class Otel:
    """The SDK's in-memory span exporter and metric reader, installed globally."""

    def __init__(self) -> None:
        self.spans = InMemorySpanExporter()
        self.reader = InMemoryMetricReader()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.spans))
        self.meter_provider = MeterProvider(metric_readers=[self.reader])

    def finished(self, name: str, once_name: str) -> list[ReadableSpan]:
        return [
            span
            for span in self.spans.get_finished_spans()
            if span.name == name and (span.attributes or {}).get("fastapi_once.name") == once_name
        ]

    def points(self, metric: str, once_name: str) -> list[Any]:
        data = self.reader.get_metrics_data()
        assert data is not None
        return [
            point
            for resource in data.resource_metrics
            for scope in resource.scope_metrics
            for each in scope.metrics
            if each.name == metric
            for point in each.data.data_points
            if point.attributes.get("fastapi_once.name") == once_name
        ]

    def total(self, metric: str, once_name: str, **attributes: Any) -> float:
        return sum(
            point.value
            for point in self.points(metric, once_name)
            if all(
                point.attributes.get(f"fastapi_once.{k}", None) == v for k, v in attributes.items()
            )
        )


@pytest.fixture(scope="module")
def installed() -> Iterator[Otel]:
    otel = Otel()
    trace.set_tracer_provider(otel.tracer_provider)
    metrics.set_meter_provider(otel.meter_provider)
    yield otel
    otel.tracer_provider.shutdown()
    otel.meter_provider.shutdown()
    # Then no provider is set again, as before this module: the API would keep the shut-down
    # ones for the rest of the run, and every once in a later test would still make its spans
    # through them (each end logged as a warning) and look up its meter.
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    metrics_api._METER_PROVIDER_SET_ONCE = Once()
    metrics_api._METER_PROVIDER = None


@pytest.fixture
def otel(installed: Otel) -> Otel:
    installed.spans.clear()
    return installed


def client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


REQUESTS = 200


async def test_a_cold_burst_makes_one_attempt_span_linked_from_every_request(otel: Otel) -> None:
    """200 cold requests: one attempt span, its own trace's root, linked from every request."""
    name, gate = unique("burst"), anyio.Event()

    @once(name=name)
    async def get_db() -> str:
        await gate.wait()
        return "db"

    app = FastAPI()

    @app.get("/")
    async def root(db: str = Depends(get_db)) -> str:
        return db

    codes: list[int] = []
    async with client(app) as http:

        async def request() -> None:
            codes.append((await http.get("/")).status_code)

        with anyio.fail_after(50):
            async with anyio.create_task_group() as group:
                for _ in range(REQUESTS):
                    group.start_soon(request)
                while get_db.status().joins < REQUESTS - 1:  # noqa: ASYNC110 - library-side work
                    await anyio.sleep(0.01)
                gate.set()
    assert codes == [200] * REQUESTS
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    assert attempt.parent is None  # its own trace, not the first request's
    assert attempt.attributes is not None
    assert attempt.attributes["fastapi_once.outcome"] == "success"
    assert attempt.attributes["fastapi_once.attempt"] == 1
    assert attempt.status.status_code is not StatusCode.ERROR
    spans = otel.spans.get_finished_spans()
    linking = [
        span
        for span in spans
        for link in span.links
        if link.context.span_id == attempt.context.span_id
    ]
    request_traces = {span.context.trace_id for span in linking}
    assert len(request_traces) == REQUESTS  # every request's trace shows what it waited for
    assert attempt.context.trace_id not in request_traces
    joined = [link.attributes for span in linking for link in span.links if link.attributes]
    assert sum(1 for a in joined if a["fastapi_once.joined"]) == REQUESTS - 1
    (started_by,) = attempt.links  # the attempt links back to the request that started it
    assert started_by.context.trace_id in request_traces


async def test_the_functions_own_spans_are_children_of_the_attempt_span(otel: Otel) -> None:
    """A span made inside fn hangs under the attempt span, not under the first caller's."""
    name = unique("children")
    tracer = trace.get_tracer("test")

    @once(name=name)
    async def load() -> int:
        with tracer.start_as_current_span("inner"):
            return 1

    with tracer.start_as_current_span("caller") as caller:
        assert await load() == 1
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    (inner,) = [s for s in otel.spans.get_finished_spans() if s.name == "inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == attempt.context.span_id
    assert inner.context.trace_id != caller.get_span_context().trace_id
    assert attempt.links[0].context.span_id == caller.get_span_context().span_id


async def test_a_process_scope_attempt_links_to_the_caller_in_another_loop_and_back(
    otel: Otel,
) -> None:
    """Called from the test's loop, the attempt runs in the library's: the links still cross."""
    name = unique("process")
    tracer = trace.get_tracer("test")

    @once(name=name, scope="process")
    async def load() -> int:
        with tracer.start_as_current_span("inner"):
            return 1

    with tracer.start_as_current_span("caller") as caller:
        assert await load() == 1
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    (inner,) = [s for s in otel.spans.get_finished_spans() if s.name == "inner"]
    assert inner.parent is not None
    assert inner.parent.span_id == attempt.context.span_id
    assert [link.context.span_id for link in attempt.links] == [caller.get_span_context().span_id]
    (finished_caller,) = [s for s in otel.spans.get_finished_spans() if s.name == "caller"]
    assert [link.context.span_id for link in finished_caller.links] == [attempt.context.span_id]
    await load.reset()


async def test_process_scope_metrics_count_reads_from_every_thread_once(otel: Otel) -> None:
    """Hits read without a hop in other threads count; one attempt, one value, one ready record."""
    name = unique("process-metrics")

    @once(name=name, scope="process")
    def load() -> int:
        return 1

    assert await load() == 1
    for _ in range(3):
        assert await anyio.to_thread.run_sync(load.get_sync) == 1
    assert await load() == 1
    status = load.status()
    assert (status.attempts, status.hits) == (1, 4)
    assert otel.total("fastapi_once.attempts", name) == 1
    assert otel.total("fastapi_once.hits", name) == status.hits
    assert otel.total("fastapi_once.values", name) == 1
    assert otel.total("fastapi_once.state", name, state="ready") == 1
    await load.reset()


async def test_a_failing_attempt_records_its_error_type_and_never_its_message(
    otel: Otel,
) -> None:
    """The span says failure and the exception's type; the message (a secret) is nowhere."""
    name = unique("failing")

    @once(name=name)
    async def get_db() -> str:
        raise ConnectionError("postgresql://admin:hunter2@db")

    with pytest.raises(ConnectionError):
        await get_db()
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    assert attempt.attributes is not None
    assert attempt.attributes["fastapi_once.outcome"] == "failure"
    assert attempt.attributes["error.type"] == "ConnectionError"
    assert attempt.status.status_code is StatusCode.ERROR
    assert [e.attributes for e in attempt.events] == [{"exception.type": "ConnectionError"}]
    assert "hunter2" not in attempt.to_json()
    assert otel.total("fastapi_once.attempts", name, outcome="failure") == 1


async def test_a_failed_attempt_keeps_no_frames_while_tracing(otel: Otel) -> None:
    """With a tracer provider set, nothing of a failure stays once the call has raised: the
    attempt's task context, still referenced until the loop runs its done callbacks, no longer
    holds the attempt (with its error and the frames of fn and of the caller)."""
    await test_exception.test_a_failed_requests_frames_are_not_kept_by_the_once()


async def test_metric_counters_equal_the_status_counts(otel: Otel, clock: FakeClock) -> None:
    """attempts, hits, joins from the metrics equal status(); failures and evictions count."""
    name, gate = unique("counts"), anyio.Event()
    fail = True

    @once(name=name, cooldown=5)
    async def load() -> int:
        await gate.wait()
        if fail:
            raise ConnectionError
        return 1

    async def call() -> None:
        with pytest.raises(ConnectionError):
            await load()

    async with anyio.create_task_group() as group:
        for _ in range(10):
            group.start_soon(call)
        await wait_until(lambda: load.status().joins == 9)
        gate.set()
    await call()  # within the cooldown: fails fast
    clock.advance(5)
    fail = False
    for _ in range(3):
        assert await load() == 1
    status = load.status()
    assert (status.attempts, status.joins, status.hits) == (2, 9, 2)
    assert otel.total("fastapi_once.attempts", name) == status.attempts
    assert otel.total("fastapi_once.attempts", name, outcome="success") == 1
    assert otel.total("fastapi_once.attempts", name, outcome="failure") == 1
    assert otel.total("fastapi_once.hits", name) == status.hits
    assert otel.total("fastapi_once.joins", name) == status.joins
    assert otel.total("fastapi_once.fast_failures", name) == 1
    assert otel.total("fastapi_once.values", name) == 1
    assert otel.total("fastapi_once.state", name, state="ready") == 1
    assert otel.total("fastapi_once.state", name, state="failed") == 0
    durations = otel.points("fastapi_once.attempt.duration", name)
    assert sum(point.count for point in durations) == status.attempts


async def test_the_state_metric_names_each_record_as_status_does(
    otel: Otel, clock: FakeClock
) -> None:
    """A value past its ttl, kept for stale_if_error= but not served, is idle there too."""
    name = unique("stale-state")

    @once(name=name, ttl=10, stale_if_error=30)
    async def load() -> int:
        return 1

    assert await load() == 1
    assert otel.total("fastapi_once.state", name, state="ready") == 1
    clock.advance(11)
    status = load.status()
    assert (status.state, status.stale) == ("idle", True)
    assert otel.total("fastapi_once.state", name, state="ready") == 0
    assert otel.total("fastapi_once.state", name, state="idle") == 1
    assert otel.total("fastapi_once.values", name) == 1  # kept
    await load.reset()


async def test_a_timed_out_attempt_is_one_failure_whose_span_ends_with_its_run(
    otel: Otel,
) -> None:
    """timeout=: waiters get OnceTimeoutError; the span and the count follow the run's end."""
    name = unique("timeout")

    @once(name=name, timeout=0.01)
    async def load() -> int:
        await anyio.sleep_forever()
        raise AssertionError  # pragma: no cover

    with anyio.fail_after(10), pytest.raises(OnceTimeoutError):
        await load()
    await wait_until(lambda: bool(otel.finished("fastapi_once.attempt", name)))
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    assert attempt.attributes is not None
    assert attempt.attributes["error.type"] == "OnceTimeoutError"
    assert otel.total("fastapi_once.attempts", name, outcome="failure") == 1
    assert otel.total("fastapi_once.attempts", name) == load.status().attempts


async def test_keyed_evictions_and_key_digests(otel: Otel) -> None:
    """Keyed spans carry the key's digest, never the key; evictions are counted."""
    name = unique("keyed")

    @once(name=name, key=lambda token: token, maxsize=1)
    async def get_user(token: str) -> str:
        return token[:2]

    await get_user("secret-token-1")
    await get_user("secret-token-2")  # evicts the first
    spans = otel.finished("fastapi_once.attempt", name)
    assert {s.attributes["fastapi_once.key_digest"] for s in spans if s.attributes} == {
        key_digest("secret-token-1"),
        key_digest("secret-token-2"),
    }
    assert all("secret-token" not in s.to_json() for s in spans)
    assert otel.total("fastapi_once.evictions", name) == 1
    assert otel.total("fastapi_once.values", name) == 1
    assert get_user.status().size == 1


async def test_a_refresh_and_a_cleanup_have_their_own_spans(otel: Otel, clock: FakeClock) -> None:
    """A refresh span and, for each retired value, a cleanup span linked to its attempt."""
    name = unique("refresh")
    calls = 0

    @once(name=name, refresh=5, ttl=50)
    async def get_pool() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        yield calls

    assert await get_pool() == 1
    clock.advance(5)
    assert await get_pool() == 1  # starts the refresh
    await wait_until(lambda: get_pool.status().state == "ready")
    await get_pool.reset()
    (attempt,) = otel.finished("fastapi_once.attempt", name)
    (refresh,) = otel.finished("fastapi_once.refresh", name)
    assert refresh.attributes is not None
    assert refresh.attributes["fastapi_once.refresh"] is True
    assert refresh.attributes["fastapi_once.attempt"] == 2
    cleanups = otel.finished("fastapi_once.cleanup", name)
    assert len(cleanups) == 2
    made_by = {link.context.span_id for span in cleanups for link in span.links}
    assert made_by == {attempt.context.span_id, refresh.context.span_id}
    assert all(span.parent is None for span in cleanups)


async def test_a_failed_refresh_is_counted(otel: Otel, clock: FakeClock) -> None:
    """A refresh that fails keeps the value and counts in fastapi_once.refresh.failures."""
    name = unique("refresh_failure")
    calls = 0

    @once(name=name, refresh=5, ttl=50)
    async def load() -> int:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise TimeoutError
        return calls

    assert await load() == 1
    clock.advance(5)
    assert await load() == 1
    await wait_until(lambda: load.status().state == "ready" and calls == 2)
    await wait_until(lambda: bool(otel.finished("fastapi_once.refresh", name)))
    assert otel.total("fastapi_once.refresh.failures", name) == 1
    assert otel.total("fastapi_once.attempts", name, refresh=True, outcome="failure") == 1


async def test_across_spans_say_who_led_and_who_followed(otel: Otel, tmp_path: Any) -> None:
    """The process that runs fn leads; one that finds the result follows (and its wait counts)."""
    name = unique("across")
    backend = FileLockBackend(tmp_path)

    async def migrate() -> int:
        return 1

    async def migrate_elsewhere() -> int:
        return 2  # pragma: no cover - the leader's result is recorded already

    # Two onces sharing one name and backend play two processes.
    assert await once(migrate, name=name, across=backend)() == 1
    assert await once(migrate_elsewhere, name=name, across=backend)() == 1
    spans = otel.finished("fastapi_once.across", name)
    assert [s.attributes["fastapi_once.role"] for s in spans if s.attributes] == [
        "leader",
        "follower",
    ]
    attempts = otel.finished("fastapi_once.attempt", name)
    assert [s.parent.span_id for s in spans if s.parent] == [a.context.span_id for a in attempts]
    (wait,) = otel.points("fastapi_once.follower.wait", name)
    assert wait.count == 1


async def test_a_keyed_across_span_names_the_key_by_its_digest(otel: Otel) -> None:
    """A keyed once's across span carries the key's digest, never the key."""
    from fastapi_once.backends import Backend

    class Keyed(Backend):
        async def run_once(self, name: str, work: Any, *, ttl: float | None = None) -> Any:
            raise AssertionError  # pragma: no cover

        async def run_keyed(self, name: str, key: str, work: Any, **timings: Any) -> Any:
            return await work()

        async def reset(self, name: str) -> None:  # pragma: no cover
            pass

        def describe(self) -> str:
            return "keyed"

    name = unique("keyed_across")

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=Keyed(), name=name)
    assert await stuff("/secret-token") == "/secret-token"
    (span,) = otel.finished("fastapi_once.across", name)
    assert span.attributes is not None
    assert span.attributes["fastapi_once.key_digest"] == key_digest("/secret-token")
    assert "/secret-token" not in str(dict(span.attributes))


async def test_every_log_record_carries_the_same_fields(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    """once, event, duration_s, error_type, attempt on every record; no key verbatim."""
    calls = 0

    @once(name="logged", retries=1, backoff=0.001, refresh=5, ttl=50)
    async def get_db() -> AsyncIterator[int]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise ConnectionError("secret-dsn")
        yield calls

    @once(name="keyed", key=lambda token: token, cooldown=1)
    async def get_user(token: str) -> str:
        raise PermissionError(token)

    with caplog.at_level(logging.DEBUG, logger="fastapi_once"):
        async with once_lifespan(get_db)(FastAPI()):
            clock.advance(5)
            await get_db()
            await wait_until(lambda: get_db.status().state == "ready")
            with pytest.raises(PermissionError):
                await get_user("token-abc")
    records = [r for r in caplog.records if r.name == "fastapi_once"]
    for record in records:
        assert {"once", "event", "duration_s", "error_type", "attempt"} <= vars(record).keys()
    events = {(r.once, r.event) for r in records}  # type: ignore[attr-defined]
    assert {
        (None, "warm_start"),
        ("logged", "start"),
        ("logged", "retry"),
        ("logged", "ready"),
        ("logged", "warm_ready"),
        ("logged", "refresh_start"),
        ("logged", "refreshed"),
        ("logged", "cleaned_up"),
        ("keyed", "failed"),
    } <= events
    ready = next(r for r in records if r.event == "ready")  # type: ignore[attr-defined]
    assert isinstance(ready.duration_s, float)  # type: ignore[attr-defined]
    assert ready.attempt == 1  # type: ignore[attr-defined]
    failed = next(r for r in records if r.event == "failed")  # type: ignore[attr-defined]
    assert failed.error_type == "PermissionError"  # type: ignore[attr-defined]
    shown = [r.getMessage() for r in records if r.levelno > logging.DEBUG]
    assert not any("token-abc" in line or "secret-dsn" in line for line in shown)


async def test_failures_of_a_leader_a_cleanup_and_a_ping_are_recorded_by_type(
    otel: Otel, tmp_path: Any
) -> None:
    """The across span of a failing leader, a failing cleanup, a failing ping: error types."""
    name = unique("failures")

    async def migrate() -> int:
        raise ValueError("secret")

    with pytest.raises(ValueError, match="secret"):
        await once(migrate, name=name, across=FileLockBackend(tmp_path))()
    (lead,) = otel.finished("fastapi_once.across", name)
    assert lead.attributes is not None
    assert "secret" not in lead.to_json()
    assert (lead.attributes["fastapi_once.role"], lead.attributes["error.type"]) == (
        "leader",
        "ValueError",
    )

    @once(name=name + ".keyed", key=lambda token: token)
    async def get_session(token: str) -> AsyncIterator[str]:
        yield token
        with trace.get_tracer("test").start_as_current_span("closing"):
            pass
        raise OSError("secret")

    await get_session("abc")
    with pytest.raises(OSError, match="secret"):
        await get_session.reset()
    (cleanup,) = otel.finished("fastapi_once.cleanup", name + ".keyed")
    assert cleanup.attributes is not None
    assert cleanup.attributes["error.type"] == "OSError"
    assert cleanup.attributes["fastapi_once.key_digest"] == key_digest("abc")
    assert "secret" not in cleanup.to_json()
    (closing,) = [s for s in otel.spans.get_finished_spans() if s.name == "closing"]
    assert closing.parent is not None
    assert closing.parent.span_id == cleanup.context.span_id

    @once(name=name + ".pinged", ping=lambda value: False)
    async def get_db() -> str:
        return "db"

    app = FastAPI()
    app.include_router(readiness_router(get_db))
    await get_db()
    async with client(app) as http:
        assert (await http.get("/ready")).status_code == 503
    assert otel.total("fastapi_once.ping.failures", name + ".pinged") == 1


async def test_log_keys_shows_keys_verbatim_only_for_the_once_that_asks(
    otel: Otel, caplog: pytest.LogCaptureFixture
) -> None:
    """log_keys=True: the key in log labels and a fastapi_once.key attribute; else a digest."""
    name = unique("log_keys")

    @once(name=name + ".shown", key=lambda region: region, log_keys=True)
    async def get_region(region: str) -> str:
        return region

    @once(name=name + ".hidden", key=lambda token: token)
    async def get_user(token: str) -> str:
        return token

    with caplog.at_level(logging.INFO, logger="fastapi_once"):
        await get_region("eu-west")
        await get_user("token-abc")
    assert f"{name}.shown['eu-west']: attempt started" in caplog.messages
    assert f"{name}.hidden[#{key_digest('token-abc')}]: attempt started" in caplog.messages
    assert "token-abc" not in caplog.text
    (shown,) = otel.finished("fastapi_once.attempt", name + ".shown")
    (hidden,) = otel.finished("fastapi_once.attempt", name + ".hidden")
    assert shown.attributes is not None
    assert hidden.attributes is not None
    assert shown.attributes["fastapi_once.key"] == "'eu-west'"
    assert "fastapi_once.key" not in hidden.attributes
    with pytest.raises(TypeError, match="log_keys= takes True or False and applies only with key="):
        once(lambda: None, log_keys=True)


def _python(code: str) -> str:
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    return run.stdout


class _Unreachable(StoreBackend):
    """A store that can never be reached (every primitive raises the outage error)."""

    def describe(self) -> str:
        return "Unreachable"

    async def claim(self, *args: Any, **kwargs: Any) -> Any:
        raise StoreUnavailableError("Unreachable: connection refused")

    renew = complete = abandon = clear = claim

    def watch(self, name: str, key: str) -> Any:
        raise AssertionError("never reached")

    async def aclose(self) -> None:
        pass


async def test_a_value_made_here_while_the_backend_is_down_is_counted_and_spanned(
    otel: Otel,
) -> None:
    """Each fallback adds 1 to fastapi_once.backend.fallbacks; the across span's role is
    "local"."""
    name = "tests.telemetry.fallback"

    async def get_stuff(url: str) -> str:
        return url

    stuff = once(get_stuff, key=lambda url: url, ttl=60, across=_Unreachable(), name=name)
    before = otel.total("fastapi_once.backend.fallbacks", name)
    assert [await stuff("a"), await stuff("b")] == ["a", "b"]
    assert otel.total("fastapi_once.backend.fallbacks", name) == before + 2
    roles = {s.attributes["fastapi_once.role"] for s in otel.finished("fastapi_once.across", name)}  # type: ignore[index]
    assert roles == {"local"}


def test_the_package_works_without_opentelemetry() -> None:
    """With opentelemetry unimportable, onces, logs and the readiness route work as before.

    FastAPI 0.165 imports opentelemetry itself, so it is hidden after FastAPI has loaded, as
    an older FastAPI without it would leave things.
    """
    out = _python(
        """
        import sys
        import fastapi, fastapi.testclient, fastapi.telemetry._runtime
        for module in [m for m in sys.modules if m.split(".")[0] == "opentelemetry"]:
            sys.modules[module] = None
        sys.modules["opentelemetry"] = None
        import anyio
        from fastapi_once import once, readiness_router
        from fastapi_once import _telemetry
        assert not _telemetry.OTEL

        @once(ping=lambda value: None)
        async def get_db():
            yield "db"

        app = fastapi.FastAPI()
        app.include_router(readiness_router(get_db))
        with fastapi.testclient.TestClient(app) as http:
            http.get("/ready")
            print(get_db.status().attempts)
        """
    )
    assert out.strip() == "1"


def test_without_a_configured_sdk_no_span_is_made() -> None:
    """With only the API (its default provider), attempts make no span and carry none."""
    out = _python(
        """
        import anyio
        from fastapi_once import once, _telemetry
        from fastapi_once._attempts import working

        seen = []

        @once
        async def load():
            seen.append(_telemetry.tracer())
            return 1

        anyio.run(load)
        print(seen, _telemetry.tracer())
        """
    )
    assert out.strip() == "[None] None"


def test_an_sdk_installed_after_the_first_calls_gets_the_spans_and_metrics_from_then_on() -> None:
    """Keyed misses made before any SDK is set make no span; once the real SDK's providers are
    set (after those calls), the next miss makes its span, and attempts and evictions count."""
    out = _python(
        """
        import asyncio
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        from fastapi_once import once

        @once(name="late", key=lambda k: k, maxsize=1)
        async def get(k):
            return k

        async def main():
            assert [await get(1), await get(2)] == [1, 2]  # no SDK yet: the lean way
            spans, reader = InMemorySpanExporter(), InMemoryMetricReader()
            provider = TracerProvider()
            provider.add_span_processor(SimpleSpanProcessor(spans))
            trace.set_tracer_provider(provider)
            metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
            assert await get(3) == 3
            names = [s.name for s in spans.get_finished_spans()]
            totals = {}
            for resource in reader.get_metrics_data().resource_metrics:
                for scope in resource.scope_metrics:
                    for metric in scope.metrics:
                        for point in metric.data.data_points:
                            count = getattr(point, "value", None)  # histograms: none
                            totals[metric.name] = totals.get(metric.name, 0) + (count or 0)
            print(names, totals["fastapi_once.attempts"], totals["fastapi_once.evictions"])

        asyncio.run(main())
        """
    )
    # One span and one attempt counted (the third); the evictions are the store's: all two.
    assert out.strip() == "['fastapi_once.attempt'] 1 2"


def test_the_readme_wiring_exports_the_packages_spans_and_metrics() -> None:
    """The documented setup_telemetry(), in a fresh process: console output names our telemetry."""
    wiring = next(b.code for b in python_blocks() if "def setup_telemetry(" in b.code)
    out = _python(
        f"""
        namespace = {{"__name__": "readme_wiring"}}
        exec({wiring!r}, namespace)
        namespace["setup_telemetry"]()

        from fastapi import Depends, FastAPI
        from fastapi.testclient import TestClient
        from fastapi_once import once

        @once(name="wired")
        async def get_db() -> str:
            return "db"

        app = FastAPI()

        @app.get("/")
        async def root(db: str = Depends(get_db)) -> str:
            return db

        with TestClient(app) as http:
            assert http.get("/").json() == "db"
        """
    )
    assert '"name": "fastapi_once.attempt"' in out
    assert '"fastapi_once.name": "wired"' in out
    assert '"name": "fastapi_once.attempts"' in out


async def test_the_duration_histograms_resolve_1_ms_to_10_minutes(otel: Otel) -> None:
    """The SDK buckets attempt durations by the package's advice: 1 ms up to 10 minutes."""
    name = unique("buckets")

    @once(name=name)
    async def load() -> int:
        return 1

    assert await load() == 1
    (point,) = otel.points("fastapi_once.attempt.duration", name)
    bounds = list(point.explicit_bounds)
    assert bounds[0] == 0.001  # an attempt under 1 ms is told apart from one of 4 ms
    assert bounds[-1] == 600  # and one of 5 minutes from one of 2
    assert bounds == sorted(bounds)
    assert len([b for b in bounds if b < 1]) >= 8  # sub-second attempts are resolved
    assert sum(point.bucket_counts) == 1


def test_the_observability_example_runs_outside_the_repository(tmp_path: Path) -> None:
    """Saved as observed.py in an empty directory, `python observed.py` serves and exports.

    example_app (which exists only in the repository) is made unimportable; uvicorn.run is
    pointed at a free port and stops after one request.
    """
    (example,) = {b.code for b in python_blocks() if b.code.startswith("# observed.py\n")}
    (tmp_path / "observed.py").write_text(example)
    driver = textwrap.dedent(
        """
        import runpy, socket, sys, threading, time

        import httpx
        import uvicorn
        from opentelemetry import trace

        sys.modules["example_app"] = None  # not importable here
        got = []

        def run(app, port):
            sock = socket.socket()
            sock.bind(("127.0.0.1", 0))
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))

            def hit():
                while not server.started:
                    time.sleep(0.01)
                url = "http://%s:%d/predict" % sock.getsockname()
                got.append(httpx.get(url).json())
                server.should_exit = True

            threading.Thread(target=hit, daemon=True).start()
            server.run(sockets=[sock])

        uvicorn.run = run
        runpy.run_path("observed.py", run_name="__main__")
        trace.get_tracer_provider().force_flush()
        print("got", got)
        """
    )
    run = subprocess.run(
        [sys.executable, "-c", driver],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=50,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert "got [{'weights': '...'}]" in run.stdout
    assert '"name": "fastapi_once.attempt"' in run.stdout
