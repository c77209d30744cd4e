"""A minimal HTTP/1.1 client on asyncio streams: the burst's load generator.

An HTTP client library is built for correctness, not for sending a thousand requests in the same
instant: with ``httpx``, 1,000 concurrent requests each took at least a second against a setup of
0.2 s, the client's own work showing up as latency. Opening the connections costs the client most
(about 0.25 ms each here), so :func:`burst` opens every connection first and then writes every
request in one tight loop: the requests reach the server within a few milliseconds of each other,
and each one's time runs from its write to its response's last byte. The client speaks what the
burst needs: ``GET``, a status line, headers, a ``Content-Length`` body.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

#: The longest the whole burst may take, in seconds; requests unanswered by then have failed.
TIMEOUT = 60.0

#: Errors that fail a request (or a connection) rather than the burst.
FAILURES = (OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError)


@dataclass
class Answer:
    """One request and what came back; times are seconds of :func:`time.perf_counter`."""

    path: str
    #: When the request was written.
    sent: float = 0.0
    #: When the response's last byte arrived (or the request failed).
    answered: float = 0.0
    status: int = 0
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Why the request failed; empty if a response arrived.
    error: str = ""

    @property
    def latency(self) -> float:
        """Seconds from writing the request to the response's last byte."""
        return self.answered - self.sent

    def fail(self, why: str) -> None:
        """Mark the request failed, for ``why``."""
        self.error = f"GET {self.path}: {why}"
        self.answered = time.perf_counter()


Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


def request_bytes(host: str, port: int, path: str) -> bytes:
    """The bytes of ``GET path`` to ``host:port`` on a keep-alive connection."""
    return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode("ascii")


async def read_response(reader: asyncio.StreamReader, answer: Answer) -> None:
    """Read one response from ``reader`` into ``answer``.

    Raises:
        ValueError: the response is not HTTP/1.x, or has no ``Content-Length``.
        asyncio.IncompleteReadError: the server closed the connection early.
    """
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
    version, _, rest = status_line.partition(" ")
    if not version.startswith("HTTP/1."):
        raise ValueError(f"not an HTTP/1.x response: {status_line!r}")
    answer.status = int(rest.partition(" ")[0])
    for line in lines:
        name, _, value = line.partition(":")
        answer.headers[name.strip().lower()] = value.strip()
    if "content-length" not in answer.headers:
        raise ValueError("a response without Content-Length")
    answer.body = await reader.readexactly(int(answer.headers["content-length"]))
    answer.answered = time.perf_counter()


async def open_connections(host: str, port: int, count: int) -> list[Connection]:
    """Open ``count`` connections to ``host:port``.

    Raises:
        OSError: one of them could not be opened (the others are closed).
    """
    results = await asyncio.gather(
        *(asyncio.open_connection(host, port) for _ in range(count)), return_exceptions=True
    )
    connections = [r for r in results if not isinstance(r, BaseException)]
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        for _, writer in connections:
            writer.close()
        raise failed[0]
    return connections


async def burst(
    host: str,
    port: int,
    connections: Sequence[Connection],
    paths: Sequence[str],
    *,
    on_sent: Callable[[], None] = lambda: None,
    on_answer: Callable[[Answer], None] = lambda answer: None,
) -> list[Answer]:
    """``GET`` every one of ``paths`` over ``connections``; return the answers in ``paths``' order.

    The first request of every connection is written at once, in one loop (then ``on_sent()`` is
    called); each connection's next request, if it has more, follows its previous answer.
    ``on_answer`` is called with each answer as it arrives. Closes the connections.

    Never raises for a failed request or connection: each :attr:`Answer.error` says what went
    wrong. Requests not answered within :data:`TIMEOUT` seconds fail.
    """
    answers = [Answer(path) for path in paths]
    # Connection i carries requests i, i + n, i + 2n, ...
    n = len(connections)
    queues = [answers[i::n] for i in range(n)]

    def send(writer: asyncio.StreamWriter, answer: Answer) -> None:
        answer.sent = time.perf_counter()
        writer.write(request_bytes(host, port, answer.path))

    for (_, writer), queue in zip(connections, queues, strict=True):
        if queue:
            send(writer, queue[0])
    on_sent()

    async def drive(connection: Connection, queue: list[Answer]) -> None:
        reader, writer = connection
        done = 0
        try:
            for answer in queue:
                if done:
                    send(writer, answer)
                await read_response(reader, answer)
                done += 1
                on_answer(answer)
        except FAILURES as exc:
            for answer in queue[done:]:
                answer.fail(f"{type(exc).__name__}: {exc}")
                on_answer(answer)
        finally:
            writer.close()

    pairs = zip(connections, queues, strict=True)
    tasks = [asyncio.ensure_future(drive(c, q)) for c, q in pairs if q]
    _, late = await asyncio.wait(tasks, timeout=TIMEOUT) if tasks else (set(), set())
    for task in late:
        task.cancel()
    if late:
        await asyncio.wait(late)
        for answer in answers:
            if not answer.answered:
                answer.fail(f"no answer within {TIMEOUT:.0f} s")
                on_answer(answer)
    return answers
