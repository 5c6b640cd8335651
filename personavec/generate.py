"""Generation stage: answers from any OpenAI-compatible chat endpoint, committed to the catalog as they arrive.

One request path serves both the catalog pipeline (:func:`run_generation`) and the seed's
:func:`generate_responses`: :class:`ChatEndpoint` sends one chat request through the ``openai`` client (its aiohttp
backend), whose own retries do the waiting (``max_retries=config.max_retries``), and :func:`_worker_pool` runs
requests under the concurrency limit, round-robin over the base URLs (replicas of one model). The attempts of each
answer (stored in ``responses.attempts``) are counted by a request hook on the client's HTTP client.

Speed (``scripts/bench_generate.py``): the event loop only asks and parses; answers are committed by one writer on
a worker thread (:class:`_Sink`), in batches at most every :data:`personavec.writer.COMMIT_INTERVAL_S`, so the loop
never waits for DuckDB and one commit's fixed cost is shared by every answer that arrived meanwhile.

What is sent: ``[{"role": "system", "content": <system prompt>}, {"role": "user", "content": <question>}]``. The
system message is always sent, with empty content for an empty system prompt, exactly as extraction renders the
conversation later.

Failure policy (the ``openai`` client's): 408, 409, 429, 5xx, timeouts and dropped connections are retried with
exponential backoff (0.5 s doubling to 8 s, minus up to 25 % jitter), or after the server's ``retry-after-ms`` /
``Retry-After`` when that is between 0 and 120 s. A longer ``Retry-After`` is not waited for: the client gives up on
that request at once (our cap on huge waits is the client's). When a retryable error outlasts the retries the pair is
recorded as a failure (``text`` NULL, ``error`` and ``attempts`` set) and the run goes on; resuming the run asks it
again. Any other 4xx (bad key, no permission, unknown model, bad parameters, and 425, which the client does not retry)
and a 2xx that is not an OpenAI chat completion stop the run at once with :class:`EndpointError`.

API keys: read from the environment when the run starts, never stored, and sent only where the user named them. The
variable named by ``api_key_env`` goes to the run's base URLs, except the default one, ``$OPENROUTER_API_KEY``, which
goes only to OpenRouter (``openrouter.ai``): pointing ``--base-url`` elsewhere does not hand your OpenRouter key to
that host. An endpoint without a key gets no ``Authorization`` header at all, and neither ``$OPENAI_API_KEY`` nor
``$OPENAI_ORG_ID``/``$OPENAI_PROJECT_ID`` (which the ``openai`` client reads by itself) is sent anywhere. Key values are
redacted from every error message that is stored or printed (an endpoint may echo the header back).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import dataclasses
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import urlparse

import httpx2
import openai

from personavec.config import (
    OPENROUTER_BASE_URL,
    PersonaVectorConfig,
    check_selection,
    config_dict,
    config_from_dict,
)
from personavec.errors import ConfigError, EndpointError, RunInterrupted, Terminated
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
from personavec.store.records import Persona, PersonaSet, Question, QuestionSet
from personavec.workspace import Workspace
from personavec.writer import GroupCommitWriter

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Statuses the ``openai`` client retries (rate limits, request timeout, lock conflicts) besides every 5xx; when they
#: outlast the retries the pair is recorded as a failure, any other error status stops the run.
RETRY_STATUSES = frozenset({408, 409, 429})
#: Hosts for which no API key is needed (a local `transformers serve` / vLLM server ignores it).
LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1", "0.0.0.0"})
#: The default key variable, and the only host it is ever sent to.
DEFAULT_KEY_ENV = "OPENROUTER_API_KEY"
DEFAULT_KEY_HOST = urlparse(OPENROUTER_BASE_URL).hostname
REDACTED = "<redacted>"  # no square brackets: Rich would read them as markup
#: What is stored of one answer: at most this many UTF-8 bytes per requested token (``max_tokens``), and never more
#: than :data:`MAX_ANSWER_BYTES`; a longer answer is cut and stored with ``finish_reason`` "truncated".
MAX_BYTES_PER_TOKEN = 64
MAX_ANSWER_BYTES = 1 << 20
TRUNCATED = "truncated"
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
    # Local engine (personavec.local_engine): transformers in this process, optionally steered (personavec.steering).
    engine: str = "remote"
    local: LocalOptions = LocalOptions()
    steering: SteeringConfig | None = None

    def __post_init__(self) -> None:
        _local_fields(self)
        # Lists from JSON (a stored run config) become tuples so the config stays hashable and comparable.
        object.__setattr__(self, "personas", tuple(self.personas))
        object.__setattr__(self, "replicas", tuple(self.replicas))
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
        config = dataclasses.replace(original, **overrides)
        if "api_key_env" not in overrides and config.base_urls != original.base_urls:
            # The run's key variable was named for its endpoints, not for new ones: those get the default rule.
            config = dataclasses.replace(config, api_key_env=DEFAULT_KEY_ENV)
        changed = [f for f in IDENTITY_FIELDS if getattr(config, f) != getattr(original, f)]
        if changed:
            detail = ", ".join(f"{f}: run has {getattr(original, f)!r}, got {getattr(config, f)!r}" for f in changed)
            raise ConfigError(
                f"run {run_id} was started with other settings ({detail}); resume it with the same settings "
                f"or start a new run without --resume"
            )
        return config


def resume_config(ws: Workspace, run_id: int, **overrides: Any) -> GenerateConfig:
    """The config to resume generate run ``run_id`` of ``ws`` with: its stored config, ``overrides`` on top (see
    :meth:`GenerateConfig.resumed`). Example: ``resume_config(ws, 5, base_url="http://127.0.0.1:8001/v1")``."""
    return GenerateConfig.resumed(run_id, get_generation_run(ws.catalog(), run_id).run.config, **overrides)


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
    logprobs: Any = None  # ``choices[0].logprobs`` as the endpoint sent it (asked for by the judge), else None


class RequestFailed(Exception):
    """A request that kept failing with retryable errors until the retries ran out (recorded per pair)."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class _Attempts:
    """HTTP requests sent for one answer so far, and when the last one left (set by :func:`_on_request`)."""

    __slots__ = ("count", "started")

    def __init__(self) -> None:
        self.count = 0
        self.started = time.perf_counter()


# The answer being asked in the current task; the client's request hook counts its HTTP requests (its retries).
_CURRENT: contextvars.ContextVar[_Attempts | None] = contextvars.ContextVar("personavec_attempts", default=None)


async def _on_request(request: Any) -> None:
    attempts = _CURRENT.get()
    if attempts is not None:
        attempts.count += 1
        attempts.started = time.perf_counter()


_HINTS = {
    400: "the endpoint rejected the request: check the model name (--model) and the sampling parameters",
    401: "the API key was refused: check the key in ${env}",
    -401: "no API key was sent to this endpoint: name the environment variable holding its key with --api-key-env"
    " ($OPENROUTER_API_KEY is only sent to openrouter.ai)",
    403: "the API key has no access to this model or endpoint",
    404: "not found: check --base-url (it usually ends in /v1) and the model name",
    422: "the endpoint rejected the request parameters",
}


def _http_client() -> Any:
    """The ``openai`` client's aiohttp backend (about twice as fast per request as its default httpx one), with the
    request hook that counts attempts; the httpx backend where the ``aiohttp`` extra is not installed."""
    hooks = {"request": [_on_request]}
    try:
        return openai.DefaultAioHttpClient(event_hooks=hooks)
    except RuntimeError:  # openai without the aiohttp extra
        return openai.DefaultAsyncHttpxClient(event_hooks=hooks)


class ChatEndpoint:
    """An OpenAI-compatible chat endpoint, asked through the ``openai`` client with its retries.

    Example::

        endpoint = ChatEndpoint(config, api_key=config.api_keys()[config.base_url])
        answer = await endpoint.complete("You are a pirate.", "How are you?")
        await endpoint.aclose()

    ``base_url`` picks one of ``config.base_urls`` (default ``config.base_url``); ``api_key`` None sends no
    ``Authorization`` header. The key is redacted from every error this endpoint raises. ``extra_body`` adds fields
    to every request (the judge asks for ``logprobs``/``top_logprobs`` this way).
    """

    def __init__(
        self,
        config: GenerateConfig,
        api_key: str | None,
        *,
        base_url: str | None = None,
        extra_body: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.base_url = base_url or config.base_url
        self._secrets = (api_key,) if api_key else ()
        self._client = openai.AsyncOpenAI(
            api_key=api_key or "unused",  # never sent: the header is omitted per request below
            base_url=self.base_url,
            max_retries=config.max_retries,
            timeout=config.timeout_s,
            http_client=_http_client(),
        )
        # The client would add $OPENAI_ORG_ID / $OPENAI_PROJECT_ID to every request, to any host: omit them, and
        # the Authorization header where there is no key.
        omit = ("OpenAI-Organization", "OpenAI-Project") + (() if api_key else ("Authorization",))
        self._options: openai.RequestOptions = {"headers": dict.fromkeys(omit, openai.Omit())}
        self._fixed: dict[str, Any] = {"model": config.model, "max_tokens": config.max_tokens}
        self._fixed["temperature"] = config.temperature
        if config.top_p is not None:
            self._fixed["top_p"] = config.top_p
        if config.seed is not None:
            self._fixed["seed"] = config.seed
        self._fixed.update(extra_body or {})

    async def aclose(self) -> None:
        await self._client.close()

    def _redact(self, text: str) -> str:
        return redact(text, self._secrets)

    def _fatal(self, exc: openai.APIStatusError) -> EndpointError:
        code = exc.status_code
        hint = _HINTS.get(-code if code == 401 and not self._secrets else code, "retrying cannot fix this")
        hint = hint.replace("${env}", f"${self.config.api_key_env}")
        detail = _error_detail(exc, self._secrets)
        return EndpointError(
            self._redact(f"{self.base_url} answered HTTP {code} for model {self.config.model!r}: {detail} ({hint})")
        )

    def _parse(self, response: httpx2.Response, latency: float, attempts: int) -> Completion:
        where = f"{self.base_url}/chat/completions"
        body = response.content
        try:
            data = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError):
            content_type = response.headers.get("content-type") or "no content-type"
            start = self._redact(body.decode("utf-8", "replace"))[:80]
            raise EndpointError(
                f"{where} is not an OpenAI-compatible endpoint: HTTP {response.status_code} with {content_type}"
                f" and a body that is not JSON ({start!r}). Check --base-url (it usually ends in /v1)."
            ) from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
            start = self._redact(body.decode("utf-8", "replace"))[:120]
            raise EndpointError(
                f"{where} is not an OpenAI-compatible endpoint: its JSON answer has no 'choices' ({start!r}). "
                "Check --base-url."
            )
        message = choices[0].get("message") or {}
        text = message.get("content") if isinstance(message, dict) else None
        if not isinstance(text, str):
            text = ""  # a refusal/tool call with no text content is still an (empty) answer
        usage = data.get("usage") or {}
        finish, model, logprobs = choices[0].get("finish_reason"), data.get("model"), choices[0].get("logprobs")
        # An endpoint may echo a key in a 200 answer too: every field that is stored is redacted (before any cut, so
        # that no part of a key survives one).
        if any(secret.encode() in body for secret in self._secrets):
            text = self._redact(text)
            finish, model = (self._redact(v) if isinstance(v, str) else v for v in (finish, model))
            if logprobs is not None:
                logprobs = json.loads(self._redact(json.dumps(logprobs)))
        # What is stored is bounded by what was asked: max_tokens tokens, at most MAX_ANSWER_BYTES.
        limit = min(MAX_ANSWER_BYTES, max(int(self.config.max_tokens), 1) * MAX_BYTES_PER_TOKEN)
        if len(body) > limit:
            raw = text.encode("utf-8")
            if len(raw) > limit:
                text, finish = raw[:limit].decode("utf-8", "ignore"), TRUNCATED
            if isinstance(logprobs, dict) and isinstance(logprobs.get("content"), list):
                logprobs = {**logprobs, "content": logprobs["content"][:1]}  # the judge reads the first token only
            if len(json.dumps(logprobs)) > MAX_ANSWER_BYTES:
                logprobs = None
        return Completion(
            text=text,
            finish_reason=finish if not isinstance(finish, str) else finish[:64],
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
            latency_s=latency,
            model_reported=model if not isinstance(model, str) else model[:256],
            attempts=attempts,
            logprobs=logprobs,
        )

    async def complete(self, system_prompt: str | None, question: str) -> Completion:
        """Ask one question under one system prompt (the client retries transient errors); a ``None`` system
        prompt sends the user message alone (the judge's requests).

        Raises :class:`EndpointError` for errors retrying cannot fix and :class:`RequestFailed` when a transient
        error outlasts the retries.
        """
        messages = [{"role": "user", "content": question}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        body = {**self._fixed, "messages": messages}
        attempts = _Attempts()
        token = _CURRENT.set(attempts)
        try:
            # ``post`` rather than ``chat.completions.create``: the same request, retries and errors, without the
            # typed-params transform and response model (~1 ms a request, half the client's time); we parse below.
            response = await self._client.post(
                "/chat/completions", body=body, cast_to=httpx2.Response, options=self._options
            )
        except openai.APIConnectionError as exc:  # APITimeoutError included
            raise self._failed(_connection_problem(exc, self.config.timeout_s), attempts) from None
        except openai.APIStatusError as exc:
            if exc.status_code not in RETRY_STATUSES and exc.status_code < 500:
                raise self._fatal(exc) from None
            raise self._failed(f"HTTP {exc.status_code}: {_error_detail(exc, self._secrets)}", attempts) from None
        finally:
            _CURRENT.reset(token)
        return self._parse(response, time.perf_counter() - attempts.started, attempts.count)

    def _failed(self, last: str, attempts: _Attempts) -> RequestFailed:
        n = max(attempts.count, 1)
        return RequestFailed(self._redact(f"gave up after {n} attempt{'s' if n > 1 else ''}: {last}"), n)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret value replaced by ``<redacted>`` (an endpoint may echo the key in an error)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return text


def _connection_problem(exc: openai.APIConnectionError, timeout_s: float) -> str:
    # The aiohttp backend reports a dropped connection as a (connect) timeout: name the root cause instead.
    root: BaseException = exc
    while root.__cause__ is not None:
        root = root.__cause__
    if isinstance(root, TimeoutError) or (root is exc and isinstance(exc, openai.APITimeoutError)):
        return f"timed out after {timeout_s:g} s"
    return f"connection failed: {type(root).__name__}: {root}"


def _error_detail(exc: openai.APIStatusError, secrets: Iterable[str]) -> str:
    """The endpoint's error message, secrets redacted before it is shortened (a cut could keep part of a key)."""
    body = exc.body
    msg: Any = None
    if isinstance(body, dict):
        msg = body.get("message") or body.get("detail") or body.get("error")
        if isinstance(msg, dict):
            msg = msg.get("message")
    if not msg:
        try:
            msg = exc.response.text or exc.message
        except Exception:  # a streamed/closed body: fall back to the client's message
            msg = exc.message
    return redact(str(msg), secrets)[:300]


# ------------------------------------------------------------------------------------------------ concurrency


@dataclass(frozen=True)
class _Job:
    system_prompt: str | None
    question: str
    key: Any


async def _worker_pool(
    endpoints: Sequence[ChatEndpoint],
    jobs: Iterable[_Job],
    n_jobs: int,
    concurrency: int,
    on_result: Callable[[_Job, Completion | RequestFailed], None],
) -> None:
    """Run ``n_jobs`` jobs, taken lazily from ``jobs``, with at most ``concurrency`` in flight, each request on the
    next of ``endpoints`` in turn (round-robin over replicas); ``on_result`` is called on the event-loop thread as
    each finishes. The first :class:`EndpointError` (or error of ``on_result``) cancels everything in flight and is
    raised."""
    todo = iter(jobs)
    turn = itertools.cycle(endpoints)

    async def worker() -> None:
        for job in todo:  # one shared iterator: each job is taken by exactly one worker
            try:
                outcome: Completion | RequestFailed = await next(turn).complete(job.system_prompt, job.question)
            except RequestFailed as exc:
                outcome = exc
            on_result(job, outcome)

    tasks = [asyncio.create_task(worker()) for _ in range(min(concurrency, n_jobs))]
    try:
        await asyncio.gather(*tasks)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _ask_all(
    config: GenerateConfig,
    keys: Mapping[str, str | None],
    jobs: Iterable[_Job],
    n_jobs: int,
    on_result: Callable[[_Job, Completion | RequestFailed], None],
    extra_body: Mapping[str, Any] | None = None,
) -> None:
    """Ask ``n_jobs`` jobs over one client per base URL of ``config`` (with its key from ``keys``), closing the clients
    however it ends."""
    for url in config.base_urls:
        await _check_reachable(url, min(config.timeout_s, CONNECT_CHECK_S))
    endpoints = [ChatEndpoint(config, keys.get(url), base_url=url, extra_body=extra_body) for url in config.base_urls]
    try:
        await _worker_pool(endpoints, jobs, n_jobs, config.concurrency, on_result)
    finally:
        for endpoint in endpoints:
            await endpoint.aclose()


#: Seconds the first connection to each endpoint may take before the run stops (the client's retries would wait
#: out every attempt's full timeout, minutes in all, saying nothing).
CONNECT_CHECK_S = 10.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")


async def _check_reachable(url: str, timeout_s: float) -> None:
    """Fail at once when nothing can answer at ``url``: connection refused, an unknown host, no route, or no
    connection within ``timeout_s`` (skipped behind a proxy, where the proxy connects)."""
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARS):
        return
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    where = f"{url}: {host}:{port}"
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
    except ConnectionRefusedError:
        raise EndpointError(
            f"{where} refused the connection: nothing is listening there. Start the server, or check --base-url"
        ) from None
    except TimeoutError:
        raise EndpointError(
            f"{where} accepted no connection within {timeout_s:g} s: check --base-url, the network or a firewall"
        ) from None
    except OSError as exc:  # unknown host (gaierror), no route, network down
        raise EndpointError(f"{where} cannot be reached: {exc.strerror or exc}. Check --base-url") from None
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass


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
    """The one writer of answers: a :class:`personavec.writer.GroupCommitWriter` that upserts them (outcomes queued on
    the event-loop thread, committed in groups by one writer task on a worker thread, so requests keep flowing during
    a commit; see that module for the group-commit rule), and the run's counts and progress, updated once a group is
    committed. A failing writer raises its error in the producer at the next :meth:`land`, and at :meth:`close`,
    which commits whatever is still queued.
    """

    def __init__(
        self, catalog: Catalog, run_id: int, total: int, answered: int, progress: Callable | None, start: float
    ) -> None:
        self.run_id, self.total, self.progress, self.start = run_id, total, progress, start
        self.answered, self.failed, self.new_answers, self.new_failures = answered, 0, 0, 0
        self.prompt_tokens = self.completion_tokens = 0
        self._writer: GroupCommitWriter[AnswerRow] = GroupCommitWriter(
            lambda rows: upsert_answers(catalog, run_id, rows), self._count
        )

    def begin(self) -> None:
        """Start the writer task (inside the running event loop)."""
        self._writer.begin()

    def land(self, job: _Job, outcome: Completion | RequestFailed) -> None:
        self._writer.put(_answer_row(job.key, outcome))

    async def close(self) -> None:
        """Commit everything queued and stop the writer; raises the writer's error if it failed."""
        await self._writer.close()

    def _count(self, rows: list[AnswerRow]) -> None:
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


def _answer_row(key: tuple[int, int, int], outcome: Completion | RequestFailed) -> AnswerRow:
    persona_id, question_id, sample = key
    if isinstance(outcome, RequestFailed):
        return AnswerRow(persona_id, question_id, sample, None, error=str(outcome), attempts=outcome.attempts)
    return AnswerRow(
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


def _selected(config: GenerateConfig, pset: PersonaSet, qset: QuestionSet) -> tuple[list[Persona], list[Question]]:
    by_name = pset.by_name()
    check_selection(f"persona set {pset.name!r}", config.personas, None, by_name, 0)
    check_selection(f"question set {qset.name!r}", None, config.questions, (), len(qset.questions))
    personas = [by_name[n] for n in dict.fromkeys(config.personas)] if config.personas else list(pset.personas)
    questions = [qset.questions[q] for q in dict.fromkeys(config.questions)] if config.questions else qset.questions
    return personas, list(questions)


def run_generation(
    ws: Workspace,
    config: GenerateConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[GenerationProgress], None] | None = None,
) -> GenerationResult:
    """Generate answers into the workspace's catalog: a new ``generate`` run, or resume run ``resume`` (only
    pairs/samples without a successful answer are asked again; failures are retried and replaced).

    Args:
        ws: the workspace.
        config: what and how to ask. May be None when resuming: the run's stored config is used (see
            :func:`resume_config` to change its operational fields first). When resuming with a config, its identity
            fields (sets, filters, samples, model, sampling) must match the run's.
        resume: the generate run to resume.
        progress: called with a :class:`GenerationProgress` at the start and after each batch of answers lands.

    Returns:
        a :class:`GenerationResult`. Raises :class:`EndpointError` when the endpoint fails in a way retrying cannot
        fix (the run is marked failed, its answers kept; a new run with no answer at all is removed).

    Example: ``run_generation(ws, GenerateConfig(model="m", base_url=url, max_tokens=32))``, later
    ``run_generation(ws, None, resume=result.run_id)``.
    """
    start = time.perf_counter()
    catalog = ws.catalog()
    if resume is not None:
        stored = get_generation_run(catalog, resume).run.config
        if (config.engine if config is not None else stored.get("engine", "remote")) == "local":
            return run_local_generation(ws, config, resume=resume, progress=progress)
        config = GenerateConfig.resumed(resume, stored, **(dataclasses.asdict(config) if config else {}))
    elif config is None:
        raise ConfigError("run_generation needs a config (new run) or resume=RUN_ID")
    elif config.engine == "local":  # transformers in this process: personavec.local_engine
        return run_local_generation(ws, config, progress=progress)
    keys = config.api_keys()  # before anything is written: a missing key leaves no run behind
    secrets = [k for k in keys.values() if k]
    pset, qset = load_sets(catalog, config.persona_set, config.question_set)
    personas, questions = _selected(config, pset, qset)
    if resume is None:
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
        run_id = resume
        resume_generation_run(catalog, run_id)
    done = answered_keys(catalog, run_id)
    # Jobs are generated as they are asked, never listed: a run of a billion requests must not plan in memory.
    jobs = (
        _Job(p.system_prompt, q.text, (p.id, q.id, s))
        for p in personas
        for q in questions
        for s in range(config.n_samples)
        if (p.id, q.id, s) not in done
    )
    total = len(personas) * len(questions) * config.n_samples
    pids, qids = {p.id for p in personas}, {q.id for q in questions}
    n_todo = total - sum(1 for p, q, s in done if p in pids and q in qids and s < config.n_samples)
    sink = _Sink(catalog, run_id, total, total - n_todo, progress, start)
    sink.report()

    async def main() -> None:
        sink.begin()
        try:
            await _ask_all(config, keys, jobs, n_todo, sink.land)
        finally:
            await sink.close()  # whatever finished before a stop (fatal error, Ctrl-C) still lands

    status, error = "done", None
    try:
        if n_todo:
            _run_sync(main)
    except EndpointError as exc:
        if resume is None and discard_empty_run(catalog, run_id):
            raise  # bad input stopped a fresh run before any answer: nothing is left behind
        finish_generation_run(catalog, run_id, "failed", str(exc))
        raise EndpointError(f"{exc} [run {run_id} stopped; resume with --resume {run_id}]") from None
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        how = "terminated (SIGTERM)" if isinstance(exc, Terminated) else "interrupted by the user"
        finish_generation_run(catalog, run_id, "interrupted", how)
        raise RunInterrupted(run_id, f"personavec generate --resume {run_id}") from exc
    except BaseException as exc:
        finish_generation_run(catalog, run_id, "failed", redact(f"{type(exc).__name__}: {exc}", secrets))
        raise
    counts = generation_counts(catalog, run_id)
    if counts["failures"]:
        status = "failed"
        error = (
            f"{counts['failures']} of {total} requests failed after retries; "
            f"rerun with --resume {run_id} to retry only those"
        )
    finish_generation_run(catalog, run_id, status, error)
    return GenerationResult(
        run_id=run_id,
        status=status,
        resumed=resume is not None,
        total=total,
        answers=counts["answers"],
        failures=counts["failures"],
        new_answers=sink.new_answers,
        new_failures=sink.new_failures,
        requested=n_todo,
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
    # A key given in the config itself was named for this config's endpoint; else the environment rule applies.
    keys = {url: config.openrouter_api_key for url in gen.base_urls} if config.openrouter_api_key else gen.api_keys()
    jobs = [_Job(prompt, q, (name, q)) for name, prompt in personas.items() for q in questions]
    out: dict[tuple[str, str], str] = {}

    def collect(job: _Job, outcome: Completion | RequestFailed) -> None:
        if isinstance(outcome, RequestFailed):
            log.warning("no answer for %s: %s", job.key, outcome)
        else:
            out[job.key] = outcome.text

    async def main() -> None:
        await _ask_all(gen, keys, jobs, len(jobs), collect)

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
    "resume_config",
    "run_generation",
]
