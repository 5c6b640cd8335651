"""The steering server over real sockets: a tiny random llama in float64 (greedy tokens are exact), a real workspace
with real vectors runs, the stock ``openai`` client and raw HTTP. Identity interventions, a mixed batch row for row
against each request alone, streaming = non-streaming, bad input (400, one line, the server goes on), recording,
a client that disconnects mid-stream."""

from __future__ import annotations

import http.client
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest
import sqlalchemy as sa
import torch
from conftest import synthetic_extraction_factory
from tiny_models import embedded_dtype, save_template_tokenizer, tiny_config

from personavec.modeling import load_model
from personavec.serving.app import ServeConfig, running_server
from personavec.serving.requests import BadRequest, parse_request
from personavec.vectors import VectorConfig, compute_vectors
from personavec.workspace import init_workspace

PROMPTS = [
    ("You are a pirate who loves the sea.", "How are you?"),
    ("", "What is the nature of truth, in your own words and at some length?"),
    ("You are terse.", "Hi"),
    ("You are a poet.", "Describe the moon."),
    (None, "Count to ten."),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    """A tiny 8-layer llama (float64), a workspace with a vectors run of that model and one of another model of
    the same shape, and a recording server on an ephemeral port."""
    from transformers import AutoModelForCausalLM

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a shared CPU: one thread is much faster than two fighting over busy cores
    root = tmp_path_factory.mktemp("serving")
    model_dir = root / "llama8"
    torch.manual_seed(0)
    config = tiny_config("llama")
    config.num_hidden_layers = 8
    AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    save_template_tokenizer("chatml", model_dir)
    loaded = load_model(str(model_dir), dtype="float32", device="cpu")
    loaded.model.to(torch.float64)
    ws = init_workspace(root / "ws")
    make = synthetic_extraction_factory(root)
    ours = make(ws, layers=(2, 5), d_model=64, model=str(model_dir), architecture=loaded.architecture)
    theirs = make(ws, layers=(2, 5), d_model=64, model="someone/else", seed=1)
    vec = compute_vectors(ws, VectorConfig(extraction_run_id=ours.run_id)).run_id
    other = compute_vectors(ws, VectorConfig(extraction_run_id=theirs.run_id)).run_id
    cfg = ServeConfig(model=str(model_dir), workspace=str(ws.root), record=True, max_tokens=32, max_batch=16)
    try:
        with running_server(cfg, loaded=loaded) as server:
            yield {
                "server": server,
                "ws": ws,
                "vec": vec,
                "other": other,
                "loaded": loaded,
                "ref": ours.response_run_id,
            }
    finally:
        torch.set_num_threads(threads)


def _client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)


def _messages(system: str | None, question: str) -> list[dict]:
    return ([] if system is None else [{"role": "system", "content": system}]) + [{"role": "user", "content": question}]


def _ask(server, system, question, interventions=None, **kw):
    body = {"interventions": interventions} if interventions is not None else {}
    return _client(server).chat.completions.create(
        model=server.model,
        messages=_messages(system, question),
        max_tokens=kw.pop("max_tokens", 10),
        temperature=kw.pop("temperature", 0),
        extra_body=body,
        **kw,
    )


def _post(server, path: str, body: bytes | dict) -> tuple[int, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", f"/v1{path}", body=raw, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def _direction(d: int, seed: int = 0) -> list[float]:
    return (np.random.default_rng(seed).normal(size=d) * 2.0).tolist()


# ------------------------------------------------------------------------------------------------ correctness


@pytest.mark.slow
def test_identity_interventions_give_the_unsteered_tokens(setup):
    server, vec = setup["server"], setup["vec"]
    system, question = PROMPTS[1]
    plain = _ask(server, system, question).choices[0].message.content
    assert plain
    for iv in (
        [{"vector": f"{vec}:storyteller-default", "layers": [2], "coef": 0.0}],
        [{"vector": [0.0] * 64, "layers": [2], "kind": "ablate"}],
        [{"vector": f"{vec}:axis", "layers": [2, 5], "kind": "cap", "tau": "inf"}],
    ):
        assert _ask(server, system, question, iv).choices[0].message.content == plain, iv


@pytest.mark.slow
def test_a_mixed_batch_gives_each_request_its_own_tokens(setup):
    server, vec = setup["server"], setup["vec"]
    d = 64
    settings = [
        None,
        [{"vector": _direction(d, 1), "layers": [2], "coef": 3.0}],
        [{"vector": f"{vec}:storyteller-default", "layers": [5], "coef": 40.0, "positions": "generated"}],
        [{"vector": _direction(d, 2), "layers": [1], "kind": "ablate", "coef": -2.0}],
        [{"vector": _direction(d, 3), "layers": [3], "kind": "cap", "tau": -0.5},
         {"vector": _direction(d, 4), "layers": [6], "coef": 1.5}],
    ]  # fmt: skip
    jobs = [(PROMPTS[i], s) for i, s in enumerate(settings)]
    alone = [_ask(server, *p, s, max_tokens=12).choices[0].message.content for p, s in jobs]
    server.scheduler.peak = 0
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(
            pool.map(lambda job: _ask(server, *job[0], job[1], max_tokens=12).choices[0].message.content, jobs)
        )
    assert together == alone
    assert server.scheduler.peak > 1  # they did share decoding steps
    # The same answers as the local engine (generate_batch + Steerer, another copy of the model) gives alone.
    from personavec.generation.local import generate_batch, prompt_ids
    from personavec.steering.interventions import LayerIntervention, Steerer

    copy = load_model(str(setup["loaded"].path), dtype="float32", device="cpu")
    copy.model.to(torch.float64)
    ids = prompt_ids(copy.tokenizer, *PROMPTS[1])
    iv = LayerIntervention(layer=2, kind="add", vector=np.array(_direction(d, 1)), scale=3.0)
    with Steerer(copy.model, [iv]) as steerer:
        local = generate_batch(copy, [ids], max_new_tokens=12, steerer=steerer)[0].text
    assert local == alone[1]
    # Every intervention changes its answer (so the equality above is not trivially about unsteered rows).
    plain = [_ask(server, *p, None, max_tokens=12).choices[0].message.content for p, _ in jobs[1:]]
    assert all(a != b for a, b in zip(alone[1:], plain, strict=True))


@pytest.mark.slow
def test_response_positions_served_are_persona_vectors_response(setup):
    """positions "response" on the server: the prefill changes each joiner's last prompt token only (rows are
    right-aligned), decoding steps change every row's token; equal to persona_vectors' hook and to the local engine,
    alone and in a batch with a "generated" request of another prompt length."""
    from reference_steering import persona_vectors_response_generate

    from personavec.generation.local import prompt_ids

    server, loaded = setup["server"], setup["loaded"]
    v = _direction(64, 6)
    response = [{"vector": v, "layers": [3], "coef": 3.0, "positions": "response"}]
    generated = [{"vector": v, "layers": [3], "coef": 3.0, "positions": "generated"}]
    jobs = [(PROMPTS[1], response), (PROMPTS[2], generated), (PROMPTS[0], response), (PROMPTS[3], None)]
    alone = [_ask(server, *p, s, max_tokens=12).choices[0].message.content for p, s in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda j: _ask(server, *j[0], j[1], max_tokens=12).choices[0].message.content, jobs))
    assert together == alone
    ids = [prompt_ids(loaded.tokenizer, *PROMPTS[i]) for i in (1, 0)]
    reference = persona_vectors_response_generate(loaded, ids, np.array(v), 3.0, 3, max_new_tokens=12)
    want = [loaded.tokenizer.decode([t for t in r if t not in loaded.tokenizer.all_special_ids]) for r in reference]
    assert [alone[0], alone[2]] == want
    assert _ask(server, *PROMPTS[1], generated, max_tokens=12).choices[0].message.content != alone[0]


@pytest.mark.slow
def test_streamed_and_non_streamed_answers_are_equal_with_usage_and_logprobs(setup):
    server = setup["server"]
    client = _client(server)
    iv = {"interventions": [{"vector": _direction(64, 5), "layers": [2], "coef": 2.0}]}
    msgs = _messages(*PROMPTS[0])
    full = client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=12, temperature=0, logprobs=True, top_logprobs=3, extra_body=iv
    )
    stream = client.chat.completions.create(
        model=server.model, messages=msgs, max_tokens=12, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body=iv,
    )  # fmt: skip
    parts, usage, reason = [], None, None
    for ch in stream:
        if ch.usage is not None:
            usage = ch.usage
        for c in ch.choices:
            parts.append(c.delta.content or "")
            reason = c.finish_reason or reason
    assert "".join(parts) == full.choices[0].message.content
    assert reason == full.choices[0].finish_reason
    assert usage.completion_tokens == full.usage.completion_tokens and usage.prompt_tokens == full.usage.prompt_tokens
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens and len(content[0].top_logprobs) == 3
    assert content[0].logprob == pytest.approx(content[0].top_logprobs[0].logprob)  # greedy: the top token
    # The legacy completions endpoint, n = 2 with a seed: samples are reproducible.
    out = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=6, n=2, seed=3,
                                    temperature=1.0, logprobs=2)  # fmt: skip
    again = client.completions.create(model=server.model, prompt="Once upon a time", max_tokens=6, n=2, seed=3,
                                      temperature=1.0, logprobs=2)  # fmt: skip
    assert [c.text for c in out.choices] == [c.text for c in again.choices]
    assert len(out.choices) == 2 and out.choices[0].logprobs.tokens
    # stop strings: the answer ends before the first occurrence, streamed or not, finish_reason "stop".
    plain = _ask(server, *PROMPTS[1], max_tokens=16).choices[0].message.content
    stop = plain[4:7]
    cut = plain[: plain.index(stop)]
    done = _ask(server, *PROMPTS[1], max_tokens=16, stop=[stop]).choices[0]
    assert (done.message.content, done.finish_reason) == (cut, "stop")
    chunks = client.chat.completions.create(
        model=server.model, messages=_messages(*PROMPTS[1]), max_tokens=16, temperature=0, stop=[stop], stream=True
    )
    assert "".join(c.delta.content or "" for ch in chunks for c in ch.choices) == cut
    models = client.models.list()
    assert [m.id for m in models.data] == [server.model]


@pytest.mark.slow
def test_cap_thresholds_from_a_reference_run_are_computed_once_and_applied(setup):
    server, vec, ref = setup["server"], setup["vec"], setup["ref"]
    iv = [{"vector": f"{vec}:axis", "layers": [2, 5], "kind": "cap", "percentile": 10, "reference_run": ref}]
    first = _ask(server, *PROMPTS[0], iv).choices[0].message.content
    again = _ask(server, *PROMPTS[0], iv).choices[0].message.content  # the cached plan
    assert first == again and first


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.slow
def test_bad_requests_are_400_with_one_line_naming_the_field_and_the_server_goes_on(setup):
    server, vec, other = setup["server"], setup["vec"], setup["other"]
    base = {"model": server.model, "messages": _messages(*PROMPTS[2]), "max_tokens": 4}
    cases = [
        ({"interventions": [{"vector": f"{vec}:nobody", "layers": [2], "coef": 1}]}, "nobody"),
        ({"interventions": [{"vector": f"{other}:storyteller", "layers": [2], "coef": 1}]}, "someone/else"),
        ({"interventions": [{"vector": [1.0] * 63, "layers": [2], "coef": 1}]}, "d_model"),
        ({"interventions": [{"vector": f"{vec}:axis", "layers": [8], "coef": 1}]}, "out of range"),
        ({"interventions": [{"vector": f"{vec}:axis", "layers": [2], "coef": math.nan}]}, "finite"),
        ({"interventions": [{"vector": f"{vec}:axis", "layers": [2], "coef": math.inf}]}, "finite"),
        ({"interventions": [{"vector": "axis", "layers": [2]}]}, "RUN:NAME"),
        ({"max_tokens": 100000}, "max_tokens"),
        ({"messages": _messages(None, "word " * 3000)}, "context"),
        ({"model": "gpt-9"}, "not served"),
        ({"temperature": -1}, "temperature"),
    ]
    for extra, needle in cases:
        status, data = _post(server, "/chat/completions", {**base, **extra})
        msg = data["error"]["message"]
        assert status == 400 and needle in msg and "\n" not in msg, (extra, status, data)
    status, data = _post(server, "/chat/completions", b'{"model": "x", "messages": [')
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    status, data = _post(server, "/chat/completions", {**base, "interventions": [{"vector": [1.0] * 64, "coef": 1}]})
    assert data["error"]["param"] == "interventions[0].layers"
    assert _ask(server, *PROMPTS[2], max_tokens=3).choices[0].message.content is not None  # still serving


def test_an_intervention_that_overflows_the_model_is_refused_and_the_server_goes_on(setup):
    """A coefficient that pushes the residual stream past what the dtype holds makes the logits NaN/inf: sampling
    from them raised on the model thread, which died, and every later request got 500 while /health said 200;
    greedy answered an empty text. Now that request alone is refused (400, `interventions`), the others go on."""
    server, vec = setup["server"], setup["vec"]
    base = {"model": server.model, "messages": _messages(*PROMPTS[2]), "max_tokens": 4}
    huge = [{"vector": f"{vec}:storyteller-default", "layers": [2], "coef": 1e300}]
    for temperature, n in [(0.7, 1), (0.0, 1), (0.7, 2)]:
        status, data = _post(
            server, "/chat/completions", {**base, "temperature": temperature, "n": n, "interventions": huge}
        )
        assert status == 400 and data["error"]["param"] == "interventions", (temperature, status, data)
        assert "became NaN/inf at token 1 under this request's interventions" in data["error"]["message"]
    assert _ask(server, *PROMPTS[2], max_tokens=3, temperature=0.7).choices[0].message.content is not None
    health = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{server.port}/health", timeout=10).read())
    assert health["status"] == "ok"


@pytest.mark.slow
@pytest.mark.xdist_group("embedded-loaded")
def test_a_client_that_hangs_up_on_a_non_streamed_answer_ends_its_handler(steering_server):
    """The answer is cancelled and its handler returns (it waited on its queue for ever: shutdown then stalled for
    the graceful timeout and printed a CancelledError traceback). SmolLM2, slow enough that the answer is still
    being generated when the client goes."""
    server = steering_server
    body = {"model": server.model, "messages": _messages(*PROMPTS[1]), "max_tokens": 200, "ignore_eos": True}
    raw = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.port))
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    deadline = time.monotonic() + 30
    while not server.scheduler.active and time.monotonic() < deadline:  # it is being answered
        time.sleep(0.01)
    sock.close()
    deadline = time.monotonic() + 10
    while (server.scheduler.active or server.http.server_state.tasks) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.active == 0 and not server.http.server_state.tasks


def test_request_parsing_names_the_field():
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    req = parse_request({**body, "interventions": [{"vector": "7:a-b", "layers": [3], "coef": 2}]}, "chat")
    assert req.interventions[0].coef == 2.0 and req.interventions[0].layers == (3,)
    for extra, param in [
        ({"interventions": [{"vector": "7:a", "kind": "push"}]}, "interventions[0].kind"),
        ({"interventions": [{"vector": "7:a"}, {"vector": "7:a", "kind": "cap"}]}, "interventions[1].tau"),
        ({"interventions": [{"vector": "7:a", "tau": 1.0}]}, "interventions[0].tau"),
        ({"interventions": [{"vector": "7:a", "kind": "cap", "tau": 1, "coef": 2}]}, "interventions[0].coef"),
        ({"interventions": [{"vector": "7:a", "wat": 1}]}, "interventions[0].wat"),
        ({"n": 0}, "n"),
        ({"top_p": 2}, "top_p"),
        ({"top_p": 0}, "top_p"),  # it was read as 1: sampling from every token
        ({"max_tokens": 0}, "max_tokens"),  # "must be in 1..None" before
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"stop": 3}, "stop"),
        ({"messages": []}, "messages"),
    ]:
        with pytest.raises(BadRequest) as info:
            parse_request({**body, **extra}, "chat")
        assert info.value.param == param, extra


# ------------------------------------------------------------------------------------------------ recording, cancel


@pytest.mark.slow
def test_record_stores_answers_with_their_interventions_and_a_disconnect_stores_nothing(setup):
    server, ws, vec = setup["server"], setup["ws"], setup["vec"]
    catalog = ws.catalog()

    def count() -> int:
        with server.catalog_lock, catalog.session() as s:
            return s.execute(sa.text(f"SELECT count(*) FROM responses WHERE run_id = {server.run_id}")).scalar()

    # A client that reads two events of a long stream and hangs up: its rows leave the batch, nothing lands.
    deadline = time.monotonic() + 30
    while server.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.05)
    server.recorder.flush()  # what earlier tests asked has landed
    before = count()
    body = {"model": server.model, "messages": _messages(*PROMPTS[1]), "max_tokens": 30, "stream": True,
            "interventions": [{"vector": f"{vec}:axis", "layers": [2], "coef": 1.0}]}  # fmt: skip
    sock = socket.create_connection(("127.0.0.1", server.port))
    raw = json.dumps(body).encode()
    sock.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    got = b""
    while got.count(b"data:") < 2:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the stream early: {got[-500:]!r}"
        got += chunk
    sock.close()
    deadline = time.monotonic() + 30
    while server.scheduler.active and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.scheduler.active == 0  # the slot was freed before 30 tokens were generated
    server.recorder.flush()
    assert count() == before

    # A steered answer and a plain one land, readable while the server serves.
    iv = [{"vector": f"{vec}:storyteller-default", "layers": [2, 5], "coef": 3.0, "normalize": True}]
    steered = _ask(server, "You are a recorded persona.", "Is this recorded?", iv, max_tokens=5)
    _ask(server, "You are a recorded persona.", "Is this recorded?", max_tokens=5)
    server.recorder.flush()
    with server.catalog_lock, catalog.session() as s:
        rows = s.execute(
            sa.text(
                "SELECT r.text, r.sample_index, p.system_prompt, q.text, a.interventions, a.applied, a.vector_run_ids "
                "FROM responses r JOIN served_answers a ON a.response_id = r.id JOIN personas p ON p.id = r.persona_id "
                f"JOIN questions q ON q.id = r.question_id WHERE r.run_id = {server.run_id} "
                "AND q.text = 'Is this recorded?' ORDER BY r.sample_index"
            )
        ).all()
    assert len(rows) == 2
    first, second = rows
    assert first[0] == steered.choices[0].message.content and first[2] == "You are a recorded persona."
    assert [r[1] for r in rows] == [0, 1]
    asked = json.loads(first[4])
    assert asked[0]["vector"] == f"{vec}:storyteller-default" and asked[0]["coef"] == 3.0
    applied = json.loads(first[5])[0]
    assert [x["layer"] for x in applied["layers"]] == [2, 5] and applied["vector_run_id"] == vec
    assert list(first[6]) == [vec]
    assert json.loads(second[4]) == [] and list(second[6]) == []
    # Another process reads the catalog while the server serves (it holds the file only while it writes).
    query = f"SELECT count(*) FROM served_answers WHERE run_id = {server.run_id}"
    code = (
        "import duckdb, sys, time\n"
        "for _ in range(200):\n"
        "    try:\n"
        f"        con = duckdb.connect({str(ws.catalog_path)!r}, read_only=True)\n"
        f"        print(con.execute({query!r}).fetchone()[0]); break\n"
        "    except duckdb.IOException: time.sleep(0.05)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert int(out.stdout) == count(), out.stderr


# ------------------------------------------------------------------------------------------------ embedded model


@pytest.mark.slow
def test_generate_and_judge_base_url_against_personavec_serve_on_the_embedded_model(workspace, cli):
    """`personavec serve --record` (its own process, SmolLM2-135M) answering `personavec generate --base-url` and
    `personavec judge --base-url` (with logprobs): the generate run's answers are also the served session's; the
    command serves in the foreground until Ctrl-C, exits 0 and its server is gone."""
    from personavec.cli import app

    cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "serve", "-w", str(workspace.root),
           "--record", "--device", "cpu", "--dtype", embedded_dtype(), "--max-tokens", "64", "--json"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # a shared CPU: one thread is much faster than two busy ones
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        info = json.loads(proc.stdout.readline() or proc.stderr.read())
        common = ["--base-url", info["base_url"], "--model", info["model"], "-w", str(workspace.root), "--json"]
        res = cli.invoke(
            app,
            ["generate", "--persona", "default", "--question", "0", "--question", "1", "--max-tokens", "8",
             "--temperature", "0", *common],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        gen = json.loads(res.output.strip().splitlines()[-1])
        assert gen["answers"] == 2 and gen["failures"] == 0
        res = cli.invoke(app, ["judge", str(gen["run_id"]), "--rubric", "coherence", *common])
        assert res.exit_code == 0, res.output
        judged = json.loads(res.output.strip().splitlines()[-1])
        assert judged["logprobs"] is True  # the server answered the judge's logprobs request
        proc.send_signal(signal.SIGINT)  # the command serves in the foreground until Ctrl-C, then exits 0
        assert proc.wait(timeout=60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(OSError):  # the server went away with the command
        urllib.request.urlopen(f"{info['base_url']}/models", timeout=2)
    with workspace.catalog().session() as s:

        def texts(run: int) -> list[str]:
            return [r[0] for r in s.execute(sa.text(f"SELECT text FROM responses WHERE run_id = {run}"))]

        status = s.execute(sa.text(f"SELECT status FROM runs WHERE id = {info['run_id']}")).scalar()
        generated, served = texts(gen["run_id"]), texts(info["run_id"])
        methods = {r[0] for r in s.execute(sa.text("SELECT method FROM judgements"))}
    assert status == "done" and set(generated) <= set(served)
    assert len(served) == 2 + 2  # the two answers and the judge's two answers, all recorded
    assert "logprobs" in methods


def test_cli_serve_refuses_recording_without_a_workspace_or_with_transformers_serve(cli, tmp_path):
    from personavec.cli import app

    res = cli.invoke(app, ["serve", "--record", "-w", str(tmp_path / "nowhere")])
    assert res.exit_code == 2 and "does not exist" in res.output
    res = cli.invoke(app, ["serve", "--record", "--backend", "transformers"])
    assert res.exit_code == 2 and "--record needs the personavec backend" in res.output
    res = cli.invoke(app, ["serve", "--backend", "vllm"])
    assert res.exit_code == 2 and "--backend" in res.output


def _busy_port() -> socket.socket:
    """A real socket listening on a free port of 127.0.0.1 (another server): close it when done."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _catalog_counts(ws) -> dict[str, int]:
    with ws.catalog().session() as s:
        return {
            table: s.execute(sa.text(f"SELECT count(*) FROM {table}")).scalar()
            for table in ("runs", "response_runs", "persona_sets", "question_sets", "responses")
        }


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads_and_records_nothing(
    cli, workspace, tiny_loaded, monkeypatch
):
    """`personavec serve -w WS --record --port P` with P taken by another listening socket: one line naming the
    port, exit 2, and the model never loaded, no generate run nor `served-N` persona/question set in the catalog
    (the socket is bound first, then handed to uvicorn). Before, the model loaded, the recording run and its sets
    were created, and a traceback ended in `OSError: [Errno 98] Address already in use`."""
    from personavec.cli import app

    loads: list[str] = []

    def load_model(name, **kw):  # the tiny llama in place of the model named: the old order went on to record
        loads.append(name)
        return tiny_loaded

    monkeypatch.setattr("personavec.modeling.load_model", load_model)
    before = _catalog_counts(workspace)
    busy = _busy_port()
    port = busy.getsockname()[1]
    try:
        res = cli.invoke(app, ["serve", "-w", str(workspace.root), "--record", "--port", str(port), "--device", "cpu"])
        assert res.exit_code == 2, (res.output, res.exception)
        assert res.stderr.strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use (another server?): choose another with --port, or leave "
            "--port out for a free one"
        ]
        assert res.stdout == ""
        assert loads == []  # refused before the model was even resolved
        assert _catalog_counts(workspace) == before  # no run, no served-N sets
        # the transformers backend too: said at once, not after `transformers serve` fails to bind (or another
        # server on that port answers its readiness probe); the model (a .gguf that is not there) is not resolved
        res = cli.invoke(app, ["serve", "--backend", "transformers", "--port", str(port), "--model", "/no/such.gguf"])
        assert res.exit_code == 2 and res.stderr.strip().splitlines() == [
            f"error: port {port} on 127.0.0.1 is in use (another server?): choose another with --port, or leave "
            "--port out for a free one"
        ]
    finally:
        busy.close()


@pytest.mark.slow
def test_serve_on_a_port_in_use_exits_2_with_one_line_in_its_own_process(workspace):
    """The same through `personavec serve` in its own process, on a model that does not exist: the port is checked
    first (the message is the port's, not the model's), one line on stderr, no traceback, nothing recorded."""
    before = _catalog_counts(workspace)
    busy = _busy_port()
    port = busy.getsockname()[1]
    try:
        cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "serve", "-w", str(workspace.root),
               "--record", "--port", str(port), "--model", "/no/such/model.gguf"]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    finally:
        busy.close()
    assert out.returncode == 2, out.stderr
    assert out.stderr.splitlines() == [
        f"error: port {port} on 127.0.0.1 is in use (another server?): choose another with --port, or leave --port "
        "out for a free one"
    ]
    assert out.stdout == ""
    assert _catalog_counts(workspace) == before


def test_serve_names_the_workspace_it_was_given_in_the_generate_it_suggests(cli, workspace, tmp_path, monkeypatch):
    """RELIABILITY 129 for `serve`: given -w, the `personavec generate` line it prints names that workspace, so that
    it runs as printed (the answers land where `serve -w` records); without -w, as it is."""
    import shlex

    from personavec.cli import app

    def serve(config, *, on_ready=None):  # the server as far as its ready line: no model, no socket
        on_ready("http://127.0.0.1:8123/v1", None)

    monkeypatch.setattr("personavec.serving.app.serve", serve)
    res = cli.invoke(app, ["serve", "-w", str(workspace.root), "--model", "my model"])
    assert res.exit_code == 0, res.output
    [line] = [line for line in res.stdout.splitlines() if "personavec generate" in line]
    assert shlex.split(line) == ["personavec", "generate", "--workspace", str(workspace.root.resolve()),
                                 "--base-url", "http://127.0.0.1:8123/v1", "--model", "my model"]  # fmt: skip
    monkeypatch.chdir(tmp_path)  # no -w, no workspace here: the line is left as it is
    monkeypatch.delenv("PERSONAVEC_WORKSPACE", raising=False)
    res = cli.invoke(app, ["serve"])
    assert res.exit_code == 0, res.output
    [line] = [line for line in res.stdout.splitlines() if "personavec generate" in line]
    assert shlex.split(line) == ["personavec", "generate", "--base-url", "http://127.0.0.1:8123/v1", "--model",
                                 "smollm2-135m-instruct"]  # fmt: skip


# ------------------------------------------------------------------------------------------------ sliding windows

#: Four layers: two of each kind where the family mixes them (Mistral's are all sliding).
SLIDING_LAYERS = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention"]


def _sliding_model(root, arch: str, window: int):
    """A tiny model of ``arch`` with a ``window``-token sliding window and the Gemma chat template."""
    from transformers import AutoModelForCausalLM, Gemma3ForConditionalGeneration

    config = tiny_config(arch)
    text = config.get_text_config()
    text.sliding_window = window
    if arch != "mistral":
        text.layer_types = list(SLIDING_LAYERS)
    torch.manual_seed(0)
    model = Gemma3ForConditionalGeneration(config) if arch == "gemma3" else AutoModelForCausalLM.from_config(config)
    model.save_pretrained(root / arch)
    save_template_tokenizer("gemma", root / arch)
    # Eager attention takes its softmax in float32, where a float64 mask's minimum is -inf: a left-padding row of a
    # float64 batch (fully masked) turns NaN and poisons the rows that mask it (0 * NaN), in HF's own batched
    # `generate` too. So sdpa in float64, and Gemma 2 (eager only, for its logit softcapping) in float32.
    eager = arch == "gemma2"
    loaded = load_model(str(root / arch), dtype="float32", device="cpu", attn_implementation=None if eager else "sdpa")
    if not eager:
        loaded.model.to(torch.float64)
    return loaded


def _serve_staggered(loaded, waves, tuning=None, scheduler_class=None):
    """Serve ``waves`` (lists of request bodies) on a Scheduler, each wave submitted once the batch has run two more
    decoding steps; returns each request's :class:`Finished` (in order) and the scheduler."""
    import threading

    from personavec.serving.scheduler import Finished, InterventionResolver, Refused, Scheduler
    from personavec.tuning import DEFAULT

    resolver = InterventionResolver(None, loaded)
    scheduler = (scheduler_class or Scheduler)(
        loaded, resolver=resolver, max_batch=16, max_new_tokens=64, tuning=tuning or DEFAULT
    )
    done: list[list] = []
    tickets = []
    all_done = threading.Semaphore(0)

    def sink_for(slot: list):
        def sink(event):
            if isinstance(event, Refused):
                slot.append(event)
                all_done.release()
            elif isinstance(event, Finished):
                slot.append(event)
                all_done.release()

        return sink

    scheduler.start()
    try:
        for k, wave in enumerate(waves):
            if k:
                deadline = time.monotonic() + 60
                target = scheduler.steps + 2
                while scheduler.steps < target and time.monotonic() < deadline:
                    time.sleep(0.002)
            for body in wave:
                done.append([])
                tickets.append(scheduler.submit(parse_request(body, "chat"), sink_for(done[-1])))
        for _ in tickets:
            assert all_done.acquire(timeout=120)
    finally:
        scheduler.stop()
    assert not any(isinstance(slot[0], Refused) for slot in done), done
    return [slot[0] for slot in done], tickets, scheduler


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gemma3text", "gemma2", "mistral", "gemma3"])
def test_sliding_window_models_serve_each_row_as_generate_alone(tmp_path, arch):
    """Prompts and answers several times longer than a 4-token window, requests joining a running batch in three
    waves (different prompt widths, lengths and interventions, some none; short ones finish early so columns are
    trimmed): every row's greedy tokens equal the model's own ``generate`` on that request alone, which keeps its
    own sliding-window cache."""
    from personavec.generation.local import generate_batch
    from personavec.steering.interventions import Steerer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = _sliding_model(tmp_path, arch, window=4)
        d = loaded.d_model
        settings = [
            None,
            [{"vector": _direction(d, 1), "layers": [2], "coef": 3.0}],
            [{"vector": _direction(d, 2), "layers": [1], "kind": "ablate"}],
            None,
            [{"vector": _direction(d, 3), "layers": [3], "kind": "cap", "tau": -0.5},
             {"vector": _direction(d, 4), "layers": [1], "coef": 1.5, "positions": "generated"}],
            [{"vector": _direction(d, 5), "layers": [2], "coef": -2.0}],
        ]  # fmt: skip
        lengths = [16, 6, 14, 9, 12, 15]
        bodies = [
            {"model": "m", "messages": _messages(*PROMPTS[i % len(PROMPTS)]), "max_tokens": n, "temperature": 0,
             **({"interventions": s} if s else {})}
            for i, (s, n) in enumerate(zip(settings, lengths, strict=True))
        ]  # fmt: skip
        served, tickets, scheduler = _serve_staggered(loaded, [bodies[:3], bodies[3:5], bodies[5:]])
        assert scheduler.peak > 3  # later waves decoded together with rows of earlier ones

        def alone(ticket, n: int) -> tuple[int, ...]:
            ivs = [iv for r in ticket.interventions for iv in r.layers]
            with Steerer(loaded.model, ivs) as steerer:
                out = generate_batch(loaded, [ticket.prompt], max_new_tokens=n, steerer=steerer if ivs else None)
            return out[0].token_ids

        for i, (got, ticket) in enumerate(zip(served, tickets, strict=True)):
            want = alone(ticket, lengths[i])
            assert len(ticket.prompt) > 2 * 4
            assert (got.token_ids, got.finish_reason) == (want, "length" if len(want) == lengths[i] else "stop"), i
        # The window matters: with it opened to the whole context, the model's own answers change.
        text = loaded.model.config.get_text_config()
        text.sliding_window = 4096
        try:
            wide = [alone(t, n) for t, n in zip(tickets, lengths, strict=True)]
        finally:
            text.sliding_window = 4
        assert any(w != g.token_ids for w, g in zip(wide, served, strict=True))
    finally:
        torch.set_num_threads(threads)


def test_a_model_with_chunked_or_linear_attention_layers_is_refused_at_start(tmp_path):
    from transformers import AutoModelForCausalLM, Llama4TextConfig

    from personavec.errors import ModelError
    from personavec.serving.scheduler import Scheduler

    config = Llama4TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_local_experts=2, attention_chunk_size=8,
    )  # fmt: skip
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llama4")
    save_template_tokenizer("chatml", tmp_path / "llama4")
    loaded = load_model(str(tmp_path / "llama4"), dtype="float32", device="cpu")
    with pytest.raises(ModelError, match="chunked_attention layers; the steering server batches"):
        Scheduler(loaded).start()
    assert not any(block._forward_hooks for block in loaded.layers)


def test_prefill_groups_keep_to_the_budget_and_bound_the_padding():
    from personavec.serving.scheduler import prefill_groups

    lengths = [300, 12, 10, 290, 2000, 31, 30, 7, 640, 600]
    groups = prefill_groups(lengths, 1024, 0.25)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # each prompt once
    for g in groups:
        width, cells = max(lengths[i] for i in g), max(lengths[i] for i in g) * len(g)
        assert len(g) == 1 or cells <= 1024  # the budget; a longer prompt alone
        assert cells - sum(lengths[i] for i in g) <= max(0.25 * cells, 1024 // 64), g
        assert width == lengths[g[-1]]  # in length order
    # 2000 alone, 600 and 640 apart (1,280 cells: past the budget), 290 with 300 (10 padded), 30 with 31
    assert groups == [[7, 2, 1], [6, 5], [3, 0], [9], [8], [4]]
    assert prefill_groups([40] * 64, 16384, 0.25) == [list(range(64))]  # one forward where it fits
    assert prefill_groups([5, 30], 16384, 0.25) == [[0, 1]]  # 25 padded tokens: less than another forward
    assert prefill_groups([5, 30], 1024, 0.25) == [[0], [1]]  # on a CPU budget they are not
    assert prefill_groups([], 1024, 0.25) == []


def test_joiners_of_mixed_lengths_are_prefilled_in_groups_each_row_as_generate_alone(tiny_llama):
    """One wave of short and long prompts: prefilled in several forwards (the budget cut to 256 tokens), padding
    bounded, and every row's greedy tokens those of the model's own ``generate`` on that request alone."""
    from personavec.generation.local import generate_batch
    from personavec.serving.scheduler import prefill_groups
    from personavec.tuning import Tuning

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(tiny_llama, dtype="float32", device="cpu")
        loaded.model.to(torch.float64)
        long = "Tell me everything about " + "the sea and the ships and the stars " * 12
        questions = ["Hi", long, "How are you?", long + "and the moon", "What is truth?", long[:150]]
        bodies = [{"model": "m", "messages": _messages(None, q), "max_tokens": 6, "temperature": 0} for q in questions]
        tuning = Tuning(cpu_batch_tokens=256)
        served, tickets, scheduler = _serve_staggered(loaded, [bodies], tuning)
        lengths = [len(t.prompt) for t in tickets]
        assert max(lengths) > 100 > 20 > min(lengths)
        assert scheduler.prefills == len(prefill_groups(lengths, 256, 0.25)) >= 3
        assert scheduler.prefill_tokens == sum(lengths)
        one_block = max(lengths) * len(lengths)  # as the joiners were prefilled before: one left-padded block
        assert scheduler.prefill_cells - sum(lengths) <= 0.25 * one_block - 1 < one_block - sum(lengths)
        for got, ticket in zip(served, tickets, strict=True):
            want = generate_batch(loaded, [ticket.prompt], max_new_tokens=6)[0].token_ids
            assert got.token_ids == want
    finally:
        torch.set_num_threads(threads)


def test_a_wave_of_long_prompts_joins_a_group_per_step_while_the_batch_keeps_answering(tiny_llama):
    """A short request decoding, then four long prompts at once, the budget one of them: each decoding step of the
    running row is followed by one group's prefill (not four prefills in a row), the oldest first, and every row's
    greedy tokens are those of ``generate`` alone."""
    from personavec.generation.local import generate_batch
    from personavec.serving.scheduler import Scheduler
    from personavec.tuning import Tuning

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        loaded = load_model(tiny_llama, dtype="float32", device="cpu")
        loaded.model.to(torch.float64)
        events: list[str] = []
        prefill, decode = Scheduler._prefill_group, Scheduler._decode

        class Watched(Scheduler):
            def _prefill_group(self, joiners):
                events.append(f"P{len(joiners)}")
                return prefill(self, joiners)

            def _decode(self):
                events.append("D")
                return decode(self)

        long = "Tell me about the sea and the ships and the stars, " * 3
        first = {"model": "m", "messages": _messages(None, "Hi"), "max_tokens": 16, "temperature": 0}
        wave = [
            {"model": "m", "messages": _messages(None, long + str(i)), "max_tokens": 4, "temperature": 0}
            for i in range(4)
        ]
        served, tickets, _ = _serve_staggered(loaded, [[first], wave], Tuning(cpu_batch_tokens=64), Watched)
        assert all(40 < len(t.prompt) <= 64 for t in tickets[1:])  # one long prompt fills the budget
        joined = "".join(events[events.index("P1", 1) :])  # from the wave's first prefill on
        assert joined.startswith("P1DP1DP1DP1D"), events
        for got, ticket in zip(served, tickets, strict=True):
            n = 16 if ticket is tickets[0] else 4
            assert got.token_ids == generate_batch(loaded, [ticket.prompt], max_new_tokens=n)[0].token_ids
    finally:
        torch.set_num_threads(threads)
