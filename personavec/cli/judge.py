"""Judge, trait and direction-export commands: `judge`, `rubrics`, `trait add|vectors|project`, `export-direction`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

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
from personavec.errors import ConfigError

trait_app = typer.Typer(
    help="Contrastive trait vectors: add a trait set, compute its vector, project answers onto it.",
    no_args_is_help=True,
)
app.add_typer(trait_app, name="trait")


@app.command()
@command
def judge(
    responses_run: Annotated[
        int | None, typer.Argument(help="A generate or ingest-responses run (not needed with --resume).")
    ] = None,
    rubric: Annotated[
        list[str] | None,
        typer.Option(
            "--rubric",
            "-r",
            help="role_adherence (0-3), coherence (0-100), a built-in trait (pirate), or a rubric/trait file; "
            "repeatable (default coherence).",
        ),
    ] = None,
    model: Annotated[str | None, typer.Option(help="Judge model (default openai/gpt-4.1-mini).")] = None,
    base_url: Annotated[
        list[str] | None, typer.Option("--base-url", help="Endpoint (default OpenRouter); repeat for replicas.")
    ] = None,
    api_key_env: Annotated[
        str | None, typer.Option(help="Env var holding the key for these endpoints (as for `generate`).")
    ] = None,
    score_mode: Annotated[
        str | None,
        typer.Option(help="auto (logprobs when the endpoint returns them, else the parsed number), logprobs, parse."),
    ] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Tokens the judge may write (default 8).")] = None,
    temperature: Annotated[float | None, typer.Option(help="Judge temperature (default 0).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (default 10).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Per-request timeout in seconds (default 60).")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries on 429/5xx/timeouts (default 6).")] = None,
    resume: Annotated[
        int | None, typer.Option("--resume", help="Resume this judge run (asks only pairs without a judge answer).")
    ] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Score every answer of a responses run with an LLM judge; judgements land in the catalog as they arrive.

    Answers the judge gives no score for (a refusal, no number, too little probability on the scale) are stored
    with their raw output and an error; requests that fail after retries are asked again by --resume RUN.
    """
    from personavec.judging.judge import JudgeConfig, JudgeProgress, resume_config, run_judge

    given: dict[str, Any] = {
        "rubrics": tuple(rubric) if rubric else None,
        "model": model,
        "base_url": base_url[0] if base_url else None,
        "replicas": tuple(base_url[1:]) if base_url else None,
        "api_key_env": api_key_env,
        "score_mode": score_mode,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "concurrency": concurrency,
        "timeout_s": timeout,
        "max_retries": max_retries,
    }
    given = {k: v for k, v in given.items() if v is not None}
    w = resolve_workspace(ws).require()
    if resume is not None:
        if responses_run is not None:
            given["responses_run"] = responses_run
        config = resume_config(w, resume, **given)
    elif responses_run is None:
        raise ConfigError("name the responses run to judge (personavec judge RUN --rubric ...), or --resume RUN")
    else:
        config = JudgeConfig(responses_run, **given)

    bar = Progress(
        TextColumn("[bold]judge run {task.fields[run]}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn(
            "[green]{task.fields[scored]} scored[/] {task.fields[unscored]} unscored [red]{task.fields[failed]}"
        ),
        TextColumn("{task.fields[rate]:.2f}/s"),
        TimeElapsedColumn(),
        console=err_console,
        disable=as_json,
    )
    task: list[TaskID] = []

    def update(p: JudgeProgress) -> None:
        if not task:
            task.append(bar.add_task("judge", total=p.total, run=p.run_id, scored=0, unscored=0, failed=0, rate=0.0))
        bar.update(
            task[0],
            completed=p.scored + p.unscored + p.failed,
            scored=p.scored,
            unscored=p.unscored,
            failed=f"{p.failed} failed",
            rate=p.rate,
        )

    with bar:
        result = run_judge(w, config, resume=resume, progress=update)
    if as_json:
        emit_json(dataclasses.asdict(result))
    else:
        rate = result.new / result.wall_s if result.wall_s > 0 else 0.0
        print_table(
            ["run", "status", "scored", "unscored", "failed", "asked now", "logprobs", "wall s", "judgements/s"],
            [
                [
                    result.run_id,
                    result.status,
                    f"{result.scored}/{result.total}",
                    result.unscored,
                    result.failures,
                    result.requested,
                    (f"{result.scored_by_logprobs} of {result.scored} scores" if result.logprobs else "not asked"),
                    f"{result.wall_s:.1f}",
                    f"{rate:.2f}",
                ]
            ],
            title="judge",
        )
    if result.unscored and not as_json:
        query = on_workspace(
            f'personavec sql "SELECT raw_output, error FROM judgements WHERE run_id = {result.run_id} '
            'AND score IS NULL"',
            ws,
        )
        err_console.print(
            f"[yellow]{result.unscored} judge answer(s) gave no score[/]: see {escape(query)}",
            soft_wrap=True,
            highlight=False,
        )
    if result.failures:
        err_console.print(f"[yellow]{result.error}[/]")
        raise typer.Exit(1)


@app.command()
@command
def rubrics(as_json: JsonOpt = False) -> None:
    """List the built-in rubrics and traits (their prompts are in docs/judge.md)."""
    from personavec.judging.rubrics import BUILTIN_RUBRICS, builtin_trait_names, read_trait_file

    items = [(r.name, r.scale, "rubric") for r in BUILTIN_RUBRICS.values()]
    items += [(n, read_trait_file(n).rubric.scale, "trait") for n in builtin_trait_names()]
    if as_json:
        emit_json([{"name": n, "scale": s, "kind": k} for n, s, k in items])
    else:
        print_table(["name", "scale", "kind"], items, title="built-in rubrics")


# ------------------------------------------------------------------------------------------------------ traits


@trait_app.command("add")
@command
def trait_add(
    trait: Annotated[str, typer.Argument(help="A trait set file (persona_vectors JSON layout) or a built-in trait.")],
    name: Annotated[
        str | None, typer.Option(help="Trait name (default: the file's name field, else its stem).")
    ] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Add a trait set: persona set and question set trait-NAME (pos_i / neg_i instructions, the questions)."""
    from personavec.judging.rubrics import read_trait_file
    from personavec.judging.traits import TraitConfig, add_trait

    res = add_trait(resolve_workspace(ws).require(), TraitConfig(trait, name))
    if as_json:
        emit_json({k: v for k, v in dataclasses.asdict(res).items() if k != "rubric"} | {"rubric": res.rubric.name})
        return
    next_steps = on_workspace(
        f"  personavec generate --persona-set {res.persona_set} --question-set {res.question_set} ...\n"
        f"  personavec judge RUN --rubric {trait} --rubric coherence ...   (the trait's rubric: "
        f"{read_trait_file(trait).rubric.name!r})",
        ws,
    )
    console.print(
        f"trait [bold]{res.name}[/]: {res.n_pairs} instruction pairs (personas pos_1..pos_{res.n_pairs}, "
        f"neg_1..neg_{res.n_pairs}) x {res.n_questions} questions in sets {res.persona_set!r}; next:\n"
        f"{escape(next_steps)}",
        soft_wrap=True,
        highlight=False,
    )


@trait_app.command("vectors")
@command
def trait_vectors(
    extraction_run: Annotated[int, typer.Argument(help="An extract run over the trait's answers.")],
    trait: Annotated[str, typer.Option("--trait", "-t", help="Trait name (its judge rubric's name).")],
    layer: Annotated[list[int] | None, typer.Option("--layer", "-l", help="Layer (repeat; default: all).")] = None,
    no_filter: Annotated[bool, typer.Option("--no-filter", help="Average every answer (no judge scores).")] = False,
    threshold: Annotated[float, typer.Option(help="pos keeps trait >= this, neg keeps trait < this.")] = 50.0,
    coherence: Annotated[float, typer.Option(help="Both sides keep coherence >= this.")] = 50.0,
    min_count: Annotated[int, typer.Option("--min-count", help="Fail unless each side keeps this many.")] = 1,
    judge_run: Annotated[list[int] | None, typer.Option("--judge-run", help="Judge run(s) to read.")] = None,
    rubric: Annotated[str | None, typer.Option(help="The judge rubric scoring the trait (default: the trait).")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The trait vector mean(pos) - mean(neg) per layer, from judge-filtered answers, as a vectors run."""
    from personavec.judging.traits import TraitVectorConfig, compute_trait_vectors

    config = TraitVectorConfig(
        extraction_run,
        trait,
        tuple(layer) if layer else None,
        filter=not no_filter,
        threshold=threshold,
        coherence=coherence,
        min_count=min_count,
        judge_runs=tuple(judge_run or ()),
        rubric=rubric,
    )
    res = compute_trait_vectors(resolve_workspace(ws).require(), config)
    if as_json:
        emit_json(res)
        return
    console.print(
        f"run {res.run_id}: groups {', '.join(res.groups)} at layers {', '.join(map(str, res.layers))} from "
        f"{res.n_examples} answers (filters: {'; '.join(config.where) or 'none'})"
    )


@trait_app.command("project")
@command
def trait_project(
    vector_run: Annotated[int, typer.Argument(help="A vectors run holding the trait vector.")],
    extraction_run: Annotated[int, typer.Argument(help="An extract run of the answers to project.")],
    group: Annotated[str, typer.Option("--group", "-g", help="The vector (group) to project onto.")],
    layer: Annotated[int | None, typer.Option("--layer", "-l", help="Layer (default: the run's only/seed).")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Project each answer of an extract run onto a trait vector (monitoring); AUROC when answers are pos/neg."""
    from personavec.judging.traits import auroc, project_onto_vector

    p = project_onto_vector(resolve_workspace(ws).require(), vector_run, group, extraction_run, layer)
    pos, neg = p.by_group("pos"), p.by_group("neg")
    score = auroc(pos, neg) if len(pos) and len(neg) else None
    if as_json:
        emit_json(
            {
                "vector_run": vector_run,
                "group": group,
                "layer": p.layer,
                "auroc": score,
                "projections": [
                    {"response_id": r, "persona": n, "question": q, "value": float(v)}
                    for r, n, q, v in zip(p.response_ids, p.personas, p.questions, p.values, strict=True)
                ],
            }
        )
        return
    print_table(
        ["response", "persona", "question", "projection"],
        [
            (r, n, q[:50], f"{v:+.4f}")
            for r, n, q, v in zip(p.response_ids, p.personas, p.questions, p.values, strict=True)
        ],
    )
    if score is not None:
        console.print(f"AUROC pos vs neg: {score:.3f} ({len(pos)} pos, {len(neg)} neg answers, layer {p.layer})")


# ------------------------------------------------------------------------------------------------------ export


@app.command("export-direction")
@command
def export_direction_cmd(
    run: Annotated[int, typer.Argument(help="A vectors run id.")],
    group: Annotated[str, typer.Argument(help="The group (persona, trait...) to export across layers.")],
    out: Annotated[Path, typer.Argument(help="Output: .gguf (llama.cpp control vector) or .safetensors.")],
    layer: Annotated[list[int] | None, typer.Option("--layer", "-l", help="Layer (repeat; default: all).")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="gguf or safetensors (default: by suffix).")] = None,
    model_hint: Annotated[
        str | None,
        typer.Option(
            help="GGUF controlvector.model_hint: transformers' model_type (default: the one recorded "
            "with the extraction run, e.g. gpt_neox).",
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export one group at every layer: a llama.cpp/repeng control vector (GGUF, direction.(L-1) for our layer L)
    or safetensors (layer.L), provenance in the metadata."""
    from personavec.exports import export_direction, load_direction

    direction = load_direction(run, group, tuple(layer) if layer else None, workspace=resolve_workspace(ws))
    res = export_direction(direction, out, fmt, layers_named=bool(layer), model_hint=model_hint, overwrite=overwrite)
    if as_json:
        emit_json(res)
        return
    mapping = ", ".join(f"{k}->{v}" for k, v in res.layers.items())
    console.print(f"wrote {res.format} {res.path}: group {group!r} of run {run}, layers (ours->file) {mapping}")
    for k, why in res.skipped.items():
        console.print(f"  skipped layer {k}: {why}")
    if res.model_hint_note:
        console.print(f"  note: {res.model_hint_note}")
