"""ORM models of the catalog (SQLAlchemy 2.x declarative, DuckDB dialect).

One ``runs`` row per unit of work of any kind (ingest, generate, extract, vectors) carries the common provenance
(status, timings, package version, host, config JSON); kind-specific detail lives in a table keyed by the run id.
DuckDB has no SERIAL: ids come from sequences. Vectors are ``FLOAT[]`` so DuckDB's ``list_cosine_similarity``
works on them directly.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    DateTime,
    Double,
    Float,
    ForeignKey,
    Integer,
    MetaData,
    Sequence,
    String,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

#: The Alembic revision whose schema these models describe: the head of the bundled ``migrations/``. A catalog at
#: another revision is refused until ``personavec db upgrade``. Kept here, not read from the migration scripts, so
#: that opening a catalog does not import Alembic (~0.3 s a process); tests/test_store_schema.py checks it is the
#: head and that the models equal the schema the migrations build.
SCHEMA_REVISION = "0007"

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

#: Run kinds, as stored in ``runs.kind``.
RUN_KINDS = (
    "ingest-personas",
    "ingest-questions",
    "ingest-responses",
    "generate",
    "extract",
    "vectors",
    "judge",
    "evaluate",
)
#: Run statuses, as stored in ``runs.status``.
RUN_STATUSES = ("running", "done", "failed", "interrupted")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


def _seq(name: str) -> Sequence:
    return Sequence(name, metadata=Base.metadata)


RUN_SEQ = _seq("runs_id_seq")
PERSONA_SET_SEQ = _seq("persona_sets_id_seq")
PERSONA_SEQ = _seq("personas_id_seq")
QUESTION_SET_SEQ = _seq("question_sets_id_seq")
QUESTION_SEQ = _seq("questions_id_seq")
RESPONSE_SEQ = _seq("responses_id_seq")
ACTIVATION_SEQ = _seq("activations_id_seq")
VECTOR_SEQ = _seq("vectors_id_seq")


def _id(seq: Sequence) -> Mapped[int]:
    return mapped_column(BigInteger, seq, server_default=seq.next_value(), primary_key=True)


class Run(Base):
    __tablename__ = "runs"
    id: Mapped[int] = _id(RUN_SEQ)
    kind: Mapped[str] = mapped_column(String, nullable=False)
    status: Mapped[str] = mapped_column(String, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    wall_s: Mapped[float | None] = mapped_column(Double)
    package_version: Mapped[str] = mapped_column(String, nullable=False)
    host: Mapped[str | None] = mapped_column(String)
    config: Mapped[str] = mapped_column(String, nullable=False, default="{}")
    error: Mapped[str | None] = mapped_column(String)


class RunOwner(Base):
    """The process writing a run (host, pid, and the pid's start time so a reused pid is not mistaken for it).
    Keyed by run id without a foreign key (see migration 0002 for why)."""

    __tablename__ = "run_owners"
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    host: Mapped[str] = mapped_column(String, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    process_start: Mapped[int | None] = mapped_column(BigInteger)
    claimed_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class PersonaSet(Base):
    __tablename__ = "persona_sets"
    id: Mapped[int] = _id(PERSONA_SET_SEQ)
    name: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    source: Mapped[str | None] = mapped_column(String)


class Persona(Base):
    __tablename__ = "personas"
    __table_args__ = (UniqueConstraint("persona_set_id", "name"),)
    id: Mapped[int] = _id(PERSONA_SEQ)
    persona_set_id: Mapped[int] = mapped_column(ForeignKey("persona_sets.id"), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    name: Mapped[str] = mapped_column(String, nullable=False)
    system_prompt: Mapped[str] = mapped_column(String, nullable=False)
    groups: Mapped[list[str]] = mapped_column(ARRAY(String), nullable=False)


class QuestionSet(Base):
    __tablename__ = "question_sets"
    id: Mapped[int] = _id(QUESTION_SET_SEQ)
    name: Mapped[str] = mapped_column(String, nullable=False, unique=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    source: Mapped[str | None] = mapped_column(String)


class Question(Base):
    __tablename__ = "questions"
    __table_args__ = (
        UniqueConstraint("question_set_id", "text"),
        UniqueConstraint("question_set_id", "position"),
    )
    id: Mapped[int] = _id(QUESTION_SEQ)
    question_set_id: Mapped[int] = mapped_column(ForeignKey("question_sets.id"), nullable=False)
    position: Mapped[int] = mapped_column(Integer, nullable=False)
    text: Mapped[str] = mapped_column(String, nullable=False)


class ResponseRun(Base):
    """Detail of a run that produced responses: ``generate`` (an endpoint) or ``ingest-responses`` (a file)."""

    __tablename__ = "response_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    persona_set_id: Mapped[int] = mapped_column(ForeignKey("persona_sets.id"), nullable=False)
    question_set_id: Mapped[int] = mapped_column(ForeignKey("question_sets.id"), nullable=False)
    model: Mapped[str | None] = mapped_column(String)
    endpoint: Mapped[str | None] = mapped_column(String)
    source: Mapped[str | None] = mapped_column(String)
    source_sha256: Mapped[str | None] = mapped_column(String)
    n_samples: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    temperature: Mapped[float | None] = mapped_column(Double)
    max_tokens: Mapped[int | None] = mapped_column(Integer)
    top_p: Mapped[float | None] = mapped_column(Double)
    seed: Mapped[int | None] = mapped_column(BigInteger)


class Response(Base):
    """One answer (or one recorded failure, ``text`` NULL and ``error`` set) of a persona to a question."""

    __tablename__ = "responses"
    __table_args__ = (UniqueConstraint("run_id", "persona_id", "question_id", "sample_index"),)
    id: Mapped[int] = _id(RESPONSE_SEQ)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    persona_id: Mapped[int] = mapped_column(ForeignKey("personas.id"), nullable=False)
    question_id: Mapped[int] = mapped_column(ForeignKey("questions.id"), nullable=False)
    sample_index: Mapped[int] = mapped_column(Integer, nullable=False)
    text: Mapped[str | None] = mapped_column(String)
    finish_reason: Mapped[str | None] = mapped_column(String)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    latency_s: Mapped[float | None] = mapped_column(Double)
    model_reported: Mapped[str | None] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(String)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)


class ExtractionRun(Base):
    __tablename__ = "extraction_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    source_run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    model: Mapped[str] = mapped_column(String, nullable=False)
    model_revision: Mapped[str | None] = mapped_column(String)
    architecture: Mapped[str | None] = mapped_column(String)
    n_model_layers: Mapped[int] = mapped_column(Integer, nullable=False)
    d_model: Mapped[int] = mapped_column(Integer, nullable=False)
    layers: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)
    dtype: Mapped[str] = mapped_column(String, nullable=False)
    span_rule: Mapped[str] = mapped_column(String, nullable=False)
    prompt_format: Mapped[str] = mapped_column(String, nullable=False)
    device: Mapped[str] = mapped_column(String, nullable=False)
    zarr_group: Mapped[str] = mapped_column(String, nullable=False)
    n_examples: Mapped[int] = mapped_column(Integer, nullable=False)
    n_tokens: Mapped[int | None] = mapped_column(BigInteger)
    tok_s: Mapped[float | None] = mapped_column(Double)


class Activation(Base):
    """One example of an extraction run: which response sits in which Zarr row, and its token span."""

    __tablename__ = "activations"
    __table_args__ = (UniqueConstraint("run_id", "response_id"), UniqueConstraint("run_id", "row"))
    id: Mapped[int] = _id(ACTIVATION_SEQ)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), nullable=False)
    row: Mapped[int] = mapped_column(Integer, nullable=False)
    span_start: Mapped[int] = mapped_column(Integer, nullable=False)
    span_end: Mapped[int] = mapped_column(Integer, nullable=False)
    n_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    n_response_tokens: Mapped[int] = mapped_column(Integer, nullable=False)
    truncated: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)
    done: Mapped[bool] = mapped_column(Boolean, nullable=False, default=False)


class VectorRun(Base):
    __tablename__ = "vector_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    extraction_run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    group_by: Mapped[str] = mapped_column(String, nullable=False)
    model: Mapped[str] = mapped_column(String, nullable=False)
    d_model: Mapped[int] = mapped_column(Integer, nullable=False)


class Vector(Base):
    __tablename__ = "vectors"
    __table_args__ = (UniqueConstraint("run_id", "layer", "group_key"),)
    id: Mapped[int] = _id(VECTOR_SEQ)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    layer: Mapped[int] = mapped_column(Integer, nullable=False)
    group_key: Mapped[str] = mapped_column(String, nullable=False)
    n_examples: Mapped[int] = mapped_column(Integer, nullable=False)
    norm: Mapped[float] = mapped_column(Double, nullable=False)
    vector: Mapped[list[float]] = mapped_column(ARRAY(Float), nullable=False)


STEERING_SWEEP_SEQ = _seq("steering_sweeps_id_seq")


class SteeringSweep(Base):
    """A sweep: generate runs that differ in one intervention parameter (``parameter``, e.g. ``coef``)."""

    __tablename__ = "steering_sweeps"
    id: Mapped[int] = _id(STEERING_SWEEP_SEQ)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    label: Mapped[str | None] = mapped_column(String)
    parameter: Mapped[str] = mapped_column(String, nullable=False)
    config: Mapped[str] = mapped_column(String, nullable=False)


class RunIntervention(Base):
    """The intervention of a steered or capped generate run (keyed by run id, no foreign key: see migration 0003)."""

    __tablename__ = "run_interventions"
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("steering_sweeps.id"))
    kind: Mapped[str] = mapped_column(String, nullable=False)
    vector: Mapped[str] = mapped_column(String, nullable=False)
    vector_run_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    layers: Mapped[list[int]] = mapped_column(ARRAY(Integer), nullable=False)
    coef: Mapped[float] = mapped_column(Double, nullable=False)
    positions: Mapped[str] = mapped_column(String, nullable=False)
    normalize: Mapped[bool] = mapped_column(Boolean, nullable=False)
    percentile: Mapped[float | None] = mapped_column(Double)
    reference_run_id: Mapped[int | None] = mapped_column(BigInteger)
    tau_source: Mapped[str | None] = mapped_column(String)
    spec: Mapped[str] = mapped_column(String, nullable=False)


class InterventionLayer(Base):
    """What an intervention applied at one layer: the resolved vector, its scale, and the capping threshold."""

    __tablename__ = "intervention_layers"
    run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    layer: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    scale: Mapped[float] = mapped_column(Double, nullable=False)
    vector_norm: Mapped[float] = mapped_column(Double, nullable=False)
    unit_norm: Mapped[float | None] = mapped_column(Double)
    tau: Mapped[float | None] = mapped_column(Double)
    n_reference_tokens: Mapped[int | None] = mapped_column(Integer)
    vector: Mapped[list[float]] = mapped_column(ARRAY(Float), nullable=False)


JUDGEMENT_SEQ = _seq("judgements_id_seq")


class JudgeRun(Base):
    """Detail of a ``judge`` run: the responses run it judged, the judge model and endpoint, the rubric names."""

    __tablename__ = "judge_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    responses_run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    model: Mapped[str] = mapped_column(String, nullable=False)
    endpoint: Mapped[str | None] = mapped_column(String)
    rubrics: Mapped[list[str]] = mapped_column(ARRAY(String), nullable=False)


class Judgement(Base):
    """One judge answer about one response under one rubric: a ``score``, or ``error`` set and ``score`` NULL
    (an unparsable answer keeps its ``raw_output``; a request that failed after retries has none)."""

    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("run_id", "response_id", "rubric"),)
    id: Mapped[int] = _id(JUDGEMENT_SEQ)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), nullable=False)
    rubric: Mapped[str] = mapped_column(String, nullable=False)
    score: Mapped[float | None] = mapped_column(Double)
    method: Mapped[str | None] = mapped_column(String)
    numeric_mass: Mapped[float | None] = mapped_column(Double)
    raw_output: Mapped[str | None] = mapped_column(String)
    top_logprobs: Mapped[str | None] = mapped_column(String)
    error: Mapped[str | None] = mapped_column(String)
    latency_s: Mapped[float | None] = mapped_column(Double)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, default=1)
    model_reported: Mapped[str | None] = mapped_column(String)
    created_at: Mapped[datetime] = mapped_column(DateTime, nullable=False)
    #: ``raw_output`` was cut to the stored size bound (migration 0006)
    truncated: Mapped[bool | None] = mapped_column(Boolean, server_default=false())


class ServedAnswer(Base):
    """What one answer of a recording ``personavec serve`` session was asked with: its interventions (as asked and
    as applied per layer, JSON), the vectors runs they came from, the sampling parameters (migration 0005)."""

    __tablename__ = "served_answers"
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), primary_key=True, autoincrement=False)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    endpoint: Mapped[str] = mapped_column(String, nullable=False)
    interventions: Mapped[str] = mapped_column(String, nullable=False)
    applied: Mapped[str] = mapped_column(String, nullable=False)
    vector_run_ids: Mapped[list[int]] = mapped_column(ARRAY(BigInteger), nullable=False)
    params: Mapped[str] = mapped_column(String, nullable=False)


EVALUATION_FIGURE_SEQ = _seq("evaluation_figures_id_seq")


class EvaluationRun(Base):
    """The detail of an ``evaluate`` run: what it judged with, its rule, and the operating point it chose (NULL
    columns while none is chosen: no setting kept coherence >= threshold, or the run is not finished). Migration
    0007."""

    __tablename__ = "evaluation_runs"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    sweep_id: Mapped[int | None] = mapped_column(ForeignKey("steering_sweeps.id"))
    trait_rubric: Mapped[str | None] = mapped_column(String)
    coherence_rubric: Mapped[str] = mapped_column(String, nullable=False)
    harmful_rubric: Mapped[str | None] = mapped_column(String)
    threshold: Mapped[float] = mapped_column(Double, nullable=False)
    op_responses_run_id: Mapped[int | None] = mapped_column(BigInteger)
    op_coef: Mapped[float | None] = mapped_column(Double)
    op_layer: Mapped[int | None] = mapped_column(Integer)
    op_trait: Mapped[float | None] = mapped_column(Double)
    op_coherence: Mapped[float | None] = mapped_column(Double)
    report_dir: Mapped[str | None] = mapped_column(String)


class EvaluationMember(Base):
    """One responses run an evaluation judged (a run of the sweep, or the uncapped / capped jailbreak answers) and
    the judge run that scored it (NULL until that judge run exists)."""

    __tablename__ = "evaluation_members"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    responses_run_id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    role: Mapped[str] = mapped_column(String, nullable=False)
    judge_run_id: Mapped[int | None] = mapped_column(BigInteger)


class EvaluationFigure(Base):
    """One number of an evaluation: a metric (``trait``, ``coherence``, ``harmful_rate``, ``projection_r``) over the
    answers of one setting (a responses run, one persona or all: ``persona`` NULL), with its interval."""

    __tablename__ = "evaluation_figures"
    id: Mapped[int] = _id(EVALUATION_FIGURE_SEQ)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), nullable=False)
    part: Mapped[str] = mapped_column(String, nullable=False)
    responses_run_id: Mapped[int | None] = mapped_column(BigInteger)
    setting: Mapped[str | None] = mapped_column(String)
    persona: Mapped[str | None] = mapped_column(String)
    layer: Mapped[int | None] = mapped_column(Integer)
    coef: Mapped[float | None] = mapped_column(Double)
    metric: Mapped[str] = mapped_column(String, nullable=False)
    n: Mapped[int] = mapped_column(Integer, nullable=False)
    value: Mapped[float | None] = mapped_column(Double)
    lo: Mapped[float | None] = mapped_column(Double)
    hi: Mapped[float | None] = mapped_column(Double)


class EvaluationAnswer(Base):
    """Per answer of an evaluated sweep: its projection onto the steering direction at the steered layer (read by
    the unsteered model), what the projection-vs-trait correlation is computed from."""

    __tablename__ = "evaluation_answers"
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id"), primary_key=True)
    response_id: Mapped[int] = mapped_column(ForeignKey("responses.id"), primary_key=True)
    layer: Mapped[int] = mapped_column(Integer, nullable=False)
    projection: Mapped[float] = mapped_column(Double, nullable=False)
