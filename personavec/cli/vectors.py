"""Vector-stage commands: vectors, export, report, compare (across models), project (transcripts), demo."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, cast

import typer

from personavec.cli.app import JsonOpt, WorkspaceOpt, app, command, console, emit_json, print_table, workspace
from personavec.errors import ConfigError, InputFileError

LayerOpt = Annotated[int | None, typer.Option("--layer", "-l", help="Layer (default: the run's only/seed layer).")]
DefaultOpt = Annotated[
    list[str] | None,
    typer.Option("--default", help="Assistant-end persona for the axis (repeat; default: the 'default' group)."),
]


@app.command()
@command
def vectors(
    extraction_run: Annotated[int, typer.Argument(help="An extract run id.")],
    group_by: Annotated[
        str, typer.Option("--group-by", help="persona, question, persona_group, sample or all.")
    ] = "persona",
    layer: Annotated[list[int] | None, typer.Option("--layer", "-l", help="Layer (repeat; default: all).")] = None,
    allow_partial: Annotated[
        bool, typer.Option("--allow-partial", help="Average the done rows of an unfinished extraction.")
    ] = False,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Average an extraction run's activations per persona (or other group) and layer into a vectors run."""

    from personavec.vectors import VectorConfig, compute_vectors

    config = VectorConfig(extraction_run, group_by, tuple(layer) if layer else None, allow_partial)
    res = compute_vectors(workspace(ws).require(), config)
    if as_json:
        emit_json(res)
        return
    console.print(
        f"run {res.run_id}: {res.n_vectors} vectors ({len(res.groups)} {group_by} groups x layers "
        f"{', '.join(map(str, res.layers))}) from {res.n_examples} examples of extract run {extraction_run} "
        f"in {res.wall_s:.2f}s"
    )


@app.command()
@command
def export(
    run: Annotated[int, typer.Argument(help="A vectors run id.")],
    out: Annotated[Path, typer.Argument(help="Output file: .pt (seed format), .safetensors or .npz.")],
    layer: LayerOpt = None,
    fmt: Annotated[str | None, typer.Option("--format", help="pt, safetensors or npz (default: by suffix).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing file.")] = False,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Export one layer of a vectors run to the seed's .pt, .safetensors or .npz."""

    from personavec.vectors import export_vectors, load_vectors

    vset = load_vectors(run, layer, workspace(ws))
    path = export_vectors(vset, out, fmt, overwrite=overwrite)
    if as_json:
        emit_json({"run_id": run, "layer": vset.layer, "path": path.resolve(), "n": len(vset)})
    else:
        console.print(f"wrote {len(vset)} vectors (run {run}, layer {vset.layer}) to {path}")


@app.command()
@command
def report(
    run: Annotated[int, typer.Argument(help="A vectors run id.")],
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Directory (default <workspace>/reports/run_<id>).")
    ] = None,
    layer: LayerOpt = None,
    default: DefaultOpt = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Write PNG figures and one self-contained HTML page (similarity, PCA, axis) for a vectors run."""

    from personavec.report import build_report

    res = build_report(run, workspace(ws), out_dir=out, layer=layer, defaults=default)
    if as_json:
        emit_json({"run_id": run, "layer": res.layer, "html": res.html, "pngs": res.pngs})
    else:
        console.print(f"report of run {run} (layer {res.layer}): {res.html}")


def _run_spec(spec: str) -> tuple[int, int | None]:
    """``RUN`` or ``RUN:LAYER``."""
    try:
        run, _, layer = spec.partition(":")
        return int(run), int(layer) if layer else None
    except ValueError:
        raise ConfigError(f"expected RUN or RUN:LAYER (integers), got {spec!r}") from None


@app.command()
@command
def compare(
    runs: Annotated[list[str], typer.Argument(help="Two or more vectors runs, each RUN or RUN:LAYER.")],
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Directory for the PNGs (default: none).")] = None,
    default: DefaultOpt = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compare persona vectors of several models (or layers) on their shared personas."""

    from personavec import analysis, plots
    from personavec.vectors import load_vectors

    if len(runs) < 2:
        raise ConfigError("compare needs at least two vectors runs")
    w = workspace(ws)
    sets = {}
    for spec in runs:
        run_id, layer = _run_spec(spec)
        vs = load_vectors(run_id, layer, w)
        sets[f"run {run_id} {vs.model} L{vs.layer}"] = vs
    cmp = analysis.compare_models(sets, defaults=default)
    pngs = {}
    if out is not None:
        pngs["similarity"] = plots.save_png(plots.cross_model_similarity(cmp), out / "cross_similarity.png")
        pngs["pca"] = plots.save_png(plots.cross_model_pca(cmp), out / "cross_pca.png")
    pairs = [(a, b) for i, a in enumerate(cmp.models) for b in cmp.models[i + 1 :]]
    rows = []
    for a, b in pairs:
        i, j = cmp.models.index(a), cmp.models.index(b)
        diag = cmp.cross.get((a, b))
        rows.append(
            (
                a,
                b,
                f"{cmp.structure_corr[i, j]:.4f}",
                f"{float(diag.diagonal().mean()):.4f}" if diag is not None else "n/a (d_model differs)",
                f"{cmp.axis_cos[(a, b)]:.4f}" if (a, b) in cmp.axis_cos else "n/a",
            )
        )
    if as_json:
        emit_json(
            {
                "models": cmp.models,
                "personas": cmp.personas,
                "method": cmp.method,
                "pairs": [
                    dict(zip(["a", "b", "structure_corr", "mean_same_persona_cos", "axis_cos"], r, strict=True))
                    for r in rows
                ],
                "pngs": pngs,
            }
        )
        return
    console.print(f"{len(cmp.personas)} shared personas; coordinates by {cmp.method}")
    print_table(["model a", "model b", "similarity-structure r", "same-persona cos", "axis cos"], rows)
    for path in pngs.values():
        console.print(f"wrote {path}")


def _read_transcripts(path: Path) -> dict[str, list[dict[str, str]]]:
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON: {exc}") from exc
    if isinstance(doc, list) and doc and all(isinstance(m, dict) for m in doc):
        doc = {path.stem: doc}
    elif isinstance(doc, list):
        doc = {f"transcript {i + 1}": t for i, t in enumerate(doc)}
    if not isinstance(doc, dict) or not doc:
        raise InputFileError(f"{path}: expected a list of messages, a list of transcripts or {{name: messages}}")
    for name, msgs in doc.items():
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise InputFileError(f"{path}: transcript {name!r} must be a list of {{role, content}} messages")
    return doc


@app.command()
@command
def project(
    run: Annotated[int, typer.Argument(help="A vectors run id (grouped by persona) that defines the axis.")],
    transcripts: Annotated[Path, typer.Argument(help="JSON: messages, a list of transcripts, or {name: messages}.")],
    layer: LayerOpt = None,
    default: DefaultOpt = None,
    model: Annotated[str | None, typer.Option(help="Model to run (default: the run's extraction model).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N.")] = "auto",
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Write a PNG of projection over turns.")] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Project multi-turn transcripts onto the run's assistant axis: one value per assistant turn."""

    from personavec import analysis, plots
    from personavec.modeling import load_model
    from personavec.report import default_personas_of
    from personavec.vectors import load_vectors

    convs = _read_transcripts(transcripts)
    vset = load_vectors(run, layer, workspace(ws))
    dflt = default_personas_of(vset, default)
    axis = analysis.assistant_axis(vset, dflt or None)
    origin = vset.matrix.double().mean(dim=0).numpy()
    prov = vset.provenance
    dtype = cast(str, prov.get("dtype")) if prov.get("dtype") in ("float32", "bfloat16", "float16") else "auto"
    loaded = load_model(model or vset.model, dtype=dtype, device=device)
    values = analysis.project_transcripts(
        loaded,
        convs,
        axis,
        vset.layer,
        origin=origin,
        prompt_format=prov.get("prompt_format", "chat"),
        span=prov.get("span_rule", "exact") if prov.get("span_rule") in ("exact", "seed") else "exact",
    )
    refs = analysis.project(vset, axis)
    if out is not None:
        shown = {n: refs[n] for n in (max(refs, key=refs.__getitem__), min(refs, key=refs.__getitem__))}
        plots.save_png(plots.transcript_projection(values, references=shown), out)
    if as_json:
        emit_json({"run_id": run, "layer": vset.layer, "projections": {k: v.tolist() for k, v in values.items()}})
        return
    print_table(
        ["transcript", "turn", "projection"],
        [(k, i + 1, f"{x:+.4f}") for k, v in values.items() for i, x in enumerate(v)],
    )
    console.print(
        f"persona range on this axis: {min(refs.values()):+.3f} .. {max(refs.values()):+.3f}"
        + (f"; plot: {out}" if out else "")
    )


@app.command()
@command
def demo(
    ws: WorkspaceOpt = None,
    n_personas: Annotated[int, typer.Option(help="Built-in personas to use (the 4 defaults first).")] = 8,
    n_questions: Annotated[int, typer.Option(help="Built-in questions to use.")] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per generated answer.")] = 48,
) -> None:
    """Run the whole pipeline offline on the embedded model: serve, generate, extract, vectors, report."""

    from personavec.demo import DemoConfig, run_demo

    path = ws if ws is not None else DemoConfig.workspace
    run_demo(
        DemoConfig(workspace=path, n_personas=n_personas, n_questions=n_questions, max_tokens=max_tokens),
        log=lambda line: console.print(line, soft_wrap=True),  # SQL lines stay copy-pastable
    )
