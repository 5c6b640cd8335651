"""A real `transformers serve` on the embedded model (offline), and the generation stage against it; a `transformers
serve` started by `personavec serve --backend transformers` dies with the command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import sqlalchemy as sa

from personavec.config import PersonaVectorConfig
from personavec.errors import EndpointError
from personavec.generation.config import GenerateConfig
from personavec.generation.generate import generate_responses, run_generation
from personavec.serve import EMBEDDED_MODEL

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("embedded")]


@pytest.fixture
def server(embedded_server):
    """The session's shared server on the embedded model (tests/conftest.py)."""
    return embedded_server


def test_server_lists_the_embedded_model_offline(server):
    with urllib.request.urlopen(f"{server.base_url}/models", timeout=5) as r:
        ids = [m["id"] for m in json.load(r)["data"]]
    assert server.model == EMBEDDED_MODEL and EMBEDDED_MODEL in ids


def test_generation_against_transformers_serve_lands_every_pair_with_usage(server, workspace):
    config = GenerateConfig(
        personas=("default", "jester"),
        questions=(0, 1),
        model=server.model,
        base_url=server.base_url,
        max_tokens=8,
        concurrency=2,
        seed=0,
    )
    result = run_generation(workspace, config)
    assert result.status == "done" and result.answers == 4 and result.failures == 0
    with workspace.catalog().session() as s:
        got = [dict(r._mapping) for r in s.execute(sa.text("SELECT * FROM responses"))]
    assert len(got) == 4
    for r in got:
        assert r["text"] and r["error"] is None and r["attempts"] == 1
        assert r["model_reported"] == EMBEDDED_MODEL
        assert r["finish_reason"] in ("length", "stop")
        assert r["prompt_tokens"] > 0 and 0 < r["completion_tokens"] <= 8 and r["latency_s"] > 0


def test_wrong_model_name_stops_at_once(server, workspace):
    config = GenerateConfig(personas=("default",), questions=(0,), model="gpt-9", base_url=server.base_url)
    with pytest.raises(EndpointError, match="HTTP 400.*pinned"):
        run_generation(workspace, config)


def test_seed_generate_responses_against_local_server(server):
    config = PersonaVectorConfig(model_name=server.model, base_url=server.base_url, max_tokens=4)
    out = generate_responses({"empty": "", "jester": "You are a jester."}, ["What is 2+2?"], config)
    assert set(out) == {("empty", "What is 2+2?"), ("jester", "What is 2+2?")} and all(out.values())


def _child_running(parent: int, word: str, timeout_s: float) -> int:
    """The pid of ``parent``'s child whose command line (after its exec) contains ``word``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
                cmdline = Path(entry.path, "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == parent and word in cmdline:
                return int(entry.name)
        time.sleep(0.05)
    pytest.fail(f"no child of pid {parent} running {word!r} within {timeout_s} s")


def _gone(pid: int) -> bool:
    """No such process, or a zombie (dead, waiting for whoever reaps orphans)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_a_transformers_server_does_not_outlive_a_killed_command():
    """`personavec serve --backend transformers` runs `transformers serve` as its child: the command SIGKILLed (no
    cleanup code of its own runs) as soon as the child has started, the child goes too. (The default backend serves
    in the command's own process: test_serving's embedded-model test stops it with Ctrl-C.)"""
    cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "serve", "--backend", "transformers",
           "--device", "cpu", "--json"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        server = _child_running(proc.pid, "transformers", timeout_s=60)
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 15
    while not _gone(server):
        if time.monotonic() > deadline:
            os.kill(server, signal.SIGKILL)
            pytest.fail("the transformers serve process outlived its SIGKILLed parent")
        time.sleep(0.1)


def test_samples_differ_because_the_server_samples(server, workspace):
    # transformers serve ignores `temperature` unless the model's generation config enables sampling; the staged
    # model directory does, so repeated samples of one pair are not all the greedy answer.
    config = GenerateConfig(
        personas=("default",),
        questions=(0,),
        n_samples=3,
        model=server.model,
        base_url=server.base_url,
        max_tokens=5,
        temperature=1.0,
        concurrency=3,
    )
    run_generation(workspace, config)
    with workspace.catalog().session() as s:
        texts = [r[0] for r in s.execute(sa.text("SELECT text FROM responses"))]
    assert len(texts) == 3 and len(set(texts)) > 1
