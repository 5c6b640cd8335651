"""Report of a steering sweep: what steering did to the answers, measured and shown.

``build_sweep_report(ws, SweepReportConfig(sweep_id))`` runs the unsteered model over every answer of the sweep's
runs and projects each answer token's raw activation at the steered layer onto the steering direction (as
:mod:`personavec.steering.monitor` does; the mean over an answer's tokens is its extracted mean activation dotted
with the unit direction). It writes into ``<workspace>/reports/sweep_<id>/``: ``projection.png`` (mean projection of the
answers vs coefficient, one line per persona), ``projections.csv`` (every token's value) and ``index.html``
(provenance, the numbers, and a few answers side by side across coefficients).

:func:`sweep_section` is the block the vectors report adds for sweeps steered with that run's vectors.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.config import config_from_dict
from personavec.errors import ConfigError
from personavec.files import atomic_write

if TYPE_CHECKING:
    from personavec.modeling import LoadedModel
    from personavec.workspace import Workspace

PAGE_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}h1{font-size:1.6em}h2{margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:.9em;margin:.5em 0}td,th{border:1px solid #ddd;padding:3px 8px;
text-align:left;vertical-align:top}th{background:#f4f4f4}img{max-width:100%;border:1px solid #eee}
td.answer{max-width:28em;white-space:pre-wrap;font-size:.85em}pre{background:#f6f6f6;padding:.6em;font-size:.8em}
"""


@dataclass(frozen=True)
class SweepReportConfig:
    """Which sweep, and how to measure it.

    Attributes:
        sweep_id: a sweep (``personavec steer --coef a --coef b ...``).
        out_dir: where to write (default ``<workspace>/reports/sweep_<id>/``).
        vector: the direction to project onto (``RUN:NAME``); default the sweep's steering vector.
        layer: the layer to read; default the sweep's first steered layer.
        n_examples: (persona, question) pairs shown side by side.
        device, dtype: where the model runs (default: as the sweep's runs did).
    """

    sweep_id: int
    out_dir: Path | None = None
    vector: str | None = None
    layer: int | None = None
    n_examples: int = 3
    device: str | None = None
    dtype: str | None = None

    def __post_init__(self) -> None:
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.n_examples < 0:
            raise ConfigError(f"n_examples must be >= 0, got {self.n_examples}")


@dataclass(frozen=True)
class SweepPoint:
    """Mean projection of one persona's answers in one run of the sweep."""

    run_id: int
    coef: float
    persona: str
    mean_projection: float
    n_answers: int
    n_tokens: int
    layer: int | None = None  # the layer read (a layer sweep reads each run at the layer it steered)

    @property
    def line(self) -> str:
        """The persona, with the steered layer when it is known (one line per persona and layer)."""
        return self.persona if self.layer is None else f"{self.persona} @{self.layer}"


@dataclass(frozen=True)
class SweepReportResult:
    sweep_id: int
    vector: str
    layer: int
    directory: Path
    html: Path
    png: Path
    csv: Path
    points: tuple[SweepPoint, ...]

    def series(self, persona: str, layer: int | None = None) -> list[tuple[float, float]]:
        """``[(coef, mean projection), ...]`` of one persona (at one layer, in a layer sweep), by coefficient."""
        return sorted(
            (p.coef, p.mean_projection)
            for p in self.points
            if p.persona == persona and (layer is None or p.layer == layer)
        )


def _figure(points: tuple[SweepPoint, ...], title: str, ylabel: str) -> Any:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.0, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    layered = len({p.layer for p in points}) > 1
    for persona in dict.fromkeys(p.line if layered else p.persona for p in points):
        series = sorted((p.coef, p.mean_projection) for p in points if (p.line if layered else p.persona) == persona)
        ax.plot([c for c, _ in series], [v for _, v in series], marker="o", label=persona)
    ax.set_xlabel("coefficient")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="persona (system prompt)", title_fontsize=8)
    return fig


def _table(rows: list[list[Any]], header: list[str], answer_cols: int = 0) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, v in enumerate(row):
            cls = ' class="answer"' if answer_cols and i >= len(row) - answer_cols else ""
            cells.append(f"<td{cls}>{html.escape(str(v))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def build_sweep_report(
    ws: Workspace,
    config: SweepReportConfig,
    *,
    resume: int | None = None,
    progress: Callable[[SweepReportResult], None] | None = None,
    loaded: LoadedModel | None = None,
) -> SweepReportResult:
    """Measure a sweep's answers along its steering direction and write the page; returns where it is.

    ``loaded``: the sweep's model already loaded (else loaded here). A report is rewritten whole (``resume`` must be
    None); ``progress`` is called once with the result.

    Example: ``build_sweep_report(ws, SweepReportConfig(sweep_id=1)).html``.
    """
    import dataclasses

    from personavec import plots
    from personavec.generation.config import GenerateConfig
    from personavec.generation.local import load_for
    from personavec.steering.monitor import export_projections, project_responses
    from personavec.store.responses import answered_responses
    from personavec.store.steering import get_intervention, get_sweep

    if resume is not None:
        raise ConfigError("a report is written whole each time and cannot be resumed: build it again")
    catalog = ws.catalog()
    sweep = get_sweep(catalog, config.sweep_id)
    if not sweep.runs:
        raise ConfigError(f"sweep {config.sweep_id} has no runs")
    gen = config_from_dict(GenerateConfig, sweep.config["generate"])
    first = get_intervention(catalog, sweep.runs[0].run_id)
    assert first is not None  # every run of a sweep has an intervention
    vector = config.vector or first.vector
    layer = config.layer if config.layer is not None else first.layers[0]
    if loaded is None:
        local = dataclasses.replace(
            gen.local, device=config.device or gen.local.device, dtype=config.dtype or gen.local.dtype
        )
        loaded = load_for(dataclasses.replace(gen, local=local))
    directory = config.out_dir or ws.root / "reports" / f"sweep_{config.sweep_id}"
    directory.mkdir(parents=True, exist_ok=True)

    points: list[SweepPoint] = []
    every = []
    answers: dict[tuple[str, str], dict[str, str]] = {}
    layer_sweep = len({run.layers for run in sweep.runs}) > 1

    def column(run: Any) -> str:
        where = f" @{run.layers[0]}" if layer_sweep and run.layers else ""
        return f"c = {run.coef:g}{where}"

    for run in sweep.runs:
        # a layer sweep: each run is read at the layer it steered, unless a layer was asked for
        run_layer = config.layer if config.layer is not None else (run.layers[0] if run.layers else layer)
        items = project_responses(ws, loaded, run.run_id, vector, run_layer)
        every.extend(items)
        for persona in dict.fromkeys(t.persona for t in items):
            mine = [t for t in items if t.persona == persona]
            points.append(
                SweepPoint(
                    run_id=run.run_id,
                    coef=run.coef,
                    persona=str(persona),
                    mean_projection=float(np.mean([t.mean for t in mine])),
                    n_answers=len(mine),
                    n_tokens=sum(len(t.values) for t in mine),
                    layer=run_layer,
                )
            )
        for r in answered_responses(catalog, run.run_id):
            if r.sample_index == 0:
                answers.setdefault((r.persona, r.question), {})[column(run)] = r.text
    csv_path = export_projections(every, directory / "projections.csv", overwrite=True)
    title = f"Sweep {config.sweep_id}: {sweep.label or first.vector}\nanswers projected onto {vector} at layer {layer}"
    png = plots.save_png(
        _figure(tuple(points), title, f"mean h·u over answer tokens (layer {layer})"), directory / "projection.png"
    )
    result = SweepReportResult(
        config.sweep_id, vector, layer, directory, directory / "index.html", png, csv_path, tuple(points)
    )
    coefs = list(dict.fromkeys(run.coef for run in sweep.runs))
    columns = [column(run) for run in sweep.runs]
    prov = [
        ("sweep", f"{config.sweep_id} ({sweep.label or ''})"),
        ("model", gen.model),
        (
            "intervention",
            f"{first.kind} {first.vector} at layer(s) "
            + ", ".join(dict.fromkeys(str(x) for run in sweep.runs for x in run.layers or first.layers)),
        ),
        ("positions / normalize", f"{first.positions} / {first.normalize}"),
        ("coefficients", ", ".join(f"{c:g}" for c in coefs)),
        ("runs", ", ".join(f"{r.run_id} (c={r.coef:g}, {r.status})" for r in sweep.runs)),
        (
            "measured",
            f"projection onto {vector} (unit) at layer "
            f"{'each run steered' if layer_sweep and config.layer is None else layer}, unsteered forward, raw",
        ),
        ("sampling", f"temperature {gen.temperature}, max_tokens {gen.max_tokens}, seed {gen.seed}"),
    ]
    lines = list(dict.fromkeys(p.line if layer_sweep else p.persona for p in points))
    by = {(p.line if layer_sweep else p.persona, p.coef): p for p in points}
    number_rows = [
        [line] + [f"{by[line, c].mean_projection:+.3f}" if (line, c) in by else "" for c in coefs] for line in lines
    ]
    examples = list(answers)[: config.n_examples]
    example_rows = [[p, q] + [answers[p, q].get(c, "") for c in columns] for p, q in examples]
    img = png.read_bytes()
    import base64

    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>personavec: steering sweep {config.sweep_id}</title>
<style>{PAGE_CSS}</style></head><body>
<h1>Steering sweep {config.sweep_id}</h1>
<p>{html.escape(sweep.label or "")}</p>
<h2>Provenance</h2>{_table([list(r) for r in prov], ["", ""])}
<h2>What steering did</h2>
<p>Each answer of each run is read by the <b>unsteered</b> model; the value is the mean, over the answer's tokens,
of the raw activation at layer {layer} dotted with the unit direction {html.escape(vector)}. If steering works, the
answers themselves (not only the activations while they were generated) move along the direction as the
coefficient grows.</p>
<figure><img alt="mean projection vs coefficient" src="data:image/png;base64,{base64.b64encode(img).decode()}">
</figure>
{_table(number_rows, ["persona"] + [f"c = {c:g}" for c in coefs])}
<h2>Answers side by side</h2>
{_table(example_rows, ["persona", "question"] + columns, answer_cols=len(columns))}
<p>Every token's value: <code>projections.csv</code>. In SQL: <code>personavec sql "SELECT i.coef, r.persona_id,
left(r.text, 80) FROM run_interventions i JOIN responses r ON r.run_id = i.run_id WHERE i.sweep_id =
{config.sweep_id} ORDER BY i.coef"</code></p>
<h2>Sweep configuration</h2><pre>{html.escape(json.dumps(sweep.config, indent=2, default=str))}</pre>
</body></html>
"""
    atomic_write(result.html, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    if progress is not None:
        progress(result)
    return result


def sweep_section(ws: Workspace, vectors_run_id: int, report_dir: Path) -> str:
    """HTML for the vectors report: the sweeps steered with this run's vectors whose sweep report exists (its
    figure, and a link to it); empty when there are none."""
    import base64
    import os

    from personavec.store.evaluations import evaluations_of_sweep
    from personavec.store.steering import sweeps_using

    parts = []
    for sweep_id, label in sweeps_using(ws.catalog(), vectors_run_id):
        page = ws.root / "reports" / f"sweep_{sweep_id}" / "index.html"
        png = page.parent / "projection.png"
        if png.is_file():
            link = os.path.relpath(page, report_dir)
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(
                f'<h3>Sweep {sweep_id}: {html.escape(label or "")}</h3><figure><img alt="sweep {sweep_id}" '
                f'src="data:image/png;base64,{data}"><figcaption><a href="{html.escape(link)}">the sweep report</a>: '
                f"answers side by side</figcaption></figure>"
            )
        # the newest finished evaluation of the sweep: its judged trade-off (trait vs coherence, operating point)
        for run_id, folder in evaluations_of_sweep(ws.catalog(), sweep_id)[:1]:
            tradeoff = Path(folder or "") / "tradeoff.png"
            if folder and tradeoff.is_file():
                link = os.path.relpath(tradeoff.parent / "index.html", report_dir)
                data = base64.b64encode(tradeoff.read_bytes()).decode("ascii")
                parts.append(
                    f'<h3>Sweep {sweep_id}, judged (evaluation {run_id})</h3><figure><img alt="evaluation {run_id}" '
                    f'src="data:image/png;base64,{data}"><figcaption><a href="{html.escape(link)}">the evaluation '
                    f"report</a>: trait vs coherence and the operating point</figcaption></figure>"
                )
    if not parts:
        return ""
    return "<h2>Steering with these vectors</h2>" + "".join(parts)
