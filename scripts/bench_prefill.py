"""Benchmark: how the steering server prefills requests of mixed prompt lengths that join its batch together.

Baseline: every joiner in one forward, left-padded to the longest prompt (the server before issue 21's follow-up;
``Tuning(prefill_padding=1, cpu_batch_tokens=gpu_batch_tokens=huge)`` gives it back). Grouped: the default
:func:`personavec.serving.scheduler.prefill_groups` (similar lengths together, each forward within the batch token
budget, at most a quarter of it padding).

Workload: ``--short`` chat requests (a built-in persona and question, ~30-70 tokens) and ``--long`` ones (a
judge-sized prompt, ~``--long-tokens`` tokens) submitted at once to a :class:`~personavec.serving.scheduler.Scheduler`
(no HTTP), greedy, ``--max-tokens`` each (``ignore_eos``). Per mode: wall time until every answer is complete, time
to the first token of the short requests (p50) and of all (p90), prefill forwards and the cells they computed
(prompt tokens + padding). Modes alternate ``--repeats`` times; the best wall of each is kept. Both must give every
request the same tokens (checked in float32/64; bfloat16 may round a different batch shape differently).

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_prefill.py [--short 16] [--long 4] [--long-tokens 400]
        [--max-tokens 8] [--repeats 2] [--threads 1]
    python scripts/bench_prefill.py --synthetic gemma-3-27b --device cuda --tokenizer DIR  (see bench_serve.py)

Prints a table, then one JSON line (also ``$OUT/bench_prefill.json`` when ``OUT`` is set).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from personavec.builtin import EVAL_QUESTIONS, PERSONAS
from personavec.modeling import load_model
from personavec.serve import EMBEDDED_MODEL
from personavec.serving.requests import parse_request
from personavec.serving.scheduler import Delta, Finished, Refused, Scheduler
from personavec.tuning import Tuning

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import build_synthetic  # noqa: E402

ONE_BLOCK = Tuning(prefill_padding=1.0, cpu_batch_tokens=1 << 30, gpu_batch_tokens=1 << 30)
GROUPED = Tuning()


def _bodies(n_short: int, n_long: int, long_tokens: int, max_tokens: int) -> list[dict]:
    names = list(PERSONAS)
    short = [
        [{"role": "system", "content": PERSONAS[names[i % len(names)]]},
         {"role": "user", "content": EVAL_QUESTIONS[i % len(EVAL_QUESTIONS)]}]
        for i in range(n_short)
    ]  # fmt: skip
    words = " ".join(EVAL_QUESTIONS).split()
    long = []
    for i in range(n_long):  # a judge-sized prompt: an answer to rate, about long_tokens tokens
        answer = " ".join(words[(i * 7 + k) % len(words)] for k in range(int(long_tokens * 0.7)))
        long.append([{"role": "user", "content": f"Rate this answer from 0 to 100 for coherence.\n\n{answer}"}])
    return [
        {"model": "m", "messages": m, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True}
        for m in short + long
    ]


def _serve(loaded, bodies: list[dict], tuning: Tuning) -> dict:
    scheduler = Scheduler(loaded, max_batch=len(bodies), max_new_tokens=max(b["max_tokens"] for b in bodies),
                          tuning=tuning)  # fmt: skip
    first: list[float | None] = [None] * len(bodies)
    tokens: list[tuple[int, ...] | None] = [None] * len(bodies)
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            if isinstance(event, Delta) and first[i] is None:
                first[i] = time.perf_counter()
            elif isinstance(event, Finished):
                tokens[i] = event.token_ids
                done.release()
            elif isinstance(event, Refused):
                raise SystemExit(f"request {i} refused: {event.error}")

        return sink

    scheduler.start()
    try:
        start = time.perf_counter()
        tickets = [scheduler.submit(parse_request(b, "chat"), sink_for(i)) for i, b in enumerate(bodies)]
        for _ in bodies:
            if not done.acquire(timeout=3600):
                raise SystemExit("timed out")
        wall = time.perf_counter() - start
    finally:
        scheduler.stop()
    ttft = [(f or start) - start for f in first]
    return {
        "wall_s": wall,
        "ttft": ttft,
        "tokens": tokens,
        "prompt_lengths": [len(t.prompt) for t in tickets],
        "prefills": scheduler.prefills,
        "prefill_tokens": scheduler.prefill_tokens,
        "prefill_cells": scheduler.prefill_cells,
    }


def _p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--synthetic", default=None, help="e.g. gemma-3-27b (random weights, see bench_extract.py)")
    ap.add_argument("--tokenizer", default=None, help="with --synthetic: a tokenizer directory")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--short", type=int, default=16)
    ap.add_argument("--long", type=int, default=4)
    ap.add_argument("--long-tokens", type=int, default=400)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.synthetic:
        from transformers import AutoTokenizer

        from personavec.modeling import local_model_path

        tok = AutoTokenizer.from_pretrained(args.tokenizer or local_model_path(EMBEDDED_MODEL))
        loaded = build_synthetic(args.synthetic, args.device, tokenizer=tok)
        name = f"{args.synthetic} (random bf16)"
    else:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        name = f"{args.model} ({args.dtype})"
    bodies = _bodies(args.short, args.long, args.long_tokens, args.max_tokens)
    _serve(loaded, bodies[:2], GROUPED)  # warm-up
    runs: dict[str, list[dict]] = {"one block": [], "grouped": []}
    for _ in range(args.repeats):
        for mode, tuning in (("one block", ONE_BLOCK), ("grouped", GROUPED)):
            runs[mode].append(_serve(loaded, bodies, tuning))
    best = {mode: min(rs, key=lambda r: r["wall_s"]) for mode, rs in runs.items()}
    lengths = best["grouped"]["prompt_lengths"]
    same = sum(a == b for a, b in zip(best["one block"]["tokens"], best["grouped"]["tokens"], strict=True))
    print(f"{name} on {args.device}, {platform.processor() or platform.machine()}, {args.threads} thread(s)")
    print(f"{len(bodies)} requests at once: {args.short} short + {args.long} long, prompt tokens "
          f"{min(lengths)}-{max(lengths)} ({sum(lengths)} in all), {args.max_tokens} tokens each")  # fmt: skip
    print("| mode | wall s (each repeat) | TTFT p50 short s | TTFT p90 all s | prefill forwards | cells (padding) |")
    print("|---|---:|---:|---:|---:|---:|")
    out: dict = {"same_tokens": same, "requests": len(bodies), "prompt_tokens": sum(lengths)}
    for mode, r in best.items():
        walls = ", ".join(f"{x['wall_s']:.2f}" for x in runs[mode])
        short = r["ttft"][: args.short] or r["ttft"]
        pad = r["prefill_cells"] - r["prefill_tokens"]
        figures = {"wall_s": r["wall_s"], "ttft_p50_short_s": _p(short, 50), "ttft_p90_s": _p(r["ttft"], 90)}
        out[mode] = {**figures, "prefills": r["prefills"], "prefill_cells": r["prefill_cells"]}
        print(f"| {mode} | {r['wall_s']:.2f} ({walls}) | {figures['ttft_p50_short_s']:.2f} | "
              f"{figures['ttft_p90_s']:.2f} | {r['prefills']} | {r['prefill_cells']} ({pad}) |")  # fmt: skip
    speedup = best["one block"]["wall_s"] / best["grouped"]["wall_s"]
    print(f"same tokens: {same} of {len(bodies)} requests; grouped is {speedup:.2f}x the one block's speed")
    line = json.dumps(out)
    print(line)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_prefill.json").write_text(line + "\n")


if __name__ == "__main__":
    main()
