"""`personavec extract`: a responses run in, an extraction run id out."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from personavec.cli.app import JsonOpt, WorkspaceOpt, app, command, console, emit_json, workspace


@app.command()
@command
def extract(
    responses_run: Annotated[
        int | None, typer.Option("--responses-run", help="Responses run (generate / ingest-responses) to extract.")
    ] = None,
    model: Annotated[str, typer.Option(help="Hub id, model dir, .gguf file or smollm2-135m-instruct.")] = (
        "smollm2-135m-instruct"
    ),
    layer: Annotated[
        list[int] | None, typer.Option("--layer", help="hidden_states index; repeat for several (default: 65%).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, float32 on CPU), float32, bfloat16, float16.")] = (
        "auto"
    ),
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    device_map: Annotated[
        str | None, typer.Option(help="from_pretrained device_map (e.g. auto) for big models.")
    ] = None,
    span: Annotated[str, typer.Option(help="exact (response tokens) or seed (the seed's rule).")] = "exact",
    prompt_format: Annotated[str, typer.Option("--format", help="chat (chat template) or raw (plaintext).")] = "chat",
    max_batch_tokens: Annotated[
        int | None, typer.Option(help="Token budget per batch, padding included (default: 1024 on CPU, 16384 on GPU).")
    ] = None,
    max_batch_size: Annotated[int, typer.Option(help="Most conversations per batch.")] = 64,
    compile_blocks: Annotated[
        bool,
        typer.Option("--compile", help="torch.compile the decoder blocks (GPU: ~1.6x after a ~25 s compile)."),
    ] = False,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", help="Only this persona's responses (repeatable).")
    ] = None,
    question: Annotated[
        list[int] | None, typer.Option("--question", help="Only this question (0-based position; repeatable).")
    ] = None,
    resume: Annotated[int | None, typer.Option("--resume", help="Continue an interrupted extraction run.")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Extract mean response activations of a responses run into a new extraction run (prints its id)."""

    from personavec.errors import ConfigError
    from personavec.extract import ExtractConfig, run_extraction

    if responses_run is None and resume is None:
        raise ConfigError("give --responses-run N (or --resume RUN to continue an interrupted run)")
    config = ExtractConfig(
        model=model,
        layers=tuple(layer) if layer else None,
        dtype=dtype,
        device=device,
        device_map=device_map,
        span=span,
        prompt_format=prompt_format,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        compile=compile_blocks,
        personas=tuple(persona) if persona else None,
        questions=tuple(question) if question else None,
    )
    w = workspace(ws).require()
    with Progress(
        TextColumn("[bold]extract[/]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=as_json,
    ) as bar:
        task = bar.add_task("extract", total=None, tok_s=0.0)

        def on_progress(p) -> None:
            bar.update(task, completed=p.done_examples, total=p.total_examples, tok_s=p.tok_s)

        result = run_extraction(w, config, responses_run, run_id=resume, progress=on_progress)
    if as_json:
        emit_json(result)
    else:
        console.print(
            f"extraction run [bold]{result.run_id}[/]: {result.n_examples} examples "
            f"({result.n_computed} computed, {result.n_truncated} truncated), layers {list(result.layers)}, "
            f"{result.n_tokens:,} tokens at {result.tok_s:,.0f} tok/s"
        )
        console.print(result.run_id)
