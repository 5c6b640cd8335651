"""The `personavec` command line: a thin layer over the library, one module per stage."""

from personavec.cli import (
    core,  # noqa: F401  (registers commands)
    extract,  # noqa: F401  (registers extract)
    generate,  # noqa: F401  (registers generate and serve)
    judge,  # noqa: F401  (registers judge, rubrics, trait, export-direction)
    steer,  # noqa: F401  (registers steer, sweep-report, monitor)
    vectors,  # noqa: F401  (registers vector-stage commands)
)
from personavec.cli.app import app


def main() -> None:
    import os
    import signal

    from personavec.config import launched_world
    from personavec.errors import Terminated

    # SIGTERM unwinds like Ctrl-C does: context managers run, so a local server started by `serve`/`demo` stops
    # and a run in progress is marked interrupted (resumable) instead of failed or staying "running".
    rank, world = launched_world()
    # one process of a data-parallel launch: say which, and why a launcher sends SIGTERM (another rank stopped)
    where = (
        f" (rank {rank} of {world}; the launcher stops every rank when one of them stops: its output names the first)"
        if world > 1
        else ""
    )

    def terminate(signum: int, frame: object) -> None:
        raise Terminated(f"terminated by signal {signum}{where}")

    signal.signal(signal.SIGTERM, terminate)
    # A shell without job control starts background commands with SIGINT ignored, and Python then keeps it ignored:
    # `personavec serve &` could never be stopped with SIGINT. Ctrl-C / SIGINT always interrupts personavec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own Rich bars only (read by transformers)
    if world == 1:
        app()
        return
    _end_rank(app)


def _end_rank(command) -> None:  # type: ignore[no-untyped-def]
    """One rank of a multi-process launch: run ``command`` (the CLI, which closes the catalog and prints its outcome),
    then leave with its exit code at once. Left to the interpreter's teardown, torch's process-group threads could be
    destroyed while still joinable when a peer rank had just exited: the rank aborted ("terminate called without an
    active exception", exit 134 instead of its own code, which the launcher then named as the first failure)."""
    import logging
    import os
    import sys

    try:
        command()
        code = 0
    except SystemExit as exc:  # how click ends every command
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - printed as the interpreter would, then the same exit
        import traceback

        traceback.print_exc()
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


__all__ = ["app", "main"]
