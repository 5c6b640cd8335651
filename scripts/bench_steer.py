"""Benchmark: the local engine against `personavec serve` on the same model and workload, and the cost of steering.

Same persona x question set, same max_tokens, greedy (temperature 0), answers landing in a catalog either way:

- serve: ``personavec serve`` (``transformers serve``) and the remote engine at ``--concurrency`` requests in flight;
- local: ``--engine local`` at each ``--batch-size``, the model loaded once beforehand (load time printed apart);
- local + steering: the same with ``add`` at the default layer, coefficient 0 (the hooks' cost alone).

    .venv/bin/python scripts/bench_steer.py [--personas 4] [--questions 4] [--max-tokens 32] [--batch-size 1 16]
        [--concurrency 2] [--device cpu] [--no-serve]

Completion tokens per second count generated tokens (up to and including end-of-turn) over the run's wall time;
``load_avg`` is the machine's 1-minute load average when the row finished (a shared machine skews every figure).
Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from personavec.builtin import PERSONAS
from personavec.generation.config import GenerateConfig, LocalOptions
from personavec.generation.generate import run_generation
from personavec.generation.local import load_for
from personavec.serve import EMBEDDED_MODEL, local_server
from personavec.steering.interventions import LayerIntervention, Steerer
from personavec.workspace import init_workspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--personas", type=int, default=4)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--no-serve", action="store_true")
    args = ap.parse_args()
    personas = tuple(list(PERSONAS)[: args.personas])
    base = GenerateConfig(
        model=args.model,
        personas=personas,
        questions=tuple(range(args.questions)),
        max_tokens=args.max_tokens,
        temperature=0.0,
        concurrency=1,
        timeout_s=600.0,
        max_retries=1,
    )
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws")

        def record(engine: str, setting: str, res) -> None:
            rows.append(
                {
                    "engine": engine,
                    "setting": setting,
                    "answers": res.answers,
                    "completion_tokens": res.completion_tokens,
                    "wall_s": round(res.wall_s, 2),
                    "tok_s": round(res.completion_tokens / res.wall_s, 1),
                    "answers_s": round(res.answers / res.wall_s, 2),
                    "load_avg": round(os.getloadavg()[0], 1),
                }
            )
            print(rows[-1], flush=True)

        local = dataclasses.replace(base, engine="local", local=LocalOptions(device=args.device))
        t0 = time.perf_counter()
        loaded = load_for(local)
        load_s = time.perf_counter() - t0
        from personavec.generation.local import run_local_generation

        for b in args.batch_size:
            cfg = dataclasses.replace(local, local=dataclasses.replace(local.local, batch_size=b))
            record("local", f"batch {b}", run_local_generation(ws, cfg, loaded=loaded))
        # The hooks alone: add with coefficient 0 at the default layer, on the largest batch.
        b = max(args.batch_size)
        cfg = dataclasses.replace(local, local=dataclasses.replace(local.local, batch_size=b))
        vector = torch.zeros(loaded.d_model)
        layer = int(loaded.n_layers * 0.65 + 0.5)
        with Steerer(loaded.model, [LayerIntervention(layer, "add", vector, scale=0.0)]):
            record("local+hook", f"batch {b}", run_local_generation(ws, cfg, loaded=loaded))

        if not args.no_serve:
            with local_server(args.model, device=args.device) as server:
                for c in args.concurrency:
                    cfg = dataclasses.replace(base, model=server.model, base_url=server.base_url, concurrency=c)
                    record("serve", f"concurrency {c}", run_generation(ws, cfg))

    print(
        f"\nmodel {args.model} on {args.device} ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads); model load for the local engine {load_s:.1f} s"
    )
    print(
        f"{'engine':<12}{'setting':<16}{'answers':>8}{'tokens':>8}{'wall s':>9}{'tok/s':>8}{'answers/s':>11}{'load':>6}"
    )
    for r in rows:
        print(
            f"{r['engine']:<12}{r['setting']:<16}{r['answers']:>8}{r['completion_tokens']:>8}{r['wall_s']:>9}"
            f"{r['tok_s']:>8}{r['answers_s']:>11}{r['load_avg']:>6}"
        )
    print(json.dumps({"model": args.model, "device": args.device, "load_s": round(load_s, 2), "rows": rows}))


if __name__ == "__main__":
    main()
