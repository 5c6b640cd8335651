"""Bad input and faults give one red line and an exit code scripts can trust (2: bad input or usage, 1: runtime),
and write nothing (issue 12). Each row of docs/RELIABILITY.md names its test here or in test_sql_security.py."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import duckdb
import pytest
from checks import one_line_error

from personavec import __version__, arrays
from personavec.cli import app
from personavec.errors import ConfigError
from personavec.ingest import register_builtin_sets
from personavec.store.engine import corrupt_marker, translate_error
from personavec.vectors import VectorConfig, compute_vectors
from personavec.workspace import Workspace


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _digest(p) for p in root.rglob("*") if p.is_file()}


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


def _run_count(ws: Workspace) -> int:
    with ws.catalog(read_only=True) as catalog, catalog.session() as s:
        return int(s.connection().exec_driver_sql("SELECT count(*) FROM runs").scalar_one())


# --------------------------------------------------------------------------------------------- usage and --help


def test_version(cli):
    res = cli.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.stdout.strip() == f"personavec {__version__}"


@pytest.mark.parametrize(
    "args",
    [
        ["no-such-command"],
        ["runs", "--no-such-option"],
        ["runs", "--kind"],  # option without its value
        ["sql"],  # missing argument
        ["vectors", "abc"],  # not an int
        ["export", "1", "x.pt", "--overwrite", "true"],  # a flag takes no value
        ["db", "downgrade"],
        ["ingest", "responses"],
    ],
    ids=lambda a: " ".join(a),
)
def test_usage_errors_exit_2_and_write_nothing(cli, workspace, args):
    before = _files(workspace.root.parent)
    res = cli.invoke(app, [*args, "-w", str(workspace.root)] if args[0] != "no-such-command" else args)
    assert res.exit_code == 2, res.output
    assert "Usage:" in res.output
    assert _files(workspace.root.parent) == before


@pytest.mark.parametrize("command", [[], ["export"], ["db", "downgrade"], ["sql"], ["vectors"]])
def test_help_shows_flags_without_a_value_type(cli, command):
    res = cli.invoke(app, [*command, "--help"])
    assert res.exit_code == 0
    assert "<bool>" not in res.output
    assert "--help" in res.output


# ------------------------------------------------------------------------------------------- not found: exit 2


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["vectors", "999"], "run 999 does not exist"),
        (["export", "999", "{tmp}/x.pt"], "run 999 does not exist"),
        (["report", "999"], "run 999 does not exist"),
        (["vectors", "1"], "is of kind 'ingest-personas'"),
        (["ingest", "responses", "{responses}", "--persona-set", "nope"], "unknown persona set 'nope'"),
        (["ingest", "responses", "{responses}", "--question-set", "nope"], "unknown question set 'nope'"),
    ],
    ids=lambda a: " ".join(a) if isinstance(a, list) else None,
)
def test_unknown_names_exit_2(cli, workspace, tmp_path, seed_cache_file, args, says):
    args = [a.format(tmp=tmp_path, responses=seed_cache_file) for a in args]
    before = _files(workspace.root)
    res = cli.invoke(app, [*args, "-w", str(workspace.root)])
    assert res.exit_code == 2, res.output
    assert says in _one_error_line(res)
    assert not (tmp_path / "x.pt").exists() and not (workspace.root / "reports").exists()
    assert _files(workspace.root) == before


def test_missing_workspace_exits_2(cli, tmp_path):
    res = cli.invoke(app, ["runs", "-w", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "personavec init" in _one_error_line(res)
    assert not (tmp_path / "nowhere").exists()


# ------------------------------------------------------------------------------------------------- input files

NOT_UTF8 = [
    ("personas", "p.yaml", b"name: x\npersonas:\n  - name: caf\xe9\n    prompt: hi\n"),
    ("personas", "p.json", b'{"name": "x", "personas": [{"name": "\xff", "prompt": "hi"}]}'),
    ("personas", "p.csv", b"name,prompt\n\xfe\xff,hi\n"),
    ("questions", "q.csv", b"question\nWhat \x80?\n"),
    ("questions", "q.yaml", b"questions:\n  - caf\xe9?\n"),
    ("responses", "r.csv", b"persona,question,text\ndefault,Q\xff,hello\n"),
    ("responses", "r.jsonl", b'{"persona": "default", "question": "\xff", "text": "x"}\n'),
    ("responses", "r.json", b'{"[\\"default\\", \\"q\\"]": "caf\xe9"}'),
]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "name", "data"), NOT_UTF8, ids=[f"{k}-{n}" for k, n, _ in NOT_UTF8])
def test_non_utf8_input_file(cli, workspace, tmp_path, kind, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    runs = _run_count(workspace)
    before = _digest(workspace.catalog_path)
    res = cli.invoke(app, ["ingest", kind, str(path), "-w", str(workspace.root)])
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert name in line and "not UTF-8" in line
    assert _run_count(workspace) == runs and _digest(workspace.catalog_path) == before


@pytest.mark.parametrize(("kind", "name"), [("personas", "p.yaml"), ("questions", "q.csv"), ("responses", "r.json")])
def test_directory_or_missing_input_file(cli, workspace, tmp_path, kind, name):
    (tmp_path / name).mkdir()
    before = _digest(workspace.catalog_path)
    res = cli.invoke(app, ["ingest", kind, str(tmp_path / name), "-w", str(workspace.root)])
    assert res.exit_code == 2, res.output
    assert f"{name}: is a directory" in _one_error_line(res)
    res = cli.invoke(app, ["ingest", kind, str(tmp_path / f"missing-{name}"), "-w", str(workspace.root)])
    assert res.exit_code == 2 and "no such file" in _one_error_line(res)
    assert _digest(workspace.catalog_path) == before


# ---------------------------------------------------------------------------------------------- corrupt catalog


def _corrupt_header(path: Path) -> None:
    with path.open("r+b") as fh:
        fh.seek(8)
        fh.write(os.urandom(4096))


def _corrupt_blocks(path: Path) -> None:
    """Garbage in the middle of every 256 KiB block after the file headers: hits the catalog's metadata blocks."""
    size = path.stat().st_size
    with path.open("r+b") as fh:
        for offset in range(3 * 4096 + 100, size, 262144):
            fh.seek(offset)
            fh.write(os.urandom(2048))


@pytest.mark.parametrize("damage", [_corrupt_header, _corrupt_blocks], ids=["header", "blocks"])
@pytest.mark.parametrize(
    "args",
    [
        ["runs"],
        ["sql", "SELECT count(*) FROM runs"],
        ["ingest", "responses", "{responses}"],
        ["db", "current"],
        ["db", "upgrade"],
        ["db", "downgrade", "base", "--yes"],
        ["init"],
    ],
    ids=lambda a: " ".join(a),
)
def test_corrupt_catalog_is_reported_and_not_written(cli, workspace, seed_cache_file, damage, args):
    damage(workspace.catalog_path)
    before = _files(workspace.root)
    args = [a.format(responses=seed_cache_file) for a in args]
    res = cli.invoke(app, [*args, "-w", str(workspace.root)])
    assert res.exit_code == 1, res.output
    line = _one_error_line(res)
    assert "is corrupt" in line and "locked" not in line
    after = _files(workspace.root)
    assert after.pop(corrupt_marker(workspace.catalog_path).name, None) is not None  # remembered
    assert after == before  # no byte of the catalog changed, no .wal written


def test_corrupt_catalog_stays_refused_until_restored(cli, workspace, seed_cache_file):
    backup = workspace.root.parent / "backup.duckdb"
    shutil.copy2(workspace.catalog_path, backup)
    _corrupt_blocks(workspace.catalog_path)
    ws = str(workspace.root)
    assert cli.invoke(app, ["runs", "-w", ws]).exit_code == 1
    res = cli.invoke(app, ["ingest", "responses", str(seed_cache_file), "-w", ws])
    assert res.exit_code == 1 and "corrupt" in _one_error_line(res)
    shutil.copyfile(backup, workspace.catalog_path)  # restoring the file lifts the refusal
    res = cli.invoke(app, ["ingest", "responses", str(seed_cache_file), "-w", ws])
    assert res.exit_code == 0, res.output
    assert not corrupt_marker(workspace.catalog_path).exists()


def test_known_corrupt_catalog_opens_only_read_only(cli, workspace, seed_cache_file):
    # Damage in a block that only some commands read is found by one of them; every later write is refused even
    # where it would not touch that block (DuckDB would append to the damaged file).
    translate_error(duckdb.IOException("IO Error: Corrupt database file: checksum mismatch"), workspace.catalog_path)
    before = _digest(workspace.catalog_path)
    ws = str(workspace.root)
    res = cli.invoke(app, ["ingest", "responses", str(seed_cache_file), "-w", ws])
    assert res.exit_code == 1 and "was found corrupt" in _one_error_line(res)
    assert cli.invoke(app, ["db", "upgrade", "-w", ws]).exit_code == 1
    res = cli.invoke(app, ["sql", "SELECT count(*) AS n FROM runs", "-w", ws, "--json"])  # salvage stays possible
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"n": 2}]
    assert _digest(workspace.catalog_path) == before


@pytest.fixture
def synthetic_vectors(workspace, make_extraction_run) -> int:
    ext = make_extraction_run(workspace, layers=(2, 5), d_model=16)
    return compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id)).run_id


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "catalog.duckdb" not in p.name)


@pytest.mark.slow
def test_a_300_character_file_name_is_one_line_exit_2(cli, workspace, synthetic_vectors, tmp_path):
    long = "n" * 300
    w = ["-w", str(workspace.root)]
    before = _tree(tmp_path)
    cases = [
        ["export", str(synthetic_vectors), str(tmp_path / f"{long}.safetensors"), *w],
        ["export-direction", str(synthetic_vectors), "ghost", str(tmp_path / f"{long}.gguf"), *w],
        ["report", str(synthetic_vectors), "-o", str(tmp_path / long), *w],
        ["ingest", "personas", str(tmp_path / f"{long}.json"), *w],
        ["init", "-w", str(tmp_path / long)],
    ]
    for args in cases:
        res = cli.invoke(app, args)
        one_line_error(res, 2, "File name too long", "characters)", "choose a shorter name")
    assert _tree(tmp_path) == before  # nothing written anywhere


def test_serve_takes_w_and_refuses_a_bad_port_at_once(cli, workspace):
    import time

    start = time.monotonic()
    res = cli.invoke(app, ["serve", "-w", str(workspace.root), "--port", "-1"])
    one_line_error(res, 2, "--port must be a TCP port 1..65535")
    assert time.monotonic() - start < 5


# --------------------------------------------------------------------------------------- destructive downgrade


def test_downgrade_refuses_without_yes_and_lists_what_it_drops(cli, workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    before = _files(workspace.root)
    ws = str(workspace.root)
    res = cli.invoke(app, ["db", "downgrade", "base", "-w", ws])
    assert res.exit_code == 2, res.output
    line = _one_error_line(res)
    assert "personas (23)" in line and "responses (18)" in line and f"run_{ext.run_id}" in line and "--yes" in line
    assert _files(workspace.root) == before

    res = cli.invoke(app, ["db", "downgrade", "base", "-w", ws, "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "would drop" in res.stdout and "responses" in res.stdout and "18" in res.stdout
    assert _files(workspace.root) == before

    res = cli.invoke(app, ["db", "downgrade", "nonsense", "-w", ws, "--yes"])
    assert res.exit_code == 2 and "nonsense" in _one_error_line(res)
    assert _files(workspace.root) == before


@pytest.mark.slow
def test_downgrade_yes_drops_tables_and_groups_and_new_runs_do_not_collide(cli, workspace, make_extraction_run):
    first = make_extraction_run(workspace)  # 18 examples x 2 layers x 32
    ws = str(workspace.root)
    assert arrays.run_groups(workspace.zarr_path) == [f"run_{first.run_id}"]
    res = cli.invoke(app, ["db", "downgrade", "base", "-w", ws, "--yes"])
    assert res.exit_code == 0, res.output
    assert "dropped" in res.stdout and "responses" in res.stdout
    assert arrays.run_groups(workspace.zarr_path) == []
    res = cli.invoke(app, ["sql", "SHOW TABLES", "-w", ws, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"name": "alembic_version"}]

    assert cli.invoke(app, ["db", "upgrade", "-w", ws]).exit_code == 0
    register_builtin_sets(workspace)
    # Sequences restarted: the new run reuses the old id, with another shape; the old group is gone, no collision.
    second = make_extraction_run(workspace, personas=("default", "ghost"), n_questions=2, layers=(1,), d_model=16)
    assert second.run_id == first.run_id
    assert arrays.open_activation_array(workspace.zarr_path, f"run_{second.run_id}").shape == (4, 1, 16)


def test_downgrade_removes_groups_no_run_refers_to(cli, workspace):
    # An orphan group (left by an older personavec's downgrade) would collide with a reused run id.
    arrays.create_activation_array(workspace.zarr_path, 7, 4, 1, 8)
    res = cli.invoke(app, ["db", "downgrade", "base", "-w", str(workspace.root), "--dry-run"])
    assert res.exit_code == 0 and "run_7" in res.stdout
    assert arrays.run_groups(workspace.zarr_path) == ["run_7"]
    res = cli.invoke(app, ["db", "downgrade", "base", "-w", str(workspace.root), "--yes"])
    assert res.exit_code == 0, res.output
    assert arrays.run_groups(workspace.zarr_path) == []


def test_library_downgrade_is_guarded(workspace):
    before = _digest(workspace.catalog_path)
    with pytest.raises(ConfigError, match=r"would drop .*personas \(23\)"):
        workspace.downgrade("base")
    assert _digest(workspace.catalog_path) == before
    plan = workspace.downgrade("base", dry_run=True)
    assert not plan.applied and plan.destructive
    assert {t.name: t.rows for t in plan.dropped_tables}["questions"] == 18
    assert _digest(workspace.catalog_path) == before
    plan = workspace.downgrade("base", allow_destructive=True)
    assert plan.applied and plan.to_revision is None


def test_error_messages_print_brackets_verbatim(cli, workspace, tmp_path):
    # Rich markup must not eat "[...]" in a message (here: a persona name quoted from the file)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"persona": "[red]pirate", "question": "q", "text": "arr"}) + "\n")
    res = cli.invoke(app, ["ingest", "responses", str(bad), "-w", str(workspace.root)])
    assert res.exit_code == 2 and "unknown persona '[red]pirate'" in res.output
