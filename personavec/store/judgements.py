"""SQL of the judge stage: ``judge`` runs, their judgements, and the scores vector filters read.

A judgement row is one judge answer about one response under one rubric. Three outcomes share the table:
a score (``score`` set), an answer that gave no score (``score`` NULL, ``error`` and ``raw_output`` set: the judge
refused, rambled, or put too little probability on the scale's integers), and a request that failed after the
client's retries (``raw_output`` NULL, ``error`` set). Only the last kind is asked again on resume; it is replaced in
place (``INSERT ... ON CONFLICT DO UPDATE`` on run/response/rubric), and a judge answer is never overwritten, so a
resumed run neither duplicates nor loses a judgement.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import sqlalchemy as sa

from personavec.errors import NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.records import RunInfo
from personavec.store.responses import RESPONSE_RUN_KINDS
from personavec.store.runs import create_run, finish_run, mark_running, require_kind, run_in_session, utcnow


@dataclass(frozen=True)
class JudgeRunInfo:
    """A ``judge`` run with its detail row."""

    run: RunInfo
    responses_run_id: int
    model: str
    endpoint: str | None
    rubrics: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class JudgementRow:
    """One outcome, ready to land (see the module docstring for the three kinds)."""

    response_id: int
    rubric: str
    score: float | None
    method: str | None = None
    numeric_mass: float | None = None
    raw_output: str | None = None
    top_logprobs: str | None = None
    error: str | None = None
    latency_s: float | None = None
    attempts: int = 1
    model_reported: str | None = None
    truncated: bool = False  # raw_output cut to the stored size bound


@dataclass(frozen=True)
class JudgedScores:
    """The scores of one rubric from one judge run: ``{response_id: score}`` (judgements without a score left out);
    with ``judged_scores(..., alternatives=...)``, ``top_logprobs`` holds the stored first-token alternatives (JSON
    ``{token: probability}``) of the scores read from logprobs, and ``scale`` the rubric's scale as the judge run
    stored it."""

    rubric: str
    judge_run_id: int
    model: str
    scores: dict[int, float]
    top_logprobs: dict[int, str] = field(default_factory=dict)
    scale: tuple[int, int] | None = None


def create_judge_run(
    catalog: Catalog,
    config: dict[str, Any],
    *,
    responses_run_id: int,
    model: str,
    endpoint: str | None,
    rubrics: Sequence[str],
) -> int:
    """A ``running`` judge run and its detail row in one transaction; returns the run id. The responses run must
    exist and be a generate or ingest-responses run (:class:`RunNotFoundError` otherwise)."""
    with catalog.session() as session:
        run_in_session(session, responses_run_id, RESPONSE_RUN_KINDS)
        run_id = create_run(session, "judge", config)
        session.add(
            m.JudgeRun(
                run_id=run_id, responses_run_id=responses_run_id, model=model, endpoint=endpoint, rubrics=list(rubrics)
            )
        )
    return run_id


def get_judge_run(catalog: Catalog, run_id: int) -> JudgeRunInfo:
    """A judge run with its detail (``RunNotFoundError`` if missing or of another kind)."""
    with catalog.session() as session:
        run = run_in_session(session, run_id, ("judge",))
        detail = session.get(m.JudgeRun, run_id)
        if detail is None:
            raise NotFoundError(f"judge run {run_id} has no judge_runs row: the catalog is inconsistent")
        return JudgeRunInfo(run, detail.responses_run_id, detail.model, detail.endpoint, tuple(detail.rubrics))


def resume_judge_run(catalog: Catalog, run_id: int) -> None:
    """Mark a judge run ``running`` again (refused while another live process runs it)."""
    with catalog.session() as session:
        run_in_session(session, run_id, ("judge",))
        mark_running(session, run_id)


def settled_keys(catalog: Catalog, run_id: int) -> set[tuple[int, str]]:
    """``(response_id, rubric)`` of every judgement of the run that holds a judge answer (scored or not)."""
    q = sa.text("SELECT response_id, rubric FROM judgements WHERE run_id = :run AND raw_output IS NOT NULL")
    with catalog.session() as session:
        return {(r[0], r[1]) for r in session.execute(q, {"run": run_id})}


_UPSERT = """
INSERT INTO judgements (run_id, response_id, rubric, score, method, numeric_mass, raw_output, top_logprobs, error,
                        latency_s, attempts, model_reported, truncated, created_at)
SELECT ?, response_id, rubric, score, method, numeric_mass, raw_output, top_logprobs, error, latency_s, attempts,
       model_reported, truncated, ? FROM _pv_judgements
ON CONFLICT (run_id, response_id, rubric) DO UPDATE SET
    score = excluded.score, method = excluded.method, numeric_mass = excluded.numeric_mass,
    raw_output = excluded.raw_output, top_logprobs = excluded.top_logprobs, error = excluded.error,
    latency_s = excluded.latency_s, attempts = judgements.attempts + excluded.attempts,
    model_reported = excluded.model_reported, truncated = excluded.truncated, created_at = excluded.created_at
WHERE judgements.raw_output IS NULL
"""

_SCHEMA = pa.schema(
    [
        ("response_id", pa.int64()),
        ("rubric", pa.string()),
        ("score", pa.float64()),
        ("method", pa.string()),
        ("numeric_mass", pa.float64()),
        ("raw_output", pa.string()),
        ("top_logprobs", pa.string()),
        ("error", pa.string()),
        ("latency_s", pa.float64()),
        ("attempts", pa.int32()),
        ("model_reported", pa.string()),
        ("truncated", pa.bool_()),
    ]
)


def upsert_judgements(catalog: Catalog, run_id: int, rows: Sequence[JudgementRow]) -> None:
    """Land judgements in one transaction and one statement (run it on a writer thread: DuckDB releases the GIL).

    A row replaces an earlier failed request for the same key (attempts add up); a judge answer already stored is
    never touched. Keys within ``rows`` must be distinct."""
    if not rows:
        return
    table = pa.Table.from_pydict({n: [getattr(r, n) for r in rows] for n in _SCHEMA.names}, schema=_SCHEMA)
    with catalog.raw() as con:
        con.register("_pv_judgements", table)
        try:
            con.execute(_UPSERT, [run_id, utcnow()])
        finally:
            con.unregister("_pv_judgements")


def judgement_counts(catalog: Catalog, run_id: int) -> dict[str, int]:
    """Scored judgements, judge answers without a score, and requests that failed, of one judge run."""
    q = sa.text(
        """
        SELECT count(*) FILTER (WHERE score IS NOT NULL),
               count(*) FILTER (WHERE score IS NULL AND raw_output IS NOT NULL),
               count(*) FILTER (WHERE raw_output IS NULL),
               count(*) FILTER (WHERE score IS NOT NULL AND method = 'logprobs')
        FROM judgements WHERE run_id = :run
        """
    )
    with catalog.session() as session:
        scored, unscored, failed, by_logprobs = session.execute(q, {"run": run_id}).one()
    return {"scored": scored, "unscored": unscored, "failed": failed, "by_logprobs": by_logprobs}


def finish_judge_run(catalog: Catalog, run_id: int, status: str, error: str | None = None) -> None:
    """Mark the run done/failed/interrupted."""
    with catalog.session() as session:
        finish_run(session, run_id, status, error)


_CANDIDATES = """
SELECT j.rubric, j.run_id, any_value(jr.model), count(*)
FROM judgements j JOIN judge_runs jr ON jr.run_id = j.run_id JOIN runs r ON r.id = j.run_id
WHERE jr.responses_run_id = :responses AND j.rubric IN :rubrics {runs}
GROUP BY j.rubric, j.run_id
"""


def judged_scores(
    catalog: Catalog,
    responses_run_id: int,
    rubrics: Sequence[str],
    judge_runs: Sequence[int] = (),
    *,
    alternatives: Sequence[str] = (),
) -> dict[str, JudgedScores]:
    """For each rubric, the scores one judge run gave the responses of ``responses_run_id``: from the latest judge
    run over that responses run that judged the rubric, or the latest of ``judge_runs`` when given. For the rubrics
    in ``alternatives``, also the first-token alternatives of logprob scores and the rubric's scale.

    Raises :class:`NotFoundError` naming the rubrics no judge run scored (and the command that would)."""
    rubrics = list(dict.fromkeys(rubrics))
    if not rubrics:
        return {}
    with catalog.session() as session:
        for run_id in judge_runs:
            run = session.get(m.Run, run_id)
            require_kind(run_id, run.kind if run is not None else None, ("judge",))
        q = sa.text(_CANDIDATES.format(runs="AND j.run_id IN :runs" if judge_runs else "")).bindparams(
            sa.bindparam("rubrics", expanding=True), *([sa.bindparam("runs", expanding=True)] if judge_runs else [])
        )
        params: dict[str, Any] = {"responses": responses_run_id, "rubrics": rubrics}
        if judge_runs:
            params["runs"] = list(judge_runs)
        chosen: dict[str, tuple[int, str]] = {}
        for rubric, run_id, model, _ in session.execute(q, params):
            if rubric not in chosen or run_id > chosen[rubric][0]:
                chosen[rubric] = (run_id, model)
        missing = [r for r in rubrics if r not in chosen]
        if missing:
            among = f" among judge runs {', '.join(map(str, judge_runs))}" if judge_runs else ""
            raise NotFoundError(
                f"no judge run{among} judged responses run {responses_run_id} for rubric(s) "
                f"{', '.join(map(repr, missing))}: run `personavec judge {responses_run_id} --rubric "
                f"{missing[0]} ...` first"
            )
        out = {}
        scores_q = sa.text(
            "SELECT response_id, score FROM judgements WHERE run_id = :run AND rubric = :rubric AND score IS NOT NULL"
        )
        top_q = sa.text(
            "SELECT response_id, top_logprobs FROM judgements WHERE run_id = :run AND rubric = :rubric "
            "AND score IS NOT NULL AND method = 'logprobs' AND top_logprobs IS NOT NULL"
        )
        for rubric, (run_id, model) in chosen.items():
            rows = session.execute(scores_q, {"run": run_id, "rubric": rubric}).all()
            scores = {int(r[0]): float(r[1]) for r in rows}
            if rubric not in alternatives:
                out[rubric] = JudgedScores(rubric, run_id, model, scores)
                continue
            top = {int(r[0]): str(r[1]) for r in session.execute(top_q, {"run": run_id, "rubric": rubric})}
            config = run_in_session(session, run_id, ("judge",)).config
            stored = [r for r in (config.get("rubrics") or []) if isinstance(r, dict)]
            scale = next(((int(r["min_score"]), int(r["max_score"])) for r in stored if r.get("name") == rubric), None)
            out[rubric] = JudgedScores(rubric, run_id, model, scores, top, scale)
    return out
