"""SQL of a recording ``personavec serve`` session: one ``generate`` run whose answers arrive one request at a time.

The session run owns a persona set and a question set named ``served-RUN`` that grow as requests come: a persona per
distinct system prompt (``""`` when the request has none), a question per distinct last user message (or
completions prompt). Each finished request lands in one unit of work: its personas/questions if new, one
``responses`` row per answer (``sample_index`` counts the answers to that pair so far) and one ``served_answers`` row
per answer (its interventions as asked and as applied, the vectors runs, the sampling parameters). So the session
is a responses run like any other (extract, judge, compare it), and a request cut off by its client writes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.responses import add_response_run
from personavec.store.runs import create_run, finish_run, utcnow


@dataclass(frozen=True)
class ServeSession:
    """The catalog rows a recording server writes into."""

    run_id: int
    persona_set_id: int
    question_set_id: int


@dataclass(frozen=True)
class ServedRow:
    """One finished answer to land."""

    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    latency_s: float


@dataclass(frozen=True)
class ServedRequest:
    """A finished request: who asked what, its answers, and what it was steered with."""

    system_prompt: str
    question: str
    endpoint: str
    model: str
    answers: tuple[ServedRow, ...]
    interventions: list[dict[str, Any]]  # as asked
    applied: list[dict[str, Any]]  # per intervention: the per-layer numbers
    vector_run_ids: tuple[int, ...]
    params: dict[str, Any]


def create_serve_session(catalog: Catalog, config: dict[str, Any], *, model: str, endpoint: str) -> ServeSession:
    """One unit of work: a ``running`` generate run, its empty ``served-RUN`` persona and question sets, its
    response-run detail."""
    with catalog.session() as session:
        run_id = create_run(session, "generate", config)
        pset = m.PersonaSet(name=f"served-{run_id}", run_id=run_id, source=endpoint)
        qset = m.QuestionSet(name=f"served-{run_id}", run_id=run_id, source=endpoint)
        session.add_all([pset, qset])
        session.flush()
        add_response_run(
            session,
            run_id,
            persona_set_id=pset.id,
            question_set_id=qset.id,
            model=model,
            endpoint=endpoint,
            n_samples=1,
            temperature=None,
            max_tokens=None,
            top_p=None,
            seed=None,
        )
        return ServeSession(run_id, pset.id, qset.id)


def _persona_id(session: Any, s: ServeSession, system_prompt: str) -> int:
    found = session.scalar(
        sa.select(m.Persona.id).where(
            m.Persona.persona_set_id == s.persona_set_id, m.Persona.system_prompt == system_prompt
        )
    )
    if found is not None:
        return found
    position = session.scalar(
        sa.select(sa.func.count()).select_from(m.Persona).where(m.Persona.persona_set_id == s.persona_set_id)
    )
    row = m.Persona(
        persona_set_id=s.persona_set_id,
        position=position,
        name=f"served-{position}" if system_prompt else "no-system-prompt",
        system_prompt=system_prompt,
        groups=[],
    )
    session.add(row)
    session.flush()
    return row.id


def _question_id(session: Any, s: ServeSession, text: str) -> int:
    found = session.scalar(
        sa.select(m.Question.id).where(m.Question.question_set_id == s.question_set_id, m.Question.text == text)
    )
    if found is not None:
        return found
    position = session.scalar(
        sa.select(sa.func.count()).select_from(m.Question).where(m.Question.question_set_id == s.question_set_id)
    )
    row = m.Question(question_set_id=s.question_set_id, position=position, text=text)
    session.add(row)
    session.flush()
    return row.id


def record_served(catalog: Catalog, s: ServeSession, requests: Sequence[ServedRequest]) -> list[int]:
    """Land finished requests in one unit of work; returns the new response ids."""
    ids: list[int] = []
    with catalog.session() as session:
        now = utcnow()
        for req in requests:
            pid = _persona_id(session, s, req.system_prompt)
            qid = _question_id(session, s, req.question)
            start = (
                session.scalar(
                    sa.select(sa.func.coalesce(sa.func.max(m.Response.sample_index) + 1, 0)).where(
                        m.Response.run_id == s.run_id, m.Response.persona_id == pid, m.Response.question_id == qid
                    )
                )
                or 0
            )
            for i, answer in enumerate(req.answers):
                row = m.Response(
                    run_id=s.run_id,
                    persona_id=pid,
                    question_id=qid,
                    sample_index=start + i,
                    text=answer.text,
                    finish_reason=answer.finish_reason,
                    prompt_tokens=answer.prompt_tokens,
                    completion_tokens=answer.completion_tokens,
                    latency_s=answer.latency_s,
                    model_reported=req.model,
                    error=None,
                    attempts=1,
                    created_at=now,
                )
                session.add(row)
                session.flush()
                session.add(
                    m.ServedAnswer(
                        response_id=row.id,
                        run_id=s.run_id,
                        endpoint=req.endpoint,
                        interventions=json.dumps(req.interventions),
                        applied=json.dumps(req.applied),
                        vector_run_ids=list(req.vector_run_ids),
                        params=json.dumps(req.params, default=str),
                    )
                )
                ids.append(row.id)
    return ids


def finish_serve_session(catalog: Catalog, s: ServeSession, status: str = "done", error: str | None = None) -> None:
    """Mark the session run done (or failed)."""
    with catalog.session() as session:
        finish_run(session, s.run_id, status, error)
