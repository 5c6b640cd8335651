"""Generation stage: answers from any OpenAI-compatible chat endpoint, committed to the catalog as they arrive.

One request path (:mod:`personavec.generation.endpoint`) serves both the catalog pipeline (:func:`run_generation`)
and the seed's :func:`generate_responses`; ``engine="local"`` runs :mod:`personavec.generation.local` instead.

Speed (``scripts/bench_generate.py``): the event loop only asks and parses; answers are committed by one writer on
a worker thread (:class:`_Sink`), in batches at most every ``Tuning.commit_interval_s`` (:mod:`personavec.tuning`),
so the loop never waits for DuckDB and one commit's fixed cost is shared by every answer that arrived meanwhile.

What is sent: ``[{"role": "system", "content": <system prompt>}, {"role": "user", "content": <question>}]``. The
system message is always sent, with empty content for an empty system prompt, exactly as extraction renders the
conversation later.

Failure policy and API keys: :mod:`personavec.generation.endpoint`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

from personavec.config import (
    PersonaVectorConfig,
    check_selection,
    config_dict,
)
from personavec.errors import ConfigError, EndpointError, RequestFailed, RunInterrupted, interruption
from personavec.generation.config import GenerateConfig, GenerationProgress, GenerationResult
from personavec.generation.endpoint import Completion, Job, ask_all, redact, run_sync
from personavec.generation.local import run_local_generation
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


# ----------------------------------------------------------------------------------------------- one chat request


# ------------------------------------------------------------------------------------------------ concurrency


# ------------------------------------------------------------------------------------------------ catalog pipeline


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

    def land(self, job: Job, outcome: Completion | RequestFailed) -> None:
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
        if "serve" in stored:  # personavec serve --record: answers to clients' requests, nothing to ask again
            raise ConfigError(
                f"run {resume} recorded a `personavec serve --record` session: its answers came from clients' "
                "requests, so there is nothing to resume; start another session to record more"
            )
        if (config.engine if config is not None else stored.get("engine", "remote")) == "local":
            return run_local_generation(ws, config, resume=resume, progress=progress)
        config = GenerateConfig.resumed(resume, stored, **(dataclasses.asdict(config) if config else {}))
    elif config is None:
        raise ConfigError("run_generation needs a config (new run) or resume=RUN_ID")
    elif config.engine == "local":  # transformers in this process: personavec.generation.local
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
    total = len(personas) * len(questions) * config.n_samples
    status, error = "done", None
    try:  # from here on, however it stops, the run says how
        done = answered_keys(catalog, run_id)
        # Jobs are generated as they are asked, never listed: a run of a billion requests must not plan in memory.
        jobs = (
            Job(p.system_prompt, q.text, (p.id, q.id, s))
            for p in personas
            for q in questions
            for s in range(config.n_samples)
            if (p.id, q.id, s) not in done
        )
        pids, qids = {p.id for p in personas}, {q.id for q in questions}
        n_todo = total - sum(1 for p, q, s in done if p in pids and q in qids and s < config.n_samples)
        sink = _Sink(catalog, run_id, total, total - n_todo, progress, start)
        sink.report()

        async def main() -> None:
            sink.begin()
            try:
                await ask_all(config, keys, jobs, n_todo, sink.land)
            finally:
                await sink.close()  # whatever finished before a stop (fatal error, Ctrl-C) still lands

        if n_todo:
            run_sync(main)
    except EndpointError as exc:
        if resume is None and discard_empty_run(catalog, run_id):
            raise  # bad input stopped a fresh run before any answer: nothing is left behind
        finish_generation_run(catalog, run_id, "failed", str(exc))
        raise EndpointError(
            f"{exc} [run {run_id} stopped; resume with `personavec generate --resume {run_id}`]"
        ) from None
    except (KeyboardInterrupt, asyncio.CancelledError) as exc:
        finish_generation_run(catalog, run_id, "interrupted", interruption(exc))
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
    jobs = [Job(prompt, q, (name, q)) for name, prompt in personas.items() for q in questions]
    out: dict[tuple[str, str], str] = {}

    def collect(job: Job, outcome: Completion | RequestFailed) -> None:
        if isinstance(outcome, RequestFailed):
            log.warning("no answer for %s: %s", job.key, outcome)
        else:
            out[job.key] = outcome.text

    async def main() -> None:
        await ask_all(gen, keys, jobs, len(jobs), collect)

    if jobs:
        run_sync(main)
    return out


__all__ = [
    "generate_responses",
    "run_generation",
]
