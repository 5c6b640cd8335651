"""Runs of every kind: create, finish, look up, list."""

from __future__ import annotations

import json
import platform
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import RunNotFoundError
from personavec.store.engine import Catalog
from personavec.store.models import RUN_KINDS, RUN_STATUSES, Run
from personavec.store.records import RunInfo, RunSummary


def utcnow() -> datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP has no zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def package_version() -> str:
    from personavec import __version__

    return __version__


def create_run(session: Session, kind: str, config: dict[str, Any]) -> int:
    """Insert a ``running`` run of ``kind`` with its config JSON; returns the new run id."""
    if kind not in RUN_KINDS:
        raise ValueError(f"unknown run kind {kind!r}; expected one of {RUN_KINDS}")
    run = Run(
        kind=kind,
        status="running",
        created_at=utcnow(),
        package_version=package_version(),
        host=platform.node(),
        config=json.dumps(config, sort_keys=True, default=str),
    )
    session.add(run)
    session.flush()
    return run.id


def finish_run(session: Session, run_id: int, status: str, error: str | None = None) -> None:
    """Mark a run ``done``/``failed``/``interrupted`` and record its wall time since creation."""
    if status not in RUN_STATUSES or status == "running":
        raise ValueError(f"a run finishes as done, failed or interrupted, not {status!r}")
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} does not exist")
    now = utcnow()
    run.status = status
    run.finished_at = now
    run.wall_s = (now - run.created_at).total_seconds()
    run.error = error


def mark_running(session: Session, run_id: int) -> None:
    """A resumed run is running again."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} does not exist")
    run.status = "running"
    run.error = None


def _info(run: Run) -> RunInfo:
    return RunInfo(
        id=run.id,
        kind=run.kind,
        status=run.status,
        created_at=run.created_at,
        finished_at=run.finished_at,
        wall_s=run.wall_s,
        package_version=run.package_version,
        host=run.host,
        config=json.loads(run.config or "{}"),
        error=run.error,
    )


def require_kind(run_id: int, kind: str | None, kinds: tuple[str, ...] | None) -> None:
    """Raise :class:`RunNotFoundError` unless the run exists (``kind`` not None) and is of one of ``kinds``."""
    if kind is None:
        raise RunNotFoundError(f"run {run_id} does not exist in the catalog: `personavec runs` lists the runs")
    if kinds is not None and kind not in kinds:
        raise RunNotFoundError(f"run {run_id} is of kind {kind!r}, expected: {' or '.join(kinds)}")


def run_in_session(session: Session, run_id: int, kinds: tuple[str, ...] | None = None) -> RunInfo:
    run = session.get(Run, run_id)
    require_kind(run_id, run.kind if run is not None else None, kinds)
    assert run is not None  # require_kind raised for a missing run
    return _info(run)


def get_run(catalog: Catalog, run_id: int, kinds: tuple[str, ...] | None = None) -> RunInfo:
    """The run with this id (optionally required to be of one of ``kinds``)."""
    with catalog.session() as session:
        return run_in_session(session, run_id, kinds)


_COUNTS = """
WITH c AS (
    SELECT run_id, count(*) FILTER (WHERE text IS NOT NULL) AS items,
           count(*) FILTER (WHERE text IS NULL) AS failed FROM responses GROUP BY run_id
    UNION ALL
    SELECT run_id, count(*) FILTER (WHERE done), count(*) FILTER (WHERE NOT done) FROM activations GROUP BY run_id
    UNION ALL
    SELECT run_id, count(*), 0 FROM vectors GROUP BY run_id
    UNION ALL
    SELECT s.run_id, count(p.id), 0 FROM persona_sets s JOIN personas p ON p.persona_set_id = s.id GROUP BY s.run_id
    UNION ALL
    SELECT s.run_id, count(q.id), 0 FROM question_sets s JOIN questions q ON q.question_set_id = s.id
    GROUP BY s.run_id
),
d AS (
    SELECT run_id, coalesce(model, '') || coalesce(' ' || source, '') AS detail FROM response_runs
    UNION ALL
    SELECT run_id, model || ' layers ' || array_to_string(layers, ',') FROM extraction_runs
    UNION ALL
    SELECT run_id, 'from run ' || extraction_run_id || ' by ' || group_by FROM vector_runs
    UNION ALL
    SELECT run_id, 'persona set ' || name FROM persona_sets
    UNION ALL
    SELECT run_id, 'question set ' || name FROM question_sets
)
SELECT r.id, r.kind, r.status, r.created_at, r.wall_s,
       coalesce(sum(c.items), 0), coalesce(sum(c.failed), 0), coalesce(any_value(d.detail), '')
FROM runs r LEFT JOIN c ON c.run_id = r.id LEFT JOIN d ON d.run_id = r.id
WHERE (:kind IS NULL OR r.kind = :kind)
GROUP BY ALL ORDER BY r.id
"""


def list_runs(catalog: Catalog, kind: str | None = None) -> list[RunSummary]:
    """Every run (or those of one kind) with its item count (answers, examples, vectors, personas...)."""
    with catalog.session() as session:
        rows = session.execute(sa.text(_COUNTS), {"kind": kind}).all()
    return [RunSummary(*row) for row in rows]
