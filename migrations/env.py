"""Alembic environment: runs against the connection the server hands over, or a URL.

``service.db.upgrade`` passes its open connection in ``config.attributes["connection"]``;
the ``alembic`` command line uses ``HIEDIT_DATABASE_URL`` or ``sqlalchemy.url`` of alembic.ini.
"""
from __future__ import annotations

import os

from alembic import context
from sqlalchemy import create_engine

from service.models import Base

config = context.config
target_metadata = Base.metadata


def _run(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")  # SQLite cannot ALTER most things
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = os.environ.get("HIEDIT_DATABASE_URL") or config.get_main_option("sqlalchemy.url")
    engine = create_engine(url)
    with engine.connect() as conn:
        _run(conn)
        conn.commit()
    engine.dispose()


if context.is_offline_mode():
    context.configure(url=os.environ.get("HIEDIT_DATABASE_URL") or config.get_main_option("sqlalchemy.url"),
                      target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
