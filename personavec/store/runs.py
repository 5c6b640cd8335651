"""Runs of every kind: create, finish, look up, list; and who owns a running run.

A run that stays ``running`` while its process is gone (killed, machine rebooted) is shown as ``interrupted``: each
run records its owner (host, pid, and the pid's start time, so a reused pid is not mistaken for it) in
``run_owners``; on this host a dead owner is detected from ``/proc`` (or ``os.kill(pid, 0)`` elsewhere). A run
owned by a live process on another host cannot be judged and keeps its status.
"""

from __future__ import annotations

import json
import os
import platform
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.config import package_version
from personavec.errors import ConfigError, RunBusyError, RunNotFoundError
from personavec.store.engine import Catalog
from personavec.store.models import RUN_KINDS, RUN_STATUSES, Run, RunOwner
from personavec.store.records import RunInfo, RunSummary


def utcnow() -> datetime:
    """Naive UTC timestamp (DuckDB TIMESTAMP has no zone)."""
    return datetime.now(UTC).replace(tzinfo=None)


def _process_start(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), None if unknown or gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: fields after the last ')' are fixed.
    return int(stat[stat.rindex(b")") + 2 :].split()[19])


def _owner_alive(host: str, pid: int, process_start: int | None) -> bool:
    """Whether the process that owns a run still runs (True when it cannot be told: another host)."""
    if host != platform.node():
        return True
    if os.path.isdir("/proc"):
        return process_start is not None and _process_start(pid) == process_start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _claim(session: Session, run_id: int) -> None:
    """Record this process as the run's owner."""
    session.merge(
        RunOwner(
            run_id=run_id,
            host=platform.node(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            claimed_at=utcnow(),
        )
    )


def _effective_status(status: str, owner: RunOwner | tuple | None) -> str:
    if status != "running" or owner is None:
        return status
    host, pid, start = (owner.host, owner.pid, owner.process_start) if isinstance(owner, RunOwner) else owner
    if host is None:
        return status
    return status if _owner_alive(host, pid, start) else "interrupted"


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
    _claim(session, run.id)
    return run.id


def finish_run(session: Session, run_id: int, status: str, error: str | None = None) -> None:
    """Mark a run ``done``/``failed``/``interrupted`` and add this session's running time (since the run was
    created or resumed: its owner's claim) to its wall time, so that a resumed run does not count the hours it
    waited (a resume that had nothing left to do showed 40 s where the run had taken 10)."""
    if status not in RUN_STATUSES or status == "running":
        raise ValueError(f"a run finishes as done, failed or interrupted, not {status!r}")
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} does not exist")
    now = utcnow()
    owner = session.get(RunOwner, run_id)
    started = owner.claimed_at if owner is not None and owner.claimed_at >= run.created_at else run.created_at
    run.status = status
    run.finished_at = now
    run.wall_s = (run.wall_s or 0.0) + max((now - started).total_seconds(), 0.0)
    if owner is not None:
        owner.claimed_at = now  # a second finish in this session adds only what came after the first
    run.error = error


def mark_running(session: Session, run_id: int) -> None:
    """A resumed run is running again, owned by this process. Refused while another live process still runs it."""
    run = session.get(Run, run_id)
    if run is None:
        raise RunNotFoundError(f"run {run_id} does not exist")
    owner = session.get(RunOwner, run_id)
    if run.status == "running" and owner is not None and (owner.host, owner.pid) != (platform.node(), os.getpid()):
        if _effective_status("running", owner) == "running":
            raise RunBusyError(
                f"run {run_id} is still running (process {owner.pid} on {owner.host}, since "
                f"{owner.claimed_at:%Y-%m-%d %H:%M} UTC): stop it first, or wait for it to finish"
            )
    run.status = "running"
    run.error = None
    _claim(session, run_id)


def _info(run: Run, owner: RunOwner | None) -> RunInfo:
    return RunInfo(
        id=run.id,
        kind=run.kind,
        status=_effective_status(run.status, owner),
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
    return _info(run, session.get(RunOwner, run_id))


def get_run(catalog: Catalog, run_id: int, kinds: tuple[str, ...] | None = None) -> RunInfo:
    """The run with this id (optionally required to be of one of ``kinds``)."""
    with catalog.session() as session:
        return run_in_session(session, run_id, kinds)


def note_run_error(catalog: Catalog, run_id: int, note: str) -> None:
    """Put ``note`` in front of a run's error (what a process outside the run learned of its end, e.g. which rank
    of a launch failed first); a run that ended ``done`` is left as it is."""
    with catalog.session() as session:
        run = session.get(Run, run_id)
        if run is None:
            raise RunNotFoundError(f"run {run_id} does not exist")
        if run.status != "done":
            run.error = f"{note}; {run.error}" if run.error else note


# One row per run from each part: a run owning rows of several kinds (a server's recorded generate run also owns the
# persona and question sets it made) counts and describes its first kind in this order (joined unaggregated, each
# detail row multiplied the counts: a recorded run of 6 answers showed 33 items).
_COUNTS = """
WITH c AS (
    SELECT run_id, arg_min(items, part) AS items, arg_min(failed, part) AS failed FROM (
        SELECT 1 AS part, run_id, count(*) FILTER (WHERE text IS NOT NULL) AS items,
               count(*) FILTER (WHERE text IS NULL) AS failed FROM responses GROUP BY run_id
        UNION ALL  -- not done is pending, not failed
        SELECT 2, run_id, count(*) FILTER (WHERE done), 0 FROM activations GROUP BY run_id
        UNION ALL
        SELECT 3, run_id, count(*), 0 FROM vectors GROUP BY run_id
        UNION ALL
        SELECT 4, run_id, count(raw_output), count(*) FILTER (WHERE raw_output IS NULL) FROM judgements
        GROUP BY run_id
        UNION ALL
        SELECT 5, s.run_id, count(p.id), 0 FROM persona_sets s JOIN personas p ON p.persona_set_id = s.id
        GROUP BY s.run_id
        UNION ALL
        SELECT 6, s.run_id, count(q.id), 0 FROM question_sets s JOIN questions q ON q.question_set_id = s.id
        GROUP BY s.run_id
        UNION ALL
        SELECT 7, run_id, count(*), 0 FROM evaluation_figures GROUP BY run_id
    ) GROUP BY run_id
),
d AS (
    SELECT run_id, arg_min(detail, part) AS detail FROM (
        SELECT 1 AS part, run_id, coalesce(model, '') || coalesce(' ' || source, '') AS detail FROM response_runs
        UNION ALL
        SELECT 2, run_id, model || ' layers ' || array_to_string(layers, ',') FROM extraction_runs
        UNION ALL
        SELECT 3, run_id, 'from run ' || extraction_run_id || ' by ' || group_by FROM vector_runs
        UNION ALL
        SELECT 4, j.run_id, j.model || ' on run ' || j.responses_run_id || ': ' || array_to_string(j.rubrics, ',')
               || ', ' || (SELECT count(score) FROM judgements WHERE run_id = j.run_id) || ' scored' FROM judge_runs j
        UNION ALL
        SELECT 5, run_id, 'persona set ' || name FROM persona_sets
        UNION ALL
        SELECT 6, run_id, 'question set ' || name FROM question_sets
        UNION ALL
        SELECT 7, run_id, coalesce('sweep ' || sweep_id, 'capping') || coalesce(': ' || trait_rubric, '')
               || coalesce(', op c=' || op_coef || ' @' || op_layer, '') FROM evaluation_runs
    ) GROUP BY run_id
),
o AS (SELECT run_id, any_value(host) AS host, any_value(pid) AS pid, any_value(process_start) AS process_start
      FROM run_owners GROUP BY run_id)
SELECT r.id, r.kind, r.status, r.created_at, r.wall_s, coalesce(c.items, 0), coalesce(c.failed, 0),
       coalesce(d.detail, ''), o.host, o.pid, o.process_start
FROM runs r LEFT JOIN c ON c.run_id = r.id LEFT JOIN d ON d.run_id = r.id LEFT JOIN o ON o.run_id = r.id
WHERE (:kind IS NULL OR r.kind = :kind)
ORDER BY r.id
"""


def list_runs(catalog: Catalog, kind: str | None = None) -> list[RunSummary]:
    """Every run (or those of one kind) with its item count (answers, examples, vectors, personas, a judge's
    answered judgements, whose detail says how many of them hold a score...); a running run whose process is gone
    shows as ``interrupted``. An unknown ``kind`` is a :class:`ConfigError` naming the kinds (not an empty list)."""
    if kind is not None and kind not in RUN_KINDS:
        raise ConfigError(f"unknown run kind {kind!r}: one of {', '.join(RUN_KINDS)}")
    with catalog.session() as session:
        rows = session.execute(sa.text(_COUNTS), {"kind": kind}).all()
    return [
        RunSummary(r[0], r[1], _effective_status(r[2], (r[8], r[9], r[10])), *r[3:8])  # type: ignore[arg-type]
        for r in rows
    ]
