"""Helpers of the backend tests: the servers they start, the worker processes, their logs.

Without the binaries (or the drivers) the tests that need them skip, saying how to get them;
with ``CI=true`` a missing server fails instead.
"""

from __future__ import annotations

import contextlib
import glob
import importlib
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import pytest
from spawner import Spawned

HERE = Path(__file__).parent
WORKER = HERE / "backend_worker.py"
ROOT = HERE.parent.parent


def missing(what: str) -> NoReturn:
    """Skip the test for want of ``what`` (fail it when ``CI=true``), saying how to get it."""
    message = (
        f"{what} is not installed: apt-get install redis-server postgresql mariadb-server "
        "(and pip install 'fastapi-once[redis,postgres,mysql]')"
    )
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{message}; CI=true requires every backend test to run", pytrace=False)
    pytest.skip(message)


def require(module: str) -> Any:
    """Import ``module`` for a test module: skip it (fail it with CI=true) if it is missing."""
    try:
        return importlib.import_module(module)
    except ImportError:
        message = f"{module} is not installed: pip install 'fastapi-once[redis,postgres,mysql]'"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}; CI=true requires every backend test to run", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (now)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}: {log.read_text()[-2000:]}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{what} did not listen on {port}: {log.read_text()[-2000:]}")


def shut_down(proc: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
    """Send ``sig`` to a server and wait for it to exit (kill it after 30 s)."""
    if proc is None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- redis-server ---------------------------------------------------------------------------------


@dataclass
class RedisServer:
    """A redis-server of the test suite's own, with a password, on a free port."""

    directory: Path
    port: int = field(default_factory=free_port)
    password: str = field(default_factory=lambda: "rpw-" + secrets.token_hex(8))
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def start(self) -> None:
        log = self.directory / "redis.log"
        args = [
            *("--port", str(self.port), "--bind", "127.0.0.1", "--requirepass", self.password),
            *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            *("--logfile", str(log)),
        ]
        self.proc = subprocess.Popen(["redis-server", *args], stdout=subprocess.DEVNULL)
        _wait_for_port(self.port, self.proc, "redis-server", log)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None

    def restart(self) -> None:
        """Kill the server (losing every key, as without persistence) and start it again."""
        self.stop()
        self.start()


def start_redis() -> RedisServer:
    try:
        import redis  # noqa: F401
    except ImportError:
        missing("the redis Python package")
    if shutil.which("redis-server") is None:
        missing("redis-server")
    server = RedisServer(Path(tempfile.mkdtemp(prefix="fastapi-once-redis-")))
    server.start()
    return server


# --- PostgreSQL -----------------------------------------------------------------------------------


@dataclass
class PostgresServer:
    """A PostgreSQL instance of the test suite's own (initdb in a temp dir), with a password."""

    directory: Path
    bindir: str
    port: int
    password: str
    user: dict[str, Any]
    proc: subprocess.Popen[bytes] | None = None
    # Server settings beyond the suite's own (``-c name=value``), e.g. max_connections.
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def dsn(self) -> str:
        # sslmode=disable: the server has no TLS, and asyncpg's default (prefer) first asks for
        # it on every connection. A connection attempt cancelled just as its socket connected
        # (a timeout, a listener's end while the server restarts) then leaves asyncpg's TLS
        # request future failed and never retrieved ("unexpected connection_lost() call"), which
        # the loop's exception handler reports, and anyio's test runner raises in the test.
        where = f"127.0.0.1:{self.port}/postgres?sslmode=disable"
        return f"postgresql://fastapi_once:{self.password}@{where}"

    def start(self) -> None:
        log = self.directory / "postgres.log"
        with open(log, "ab") as logf:
            self.proc = subprocess.Popen(
                [
                    f"{self.bindir}/postgres",
                    *("-D", str(self.directory / "data"), "-p", str(self.port)),
                    *("-k", str(self.directory), "-c", "listen_addresses=127.0.0.1"),
                    *("-c", "fsync=off", "-c", "synchronous_commit=off"),
                    *("-c", "full_page_writes=off"),
                    *(
                        arg
                        for name, value in self.settings.items()
                        for arg in ("-c", f"{name}={value}")
                    ),
                ],
                stdout=logf,
                stderr=subprocess.STDOUT,
                cwd=self.directory,
                **self.user,
            )
        _wait_for_port(self.port, self.proc, "postgres", log)
        # Listening is not accepting: wait until it has finished starting up (or recovering).
        deadline = time.monotonic() + 30
        ready = [f"{self.bindir}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)]
        while subprocess.run(ready, check=False).returncode != 0:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not become ready: {log.read_text()[-2000:]}")
            time.sleep(0.05)

    def halt(self) -> None:
        """Stop the server (a fast shutdown: sessions are ended), keeping its data."""
        shut_down(self.proc, signal.SIGINT)
        self.proc = None

    def restart(self) -> None:
        """Stop the server, ending every session and lock, and start it again on its data."""
        self.halt()
        self.start()

    def stop(self) -> None:
        """End the server and delete its data: an immediate shutdown (SIGQUIT), since nothing
        of the data is kept."""
        shut_down(self.proc, signal.SIGQUIT)
        self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)


def start_postgres(**settings: str) -> PostgresServer:
    """initdb and start a PostgreSQL server in a temp dir, as the postgres user if we are root.

    ``settings`` are server settings for its command line (``max_connections="1000"``).
    """
    try:
        import asyncpg  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        missing("the asyncpg Python package")
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    bindirs = [d for d in bindirs if os.path.exists(f"{d}/initdb")]
    if not bindirs:
        missing("PostgreSQL (initdb, postgres)")
    bindir = bindirs[-1]
    directory = Path(tempfile.mkdtemp(prefix="fastapi-once-pg-"))
    # initdb refuses to run as root: run the server as the postgres user when we are root.
    user: dict[str, Any] = {}
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        os.chown(directory, pw.pw_uid, pw.pw_gid)
        user = {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}
    password = "pgpw-" + secrets.token_hex(8)
    pwfile = directory / "pwfile"
    pwfile.write_text(password + "\n")
    if user:
        os.chown(pwfile, user["user"], user["group"])
    subprocess.run(
        [
            f"{bindir}/initdb",
            *("-D", str(directory / "data"), "-U", "fastapi_once", f"--pwfile={pwfile}"),
            *("--auth-local=trust", "--auth-host=scram-sha-256", "--no-sync", "-E", "UTF8"),
        ],
        check=True,
        capture_output=True,
        cwd=directory,
        **user,
    )
    server = PostgresServer(directory, bindir, free_port(), password, user, settings=settings)
    server.start()
    return server


# --- MariaDB (or MySQL) ---------------------------------------------------------------------------


@dataclass
class MariaDBServer:
    """A MariaDB server of the test suite's own (mariadb-install-db in a temp dir), with a
    password-protected user and a database, on a free port on 127.0.0.1."""

    directory: Path
    mariadbd: str
    port: int
    password: str
    user: str | None  # --user= for mariadbd when we are root
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mysql://fastapi_once:{self.password}@127.0.0.1:{self.port}/fastapi_once_tests"

    def start(self) -> None:
        log = self.directory / "mariadb.log"
        self.proc = subprocess.Popen(
            [
                self.mariadbd,
                *("--no-defaults", f"--datadir={self.directory / 'data'}", f"--port={self.port}"),
                *("--bind-address=127.0.0.1", f"--socket={self.directory / 'sock'}"),
                *(f"--pid-file={self.directory / 'pid'}", f"--log-error={log}"),
                *(f"--init-file={self.directory / 'init.sql'}", "--skip-name-resolve"),
                f"--tmpdir={self.directory}",  # see start_mariadb
                *("--innodb-flush-log-at-trx-commit=0", "--innodb-doublewrite=0"),
                *("--skip-log-bin", "--max-connections=500", "--innodb-buffer-pool-size=64M"),
                *([f"--user={self.user}"] if self.user else []),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_for_port(self.port, self.proc, "mariadbd", log)

    def halt(self) -> None:
        """Shut the server down (its sessions and locks end; committed rows stay: the suite's
        server writes its log lazily, so a SIGKILL could lose the last second of commits)."""
        shut_down(self.proc, signal.SIGTERM)
        self.proc = None

    def restart(self) -> None:
        """Shut the server down and start it again on its data."""
        self.halt()
        self.start()

    def stop(self) -> None:
        """End the server and delete its data: killed, since nothing of the data is kept (a
        shutdown writes it out first, and once took the 30 s of shut_down's patience)."""
        shut_down(self.proc, signal.SIGKILL)
        self.proc = None
        shutil.rmtree(self.directory, ignore_errors=True)


def start_mariadb() -> MariaDBServer:
    """mariadb-install-db and start a MariaDB server in a temp dir (as the mysql user if we
    are root), with the user ``fastapi_once`` (a random password) and the database
    ``fastapi_once_tests``."""
    try:
        import asyncmy  # noqa: F401
    except ImportError:
        missing("the asyncmy Python package")
    mariadbd = shutil.which("mariadbd") or shutil.which("mariadbd", path="/usr/sbin:/usr/libexec")
    install = shutil.which("mariadb-install-db") or shutil.which("mysql_install_db")
    if mariadbd is None or install is None:
        missing("MariaDB (mariadbd, mariadb-install-db)")
    directory = Path(tempfile.mkdtemp(prefix="fastapi-once-mariadb-"))
    user = None
    if os.geteuid() == 0:  # mariadbd refuses to run as root: it switches to the mysql user
        user = "mysql"
        pw = pwd.getpwnam(user)
        os.chown(directory, pw.pw_uid, pw.pw_gid)
    password = "mypw-" + secrets.token_hex(8)
    init = directory / "init.sql"
    init.write_text(
        f"CREATE USER IF NOT EXISTS 'fastapi_once'@'127.0.0.1' IDENTIFIED BY '{password}';\n"
        "GRANT ALL ON *.* TO 'fastapi_once'@'127.0.0.1';\n"
        "CREATE DATABASE IF NOT EXISTS fastapi_once_tests;\n"
    )
    subprocess.run(
        [
            install,
            *("--no-defaults", f"--datadir={directory / 'data'}", "--skip-test-db"),
            *("--auth-root-authentication-method=normal", "--skip-name-resolve"),
            # A server deletes the temporary tables (#sql*) it finds in its tmpdir when it
            # starts: in a tmpdir of its own, not /tmp, where it would delete another's, and
            # installs or servers starting together failed now and then ("Can't find file:
            # '/tmp/#sql-temptable-...'"). mariadb-install-db hands the option to mariadbd.
            f"--tmpdir={directory}",
            *([f"--user={user}"] if user else []),
        ],
        check=True,
        capture_output=True,
        cwd=directory,
    )
    server = MariaDBServer(directory, mariadbd, free_port(), password, user)
    server.start()
    return server


def secret_of(spec: dict[str, Any]) -> str | None:
    """The password in ``spec``'s URL, which must never show."""
    from urllib.parse import urlsplit

    url = spec.get("url") or spec.get("dsn")
    return urlsplit(url).password if url else None


# --- worker processes -----------------------------------------------------------------------------


@dataclass
class Worker:
    """A process running ``backend_worker.py``: it calls a once with ``across=`` on a signal."""

    proc: Spawned

    def go(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()

    def wait_ready(self) -> None:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line.strip() == "ready", f"worker said {line!r}, stderr: {self._stderr()}"

    def outcome(self, timeout: float = 30) -> dict[str, Any]:
        """The worker's one-line JSON report: {"ok": result} or {"error": type, "message": ...}."""
        out, err = self.proc.communicate(timeout=timeout)
        lines = [line for line in out.splitlines() if line.startswith("{")]
        assert lines, f"worker reported nothing (exit {self.proc.returncode}), stderr: {err}"
        report: dict[str, Any] = json.loads(lines[-1])
        report["pid"] = self.proc.pid
        return report

    def _stderr(self) -> str:
        self.proc.kill()
        return self.proc.communicate()[1]


def read_log(path: Path) -> list[dict[str, Any]]:
    """The events the workers' work appended to ``path`` (one JSON object a line)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_for(predicate: Callable[[], bool], timeout: float = 20, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.005)
