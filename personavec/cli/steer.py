"""Steering commands: `steer` (steered/capped generation, sweeps), `monitor` (per-token projections),
`sweep-report`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from personavec.cli.app import (
    JsonOpt,
    WorkspaceOpt,
    app,
    command,
    console,
    emit_json,
    err_console,
    on_workspace,
    print_table,
)
from personavec.cli.app import workspace as resolve_workspace

VectorOpt = Annotated[
    str,
    typer.Option(
        "--vector",
        "-v",
        help="RUN:NAME from a vectors run: a persona or group (7:pirate), a difference (7:pirate-default), the "
        "assistant axis (7:axis); negate with 7:-axis.",
    ),
]
AllowOtherModelOpt = Annotated[
    bool,
    typer.Option(
        "--allow-other-model",
        help="Use vectors from another model of the same shape (refused otherwise; recorded with the run).",
    ),
]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")]
DtypeOpt = Annotated[str, typer.Option(help="auto (bf16 on CUDA, float32 on CPU), float32, bfloat16, float16.")]


def _progress(quiet: bool) -> tuple[Progress, Any]:
    bar = Progress(
        TextColumn("[bold]run {task.fields[run]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tok_s]:.1f} tok/s"),
        TimeElapsedColumn(),
        console=err_console,
        disable=quiet,
    )
    tasks: dict[int, Any] = {}

    def update(p: Any) -> None:
        if p.run_id not in tasks:
            tasks[p.run_id] = bar.add_task("steer", total=p.total, run=p.run_id, tok_s=0.0)
        rate = p.completion_tokens / p.elapsed_s if p.elapsed_s > 0 else 0.0
        bar.update(tasks[p.run_id], completed=p.answered, tok_s=rate)

    return bar, update


@app.command()
@command
def steer(
    ctx: typer.Context,
    vector: Annotated[
        str | None,
        typer.Option(
            "--vector",
            "-v",
            help="RUN:NAME from a vectors run: a persona or group (7:pirate), a difference (7:pirate-default), the "
            "assistant axis (7:axis); negate with 7:-axis. Needed unless --resume-sweep.",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option(help="The model to steer (name, directory, .gguf, Hub id). Default: the vectors run's model."),
    ] = None,
    kind: Annotated[str, typer.Option(help="add (h + c v), ablate (h - (h.u)u + c v) or cap (h.u <= tau).")] = "add",
    layer: Annotated[
        list[int] | None, typer.Option("--layer", "-l", help="hidden_states index (repeat; default: the run's).")
    ] = None,
    coef: Annotated[
        list[float] | None,
        typer.Option(
            "--coef", "-c", help="Coefficient (repeat for a sweep: one run each); needed by add, 0 if left out."
        ),
    ] = None,
    sweep_layer: Annotated[
        list[int] | None,
        typer.Option(
            "--sweep-layer",
            help="Layer sweep: one run per --sweep-layer and --coef, each steering that one layer (repeat; "
            "--layer repeated instead steers several layers at once in each run).",
        ),
    ] = None,
    normalize: Annotated[
        bool, typer.Option("--normalize", help="Coefficients in units of the layer's mean activation norm.")
    ] = False,
    positions: Annotated[
        str,
        typer.Option(
            help="all; generated (the generated tokens only); or response (those and the last prompt token: "
            "persona_vectors' positions='response').",
        ),
    ] = "all",
    tau: Annotated[
        list[float] | None, typer.Option("--tau", help="cap: threshold on h.u (one, or one per layer; inf ok).")
    ] = None,
    cap_reference: Annotated[
        int | None, typer.Option("--cap-reference", help="cap: responses or extract run whose tokens set tau.")
    ] = None,
    percentile: Annotated[float, typer.Option(help="cap: percentile of the reference projections.")] = 25.0,
    reference_persona: Annotated[
        list[str] | None, typer.Option("--reference-persona", help="cap: only these personas' answers (repeat).")
    ] = None,
    persona: Annotated[list[str] | None, typer.Option("--persona", help="Only this persona (repeat).")] = None,
    question: Annotated[list[int] | None, typer.Option("--question", help="Only this question (repeat).")] = None,
    persona_set: Annotated[str, typer.Option("--persona-set")] = "builtin",
    question_set: Annotated[str, typer.Option("--question-set")] = "builtin",
    n_samples: Annotated[int, typer.Option("--n-samples", "-n")] = 1,
    temperature: Annotated[float, typer.Option(help="0 is greedy.")] = 0.7,
    max_tokens: Annotated[int, typer.Option()] = 256,
    top_p: Annotated[float | None, typer.Option()] = None,
    seed: Annotated[int | None, typer.Option()] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Answers generated together.")] = 16,
    label: Annotated[str | None, typer.Option(help="Sweep label (default: the intervention).")] = None,
    allow_other_model: AllowOtherModelOpt = False,
    resume_sweep: Annotated[
        int | None,
        typer.Option("--resume-sweep", help="Finish a stopped sweep (its settings come from the catalog)."),
    ] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generate with an intervention on the local engine: one generate run, or one per --coef linked as a sweep.

    Every run is a generate run like any other (extract it, compare it, query it); its intervention is stored in
    run_interventions / intervention_layers. A sweep's runs are answered together, batch by batch. Resume a stopped
    run with `personavec generate --resume RUN`, a stopped sweep with `personavec steer --resume-sweep SWEEP`.
    """
    from personavec.errors import ConfigError
    from personavec.generation.config import GenerateConfig, LocalOptions
    from personavec.generation.local import run_local_generation, run_sweep
    from personavec.steering.interventions import SteeringConfig

    if resume_sweep is not None:
        given = [  # options typed on the command line (typer's click may be its own: compare by name)
            p.opts[0]
            for p in ctx.command.params
            if p.name not in ("resume_sweep", "ws", "as_json")
            and getattr(ctx.get_parameter_source(p.name or ""), "name", None) == "COMMANDLINE"
        ]
        if given:
            raise ConfigError(f"--resume-sweep takes the sweep's settings from the catalog: drop {', '.join(given)}")
        _resume_sweep(resolve_workspace(ws).require(), resume_sweep, as_json, ws)
        return
    if vector is None:
        raise ConfigError("steer needs --vector RUN:NAME (or --resume-sweep SWEEP)")
    coefs = list(coef or [0.0])
    steering = SteeringConfig(
        vector=vector,
        kind=kind,
        layers=tuple(layer or ()),
        coef=coefs[0],
        positions=positions,
        normalize=normalize,
        tau=tuple(tau or ()),
        percentile=percentile,
        reference_run=cap_reference,
        reference_personas=tuple(reference_persona or ()),
        allow_other_model=allow_other_model,
    )
    if kind == "add" and not coef:  # a run at 0 would be the unsteered model, labelled steered
        raise ConfigError("--kind add needs --coef C (repeat for a sweep; --coef 0 adds the unsteered baseline)")
    w = resolve_workspace(ws).require()
    if model is None:
        from personavec.vectors import load_vectors

        model = load_vectors(steering.ref.run_id, workspace=w).model
    config = GenerateConfig(
        persona_set=persona_set,
        question_set=question_set,
        personas=tuple(persona or ()),
        questions=tuple(question or ()),
        n_samples=n_samples,
        model=model,
        temperature=temperature,
        max_tokens=max_tokens,
        top_p=top_p,
        seed=seed,
        engine="local",
        local=LocalOptions(device=device, dtype=dtype, batch_size=batch_size),
        steering=steering,
    )
    bar, update = _progress(as_json)
    with bar:
        if len(coefs) > 1 or sweep_layer:
            sweep = run_sweep(w, config, coefs, layers=tuple(sweep_layer or ()), label=label, progress=update)
            sweep_id, results, wall = sweep.sweep_id, list(sweep.runs), sweep.wall_s
        else:
            sweep_id, results, wall = None, [(coefs[0], run_local_generation(w, config, progress=update))], None
    _print_runs(steering, coefs, list(sweep_layer or []), sweep_id, results, as_json, wall, ws)


def _resume_sweep(w: Any, sweep_id: int, as_json: bool, ws: Path | None) -> None:
    from personavec.config import config_from_dict
    from personavec.generation.config import GenerateConfig
    from personavec.generation.local import run_sweep
    from personavec.store.steering import get_sweep

    stored = get_sweep(w.catalog(), sweep_id).config
    steering = config_from_dict(GenerateConfig, stored["generate"]).steering
    bar, update = _progress(as_json)
    with bar:
        sweep = run_sweep(w, None, resume=sweep_id, progress=update)
    _print_runs(steering, stored["coefs"], stored["layers"], sweep_id, list(sweep.runs), as_json, sweep.wall_s, ws)


def _print_runs(
    steering: Any,
    coefs: list[float],
    swept: list[int],
    sweep_id: int | None,
    results: list[Any],
    as_json: bool,
    sweep_wall: float | None,
    ws: Path | None,
) -> None:
    """The runs as a table; a sweep's runs ran together, so their time is given once, for the sweep (``ws``: the
    command's --workspace, which the report command it names is given too)."""
    if as_json:
        emit_json({"sweep_id": sweep_id, "runs": [{"coef": c, **dataclasses.asdict(r)} for c, r in results]})
        return
    kind = steering.kind
    per_layer = len(results) // len(swept) if swept else 0
    timed = sweep_wall is None
    print_table(
        ["run", *(["layer"] if swept else []), "coef", "status", "answers", "completion tok"]
        + (["wall s", "tok/s"] if timed else []),
        [
            [
                r.run_id,
                *([swept[i // per_layer]] if swept else []),
                f"{c:g}" if kind != "cap" else "",
                r.status,
                f"{r.answers}/{r.total}",
                r.completion_tokens,
                *(
                    [f"{r.wall_s:.1f}", f"{r.completion_tokens / r.wall_s:.1f}" if r.wall_s > 0 else ""]
                    if timed
                    else []
                ),
            ]
            for i, (c, r) in enumerate(results)
        ],
        title=f"steered generation: {steering.label(coefs if sweep_id is not None else None)}"
        + (f" (sweep {sweep_id})" if sweep_id else ""),
    )
    if sweep_wall is not None:
        answers = sum(r.new_answers for _, r in results)
        console.print(f"{answers} new answers of {len(results)} runs, answered together in {sweep_wall:.1f} s")
    if sweep_id is not None:
        console.print(on_workspace(f"report: personavec sweep-report {sweep_id}", ws), highlight=False, markup=False)


@app.command("sweep-report")
@command
def sweep_report(
    sweep: Annotated[int, typer.Argument(help="A sweep id (`personavec sql 'SELECT * FROM steering_sweeps'`).")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory (default reports/sweep_<id>).")] = None,
    vector: Annotated[
        str | None, typer.Option("--vector", "-v", help="Project onto this (default: the sweep's).")
    ] = None,
    layer: Annotated[
        int | None, typer.Option("--layer", "-l", help="Layer to read (default: the steered one).")
    ] = None,
    examples: Annotated[int, typer.Option(help="(persona, question) pairs shown side by side.")] = 3,
    device: Annotated[str | None, typer.Option(help="Default: as the sweep ran.")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Report of a sweep: mean projection of the answers vs coefficient per persona, answers side by side."""
    from personavec.steering.sweep_report import SweepReportConfig, build_sweep_report

    res = build_sweep_report(
        resolve_workspace(ws).require(), SweepReportConfig(sweep, out, vector, layer, examples, device=device)
    )
    if as_json:
        emit_json(res)
        return
    coefs = sorted({p.coef for p in res.points})
    layered = len({p.layer for p in res.points}) > 1  # a layer sweep: one row per persona and layer
    personas = list(dict.fromkeys(p.line if layered else p.persona for p in res.points))
    by = {(p.line if layered else p.persona, p.coef): p.mean_projection for p in res.points}
    print_table(
        ["persona", *(f"c={c:g}" for c in coefs)],
        [[p, *(f"{by[p, c]:+.3f}" if (p, c) in by else "" for c in coefs)] for p in personas],
        title=f"sweep {sweep}: mean projection onto {res.vector} at layer {res.layer}",
    )
    console.print(f"report: {res.html}")


@app.command()
@command
def monitor(
    vector: VectorOpt,
    run: Annotated[int | None, typer.Option("--run", help="A responses or extract run: every answer.")] = None,
    text: Annotated[str | None, typer.Option("--text", help="Any text (tokenized as is).")] = None,
    layer: Annotated[int | None, typer.Option("--layer", "-l", help="Layer (default: the vectors run's).")] = None,
    model: Annotated[str | None, typer.Option(help="Default: the vectors run's model.")] = None,
    persona: Annotated[list[str] | None, typer.Option("--persona", help="Only this persona (repeat).")] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write every token's value (.csv, .jsonl).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing --out file.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    allow_other_model: AllowOtherModelOpt = False,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Per-token projection h.u of answers (--run) or a text (--text) onto a named vector at a layer."""
    from personavec.errors import ConfigError
    from personavec.modeling import load_model
    from personavec.steering.monitor import (
        export_projections,
        project_responses,
        project_text,
        selected_responses,
    )
    from personavec.steering.naming import VectorRef, check_model, resolve_vector
    from personavec.vectors import load_vectors

    if (run is None) == (text is None):
        raise ConfigError("give --run RUN (its answers) or --text TEXT")
    if text is not None and not text.strip():
        raise ConfigError("--text is empty: give some text to project")
    w = resolve_workspace(ws).require()
    ref = VectorRef.parse(vector)
    vset = load_vectors(ref.run_id, layer, workspace=w)
    resolve_vector(vset, ref.expr, negate=ref.negate)  # a bad name fails before the model loads
    if run is not None:
        selected_responses(w, run, tuple(persona or ()))  # so do a bad run or persona
    loaded = load_model(model or vset.model, dtype=dtype, device=device)
    other = check_model(vset, loaded, allow_other_model=allow_other_model)
    if other is not None:
        err_console.print(
            f"warning: vectors run {ref.run_id} comes from another model ({other}), as allowed", markup=False
        )
    if run is not None:
        items = project_responses(w, loaded, run, vector, vset.layer, personas=tuple(persona or ()))
    else:
        assert text is not None  # one of the two, checked above
        items = [project_text(loaded, text, resolve_vector(vset, ref.expr, negate=ref.negate), vset.layer)]
    if out is not None:
        export_projections(items, out, overwrite=overwrite)
    if as_json:
        emit_json(
            {
                "vector": str(ref),
                "layer": vset.layer,
                "out": out,
                "items": [
                    {
                        "label": t.label,
                        "response_id": t.response_id,
                        "mean": t.mean,
                        "mean_from": t.first,
                        "values": t.values.tolist(),
                        "tokens": list(t.tokens),
                    }
                    for t in items
                ],
            }
        )
        return
    print_table(
        ["text", "tokens", "mean", "min", "max"],
        [
            [t.label, len(t.values), f"{t.mean:+.3f}", f"{t.summarized.min():+.3f}", f"{t.summarized.max():+.3f}"]
            for t in items
        ],
        title=f"projection onto {ref} at layer {vset.layer} (raw h.u)",
    )
    if text is not None and len(items[0].values) > 1:
        console.print(
            f"mean, min and max leave out the first token ({items[0].values[0]:+.3f}): the first position of a "
            "sequence is an attention sink (every token's value: --json or --out)",
            highlight=False,
        )
    if out is not None:
        console.print(f"wrote every token's value to {out}")


@app.command()
@command
def evaluate(
    sweep: Annotated[
        int | None, typer.Argument(help="A steering sweep (not needed with --resume or cap only).")
    ] = None,
    trait: Annotated[
        str | None,
        typer.Option(
            "--trait",
            help="The trait the sweep steers towards: a built-in trait (pirate), a trait file, or any name (judged "
            "with the generic trait prompt and --trait-description).",
        ),
    ] = None,
    rubric: Annotated[
        str | None, typer.Option("--rubric", help="A rubric file (0-100) scoring the trait instead of --trait.")
    ] = None,
    trait_description: Annotated[str, typer.Option(help="What the trait looks like (generic trait prompt).")] = "",
    judge_base_url: Annotated[
        list[str] | None, typer.Option("--judge-base-url", help="Judge endpoint (default OpenRouter); repeat.")
    ] = None,
    judge_model: Annotated[str | None, typer.Option("--judge-model", help="Judge model.")] = None,
    judge_api_key_env: Annotated[str | None, typer.Option(help="Env var holding the judge's key.")] = None,
    score_mode: Annotated[str | None, typer.Option(help="auto, logprobs or parse (as for judge).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Judge requests in flight (default 10).")] = None,
    threshold: Annotated[
        float | None, typer.Option(help="Operating point: mean coherence must be >= this (default 50).")
    ] = None,
    no_projection: Annotated[
        bool, typer.Option("--no-projection", help="Skip projecting answers (no model load, no correlation).")
    ] = False,
    cap_vector: Annotated[
        str | None, typer.Option("--cap-vector", help="Capping evaluation: cap along this vector (RUN:NAME).")
    ] = None,
    cap_layer: Annotated[list[int] | None, typer.Option("--cap-layer", help="Capped layer (repeat).")] = None,
    tau: Annotated[list[float] | None, typer.Option("--tau", help="Cap thresholds (one, or one per layer).")] = None,
    cap_reference: Annotated[
        int | None, typer.Option("--cap-reference", help="Responses/extract run whose tokens set tau.")
    ] = None,
    percentile: Annotated[float, typer.Option(help="Cap: percentile of the reference projections.")] = 25.0,
    model: Annotated[str | None, typer.Option(help="Model to cap (default: the sweep's).")] = None,
    jailbreaks: Annotated[
        Path | None, typer.Option(help="Jailbreak prompts (a question file; default the built-in 10).")
    ] = None,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", help="Persona(s) carrying the prompts (default: default).")
    ] = None,
    question: Annotated[list[int] | None, typer.Option("--question", help="Only these prompts (repeat).")] = None,
    max_tokens: Annotated[int, typer.Option(help="Capping answers' length.")] = 128,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    resume: Annotated[int | None, typer.Option("--resume", help="Finish this evaluate run.")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Is the steering any good? Judge a sweep's answers for the trait and coherence, find the operating point, and
    (with --cap-vector) compare harmful answers to jailbreak prompts with and without a cap. One evaluate run."""
    from personavec.errors import ConfigError
    from personavec.steering.evaluate import EvaluateConfig, EvaluateProgress, run_evaluation
    from personavec.steering.interventions import SteeringConfig

    if trait is not None and rubric is not None:
        raise ConfigError("give --trait or --rubric, not both")
    w = resolve_workspace(ws).require()
    given: dict[str, Any] = {
        "trait": trait or rubric,
        "trait_description": trait_description or None,
        "judge_model": judge_model,
        "judge_base_url": judge_base_url[0] if judge_base_url else None,
        "judge_replicas": tuple(judge_base_url[1:]) if judge_base_url else None,
        "judge_api_key_env": judge_api_key_env,
        "score_mode": score_mode,
        "judge_concurrency": concurrency,
        "threshold": threshold,
        "projection": False if no_projection else None,
        "cap_model": model,
        "jailbreaks": str(jailbreaks) if jailbreaks is not None else None,
        "cap_personas": tuple(persona) if persona else None,
        "cap_questions": tuple(question) if question else None,
        "device": device,
        "dtype": dtype,
    }
    if cap_vector is not None:
        given["cap"] = SteeringConfig(
            cap_vector,
            kind="cap",
            layers=tuple(cap_layer or ()),
            tau=tuple(tau or ()),
            reference_run=cap_reference,
            percentile=percentile,
        )
        given["max_tokens"] = max_tokens
    given = {k: v for k, v in given.items() if v is not None}
    config = None
    if resume is None:
        config = EvaluateConfig(sweep=sweep, **given)
    elif len(given) > 2 or sweep is not None:  # device and dtype are always given
        from personavec.config import config_from_dict
        from personavec.store.evaluations import get_evaluation

        stored = get_evaluation(w.catalog(), resume).run.config
        config = config_from_dict(EvaluateConfig, stored, **given, **({"sweep": sweep} if sweep is not None else {}))

    bar = Progress(
        TextColumn("[bold]evaluate {task.fields[step]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("run {task.fields[member]}"),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json,
    )
    tasks: dict[tuple[str, int | None], Any] = {}

    def update(p: EvaluateProgress) -> None:
        key = (p.step, p.responses_run_id)
        total = getattr(p.detail, "total", None)
        done = getattr(p.detail, "answered", None)
        if done is None and p.detail is not None:
            done = p.detail.scored + p.detail.unscored + p.detail.failed
        if key not in tasks:
            tasks[key] = bar.add_task(p.step, total=total, step=p.step, member=p.responses_run_id or "")
        bar.update(tasks[key], completed=done or 0, total=total)

    with bar:
        res = run_evaluation(w, config, resume=resume, progress=update)
    if as_json:
        emit_json(res)
        return
    rows = []
    by: dict[tuple[Any, ...], dict[str, Any]] = {}
    for f in res.figures:
        if f.persona is None and f.part in ("sweep", "capping"):
            by.setdefault((f.part, f.responses_run_id, f.setting, f.layer, f.coef), {})[f.metric] = f
    for (part, rid, setting, layer, coef), m in by.items():
        first = m["trait"] if "trait" in m else m["harmful_rate"]
        coh = m["coherence"]
        scale = 100.0 if part == "capping" else 1.0
        rows.append(
            [
                rid,
                setting or f"layer {layer}, c = {coef:g}",
                first.metric,
                "–" if first.value is None else f"{first.value * scale:.1f} (n={first.n})",
                "–" if coh.value is None else f"{coh.value:.1f} (n={coh.n})",
            ]
        )
    print_table(["run", "setting", "metric", "value", "coherence"], rows, title=f"evaluate run {res.run_id}")
    for f in res.figures:
        if f.part == "correlation":
            r = "–" if f.value is None else f"{f.value:+.3f}"
            console.print(f"projection vs trait at layer {f.layer}: r = {r} over {f.n} answers")
    op = res.operating_point
    if res.sweep_id is not None:
        console.print(
            f"operating point: c = {op.coef:g} at layer {op.layer} (run {op.responses_run_id}): trait "
            f"{op.trait:.1f}, coherence {op.coherence:.1f}"
            if op is not None
            else "operating point: none (no setting kept coherence above the threshold)"
        )
    console.print(f"report: {res.report_html}")
