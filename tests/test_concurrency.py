"""Readers during a long write: `runs`, `sql`, `export`, `report` and `load_vectors` work while an extraction runs
in another process (the catalog holds the DuckDB file only around units of work, at most MAX_HOLD_S in a row; each
side waits out the other)."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import threading
import time

import pytest

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.cli import app
from personavec.ingest import IngestConfig, ingest
from personavec.report import ReportConfig, build_report
from personavec.store.runs import list_runs
from personavec.vectors import VectorConfig, compute_vectors, load_vectors


@pytest.mark.slow
def test_reads_succeed_while_an_extraction_writes(cli, workspace, make_extraction_run, tmp_path):
    vectors_run = compute_vectors(workspace, VectorConfig(make_extraction_run(workspace).run_id)).run_id
    rng = random.Random(0)
    answers = {
        json.dumps([p, q]): " ".join(f"word{rng.randint(0, 999)}" for _ in range(40))
        for p in list(PERSONAS)[:4]
        for q in EVAL_QUESTIONS[:4]
    }
    (tmp_path / "answers.json").write_text(json.dumps(answers))
    responses = ingest(workspace, IngestConfig("responses", tmp_path / "answers.json")).run_id
    workspace.close()
    cmd = [sys.executable, "-m", "personavec", "extract", "-w", str(workspace.root), "--responses-run", str(responses)]
    cmd += ["--max-batch-size", "1", "--device", "cpu", "--json"]  # 16 batches: many commits to collide with
    writer = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    reads_during = 0
    try:
        deadline = time.monotonic() + 300
        while writer.poll() is None and time.monotonic() < deadline:
            if reads_during >= 3:  # three rounds made mid-run: the rest of the run is left to the writer
                time.sleep(0.2)
                continue
            running = [r for r in list_runs(workspace.catalog(read_only=True)) if r.kind == "extract"]
            if not any(r.status == "running" for r in running):
                time.sleep(0.2)
                continue
            res = cli.invoke(app, ["runs", "-w", str(workspace.root), "--json"])
            assert res.exit_code == 0, res.output
            res = cli.invoke(app, ["sql", "SELECT count(*) AS n FROM activations", "-w", str(workspace.root)])
            assert res.exit_code == 0, res.output
            out = tmp_path / f"v{reads_during}.safetensors"
            res = cli.invoke(app, ["export", str(vectors_run), str(out), "--layer", "5", "-w", str(workspace.root)])
            assert res.exit_code == 0, res.output
            assert len(load_vectors(vectors_run, 5, workspace=workspace)) == 6
            build_report(workspace, ReportConfig(vectors_run, out_dir=tmp_path / "report", layer=5))
            workspace.close()
            if writer.poll() is None:
                reads_during += 1
        out, err = writer.communicate(timeout=300)
    finally:
        writer.kill()
    assert writer.returncode == 0, err
    assert reads_during >= 2  # every kind of read succeeded while the writer was mid-run, more than once
    assert json.loads(out)["n_examples"] == 16


@pytest.mark.slow
def test_another_process_gets_the_file_while_this_one_runs_units_of_work_back_to_back(workspace, tmp_path):
    """A catalog keeps DuckDB's instance (and the file) for a moment after each unit of work, so that the next opens
    warm, but never more than MAX_HOLD_S in a row: a process polling for the file every 10 ms gets it within a few
    holds while this process runs units of work without a pause (and this one's units wait out that process)."""
    import select

    from personavec.store import engine

    path = str(workspace.catalog_path)
    script = (
        "import duckdb, sys, time\n"
        "print('ready', flush=True); sys.stdin.readline(); t = time.monotonic()\n"
        "while True:\n"
        "    try:\n"
        f"        c = duckdb.connect({path!r}); c.execute('SELECT count(*) FROM runs').fetchall(); break\n"
        "    except duckdb.IOException:\n"
        "        time.sleep(0.01)\n"
        "time.sleep(0.2); c.close(); print(f'{time.monotonic() - t:.3f}', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdin is not None and child.stdout is not None and child.stdout.readline().strip() == "ready"
        catalog = workspace.catalog()
        list_runs(catalog)  # the file held, warm
        child.stdin.write("go\n")
        child.stdin.flush()
        start, units = time.monotonic(), 0
        while not select.select([child.stdout], [], [], 0)[0] and time.monotonic() - start < 20:
            list_runs(catalog)
            units += 1
        waited = float(child.stdout.readline())
    finally:
        child.kill()
        child.wait()
    assert units > 0 and waited < 4 * (engine.MAX_HOLD_S + engine.LINGER_S) + 1, (waited, units)


@pytest.mark.slow
def test_the_file_is_held_briefly_after_a_unit_of_work_and_not_at_all_once_shared(workspace, hold_catalog, monkeypatch):
    """Right after a unit of work another process cannot open the file (the catalog keeps it LINGER_S so its next
    unit opens warm), a moment later it can; once a unit of work had to wait for another process, and in a rank of a
    multi-process launch (WORLD_SIZE > 1), the file is free as soon as each unit of work ends."""
    from personavec.store import engine

    path = str(workspace.catalog_path)
    script = (
        "import duckdb, sys\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    try:\n"
        f"        duckdb.connect({path!r}).close(); print('free', flush=True)\n"
        "    except duckdb.IOException:\n"
        "        print('held', flush=True)\n"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None and child.stdout.readline().strip() == "ready"

    def other_process_tries() -> str:
        child.stdin.write("try\n")
        child.stdin.flush()
        return child.stdout.readline().strip()

    try:
        list_runs(workspace.catalog())
        assert other_process_tries() == "held"
        time.sleep(engine.LINGER_S + 0.3)
        assert other_process_tries() == "free"
        with hold_catalog(workspace.catalog_path, seconds=1):
            list_runs(workspace.catalog())  # waits for the other process
        list_runs(workspace.catalog())
        assert other_process_tries() == "free"
        workspace.close()
        monkeypatch.setenv("WORLD_SIZE", "2")
        list_runs(workspace.catalog())
        assert other_process_tries() == "free"
    finally:
        child.kill()
        child.wait()


@pytest.mark.slow
def test_units_of_work_of_several_threads_never_meet_a_dying_database_instance(workspace, monkeypatch):
    """Threads of one process (an evaluation's judge runs, the server's recorder) run units of work at once. With no
    instance held between them (a rank's catalog holds none), each unit may open DuckDB's instance of the file while
    another thread's closing connection tears it down: duckdb 1.4 then refused the new one ("Unique file handle
    conflict ... already attached"), 163-220 of 400 units failed in six runs. Connections open and close one at a
    time now."""
    import sqlalchemy as sa

    workspace.close()
    monkeypatch.setenv("WORLD_SIZE", "2")  # no warm hold: every unit of work opens and closes the instance
    catalog = workspace.catalog()
    errors: list[BaseException] = []

    def units(n: int) -> None:
        for i in range(n):
            try:
                with catalog.session() as session:
                    session.execute(sa.text("SELECT 1"))
            except Exception as exc:  # noqa: BLE001 - collected, asserted below
                errors.append(exc)
            time.sleep(0.001 * (i % 7))

    threads = [threading.Thread(target=units, args=(100,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, f"{len(errors)} of 400 units of work failed, the first: {errors[0]}"
