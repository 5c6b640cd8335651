"""Judge stage: score a responses run's answers with an LLM judge through any OpenAI-compatible endpoint.

Each (response, rubric) pair is one chat request: the rubric's prompt, with the answer's ``{question}``,
``{answer}``, ``{persona}`` (the persona's system prompt) and ``{persona_name}`` filled in, sent as a single user
message at temperature 0. Requests go through :class:`~personavec.generation.endpoint.ChatEndpoint`, so generation's
rules hold unchanged: the ``openai`` client's retries (429/5xx/timeouts), the fatal 4xx that stop a run, API keys
sent only where their variable was named and redacted from errors. Judgements land in ``judgements`` as they arrive
(one group commit at most every 0.1 s, :mod:`personavec.writer`); a resumed run asks only the pairs without a
judge answer.

How a score is read from the judge's answer (``docs/judge.md`` has the formulas):

- **logprobs** (when the endpoint returns them; ``score_mode`` "auto" or "logprobs"): the top-``top_logprobs``
  alternatives of the first generated token, ``p(t) = exp(logprob)``; the tokens that are integers ``k`` of the
  rubric's scale carry the numeric mass ``M = sum p(k)``; the score is the expected value over them,
  ``sum k p(k) / M``. When ``M < min_numeric_mass`` (0.25) the judge is taken to have refused: no score, an error.
  This assumes the judge's tokenizer writes each integer of the scale as one token (OpenAI models do for 0-100;
  every tokenizer does for 0-3): when the first token is a number but the answer's number is longer (a digit-wise
  tokenizer writing "85" as "8", "5"), the parsed integer is used instead.
- **parsed** (no logprobs, or ``score_mode`` "parse"): the first number in the answer, if it lies on the scale.

An answer that yields no score is stored with ``score`` NULL, its ``raw_output`` and an ``error`` saying why; it is
a judgement (not asked again on resume). A request that failed after the retries has no ``raw_output`` and is asked
again on resume. An answer longer than what was asked (``max_tokens`` x 64 bytes, at most 1 MiB) is stored cut, with
``truncated`` true; its score is read from what was kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from personavec.config import OPENROUTER_BASE_URL, config_dict, config_from_dict, resumed_config
from personavec.errors import ConfigError, EndpointError, RequestFailed, RunInterrupted, interruption
from personavec.generation.config import DEFAULT_KEY_ENV, GenerateConfig
from personavec.generation.endpoint import (
    TRUNCATED,
    ChatEndpoint,
    Completion,
    Job,
    ask_all,
    ensure_reachable,
    redact,
    run_sync,
)
from personavec.judging.rubrics import BUILTIN_RUBRICS, Rubric, resolve_rubric
from personavec.judging.scores import SCORE_MODES, score_answer
from personavec.workspace import Workspace
from personavec.writer import GroupCommitWriter

# ------------------------------------------------------------------------------------------------------ filters


# ------------------------------------------------------------------------------------------------------- config

#: Fields that define what a judge run asks; a resumed run must keep them (the others are operational knobs).
IDENTITY_FIELDS = (
    "responses_run",
    "rubrics",
    "model",
    "temperature",
    "max_tokens",
    "seed",
    "score_mode",
    "top_logprobs",
    "min_numeric_mass",
)


@dataclass(frozen=True)
class JudgeConfig:
    """Which answers to judge under which rubrics, with which judge model, and how to reach it.

    Example: ``JudgeConfig(3, ("coherence", "role_adherence"), model="openai/gpt-4.1-mini")`` judges every answer of
    responses run 3 through OpenRouter ($OPENROUTER_API_KEY). Rubrics are given as built-in names, trait names, rubric
    or trait file paths, or :class:`Rubric` objects, and stored resolved (prompt text included) in the run row.
    Endpoint fields (``base_url``, ``replicas``, ``api_key_env``, ``concurrency``, ``timeout_s``, ``max_retries``)
    behave as in :class:`personavec.generation.generate.GenerateConfig`.
    """

    responses_run: int
    rubrics: tuple[Rubric, ...] = (BUILTIN_RUBRICS["coherence"],)
    model: str = "openai/gpt-4.1-mini"
    base_url: str = OPENROUTER_BASE_URL
    replicas: tuple[str, ...] = ()
    api_key_env: str = DEFAULT_KEY_ENV
    temperature: float = 0.0
    max_tokens: int = 8
    seed: int | None = 0
    score_mode: str = "auto"
    top_logprobs: int = 20
    min_numeric_mass: float = 0.25
    concurrency: int = 10
    timeout_s: float = 60.0
    max_retries: int = 6

    def __post_init__(self) -> None:
        rubrics = (self.rubrics,) if isinstance(self.rubrics, str | Rubric | Mapping) else self.rubrics
        object.__setattr__(self, "rubrics", tuple(resolve_rubric(r) for r in rubrics))
        object.__setattr__(self, "replicas", tuple(self.replicas))
        if not self.rubrics:
            raise ConfigError("give at least one rubric (e.g. --rubric coherence)")
        names = [r.name for r in self.rubrics]
        if len(set(names)) != len(names):
            raise ConfigError(f"two rubrics share a name: {names}")
        if self.score_mode not in SCORE_MODES:
            raise ConfigError(f"score_mode must be one of {', '.join(SCORE_MODES)}, got {self.score_mode!r}")
        if not 1 <= self.top_logprobs <= 20:
            raise ConfigError(f"top_logprobs must be in 1..20 (the OpenAI API's limit), got {self.top_logprobs}")
        if not 0.0 < self.min_numeric_mass <= 1.0:
            raise ConfigError(f"min_numeric_mass must be in (0, 1], got {self.min_numeric_mass}")
        _ = self.endpoint  # validates model, URLs, sampling and limits with the generation stage's rules

    @property
    def endpoint(self) -> GenerateConfig:
        """The endpoint settings as a :class:`GenerateConfig` (what :class:`ChatEndpoint` takes)."""
        return GenerateConfig(
            model=self.model,
            base_url=self.base_url,
            replicas=self.replicas,
            api_key_env=self.api_key_env,
            temperature=self.temperature,
            max_tokens=self.max_tokens,
            seed=self.seed,
            concurrency=self.concurrency,
            timeout_s=self.timeout_s,
            max_retries=self.max_retries,
        )

    @property
    def logprob_params(self) -> dict[str, Any]:
        """What a request adds to ask for the first token's alternatives."""
        return {"logprobs": True, "top_logprobs": self.top_logprobs}

    @classmethod
    def resumed(cls, run_id: int, stored: Mapping[str, Any], **overrides: Any) -> JudgeConfig:
        """The config resuming judge run ``run_id``: its stored config with ``overrides`` on top. Endpoint fields may
        change; identity fields (:data:`IDENTITY_FIELDS`) must keep the run's values (:class:`ConfigError` names
        them). New base URLs without a new ``api_key_env`` fall back to the default key rule, as in generation."""
        original = config_from_dict(cls, dict(stored))
        given = dataclasses.replace(original, **overrides)
        endpoints_moved = (given.base_url, given.replicas) != (original.base_url, original.replicas)
        if "api_key_env" not in overrides and endpoints_moved:
            given = dataclasses.replace(given, api_key_env=DEFAULT_KEY_ENV)
        return resumed_config(dict(stored), given, cls, IDENTITY_FIELDS, what=f"judge run {run_id}")


def resume_config(ws: Workspace, run_id: int, **overrides: Any) -> JudgeConfig:
    """The config to resume judge run ``run_id`` with (its stored config, ``overrides`` on top)."""
    from personavec.store.judgements import get_judge_run

    return JudgeConfig.resumed(run_id, get_judge_run(ws.catalog(), run_id).run.config, **overrides)


# ------------------------------------------------------------------------------------------------------ the stage


@dataclass(frozen=True)
class JudgeProgress:
    """Progress of a judge run, passed to the ``progress`` callback after each batch of judgements lands."""

    run_id: int
    total: int
    scored: int
    unscored: int
    failed: int
    new: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        """Judgements per second landed by this process."""
        return self.new / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class JudgeResult:
    """Summary of a judge run after this call (counts cover the whole run, ``new`` and ``requested`` this call).

    ``logprobs``: whether this call asked for logprobs (False when ``score_mode`` is parse, or when the endpoint
    refused the parameters and "auto" fell back to parsing the answer)."""

    run_id: int
    status: str
    resumed: bool
    total: int
    scored: int
    unscored: int
    failures: int
    new: int
    requested: int
    logprobs: bool
    wall_s: float
    error: str | None = None
    scored_by_logprobs: int = 0  # scores read from logprobs (the rest of ``scored`` were parsed from the text)


@dataclass(frozen=True)
class _Target:
    response_id: int
    rubric: Rubric


class _Tally:
    """Counts of committed judgements and the progress callback."""

    def __init__(self, run_id: int, total: int, counts: Mapping[str, int], progress: Callable | None) -> None:
        self.run_id, self.total, self.progress = run_id, total, progress
        self.scored, self.unscored = counts["scored"], counts["unscored"]
        self.failed = self.new = 0
        self.start = time.perf_counter()

    def committed(self, rows: Sequence[Any]) -> None:
        for row in rows:
            self.new += 1
            if row.raw_output is None:
                self.failed += 1
            elif row.score is None:
                self.unscored += 1
            else:
                self.scored += 1
        self.report()

    def report(self) -> None:
        if self.progress is not None:
            elapsed = time.perf_counter() - self.start
            self.progress(
                JudgeProgress(self.run_id, self.total, self.scored, self.unscored, self.failed, self.new, elapsed)
            )


def _row(target: _Target, outcome: Completion | RequestFailed, config: JudgeConfig) -> Any:
    from personavec.store.judgements import JudgementRow

    if isinstance(outcome, RequestFailed):
        return JudgementRow(target.response_id, target.rubric.name, None, error=str(outcome), attempts=outcome.attempts)
    scored = score_answer(
        outcome.text, outcome.logprobs, target.rubric, mode=config.score_mode, min_mass=config.min_numeric_mass
    )
    return JudgementRow(
        target.response_id,
        target.rubric.name,
        scored.score,
        method=scored.method,
        numeric_mass=scored.numeric_mass,
        raw_output=outcome.text,
        top_logprobs=json.dumps(scored.top_logprobs) if scored.top_logprobs is not None else None,
        error=scored.error,
        latency_s=outcome.latency_s,
        attempts=outcome.attempts,
        model_reported=outcome.model_reported,
        truncated=outcome.finish_reason == TRUNCATED,
    )


def run_judge(
    ws: Workspace,
    config: JudgeConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[JudgeProgress], None] | None = None,
) -> JudgeResult:
    """Judge every answered response of ``config.responses_run`` under each rubric: a new ``judge`` run, or resume
    run ``resume`` (only pairs without a judge answer are asked; failed requests are asked again).

    Args:
        ws: the workspace.
        config: what to judge and how. May be None when resuming (the stored config is used); when given with
            ``resume``, its identity fields must match the run's.
        resume: the judge run to resume.
        progress: called with a :class:`JudgeProgress` at the start and after each batch lands.

    Returns:
        a :class:`JudgeResult`; its status is "failed" when requests still failed after the retries (resume to ask
        them again). Unscored judge answers do not fail the run. Raises :class:`EndpointError` when the endpoint
        fails in a way retrying cannot fix (the run is marked failed, its judgements kept).

    Example: ``run_judge(ws, JudgeConfig(3, ("coherence",), model="m", base_url=url))``.
    """
    work = open_judge(ws, config, resume=resume, progress=progress)
    try:
        if work.jobs:
            run_sync(lambda: ask_judge(work))
    except BaseException as exc:
        error = stopped_judge(work, exc)
        if error is exc:
            raise
        raise error from (None if isinstance(exc, EndpointError) else exc)
    return close_judge(work)


@dataclass
class JudgeWork:
    """A judge run opened by :func:`open_judge` (recorded, or resumed), with the requests it still has to ask."""

    ws: Workspace
    run_id: int
    config: JudgeConfig
    keys: Mapping[str, str | None]
    jobs: list[Job]
    total: int
    tally: _Tally
    resumed: bool
    start: float
    asked_logprobs: bool


def open_judge(
    ws: Workspace,
    config: JudgeConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[JudgeProgress], None] | None = None,
) -> JudgeWork:
    """The first part of :func:`run_judge`: check the config, record the run (or mark it resumed) and list what is
    left to ask. Then :func:`ask_judge` (in an event loop, with others) and :func:`close_judge`, or
    :func:`stopped_judge` when asking raised."""
    from personavec.store import judgements as js
    from personavec.store.responses import answered_responses

    start = time.perf_counter()
    catalog = ws.catalog()
    if resume is not None:
        stored = js.get_judge_run(catalog, resume).run.config
        overrides = dataclasses.asdict(config) if config else {}
        config = JudgeConfig.resumed(resume, stored, **overrides)
    elif config is None:
        raise ConfigError("run_judge needs a config (new run) or resume=RUN_ID")
    keys = config.endpoint.api_keys()  # before anything is written: a missing key leaves no run behind
    responses = answered_responses(catalog, config.responses_run)
    if not responses:
        raise ConfigError(f"responses run {config.responses_run} has no answered responses to judge")
    ensure_reachable(config.endpoint.base_urls, config.timeout_s)  # nor does a judge that is not there
    if resume is None:
        run_id = js.create_judge_run(
            catalog,
            config_dict(config),
            responses_run_id=config.responses_run,
            model=config.model,
            endpoint=config.base_url,
            rubrics=[r.name for r in config.rubrics],
        )
    else:
        run_id = resume
        js.resume_judge_run(catalog, run_id)
    try:  # from here on, however it stops, the run says how
        settled = js.settled_keys(catalog, run_id)
        jobs = [
            Job(
                None,
                rubric.render(question=r.question, answer=r.text, persona=r.system_prompt, persona_name=r.persona),
                _Target(r.id, rubric),
            )
            for r in responses
            for rubric in config.rubrics
            if (r.id, rubric.name) not in settled
        ]
        total = len(responses) * len(config.rubrics)
        tally = _Tally(run_id, total, js.judgement_counts(catalog, run_id), progress)
        tally.report()
    except BaseException as exc:
        error = _stop_run(catalog, run_id, keys, exc)
        if error is exc:
            raise
        raise error from exc
    asked_logprobs = config.score_mode != "parse"
    return JudgeWork(ws, run_id, config, keys, jobs, total, tally, resume is not None, start, asked_logprobs)


async def ask_judge(work: JudgeWork, limit: asyncio.Semaphore | None = None) -> None:
    """Ask what ``work`` has left, landing each judgement as it arrives (whatever finished before a stop lands too).
    ``limit`` bounds the requests in flight across every coroutine sharing it (several judge runs at once);
    without it, the run's own ``concurrency`` does."""
    from personavec.store import judgements as js

    catalog, config, jobs = work.ws.catalog(), work.config, work.jobs
    writer: GroupCommitWriter[Any] = GroupCommitWriter(
        lambda rows: js.upsert_judgements(catalog, work.run_id, rows), work.tally.committed
    )
    writer.begin()

    def land(job: Job, outcome: Completion | RequestFailed) -> None:
        writer.put(_row(job.key, outcome, config))

    try:
        rest = jobs
        if config.score_mode == "auto":
            work.asked_logprobs = await _probe(config, work.keys, jobs[0], land, limit)
            rest = jobs[1:]
        extra = config.logprob_params if work.asked_logprobs else None
        if rest:
            await ask_all(config.endpoint, work.keys, rest, len(rest), land, extra_body=extra, limit=limit)
    finally:
        await writer.close()  # whatever finished before a stop (fatal error, Ctrl-C) still lands


def stopped_judge(work: JudgeWork, exc: BaseException, why: str | None = None) -> BaseException:
    """Mark ``work``'s run as asking it ended by ``exc`` (kept as failed with what was judged, or interrupted: by
    Ctrl-C, SIGTERM or ``why``) and return the error to raise: the endpoint's error naming the resume,
    :class:`RunInterrupted`, or ``exc``."""
    return _stop_run(work.ws.catalog(), work.run_id, work.keys, exc, why)


def _stop_run(
    catalog: Any, run_id: int, keys: Mapping[str, str | None], exc: BaseException, why: str | None = None
) -> BaseException:
    from personavec.store import judgements as js

    if isinstance(exc, EndpointError):
        # kept as failed (with whatever was judged), as docs/judge.md says: the run records what was tried
        js.finish_judge_run(catalog, run_id, "failed", str(exc))
        return EndpointError(f"{exc} [judge run {run_id} stopped; resume with `personavec judge --resume {run_id}`]")
    if isinstance(exc, KeyboardInterrupt | asyncio.CancelledError):
        js.finish_judge_run(catalog, run_id, "interrupted", why or interruption(exc))
        return RunInterrupted(run_id, f"personavec judge --resume {run_id}")
    secrets = [k for k in keys.values() if k]
    js.finish_judge_run(catalog, run_id, "failed", redact(f"{type(exc).__name__}: {exc}", secrets))
    return exc


def close_judge(work: JudgeWork) -> JudgeResult:
    """Mark ``work``'s run done (or failed, when requests still failed after the retries) once asking finished."""
    from personavec.store import judgements as js

    catalog, run_id = work.ws.catalog(), work.run_id
    counts = js.judgement_counts(catalog, run_id)
    status, error = "done", None
    if counts["failed"]:
        status = "failed"
        error = (
            f"{counts['failed']} of {work.total} judge requests failed after retries; "
            f"rerun with --resume {run_id} to ask only those"
        )
    js.finish_judge_run(catalog, run_id, status, error)
    return JudgeResult(
        run_id=run_id,
        status=status,
        resumed=work.resumed,
        total=work.total,
        scored=counts["scored"],
        unscored=counts["unscored"],
        failures=counts["failed"],
        new=work.tally.new,
        requested=len(work.jobs),
        logprobs=work.asked_logprobs,
        wall_s=time.perf_counter() - work.start,
        error=error,
        scored_by_logprobs=counts["by_logprobs"],
    )


async def _probe(
    config: JudgeConfig,
    keys: Mapping[str, str | None],
    job: Job,
    land: Callable[[Job, Completion | RequestFailed], None],
    limit: asyncio.Semaphore | None = None,
) -> bool:
    """Ask the first pair with logprobs; if the endpoint refuses the request, ask it again without them and go on
    parsing answers (some servers reject ``logprobs``). Returns whether the rest should ask for logprobs."""
    endpoint_config = config.endpoint  # reachable: open_judge checked

    async def ask(extra: Mapping[str, Any] | None) -> Completion | RequestFailed:
        endpoint = ChatEndpoint(endpoint_config, keys.get(config.base_url), extra_body=extra)
        try:
            async with limit or contextlib.nullcontext():
                return await endpoint.complete(job.system_prompt, job.question)
        except RequestFailed as exc:
            return exc
        finally:
            await endpoint.aclose()

    try:
        outcome = await ask(config.logprob_params)
        with_logprobs = True
    except EndpointError as refused:
        try:
            outcome = await ask(None)
        except EndpointError:
            raise refused from None  # the endpoint fails either way: report the first refusal
        with_logprobs = False
    land(job, outcome)
    return with_logprobs


__all__ = [
    "JudgeConfig",
    "JudgeWork",
    "JudgeProgress",
    "JudgeResult",
    "resume_config",
    "ask_judge",
    "close_judge",
    "open_judge",
    "run_judge",
    "stopped_judge",
]
