"""Response runs and responses: bulk Arrow inserts (ingest) and reads (extraction, seed helpers)."""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import DuplicateError
from personavec.store import models as m
from personavec.store.engine import Catalog, dbapi_connection
from personavec.store.runs import create_run, finish_run, run_in_session, utcnow
from personavec.store.sets import persona_set_in_session, question_set_in_session

RESPONSE_RUN_KINDS = ("generate", "ingest-responses")


@dataclass(frozen=True)
class ResponseRecord:
    """One answered response with everything extraction needs to rebuild its conversation."""

    id: int
    persona: str
    system_prompt: str
    groups: tuple[str, ...]
    question: str
    question_position: int
    sample_index: int
    text: str


def add_response_run(session: Session, run_id: int, **detail: object) -> None:
    """Attach the response-run detail row (persona_set_id, question_set_id, model, endpoint, params...)."""
    session.add(m.ResponseRun(run_id=run_id, **detail))
    session.flush()


def bulk_insert_responses(session: Session, run_id: int, table: pa.Table) -> int:
    """Insert resolved responses from an Arrow table in one statement (DuckDB's own insert, not the ORM).

    ``table`` has ``persona_id``, ``question_id``, ``sample_index``, ``text`` and optionally ``finish_reason``,
    ``prompt_tokens``, ``completion_tokens``, ``latency_s``, ``model_reported``. Returns the number inserted.
    """
    optional = ("finish_reason", "prompt_tokens", "completion_tokens", "latency_s", "model_reported")
    cols = ["persona_id", "question_id", "sample_index", "text"] + [c for c in optional if c in table.column_names]
    con = dbapi_connection(session)
    con.register("_pv_incoming", table.select(cols))
    try:
        con.execute(
            f"INSERT INTO responses (run_id, {', '.join(cols)}, attempts, created_at) "
            f"SELECT ?, {', '.join(cols)}, 1, ? FROM _pv_incoming",
            [run_id, utcnow()],
        )
    except duckdb.ConstraintException as exc:  # name the run, keep DuckDB's message
        raise DuplicateError(f"run {run_id}: a response for the same persona/question/sample exists: {exc}") from exc
    finally:
        con.unregister("_pv_incoming")
    return table.num_rows


@dataclass(frozen=True)
class ResolvedResponses:
    """Incoming responses resolved against a persona set and a question set: the id table, or the first problem
    (each problem names the row with the ``_where`` column of the incoming table)."""

    table: pa.Table | None = None
    duplicate: tuple[str, str, int, list[str]] | None = None  # persona, question, sample, where it appears
    unknown_persona: tuple[str, str] | None = None  # where, persona
    unknown_question: tuple[str, str] | None = None  # where, question
    negative_sample: str | None = None  # where


def ingest_response_table(
    catalog: Catalog,
    table: pa.Table,
    *,
    persona_set: str,
    question_set: str,
    config: dict,
    model: str | None,
    source: str,
    source_sha256: str,
) -> tuple[int | None, ResolvedResponses]:
    """One unit of work: resolve an incoming table's persona names and question texts against the two sets and, if
    every row resolves, create a done ``ingest-responses`` run holding them.

    Returns ``(run_id, resolved)``; ``run_id`` is None (nothing written) when ``resolved`` names a problem."""
    with catalog.session() as session:
        pset = persona_set_in_session(session, persona_set)
        qset = question_set_in_session(session, question_set)
        resolved = _resolve_response_keys(session, table, pset.id, qset.id)
        if resolved.table is None:
            return None, resolved
        run_id = create_run(session, "ingest-responses", config)
        add_response_run(
            session,
            run_id,
            persona_set_id=pset.id,
            question_set_id=qset.id,
            model=model,
            source=source,
            source_sha256=source_sha256,
            n_samples=int(pa.compute.max(table["sample_index"]).as_py()) + 1,
        )
        bulk_insert_responses(session, run_id, resolved.table)
        finish_run(session, run_id, "done")
    return run_id, resolved


def _resolve_response_keys(
    session: Session, table: pa.Table, persona_set_id: int, question_set_id: int
) -> ResolvedResponses:
    """Map ``persona``/``question`` strings of an incoming Arrow table (with ``sample_index``, ``text``,
    ``_where``) to persona and question ids inside DuckDB (anti-joins, not Python loops)."""
    con = dbapi_connection(session)
    con.register("_pv_raw", table)
    try:
        dup = con.execute(
            "SELECT persona, question, sample_index, list(_where ORDER BY _where) FROM _pv_raw "
            "GROUP BY ALL HAVING count(*) > 1 LIMIT 1"
        ).fetchone()
        if dup:
            return ResolvedResponses(duplicate=tuple(dup))
        bad = con.execute(
            "SELECT _where, persona FROM _pv_raw r WHERE NOT EXISTS "
            "(SELECT 1 FROM personas p WHERE p.persona_set_id = ? AND p.name = r.persona) LIMIT 1",
            [persona_set_id],
        ).fetchone()
        if bad:
            return ResolvedResponses(unknown_persona=tuple(bad))
        bad = con.execute(
            "SELECT _where, question FROM _pv_raw r WHERE NOT EXISTS "
            "(SELECT 1 FROM questions q WHERE q.question_set_id = ? AND q.text = r.question) LIMIT 1",
            [question_set_id],
        ).fetchone()
        if bad:
            return ResolvedResponses(unknown_question=tuple(bad))
        negative = con.execute("SELECT _where FROM _pv_raw WHERE sample_index < 0 LIMIT 1").fetchone()
        if negative:
            return ResolvedResponses(negative_sample=negative[0])
        return ResolvedResponses(
            table=con.execute(
                "SELECT p.id AS persona_id, q.id AS question_id, r.sample_index, r.text FROM _pv_raw r "
                "JOIN personas p ON p.persona_set_id = ? AND p.name = r.persona "
                "JOIN questions q ON q.question_set_id = ? AND q.text = r.question",
                [persona_set_id, question_set_id],
            ).fetch_arrow_table()
        )
    finally:
        con.unregister("_pv_raw")


def answered_responses(catalog: Catalog, run_id: int) -> list[ResponseRecord]:
    """Every answered response of a response run (failures left out), ordered by persona, question, sample."""
    q = sa.text(
        """
        SELECT r.id, p.name, p.system_prompt, p.groups, q.text, q.position, r.sample_index, r.text
        FROM responses r JOIN personas p ON p.id = r.persona_id JOIN questions q ON q.id = r.question_id
        WHERE r.run_id = :run AND r.text IS NOT NULL
        ORDER BY p.position, q.position, r.sample_index
        """
    )
    with catalog.session() as session:
        run_in_session(session, run_id, RESPONSE_RUN_KINDS)
        rows = session.execute(q, {"run": run_id}).all()
    return [ResponseRecord(r[0], r[1], r[2], tuple(r[3]), r[4], r[5], r[6], r[7]) for r in rows]


def persona_set_names(catalog: Catalog, run_id: int) -> list[str]:
    """Names of the persona sets the answers of responses run ``run_id`` come from (sorted)."""
    with catalog.session() as session:
        names = session.scalars(
            sa.select(m.PersonaSet.name)
            .distinct()
            .join(m.Persona, m.Persona.persona_set_id == m.PersonaSet.id)
            .join(m.Response, m.Response.persona_id == m.Persona.id)
            .where(m.Response.run_id == run_id)
        ).all()
    return sorted(names)


def responses_by_key(catalog: Catalog, run_id: int) -> dict[tuple[str, str], str]:
    """The seed's mapping ``{(persona, question): text}`` of a run (sample 0 of each pair)."""
    return {(r.persona, r.question): r.text for r in answered_responses(catalog, run_id) if r.sample_index == 0}
