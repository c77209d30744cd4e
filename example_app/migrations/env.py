"""Alembic's env.py for the example's SQLite database (a sync engine).

The app runs it through ``fastapi_once.alembic.upgrade`` (in one process of the deployment),
which sets ``sqlalchemy.url`` to the app's database file; the app's config also carries
``attributes["after_upgrade"]``, its record of each run.
"""

from alembic import context
from sqlalchemy import create_engine, pool

from fastapi_once.alembic import include_name

config = context.config
url = config.get_main_option("sqlalchemy.url")
assert url, "set sqlalchemy.url (the app sets it to its database file)"
engine = create_engine(url, poolclass=pool.NullPool)
try:
    with engine.connect() as connection:
        context.configure(connection=connection, render_as_batch=True, include_name=include_name)
        with context.begin_transaction():
            context.run_migrations()
        after_upgrade = config.attributes.get("after_upgrade")
        if after_upgrade is not None:
            after_upgrade(connection, context.get_context().get_current_heads())
            connection.commit()
finally:
    engine.dispose()
