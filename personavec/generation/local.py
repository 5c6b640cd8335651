"""The local generation engine: persona x question answered with transformers in this process, optionally steered.

``GenerateConfig(engine="local", model=...)`` (``personavec generate --engine local``) loads the model here (CPU,
one GPU, or ``device_map`` over several) and answers in batches with ``model.generate``: left padding, KV cache, the
same sampling options as the remote engine (``temperature`` 0 is greedy; ``top_p``; ``seed``), the same catalog rows
(one ``responses`` row per answer, committed per batch, so a killed run keeps every finished batch and
``--resume`` resumes it). With ``config.steering`` the run carries an intervention
(:mod:`personavec.steering.interventions`),
stored with it (``run_interventions``, ``intervention_layers``); :func:`run_sweep` makes one run per coefficient,
linked as one sweep.

Prompts are the chat template of ``[system, user]`` with the generation prompt, tokenized without extra special
tokens (the template holds them), exactly as the remote engine's server renders them and as extraction renders the
conversation later. With a seed, each batch draws from ``torch.manual_seed(crc32(seed, its keys))``: a batch asked
again (resume) with the same keys samples the same answers.
"""

from __future__ import annotations

import dataclasses
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from personavec.config import check_selection, config_dict, resumed_config
from personavec.errors import ConfigError, RunInterrupted, interruption

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
    from personavec.generation.config import IDENTITY_FIELDS, GenerateConfig, GenerationProgress, GenerationResult
    from personavec.steering.interventions import Steerer, plan_steering
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
    from personavec.store.steering import (
        InterventionLayerRow,
        create_steered_generation_run,
        discard_intervention,
        get_intervention,
    )

    start = time.perf_counter()
    catalog = ws.catalog()
    if resume is not None:
        stored = get_generation_run(catalog, resume).run.config
        config = resumed_config(stored, config, GenerateConfig, IDENTITY_FIELDS, what=f"run {resume}")
    if config is None:
        raise ConfigError("run_local_generation needs a config (new run) or resume (a run id)")
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
    # Similar lengths together: less padding. Stable, so the batches (and their seeds) depend only on what is asked.
    jobs.sort(key=lambda job: -len(job[1]))
    batches = [jobs[i : i + config.local.batch_size] for i in range(0, len(jobs), config.local.batch_size)]
    answered, new_answers, prompt_tok, completion_tok = total - len(jobs), 0, 0, 0

    def report() -> None:
        if progress is not None:
            progress(
                GenerationProgress(
                    run_id=run_id,
                    total=total,
                    answered=answered,
                    failed=0,
                    new_answers=new_answers,
                    prompt_tokens=prompt_tok,
                    completion_tokens=completion_tok,
                    elapsed_s=time.perf_counter() - start,
                )
            )

    report()
    try:
        steerer = Steerer(loaded.model, interventions, blocks=loaded.layers) if interventions else None
        if steerer is not None:
            steerer.__enter__()
        try:
            for batch in batches:
                t0 = time.perf_counter()
                keys = [key for key, _ in batch]
                outs = generate_batch(
                    loaded,
                    [ids for _, ids in batch],
                    max_new_tokens=config.max_tokens,
                    temperature=config.temperature,
                    top_p=config.top_p,
                    seed=None if config.seed is None else _batch_seed(config.seed, keys),
                    steerer=steerer,
                )
                latency = time.perf_counter() - t0
                rows = [
                    AnswerRow(
                        *key,
                        g.text,
                        finish_reason=g.finish_reason,
                        prompt_tokens=g.prompt_tokens,
                        completion_tokens=g.completion_tokens,
                        latency_s=latency,
                        model_reported=config.model,
                    )
                    for key, g in zip(keys, outs, strict=True)
                ]
                upsert_answers(catalog, run_id, rows)
                answered += len(rows)
                new_answers += len(rows)
                prompt_tok += sum(g.prompt_tokens for g in outs)
                completion_tok += sum(g.completion_tokens for g in outs)
                report()
        finally:
            if steerer is not None:
                steerer.remove()
    except KeyboardInterrupt as exc:
        finish_generation_run(catalog, run_id, "interrupted", interruption(exc))
        raise RunInterrupted(run_id, f"personavec generate --resume {run_id}") from exc
    except BaseException as exc:
        if resume is None and discard_empty_run(catalog, run_id):
            discard_intervention(catalog, run_id)
        else:
            finish_generation_run(catalog, run_id, "failed", f"{type(exc).__name__}: {exc}")
        raise
    finish_generation_run(catalog, run_id, "done")
    counts = generation_counts(catalog, run_id)
    return GenerationResult(
        run_id=run_id,
        status="done",
        resumed=resume is not None,
        total=total,
        answers=counts["answers"],
        failures=counts["failures"],
        new_answers=new_answers,
        new_failures=0,
        requested=len(jobs),
        prompt_tokens=counts["prompt_tokens"],
        completion_tokens=counts["completion_tokens"],
        wall_s=time.perf_counter() - start,
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
    config: GenerateConfig,
    coefs: Sequence[float],
    *,
    layers: Sequence[int] = (),
    label: str | None = None,
    progress: Callable[[GenerationProgress], None] | None = None,
    loaded: LoadedModel | None = None,
) -> SweepResult:
    """A steered generate run per coefficient (the model loaded once), linked in ``steering_sweeps``.

    ``config.steering`` gives everything but the coefficient. With ``layers``, a layer sweep: one run per layer and
    coefficient, each steering at that one layer (``config.steering.layers`` must then be empty). Example::

        run_sweep(ws, GenerateConfig(engine="local", model=m, steering=SteeringConfig("7:mystic-default")),
                  [-8, 0, 8], layers=[15, 20])
    """
    from personavec.store.steering import create_sweep

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
    start = time.perf_counter()
    loaded = loaded or load_for(config)
    if layer_list:  # a layer out of range, or one the vectors run lacks, fails before the sweep exists
        from personavec.steering.interventions import plan_steering

        for _, steering in settings[:: len(coefs)]:
            plan_steering(ws, steering, n_layers=loaded.n_layers, d_model=loaded.d_model, loaded=loaded)
    parameter = "layer,coef" if layer_list else "coef"
    default_label = config.steering.label(coefs)
    if layer_list:
        default_label = default_label.replace("@default", "@" + ",".join(map(str, layer_list)) + " (layer sweep)")
    sweep_id = create_sweep(
        ws.catalog(),
        label=label or default_label,
        parameter=parameter,
        config={"coefs": coefs, "layers": layer_list, "generate": config_dict(config)},
    )
    runs = []
    for coef, steering in settings:
        result = run_local_generation(
            ws, dataclasses.replace(config, steering=steering), progress=progress, loaded=loaded, sweep_id=sweep_id
        )
        runs.append((coef, result))
    return SweepResult(sweep_id, tuple(runs), time.perf_counter() - start)
