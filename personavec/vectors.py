"""Vector stage: group means of an extraction run's per-example activations, stored in the catalog.

The seed's persona vector is the mean, over a persona's responses, of each response's mean activation over its
answer tokens. Extraction stores exactly those per-response means as Zarr rows, so a persona vector here is the
plain mean of that persona's rows. Grouping by another catalog column (question, persona group, sample) is the
same mean over a different partition; with ``persona_group`` an example counts once for each of its groups.

Judged runs can be filtered before averaging (``where``: ``"role_adherence = 3"``, ``"coherence >= 50"``,
``"pos: pirate >= 50"``; scores from the judge stage, :mod:`personavec.judging.judge`), with a minimum count per group
that fails loudly, and a run can add *contrast* groups, ``mean(pos) - mean(neg)`` of two of its groups per layer
(the contrastive trait vectors of :mod:`personavec.judging.traits`).

Vectors land in ``vectors`` as ``FLOAT[]`` (so ``list_cosine_similarity`` works in SQL) with a ``vectors`` run row
whose config carries the provenance (extraction run, responses run, model, layers, counts, span rule...).
Read them back with :func:`load_vectors`, export with :func:`export_vectors`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from personavec import arrays
from personavec.config import default_layer
from personavec.errors import ConfigError, InputFileError, StorageError
from personavec.store.extraction import extraction_examples, get_extraction_run
from personavec.store.vectors import create_vector_run, persona_groups_for_responses, read_vectors
from personavec.tuning import DEFAULT
from personavec.workspace import Workspace

if TYPE_CHECKING:
    from personavec.judging.scores import JudgementFilter

#: Catalog columns a vector run can group examples by.
GROUP_BY = ("persona", "question", "persona_group", "sample", "all")
#: Export formats, by file suffix.
EXPORT_FORMATS = {".pt": "pt", ".safetensors": "safetensors", ".npz": "npz"}


@dataclass(frozen=True)
class VectorConfig:
    """What to average: which extraction run, grouped how, which of its layers.

    Example: ``VectorConfig(extraction_run_id=3, group_by="persona")`` gives the seed's persona vectors at every
    layer the extraction stored.

    Judged runs (see :mod:`personavec.judging.judge`): ``where`` keeps only examples whose judgement scores pass every
    filter (``"role_adherence = 3"``; ``"GROUP: RUBRIC OP NUMBER"`` filters only that group's members); examples
    without a score for a filtered rubric are dropped. Scores come from the latest judge run over the extraction's
    responses run that judged the rubric, or from the latest of ``judge_runs``. Every group must keep at least
    ``min_count`` examples, else :class:`ConfigError` names the groups short of it. ``contrasts`` adds groups
    ``(name, pos, neg)``: ``mean(pos) - mean(neg)`` per layer. Example (assistant-axis' role filter):
    ``VectorConfig(3, where=("role_adherence = 3",), min_count=50)``.
    """

    extraction_run_id: int
    group_by: str = "persona"
    layers: tuple[int, ...] | None = None
    allow_partial: bool = False
    where: tuple[str, ...] = ()
    min_count: int = 1
    judge_runs: tuple[int, ...] = ()
    contrasts: tuple[tuple[str, str, str], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "where", tuple(self.where))
        object.__setattr__(self, "judge_runs", tuple(int(r) for r in self.judge_runs))
        object.__setattr__(self, "contrasts", tuple(tuple(c) for c in self.contrasts))
        _ = self.filters  # every filter parses
        if self.min_count < 1:
            raise ConfigError(f"min_count (--min-count) must be >= 1, got {self.min_count}")
        for c in self.contrasts:
            if len(c) != 3 or not all(isinstance(x, str) and x for x in c) or c[1] == c[2]:
                raise ConfigError(f"a contrast is (name, pos group, neg group) with two different groups, got {c!r}")
        names = [c[0] for c in self.contrasts]
        if len(set(names)) != len(names):
            raise ConfigError(f"two contrasts share a name: {names}")
        if self.group_by not in GROUP_BY:
            raise ConfigError(f"group_by (--group-by) must be one of {', '.join(GROUP_BY)}, got {self.group_by!r}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers:
                raise ConfigError("layers must name at least one layer (or be None for all of the run's layers)")
            if len(set(self.layers)) != len(self.layers):
                raise ConfigError(f"layers has duplicates: {self.layers}")

    @property
    def filters(self) -> tuple[JudgementFilter, ...]:
        """``where`` parsed."""
        if not self.where:
            return ()  # without importing the judge stage (and the openai client it loads: ~0.5-0.8 s)
        from personavec.judging.scores import parse_filter

        return tuple(parse_filter(w) for w in self.where)


@dataclass(frozen=True)
class VectorRunResult:
    """What :func:`compute_vectors` did."""

    run_id: int
    extraction_run_id: int
    group_by: str
    layers: tuple[int, ...]
    groups: tuple[str, ...]
    n_examples: int
    n_vectors: int
    wall_s: float


@dataclass(frozen=True, eq=False)
class VectorSet(Mapping[str, torch.Tensor]):
    """The vectors of one layer of a vector run: a read-only ``{name: Tensor[d_model]}`` mapping with provenance.

    ``vset["default"]`` is a vector, ``dict(vset)`` the seed's dict, ``vset.matrix`` the ``[n, d_model]`` stack
    in catalog order, ``vset.provenance`` the run's provenance (model, layer, counts, config, package version).
    """

    run_id: int
    layer: int
    group_by: str
    names: tuple[str, ...]
    matrix: torch.Tensor
    n_examples: tuple[int, ...]
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def vectors(self) -> dict[str, torch.Tensor]:
        """A plain ``{name: Tensor}`` dict (views into :attr:`matrix`)."""
        return dict(zip(self.names, self.matrix, strict=True))

    @property
    def model(self) -> str:
        return str(self.provenance.get("model", ""))

    @property
    def d_model(self) -> int:
        return int(self.matrix.shape[1])

    @property
    def contrasts(self) -> tuple[str, ...]:
        """Names of the run's contrast vectors (``vectors --contrast NAME=POS,NEG``: differences, not groups)."""
        return tuple(c["name"] for c in self.provenance.get("contrasts") or ())

    def without_contrasts(self) -> VectorSet:
        """The set of its groups only: what persona-space analyses (similarity, PCA, the assistant axis, reports,
        comparisons, projections) are about; a contrast among them would count as one more persona."""
        if not self.contrasts:
            return self
        keep = [i for i, n in enumerate(self.names) if n not in self.contrasts]
        return replace(
            self,
            names=tuple(self.names[i] for i in keep),
            matrix=self.matrix[keep],
            n_examples=tuple(self.n_examples[i] for i in keep),
        )

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.matrix[self.names.index(name)]
        except ValueError:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)

    def __repr__(self) -> str:
        return (
            f"VectorSet(run_id={self.run_id}, layer={self.layer}, group_by={self.group_by!r}, "
            f"n={len(self.names)}, d_model={self.d_model}, model={self.model!r})"
        )


# ------------------------------------------------------------------------------------------------------- helpers


def _group_keys(table: pa.Table, group_by: str) -> list[list[str]]:
    """For each example, the groups it counts in (one, except for ``persona_group``)."""
    if group_by == "persona":
        return [[p] for p in table["persona"].to_pylist()]
    if group_by == "question":
        return [[q] for q in table["question"].to_pylist()]
    if group_by == "sample":
        return [[str(s)] for s in table["sample_index"].to_pylist()]
    if group_by == "persona_group":
        return [list(g or []) for g in table["persona_groups"].to_pylist()]
    return [["all"] for _ in range(table.num_rows)]


def _group_order(table: pa.Table, group_by: str, persona_order: Sequence[str]) -> Callable[[str], Any]:
    """Sort key putting groups in a reader's order: persona-set order, question order, sample number."""
    if group_by == "persona":
        pos = {p: i for i, p in enumerate(persona_order)}
        return lambda k: (pos.get(k, len(pos)), k)
    if group_by == "question":
        qpos = dict(zip(table["question"].to_pylist(), table["question_position"].to_pylist(), strict=True))
        return lambda k: (qpos[k], k)
    if group_by == "sample":
        return int
    if group_by == "persona_group":
        first: dict[str, int] = {}
        pos = {p: i for i, p in enumerate(persona_order)}
        for p, groups in zip(table["persona"].to_pylist(), table["persona_groups"].to_pylist(), strict=True):
            for g in groups or []:
                first[g] = min(first.get(g, 1 << 30), pos.get(p, len(pos)))
        return lambda k: (first.get(k, 1 << 30), k)
    return lambda k: k


def group_means(
    array: Any, rows: np.ndarray, membership: np.ndarray, layer_index: int, block_rows: int | None = None
) -> np.ndarray:
    """Means ``[n_groups, d_model]`` of Zarr rows ``rows`` of one layer, weighted by ``membership``
    (``[n_groups, len(rows)]``, 1 where the example counts in the group). Accumulates in float64, block by block."""
    d_model = int(array.shape[2])
    if block_rows is None:
        chunk = int(array.chunks[0])
        block_rows = max(chunk, (DEFAULT.read_block_bytes // (4 * d_model)) // chunk * chunk)
    sums = np.zeros((membership.shape[0], d_model), dtype=np.float64)
    for start in range(0, len(rows), block_rows):
        block = arrays.read_rows(array, rows[start : start + block_rows], layer_index).astype(np.float64)
        sums += membership[:, start : start + block_rows] @ block
    counts = membership.sum(axis=1, keepdims=True)
    return sums / counts


# ------------------------------------------------------------------------------------------------------- compute


def compute_vectors(
    ws: Workspace,
    config: VectorConfig,
    *,
    resume: int | None = None,
    progress: Callable[[VectorRunResult], None] | None = None,
) -> VectorRunResult:
    """Average an extraction run's per-example activations per group and layer into a new ``vectors`` run.

    Reads only rows the catalog marks done; a run with rows not done is refused unless
    ``config.allow_partial``. Everything is computed before anything is written, and the catalog rows go in
    one transaction, so a failure leaves no vectors run behind.

    Args:
        ws: the workspace.
        config: which extraction run, grouping and layers.
        resume: must be None: a vectors run is one transaction, there is nothing to resume.
        progress: called once with the result.

    Returns:
        :class:`VectorRunResult` with the new run id.

    Example:
        >>> res = compute_vectors(Workspace.resolve("ws"), VectorConfig(extraction_run_id=3))
        >>> load_vectors(res.run_id, workspace="ws")["default"].shape
    """
    if resume is not None:
        raise ConfigError("a vectors run is one transaction and cannot be resumed: compute it again")
    t0 = time.perf_counter()
    catalog, zarr_path = ws.catalog(), ws.zarr_location
    ext = get_extraction_run(catalog, config.extraction_run_id)
    layers = config.layers if config.layers is not None else ext.layers
    missing = [layer for layer in layers if layer not in ext.layers]
    if missing:
        raise ConfigError(
            f"extract run {ext.run_id} has no layer(s) {', '.join(map(str, missing))}; "
            f"it stored layers {', '.join(map(str, ext.layers))}"
        )
    table = extraction_examples(catalog, ext.run_id)
    if table.num_rows == 0:
        raise ConfigError(f"extract run {ext.run_id} has no examples")
    done = np.asarray(table["done"].to_numpy(zero_copy_only=False), dtype=bool)
    n_undone = int((~done).sum())
    if n_undone and not config.allow_partial:
        raise ConfigError(
            f"extract run {ext.run_id} has {n_undone} of {table.num_rows} examples not done: resume the "
            f"extraction to finish it, or pass allow_partial (--allow-partial) to average the done rows only"
        )
    # Examples with no span (empty answers) are done but have no activations: left out of every mean, counted.
    spanned = np.asarray(table["n_response_tokens"].to_numpy(zero_copy_only=False)) > 0
    n_no_span = int((done & ~spanned).sum())
    table = table.filter(pa.array(done & spanned))
    if table.num_rows == 0:
        which = f" ({n_no_span} done examples have no span: empty answers)" if n_no_span else ""
        raise ConfigError(f"extract run {ext.run_id} has no done examples with activations yet{which}")

    persona_groups = persona_groups_for_responses(catalog, ext.source_run_id)
    keys = _group_keys(table, config.group_by)
    groups = sorted({k for ks in keys for k in ks}, key=_group_order(table, config.group_by, list(persona_groups)))
    if not groups:
        raise ConfigError(f"extract run {ext.run_id}: no example has a {config.group_by} to group by")
    gidx = {g: i for i, g in enumerate(groups)}
    membership = np.zeros((len(groups), table.num_rows), dtype=np.float64)
    for j, ks in enumerate(keys):
        for k in ks:
            membership[gidx[k], j] = 1.0
    rows = np.asarray(table["row"].to_numpy(zero_copy_only=False), dtype=np.int64)
    for name, pos, neg in config.contrasts:
        unknown = [g for g in (pos, neg) if g not in gidx]
        if unknown:
            raise ConfigError(
                f"contrast {name!r}: extract run {ext.run_id} grouped by {config.group_by} has no group "
                f"{', '.join(map(repr, unknown))} (groups: {', '.join(groups)})"
            )
        if name in gidx:
            raise ConfigError(f"contrast {name!r} has the name of a {config.group_by} group: name it otherwise")
    judged: dict[str, Any] = {}
    if config.where:
        judged = _filter_by_judgements(catalog, ext.source_run_id, table, gidx, membership, config)
    counts = membership.sum(axis=1).astype(np.int64)
    short = [f"{g} ({n})" for g, n in zip(groups, counts, strict=True) if n < config.min_count]
    if short:
        raise ConfigError(
            f"extract run {ext.run_id}: {len(short)} {config.group_by} group(s) have fewer than {config.min_count} "
            f"example(s){' after the filters ' + '; '.join(config.where) if config.where else ''}: "
            f"{', '.join(short)}. Judge or generate more answers, relax the filters, or lower the minimum count"
        )
    used = membership.any(axis=0)
    n_before_filters = int(table.num_rows)
    membership, rows = membership[:, used], rows[used]
    table = table.filter(pa.array(used))

    array = arrays.open_activation_array(zarr_path, ext.zarr_group, "r")
    if tuple(array.shape[1:]) != (len(ext.layers), ext.d_model):
        raise StorageError(
            f"Zarr group {ext.zarr_group} has shape {tuple(array.shape)}, the catalog says "
            f"[*, {len(ext.layers)}, {ext.d_model}]: the activation store and the catalog disagree"
        )
    parts = []
    pairs = [(gidx[pos], gidx[neg]) for _, pos, neg in config.contrasts]
    out_groups = list(groups) + [c[0] for c in config.contrasts]
    out_counts = np.concatenate([counts, [counts[p] + counts[n] for p, n in pairs]]).astype(np.int64)
    for layer in layers:
        means = group_means(array, rows, membership, ext.layers.index(layer))
        if pairs:  # contrasts from the float64 group means, before rounding to float32
            means = np.concatenate([means, np.stack([means[p] - means[n] for p, n in pairs])])
        means = means.astype(np.float32)
        if not np.isfinite(means).all():
            raise StorageError(
                f"extract run {ext.run_id}, layer {layer}: rows marked done hold NaN/inf in Zarr "
                f"({zarr_path}/{ext.zarr_group}); the store is inconsistent with the catalog"
            )
        norms = np.linalg.norm(means.astype(np.float64), axis=1)
        parts.append(
            pa.table(
                {
                    "layer": pa.array([layer] * len(out_groups), pa.int32()),
                    "group_key": pa.array(out_groups, pa.string()),
                    "n_examples": pa.array(out_counts, pa.int32()),
                    "norm": pa.array(norms, pa.float64()),
                    "vector": pa.FixedSizeListArray.from_arrays(pa.array(means.ravel()), ext.d_model).cast(
                        pa.list_(pa.float32())
                    ),
                }
            )
        )
    vectors_table = pa.concat_tables(parts)

    provenance = {
        "extraction_run_id": ext.run_id,
        "response_run_id": ext.source_run_id,
        "group_by": config.group_by,
        "layers": list(layers),
        "allow_partial": config.allow_partial,
        "model": ext.model,
        "model_revision": ext.model_revision,
        "architecture": ext.architecture,
        "model_type": ext.model_type,
        "n_model_layers": ext.n_model_layers,
        "d_model": ext.d_model,
        "dtype": ext.dtype,
        "span_rule": ext.span_rule,
        "prompt_format": ext.prompt_format,
        "n_examples": int(table.num_rows),
        "n_examples_not_done": n_undone,
        "n_examples_no_span": n_no_span,
        "n_groups": len(out_groups),
    }
    if config.where or config.contrasts or config.min_count > 1:
        provenance |= {
            "where": list(config.where),
            "min_count": config.min_count,
            "judgements": judged,
            "n_examples_before_filters": n_before_filters,
            "group_counts": dict(zip(out_groups, map(int, out_counts), strict=True)),
            "contrasts": [{"name": n, "pos": p, "neg": q} for n, p, q in config.contrasts],
        }
    if config.group_by == "persona":
        provenance["persona_groups"] = {p: list(persona_groups.get(p, ())) for p in groups}
    run_id = create_vector_run(
        catalog,
        provenance,
        vectors_table,
        extraction_run_id=ext.run_id,
        group_by=config.group_by,
        model=ext.model,
        d_model=ext.d_model,
    )
    result = VectorRunResult(
        run_id=run_id,
        extraction_run_id=ext.run_id,
        group_by=config.group_by,
        layers=tuple(layers),
        groups=tuple(out_groups),
        n_examples=int(table.num_rows),
        n_vectors=vectors_table.num_rows,
        wall_s=time.perf_counter() - t0,
    )
    if progress is not None:
        progress(result)
    return result


def _filter_by_judgements(
    catalog: Any,
    response_run_id: int,
    table: pa.Table,
    gidx: Mapping[str, int],
    membership: np.ndarray,
    config: VectorConfig,
) -> dict[str, Any]:
    """Zero the memberships that fail a filter (in place); returns which judge run scored each rubric."""
    from personavec.store.judgements import judged_scores

    filters = config.filters
    unknown = sorted({f.group for f in filters if f.group is not None and f.group not in gidx})
    if unknown:
        raise ConfigError(
            f"filter group(s) {', '.join(map(repr, unknown))} are not {config.group_by} groups of this run "
            f"(groups: {', '.join(gidx)})"
        )
    on_verdict = [f.rubric for f in filters if f.on_verdict]
    scored = judged_scores(
        catalog, response_run_id, [f.rubric for f in filters], config.judge_runs, alternatives=on_verdict
    )
    response_ids = [int(r) for r in table["response_id"].to_pylist()]
    verdicts = {rubric: _verdicts(scored[rubric], response_ids) for rubric in dict.fromkeys(on_verdict)}
    for f in filters:
        if f.on_verdict:
            values = verdicts[f.rubric]
        else:
            by_response = scored[f.rubric].scores
            values = np.array([by_response.get(r, np.nan) for r in response_ids], dtype=np.float64)
        keep = f.keep(values)
        if f.group is None:
            membership[:, ~keep] = 0.0
        else:
            membership[gidx[f.group], ~keep] = 0.0
    return {
        s.rubric: {"judge_run_id": s.judge_run_id, "model": s.model, "n_scored": len(s.scores)} for s in scored.values()
    }


def _verdicts(scored: Any, response_ids: Sequence[int]) -> np.ndarray:
    """Each response's integer verdict under one rubric (NaN: no score), see
    :func:`personavec.judging.scores.integer_verdict`."""
    import json

    from personavec.judging.scores import integer_verdict

    lo, hi = scored.scale if scored.scale is not None else (-(2**63), 2**63 - 1)
    out = np.full(len(response_ids), np.nan)
    for i, r in enumerate(response_ids):
        score = scored.scores.get(r)
        if score is None:
            continue
        top = scored.top_logprobs.get(r)
        probs = json.loads(top) if top is not None else None
        method = "logprobs" if isinstance(probs, dict) else None
        out[i] = integer_verdict(score, method, probs, lo, hi)
    return out


# ---------------------------------------------------------------------------------------------------------- load


def pick_layer(layers: Sequence[int], n_model_layers: int | None) -> int:
    """The layer :func:`load_vectors` picks when none is named: the only one, else the seed's default
    (:func:`personavec.config.default_layer`) when the run has it."""
    if len(layers) == 1:
        return int(layers[0])
    if n_model_layers is not None:
        seed_layer = default_layer(n_model_layers)
        if seed_layer in layers:
            return seed_layer
    raise ConfigError(f"the run has layers {', '.join(map(str, layers))}: name one (layer=..., --layer)")


def load_vectors(
    run_id: int, layer: int | None = None, *, workspace: Workspace | str | os.PathLike[str] | None = None
) -> VectorSet:
    """Load one layer of a vector run by id as a :class:`VectorSet` (a ``{name: Tensor}`` mapping + provenance).

    Args:
        run_id: a ``vectors`` run.
        layer: which layer; None = the run's only layer, else the seed's default layer if the run has it.
        workspace: the workspace or its path (None = ``$PERSONAVEC_WORKSPACE`` or ``./personavec-workspace``); its
            catalog is opened read-only unless this process already holds it.

    Example:
        >>> vs = personavec.load_vectors(7)
        >>> vs["default"].shape, vs.layer, vs.provenance["model"]
    """
    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    info, stored = read_vectors(
        ws.catalog(read_only=True),
        run_id,
        layer if layer is not None else lambda i: pick_layer(i.layers, i.config.get("n_model_layers")),
    )
    chosen = stored.layer
    provenance = {
        **info.config,
        "run_id": run_id,
        "layer": chosen,
        "status": info.status,
        "package_version": info.package_version,
        "created_at": info.created_at,
        "norms": dict(zip(stored.group_keys, stored.norms, strict=True)),
    }
    return VectorSet(
        run_id=run_id,
        layer=chosen,
        group_by=info.group_by,
        names=stored.group_keys,
        matrix=torch.from_numpy(stored.matrix),
        n_examples=stored.n_examples,
        provenance=provenance,
    )


# -------------------------------------------------------------------------------------------------------- export


def export_vectors(
    vset: VectorSet, path: str | os.PathLike[str], fmt: str | None = None, *, overwrite: bool = False
) -> Path:
    """Write a :class:`VectorSet` to ``.pt`` (the seed's ``{name: Tensor}`` dict), ``.safetensors`` (one tensor per
    name, provenance as JSON metadata) or ``.npz`` (``names``, ``vectors`` [n, d], ``provenance`` JSON).

    ``fmt`` (pt, safetensors, npz) defaults to the file suffix. Refuses to overwrite unless ``overwrite``.
    """
    import json

    from personavec.files import atomic_write
    from personavec.seed import save_persona_vectors

    path = Path(path)
    by_suffix = EXPORT_FORMATS.get(path.suffix.lower())
    if fmt is not None and by_suffix is not None and fmt != by_suffix:  # a .pt holding npz would not load as one
        raise ConfigError(
            f"{path} ends in {path.suffix} but --format is {fmt}: name the file *.{fmt}, or drop --format"
        )
    fmt = fmt or by_suffix
    if fmt not in EXPORT_FORMATS.values():
        hint = ""
        if (fmt or path.suffix.lower().lstrip(".")) == "gguf":
            hint = (
                f": a GGUF control vector is one group across layers, "
                f"`personavec export-direction {vset.run_id} GROUP {path}`"
            )
        raise ConfigError(
            f"{path}: export format must be one of {', '.join(EXPORT_FORMATS)} (by suffix or --format){hint}"
        )
    if path.is_dir():
        raise InputFileError(f"{path} is a directory: give a file name such as {path / 'vectors.safetensors'}")
    if path.exists() and not overwrite:
        raise InputFileError(f"{path} exists: pass overwrite (--overwrite) to replace it")
    meta = json.dumps(vset.provenance, sort_keys=True, default=str)
    if fmt == "pt":
        save_persona_vectors({k: v.clone() for k, v in vset.vectors.items()}, path)
    elif fmt == "safetensors":
        from safetensors.torch import save_file

        tensors = {k: v.contiguous().clone() for k, v in vset.vectors.items()}
        atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata={"personavec": meta}))
    else:

        def write_npz(tmp: Path) -> None:
            with open(tmp, "wb") as fh:
                np.savez(fh, names=np.array(vset.names), vectors=vset.matrix.numpy(), provenance=np.array(meta))

        atomic_write(path, write_npz)
    return path
