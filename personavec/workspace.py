"""The workspace: one directory holding ``catalog.duckdb`` (the SQL catalog) and ``activations.zarr``.

Resolved from ``--workspace``, else ``$PERSONAVEC_WORKSPACE``, else ``./personavec-workspace``. Every stage takes a
``Workspace`` first: ``fn(ws, config, *, resume=None, progress=None)``. The workspace owns this process's catalog,
opened on first use (:meth:`Workspace.catalog`) and kept open until :meth:`Workspace.close`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from personavec.errors import ConfigError, WorkspaceError

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.store.migrate import MigrationPlan

ENV_VAR = "PERSONAVEC_WORKSPACE"
DEFAULT_DIR = "personavec-workspace"
CATALOG_FILE = "catalog.duckdb"
ZARR_DIR = "activations.zarr"


@dataclass(frozen=True)
class Workspace:
    """One workspace directory. Construct with :meth:`resolve`; the catalog with :meth:`catalog`."""

    root: Path

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    @property
    def zarr_path(self) -> Path:
        return self.root / ZARR_DIR

    @classmethod
    def resolve(cls, path: str | os.PathLike[str] | None = None) -> Workspace:
        """The workspace named by ``path``, else ``$PERSONAVEC_WORKSPACE``, else ``./personavec-workspace``."""
        chosen = path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_DIR
        return cls(Path(chosen).expanduser().resolve())

    def exists(self) -> bool:
        return self.catalog_path.is_file()

    def require(self) -> Workspace:
        """Fail with a clear message unless this directory is an initialised workspace."""
        if not self.root.exists():
            raise WorkspaceError(f"workspace {self.root} does not exist: run `personavec init --workspace {self.root}`")
        if not self.exists():
            raise WorkspaceError(
                f"{self.root} is not a personavec workspace (no {CATALOG_FILE}): "
                f"run `personavec init --workspace {self.root}` or pass the right --workspace"
            )
        return self

    def catalog(self, *, read_only: bool = False) -> Catalog:
        """This process's catalog of the workspace (schema checked against the package's head revision), opened on
        first use and shared by every stage; do not close it yourself, call :meth:`close` when done."""
        from personavec.store.engine import open_catalog

        self.require()
        return open_catalog(self.catalog_path, read_only=read_only)

    def close(self) -> None:
        """Close this process's catalog (releases DuckDB's file lock for other processes); reopened on next use."""
        from personavec.store.engine import close_catalog

        close_catalog(self.catalog_path)

    def upgrade(self, revision: str = "head") -> None:
        """Bring the catalog's schema to ``revision`` with Alembic (creates the file if needed)."""
        from personavec.store.migrate import migrate

        self.root.mkdir(parents=True, exist_ok=True)
        migrate(self.catalog_path, revision, "upgrade")

    def downgrade(self, revision: str, *, allow_destructive: bool = False, dry_run: bool = False) -> MigrationPlan:
        """Take the catalog's schema down to ``revision`` (``base`` drops every table).

        The downgrade runs in one transaction and is kept only when it loses no data, or ``allow_destructive`` is
        set; with ``dry_run`` it is always rolled back. Kept, it also removes the Zarr groups of the extraction runs
        it dropped and any run group the catalog no longer refers to, so that a reused run id never meets an old
        group. Returns the plan (what was or would be dropped; ``plan.applied``).

        Raises :class:`ConfigError` (nothing changed) when it would lose data and ``allow_destructive`` is not set.
        """
        from personavec import arrays
        from personavec.store.migrate import migrate

        self.require()
        stale: list[str] = []

        def apply(plan: MigrationPlan) -> bool:
            known = set(plan.kept_groups)
            stale.extend(g for g in arrays.run_groups(self.zarr_path) if g not in known)
            return not dry_run and (allow_destructive or not (plan.destructive or stale))

        plan = migrate(self.catalog_path, revision, "downgrade", apply=apply)
        plan = replace(plan, dropped_groups=tuple(sorted({*plan.dropped_groups, *stale})))
        if plan.applied:
            arrays.remove_groups(self.zarr_path, plan.dropped_groups)
        elif not dry_run:
            raise ConfigError(
                f"downgrading {self.catalog_path} to {revision} would drop {plan.describe()}; nothing was changed: "
                f"back up {self.root}, then rerun with --yes (allow_destructive=True) to drop them"
            )
        return plan


def init_workspace(path: str | os.PathLike[str] | None = None) -> Workspace:
    """Create (or bring up to date) a workspace at the head schema, with the built-in persona and question sets.

    Idempotent: running it on an existing workspace upgrades the schema and leaves the data alone.
    """
    from personavec.ingest import register_builtin_sets

    ws = Workspace.resolve(path)
    if ws.root.exists() and not ws.root.is_dir():
        raise WorkspaceError(f"{ws.root} exists and is not a directory")
    if ws.root.is_dir() and any(ws.root.iterdir()) and not ws.exists():
        raise WorkspaceError(
            f"{ws.root} is a non-empty directory without {CATALOG_FILE}: "
            "pick an empty or new directory for the workspace"
        )
    ws.upgrade("head")
    register_builtin_sets(ws)
    ws.close()  # a workspace just made is often used next by another process
    return ws
