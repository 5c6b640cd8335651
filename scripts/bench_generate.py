"""Throughput of the generation pipeline against an instant local server: how fast answers can land in DuckDB.

Usage: .venv/bin/python scripts/bench_generate.py [n_personas] [n_questions] [n_samples] [concurrency]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fault_server import FaultServer  # noqa: E402

from personavec.generate import GenerateConfig, run_generation  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402


def main() -> None:
    n_p, n_q, n_s, conc = (int(a) for a in (sys.argv[1:] + ["23", "18", "2", "20"][len(sys.argv) - 1 :]))
    ws = init_workspace(Path(tempfile.mkdtemp()) / "ws")
    from personavec.builtin import PERSONAS

    with FaultServer() as server:
        config = GenerateConfig(
            personas=tuple(list(PERSONAS)[:n_p]),
            questions=tuple(range(n_q)),
            n_samples=n_s,
            model="fault-model",
            base_url=server.base_url,
            concurrency=conc,
        )
        t0 = time.perf_counter()
        result = run_generation(ws, config)
        wall = time.perf_counter() - t0
    print(
        f"{result.answers} answers, {result.failures} failures in {wall:.2f} s: {result.answers / wall:.0f} answers/s "
        f"(concurrency {conc}, group commit)"
    )


if __name__ == "__main__":
    main()
