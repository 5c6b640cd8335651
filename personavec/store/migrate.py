"""Schema migrations with a plan: what a migration drops is known before it is kept.

DuckDB's DDL is transactional, so a migration runs inside one transaction, the catalog is compared before and after
(tables, columns, row counts, the Zarr groups extraction runs point to), and only then committed or rolled back.
The plan is exact (it is what the migration did), not a guess from reading the revision's code.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config
from alembic.ddl.impl import DefaultImpl
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy import Connection
from sqlalchemy.exc import DBAPIError

from personavec.errors import CatalogError, ConfigError
from personavec.files import resource_path
from personavec.store.engine import close_catalog, create_catalog_engine, translate_error


class DuckDBImpl(DefaultImpl):
    """Alembic has no DuckDB implementation of its own; registering this one (on import) enables it."""

    __dialect__ = "duckdb"
    transactional_ddl = True


def alembic_config(catalog_path: Path | str) -> Config:
    """Alembic configuration bound to one catalog file (uses the bundled ``migrations/``)."""
    cfg = Config(str(resource_path("alembic.ini")))
    cfg.set_main_option("script_location", str(resource_path("migrations")))
    cfg.set_main_option("sqlalchemy.url", f"duckdb:///{Path(catalog_path)}")
    return cfg


def migrations_head() -> str:
    """The head revision of the bundled migration scripts (what ``models.SCHEMA_REVISION`` must name)."""
    head = ScriptDirectory.from_config(alembic_config(":memory:")).get_current_head()
    if head is None:
        raise CatalogError("the bundled migrations have no head revision")
    return head


@dataclass(frozen=True)
class DroppedTable:
    name: str
    rows: int


@dataclass(frozen=True)
class MigrationPlan:
    """What migrating the catalog to ``revision`` drops, and whether it was applied."""

    revision: str
    from_revision: str | None
    to_revision: str | None
    dropped_tables: tuple[DroppedTable, ...] = ()
    dropped_columns: tuple[str, ...] = ()  # "table.column" of tables that remain and hold rows
    deleted_rows: tuple[DroppedTable, ...] = ()  # rows removed from tables that remain
    dropped_groups: tuple[str, ...] = ()  # Zarr groups of extraction runs the catalog no longer knows
    applied: bool = False
    kept_groups: tuple[str, ...] = field(default=(), repr=False)  # groups the catalog still knows afterwards

    @property
    def destructive(self) -> bool:
        """Whether it loses data: rows (in dropped tables, dropped columns, or deleted) or activations. Dropping an
        empty table is not destructive."""
        return bool(
            any(t.rows for t in self.dropped_tables) or self.dropped_columns or self.deleted_rows or self.dropped_groups
        )

    def describe(self) -> str:
        """One line: the tables (with row counts), columns and groups it drops."""
        parts = []
        if self.dropped_tables:
            rows = sum(t.rows for t in self.dropped_tables)
            listed = ", ".join(f"{t.name} ({t.rows:,})" for t in self.dropped_tables)
            parts.append(f"{len(self.dropped_tables)} tables holding {rows:,} rows: {listed}")
        if self.dropped_columns:
            parts.append(f"columns {', '.join(self.dropped_columns)}")
        if self.deleted_rows:
            parts.append("rows of " + ", ".join(f"{t.name} ({t.rows:,})" for t in self.deleted_rows))
        if self.dropped_groups:
            parts.append(
                f"{len(self.dropped_groups)} Zarr group(s) of activations no run will refer to: "
                f"{', '.join(self.dropped_groups)}"
            )
        return "; ".join(parts) if parts else "nothing"


@dataclass(frozen=True)
class _Snapshot:
    revision: str | None
    columns: dict[str, tuple[str, ...]]
    rows: dict[str, int]
    groups: frozenset[str]


def _snapshot(conn: Connection) -> _Snapshot:
    columns: dict[str, list[str]] = {}
    for table, column in conn.exec_driver_sql(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c JOIN information_schema.tables t "
        "USING (table_catalog, table_schema, table_name) WHERE t.table_type = 'BASE TABLE' "
        "AND t.table_schema = current_schema() ORDER BY c.table_name, c.ordinal_position"
    ):
        columns.setdefault(table, []).append(column)
    rows = {t: int(conn.exec_driver_sql(f'SELECT count(*) FROM "{t}"').scalar_one()) for t in columns}
    revision = None
    if "alembic_version" in columns:
        revision = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    groups: frozenset[str] = frozenset()
    if "zarr_group" in columns.get("extraction_runs", []):
        groups = frozenset(r[0] for r in conn.exec_driver_sql("SELECT zarr_group FROM extraction_runs"))
    return _Snapshot(revision, {t: tuple(c) for t, c in columns.items()}, rows, groups)


def migrate(
    catalog_path: Path,
    revision: str,
    direction: Literal["upgrade", "downgrade"],
    *,
    apply: Callable[[MigrationPlan], bool] = lambda plan: True,
) -> MigrationPlan:
    """Run Alembic's ``direction`` to ``revision`` in one transaction, build the :class:`MigrationPlan` from the
    catalog before and after, and commit only if ``apply(plan)`` is true (else roll back: the file is unchanged).

    Closes this process's shared catalog first (DuckDB: one configuration per file and process)."""
    close_catalog(catalog_path)
    step = command.upgrade if direction == "upgrade" else command.downgrade
    engine = create_catalog_engine(catalog_path)
    try:
        with engine.connect() as conn:
            trans = conn.begin()
            try:
                before = _snapshot(conn)
                cfg = alembic_config(catalog_path)
                cfg.attributes["connection"] = conn
                try:
                    step(cfg, revision)
                except CommandError as exc:
                    raise ConfigError(f"cannot {direction} {catalog_path} to {revision!r}: {exc}") from exc
                after = _snapshot(conn)
                plan = _plan(revision, before, after)
                ok = apply(plan)
            except BaseException:
                trans.rollback()
                raise
            if ok:
                trans.commit()
                return replace(plan, applied=True)
            trans.rollback()
            return plan
    except DBAPIError as exc:
        raise translate_error(exc, catalog_path) from exc
    finally:
        engine.dispose()


def _plan(revision: str, before: _Snapshot, after: _Snapshot) -> MigrationPlan:
    dropped = tuple(
        DroppedTable(t, before.rows[t]) for t in before.columns if t not in after.columns and t != "alembic_version"
    )
    columns = tuple(
        f"{t}.{c}"
        for t, cols in before.columns.items()
        if t in after.columns and before.rows[t]
        for c in cols
        if c not in after.columns[t]
    )
    deleted = tuple(
        DroppedTable(t, before.rows[t] - after.rows[t])
        for t in before.columns
        if t in after.columns and t != "alembic_version" and after.rows[t] < before.rows[t]
    )
    return MigrationPlan(
        revision=revision,
        from_revision=before.revision,
        to_revision=after.revision,
        dropped_tables=dropped,
        dropped_columns=columns,
        deleted_rows=deleted,
        dropped_groups=tuple(sorted(before.groups - after.groups)),
        kept_groups=tuple(sorted(after.groups)),
    )
