"""`personavec extract`: a responses run in, an extraction run id out."""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any

import typer

from personavec.cli.app import JsonOpt, WorkspaceOpt, app, command, console, emit_json, stage_progress, workspace


@app.command()
@command
def extract(
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
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract mean response activations of a responses run into a new extraction run (prints its id).

    With --resume RUN, the run's own settings are used; options given override them (those that define what the
    run computes must match, the others, e.g. --device or --max-batch-tokens, apply to this session).
    """
    from personavec.errors import ConfigError
    from personavec.extract.run import ExtractConfig, ExtractionProgress, run_extraction, stored_config

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
        "compile": compile_blocks,
        "personas": tuple(persona) if persona else None,
        "questions": tuple(question) if question else None,
        "layers_path": layers_path,
        "storage_dtype": storage_dtype,
        "flush_seconds": flush_seconds,
        "flush_rows": flush_rows,
    }
    given = {k: v for k, v in given.items() if v is not None}
    w = workspace(ws).require()
    if resume is not None:
        config = dataclasses.replace(stored_config(w, resume), **given) if given else None
    elif responses_run is None:
        raise ConfigError("give --responses-run N (or --resume RUN to continue an interrupted run)")
    else:
        config = ExtractConfig(**given)
    with stage_progress("extract", quiet=as_json) as show:

        def on_progress(p: ExtractionProgress) -> None:
            show(p.done_examples, p.total_examples, f"{p.tok_s:,.0f} tok/s")

        result = run_extraction(w, config, resume=resume, progress=on_progress)
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"extraction run [bold]{result.run_id}[/]: {result.n_examples} examples "
            f"({result.n_computed} computed, {result.n_truncated} truncated), layers {list(result.layers)}, "
            f"{result.n_tokens:,} tokens at {result.tok_s:,.0f} tok/s"
        )
        console.print(result.run_id)


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
            console.print(describe(check), highlight=False, markup=False, soft_wrap=True)
    unfixed = [c for c in checks if not c.ok and not (repair and all(p.repairable for p in c.problems))]
    if unfixed:
        raise typer.Exit(1)
