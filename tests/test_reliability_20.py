"""Issue 20, reliability second round: every case runs real components (a DuckDB catalog, Zarr, tiny random-weight
models, misbehaving endpoints as real socket servers) and checks the one-line error, the exit code and that
nothing was written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import template_tokenizer, tiny_config

from personavec.cli import app
from personavec.errors import ConfigError
from personavec.steering.naming import resolve_vector
from personavec.store.runs import list_runs
from personavec.vectors import VectorConfig, VectorSet, compute_vectors


def _tiny8(root: Path, seed: int) -> str:
    """An 8-layer, 64-wide random llama (the synthetic extraction's shape); ``seed`` gives another model."""
    from transformers import AutoModelForCausalLM

    out = root / f"llama8-{seed}"
    if not (out / "config.json").is_file():
        torch.manual_seed(seed)
        config = tiny_config("llama")
        config.num_hidden_layers = 8
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        template_tokenizer("chatml").save_pretrained(out)
    return str(out)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two tiny models of the same shape (8 layers x 64) with different weights."""
    root = tmp_path_factory.mktemp("models20")
    return _tiny8(root, 0), _tiny8(root, 1)


@pytest.fixture
def vectors_of_first(workspace, make_extraction_run, models) -> int:
    """A vectors run recorded as the first tiny model's (layers 2 and 5, d_model 64)."""
    ext = make_extraction_run(
        workspace, layers=(2, 5), d_model=64, model=models[0], revision=None, architecture="LlamaForCausalLM"
    )
    return compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id)).run_id


def _runs(ws, kind: str | None = None) -> list:
    return list_runs(ws.catalog(), kind)


def _one_line_error(res, exit_code: int, *needles: str) -> str:
    assert res.exit_code == exit_code, res.output
    assert "Traceback" not in res.output, res.output
    for needle in needles:
        assert needle in res.output, res.output
    return res.output


# ------------------------------------------------------------------------------------------------ critical


def _vset(names: tuple[str, ...], groups: dict[str, list[str]] | None = None) -> VectorSet:
    rng = np.random.default_rng(0)
    matrix = torch.tensor(rng.normal(size=(len(names), 3)) * 50, dtype=torch.float32)
    return VectorSet(7, 20, "persona", names, matrix, (3,) * len(names), {"persona_groups": groups or {}})


def test_a_persona_named_axis_in_an_old_catalog_is_ambiguous_not_silently_used():
    vs = _vset(("default", "pirate", "axis"), {"default": ["default"]})
    with pytest.raises(ConfigError, match=r"'axis' of vectors run 7 is ambiguous: it could be persona 'axis'; or the "):
        resolve_vector(vs, "axis")
    # a persona a-b beside personas a and b: two readings as well
    vs = _vset(("default", "a", "b", "a-b"))
    with pytest.raises(ConfigError, match="ambiguous: it could be persona 'a-b'; or persona 'a' minus persona 'b'"):
        resolve_vector(vs, "a-b")
    # one reading resolves as before
    assert np.allclose(resolve_vector(vs, "default-a"), vs["default"].double().numpy() - vs["a"].double().numpy())


@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("axis", "'axis' is reserved"),
        ("AXIS", "is reserved"),
        ("-pirate", "starts with '-'"),
        ("pi\u202erate", "U+202E (RIGHT-TO-LEFT OVERRIDE) at position 2"),
        ("pi\u2066rate", "U+2066"),
        ("tab\tname", "U+0009"),
    ],
)
def test_reserved_and_control_character_persona_names_are_refused_at_ingest(cli, workspace, tmp_path, name, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "mine", "personas": [{"name": name, "system_prompt": "x"}]}))
    before = len(_runs(workspace))
    res = cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)])
    _one_line_error(res, 2, "personas[0]: persona name", needle)
    assert len(_runs(workspace)) == before


def test_reserved_group_names_are_refused_and_emoji_names_are_kept(cli, workspace, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"personas": [{"name": "pirate", "system_prompt": "x", "groups": ["axis"]}]}))
    _one_line_error(cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)]), 2, "persona group")
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # joined by zero-width joiners
    path.write_text(json.dumps({"personas": [{"name": f"{family} 海賊", "system_prompt": "x"}]}))
    res = cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output


def test_vectors_of_another_model_are_refused_unless_allowed_and_recorded(cli, workspace, models, vectors_of_first):
    from personavec.store.steering import get_intervention

    w = ["-w", str(workspace.root)]
    local = ["--device", "cpu", "--dtype", "float32", "--max-tokens", "2", "--temperature", "0"]
    pick = ["--persona", "default", "--question", "0"]
    steer = ["steer", *w, "--vector", f"{vectors_of_first}:storyteller-default", "--layer", "2", "--coef", "1"]
    before = len(_runs(workspace))
    res = cli.invoke(app, [*steer, "--model", models[1], *local, *pick])
    _one_line_error(res, 2, f"comes from {models[0]!r}, not from the model {models[1]!r}", "--allow-other-model")
    assert len(_runs(workspace)) == before  # no run created

    res = cli.invoke(
        app, ["monitor", *w, "--vector", f"{vectors_of_first}:axis", "--text", "Ahoy", "--model", models[1]]
    )
    _one_line_error(res, 2, "--allow-other-model")

    res = cli.invoke(app, [*steer, "--model", models[1], *local, *pick, "--allow-other-model", "--json"])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout.strip().splitlines()[-1])["runs"][0]["run_id"]
    record = get_intervention(workspace.catalog(), run_id)
    assert record is not None
    from personavec.store.runs import get_run

    config = get_run(workspace.catalog(), run_id).config
    assert config["steering"]["allow_other_model"] is True

    # the model the vectors come from needs no flag; a sweep over 0 and 2 is titled with both (was "x0")
    sweep = ["steer", *w, "--vector", f"{vectors_of_first}:storyteller-default", "--layer", "2"]
    res = cli.invoke(app, [*sweep, "--coef", "0", "--coef", "2", "--model", models[0], *local, *pick])
    assert res.exit_code == 0, res.output
    assert "x0,2 @2" in res.output


# ------------------------------------------------------------------------------------------------ tracebacks


def test_monitor_and_steer_argument_errors_are_one_line(cli, workspace, models, vectors_of_first, make_extraction_run):
    w = ["-w", str(workspace.root)]
    model = ["--model", models[0], "--device", "cpu", "--dtype", "float32"]
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_of_first}:cynic", "--text", "", *model])
    _one_line_error(res, 2, "--text is empty")
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_of_first}:cynic", "--text", "  ", *model])
    _one_line_error(res, 2, "--text is empty")

    before = len(_runs(workspace))
    cap = ["steer", *w, "--vector", f"{vectors_of_first}:-axis", "--kind", "cap", "--tau", "1", "--tau", "2"]
    res = cli.invoke(app, [*cap, *model, "--persona", "default", "--question", "0", "--max-tokens", "2"])
    _one_line_error(res, 2, "--tau was given 2 times for 1 layer(s)")
    res = cli.invoke(
        app, ["steer", *w, "--vector", f"{vectors_of_first}:cynic", "--coef", "1", "--coef", "nan", *model]
    )
    _one_line_error(res, 2, "coef must be finite, got nan")
    assert len(_runs(workspace)) == before  # validated before any work: no run at all

    # vectors of another d_model (32 here, the model has 64)
    small = make_extraction_run(workspace, layers=(2, 5), d_model=32, model=models[0], revision=None)
    small_vectors = compute_vectors(workspace, VectorConfig(extraction_run_id=small.run_id)).run_id
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{small_vectors}:cynic", "--text", "Ahoy", *model])
    _one_line_error(res, 2, "(d_model 32)", "has d_model 64")


def test_monitor_text_shows_token_text_not_bpe_symbols(cli, workspace, models, vectors_of_first):
    model = ["--model", models[0], "--device", "cpu", "--dtype", "float32"]
    args = ["monitor", "-w", str(workspace.root), "--vector", f"{vectors_of_first}:cynic", "--text", "Ahoy there"]
    res = cli.invoke(app, [*args, *model, "--json"])
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout.strip().splitlines()[-1])["items"][0]["tokens"]
    assert "".join(tokens) == "Ahoy there" and not any("Ġ" in t for t in tokens)


# ------------------------------------------------------------------------------------------------ judge


@pytest.fixture
def responses_run(workspace, seed_cache_file) -> int:
    """15 answers (5 built-in personas x 3 questions)."""
    from personavec.ingest import IngestConfig, ingest

    return ingest(workspace, IngestConfig("responses", seed_cache_file)).run_id


def _judge_args(ws, server, run: int) -> list[str]:
    return ["judge", str(run), "-w", str(ws.root), "--model", "fault-model", "--base-url", server.base_url]


def test_a_judge_logprob_of_1e308_is_not_used_and_the_summary_says_how_scores_were_read(cli, workspace, responses_run):
    from fault_server import FaultServer

    broken = {"content": [{"token": "7", "logprob": 0.0, "top_logprobs": [{"token": "7", "logprob": 1e308}]}]}
    with FaultServer(lambda *_: ("reply", "70", broken)) as server:
        res = cli.invoke(app, [*_judge_args(workspace, server, responses_run), "--rubric", "coherence"])
    assert res.exit_code == 0 and "Traceback" not in res.output, res.output
    assert "0 of 15 scores" in res.output  # asked for logprobs, read every score from the text
    with workspace.catalog().session() as s:
        rows = s.connection().exec_driver_sql("SELECT DISTINCT score, method FROM judgements").fetchall()
    assert rows == [(70.0, "parsed")]


def test_a_judge_run_stopped_by_a_fatal_4xx_on_its_first_request_is_kept_as_failed(cli, workspace, responses_run):
    from fault_server import FaultServer

    with FaultServer(lambda *_: ("status", 401, {}, {"error": {"message": "bad key"}})) as server:
        res = cli.invoke(app, [*_judge_args(workspace, server, responses_run), "--rubric", "coherence"])
    _one_line_error(res, 1, "HTTP 401")
    (run,) = _runs(workspace, "judge")
    assert run.status == "failed"


# ------------------------------------------------------------------------------------------------ file names


@pytest.fixture
def synthetic_vectors(workspace, make_extraction_run) -> int:
    ext = make_extraction_run(workspace, layers=(2, 5), d_model=16)
    return compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id)).run_id


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if "catalog.duckdb" not in p.name)


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
        _one_line_error(res, 2, "File name too long", "characters)", "choose a shorter name")
    assert _tree(tmp_path) == before  # nothing written anywhere


def test_safetensors_exports_respect_the_umask(workspace, synthetic_vectors, tmp_path):
    import os
    import stat

    from personavec.exports import export_direction, load_direction
    from personavec.vectors import export_vectors, load_vectors

    old = os.umask(0o022)
    try:
        export_vectors(load_vectors(synthetic_vectors, 5, workspace=workspace), tmp_path / "v.safetensors")
        export_direction(load_direction(synthetic_vectors, "ghost", workspace=workspace), tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    for name in ("v.safetensors", "d.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


# ------------------------------------------------------------------------------------------------ sql limits

_SLOW = "SELECT sum(hash(i)) FROM range(100000000000) t(i)"


def _signal_once_the_query_runs(signum: int) -> dict:
    """Send ``signum`` to this process 0.5 s after the sql worker thread starts; returns when it was sent."""
    import os
    import threading
    import time

    sent: dict = {}

    def fire() -> None:
        while not any(t.name == "personavec-sql" for t in threading.enumerate()):
            time.sleep(0.02)
        time.sleep(0.5)
        sent["at"] = time.monotonic()
        os.kill(os.getpid(), signum)

    threading.Thread(target=fire, daemon=True).start()
    return sent


@pytest.mark.parametrize("signum", ["SIGINT", "SIGTERM"])
def test_ctrl_c_and_sigterm_stop_a_running_sql_query_within_a_second(cli, workspace, signum):
    import signal
    import threading
    import time

    from personavec.errors import Terminated

    def terminate(n, frame):  # what personavec.cli.main installs
        raise Terminated(f"terminated by signal {n}")

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        sent = _signal_once_the_query_runs(getattr(signal, signum))
        res = cli.invoke(app, ["sql", _SLOW, "-w", str(workspace.root), "--timeout", "0"])
        stopped = time.monotonic()
    finally:
        signal.signal(signal.SIGTERM, old)
    assert res.exit_code == (130 if signum == "SIGINT" else 143), res.output
    assert "Traceback" not in res.output and "interrupted" in res.output
    assert stopped - sent["at"] < 1.5
    assert not any(t.name == "personavec-sql" and t.is_alive() for t in threading.enumerate())


def test_sql_time_and_memory_limits_and_bad_limits(cli, workspace):
    w = ["-w", str(workspace.root)]
    res = cli.invoke(app, ["sql", _SLOW, *w, "--timeout", "0.5"])
    _one_line_error(res, 1, "SQL stopped after the time limit of 0.5 s", "--timeout")
    res = cli.invoke(app, ["sql", "SELECT len(list(i)) FROM range(20000000) t(i)", *w, "--memory-limit", "10MB"])
    _one_line_error(res, 1, "more than the memory limit", "--memory-limit")
    assert "Possible solutions" not in res.output
    for bad, needle in (
        (["--limit", "-1"], "--limit must be >= 0"),
        (["--timeout", "nan"], "--timeout must be"),
        (["--timeout", "-3"], "--timeout must be"),
        (["--memory-limit", "lots"], "--memory-limit must be"),
    ):
        _one_line_error(cli.invoke(app, ["sql", "SELECT 1", *w, *bad]), 2, needle)
    res = cli.invoke(app, ["sql", "SELECT 42 AS answer", *w, "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout) == [{"answer": 42}]


# ------------------------------------------------------------------------------------------------ endpoint answers


def _answers(ws) -> list[tuple]:
    with ws.catalog().session() as s:
        return s.connection().exec_driver_sql("SELECT text, finish_reason, model_reported FROM responses").fetchall()


def _gen_config(server, **kw):
    from personavec.generation.config import GenerateConfig

    base = {"personas": ("default",), "questions": (0, 1), "model": "fault-model", "base_url": server.base_url}
    return GenerateConfig(**{**base, "timeout_s": 10.0, **kw})


def test_a_30_mb_answer_is_stored_bounded_by_max_tokens_and_marked_truncated(workspace):
    from fault_server import FaultServer

    from personavec.generation.endpoint import MAX_BYTES_PER_TOKEN, TRUNCATED
    from personavec.generation.generate import run_generation

    huge = "é" + "word " * 6_000_000  # 30 MB for max_tokens 8
    with FaultServer(lambda *_: ("reply", huge, None)) as server:
        result = run_generation(workspace, _gen_config(server, max_tokens=8))
    assert result.answers == 2
    for text, finish, _ in _answers(workspace):
        assert len(text.encode()) <= 8 * MAX_BYTES_PER_TOKEN and huge.startswith(text) and finish == TRUNCATED
    workspace.close()
    assert workspace.catalog_path.stat().st_size < 20_000_000


def test_a_key_echoed_in_a_200_answer_is_redacted_in_every_stored_field(workspace, monkeypatch):
    from fault_server import FaultServer

    from personavec.generation.generate import run_generation

    monkeypatch.setenv("PV_TEST_KEY", "sk-secret-echo-123")
    with FaultServer(lambda *_: ("reply", "your key is sk-secret-echo-123, keep it", None)) as server:
        server.model = "model-sk-secret-echo-123"
        result = run_generation(workspace, _gen_config(server, api_key_env="PV_TEST_KEY"))
    assert result.answers == 2
    for text, _, model in _answers(workspace):
        assert text == "your key is <redacted>, keep it" and "sk-secret" not in (model or "")
    workspace.close()
    assert b"sk-secret-echo-123" not in b"".join(p.read_bytes() for p in workspace.root.glob("catalog.duckdb*"))


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_answers_longer_than_arrows_block_are_ingested(workspace, tmp_path, fmt):
    import csv

    from personavec import EVAL_QUESTIONS
    from personavec.ingest import IngestConfig, ingest
    from personavec.store.responses import answered_responses

    long = "a long answer. " * 150_000  # 2.1 MB in one row
    rows = [{"persona": "default", "question": EVAL_QUESTIONS[0], "text": long}]
    rows.append({"persona": "default", "question": EVAL_QUESTIONS[1], "text": "short"})
    path = tmp_path / f"r.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["persona", "question", "text"])
            writer.writeheader()
            writer.writerows(rows)
    result = ingest(workspace, IngestConfig("responses", path))
    texts = sorted(r.text for r in answered_responses(workspace.catalog(), result.run_id))
    assert texts == sorted([long, "short"])


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again on exit: connecting is refused


def test_an_endpoint_refusing_connections_fails_at_once_generate_and_judge(cli, workspace, responses_run):
    import time

    url = f"http://127.0.0.1:{_closed_port()}/v1"
    w = ["-w", str(workspace.root)]
    start = time.monotonic()
    res = cli.invoke(
        app, ["generate", *w, "--base-url", url, "--model", "m", "--persona", "default", "--question", "0"]
    )
    _one_line_error(res, 1, "refused the connection: nothing is listening there")
    res = cli.invoke(app, ["judge", str(responses_run), *w, "--base-url", url, "--model", "m", "--rubric", "coherence"])
    _one_line_error(res, 1, "refused the connection")
    assert time.monotonic() - start < 30  # was 7 retries of ~21 s each
    assert _runs(workspace, "generate") == []  # a fresh run stopped before any answer leaves nothing behind


# ------------------------------------------------------------------------------------------------ wrong results


def test_a_whitespace_only_answer_has_no_span_like_an_empty_one():
    from personavec.spans import conversation, render, render_many

    tok = template_tokenizer("chatml")
    blank = [conversation("You are a pirate.", "Hi?", text) for text in ("", " ", " \n\t ")]
    assert [render(tok, c).assistant_spans for c in blank] == [[(0, 0)]] * 3
    assert [r.assistant_spans for r in render_many(tok, [*blank, conversation("", "Hi?", "Arr")])][:3] == [[(0, 0)]] * 3


def test_flush_seconds_nan_is_refused_before_any_work(cli, workspace):
    before = len(_runs(workspace))
    for bad in (["--flush-seconds", "nan"], ["--flush-seconds", "0"], ["--flush-rows", "0"]):
        res = cli.invoke(app, ["extract", "--responses-run", "1", "-w", str(workspace.root), *bad])
        _one_line_error(res, 2, "--flush-")
    assert len(_runs(workspace)) == before


# ------------------------------------------------------------------------------------------------ papercuts


def test_serve_takes_w_and_refuses_a_bad_port_at_once(cli, workspace):
    import time

    start = time.monotonic()
    res = cli.invoke(app, ["serve", "-w", str(workspace.root), "--port", "-1"])
    _one_line_error(res, 2, "--port must be a TCP port 1..65535")
    assert time.monotonic() - start < 5


def test_ingest_of_a_device_says_what_it_is(cli, workspace):
    res = cli.invoke(app, ["ingest", "personas", "/dev/null", "-w", str(workspace.root)])
    _one_line_error(res, 2, "/dev/null: not a regular file")


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


def test_the_demo_reports_progress_while_a_step_runs():
    import time

    from personavec.demo import _ticking

    said: list[str] = []
    with _ticking(said.append, "answers", every_s=0.2) as progress:
        time.sleep(0.5)
        progress(type("P", (), {"answered": 3, "total": 8})())
        time.sleep(0.3)
    assert said[0].startswith("      ... answers: 0/?") and "answers: 3/8" in said[-1]


def test_names_no_installed_font_can_draw_are_named_in_the_report(workspace, make_extraction_run, tmp_path):
    from personavec import plots
    from personavec.report import ReportConfig, build_report

    ext = make_extraction_run(workspace, layers=(2, 5), d_model=16)
    run = compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id)).run_id
    with workspace.catalog().session() as s:  # a persona named in CJK and emoji (as ingest allows)
        s.connection().exec_driver_sql("UPDATE vectors SET group_key = '海賊 \U0001f3f4' WHERE group_key = 'ghost'")
    res = build_report(workspace, ReportConfig(run, out_dir=tmp_path / "r", layer=5))
    missing = plots.missing_glyphs(["海賊 \U0001f3f4"])
    if missing:  # on this machine: no CJK/emoji font
        assert len(res.notes) == 1 and "as boxes" in res.notes[0] and missing[0] in res.notes[0]
        assert "as boxes" in res.html.read_text(encoding="utf-8")
    assert res.pngs["similarity"].read_bytes()[:4] == b"\x89PNG"
