"""Persona sets and question sets."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import DuplicateError, NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.records import Persona, PersonaSet, PersonaSpec, Question, QuestionSet
from personavec.store.runs import create_run, finish_run


def _persona_set_exists(session: Session, name: str) -> bool:
    return session.scalar(sa.select(m.PersonaSet.id).where(m.PersonaSet.name == name)) is not None


def _question_set_exists(session: Session, name: str) -> bool:
    return session.scalar(sa.select(m.QuestionSet.id).where(m.QuestionSet.name == name)) is not None


def set_names(catalog: Catalog) -> tuple[set[str], set[str]]:
    """Names of the persona sets and of the question sets in the catalog."""
    with catalog.session() as session:
        return set(session.scalars(sa.select(m.PersonaSet.name))), set(session.scalars(sa.select(m.QuestionSet.name)))


def create_persona_set(
    catalog: Catalog, name: str, personas: Sequence[PersonaSpec], config: dict, source: str | None
) -> int:
    """One unit of work: an ``ingest-personas`` run (done) and its persona set. Returns the run id."""
    with catalog.session() as session:
        run_id = create_run(session, "ingest-personas", config)
        _add_persona_set(session, name, run_id, personas, source)
        finish_run(session, run_id, "done")
    return run_id


def create_question_set(catalog: Catalog, name: str, questions: Sequence[str], config: dict, source: str | None) -> int:
    """One unit of work: an ``ingest-questions`` run (done) and its question set. Returns the run id."""
    with catalog.session() as session:
        run_id = create_run(session, "ingest-questions", config)
        _add_question_set(session, name, run_id, questions, source)
        finish_run(session, run_id, "done")
    return run_id


def _add_persona_set(
    session: Session, name: str, run_id: int, personas: Sequence[PersonaSpec], source: str | None
) -> int:
    """Insert a persona set and its personas; fails if the name is taken."""
    if _persona_set_exists(session, name):
        raise DuplicateError(f"persona set {name!r} already exists: choose another --name")
    pset = m.PersonaSet(name=name, run_id=run_id, source=source)
    session.add(pset)
    session.flush()
    session.add_all(
        m.Persona(persona_set_id=pset.id, position=i, name=p.name, system_prompt=p.system_prompt, groups=list(p.groups))
        for i, p in enumerate(personas)
    )
    session.flush()
    return pset.id


def _add_question_set(session: Session, name: str, run_id: int, questions: Sequence[str], source: str | None) -> int:
    """Insert a question set and its questions; fails if the name is taken."""
    if _question_set_exists(session, name):
        raise DuplicateError(f"question set {name!r} already exists: choose another --name")
    qset = m.QuestionSet(name=name, run_id=run_id, source=source)
    session.add(qset)
    session.flush()
    session.add_all(m.Question(question_set_id=qset.id, position=i, text=t) for i, t in enumerate(questions))
    session.flush()
    return qset.id


def persona_set_in_session(session: Session, name_or_id: str | int) -> PersonaSet:
    cond = m.PersonaSet.id == name_or_id if isinstance(name_or_id, int) else m.PersonaSet.name == name_or_id
    row = session.scalars(sa.select(m.PersonaSet).where(cond)).one_or_none()
    if row is None:
        known = ", ".join(session.scalars(sa.select(m.PersonaSet.name).order_by(m.PersonaSet.id))) or "none"
        raise NotFoundError(
            f"unknown persona set {name_or_id!r} (known: {known}); add one with `personavec ingest personas`"
        )
    personas = session.scalars(
        sa.select(m.Persona).where(m.Persona.persona_set_id == row.id).order_by(m.Persona.position)
    ).all()
    return PersonaSet(
        id=row.id,
        name=row.name,
        run_id=row.run_id,
        personas=tuple(Persona(p.id, p.name, p.system_prompt, tuple(p.groups)) for p in personas),
    )


def question_set_in_session(session: Session, name_or_id: str | int) -> QuestionSet:
    cond = m.QuestionSet.id == name_or_id if isinstance(name_or_id, int) else m.QuestionSet.name == name_or_id
    row = session.scalars(sa.select(m.QuestionSet).where(cond)).one_or_none()
    if row is None:
        known = ", ".join(session.scalars(sa.select(m.QuestionSet.name).order_by(m.QuestionSet.id))) or "none"
        raise NotFoundError(
            f"unknown question set {name_or_id!r} (known: {known}); add one with `personavec ingest questions`"
        )
    questions = session.scalars(
        sa.select(m.Question).where(m.Question.question_set_id == row.id).order_by(m.Question.position)
    ).all()
    return QuestionSet(
        id=row.id,
        name=row.name,
        run_id=row.run_id,
        questions=tuple(Question(q.id, q.position, q.text) for q in questions),
    )


def get_persona_set(catalog: Catalog, name_or_id: str | int) -> PersonaSet:
    """A persona set with its personas, in file order."""
    with catalog.session() as session:
        return persona_set_in_session(session, name_or_id)


def get_question_set(catalog: Catalog, name_or_id: str | int) -> QuestionSet:
    """A question set with its questions, in file order."""
    with catalog.session() as session:
        return question_set_in_session(session, name_or_id)
