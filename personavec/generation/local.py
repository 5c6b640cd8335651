"""The local generation engine: persona x question answered with transformers in this process, optionally steered.

``GenerateConfig(engine="local", model=...)`` (``personavec generate --engine local``) loads the model here (CPU,
one GPU, or ``device_map`` over several) and answers in batches with ``model.generate``: left padding, KV cache, the
same sampling options as the remote engine (``temperature`` 0 is greedy; ``top_p``; ``seed``), the same catalog rows
(one ``responses`` row per answer, committed per batch, so a killed run keeps every finished batch and
``--resume`` resumes it). With ``config.steering`` the run carries an intervention
(:mod:`personavec.steering.interventions`), stored with it (``run_interventions``, ``intervention_layers``);
:func:`run_sweep` makes one run per coefficient (and layer), linked as one sweep, and answers their rows in shared
batches, each row steered by its own run's intervention.

Prompts are the chat template of ``[system, user]`` with the generation prompt, tokenized without extra special
tokens (the template holds them), exactly as the remote engine's server renders them and as extraction renders the
conversation later. With a seed, each batch draws from ``torch.manual_seed(crc32(seed, its keys))``: a batch asked
again (resume) with the same keys samples the same answers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from personavec.config import check_selection, config_dict, resumed_config
from personavec.errors import ConfigError, ModelError, RunInterrupted, interruption

if TYPE_CHECKING:
    from personavec.generation.config import GenerateConfig, GenerationProgress, GenerationResult
    from personavec.modeling import LoadedModel
    from personavec.steering.interventions import LayerIntervention, Steerer
    from personavec.workspace import Workspace


# ---------------------------------------------------------------------------------------------------- the core


@dataclass(frozen=True)
class Generated:
    """One generated answer: its tokens (up to and including the end-of-turn token), text and finish reason."""

    token_ids: tuple[int, ...]
    text: str
    finish_reason: str  # "stop" (end-of-turn token) or "length"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


def prompt_ids(tokenizer: Any, system_prompt: str | None, question: str, prompt_format: str = "chat") -> list[int]:
    """Token ids of the prompt the model answers: ``[system, user]`` plus the generation prompt.

    The system message is kept when empty (as the remote engine sends it); None leaves it out."""
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    messages.append({"role": "user", "content": question})
    if prompt_format == "raw":
        text = "".join(f"{m['role'].capitalize()}: {m['content']}\n\n" for m in messages) + "Assistant: "
        return list(tokenizer(text)["input_ids"])
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: use prompt format 'raw'"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def stop_ids(loaded: LoadedModel) -> set[int]:
    """Token ids that end an answer: the generation config's ``eos_token_id`` (one or several) and the tokenizer's."""
    ids: set[int] = set()
    eos = getattr(loaded.model.generation_config, "eos_token_id", None)
    ids.update(eos if isinstance(eos, list | tuple) else [eos] if eos is not None else [])
    if loaded.tokenizer.eos_token_id is not None:
        ids.add(int(loaded.tokenizer.eos_token_id))
    return ids


def generate_batch(
    loaded: LoadedModel,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float | None = None,
    seed: int | None = None,
    steerer: Steerer | None = None,
) -> list[Generated]:
    """Answer a batch of prompts (token ids) with ``model.generate``: left padding, KV cache on.

    ``temperature`` 0 is greedy decoding; ``seed`` seeds torch's generator first. ``steerer``: an entered
    :class:`personavec.steering.interventions.Steerer`, told the padded prompt width (for ``positions`` "generated"
    and "response").
    """
    import torch

    tok = loaded.tokenizer
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[row, width - len(p) :] = 1
    stops = stop_ids(loaded)
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": pad_id,
        "eos_token_id": sorted(stops) or None,
        "use_cache": True,
        "top_k": None,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs["logits_processor"] = _finite_logits(width, steered=steerer is not None)
    if steerer is not None:
        steerer.begin(width)
    device = loaded.input_device
    with torch.inference_mode():
        out = loaded.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
    results = []
    for row, p in enumerate(prompts):
        new = out[row, width:].tolist()
        end = next((i for i, t in enumerate(new) if t in stops), None)
        tokens = new if end is None else new[: end + 1]
        text = tok.decode(tokens if end is None else tokens[:-1], skip_special_tokens=True)
        results.append(Generated(tuple(tokens), text, "length" if end is None else "stop", len(p)))
    return results


def _finite_logits(prompt_width: int, *, steered: bool) -> Any:
    """A logits processor that stops generation at the first step whose logits hold NaN or inf (an intervention
    past what the model's dtype holds): sampling from them raised torch's "probability tensor contains either inf,
    nan", and greedy wrote token 0 on, an empty answer stored as done."""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    class FiniteLogits(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if not bool(torch.isfinite(scores).all()):
                why = "under the steering: lower the coef (or the vector's norm)" if steered else "(unsteered)"
                at = input_ids.shape[1] - prompt_width + 1
                raise ModelError(f"the model's logits became NaN/inf at generated token {at}: {why}")
            return scores

    return LogitsProcessorList([FiniteLogits()])


def _batch_seed(seed: int, keys: Sequence[Any]) -> int:
    return zlib.crc32(repr((seed, tuple(keys))).encode()) & 0x7FFFFFFF


# ---------------------------------------------------------------------------------------------------- catalog run


def load_for(config: GenerateConfig) -> LoadedModel:
    """Load the model a local-engine config names."""
    from personavec.modeling import load_model

    opts = config.local
    return load_model(
        config.model,
        dtype=opts.dtype,
        device=opts.device,
        device_map=opts.device_map,
        attn_implementation=opts.attn_implementation,
    )


def _stored_interventions(record: Any, positions: str) -> list[LayerIntervention]:
    from personavec.steering.interventions import LayerIntervention

    return [
        LayerIntervention(
            layer=row.layer,
            kind=record.kind,
            vector=row.vector,
            scale=row.scale,
            tau=row.tau,
            positions=positions,
            unit_norm=row.unit_norm,
            n_reference_tokens=row.n_reference_tokens,
        )
        for row in record.per_layer
    ]


@dataclass(eq=False)
class _Pending:
    """A local generate run being answered (new or resumed): its intervention, the answers it still needs and this
    call's counts. ``seed_tag`` prefixes the keys a batch's seed is drawn from (a sweep's rows share batches)."""

    run_id: int
    config: GenerateConfig
    resumed: bool
    interventions: list[LayerIntervention]
    jobs: list[tuple[tuple[int, int, int], list[int]]]
    total: int
    answered: int
    new: bool  # created by this call (discarded again if it fails before any answer lands)
    seed_tag: tuple[Any, ...] = ()
    new_answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0


def run_local_generation(
    ws: Workspace,
    config: GenerateConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[GenerationProgress], None] | None = None,
    loaded: LoadedModel | None = None,
    sweep_id: int | None = None,
) -> GenerationResult:
    """The generate stage on the local engine: a new run (or ``resume`` one), answers committed per batch.

    Args:
        ws: the workspace.
        config: a :class:`~personavec.generation.config.GenerateConfig` with ``engine="local"``; None with ``resume``.
        resume: a generate run to finish (only missing answers are generated; a steered run reuses its stored
            intervention numbers, thresholds included).
        progress: called with a :class:`personavec.generation.generate.GenerationProgress` after each batch lands.
        loaded: the model already loaded (must be ``config.model``), e.g. shared by the runs of a sweep.
        sweep_id: the sweep a new steered run belongs to.

    Example: ``run_local_generation(ws, GenerateConfig(engine="local", model="smollm2-135m-instruct"))``.
    """
    start = time.perf_counter()
    if resume is not None:
        from personavec.generation.config import IDENTITY_FIELDS, GenerateConfig
        from personavec.store.generation import get_generation_run

        stored = get_generation_run(ws.catalog(), resume).run.config
        config = resumed_config(stored, config, GenerateConfig, IDENTITY_FIELDS, what=f"run {resume}")
    if config is None:
        raise ConfigError("run_local_generation needs a config (new run) or resume (a run id)")
    run, loaded = _open_run(ws, config, loaded, resume=resume, sweep_id=sweep_id)
    return _answer(ws, [run], loaded, progress, start, f"personavec generate --resume {run.run_id}")[0]


def _open_run(
    ws: Workspace,
    config: GenerateConfig,
    loaded: LoadedModel | None,
    *,
    resume: int | None,
    sweep_id: int | None = None,
    seed_tag: tuple[Any, ...] = (),
) -> tuple[_Pending, LoadedModel]:
    """Check ``config`` against the catalog's sets, load the model unless ``loaded``, create the run (with its
    intervention) or mark ``resume`` running again, and list the answers it still needs."""
    from personavec.steering.interventions import plan_steering
    from personavec.store.generation import answered_keys, create_generation_run, load_sets, resume_generation_run
    from personavec.store.steering import InterventionLayerRow, create_steered_generation_run, get_intervention

    catalog = ws.catalog()
    if config.engine != "local":
        raise ConfigError(f"run_local_generation runs engine 'local', the config says {config.engine!r}")
    pset, qset = load_sets(catalog, config.persona_set, config.question_set)
    check_selection(
        f"persona set {pset.name!r}", config.personas, (), [p.name for p in pset.personas], len(qset.questions)
    )
    check_selection(f"question set {qset.name!r}", (), config.questions, [], len(qset.questions))
    by_name = pset.by_name()
    personas = [by_name[n] for n in dict.fromkeys(config.personas)] if config.personas else list(pset.personas)
    questions = [qset.questions[q] for q in dict.fromkeys(config.questions)] if config.questions else qset.questions

    loaded = loaded or load_for(config)
    interventions: list[LayerIntervention] = []
    run_id = resume
    if resume is not None:
        record = get_intervention(catalog, resume)
        if record is not None and config.steering is not None:
            interventions = _stored_interventions(record, config.steering.positions)
        resume_generation_run(catalog, resume)
    else:
        detail: dict[str, Any] = {
            "persona_set_id": pset.id,
            "question_set_id": qset.id,
            "model": config.model,
            "endpoint": f"local:{loaded.device}",
            "n_samples": config.n_samples,
            "temperature": config.temperature,
            "max_tokens": config.max_tokens,
            "top_p": config.top_p,
            "seed": config.seed,
        }
        if config.steering is None:
            run_id = create_generation_run(catalog, config_dict(config), **detail)
        else:
            plan = plan_steering(ws, config.steering, n_layers=loaded.n_layers, d_model=loaded.d_model, loaded=loaded)
            interventions = list(plan.interventions)
            run_id = create_steered_generation_run(
                catalog,
                config_dict(config),
                detail,
                spec=dataclasses.asdict(config.steering)
                | ({"other_model": plan.other_model} if plan.other_model else {}),
                vector_run_id=plan.vector_run_id,
                layers=[
                    InterventionLayerRow(iv.layer, iv.scale, iv.as_numpy(), iv.unit_norm, iv.tau, iv.n_reference_tokens)
                    for iv in interventions
                ],
                sweep_id=sweep_id,
                tau_source=plan.tau_source,
                reference_run_id=plan.reference_run_id,
            )
    assert run_id is not None  # set above on both paths

    done = answered_keys(catalog, run_id)
    jobs = [
        ((p.id, q.id, s), prompt_ids(loaded.tokenizer, p.system_prompt, q.text, config.local.prompt_format))
        for p in personas
        for q in questions
        for s in range(config.n_samples)
        if (p.id, q.id, s) not in done
    ]
    total = len(personas) * len(questions) * config.n_samples
    run = _Pending(
        run_id, config, resume is not None, interventions, jobs, total, total - len(jobs), resume is None, seed_tag
    )
    return run, loaded


def _answer(
    ws: Workspace,
    runs: Sequence[_Pending],
    loaded: LoadedModel,
    progress: Callable[[GenerationProgress], None] | None,
    start: float,
    resume_command: str,
) -> list[GenerationResult]:
    """Answer every job of ``runs`` in batches of ``batch_size`` rows, the runs' rows together (each row steered by
    its own run's intervention), landing each batch's answers in their runs; then finish the runs. A run's rows in
    a batch of their own are steered as one (the hooks of a single run). A run every answer of which landed is
    done even when a later batch (another run's) fails or is interrupted."""
    from personavec.generation.config import GenerationProgress
    from personavec.steering.interventions import Steerer
    from personavec.store.generation import AnswerRow, finish_generation_run, upsert_answers

    if not runs:
        return []
    catalog = ws.catalog()
    config = runs[0].config  # the runs share everything a batch depends on (model, sampling, local options)
    jobs = [(run, key, ids) for run in runs for key, ids in run.jobs]
    # Similar lengths together: less padding. Stable, so the batches (and their seeds) depend only on what is asked.
    jobs.sort(key=lambda job: -len(job[2]))
    size = config.local.batch_size
    batches = [jobs[i : i + size] for i in range(0, len(jobs), size)]

    def report(run: _Pending) -> None:
        if progress is not None:
            progress(
                GenerationProgress(
                    run_id=run.run_id,
                    total=run.total,
                    answered=run.answered,
                    failed=0,
                    new_answers=run.new_answers,
                    prompt_tokens=run.prompt_tokens,
                    completion_tokens=run.completion_tokens,
                    elapsed_s=time.perf_counter() - start,
                )
            )

    for run in runs:
        report(run)
    try:
        for batch in batches:
            t0 = time.perf_counter()
            members = list(dict.fromkeys(run for run, _, _ in batch))
            steering = [run.interventions for run, _, _ in batch]
            steerer = Steerer.per_row(loaded.model, steering, blocks=loaded.layers) if any(steering) else None
            seed = None
            if config.seed is not None:
                seed = _batch_seed(config.seed, [run.seed_tag + key for run, key, _ in batch])
            with steerer if steerer is not None else contextlib.nullcontext():
                outs = generate_batch(
                    loaded,
                    [ids for _, _, ids in batch],
                    max_new_tokens=config.max_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=seed,
                    steerer=steerer,
                )
            latency = time.perf_counter() - t0
            for run in members:
                mine = [(key, g) for (r, key, _), g in zip(batch, outs, strict=True) if r is run]
                rows = [
                    AnswerRow(
                        *key,
                        g.text,
                        finish_reason=g.finish_reason,
                        prompt_tokens=g.prompt_tokens,
                        completion_tokens=g.completion_tokens,
                        latency_s=latency,
                        model_reported=run.config.model,
                    )
                    for key, g in mine
                ]
                upsert_answers(catalog, run.run_id, rows)
                run.answered += len(rows)
                run.new_answers += len(rows)
                run.prompt_tokens += sum(g.prompt_tokens for _, g in mine)
                run.completion_tokens += sum(g.completion_tokens for _, g in mine)
                report(run)
    except KeyboardInterrupt as exc:
        _stop(ws, runs, exc)
        unfinished = [run for run in runs if run.answered < run.total]
        raise RunInterrupted(unfinished[0].run_id if unfinished else runs[0].run_id, resume_command) from exc
    except BaseException as exc:
        _stop(ws, runs, exc)
        raise
    results = []
    for run in runs:
        finish_generation_run(catalog, run.run_id, "done")
        results.append(
            _result(
                ws,
                run.run_id,
                resumed=run.resumed,
                total=run.total,
                new_answers=run.new_answers,
                requested=len(run.jobs),
                wall_s=time.perf_counter() - start,
            )
        )
    return results


def _stop(ws: Workspace, runs: Sequence[_Pending], exc: BaseException) -> None:
    """Leave each run as a stop finds it: ``done`` when every answer of it landed; ``interrupted`` on Ctrl-C or
    SIGTERM; otherwise deleted if this call created it and no answer of it landed (bad input leaves nothing
    behind), else ``failed`` with the error."""
    from personavec.store.generation import discard_empty_run, finish_generation_run
    from personavec.store.steering import discard_intervention

    catalog = ws.catalog()
    for run in runs:
        if run.answered == run.total:
            finish_generation_run(catalog, run.run_id, "done")
        elif isinstance(exc, KeyboardInterrupt):
            finish_generation_run(catalog, run.run_id, "interrupted", interruption(exc))
        elif run.new and discard_empty_run(catalog, run.run_id):
            discard_intervention(catalog, run.run_id)
        else:
            finish_generation_run(catalog, run.run_id, "failed", f"{type(exc).__name__}: {exc}")


def _result(
    ws: Workspace,
    run_id: int,
    *,
    resumed: bool,
    total: int | None = None,
    new_answers: int = 0,
    requested: int = 0,
    wall_s: float = 0.0,
) -> GenerationResult:
    """A finished run's result: its counts as the catalog holds them, this call's as given (``total`` None: its
    answers and failures, a run finished before this call)."""
    from personavec.generation.config import GenerationResult
    from personavec.store.generation import generation_counts

    counts = generation_counts(ws.catalog(), run_id)
    return GenerationResult(
        run_id=run_id,
        status="done",
        resumed=resumed,
        total=counts["answers"] + counts["failures"] if total is None else total,
        answers=counts["answers"],
        failures=counts["failures"],
        new_answers=new_answers,
        new_failures=0,
        requested=requested,
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        wall_s=wall_s,
    )


# ---------------------------------------------------------------------------------------------------- sweeps


@dataclass(frozen=True)
class SweepResult:
    """One run per coefficient, linked as one sweep."""

    sweep_id: int
    runs: tuple[tuple[float, GenerationResult], ...]
    wall_s: float


def run_sweep(
    ws: Workspace,
    config: GenerateConfig | None,
    coefs: Sequence[float] = (),
    *,
    layers: Sequence[int] = (),
    label: str | None = None,
    progress: Callable[[GenerationProgress], None] | None = None,
    loaded: LoadedModel | None = None,
    resume: int | None = None,
) -> SweepResult:
    """A steered generate run per coefficient (the model loaded once), linked in ``steering_sweeps``.

    ``config.steering`` gives everything but the coefficient. With ``layers``, a layer sweep: one run per layer and
    coefficient, each steering at that one layer (``config.steering.layers`` must then be empty). Every run is
    created first, then their answers are generated together: ``config.local.batch_size`` rows a batch whatever
    run they belong to, each row steered by its own run's intervention, so a sweep of small runs fills its batches.
    ``resume`` (a sweep id, given alone) finishes a stopped sweep: its unfinished runs are resumed and any setting
    without a run is started, together. Example::

        run_sweep(ws, GenerateConfig(engine="local", model=m, steering=SteeringConfig("7:mystic-default")),
                  [-8, 0, 8], layers=[15, 20])
    """
    from personavec.store.steering import create_sweep, discard_empty_sweep, get_sweep

    start = time.perf_counter()
    existing: dict[tuple[tuple[int, ...], float], Any] = {}
    if resume is not None:
        if config is not None or coefs or layers:
            raise ConfigError("a resumed sweep takes its settings from the catalog: give the sweep id alone")
        from personavec.config import config_from_dict
        from personavec.generation.config import GenerateConfig

        stored = get_sweep(ws.catalog(), resume)
        config = config_from_dict(GenerateConfig, stored.config["generate"])
        coefs, layers = stored.config["coefs"], stored.config["layers"]
        for r in stored.runs:  # a setting is its coefficient (and its one layer in a layer sweep); a done run first
            key = (tuple(r.layers) if layers else (), float(r.coef))
            if key not in existing or existing[key].status != "done":
                existing[key] = r
    if config is None:
        raise ConfigError("run_sweep needs a config (new sweep) or resume (a sweep id)")
    if config.steering is None:
        raise ConfigError("a sweep needs an intervention (steering) to sweep the coefficient of")
    if config.steering.kind == "cap":
        raise ConfigError("cap has no coefficient to sweep: sweep add or ablate")
    coefs = [float(c) for c in coefs]
    if not coefs or len(set(coefs)) != len(coefs):
        raise ConfigError(f"a sweep needs distinct coefficients, got {coefs}")
    layer_list = [int(x) for x in layers]
    if len(set(layer_list)) != len(layer_list):
        raise ConfigError(f"a layer sweep needs distinct layers, got {layer_list}")
    if layer_list and config.steering.layers:
        raise ConfigError(
            "give the swept layers (--sweep-layer) or the intervention's layers (--layer), not both: a layer sweep "
            "steers one layer per run"
        )
    # every setting is validated before any work: a bad last coefficient must not cost the first runs
    steering = config.steering
    layer_sets: list[tuple[int, ...]] = [(x,) for x in layer_list] or [steering.layers]
    settings = [
        (coef, dataclasses.replace(steering, coef=coef, layers=layers)) for layers in layer_sets for coef in coefs
    ]
    loaded = loaded or load_for(config)
    if layer_list:  # a layer out of range, or one the vectors run lacks, fails before the sweep exists
        from personavec.steering.interventions import plan_steering

        for _, steering in settings[:: len(coefs)]:
            plan_steering(ws, steering, n_layers=loaded.n_layers, d_model=loaded.d_model, loaded=loaded)
    catalog = ws.catalog()
    if resume is None:
        default_label = config.steering.label(coefs)
        if layer_list:
            default_label = default_label.replace("@default", "@" + ",".join(map(str, layer_list)) + " (layer sweep)")
        sweep_id = create_sweep(
            catalog,
            label=label or default_label,
            parameter="layer,coef" if layer_list else "coef",
            config={"coefs": coefs, "layers": layer_list, "generate": config_dict(config)},
        )
    else:
        sweep_id = resume
    finished: dict[int, int] = {}  # setting -> its run, done before this call
    pending: dict[int, _Pending] = {}
    try:
        try:
            for i, (coef, steering) in enumerate(settings):
                earlier = existing.get((tuple(steering.layers) if layer_list else (), coef))
                if earlier is not None and earlier.status == "done":
                    finished[i] = earlier.run_id
                    continue
                pending[i], _ = _open_run(
                    ws,
                    dataclasses.replace(config, steering=steering),
                    loaded,
                    resume=None if earlier is None else earlier.run_id,
                    sweep_id=sweep_id,
                    seed_tag=(tuple(steering.layers), coef),
                )
        except BaseException as exc:  # a run that cannot be opened: the runs opened so far are stopped
            _stop(ws, list(pending.values()), exc)
            raise
        answered = _answer(
            ws, list(pending.values()), loaded, progress, start, f"personavec steer --resume-sweep {sweep_id}"
        )
    except BaseException:
        if resume is None:
            discard_empty_sweep(catalog, sweep_id)  # only when no run of it is left (bad input)
        raise
    results = dict(zip(pending, answered, strict=True))
    for i, run_id in finished.items():
        results[i] = _result(ws, run_id, resumed=True)
    runs = tuple((coef, results[i]) for i, (coef, _) in enumerate(settings))
    return SweepResult(sweep_id, runs, time.perf_counter() - start)
