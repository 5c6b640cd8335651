"""Benchmark the vector stage at the seed's scale: 23 personas x 18 questions, d_model 5376 (Gemma-3-27B).

Builds a real workspace with an ``extract`` run of random activations (414 Zarr rows x 1 layer x 5376), then times
``compute_vectors`` and ``load_vectors`` (cold: opening the catalog included; warm: catalog already open), against
the seed's way (a ``.pt`` dict of the same vectors, ``torch.load(weights_only=True)``), measured in the same run.
Prints a table; the last line is one JSON object.

    .venv/bin/python scripts/bench_vectors.py [--d-model 5376] [--repeats 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from personavec import EVAL_QUESTIONS, PERSONAS, arrays
from personavec.ingest import IngestConfig, ingest
from personavec.seed import load_persona_vectors
from personavec.store.extraction import add_examples, add_extraction_run, mark_rows_done
from personavec.store.responses import answered_responses
from personavec.store.runs import create_run, finish_run
from personavec.vectors import VectorConfig, compute_vectors, export_vectors, load_vectors
from personavec.workspace import init_workspace


def build(root: Path, d_model: int, layer: int = 40) -> tuple:
    ws = init_workspace(root / "ws")
    path = root / "responses.json"
    path.write_text(json.dumps({json.dumps([p, q]): f"{p}: {q}" for p in PERSONAS for q in EVAL_QUESTIONS}))
    with ws.catalog() as catalog:
        resp = ingest(ws, IngestConfig("responses", path, model="bench"))
        ids = [r.id for r in answered_responses(catalog, resp.run_id)]
        n = len(ids)
        with catalog.session() as session:
            run_id = create_run(session, "extract", {"bench": True})
        group = arrays.create_activation_array(ws.zarr_path, run_id, n, 1, d_model)
        arr = arrays.open_activation_array(ws.zarr_path, group, "r+")
        arrays.write_rows(arr, 0, np.random.default_rng(0).normal(size=(n, 1, d_model)).astype(np.float32))
        table = pa.table(
            {
                "response_id": pa.array(ids, pa.int64()),
                "row": pa.array(range(n), pa.int32()),
                "span_start": pa.array([0] * n, pa.int32()),
                "span_end": pa.array([1] * n, pa.int32()),
                "n_tokens": pa.array([1] * n, pa.int32()),
                "n_response_tokens": pa.array([1] * n, pa.int32()),
                "truncated": pa.array([False] * n),
            }
        )
        with catalog.session() as session:
            add_extraction_run(
                session, run_id, source_run_id=resp.run_id, model="bench", n_model_layers=62, d_model=d_model,
                layers=[layer], dtype="bfloat16", span_rule="exact", prompt_format="chat", device="cpu",
                zarr_group=group, n_examples=n,
            )  # fmt: skip
            add_examples(session, run_id, table)
            mark_rows_done(session, run_id, 0, n)
            finish_run(session, run_id, "done")
    return ws, run_id, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--d-model", type=int, default=5376)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        ws, ext_id, n = build(Path(tmp), args.d_model)
        t = time.perf_counter()
        res = compute_vectors(ws, VectorConfig(ext_id))
        compute_s = time.perf_counter() - t
        cold, warm = [], []
        for _ in range(args.repeats):
            ws.close()  # cold: the catalog is opened (and its schema checked) inside the timed call
            t = time.perf_counter()
            vs = load_vectors(res.run_id, workspace=ws)
            cold.append(time.perf_counter() - t)
        for _ in range(args.repeats):  # warm: the workspace's catalog stays open between calls
            t = time.perf_counter()
            vs = load_vectors(res.run_id, workspace=ws)
            warm.append(time.perf_counter() - t)
        assert tuple(vs.matrix.shape) == (len(PERSONAS), args.d_model)
        # Baseline: the seed's way to keep vectors, a .pt dict loaded with torch.load(weights_only=True).
        pt = Path(tmp) / "vectors.pt"
        export_vectors(vs, pt)
        seed = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            load_persona_vectors(pt)
            seed.append(time.perf_counter() - t)

    def ms(xs: list[float]) -> str:
        return f"{1000 * statistics.median(xs):>10.1f}{1000 * max(xs):>10.1f}"

    print(f"examples: {n} x d_model {args.d_model}; vectors: {len(vs)} x {vs.d_model}; {args.repeats} repeats")
    print(f"{'operation':<58}{'median ms':>10}{'max ms':>10}")
    print(f"{'compute_vectors (read Zarr, group means, one transaction)':<58}{1000 * compute_s:>10.1f}")
    print(f"{'load_vectors(run_id), cold: opens the catalog':<58}{ms(cold)}")
    print(f"{'load_vectors(run_id), warm: catalog already open':<58}{ms(warm)}")
    print(f"{'baseline: load_persona_vectors(.pt) (the seed)':<58}{ms(seed)}")
    print(
        json.dumps(
            {
                "d_model": args.d_model,
                "n_vectors": len(vs),
                "compute_ms": round(1000 * compute_s, 1),
                "load_cold_ms_median": round(1000 * statistics.median(cold), 1),
                "load_cold_ms_max": round(1000 * max(cold), 1),
                "load_warm_ms_median": round(1000 * statistics.median(warm), 1),
                "seed_pt_load_ms_median": round(1000 * statistics.median(seed), 1),
            }
        )
    )


if __name__ == "__main__":
    main()
