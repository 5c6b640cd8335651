"""Where a process of a data-parallel extraction stands and how ``personavec extract --num-processes N`` starts the
processes: the rank and world size the launcher set (:func:`launched_rank`), the devices of a rank
(:func:`rank_placement`), and :func:`launch` (accelerate's launcher on this machine), which names the rank that
failed first. The pipeline over the processes is :mod:`personavec.extract.distributed`."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from personavec.config import launched_world
from personavec.errors import ConfigError, Terminated
from personavec.tuning import DEFAULT


def launched_rank() -> tuple[int, int]:
    """``(rank, world size)`` of this process as the launcher (accelerate / torchrun) set them; ``(0, 1)`` alone.

    Reads the environment only (initializes nothing), so the CLI can tell rank 0 from the others up front."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return launched_world()


def world_size() -> int:
    """How many processes this run has (``WORLD_SIZE`` under ``accelerate launch``, else 1)."""
    return launched_rank()[1]


@dataclass(frozen=True)
class Placement:
    """Where one process puts its model: ``device``, or a ``device_map`` limited by ``max_memory`` to ``gpus``."""

    device: str
    device_map: str | None = None
    max_memory: dict[int | str, int | str] | None = None
    gpus: tuple[int, ...] = ()


def rank_placement(
    local_rank: int,
    local_world_size: int,
    gpus_per_process: int,
    gpu_memory: Sequence[int],
    *,
    device: str = "auto",
    device_map: str | None = None,
    weight_memory_fraction: float = DEFAULT.weight_memory_fraction,
) -> Placement:
    """The devices of process ``local_rank`` (of ``local_world_size`` on its machine).

    Args:
        local_rank: the process's index on its machine (``LOCAL_RANK``).
        local_world_size: processes on its machine.
        gpus_per_process: ``K``: process ``r`` takes GPUs ``r*K .. r*K+K-1``; with ``K > 1`` its model is sharded
            over them by ``device_map`` (``"auto"`` unless given), kept to them by ``max_memory``.
        gpu_memory: total bytes of each visible GPU (empty: no GPU, the process runs on CPU).
        device: the config's device; ``"cpu"`` keeps every process on the CPU, anything else lets the rank decide.
        device_map: the config's ``device_map`` (used with ``K > 1``).
        weight_memory_fraction: share of each GPU ``device_map`` may fill with weights (with ``K > 1``).

    Example:
        >>> rank_placement(1, 2, 2, [80 << 30] * 4).gpus
        (2, 3)
    """
    if device == "cpu" or not gpu_memory:
        return Placement("cpu")
    need = local_world_size * gpus_per_process
    if need > len(gpu_memory):
        raise ConfigError(
            f"{local_world_size} processes x {gpus_per_process} GPUs per process need {need} GPUs; this machine has "
            f"{len(gpu_memory)}: launch at most {len(gpu_memory) // gpus_per_process} processes per machine"
        )
    gpus = tuple(range(local_rank * gpus_per_process, (local_rank + 1) * gpus_per_process))
    if gpus_per_process == 1:
        return Placement(f"cuda:{gpus[0]}", gpus=gpus)
    budget: dict[int | str, int | str] = {g: int(gpu_memory[g] * weight_memory_fraction) for g in gpus}
    return Placement(f"cuda:{gpus[0]}", device_map=device_map or "auto", max_memory=budget, gpus=gpus)


def free_port() -> int:
    """A TCP port free on this machine now (for the launcher's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


#: Set by :func:`launch` for the processes it starts: rank 0 writes the id of the run it opened there.
RUN_ID_FILE_ENV = "PERSONAVEC_RUN_ID_FILE"


@dataclass(frozen=True)
class Launched:
    """How a :func:`launch` ended: the exit code (0: every rank succeeded), the run rank 0 opened (if it got that
    far) and, when a rank failed, which one failed first and how."""

    code: int
    run_id: int | None = None
    first_failure: str | None = None


def launch(args: Sequence[str], num_processes: int, *, main_process_port: int | None = None) -> Launched:
    """Run ``python -m personavec ARGS`` in ``num_processes`` processes on this machine with accelerate's launcher
    (``accelerate launch --multi_gpu --num_processes N -m personavec ARGS``). When a rank fails, the launcher
    stops the others (SIGTERM): the outcome names the rank that failed first, its exit code (rank 0's when it
    failed, else the first failing rank's; a rank killed by signal N gives 128+N) and the run rank 0 opened.

    Example:
        >>> launch(["extract", "--responses-run", "2", "-w", "ws"], 2).code
        0
    """
    import tempfile

    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    argv = ["--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"]
    argv += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    argv += ["--main_process_port", str(main_process_port or free_port()), "-m", "personavec", *args]
    with tempfile.TemporaryDirectory(prefix="personavec-launch-") as tmp:
        run_file = Path(tmp) / "run_id"
        saved = os.environ.get(RUN_ID_FILE_ENV)
        os.environ[RUN_ID_FILE_ENV] = str(run_file)  # the launcher starts the ranks with this environment
        # torch-elastic replaces this process's SIGINT/SIGTERM/SIGHUP/SIGQUIT handlers with its own (raising
        # SignalException) and never puts them back: they are restored, and its exception given as Ctrl-C / SIGTERM
        handlers = _signal_handlers()
        try:
            launch_command(launch_command_parser().parse_args(argv))
        except (SignalException, SystemExit) as exc:
            # accelerate turns the SignalException (its ranks already stopped) into sys.exit(128 + signal)
            signalled = exc if isinstance(exc, SignalException) else exc.__context__
            if not isinstance(signalled, SignalException):
                raise
            if signalled.sigval == signal.SIGINT:
                raise KeyboardInterrupt from exc
            raise Terminated(f"terminated by signal {int(signalled.sigval)}") from exc
        except ChildFailedError as exc:
            # The launcher SIGTERMs the ranks left once one fails, and failure times are whole seconds: a rank
            # ended by SIGTERM is taken to have been stopped, not to have failed first.
            stopped = -signal.SIGTERM
            failures = sorted(exc.failures.items(), key=lambda kv: (kv[1].exitcode == stopped, kv[1].timestamp, kv[0]))
            rank, first = failures[0]
            own = exc.failures.get(0)
            code = own.exitcode if own is not None and own.exitcode != stopped else first.exitcode
            how = f"killed by signal {-first.exitcode}" if first.exitcode < 0 else f"exit code {first.exitcode}"
            text = run_file.read_text().strip() if run_file.exists() else ""
            return Launched(
                128 - code if code < 0 else code or 1,
                int(text) if text.isdigit() else None,
                f"rank {rank} of {num_processes} failed first ({how}); the launcher then stopped the others",
            )
        finally:
            for signum, handler in handlers.items():
                signal.signal(signum, handler)
            if saved is None:
                os.environ.pop(RUN_ID_FILE_ENV, None)
            else:
                os.environ[RUN_ID_FILE_ENV] = saved
    return Launched(0)


def _signal_handlers() -> dict[int, Any]:
    """The handlers of the signals torch-elastic takes over, when this is the main thread (elsewhere it takes none)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        return {}
    names = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
    return {sig: signal.getsignal(sig) for sig in (getattr(signal, n) for n in names if hasattr(signal, n))}


def tell_launcher(run_id: int) -> None:
    """Rank 0, started by :func:`launch`: write the run's id where the launching process reads it."""
    path = os.environ.get(RUN_ID_FILE_ENV)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(str(run_id))
