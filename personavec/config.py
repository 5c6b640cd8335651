"""Frozen configuration dataclasses.

``PersonaVectorConfig`` is the seed's config (same fields and defaults) plus the knobs of this package; each stage
has its own frozen config next to its module (``ExtractConfig`` in extract/run.py, ``GenerateConfig`` in generate.py,
...), validated in ``__post_init__`` and serialised into the run row for provenance.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

from personavec.errors import ConfigError

OPENROUTER_BASE_URL = "https://openrouter.ai/api/v1"
DTYPES = ("auto", "float32", "bfloat16", "float16")


C = TypeVar("C")


@functools.cache
def package_version() -> str:
    """This package's installed version (``0.0.0+unknown`` when run from a source tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version  # ~30 ms: only when asked

    try:
        return version("personavec")
    except PackageNotFoundError:
        return "0.0.0+unknown"


def launched_world() -> tuple[int, int]:
    """``(rank, world size)`` as a launcher (accelerate, torchrun) set them in the environment (``RANK``,
    ``WORLD_SIZE``); ``(0, 1)`` in a process it did not launch. The environment only: no torch, so the catalog and
    the CLI can ask too (:func:`personavec.extract.launch.launched_rank` prefers an initialized process group)."""

    def number(name: str, default: int) -> int:
        try:
            return int(os.environ.get(name, "").strip() or default)
        except ValueError:
            return default

    return number("RANK", 0), max(number("WORLD_SIZE", 1), 1)


def default_layer(n_layers: int, layer_fraction: float = 0.65) -> int:
    """The seed's default layer: ``int(n_layers * layer_fraction + 0.5)`` (a ``hidden_states`` index)."""
    return int(n_layers * layer_fraction + 0.5)


def config_from_dict(cls: type[C], data: dict[str, Any], **overrides: Any) -> C:
    """Rebuild a stage config from the JSON stored with its run (unknown keys, e.g. from newer versions or derived
    provenance fields, are ignored; lists become tuples in the config's ``__post_init__``)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    return cls(**{k: v for k, v in data.items() if k in names} | overrides)


#: Names the vector syntax (``RUN:NAME``, see ``personavec.steering.naming``) gives a meaning of its own: no persona or
#: persona group may take them, so that ``RUN:axis`` always means the assistant axis.
RESERVED_NAMES = ("axis",)
_BIDI_CONTROLS = ("LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI")


def name_problem(name: str) -> str | None:
    """Why ``name`` cannot name a persona or persona group (None if it can): a reserved word, a leading ``-``
    (read as negation in ``RUN:-name``), or a control / bidirectional-override character (shown reversed or not
    at all in tables and plots)."""
    import unicodedata

    if name.strip().lower() in RESERVED_NAMES:
        return f"{name!r} is reserved ({', '.join(RESERVED_NAMES)} name vectors of their own in RUN:NAME)"
    if name.lstrip().startswith("-"):
        return f"{name!r} starts with '-' (RUN:-name means the negated vector)"
    for i, ch in enumerate(name):
        if ch in "\u200c\u200d":  # zero-width (non-)joiners: part of emoji sequences and of several scripts
            continue
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") or unicodedata.bidirectional(ch) in _BIDI_CONTROLS:
            return (
                f"{name!r} has the control or direction-override character U+{ord(ch):04X} "
                f"({unicodedata.name(ch, 'unnamed')}) at position {i}"
            )
    return None


def resumed_config(
    stored: dict[str, Any],
    given: C | None,
    cls: type[C],
    identity_fields: Iterable[str],
    *,
    what: str = "the run",
    unset_means_stored: Iterable[str] = (),
    **overrides: Any,
) -> C:
    """The one rule for resuming a run: rebuild its config from the ``stored`` JSON (:func:`config_from_dict`,
    ``overrides`` on top), check that a ``given`` config agrees on the ``identity_fields`` (what the run computes;
    a :class:`ConfigError` names every field that differs), and take the given config's other fields (how this
    session runs: device, batching, ...).

    Args:
        stored: the config JSON stored with the run.
        given: the config the caller passed with ``--resume``, or None for the stored one as it is.
        cls: the stage's config dataclass.
        identity_fields: fields that must match.
        what: names the run in the error (e.g. "extraction run 3").
        unset_means_stored: identity fields for which a given None asks for the stored value.
        overrides: stored values rebuilt from elsewhere (e.g. the resolved layers).

    Example:
        >>> resumed_config({"model": "m", "device": "cpu"}, None, ExtractConfig, ("model",)).device
        'cpu'
    """
    kept = config_from_dict(cls, stored, **overrides)
    if given is None:
        return kept
    identity = tuple(identity_fields)
    unset = set(unset_means_stored)
    changed = [
        f for f in identity if getattr(given, f) != getattr(kept, f) and not (f in unset and getattr(given, f) is None)
    ]
    if changed:
        detail = ", ".join(f"{f}: run has {getattr(kept, f)!r}, got {getattr(given, f)!r}" for f in changed)
        raise ConfigError(
            f"{what} was made with other settings ({detail}): resume it with the same settings, "
            "or start a new run without --resume"
        )
    operational = {f.name: getattr(given, f.name) for f in dataclasses.fields(cls) if f.name not in identity}  # type: ignore[arg-type]
    return dataclasses.replace(kept, **operational)  # type: ignore[type-var]


def check_selection(
    where: str,
    personas: Iterable[str] | None,
    questions: Iterable[int] | None,
    known_personas: Iterable[str],
    n_questions: int,
) -> None:
    """The one rule for ``--persona`` / ``--question`` filters: every persona name must exist and every question
    position must be in ``0..n_questions-1``; ``where`` names what was filtered (e.g. "persona set 'builtin'")."""
    known = list(dict.fromkeys(known_personas))
    unknown = [p for p in personas or () if p not in known]
    if unknown:
        raise ConfigError(
            f"{where} has no persona named {', '.join(map(repr, unknown))} (it has: {', '.join(known) or 'none'})"
        )
    bad = [q for q in questions or () if not 0 <= q < n_questions]
    if bad:
        raise ConfigError(f"{where} has {n_questions} questions (0-based positions 0..{n_questions - 1}); got {bad}")


def config_dict(config: Any, *, secret_fields: tuple[str, ...] = ("api_key", "hf_token", "openrouter_api_key")) -> dict:
    """A config dataclass as a JSON-ready dict for provenance, with secrets left out."""
    return {k: v for k, v in dataclasses.asdict(config).items() if k not in secret_fields}


@dataclass(frozen=True)
class PersonaVectorConfig:
    """The seed's configuration, kept field for field, plus dtype/device/batching knobs.

    Example: ``PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32")`` runs offline on the
    embedded model.
    """

    model_name: str = "google/gemma-3-27b-it"
    openrouter_model: str | None = None
    layer_fraction: float = 0.65
    max_tokens: int = 256
    temperature: float = 0.7
    max_concurrent_requests: int = 10
    hf_token: str | None = None
    openrouter_api_key: str | None = None
    # personavec additions
    dtype: str = "auto"
    device: str = "auto"
    max_batch_tokens: int | None = None  # None: 1,024 on CPU, 16,384 on GPU (see personavec.extract.core)
    max_batch_size: int = 64
    prompt_format: str = "chat"
    span: str = "exact"
    base_url: str = OPENROUTER_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"

    def __post_init__(self) -> None:
        if not 0.0 <= self.layer_fraction <= 1.0:
            raise ConfigError(f"layer_fraction must be in [0, 1], got {self.layer_fraction}")
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be > 0, got {self.max_tokens}")
        if self.max_concurrent_requests <= 0:
            raise ConfigError(f"max_concurrent_requests must be > 0, got {self.max_concurrent_requests}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if (self.max_batch_tokens is not None and self.max_batch_tokens <= 0) or self.max_batch_size <= 0:
            raise ConfigError("max_batch_tokens and max_batch_size must be > 0")

    def layer_for(self, n_layers: int) -> int:
        """The seed's default layer: ``int(n_layers * layer_fraction + 0.5)``."""
        return default_layer(n_layers, self.layer_fraction)
