"""Reading a judge's answer: a score from the first token's logprobs or from the text, and the filters
(``role_adherence >= 2``) that select judged answers for the vector stage (``docs/judge.md``)."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from personavec.errors import ConfigError
from personavec.judging.rubrics import Rubric

#: How a score is read: from logprobs when the endpoint returns them, else parsed ("auto"), or one of them only.
SCORE_MODES = ("auto", "logprobs", "parse")


_OPS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {
    "=": np.equal,
    "!=": np.not_equal,
    "<": np.less,
    "<=": np.less_equal,
    ">": np.greater,
    ">=": np.greater_equal,
}


_NUMBER = re.compile(r"(?<![\w.])[-+]?\d+(?:\.\d+)?(?![\w])")


@dataclass(frozen=True)
class Scored:
    """How one judge answer was read: a score, or an error saying why there is none."""

    score: float | None
    method: str | None  # "logprobs" or "parsed"
    numeric_mass: float | None = None
    top_logprobs: dict[str, float] | None = None
    error: str | None = None


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (``"Score: 85/100"`` -> 85.0), or None."""
    match = _NUMBER.search(text)
    return float(match.group()) if match else None


def _top_logprobs(logprobs: Any) -> tuple[str, dict[str, float]] | None:
    """(first generated token, ``{token: probability}`` of its top alternatives) from ``choices[0].logprobs``."""
    if not isinstance(logprobs, Mapping):
        return None
    content = logprobs.get("content")
    if not isinstance(content, list) or not content or not isinstance(content[0], Mapping):
        return None
    first = content[0]
    top = first.get("top_logprobs")
    if not isinstance(top, list) or not top:
        return None
    probs: dict[str, float] = {}
    for alt in top:
        if (
            isinstance(alt, Mapping)
            and isinstance(alt.get("token"), str)
            and isinstance(alt.get("logprob"), int | float)
        ):
            logprob = float(alt["logprob"])
            # a log-probability is <= 0 (a little above from rounding); NaN or 1e308 is a broken endpoint: its
            # logprobs are not used (the score is parsed from the text, as without logprobs)
            if math.isnan(logprob) or logprob > 1e-3:
                return None
            probs[alt["token"]] = probs.get(alt["token"], 0.0) + math.exp(min(logprob, 0.0))
    return (str(first.get("token", "")), probs) if probs else None


def _as_int(token: str) -> int | None:
    t = token.strip()
    return int(t) if t.isascii() and t.isdigit() else None


def logprob_expectation(probs: Mapping[str, float], lo: int, hi: int) -> tuple[float | None, float]:
    """``(sum k p(k) / M, M)`` over the tokens that are integers ``k`` in ``lo..hi``, with ``M = sum p(k)`` (None
    when ``M`` is 0). Tokens differing only by surrounding spaces count together."""
    mass = weighted = 0.0
    for token, p in probs.items():
        k = _as_int(token)
        if k is not None and lo <= k <= hi:
            mass += p
            weighted += k * p
    return (weighted / mass if mass > 0 else None), mass


def score_answer(text: str, logprobs: Any, rubric: Rubric, *, mode: str = "auto", min_mass: float = 0.25) -> Scored:
    """Read a score on ``rubric``'s scale from the judge's answer ``text`` and its first-token ``logprobs`` (the
    endpoint's ``choices[0].logprobs``, or None); see the module docstring for the rules."""
    lo, hi = rubric.min_score, rubric.max_score
    parsed = first_number(text)
    top = _top_logprobs(logprobs) if mode != "parse" else None
    if mode == "logprobs" and top is None:
        return Scored(None, None, error="the endpoint returned no logprobs (use score_mode auto or parse)")
    if top is not None:
        first_token, probs = top
        shown = {t: round(p, 6) for t, p in sorted(probs.items(), key=lambda kv: -kv[1])}
        first_int = _as_int(first_token)
        multi_token = first_int is not None and parsed is not None and float(first_int) != parsed
        if not multi_token:
            score, mass = logprob_expectation(probs, lo, hi)
            if score is None or mass < min_mass:
                head = ", ".join(f"{t!r}: {p:.3f}" for t, p in list(shown.items())[:5])
                return Scored(
                    None,
                    "logprobs",
                    mass,
                    shown,
                    f"no score: probability on the integers {lo}..{hi} is {mass:.3f} < {min_mass:g} "
                    f"(top first tokens {head})",
                )
            return Scored(score, "logprobs", mass, shown)
    if parsed is None:
        return Scored(None, "parsed", error=f"no score: the judge's answer holds no number ({text[:80]!r})")
    if not lo <= parsed <= hi:
        return Scored(None, "parsed", error=f"no score: {parsed:g} is outside the scale {lo}..{hi}")
    return Scored(parsed, "parsed", top_logprobs=None if top is None else top[1])


_FILTER = re.compile(
    r"^\s*(?:(?P<group>.+?)\s*:\s*)?(?P<rubric>[A-Za-z_][A-Za-z0-9_\-]*)\s*"
    r"(?P<op>==|=|!=|<>|<=|>=|<|>)\s*(?P<value>[-+]?\d+(?:\.\d+)?)\s*$"
)


@dataclass(frozen=True)
class JudgementFilter:
    """Keep examples whose ``rubric`` score satisfies ``op value``; with ``group``, only that group's members are
    filtered (e.g. ``pos: pirate >= 50``). Examples without a score for the rubric are dropped."""

    rubric: str
    op: str
    value: float
    group: str | None = None

    def keep(self, scores: np.ndarray) -> np.ndarray:
        """Boolean mask over ``scores`` (NaN = no score: never kept)."""
        with np.errstate(invalid="ignore"):
            return np.isfinite(scores) & _OPS[self.op](scores, self.value)

    def __str__(self) -> str:
        return f"{self.group + ': ' if self.group else ''}{self.rubric} {self.op} {self.value:g}"


def parse_filter(text: str) -> JudgementFilter:
    """``"role_adherence = 3"``, ``"coherence >= 50"``, ``"pos: pirate >= 50"`` (``GROUP: RUBRIC OP NUMBER``)."""
    match = _FILTER.match(text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(
            f"cannot read the filter {text!r}: write RUBRIC OP NUMBER, optionally after 'GROUP:', with OP one of "
            "= != < <= > >= (e.g. 'role_adherence = 3', 'coherence >= 50', 'pos: pirate >= 50')"
        )
    op = {"==": "=", "<>": "!="}.get(match["op"], match["op"])
    return JudgementFilter(match["rubric"], op, float(match["value"]), match["group"])
