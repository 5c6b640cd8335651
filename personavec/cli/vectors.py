"""Vector-stage commands: vectors, export, report, compare (across models), project (transcripts), demo."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from personavec.cli.app import (
    JsonOpt,
    WorkspaceOpt,
    app,
    command,
    console,
    emit_json,
    err_console,
    print_table,
    workspace,
)
from personavec.errors import ConfigError

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
    where: Annotated[
        list[str] | None,
        typer.Option(
            "--where",
            help="Keep examples whose judgement passes, e.g. 'role_adherence = 3', 'role_adherence in (2, 3)', "
            "'coherence >= 50', or 'GROUP: RUBRIC OP N' for one group's members; repeatable (all must pass). "
            "= != in compare the judge's integer verdict (the scale's likeliest integer), < <= > >= the score.",
        ),
    ] = None,
    min_count: Annotated[
        int, typer.Option("--min-count", help="Fail unless every group keeps at least this many examples.")
    ] = 1,
    judge_run: Annotated[
        list[int] | None,
        typer.Option("--judge-run", help="Take scores from this judge run (repeat; default: the latest per rubric)."),
    ] = None,
    contrast: Annotated[
        list[str] | None,
        typer.Option("--contrast", help="Add NAME=POS,NEG: mean(POS) - mean(NEG) of two groups; repeatable."),
    ] = None,
    ws: WorkspaceOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Average an extraction run's activations per persona (or other group) and layer into a vectors run."""

    from personavec.vectors import VectorConfig, compute_vectors

    config = VectorConfig(
        extraction_run,
        group_by,
        tuple(layer) if layer else None,
        allow_partial,
        where=tuple(where or ()),
        min_count=min_count,
        judge_runs=tuple(judge_run or ()),
        contrasts=tuple(_contrast(c) for c in contrast or ()),
    )
    res = compute_vectors(workspace(ws).require(), config)
    if as_json:
        emit_json(res)
        return
    console.print(
        f"run {res.run_id}: {res.n_vectors} vectors ({len(res.groups)} {group_by} groups x layers "
        f"{', '.join(map(str, res.layers))}) from {res.n_examples} examples of extract run {extraction_run} "
        f"in {res.wall_s:.2f}s"
    )


def _contrast(spec: str) -> tuple[str, str, str]:
    """``NAME=POS,NEG``."""
    name, _, sides = spec.partition("=")
    pos, _, neg = sides.partition(",")
    if not (name.strip() and pos.strip() and neg.strip()):
        raise ConfigError(f"--contrast expects NAME=POS,NEG (e.g. pirate=pos,neg), got {spec!r}")
    return name.strip(), pos.strip(), neg.strip()


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

    vset = load_vectors(run, layer, workspace=workspace(ws))
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
    from personavec.report import ReportConfig, build_report

    config = ReportConfig(run, out_dir=out, layer=layer, defaults=tuple(default) if default else None)
    res = build_report(workspace(ws).require(), config)
    if as_json:
        emit_json({"run_id": run, "layer": res.layer, "html": res.html, "pngs": res.pngs, "notes": res.notes})
    else:
        console.print(f"report of run {run} (layer {res.layer}): {res.html}")
        for note in res.notes:
            err_console.print(f"note: {note}", markup=False, highlight=False, soft_wrap=True)


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

    cmp = analysis.compare_runs(workspace(ws).require(), [_run_spec(s) for s in runs], defaults=default)
    pngs = {}
    if out is not None:
        pngs["similarity"] = plots.save_png(plots.cross_model_similarity(cmp), out / "cross_similarity.png")
        pngs["pca"] = plots.save_png(plots.cross_model_pca(cmp), out / "cross_pca.png")
    pairs = cmp.pairs()
    if as_json:
        emit_json({"models": cmp.models, "personas": cmp.personas, "method": cmp.method, "pairs": pairs, "pngs": pngs})
        return
    console.print(f"{len(cmp.personas)} shared personas; coordinates by {cmp.method}")

    def fmt(x: float | None, missing: str) -> str:
        return f"{x:.4f}" if x is not None else missing

    print_table(
        ["model a", "model b", "similarity-structure r", "same-persona cos", "axis cos"],
        [
            (
                p["a"],
                p["b"],
                fmt(p["structure_corr"], "n/a"),
                fmt(p["mean_same_persona_cos"], "n/a (d_model differs)"),
                fmt(p["axis_cos"], "n/a"),
            )
            for p in pairs
        ],
    )
    for path in pngs.values():
        console.print(f"wrote {path}")


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
    from personavec.ingest import read_transcript_file

    convs = read_transcript_file(transcripts)
    res = analysis.project_onto_run(
        workspace(ws).require(), run, convs, layer=layer, defaults=default, model=model, device=device
    )
    refs = res.references
    if out is not None:
        shown = {n: refs[n] for n in (max(refs, key=refs.__getitem__), min(refs, key=refs.__getitem__))}
        plots.save_png(plots.transcript_projection(res.values, references=shown), out)
    if as_json:
        emit_json({"run_id": run, "layer": res.layer, "projections": {k: v.tolist() for k, v in res.values.items()}})
        return
    print_table(
        ["transcript", "turn", "projection"],
        [(k, i + 1, f"{x:+.4f}") for k, v in res.values.items() for i, x in enumerate(v)],
    )
    console.print(
        f"persona range on this axis: {min(refs.values()):+.3f} .. {max(refs.values()):+.3f}"
        + (f"; plot: {out}" if out else "")
    )


@app.command()
@command
def demo(
    ws: Annotated[
        Path | None, typer.Option("--workspace", "-w", help="Workspace directory (default: ./personavec-demo).")
    ] = None,
    n_personas: Annotated[
        int, typer.Option(help="Built-in personas to use, the 4 defaults first (5-14).", min=5, max=14)
    ] = 8,
    n_questions: Annotated[int, typer.Option(help="Built-in questions to use (2-18).", min=2, max=18)] = 4,
    max_tokens: Annotated[int, typer.Option(help="Tokens per generated answer (>= 1).", min=1)] = 48,
) -> None:
    """Run the whole pipeline offline on the embedded model: serve, generate, extract, vectors, report."""

    from personavec.demo import DemoConfig, run_demo

    path = ws if ws is not None else DemoConfig.workspace
    run_demo(
        DemoConfig(workspace=path, n_personas=n_personas, n_questions=n_questions, max_tokens=max_tokens),
        log=lambda line: console.print(line, soft_wrap=True),  # SQL lines stay copy-pastable
    )
