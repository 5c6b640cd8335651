"""Generation commands: `generate` (answers from an OpenAI-compatible endpoint) and `serve` (a local endpoint)."""

from __future__ import annotations

import dataclasses
import os
import shlex
import sys
import time
from pathlib import Path
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
    print_table,
    stage_progress,
)
from personavec.cli.app import workspace as resolve_workspace
from personavec.errors import ConfigError
from personavec.generation.config import GenerateConfig, GenerationProgress, GenerationResult, resume_config
from personavec.generation.generate import run_generation
from personavec.workspace import Workspace

_DEFAULTS = GenerateConfig()


@app.command()
@command
def generate(
    ws: WorkspaceOpt = None,
    persona_set: Annotated[str | None, typer.Option("--persona-set", help="Persona set (default builtin).")] = None,
    question_set: Annotated[str | None, typer.Option("--question-set", help="Question set (default builtin).")] = None,
    persona: Annotated[
        list[str] | None, typer.Option("--persona", help="Only this persona (by name); repeatable.")
    ] = None,
    question: Annotated[
        list[int] | None, typer.Option("--question", help="Only this question (0-based position); repeatable.")
    ] = None,
    n_samples: Annotated[int | None, typer.Option("--n-samples", "-n", help="Answers per pair (default 1).")] = None,
    model: Annotated[
        str | None, typer.Option(help=f"Model name the endpoint knows (default {_DEFAULTS.model}).")
    ] = None,
    base_url: Annotated[
        list[str] | None,
        typer.Option(
            "--base-url",
            help=f"Endpoint (default {_DEFAULTS.base_url}); repeat for replicas of one model (round-robin).",
        ),
    ] = None,
    api_key_env: Annotated[
        str | None,
        typer.Option(
            help=f"Env var holding the key for these --base-url endpoints (default {_DEFAULTS.api_key_env}, which is "
            "only ever sent to openrouter.ai)."
        ),
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature (default 0.7).")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per answer (default 256).")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling top_p (default endpoint's).")] = None,
    seed: Annotated[int | None, typer.Option(help="Sampling seed sent to the endpoint.")] = None,
    concurrency: Annotated[int | None, typer.Option(help="Requests in flight (default 10).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Per-request timeout in seconds (default 120).")] = None,
    max_retries: Annotated[int | None, typer.Option(help="Retries on 429/5xx/timeouts (default 6).")] = None,
    resume: Annotated[
        int | None,
        typer.Option("--resume", help="Resume this generate run (asks only what is missing; given options override)."),
    ] = None,
    run_id: Annotated[int | None, typer.Option("--run-id", hidden=True, help="Old spelling of --resume.")] = None,
    engine: Annotated[
        str | None, typer.Option(help="remote (an endpoint, default) or local (transformers in this process).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="local engine: auto, cpu, cuda:0 ...")] = None,
    dtype: Annotated[str | None, typer.Option(help="local engine: auto, float32, bfloat16, float16.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="local engine: answers generated together.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask an OpenAI-compatible endpoint every persona x question; answers land in the catalog as they arrive.

    Rerun with --resume RUN to continue a stopped run: only pairs without an answer are asked again, with the run's
    stored settings; options given on the command line override the operational ones (endpoint, concurrency...).
    """
    if resume is not None and run_id is not None and resume != run_id:
        raise ConfigError(f"--resume {resume} and --run-id {run_id} name different runs; give only --resume")
    resume = resume if resume is not None else run_id
    given: dict[str, Any] = {
        "persona_set": persona_set,
        "question_set": question_set,
        "personas": tuple(persona) if persona else None,
        "questions": tuple(question) if question else None,
        "n_samples": n_samples,
        "model": model,
        "base_url": base_url[0] if base_url else None,
        "replicas": tuple(base_url[1:]) if base_url else None,
        "api_key_env": api_key_env,
        "temperature": temperature,
        "max_tokens": max_tokens,
        "top_p": top_p,
        "seed": seed,
        "concurrency": concurrency,
        "timeout_s": timeout,
        "max_retries": max_retries,
    }
    given = {k: v for k, v in given.items() if v is not None}
    local: dict[str, Any] = {
        k: v for k, v in {"device": device, "dtype": dtype, "batch_size": batch_size}.items() if v is not None
    }
    if engine is not None:
        given["engine"] = engine

    w = resolve_workspace(ws).require()
    config = resume_config(w, resume, **given) if resume is not None else GenerateConfig(**given)
    if config.engine == "local" and base_url:
        raise ConfigError("--base-url is for --engine remote: the local engine runs the model in this process")
    if config.engine != "local" and local:
        flags = ", ".join(f"--{name.replace('_', '-')}" for name in local)
        raise ConfigError(f"{flags}: for --engine local only (this run asks {config.base_url})")
    if local:  # personavec.generation.local.LocalOptions
        config = dataclasses.replace(config, local=dataclasses.replace(config.local, **local))
    result = _run_with_progress(w, config, resume, quiet=as_json)
    if as_json:
        emit_json(dataclasses.asdict(result))
    else:
        _print_summary(result)
    if result.failures:
        err_console.print(f"[yellow]{escape(str(result.error))}[/]")
        raise typer.Exit(1)


def _run_with_progress(ws: Workspace, config: GenerateConfig, resume: int | None, *, quiet: bool) -> GenerationResult:
    announced: list[int] = []

    with stage_progress("generate", quiet=quiet) as show:

        def update(p: GenerationProgress) -> None:
            if not announced and not quiet:
                announced.append(p.run_id)
                err_console.print(
                    f"generate run [bold]{p.run_id}[/]: {p.total - p.answered} of {p.total} answers to ask"
                )
            show(p.answered + p.failed, p.total, f"{p.answered} done, {p.failed} failed, {p.rate:.2f} answers/s")

        return run_generation(ws, config, resume=resume, progress=update)


def _print_summary(r: GenerationResult) -> None:
    rate = r.new_answers / r.wall_s if r.wall_s > 0 else 0.0
    print_table(
        ["run", "status", "answers", "failures", "asked now", "prompt tok", "completion tok", "wall s", "answers/s"],
        [
            [
                r.run_id,
                r.status,
                f"{r.answers}/{r.total}",
                r.failures,
                r.requested,
                r.prompt_tokens,
                r.completion_tokens,
                f"{r.wall_s:.1f}",
                f"{rate:.2f}",
            ]
        ],
        title="generation",
    )


@app.command()
@command
def serve(
    model: Annotated[
        str, typer.Option(help="smollm2-135m-instruct (embedded), a model directory, a .gguf file or a Hub id.")
    ] = "smollm2-135m-instruct",
    ws: WorkspaceOpt = None,
    record: Annotated[
        bool, typer.Option("--record", help="Store every served answer (and its interventions) as a generate run.")
    ] = False,
    port: Annotated[int | None, typer.Option(help="TCP port (default a free one).")] = None,
    host: Annotated[str, typer.Option(help="Listen address (no authentication: keep it on loopback).")] = "127.0.0.1",
    device: Annotated[str, typer.Option(help="auto, cpu, cuda:0, ...")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16 (personavec backend).")] = "auto",
    max_batch: Annotated[int, typer.Option(help="Answers decoded together (personavec backend).")] = 64,
    max_tokens: Annotated[int, typer.Option(help="Default and largest max_tokens (personavec backend).")] = 1024,
    backend: Annotated[
        str,
        typer.Option(
            help="personavec (steering server, interventions per request) or transformers (`transformers "
            "serve`, no interventions)."
        ),
    ] = "personavec",
    as_json: JsonOpt = False,
) -> None:
    """Serve a local model as an OpenAI-compatible endpoint, offline, until Ctrl-C.

    The personavec backend takes interventions per request (`interventions` next to the OpenAI fields, see
    docs/steering.md), batches requests continuously, and with --record stores every answer in the workspace.
    """
    if port is not None and not 1 <= port <= 65535:
        raise ConfigError(f"--port must be a TCP port 1..65535 (or left out for a free one), got {port}")
    if backend == "transformers":
        if record:
            raise ConfigError("--record needs the personavec backend")
        _serve_transformers(model, port, host, device, as_json, ws)
        return
    if backend != "personavec":
        raise ConfigError(f"--backend must be personavec or transformers, got {backend!r}")
    from personavec.serving.app import ServeConfig
    from personavec.serving.app import serve as run_server

    w = resolve_workspace(ws)
    if ws is not None or record:
        w.require()
    config = ServeConfig(
        model=model,
        workspace=str(w.root) if w.exists() else None,
        record=record,
        host=host,
        port=port or 0,
        max_batch=max_batch,
        max_tokens=max_tokens,
        device=device,
        dtype=dtype,
    )

    def ready(base_url: str, run_id: int | None) -> None:
        if as_json:
            emit_json({"base_url": base_url, "model": config.name, "pid": os.getpid(), "run_id": run_id})
            sys.stdout.flush()
            return
        console.print(f"serving [bold]{escape(config.name)}[/] at [bold]{base_url}[/] (pid {os.getpid()})")
        if run_id is not None:
            console.print(f"  recording every answer in generate run [bold]{run_id}[/] of {w.root}")
        console.print(_generate_hint(base_url, config.name, ws), highlight=False, markup=False, soft_wrap=True)
        console.print("  Ctrl-C stops it.")

    run_server(config, on_ready=ready)


def _generate_hint(base_url: str, model: str, ws: Path | None) -> str:
    """The `personavec generate` line `serve` suggests: on the workspace `serve` was given (``-w``), its arguments
    quoted for the shell, so that it runs as printed."""
    return on_workspace(f"  personavec generate --base-url {shlex.quote(base_url)} --model {shlex.quote(model)}", ws)


def _serve_transformers(
    model: str, port: int | None, host: str, device: str, as_json: bool, ws: Path | None = None
) -> None:
    from personavec.serve import local_server, server_alive

    with local_server(model, port, host=host, device=device) as server:
        if as_json:
            emit_json({"base_url": server.base_url, "model": server.model, "pid": server.pid})
        else:
            console.print(f"serving [bold]{server.model}[/] at [bold]{server.base_url}[/] (pid {server.pid})")
            console.print(
                _generate_hint(server.base_url, server.model, ws), highlight=False, markup=False, soft_wrap=True
            )
            console.print("  Ctrl-C stops it.")
        try:
            while server_alive(server):
                time.sleep(2)
        except KeyboardInterrupt:
            console.print("stopping the server")
            return
        err_console.print(f"[bold red]error:[/] the server stopped; its log: {server.log_path}")
        raise typer.Exit(1)
