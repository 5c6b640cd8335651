"""Plots, the report, and the vector-stage CLI (in-process), on a synthetic extraction run."""

from __future__ import annotations

import json
from html.parser import HTMLParser

import numpy as np
import pytest

from personavec import analysis, plots
from personavec.cli import app
from personavec.report import ReportConfig, build_report
from personavec.store.runs import list_runs
from personavec.vectors import VectorConfig, compute_vectors, load_vectors

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.srcs: list[str] = []
        self.tags: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        if tag == "img":
            self.srcs.append(dict(attrs)["src"])


def _is_png(path) -> bool:
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) > 1000


def _vector_run(workspace, make_extraction_run, **kw):
    ext = make_extraction_run(workspace, **kw)
    return ext, compute_vectors(workspace, VectorConfig(ext.run_id, layers=(5,))).run_id


@pytest.mark.slow
def test_report_writes_pngs_and_self_contained_html(workspace, make_extraction_run, tmp_path):
    _, run_id = _vector_run(workspace, make_extraction_run)
    res = build_report(workspace, ReportConfig(run_id))
    assert res.directory == workspace.root / "reports" / f"run_{run_id}"
    assert set(res.pngs) == {"similarity", "pca", "variance", "axis_vs_pc1"}
    assert all(_is_png(p) for p in res.pngs.values())
    parser = _Images()
    text = res.html.read_text()
    parser.feed(text)
    assert "html" in parser.tags and "table" in parser.tags
    assert len(parser.srcs) == 4 and all(s.startswith("data:image/png;base64,") for s in parser.srcs)
    assert "synthetic/model" in text and "layer" in text and "package version" in text
    assert res.axis_stats is not None and 0.0 <= res.axis_stats.abs_cos_pc1 <= 1.0


@pytest.mark.slow
def test_plots_are_pngs(tmp_path, rng):
    vecs = {n: rng.normal(size=24) for n in ["default", "default_llm", "ghost", "bard", "cynic", "jester"]}
    p = analysis.pca(vecs)
    stats = analysis.axis_vs_pc1(vecs, analysis.assistant_axis(vecs), p)
    other = {k: v + rng.normal(size=24) * 0.1 for k, v in vecs.items()}
    wide = {k: np.concatenate([v, v]) for k, v in vecs.items()}
    figs = {
        "heat": plots.similarity_heatmap(analysis.similarity_matrix(vecs)),
        "pca": plots.pca_scatter(p, stats.projections, defaults=("default", "default_llm")),
        "var": plots.cumulative_variance(p),
        "axis": plots.axis_vs_pc1(stats, p),
        "xsim": plots.cross_model_similarity(analysis.compare_models({"a": vecs, "b": other})),
        "xpca": plots.cross_model_pca(analysis.compare_models({"a": vecs, "wide": wide})),
        "turns": plots.transcript_projection({"chat": [0.1, -0.2, 0.4]}, references={"default": 1.0}),
    }
    for name, fig in figs.items():
        assert _is_png(plots.save_png(fig, tmp_path / f"{name}.png")), name


def test_report_needs_three_vectors(workspace, make_extraction_run):
    ext = make_extraction_run(workspace)
    run_id = compute_vectors(workspace, VectorConfig(ext.run_id, "all", layers=(2,))).run_id
    from personavec.errors import ConfigError

    with pytest.raises(ConfigError, match="at least 3"):
        build_report(workspace, ReportConfig(run_id))


def _runs(ws, kind):
    return list_runs(ws.catalog(read_only=True), kind)


@pytest.mark.slow
def test_cli_vectors_export_report_compare(cli, workspace, make_extraction_run, tmp_path):
    ext = make_extraction_run(workspace)
    w = ["--workspace", str(workspace.root)]
    r = cli.invoke(app, ["vectors", str(ext.run_id), "--json", *w])
    assert r.exit_code == 0, r.output
    run_id = json.loads(r.stdout)["run_id"]
    [summary] = _runs(workspace, "vectors")
    assert summary.id == run_id and summary.items == 12 and summary.status == "done"

    r = cli.invoke(app, ["vectors", str(ext.run_id), "--group-by", "question", "--layer", "2", *w])
    assert r.exit_code == 0 and "run " in r.stdout
    assert len(_runs(workspace, "vectors")) == 2

    r = cli.invoke(app, ["export", str(run_id), str(tmp_path / "v.safetensors"), "--layer", "5", *w])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "v.safetensors").stat().st_size > 0
    r = cli.invoke(app, ["export", str(run_id), str(tmp_path / "v.pt"), "--format", "npz", *w])  # torch.load fails
    assert r.exit_code == 2 and "v.pt ends in .pt but --format is npz" in r.output and not (tmp_path / "v.pt").exists()
    r = cli.invoke(app, ["export", str(run_id), str(tmp_path / "v.safetensors" / "v.pt"), *w])  # under a file
    assert r.exit_code == 2 and "v.safetensors is a file, not a directory" in r.output

    r = cli.invoke(app, ["report", str(run_id), "--layer", "2", "--json", *w])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["layer"] == 2 and _is_png(__import__("pathlib").Path(out["pngs"]["similarity"]))

    ext2 = make_extraction_run(workspace, seed=1, model="synthetic/other")
    run2 = compute_vectors(workspace, VectorConfig(ext2.run_id)).run_id
    r = cli.invoke(app, ["compare", f"{run_id}:5", f"{run2}:5", "--out", str(tmp_path / "cmp"), "--json", *w])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["method"] == "joint-pca" and len(out["personas"]) == 6
    assert _is_png(tmp_path / "cmp" / "cross_similarity.png") and _is_png(tmp_path / "cmp" / "cross_pca.png")
    r = cli.invoke(app, ["compare", str(run_id), f"{run_id}:5", *w])  # the same vector set twice (5: its default)
    assert r.exit_code == 2 and f"vectors run {run_id} at layer 5 is given twice" in r.output
    # a --default naming no persona of the run: refused (it fell back to the default group without a word)
    for args in (["report", str(run_id)], ["compare", f"{run_id}:5", f"{run2}:5"]):
        r = cli.invoke(app, [*args, "--default", "nobody", *w])
        assert r.exit_code == 2 and f"--default 'nobody': no such vector in vectors run {run_id} at layer" in r.output


def test_cli_bad_input_exit_codes_and_nothing_written(cli, workspace, make_extraction_run, tmp_path):
    ext = make_extraction_run(workspace)
    w = ["--workspace", str(workspace.root)]
    r = cli.invoke(app, ["vectors", "999", *w])
    assert r.exit_code == 2 and "run 999 does not exist" in r.output
    r = cli.invoke(app, ["vectors", str(ext.response_run_id), *w])
    assert r.exit_code == 2 and "of kind 'ingest-responses'" in r.output
    r = cli.invoke(app, ["vectors", str(ext.run_id), "--layer", "9", *w])
    assert r.exit_code == 2 and "no layer(s) 9" in r.output
    r = cli.invoke(app, ["vectors", str(ext.run_id), "--group-by", "mood", *w])
    assert r.exit_code == 2 and "group_by" in r.output
    assert _runs(workspace, "vectors") == []
    r = cli.invoke(app, ["report", str(ext.run_id), *w])
    assert r.exit_code == 2 and "of kind 'extract'" in r.output
    assert not (workspace.root / "reports").exists()
    r = cli.invoke(app, ["export", "12345", str(tmp_path / "x.pt"), *w])
    assert r.exit_code == 2 and not (tmp_path / "x.pt").exists()


def test_load_vectors_is_fast_enough(workspace, make_extraction_run):
    # the real benchmark (23 x 5376) is scripts/bench_vectors.py; this guards against accidental per-row paths
    ext = make_extraction_run(workspace, d_model=512)
    run_id = compute_vectors(workspace, VectorConfig(ext.run_id, layers=(5,))).run_id
    import time

    load_vectors(run_id, workspace=workspace)
    t = time.perf_counter()
    vs = load_vectors(run_id, workspace=workspace)
    assert time.perf_counter() - t < 0.5 and vs.d_model == 512


@pytest.mark.slow
def test_outputs_onto_directories_files_and_unwritable_paths(cli, workspace, make_extraction_run, tmp_path):
    import os
    import stat

    ext = make_extraction_run(workspace)
    run_id = compute_vectors(workspace, VectorConfig(ext.run_id, layers=(5,))).run_id
    w = ["--workspace", str(workspace.root)]
    (tmp_path / "adir").mkdir()
    r = cli.invoke(app, ["export", str(run_id), str(tmp_path / "adir"), "--format", "pt", *w])
    assert r.exit_code == 2 and "is a directory" in r.output
    r = cli.invoke(app, ["export", str(run_id), "/proc/personavec.pt", *w])  # not writable, even for root
    assert r.exit_code == 2 and "cannot write /proc/personavec.pt" in r.output
    (tmp_path / "afile").write_text("x")
    r = cli.invoke(app, ["report", str(run_id), "-o", str(tmp_path / "afile"), *w])
    assert r.exit_code == 2 and "is a file" in r.output and (tmp_path / "afile").read_text() == "x"
    old = os.umask(0o022)
    try:
        r = cli.invoke(app, ["export", str(run_id), str(tmp_path / "v.npz"), *w])
    finally:
        os.umask(old)
    assert r.exit_code == 0, r.output
    assert stat.S_IMODE((tmp_path / "v.npz").stat().st_mode) == 0o644  # the umask's, not mkstemp's 0600


@pytest.mark.slow
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


@pytest.mark.slow
def test_point_labels_do_not_overlap():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Annotation, Text

    rng = np.random.default_rng(0)
    names = [f"persona_{i}" for i in range(20)]
    vecs = {n: rng.normal(size=32) + (4.0 if i < 3 else 0.0) for i, n in enumerate(names)}  # one tight cluster
    p = analysis.pca(vecs, defaults=names[:3])
    stats = analysis.axis_vs_pc1(vecs, analysis.assistant_axis(vecs, names[:3]), p)
    for fig in (plots.axis_vs_pc1(stats, p, defaults=names[:3]), plots.pca_scatter(p, stats.projections)):
        renderer = FigureCanvasAgg(fig).get_renderer()
        fig.draw(renderer)
        # Text's own extent: an Annotation's includes its leader line
        boxes = [Text.get_window_extent(a, renderer) for a in fig.axes[0].texts if isinstance(a, Annotation)]
        assert len(boxes) == 20
        overlaps = [(i, j) for i in range(20) for j in range(i + 1, 20) if boxes[i].overlaps(boxes[j])]
        assert overlaps == []


def test_contrast_vectors_stay_out_of_persona_space(workspace, make_extraction_run, tmp_path):
    """`vectors --contrast x=pirate,default` adds the difference `x` beside the groups; the similarity, the PCA, the
    assistant axis, reports, comparisons and `RUN:axis` are about the groups (a contrast counted as one more
    persona: it entered the axis's "rest" mean and moved the axis)."""
    from personavec.steering.naming import resolve_vector

    ext = make_extraction_run(workspace)
    plain = load_vectors(compute_vectors(workspace, VectorConfig(ext.run_id)).run_id, workspace=workspace)
    with_x = compute_vectors(workspace, VectorConfig(ext.run_id, contrasts=(("x", "cynic", "default"),))).run_id
    vs = load_vectors(with_x, workspace=workspace)
    assert vs.contrasts == ("x",) and "x" in vs.names  # still there to export or steer with
    groups = vs.without_contrasts()
    assert groups.names == plain.names and np.array_equal(groups.matrix.numpy(), plain.matrix.numpy())
    np.testing.assert_allclose(resolve_vector(vs, "axis"), resolve_vector(plain, "axis"), rtol=1e-6, atol=1e-9)
    report = build_report(workspace, ReportConfig(with_x, out_dir=tmp_path / "r"))
    expected = build_report(workspace, ReportConfig(plain.run_id, out_dir=tmp_path / "p"))
    assert report.axis_stats is not None and expected.axis_stats is not None
    assert report.axis_stats.projections == pytest.approx(expected.axis_stats.projections)  # no "x" among them
