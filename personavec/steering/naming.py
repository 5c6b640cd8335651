"""Vector names: a vector of a vectors run named on the command line, in a config or in a request.

``RUN:name`` (a persona, or a persona group of the run's provenance: the mean of its members), ``RUN:a-b`` (a
difference), ``RUN:axis`` (the run's assistant axis, a unit vector), any of them negated with a leading ``-`` after
the colon (``RUN:-axis``). Used by steering, monitoring and the sweep report. See ``docs/steering.md``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

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


def _named(vset: VectorSet, name: str, defaults: Sequence[str] | None) -> np.ndarray | None:
    """One name of a vector set: a vector, a persona group (mean of its members), or ``axis``; None if unknown."""
    from personavec import analysis

    if name in vset.names:
        return vset[name].double().numpy()
    groups = vset.provenance.get("persona_groups") or {}
    members = [p for p in vset.names if name in (groups.get(p) or ())]
    if members:
        return np.mean([vset[p].double().numpy() for p in members], axis=0)
    if name == "axis":
        return analysis.assistant_axis(vset, analysis.default_personas_of(vset, defaults) or None)
    return None


def resolve_vector(vset: VectorSet, expr: str, *, negate: bool = False, defaults: Sequence[str] | None = None):
    """The float64 vector ``expr`` names in ``vset`` (``name``, ``a-b`` or ``axis``; see :class:`VectorRef`).

    A name that exists as written wins over a split at ``-`` (so personas with hyphens in their names work)."""
    vec = _named(vset, expr, defaults)
    if vec is None:
        for i, ch in enumerate(expr):
            if ch != "-" or i == 0:
                continue
            a, b = _named(vset, expr[:i], defaults), _named(vset, expr[i + 1 :], defaults)
            if a is not None and b is not None:
                vec = a - b
                break
    if vec is None:
        groups = sorted({g for gs in (vset.provenance.get("persona_groups") or {}).values() for g in gs or ()})
        raise ConfigError(
            f"vectors run {vset.run_id} (layer {vset.layer}) has no vector {expr!r}: it has "
            f"{', '.join(vset.names)}; persona groups {', '.join(groups) or 'none'}; and 'axis'. "
            f"A difference is written a-b."
        )
    return -vec if negate else vec


def unit_norm(vset: VectorSet) -> float:
    """The layer's mean activation norm used by ``normalize``: the mean norm of the run's vectors at that layer."""
    norms = vset.provenance.get("norms") or {}
    values = [float(norms[n]) for n in vset.names if n in norms]
    if not values:
        values = [float(np.linalg.norm(vset[n].double().numpy())) for n in vset.names]
    return float(np.mean(values))
