"""Generation stage: answers from any OpenAI-compatible chat endpoint, committed to the catalog as they arrive.

One request path serves both the catalog pipeline (:func:`run_generation`) and the seed's
:func:`generate_responses`: :class:`ChatEndpoint` sends one chat request with its own retry loop (the ``openai``
client's retries are off so that ``Retry-After`` and the attempt count are ours), and :func:`_worker_pool` runs
requests under the concurrency limit.

What is sent: ``[{"role": "system", "content": <system prompt>}, {"role": "user", "content": <question>}]``. The
system message is always sent, with empty content for an empty system prompt, exactly as extraction renders the
conversation later.

Failure policy: 429, 408/409/425, 5xx, timeouts and dropped connections are retried with exponential backoff and
jitter (``Retry-After`` / ``retry-after-ms`` honoured); when the retries run out the pair is recorded as a failure
(``text`` NULL, ``error`` and ``attempts`` set) and the run goes on. Any other 4xx (bad key, no permission, unknown
model, bad parameters) and a 2xx that is not an OpenAI chat completion stop the run at once with
:class:`EndpointError`. API keys are read from the environment when the run starts and are never stored or logged.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import email.utils
import json
import logging
import os
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import openai

from personavec.config import OPENROUTER_BASE_URL, PersonaVectorConfig, config_dict
from personavec.errors import ConfigError, EndpointError, NotFoundError
from personavec.local_engine import LocalOptions, run_local_generation
from personavec.local_engine import check_local_fields as _local_fields
from personavec.steering import SteeringConfig
from personavec.store.engine import Catalog
from personavec.store.generation import (
    AnswerRow,
    answered_keys,
    create_generation_run,
    discard_empty_run,
    finish_generation_run,
    generation_counts,
    get_generation_run,
    load_sets,
    resume_generation_run,
    upsert_answers,
)
from personavec.store.records import PersonaSet, QuestionSet
from personavec.workspace import Workspace

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses worth retrying: rate limits, request timeout, conflicts, "too early", and every server error.
RETRY_STATUSES = frozenset({408, 409, 425, 429})
#: Hosts for which no API key is needed (a local `transformers serve` / vLLM server ignores it).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})
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
#: Longest wait we accept from a Retry-After header (a longer one is clipped, the run is not stalled for hours).
MAX_RETRY_AFTER_S = 600.0


@dataclass(frozen=True)
class GenerateConfig:
    """What to ask (sets, filters, samples, model, sampling) and how (endpoint, concurrency, timeout, retries).

    Example: ``GenerateConfig(model="smollm2-135m-instruct", base_url="http://127.0.0.1:8000/v1", max_tokens=64)``
    asks a local ``personavec serve`` for every built-in persona x question.

    ``personas`` filters the persona set by name, ``questions`` the question set by position (0-based); empty means
    all. ``max_retries`` counts retries after the first attempt. The API key is read from ``$api_key_env`` at run
    time (not needed for a loopback ``base_url``).
    """

    persona_set: str = "builtin"
    question_set: str = "builtin"
    personas: tuple[str, ...] = ()
    questions: tuple[int, ...] = ()
    n_samples: int = 1
    model: str = "google/gemma-3-27b-it"
    base_url: str = OPENROUTER_BASE_URL
    api_key_env: str = "OPENROUTER_API_KEY"
    temperature: float = 0.7
    max_tokens: int = 256
    top_p: float | None = None
    seed: int | None = None
    concurrency: int = 10
    timeout_s: float = 120.0
    max_retries: int = 6
    backoff_base_s: float = 1.0
    backoff_max_s: float = 60.0
    # Local engine (personavec.local_engine): transformers in this process, optionally steered (personavec.steering).
    engine: str = "remote"
    local: LocalOptions = LocalOptions()
    steering: SteeringConfig | None = None

    def __post_init__(self) -> None:
        _local_fields(self)
        # Lists from JSON (a stored run config) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "personas", tuple(self.personas))
        object.__setattr__(self, "questions", tuple(int(q) for q in self.questions))
        if not self.model:
            raise ConfigError("model must be a non-empty model name (e.g. --model google/gemma-3-27b-it)")
        if self.n_samples <= 0:
            raise ConfigError(f"n_samples must be > 0, got {self.n_samples}")
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
        if self.backoff_base_s < 0 or self.backoff_max_s < self.backoff_base_s:
            raise ConfigError("need 0 <= backoff_base_s <= backoff_max_s")
        if any(q < 0 for q in self.questions):
            raise ConfigError(f"question positions must be >= 0, got {list(self.questions)}")
        url = urlparse(self.base_url)
        if url.scheme not in ("http", "https") or not url.netloc:
            raise ConfigError(f"base_url must be an http(s) URL such as {OPENROUTER_BASE_URL}, got {self.base_url!r}")
        if not self.api_key_env:
            raise ConfigError("api_key_env must name an environment variable (e.g. OPENROUTER_API_KEY)")

    @property
    def is_loopback(self) -> bool:
        """Whether the endpoint is on this machine (then an API key is optional)."""
        return (urlparse(self.base_url).hostname or "") in LOOPBACK_HOSTS

    def api_key(self) -> str:
        """The API key from ``$api_key_env`` (a placeholder for a loopback endpoint without one)."""
        key = os.environ.get(self.api_key_env, "")
        if key:
            return key
        if self.is_loopback:
            return "not-needed"
        raise ConfigError(
            f"no API key: the environment variable {self.api_key_env} is not set. Export it "
            f"(`export {self.api_key_env}=...`) or name another with --api-key-env."
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerateConfig:
        """Rebuild a config from its stored JSON (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# ----------------------------------------------------------------------------------------------- one chat request


@dataclass(frozen=True)
class Completion:
    """One answer from the endpoint."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None
    completion_tokens: int | None
    latency_s: float
    model_reported: str | None
    attempts: int


class RequestFailed(Exception):
    """A request that kept failing with retryable errors until the retries ran out (recorded per pair)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


def _retry_after(headers: Any) -> float | None:
    """Seconds to wait from ``retry-after-ms`` / ``Retry-After`` (seconds or an HTTP date), if present."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


_HINTS = {
    400: "the endpoint rejected the request: check the model name (--model) and the sampling parameters",
    401: "the API key was refused: check the key in ${env}",
    403: "the API key has no access to this model or endpoint",
    404: "not found: check --base-url (it usually ends in /v1) and the model name",
    422: "the endpoint rejected the request parameters",
}


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint with personavec's retry policy.

    Example::

        endpoint = ChatEndpoint(config, api_key=config.api_key())
        answer = await endpoint.complete("You are a pirate.", "How are you?")
        await endpoint.aclose()
    """

    def __init__(self, config: GenerateConfig, api_key: str, *, rng: random.Random | None = None) -> None:
        self.config = config
        self._rng = rng or random.Random()
        # max_retries=0: the retry loop is ours (Retry-After, attempt counts, failure rows).
        self._client = openai.AsyncOpenAI(
            api_key=api_key, base_url=config.base_url, max_retries=0, timeout=config.timeout_s
        )

    async def aclose(self) -> None:
        await self._client.close()

    def _params(self, system_prompt: str, question: str) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": self.config.model,
            "messages": [{"role": "system", "content": system_prompt}, {"role": "user", "content": question}],
            "max_tokens": self.config.max_tokens,
            "temperature": self.config.temperature,
        }
        if self.config.top_p is not None:
            params["top_p"] = self.config.top_p
        if self.config.seed is not None:
            params["seed"] = self.config.seed
        return params

    def _backoff(self, retry: int) -> float:
        # Exponential backoff with "equal jitter": half the step fixed, half random, so clients spread out.
        step = min(self.config.backoff_max_s, self.config.backoff_base_s * 2**retry)
        return step / 2 + self._rng.uniform(0, step / 2)

    def _fatal(self, exc: openai.APIStatusError) -> EndpointError:
        code = exc.status_code
        hint = _HINTS.get(code, "retrying cannot fix this").replace("${env}", f"${self.config.api_key_env}")
        detail = _error_detail(exc)
        return EndpointError(
            f"{self.config.base_url} answered HTTP {code} for model {self.config.model!r}: {detail} ({hint})"
        )

    def _parse(self, status: int, content_type: str, body: str, latency: float, attempts: int) -> Completion:
        where = f"{self.config.base_url}/chat/completions"
        try:
            data = json.loads(body)
        except json.JSONDecodeError:
            raise EndpointError(
                f"{where} is not an OpenAI-compatible endpoint: HTTP {status} with {content_type or 'no content-type'}"
                f" and a body that is not JSON ({body[:80]!r}). Check --base-url (it usually ends in /v1)."
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            raise EndpointError(
                f"{where} is not an OpenAI-compatible endpoint: its JSON answer has no 'choices' "
                f"({body[:120]!r}). Check --base-url."
            )
        message = choices[0].get("message") or {}
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            text = ""  # a refusal/tool call with no text content is still an (empty) answer
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            finish_reason=choices[0].get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=latency,
            model_reported=data.get("model"),
            attempts=attempts,
        )

    async def complete(self, system_prompt: str, question: str) -> Completion:
        """Ask one question under one system prompt.

        Raises :class:`EndpointError` for errors retrying cannot fix and :class:`RequestFailed` once the retries
        for transient errors are used up.
        """
        params = self._params(system_prompt, question)
        last = ""
        for attempt in range(1, self.config.max_retries + 2):
            wait: float | None = None
            start = time.perf_counter()
            try:
                raw = await self._client.chat.completions.with_raw_response.create(**params)
                response = raw.http_response
                return self._parse(
                    response.status_code,
                    response.headers.get("content-type", ""),
                    response.text,
                    time.perf_counter() - start,
                    attempt,
                )
            except openai.APITimeoutError:
                last = f"timed out after {self.config.timeout_s:g} s"
            except openai.APIConnectionError as exc:
                last = f"connection failed: {_cause(exc)}"
            except openai.APIStatusError as exc:
                if exc.status_code not in RETRY_STATUSES and exc.status_code < 500:
                    raise self._fatal(exc) from None
                last = f"HTTP {exc.status_code}: {_error_detail(exc)}"
                wait = _retry_after(exc.response.headers)
            if attempt > self.config.max_retries:
                break
            delay = min(wait, MAX_RETRY_AFTER_S) if wait is not None else self._backoff(attempt - 1)
            log.info("attempt %d failed (%s); retrying in %.2f s", attempt, last, delay)
            await asyncio.sleep(delay)
        attempts = self.config.max_retries + 1
        raise RequestFailed(f"gave up after {attempts} attempts: {last}", attempts)


def _cause(exc: BaseException) -> str:
    cause = exc.__cause__ or exc.__context__
    return f"{type(cause).__name__}: {cause}" if cause is not None else str(exc)


def _error_detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(msg, dict):
            msg = msg.get("message")
        if msg:
            return str(msg)[:300]
    try:
        return exc.response.text[:300] or exc.message
    except Exception:  # a streamed/closed body: fall back to the client's message
        return exc.message


# ------------------------------------------------------------------------------------------------ concurrency


@dataclass(frozen=True)
class _Job:
    system_prompt: str
    question: str
    key: Any


async def _worker_pool(
    endpoint: ChatEndpoint,
    jobs: Sequence[_Job],
    concurrency: int,
    on_result: Callable[[_Job, Completion | RequestFailed], None],
) -> None:
    """Run ``jobs`` with at most ``concurrency`` in flight; ``on_result`` is called on the event-loop thread as each
    finishes. The first :class:`EndpointError` cancels everything in flight and is raised."""
    queue: asyncio.Queue[_Job] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker() -> None:
        while True:
            try:
                job = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            try:
                outcome: Completion | RequestFailed = await endpoint.complete(job.system_prompt, job.question)
            except RequestFailed as exc:
                outcome = exc
            on_result(job, outcome)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, len(jobs)))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also inside a running event loop (Jupyter): there it runs in a
    fresh loop on a helper thread, because a loop cannot be re-entered."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make_coro())
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-generate") as pool:
        return pool.submit(lambda: asyncio.run(make_coro())).result()


# ------------------------------------------------------------------------------------------------ catalog pipeline


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


class _Sink:
    """The one place that writes answers, on the event-loop thread (so there is a single DuckDB writer).

    Group commit: outcomes that finish in the same turn of the event loop are committed together by a callback
    scheduled for the next turn (one statement and one transaction cost ~10 ms in DuckDB, whatever the row count).
    Nothing waits longer than that turn, so a killed process loses only requests in flight and the outcomes of the
    turn it died in; :meth:`flush` is also called when the pool stops for any reason.
    """

    def __init__(
        self, catalog: Catalog, run_id: int, total: int, answered: int, progress: Callable | None, start: float
    ) -> None:
        self.catalog, self.run_id, self.total, self.progress, self.start = catalog, run_id, total, progress, start
        self.answered, self.failed, self.new_answers, self.new_failures = answered, 0, 0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self.pending: list[AnswerRow] = []
        self.commits = 0

    def land(self, job: _Job, outcome: Completion | RequestFailed) -> None:
        persona_id, question_id, sample = job.key
        if isinstance(outcome, RequestFailed):
            row = AnswerRow(persona_id, question_id, sample, None, error=str(outcome), attempts=outcome.attempts)
        else:
            row = AnswerRow(
                persona_id,
                question_id,
                sample,
                outcome.text,
                finish_reason=outcome.finish_reason,
                prompt_tokens=outcome.prompt_tokens,
                completion_tokens=outcome.completion_tokens,
                latency_s=outcome.latency_s,
                model_reported=outcome.model_reported,
                attempts=outcome.attempts,
            )
        if not self.pending:
            asyncio.get_running_loop().call_soon(self.flush)
        self.pending.append(row)

    def flush(self) -> None:
        """Commit every pending outcome now (idempotent), then report progress."""
        rows, self.pending = self.pending, []
        if not rows:
            return
        upsert_answers(self.catalog, self.run_id, rows)
        self.commits += 1
        for row in rows:  # counted only once committed: the progress bar never shows what a crash would lose
            if row.text is None:
                self.failed += 1
                self.new_failures += 1
            else:
                self.answered += 1
                self.new_answers += 1
                self.prompt_tokens += row.prompt_tokens or 0
                self.completion_tokens += row.completion_tokens or 0
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            self.progress(
                GenerationProgress(
                    run_id=self.run_id,
                    total=self.total,
                    answered=self.answered,
                    failed=self.failed,
                    new_answers=self.new_answers,
                    prompt_tokens=self.prompt_tokens,
                    completion_tokens=self.completion_tokens,
                    elapsed_s=time.perf_counter() - self.start,
                )
            )


def _select(config: GenerateConfig, pset: PersonaSet, qset: QuestionSet) -> tuple[list, list]:
    personas = list(pset.personas)
    if config.personas:
        by_name = pset.by_name()
        unknown = [n for n in config.personas if n not in by_name]
        if unknown:
            raise NotFoundError(
                f"persona set {pset.name!r} has no persona named {', '.join(map(repr, unknown))} "
                f"(it has: {', '.join(by_name)})"
            )
        personas = [by_name[n] for n in dict.fromkeys(config.personas)]
    questions = list(qset.questions)
    if config.questions:
        bad = [q for q in config.questions if q >= len(questions)]
        if bad:
            raise ConfigError(
                f"question set {qset.name!r} has {len(questions)} questions (positions 0..{len(questions) - 1}); "
                f"got {bad}"
            )
        questions = [questions[q] for q in dict.fromkeys(config.questions)]
    return personas, questions


def _resolved_config(catalog: Catalog, config: GenerateConfig | None, run_id: int) -> GenerateConfig:
    stored = GenerateConfig.from_dict(get_generation_run(catalog, run_id).run.config)
    if config is None:
        return stored
    changed = [f for f in IDENTITY_FIELDS if getattr(config, f) != getattr(stored, f)]
    if changed:
        detail = ", ".join(f"{f}: run has {getattr(stored, f)!r}, got {getattr(config, f)!r}" for f in changed)
        raise ConfigError(
            f"run {run_id} was started with other settings ({detail}); resume it with the same settings "
            f"or start a new run without --run-id"
        )
    return config


def run_generation(
    target: Workspace | Catalog | str | os.PathLike[str],
    config: GenerateConfig | None = None,
    run_id: int | None = None,
    progress: Callable[[GenerationProgress], None] | None = None,
) -> GenerationResult:
    """Generate answers into the catalog: a new ``generate`` run, or resume ``run_id`` (only pairs/samples without a
    successful answer are asked again; failures are retried and replaced).

    Args:
        target: a workspace (or its path) or an open catalog.
        config: what and how to ask; may be None when resuming (the run's stored config is used). When resuming
            with a config, its identity fields (sets, filters, samples, model, sampling) must match the run's;
            operational ones (endpoint, key variable, concurrency, timeout, retries) may differ.
        run_id: the generate run to resume.
        progress: called with a :class:`GenerationProgress` at the start and after each answer or failure lands.

    Returns:
        a :class:`GenerationResult`. Raises :class:`EndpointError` when the endpoint fails in a way retrying cannot
        fix (the run is marked failed, its answers kept; a new run with no answer at all is removed).

    Example: ``run_generation(Workspace.resolve("ws"), GenerateConfig(model="m", base_url=url, max_tokens=32))``.
    """
    if config is None and run_id is None:
        raise ConfigError("run_generation needs a config (new run) or a run_id (resume)")
    if isinstance(target, Catalog):
        return _generation(target, config, run_id, progress)
    ws = target if isinstance(target, Workspace) else Workspace.resolve(Path(target))
    with ws.catalog() as catalog:
        return _generation(catalog, config, run_id, progress)


def _generation(
    catalog: Catalog,
    config: GenerateConfig | None,
    run_id: int | None,
    progress: Callable[[GenerationProgress], None] | None,
) -> GenerationResult:
    start = time.perf_counter()
    resumed = run_id is not None
    if run_id is not None:
        config = _resolved_config(catalog, config, run_id)
    assert config is not None  # narrowed above; run_generation checks the inputs
    if config.engine == "local":  # transformers in this process: personavec.local_engine
        return run_local_generation(Workspace(catalog.path.parent), config, resume=run_id, progress=progress)
    api_key = config.api_key()  # before anything is written: a missing key leaves no run behind
    pset, qset = load_sets(catalog, config.persona_set, config.question_set)
    personas, questions = _select(config, pset, qset)
    if run_id is None:
        run_id = create_generation_run(
            catalog,
            config_dict(config),
            persona_set_id=pset.id,
            question_set_id=qset.id,
            model=config.model,
            endpoint=config.base_url,
            n_samples=config.n_samples,
            temperature=config.temperature,
            max_tokens=config.max_tokens,
            top_p=config.top_p,
            seed=config.seed,
        )
    else:
        resume_generation_run(catalog, run_id)
    done = answered_keys(catalog, run_id)
    jobs = [
        _Job(p.system_prompt, q.text, (p.id, q.id, s))
        for p in personas
        for q in questions
        for s in range(config.n_samples)
        if (p.id, q.id, s) not in done
    ]
    total = len(personas) * len(questions) * config.n_samples
    sink = _Sink(catalog, run_id, total, total - len(jobs), progress, start)
    sink.report()

    async def main() -> None:
        endpoint = ChatEndpoint(config, api_key)
        try:
            await _worker_pool(endpoint, jobs, config.concurrency, sink.land)
        finally:
            sink.flush()  # whatever finished before a stop (fatal error, Ctrl-C) still lands
            await endpoint.aclose()

    status, error = "done", None
    try:
        if jobs:
            _run_sync(main)
    except EndpointError as exc:
        if not resumed and discard_empty_run(catalog, run_id):
            raise  # bad input stopped a fresh run before any answer: nothing is left behind
        finish_generation_run(catalog, run_id, "failed", str(exc))
        raise EndpointError(f"{exc} [run {run_id} stopped; resume with --run-id {run_id}]") from None
    except (KeyboardInterrupt, asyncio.CancelledError):
        finish_generation_run(catalog, run_id, "interrupted", "interrupted by the user")
        raise
    except BaseException as exc:
        finish_generation_run(catalog, run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    counts = generation_counts(catalog, run_id)
    if counts["failures"]:
        status = "failed"
        error = (
            f"{counts['failures']} of {total} requests failed after retries; "
            f"rerun with --run-id {run_id} to retry only those"
        )
    finish_generation_run(catalog, run_id, status, error)
    return GenerationResult(
        run_id=run_id,
        status=status,
        resumed=resumed,
        total=total,
        answers=counts["answers"],
        failures=counts["failures"],
        new_answers=sink.new_answers,
        new_failures=sink.new_failures,
        requested=len(jobs),
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        wall_s=time.perf_counter() - start,
        error=error,
    )


# ------------------------------------------------------------------------------------------------ seed API


def generate_responses(
    personas: dict[str, str], questions: Sequence[str], config: PersonaVectorConfig
) -> dict[tuple[str, str], str]:
    """The seed's API: ask every persona (name -> system prompt) every question; returns ``{(persona, question):
    text}``. No catalog involved. Works from scripts and inside a running event loop (Jupyter).

    Model: ``config.openrouter_model`` or else ``config.model_name``; endpoint ``config.base_url``; key
    ``config.openrouter_api_key`` or else ``$config.api_key_env``. Pairs that still fail after the retries are left
    out of the result (logged); errors retrying cannot fix raise :class:`EndpointError`.
    """
    gen = GenerateConfig(
        model=config.openrouter_model or config.model_name,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        temperature=config.temperature,
        max_tokens=config.max_tokens,
        concurrency=config.max_concurrent_requests,
    )
    api_key = config.openrouter_api_key or gen.api_key()
    jobs = [_Job(prompt, q, (name, q)) for name, prompt in personas.items() for q in questions]
    out: dict[tuple[str, str], str] = {}

    def collect(job: _Job, outcome: Completion | RequestFailed) -> None:
        if isinstance(outcome, RequestFailed):
            log.warning("no answer for %s: %s", job.key, outcome)
        else:
            out[job.key] = outcome.text

    async def main() -> None:
        endpoint = ChatEndpoint(gen, api_key)
        try:
            await _worker_pool(endpoint, jobs, gen.concurrency, collect)
        finally:
            await endpoint.aclose()

    if jobs:
        _run_sync(main)
    return out


__all__ = [
    "ChatEndpoint",
    "Completion",
    "GenerateConfig",
    "GenerationProgress",
    "GenerationResult",
    "RequestFailed",
    "generate_responses",
    "run_generation",
]
