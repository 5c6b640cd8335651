"""The demo end to end on the embedded model (small sizes): serve, generate, extract, vectors, report."""

from __future__ import annotations

import re

import pytest

from personavec.cli import app
from personavec.demo import DemoConfig, run_demo
from personavec.errors import ConfigError
from personavec.store.runs import list_runs
from personavec.store.steering import get_sweep
from personavec.vectors import load_vectors
from personavec.workspace import Workspace


def test_demo_config_validates():
    assert DemoConfig().personas[:4] == ("default", "default_assistant", "default_llm", "default_helpful")
    assert len(DemoConfig().personas) == 8
    with pytest.raises(ConfigError, match="n_personas"):
        DemoConfig(n_personas=4)
    with pytest.raises(ConfigError, match="n_questions"):
        DemoConfig(n_questions=1)


def test_the_demo_reports_progress_while_a_step_runs():
    import time

    from personavec.demo import _ticking

    said: list[str] = []
    with _ticking(said.append, "answers", every_s=0.2) as progress:
        time.sleep(0.5)
        progress(type("P", (), {"answered": 3, "total": 8})())
        time.sleep(0.3)
    assert said[0].startswith("      ... answers: 0/?") and "answers: 3/8" in said[-1]


@pytest.mark.slow
@pytest.mark.xdist_group("embedded-loaded")
def test_demo_runs_the_whole_pipeline(tmp_path, steering_server, cli):
    lines: list[str] = []
    res = run_demo(
        DemoConfig(
            workspace=tmp_path / "demo", n_personas=5, n_questions=2, max_tokens=12, steer_coefs=(0, 2), steer_tokens=8
        ),
        log=lines.append,
        server=steering_server,  # the session's shared server; `personavec demo` starting its own is the default
    )
    ws = Workspace.resolve(tmp_path / "demo")
    kinds = {r.kind: r for r in list_runs(ws.catalog())}
    vs = load_vectors(res.vectors_run_id, workspace=ws)
    assert {"generate", "extract", "vectors"} <= set(kinds)  # the last generate run is the sweep's
    assert all(kinds[k].status == "done" for k in ("generate", "extract", "vectors"))
    assert len(vs) == 5 and vs.d_model == 576 and vs.layer == 20
    html = res.report_html.read_text()
    assert html.count("<img") == 6  # 4 figures, the steering sweep's and its judged trade-off
    sweep = get_sweep(ws.catalog(), res.sweep_id)
    assert [r.coef for r in sweep.runs] == [0.0, 2.0] and res.sweep_report_html.is_file()
    assert f"Sweep {res.sweep_id}" in html and f"evaluation {res.evaluate_run_id}" in html
    # the demo ends with an evaluated sweep: judged, its figures and operating point rule in the catalog
    from personavec.steering.evaluate import choose_operating_point
    from personavec.store.evaluations import get_evaluation

    evaluation = get_evaluation(ws.catalog(), res.evaluate_run_id)
    assert evaluation.run.status == "done" and evaluation.sweep_id == res.sweep_id
    assert len(evaluation.members) == 2 and all(m.judge_run_id is not None for m in evaluation.members)
    assert {(f.coef, f.metric) for f in evaluation.figures if f.part == "sweep" and f.persona is None} == {
        (c, m) for c in (0.0, 2.0) for m in ("trait", "coherence")
    }
    assert evaluation.operating_point == choose_operating_point(evaluation.figures, 50.0)
    assert (
        res.evaluation_html.parent / "tradeoff.png"
    ).is_file() and "Operating point" in res.evaluation_html.read_text()
    assert (res.report_html.parent / "similarity.png").read_bytes()[:4] == b"\x89PNG"
    text = "\n".join(lines)
    assert str(res.report_html) in text and "personavec sql" in text
    # the judged sweep's outcome is said as it is: SmolLM2-135M as a judge rarely answers with a number
    scored = [f for f in evaluation.figures if f.part == "sweep" and f.persona is None and f.value is not None]
    if evaluation.operating_point is not None:
        assert f"operating point: c={evaluation.operating_point.coef:g}" in text
    elif not scored:
        assert "the judge gave no usable score" in text
        assert f"personavec evaluate --workspace {ws.root} {res.sweep_id} --trait" in text
    else:
        assert "no coefficient kept mean coherence >= 50" in text
    # every query the demo suggests runs as printed, from any directory (each names the workspace)
    queries = re.findall(r'personavec sql --workspace (\S+) "([^"]+)"', text)
    assert len(queries) >= 4 and {w for w, _ in queries} == {str(ws.root)}
    for where, query in queries:
        res_sql = cli.invoke(app, ["sql", "--workspace", where, query])
        assert res_sql.exit_code == 0, (query, res_sql.output)
