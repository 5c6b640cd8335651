"""Run ownership: a running run whose process died shows as interrupted and can be resumed; a live one cannot."""

from __future__ import annotations

import subprocess
import sys

import pytest

from personavec.errors import RunBusyError
from personavec.store.runs import create_run, get_run, list_runs, mark_running

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
