"""Run ownership: a running run whose process died shows as interrupted and can be resumed; a live one cannot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from personavec.errors import RunBusyError
from personavec.store.runs import create_run, finish_run, get_run, list_runs, mark_running

# A child process creates a `generate` run (left running) and then stays alive or dies without finishing it.
CHILD = """
import sys, time
from personavec.workspace import Workspace
from personavec.store.runs import create_run
ws = Workspace.resolve(sys.argv[1])
with ws.catalog().session() as s:
    run_id = create_run(s, "generate", {{}})
ws.close()
print(run_id, flush=True)
{tail}
"""


def _child(ws, tail: str) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD.format(tail=tail), str(ws.root)], stdout=subprocess.PIPE, text=True
    )
    return proc, int(proc.stdout.readline())


@pytest.mark.slow
def test_dead_owner_shows_interrupted_and_can_resume(workspace):
    proc, run_id = _child(workspace, "import os; os._exit(0)")  # dies without marking the run
    proc.wait(timeout=60)
    catalog = workspace.catalog()
    assert get_run(catalog, run_id).status == "interrupted"
    assert {r.id: r.status for r in list_runs(catalog)}[run_id] == "interrupted"
    with catalog.session() as s:
        mark_running(s, run_id)  # resuming claims it for this process
    assert get_run(catalog, run_id).status == "running"


@pytest.mark.slow
def test_live_owner_keeps_running_and_refuses_a_second_resume(workspace):
    proc, run_id = _child(workspace, "time.sleep(60)")
    try:
        catalog = workspace.catalog()
        assert get_run(catalog, run_id).status == "running"
        with pytest.raises(RunBusyError, match=f"process {proc.pid}"), catalog.session() as s:
            mark_running(s, run_id)
    finally:
        proc.kill()
        proc.wait()
    assert get_run(workspace.catalog(), run_id).status == "interrupted"


def test_own_runs_are_running(workspace):
    catalog = workspace.catalog()
    with catalog.session() as s:
        run_id = create_run(s, "extract", {})
    assert get_run(catalog, run_id).status == "running"


def test_wall_time_sums_the_sessions_not_the_wait_between_them(workspace):
    """`runs`' wall s of a resumed run is the time its sessions ran (it was the time since creation: a resume that
    had nothing to do, an hour later, made a 10 s run an hour long)."""
    import time

    catalog = workspace.catalog()
    with catalog.session() as s:
        run_id = create_run(s, "generate", {})
        finish_run(s, run_id, "interrupted")
    first = get_run(catalog, run_id).wall_s
    time.sleep(0.5)  # the wait before the resume
    with catalog.session() as s:
        mark_running(s, run_id)
        finish_run(s, run_id, "done")
    total = get_run(catalog, run_id).wall_s
    assert first is not None and total is not None and first <= total < first + 0.25, (first, total)


def test_a_recorded_server_run_counts_its_answers_once(workspace):
    """A recording server's generate run also owns the persona and question sets it made as requests came: `runs`
    counts and describes its answers (it joined every detail row to every count row: 6 answers showed as 33)."""
    from personavec.store.serving import (
        ServedRequest,
        ServedRow,
        create_serve_session,
        finish_serve_session,
        record_served,
    )

    catalog = workspace.catalog()
    session = create_serve_session(
        catalog, {"serve": {"record": True}, "model": "m"}, model="m", endpoint="http://127.0.0.1:1/v1"
    )
    row = ServedRow(text="Arr.", finish_reason="stop", prompt_tokens=5, completion_tokens=2, latency_s=0.1)
    asked = [
        ServedRequest(system, question, "http://127.0.0.1:1/v1", "m", (row,), [], [], (), {})
        for system in ("You are a pirate.", "You are a poet.", "You are terse.")
        for question in ("Who are you?", "Why?")
    ]
    record_served(catalog, session, asked)
    finish_serve_session(catalog, session)
    from personavec.errors import ConfigError
    from personavec.generation.generate import run_generation

    with pytest.raises(ConfigError, match="recorded a `personavec serve --record` session"):  # not "no API key"
        run_generation(workspace, None, resume=session.run_id)
    served = [r for r in list_runs(catalog) if r.id == session.run_id]
    assert len(served) == 1
    assert (served[0].kind, served[0].items, served[0].failed) == ("generate", 6, 0)
    assert served[0].detail.startswith("m"), served[0].detail  # the model, not "question set served-N"
