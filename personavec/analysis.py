"""Analyses of persona vectors: centred cosine similarity, PCA, the assistant axis, cross-model comparison,
projection of transcripts onto an axis.

Inputs are any ``{name: vector}`` mapping (a :class:`personavec.vectors.VectorSet`, the seed's dict of tensors, a
dict of numpy arrays). Everything is computed in float64 numpy: with tens of personas the matrices are tiny and
an SVD of ``[n, d_model]`` is exact and fast, so sklearn earns no place here.

Sign conventions, so that results are reproducible: the assistant axis points from the other personas towards
the default ones; each principal component is flipped so that the default personas' mean coordinate on it is
>= 0 (when defaults are given), else so that its largest-magnitude coordinate is positive.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.builtin import DEFAULT_PERSONAS
from personavec.errors import ConfigError

if TYPE_CHECKING:
    from personavec.vectors import VectorSet
    from personavec.workspace import Workspace

VectorsLike = Mapping[str, Any]


def _as_matrix(vectors: VectorsLike, names: Sequence[str] | None = None) -> tuple[list[str], np.ndarray]:
    names = list(vectors) if names is None else list(names)
    missing = [n for n in names if n not in vectors]
    if missing:
        raise ConfigError(f"no vector for: {', '.join(missing)}")
    if not names:
        raise ConfigError("no vectors given")
    rows = []
    for n in names:
        v = vectors[n]
        v = v.detach().cpu().double().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float64)
        rows.append(v.reshape(-1))
    return names, np.stack(rows)


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ConfigError("cannot normalise a zero vector (the two groups have identical means)")
    return v / norm


def center(matrix: np.ndarray) -> np.ndarray:
    """Rows minus their mean (the mean-centring every persona-space analysis starts from)."""
    matrix = np.asarray(matrix, dtype=np.float64)
    return matrix - matrix.mean(axis=0, keepdims=True)


def cosine_matrix(a: np.ndarray, b: np.ndarray | None = None) -> np.ndarray:
    """Cosine similarity of every row of ``a`` with every row of ``b`` (default ``a``); zero rows give 0."""
    b = a if b is None else b
    na = np.linalg.norm(a, axis=1, keepdims=True)
    nb = np.linalg.norm(b, axis=1, keepdims=True)
    na[na == 0] = 1.0
    nb[nb == 0] = 1.0
    return (a / na) @ (b / nb).T


@dataclass(frozen=True)
class Similarity:
    """A labelled square similarity matrix."""

    names: tuple[str, ...]
    matrix: np.ndarray
    centered: bool


def similarity_matrix(vectors: VectorsLike, *, centered: bool = True, names: Sequence[str] | None = None) -> Similarity:
    """Cosine similarity between persona vectors, after subtracting their mean (``centered``, the default).

    Raw persona vectors share a large common component (cosines all near 1); centring shows how personas differ.
    """
    names, mat = _as_matrix(vectors, names)
    return Similarity(tuple(names), cosine_matrix(center(mat) if centered else mat), centered)


@dataclass(frozen=True)
class PCAResult:
    """PCA of centred vectors: ``coordinates`` [n, k], ``components`` [k, d] (unit rows), variance ratios (sum 1)."""

    names: tuple[str, ...]
    mean: np.ndarray
    components: np.ndarray
    explained_variance: np.ndarray
    explained_variance_ratio: np.ndarray
    coordinates: np.ndarray

    @property
    def cumulative_variance(self) -> np.ndarray:
        return np.cumsum(self.explained_variance_ratio)

    def transform(self, matrix: np.ndarray) -> np.ndarray:
        """Coordinates of new vectors ``[m, d]`` in this PCA's basis."""
        return (np.asarray(matrix, dtype=np.float64) - self.mean) @ self.components.T


def _orient(coords: np.ndarray, comps: np.ndarray, names: Sequence[str], defaults: Sequence[str] | None) -> None:
    idx = [i for i, n in enumerate(names) if defaults and n in defaults]
    for k in range(comps.shape[0]):
        col = coords[:, k]
        ref = col[idx].mean() if idx else col[np.argmax(np.abs(col))]
        if ref < 0:
            coords[:, k] *= -1
            comps[k] *= -1


def pca(
    vectors: VectorsLike,
    n_components: int | None = None,
    *,
    defaults: Sequence[str] | None = DEFAULT_PERSONAS,
    names: Sequence[str] | None = None,
) -> PCAResult:
    """PCA of the mean-centred vectors by SVD (at most ``n - 1`` informative components for ``n`` vectors).

    Args:
        vectors: ``{name: vector}``.
        n_components: how many to keep (default all non-degenerate, ``min(n - 1, d)``).
        defaults: names whose mean coordinate is made >= 0 on every component (sign convention).
    """
    names, mat = _as_matrix(vectors, names)
    if len(names) < 2:
        raise ConfigError("PCA needs at least 2 vectors")
    mean = mat.mean(axis=0)
    x = mat - mean
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    k_max = min(len(names) - 1, mat.shape[1])
    k = k_max if n_components is None else min(int(n_components), k_max)
    var = s**2 / (len(names) - 1)
    total = var.sum()
    ratio = var / total if total > 0 else np.zeros_like(var)
    coords = (u * s)[:, :k].copy()
    comps = vt[:k].copy()
    _orient(coords, comps, names, defaults)
    return PCAResult(tuple(names), mean, comps, var[:k], ratio[:k], coords)


def resolve_defaults(names: Sequence[str], defaults: Sequence[str] | None = None) -> tuple[str, ...]:
    """The default personas present among ``names`` (``defaults`` else :data:`DEFAULT_PERSONAS`)."""
    wanted = DEFAULT_PERSONAS if defaults is None else tuple(defaults)
    present = tuple(n for n in names if n in wanted)
    if not present:
        raise ConfigError(
            f"none of the default personas ({', '.join(wanted)}) is among the vectors: name the assistant-end "
            f"personas explicitly (defaults=..., --default NAME)"
        )
    if len(present) == len(names):
        raise ConfigError("every persona is a default persona: the assistant axis needs at least one other persona")
    return present


def assistant_axis(vectors: VectorsLike, defaults: Sequence[str] | None = None) -> np.ndarray:
    """Unit vector ``(mean(defaults) - mean(rest)) / norm``: points from the other personas to the assistant ones.

    Args:
        vectors: ``{name: vector}``.
        defaults: the assistant-end personas (default :data:`personavec.builtin.DEFAULT_PERSONAS`, i.e. the
            ``default`` persona group); those absent from ``vectors`` are ignored.
    """
    names, mat = _as_matrix(vectors)
    chosen = set(resolve_defaults(names, defaults))
    is_default = np.array([n in chosen for n in names])
    return _unit(mat[is_default].mean(axis=0) - mat[~is_default].mean(axis=0))


def project(vectors: VectorsLike, axis: np.ndarray, *, centered: bool = True) -> dict[str, float]:
    """Scalar projection of each vector (minus the mean of all of them when ``centered``) onto ``axis``."""
    names, mat = _as_matrix(vectors)
    x = center(mat) if centered else mat
    values = x @ _unit(np.asarray(axis, dtype=np.float64))
    return dict(zip(names, values.tolist(), strict=True))


@dataclass(frozen=True)
class AxisStats:
    """How well the assistant axis lines up with PC1."""

    abs_cos_pc1: float  # |cos(axis, PC1 direction)|
    r2_projection_pc1: float  # R^2 (squared Pearson r) between axis projections and PC1 coordinates
    pc1_variance_ratio: float  # PC1's share of the variance of the centred vectors
    axis_variance_ratio: float  # share of the total variance along the axis
    projections: dict[str, float] = field(default_factory=dict)


def axis_vs_pc1(vectors: VectorsLike, axis: np.ndarray, pca_result: PCAResult | None = None) -> AxisStats:
    """Axis-vs-PC1 statistics: ``|cos|``, R^2 of projections, PC1's variance share, the axis's variance share."""
    names, mat = _as_matrix(vectors)
    p = pca_result or pca(vectors)
    axis = _unit(np.asarray(axis, dtype=np.float64))
    x = center(mat)
    proj = x @ axis
    pc1 = p.coordinates[:, 0]
    r = np.corrcoef(proj, pc1)[0, 1] if proj.std() > 0 and pc1.std() > 0 else 0.0
    total = float((x**2).sum())
    return AxisStats(
        abs_cos_pc1=float(abs(p.components[0] @ axis)),
        r2_projection_pc1=float(r**2),
        pc1_variance_ratio=float(p.explained_variance_ratio[0]),
        axis_variance_ratio=float((proj**2).sum() / total) if total > 0 else 0.0,
        projections=dict(zip(names, proj.tolist(), strict=True)),
    )


# ------------------------------------------------------------------------------------------------ across models


@dataclass(frozen=True)
class ModelComparison:
    """Several models' vectors on their shared personas, each model centred on those personas' mean.

    ``structure_corr[i, j]``: Pearson correlation of the off-diagonal centred similarities of models i and j (works
    whatever the d_models). ``cross``: ``{(i, j): [n, n]}`` cosine of model i persona a with model j persona b,
    only for models of equal d_model. ``coordinates``: ``{model: [n, 2]}``, from a joint PCA of all models' centred
    vectors stacked (``method="joint-pca"``, equal d_model) or per-model PCA rotated onto the first model's by
    orthogonal Procrustes (``method="procrustes"``, d_model differs).
    """

    models: tuple[str, ...]
    personas: tuple[str, ...]
    d_models: tuple[int, ...]
    within: dict[str, np.ndarray]
    structure_corr: np.ndarray
    cross: dict[tuple[str, str], np.ndarray]
    coordinates: dict[str, np.ndarray]
    method: str
    explained_variance_ratio: np.ndarray
    axis_cos: dict[tuple[str, str], float]

    def pairs(self) -> list[dict[str, Any]]:
        """One dict per pair of models: ``a``, ``b``, ``structure_corr``, ``mean_same_persona_cos`` (None when
        d_model differs) and ``axis_cos`` (None without an axis), as numbers."""
        out = []
        for i, a in enumerate(self.models):
            for j in range(i + 1, len(self.models)):
                b = self.models[j]
                diag = self.cross.get((a, b))
                out.append(
                    {
                        "a": a,
                        "b": b,
                        "structure_corr": float(self.structure_corr[i, j]),
                        "mean_same_persona_cos": float(diag.diagonal().mean()) if diag is not None else None,
                        "axis_cos": self.axis_cos.get((a, b)),
                    }
                )
        return out


def _procrustes(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``source`` rotated/reflected (orthogonal R) to best match ``target`` in least squares."""
    u, _, vt = np.linalg.svd(source.T @ target)
    return source @ (u @ vt)


def compare_models(
    sets: Mapping[str, VectorsLike],
    personas: Sequence[str] | None = None,
    *,
    defaults: Sequence[str] | None = None,
) -> ModelComparison:
    """Compare persona vectors of several models on their shared personas.

    Each model is centred on the mean of the shared personas (the same persona set for all, so centred vectors
    are comparable), then: within-model centred cosine matrices, their correlation across models, cross-model
    cosine matrices and a joint PCA when d_model agrees (else per-model PCA aligned by Procrustes), and the cosine
    between the models' assistant axes (equal d_model only).
    """
    if len(sets) < 2:
        raise ConfigError("comparing models needs at least two vector sets")
    labels = list(sets)
    shared = [p for p in (personas or list(sets[labels[0]])) if all(p in sets[m] for m in labels)]
    if len(shared) < 3:
        raise ConfigError(
            f"the models share {len(shared)} personas ({', '.join(shared) or 'none'}); need at least 3 to compare"
        )
    centred = {m: center(_as_matrix(sets[m], shared)[1]) for m in labels}
    d_models = tuple(centred[m].shape[1] for m in labels)
    within = {m: cosine_matrix(centred[m]) for m in labels}
    iu = np.triu_indices(len(shared), k=1)
    flat = np.stack([within[m][iu] for m in labels])
    structure = np.corrcoef(flat) if flat.shape[1] > 1 else np.ones((len(labels), len(labels)))
    cross: dict[tuple[str, str], np.ndarray] = {}
    axis_cos: dict[tuple[str, str], float] = {}
    same_d = len(set(d_models)) == 1
    has_defaults = True
    try:
        axes = {m: assistant_axis(dict(zip(shared, centred[m], strict=True)), defaults) for m in labels}
    except ConfigError:
        has_defaults = False
    for i, a in enumerate(labels):
        for b in labels[i + 1 :]:
            if same_d:
                cross[(a, b)] = cosine_matrix(centred[a], centred[b])
                if has_defaults:
                    axis_cos[(a, b)] = float(axes[a] @ axes[b])
    dflt = resolve_defaults(shared, defaults) if has_defaults else None
    if same_d:
        stacked = {f"{m}\x00{p}": v for m in labels for p, v in zip(shared, centred[m], strict=True)}
        joint = pca(stacked, 2, defaults=[f"{m}\x00{p}" for m in labels for p in (dflt or ())] or None)
        n = len(shared)
        coords = {m: joint.coordinates[i * n : (i + 1) * n, :2] for i, m in enumerate(labels)}
        ratio, method = joint.explained_variance_ratio, "joint-pca"
    else:
        per = {m: pca(dict(zip(shared, centred[m], strict=True)), 2, defaults=dflt) for m in labels}
        ref = per[labels[0]].coordinates[:, :2]
        coords = {m: _procrustes(per[m].coordinates[:, :2], ref) for m in labels}
        ratio, method = per[labels[0]].explained_variance_ratio, "procrustes"
    return ModelComparison(
        models=tuple(labels),
        personas=tuple(shared),
        d_models=d_models,
        within=within,
        structure_corr=structure,
        cross=cross,
        coordinates=coords,
        method=method,
        explained_variance_ratio=ratio,
        axis_cos=axis_cos,
    )


# ------------------------------------------------------------------------------------------------- transcripts


def project_transcripts(
    loaded: Any,
    transcripts: Mapping[str, Sequence[Mapping[str, str]]],
    axis: np.ndarray,
    layer: int,
    *,
    origin: np.ndarray | None = None,
    prompt_format: str = "chat",
    span: str = "exact",
    max_length: int | None = None,
) -> dict[str, np.ndarray]:
    """Project multi-turn transcripts onto an axis: one value per assistant turn.

    Each transcript (``[{"role", "content"}, ...]``) is rendered with :func:`personavec.spans.render` (the exact
    assistant spans extraction uses) and run through :func:`personavec.extract.mean_activations`; each assistant
    turn's mean activation at ``layer``, minus ``origin`` (e.g. the mean of the persona vectors, so values are on
    the same scale as the personas' centred projections), is dotted with the unit axis.

    Args:
        loaded: a :class:`personavec.modeling.LoadedModel` (the model the axis was extracted from).
        transcripts: ``{label: messages}``.
        axis: direction in the model's residual space (normalised here).
        layer: ``hidden_states`` index the axis lives at.
    Returns:
        ``{label: array of n_assistant_turns values}``.
    """
    from personavec.extract import mean_activations
    from personavec.spans import render

    unit = _unit(np.asarray(axis, dtype=np.float64))
    if max_length is None:
        max_length = loaded.context_length
    labels = list(transcripts)
    rendered = [render(loaded.tokenizer, transcripts[k], prompt_format, span, max_length=max_length) for k in labels]
    for label, r in zip(labels, rendered, strict=True):
        if not r.assistant_spans:
            raise ConfigError(f"transcript {label!r} has no assistant message to project")
    means = mean_activations(loaded, rendered, [layer])[:, 0].double().numpy()
    if origin is not None:
        means = means - np.asarray(origin, dtype=np.float64)
    values = means @ unit
    out: dict[str, np.ndarray] = {}
    pos = 0
    for label, r in zip(labels, rendered, strict=True):
        out[label] = values[pos : pos + len(r.assistant_spans)]
        pos += len(r.assistant_spans)
    return out


def _check_named(vset: VectorSet, defaults: Sequence[str]) -> None:
    """Assistant-end personas named by the user (``--default``) must be vectors of the run: a typo would otherwise
    leave the axis to the ``default`` group without a word."""
    missing = [n for n in defaults if n not in vset.names]
    if missing:
        shown = ", ".join(vset.names[:12]) + (", ..." if len(vset.names) > 12 else "")
        raise ConfigError(
            f"--default {', '.join(map(repr, missing))}: no such vector in vectors run {vset.run_id} at layer "
            f"{vset.layer} (it has {shown})"
        )


def default_personas_of(vset: VectorSet, defaults: Sequence[str] | None = None) -> tuple[str, ...]:
    """The assistant-end personas for a vector set: ``defaults`` if given, else the members of the persona group
    ``default`` recorded in the run's provenance, else :data:`DEFAULT_PERSONAS`; only those present in ``vset``."""
    if defaults:
        _check_named(vset, defaults)
        chosen: Sequence[str] = defaults
    else:
        groups = vset.provenance.get("persona_groups") or {}
        chosen = [p for p, g in groups.items() if "default" in g] or DEFAULT_PERSONAS
    return tuple(n for n in vset.names if n in chosen)


def compare_runs(
    ws: Workspace, runs: Sequence[tuple[int, int | None]], *, defaults: Sequence[str] | None = None
) -> ModelComparison:
    """:func:`compare_models` over vectors runs of a workspace, each ``(run_id, layer or None)``; models are labelled
    ``"run <id> <model> L<layer>"``."""
    from personavec.vectors import load_vectors

    if len(runs) < 2:
        raise ConfigError("compare needs at least two vectors runs")
    sets = {}
    for run_id, layer in runs:
        vs = load_vectors(run_id, layer, workspace=ws).without_contrasts()
        if defaults:
            _check_named(vs, defaults)
        label = f"run {run_id} {vs.model} L{vs.layer}"
        if label in sets:
            raise ConfigError(
                f"vectors run {run_id} at layer {vs.layer} is given twice: compare another run, or another layer of "
                f"this one ({run_id}:LAYER)"
            )
        sets[label] = vs
    return compare_models(sets, defaults=defaults)


@dataclass(frozen=True)
class RunProjection:
    """Transcripts projected onto a vectors run's assistant axis, with the run's personas for reference."""

    run_id: int
    layer: int
    values: dict[str, np.ndarray]  # one value per assistant turn
    references: dict[str, float]  # each persona's centred projection


def project_onto_run(
    ws: Workspace,
    run_id: int,
    transcripts: Mapping[str, Sequence[Mapping[str, str]]],
    *,
    layer: int | None = None,
    defaults: Sequence[str] | None = None,
    model: str | None = None,
    device: str = "auto",
) -> RunProjection:
    """Project transcripts onto the assistant axis of a vectors run (grouped by persona), on the run's scale.

    The model is the run's extraction model (or ``model``), loaded in the dtype the extraction used; transcripts
    are rendered with the run's prompt format and span rule; the origin is the mean of the run's persona vectors,
    so values compare with the personas' centred projections (``references``)."""
    from personavec.modeling import load_model
    from personavec.vectors import load_vectors

    vset = load_vectors(run_id, layer, workspace=ws).without_contrasts()
    axis = assistant_axis(vset, default_personas_of(vset, defaults) or None)
    prov = vset.provenance
    from personavec.config import DTYPES

    dtype = str(prov.get("dtype"))
    loaded = load_model(model or vset.model, dtype=dtype if dtype in DTYPES else "auto", device=device)
    values = project_transcripts(
        loaded,
        transcripts,
        axis,
        vset.layer,
        origin=vset.matrix.double().mean(dim=0).numpy(),
        prompt_format=str(prov.get("prompt_format") or "chat"),
        span=str(prov.get("span_rule") or "exact"),
    )
    return RunProjection(run_id, vset.layer, values, project(vset, axis))
