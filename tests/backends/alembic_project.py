"""An Alembic project of the migration tests' own, written into a directory.

Its ``env.py`` is Alembic's documented pattern, sync or async by the URL's driver (an async
driver runs ``asyncio.run`` around ``connection.run_sync``), in one transaction for the whole
upgrade unless the config's ``attributes["per_revision"]`` asks for one per revision. Each
revision appends ``<revision> <pid>`` to ``runs.log`` as it starts (one ``os.write``), may wait
at a gate (the ``GATE`` directory: it writes ``entered-<pid>`` there and waits for ``open``),
may fail, and then creates its table ``t_<revision>`` and inserts a row into ``applied`` in the
migration's transaction: what ran is in the log, what was committed in the database.
"""

from __future__ import annotations

from pathlib import Path

from alembic.config import Config

ENV_PY = """
import asyncio
import os

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlalchemy.ext.asyncio import async_engine_from_config

from fastapi_once.alembic import include_name

config = context.config
ASYNC_DRIVERS = ("+asyncpg", "+asyncmy", "+aiosqlite")


def migrate(connection):
    per_revision = config.attributes.get("per_revision", False)
    context.configure(
        connection=connection, include_name=include_name, transaction_per_migration=per_revision
    )
    with context.begin_transaction():
        context.run_migrations()


async def migrate_async():
    section = config.get_section(config.config_ini_section, {})
    engine = async_engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
    async with engine.connect() as connection:
        await connection.run_sync(migrate)
    await engine.dispose()


try:
    if any(d in config.get_main_option("sqlalchemy.url") for d in ASYNC_DRIVERS):
        asyncio.run(migrate_async())
    else:
        section = config.get_section(config.config_ini_section, {})
        engine = engine_from_config(section, prefix="sqlalchemy.", poolclass=pool.NullPool)
        with engine.connect() as connection:
            migrate(connection)
        engine.dispose()
finally:
    with open(os.path.join(os.path.dirname(__file__), "runs.log"), "a") as log:
        log.write(f"env-exit {os.getpid()}\\n")
"""

REVISION = """
import os
import time

import sqlalchemy as sa
from alembic import op

revision = {revision!r}
down_revision = {down!r}
branch_labels = None
depends_on = None
LOG = os.path.join(os.path.dirname(os.path.dirname(__file__)), "runs.log")


def upgrade():
    fd = os.open(LOG, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    os.write(fd, f"{{revision}} {{os.getpid()}}\\n".encode())
    os.close(fd)
    gate = os.environ.get("GATE")
    if gate and {gated!r}:
        open(os.path.join(gate, f"entered-{{os.getpid()}}"), "w").close()
        deadline = time.monotonic() + 30
        while not os.path.exists(os.path.join(gate, "open")) and time.monotonic() < deadline:
            time.sleep(0.01)
    if {fails!r}:
        raise RuntimeError(f"revision {{revision}} is broken")
    if down_revision is None:
        columns = [sa.Column("revision", sa.String(32)), sa.Column("pid", sa.Integer)]
        op.create_table("applied", *columns)
    op.create_table(f"t_{{revision}}", sa.Column("id", sa.Integer, primary_key=True))
    op.execute(
        sa.text("INSERT INTO applied (revision, pid) VALUES (:r, :p)").bindparams(
            r=revision, p=os.getpid()
        )
    )


def downgrade():
    raise AssertionError("downgrade must never run")
"""


def write_project(directory: Path) -> Path:
    """Write the project's ``env.py`` (and no revision) into ``directory``; return it."""
    (directory / "versions").mkdir(parents=True, exist_ok=True)
    (directory / "env.py").write_text(ENV_PY)
    (directory / "script.py.mako").write_text("")
    return directory


def add_revision(
    directory: Path, revision: str, down: str | None, *, fails: bool = False, gated: bool = False
) -> None:
    """Write revision ``revision`` after ``down`` (replacing one of that id)."""
    text = REVISION.format(revision=revision, down=down, fails=fails, gated=gated)
    (directory / "versions" / f"{revision}.py").write_text(text)


def config_of(directory: Path, url: str, per_revision: bool = False) -> Config:
    """An Alembic ``Config`` of the project in ``directory``, migrating the database at ``url``
    (with ``per_revision``, in one transaction per revision: ``transaction_per_migration``)."""
    config = Config()
    config.set_main_option("script_location", str(directory))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    config.attributes["per_revision"] = per_revision
    return config


def runs(directory: Path) -> list[tuple[str, int]]:
    """``(revision, pid)`` of each revision that started to run, in order (``env-exit`` lines
    say a run of ``env.py`` ended)."""
    log = directory / "runs.log"
    if not log.exists():
        return []
    pairs = [line.split() for line in log.read_text().splitlines() if line.strip()]
    return [(what, int(pid)) for what, pid in pairs]
