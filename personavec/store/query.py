"""Ad-hoc read-only SQL for `personavec sql`."""

from __future__ import annotations

from typing import Any, cast

import sqlalchemy as sa

from personavec.errors import CatalogError, ConfigError
from personavec.store.engine import Catalog


def run_readonly_sql(catalog: Catalog, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run one query on a catalog opened read-only; returns (column names, rows)."""
    if not catalog.read_only:
        raise ConfigError("run_readonly_sql needs a catalog opened with read_only=True")
    if not query.strip():
        raise ConfigError("empty SQL query")
    try:
        with catalog.session() as session:
            # A textual statement always gives a CursorResult (Session.execute is typed as the general Result).
            result = cast(sa.CursorResult[Any], session.execute(sa.text(query)))
            if not result.returns_rows:
                return [], []
            return list(result.keys()), [tuple(r) for r in result.all()]
    except CatalogError as exc:
        raise CatalogError(f"SQL failed: {exc}") from exc
