"""What a generation run asks and how: :class:`GenerateConfig` (endpoint or local engine), its identity fields and
the rule that resumes it, the local engine's options, and the stage's progress and result records."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

from personavec.config import DTYPES, OPENROUTER_BASE_URL, config_from_dict, resumed_config
from personavec.errors import ConfigError
from personavec.steering.interventions import SteeringConfig
from personavec.store.generation import get_generation_run
from personavec.workspace import Workspace

#: Prompt formats of the local engine (as in :mod:`personavec.spans`).
PROMPT_FORMATS = ("chat", "raw")


@dataclass(frozen=True)
class LocalOptions:
    """How the local engine runs (operational: a resumed run may change them).

    Attributes:
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda:N"``; ignored with ``device_map``.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device_map: ``from_pretrained``'s ``device_map`` for a model larger than one device (e.g. ``"auto"``).
        batch_size: answers generated together.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"``).
        prompt_format: ``"chat"`` (chat template) or ``"raw"`` (``System: ...\\n\\nUser: ...\\n\\nAssistant: ``).
    """

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    batch_size: int = 16
    attn_implementation: str | None = "sdpa"
    prompt_format: str = "chat"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.batch_size <= 0:
            raise ConfigError(f"batch_size must be > 0, got {self.batch_size}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(
                f"prompt_format (--format) must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}"
            )


ENGINES = ("remote", "local")


#: Hosts for which no API key is needed (a local `transformers serve` / vLLM server ignores it).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})


#: The default key variable, and the only host it is ever sent to.
DEFAULT_KEY_ENV = "OPENROUTER_API_KEY"


DEFAULT_KEY_HOST = urlparse(OPENROUTER_BASE_URL).hostname


#: Fields that define what a run asks for; a resumed run must keep them (the others are operational knobs).
IDENTITY_FIELDS = (
    "persona_set",
    "question_set",
    "personas",
    "questions",
    "n_samples",
    "model",
    "temperature",
    "max_tokens",
    "top_p",
    "seed",
    "engine",
    "steering",
)


@dataclass(frozen=True)
class GenerateConfig:
    """What to ask (sets, filters, samples, model, sampling) and how (endpoint, concurrency, timeout, retries).

    Example: ``GenerateConfig(model="smollm2-135m-instruct", base_url="http://127.0.0.1:8000/v1", max_tokens=64)``
    asks a local ``personavec serve`` for every built-in persona x question.

    ``personas`` filters the persona set by name, ``questions`` the question set by position (0-based); empty means
    all. ``replicas`` are more base URLs serving the same model (e.g. several vLLM hosts): requests go round-robin
    over ``base_url`` and them (:attr:`base_urls`), a request's retries to the same one. ``max_retries`` counts
    retries after the first attempt (the ``openai`` client's backoff waits between them). The API key is read from
    ``$api_key_env`` at run time and sent to every base URL, except ``$OPENROUTER_API_KEY`` (the default), which is
    sent only to ``openrouter.ai``; see :meth:`api_keys`.
    """

    persona_set: str = "builtin"
    question_set: str = "builtin"
    personas: tuple[str, ...] = ()
    questions: tuple[int, ...] = ()
    n_samples: int = 1
    model: str = "google/gemma-3-27b-it"
    base_url: str = OPENROUTER_BASE_URL
    replicas: tuple[str, ...] = ()
    api_key_env: str = DEFAULT_KEY_ENV
    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float | None = None
    seed: int | None = None
    concurrency: int = 10
    timeout_s: float = 120.0
    max_retries: int = 6
    # Local engine (personavec.generation.local): transformers in this process, optionally steered.
    engine: str = "remote"
    local: LocalOptions = LocalOptions()
    steering: SteeringConfig | None = None

    def __post_init__(self) -> None:
        check_local_fields(self)
        # Lists from JSON (a stored run config) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "personas", tuple(self.personas))
        object.__setattr__(self, "replicas", tuple(self.replicas))
        object.__setattr__(self, "questions", tuple(int(q) for q in self.questions))
        if not self.model:
            raise ConfigError("model must be a non-empty model name (e.g. --model google/gemma-3-27b-it)")
        if self.n_samples <= 0:
            raise ConfigError(f"n_samples (-n) must be > 0, got {self.n_samples}")
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be > 0, got {self.max_tokens}")
        if not 0.0 <= self.temperature <= 2.0:
            raise ConfigError(f"temperature must be in [0, 2], got {self.temperature}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.concurrency <= 0:
            raise ConfigError(f"concurrency must be > 0, got {self.concurrency}")
        if not self.timeout_s > 0:
            raise ConfigError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.max_retries < 0:
            raise ConfigError(f"max_retries must be >= 0, got {self.max_retries}")
        if any(q < 0 for q in self.questions):
            raise ConfigError(f"question positions must be >= 0, got {list(self.questions)}")
        for base_url in self.base_urls:
            url = urlparse(base_url)
            if url.scheme not in ("http", "https") or not url.netloc:
                raise ConfigError(f"base_url must be an http(s) URL such as {OPENROUTER_BASE_URL}, got {base_url!r}")
        if len(set(self.base_urls)) != len(self.base_urls):
            raise ConfigError(f"a base URL is given twice: {list(self.base_urls)}")
        if not self.api_key_env:
            raise ConfigError("api_key_env must name an environment variable (e.g. OPENROUTER_API_KEY)")

    @property
    def base_urls(self) -> tuple[str, ...]:
        """Every endpoint asked, in round-robin order: ``base_url``, then the ``replicas``."""
        return (self.base_url, *self.replicas)

    @property
    def is_loopback(self) -> bool:
        """Whether every endpoint is on this machine (then an API key is optional)."""
        return all((urlparse(url).hostname or "") in LOOPBACK_HOSTS for url in self.base_urls)

    def api_keys(self) -> dict[str, str | None]:
        """The API key to send to each base URL (None: send no key), read from the environment now.

        ``$api_key_env`` goes to every base URL, except the default variable ``$OPENROUTER_API_KEY``, which goes only
        to ``openrouter.ai`` (other hosts get no key). Raises :class:`ConfigError` when a key is needed but its
        variable is not set (a loopback endpoint needs none)."""
        key = os.environ.get(self.api_key_env) or None
        keys: dict[str, str | None] = {}
        for url in self.base_urls:
            host = urlparse(url).hostname or ""
            if self.api_key_env == DEFAULT_KEY_ENV and host != DEFAULT_KEY_HOST:
                keys[url] = None  # the user named no variable for this host
            elif key is None and host not in LOOPBACK_HOSTS:
                raise ConfigError(
                    f"no API key for {url}: the environment variable {self.api_key_env} is not set. Export it "
                    f"(`export {self.api_key_env}=...`) or name the variable that holds this endpoint's key with "
                    "--api-key-env."
                )
            else:
                keys[url] = key
        return keys

    @classmethod
    def resumed(cls, run_id: int, stored: Mapping[str, Any], **overrides: Any) -> GenerateConfig:
        """The config that resumes generate run ``run_id``: its ``stored`` config with ``overrides`` on top (e.g. the
        options given on the command line). Operational fields (endpoint, key variable, concurrency, timeout,
        retries) may change; identity fields (what is asked: sets, filters, samples, model, sampling) must keep the
        run's values, else :class:`ConfigError` names them. New base URLs without a new ``api_key_env`` fall back to
        the default key rule: a key is sent only where its variable was named."""
        original = config_from_dict(cls, dict(stored))
        given = dataclasses.replace(original, **overrides)
        if "api_key_env" not in overrides and given.base_urls != original.base_urls:
            # The run's key variable was named for its endpoints, not for new ones: those get the default rule.
            given = dataclasses.replace(given, api_key_env=DEFAULT_KEY_ENV)
        return resumed_config(dict(stored), given, cls, IDENTITY_FIELDS, what=f"generate run {run_id}")


def resume_config(ws: Workspace, run_id: int, **overrides: Any) -> GenerateConfig:
    """The config to resume generate run ``run_id`` of ``ws`` with: its stored config, ``overrides`` on top (see
    :meth:`GenerateConfig.resumed`). Example: ``resume_config(ws, 5, base_url="http://127.0.0.1:8001/v1")``."""
    return GenerateConfig.resumed(run_id, get_generation_run(ws.catalog(), run_id).run.config, **overrides)


@dataclass(frozen=True)
class GenerationProgress:
    """Progress of a run, passed to the ``progress`` callback after each answer or failure lands."""

    run_id: int
    total: int
    answered: int
    failed: int
    new_answers: int
    prompt_tokens: int
    completion_tokens: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Answers per second landed by this process."""
        return self.new_answers / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class GenerationResult:
    """Summary of a generate run after this call (counts cover the whole run, ``new_*`` this call only)."""

    run_id: int
    status: str
    resumed: bool
    total: int
    answers: int
    failures: int
    new_answers: int
    new_failures: int
    requested: int
    prompt_tokens: int
    completion_tokens: int
    wall_s: float
    error: str | None = None


def check_local_fields(config: GenerateConfig) -> None:
    """``GenerateConfig.__post_init__``'s part for the local engine: stored JSON (dicts) back into ``local`` and
    ``steering``, and the rules tying them to ``engine``."""
    from personavec.steering.interventions import SteeringConfig

    if isinstance(config.local, dict):
        object.__setattr__(config, "local", LocalOptions(**config.local))
    if isinstance(config.steering, dict):
        object.__setattr__(config, "steering", SteeringConfig.from_dict(config.steering))
    if config.engine not in ENGINES:
        raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {config.engine!r}")
    if config.steering is not None and config.engine != "local":
        raise ConfigError("steering needs the local engine (--engine local): a remote endpoint cannot be steered")
