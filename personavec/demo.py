"""The whole pipeline, offline, on the embedded model: serve, generate, extract, vectors, steer, evaluate, report.

``run_demo(DemoConfig())`` (``personavec demo``) creates (or reuses) a workspace, serves SmolLM2-135M-Instruct
locally with personavec's own steering server (``personavec serve``, continuous batching), asks a built-in subset
(the 4 default personas and a few others x a few questions, short answers), extracts per-answer mean activations at
the seed's default layer, averages them into persona vectors, steers with them (a coefficient sweep), has the served
model judge the sweep's answers (trait and coherence: the evaluate stage) and writes the report. Every step prints
what it did; the end prints SQL queries to try.
"""

from __future__ import annotations

import os
import shlex
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.builtin import DEFAULT_PERSONAS, PERSONAS
from personavec.errors import ConfigError

#: Non-default personas the demo adds after the defaults, chosen to span the persona space.
DEMO_OTHERS = ("ghost", "jester", "cynic", "storyteller", "analyst", "mystic", "rebel", "oracle", "trader", "bard")


@dataclass(frozen=True)
class DemoConfig:
    """Size of the demo. ``n_personas`` includes the 4 default personas; answers are ``max_tokens`` long."""

    workspace: str | os.PathLike[str] = Path("personavec-demo")
    n_personas: int = 8
    n_questions: int = 4
    max_tokens: int = 48
    temperature: float = 0.7
    seed: int = 0
    device: str = "cpu"
    #: Steering sweep on the local engine (empty: none): the neutral persona steered towards the first non-default
    #: demo persona (its vector minus the default one) at the default layer, greedy, ``steer_tokens`` long.
    steer_coefs: tuple[float, ...] = (0.0, 1.0, 2.0)
    steer_tokens: int = 32

    def __post_init__(self) -> None:
        n_max = len(DEFAULT_PERSONAS) + len(DEMO_OTHERS)
        if not len(DEFAULT_PERSONAS) + 1 <= self.n_personas <= n_max:
            raise ConfigError(f"n_personas must be in {len(DEFAULT_PERSONAS) + 1}..{n_max}, got {self.n_personas}")
        if not 2 <= self.n_questions <= 18:
            raise ConfigError(f"n_questions must be in 2..18, got {self.n_questions}")
        if self.max_tokens <= 0:
            raise ConfigError(f"max_tokens must be > 0, got {self.max_tokens}")
        object.__setattr__(self, "steer_coefs", tuple(float(c) for c in self.steer_coefs))
        if self.steer_tokens <= 0:
            raise ConfigError(f"steer_tokens must be > 0, got {self.steer_tokens}")

    @property
    def personas(self) -> tuple[str, ...]:
        others = [p for p in DEMO_OTHERS if p in PERSONAS]
        return tuple(DEFAULT_PERSONAS) + tuple(others[: self.n_personas - len(DEFAULT_PERSONAS)])


@dataclass(frozen=True)
class DemoResult:
    workspace: Path
    generate_run_id: int
    extract_run_id: int
    vectors_run_id: int
    report_html: Path
    wall_s: float
    sweep_id: int | None = None
    sweep_report_html: Path | None = None
    evaluate_run_id: int | None = None
    evaluation_html: Path | None = None


def sql_examples(vectors_run_id: int, extract_run_id: int, generate_run_id: int) -> list[tuple[str, str]]:
    """A few queries worth trying on the demo's catalog: (what it shows, SQL)."""
    return [
        ("Every run, newest last", "SELECT id, kind, status, wall_s, package_version FROM runs ORDER BY id"),
        (
            "Closest persona pairs (raw cosine, in SQL)",
            f"SELECT a.group_key AS a, b.group_key AS b, "
            f"round(list_cosine_similarity(a.vector, b.vector)::DOUBLE, 4) AS cos "
            f"FROM vectors a JOIN vectors b USING (run_id, layer) WHERE run_id = {vectors_run_id} "
            f"AND a.group_key < b.group_key ORDER BY cos DESC LIMIT 10",
        ),
        (
            "Answers with their token spans",
            f"SELECT p.name AS persona, a.n_response_tokens, left(r.text, 60) AS answer FROM activations a "
            f"JOIN responses r ON r.id = a.response_id JOIN personas p ON p.id = r.persona_id "
            f"WHERE a.run_id = {extract_run_id} ORDER BY a.n_response_tokens DESC LIMIT 10",
        ),
        (
            "Generation speed per persona",
            f"SELECT p.name AS persona, count(*) AS answers, round(avg(r.completion_tokens), 1) AS tokens, "
            f"round(avg(r.latency_s), 2) AS latency_s FROM responses r JOIN personas p ON p.id = r.persona_id "
            f"WHERE r.run_id = {generate_run_id} GROUP BY ALL ORDER BY persona",
        ),
    ]


#: Seconds between the progress lines of a long demo step.
TICK_S = 10.0


@contextmanager
def _ticking(say: Callable[[str], None], what: str, every_s: float = TICK_S) -> Iterator[Callable[[Any], None]]:
    """A progress line every ``every_s`` seconds while a step runs, whether or not anything finished (on a busy
    machine the first answer can take minutes); yields the ``progress`` callback that keeps the counts."""
    state: dict[str, Any] = {"done": 0, "total": "?"}
    stop = threading.Event()
    start = time.perf_counter()

    def progress(p: Any) -> None:
        state["done"] = getattr(p, "answered", getattr(p, "done_examples", 0))
        state["total"] = getattr(p, "total", getattr(p, "total_examples", "?"))

    def tick() -> None:
        while not stop.wait(every_s):
            say(f"      ... {what}: {state['done']}/{state['total']} [{time.perf_counter() - start:.0f}s]")

    thread = threading.Thread(target=tick, name="personavec-demo-progress", daemon=True)
    thread.start()
    try:
        yield progress
    finally:
        stop.set()
        thread.join()


def run_demo(
    config: DemoConfig | None = None, log: Callable[[str], None] | None = None, *, server: Any = None
) -> DemoResult:
    """Run serve -> generate -> extract -> vectors -> report on the embedded model; ``log`` receives each line.

    ``server``: an already running OpenAI-compatible server on the embedded model (``base_url``, ``model``: a
    :class:`personavec.serving.app.RunningServer` or :class:`personavec.serve.LocalServer`) to generate with and
    judge with (the tests share one); by default the demo starts its own steering server and stops it after the
    judge."""
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.generation.config import GenerateConfig
    from personavec.generation.generate import run_generation
    from personavec.report import ReportConfig, build_report
    from personavec.serve import EMBEDDED_MODEL
    from personavec.serving.app import ServeConfig, running_server
    from personavec.vectors import VectorConfig, compute_vectors
    from personavec.workspace import init_workspace

    config = config or DemoConfig()
    say = log or (lambda _msg: None)
    t0 = time.perf_counter()

    def step(n: int, text: str) -> float:
        say(f"[bold]\\[{n}/8][/] {text}  [dim](t = {time.perf_counter() - t0:.0f}s)[/]")
        return time.perf_counter()

    t = step(1, f"workspace {Path(config.workspace).resolve()}")
    ws = init_workspace(config.workspace)
    say(f"      catalog {ws.catalog_path} with the built-in persona and question sets")

    personas = config.personas
    questions = tuple(range(config.n_questions))
    t = step(2, f"serving {EMBEDDED_MODEL} locally (personavec serve, offline)")
    # The server loads its own copy of the model: its per-row hooks stay on its blocks while it serves.
    own = ServeConfig(model=EMBEDDED_MODEL, device=config.device, dtype="float32")
    serving = nullcontext(server) if server is not None else running_server(own)
    with ExitStack() as stack:  # the server stays up for the judge (step 7), then stops
        server = stack.enter_context(serving)
        say(f"      server up at {server.base_url} in {time.perf_counter() - t:.1f}s")
        t = step(
            3,
            f"generating {len(personas)} personas x {len(questions)} questions, up to {config.max_tokens} tokens each: "
            f"{', '.join(personas)}",
        )
        with _ticking(say, "answers") as progress:
            gen = run_generation(
                ws,
                GenerateConfig(
                    personas=personas,
                    questions=questions,
                    model=server.model,
                    base_url=server.base_url,
                    max_tokens=config.max_tokens,
                    temperature=config.temperature,
                    seed=config.seed,
                    # every answer at once: personavec serve decodes them together, and on a CPU a decoding step
                    # of 32 answers costs little more than one of 2 (it reads every weight once): at 2 at a time the
                    # demo's 32 answers took 107 s on 2 cores, all at once 24 s
                    concurrency=min(len(personas) * len(questions), own.max_batch),
                    timeout_s=300.0,
                    max_retries=2,
                ),
                progress=progress,
            )
        say(
            f"      run {gen.run_id}: {gen.answers} answers, {gen.failures} failures, "
            f"{gen.completion_tokens} tokens in {time.perf_counter() - t:.1f}s"
        )
        if gen.answers == 0:
            raise ConfigError(f"generate run {gen.run_id} produced no answers: {gen.error or 'see personavec runs'}")

        t = step(4, f"extracting mean activations over each answer's tokens ({EMBEDDED_MODEL}, seed default layer)")
        with _ticking(say, "examples") as progress:
            ext = run_extraction(
                ws,
                ExtractConfig(responses_run=gen.run_id, model=EMBEDDED_MODEL, dtype="float32", device=config.device),
                progress=progress,
            )
        say(
            f"      run {ext.run_id}: {ext.n_examples} examples at layer(s) {', '.join(map(str, ext.layers))}, "
            f"{ext.n_tokens} tokens, {ext.tok_s:.0f} tok/s, in {time.perf_counter() - t:.1f}s"
        )

        t = step(5, "persona vectors: mean of each persona's per-answer means")
        vec = compute_vectors(ws, VectorConfig(extraction_run_id=ext.run_id))
        dt = time.perf_counter() - t
        say(f"      run {vec.run_id}: {vec.n_vectors} vectors ({len(vec.groups)} personas) in {dt:.2f}s")

        t = step(6, "steering: a coefficient sweep on the local engine, and what it did to the answers")
        sweep, loaded = _steering_sweep(ws, config, vec.run_id, say) if config.steer_coefs else (None, None)
        say(f"      in {time.perf_counter() - t:.1f}s")

        t = step(7, "evaluate: the served model judges the sweep's answers (trait, coherence); the operating point")
        evaluation = _evaluate_sweep(ws, config, sweep, server, loaded, say) if sweep is not None else None
        say(f"      in {time.perf_counter() - t:.1f}s")

    t = step(8, "report: similarity heatmap, PCA, variance, assistant axis vs PC1 (and the judged sweep)")
    rep = build_report(ws, ReportConfig(vec.run_id))
    if rep.axis_stats is not None:
        s = rep.axis_stats
        say(
            f"      |cos(assistant axis, PC1)| = {s.abs_cos_pc1:.3f}, R² = {s.r2_projection_pc1:.3f}, "
            f"PC1 = {100 * s.pc1_variance_ratio:.1f}% of variance"
        )
    ws.close()
    wall = time.perf_counter() - t0
    say(f"\n[bold green]done in {wall:.0f}s.[/] Report: [bold]{rep.html}[/]")
    say(f"Heatmap: {rep.pngs['similarity']}")
    say("\nTry these on the catalog:")
    for what, query in sql_examples(vec.run_id, ext.run_id, gen.run_id):
        say(f'  # {what}\n  personavec sql --workspace {shlex.quote(str(ws.root))} "{query}"')
    if sweep is not None:
        say(f"Steering sweep report: {sweep.html}")
    if evaluation is not None:
        say(f"Steering evaluation (trait vs coherence, operating point): {evaluation.report_html}")
    return DemoResult(
        ws.root,
        gen.run_id,
        ext.run_id,
        vec.run_id,
        rep.html,
        wall,
        sweep.sweep_id if sweep else None,
        sweep.html if sweep else None,
        evaluation.run_id if evaluation else None,
        evaluation.report_html if evaluation else None,
    )


def _steering_sweep(ws: Any, config: DemoConfig, vectors_run_id: int, say: Callable[[str], None]) -> tuple[Any, Any]:
    """One greedy local-engine run per coefficient (answered in shared batches), the neutral persona steered towards
    the first non-default demo persona at the vectors' layer, then its sweep report; returns the report and the
    loaded model."""
    from personavec.generation.config import GenerateConfig, LocalOptions
    from personavec.generation.local import load_for, run_sweep
    from personavec.serve import EMBEDDED_MODEL
    from personavec.steering.interventions import SteeringConfig
    from personavec.steering.sweep_report import SweepReportConfig, build_sweep_report

    target = config.personas[len(DEFAULT_PERSONAS)]
    gen = GenerateConfig(
        engine="local",
        model=EMBEDDED_MODEL,
        personas=("default",),
        questions=tuple(range(min(2, config.n_questions))),
        max_tokens=config.steer_tokens,
        temperature=0.0,
        local=LocalOptions(device=config.device, dtype="float32", batch_size=8),
        steering=SteeringConfig(f"{vectors_run_id}:{target}-default"),
    )
    loaded = load_for(gen)
    res = run_sweep(ws, gen, config.steer_coefs, loaded=loaded)
    tokens = sum(r.completion_tokens for _, r in res.runs)
    say(
        f"      sweep {res.sweep_id}: {gen.steering.label(config.steer_coefs) if gen.steering else ''}: "
        f"{len(res.runs)} runs answered together, {tokens} tokens, {tokens / res.wall_s:.0f} tok/s"
    )
    rep = build_sweep_report(ws, SweepReportConfig(res.sweep_id), loaded=loaded)
    series = rep.series("default")
    say(
        f"      answers' mean projection on {target}-default at layer {rep.layer}: "
        + ", ".join(f"c={c:g}: {v:+.2f}" for c, v in series)
    )
    return rep, loaded


def _evaluate_sweep(
    ws: Any, config: DemoConfig, sweep: Any, server: Any, loaded: Any, say: Callable[[str], None]
) -> Any:
    """The evaluate stage on the demo's sweep: the served model judges each answer for the target persona's trait
    (the generic trait prompt, its system prompt as the description) and for coherence."""
    from personavec.steering.evaluate import EvaluateConfig, run_evaluation

    target = config.personas[len(DEFAULT_PERSONAS)]
    res = run_evaluation(
        ws,
        EvaluateConfig(
            sweep=sweep.sweep_id,
            trait=target,
            trait_description=PERSONAS[target],
            judge_model=server.model,
            judge_base_url=server.base_url,
            judge_concurrency=2,  # judge prompts are long: prefill is compute-bound, a bigger batch gained nothing
            judge_timeout_s=300.0,
            judge_max_retries=2,
        ),
        loaded=loaded,
    )
    means = {(f.coef, f.metric): f.value for f in res.figures if f.part == "sweep" and f.persona is None}
    say(
        f"      evaluate run {res.run_id}, judge runs {', '.join(map(str, res.judge_runs))}: "
        + ", ".join(
            f"c={c:g}: {target} {_score(means.get((c, 'trait')))}, coherence {_score(means.get((c, 'coherence')))}"
            for c in config.steer_coefs
        )
    )
    op = res.operating_point
    if op is not None:
        say(f"      operating point: c={op.coef:g} (mean coherence {op.coherence:.0f} >= 50)")
    elif all(v is None for v in means.values()):  # SmolLM2-135M rarely answers a rubric with a number
        where = shlex.quote(str(ws.root))
        say(
            "      operating point: none: the judge gave no usable score (each answer's reason: personavec sql "
            f'--workspace {where} "SELECT rubric, error FROM judgements"); judge with a stronger model: '
            f"personavec evaluate --workspace {where} {sweep.sweep_id} --trait {target} --judge-base-url URL "
            "--judge-model MODEL"
        )
    else:
        say("      operating point: none (no coefficient kept mean coherence >= 50)")
    return res


def _score(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"
