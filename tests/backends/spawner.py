"""Worker processes forked from one that has imported them already: a process a worker, started
in milliseconds instead of the half second an interpreter takes to import FastAPI.

``python spawner.py SOCKET`` imports the worker scripts (backend_worker.py, keyed_worker.py),
listens on the Unix socket ``SOCKET`` and says ``ready``; it ends at the end of its stdin, a
pipe from the tests' process. Each connection asks for one worker: a JSON line naming the
script and its arguments, with the worker's stdin, stdout and stderr passed along
(SCM_RIGHTS). The spawner forks; the child closes every other descriptor, makes those three
its own and runs the script's ``main()``, as ``python SCRIPT ARGS`` would. The spawner answers
on the connection with the child's pid, and later with its exit status (as ``subprocess``
gives it: ``-9`` for SIGKILL).

The spawner imports no driver and starts no thread or event loop before it forks, so each
worker is a process of its own as one started afresh: its own pid, loop, connections and
backend (built in the child), and SIGKILL ends it alone. :class:`Spawner` is the tests' side;
a :class:`Spawned` stands for a worker as ``subprocess.Popen`` (text mode, three pipes) does.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import select
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
#: The scripts a worker may run, by name; each has a ``main()`` reading ``sys.argv``.
SCRIPTS = ("backend_worker", "keyed_worker")


# --- the spawner process --------------------------------------------------------------------------


def _child(script: str, argv: list[str], fds: list[int]) -> None:
    """In the forked child: take ``fds`` as stdin, stdout and stderr, run the script, exit."""
    code = 0
    try:
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        sys.argv = [str(HERE / f"{script}.py"), *argv]
        try:
            sys.modules[script].main()
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except BaseException:
            traceback.print_exc()
            code = 1
    finally:
        with contextlib.suppress(Exception):
            sys.stdout.flush()
            sys.stderr.flush()
        os._exit(code)


def serve(path: str) -> None:
    """Listen on ``path``; fork a worker for each connection; tell it its pid, then its exit."""
    import importlib

    for script in SCRIPTS:
        importlib.import_module(script)
    assert threading.active_count() == 1, "the spawner must not fork with threads running"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(64)
    # A child's exit (SIGCHLD) writes a byte to this pipe, which wakes the loop to reap it.
    exits, exited = os.pipe()
    os.set_blocking(exited, False)
    signal.signal(signal.SIGCHLD, lambda signum, frame: None)
    signal.set_wakeup_fd(exited)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    selector.register(exits, selectors.EVENT_READ)
    # stdin is a pipe from the tests' process: its end (that process gone) ends the spawner.
    selector.register(sys.stdin.fileno(), selectors.EVENT_READ)
    children: dict[int, socket.socket] = {}  # each running child's pid -> the connection
    print("ready", flush=True)
    while True:
        for key, _ in selector.select():
            if key.fileobj == sys.stdin.fileno():
                if not os.read(key.fd, 4096):
                    return
            elif key.fileobj is listener:
                conn, _ = listener.accept()
                message, fds, _, _ = socket.recv_fds(conn, 65536, 3)
                request = json.loads(message)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    signal.set_wakeup_fd(-1)
                    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                    _child(request["script"], request["argv"], fds)
                for fd in fds:
                    os.close(fd)
                children[pid] = conn
                conn.sendall(json.dumps({"pid": pid}).encode() + b"\n")
            else:
                os.read(exits, 4096)
                for pid in list(children):
                    done, status = os.waitpid(pid, os.WNOHANG)
                    if done == 0:
                        continue
                    conn = children.pop(pid)
                    with contextlib.suppress(OSError):
                        code = os.waitstatus_to_exitcode(status)
                        conn.sendall(json.dumps({"exit": code}).encode() + b"\n")
                    conn.close()


# --- the tests' side ------------------------------------------------------------------------------


class Spawned:
    """A worker forked by the spawner, used as a ``subprocess.Popen`` in text mode with its
    three streams piped: ``pid``, ``stdin``, ``stdout``, ``stderr``, ``poll``, ``wait``,
    ``kill``, ``send_signal``, ``communicate`` and ``returncode``."""

    def __init__(self, spawner_path: str, script: str, argv: list[str]) -> None:
        assert script in SCRIPTS, script
        child_in, stdin = os.pipe()
        stdout, child_out = os.pipe()
        stderr, child_err = os.pipe()
        self.conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.conn.connect(spawner_path)
            request = json.dumps({"script": script, "argv": argv}).encode()
            socket.send_fds(self.conn, [request], [child_in, child_out, child_err])
        finally:
            for fd in (child_in, child_out, child_err):
                os.close(fd)
        self._answers = b""  # what the spawner sent on this connection, not yet read
        started = self._answer(None)
        assert started is not None
        self.pid: int = started["pid"]
        # The worker itself, even once the spawner has reaped it and its pid is free again.
        self._pidfd: int | None = os.pidfd_open(self.pid) if hasattr(os, "pidfd_open") else None
        self.returncode: int | None = None
        self.stdin: io.TextIOWrapper | None = open(  # noqa: SIM115
            stdin, "w", encoding="utf-8"
        )
        self.stdout: io.TextIOWrapper | None = open(stdout, encoding="utf-8")  # noqa: SIM115
        self.stderr: io.TextIOWrapper | None = open(stderr, encoding="utf-8")  # noqa: SIM115
        self._output: dict[int, list[bytes]] = {1: [], 2: []}  # what communicate read

    def _answer(self, timeout: float | None) -> dict[str, Any] | None:
        """The spawner's next answer on this worker's connection, or None if none comes
        within ``timeout`` (None: wait for it)."""
        while b"\n" not in self._answers:
            if not select.select([self.conn], [], [], timeout)[0]:
                return None
            chunk = self.conn.recv(4096)
            assert chunk, "the spawner ended before the worker"
            self._answers += chunk
        line, _, self._answers = self._answers.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _exited(self, timeout: float | None) -> bool:
        """Read the exit status if the spawner sends it within ``timeout`` (None: wait)."""
        if self.returncode is None:
            answer = self._answer(timeout)
            if answer is None:
                return False
            self.returncode = int(answer["exit"])
            self.conn.close()
            if self._pidfd is not None:
                os.close(self._pidfd)
        return True

    def poll(self) -> int | None:
        """The exit status, or None while the worker runs."""
        self._exited(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the worker to exit (raise subprocess.TimeoutExpired past ``timeout``)."""
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the worker unless it has exited."""
        if self.poll() is not None:
            return
        if self._pidfd is None:
            os.kill(self.pid, sig)
            return
        with contextlib.suppress(ProcessLookupError):  # it has exited, not yet told
            signal.pidfd_send_signal(self._pidfd, sig)

    def kill(self) -> None:
        """SIGKILL the worker unless it has exited."""
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        """Close stdin; read stdout and stderr to their end; wait for the exit: its output.

        Past ``timeout`` raise subprocess.TimeoutExpired (the worker runs on; call again). As
        ``Popen.communicate``, it reads the pipes themselves: a line already read is not
        read again."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.stdin is not None:
            with contextlib.suppress(BrokenPipeError):
                self.stdin.close()
            self.stdin = None
        with selectors.DefaultSelector() as selector:
            for number, stream in ((1, self.stdout), (2, self.stderr)):
                if stream is not None:
                    selector.register(stream.fileno(), selectors.EVENT_READ, number)
            while selector.get_map():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout or 0)
                for key, _ in selector.select(left):
                    chunk = os.read(key.fd, 65536)
                    if chunk:
                        self._output[key.data].append(chunk)
                        continue
                    selector.unregister(key.fd)  # the end of the stream
                    stream = self.stdout if key.data == 1 else self.stderr
                    assert stream is not None
                    stream.close()
                    if key.data == 1:
                        self.stdout = None
                    else:
                        self.stderr = None
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        self.wait(left)
        out, err = (b"".join(self._output[n]).decode() for n in (1, 2))
        return out, err


class Spawner:
    """A running spawner process (one per test session and pytest-xdist worker)."""

    def __init__(self, directory: Path) -> None:
        self.path = str(directory / "spawner.sock")
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent.parent), str(HERE)])}
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__)), self.path],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"the spawner said {line!r}"

    def spawn(self, script: str, *argv: str) -> Spawned:
        """Start a worker running ``script`` (a name in SCRIPTS) with ``argv``."""
        return Spawned(self.path, script, list(argv))

    def close(self) -> None:
        """End the spawner (its workers are the tests' to end)."""
        self.proc.communicate(timeout=10)  # closes its stdin, which ends it


if __name__ == "__main__":
    serve(sys.argv[1])
