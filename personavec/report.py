"""Report of one vector run: PNG figures and one self-contained HTML page (images embedded) with provenance.

``build_report(ws, ReportConfig(run_id))`` loads one layer of a ``vectors`` run, runs the analyses (centred
similarity, PCA, the assistant axis and its agreement with PC1) and writes ``similarity.png``, ``pca.png``,
``variance.png``, ``axis_vs_pc1.png`` and ``index.html`` into ``<workspace>/reports/run_<id>/`` (or ``out_dir``).
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec import analysis, plots
from personavec.errors import ConfigError, InputFileError
from personavec.files import atomic_write
from personavec.steering.sweep_report import sweep_section
from personavec.vectors import load_vectors
from personavec.workspace import Workspace


@dataclass(frozen=True)
class ReportConfig:
    """Which vectors run to report on, and how.

    Attributes:
        run_id: a ``vectors`` run.
        out_dir: where to write (default ``<workspace>/reports/run_<id>/``).
        layer: which layer (default as :func:`personavec.load_vectors`).
        defaults: assistant-end personas (default: the ``default`` persona group).
    """

    run_id: int
    out_dir: Path | None = None
    layer: int | None = None
    defaults: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.defaults is not None:
            object.__setattr__(self, "defaults", tuple(self.defaults) or None)


@dataclass(frozen=True)
class ReportResult:
    """Where a report went: its directory, the HTML page, the PNGs by name, and the layer it shows."""

    run_id: int
    layer: int
    directory: Path
    html: Path
    pngs: dict[str, Path]
    axis_stats: analysis.AxisStats | None
    notes: tuple[str, ...] = ()  # what the figures cannot show (e.g. characters no installed font has)


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    alt = html.escape(alt)
    return f'<figure><img alt="{alt}" src="data:image/png;base64,{data}"><figcaption>{alt}</figcaption></figure>'


def _table(rows: Sequence[Sequence[Any]], header: Sequence[str] | None = None) -> str:
    out = ["<table>"]
    if header:
        out.append("<tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>")
    for row in rows:
        out.append("<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>")
    out.append("</table>")
    return "".join(out)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left}th{background:#f4f4f4}figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}
figcaption{color:#666;font-size:.85em}.stats td:first-child{font-weight:600}code,pre{background:#f6f6f6}
pre{padding:.6em;overflow-x:auto;font-size:.8em}
"""


_HOW_TO_READ = """<h2>How to read this</h2>
<p><b>Mean-centring.</b> Every vector here is a mean residual-stream activation; they all share a large common
component (what any answer of this model looks like at this layer). Similarities and PCA use each vector minus the
mean of all vectors shown, so they compare what is <i>specific</i> to each persona: a cosine of +1 means two
personas move the activations the same way away from the average, -1 opposite ways.</p>
<p><b>Assistant axis.</b> The unit vector from the mean of the other personas to the mean of the default
(assistant-like) personas. A persona's projection on it says how assistant-like its answers are on this model's own
scale: positive towards the assistant, negative away from it.</p>
<p><b>Axis vs PC1 and R&sup2;.</b> PC1 is the direction along which the personas vary most. |cos(axis, PC1)| near 1
means the main way personas differ is how assistant-like they are. R&sup2; is the squared correlation between the
personas' axis projections and their PC1 coordinates: the share of PC1's spread that the axis explains.</p>
"""


def build_report(
    ws: Workspace,
    config: ReportConfig,
    *,
    resume: int | None = None,
    progress: Callable[[ReportResult], None] | None = None,
) -> ReportResult:
    """Write the PNGs and the HTML page of a vector run; returns where they are.

    A report is rewritten whole each time (``resume`` must be None); ``progress`` is called once with the result.

    Example: ``build_report(Workspace.resolve("ws"), ReportConfig(run_id=5)).html``.
    """
    if resume is not None:
        raise ConfigError("a report is written whole each time and cannot be resumed: build it again")
    run_id, out_dir, defaults = config.run_id, config.out_dir, config.defaults
    vset = load_vectors(run_id, config.layer, workspace=ws).without_contrasts()  # groups, not their differences
    if len(vset) < 3:
        raise ConfigError(
            f"vectors run {run_id} has {len(vset)} vector(s) at layer {vset.layer}: a report needs at least 3 "
            f"(group by persona, question or persona_group)"
        )
    directory = Path(out_dir) if out_dir is not None else ws.root / "reports" / f"run_{run_id}"
    if directory.exists() and not directory.is_dir():
        raise InputFileError(f"{directory} is a file: the report's --out is a directory (its PNGs and index.html)")
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputFileError(f"cannot create the report directory {directory}: {exc.strerror or exc}") from exc

    dflt = analysis.default_personas_of(vset, defaults)
    sim = analysis.similarity_matrix(vset)
    p = analysis.pca(vset, defaults=dflt or None)
    stats: analysis.AxisStats | None = None
    try:
        axis = analysis.assistant_axis(vset, dflt or None)
        stats = analysis.axis_vs_pc1(vset, axis, p)
    except ConfigError:
        axis = None  # no default personas among the groups (e.g. grouped by question): no axis plots
    what = {"persona": "personas", "persona_group": "persona groups"}.get(vset.group_by, f"{vset.group_by}s")
    model = vset.model or "?"
    subtitle = f"{model}, layer {vset.layer}, {len(vset)} {what}"
    order = sorted(vset.names, key=lambda n: -stats.projections[n]) if stats else None

    pngs: dict[str, Path] = {}
    figures = [
        (
            "similarity",
            plots.similarity_heatmap(
                sim,
                order=order,
                title=f"Mean-centred cosine similarity of {what}\n{subtitle}"
                + ("  (sorted by assistant-axis projection)" if order else ""),
            ),
            "Mean-centred cosine similarity",
        ),
        (
            "pca",
            plots.pca_scatter(
                p,
                stats.projections if stats else None,
                defaults=dflt,
                title=f"Persona space, PC1 vs PC2\n{subtitle}",
            ),
            "PCA of the centred vectors, coloured by assistant-axis projection",
        ),
        ("variance", plots.cumulative_variance(p, title=f"Variance explained\n{subtitle}"), "Variance explained"),
    ]
    if stats is not None:
        figures.append(("axis_vs_pc1", plots.axis_vs_pc1(stats, p, defaults=dflt), "Assistant axis vs PC1"))
    captions = {}
    for name, fig, caption in figures:
        pngs[name] = plots.save_png(fig, directory / f"{name}.png")
        captions[name] = caption

    prov = vset.provenance
    prov_rows = [
        ("vectors run", run_id),
        ("model", model),
        ("model revision", prov.get("model_revision") or ""),
        ("layer", f"{vset.layer} of {prov.get('n_model_layers', '?')} (run layers: {prov.get('layers')})"),
        ("d_model", vset.d_model),
        ("grouped by", vset.group_by),
        ("groups", len(vset)),
        ("examples", f"{prov.get('n_examples')} (not done, left out: {prov.get('n_examples_not_done', 0)})"),
        ("extraction run", prov.get("extraction_run_id")),
        ("responses run", prov.get("response_run_id")),
        (
            "span rule / prompt format / dtype",
            f"{prov.get('span_rule')} / {prov.get('prompt_format')} / {prov.get('dtype')}",
        ),
        ("package version", prov.get("package_version")),
        ("created", prov.get("created_at")),
        ("default personas (axis)", ", ".join(dflt) or "none"),
    ]
    stat_rows: list[tuple[str, str | int]] = []
    if stats is not None:
        stat_rows = [
            ("|cos(assistant axis, PC1)|", f"{stats.abs_cos_pc1:.4f}"),
            ("R² of axis projections vs PC1 coordinates", f"{stats.r2_projection_pc1:.4f}"),
            ("PC1 share of variance", f"{100 * stats.pc1_variance_ratio:.2f}%"),
            ("variance share along the axis", f"{100 * stats.axis_variance_ratio:.2f}%"),
        ]
    stat_rows.append(("PCs for 80% of variance", int((p.cumulative_variance < 0.8 - 1e-12).sum() + 1)))
    group_rows = []
    for name in order or vset.names:
        j = vset.names.index(name)
        group_rows.append(
            (
                name,
                vset.n_examples[j],
                f"{prov['norms'][name]:.3f}",
                f"{stats.projections[name]:+.3f}" if stats else "",
                f"{p.coordinates[j, 0]:+.3f}",
                f"{p.coordinates[j, 1]:+.3f}" if p.coordinates.shape[1] > 1 else "",
            )
        )
    run_config = {k: v for k, v in prov.items() if k not in ("norms", "persona_groups")}
    notes = []
    if missing := plots.missing_glyphs(vset.names):
        notes.append(
            f"the figures draw {' '.join(missing)} as boxes: no installed font has these characters (install a CJK "
            f"or emoji font such as Noto Sans CJK or Noto Emoji; the tables on this page show the names)"
        )
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>personavec report: vectors run {run_id}</title>
<style>{_CSS}</style></head><body>
<h1>Persona vectors: run {run_id}</h1>
<p>{html.escape(subtitle)}</p>
{"".join(f"<p><strong>Note:</strong> {html.escape(n)}</p>" for n in notes)}
<h2>Provenance</h2>{_table(prov_rows)}
<h2>Summary</h2><div class="stats">{_table(stat_rows)}</div>
{_HOW_TO_READ}
<h2>Figures</h2>
{"".join(_img(pngs[n], captions[n]) for n in pngs)}
<h2>{html.escape(what.capitalize())}</h2>
{_table(group_rows, [vset.group_by, "examples", "norm", "axis projection", "PC1", "PC2"])}
{sweep_section(ws, run_id, directory)}
<h2>Run configuration</h2><pre>{html.escape(json.dumps(run_config, indent=2, sort_keys=True, default=str))}</pre>
<p>Query these vectors in SQL: <code>personavec sql "SELECT a.group_key, b.group_key,
list_cosine_similarity(a.vector, b.vector) AS cos FROM vectors a JOIN vectors b USING (run_id, layer)
WHERE run_id = {run_id} AND layer = {vset.layer} ORDER BY cos DESC"</code></p>
</body></html>
"""
    index = directory / "index.html"
    atomic_write(index, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    result = ReportResult(run_id, vset.layer, directory, index, pngs, stats, tuple(notes))
    if progress is not None:
        progress(result)
    return result
