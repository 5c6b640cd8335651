"""Analysis functions against hand-computed small cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from personavec.analysis import (
    assistant_axis,
    axis_vs_pc1,
    center,
    compare_models,
    cosine_matrix,
    pca,
    project,
    similarity_matrix,
)
from personavec.errors import ConfigError


def test_centring_and_similarity_by_hand():
    # three vectors sharing a big common offset: raw cosines near 1, centred ones exact by hand
    vecs = {"a": [11.0, 10.0], "b": [9.0, 10.0], "c": [10.0, 12.0]}
    mean = np.array([10.0, 32 / 3])
    np.testing.assert_allclose(center(np.array(list(vecs.values()))), np.array(list(vecs.values())) - mean)
    raw = similarity_matrix(vecs, centered=False).matrix
    assert raw.min() > 0.95
    sim = similarity_matrix(vecs)
    xa, xb, xc = (np.array(v) - mean for v in vecs.values())
    want_ab = xa @ xb / np.linalg.norm(xa) / np.linalg.norm(xb)
    assert sim.names == ("a", "b", "c") and sim.centered
    assert sim.matrix[0, 1] == pytest.approx(want_ab)
    np.testing.assert_allclose(np.diag(sim.matrix), 1.0)
    np.testing.assert_allclose(sim.matrix, sim.matrix.T)
    # torch tensors (the seed's dict) work the same
    t = {k: torch.tensor(v) for k, v in vecs.items()}
    np.testing.assert_allclose(similarity_matrix(t).matrix, sim.matrix)


def test_cosine_matrix_zero_rows_are_zero():
    m = cosine_matrix(np.array([[1.0, 0.0], [0.0, 0.0]]))
    assert m[0, 0] == pytest.approx(1.0) and m[1, 1] == 0.0


def test_assistant_axis_sign_and_norm():
    vecs = {
        "default": [1.0, 0.0, 0.0],
        "default_llm": [3.0, 0.0, 0.0],
        "ghost": [0.0, 2.0, 0.0],
        "bard": [0.0, 0.0, 0.0],
    }
    axis = assistant_axis(vecs)
    # mean(defaults) = (2,0,0), mean(rest) = (0,1,0) -> (2,-1,0)/sqrt(5)
    np.testing.assert_allclose(axis, np.array([2.0, -1.0, 0.0]) / np.sqrt(5))
    assert np.linalg.norm(axis) == pytest.approx(1.0)
    proj = project(vecs, axis)
    assert proj["default_llm"] > proj["default"] > proj["bard"] > proj["ghost"]
    # a configurable default set flips the axis
    np.testing.assert_allclose(assistant_axis(vecs, defaults=["ghost", "bard"]), -axis)
    with pytest.raises(ConfigError, match="none of the default personas"):
        assistant_axis({"x": [1.0, 0.0], "y": [0.0, 1.0]})
    with pytest.raises(ConfigError, match="every persona is a default"):
        assistant_axis({"default": [1.0, 0.0], "default_llm": [0.0, 1.0]})


def test_pca_by_hand_and_variance_sums_to_one(rng):
    # points on a line in 3-d: one component carries all variance
    vecs = {"default": [2.0, 0.0, 1.0], "b": [0.0, 0.0, 1.0], "c": [-2.0, 0.0, 1.0]}
    p = pca(vecs)
    assert p.coordinates.shape == (3, 2)
    assert p.explained_variance_ratio[0] == pytest.approx(1.0)
    np.testing.assert_allclose(np.abs(p.components[0]), [1.0, 0.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(p.coordinates[:, 0], [2.0, 0.0, -2.0], atol=1e-12)  # default oriented positive
    assert p.explained_variance[0] == pytest.approx(4.0)  # sample variance of (2, 0, -2)

    big = {f"p{i}": rng.normal(size=50) for i in range(12)}
    q = pca(big, defaults=None)
    assert q.explained_variance_ratio.sum() == pytest.approx(1.0)
    assert q.cumulative_variance[-1] == pytest.approx(1.0)
    assert np.all(np.diff(q.explained_variance_ratio) <= 1e-12)
    np.testing.assert_allclose(q.components @ q.components.T, np.eye(11), atol=1e-10)
    x = np.stack(list(big.values()))
    np.testing.assert_allclose(q.transform(x), q.coordinates, atol=1e-10)


def test_axis_vs_pc1_when_axis_is_pc1(rng):
    # personas spread mostly along e0, defaults at the + end: axis ~ PC1
    vecs = {}
    for i, name in enumerate(["default", "default_llm", "a", "b", "c", "d"]):
        v = rng.normal(scale=0.01, size=8)
        v[0] = [5.0, 4.0, -1.0, -2.0, -3.0, -3.5][i]
        vecs[name] = v
    axis = assistant_axis(vecs)
    stats = axis_vs_pc1(vecs, axis)
    assert stats.abs_cos_pc1 > 0.999
    assert stats.r2_projection_pc1 > 0.999
    assert stats.pc1_variance_ratio > 0.99
    assert stats.axis_variance_ratio == pytest.approx(stats.pc1_variance_ratio, abs=1e-3)
    assert stats.projections["default"] > 0 > stats.projections["d"]


def test_compare_models_same_and_different_width(rng):
    names = ["default", "default_llm", "a", "b", "c"]
    base = {n: rng.normal(size=16) for n in names}
    # model 2 = rotated copy of model 1 plus a constant offset: same centred geometry
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    other = {n: q @ v + 7.0 for n, v in base.items()}
    other["extra"] = rng.normal(size=16)
    cmp = compare_models({"m1": base, "m2": other})
    assert cmp.personas == tuple(names) and cmp.method == "joint-pca"
    np.testing.assert_allclose(cmp.within["m1"], cmp.within["m2"], atol=1e-10)
    assert cmp.structure_corr[0, 1] == pytest.approx(1.0)
    assert cmp.cross[("m1", "m2")].shape == (5, 5)
    assert set(cmp.coordinates) == {"m1", "m2"} and cmp.coordinates["m1"].shape == (5, 2)
    same = compare_models({"m1": base, "m1-again": dict(base)})
    np.testing.assert_allclose(np.diag(same.cross[("m1", "m1-again")]), 1.0)
    assert same.axis_cos[("m1", "m1-again")] == pytest.approx(1.0)

    # a wider model embedding the same geometry: Procrustes recovers the coordinates
    wide = {n: np.concatenate([v, np.zeros(8)]) for n, v in base.items()}
    cmp2 = compare_models({"narrow": base, "wide": wide})
    assert cmp2.method == "procrustes" and cmp2.cross == {} and cmp2.d_models == (16, 24)
    np.testing.assert_allclose(cmp2.coordinates["narrow"], cmp2.coordinates["wide"], atol=1e-8)
    assert cmp2.structure_corr[0, 1] == pytest.approx(1.0)
    with pytest.raises(ConfigError, match="share 2 personas"):
        compare_models({"m1": base, "m2": {"a": base["a"], "b": base["b"]}})


@pytest.mark.slow
def test_project_transcripts_one_value_per_assistant_turn(tiny_loaded):
    from personavec.analysis import project_transcripts
    from personavec.spans import render

    loaded = tiny_loaded  # the session's tiny llama (ChatML), loaded once
    first = [
        {"role": "system", "content": "You are a ghost."},
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "A whisper in the old house."},
    ]
    long = [*first, {"role": "user", "content": "Why?"}, {"role": "assistant", "content": "Because nobody left."}]
    rng = np.random.default_rng(0)
    axis = rng.normal(size=loaded.d_model)
    origin = rng.normal(size=loaded.d_model)
    out = project_transcripts(loaded, {"one": first, "two": long}, axis, 2, origin=origin)
    assert out["one"].shape == (1,) and out["two"].shape == (2,)
    # causal attention: the first turn projects the same whether or not a second follows
    assert out["two"][0] == pytest.approx(out["one"][0], rel=1e-4, abs=1e-4)
    # against a naive output_hidden_states forward over the same spans
    r = render(loaded.tokenizer, long)
    with torch.no_grad():
        hs = loaded.model(torch.tensor([r.input_ids]), output_hidden_states=True).hidden_states[2][0].double().numpy()
    unit = axis / np.linalg.norm(axis)
    naive = [(hs[s:e].mean(axis=0) - origin) @ unit for s, e in r.assistant_spans]
    np.testing.assert_allclose(out["two"], naive, rtol=1e-4, atol=1e-4)
