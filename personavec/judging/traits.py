"""Contrastive trait vectors (persona_vectors' recipe): answers under positive vs negative instructions, judged,
filtered, and ``mean(pos) - mean(neg)`` per layer; and projections of any answers onto such a vector (monitoring).

A *trait set* is persona_vectors' JSON layout (YAML works too)::

    {"name": "pirate",                      # optional: default the file stem
     "description": "talks like a pirate",  # optional: used by the default trait rubric
     "instruction": [{"pos": "...", "neg": "..."}, ...],
     "questions": ["...", ...],
     "eval_prompt": "... {question} ... {answer} ..."}   # optional: the 0-100 trait rubric

:func:`add_trait` turns it into a persona set ``trait-<name>`` (personas ``pos_1..pos_k`` in group ``pos`` and
``neg_1..neg_k`` in group ``neg``, each instruction as the system prompt) and a question set ``trait-<name>``, so
the ordinary stages do the rest: ``generate`` both sides, ``judge`` them with the trait rubric and ``coherence``,
``extract``, then :func:`compute_trait_vectors` (a vectors run grouped by persona group with the filters below and
the contrast group ``<name>`` = ``mean(pos) - mean(neg)``). :func:`project_onto_vector` projects the per-answer
activations of any extraction run onto it; :func:`auroc` says how well it separates two sets of answers.

Filters (persona_vectors' thresholds): ``pos`` answers are kept when the trait scores ``>= threshold`` (50), ``neg``
answers when it scores ``< threshold``, both when coherence is ``>= coherence`` (50). persona_vectors keeps a
question's pos and neg answers together (both must pass); here each answer is kept on its own.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personavec.errors import ConfigError
from personavec.judging.rubrics import (
    NAME_PATTERN,
    NEG,
    POS,
    Rubric,
    read_trait_file,
)
from personavec.workspace import Workspace


@dataclass(frozen=True)
class TraitConfig:
    """Which trait set to add: a file path or a built-in trait name; ``name`` overrides the file's trait name."""

    trait: str | Path
    name: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "trait", str(self.trait))
        if self.name is not None and not NAME_PATTERN.match(self.name):
            raise ConfigError(f"trait name {self.name!r} must hold only letters, digits, _ and -")


@dataclass(frozen=True)
class TraitResult:
    """What :func:`add_trait` created."""

    name: str
    persona_set: str
    question_set: str
    persona_run_id: int
    question_run_id: int
    n_pairs: int
    n_questions: int
    rubric: Rubric


def add_trait(
    ws: Workspace,
    config: TraitConfig,
    *,
    resume: int | None = None,
    progress: Callable[[TraitResult], None] | None = None,
) -> TraitResult:
    """Ingest a trait set as the persona set and question set ``trait-<name>`` (two ingest runs whose provenance
    holds the trait file, its hash and its rubric). Refuses a trait whose sets exist already.

    Example: ``add_trait(ws, TraitConfig("pirate"))``, then generate with
    ``GenerateConfig(persona_set="trait-pirate", question_set="trait-pirate", ...)``."""
    from personavec.errors import DuplicateError
    from personavec.files import file_sha256
    from personavec.store.sets import create_persona_set, create_question_set, set_names

    if resume is not None:
        raise ConfigError("adding a trait is two single-transaction ingests and cannot be resumed: add it again")
    trait = read_trait_file(config.trait, config.name)
    catalog = ws.catalog()
    persona_sets, question_sets = set_names(catalog)
    if trait.set_name in persona_sets or trait.set_name in question_sets:
        raise DuplicateError(
            f"trait {trait.name!r} exists already (persona/question set {trait.set_name!r}); "
            f"give it another name (--name)"
        )
    provenance = {
        "trait": trait.name,
        "path": trait.source,
        "sha256": file_sha256(Path(trait.source)),
        "description": trait.description,
        "rubric": {"name": trait.rubric.name, "template": trait.rubric.template, "scale": trait.rubric.scale},
    }
    persona_run = create_persona_set(
        catalog, trait.set_name, trait.persona_specs(), {**provenance, "name": trait.set_name}, trait.source
    )
    question_run = create_question_set(
        catalog, trait.set_name, list(trait.questions), {**provenance, "name": trait.set_name}, trait.source
    )
    result = TraitResult(
        trait.name,
        trait.set_name,
        trait.set_name,
        persona_run,
        question_run,
        len(trait.pairs),
        len(trait.questions),
        trait.rubric,
    )
    if progress is not None:
        progress(result)
    return result


# ---------------------------------------------------------------------------------------------- trait vectors


@dataclass(frozen=True)
class TraitVectorConfig:
    """The trait vector of an extraction run over a trait's answers (``trait-<name>`` personas).

    ``filter`` applies persona_vectors' thresholds with scores from the judge stage (the rubric ``rubric``, by
    default named like the trait, and ``coherence``); ``min_count`` answers must remain on each side. Example:
    ``TraitVectorConfig(extraction_run_id=5, trait="pirate")``.
    """

    extraction_run_id: int
    trait: str
    layers: tuple[int, ...] | None = None
    filter: bool = True
    threshold: float = 50.0
    coherence: float | None = 50.0
    min_count: int = 1
    judge_runs: tuple[int, ...] = ()
    allow_partial: bool = False
    rubric: str | None = None

    def __post_init__(self) -> None:
        if self.rubric is not None and not NAME_PATTERN.match(self.rubric):
            raise ConfigError(f"rubric name {self.rubric!r} must hold only letters, digits, _ and -")
        if not NAME_PATTERN.match(self.trait):
            raise ConfigError(f"trait name {self.trait!r} must hold only letters, digits, _ and -")
        if self.trait in (POS, NEG):
            raise ConfigError(f"a trait cannot be named {self.trait!r} (the name of a side)")
        if not 0 <= self.threshold <= 100:
            raise ConfigError(f"threshold must be in 0..100, got {self.threshold}")

    @property
    def where(self) -> tuple[str, ...]:
        """The judgement filters of :class:`personavec.vectors.VectorConfig`."""
        if not self.filter:
            return ()
        rubric = self.rubric or self.trait
        out = [f"{POS}: {rubric} >= {self.threshold:g}", f"{NEG}: {rubric} < {self.threshold:g}"]
        if self.coherence is not None:
            out.append(f"coherence >= {self.coherence:g}")
        return tuple(out)

    def vector_config(self) -> Any:
        from personavec.vectors import VectorConfig

        return VectorConfig(
            self.extraction_run_id,
            "persona_group",
            self.layers,
            self.allow_partial,
            where=self.where,
            min_count=self.min_count,
            judge_runs=self.judge_runs,
            contrasts=((self.trait, POS, NEG),),
        )


def compute_trait_vectors(
    ws: Workspace,
    config: TraitVectorConfig,
    *,
    resume: int | None = None,
    progress: Callable[[Any], None] | None = None,
) -> Any:
    """A vectors run with groups ``pos``, ``neg`` and ``<trait>`` = ``mean(pos) - mean(neg)`` per layer (after
    the filters); returns its :class:`personavec.vectors.VectorRunResult`. The vector points from neg to pos."""
    from personavec.store.extraction import get_extraction_run
    from personavec.store.responses import persona_set_names
    from personavec.vectors import compute_vectors

    if resume is None:  # answers made for another trait (`trait add X` names their set trait-X) are not this trait's
        catalog = ws.catalog()
        source = get_extraction_run(catalog, config.extraction_run_id).source_run_id
        made_for = [n.removeprefix("trait-") for n in persona_set_names(catalog, source) if n.startswith("trait-")]
        other = next((t for t in made_for if t != config.trait), None)
        if other is not None:
            raise ConfigError(
                f"extraction run {config.extraction_run_id} holds answers of persona set 'trait-{other}', made for "
                f"trait {other!r}, not {config.trait!r}: pass --trait {other}"
            )
    return compute_vectors(ws, config.vector_config(), resume=resume, progress=progress)


# ---------------------------------------------------------------------------------------------------- projection


@dataclass(frozen=True)
class Projection:
    """Each example of an extraction run projected onto one vector: ``values[i] = x_i . v / |v|``."""

    vector_run_id: int
    group: str
    layer: int
    extraction_run_id: int
    response_ids: tuple[int, ...]
    personas: tuple[str, ...]
    persona_groups: tuple[tuple[str, ...], ...]
    questions: tuple[str, ...]
    values: np.ndarray = field(repr=False)

    def by_group(self, group: str) -> np.ndarray:
        """Values of the examples whose persona is in ``group`` (e.g. ``pos``)."""
        return self.values[[group in g for g in self.persona_groups]]


def project_onto_vector(
    ws: Workspace,
    vector_run_id: int,
    group: str,
    extraction_run_id: int,
    layer: int | None = None,
) -> Projection:
    """Project the per-answer mean activations of ``extraction_run_id`` (rows marked done) onto the unit vector
    of ``group`` in vectors run ``vector_run_id`` at ``layer`` (default: the vector run's only/seed layer); the
    extraction must come from the same model and store that layer.

    Example (monitoring held-out answers): ``p = project_onto_vector(ws, 9, "pirate", 12)``,
    ``auroc(p.by_group("pos"), p.by_group("neg"))``."""
    from personavec import arrays
    from personavec.store.extraction import extraction_examples, get_extraction_run
    from personavec.vectors import load_vectors

    vset = load_vectors(vector_run_id, layer, workspace=ws)
    if group not in vset:
        raise ConfigError(f"vectors run {vector_run_id} has no group {group!r} (groups: {', '.join(vset.names)})")
    ext = get_extraction_run(ws.catalog(), extraction_run_id)
    if vset.layer not in ext.layers:
        raise ConfigError(
            f"extract run {extraction_run_id} has no layer {vset.layer} (it stored {', '.join(map(str, ext.layers))})"
        )
    if vset.model and ext.model != vset.model:
        raise ConfigError(
            f"vectors run {vector_run_id} is from model {vset.model!r}, extract run {extraction_run_id} from "
            f"{ext.model!r}: project answers of the same model"
        )
    table = extraction_examples(ws.catalog(), extraction_run_id, done_only=True)
    if table.num_rows == 0:
        raise ConfigError(f"extract run {extraction_run_id} has no done examples to project")
    direction = vset[group].numpy().astype(np.float64)
    norm = np.linalg.norm(direction)
    if norm == 0:
        raise ConfigError(f"vector {group!r} of run {vector_run_id} is zero: nothing to project onto")
    array = arrays.open_activation_array(ws.zarr_location, ext.zarr_group, "r")
    rows = np.asarray(table["row"].to_numpy(zero_copy_only=False), dtype=np.int64)
    order = np.argsort(rows)
    x = np.empty((len(rows), ext.d_model), dtype=np.float32)
    x[order] = arrays.read_rows(array, rows[order], ext.layers.index(vset.layer))
    return Projection(
        vector_run_id=vector_run_id,
        group=group,
        layer=vset.layer,
        extraction_run_id=extraction_run_id,
        response_ids=tuple(table["response_id"].to_pylist()),
        personas=tuple(table["persona"].to_pylist()),
        persona_groups=tuple(tuple(g or ()) for g in table["persona_groups"].to_pylist()),
        questions=tuple(table["question"].to_pylist()),
        values=x.astype(np.float64) @ (direction / norm),
    )


def auroc(positive: Sequence[float] | np.ndarray, negative: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve for telling ``positive`` from ``negative`` by value (higher = positive): the
    probability that a random positive scores above a random negative, ties counting half (Mann-Whitney U)."""
    pos, neg = np.asarray(positive, dtype=np.float64), np.asarray(negative, dtype=np.float64)
    if not len(pos) or not len(neg):
        raise ConfigError("auroc needs at least one value on each side")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


__all__ = [
    "Projection",
    "TraitConfig",
    "TraitResult",
    "TraitVectorConfig",
    "add_trait",
    "auroc",
    "compute_trait_vectors",
    "project_onto_vector",
]
