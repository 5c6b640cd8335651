"""Extraction runs and their per-example rows (response -> Zarr row, token span, done flag).

Units of work of a run's life: :func:`create_extraction_run` (run row, ``extraction_runs`` row and every selected
example, all or nothing: a run is recorded before it is tokenized, its examples *unplanned*, ``n_tokens`` 0),
:func:`plan_examples` as each window of them is tokenized (spans, token counts, rows), :func:`resume_extraction_run`,
:func:`mark_done` after each written Zarr chunk, and :func:`finish_extraction`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog, dbapi_connection
from personavec.store.responses import RESPONSE_RUN_KINDS, ResponseRecord
from personavec.store.runs import create_run, finish_run, mark_running, require_kind, run_in_session


@dataclass(frozen=True)
class ExtractionRunInfo:
    run_id: int
    source_run_id: int
    model: str
    model_revision: str | None
    architecture: str | None
    n_model_layers: int
    d_model: int
    layers: tuple[int, ...]
    dtype: str
    span_rule: str
    prompt_format: str
    device: str
    zarr_group: str
    n_examples: int
    n_tokens: int | None
    tok_s: float | None
    #: transformers' ``config.model_type``, from the run's config (None for runs recorded before it was kept)
    model_type: str | None = None


def add_extraction_run(session: Session, run_id: int, **detail: object) -> None:
    session.add(m.ExtractionRun(run_id=run_id, **detail))
    session.flush()


def update_extraction_run(session: Session, run_id: int, **values: object) -> None:
    session.execute(sa.update(m.ExtractionRun).where(m.ExtractionRun.run_id == run_id).values(**values))


def extraction_run_in_session(session: Session, run_id: int) -> ExtractionRunInfo:
    run = run_in_session(session, run_id, ("extract",))
    row = session.get(m.ExtractionRun, run_id)
    if row is None:
        raise NotFoundError(f"extract run {run_id} has no extraction_runs row")
    return ExtractionRunInfo(
        run_id=row.run_id,
        source_run_id=row.source_run_id,
        model=row.model,
        model_revision=row.model_revision,
        architecture=row.architecture,
        n_model_layers=row.n_model_layers,
        d_model=row.d_model,
        layers=tuple(row.layers),
        dtype=row.dtype,
        span_rule=row.span_rule,
        prompt_format=row.prompt_format,
        device=row.device,
        zarr_group=row.zarr_group,
        n_examples=row.n_examples,
        n_tokens=row.n_tokens,
        tok_s=row.tok_s,
        model_type=run.config.get("model_type") if isinstance(run.config.get("model_type"), str) else None,
    )


def get_extraction_run(catalog: Catalog, run_id: int) -> ExtractionRunInfo:
    with catalog.session() as session:
        return extraction_run_in_session(session, run_id)


def add_examples(session: Session, run_id: int, table: pa.Table) -> None:
    """Bulk-insert the planned examples of a run (``response_id``, ``row``, ``span_start``, ``span_end``,
    ``n_tokens``, ``n_response_tokens``, ``truncated``, and optionally ``done``: true for examples with nothing to
    compute, e.g. an empty answer; not done otherwise)."""
    con = dbapi_connection(session)
    con.register("_pv_examples", table)
    done = "done" if "done" in table.column_names else "false"
    try:
        con.execute(
            "INSERT INTO activations (run_id, response_id, row, span_start, span_end, n_tokens, n_response_tokens, "
            f"truncated, done) SELECT ?, response_id, row, span_start, span_end, n_tokens, n_response_tokens, "
            f"truncated, {done} FROM _pv_examples",
            [run_id],
        )
    finally:
        con.unregister("_pv_examples")


def mark_rows_done(session: Session, run_id: int, start: int, stop: int) -> None:
    """Mark Zarr rows ``start:stop`` of a run done (call only after they are written)."""
    session.execute(
        sa.update(m.Activation)
        .where(m.Activation.run_id == run_id, m.Activation.row >= start, m.Activation.row < stop)
        .values(done=True)
    )


_EXAMPLES = """
SELECT a.row, a.response_id, a.span_start, a.span_end, a.n_tokens, a.n_response_tokens, a.truncated, a.done,
       p.name AS persona, p.groups AS persona_groups, q.text AS question, q.position AS question_position,
       r.sample_index
FROM activations a
JOIN responses r ON r.id = a.response_id
JOIN personas p ON p.id = r.persona_id
JOIN questions q ON q.id = r.question_id
WHERE a.run_id = ? {done}
ORDER BY a.row
"""


def extraction_examples(catalog: Catalog, run_id: int, *, done_only: bool = False) -> pa.Table:
    """The run's examples joined with persona and question, ordered by Zarr row, as an Arrow table."""
    with catalog.session() as session:
        extraction_run_in_session(session, run_id)
        con = dbapi_connection(session)
        return con.execute(_EXAMPLES.format(done="AND a.done" if done_only else ""), [run_id]).fetch_arrow_table()


def extraction_run_config(catalog: Catalog, run_id: int) -> dict:
    """The config JSON stored with an extraction run (what a resume rebuilds its ExtractConfig from)."""
    with catalog.session() as session:
        return dict(run_in_session(session, run_id, ("extract",)).config)


_PENDING = """
SELECT a.row, a.response_id, p.system_prompt, q.text AS question, r.text, a.n_tokens > 0 AS planned
FROM activations a
JOIN responses r ON r.id = a.response_id
JOIN personas p ON p.id = r.persona_id
JOIN questions q ON q.id = r.question_id
WHERE a.run_id = ? AND NOT a.done
ORDER BY a.row
"""


def create_extraction_run(
    catalog: Catalog,
    config: dict,
    examples: pa.Table,
    *,
    zarr_group: Callable[[int], str],
    **detail: object,
) -> ExtractionRunInfo:
    """One unit of work: a ``running`` extract run with its config, its ``extraction_runs`` row (``detail``, and
    ``zarr_group(run_id)`` as the group name) and every planned example (see :func:`add_examples`), not done.

    Nothing is written if any part fails. Returns the new run (as :func:`get_extraction_run`); create the run's
    Zarr group after this returns, so that a group never exists without its run."""
    with catalog.session() as session:
        run_id = create_run(session, "extract", config)
        add_extraction_run(session, run_id, zarr_group=zarr_group(run_id), **detail)
        add_examples(session, run_id, examples)
        return extraction_run_in_session(session, run_id)


def resume_extraction_run(catalog: Catalog, run_id: int) -> pa.Table:
    """One unit of work: mark an extract run ``running`` again and return its examples not yet done (``row``,
    ``response_id``, the conversation to rebuild: ``system_prompt``, ``question``, ``text``, and whether it was
    ``planned`` already), by row."""
    with catalog.session() as session:
        extraction_run_in_session(session, run_id)
        mark_running(session, run_id)
        return dbapi_connection(session).execute(_PENDING, [run_id]).fetch_arrow_table()


def plan_examples(catalog: Catalog, run_id: int, examples: pa.Table) -> None:
    """One unit of work: record the plan of examples tokenized for the first time (columns as
    :func:`add_examples`; ``done`` true for those with no span). Their rows may be reassigned among themselves
    (longest first within a window), so they are replaced: DuckDB checks a unique key row by row within one
    ``UPDATE``, which a permutation of rows would trip."""
    with catalog.session() as session:
        con = dbapi_connection(session)
        con.register("_pv_planned", examples)
        try:
            con.execute(
                "DELETE FROM activations WHERE run_id = ? AND NOT done AND response_id IN "
                "(SELECT response_id FROM _pv_planned)",
                [run_id],
            )
        finally:
            con.unregister("_pv_planned")
        add_examples(session, run_id, examples)


def mark_done(catalog: Catalog, run_id: int, ranges: Sequence[tuple[int, int]]) -> None:
    """One unit of work: mark the Zarr row ranges ``[start, stop)`` of a run done (call only once they are written)."""
    if not ranges:
        return
    with catalog.session() as session:
        for start, stop in ranges:
            mark_rows_done(session, run_id, start, stop)


def mark_not_done(catalog: Catalog, run_id: int, ranges: Sequence[tuple[int, int]]) -> int:
    """One unit of work: mark the Zarr row ranges ``[start, stop)`` of a run not done (their data is damaged; a
    resume recomputes them) and the run ``interrupted`` if it was ``done``. Examples with no span stay done.
    Returns how many rows changed."""
    changed = 0
    with catalog.session() as session:
        extraction_run_in_session(session, run_id)
        for start, stop in ranges:
            result = session.execute(
                sa.update(m.Activation)
                .where(
                    m.Activation.run_id == run_id,
                    m.Activation.row >= start,
                    m.Activation.row < stop,
                    m.Activation.done,
                    m.Activation.n_response_tokens > 0,
                )
                .values(done=False)
            )
            changed += int(getattr(result, "rowcount", 0) or 0)
        if changed:
            session.execute(
                sa.update(m.Run).where(m.Run.id == run_id, m.Run.status == "done").values(status="interrupted")
            )
    return changed


def example_states(catalog: Catalog, run_id: int) -> pa.Table:
    """``row``, ``done``, ``has_span`` (planned, with ``n_response_tokens > 0``) and ``no_span`` (planned, without)
    of every example of a run, by row (an example not planned yet has neither)."""
    with catalog.session() as session:
        extraction_run_in_session(session, run_id)
        return (
            dbapi_connection(session)
            .execute(
                "SELECT row, done, n_tokens > 0 AND n_response_tokens > 0 AS has_span, "
                "n_tokens > 0 AND n_response_tokens <= 0 AS no_span FROM activations WHERE run_id = ? ORDER BY row",
                [run_id],
            )
            .fetch_arrow_table()
        )


_ANSWERED = """
SELECT r.id, p.name, p.system_prompt, p.groups, q.text, q.position, r.sample_index, r.text
FROM responses r JOIN personas p ON p.id = r.persona_id JOIN questions q ON q.id = r.question_id
WHERE r.run_id = ? AND r.text IS NOT NULL
ORDER BY p.position, q.position, r.sample_index
"""


_SELECTION = """
SELECT r.kind, rr.run_id,
       (SELECT list(p.name ORDER BY p.position) FROM personas p WHERE p.persona_set_id = rr.persona_set_id),
       (SELECT count(*) FROM questions q WHERE q.question_set_id = rr.question_set_id)
FROM runs r LEFT JOIN response_runs rr ON rr.run_id = r.id
WHERE r.id = ?
"""


def responses_to_extract(catalog: Catalog, run_id: int) -> tuple[list[str], int, list[ResponseRecord]]:
    """One unit of work: the responses run's persona names (in order) and number of questions (what persona and
    question filters may name), and every answered response of the run (as ``responses.answered_responses``), in
    two statements: the start of a run, which the GPU waits for."""
    with catalog.session() as session:
        con = dbapi_connection(session)
        kind, detail, names, n_questions = con.execute(_SELECTION, [run_id]).fetchone() or (None, None, None, 0)
        require_kind(run_id, kind, RESPONSE_RUN_KINDS)
        if detail is None:
            raise NotFoundError(f"run {run_id} is not a responses run (generate or ingest-responses)")
        rows = con.execute(_ANSWERED, [run_id]).fetchall()
    records = [ResponseRecord(r[0], r[1], r[2], tuple(r[3] or ()), r[4], r[5], r[6], r[7]) for r in rows]
    return list(names or ()), int(n_questions), records


def finish_extraction(
    catalog: Catalog,
    run_id: int,
    status: str,
    error: str | None,
    tok_s: float | None,
    done: Sequence[tuple[int, int]] = (),
) -> tuple[int, int]:
    """One unit of work: mark the last written row ranges ``done``, then close a run (or a resumed session of it)
    with its status and error, total planned tokens, and this session's tokens/s. Returns the run's numbers of
    truncated examples and of examples with no span."""
    with catalog.session() as session:
        for start, stop in done:
            mark_rows_done(session, run_id, start, stop)
        total, truncated, no_span = session.execute(
            sa.select(
                sa.func.sum(m.Activation.n_tokens),
                sa.func.count().filter(m.Activation.truncated),
                sa.func.count().filter(m.Activation.n_response_tokens <= 0, m.Activation.n_tokens > 0),
            ).where(m.Activation.run_id == run_id)
        ).one()
        values: dict[str, object] = {"n_tokens": int(total or 0)}
        if tok_s is not None:
            values["tok_s"] = float(tok_s)
        update_extraction_run(session, run_id, **values)
        finish_run(session, run_id, status, error)
    return int(truncated or 0), int(no_span or 0)


def _count_examples(catalog: Catalog, run_id: int, flag: sa.orm.InstrumentedAttribute[bool]) -> int:
    with catalog.session() as session:
        query = sa.select(sa.func.count()).select_from(m.Activation).where(m.Activation.run_id == run_id, flag)
        return int(session.execute(query).scalar_one())


def count_truncated(catalog: Catalog, run_id: int) -> int:
    """How many examples of a run were truncated to the model's context."""
    return _count_examples(catalog, run_id, m.Activation.truncated)


def done_count(catalog: Catalog, run_id: int) -> int:
    """Rows of a run with nothing left to compute (written, or with no span)."""
    return _count_examples(catalog, run_id, m.Activation.done)


def count_no_span(catalog: Catalog, run_id: int) -> int:
    """Examples of a run with no tokens to average (empty answers): done without activations."""
    with catalog.session() as session:
        query = (
            sa.select(sa.func.count())
            .select_from(m.Activation)
            .where(m.Activation.run_id == run_id, m.Activation.n_response_tokens <= 0, m.Activation.n_tokens > 0)
        )
        return int(session.execute(query).scalar_one())
