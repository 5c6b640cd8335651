"""Workspace, catalog and ingest commands: init, db, runs, sql, ingest."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from personavec import ingest as ingest_mod
from personavec.cli.app import (
    CliTyper,
    JsonOpt,
    WorkspaceOpt,
    app,
    command,
    console,
    emit_json,
    print_table,
    workspace,
)
from personavec.errors import ConfigError
from personavec.store.engine import catalog_revision
from personavec.store.models import SCHEMA_REVISION
from personavec.store.query import DEFAULT_MEMORY_LIMIT, DEFAULT_TIMEOUT_S, check_limits, run_readonly_sql
from personavec.store.runs import list_runs
from personavec.workspace import init_workspace

db_app = CliTyper(help="Catalog schema (Alembic) commands.", no_args_is_help=True)
ingest_app = CliTyper(help="Load persona sets, question sets and responses from files.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(ingest_app, name="ingest")


@app.command()
@command
def init(
    ws: WorkspaceOpt = None,
    zarr_url: Annotated[
        str | None,
        typer.Option(
            "--zarr-url",
            help="Keep activations at this fsspec URL (file:///shared/acts.zarr, s3://bucket/acts.zarr) for "
            "processes on several machines.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a workspace (catalog at the head schema, built-in persona and question sets)."""

    w = init_workspace(ws, zarr_url=zarr_url)
    if as_json:
        emit_json(
            {
                "workspace": w.root,
                "catalog": w.catalog_path,
                "activations": w.zarr_location,
                "revision": SCHEMA_REVISION,
            }
        )
    else:
        console.print(f"workspace ready at [bold]{w.root}[/] (schema {SCHEMA_REVISION})")
        if w.zarr_url:
            console.print(f"activations at {escape(w.zarr_url)}", highlight=False)


@db_app.command("upgrade")
@command
def db_upgrade(ws: WorkspaceOpt = None, revision: str = "head") -> None:
    """Migrate the catalog's schema to REVISION (default: head)."""

    w = workspace(ws).require()
    w.upgrade(revision)
    console.print(f"catalog {w.catalog_path} upgraded to {revision}")


@db_app.command("downgrade")
@command
def db_downgrade(
    revision: Annotated[str, typer.Argument(help="Target revision, e.g. base (drops every table).")],
    yes: Annotated[bool, typer.Option("--yes", help="Drop the tables, rows and activations it lists.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only show what it would drop.")] = False,
    ws: WorkspaceOpt = None,
) -> None:
    """Migrate the catalog's schema down to REVISION; refuses (exit 2) to lose data without --yes."""
    w = workspace(ws)
    plan = w.downgrade(revision, allow_destructive=yes, dry_run=dry_run)
    if plan.dropped_tables:
        print_table(["table", "rows"], [(t.name, f"{t.rows:,}") for t in plan.dropped_tables])
    verb = "dropped" if plan.applied else "would drop"
    console.print(f"downgrade to {revision} {verb}: {plan.describe()}", highlight=False)
    if plan.applied:
        console.print(f"catalog {w.catalog_path} is at revision {plan.to_revision or 'base (no tables)'}")


@db_app.command("current")
@command
def db_current(ws: WorkspaceOpt = None) -> None:
    """Show the catalog's schema revision and the package's head."""

    w = workspace(ws).require()
    w.close()  # the revision is read on a read-only connection
    console.print(f"catalog: {catalog_revision(w.catalog_path)}  head: {SCHEMA_REVISION}")


@app.command()
@command
def runs(
    ws: WorkspaceOpt = None,
    kind: Annotated[str | None, typer.Option(help="Only runs of this kind.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """List runs of every kind with status and counts."""

    rows = list_runs(workspace(ws).catalog(read_only=True), kind)
    if as_json:
        emit_json(rows)
        return
    print_table(
        ["id", "kind", "status", "created", "wall s", "items", "failed", "detail"],
        [
            (
                r.id,
                r.kind,
                r.status,
                r.created_at.strftime("%m-%d %H:%M"),
                f"{r.wall_s:.1f}" if r.wall_s is not None else "",
                r.items,
                r.failed,
                r.detail,
            )
            for r in rows
        ],
    )


@app.command()
@command
def sql(
    query: Annotated[
        str, typer.Argument(help="Read statements (SELECT, WITH, DESCRIBE, SHOW, EXPLAIN ...), several split by ;.")
    ],
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV.")] = False,
    limit: Annotated[int, typer.Option(help="Rows shown in the table view (0 = all).")] = 200,
    timeout: Annotated[
        float, typer.Option("--timeout", help="Seconds the query may run (0 = no limit); Ctrl-C stops it too.")
    ] = DEFAULT_TIMEOUT_S,
    memory_limit: Annotated[
        str, typer.Option("--memory-limit", help="DuckDB's memory limit for the query (512MB, 4GiB ...).")
    ] = DEFAULT_MEMORY_LIMIT,
) -> None:
    """Run read-only SQL on the catalog and print every statement's result.

    The catalog is opened read-only with external access (files, network, extensions) and configuration locked;
    only read statements run. --json prints one JSON array of row objects per statement, one per line; --csv one
    block per statement, blank-line separated. A column name that repeats gets _1, _2, ... (in every view)."""

    if limit < 0:
        raise ConfigError(f"--limit must be >= 0 (0 = all rows), got {limit}")
    if as_json and as_csv:
        raise ConfigError("--json and --csv are two ways to print the results: give one")
    check_limits(timeout, memory_limit)
    w = workspace(ws).require()
    results = run_readonly_sql(w.catalog_path, query, timeout_s=timeout, memory_limit=memory_limit)
    for i, result in enumerate(results):
        if as_json:
            emit_json(result.records())
        elif as_csv:
            if i:
                sys.stdout.write("\n")
            writer = csv.writer(sys.stdout)
            writer.writerow(result.keys)
            writer.writerows(result.rows)
        else:
            shown = result.rows if limit == 0 else result.rows[:limit]
            if len(results) > 1:
                console.print(f"[bold]{escape(result.statement)}[/]", highlight=False)
            print_table(result.keys, [tuple(_cell(v) for v in row) for row in shown])
            if len(shown) < len(result.rows):
                console.print(f"({len(result.rows)} rows, {len(shown)} shown; --limit 0 for all)")


def _cell(value: object, width: int = 200) -> object:
    """A table cell cut to ``width`` characters (a vector or a blob would fill the screen; --json/--csv keep all)."""
    text = "" if value is None else str(value)
    return text if len(text) <= width else f"{text[:width]}… ({len(text):,} chars)"


FileArg = Annotated[Path, typer.Argument(help="Input file.", exists=False)]
NameOpt = Annotated[
    str | None, typer.Option("--name", help="Set name (default: the file's name field, else its stem).")
]


def _report(result: ingest_mod.IngestResult, as_json: bool, what: str) -> None:
    if as_json:
        emit_json(result)
    else:
        named = f" {result.name!r}" if result.name else ""
        console.print(f"run {result.run_id}: ingested {result.rows} {what}{named}")


@ingest_app.command("personas")
@command
def ingest_personas(path: FileArg, name: NameOpt = None, ws: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """Create a persona set from JSON, YAML or CSV."""
    result = ingest_mod.ingest(workspace(ws).require(), ingest_mod.IngestConfig("personas", path, name))
    _report(result, as_json, "personas into persona set")


@ingest_app.command("questions")
@command
def ingest_questions(path: FileArg, name: NameOpt = None, ws: WorkspaceOpt = None, as_json: JsonOpt = False) -> None:
    """Create a question set from JSON, YAML or CSV."""
    result = ingest_mod.ingest(workspace(ws).require(), ingest_mod.IngestConfig("questions", path, name))
    _report(result, as_json, "questions into question set")


@ingest_app.command("responses")
@command
def ingest_responses(
    path: FileArg,
    persona_set: Annotated[str, typer.Option(help="Persona set the names refer to.")] = ingest_mod.BUILTIN,
    question_set: Annotated[str, typer.Option(help="Question set the texts refer to.")] = ingest_mod.BUILTIN,
    fmt: Annotated[
        str | None, typer.Option("--format", help="seed-json, jsonl, csv or parquet (default: by extension).")
    ] = None,
    model: Annotated[str | None, typer.Option(help="The model that wrote the responses (provenance).")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Load responses (seed cache JSON, JSONL, CSV, Parquet) into a new run."""
    config = ingest_mod.IngestConfig(
        "responses", path, persona_set=persona_set, question_set=question_set, format=fmt, model=model
    )
    _report(ingest_mod.ingest(workspace(ws).require(), config), as_json, "responses")
