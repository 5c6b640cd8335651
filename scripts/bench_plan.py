"""Benchmark: planning an extraction run of assistant-axis size (what runs before the GPU's first batch).

Builds a workspace with ``--roles`` synthetic personas x ``--questions`` questions x ``--samples`` answers (default
275 x 240 x 5 = 330,000 responses of ~150-250 tokens), then times each step of planning a new extraction run exactly
as ``run_extraction`` does it: selecting the answered responses (catalog), rendering and tokenizing them with exact
spans (``encode_responses``: batched templates and tokenization), assigning rows longest-first, planning the batches,
and recording every planned example (one transaction) and creating a Zarr array. Then what the GPU actually waits
for, as a second run opened as ``run_extraction`` opens it: the selection (``select_new``), then the run recorded with
every row pending and its array created (``record_new``) on the background committer while the first window is
planned on this thread (the model starts there), then the rest, which follows on a planner
thread while the model computes, and the catalog's record of each window's plan (a background commit in the run). The
baseline, measured in the same run on ``--baseline-n`` conversations and scaled, is rendering one conversation at
a time (``render``, what extraction did before). No model is loaded: only its tokenizer (the embedded SmolLM2's by
default).

    .venv/bin/python scripts/bench_plan.py [--roles 275 --questions 240 --samples 5] [--tokenizer smollm2|word]

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_extract import WORDS, synth_response  # noqa: E402

from personavec import arrays  # noqa: E402
from personavec.extract.config import ExtractConfig, encode_responses  # noqa: E402
from personavec.extract.pipeline import planned_windows  # noqa: E402
from personavec.extract.plan import ExtractionPlan, examples_table, has_span, longest_first  # noqa: E402
from personavec.extract.record import record_new, select_new, selected_responses  # noqa: E402
from personavec.ingest import IngestConfig, ingest  # noqa: E402
from personavec.spans import conversation, render  # noqa: E402
from personavec.store import extraction as xs  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402
from personavec.writer import Committer  # noqa: E402


def build(work: Path, roles: int, questions: int, samples: int, rng: random.Random) -> int:
    """Ingest a persona set, a question set and the responses; returns the responses run id."""
    ws = init_workspace(work / "ws")
    personas = {
        f"role_{i}": "You are " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) + "."
        for i in range(roles)
    }
    qs = [
        f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 24))) + "?"
        for i in range(questions)
    ]
    (work / "personas.json").write_text(json.dumps({"name": "roles", "personas": [
        {"name": k, "system_prompt": v} for k, v in personas.items()]}))  # fmt: skip
    (work / "questions.json").write_text(json.dumps({"name": "qs", "questions": qs}))
    ingest(ws, IngestConfig("personas", work / "personas.json"))
    ingest(ws, IngestConfig("questions", work / "questions.json"))
    with (work / "responses.jsonl").open("w") as f:
        i = 0
        for p in personas:
            for q in qs:
                for s in range(samples):
                    f.write(
                        json.dumps({"persona": p, "question": q, "sample_index": s, "text": synth_response(i, rng)})
                    )
                    f.write("\n")
                    i += 1
    cfg = IngestConfig("responses", work / "responses.jsonl", persona_set="roles", question_set="qs", model="bench")
    return ingest(ws, cfg).run_id


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roles", type=int, default=275)
    ap.add_argument("--questions", type=int, default=240)
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--tokenizer", default="smollm2", choices=["smollm2", "word"])
    ap.add_argument("--baseline-n", type=int, default=2000, help="conversations rendered one by one (scaled)")
    ap.add_argument("--layers", type=int, default=63, help="layers of the planned run (for the array's shape)")
    ap.add_argument("--d-model", type=int, default=5376)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--gpu-tok-s", type=float, default=12_600.0, help="simulated GPU rate (one H200, 27B, one layer)")
    args = ap.parse_args()
    rng = random.Random(0)
    work = Path(args.dir or tempfile.mkdtemp(prefix="pv-plan-"))
    t = time.perf_counter()
    run = build(work, args.roles, args.questions, args.samples, rng)
    setup_s = time.perf_counter() - t
    if args.tokenizer == "word":
        from bench_pipeline import word_tokenizer

        tok = word_tokenizer()
    else:
        from transformers import AutoTokenizer

        from personavec.modeling import local_model_path

        tok = AutoTokenizer.from_pretrained(local_model_path("smollm2-135m-instruct"))

    @dataclasses.dataclass
    class _Loaded:  # what planning reads of a loaded model
        tokenizer: object
        d_model: int
        n_layers: int
        context_length: int | None = 8192
        revision: str | None = None
        architecture: str = "bench"
        model_type: str = "gemma3"
        dtype: str = "torch.bfloat16"
        device: str = "cuda"
        input_device: str = "cuda"

    loaded = _Loaded(tok, args.d_model, args.layers)
    ws = init_workspace(work / "ws")
    catalog = ws.catalog()
    model = work / "model"  # provenance only: a config and the tokenizer stand in for the model
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=args.d_model, num_hidden_layers=args.layers).save_pretrained(model)
    tok.save_pretrained(model)
    config = ExtractConfig(
        responses_run=run, model=str(model), layers=tuple(range(args.layers)), device="cuda", max_batch_tokens=16384
    )
    steps: dict[str, float] = {}

    cpu: dict[str, float] = {}

    def cpu_s() -> float:  # this process's threads and the worker processes it waited for
        own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime

    def step(name: str, fn):
        t, c = time.perf_counter(), cpu_s()
        out = fn()
        steps[name] = round(time.perf_counter() - t, 3)
        cpu[name] = round(cpu_s() - c, 3)
        return out

    records = step("select", lambda: selected_responses(catalog, config, run))
    n = len(records)
    print(f"{n:,} responses ({args.roles} roles x {args.questions} questions x {args.samples}); setup {setup_s:.0f} s; "
          f"tokenizer {args.tokenizer}", flush=True)  # fmt: skip
    texts = ((r.system_prompt, r.question, r.text) for r in records)
    examples = step("tokenize", lambda: encode_responses(loaded, texts, config))  # type: ignore[arg-type]  # a stub
    rows = step("rows", lambda: longest_first([ex.forward_length if has_span(ex) else 0 for ex in examples]))
    per = arrays.layout_for(n, args.layers, args.d_model)[0]
    plan = step("batches", lambda: ExtractionPlan.build(examples, rows, n_rows=n, chunk_rows=per,
                                                         max_batch_tokens=16384, max_batch_size=64))  # fmt: skip

    def record() -> int:
        run_id = xs.create_extraction_run(
            catalog, {"bench": True}, examples_table([r.id for r in records], examples, rows),
            zarr_group=arrays.group_name,
            source_run_id=run, model="bench", n_model_layers=args.layers, d_model=args.d_model,
            layers=list(range(args.layers)), dtype="bfloat16", span_rule="exact", prompt_format="chat",
            device="cuda", n_examples=n,
        ).run_id  # fmt: skip
        arrays.create_activation_array(ws.zarr_path, run_id, n, args.layers, args.d_model)
        return run_id

    step("record", record)
    total = sum(steps.values())
    # What the GPU waits for: a fresh run as run_extraction opens and plans it (selected; recorded in the background
    # while the first window is planned; the rest).
    recorded: list[float] = []
    t0 = time.perf_counter()
    selected = select_new(catalog, config, run, loaded)  # type: ignore[arg-type]
    selected_s = time.perf_counter() - t0
    committer = Committer()
    opening = committer.submit(record_new, ws, catalog, config, run, loaded, selected)
    opening.add_done_callback(lambda f: recorded.append(time.perf_counter() - t0))
    windows = planned_windows(loaded, config, selected.shape, selected.pending())  # type: ignore[arg-type]
    first = next(windows).plan
    to_first = time.perf_counter() - t0
    opened = opening.result()
    committer.close()
    recorded_s = recorded[0]
    arrivals: list[tuple[float, int]] = []  # (seconds since the start, tokens) of each window of the rest
    plan_commits_s = 0.0  # the catalog's record of each window's plan (on the committer thread in a run)
    for window in windows:
        arrivals.append((time.perf_counter() - t0, sum(ex.forward_length for ex in window.plan.examples)))
        if window.table is not None:
            t = time.perf_counter()
            xs.plan_examples(catalog, opened.info.run_id, window.table)
            plan_commits_s += time.perf_counter() - t
    rest_s = time.perf_counter() - t0 - to_first
    # The GPU's idle time after its first batch, simulated at --gpu-tok-s: it computes each window once it arrived.
    gpu_free = to_first + sum(ex.forward_length for ex in first.examples) / args.gpu_tok_s
    idle = 0.0
    for arrived, tokens in arrivals:
        idle += max(0.0, arrived - gpu_free)
        gpu_free = max(gpu_free, arrived) + tokens / args.gpu_tok_s
    ntok = sum(ex.n_tokens for ex in examples)
    # the baseline: one conversation at a time, as before
    sample = records[: args.baseline_n]
    t, c = time.perf_counter(), cpu_s()
    for r in sample:
        render(tok, conversation(r.system_prompt, r.question, r.text), max_length=8192)
    one_by_one = (time.perf_counter() - t) / len(sample) * n
    one_by_one_cpu = (cpu_s() - c) / len(sample) * n
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{'step':10s} {'seconds':>9s} {'cpu s':>9s}")
    for k, v in steps.items():
        print(f"{k:10s} {v:9.2f} {cpu[k]:9.2f}")
    print(
        f"{'total':10s} {total:9.2f}   ({n / total:,.0f} responses/s, {ntok / total / 1e6:.2f} M tokens/s; "
        f"{len(plan.batches):,} batches)"
    )
    print(f"a new run: selected after {selected_s:.2f} s, the model starts after {to_first:.2f} s, recorded (in the "
          f"background) after {recorded_s:.2f} s "
          f"({len(first.examples)} answers in its first window); the rest comes in {len(arrivals)} windows on a "
          f"planner thread, the first after {arrivals[0][0] if arrivals else 0:.2f} s, all planned after "
          f"{to_first + rest_s:.1f} s (of which {plan_commits_s:.1f} s recording plans, a background commit in a run); "
          f"at {args.gpu_tok_s:,.0f} tok/s the GPU waits {idle:.1f} s for windows after its first window")  # fmt: skip
    print(f"baseline: render one by one {one_by_one:,.0f} s, {one_by_one_cpu:,.0f} cpu s "
          f"(scaled from {len(sample):,}); peak RSS {peak_gb:.1f} GB")  # fmt: skip
    print(json.dumps({
        "n": n, "tokens": ntok, "steps_s": steps, "steps_cpu_s": cpu, "total_s": round(total, 2),
        "responses_per_s": round(n / total), "baseline_tokenize_cpu_s": round(one_by_one_cpu, 1),
        "baseline_tokenize_s": round(one_by_one, 1), "tokenize_speedup": round(one_by_one / steps["tokenize"], 2),
        "batches": len(plan.batches),
        "selected_s": round(selected_s, 3), "recorded_s": round(recorded_s, 3),
        "to_first_batch_s": round(to_first, 3), "rest_s": round(rest_s, 1),
        "plan_commits_s": round(plan_commits_s, 2),
        "windows": [(round(a, 2), tok) for a, tok in arrivals], "gpu_tok_s": args.gpu_tok_s,
        "gpu_idle_after_first_batch_s": round(idle, 2),
        "peak_rss_gb": round(peak_gb, 2), "tokenizer": args.tokenizer,
        "machine": platform.processor() or platform.machine(), "cpus": __import__("os").cpu_count(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
