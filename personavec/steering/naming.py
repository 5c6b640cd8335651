"""Vector names: a vector of a vectors run named on the command line, in a config or in a request.

``RUN:name`` (a persona, or a persona group of the run's provenance: the mean of its members), ``RUN:a-b`` (a
difference), ``RUN:axis`` (the run's assistant axis, ``mean(default) - mean(rest)`` normalised: it points towards the
``default`` group), any of them negated with a leading ``-`` after
the colon (``RUN:-axis``). Used by steering, monitoring and the sweep report. See ``docs/steering.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.config import RESERVED_NAMES
from personavec.errors import ConfigError

if TYPE_CHECKING:
    from personavec.vectors import VectorSet


_REF = re.compile(r"^\s*(\d+)\s*:\s*(-?)\s*(\S.*?)\s*$")


@dataclass(frozen=True)
class VectorRef:
    """A vector named from a vectors run: ``RUN:name``, ``RUN:a-b``, ``RUN:axis``, optionally negated (``RUN:-x``)."""

    run_id: int
    expr: str
    negate: bool = False

    @classmethod
    def parse(cls, text: str) -> VectorRef:
        match = _REF.match(text or "")
        if not match:
            raise ConfigError(
                f"vector {text!r} is not RUN:NAME: name a vectors run and a vector, e.g. 7:pirate (a persona or "
                f"persona group), 7:pirate-default (a difference), 7:axis (the assistant axis), 7:-axis (negated)"
            )
        return cls(int(match.group(1)), match.group(3), bool(match.group(2)))

    def __str__(self) -> str:
        return f"{self.run_id}:{'-' if self.negate else ''}{self.expr}"


def _named(vset: VectorSet, name: str, defaults: Sequence[str] | None) -> list[tuple[str, np.ndarray]]:
    """Every reading of one name in a vector set: a persona's vector, else a persona group (the mean of its
    members); and the assistant axis (``axis``). More than one reading is an ambiguity the caller refuses."""
    from personavec import analysis

    found: list[tuple[str, np.ndarray]] = []
    groups = vset.provenance.get("persona_groups") or {}
    members = [p for p in vset.names if name in (groups.get(p) or ())]
    if name in vset.names:  # a persona comes before its namesake group (the built-in persona and group `default`)
        found.append((f"persona {name!r}", vset[name].double().numpy()))
    elif members:
        found.append((f"persona group {name!r}", np.mean([vset[p].double().numpy() for p in members], axis=0)))
    if name == "axis":
        groups_only = vset.without_contrasts()
        defaults_of = analysis.default_personas_of(groups_only, defaults) or None
        found.append(("the assistant axis", analysis.assistant_axis(groups_only, defaults_of)))
    return found


def resolve_vector(vset: VectorSet, expr: str, *, negate: bool = False, defaults: Sequence[str] | None = None):
    """The float64 vector ``expr`` names in ``vset`` (``name``, ``a-b`` or ``axis``; see :class:`VectorRef`).

    The name must have exactly one reading: a persona, a persona group, the axis, or one split ``a-b`` at a ``-``
    (so personas with hyphens in their names work); a name with two readings (a persona named ``axis`` in an old
    catalog, a persona ``a-b`` beside personas ``a`` and ``b``) is refused, naming them."""
    readings = _named(vset, expr, defaults)
    for i, ch in enumerate(expr):
        if ch != "-" or i == 0:
            continue
        left, right = _named(vset, expr[:i], defaults), _named(vset, expr[i + 1 :], defaults)
        for la, a in left:
            for lb, b in right:
                readings.append((f"{la} minus {lb}", a - b))
    if len(readings) > 1:
        raise ConfigError(
            f"vector {expr!r} of vectors run {vset.run_id} is ambiguous: it could be "
            f"{'; or '.join(label for label, _ in readings)}. Rename the persona (re-ingest the set and extract "
            f"again): {', '.join(RESERVED_NAMES)} and names read as a-b are taken by the vector syntax"
        )
    if not readings:
        groups = sorted({g for gs in (vset.provenance.get("persona_groups") or {}).values() for g in gs or ()})
        raise ConfigError(
            f"vectors run {vset.run_id} (layer {vset.layer}) has no vector {expr!r}: it has "
            f"{', '.join(vset.names)}; persona groups {', '.join(groups) or 'none'}; and 'axis'. "
            f"A difference is written a-b."
        )
    vec = readings[0][1]
    return -vec if negate else vec


def unit_norm(vset: VectorSet) -> float:
    """The layer's mean activation norm used by ``normalize``: the mean norm of the run's vectors at that layer."""
    norms = vset.provenance.get("norms") or {}
    values = [float(norms[n]) for n in vset.names if n in norms]
    if not values:
        values = [float(np.linalg.norm(vset[n].double().numpy())) for n in vset.names]
    return float(np.mean(values))


def _same_path(a: str, b: str) -> bool:
    from pathlib import Path

    try:
        pa, pb = Path(a).expanduser(), Path(b).expanduser()
        return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()
    except OSError:
        return False


def check_model(vset: VectorSet, loaded: Any, *, allow_other_model: bool = False) -> str | None:
    """Refuse to apply ``vset``'s vectors to a model they do not come from.

    The shape (``d_model``, layer count) must match, always. The identity must match unless ``allow_other_model``:
    both revisions recorded (a GGUF file's sha256, a Hub commit) and equal, or else the same model name or path and
    the same architecture. Returns None for the same model, else (allowed) a note of the difference to record.

    ``loaded`` is a :class:`personavec.modeling.LoadedModel` (or anything with ``name``, ``path``, ``revision``,
    ``architecture``, ``n_layers``, ``d_model``)."""
    prov = vset.provenance
    where = f"vectors run {vset.run_id} comes from {vset.model!r}"
    if vset.d_model != loaded.d_model:
        raise ConfigError(
            f"{where} (d_model {vset.d_model}); the model {loaded.name!r} has d_model {loaded.d_model}: use vectors "
            f"of the same model"
        )
    n_model_layers = prov.get("n_model_layers")
    if n_model_layers is not None and int(n_model_layers) != loaded.n_layers:
        raise ConfigError(
            f"{where} ({n_model_layers} layers); the model {loaded.name!r} has {loaded.n_layers}: use vectors of the "
            f"same model"
        )
    rev, arch = prov.get("model_revision"), prov.get("architecture")
    differences = []
    if arch and loaded.architecture and arch != loaded.architecture:
        differences.append(f"architecture {arch} vs {loaded.architecture}")
    if rev and loaded.revision:
        if rev != loaded.revision:
            differences.append(f"revision {rev} vs {loaded.revision}")
    elif vset.model != loaded.name and not _same_path(vset.model, str(loaded.path)):
        differences.append(f"model {vset.model!r} vs {loaded.name!r}")
    if not differences:
        return None
    note = "; ".join(differences)
    if not allow_other_model:
        raise ConfigError(
            f"{where}, not from the model {loaded.name!r} ({note}): vectors of another model point nowhere "
            f"useful in this one. Use vectors extracted with this model, or pass --allow-other-model if it is the "
            f"same model under another name (recorded with the run)"
        )
    return note
