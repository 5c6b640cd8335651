"""The workspace: one directory holding ``catalog.duckdb`` (the SQL catalog) and ``activations.zarr``.

The activations may live elsewhere: ``init_workspace(path, zarr_url="s3://bucket/acts.zarr")`` (``personavec init
--zarr-url``) records an fsspec URL in ``workspace.json``, for several machines that share an object store or a
filesystem mounted at another path (``file:///shared/acts.zarr``); :attr:`Workspace.zarr_location` is what every
stage opens.

Resolved from ``--workspace``, else ``$PERSONAVEC_WORKSPACE``, else ``./personavec-workspace``. Every stage takes a
``Workspace`` first: ``fn(ws, config, *, resume=None, progress=None)``. The workspace owns this process's catalog,
opened on first use (:meth:`Workspace.catalog`) and kept open until :meth:`Workspace.close`.
"""

from __future__ import annotations

import json
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
SETTINGS_FILE = "workspace.json"


@dataclass(frozen=True)
class Workspace:
    """One workspace directory. Construct with :meth:`resolve`; the catalog with :meth:`catalog`."""

    root: Path

    def __post_init__(self) -> None:  # Workspace("ws") as well as Workspace(Path("ws"))
        object.__setattr__(self, "root", Path(self.root).expanduser())

    @property
    def catalog_path(self) -> Path:
        return self.root / CATALOG_FILE

    @property
    def zarr_path(self) -> Path:
        """The default, local activation store (``activations.zarr`` in the workspace)."""
        return self.root / ZARR_DIR

    @property
    def zarr_url(self) -> str | None:
        """The fsspec URL of the activation store when the workspace sets one (``init --zarr-url``), else None."""
        path = self.root / SETTINGS_FILE
        if not path.is_file():
            return None
        try:
            url = json.loads(path.read_text()).get("zarr_url")
        except (OSError, ValueError, AttributeError) as exc:
            raise WorkspaceError(f"{path} is not a JSON object of workspace settings: {exc}") from exc
        return str(url) if url else None

    @property
    def zarr_location(self) -> str:
        """Where the activations live, as Zarr opens it: the workspace's ``zarr_url``, else :attr:`zarr_path`."""
        return self.zarr_url or str(self.zarr_path)

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
        if not self.root.is_dir():
            raise WorkspaceError(f"{self.root} is a file, not a workspace directory: pass the right --workspace")
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
            stale.extend(g for g in arrays.run_groups(self.zarr_location) if g not in known)
            return not dry_run and (allow_destructive or not (plan.destructive or stale))

        plan = migrate(self.catalog_path, revision, "downgrade", apply=apply)
        plan = replace(plan, dropped_groups=tuple(sorted({*plan.dropped_groups, *stale})))
        if plan.applied:
            arrays.remove_groups(self.zarr_location, plan.dropped_groups)
        elif not dry_run:
            raise ConfigError(
                f"downgrading {self.catalog_path} to {revision} would drop {plan.describe()}; nothing was changed: "
                f"back up {self.root}, then rerun with --yes (allow_destructive=True) to drop them"
            )
        return plan


def init_workspace(path: str | os.PathLike[str] | None = None, *, zarr_url: str | None = None) -> Workspace:
    """Create (or bring up to date) a workspace at the head schema, with the built-in persona and question sets.

    Idempotent: running it on an existing workspace upgrades the schema and leaves the data alone.

    Args:
        path: the workspace directory (see :meth:`Workspace.resolve`).
        zarr_url: keep the activations at this fsspec URL (``file:///shared/acts.zarr``, ``s3://bucket/acts.zarr``
            with ``s3fs`` installed) instead of ``<workspace>/activations.zarr``: for processes on several machines,
            which all open it. Refused when the workspace already keeps activations elsewhere.
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
    if zarr_url is not None:
        _check_zarr_url(zarr_url)  # before anything is created
    ws.upgrade("head")
    if zarr_url is not None:
        _set_zarr_url(ws, zarr_url)
    register_builtin_sets(ws)
    ws.close()  # a workspace just made is often used next by another process
    return ws


def _check_zarr_url(url: str) -> None:
    from personavec import arrays

    scheme, sep, rest = url.partition("://")
    if not sep or not scheme or not rest.strip("/"):
        raise ConfigError(f"zarr_url must be an fsspec URL such as file:///shared/acts.zarr or s3://bucket/acts.zarr, "
                          f"got {url!r}")  # fmt: skip
    problem = arrays.url_problem(url)
    if problem:
        raise ConfigError(f"--zarr-url {problem}")


def _set_zarr_url(ws: Workspace, url: str) -> None:
    from personavec import arrays

    current = ws.zarr_url
    if current == url:
        return
    if current is not None or arrays.run_groups(ws.zarr_path):
        raise ConfigError(
            f"workspace {ws.root} already keeps activations at {current or ws.zarr_path}: a workspace's activation "
            "store cannot move (its runs point there); make a new workspace for another store"
        )
    (ws.root / SETTINGS_FILE).write_text(json.dumps({"zarr_url": url}, indent=2) + "\n")
