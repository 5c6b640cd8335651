"""Interventions on the residual stream: additive steering, directional ablation, activation capping.

Layer convention (the project's): layer ``L`` is ``hidden_states[L]``, the output of decoder block ``L - 1``; an
intervention at layer ``L`` is a forward hook on block ``L - 1`` that rewrites its output, so every later block (and
the KV cache they fill) sees the modified stream. Steerable layers are ``1 .. n_layers - 1``: ``hidden_states[0]``
(embeddings) and ``hidden_states[n]`` (after the final norm) are not outputs of a block. Libraries that index the
block list directly call block ``i`` "layer i": their ``i`` is our ``i + 1``. That is assistant-axis
(``ActivationSteering(layer_indices=[i])`` and its extraction hooks on ``model.layers[i]``; its axis files and
"layer 22" of Gemma-2-27B use that count) and repeng (``ControlModel`` layer ``k`` = ``model.layers[k]``, read from
``hidden_states[k + 1]``). persona_vectors is not: its vector files (``generate_vec.py``: one row per
``hidden_states`` index) and its ``--layer L`` are our ``L``; only its hook class counts blocks, which is why its eval
passes ``layer_idx=layer - 1`` to ``ActivationSteerer``.

Per position ``h`` (``[d_model]``, raw and uncentred), with ``v`` the vector, ``u = v / |v|`` (``0`` for a zero
vector) and ``s`` the scale:

- ``add``:    ``h <- h + s * v``
- ``ablate``: ``h <- h - (h . u) u + s * v``  (``s = 0``: pure directional ablation)
- ``cap``:    ``h <- h - max(0, h . u - tau) u``  (so ``h . u <= tau`` afterwards)

``s`` is the coefficient ``c`` relative to the vector as stored, or, with ``normalize``, ``c * unit / |v|`` where
``unit`` is the layer's mean activation norm (the mean norm of the vector run's vectors at that layer), so that
``c = 1`` adds a vector as long as a typical mean activation of that layer, whatever the model and layer.

Positions: ``"all"`` changes every position (prompt and generated); ``"generated"`` only positions at or after the
end of the prompt, i.e. the tokens the model generated as they are fed back in (the first generated token comes
from the unsteered prompt pass); ``"response"`` those and the last prompt position, which is exactly what
persona_vectors' ``ActivationSteerer(positions="response")`` does with the KV cache on: it adds to ``[:, -1, :]`` of
every forward pass, so the prompt pass's last position is steered too and the first generated token already is.
With left padding and the KV cache, the hook sees ``[B, S, d]`` on the prompt pass and ``[B, 1, d]`` per generated
token; :class:`Steerer` tracks the absolute position of each call (a pass of more than one token starts at 0; a
one-token pass continues the previous one), and the prompt length is the padded prompt width (set with
:meth:`Steerer.begin`, else the width of the first multi-token pass).

Vectors are named from a vectors run (:mod:`personavec.steering.naming`). See ``docs/steering.md``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.errors import ConfigError
from personavec.steering.naming import VectorRef, check_model, resolve_vector, unit_norm

if TYPE_CHECKING:
    import torch

    from personavec.workspace import Workspace

#: Intervention kinds.
KINDS = ("add", "ablate", "cap")
#: Which positions an intervention changes: every one, the generated tokens only, or those and the last prompt
#: position (persona_vectors' ``positions="response"``).
POSITIONS = ("all", "generated", "response")
#: Default percentile of the reference run's per-token projections used as the capping threshold.
DEFAULT_CAP_PERCENTILE = 25.0


# ---------------------------------------------------------------------------------------------------- config


def _floats(values: Any) -> tuple[float, ...]:
    if values is None:
        return ()
    if isinstance(values, int | float | str):
        values = (values,)
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class SteeringConfig:
    """One intervention, by name (stored with the run as provenance).

    Attributes:
        vector: ``RUN:NAME`` (see :class:`VectorRef`).
        kind: ``"add"``, ``"ablate"`` or ``"cap"``.
        layers: ``hidden_states`` indices (``1 .. n_layers - 1``); empty = the vectors run's default layer (the seed's
            default layer when the run has it, else its only layer).
        coef: the coefficient ``c`` of ``add``/``ablate`` (unused by ``cap``).
        positions: ``"all"``, ``"generated"`` (the generated tokens as fed back) or ``"response"`` (those and the last
            prompt position: persona_vectors' ``positions="response"``).
        normalize: ``c`` in units of the layer's mean activation norm instead of the vector as stored.
        tau: ``cap`` thresholds on ``h . u``: one value for every layer or one per layer (``inf`` caps nothing).
        percentile: ``cap`` without ``tau``: the threshold is this percentile of the reference run's per-token
            projections at each layer.
        reference_run: ``cap`` without ``tau``: a responses run (generate / ingest-responses) or an extract run (its
            responses run) whose answer tokens give the projections.
        reference_personas: only these personas' answers of the reference run (empty = all).
        allow_other_model: steer a model other than the one the vectors come from (same shape; refused otherwise,
            see :func:`check_model`); recorded with the run.

    Example: ``SteeringConfig("7:mystic-default", coef=4.0, layers=(20,))``; capping along the drift direction at the
    25th percentile of run 3's answers: ``SteeringConfig("7:-axis", kind="cap", reference_run=3)``.
    """

    vector: str
    kind: str = "add"
    layers: tuple[int, ...] = ()
    coef: float = 0.0
    positions: str = "all"
    normalize: bool = False
    tau: tuple[float, ...] = ()
    percentile: float = DEFAULT_CAP_PERCENTILE
    reference_run: int | None = None
    reference_personas: tuple[str, ...] = ()
    allow_other_model: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(int(x) for x in self.layers or ()))
        object.__setattr__(self, "tau", _floats(self.tau))
        object.__setattr__(self, "reference_personas", tuple(self.reference_personas or ()))
        object.__setattr__(self, "coef", float(self.coef))
        VectorRef.parse(self.vector)
        if self.kind not in KINDS:
            raise ConfigError(f"intervention kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if len(set(self.layers)) != len(self.layers):
            raise ConfigError(f"layers has duplicates: {self.layers}")
        if any(layer < 1 for layer in self.layers):
            raise ConfigError(f"steerable layers are 1..n_layers-1 (hidden_states indices), got {self.layers}")
        if not math.isfinite(self.coef):
            raise ConfigError(f"coef must be finite, got {self.coef}")
        if self.kind == "cap":
            if not self.tau and self.reference_run is None:
                raise ConfigError("cap needs thresholds: give tau (--tau) or a reference run (--cap-reference RUN)")
            if self.tau and self.reference_run is not None:
                raise ConfigError("cap takes tau or a reference run, not both")
            if self.tau and self.layers and len(self.tau) not in (1, len(self.layers)):
                raise ConfigError(f"tau needs one value or one per layer ({len(self.layers)}), got {len(self.tau)}")
            if any(math.isnan(t) or t == -math.inf for t in self.tau):
                raise ConfigError(f"tau must be a number or +inf, got {self.tau}")
            if not 0.0 <= self.percentile <= 100.0:
                raise ConfigError(f"percentile must be in [0, 100], got {self.percentile}")
            if self.coef != 0.0 or self.normalize:
                raise ConfigError("cap takes no coefficient or normalize (its thresholds are raw projections)")
        elif self.tau or self.reference_run is not None or self.reference_personas:
            raise ConfigError(f"tau and a reference run are for cap, not {self.kind}")

    @property
    def ref(self) -> VectorRef:
        return VectorRef.parse(self.vector)

    def label(self, coefs: Sequence[float] | None = None) -> str:
        """A short human label, e.g. ``add 7:mystic-default x4 @20`` (``x-8,0,8`` with ``coefs``, for a sweep)."""
        layers = ",".join(map(str, self.layers)) or "default"
        if self.kind == "cap":
            how = f"tau={','.join(f'{t:g}' for t in self.tau)}" if self.tau else f"p{self.percentile:g}"
        else:
            values = ",".join(f"{c:g}" for c in (coefs if coefs is not None else [self.coef]))
            how = f"x{values}{' (normalized)' if self.normalize else ''}"
        where = {"all": "", "generated": " generated only", "response": " last prompt token + generated"}[
            self.positions
        ]
        return f"{self.kind} {self.vector} {how} @{layers}{where}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SteeringConfig:
        """Rebuild from stored JSON (unknown keys ignored)."""
        from personavec.config import config_from_dict

        return config_from_dict(cls, dict(data))


# ---------------------------------------------------------------------------------------------------- resolved


@dataclass(frozen=True, eq=False)
class LayerIntervention:
    """One intervention at one layer, resolved to numbers (what the hook applies).

    Build it directly to steer with any vector (no catalog needed):
    ``LayerIntervention(layer=20, kind="add", vector=v, scale=4.0)``.
    """

    layer: int
    kind: str
    vector: Any  # [d_model] numpy array or tensor
    scale: float = 0.0
    tau: float | None = None
    positions: str = "all"
    unit_norm: float | None = None  # the layer's mean activation norm when the coefficient was normalized
    n_reference_tokens: int | None = None  # tokens the threshold percentile was taken over

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"intervention kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.positions not in POSITIONS:
            raise ConfigError(f"positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.kind == "cap" and self.tau is None:
            raise ConfigError("a cap intervention needs tau")

    def as_numpy(self) -> np.ndarray:
        v = self.vector
        if hasattr(v, "detach"):
            v = v.detach().cpu().double().numpy()
        return np.asarray(v, dtype=np.float64).reshape(-1)

    @property
    def vector_norm(self) -> float:
        return float(np.linalg.norm(self.as_numpy()))


@dataclass(frozen=True)
class SteeringPlan:
    """A :class:`SteeringConfig` resolved against a vectors run and a model: the per-layer interventions plus what
    was resolved (for provenance)."""

    config: SteeringConfig
    interventions: tuple[LayerIntervention, ...]
    vector_run_id: int
    vector_model: str
    tau_source: str | None = None
    reference_run_id: int | None = None
    other_model: str | None = None  # how the steered model differs from the vectors' (allowed by allow_other_model)


def plan_steering(
    ws: Workspace,
    config: SteeringConfig,
    *,
    n_layers: int,
    d_model: int,
    loaded: Any = None,
    reference_batch_tokens: int | None = None,
) -> SteeringPlan:
    """Resolve ``config`` against its vectors run (and, for ``cap`` with a reference run, the loaded model).

    Args:
        ws: the workspace holding the vectors run.
        config: what to do.
        n_layers, d_model: the model to steer (checked against the vectors).
        loaded: a :class:`personavec.modeling.LoadedModel`; needed only to compute cap thresholds from a reference
            run (one forward pass over its answers).
    """
    from personavec.vectors import load_vectors

    ref = config.ref

    def check(layers: Sequence[int]) -> None:
        bad = [layer for layer in layers if not 1 <= layer <= n_layers - 1]
        if bad:
            raise ConfigError(
                f"layer(s) {bad} cannot be steered: a model with {n_layers} layers has steerable layers "
                f"1..{n_layers - 1}"
            )

    check(config.layers)
    first = load_vectors(ref.run_id, config.layers[0] if config.layers else None, workspace=ws)
    layers = config.layers or (first.layer,)
    check(layers)
    other_model = None
    if loaded is not None:
        other_model = check_model(first, loaded, allow_other_model=config.allow_other_model)
    elif first.d_model != d_model:
        raise ConfigError(
            f"vectors run {ref.run_id} has d_model {first.d_model} ({first.model}), the model has {d_model}: "
            f"steer with vectors of the same model"
        )
    n_model_layers = first.provenance.get("n_model_layers")
    if n_model_layers is not None and int(n_model_layers) != n_layers:
        raise ConfigError(
            f"vectors run {ref.run_id} comes from a model with {n_model_layers} layers ({first.model}), this one "
            f"has {n_layers}"
        )
    if config.kind == "cap" and len(config.tau) > 1 and len(config.tau) != len(layers):
        raise ConfigError(
            f"--tau was given {len(config.tau)} times for {len(layers)} layer(s) ({', '.join(map(str, layers))}): "
            f"give one threshold, or one per --layer"
        )
    vsets = {first.layer: first}
    for layer in layers:
        if layer not in vsets:
            vsets[layer] = load_vectors(ref.run_id, layer, workspace=ws)
    vectors = {layer: resolve_vector(vsets[layer], ref.expr, negate=ref.negate) for layer in layers}

    tau_source = None
    reference_run_id = None
    counts: dict[int, int | None] = dict.fromkeys(layers)
    taus: dict[int, float | None] = dict.fromkeys(layers)
    if config.kind == "cap":
        if config.tau:
            given = config.tau * len(layers) if len(config.tau) == 1 else config.tau
            taus = {layer: float(t) for layer, t in zip(layers, given, strict=True)}
            tau_source = "given"
        else:
            if loaded is None:
                raise ConfigError("cap thresholds from a reference run need the model (pass loaded=)")
            from personavec.steering.monitor import reference_thresholds

            assert config.reference_run is not None  # checked by SteeringConfig
            found = reference_thresholds(
                ws,
                loaded,
                config.reference_run,
                vectors,
                config.percentile,
                personas=config.reference_personas,
                max_batch_tokens=reference_batch_tokens,
            )
            taus = {layer: found.thresholds[layer] for layer in layers}
            counts = dict.fromkeys(layers, found.n_tokens)
            reference_run_id = found.responses_run_id
            tau_source = (
                f"p{config.percentile:g} of {found.n_tokens} answer tokens of responses run {found.responses_run_id}"
                + (f" (personas {', '.join(config.reference_personas)})" if config.reference_personas else "")
            )
    interventions = []
    for layer in layers:
        vec = vectors[layer]
        norm = float(np.linalg.norm(vec))
        unit = unit_norm(vsets[layer]) if config.normalize else None
        if config.normalize and config.coef != 0.0 and norm == 0.0:
            raise ConfigError(f"{config.vector} is a zero vector at layer {layer}: it cannot be normalized")
        scale = config.coef * unit / norm if unit is not None and norm > 0 else config.coef
        interventions.append(
            LayerIntervention(
                layer=layer,
                kind=config.kind,
                vector=vec.astype(np.float32),
                scale=float(scale) if config.kind != "cap" else 0.0,
                tau=taus[layer],
                positions=config.positions,
                unit_norm=unit,
                n_reference_tokens=counts[layer],
            )
        )
    return SteeringPlan(
        config=config,
        interventions=tuple(interventions),
        vector_run_id=ref.run_id,
        vector_model=first.model,
        tau_source=tau_source,
        reference_run_id=reference_run_id,
        other_model=other_model,
    )


# ---------------------------------------------------------------------------------------------------- hooks


class _Slot:
    """The ``k``-th intervention of every row at one layer as the batched tensors :func:`apply_rows` takes: ``unit``
    and ``add`` ``[B, d]``, ``ablate`` and ``tau`` ``[B]`` (float32), and each row's positions. A row without a
    ``k``-th intervention there (``None``) is left unchanged. ``B`` is 1 when every row is steered alike. The tensors
    are moved lazily to each device the layer runs on (``device_map``)."""

    def __init__(self, ivs: Sequence[LayerIntervention | None]) -> None:
        import torch

        d = next(iv for iv in ivs if iv is not None).as_numpy().shape[0]
        units, adds, ablates, taus = [], [], [], []
        for iv in ivs:
            if iv is None:
                units.append(torch.zeros(d))
                adds.append(torch.zeros(d))
                ablates.append(0.0)
                taus.append(math.inf)
                continue
            v = torch.as_tensor(iv.as_numpy(), dtype=torch.float32)
            norm = float(v.norm())
            units.append(v / norm if norm > 0 else torch.zeros_like(v))
            adds.append(v * float(iv.scale) if iv.kind != "cap" else torch.zeros_like(v))
            ablates.append(1.0 if iv.kind == "ablate" else 0.0)
            taus.append(float(iv.tau) if iv.kind == "cap" else math.inf)  # type: ignore[arg-type]
        self.positions = [iv.positions if iv is not None else "all" for iv in ivs]
        self._cpu = (torch.stack(units), torch.stack(adds), torch.tensor(ablates), torch.tensor(taus))
        self._on: dict[Any, tuple[Any, ...]] = {}

    def on(self, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(unit, add, ablate, tau)`` on ``device``."""
        if device not in self._on:
            self._on[device] = tuple(t.to(device) for t in self._cpu)
        return self._on[device]  # type: ignore[return-value]


def apply_rows(
    h: torch.Tensor,
    unit: torch.Tensor,
    add: torch.Tensor,
    ablate: torch.Tensor,
    tau: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The three interventions in one per-row batched form: ``h`` (``[B, S, d]``) after ``add``/``ablate``/``cap``.

    Each argument broadcasts against the rows: ``unit`` and ``add`` are ``[B|1, d]`` (``u`` and ``s * v``), ``ablate``
    and ``tau`` are ``[B|1]`` (1.0 where the row ablates ``u``, else 0.0; the cap threshold, ``inf`` where the row
    does not cap). Per position::

        p = h . u;   h <- h + add - (ablate * p + max(0, p - tau)) * u

    which is ``add`` (``ablate = 0``, ``tau = inf``), ``ablate`` (``ablate = 1``, ``tau = inf``) and ``cap``
    (``add = 0``, ``ablate = 0``). A row with ``unit = add = 0`` is returned unchanged. ``mask`` (``[B|1, S, 1]``
    bool) limits the positions. The :class:`Steerer` and the server's batched hooks both apply this.
    """
    import torch

    proj = torch.einsum("bsd,bd->bs", h, unit.expand(h.shape[0], -1))
    removed = ablate.view(-1, 1) * proj + (proj - tau.view(-1, 1)).clamp_min(0.0)
    delta = add.unsqueeze(1) - removed.unsqueeze(-1) * unit.unsqueeze(1)
    if mask is not None:
        delta = torch.where(mask, delta, torch.zeros((), dtype=delta.dtype, device=delta.device))
    return h + delta


class Steerer:
    """Forward hooks that apply interventions to decoder-block outputs; use as a context manager (hooks are always
    removed on exit). ``interventions`` steer every row of a batch alike; :meth:`per_row` gives each row its own
    (a batch of a sweep's coefficients or layers).

    Example::

        with Steerer(model, [LayerIntervention(layer=20, kind="add", vector=v, scale=4.0)]) as steerer:
            steerer.begin(prompt_len=input_ids.shape[1])   # once per generate call ("generated", "response")
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)
    """

    def __init__(self, model: Any, interventions: Sequence[LayerIntervention], *, blocks: Any = None) -> None:
        self._init(model, [list(interventions)], blocks)

    @classmethod
    def per_row(cls, model: Any, rows: Sequence[Sequence[LayerIntervention]], *, blocks: Any = None) -> Steerer:
        """Row ``i`` of every batch passed through the model gets ``rows[i]`` (a batch must have ``len(rows)``
        rows; an empty list leaves its row unsteered). Rows steered alike (the same interventions) are steered as
        :class:`Steerer` steers a batch, one ``[1, d]`` set for every row."""
        lists = [list(r) for r in rows]
        if lists and all(r == lists[0] for r in lists):  # LayerIntervention compares by identity
            lists = lists[:1]
        steerer = cls.__new__(cls)
        steerer._init(model, lists, blocks)
        return steerer

    def _init(self, model: Any, rows: list[list[LayerIntervention]], blocks: Any) -> None:
        from personavec.modeling import decoder_layers

        self.model = model
        self.blocks = blocks if blocks is not None else decoder_layers(model)
        n_layers = len(self.blocks)
        per_layer: dict[int, list[list[LayerIntervention]]] = {}
        for i, ivs in enumerate(rows):
            for iv in ivs:
                if not 1 <= iv.layer <= n_layers - 1:
                    raise ConfigError(
                        f"layer {iv.layer} cannot be steered: a model with {n_layers} layers has steerable layers "
                        f"1..{n_layers - 1} (hidden_states indices)"
                    )
                per_layer.setdefault(iv.layer, [[] for _ in rows])[i].append(iv)
        self.slots: dict[int, list[_Slot]] = {
            layer: [
                _Slot([ivs[k] if k < len(ivs) else None for ivs in lists])
                for k in range(max(len(ivs) for ivs in lists))
            ]
            for layer, lists in per_layer.items()
        }
        self.prompt_len: int | None = None
        self._auto = True
        self._next: dict[int, int] = {}
        self._hooks: Any = None

    def begin(self, prompt_len: int | None = None) -> None:
        """Start a new generate call: positions restart at 0; ``prompt_len`` is the (padded) prompt width, or None
        to take the width of the next multi-token pass."""
        self.prompt_len = prompt_len
        self._auto = prompt_len is None
        self._next.clear()

    def _edit(self, layer: int) -> Any:
        import torch

        slots = self.slots[layer]

        def edit(h: Any) -> Any:
            seq = h.shape[1]
            # A pass of several tokens starts at position 0 (a prompt pass, or a full pass without a cache); a
            # one-token pass continues where the last one ended (a cached decoding step).
            start = 0 if seq > 1 else self._next.get(layer, 0)
            self._next[layer] = start + seq
            if seq > 1 and self._auto:
                self.prompt_len = seq
            masks: dict[str, Any] = {}
            if any(p != "all" for slot in slots for p in slot.positions):
                first = self.prompt_len if self.prompt_len is not None else seq
                pos = torch.arange(start, start + seq, device=h.device)
                masks["all"] = torch.ones((1, seq, 1), dtype=torch.bool, device=h.device)
                masks["generated"] = (pos >= first).view(1, seq, 1)
                masks["response"] = (pos >= first - 1).view(1, seq, 1)  # the last prompt position too
            x = h.float()
            for slot in slots:
                mask = None
                if any(p != "all" for p in slot.positions):
                    mask = torch.cat([masks[p] for p in slot.positions])  # [B|1, S, 1]
                x = apply_rows(x, *slot.on(h.device), mask)
            return x.to(h.dtype)

        return edit

    def __enter__(self) -> Steerer:
        from personavec.hooks import patch

        self._hooks = patch(self.blocks, {layer: self._edit(layer) for layer in self.slots})
        self._hooks.__enter__()
        self.begin(None)
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove the hooks (also done on leaving the ``with`` block)."""
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(None, None, None)


def steer(model: Any, interventions: Sequence[LayerIntervention]) -> Steerer:
    """:class:`Steerer` over ``model``'s decoder blocks (a context manager)."""
    return Steerer(model, interventions)
