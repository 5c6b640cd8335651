"""Benchmark: how fast answers land in the catalog, against an instant local OpenAI-compatible server.

The baseline, measured in the same run against the same server, is the seed's path: ``generate_responses`` with the
same concurrency and no catalog (answers kept in memory). The difference is what committing every answer as it
arrives costs.

    .venv/bin/python scripts/bench_generate.py [--personas 23] [--questions 18] [--samples 2] [--concurrency 20]

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fault_server import FaultServer  # noqa: E402  (a real HTTP server on 127.0.0.1; instant answers by default)

from personavec.builtin import EVAL_QUESTIONS, PERSONAS  # noqa: E402
from personavec.config import PersonaVectorConfig  # noqa: E402
from personavec.generate import GenerateConfig, generate_responses, run_generation  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", type=int, default=23)
    ap.add_argument("--questions", type=int, default=18)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=20)
    args = ap.parse_args()
    personas = list(PERSONAS)[: args.personas]
    questions = EVAL_QUESTIONS[: args.questions]
    n = len(personas) * len(questions) * args.samples
    with FaultServer() as server, tempfile.TemporaryDirectory() as tmp:
        seed_cfg = PersonaVectorConfig(
            openrouter_model="fault-model", base_url=server.base_url, max_concurrent_requests=args.concurrency
        )
        t0 = time.perf_counter()
        for _ in range(args.samples):  # the seed's API asks each pair once per call
            answers = generate_responses({p: PERSONAS[p] for p in personas}, questions, seed_cfg)
        seed_s = time.perf_counter() - t0
        assert len(answers) == len(personas) * len(questions)

        ws = init_workspace(Path(tmp) / "ws")
        config = GenerateConfig(
            personas=tuple(personas),
            questions=tuple(range(len(questions))),
            n_samples=args.samples,
            model="fault-model",
            base_url=server.base_url,
            concurrency=args.concurrency,
        )
        t0 = time.perf_counter()
        result = run_generation(ws, config)
        run_s = time.perf_counter() - t0
    assert result.answers == n and result.failures == 0

    print(f"{n:,} answers from an instant local server, concurrency {args.concurrency}, on {platform.node()}")
    print(f"{'path':<52}{'seconds':>9}{'answers/s':>11}")
    print(f"{'generate_responses (seed API, in memory; baseline)':<52}{seed_s:>9.2f}{n / seed_s:>11.0f}")
    print(f"{'run_generation (every answer committed to DuckDB)':<52}{run_s:>9.2f}{n / run_s:>11.0f}")
    print(
        json.dumps(
            {
                "answers": n,
                "concurrency": args.concurrency,
                "seed_api_answers_per_s": round(n / seed_s, 1),
                "catalog_answers_per_s": round(n / run_s, 1),
                "catalog_vs_seed": round(seed_s / run_s, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
