"""`personavec extract`: a responses run in, an extraction run id out."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer
from rich.markup import escape

from personavec.cli.app import (
    JsonOpt,
    WorkspaceOpt,
    app,
    command,
    console,
    emit_json,
    err_console,
    on_workspace,
    stage_progress,
    workspace,
)


@app.command()
@command
def extract(
    ctx: typer.Context,
    responses_run: Annotated[
        int | None, typer.Option("--responses-run", help="Responses run (generate / ingest-responses) to extract.")
    ] = None,
    model: Annotated[
        str | None, typer.Option(help="Hub id, model dir, .gguf file or smollm2-135m-instruct (the default).")
    ] = None,
    layer: Annotated[
        list[int] | None, typer.Option("--layer", help="hidden_states index; repeat for several (default: 65%).")
    ] = None,
    dtype: Annotated[
        str | None, typer.Option(help="auto (default: bf16 on GPU, float32 on CPU), float32, bfloat16, float16.")
    ] = None,
    device: Annotated[str | None, typer.Option(help="auto (default), cpu, cuda, cuda:N.")] = None,
    device_map: Annotated[
        str | None, typer.Option(help="from_pretrained device_map (e.g. auto) for big models.")
    ] = None,
    span: Annotated[
        str | None, typer.Option(help="exact (default: the response tokens) or seed (the seed's rule).")
    ] = None,
    prompt_format: Annotated[
        str | None, typer.Option("--format", help="chat (default: chat template) or raw (plaintext).")
    ] = None,
    max_batch_tokens: Annotated[
        int | None, typer.Option(help="Token budget per batch, padding included (default: 1024 on CPU, 16384 on GPU).")
    ] = None,
    max_batch_size: Annotated[int | None, typer.Option(help="Most conversations per batch (default 64).")] = None,
    chunk_rows: Annotated[
        int | None,
        typer.Option(help="Zarr rows per chunk (default: ~1 MB a chunk); a chunk is what one process computes."),
    ] = None,
    compile_blocks: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile", help="torch.compile the decoder blocks (GPU: ~1.6x after a ~25 s compile)."
        ),
    ] = None,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", help="Only this persona's responses (repeatable).")
    ] = None,
    question: Annotated[
        list[int] | None, typer.Option("--question", help="Only this question (0-based position; repeatable).")
    ] = None,
    layers_path: Annotated[
        str | None,
        typer.Option(
            "--layers-path", help="Path of the decoder blocks' ModuleList (e.g. model.layers) when not auto-detected."
        ),
    ] = None,
    storage_dtype: Annotated[
        str | None,
        typer.Option(help="Stored activations: float32 (default), bfloat16 or float16 (half the bytes)."),
    ] = None,
    flush_seconds: Annotated[
        float | None, typer.Option(help="Make computed rows durable at least this often (default 30 s).")
    ] = None,
    flush_rows: Annotated[
        int | None, typer.Option(help="... or after this many computed rows, whichever first (default 8192).")
    ] = None,
    resume: Annotated[
        int | None, typer.Option("--resume", help="Continue an interrupted or failed extraction run.")
    ] = None,
    num_processes: Annotated[
        int | None,
        typer.Option(
            "--num-processes",
            help="Data parallel on this machine: N processes (one model replica each) through accelerate's launcher.",
        ),
    ] = None,
    gpus_per_process: Annotated[
        int | None,
        typer.Option("--gpus-per-process", help="With several processes: GPUs each one shards its model over (1)."),
    ] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract mean response activations of a responses run into a new extraction run (prints its id).

    With --resume RUN, the run's own settings are used; options given override them (those that define what the
    run computes must match, the others, e.g. --device or --max-batch-tokens, apply to this session).

    Data parallel: --num-processes N here, or `accelerate launch [--num_machines M ...] -m personavec extract ...`
    (see the README); rank 0 alone writes the catalog.
    """
    from personavec.errors import ConfigError
    from personavec.extract import launch
    from personavec.extract.config import ExtractConfig, ExtractionProgress, stored_config
    from personavec.extract.run import run_extraction

    # -- data-parallel hooks: launch the processes, or run as one of them (only rank 0 reads the workspace)
    rank, world = launch.launched_rank()
    # checked here too, before any process is launched or model loaded (nan passes every comparison below)
    if flush_seconds is not None and not (0 < flush_seconds < float("inf")):
        raise ConfigError(f"--flush-seconds must be a number of seconds > 0, got {flush_seconds}")
    if flush_rows is not None and flush_rows < 1:
        raise ConfigError(f"--flush-rows must be >= 1, got {flush_rows}")
    if num_processes is not None and num_processes < 1:
        raise ConfigError(f"--num-processes must be >= 1, got {num_processes}")
    if world == 1 and num_processes is not None and num_processes > 1:
        launched = launch.launch(["extract", *_forwarded(ctx, skip=("num_processes",))], num_processes)
        if launched.code:
            if launched.first_failure:
                where = ""
                if launched.run_id is not None:
                    from personavec.store.runs import note_run_error

                    note_run_error(workspace(ws).require().catalog(), launched.run_id, launched.first_failure)
                    where = f" (extraction run {launched.run_id}; resume it with `personavec extract --resume "
                    where += f"{launched.run_id} --num-processes {num_processes}`)"
                line = on_workspace(f"{launched.first_failure}{where}", ws)
                err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
            raise typer.Exit(launched.code)
        return
    if world > 1 and num_processes not in (None, world):
        raise ConfigError(f"--num-processes {num_processes} inside a launch of {world} processes: leave it out")
    lead = rank == 0
    # -- end of the data-parallel hooks

    given: dict[str, Any] = {
        "responses_run": responses_run,
        "model": model,
        "layers": tuple(layer) if layer else None,
        "dtype": dtype,
        "device": device,
        "device_map": device_map,
        "span": span,
        "prompt_format": prompt_format,
        "max_batch_tokens": max_batch_tokens,
        "max_batch_size": max_batch_size,
        "chunk_rows": chunk_rows,
        "compile": compile_blocks,
        "personas": tuple(persona) if persona else None,
        "questions": tuple(question) if question else None,
        "layers_path": layers_path,
        "gpus_per_process": gpus_per_process,
        "storage_dtype": storage_dtype,
        "flush_seconds": flush_seconds,
        "flush_rows": flush_rows,
    }
    given = {k: v for k, v in given.items() if v is not None}
    w = workspace(ws).require() if lead else workspace(ws)  # the catalog lives on rank 0's machine
    if resume is not None:
        config = dataclasses.replace(stored_config(w, resume), **given) if given and lead else None
    elif responses_run is None:
        raise ConfigError("give --responses-run N (or --resume RUN to continue an interrupted run)")
    else:
        config = ExtractConfig(**given)
    with stage_progress("extract", quiet=as_json or not lead) as show:

        def on_progress(p: ExtractionProgress) -> None:
            show(p.done_examples, p.total_examples, f"{p.tok_s:,.0f} tok/s")

        result = run_extraction(w, config, resume=resume, progress=on_progress)
    if not lead:
        return
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"extraction run [bold]{result.run_id}[/]: {result.n_examples} examples "
            f"({result.n_computed} computed, {result.n_truncated} truncated), layers {list(result.layers)}, "
            f"{result.n_tokens:,} tokens at {result.tok_s:,.0f} tok/s"
        )


def _forwarded(ctx: typer.Context, skip: tuple[str, ...]) -> list[str]:
    """The command line that gives this command's options again (for the launched processes)."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if param.param_type_name != "option" or param.name in skip or value is None:
            continue
        if getattr(param, "is_flag", False):
            flag = param.opts[0] if value else next(iter(param.secondary_opts), None)
            if flag and value != param.default:
                args.append(flag)
            continue
        for item in value if isinstance(value, list | tuple) else [value]:
            args += [param.opts[0], str(item)]
    return args


@app.command()
@command
def verify(
    run: Annotated[int | None, typer.Argument(help="Extraction run to check (default: every one).")] = None,
    repair: Annotated[
        bool, typer.Option("--repair", help="Mark damaged rows not done (and drop their damaged shards) for --resume.")
    ] = False,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Check extraction runs' activations against the catalog: rows present, finite, checksums valid, counts.

    Prints one line per run with the fix; exits 1 when something is wrong (0 after --repair when the rest is left to
    `personavec extract --resume RUN`).
    """
    from personavec.verify import describe, verify_runs

    w = workspace(ws).require()
    with stage_progress("verify", quiet=as_json) as show:

        def on_progress(run_id: int, done: int, total: int) -> None:
            show(done, total, f"run {run_id}")

        checks = verify_runs(w, run, repair=repair, progress=on_progress)
    if as_json:
        emit_json([{**dataclasses.asdict(c), "ok": c.ok, "fix": c.fix} for c in checks])
    else:
        for check in checks:
            console.print(on_workspace(describe(check), ws), highlight=False, markup=False, soft_wrap=True)
    unfixed = [c for c in checks if not c.ok and not (repair and all(p.repairable for p in c.problems))]
    if unfixed:
        raise typer.Exit(1)
