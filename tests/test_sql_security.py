"""`personavec sql` cannot write, leave the catalog, download or unlock itself (issue 12): every attack is refused
with exit 2 and one line, and no file anywhere under the test's directory changes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from checks import one_line_error

from personavec.cli import app
from personavec.errors import QueryError
from personavec.store.models import Base
from personavec.store.query import run_readonly_sql
from personavec.workspace import Workspace


def _files(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a digest of its bytes: a changed, new or removed file shows."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _one_error_line(res) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# (query with {ws} = workspace dir and {tmp} = test dir, what the one-line error says)
ATTACKS = [
    ("COPY (SELECT 'x') TO '{ws}/catalog.duckdb'", "is COPY"),  # overwrote the catalog in the issue
    ("COPY personas TO '{tmp}/out.csv'", "is COPY"),
    ("COPY (SELECT 1) TO '{tmp}/out.parquet' (FORMAT parquet)", "is COPY"),
    ("COPY personas FROM '{tmp}/in.csv'", "is COPY"),
    ("EXPORT DATABASE '{tmp}/export'", "is EXPORT"),
    ("IMPORT DATABASE '{tmp}'", "file system operations are disabled"),  # DuckDB reads the files while parsing
    ("ATTACH '{tmp}/other.duckdb' (READ_ONLY false)", "is ATTACH"),
    ("ATTACH '{tmp}/other.duckdb' AS o; CREATE TABLE o.t AS SELECT 1", "is ATTACH"),
    ("DETACH catalog", "is DETACH"),
    ("USE memory", "is SET"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
    ("SELECT * FROM read_text('/etc/hostname')", "file system operations are disabled"),
    ("SELECT * FROM read_blob('{tmp}/in.csv')", "file system operations are disabled"),
    ("SELECT * FROM read_parquet('{tmp}/*.parquet')", "file system operations are disabled"),
    ("SELECT * FROM 'https://example.com/x.csv'", "file system operations are disabled"),
    ("SELECT * FROM '/etc/passwd'", "does not exist"),  # no replacement scan of files
    ("SELECT * FROM duckdb_secrets()", "file system operations are disabled"),
    ("INSTALL httpfs", "is LOAD"),
    ("LOAD httpfs", "is LOAD"),
    ("SET lock_configuration = false", "is SET"),
    ("SET enable_external_access = true", "is SET"),
    ("RESET enable_external_access", "is SET"),
    ("PRAGMA threads = 1", "is SET"),
    ("SET VARIABLE v = 1", "is SET"),
    ("DELETE FROM personas", "is DELETE"),
    ("UPDATE personas SET name = 'x'", "is UPDATE"),
    ("INSERT INTO runs (kind, status) VALUES ('x', 'y')", "is INSERT"),
    ("DROP TABLE vectors", "is DROP"),
    ("CREATE TABLE t AS SELECT 1", "is CREATE"),
    ("CREATE TEMP TABLE t AS SELECT 1", "is CREATE"),
    ("CREATE MACRO m() AS 1", "is CREATE"),
    ("ALTER TABLE runs ADD COLUMN x INT", "is ALTER"),
    ("CHECKPOINT", "is CALL"),
    ("VACUUM", "is VACUUM"),
    ("BEGIN TRANSACTION", "is TRANSACTION"),
    ("PIVOT personas ON name", "is CREATE"),  # PIVOT without IN creates an enum type first
    ("SELECT 1; DELETE FROM personas", "statement 2"),  # nothing runs, not even the SELECT
    ("SELECT 1; COPY (SELECT 'x') TO '{ws}/catalog.duckdb'", "statement 2"),
    ("EXPLAIN ANALYZE COPY (SELECT 1) TO '{tmp}/q.csv'", "file system operations are disabled"),
    ("EXPLAIN ANALYZE DELETE FROM personas", "read-only"),
    ("", "empty SQL query"),
    (";", "no SQL statement"),
    ("SELEC 1", "syntax error"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("query", "says"), ATTACKS, ids=[a[0][:40] for a in ATTACKS])
def test_sql_attack_is_refused_and_writes_nothing(cli, workspace, tmp_path, query, says):
    (tmp_path / "in.csv").write_text("name\nx\n")
    before = _files(tmp_path)
    res = cli.invoke(app, ["sql", query.format(ws=workspace.root, tmp=tmp_path), "-w", str(workspace.root)])
    assert res.exit_code == 2, res.output
    assert says in _one_error_line(res)
    assert res.stdout == ""  # not even the SELECT before a refused statement printed
    assert _files(tmp_path) == before
    with workspace.catalog(read_only=True) as catalog, catalog.session() as s:
        assert s.connection().exec_driver_sql("SELECT count(*) FROM personas").scalar() == 23


def test_sql_settings_are_locked_down(cli, workspace):
    query = (
        "SELECT name, value FROM duckdb_settings() WHERE name IN ('enable_external_access', 'lock_configuration', "
        "'autoinstall_known_extensions', 'autoload_known_extensions', 'allow_community_extensions') ORDER BY name"
    )
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert {r["name"]: r["value"] for r in json.loads(res.stdout)} == {
        "allow_community_extensions": "false",
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "enable_external_access": "false",
        "lock_configuration": "true",
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("query", "n_rows"),
    [
        ("DESCRIBE runs", 10),
        ("SHOW TABLES", len(Base.metadata.tables) + 1),  # + alembic_version
        ("SUMMARIZE personas", 6),
        ("PRAGMA table_info('runs')", 10),
        ("FROM personas LIMIT 3", 3),
        ("WITH p AS (SELECT * FROM personas) SELECT count(*) FROM p", 1),
        ("VALUES (1), (2)", 2),
        ("EXPLAIN SELECT * FROM personas", 1),
        ("SELECT * FROM pragma_database_size()", 1),
    ],
)
def test_sql_read_statements_run(cli, workspace, query, n_rows):
    before = _files(workspace.root)
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert len(json.loads(res.stdout)) == n_rows
    assert _files(workspace.root) == before


def test_sql_prints_every_statement(cli, workspace):
    ws = str(workspace.root)
    query = "SELECT count(*) AS n FROM personas; SELECT count(*) AS n FROM questions"
    res = cli.invoke(app, ["sql", query, "-w", ws, "--json"])
    assert res.exit_code == 0, res.output
    assert [json.loads(line) for line in res.stdout.splitlines()] == [[{"n": 23}], [{"n": 18}]]
    res = cli.invoke(app, ["sql", query, "-w", ws, "--csv"])
    assert res.stdout.splitlines() == ["n", "23", "", "n", "18"]
    res = cli.invoke(app, ["sql", query, "-w", ws])
    assert res.exit_code == 0 and "FROM questions" in res.stdout and "18" in res.stdout and "23" in res.stdout


def test_sql_keeps_columns_sharing_a_name(cli, workspace):
    query = "SELECT 1 AS a, 2 AS a, 3 AS a_1, 4 AS a"
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"a": 1, "a_2": 2, "a_1": 3, "a_3": 4}]
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--csv"])
    assert res.stdout.splitlines() == ["a,a_2,a_1,a_3", "1,2,3,4"]


@pytest.mark.slow
def test_readme_vector_query_keeps_both_group_keys(cli, workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    res = cli.invoke(app, ["vectors", str(ext.run_id), "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout)["run_id"]
    query = (
        "SELECT a.group_key, b.group_key, list_cosine_similarity(a.vector, b.vector) AS cos "
        f"FROM vectors a JOIN vectors b USING (run_id, layer) WHERE run_id = {run_id} AND a.group_key = 'default' "
        "ORDER BY cos DESC"
    )
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert rows and set(rows[0]) == {"group_key", "group_key_1", "cos"}
    assert rows[0]["group_key"] == "default" and rows[0]["group_key_1"] == "default"  # cos 1 with itself first
    assert len({r["group_key_1"] for r in rows}) == 6


def test_sql_time_zone_timestamps(cli, workspace):
    query = "SELECT TIMESTAMPTZ '2024-05-01 12:00:00+00' AS t, [TIMESTAMPTZ '2024-05-01 12:00:00+00'] AS l"
    res = cli.invoke(app, ["sql", query, "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout) == [{"t": "2024-05-01T12:00:00+00:00", "l": ["2024-05-01T12:00:00+00:00"]}]
    res = cli.invoke(app, ["sql", "SELECT now() AS t", "-w", str(workspace.root)])
    assert res.exit_code == 0 and "+00" in res.stdout


def test_run_readonly_sql_library_api_and_shared_catalog(workspace):
    # The process holds the catalog read-write; the SQL connection (another configuration) still opens, and the
    # workspace's catalog reopens afterwards.
    catalog = workspace.catalog()
    results = run_readonly_sql(workspace.catalog_path, "SELECT 1 AS a, 2 AS a; SELECT name FROM persona_sets")
    assert [(r.columns, r.keys, r.rows) for r in results] == [
        (("a", "a"), ["a", "a_1"], [(1, 2)]),
        (("name",), ["name"], [("builtin",)]),
    ]
    assert results[0].records() == [{"a": 1, "a_1": 2}]
    assert catalog.closed
    with workspace.catalog() as again, again.session() as s:
        assert s.connection().exec_driver_sql("SELECT count(*) FROM runs").scalar() == 2
    with pytest.raises(QueryError, match="is DELETE"):
        run_readonly_sql(workspace.catalog_path, "DELETE FROM runs")
    Workspace.resolve(workspace.root).close()


_SLOW = "SELECT sum(hash(i)) FROM range(1000000000000) t(i)"


def _signal_once_the_query_runs(signum: int) -> dict:
    """Send ``signum`` to this process 0.5 s after the sql worker thread starts; returns when it was sent."""
    import os
    import threading
    import time

    # a worker left by an earlier test in this process (its query still unwinding) must not trigger the signal
    # before this query runs: a signal taken while the CLI is still opening the catalog is not this test's case
    # (Thread objects, not idents: a thread's ident is reused once it has ended)
    earlier = [t for t in threading.enumerate() if t.name == "personavec-sql"]
    sent: dict = {"earlier": earlier}

    def fire() -> None:
        while not any(t.name == "personavec-sql" and all(t is not e for e in earlier) for t in threading.enumerate()):
            time.sleep(0.02)
        time.sleep(0.5)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signum)

    threading.Thread(target=fire, daemon=True).start()
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_a_running_sql_query_within_a_second(cli, workspace, signum):
    import signal
    import threading
    import time

    from personavec.errors import Terminated

    def terminate(n, frame):  # what personavec.cli.main installs
        raise Terminated(f"terminated by signal {n}")

    # both handlers as personavec.cli.main installs them (a library in this test process may have left another)
    assert threading.current_thread() is threading.main_thread()
    old = signal.signal(signal.SIGTERM, terminate)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sent = _signal_once_the_query_runs(getattr(signal, signum))
        # a time limit far past the signal (0.5 s in): a signal not taken fails the test instead of hanging it
        res = cli.invoke(app, ["sql", _SLOW, "-w", str(workspace.root), "--timeout", "120"])
        stopped = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)
    assert res.exit_code == (130 if signum == "SIGINT" else 143), (res.output, old_int)
    assert "Traceback" not in res.output and "interrupted" in res.output
    assert stopped - sent["at"] < 1.5
    own = [t for t in threading.enumerate() if t.name == "personavec-sql" and all(t is not e for e in sent["earlier"])]
    assert not any(t.is_alive() for t in own), own


def test_sql_time_and_memory_limits_and_bad_limits(cli, workspace):
    w = ["-w", str(workspace.root)]
    res = cli.invoke(app, ["sql", _SLOW, *w, "--timeout", "0.5"])
    one_line_error(res, 1, "SQL stopped after the time limit of 0.5 s", "--timeout")
    res = cli.invoke(app, ["sql", "SELECT len(list(i)) FROM range(20000000) t(i)", *w, "--memory-limit", "10MB"])
    one_line_error(res, 1, "more than the memory limit", "--memory-limit")
    assert "Possible solutions" not in res.output
    for bad, needle in (
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--timeout", "nan"], "--timeout must be"),
        (["--timeout", "-3"], "--timeout must be"),
        (["--memory-limit", "lots"], "--memory-limit must be"),
    ):
        one_line_error(cli.invoke(app, ["sql", "SELECT 1", *w, *bad]), 2, needle)
    res = cli.invoke(app, ["sql", "SELECT 42 AS answer", *w, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"answer": 42}]


def test_sql_on_a_catalog_locked_by_another_process(cli, workspace, monkeypatch, hold_catalog):
    """Once the lock wait runs out (cut to 0.5 s here; 15 s by default), one line and exit 1."""
    monkeypatch.setenv("PERSONAVEC_LOCK_TIMEOUT", "0.5")
    workspace.close()
    with hold_catalog(workspace.catalog_path):
        res = cli.invoke(app, ["sql", "SELECT 1", "-w", str(workspace.root)])
    assert res.exit_code == 1
    assert "locked by another process" in _one_error_line(res)


@pytest.mark.slow
def test_sql_waits_out_a_writer_like_any_reader(workspace, monkeypatch, hold_catalog):
    """A writer holds the file for one unit of work at a time; `sql` waits for it (CI saw `sql` fail at once)."""
    import time

    from personavec.errors import CatalogLockedError

    workspace.close()
    with hold_catalog(workspace.catalog_path, 1.0):
        t = time.monotonic()
        [result] = run_readonly_sql(workspace.catalog_path, "SELECT count(*) FROM personas")
        assert time.monotonic() - t > 0.3  # it did wait
        assert result.rows[0][0] >= 0
    with hold_catalog(workspace.catalog_path):
        monkeypatch.setenv("PERSONAVEC_LOCK_TIMEOUT", "0.5")
        t = time.monotonic()
        with pytest.raises(CatalogLockedError, match="locked by another process"):
            run_readonly_sql(workspace.catalog_path, "SELECT 1")
        assert 0.3 < time.monotonic() - t < 5
