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


_NUM = r"[-+]?\d+(?:\.\d+)?"
_FILTER = re.compile(
    r"^\s*(?:(?P<group>.+?)\s*:\s*)?(?P<rubric>[A-Za-z_][A-Za-z0-9_\-]*)\s*"
    rf"(?:(?P<op>==|=|!=|<>|<=|>=|<|>)\s*(?P<value>{_NUM})"
    rf"|\s(?P<in>in)\s*\(\s*(?P<values>{_NUM}(?:\s*,\s*{_NUM})*)\s*,?\s*\))\s*$",
    re.IGNORECASE,
)
#: Operators that compare the judge's integer verdict (:func:`integer_verdict`) rather than the score.
VERDICT_OPS = ("=", "!=", "in")


def integer_verdict(score: float, method: str | None, top_probs: Mapping[str, float] | None, lo: int, hi: int) -> float:
    """The integer a judgement says, for the equality filters (``=``, ``!=``, ``in``).

    A score read from logprobs is an expected value (``2.99996`` on a 0-3 scale); its verdict is the scale's most
    likely integer among the first token's alternatives ``top_probs`` (``{token: probability}``, as stored; tokens
    that are the same integer up to spaces add up; ties go to the smaller integer). That is the integer a greedy
    judge writes, which is what assistant-axis reads (it parses the judge's answer). A parsed score is what the
    judge wrote and is its own verdict, as is a logprobs score whose alternatives were not kept."""
    if method != "logprobs" or not top_probs:
        return float(score)
    mass: dict[int, float] = {}
    for token, p in top_probs.items():
        k = _as_int(token)
        if k is not None and lo <= k <= hi and isinstance(p, int | float):
            mass[k] = mass.get(k, 0.0) + float(p)
    if not mass:
        return float(score)
    return float(max(sorted(mass), key=lambda k: mass[k]))  # max keeps the first (smallest) of equal masses


@dataclass(frozen=True)
class JudgementFilter:
    """Keep examples whose ``rubric`` judgement satisfies ``op values``; with ``group``, only that group's members
    are filtered (e.g. ``pos: pirate >= 50``). Examples without a score for the rubric are dropped.

    The order operators (``< <= > >=``) compare the score (with logprobs: the expected value over the scale, as
    persona_vectors' ``coherence >= 50``); ``=``, ``!=`` and ``in`` compare the judge's integer verdict
    (:func:`integer_verdict`, as assistant-axis' ``score == 3``), so they take integers only."""

    rubric: str
    op: str
    values: tuple[float, ...]
    group: str | None = None

    def __post_init__(self) -> None:
        if self.op not in _OPS and self.op != "in":
            raise ConfigError(f"filter operator must be one of {', '.join(_OPS)}, in; got {self.op!r}")
        if not self.values or (self.op != "in" and len(self.values) != 1):
            raise ConfigError(f"filter {self.rubric} {self.op}: give {'numbers' if self.op == 'in' else 'one number'}")
        if self.on_verdict and any(v != int(v) for v in self.values):
            raise ConfigError(
                f"cannot read the filter {str(self)!r}: {self.op} compares the judge's integer verdict, so it takes "
                "integers; compare the score with < <= > >= instead"
            )

    @property
    def value(self) -> float:
        """The number compared with (the first one for ``in``)."""
        return self.values[0]

    @property
    def on_verdict(self) -> bool:
        """True when the filter compares integer verdicts (``=``, ``!=``, ``in``), False for scores."""
        return self.op in VERDICT_OPS

    def keep(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask over ``values`` (NaN = no score: never kept): the verdicts when :attr:`on_verdict`, else the
        scores."""
        with np.errstate(invalid="ignore"):
            if self.op == "in":
                return np.isfinite(values) & np.isin(values, np.asarray(self.values, dtype=np.float64))
            return np.isfinite(values) & _OPS[self.op](values, self.values[0])

    def __str__(self) -> str:
        rhs = f"({', '.join(f'{v:g}' for v in self.values)})" if self.op == "in" else f"{self.values[0]:g}"
        return f"{self.group + ': ' if self.group else ''}{self.rubric} {self.op} {rhs}"


def parse_filter(text: str) -> JudgementFilter:
    """``"role_adherence = 3"``, ``"role_adherence in (2, 3)"``, ``"coherence >= 50"``, ``"pos: pirate >= 50"``
    (``GROUP: RUBRIC OP NUMBER`` or ``GROUP: RUBRIC in (N, ...)``)."""
    match = _FILTER.match(text) if isinstance(text, str) else None
    if not match:
        raise ConfigError(
            f"cannot read the filter {text!r}: write RUBRIC OP NUMBER or RUBRIC in (N, ...), optionally after "
            "'GROUP:', with OP one of = != < <= > >= (e.g. 'role_adherence = 3', 'role_adherence in (2, 3)', "
            "'coherence >= 50', 'pos: pirate >= 50')"
        )
    if match["in"]:
        values = tuple(float(v) for v in match["values"].split(","))
        return JudgementFilter(match["rubric"], "in", values, match["group"])
    op = {"==": "=", "<>": "!="}.get(match["op"], match["op"])
    return JudgementFilter(match["rubric"], op, (float(match["value"]),), match["group"])
