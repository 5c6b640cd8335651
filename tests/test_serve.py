"""A real `transformers serve` on the embedded model (offline), and the generation stage against it; the `personavec
serve` command's foreground life (its default backend, the steering server of tests/test_serving.py)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

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


def test_cli_serve_runs_in_foreground_until_interrupted(tmp_path):
    cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "serve", "--device", "cpu", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        line = proc.stdout.readline()
        info = json.loads(line)
        with urllib.request.urlopen(f"{info['base_url']}/models", timeout=5) as r:
            assert r.status == 200
        proc.send_signal(signal.SIGINT)
        try:
            rc = proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail(f"`personavec serve` did not stop within 60 s of SIGINT; stderr: {proc.stderr.read()[-3000:]}")
        assert rc == 0, proc.stderr.read()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):  # the server went away with the command
        urllib.request.urlopen(f"{info['base_url']}/models", timeout=2)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux-only")
def test_server_does_not_outlive_a_killed_command():
    cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "serve", "--device", "cpu", "--json"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=dict(os.environ))
    info = json.loads(proc.stdout.readline())
    proc.kill()  # SIGKILL: no cleanup code runs in the command
    proc.wait()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            os.kill(info["pid"], 0)
        except ProcessLookupError:
            return
        time.sleep(0.25)
    os.kill(info["pid"], signal.SIGKILL)
    pytest.fail("the transformers serve process outlived its SIGKILLed parent")


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
