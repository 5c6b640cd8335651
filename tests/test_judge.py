"""Judge stage: score reading (logprobs, parsing, refusals), rubrics, filters, and runs against real local servers:
the fault server (logprobs, bad outputs, refused parameters, kill -9) and `transformers serve` on the embedded model."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import signal
import sys
import traceback

import numpy as np
import pytest
import sqlalchemy as sa
from checks import one_line_error, runs_of
from fault_server import FaultServer, first_token_logprobs, sigkill_once_answered

from personavec.cli import app
from personavec.config import config_from_dict
from personavec.errors import (
    ConfigError,
    EndpointError,
    InputFileError,
    RunInterrupted,
    RunNotFoundError,
    Terminated,
)
from personavec.ingest import IngestConfig, ingest
from personavec.judging.judge import JudgeConfig, run_judge
from personavec.judging.rubrics import BUILTIN_RUBRICS, Rubric, read_rubric_file, resolve_rubric
from personavec.judging.scores import integer_verdict, parse_filter, score_answer
from personavec.store.runs import list_runs
from personavec.workspace import Workspace

COHERENCE, ROLE = BUILTIN_RUBRICS["coherence"], BUILTIN_RUBRICS["role_adherence"]


def judgements(ws: Workspace, run_id: int | None = None) -> list[dict]:
    with ws.catalog().session() as s:
        q = "SELECT * FROM judgements" + (" WHERE run_id = :r" if run_id is not None else "") + " ORDER BY id"
        return [dict(r._mapping) for r in s.execute(sa.text(q), {"r": run_id})]


def judge_runs(ws: Workspace) -> list[dict]:
    with ws.catalog().session() as s:
        return [dict(r._mapping) for r in s.execute(sa.text("SELECT * FROM runs WHERE kind = 'judge' ORDER BY id"))]


def assert_exactly_once(ws: Workspace, run_id: int, n: int) -> list[dict]:
    got = judgements(ws, run_id)
    keys = [(r["response_id"], r["rubric"]) for r in got]
    assert len(keys) == len(set(keys)) == n
    assert all(r["raw_output"] is not None for r in got)
    return got


def cfg(server: FaultServer, run: int, rubrics=("coherence",), **kw) -> JudgeConfig:
    return JudgeConfig(run, rubrics, model="fault-model", base_url=server.base_url, timeout_s=5.0, **kw)


def prompt_of(body: dict) -> str:
    return body["messages"][-1]["content"]


def answer_in(body: dict) -> str:
    return re.search(r"\[ANSWER START\]\n(.*)\n\[ANSWER END\]", prompt_of(body), re.S).group(1)


# ------------------------------------------------------------------------------------------------ reading scores


def test_logprob_score_is_the_expected_value_over_the_scales_integers():
    lp = first_token_logprobs({"80": 0.5, "90": 0.3, " 70": 0.1, "REF": 0.05, "101": 0.05})
    s = score_answer("80", lp, COHERENCE)
    # 101 is off the 0-100 scale; " 70" counts as 70: (80*.5 + 90*.3 + 70*.1) / .9
    assert s.method == "logprobs" and s.error is None
    assert s.score == pytest.approx((80 * 0.5 + 90 * 0.3 + 70 * 0.1) / 0.9)
    assert s.numeric_mass == pytest.approx(0.9) and s.top_logprobs["80"] == pytest.approx(0.5)
    role = score_answer("3", first_token_logprobs({"3": 0.75, "2": 0.25}), ROLE)
    assert role.score == pytest.approx(2.75)


def test_low_numeric_mass_is_a_refusal_not_a_score():
    lp = first_token_logprobs({"REF": 0.7, "I": 0.1, "50": 0.2})
    s = score_answer("REFUSAL", lp, COHERENCE)
    assert s.score is None and s.method == "logprobs" and s.numeric_mass == pytest.approx(0.2)
    assert "0.200 < 0.25" in s.error and "'REF'" in s.error
    assert score_answer("50", lp, COHERENCE, min_mass=0.1).score == pytest.approx(50)


def test_a_number_split_over_tokens_is_parsed_not_averaged():
    # A digit-wise tokenizer writes 85 as "8", "5": the first token's alternatives are not the scale's integers.
    lp = first_token_logprobs({"8": 0.6, "9": 0.4})
    s = score_answer("85", lp, COHERENCE)
    assert (s.score, s.method) == (85.0, "parsed")


@pytest.mark.parametrize(
    ("text", "score", "error"),
    [
        ("85", 85.0, None),
        ("Score: 72/100.", 72.0, None),
        ("  3\n", 3.0, None),
        ("I cannot rate this answer.", None, "holds no number"),
        ("150", None, "outside the scale 0..100"),
        ("", None, "holds no number"),
    ],
)
def test_parsed_scores(text, score, error):
    s = score_answer(text, None, COHERENCE)
    assert s.score == score and s.method == "parsed"
    assert (s.error is None) if error is None else (error in s.error)


def test_score_modes():
    lp = first_token_logprobs({"40": 0.5, "60": 0.5})
    assert score_answer("40", lp, COHERENCE, mode="parse").score == 40.0  # logprobs ignored
    assert "no logprobs" in score_answer("40", None, COHERENCE, mode="logprobs").error
    assert score_answer("40", lp, COHERENCE, mode="logprobs").score == pytest.approx(50.0)


# ------------------------------------------------------------------------------------------------ rubrics, filters


def test_rubric_slots_and_files(tmp_path):
    r = Rubric("tone", "{persona_name} ({persona}) asked {question}: {answer} -> {json: {x}}", 0, 10)
    out = r.render(question="Q?", answer="A.", persona="You are X.", persona_name="x")
    assert out == "x (You are X.) asked Q?: A. -> {json: {x}}"  # other braces are left alone
    with pytest.raises(ConfigError, match="answer"):
        Rubric("bad", "no slot here")
    with pytest.raises(ConfigError, match="name"):
        Rubric("has space", "{answer}")
    f = tmp_path / "formality.yaml"
    f.write_text("prompt: 'Rate 0-10 how formal this is: {answer}'\nscale: [0, 10]\n")
    fr = read_rubric_file(f)
    assert (fr.name, fr.min_score, fr.max_score) == ("formality", 0, 10) and fr.source == str(f.resolve())
    assert resolve_rubric(str(f)) == fr and resolve_rubric("coherence") is COHERENCE
    pirate = resolve_rubric("pirate")  # a built-in trait gives its 0-100 rubric
    assert pirate.name == "pirate" and pirate.scale == "0-100" and "{answer}" in pirate.template
    (tmp_path / "bad.yaml").write_text("prompt: 'no answer slot'\n")
    with pytest.raises(InputFileError, match=r"bad.yaml.*answer"):
        read_rubric_file(tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="unknown rubric 'nope'.*role_adherence.*pirate"):
        resolve_rubric("nope")


def test_filters_parse():
    f = parse_filter("role_adherence = 3")
    assert (f.rubric, f.op, f.value, f.group) == ("role_adherence", "=", 3.0, None)
    g = parse_filter("trait:pos : pirate>=50.5")
    assert (g.group, g.rubric, g.op, g.value) == ("trait:pos", "pirate", ">=", 50.5) and str(
        g
    ) == "trait:pos: pirate >= 50.5"
    assert parse_filter("x == 1").op == "=" and parse_filter("x <> 1").op == "!="

    assert parse_filter("c >= 50").keep(np.array([49.0, 50.0, np.nan])).tolist() == [False, True, False]
    for bad in ("coherence", "coherence >= high", "3 = 3", "coherence ~ 3", "x in ()", "x in 2, 3", "x = 2.5"):
        with pytest.raises(ConfigError, match="cannot read the filter"):
            parse_filter(bad)
    # =, != and in compare integer verdicts; order operators compare scores
    both = parse_filter("pos: role_adherence IN (2, 3)")
    assert (both.group, both.op, both.values, both.on_verdict) == ("pos", "in", (2.0, 3.0), True)
    assert str(both) == "pos: role_adherence in (2, 3)" and not parse_filter("c >= 2").on_verdict
    assert both.keep(np.array([1.0, 2.0, 3.0, np.nan])).tolist() == [False, True, True, False]
    assert parse_filter("r != 3").keep(np.array([3.0, 1.0, np.nan])).tolist() == [False, True, False]


def test_integer_verdict_is_the_scales_likeliest_integer():
    assert integer_verdict(2.99996, "logprobs", {"3": 0.99996, "2": 0.00004}, 0, 3) == 3.0
    # the expectation 2.05 would round to 2; the judge writes 3 (its likeliest token)
    assert integer_verdict(2.05, "logprobs", {"3": 0.45, "2": 0.35, "0": 0.2}, 0, 3) == 3.0
    # tokens of one integer add up (" 2" + "2" = 0.5 > 0.45); off-scale and non-numeric tokens do not count
    assert integer_verdict(2.3, "logprobs", {"3": 0.45, "2": 0.3, " 2": 0.2, "4": 0.9, "REF": 0.9}, 0, 3) == 2.0
    assert integer_verdict(2.5, "logprobs", {"3": 0.5, "2": 0.5}, 0, 3) == 2.0  # a tie goes to the smaller
    assert integer_verdict(72.0, "parsed", None, 0, 100) == 72.0  # a parsed score is what the judge wrote
    assert integer_verdict(2.0, "logprobs", {"REF": 1.0}, 0, 3) == 2.0  # no integer alternative kept: the score


def test_config_validation_and_stored_roundtrip():
    c = JudgeConfig(3, ("coherence", "role_adherence"), model="m", base_url="http://127.0.0.1:1/v1")
    stored = json.loads(json.dumps(dataclasses.asdict(c)))
    assert stored["rubrics"][1]["template"].startswith("You are grading")  # prompts are kept in provenance
    assert config_from_dict(JudgeConfig, stored) == c
    for kw in ({"score_mode": "vibes"}, {"top_logprobs": 21}, {"min_numeric_mass": 0}, {"temperature": 3.0}):
        with pytest.raises(ConfigError):
            JudgeConfig(3, **kw)
    with pytest.raises(ConfigError, match="share a name"):
        JudgeConfig(3, ("coherence", "coherence"))
    with pytest.raises(ConfigError, match=r"judge run 7 .*rubrics"):
        JudgeConfig.resumed(7, stored, rubrics=("coherence",))


# ------------------------------------------------------------------------------------------- against the fault server


def scripted(attempt, n, body):
    """Coherence: 80/90 evenly; role adherence: mostly 3."""
    if "coherent" in prompt_of(body):
        return ("reply", "80", first_token_logprobs({"80": 0.5, "90": 0.5}))
    return ("reply", "3", first_token_logprobs({"3": 0.8, "2": 0.2}))


@pytest.mark.slow
def test_judge_scores_land_with_logprobs_and_provenance(workspace, responses_run):
    with FaultServer(scripted) as server:
        seen = []
        result = run_judge(workspace, cfg(server, responses_run, ("coherence", "role_adherence")), progress=seen.append)
        bodies = list(server.bodies)
    assert (result.status, result.total, result.scored, result.unscored, result.failures) == ("done", 30, 30, 0, 0)
    assert result.logprobs and seen[-1].scored == 30
    got = assert_exactly_once(workspace, result.run_id, 30)
    coh = [r for r in got if r["rubric"] == "coherence"]
    assert all(r["score"] == pytest.approx(85.0) and r["method"] == "logprobs" for r in coh)
    role = [r for r in got if r["rubric"] == "role_adherence"]
    assert all(r["score"] == pytest.approx(2.8) and r["numeric_mass"] == pytest.approx(1.0) for r in role)
    assert all(r["model_reported"] == "fault-model" and r["latency_s"] > 0 and r["attempts"] == 1 for r in got)
    assert json.loads(got[0]["top_logprobs"]) in ({"80": 0.5, "90": 0.5}, {"3": 0.8, "2": 0.2})
    # One user message per pair, temperature 0, first-token logprobs asked for; the prompt holds the answer.
    body = bodies[0]
    assert [m["role"] for m in body["messages"]] == ["user"]
    assert (body["temperature"], body["logprobs"], body["top_logprobs"], body["model"]) == (
        0.0,
        True,
        20,
        "fault-model",
    )
    answers = {answer_in(b) for b in bodies}
    assert len(answers) == 15 and all(" answers question " in a for a in answers)
    with workspace.catalog().session() as s:
        detail = s.execute(sa.text("SELECT * FROM judge_runs")).one()._mapping
        run = s.execute(sa.text("SELECT config, status FROM runs WHERE id = :r"), {"r": result.run_id}).one()
    assert detail["responses_run_id"] == responses_run and list(detail["rubrics"]) == ["coherence", "role_adherence"]
    stored = json.loads(run[0])
    assert run[1] == "done" and stored["model"] == "fault-model" and "{answer}" in stored["rubrics"][0]["template"]


@pytest.mark.slow
def test_unparsable_judge_outputs_are_errors_not_scores(workspace, responses_run):
    outputs = [
        ("I refuse to grade this.", None),  # no number
        ("REFUSAL", first_token_logprobs({"REF": 0.9, "50": 0.1})),  # refusal: numeric mass 0.1
        ("150", None),  # off the scale
        ("<html>oops</html>", None),
        ("75", None),  # fine
    ]

    def script(attempt, n, body):
        i = int(answer_in(body).rsplit("question ", 1)[1][0])  # question 0..2 of each persona
        persona = answer_in(body).split(" ", 1)[0]
        return ("reply", *outputs[(i + len(persona)) % len(outputs)])

    with FaultServer(script) as server:
        result = run_judge(workspace, cfg(server, responses_run))
        again = run_judge(workspace, None, resume=result.run_id)
        assert server.requests == 15  # unscored answers are judgements: resume does not ask them again
    assert result.status == "done" and result.scored + result.unscored == 15 and result.unscored > 0
    assert again.requested == 0
    got = assert_exactly_once(workspace, result.run_id, 15)
    for r in got:
        assert (r["score"] is None) == (r["error"] is not None)
        if r["score"] is not None:
            assert r["score"] == 75.0 and r["raw_output"] == "75"
    errors = {r["raw_output"]: r["error"] for r in got if r["score"] is None}
    assert "holds no number" in errors["I refuse to grade this."]
    assert "0.100 < 0.25" in errors["REFUSAL"] and "outside the scale" in errors["150"]
    # `personavec runs`: the judge answered all 15 (none failed); its detail says how many of them hold a score
    [summary] = list_runs(workspace.catalog(), "judge")
    assert (summary.items, summary.failed) == (15, 0) and summary.detail.endswith(f", {result.scored} scored")


@pytest.mark.slow
def test_a_judge_answer_cut_to_the_size_bound_is_marked_truncated(workspace, responses_run):
    """A judge answering far more than ``max_tokens`` asks is stored cut to the bound and marked ``truncated``; its
    score is read from what was kept (the first token's logprobs); answers within the bound are not marked."""
    from personavec.generation.endpoint import MAX_BYTES_PER_TOKEN

    def script(attempt, n, body):
        long = int(answer_in(body).rsplit("question ", 1)[1][0]) == 0  # question 0 of each persona
        return ("reply", "85" + " and more" * 200_000 if long else "85", first_token_logprobs({"85": 1.0}))

    config = cfg(server := FaultServer(script), responses_run)
    with server:
        result = run_judge(workspace, config)
    assert (result.status, result.scored) == ("done", 15)
    got = assert_exactly_once(workspace, result.run_id, 15)
    cut = [r for r in got if r["truncated"]]
    assert len(cut) == 5 and all(r["truncated"] is False for r in got if r not in cut)
    bound = config.max_tokens * MAX_BYTES_PER_TOKEN
    assert all(len(r["raw_output"].encode()) <= bound and r["raw_output"].startswith("85 and more") for r in cut)
    assert all(r["score"] == pytest.approx(85.0) and r["error"] is None for r in got)


@pytest.mark.slow
def test_endpoint_refusing_logprobs_falls_back_to_parsing(workspace, responses_run):
    def script(attempt, n, body):
        if "logprobs" in body:
            return ("status", 400, {}, {"error": {"message": "logprobs is not supported by this server"}})
        return ("reply", "42", None)

    with FaultServer(script) as server:
        result = run_judge(workspace, cfg(server, responses_run))
        assert server.requests == 16  # the first pair twice (refused, then without logprobs), then each once
        assert all("logprobs" not in b for b in server.bodies[1:])
    assert result.status == "done" and not result.logprobs and result.scored == 15
    assert {(r["score"], r["method"]) for r in judgements(workspace)} == {(42.0, "parsed")}


def test_endpoint_errors_stop_the_run_as_in_generation(workspace, responses_run):
    with FaultServer(lambda *_: ("status", 404, {}, {"error": {"message": "no such model"}})) as server:
        with pytest.raises(EndpointError, match="HTTP 404"):
            run_judge(workspace, cfg(server, responses_run))
    assert [r["status"] for r in judge_runs(workspace)] == ["failed"]  # kept as failed, as docs/judge.md says
    with FaultServer() as server, pytest.raises(RunNotFoundError, match="kind 'ingest-personas'"):
        run_judge(workspace, cfg(server, 1))  # run 1 is the built-in persona set's ingest run


@pytest.mark.slow
def test_failed_requests_are_recorded_then_asked_again_on_resume(workspace, responses_run):
    bad = {"on": True}

    def script(attempt, n, body):
        return ("status", 503, {}, {"error": {"message": "overloaded"}}) if bad["on"] else ("reply", "60", None)

    with FaultServer(script) as server:
        first = run_judge(workspace, cfg(server, responses_run, max_retries=0, concurrency=4))
        assert first.status == "failed" and first.failures == 15 and "--resume" in first.error
        assert all(r["raw_output"] is None and "503" in r["error"] for r in judgements(workspace))
        bad["on"] = False
        second = run_judge(workspace, None, resume=first.run_id)
    assert second.status == "done" and second.scored == 15 and second.requested == 15
    got = assert_exactly_once(workspace, first.run_id, 15)
    assert all(r["score"] == 60.0 and r["error"] is None and r["attempts"] == 2 for r in got)
    assert judge_runs(workspace)[0]["status"] == "done"


@pytest.mark.slow
def test_cli_judge_json_resume_and_list(workspace, responses_run, cli):
    with FaultServer(scripted) as server:
        args = ["judge", str(responses_run), "-w", str(workspace.root), "--model", "fault-model"]
        args += ["--base-url", server.base_url, "--rubric", "role_adherence", "--json"]
        res = cli.invoke(app, args)
        assert res.exit_code == 0, res.output
        out = json.loads(res.stdout.strip().splitlines()[-1])
        assert (out["scored"], out["failures"], out["status"]) == (15, 0, "done")
        res = cli.invoke(app, ["judge", "-w", str(workspace.root), "--resume", str(out["run_id"]), "--json"])
        assert res.exit_code == 0, res.output
        assert json.loads(res.stdout.strip().splitlines()[-1])["requested"] == 0
        res = cli.invoke(app, ["judge", "-w", str(workspace.root), "--resume", str(out["run_id"]), "-r", "coherence"])
        assert res.exit_code == 2 and "rubrics" in res.output
        assert server.requests == 15
    res = cli.invoke(app, ["judge", "-w", str(workspace.root), "--rubric", "coherence"])
    assert res.exit_code == 2 and "name the responses run" in res.output
    # a judge that is not there: one line, and no failed run left behind (as generate)
    from personavec.serve import free_port

    judges = len(runs_of(workspace, "judge"))
    refused = ["--base-url", f"http://127.0.0.1:{free_port()}/v1", "--model", "m"]
    res = cli.invoke(app, ["judge", str(responses_run), "-w", str(workspace.root), *refused])
    one_line_error(res, 1, "refused the connection: nothing is listening there")
    assert len(runs_of(workspace, "judge")) == judges
    res = cli.invoke(app, ["rubrics", "--json"])
    assert {"name": "role_adherence", "scale": "0-3", "kind": "rubric"} in json.loads(res.stdout)
    res = cli.invoke(app, ["runs", "-w", str(workspace.root)])
    assert res.exit_code == 0 and "judge" in res.output


def test_sigterm_mid_judge_marks_the_run_interrupted_and_names_the_resume(workspace, responses_run):
    """SIGTERM (raised as ``Terminated``, as ``personavec.cli.main`` does) while judges answer: the run is marked
    interrupted by SIGTERM, what was judged stays, and the error names the resume command (the CLI prints it). The
    signal stops the event loop's main task, and ``Terminated`` is raised once the loop has closed: it used to be
    raised inside whichever task the loop was stepping, which asyncio then reported as "Task exception was never
    retrieved"."""

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signum}")

    def script(attempt: int, n: int, body: dict):
        if n == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        return ("reply", "70", None)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        with FaultServer(script) as server, pytest.raises(RunInterrupted) as stopped:
            run_judge(workspace, cfg(server, responses_run, ("coherence",), concurrency=1, score_mode="parse"))
    finally:
        signal.signal(signal.SIGTERM, previous)
    [run] = judge_runs(workspace)
    assert (run["status"], run["error"]) == ("interrupted", "terminated (SIGTERM)")
    assert stopped.value.resume_command == f"personavec judge --resume {run['id']}"
    assert 1 <= len(judgements(workspace, run["id"])) < 15
    terminated = stopped.value.__cause__
    assert isinstance(terminated, Terminated)
    assert not [f for f in traceback.extract_tb(terminated.__traceback__) if "asyncio" in f.filename]


@pytest.mark.slow
def test_sigkill_mid_judge_then_resume_judges_every_pair_once(workspace, responses_run, cli):
    n_pairs = 15
    with FaultServer(lambda a, n, b: ("slow", 0.25)) as server:
        cmd = [sys.executable, "-c", "from personavec.cli import main; main()", "judge", str(responses_run)]
        cmd += ["-w", str(workspace.root), "--model", "fault-model", "--base-url", server.base_url]
        cmd += ["--concurrency", "2", "--rubric", "coherence", "--score-mode", "parse", "--json"]
        sigkill_once_answered(cmd, server)
        [run] = judge_runs(workspace)
        assert run["status"] == "running"  # killed: nobody could mark it
        landed = len(judgements(workspace, run["id"]))
        assert 1 <= landed < n_pairs  # committed as they arrived, not at the end
        before = server.requests
        res = cli.invoke(app, ["judge", "-w", str(workspace.root), "--resume", str(run["id"]), "--json"])
        assert res.exit_code == 0, res.output
        assert server.requests - before == n_pairs - landed  # only the missing pairs were asked
    got = assert_exactly_once(workspace, run["id"], n_pairs)
    # the fault server's default answer ("[...] answer to: ...") holds no number: recorded as errors, not scores
    assert all(r["score"] is None and "no number" in r["error"] for r in got)
    assert judge_runs(workspace)[0]["status"] == "done"


def _judge_args(ws, server, run: int) -> list[str]:
    return ["judge", str(run), "-w", str(ws.root), "--model", "fault-model", "--base-url", server.base_url]


@pytest.mark.slow
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
    one_line_error(res, 1, "HTTP 401")
    (run,) = runs_of(workspace, "judge")
    assert run.status == "failed"


# ------------------------------------------------------------------------------------------------ a real server


@pytest.mark.slow
@pytest.mark.xdist_group("embedded")
def test_judge_against_transformers_serve(workspace, tmp_path, embedded_server):
    from personavec.serve import EMBEDDED_MODEL

    path = tmp_path / "two.jsonl"
    rows = [
        {"persona": "jester", "question": "What is the capital of France?", "text": "Paris, of course! Ha ha!"},
        {"persona": "default", "question": "What is the capital of France?", "text": "The capital of France is Paris."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    from personavec.builtin import EVAL_QUESTIONS

    if rows[0]["question"] not in EVAL_QUESTIONS:  # answer a built-in question so the sets resolve
        for r in rows:
            r["question"] = EVAL_QUESTIONS[0]
        path.write_text("\n".join(json.dumps(r) for r in rows))
    run = ingest(workspace, IngestConfig("responses", path)).run_id
    server = embedded_server
    config = JudgeConfig(
        run, ("role_adherence", "coherence"), model=server.model, base_url=server.base_url, concurrency=2
    )
    result = run_judge(workspace, config)
    got = assert_exactly_once(workspace, result.run_id, 4)
    assert result.status == "done" and result.scored + result.unscored == 4
    for r in got:
        assert r["model_reported"] == EMBEDDED_MODEL and r["latency_s"] > 0 and r["raw_output"] is not None
        assert (r["score"] is None) == (r["error"] is not None)
        if r["score"] is not None:  # transformers serve ignores logprobs: the number is parsed from the answer
            assert r["method"] == "parsed" and math.isfinite(r["score"])
