"""SQL of the generation stage: create/resume a ``generate`` run, find what is still missing, upsert answers.

Answers and failures share the ``responses`` table: a failure is a row with ``text`` NULL and ``error`` set; a later
success replaces it in place (``INSERT ... ON CONFLICT DO UPDATE`` on the run/persona/question/sample key), and a
success is never overwritten, so rerunning a run can neither duplicate nor lose an answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from personavec.errors import NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.records import PersonaSet, QuestionSet, RunInfo
from personavec.store.responses import add_response_run
from personavec.store.runs import create_run, finish_run, mark_running, run_in_session, utcnow
from personavec.store.sets import persona_set_in_session, question_set_in_session


@dataclass(frozen=True)
class GenerationRunInfo:
    """A ``generate`` run with its persona and question sets."""

    run: RunInfo
    persona_set: PersonaSet
    question_set: QuestionSet


@dataclass(frozen=True, slots=True)
class AnswerRow:
    """One outcome of one request, ready to land: an answer (``text`` set) or a failure (``error`` set)."""

    persona_id: int
    question_id: int
    sample_index: int
    text: str | None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_s: float | None = None
    model_reported: str | None = None
    error: str | None = None
    attempts: int = 1


def load_sets(catalog: Catalog, persona_set: str, question_set: str) -> tuple[PersonaSet, QuestionSet]:
    """Both sets by name (``NotFoundError`` names the known sets)."""
    with catalog.session() as session:
        return persona_set_in_session(session, persona_set), question_set_in_session(session, question_set)


def create_generation_run(
    catalog: Catalog,
    config: dict[str, Any],
    *,
    persona_set_id: int,
    question_set_id: int,
    model: str,
    endpoint: str,
    n_samples: int,
    temperature: float | None,
    max_tokens: int | None,
    top_p: float | None,
    seed: int | None,
) -> int:
    """Insert a ``running`` generate run and its response-run detail in one transaction; returns the run id."""
    with catalog.session() as session:
        run_id = create_run(session, "generate", config)
        add_response_run(
            session,
            run_id,
            persona_set_id=persona_set_id,
            question_set_id=question_set_id,
            model=model,
            endpoint=endpoint,
            n_samples=n_samples,
            temperature=temperature,
            max_tokens=max_tokens,
            top_p=top_p,
            seed=seed,
        )
    return run_id


def get_generation_run(catalog: Catalog, run_id: int) -> GenerationRunInfo:
    """A generate run with its sets (``RunNotFoundError`` if missing or of another kind)."""
    with catalog.session() as session:
        run = run_in_session(session, run_id, ("generate",))
        detail = session.get(m.ResponseRun, run_id)
        if detail is None:
            raise NotFoundError(f"generate run {run_id} has no response-run detail row: the catalog is inconsistent")
        return GenerationRunInfo(
            run=run,
            persona_set=persona_set_in_session(session, detail.persona_set_id),
            question_set=question_set_in_session(session, detail.question_set_id),
        )


def resume_generation_run(catalog: Catalog, run_id: int) -> None:
    """Mark a generate run ``running`` again."""
    with catalog.session() as session:
        run_in_session(session, run_id, ("generate",))
        mark_running(session, run_id)


def answered_keys(catalog: Catalog, run_id: int) -> set[tuple[int, int, int]]:
    """``(persona_id, question_id, sample_index)`` of every successful answer of the run."""
    q = sa.text("SELECT persona_id, question_id, sample_index FROM responses WHERE run_id = :run AND text IS NOT NULL")
    with catalog.session() as session:
        return {(r[0], r[1], r[2]) for r in session.execute(q, {"run": run_id})}


_UPSERT = """
INSERT INTO responses (run_id, persona_id, question_id, sample_index, text, finish_reason, prompt_tokens,
                       completion_tokens, latency_s, model_reported, error, attempts, created_at)
SELECT ?, persona_id, question_id, sample_index, text, finish_reason, prompt_tokens, completion_tokens, latency_s,
       model_reported, error, attempts, ? FROM _pv_answers
ON CONFLICT (run_id, persona_id, question_id, sample_index) DO UPDATE SET
    text = excluded.text, finish_reason = excluded.finish_reason, prompt_tokens = excluded.prompt_tokens,
    completion_tokens = excluded.completion_tokens, latency_s = excluded.latency_s,
    model_reported = excluded.model_reported, error = excluded.error,
    attempts = responses.attempts + excluded.attempts, created_at = excluded.created_at
WHERE responses.text IS NULL
"""

_ANSWER_SCHEMA = pa.schema(
    [
        ("persona_id", pa.int64()),
        ("question_id", pa.int64()),
        ("sample_index", pa.int32()),
        ("text", pa.string()),
        ("finish_reason", pa.string()),
        ("prompt_tokens", pa.int32()),
        ("completion_tokens", pa.int32()),
        ("latency_s", pa.float64()),
        ("model_reported", pa.string()),
        ("error", pa.string()),
        ("attempts", pa.int32()),
    ]
)
_COLUMNS = tuple(_ANSWER_SCHEMA.names)


def upsert_answers(catalog: Catalog, run_id: int, rows: Sequence[AnswerRow]) -> None:
    """Land answers/failures in one transaction and one statement (DuckDB's per-statement cost, ~5-10 ms, dominates;
    it releases the GIL meanwhile, so this may run on a writer thread while an event loop goes on).

    A row replaces an earlier failure of the same key (attempts add up); an existing successful answer is never
    touched. Keys within ``rows`` must be distinct (DuckDB refuses to update one row twice in a statement).
    """
    if not rows:
        return
    table = pa.Table.from_pydict({name: [getattr(r, name) for r in rows] for name in _COLUMNS}, schema=_ANSWER_SCHEMA)
    with catalog.raw() as con:
        con.register("_pv_answers", table)
        try:
            con.execute(_UPSERT, [run_id, utcnow()])
        finally:
            con.unregister("_pv_answers")


def generation_counts(catalog: Catalog, run_id: int) -> dict[str, int]:
    """Answers, failures and token totals of a generate run."""
    q = sa.text(
        """
        SELECT count(*) FILTER (WHERE text IS NOT NULL), count(*) FILTER (WHERE text IS NULL),
               coalesce(sum(prompt_tokens) FILTER (WHERE text IS NOT NULL), 0),
               coalesce(sum(completion_tokens) FILTER (WHERE text IS NOT NULL), 0)
        FROM responses WHERE run_id = :run
        """
    )
    with catalog.session() as session:
        row = session.execute(q, {"run": run_id}).one()
    return {"answers": row[0], "failures": row[1], "prompt_tokens": row[2], "completion_tokens": row[3]}


def finish_generation_run(catalog: Catalog, run_id: int, status: str, error: str | None = None) -> None:
    """Mark the run done/failed/interrupted."""
    with catalog.session() as session:
        finish_run(session, run_id, status, error)


def discard_empty_run(catalog: Catalog, run_id: int) -> bool:
    """Delete a generate run that has no responses at all (a run stopped by bad input before any answer landed),
    so bad input leaves nothing behind. Returns whether it was deleted.

    Two transactions, not one, because of DuckDB 1.4's foreign keys: it has no ``ON DELETE CASCADE`` (refused at
    ``CREATE TABLE``), and it still counts a ``runs`` row as referenced when its ``response_runs`` row was deleted
    earlier in the same transaction, flushed or not ("still referenced by a foreign key in a different table",
    see DuckDB's foreign-key limitations). So the detail row goes first and the run row in a second transaction; a
    crash between the two leaves a ``running`` run without detail, which ``get_generation_run`` reports."""
    with catalog.session() as session:
        n = session.scalar(sa.select(sa.func.count()).select_from(m.Response).where(m.Response.run_id == run_id))
        if n:
            return False
        session.execute(sa.delete(m.ResponseRun).where(m.ResponseRun.run_id == run_id))
    with catalog.session() as session:
        session.execute(sa.delete(m.Run).where(m.Run.id == run_id, m.Run.kind == "generate"))
    return True
