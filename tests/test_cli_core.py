"""The core CLI in-process: init, ingest, runs, sql, db — exit codes and what landed in DuckDB."""

from __future__ import annotations

import json

import pytest
import typer

from personavec.cli import app
from personavec.cli.app import WorkspaceOpt, command
from personavec.store.models import SCHEMA_REVISION
from personavec.store.responses import responses_by_key
from personavec.store.runs import list_runs
from personavec.workspace import Workspace


@pytest.mark.slow
def test_init_ingest_runs_sql(cli, tmp_path, seed_cache_file):
    ws = str(tmp_path / "ws")
    res = cli.invoke(app, ["init", "-w", ws, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["revision"]

    res = cli.invoke(app, ["ingest", "responses", str(seed_cache_file), "-w", ws, "--json"])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    with Workspace.resolve(ws).catalog() as catalog:
        assert len(responses_by_key(catalog, run_id)) == 15

    res = cli.invoke(app, ["runs", "-w", ws, "--json"])
    assert res.exit_code == 0
    runs = json.loads(res.stdout)
    assert [(r["kind"], r["items"]) for r in runs] == [
        ("ingest-personas", 23),
        ("ingest-questions", 18),
        ("ingest-responses", 15),
    ]

    res = cli.invoke(app, ["sql", "SELECT count(*) AS n FROM responses", "-w", ws, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"n": 15}]
    res = cli.invoke(app, ["sql", "SELECT name FROM personas ORDER BY position LIMIT 2", "-w", ws, "--csv"])
    assert res.stdout.splitlines() == ["name", "default", "default_assistant"]
    res = cli.invoke(app, ["runs", "-w", ws])
    assert res.exit_code == 0 and "ingest-re" in res.stdout  # the table view (folded to the terminal width)


def test_sql_is_read_only(cli, workspace):
    res = cli.invoke(app, ["sql", "DELETE FROM personas", "-w", str(workspace.root)])
    assert res.exit_code == 2
    assert "only read statements" in res.output
    with workspace.catalog() as catalog, catalog.session() as s:
        assert s.connection().exec_driver_sql("SELECT count(*) FROM personas").scalar() == 23


def test_bad_input_exit_codes(cli, workspace, tmp_path, monkeypatch):
    runs_before = list_runs(workspace.catalog())
    bad = tmp_path / "bad.json"
    bad.write_text('{"oops": "x"}')
    res = cli.invoke(app, ["ingest", "responses", str(bad), "-w", str(workspace.root)])
    assert res.exit_code == 2
    assert "bad.json" in res.output and "not a JSON-encoded" in res.output
    res = cli.invoke(app, ["runs", "-w", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "personavec init" in res.output
    (tmp_path / "afile").write_text("x")  # not a workspace, and `init` would refuse it: no init suggested
    res = cli.invoke(app, ["runs", "-w", str(tmp_path / "afile")])
    assert res.exit_code == 2 and "is a file, not a workspace directory" in res.output and "init" not in res.output
    res = cli.invoke(app, ["sql", "SELECT * FROM no_such_table", "-w", str(workspace.root)])
    assert res.exit_code == 2 and "no_such_table" in res.output
    res = cli.invoke(app, ["runs", "--kind", "extraction", "-w", str(workspace.root)])  # a typo: not an empty table
    assert res.exit_code == 2 and "unknown run kind 'extraction': one of ingest-personas," in res.output
    # two flags that contradict each other: refused, not one of them silently ignored
    root = ["-w", str(workspace.root)]
    res = cli.invoke(app, ["sql", "SELECT 1", "--json", "--csv", *root])
    assert res.exit_code == 2 and "--json and --csv are two ways to print the results: give one" in res.output
    res = cli.invoke(app, ["generate", "--engine", "local", "--model", "m", "--base-url", "http://x/v1", *root])
    assert res.exit_code == 2 and "--base-url is for --engine remote" in res.output
    res = cli.invoke(app, ["generate", "--model", "m", "--device", "cuda", "--batch-size", "4", *root])
    assert res.exit_code == 2 and "--device, --batch-size: for --engine local only" in res.output
    res = cli.invoke(app, ["generate", "--model", "m", "-n", "0", *root])  # the flag typed, beside the field
    assert res.exit_code == 2 and "n_samples (-n) must be > 0" in res.output
    assert len(runs_before) == len(list_runs(workspace.catalog()))
    workspace.close()  # the next command opens the catalog anew, reading the environment
    monkeypatch.setenv("PERSONAVEC_LOCK_TIMEOUT", "2m")
    res = cli.invoke(app, ["runs", "-w", str(workspace.root)])
    assert res.exit_code == 2 and "$PERSONAVEC_LOCK_TIMEOUT must be a finite number of seconds >= 0" in res.output
    assert "'2m'" in res.output and "Traceback" not in res.output


def test_commands_named_in_messages_run_on_the_workspace_given(cli, workspace, tmp_path):
    """A command given -w names the commands its messages suggest with that workspace (resume commands, query
    hints), so that they reach the same catalog when copied; without -w they are left as they are."""
    from personavec.cli.app import on_workspace

    res = cli.invoke(app, ["vectors", "99", "-w", str(workspace.root)])
    assert res.exit_code == 2 and f"`personavec runs --workspace {workspace.root.resolve()}` lists" in res.output
    res = cli.invoke(app, ["runs", "-w", str(tmp_path / "nowhere")])  # already names it: not twice
    assert res.output.count("--workspace") == 1
    spaced = tmp_path / "my ws"
    assert on_workspace("personavec db upgrade; personavec trait vectors 7; this personavec needs 0012", spaced) == (
        f"personavec db upgrade --workspace '{spaced}'; personavec trait vectors --workspace '{spaced}' 7; "
        "this personavec needs 0012"
    )
    assert (
        on_workspace("resume with personavec extract --resume 3", None) == "resume with personavec extract --resume 3"
    )


def test_runs_does_not_wrap_at_80_columns_when_not_a_terminal(cli, workspace, monkeypatch):
    monkeypatch.delenv("COLUMNS", raising=False)
    res = cli.invoke(app, ["runs", "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    rows = [line for line in res.stdout.splitlines() if "ingest-personas" in line]
    assert len(rows) == 1 and "persona set builtin" in rows[0]  # one line per run


def test_progress_lines_start_at_once_beat_while_idle_and_the_last_is_not_repeated(capfd):
    import time

    from personavec.cli.app import stage_progress

    with stage_progress("step", every_s=0.3) as show:
        time.sleep(0.8)  # nothing finishes for a while: lines keep coming
        show(1, 2, "half")
        show(2, 2, "all")
    lines = capfd.readouterr().err.splitlines()
    assert lines[0].startswith("step: starting [0s]")
    assert sum(line.startswith("step: starting") for line in lines) >= 2
    assert lines[-1].startswith("step: 2/2 all") and not lines[-2].startswith("step: 2/2 all")


def test_db_commands(cli, workspace):
    ws = str(workspace.root)
    assert cli.invoke(app, ["db", "downgrade", "base", "-w", ws]).exit_code == 2  # would drop the built-in sets
    assert cli.invoke(app, ["db", "downgrade", "base", "-w", ws, "--yes"]).exit_code == 0
    res = cli.invoke(app, ["runs", "-w", ws])
    assert res.exit_code == 1 and "personavec db upgrade" in res.output
    assert cli.invoke(app, ["db", "upgrade", "-w", ws]).exit_code == 0
    res = cli.invoke(app, ["db", "current", "-w", ws])
    assert res.exit_code == 0 and f"catalog: {SCHEMA_REVISION}" in res.stdout


@pytest.mark.slow
def test_a_command_that_asks_no_endpoint_imports_neither_the_client_nor_alembic(workspace):
    """`personavec runs` (like extract, serve, sql...) imports neither the endpoint client (``openai``, ~1.5 s) nor
    Alembic (~0.3 s), nor torch: each is imported where it is used (a request, a migration, a model)."""
    import subprocess
    import sys

    code = (
        "import json, sys\n"
        "from personavec.cli import main\n"
        f"sys.argv = ['personavec', 'runs', '-w', {str(workspace.root)!r}, '--json']\n"
        "try:\n"
        "    main()\n"
        "except SystemExit as exc:\n"
        "    assert not exc.code, exc.code\n"
        "print(json.dumps(sorted(m for m in ('openai', 'httpx2', 'alembic', 'torch') if m in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    runs, loaded = out.stdout.strip().splitlines()[-2:]
    assert [r["kind"] for r in json.loads(runs)][:2] == ["ingest-personas", "ingest-questions"]
    assert json.loads(loaded) == []


def test_the_models_describe_the_head_of_the_bundled_migrations():
    from personavec.store.migrate import migrations_head

    assert SCHEMA_REVISION == migrations_head()


def test_ctrl_c_before_a_resumed_run_is_taken_over_still_names_the_resume(cli, tmp_path):
    """Ctrl-C while `generate --resume 5` (or extract, judge, evaluate) still loads its model: the run is as it was
    and the same command continues it, so that is what is printed (it printed a bare `interrupted`)."""
    demo = typer.Typer()

    @demo.command()
    @command
    def generate(resume: int | None = typer.Option(None, "--resume"), ws: WorkspaceOpt = None) -> None:
        raise KeyboardInterrupt  # the model loading when the user pressed Ctrl-C

    @demo.command()
    @command
    def other(ws: WorkspaceOpt = None) -> None:
        raise KeyboardInterrupt

    res = cli.invoke(demo, ["generate", "--resume", "5", "-w", str(tmp_path / "ws")])
    assert res.exit_code == 130
    assert f"interrupted: resume with: personavec generate --workspace {tmp_path / 'ws'} --resume 5" in res.output
    res = cli.invoke(demo, ["other"])  # nothing to resume: as before
    assert res.exit_code == 130 and res.output.strip() == "interrupted"


def test_a_workspace_made_from_a_string_path_works(workspace):
    """`Workspace("ws")` as Python users write it (it failed on first use: 'str' has no attribute 'exists')."""
    ws = Workspace(str(workspace.root))
    assert ws.root == workspace.root and ws.require() is ws
    assert [r.kind for r in list_runs(ws.catalog())][:2] == ["ingest-personas", "ingest-questions"]
