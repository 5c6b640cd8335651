"""Benchmark: the cost of a unit of work on the catalog, with and without the warm hold of ``store/engine.py``.

A catalog opens a DuckDB connection per unit of work (so other processes get the file between them). Opening the
file builds a DuckDB instance (~25 ms); while one is open, a connection costs ~0.4 ms. The catalog therefore keeps
the instance ``LINGER_S`` after its last unit of work, never more than ``MAX_HOLD_S`` in a row. This measures, in
one process, with the hold (the defaults) and without it (both 0, what personavec did before):

- ``burst``: ``--units`` store calls back to back (``list_runs``), ms each;
- ``spaced``: the same with ``--gap-ms`` of other work between calls (a CLI command, a stage between commits);
- ``open``: open the catalog (the file and its schema revision checked), one store call, close: what every CLI
  command pays at least, ms (median of ``--units`` // 4);
- ``other process waits``: another process polls for the file every 10 ms while this one runs units back to back
  for up to 10 s: how long it waited (median of ``--repeats``).

    .venv/bin/python scripts/bench_catalog.py [--units 200 --gap-ms 10 --repeats 3]

Prints a table; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import platform
import select
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from personavec.store import engine  # noqa: E402
from personavec.store.runs import list_runs  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402

_POLLER = """
import duckdb, sys, time
print('ready', flush=True); sys.stdin.readline(); t = time.monotonic()
while True:
    try:
        c = duckdb.connect(sys.argv[1]); c.close(); break
    except duckdb.IOException:
        time.sleep(0.01)
print(f'{time.monotonic() - t:.4f}', flush=True)
"""


def per_unit_ms(ws, units: int, gap_s: float) -> float:
    cat = ws.catalog()
    list_runs(cat)
    time.sleep(0.6)  # nothing held
    t = time.perf_counter()
    for _ in range(units):
        list_runs(cat)
        if gap_s:
            time.sleep(gap_s)
    return ((time.perf_counter() - t) / units - gap_s) * 1000


def open_ms(ws, times: int) -> float:
    took = []
    for _ in range(times):
        ws.close()
        t = time.perf_counter()
        list_runs(ws.catalog())
        ws.close()
        took.append(time.perf_counter() - t)
    return statistics.median(took) * 1000


def other_waits_s(ws) -> float:
    child = subprocess.Popen(
        [sys.executable, "-c", _POLLER, str(ws.catalog_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdout.readline()
    ws.close()  # a fresh catalog: one that waited for another process holds nothing for SHARED_REST_S
    cat = ws.catalog()
    time.sleep(engine.MAX_HOLD_S + engine.LINGER_S + 0.2)  # no hold left from before, nor a rest after one
    list_runs(cat)  # the hold begins (with it)
    child.stdin.write("go\n")
    child.stdin.flush()
    start = time.monotonic()
    while not select.select([child.stdout], [], [], 0)[0] and time.monotonic() - start < 10:
        list_runs(cat)
    waited = float(child.stdout.readline())
    child.wait()
    return waited


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=200)
    ap.add_argument("--gap-ms", type=float, default=10.0)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ws = init_workspace(Path(tempfile.mkdtemp(prefix="bench-catalog-")) / "ws")
    defaults = (engine.LINGER_S, engine.MAX_HOLD_S)
    rows: dict[str, dict[str, float]] = {}
    for name, (linger, hold) in (("without the hold (0, 0)", (0.0, 0.0)), (f"with the hold {defaults}", defaults)):
        engine.LINGER_S, engine.MAX_HOLD_S = linger, hold
        ws.close()
        reps = range(args.repeats)
        rows[name] = {
            "burst_ms": statistics.median(per_unit_ms(ws, args.units, 0.0) for _ in reps),
            "spaced_ms": statistics.median(per_unit_ms(ws, args.units // 4, args.gap_ms / 1000) for _ in reps),
            "open_ms": open_ms(ws, args.units // 4),
            "other_waits_s": statistics.median(other_waits_s(ws) for _ in reps),
        }
    ws.close()
    print(f"{platform.processor() or platform.machine()}, python {platform.python_version()}; "
          f"{args.units} units a burst, spaced by {args.gap_ms:g} ms; medians of {args.repeats}")  # fmt: skip
    head = ("burst ms/unit", "spaced ms/unit", "open+unit+close ms", "other process waits s")
    print(f"{'':32s} {head[0]:>14s} {head[1]:>15s} {head[2]:>19s} {head[3]:>22s}")
    for name, r in rows.items():
        print(
            f"{name:32s} {r['burst_ms']:14.2f} {r['spaced_ms']:15.2f} {r['open_ms']:19.2f} {r['other_waits_s']:22.3f}"
        )
    print(json.dumps({"units": args.units, "gap_ms": args.gap_ms, "rows": rows}))


if __name__ == "__main__":
    main()
