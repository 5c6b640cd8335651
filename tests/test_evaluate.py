"""The evaluate stage: its statistics (known answers), its config and CLI errors, and a whole evaluation on the
embedded model, judged by the embedded model served locally (scores are noisy: the test checks structure, storage,
resume, and that every stored figure is what the catalog's judgements and projections give)."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import sqlalchemy as sa
from checks import runs_of
from tiny_models import embedded_dtype

from personavec.cli import app
from personavec.errors import ConfigError
from personavec.steering.evaluate import (
    EvaluateConfig,
    choose_operating_point,
    mean_interval,
    pearson_r,
    run_evaluation,
    t_quantile,
    wilson_interval,
)
from personavec.steering.interventions import SteeringConfig
from personavec.store.evaluations import Figure, get_evaluation

# ------------------------------------------------------------------------------------------------ statistics


@pytest.mark.parametrize(
    ("p", "df", "expected"),
    [(0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 10, 2.2281), (0.975, 30, 2.0423), (0.95, 5, 2.0150)],
)
def test_t_quantile_matches_the_tables(p, df, expected):
    assert t_quantile(p, df) == pytest.approx(expected, abs=2e-4)


def test_mean_and_rate_intervals():
    mean, lo, hi = mean_interval([10.0, 20.0, 30.0, 40.0])
    half = 3.1824 * np.std([10, 20, 30, 40], ddof=1) / 2  # t(0.975, 3) * s / sqrt(4)
    assert mean == 25.0 and lo == pytest.approx(25 - half, abs=1e-3) and hi == pytest.approx(25 + half, abs=1e-3)
    assert mean_interval([7.0]) == (7.0, None, None) and mean_interval([]) == (None, None, None)
    rate, lo, hi = wilson_interval(5, 10)
    assert rate == 0.5 and lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert wilson_interval(0, 10)[1] == pytest.approx(0.0, abs=1e-12) and wilson_interval(0, 0) == (None, None, None)
    assert pearson_r([1, 2, 3], [2, 4, 7]) == pytest.approx(np.corrcoef([1, 2, 3], [2, 4, 7])[0, 1])
    assert pearson_r([1, 2], [1, 2]) is None and pearson_r([1, 1, 1], [1, 2, 3]) is None


def _setting(run: int, coef: float, layer: int, trait: float | None, coherence: float | None) -> list[Figure]:
    where = {"responses_run_id": run, "coef": coef, "layer": layer}
    return [Figure("sweep", "trait", 3, trait, **where), Figure("sweep", "coherence", 3, coherence, **where)]


def test_operating_point_is_the_most_trait_among_coherent_settings():
    figures = (
        _setting(1, 0.0, 20, 10.0, 90.0)
        + _setting(2, 2.0, 20, 60.0, 55.0)
        + _setting(3, 4.0, 20, 95.0, 20.0)  # most trait, incoherent: not chosen
        + _setting(4, 2.0, 15, 60.0, 80.0)  # ties with run 2, same |coef|: the earlier run wins
        + _setting(5, -2.0, 15, None, 99.0)  # no trait score: not a candidate
        + [Figure("sweep", "trait", 1, 100.0, responses_run_id=6, persona="jester", coef=1.0, layer=20)]
    )
    op = choose_operating_point(figures, 50.0)
    assert (op.responses_run_id, op.coef, op.layer, op.trait, op.coherence) == (2, 2.0, 20, 60.0, 55.0)
    assert choose_operating_point(figures, 56.0).responses_run_id == 4
    assert choose_operating_point(figures, 99.5) is None


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({}, "nothing to evaluate"),
        ({"sweep": 1}, "--trait"),
        ({"sweep": 1, "trait": "pirate", "threshold": 150}, "threshold"),
        ({"cap": SteeringConfig("1:a-b", kind="add")}, "cap intervention"),
        ({"sweep": 1, "trait": "pirate", "score_mode": "guess"}, "score_mode"),
        ({"sweep": 1, "trait": "coherence"}, "share the name"),
    ],
)
def test_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        EvaluateConfig(**kw)


def test_config_roundtrips_through_the_run_row():
    from personavec.config import config_dict, config_from_dict

    config = EvaluateConfig(
        sweep=3, trait="sarcasm", trait_description="Mocking irony.", cap=SteeringConfig("2:-axis", kind="cap", tau=1)
    )
    assert config.trait.name == "sarcasm" and "Mocking irony." in config.trait.template  # the generic trait prompt
    assert EvaluateConfig(sweep=1, trait="pirate").trait.source.endswith("pirate.json")  # a built-in trait
    back = config_from_dict(EvaluateConfig, json.loads(json.dumps(config_dict(config))))
    assert back == config


def test_cli_bad_input_is_one_line_and_leaves_no_run(workspace, cli):
    def evaluate_runs() -> int:
        with workspace.catalog().session() as s:
            return s.execute(sa.text("SELECT count(*) FROM runs WHERE kind = 'evaluate'")).scalar()

    from personavec.serve import free_port, listening_socket

    root = str(workspace.root)
    before = len(runs_of(workspace))
    refused = ["--judge-base-url", f"http://127.0.0.1:{free_port()}/v1", "--judge-model", "m"]
    judge = listening_socket("127.0.0.1", 0)  # something listens: the judge is reachable
    there = ["--judge-base-url", f"http://127.0.0.1:{judge.getsockname()[1]}/v1", "--judge-model", "m"]
    cap = ["--cap-vector", "5:-axis", "--tau", "2", "--model", "m"]
    for args, code, text in [
        # a bad persona: refused before the jailbreak prompts are ingested as a question set
        ([*cap, "--persona", "nobody", *there], 2, "nobody"),
        ([], 2, "nothing to evaluate"),
        # a judge that is not there: nothing recorded, not even the jailbreak prompts' question set
        ([*cap, *refused], 1, "refused the connection"),
        (["7"], 2, "--trait"),
        (["7", "--trait", "pirate", "--rubric", "x.yaml"], 2, "not both"),
        (["7", "--trait", "pirate", "--judge-base-url", "http://127.0.0.1:9/v1"], 2, "sweep 7 does not exist"),
        (["--resume", "1"], 2, "expected: evaluate"),
    ]:
        res = cli.invoke(app, ["evaluate", "-w", root, *args])
        assert res.exit_code == code, res.output
        assert text in res.output and len(res.output.strip().splitlines()) == 1, res.output
    judge.close()
    workspace.close()
    assert evaluate_runs() == 0 and len(runs_of(workspace)) == before


# ------------------------------------------------------------------------------------------------ the whole loop


def _rows(ws, query: str, **params) -> list[tuple]:
    with ws.catalog().session() as s:
        return [tuple(r) for r in s.execute(sa.text(query), params)]


@pytest.mark.slow
@pytest.mark.xdist_group("embedded-loaded")
def test_evaluate_a_layer_sweep_and_a_cap_then_resume(workspace, tmp_path, steering_server, embedded_loaded):
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.generation.config import GenerateConfig, LocalOptions
    from personavec.generation.local import run_sweep
    from personavec.ingest import IngestConfig, ingest
    from personavec.serve import EMBEDDED_MODEL
    from personavec.vectors import VectorConfig, compute_vectors

    ws, loaded = workspace, embedded_loaded
    dtype = embedded_dtype()  # as embedded_loaded was loaded
    # vectors of the embedded model at layers 18 and 20 from four short answers (two personas)
    path = tmp_path / "answers.jsonl"
    from personavec.builtin import EVAL_QUESTIONS

    rows = [
        {"persona": "jester", "question": EVAL_QUESTIONS[0], "text": "Ha! Juggle your worries, friend, and laugh!"},
        {"persona": "jester", "question": EVAL_QUESTIONS[1], "text": "Knowledge is a joke that wisdom gets. Ha!"},
        {"persona": "default", "question": EVAL_QUESTIONS[0], "text": "Set clear goals and take small steps."},
        {"persona": "default", "question": EVAL_QUESTIONS[1], "text": "Knowledge is facts; wisdom is using them."},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    answers_run = ingest(ws, IngestConfig("responses", path, model=EMBEDDED_MODEL)).run_id
    ext = run_extraction(
        ws, ExtractConfig(responses_run=answers_run, model=EMBEDDED_MODEL, layers=(18, 20)), loaded=loaded
    )
    vrun = compute_vectors(ws, VectorConfig(extraction_run_id=ext.run_id)).run_id
    gen = GenerateConfig(
        engine="local",
        model=EMBEDDED_MODEL,
        personas=("default",),
        questions=(0, 1),
        max_tokens=8,
        temperature=0.0,
        local=LocalOptions(device="cpu", dtype=dtype, batch_size=4),
        steering=SteeringConfig(f"{vrun}:jester-default"),
    )
    sweep = run_sweep(ws, gen, [0.0, 4.0], layers=[18, 20], loaded=loaded)
    assert [r.layers for r in get_sweep_runs(ws, sweep.sweep_id)] == [(18,), (18,), (20,), (20,)]

    server = steering_server
    config = EvaluateConfig(
        sweep=sweep.sweep_id,
        trait="jester",
        trait_description="Jokes, laughter and playful mockery.",
        judge_model=server.model,
        judge_base_url=server.base_url,
        judge_concurrency=2,
        judge_timeout_s=300.0,
        cap=SteeringConfig(f"{vrun}:jester-default", kind="cap", layers=(20,), tau=(0.0,)),
        cap_questions=(0,),
        max_tokens=8,
        device="cpu",
        dtype=dtype,
    )
    seen: list = []

    def stop_once_judgements_land(p) -> None:  # the member runs are judged together: stop at the first that lands
        seen.append(p)
        if p.step == "judge" and p.detail.new >= 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_evaluation(ws, config, progress=stop_once_judgements_land, loaded=loaded)
    run_id = seen[0].run_id
    info = get_evaluation(ws.catalog(), run_id)
    assert info.run.status == "interrupted" and info.figures == ()
    judged_before = {m.responses_run_id: m.judge_run_id for m in info.members if m.judge_run_id is not None}
    assert len(judged_before) == len(info.members) == 6  # every member's judge run opened first, then asked together
    status = _rows(ws, "SELECT status, count(*) FROM runs WHERE kind = 'judge' GROUP BY status")
    assert dict(status).get("interrupted", 0) >= 1 and set(dict(status)) <= {"interrupted", "done"}, status
    caps_before = {m.role: m.responses_run_id for m in info.members if m.role != "sweep"}
    assert set(caps_before) == {"uncapped", "capped"}  # the cap answers came first and are kept

    res = run_evaluation(ws, None, resume=run_id, loaded=loaded)
    info = get_evaluation(ws.catalog(), run_id)
    assert res.status == "done" and info.run.status == "done"
    # the resume reused every run it had started: no second judge or generate run for the same answers
    assert {m.responses_run_id: m.judge_run_id for m in info.members if m.responses_run_id in judged_before} == (
        judged_before
    )
    assert {m.role: m.responses_run_id for m in info.members if m.role != "sweep"} == caps_before
    assert len(info.members) == 6 and all(m.judge_run_id is not None for m in info.members)
    assert _rows(ws, "SELECT count(*) FROM runs WHERE kind = 'judge'") == [(6,)]
    assert _rows(ws, "SELECT count(*) FROM runs WHERE kind = 'evaluate'") == [(1,)]
    for m in info.members:  # every answer judged exactly once per rubric
        n_answers = _rows(ws, "SELECT count(*) FROM responses WHERE run_id = :r", r=m.responses_run_id)[0][0]
        per = _rows(ws, "SELECT rubric, count(*) FROM judgements WHERE run_id = :j GROUP BY rubric", j=m.judge_run_id)
        rubrics = {"jester", "coherence"} if m.role == "sweep" else {"harmful", "coherence"}
        assert dict(per) == dict.fromkeys(rubrics, n_answers)

    # every stored figure is what the judgements give
    figures = info.figures
    for f in figures:
        if f.part == "correlation":
            continue
        member = next(m for m in info.members if m.responses_run_id == f.responses_run_id)
        rubric = {"trait": "jester", "coherence": "coherence", "harmful_rate": "harmful"}[f.metric]
        scores = [
            r[0]
            for r in _rows(
                ws,
                "SELECT j.score FROM judgements j JOIN responses r ON r.id = j.response_id JOIN personas p "
                "ON p.id = r.persona_id WHERE j.run_id = :j AND j.rubric = :rubric AND j.score IS NOT NULL "
                "AND (CAST(:persona AS VARCHAR) IS NULL OR p.name = :persona)",
                j=member.judge_run_id,
                rubric=rubric,
                persona=f.persona,
            )
        ]
        assert f.n == len(scores)
        if f.metric == "harmful_rate":
            expected = wilson_interval(sum(s >= 50 for s in scores), len(scores))
        else:
            expected = mean_interval(scores)
        for got, want in zip((f.value, f.lo, f.hi), expected, strict=True):
            assert (got is None) == (want is None) and (got is None or got == pytest.approx(want))
        if f.lo is not None:
            assert f.lo <= f.value <= f.hi
    sweep_rows = [f for f in figures if f.part == "sweep" and f.persona is None]
    assert sorted({(f.layer, f.coef) for f in sweep_rows}) == [(18, 0.0), (18, 4.0), (20, 0.0), (20, 4.0)]
    assert {f.setting for f in figures if f.part == "capping"} == {"uncapped", "capped"}

    # the correlation, recomputed from the stored projections and the judged trait scores
    pairs = _rows(
        ws,
        "SELECT a.layer, a.projection, j.score FROM evaluation_answers a JOIN evaluation_members m "
        "ON m.run_id = a.run_id JOIN judgements j ON j.run_id = m.judge_run_id AND j.response_id = a.response_id "
        "WHERE a.run_id = :e AND j.rubric = 'jester' AND j.score IS NOT NULL",
        e=run_id,
    )
    assert _rows(ws, "SELECT count(*) FROM evaluation_answers WHERE run_id = :e", e=run_id) == [(8,)]
    for f in (f for f in figures if f.part == "correlation"):
        mine = [(p, s) for layer, p, s in pairs if layer == f.layer]
        assert f.n == len(mine)
        want = pearson_r([p for p, _ in mine], [s for _, s in mine])
        assert (f.value is None) == (want is None) and (want is None or f.value == pytest.approx(want))

    # the operating point is the rule applied to the stored figures, and is in the catalog
    assert info.operating_point == choose_operating_point(figures, 50.0)
    stored = _rows(ws, "SELECT op_responses_run_id, op_coef, op_layer FROM evaluation_runs WHERE run_id = :e", e=run_id)
    op = info.operating_point
    assert stored == [(op.responses_run_id, op.coef, op.layer) if op else (None, None, None)]

    page = res.report_html.read_text()
    assert "Operating point" in page and "Capping on jailbreak prompts" in page and page.count("<img") == 2
    assert (res.report_html.parent / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    assert (res.report_html.parent / "figures.csv").read_text().count("\n") == len(figures) + 1
    # the capped run carries its cap; the uncapped one has no intervention
    capped = _rows(ws, "SELECT kind, layers FROM run_interventions WHERE run_id = :r", r=caps_before["capped"])
    assert capped == [("cap", [20])]
    assert _rows(ws, "SELECT count(*) FROM run_interventions WHERE run_id = :r", r=caps_before["uncapped"]) == [(0,)]
    assert math.isfinite(res.wall_s)


def get_sweep_runs(ws, sweep_id: int):
    from personavec.store.steering import get_sweep

    return get_sweep(ws.catalog(), sweep_id).runs


def test_tradeoff_and_capping_figures_draw_missing_scores(tmp_path):
    """Unscored settings (None) are gaps, not errors; the operating point is starred on its line."""
    from personavec import plots

    series = [
        ("default @18", [(0.0, 20.0, 5.0, 90.0, 4.0), (4.0, None, None, 30.0, None)]),
        ("default @20", [(0.0, 25.0, None, 85.0, 3.0), (4.0, 70.0, 10.0, 60.0, 8.0)]),
    ]
    fig = plots.steering_tradeoff(series, threshold=50.0, operating_point=("default @20", 4.0), title="t")
    labels = [t.get_text() for ax in fig.axes for t in ax.get_legend().get_texts()]
    assert "operating point (c = 4)" in labels and "coherence threshold 50" in labels
    assert plots.save_png(fig, tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    bars = plots.capping_bars(
        [("uncapped", 0.5, 0.2, 0.8, 70.0, 60.0, 80.0), ("capped", None, None, None, 40.0, None, None)]
    )
    assert plots.save_png(bars, tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_member_runs_are_judged_together_within_one_limit_and_a_failing_one_stops_the_others(
    workspace, tiny8, vectors_run
):
    """Four sweep runs of two answers: their judge runs are opened first, then asked in one event loop. Requests of
    several runs are in flight at once (a run alone has at most 3: its probe, then 3 workers for its other 3), never
    more than ``judge_concurrency`` in all. A run whose endpoint refuses a request (400) fails and stops the others
    (interrupted, naming it); the resume, at another concurrency, reuses every run and judges each answer once."""
    import threading
    import time

    from fault_server import FaultServer, first_token_logprobs

    from personavec.errors import EndpointError
    from personavec.generation.config import GenerateConfig, LocalOptions
    from personavec.generation.local import run_sweep

    gen = GenerateConfig(
        engine="local", model=tiny8, personas=("default",), questions=(0, 1), max_tokens=4, temperature=0.0,
        local=LocalOptions(device="cpu", dtype="float32", batch_size=8),
        steering=SteeringConfig(f"{vectors_run}:storyteller-default", layers=(5,)),
    )  # fmt: skip
    sweep = run_sweep(workspace, gen, [0.0, 1.0, 2.0, 4.0]).sweep_id
    lock, flight = threading.Lock(), {"now": 0, "most": 0, "asked": 0}

    def judge(refuse_from: int | None):
        def script(attempt, n, body):
            with lock:
                flight["now"] += 1
                flight["most"] = max(flight["most"], flight["now"])
                flight["asked"] += 1
                refuse = refuse_from is not None and flight["asked"] > refuse_from
            time.sleep(0.15)  # a remote judge's latency: requests overlap
            with lock:
                flight["now"] -= 1
            if refuse:
                return ("status", 400, {}, {"error": {"message": "this judge refuses"}})
            return ("reply", "60", first_token_logprobs({"60": 0.8, "70": 0.2}))

        return script

    def config(server, concurrency: int) -> EvaluateConfig:
        return EvaluateConfig(
            sweep=sweep, trait="jester", trait_description="Jokes.", judge_model="j", judge_base_url=server.base_url,
            judge_concurrency=concurrency, projection=False,
        )  # fmt: skip

    with FaultServer(judge(refuse_from=10)) as server, pytest.raises(EndpointError, match="this judge refuses") as e:
        run_evaluation(workspace, config(server, 8))
    # the evaluation's resume, not the judge run's (`evaluate --resume JUDGE_RUN` is refused: a judge run)
    assert re.search(r"\[evaluate run \d+ stopped; resume with `personavec evaluate --resume \d+`\]$", str(e.value))
    assert "judge run" not in str(e.value)
    assert 4 <= flight["most"] <= 8, flight  # more than one run asked at once; the limit held
    evaluation = _rows(workspace, "SELECT max(id) FROM runs WHERE kind = 'evaluate'")[0][0]
    info = get_evaluation(workspace.catalog(), evaluation)
    assert info.run.status == "failed" and "personavec evaluate --resume" in info.run.error
    judge_runs = {m.judge_run_id for m in info.members}
    assert len(judge_runs) == 4 and None not in judge_runs
    rows = _rows(workspace, "SELECT id, status, error FROM runs WHERE kind = 'judge' ORDER BY id")
    failed = [r for r in rows if r[1] == "failed"]
    assert len(failed) >= 1 and all("this judge refuses" in r[2] for r in failed), rows
    stopped = [r for r in rows if r[1] == "interrupted"]
    assert all(re.fullmatch(r"stopped when judge run \d+ failed", r[2]) for r in stopped), rows
    assert {r[1] for r in rows} <= {"failed", "interrupted", "done"}

    flight.update(now=0, most=0, asked=0)
    with FaultServer(judge(refuse_from=None)) as server:
        res = run_evaluation(workspace, config(server, 2), resume=evaluation)
    assert res.status == "done" and flight["most"] <= 2
    assert set(res.judge_runs) == judge_runs  # every judge run resumed, none made again
    assert _rows(workspace, "SELECT count(*) FROM runs WHERE kind = 'judge'") == [(4,)]
    per = _rows(
        workspace,
        "SELECT j.run_id, j.rubric, count(*), count(DISTINCT j.response_id) FROM judgements j "
        "WHERE j.raw_output IS NOT NULL GROUP BY ALL",
    )
    assert len(per) == 8 and all(n == distinct == 2 for _, _, n, distinct in per)  # 4 runs x 2 rubrics x 2 answers
