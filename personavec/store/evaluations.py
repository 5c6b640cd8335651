"""SQL of the evaluate stage: ``evaluate`` runs, the responses runs they judged, their figures and operating point.

An evaluation is a ``runs`` row of kind ``evaluate`` plus its detail (``evaluation_runs``: rubrics, coherence
threshold, the operating point chosen), one ``evaluation_members`` row per responses run it judged (a run of the
sweep, or the uncapped / capped jailbreak answers it generated) with the judge run that scored it, and what it
computed: ``evaluation_figures`` (one row per metric x setting x persona, with its interval) and
``evaluation_answers`` (each sweep answer's projection). The computed rows are replaced whole, in the same unit of
work that marks the run done, so a finished evaluation never shows figures of an earlier attempt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from personavec.errors import NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.records import RunInfo
from personavec.store.runs import create_run, finish_run, mark_running, run_in_session


@dataclass(frozen=True)
class Member:
    """A responses run an evaluation judged, its role (``sweep``, ``uncapped``, ``capped``) and its judge run."""

    responses_run_id: int
    role: str
    judge_run_id: int | None


@dataclass(frozen=True)
class Figure:
    """One number of an evaluation (see :class:`personavec.store.models.EvaluationFigure`)."""

    part: str  # "sweep", "correlation" or "capping"
    metric: str  # "trait", "coherence", "harmful_rate", "projection_r"
    n: int
    value: float | None
    lo: float | None = None
    hi: float | None = None
    responses_run_id: int | None = None
    setting: str | None = None
    persona: str | None = None  # None: every persona of the setting
    layer: int | None = None
    coef: float | None = None


@dataclass(frozen=True)
class OperatingPoint:
    """The setting chosen: the highest mean trait score among the settings whose mean coherence >= threshold."""

    responses_run_id: int
    coef: float
    layer: int
    trait: float
    coherence: float


@dataclass(frozen=True)
class EvaluationInfo:
    """An ``evaluate`` run with its detail, members and (once done) figures."""

    run: RunInfo
    sweep_id: int | None
    trait_rubric: str | None
    coherence_rubric: str
    harmful_rubric: str | None
    threshold: float
    operating_point: OperatingPoint | None
    report_dir: str | None
    members: tuple[Member, ...]
    figures: tuple[Figure, ...]

    def member(self, role: str) -> Member | None:
        """The first member with this role (None if there is none yet)."""
        return next((x for x in self.members if x.role == role), None)


def create_evaluation_run(
    catalog: Catalog,
    config: dict[str, Any],
    *,
    sweep_id: int | None,
    trait_rubric: str | None,
    coherence_rubric: str,
    harmful_rubric: str | None,
    threshold: float,
) -> int:
    """A ``running`` evaluate run and its detail row in one unit of work; returns the run id."""
    with catalog.session() as session:
        if sweep_id is not None and session.get(m.SteeringSweep, sweep_id) is None:
            raise NotFoundError(
                f"sweep {sweep_id} does not exist: `personavec sql 'SELECT * FROM steering_sweeps'` lists them"
            )
        run_id = create_run(session, "evaluate", config)
        session.add(
            m.EvaluationRun(
                run_id=run_id,
                sweep_id=sweep_id,
                trait_rubric=trait_rubric,
                coherence_rubric=coherence_rubric,
                harmful_rubric=harmful_rubric,
                threshold=threshold,
            )
        )
    return run_id


def resume_evaluation_run(catalog: Catalog, run_id: int) -> None:
    """Mark an evaluate run ``running`` again (refused while another live process runs it)."""
    with catalog.session() as session:
        run_in_session(session, run_id, ("evaluate",))
        mark_running(session, run_id)


def add_member(catalog: Catalog, run_id: int, responses_run_id: int, role: str) -> None:
    """Link a responses run to the evaluation (nothing happens when it is linked already)."""
    with catalog.session() as session:
        if session.get(m.EvaluationMember, (run_id, responses_run_id)) is None:
            session.add(m.EvaluationMember(run_id=run_id, responses_run_id=responses_run_id, role=role))


def set_member_judge(catalog: Catalog, run_id: int, responses_run_id: int, judge_run_id: int) -> None:
    """Record the judge run that scores a member."""
    with catalog.session() as session:
        row = session.get(m.EvaluationMember, (run_id, responses_run_id))
        if row is None:
            raise NotFoundError(f"responses run {responses_run_id} is not part of evaluation {run_id}")
        row.judge_run_id = judge_run_id


def complete_evaluation(
    catalog: Catalog,
    run_id: int,
    figures: Sequence[Figure],
    projections: Sequence[tuple[int, int, float]],
    operating_point: OperatingPoint | None,
    report_dir: str,
) -> None:
    """One unit of work: replace the run's figures and answer projections (``(response_id, layer, projection)``),
    record the operating point and the report's folder, and mark the run done."""
    with catalog.session() as session:
        session.execute(sa.delete(m.EvaluationFigure).where(m.EvaluationFigure.run_id == run_id))
        session.execute(sa.delete(m.EvaluationAnswer).where(m.EvaluationAnswer.run_id == run_id))
        session.add_all(m.EvaluationFigure(run_id=run_id, **vars(f)) for f in figures)
        session.add_all(
            m.EvaluationAnswer(run_id=run_id, response_id=rid, layer=layer, projection=value)
            for rid, layer, value in projections
        )
        detail = session.get(m.EvaluationRun, run_id)
        if detail is None:
            raise NotFoundError(f"evaluate run {run_id} has no evaluation_runs row: the catalog is inconsistent")
        op = operating_point
        detail.op_responses_run_id = op.responses_run_id if op else None
        detail.op_coef = op.coef if op else None
        detail.op_layer = op.layer if op else None
        detail.op_trait = op.trait if op else None
        detail.op_coherence = op.coherence if op else None
        detail.report_dir = report_dir
        finish_run(session, run_id, "done")


def finish_evaluation_run(catalog: Catalog, run_id: int, status: str, error: str | None = None) -> None:
    """Mark the run failed or interrupted (``done`` goes through :func:`complete_evaluation`)."""
    with catalog.session() as session:
        finish_run(session, run_id, status, error)


def get_evaluation(catalog: Catalog, run_id: int) -> EvaluationInfo:
    """An evaluate run with its detail, members and figures (``RunNotFoundError`` if missing or another kind)."""
    with catalog.session() as session:
        run = run_in_session(session, run_id, ("evaluate",))
        d = session.get(m.EvaluationRun, run_id)
        if d is None:
            raise NotFoundError(f"evaluate run {run_id} has no evaluation_runs row: the catalog is inconsistent")
        members = session.scalars(
            sa.select(m.EvaluationMember)
            .where(m.EvaluationMember.run_id == run_id)
            .order_by(m.EvaluationMember.responses_run_id)
        ).all()
        figures = session.scalars(
            sa.select(m.EvaluationFigure).where(m.EvaluationFigure.run_id == run_id).order_by(m.EvaluationFigure.id)
        ).all()
        op = None
        if d.op_responses_run_id is not None:
            assert d.op_coef is not None and d.op_layer is not None  # written together
            assert d.op_trait is not None and d.op_coherence is not None
            op = OperatingPoint(d.op_responses_run_id, d.op_coef, d.op_layer, d.op_trait, d.op_coherence)
        return EvaluationInfo(
            run=run,
            sweep_id=d.sweep_id,
            trait_rubric=d.trait_rubric,
            coherence_rubric=d.coherence_rubric,
            harmful_rubric=d.harmful_rubric,
            threshold=d.threshold,
            operating_point=op,
            report_dir=d.report_dir,
            members=tuple(Member(x.responses_run_id, x.role, x.judge_run_id) for x in members),
            figures=tuple(
                Figure(
                    part=f.part,
                    metric=f.metric,
                    n=f.n,
                    value=f.value,
                    lo=f.lo,
                    hi=f.hi,
                    responses_run_id=f.responses_run_id,
                    setting=f.setting,
                    persona=f.persona,
                    layer=f.layer,
                    coef=f.coef,
                )
                for f in figures
            ),
        )


def answer_projections(catalog: Catalog, run_id: int) -> dict[int, tuple[int, float]]:
    """``{response_id: (layer, projection)}`` of an evaluation's sweep answers."""
    q = sa.text("SELECT response_id, layer, projection FROM evaluation_answers WHERE run_id = :run")
    with catalog.session() as session:
        return {int(r[0]): (int(r[1]), float(r[2])) for r in session.execute(q, {"run": run_id})}


def evaluations_of_sweep(catalog: Catalog, sweep_id: int) -> list[tuple[int, str | None]]:
    """``(run id, report folder)`` of every finished evaluation of a sweep, newest first."""
    q = sa.text(
        "SELECT e.run_id, e.report_dir FROM evaluation_runs e JOIN runs r ON r.id = e.run_id "
        "WHERE e.sweep_id = :sweep AND r.status = 'done' ORDER BY e.run_id DESC"
    )
    with catalog.session() as session:
        return [(int(r[0]), r[1]) for r in session.execute(q, {"sweep": sweep_id})]
