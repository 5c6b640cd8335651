"""The OpenAI-compatible endpoint client: one request path for generation, judging and the seed's helpers.

:class:`ChatEndpoint` sends one chat request through the ``openai`` client (its aiohttp backend), whose own retries
do the waiting (``max_retries=config.max_retries``); :func:`ask_all` runs many requests under a concurrency limit,
round-robin over the base URLs (replicas of one model), and hands each outcome to the caller as it arrives. The
attempts of each answer (stored in ``responses.attempts``) are counted by a request hook on the client's HTTP client.

Failure policy (the ``openai`` client's): 408, 409, 429, 5xx, timeouts and dropped connections are retried with
exponential backoff (0.5 s doubling to 8 s, minus up to 25 % jitter), or after the server's ``retry-after-ms`` /
``Retry-After`` when that is between 0 and 120 s. A longer ``Retry-After`` is not waited for: the client gives up on
that request at once (our cap on huge waits is the client's). When a retryable error outlasts the retries the outcome
is a :class:`~personavec.errors.RequestFailed` (recorded per pair; the run goes on). Any other 4xx (bad key, no
permission, unknown model, bad parameters, and 425, which the client does not retry) and a 2xx that is not an OpenAI
chat completion raise :class:`~personavec.errors.EndpointError`.

API keys: read from the environment when the run starts, never stored, and sent only where the user named them (see
:class:`~personavec.generation.config.GenerateConfig`). Key values are redacted from every error message that is
stored or printed (an endpoint may echo the header back).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import itertools
import json
import os
import signal
import ssl
import threading
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlparse

from personavec.errors import EndpointError, RequestFailed
from personavec.generation.config import GenerateConfig

if TYPE_CHECKING:  # imported where a request is made: the client library takes ~1.5 s to import, and every
    import httpx2  # personavec command that asks no endpoint (extract, runs, serve...) would pay for it
    import openai

T = TypeVar("T")


#: Statuses the ``openai`` client retries (rate limits, request timeout, lock conflicts) besides every 5xx; when they
#: outlast the retries the pair is recorded as a failure, any other error status stops the run.
RETRY_STATUSES = frozenset({408, 409, 429})


REDACTED = "<redacted>"  # no square brackets: Rich would read them as markup
#: What is stored of one answer: at most this many UTF-8 bytes per requested token (``max_tokens``), and never more
#: than :data:`MAX_ANSWER_BYTES`; a longer answer is cut and stored with ``finish_reason`` "truncated".
MAX_BYTES_PER_TOKEN = 64
MAX_ANSWER_BYTES = 1 << 20
TRUNCATED = "truncated"


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


def _tls_context() -> Any:
    """The TLS settings of this process's clients: the client library's defaults (its CA bundle, or the bundle
    ``$SSL_CERT_FILE``/``$SSL_CERT_DIR`` name), built once for each value of those. Built per client they cost
    ~27 ms each (loading the CA bundle), even for an ``http://`` endpoint."""
    return _tls_context_for(os.environ.get("SSL_CERT_FILE"), os.environ.get("SSL_CERT_DIR"))


@functools.cache
def _tls_context_for(cert_file: str | None, cert_dir: str | None) -> Any:
    import httpx2

    return httpx2.create_ssl_context()  # reads the two variables itself


def _http_client() -> Any:
    """The ``openai`` client's aiohttp backend (about twice as fast per request as its default httpx one), with the
    request hook that counts attempts; the httpx backend where the ``aiohttp`` extra is not installed."""
    import openai

    hooks = {"request": [_on_request]}
    try:
        return openai.DefaultAioHttpClient(event_hooks=hooks, verify=_tls_context())
    except RuntimeError:  # openai without the aiohttp extra
        return openai.DefaultAsyncHttpxClient(event_hooks=hooks, verify=_tls_context())


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
        import openai

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
        import httpx2
        import openai

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
    import openai

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


@dataclass(frozen=True)
class Job:
    system_prompt: str | None
    question: str
    key: Any


async def _worker_pool(
    endpoints: Sequence[ChatEndpoint],
    jobs: Iterable[Job],
    n_jobs: int,
    concurrency: int,
    on_result: Callable[[Job, Completion | RequestFailed], None],
    limit: asyncio.Semaphore | None = None,
) -> None:
    """Run ``n_jobs`` jobs, taken lazily from ``jobs``, with at most ``concurrency`` in flight (and each request
    holding ``limit``, shared with other pools, when given), each request on the next of ``endpoints`` in turn
    (round-robin over replicas); ``on_result`` is called on the event-loop thread as each finishes. The first
    :class:`EndpointError` (or error of ``on_result``) cancels everything in flight and is raised."""
    todo = iter(jobs)
    turn = itertools.cycle(endpoints)
    shared = limit or contextlib.nullcontext()

    async def worker() -> None:
        for job in todo:  # one shared iterator: each job is taken by exactly one worker
            try:
                async with shared:
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


async def ask_all(
    config: GenerateConfig,
    keys: Mapping[str, str | None],
    jobs: Iterable[Job],
    n_jobs: int,
    on_result: Callable[[Job, Completion | RequestFailed], None],
    extra_body: Mapping[str, Any] | None = None,
    limit: asyncio.Semaphore | None = None,
) -> None:
    """Ask ``n_jobs`` jobs over one client per base URL of ``config`` (with its key from ``keys``), closing the clients
    however it ends; ``limit``, when given, bounds the requests in flight together with other callers sharing it."""
    for url in config.base_urls:
        await check_reachable(url, min(config.timeout_s, CONNECT_CHECK_S))
    endpoints = [ChatEndpoint(config, keys.get(url), base_url=url, extra_body=extra_body) for url in config.base_urls]
    try:
        await _worker_pool(endpoints, jobs, n_jobs, config.concurrency, on_result, limit)
    finally:
        for endpoint in endpoints:
            await endpoint.aclose()


#: Seconds the first connection to each endpoint may take before the run stops (the client's retries would wait
#: out every attempt's full timeout, minutes in all, saying nothing).
CONNECT_CHECK_S = 10.0
_PROXY_VARS = ("http_proxy", "https_proxy", "all_proxy")


async def check_reachable(url: str, timeout_s: float) -> None:
    """Fail at once when nothing can answer at ``url``: connection refused, an unknown host, no route, no
    connection within ``timeout_s``, or (``https://``) a TLS handshake that fails: a certificate not trusted, or a
    server that speaks no TLS (skipped behind a proxy, where the proxy connects)."""
    if any(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARS):
        return
    parsed = urlparse(url)
    host = parsed.hostname or ""
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    where = f"{url}: {host}:{port}"
    try:
        tls = {"ssl": _tls_context(), "server_hostname": host} if parsed.scheme == "https" else {}
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port, **tls), timeout_s)
    except ssl.SSLCertVerificationError as exc:
        raise EndpointError(
            f"{where} presented a TLS certificate that is not trusted ({exc.verify_message}). If a certificate "
            "authority of your own signed it, point $SSL_CERT_FILE at that authority's certificate (PEM)"
        ) from None
    except ssl.SSLError as exc:
        raise EndpointError(
            f"{where}: the TLS handshake failed ({exc.reason or exc}): if the server speaks plain HTTP, the URL "
            "starts with http://"
        ) from None
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


def ensure_reachable(urls: Iterable[str], timeout_s: float = 10.0) -> None:
    """:func:`check_reachable` for each URL, from sync code: a stage calls it before it records its run, so that a
    server that is not there leaves nothing behind."""

    async def every() -> None:
        for url in urls:
            await check_reachable(url, min(timeout_s, CONNECT_CHECK_S))

    run_sync(every)


def run_sync(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine to completion from sync code, also inside a running event loop (Jupyter): there it runs in a
    fresh loop on a helper thread, because a loop cannot be re-entered."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return _run_here(make_coro)
    with concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-generate") as pool:
        return pool.submit(lambda: asyncio.run(_reraised_quietly(make_coro))).result()


def _quiet_about_interrupts(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The loop's exception handler: a task that died of KeyboardInterrupt or SystemExit (a progress callback
    stopping a run, a signal handler) is not reported as "never retrieved": that exception leaves the loop and is
    raised to the caller anyway. Anything else goes to asyncio's default report."""
    if not isinstance(context.get("exception"), KeyboardInterrupt | SystemExit):
        loop.default_exception_handler(context)


async def _reraised_quietly(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    asyncio.get_running_loop().set_exception_handler(_quiet_about_interrupts)
    return await make_coro()


def _run_here(make_coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """``asyncio.run``, with SIGTERM taken as asyncio takes SIGINT. The process's SIGTERM handler
    (``personavec.cli.main``'s raises :class:`~personavec.errors.Terminated`) would raise inside whichever task the
    loop was stepping, which then died with it unretrieved (asyncio printed "Task exception was never retrieved").
    Here the handler runs as before, but what it raises cancels the main task, which unwinds (what finished still
    lands), and is raised once the loop has closed; a handler that raises nothing is left to do as it does."""
    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        return asyncio.run(_reraised_quietly(make_coro))
    raised: list[BaseException] = []

    async def main() -> T:
        loop, task = asyncio.get_running_loop(), asyncio.current_task()
        assert task is not None

        def on_sigterm(signum: int, frame: Any) -> None:
            try:
                previous(signum, frame)
            except BaseException as exc:  # raised below, once the loop has closed
                raised.append(exc)
                loop.call_soon_threadsafe(task.cancel)

        signal.signal(signal.SIGTERM, on_sigterm)
        try:
            return await _reraised_quietly(make_coro)
        finally:
            signal.signal(signal.SIGTERM, previous)

    try:
        result = asyncio.run(main())
    except asyncio.CancelledError:
        if raised:
            raise raised[0] from None
        raise
    if raised:
        raise raised[0]
    return result
