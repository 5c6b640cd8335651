"""Response runs and responses: bulk Arrow inserts (ingest) and reads (extraction, seed helpers)."""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import DuplicateError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.runs import run_in_session, utcnow

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
    con = session.connection().connection.dbapi_connection
    con.register("_pv_incoming", table.select(cols))
    try:
        con.execute(
            f"INSERT INTO responses (run_id, {', '.join(cols)}, attempts, created_at) "
            f"SELECT ?, {', '.join(cols)}, 1, ? FROM _pv_incoming",
            [run_id, utcnow()],
        )
    except Exception as exc:  # DuckDB constraint errors: name the run, keep DuckDB's message
        if "Duplicate key" in str(exc) or "unique" in str(exc).lower():
            raise DuplicateError(
                f"run {run_id}: a response for the same persona/question/sample exists: {exc}"
            ) from exc
        raise
    finally:
        con.unregister("_pv_incoming")
    return table.num_rows


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


def responses_by_key(catalog: Catalog, run_id: int) -> dict[tuple[str, str], str]:
    """The seed's mapping ``{(persona, question): text}`` of a run (sample 0 of each pair)."""
    return {(r.persona, r.question): r.text for r in answered_responses(catalog, run_id) if r.sample_index == 0}
