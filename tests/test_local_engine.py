"""The local engine in the catalog: rows like the remote engine's, durable per batch, resumable; steered and capped
runs with their intervention stored and queryable; sweeps; per-token monitoring."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from checks import one_line_error, runs_of
from tiny_models import llama8

from personavec.cli import app
from personavec.config import config_from_dict
from personavec.errors import ConfigError, RunInterrupted
from personavec.extract import mean_activations
from personavec.generation.config import GenerateConfig, LocalOptions
from personavec.generation.generate import run_generation
from personavec.generation.local import generate_batch, load_for, prompt_ids, run_local_generation, run_sweep
from personavec.spans import conversation, render
from personavec.steering.interventions import SteeringConfig
from personavec.steering.monitor import export_projections, project_responses, reference_thresholds, token_projections
from personavec.steering.naming import resolve_vector
from personavec.store.responses import answered_responses
from personavec.store.runs import get_run, list_runs
from personavec.store.steering import get_intervention, get_sweep
from personavec.vectors import VectorConfig, compute_vectors, load_vectors

PERSONAS = ("default", "storyteller", "cynic")


@pytest.fixture(scope="session")
def models(tiny8: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two tiny models of the same shape (8 layers x 64) with different weights: ``tiny8`` and another seed."""
    return tiny8, llama8(tmp_path_factory.mktemp("tiny8") / "llama8-other", seed=1)


def _config(model: str, **kw) -> GenerateConfig:
    base = dict(
        engine="local",
        model=model,
        personas=PERSONAS,
        questions=(0, 1),
        max_tokens=6,
        temperature=0.0,
        local=LocalOptions(device="cpu", dtype="float32", batch_size=4),
    )
    return GenerateConfig(**(base | kw))


def _sql(ws, query: str):
    with ws.catalog().session() as session:
        return [tuple(r) for r in session.execute(sa.text(query)).all()]


def test_local_run_lands_every_answer_like_the_remote_engine(workspace, tiny8):
    config = _config(tiny8)
    res = run_generation(workspace, config)
    assert (res.status, res.answers, res.failures, res.total) == ("done", 6, 0, 6)
    rows = answered_responses(workspace.catalog(), res.run_id)
    loaded = load_for(config)
    expected = generate_batch(
        loaded, [prompt_ids(loaded.tokenizer, r.system_prompt, r.question) for r in rows], max_new_tokens=6
    )
    assert [r.text for r in rows] == [g.text for g in expected]
    detail = _sql(
        workspace,
        f"SELECT count(*), sum(completion_tokens), min(prompt_tokens), any_value(finish_reason), "
        f"any_value(model_reported) FROM responses WHERE run_id = {res.run_id}",
    )[0]
    assert detail[0] == 6 and detail[1] == res.completion_tokens == sum(g.completion_tokens for g in expected)
    assert detail[3] in ("stop", "length") and detail[4] == tiny8
    assert _sql(workspace, f"SELECT endpoint, temperature FROM response_runs WHERE run_id = {res.run_id}") == [
        ("local:cpu", 0.0)
    ]
    assert get_intervention(workspace.catalog(), res.run_id) is None


@pytest.mark.slow
def test_interrupted_local_run_keeps_finished_batches_and_resumes(workspace, tiny8):
    config = _config(tiny8)
    reports = []

    def stop_after_first_batch(p):
        reports.append(p)
        if p.new_answers:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted) as info:
        run_generation(workspace, config, progress=stop_after_first_batch)
    run_id = info.value.run_id
    assert get_run(workspace.catalog(), run_id).status == "interrupted"
    assert len(answered_responses(workspace.catalog(), run_id)) == 4  # one batch landed
    resumed = run_generation(workspace, None, resume=run_id)
    assert (resumed.status, resumed.answers, resumed.new_answers, resumed.requested) == ("done", 6, 2, 2)
    fresh = run_generation(workspace, config)
    texts = {(r.persona, r.question): r.text for r in answered_responses(workspace.catalog(), fresh.run_id)}
    assert {(r.persona, r.question): r.text for r in answered_responses(workspace.catalog(), run_id)} == texts
    with pytest.raises(ConfigError, match="other settings"):
        run_generation(workspace, dataclasses.replace(config, max_tokens=7), resume=run_id)


def test_seeded_sampling_is_reproducible(workspace, tiny8):
    config = _config(tiny8, temperature=1.0, seed=3, personas=("default",))
    a, b = run_generation(workspace, config), run_generation(workspace, config)
    texts = [[r.text for r in answered_responses(workspace.catalog(), x.run_id)] for x in (a, b)]
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_steered_run_stores_its_intervention_queryable_in_sql(workspace, tiny8, vectors_run):
    plain = run_generation(workspace, _config(tiny8))
    steering = SteeringConfig(f"{vectors_run}:storyteller-default", layers=(2,), coef=4.0)
    res = run_generation(workspace, _config(tiny8, steering=steering))
    record = get_intervention(workspace.catalog(), res.run_id)
    expected = resolve_vector(load_vectors(vectors_run, 2, workspace=workspace), "storyteller-default")
    assert (record.kind, record.vector, record.vector_run_id, record.layers, record.coef) == (
        "add",
        f"{vectors_run}:storyteller-default",
        vectors_run,
        (2,),
        4.0,
    )
    (layer,) = record.per_layer
    assert np.allclose(layer.vector, expected, atol=1e-6) and layer.scale == 4.0 and layer.tau is None
    rows = _sql(
        workspace,
        "SELECT r.id, i.kind, i.coef, l.layer, round(l.vector_norm, 4), count(a.id) FROM runs r "
        "JOIN run_interventions i ON i.run_id = r.id JOIN intervention_layers l ON l.run_id = r.id "
        "JOIN responses a ON a.run_id = r.id GROUP BY ALL",
    )
    assert rows == [(res.run_id, "add", 4.0, 2, round(float(np.linalg.norm(expected)), 4), 6)]
    texts = [[r.text for r in answered_responses(workspace.catalog(), x.run_id)] for x in (plain, res)]
    assert texts[0] != texts[1]
    assert get_run(workspace.catalog(), res.run_id).config["steering"]["coef"] == 4.0

    def stop(p):
        if p.new_answers:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted) as info:
        run_generation(workspace, _config(tiny8, steering=steering), progress=stop)
    resumed = run_generation(workspace, None, resume=info.value.run_id)  # reuses the stored intervention
    assert resumed.new_answers == 2
    assert [r.text for r in answered_responses(workspace.catalog(), resumed.run_id)] == texts[1]


def test_normalize_scales_to_the_layer_mean_norm(workspace, tiny8, vectors_run):
    steering = SteeringConfig(f"{vectors_run}:cynic", layers=(2, 5), coef=0.5, normalize=True)
    res = run_generation(workspace, _config(tiny8, steering=steering, personas=("default",), questions=(0,)))
    record = get_intervention(workspace.catalog(), res.run_id)
    for layer in record.per_layer:
        vs = load_vectors(vectors_run, layer.layer, workspace=workspace)
        unit = float(np.mean([float(vs[n].norm()) for n in vs.names]))
        assert layer.unit_norm == pytest.approx(unit, rel=1e-5)
        assert layer.scale * layer.vector_norm == pytest.approx(0.5 * unit, rel=1e-5)


def test_bad_steering_leaves_no_run(workspace, tiny8, vectors_run):
    before = len(list_runs(workspace.catalog()))
    for steering, match in [
        (SteeringConfig(f"{vectors_run}:ghostly"), "has no vector 'ghostly'"),
        (SteeringConfig(f"{vectors_run}:cynic", layers=(8,)), "steerable layers 1..7"),
        (SteeringConfig(f"{vectors_run}:cynic", layers=(3,)), "has no layer 3"),
    ]:
        with pytest.raises((ConfigError, LookupError), match=match):
            run_generation(workspace, _config(tiny8, steering=steering))
    assert len(list_runs(workspace.catalog())) == before
    with pytest.raises(ConfigError, match="local engine"):
        GenerateConfig(model="m", steering=SteeringConfig("1:a"))


@pytest.mark.slow
def test_sweep_makes_one_linked_run_per_coefficient(workspace, tiny8, vectors_run):
    steering = SteeringConfig(f"{vectors_run}:storyteller-default", layers=(5,), positions="generated")
    res = run_sweep(workspace, _config(tiny8, steering=steering, personas=("default",)), [-8, 0, 8])
    sweep = get_sweep(workspace.catalog(), res.sweep_id)
    assert [r.coef for r in sweep.runs] == [-8.0, 0.0, 8.0] and {r.status for r in sweep.runs} == {"done"}
    assert (
        sweep.parameter == "coef" and sweep.label == f"add {vectors_run}:storyteller-default x-8,0,8 @5 generated only"
    )
    rows = _sql(
        workspace,
        f"SELECT i.coef, count(r.id) FROM run_interventions i JOIN responses r ON r.run_id = i.run_id "
        f"WHERE i.sweep_id = {res.sweep_id} GROUP BY ALL ORDER BY i.coef",
    )
    assert rows == [(-8.0, 2), (0.0, 2), (8.0, 2)]
    # the three runs were answered together (6 rows in batches of 4, rows of different coefficients in a batch, each
    # steered by its own): each run has the answers it has alone
    plain = run_generation(workspace, _config(tiny8, personas=("default",)))
    alone = run_generation(
        workspace, _config(tiny8, steering=dataclasses.replace(steering, coef=8.0), personas=("default",))
    )
    for coef, run in ((0.0, plain.run_id), (8.0, alone.run_id)):
        assert _texts(workspace, dict(res.runs)[coef].run_id) == _texts(workspace, run)
    assert _texts(workspace, dict(res.runs)[8.0].run_id) != _texts(workspace, plain.run_id)
    with pytest.raises(ConfigError, match="no coefficient"):
        run_sweep(workspace, _config(tiny8, steering=SteeringConfig(f"{vectors_run}:cynic", kind="cap", tau=1)), [1])
    # bad input found once the sweep row exists (a persona the set lacks) leaves neither the sweep nor a run
    before = (_sql(workspace, "SELECT count(*) FROM steering_sweeps"), len(list_runs(workspace.catalog())))
    with pytest.raises(ConfigError, match="no persona named 'nobody'"):
        run_sweep(workspace, _config(tiny8, steering=steering, personas=("nobody",)), [0, 1])
    assert (_sql(workspace, "SELECT count(*) FROM steering_sweeps"), len(list_runs(workspace.catalog()))) == before


def _texts(ws, run_id: int) -> dict[tuple[str, str], str]:
    return {(r.persona, r.question): r.text for r in answered_responses(ws.catalog(), run_id)}


@pytest.mark.slow
def test_an_interrupted_sweep_resumes_its_runs_together(workspace, tiny8, vectors_run, cli):
    """Ctrl-C after the first batch: every run of the sweep exists, the unfinished ones are interrupted and the
    error names `steer --resume-sweep`; that finishes them (not new runs) with the answers an uninterrupted sweep
    gives. The default layer: the runs record the layer it resolved to (5), the sweep's settings none."""
    steering = SteeringConfig(f"{vectors_run}:storyteller-default")
    config = _config(tiny8, steering=steering, personas=("default", "cynic"))  # 4 answers a run, 12 rows

    def stop_after_first_batch(p):
        if p.new_answers:
            raise KeyboardInterrupt

    with pytest.raises(RunInterrupted) as info:
        run_sweep(workspace, config, [-8, 0, 8], progress=stop_after_first_batch)
    sweep_id = get_intervention(workspace.catalog(), info.value.run_id).sweep_id
    assert info.value.resume_command == f"personavec steer --resume-sweep {sweep_id}"
    sweep = get_sweep(workspace.catalog(), sweep_id)
    assert [r.coef for r in sweep.runs] == [-8.0, 0.0, 8.0] and {r.status for r in sweep.runs} == {"interrupted"}
    landed = sum(len(answered_responses(workspace.catalog(), r.run_id)) for r in sweep.runs)
    assert 0 < landed < 12
    from personavec.steering.evaluate import EvaluateConfig, run_evaluation

    with pytest.raises(ConfigError, match=re.escape(f"finish it first (`personavec steer --resume-sweep {sweep_id}`)")):
        run_evaluation(workspace, EvaluateConfig(sweep=sweep_id, trait="pirate"))

    args = ["steer", "-w", str(workspace.root), "--resume-sweep", str(sweep_id)]
    out = _last_json(cli.invoke(app, [*args, "--json"]))
    assert out["sweep_id"] == sweep_id and [r["coef"] for r in out["runs"]] == [-8.0, 0.0, 8.0]
    assert [r["run_id"] for r in out["runs"]] == [r.run_id for r in sweep.runs]  # the same runs, finished
    assert sum(r["new_answers"] for r in out["runs"]) == 12 - landed and {r["answers"] for r in out["runs"]} == {4}
    assert {r.status for r in get_sweep(workspace.catalog(), sweep_id).runs} == {"done"}
    fresh = run_sweep(workspace, config, [-8, 0, 8])
    for r, (_, whole) in zip(get_sweep(workspace.catalog(), sweep_id).runs, fresh.runs, strict=True):
        assert _texts(workspace, r.run_id) == _texts(workspace, whole.run_id)
    # a finished sweep resumes to itself; a resume with settings is refused
    again = _last_json(cli.invoke(app, [*args, "--json"]))
    assert {r["new_answers"] for r in again["runs"]} == {0} and {r["answers"] for r in again["runs"]} == {4}
    table = cli.invoke(app, args)  # and names its report command on this workspace
    assert f"report: personavec sweep-report --workspace {workspace.root.resolve()} {sweep_id}" in table.stdout
    res = cli.invoke(app, [*args, "--vector", f"{vectors_run}:cynic", "--coef", "3"])
    assert res.exit_code == 2 and "drop --vector, --coef" in res.output
    assert len(get_sweep(workspace.catalog(), sweep_id).runs) == 3  # nothing was added
    with pytest.raises(ConfigError, match="sweep id alone"):
        run_sweep(workspace, config, [1.0], resume=sweep_id)


@pytest.mark.slow
def test_cap_thresholds_from_a_reference_run_are_computed_and_stored(workspace, tiny8, vectors_run):
    reference = run_generation(workspace, _config(tiny8, max_tokens=8))
    steering = SteeringConfig(f"{vectors_run}:-storyteller", kind="cap", layers=(2, 5), reference_run=reference.run_id)
    res = run_generation(workspace, _config(tiny8, steering=steering, personas=("cynic",)))
    record = get_intervention(workspace.catalog(), res.run_id)
    loaded = load_for(_config(tiny8))
    vectors = {
        layer: resolve_vector(load_vectors(vectors_run, layer, workspace=workspace), "storyteller", negate=True)
        for layer in (2, 5)
    }
    found = reference_thresholds(workspace, loaded, reference.run_id, vectors, 25.0)
    assert [layer.tau for layer in record.per_layer] == pytest.approx([found.thresholds[2], found.thresholds[5]])
    assert record.percentile == 25.0 and record.reference_run_id == reference.run_id
    assert record.tau_source == f"p25 of {found.n_tokens} answer tokens of responses run {reference.run_id}"
    assert all(layer.n_reference_tokens == found.n_tokens for layer in record.per_layer)
    # Capping at +inf from given thresholds changes nothing.
    inf = SteeringConfig(f"{vectors_run}:cynic", kind="cap", layers=(2,), tau=math.inf)
    capped = run_generation(workspace, _config(tiny8, steering=inf, max_tokens=8))
    texts = [[r.text for r in answered_responses(workspace.catalog(), x.run_id)] for x in (reference, capped)]
    assert texts[0] == texts[1]


@pytest.mark.slow
def test_token_projections_average_to_the_extracted_mean(workspace, tiny8, vectors_run):
    res = run_generation(workspace, _config(tiny8, max_tokens=8))
    loaded = load_for(_config(tiny8))
    items = project_responses(workspace, loaded, res.run_id, f"{vectors_run}:storyteller-default", 5)
    assert len(items) == 6 and all(len(t.values) == len(t.tokens) > 0 for t in items)
    direction = resolve_vector(load_vectors(vectors_run, 5, workspace=workspace), "storyteller-default")
    unit = direction / np.linalg.norm(direction)
    rows = answered_responses(workspace.catalog(), res.run_id)
    examples = [render(loaded.tokenizer, conversation(r.system_prompt, r.question, r.text)) for r in rows]
    means = mean_activations(loaded, examples, [5])[:, 0].double().numpy()
    assert np.allclose([t.mean for t in items], means @ unit, atol=1e-4)
    # The core directly: one column per layer, every token of every sequence.
    (values,) = token_projections(loaded, [examples[0].input_ids], {2: direction, 5: direction})
    assert values.shape == (len(examples[0].input_ids), 2)
    out = export_projections(items, Path(workspace.root) / "proj.csv")
    with out.open(newline="") as f:
        header, *records = csv.reader(f)  # a token may hold a newline: one record can span lines
    assert header[-2:] == ["token", "projection"] and len(records) == sum(len(t.values) for t in items)
    assert [r[-2] for r in records] == [tok for t in items for tok in t.tokens]
    with pytest.raises(Exception, match="exists"):
        export_projections(items, out)


def test_local_options_roundtrip_through_stored_json(workspace, tiny8, vectors_run):
    steering = SteeringConfig(f"{vectors_run}:cynic", layers=(2,), coef=1.0)
    res = run_local_generation(workspace, _config(tiny8, steering=steering, personas=("default",), questions=(0,)))
    stored = config_from_dict(GenerateConfig, get_run(workspace.catalog(), res.run_id).config)
    assert stored == _config(tiny8, steering=steering, personas=("default",), questions=(0,))
    with pytest.raises(ConfigError, match="engine must be"):
        GenerateConfig(model="m", engine="vllm")


# ------------------------------------------------------------------------------------------------------------ CLI


def _last_json(res) -> dict:
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_cli_generate_local_steer_sweep_report_and_monitor(workspace, tiny8, vectors_run, cli, tmp_path):
    w = ["-w", str(workspace.root)]
    local = ["--model", tiny8, "--device", "cpu", "--dtype", "float32", "--max-tokens", "5", "--temperature", "0"]
    pick = ["--persona", "default", "--question", "0", "--question", "1"]
    out = _last_json(
        cli.invoke(app, ["generate", *w, "--engine", "local", "--batch-size", "1", *local, *pick, "--json"])
    )
    assert (out["answers"], out["status"]) == (2, "done")
    assert get_run(workspace.catalog(), out["run_id"]).config["local"]["batch_size"] == 1

    vector = f"{vectors_run}:storyteller-default"
    args = ["steer", *w, "--vector", vector, "--layer", "5", "--coef", "-6", "--coef", "0", "--coef", "6"]
    sweep = _last_json(cli.invoke(app, [*args, *local, *pick, "--json"]))
    assert [r["coef"] for r in sweep["runs"]] == [-6.0, 0.0, 6.0] and sweep["sweep_id"] is not None
    assert {r["answers"] for r in sweep["runs"]} == {2}

    res = cli.invoke(app, ["sweep-report", str(sweep["sweep_id"]), *w])
    assert res.exit_code == 0, res.output
    page = workspace.root / "reports" / f"sweep_{sweep['sweep_id']}" / "index.html"
    assert page.is_file() and "Answers side by side" in page.read_text() and "c = 6" in page.read_text()
    assert (page.parent / "projection.png").read_bytes()[:4] == b"\x89PNG"

    csv_path = tmp_path / "monitor.csv"
    res = cli.invoke(
        app,
        [
            "monitor",
            *w,
            "--vector",
            vector,
            "--layer",
            "5",
            "--run",
            str(out["run_id"]),
            "--model",
            tiny8,
            "--device",
            "cpu",
            "--out",
            str(csv_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert csv_path.read_text().splitlines()[0].endswith("projection")
    text = _last_json(
        cli.invoke(
            app,
            ["monitor", *w, "--vector", vector, "--text", "Ahoy there", "--model", tiny8, "--device", "cpu", "--json"],
        )
    )
    assert text["layer"] == 5 and len(text["items"][0]["values"]) == len(text["items"][0]["tokens"]) > 1
    # the summary of a given text starts after its first token (an attention sink); every value is still given
    item = text["items"][0]
    assert item["mean_from"] == 1 and item["mean"] == pytest.approx(np.mean(item["values"][1:]))

    capped = _last_json(
        cli.invoke(
            app,
            [
                "steer",
                *w,
                "--vector",
                f"{vectors_run}:-axis",
                "--kind",
                "cap",
                "--cap-reference",
                str(out["run_id"]),
                "--percentile",
                "50",
                "--layer",
                "2",
                *local,
                *pick,
                "--json",
            ],
        )
    )
    record = get_intervention(workspace.catalog(), capped["runs"][0]["run_id"])
    assert record.kind == "cap" and record.percentile == 50.0 and record.per_layer[0].tau is not None


@pytest.mark.slow
def test_cli_steer_sweep_layer_makes_one_run_per_layer_and_coef_and_a_coef_sweep_keeps_its_layer(
    workspace, tiny8, vectors_run, cli
):
    """``steer --sweep-layer 2 --sweep-layer 5 --coef 0 --coef 3``: one sweep, four runs, each steering one layer
    (recorded in run_interventions); a plain coefficient sweep steers the ``--layer`` it was given."""
    w = ["-w", str(workspace.root), "--model", tiny8, "--device", "cpu", "--dtype", "float32", "--temperature", "0"]
    args = ["steer", *w, "--vector", f"{vectors_run}:storyteller-default", "--coef", "0", "--coef", "3"]
    pick = ["--persona", "default", "--question", "0", "--max-tokens", "3", "--json"]
    out = _last_json(cli.invoke(app, [*args, "--sweep-layer", "2", "--sweep-layer", "5", *pick]))
    runs = [r["run_id"] for r in out["runs"]]
    assert out["sweep_id"] is not None and [r["coef"] for r in out["runs"]] == [0.0, 3.0, 0.0, 3.0]
    layers = dict(_sql(workspace, f"SELECT run_id, layers FROM run_interventions WHERE run_id IN {tuple(runs)}"))
    assert [list(layers[r]) for r in runs] == [[2], [2], [5], [5]]
    out = _last_json(cli.invoke(app, [*args, "--layer", "5", *pick]))
    runs = [r["run_id"] for r in out["runs"]]
    layers = dict(_sql(workspace, f"SELECT run_id, layers FROM run_interventions WHERE run_id IN {tuple(runs)}"))
    assert [list(layers[r]) for r in runs] == [[5], [5]]
    bad = cli.invoke(app, [*args, "--sweep-layer", "2", "--sweep-layer", "99", *pick])
    assert bad.exit_code == 2 and "99" in bad.output


def test_cli_steer_positions_response_is_stored_with_the_run(workspace, tiny8, vectors_run, cli):
    """Also: without --model, steer runs the model the vectors were computed on."""
    w = ["-w", str(workspace.root), "--device", "cpu", "--dtype", "float32", "--temperature", "0"]
    args = ["steer", *w, "--vector", f"{vectors_run}:storyteller-default", "--layer", "5", "--coef", "6"]
    pick = ["--persona", "default", "--question", "0", "--max-tokens", "4", "--json"]
    out = _last_json(cli.invoke(app, [*args, "--positions", "response", *pick]))
    run = out["runs"][0]["run_id"] if "runs" in out else out["run_id"]
    assert _sql(workspace, f"SELECT positions, spec->>'positions' FROM run_interventions WHERE run_id = {run}") == [
        ("response", "response")
    ]
    config = get_run(workspace.catalog(), run).config
    assert config["steering"]["positions"] == "response" and config["model"] == tiny8
    res = cli.invoke(app, [*args, "--positions", "prompt", *pick])
    assert res.exit_code == 2 and "positions must be one of all, generated, response" in res.output


@pytest.mark.slow
def test_vectors_of_another_model_are_refused_unless_allowed_and_recorded(cli, workspace, models, vectors_run):
    from personavec.store.steering import get_intervention

    w = ["-w", str(workspace.root)]
    local = ["--device", "cpu", "--dtype", "float32", "--max-tokens", "2", "--temperature", "0"]
    pick = ["--persona", "default", "--question", "0"]
    steer = ["steer", *w, "--vector", f"{vectors_run}:storyteller-default", "--layer", "2", "--coef", "1"]
    before = len(runs_of(workspace))
    res = cli.invoke(app, [*steer, "--model", models[1], *local, *pick])
    one_line_error(res, 2, f"comes from {models[0]!r}, not from the model {models[1]!r}", "--allow-other-model")
    assert len(runs_of(workspace)) == before  # no run created

    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_run}:axis", "--text", "Ahoy", "--model", models[1]])
    one_line_error(res, 2, "--allow-other-model")

    res = cli.invoke(app, [*steer, "--model", models[1], *local, *pick, "--allow-other-model", "--json"])
    assert res.exit_code == 0, res.output
    run_id = json.loads(res.stdout.strip().splitlines()[-1])["runs"][0]["run_id"]
    record = get_intervention(workspace.catalog(), run_id)
    assert record is not None
    from personavec.store.runs import get_run

    config = get_run(workspace.catalog(), run_id).config
    assert config["steering"]["allow_other_model"] is True

    # the model the vectors come from needs no flag; a sweep over 0 and 2 is titled with both (was "x0")
    sweep = ["steer", *w, "--vector", f"{vectors_run}:storyteller-default", "--layer", "2"]
    res = cli.invoke(app, [*sweep, "--coef", "0", "--coef", "2", "--model", models[0], *local, *pick])
    assert res.exit_code == 0, res.output
    assert "x0,2 @2" in res.output


@pytest.mark.slow
def test_monitor_and_steer_argument_errors_are_one_line(cli, workspace, models, vectors_run, make_extraction_run):
    w = ["-w", str(workspace.root)]
    model = ["--model", models[0], "--device", "cpu", "--dtype", "float32"]
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_run}:cynic", "--text", "", *model])
    one_line_error(res, 2, "--text is empty")
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_run}:cynic", "--text", "  ", *model])
    one_line_error(res, 2, "--text is empty")
    answers = make_extraction_run(workspace).response_run_id
    bad = ["--run", str(answers), "--persona", "nobody", "--model", "/no/such/model"]  # refused before the model loads
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{vectors_run}:cynic", *bad])
    one_line_error(res, 2, f"--persona 'nobody': run {answers} has no answer of it (its personas: ")

    before = len(runs_of(workspace))
    cap = ["steer", *w, "--vector", f"{vectors_run}:-axis", "--kind", "cap", "--tau", "1", "--tau", "2"]
    res = cli.invoke(app, [*cap, *model, "--persona", "default", "--question", "0", "--max-tokens", "2"])
    one_line_error(res, 2, "--tau was given 2 times for 1 layer(s)")
    res = cli.invoke(app, ["steer", *w, "--vector", f"{vectors_run}:cynic", "--coef", "1", "--coef", "nan", *model])
    one_line_error(res, 2, "coef must be finite, got nan")
    assert len(runs_of(workspace)) == before  # validated before any work: no run at all

    # vectors of another d_model (32 here, the model has 64)
    small = make_extraction_run(workspace, layers=(2, 5), d_model=32, model=models[0], revision=None)
    small_vectors = compute_vectors(workspace, VectorConfig(extraction_run_id=small.run_id)).run_id
    res = cli.invoke(app, ["monitor", *w, "--vector", f"{small_vectors}:cynic", "--text", "Ahoy", *model])
    one_line_error(res, 2, "(d_model 32)", "has d_model 64")


def test_monitor_text_shows_token_text_not_bpe_symbols(cli, workspace, models, vectors_run):
    model = ["--model", models[0], "--device", "cpu", "--dtype", "float32"]
    args = ["monitor", "-w", str(workspace.root), "--vector", f"{vectors_run}:cynic", "--text", "Ahoy there"]
    res = cli.invoke(app, [*args, *model, "--json"])
    assert res.exit_code == 0, res.output
    tokens = json.loads(res.stdout.strip().splitlines()[-1])["items"][0]["tokens"]
    # a tokenizer that adds a BOS token (transformers 4.57 does for this tiny model, 5.x does not) shows it as itself
    from transformers import AutoTokenizer

    special = set(AutoTokenizer.from_pretrained(models[0]).all_special_tokens)
    assert "".join(t for t in tokens if t not in special) == "Ahoy there" and not any("Ġ" in t for t in tokens)


@pytest.mark.slow
def test_cli_steer_errors(workspace, tiny8, vectors_run, cli):
    w = ["-w", str(workspace.root), "--model", tiny8, "--device", "cpu"]
    res = cli.invoke(app, ["steer", *w, "--vector", "pirate"])
    assert res.exit_code == 2 and "RUN:NAME" in res.output
    res = cli.invoke(app, ["steer", *w])
    assert res.exit_code == 2 and "--vector RUN:NAME" in res.output
    res = cli.invoke(app, ["steer", "-w", str(workspace.root), "--resume-sweep", "99"])
    assert res.exit_code == 2 and "sweep 99 does not exist" in res.output
    res = cli.invoke(app, ["steer", *w, "--vector", f"{vectors_run}:cynic", "--kind", "cap"])
    assert res.exit_code == 2 and "cap needs thresholds" in res.output
    res = cli.invoke(app, ["steer", *w, "--vector", f"{vectors_run}:cynic", "--persona", "default"])
    assert res.exit_code == 2 and "--kind add needs --coef C" in res.output  # a run at 0 is no steering at all
    res = cli.invoke(app, ["steer", *w, "--vector", f"{vectors_run}:nobody", "--persona", "default", "-c", "1"])
    assert res.exit_code == 2 and "has no vector 'nobody'" in res.output
    res = cli.invoke(app, ["steer", "-w", str(workspace.root), "--vector", "999:cynic", "-c", "1"])  # no --model
    assert res.exit_code == 2 and "999" in res.output and "Traceback" not in res.output
    res = cli.invoke(app, ["monitor", "-w", str(workspace.root), "--vector", f"{vectors_run}:cynic"])
    assert res.exit_code == 2 and "--run RUN" in res.output
    res = cli.invoke(app, ["sweep-report", "99", "-w", str(workspace.root)])
    assert res.exit_code == 2 and "sweep 99 does not exist" in res.output


@pytest.mark.slow
def test_an_overflowing_coefficient_fails_the_run_with_one_clear_line(workspace, tiny8, vectors_run):
    """A coefficient past what float32 holds makes the logits NaN/inf: the run stops saying so, greedy or sampled
    (greedy stored an empty answer in a `done` run; sampled failed with torch's "probability tensor contains inf")."""
    from personavec.errors import ModelError

    steering = SteeringConfig(f"{vectors_run}:storyteller-default", layers=(2,), coef=1e39)
    before = len(runs_of(workspace, "generate"))
    for temperature in (0.0, 0.7):
        config = _config(tiny8, steering=steering, personas=("default",), questions=(0,), temperature=temperature)
        with pytest.raises(ModelError, match="logits became NaN/inf at generated token 1: under the steering"):
            run_generation(workspace, config)
        assert len(runs_of(workspace, "generate")) == before  # failed before any answer: the new run is removed
    assert run_generation(workspace, _config(tiny8, personas=("default",), questions=(0,))).status == "done"
