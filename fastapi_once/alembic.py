"""Alembic migrations once across replicas: a once whose version is the set of head revisions.

``upgrade(config)`` returns a :class:`~fastapi_once.Once` that runs ``alembic upgrade heads``
through the project's own ``env.py`` (sync or async engine) once across every process sharing
its backend. Its identity is ``name@<heads>``: adding a revision makes a new version, so the next
start runs the upgrade again, once. Needs the ``alembic`` extra (``fastapi-once[alembic]``).

Invariants: only upgrade steps are ever built (never a downgrade); a database whose version
table holds revisions these scripts do not know (a newer app migrated it) is left alone, with
one log line; between revisions the leader checks that it still holds its lock (its work is
cancelled when the lock is lost) and, where the backend gives a fencing token, writes that token
into ``fastapi_once_alembic`` in the same transaction as the next revision, refusing to go on
once a newer leader's token is there.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import anyio
import sqlalchemy as sa
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext, MigrationStep
from alembic.script import ScriptDirectory

from ._core import Once
from ._errors import LeaseLostError
from ._fastapi import once
from ._telemetry import fields
from .backends import Backend, fencing_token

logger = logging.getLogger("fastapi_once")

#: The table, in the migrated database, that holds each migration once's latest fencing token.
FENCE_TABLE = "fastapi_once_alembic"

_fences = sa.Table(
    FENCE_TABLE,
    sa.MetaData(),
    sa.Column("name", sa.String(200), primary_key=True),
    sa.Column("token", sa.BigInteger, nullable=False),
)

# The query parameters of a SQLAlchemy PostgreSQL URL that asyncpg reads as connection settings;
# any other (a SQLAlchemy dialect option) would reach the server as a setting, so it is dropped.
_LIBPQ_PARAMS = frozenset(
    {"host", "port", "sslmode", "sslrootcert", "sslcert", "sslkey", "passfile", "service"}
    | {"target_session_attrs"}
)
_YES, _NO = frozenset({"true", "1", "yes", "on"}), frozenset({"false", "0", "no", "off"})

Url = str | Callable[[], str]


def upgrade(
    config: Config,
    *,
    across: Backend | str | Callable[[], Backend | str] | None = None,
    url: Url | None = None,
    name: str = "alembic",
    **options: Any,
) -> Once[[], list[str]]:
    """Return a once that upgrades the database to the scripts' heads, once across processes.

    Use it in ``once_lifespan(migrate)`` (every process waits for the upgrade before serving)
    or as a dependency. Its value is the sorted head revisions the database is at afterwards.

    Args:
        config: the Alembic ``Config`` (``Config("alembic.ini")``); its scripts are read now, to
            make the version, and its ``env.py`` runs in the leader, in a worker thread.
        across: a backend, URL or factory as in ``once(across=)``. Default: the database the
            migrations target, where it can lock: PostgreSQL or MySQL/MariaDB (a
            ``PostgresBackend`` or ``MySQLBackend`` on its URL, with ``wait_timeout=None``).
            SQLite needs a ``FileLockBackend``.
        url: the database's SQLAlchemy URL, or a function returning it at first use; it is set
            as the config's ``sqlalchemy.url`` before each run. Default: that option as it is.
        name: the once's name in the backend (give each migrated database its own).
        options: other options of ``once()`` (``cooldown=``, ``timeout=``, ``retries=``...).

    Raises:
        ValueError: the scripts have no revision; ``version=`` or ``key=`` is given; without
            ``across=``, the database cannot hold the lock (at first use if its URL is only
            known then).
        TypeError: an option is not one of ``once()``'s.
    """
    for option in ("version", "key"):
        if option in options:
            raise ValueError(
                f"fastapi_once.alembic.upgrade({option}=...): the upgrade has one value, whose "
                "version is the scripts' head revisions (a new revision runs it again); drop "
                f"{option}="
            )
    script = ScriptDirectory.from_config(config)
    heads = sorted(script.get_heads())
    if not heads:
        raise ValueError(
            "fastapi_once.alembic.upgrade(): the Alembic scripts have no revision; create one "
            "with `alembic revision`, or check script_location"
        )

    def target() -> str | None:
        found = url() if callable(url) else url
        return found if found is not None else config.get_main_option("sqlalchemy.url")

    if across is None:
        known = None if callable(url) else target()
        if known is not None:
            database_lock(known)  # refuse a database that cannot lock now, not at first use
        across = functools.partial(_lock_of, target)

    async def run() -> list[str]:
        if url is not None:
            config.set_main_option("sqlalchemy.url", (target() or "").replace("%", "%%"))
        stop = threading.Event()
        migrate = functools.partial(_migrate, config, script, name, fencing_token(), stop)
        try:
            return await anyio.to_thread.run_sync(migrate, abandon_on_cancel=True)
        finally:
            stop.set()  # cancelled (the lock was lost): the thread stops before the next revision

    return once(run, across=across, name=name, version="+".join(heads), **options)


def database_lock(url: str) -> Backend:
    """Return the backend that locks in the database ``url`` names (a SQLAlchemy URL).

    ``postgresql+asyncpg://``, ``postgresql+psycopg://``... become a ``PostgresBackend`` on the
    same database; ``mysql+asyncmy://``, ``mysql+pymysql://``, ``mariadb+mariadbconnector://``...
    a ``MySQLBackend`` on it. Their followers wait as long as the leader holds the lock.

    Raises:
        ValueError: the URL cannot be read, names a database with no lock fastapi_once uses, or
            has a connection option the lock's store cannot use (MySQL's ``ssl_*=``,
            ``unix_socket=``).
    """
    try:
        parsed = sa.engine.make_url(url)
    except sa.exc.ArgumentError:
        raise ValueError(
            "fastapi_once.alembic.upgrade(): sqlalchemy.url is not a SQLAlchemy URL "
            "(dialect+driver://user:password@host/dbname)"
        ) from None  # the message would show the URL, password and all
    dialect = parsed.get_backend_name()
    if dialect == "postgresql":
        from .backends import PostgresBackend

        query = {k: v for k, v in parsed.query.items() if k in _LIBPQ_PARAMS}
        dsn = parsed.set(drivername="postgresql", query=query)
        return PostgresBackend(dsn.render_as_string(hide_password=False), wait_timeout=None)
    if dialect in ("mysql", "mariadb"):
        from .backends import MySQLBackend

        dsn = parsed.set(drivername=dialect, query=_mysql_query(parsed.query))
        return MySQLBackend(dsn.render_as_string(hide_password=False), wait_timeout=None)
    fix = "across=FileLockBackend('/var/lib/app/locks')" if dialect == "sqlite" else "across="
    raise ValueError(
        f"fastapi_once.alembic.upgrade(): the migrations target {dialect}, where fastapi_once "
        f"cannot lock; pass {fix} (on one host: a FileLockBackend directory; across hosts: a "
        "RedisBackend, PostgresBackend or MySQLBackend)"
    )


def _mysql_query(query: Mapping[str, str | tuple[str, ...]]) -> dict[str, str]:
    """The options of a SQLAlchemy MySQL URL that the lock's store keeps: ``ssl`` alone.

    A TLS option it cannot take (``ssl_ca=``...) or a socket is refused, not dropped: the lock
    would connect in the clear, or elsewhere. Other options (``charset=``...) are the driver's.
    """
    kept: dict[str, str] = {}
    for option, given in query.items():
        value = (given if isinstance(given, str) else given[-1]).lower()
        if option == "ssl" and value in _YES | _NO:
            kept["ssl"] = "true" if value in _YES else "false"
        elif option.startswith("ssl") or option == "unix_socket":
            raise ValueError(
                f"fastapi_once.alembic.upgrade(): the database's lock cannot use {option}= of "
                "sqlalchemy.url (the MySQL store connects over TCP, and takes TLS as ssl=true "
                "or an SSLContext); pass across=MySQLBackend('mysql://user:password@host/db', "
                "ssl=ssl.create_default_context(cafile=...), wait_timeout=None)"
            )
    return kept


def _lock_of(target: Callable[[], str | None]) -> Backend:
    found = target()
    if found is None:
        raise ValueError(
            "fastapi_once.alembic.upgrade(): no database URL to lock on; set sqlalchemy.url in "
            "the Alembic config, pass url=, or pass across="
        )
    return database_lock(found)


def include_name(name: str | None, type_: str, parent_names: object) -> bool:
    """For ``context.configure(include_name=...)`` in ``env.py``: autogenerate skips the tables
    of fastapi_once (``fastapi_once``, its ``_keyed`` table and ``fastapi_once_alembic``)."""
    return not (type_ == "table" and name is not None and name.startswith("fastapi_once"))


class _Stopped(Exception):
    """The leader's lock was lost: its caller already has ``LeaseLostError``; roll back."""


def _migrate(
    config: Config, script: ScriptDirectory, name: str, token: int | None, stop: threading.Event
) -> list[str]:
    """Run ``env.py`` with upgrade steps to the heads; return the heads the database is at."""
    known = {revision.revision for revision in script.walk_revisions()}
    reached = sorted(script.get_heads())

    def steps(rev: tuple[str, ...], context: MigrationContext) -> Iterator[MigrationStep]:
        # Pulled lazily by run_migrations: each step is asked for after the previous one's
        # revision (and its per-migration transaction, if any) is done.
        newer = sorted(set(rev) - known)
        if newer:
            logger.warning(
                "%s: the database is at revision %s, which these migrations do not have (their "
                "heads: %s): a newer version of the app migrated it; not downgrading",
                name,
                ", ".join(newer),
                ", ".join(reached),
                extra=fields(name, "alembic_newer_database"),
            )
            reached[:] = sorted(rev)
            return
        first = True
        for revision in reversed(list(script.iterate_revisions("heads", rev, implicit_base=True))):
            if stop.is_set():
                raise _Stopped(name)
            if token is not None:
                _fence(context, name, token, rev if first else None)
            first = False
            yield MigrationStep.upgrade_from_script(script.revision_map, revision)
        if stop.is_set():
            raise _Stopped(name)

    with EnvironmentContext(config, script, fn=steps, destination_rev="heads"):
        script.run_env()
    return reached


def _fence(context: MigrationContext, name: str, token: int, read: tuple[str, ...] | None) -> None:
    """Write ``token`` for ``name`` in the migration's transaction, unless a newer one is there.

    The row stays locked until that transaction ends, so leaders of one database take turns.
    ``read``: the heads the steps were planned from, checked again once the row is held.
    """
    connection = context.connection
    assert connection is not None  # online mode: env.py gave a connection
    _fences.create(connection, checkfirst=True)
    found = connection.execute(
        sa.select(_fences.c.token).where(_fences.c.name == name).with_for_update()
    ).scalar()
    where = f"the {FENCE_TABLE} table"
    if found is None:
        connection.execute(sa.insert(_fences).values(name=name, token=token))
    elif found > token:
        raise LeaseLostError(name, where, f"a newer leader wrote fencing token {found}")
    else:
        connection.execute(sa.update(_fences).where(_fences.c.name == name).values(token=token))
    if read is not None and tuple(context.get_current_heads()) != tuple(read):
        raise LeaseLostError(name, where, "another leader migrated while this one waited")
