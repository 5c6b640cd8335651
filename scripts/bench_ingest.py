"""Benchmark: ingest 1M responses through the bulk path (Arrow + DuckDB insert) in every format, against the
ORM row-by-row insert (the baseline, measured on fewer rows in the same run and reported per row).

    .venv/bin/python scripts/bench_ingest.py [--rows 1000000] [--formats parquet,jsonl,csv,seed-json]

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from datetime import datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import yaml

from personavec.ingest import IngestConfig, ingest
from personavec.store import models as m
from personavec.store.runs import create_run
from personavec.workspace import init_workspace

EXT = {"parquet": "parquet", "jsonl": "jsonl", "csv": "csv", "seed-json": "json"}


def make_sets(tmp: Path, n_personas: int, n_questions: int) -> tuple[Path, Path]:
    personas = [{"name": f"persona_{i}", "system_prompt": f"You are persona number {i}."} for i in range(n_personas)]
    questions = [f"Question {j}: what do you think about topic {j}?" for j in range(n_questions)]
    (tmp / "p.yaml").write_text(yaml.safe_dump({"name": "bench", "personas": personas}))
    (tmp / "q.yaml").write_text(yaml.safe_dump({"name": "bench", "questions": questions}))
    return tmp / "p.yaml", tmp / "q.yaml"


def make_table(n_personas: int, n_questions: int) -> pa.Table:
    persona = [f"persona_{i}" for i in range(n_personas) for _ in range(n_questions)]
    question = [
        f"Question {j}: what do you think about topic {j}?" for _ in range(n_personas) for j in range(n_questions)
    ]
    text = [
        f"Answer of {p} to {q[:12]}: " + "lorem ipsum dolor sit amet " * 6
        for p, q in zip(persona, question, strict=True)
    ]
    return pa.table({"persona": persona, "question": question, "sample_index": [0] * len(persona), "text": text})


def write(table: pa.Table, fmt: str, path: Path) -> None:
    if fmt == "parquet":
        pq.write_table(table, path)
    elif fmt == "csv":
        pacsv.write_csv(table, path)
    elif fmt == "jsonl":
        with path.open("w") as f:
            for row in table.to_pylist():
                f.write(json.dumps(row) + "\n")
    else:
        doc = {json.dumps([r["persona"], r["question"]]): r["text"] for r in table.to_pylist()}
        path.write_text(json.dumps(doc))


def orm_baseline(ws, n: int) -> float:
    """Rows per second of the ORM path (session.add_all + commit), on the bench sets."""
    with ws.catalog() as catalog, catalog.session() as s:
        pid = s.connection().exec_driver_sql("SELECT min(id) FROM personas WHERE name LIKE 'persona_%'").scalar()
        qids = [
            r[0]
            for r in s.connection().exec_driver_sql(
                "SELECT q.id FROM questions q JOIN question_sets s ON s.id = q.question_set_id WHERE s.name = 'bench'"
            )
        ]
        run_id = create_run(s, "ingest-responses", {"bench": "orm"})
        now = datetime.now()
        t = time.perf_counter()
        s.add_all(
            m.Response(
                run_id=run_id,
                persona_id=pid,
                question_id=qids[i % len(qids)],
                sample_index=i // len(qids),
                text="lorem ipsum " * 16,
                attempts=1,
                created_at=now,
            )
            for i in range(n)
        )
        s.flush()
        dt = time.perf_counter() - t
        s.rollback()
    return n / dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000, help="responses per format (rounded to personas x 1000)")
    ap.add_argument("--formats", default="parquet,jsonl,csv,seed-json")
    ap.add_argument("--orm-rows", type=int, default=5000, help="rows for the ORM baseline")
    args = ap.parse_args()
    n_questions = 1000
    n_personas = max(1, args.rows // n_questions)
    rows = n_personas * n_questions
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        ws = init_workspace(tmp / "ws")
        pfile, qfile = make_sets(tmp, n_personas, n_questions)
        ingest(ws, IngestConfig("personas", pfile))
        ingest(ws, IngestConfig("questions", qfile))
        table = make_table(n_personas, n_questions)
        orm_rate = orm_baseline(ws, args.orm_rows)
        for fmt in args.formats.split(","):
            path = tmp / f"responses.{EXT[fmt]}"
            write(table, fmt, path)
            t = time.perf_counter()
            result = ingest(ws, IngestConfig("responses", path, persona_set="bench", question_set="bench", format=fmt))
            dt = time.perf_counter() - t
            assert result.rows == rows
            results[fmt] = {
                "seconds": round(dt, 2),
                "rows_per_s": round(rows / dt),
                "mb": round(path.stat().st_size / 1e6, 1),
            }
            path.unlink()
    print(f"ingest of {rows:,} responses on {platform.node()} ({platform.processor() or platform.machine()})")
    print(f"{'path':<22}{'file MB':>9}{'seconds':>10}{'rows/s':>12}{'vs ORM':>9}")
    for fmt, r in results.items():
        print(
            f"{'bulk ' + fmt:<22}{r['mb']:>9}{r['seconds']:>10}{r['rows_per_s']:>12,}"
            f"{r['rows_per_s'] / orm_rate:>8.0f}x"
        )
    print(
        f"{'ORM add_all (baseline)':<22}{'':>9}{rows / orm_rate:>10.0f}{orm_rate:>12,.0f}{1:>8}x   "
        f"(measured on {args.orm_rows:,} rows, seconds extrapolated)"
    )
    print(
        json.dumps(
            {
                "rows": rows,
                "formats": results,
                "orm_rows_per_s": round(orm_rate),
                "orm_projected_s": round(rows / orm_rate, 1),
                "max_seconds": max(r["seconds"] for r in results.values()),
            }
        )
    )


if __name__ == "__main__":
    main()
