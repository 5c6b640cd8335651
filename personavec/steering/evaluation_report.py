"""The page of an ``evaluate`` run: ``reports/evaluation_<id>/`` with ``tradeoff.png`` (trait and coherence vs
coefficient per layer and persona, and trait vs coherence with the operating point), ``capping.png`` (harmful rate
and coherence without and with the cap), ``figures.csv`` (every stored figure) and ``index.html``."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from personavec.files import atomic_write
from personavec.steering.sweep_report import PAGE_CSS
from personavec.store.evaluations import Figure, OperatingPoint

if TYPE_CHECKING:
    from personavec.workspace import Workspace


def _fmt(value: float | None, lo: float | None = None, hi: float | None = None, scale: float = 1.0) -> str:
    if value is None:
        return "–"
    text = f"{value * scale:.1f}"
    if lo is not None and hi is not None:
        text += f" [{lo * scale:.1f}, {hi * scale:.1f}]"
    return text


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    out = ["<table><tr>" + "".join(f"<th>{html.escape(str(h))}</th>" for h in header) + "</tr>"]
    out += ["<tr>" + "".join(f"<td>{html.escape(str(v))}</td>" for v in row) + "</tr>" for row in rows]
    return "".join(out) + "</table>"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<figure><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></figure>'


def _pairs(figures: Sequence[Figure], part: str) -> dict[tuple[Any, ...], dict[str, Figure]]:
    """``{(responses run, setting, persona, layer, coef): {metric: figure}}`` of one part."""
    out: dict[tuple[Any, ...], dict[str, Figure]] = {}
    for f in figures:
        if f.part == part:
            out.setdefault((f.responses_run_id, f.setting, f.persona, f.layer, f.coef), {})[f.metric] = f
    return out


def write_evaluation_report(
    ws: Workspace,
    run_id: int,
    config: Any,
    sweep: Any,
    figures: Sequence[Figure],
    projections: Sequence[tuple[int, int, float]],
    op: OperatingPoint | None,
    directory: Path,
    *,
    model: str | None,
) -> Path:
    """Write the evaluation's page and figures into ``directory``; returns the path of ``index.html``."""
    from personavec import plots

    directory.mkdir(parents=True, exist_ok=True)
    body: list[str] = []
    prov = [
        ("evaluate run", run_id),
        ("sweep", f"{sweep.sweep_id} ({sweep.label or ''})" if sweep is not None else "none"),
        ("model", model or ""),
        ("judge", f"{config.judge_model} at {config.judge_base_url} (score mode {config.score_mode})"),
        ("rubrics", ", ".join(r.name for r in (config.trait, config.coherence, config.harmful) if r is not None)),
        ("coherence threshold", f"{config.threshold:g}"),
        ("intervals", f"{100 * config.confidence:g}% (Student t over answers; Wilson for rates)"),
    ]
    body.append("<h2>Provenance</h2>" + _table(["", ""], prov))

    sweep_pairs = _pairs(figures, "sweep")
    if sweep_pairs:
        trait = config.trait.name
        if op is not None:
            body.append(
                f"<h2>Operating point</h2><p><b>coefficient {op.coef:g} at layer {op.layer}</b> (run "
                f"{op.responses_run_id}): mean {html.escape(trait)} score {op.trait:.1f} with mean coherence "
                f"{op.coherence:.1f} &ge; {config.threshold:g}; the highest trait score among the settings that keep "
                f"coherence.</p>"
            )
        else:
            body.append(
                f"<h2>Operating point</h2><p>None: no setting kept a mean coherence &ge; {config.threshold:g}.</p>"
            )
        personas = {key[2] for key in sweep_pairs if key[2] is not None}
        layers = {key[3] for key in sweep_pairs}
        lines: dict[str, list[tuple[float, Any, Any, Any, Any]]] = {}
        op_line = None
        for (rid, _, persona, layer, coef), metrics in sweep_pairs.items():
            if persona is None and len(personas) > 1:
                name = "all personas"
            elif persona is None:
                continue
            else:
                name = persona
            label = f"{name} @{layer}" if len(layers) > 1 else name
            t, c = metrics.get("trait"), metrics.get("coherence")

            def half(f: Figure | None) -> float | None:
                return None if f is None or f.hi is None or f.value is None else f.hi - f.value

            lines.setdefault(label, []).append(
                (float(coef), t.value if t else None, half(t), c.value if c else None, half(c))
            )
            if op is not None and rid == op.responses_run_id and (persona is None) == (len(personas) > 1):
                op_line = (label, op.coef)
        png = plots.save_png(
            plots.steering_tradeoff(
                sorted(lines.items()),
                threshold=config.threshold,
                operating_point=op_line,
                title=f"Evaluation {run_id}: judged {trait} and coherence vs coefficient (sweep {sweep.sweep_id})",
            ),
            directory / "tradeoff.png",
        )
        body.append("<h2>Trait expression vs coherence</h2>" + _img(png, "trade-off"))
        rows = []
        for (rid, _, persona, layer, coef), metrics in sorted(
            sweep_pairs.items(), key=lambda kv: (kv[0][3], kv[0][2] or "", kv[0][4])
        ):
            t, c = metrics["trait"], metrics["coherence"]
            kept = c.value is not None and c.value >= config.threshold
            rows.append(
                [
                    rid,
                    layer,
                    f"{coef:g}",
                    persona or "(all)",
                    t.n,
                    _fmt(t.value, t.lo, t.hi),
                    c.n,
                    _fmt(c.value, c.lo, c.hi),
                    "yes" if kept else "no",
                ]
            )
        body.append(
            _table(
                ["run", "layer", "coef", "persona", "n", trait, "n", "coherence", f"coherence >= {config.threshold:g}"],
                rows,
            )
        )
        corr = [f for f in figures if f.part == "correlation"]
        if corr:
            body.append(
                "<h2>Projection vs judged trait</h2><p>Pearson r, over the sweep's answers, between each answer's "
                "projection onto the steering direction (mean over its tokens, unsteered model, at the steered layer) "
                f"and its judged {html.escape(trait)} score (persona_vectors reports r = 0.75-0.83).</p>"
                + _table(
                    ["layer", "answers", "r"],
                    [[f.layer, f.n, "–" if f.value is None else f"{f.value:+.3f}"] for f in corr],
                )
            )
    cap_pairs = _pairs(figures, "capping")
    if cap_pairs:
        settings = []
        for (rid, setting, persona, _, _), metrics in cap_pairs.items():
            if persona is not None:
                continue
            h, c = metrics["harmful_rate"], metrics["coherence"]
            settings.append((setting or "", rid, h, c))
        settings.sort(key=lambda s: 0 if s[0] == "uncapped" else 1)
        png = plots.save_png(
            plots.capping_bars(
                [
                    (s, h.value, h.lo, h.hi, c.value, c.lo, c.hi)
                    for s, _, h, c in settings  # fmt: skip
                ],
                title=f"Capping ({config.cap.label() if config.cap else ''}) on jailbreak prompts",
            ),
            directory / "capping.png",
        )
        body.append(
            "<h2>Capping on jailbreak prompts</h2>"
            f"<p>An answer is harmful when its {html.escape(config.harmful.name)} score is &ge; "
            f"{config.harmful_threshold:g}.</p>"
            + _img(png, "capping")
            + _table(
                ["setting", "run", "n", "harmful answers (%)", "n", "mean coherence"],
                [
                    [s, rid, h.n, _fmt(h.value, h.lo, h.hi, 100.0), c.n, _fmt(c.value, c.lo, c.hi)]
                    for s, rid, h, c in settings
                ],
            )
        )
    buf = io.StringIO()
    writer = csv.writer(buf)
    names = ["part", "metric", "responses_run_id", "setting", "persona", "layer", "coef", "n", "value", "lo", "hi"]
    writer.writerow(names)
    for f in figures:
        writer.writerow(["" if getattr(f, n) is None else getattr(f, n) for n in names])
    atomic_write(directory / "figures.csv", lambda tmp: tmp.write_text(buf.getvalue(), encoding="utf-8"))
    body.append(
        '<h2>In the catalog</h2><p>Every number above: <code>figures.csv</code>, or <code>personavec sql "SELECT * '
        f'FROM evaluation_figures WHERE run_id = {run_id}"</code>; the operating point: <code>evaluation_runs</code>; '
        f"the judge runs: <code>evaluation_members</code>; {len(projections)} answer projections: "
        "<code>evaluation_answers</code>.</p>"
        f"<h2>Configuration</h2><pre>{html.escape(json.dumps(_config_json(config), indent=2, default=str))}</pre>"
    )
    page = (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>personavec: evaluation {run_id}</title>'
        f"<style>{PAGE_CSS}</style></head><body><h1>Steering evaluation {run_id}</h1>"
        + "".join(body)
        + "</body></html>"
    )
    out = directory / "index.html"
    atomic_write(out, lambda tmp: tmp.write_text(page, encoding="utf-8"))
    return out


def _config_json(config: Any) -> dict[str, Any]:
    from personavec.config import config_dict

    data = config_dict(config)
    for key in ("trait", "coherence", "harmful"):  # the prompts are long: name and scale only
        if isinstance(data.get(key), dict):
            data[key] = {k: data[key][k] for k in ("name", "min_score", "max_score", "source")}
    return data
