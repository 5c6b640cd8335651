"""Alembic environment for the personavec catalog (DuckDB through duckdb_engine)."""

from alembic import context
from sqlalchemy import create_engine, pool

import personavec.store.migrate  # noqa: F401  (registers Alembic's DuckDB implementation)

config = context.config
url = config.get_main_option("sqlalchemy.url")
catalog = context.get_x_argument(as_dictionary=True).get("catalog")
if catalog:
    url = f"duckdb:///{catalog}"

target_metadata = None
if config.attributes.get("target_metadata") is not None:
    target_metadata = config.attributes["target_metadata"]


def run_migrations_offline() -> None:
    context.configure(url=url, target_metadata=target_metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        context.configure(connection=connection, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()
        return
    engine = create_engine(url, poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn, target_metadata=target_metadata)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
