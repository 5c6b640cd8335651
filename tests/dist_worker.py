"""One rank of a data-parallel extraction whose rank ``--die-rank`` kills itself (SIGKILL, no cleanup) after
``--die-after`` batches: how tests/test_distributed.py makes a rank die mid-run. Run it under ``accelerate launch``.

SIGTERM unwinds as in ``personavec.cli.main`` (the launcher sends it to the other ranks when one dies).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import traceback

from personavec.errors import Terminated
from personavec.extract import ExtractConfig, ExtractionProgress, run_extraction
from personavec.extract.launch import launched_rank
from personavec.workspace import Workspace


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workspace", required=True)
    ap.add_argument("--responses-run", type=int)
    ap.add_argument("--resume", type=int)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--layer", type=int, action="append")
    ap.add_argument("--chunk-rows", type=int, default=2)
    ap.add_argument("--max-batch-tokens", type=int, default=1)  # one example per batch: deaths land mid-share
    ap.add_argument("--die-rank", type=int, default=1)
    ap.add_argument("--die-after", type=int, default=1)
    args = ap.parse_args()

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signum}")

    signal.signal(signal.SIGTERM, terminate)
    rank, _ = launched_rank()
    batches = 0

    def progress(p: ExtractionProgress) -> None:
        nonlocal batches
        batches += 1
        if rank == args.die_rank and batches == args.die_after:
            os.kill(os.getpid(), signal.SIGKILL)

    config = None
    if args.resume is None:
        config = ExtractConfig(
            responses_run=args.responses_run,
            model=args.model,
            layers=tuple(args.layer) if args.layer else None,
            dtype="float32",
            device="cpu",
            chunk_rows=args.chunk_rows,
            max_batch_tokens=args.max_batch_tokens,
        )
    run_extraction(Workspace.resolve(args.workspace), config, resume=args.resume, progress=progress)


if __name__ == "__main__":
    # Leave at once, as the CLI's ranks do (personavec.cli, RELIABILITY row 120): left to the interpreter's teardown,
    # torch's process-group threads can hold a rank whose peer died (its Python SIGTERM handler never runs) until
    # the launcher kills it 30 s later.
    code = 0
    try:
        main()
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then exit 1 as it would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
