"""Vector stage: known-answer means from synthetic Zarr rows, catalog round trip, SQL cosine, exports, bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from personavec.errors import ConfigError, InputFileError, RunNotFoundError
from personavec.seed import load_persona_vectors
from personavec.store.runs import list_runs
from personavec.vectors import VectorConfig, compute_vectors, export_vectors, load_vectors, pick_layer


def _expected(ext, key, layer_pos, only_done=True):
    rows = [e["row"] for e in ext.examples if key(e) and (e["done"] or not only_done)]
    return ext.data[rows, layer_pos].astype(np.float64).mean(axis=0), len(rows)


def _n_runs(ws, kind="vectors"):
    with ws.catalog(read_only=True) as cat:
        return len(list_runs(cat, kind))


def test_persona_vectors_equal_mean_of_zarr_rows(workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    res = compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id))
    assert res.layers == (2, 5)
    # persona-set order, not the order the personas were named in
    assert res.groups == ("default", "default_assistant", "assistant", "storyteller", "cynic", "ghost")
    assert res.n_examples == 18 and res.n_vectors == 12
    for li, layer in enumerate(ext.layers):
        vs = load_vectors(res.run_id, layer, workspace=workspace)
        assert vs.names == res.groups and vs.layer == layer
        for p in vs.names:
            want, n = _expected(ext, lambda e, p=p: e["persona"] == p, li)
            np.testing.assert_allclose(vs[p].numpy(), want, rtol=1e-5, atol=1e-6)
            assert vs.n_examples[vs.names.index(p)] == n == 3
            assert vs.provenance["norms"][p] == pytest.approx(np.linalg.norm(want), rel=1e-5)
    prov = vs.provenance
    assert prov["extraction_run_id"] == ext.run_id and prov["response_run_id"] == ext.response_run_id
    assert prov["model"] == "synthetic/model" and prov["d_model"] == 32 and prov["n_examples"] == 18
    assert prov["persona_groups"]["default"] == ["default", "neutral"]
    assert prov["package_version"] and prov["status"] == "done"


def test_group_by_question_persona_group_and_all(workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    by_q = load_vectors(
        compute_vectors(workspace, VectorConfig(ext.run_id, "question", layers=(5,))).run_id, 5, workspace=workspace
    )
    questions = list(dict.fromkeys(e["question"] for e in ext.examples))
    assert list(by_q.names) == sorted(questions, key=questions.index)
    for q in by_q.names:
        np.testing.assert_allclose(by_q[q].numpy(), _expected(ext, lambda e, q=q: e["question"] == q, 1)[0], atol=1e-6)

    by_g = load_vectors(
        compute_vectors(workspace, VectorConfig(ext.run_id, "persona_group")).run_id, 2, workspace=workspace
    )
    # "default" personas are also "neutral": an example counts in each of its groups
    assert by_g.names[:2] == ("default", "neutral")
    for g in by_g.names:
        want, n = _expected(ext, lambda e, g=g: g in e["groups"], 0)
        np.testing.assert_allclose(by_g[g].numpy(), want, atol=1e-6)
        assert by_g.n_examples[by_g.names.index(g)] == n
    assert sum(by_g.n_examples) > 18

    everything = load_vectors(
        compute_vectors(workspace, VectorConfig(ext.run_id, "all", layers=(2,))).run_id, None, workspace=workspace
    )
    np.testing.assert_allclose(everything["all"].numpy(), ext.data[:, 0].mean(axis=0), atol=1e-6)


def test_sql_cosine_equals_torch(workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    run_id = compute_vectors(workspace, VectorConfig(ext.run_id, layers=(5,))).run_id
    vs = load_vectors(run_id, workspace=workspace)
    with workspace.catalog(read_only=True) as cat, cat.raw() as con:
        rows = con.execute(
            "SELECT a.group_key, b.group_key, list_cosine_similarity(a.vector, b.vector) FROM vectors a "
            "JOIN vectors b ON a.run_id = b.run_id AND a.layer = b.layer WHERE a.run_id = ?",
            [run_id],
        ).fetchall()
        assert con.execute("SELECT typeof(vector) FROM vectors LIMIT 1").fetchone()[0] == "FLOAT[]"
    assert len(rows) == 36
    for a, b, cos in rows:
        assert cos == pytest.approx(torch.nn.functional.cosine_similarity(vs[a], vs[b], dim=0).item(), abs=1e-5)


def test_partial_runs_refused_unless_allowed(workspace, make_extraction_run):
    ext = make_extraction_run(workspace, undone=4)
    with pytest.raises(ConfigError, match="4 of 18 examples not done"):
        compute_vectors(workspace, VectorConfig(ext.run_id))
    assert _n_runs(workspace) == 0
    res = compute_vectors(workspace, VectorConfig(ext.run_id, allow_partial=True))
    vs = load_vectors(res.run_id, 2, workspace=workspace)
    assert res.n_examples == 14 and vs.provenance["n_examples_not_done"] == 4
    # rows are in persona-set order: the last 4 are ghost's 3 and one of cynic's
    assert "ghost" not in vs and vs.n_examples[vs.names.index("cynic")] == 2
    want, n = _expected(ext, lambda e: e["persona"] == "cynic", 0)
    np.testing.assert_allclose(vs["cynic"].numpy(), want, atol=1e-6)


def test_bad_inputs_fail_clearly_and_write_nothing(workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    with pytest.raises(RunNotFoundError, match="run 999 does not exist"):
        compute_vectors(workspace, VectorConfig(999))
    with pytest.raises(RunNotFoundError, match="of kind 'ingest-responses'"):
        compute_vectors(workspace, VectorConfig(ext.response_run_id))
    with pytest.raises(ConfigError, match="no layer\\(s\\) 7"):
        compute_vectors(workspace, VectorConfig(ext.run_id, layers=(2, 7)))
    with pytest.raises(ConfigError, match="group_by"):
        VectorConfig(ext.run_id, group_by="colour")
    assert _n_runs(workspace) == 0
    run_id = compute_vectors(workspace, VectorConfig(ext.run_id)).run_id
    assert load_vectors(run_id, workspace=workspace).layer == 5  # the seed's default for 8 layers
    with pytest.raises(ConfigError, match="name one"):
        pick_layer((2, 3), 8)
    with pytest.raises(ConfigError, match="no layer 3"):
        load_vectors(run_id, 3, workspace=workspace)
    with pytest.raises(RunNotFoundError, match="of kind 'extract'"):
        load_vectors(ext.run_id, workspace=workspace)


def test_exports_round_trip(workspace, make_extraction_run, tmp_path):
    ext = make_extraction_run(workspace)
    vs = load_vectors(compute_vectors(workspace, VectorConfig(ext.run_id, layers=(5,))).run_id, workspace=workspace)
    pt = export_vectors(vs, tmp_path / "v.pt")
    back = load_persona_vectors(pt)
    assert list(back) == list(vs.names)
    assert all(torch.equal(back[k], vs[k]) for k in vs)

    from safetensors import safe_open

    st = export_vectors(vs, tmp_path / "v.safetensors")
    with safe_open(str(st), "pt") as fh:
        assert set(fh.keys()) == set(vs.names)
        assert torch.equal(fh.get_tensor("ghost"), vs["ghost"])
        assert json.loads(fh.metadata()["personavec"])["extraction_run_id"] == ext.run_id

    npz = np.load(export_vectors(vs, tmp_path / "v.npz"))
    assert list(npz["names"]) == list(vs.names)
    np.testing.assert_array_equal(npz["vectors"], vs.matrix.numpy())
    assert json.loads(str(npz["provenance"]))["layer"] == 5

    with pytest.raises(InputFileError, match="exists"):
        export_vectors(vs, tmp_path / "v.npz")
    with pytest.raises(ConfigError, match="export format") as info:
        export_vectors(vs, tmp_path / "v.csv")
    assert "export-direction" not in str(info.value)
    with pytest.raises(ConfigError, match=f"export-direction {vs.run_id} GROUP"):  # a GGUF is one group's direction
        export_vectors(vs, tmp_path / "v.gguf")
