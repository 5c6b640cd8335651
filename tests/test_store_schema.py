"""Schema ownership: Alembic head == ORM metadata, upgrade/downgrade walk, schema guard."""

from __future__ import annotations

import duckdb
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from personavec.errors import CatalogLockedError, SchemaVersionError, WorkspaceError
from personavec.store.engine import create_catalog_engine, current_revision
from personavec.store.models import SCHEMA_REVISION, Base
from personavec.workspace import Workspace, init_workspace


def _same_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    """duckdb_engine reflects DOUBLE as the generic FLOAT (double precision); every other type compares as usual."""
    if (
        isinstance(metadata_type, sa.Double)
        and isinstance(inspected_type, sa.Float)
        and inspected_type.precision is None
    ):
        return False
    return None


def _unique_constraints_in_db(conn) -> set[tuple[str, tuple[str, ...]]]:
    rows = conn.exec_driver_sql(
        "SELECT table_name, constraint_column_names FROM duckdb_constraints() WHERE constraint_type = 'UNIQUE'"
    )
    return {(t, tuple(cols)) for t, cols in rows}


def _diff(ws: Workspace) -> list:
    """Alembic's autogenerate diff, plus the unique constraints duckdb_engine cannot reflect, checked directly."""
    engine = create_catalog_engine(ws.catalog_path)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": _same_type})
            diff = compare_metadata(ctx, Base.metadata)
            in_db = _unique_constraints_in_db(conn)
    finally:
        engine.dispose()
    unreflected = [d for d in diff if d[0] == "add_constraint" and isinstance(d[1], sa.UniqueConstraint)]
    for _, uc in unreflected:
        assert (uc.table.name, tuple(c.name for c in uc.columns)) in in_db, f"unique constraint missing: {uc}"
    return [d for d in diff if not (d[0] == "add_constraint" and isinstance(d[1], sa.UniqueConstraint))]


def test_upgrade_head_matches_orm_metadata(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    ws.upgrade("head")
    assert _diff(ws) == []


@pytest.mark.slow
def test_upgrade_downgrade_upgrade(tmp_path):
    ws = Workspace.resolve(tmp_path / "ws")
    ws.upgrade("head")
    ws.downgrade("base")
    engine = create_catalog_engine(ws.catalog_path)
    try:
        assert current_revision(engine) is None
        with engine.connect() as conn:
            tables = {r[0] for r in conn.exec_driver_sql("SELECT table_name FROM information_schema.tables")}
        assert tables <= {"alembic_version"}
    finally:
        engine.dispose()
    ws.upgrade("head")
    assert _diff(ws) == []


@pytest.mark.slow
def test_catalog_not_at_head_names_the_fix(tmp_path):
    ws = init_workspace(tmp_path / "ws")
    ws.downgrade("base", allow_destructive=True)
    with pytest.raises(SchemaVersionError, match="personavec db upgrade"):
        ws.catalog()
    ws.upgrade("head")
    with ws.catalog() as catalog:
        assert current_revision(catalog.engine) == SCHEMA_REVISION


def test_not_a_workspace(tmp_path):
    with pytest.raises(WorkspaceError, match="does not exist"):
        Workspace.resolve(tmp_path / "missing").catalog()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(WorkspaceError, match="not a personavec workspace"):
        Workspace.resolve(tmp_path / "other").catalog()
    with pytest.raises(WorkspaceError, match="non-empty directory"):
        init_workspace(tmp_path / "other")


def test_locked_catalog_is_a_clear_error(workspace, monkeypatch, hold_catalog):
    import time

    # DuckDB's lock is per process: hold it from a second process.
    with hold_catalog(workspace.catalog_path):
        monkeypatch.setenv("PERSONAVEC_LOCK_TIMEOUT", "0.5")  # units of work wait this long for the file
        t = time.monotonic()
        with pytest.raises(CatalogLockedError, match="locked by another process"):
            workspace.catalog()
        assert 0.3 < time.monotonic() - t < 5
    time.sleep(0.1)
    with workspace.catalog():
        pass
    assert duckdb.__version__


@pytest.mark.slow
def test_evaluations_migration_walks_down_to_0006_and_back(tmp_path):
    """0007 adds only the evaluation tables and their sequence: downgrading to 0006 removes exactly those and keeps
    every earlier table; upgrading again gives the ORM's schema."""
    ws = Workspace.resolve(tmp_path / "ws")
    ws.upgrade("head")

    def tables() -> set[str]:
        engine = create_catalog_engine(ws.catalog_path)
        try:
            with engine.connect() as conn:
                return {r[0] for r in conn.exec_driver_sql("SELECT table_name FROM information_schema.tables")}
        finally:
            engine.dispose()

    new = {"evaluation_runs", "evaluation_members", "evaluation_figures", "evaluation_answers"}
    at_head = tables()
    assert new <= at_head
    ws.downgrade("0006")
    assert tables() == at_head - new
    ws.upgrade("head")
    assert tables() == at_head and _diff(ws) == []
