"""SQL of steering: a steered/capped generate run with its intervention, sweeps, and reading them back.

A steered run is an ordinary ``generate`` run (``runs`` + ``response_runs`` + ``responses``) plus one
``run_interventions`` row (what was asked: vector name, kind, layers, coefficient, positions, threshold source) and
one ``intervention_layers`` row per layer (what was applied: the resolved vector, its scale, the threshold). All of it
is written in one unit of work, so a run never exists without its intervention.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa

from personavec.errors import NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog
from personavec.store.responses import add_response_run
from personavec.store.runs import create_run, utcnow


@dataclass(frozen=True)
class InterventionLayerRow:
    """One layer of an intervention, as applied."""

    layer: int
    scale: float
    vector: np.ndarray  # [d_model] float32, the resolved vector
    unit_norm: float | None = None
    tau: float | None = None
    n_reference_tokens: int | None = None

    @property
    def vector_norm(self) -> float:
        return float(np.linalg.norm(np.asarray(self.vector, dtype=np.float64)))


@dataclass(frozen=True)
class InterventionRecord:
    """The intervention of a run, read back: the request (``spec``) and the per-layer numbers."""

    run_id: int
    sweep_id: int | None
    kind: str
    vector: str
    vector_run_id: int
    layers: tuple[int, ...]
    coef: float
    positions: str
    normalize: bool
    percentile: float | None
    reference_run_id: int | None
    tau_source: str | None
    spec: dict[str, Any]
    per_layer: tuple[InterventionLayerRow, ...]


@dataclass(frozen=True)
class SweepRun:
    run_id: int
    coef: float
    status: str
    layers: tuple[int, ...] = ()  # the steered layers (a layer sweep has one run per layer and coefficient)


@dataclass(frozen=True)
class SweepInfo:
    """A sweep and its runs, ordered by the swept value."""

    sweep_id: int
    label: str | None
    parameter: str
    config: dict[str, Any]
    runs: tuple[SweepRun, ...]


def create_sweep(catalog: Catalog, *, label: str | None, parameter: str, config: dict[str, Any]) -> int:
    """A new sweep row; returns its id."""
    with catalog.session() as session:
        row = m.SteeringSweep(
            created_at=utcnow(), label=label, parameter=parameter, config=json.dumps(config, default=str)
        )
        session.add(row)
        session.flush()
        return row.id


def create_steered_generation_run(
    catalog: Catalog,
    config: dict[str, Any],
    detail: dict[str, Any],
    *,
    spec: dict[str, Any],
    vector_run_id: int,
    layers: Sequence[InterventionLayerRow],
    sweep_id: int | None = None,
    tau_source: str | None = None,
    reference_run_id: int | None = None,
) -> int:
    """One unit of work: a ``running`` generate run, its response-run detail (``detail``: persona_set_id,
    question_set_id, model, endpoint, n_samples, temperature, max_tokens, top_p, seed) and its intervention.
    ``spec`` is the :class:`personavec.steering.interventions.SteeringConfig` as a dict. Returns the run id."""
    with catalog.session() as session:
        run_id = create_run(session, "generate", config)
        add_response_run(session, run_id, **detail)
        session.add(
            m.RunIntervention(
                run_id=run_id,
                sweep_id=sweep_id,
                kind=spec["kind"],
                vector=spec["vector"],
                vector_run_id=vector_run_id,
                layers=[row.layer for row in layers],
                coef=float(spec.get("coef", 0.0)),
                positions=spec["positions"],
                normalize=bool(spec.get("normalize", False)),
                percentile=float(spec["percentile"]) if spec["kind"] == "cap" and not spec.get("tau") else None,
                reference_run_id=reference_run_id,
                tau_source=tau_source,
                spec=json.dumps(spec, default=str),
            )
        )
        for row in layers:
            session.add(
                m.InterventionLayer(
                    run_id=run_id,
                    layer=row.layer,
                    scale=row.scale,
                    vector_norm=row.vector_norm,
                    unit_norm=row.unit_norm,
                    tau=row.tau,
                    n_reference_tokens=row.n_reference_tokens,
                    vector=np.asarray(row.vector, dtype=np.float32).tolist(),
                )
            )
    return run_id


def get_intervention(catalog: Catalog, run_id: int) -> InterventionRecord | None:
    """The intervention of a run, or None for an unsteered run."""
    with catalog.session() as session:
        row = session.get(m.RunIntervention, run_id)
        if row is None:
            return None
        layers = session.scalars(
            sa.select(m.InterventionLayer)
            .where(m.InterventionLayer.run_id == run_id)
            .order_by(m.InterventionLayer.layer)
        ).all()
        return InterventionRecord(
            run_id=row.run_id,
            sweep_id=row.sweep_id,
            kind=row.kind,
            vector=row.vector,
            vector_run_id=row.vector_run_id,
            layers=tuple(row.layers),
            coef=row.coef,
            positions=row.positions,
            normalize=row.normalize,
            percentile=row.percentile,
            reference_run_id=row.reference_run_id,
            tau_source=row.tau_source,
            spec=json.loads(row.spec),
            per_layer=tuple(
                InterventionLayerRow(
                    layer=r.layer,
                    scale=r.scale,
                    vector=np.asarray(r.vector, dtype=np.float32),
                    unit_norm=r.unit_norm,
                    tau=r.tau,
                    n_reference_tokens=r.n_reference_tokens,
                )
                for r in layers
            ),
        )


def discard_intervention(catalog: Catalog, run_id: int) -> None:
    """Delete a run's intervention rows (after :func:`personavec.store.generation.discard_empty_run` removed it)."""
    with catalog.session() as session:
        session.execute(sa.delete(m.InterventionLayer).where(m.InterventionLayer.run_id == run_id))
        session.execute(sa.delete(m.RunIntervention).where(m.RunIntervention.run_id == run_id))


def discard_empty_sweep(catalog: Catalog, sweep_id: int) -> bool:
    """Delete a sweep no run belongs to (bad input found after the sweep row was made); returns whether it was."""
    with catalog.session() as session:
        n = session.scalar(
            sa.select(sa.func.count()).select_from(m.RunIntervention).where(m.RunIntervention.sweep_id == sweep_id)
        )
        if n:
            return False
        session.execute(sa.delete(m.SteeringSweep).where(m.SteeringSweep.id == sweep_id))
        return True


def get_sweep(catalog: Catalog, sweep_id: int) -> SweepInfo:
    """A sweep with its runs ordered by layers, then coefficient (``NotFoundError`` if there is none)."""
    q = sa.text(
        "SELECT i.run_id, i.coef, r.status, i.layers FROM run_interventions i JOIN runs r ON r.id = i.run_id "
        "WHERE i.sweep_id = :sweep ORDER BY i.layers, i.coef, i.run_id"
    )
    with catalog.session() as session:
        sweep = session.get(m.SteeringSweep, sweep_id)
        if sweep is None:
            raise NotFoundError(
                f"sweep {sweep_id} does not exist: `personavec sql 'SELECT * FROM steering_sweeps'` lists them"
            )
        runs = tuple(SweepRun(r[0], r[1], r[2], tuple(r[3])) for r in session.execute(q, {"sweep": sweep_id}))
        return SweepInfo(sweep.id, sweep.label, sweep.parameter, json.loads(sweep.config), runs)


def list_sweeps(catalog: Catalog) -> list[SweepInfo]:
    """Every sweep, oldest first."""
    with catalog.session() as session:
        ids = session.scalars(sa.select(m.SteeringSweep.id).order_by(m.SteeringSweep.id)).all()
    return [get_sweep(catalog, i) for i in ids]


def sweeps_using(catalog: Catalog, vector_run_id: int) -> list[tuple[int, str | None]]:
    """``(sweep id, label)`` of every sweep with a run steered by vectors of ``vector_run_id``."""
    q = sa.text(
        "SELECT DISTINCT s.id, s.label FROM steering_sweeps s JOIN run_interventions i ON i.sweep_id = s.id "
        "WHERE i.vector_run_id = :run ORDER BY s.id"
    )
    with catalog.session() as session:
        return [(r[0], r[1]) for r in session.execute(q, {"run": vector_run_id})]
