"""Data-parallel extraction: one model replica per process, launched by accelerate, one catalog writer.

``accelerate launch -m personavec extract ...`` (or ``personavec extract --num-processes N``, which calls
accelerate's launcher) starts N processes; in each, :func:`personavec.extract.run_extraction` sees a world size > 1
and calls :func:`run_distributed`. Who does what:

- **Rank 0 alone opens the catalog** (DuckDB has one writer per file; the catalog lives on rank 0's machine). It
  resolves the config (a new run, or ``resume``: the stored config), sends it to the other ranks, and opens the run
  as one process would (a new one recorded with every row pending, its array created after the commit).
- **Shares are whole write units (shards), balanced by characters** (:func:`split_chunks`, before anything is
  tokenized): a unit belongs to one rank, which alone writes it; the cheapest units form a pool claimed one at a
  time. Every rank runs the one-process pipeline (:func:`personavec.extract.pipeline.compute`) over its share and
  the units it claims: it tokenizes them itself, window by window, and writes them with the same writer pool, so no
  two processes ever write one shard.
- **Rank 0 takes the finished chunks into the catalog**: the other ranks report each chunk once it is written;
  rank 0 checks that it came from the rank that owns it, marks it done with its own, and closes the run ``done``
  only when every rank finished and every row is done. A rank that fails or dies leaves the run ``failed`` or
  ``interrupted`` (or ``running`` with a dead owner, shown as ``interrupted``): ``--resume`` with any number of
  processes computes only the rows not done.

Messages travel on two gloo process groups of their own (the backend accelerate chose, NCCL on GPUs, is not used):
rank 0 -> others (``config``, ``pool``, ``plan``, ``result``, ``error``) and others -> rank 0 (``batch``, ``finished``:
each window's plan first, then the rows written). Each process receives on a thread into a queue, because a gloo
receive can neither be polled nor abandoned (a timed-out wait closes the connection); the main thread waits on the
queue with a timeout, so Ctrl-C and SIGTERM still reach a waiting rank.

Several machines: the same command with accelerate's multi-node options. The workspace (catalog) is needed only on
rank 0's machine; the activation store must be reachable from every rank under one name: a shared filesystem
mounted at the same path, or an fsspec URL (``personavec init --zarr-url``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import pickle
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from personavec import arrays
from personavec.errors import DistributedError, ExtractionInterrupted, RunInterrupted
from personavec.extract.config import (
    ExtractConfig,
    ExtractionProgress,
    ExtractionResult,
    load_for,
    render_all,
    resume_config,
)
from personavec.extract.launch import rank_placement, tell_launcher
from personavec.extract.pipeline import compute, new_config, planned_windows
from personavec.extract.plan import Pending, Window, budget, plan_window
from personavec.extract.record import Opened, new_run, resumed_run
from personavec.extract.sink import resolved
from personavec.modeling import LoadedModel
from personavec.store import extraction as xs
from personavec.tuning import DEFAULT, Tuning
from personavec.writer import Committer

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace

log = logging.getLogger(__name__)

#: How long a rank waits for another one's next message; liveness comes from the connections (a dead rank's
#: connection closes at once) and from the launcher, which stops every rank when one fails.
MESSAGE_TIMEOUT = timedelta(days=7)
_HEADER_TAG, _PAYLOAD_TAG = 17, 18
_POOLED = -1  # the owner of a pool unit nobody reported yet
_POLL_S = 0.2


# -- where a process loads its model ------------------------------------------------------------------------------


def _load(config: ExtractConfig, local_rank: int, local_world_size: int, tuning: Tuning) -> LoadedModel:
    import torch

    n_gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    memory = [torch.cuda.get_device_properties(i).total_memory for i in range(n_gpus)]
    where = rank_placement(
        local_rank,
        local_world_size,
        config.gpus_per_process,
        memory,
        device=config.device,
        device_map=config.device_map,
        weight_memory_fraction=tuning.weight_memory_fraction,
    )
    if where.gpus:
        torch.cuda.set_device(where.gpus[0])  # accelerate made cuda:LOCAL_RANK current; K > 1 starts elsewhere
    return load_for(
        dataclasses.replace(config, device=where.device, device_map=where.device_map), max_memory=where.max_memory
    )


# -- the split ---------------------------------------------------------------------------------------------------


def split_chunks(
    rows: Sequence[int], costs: Sequence[int], chunk_rows: int, n_ranks: int, pool_fraction: float = 0.0
) -> tuple[list[list[int]], list[list[int]]]:
    """Indices into ``rows`` for each rank, and a pool of write units shared out as the run goes: every Zarr chunk
    (``row // chunk_rows``) whole to one rank or to the pool. The cheapest units, ``pool_fraction`` of the tokens at
    most, make the pool (costliest first); the others go costliest first to the least loaded rank
    (longest-processing-time), so ranks get about equal tokens, and the pool evens out ranks that run at different
    speeds.

    Args:
        rows: Zarr row of each example to compute.
        costs: its cost (forward tokens).
        chunk_rows: rows per Zarr chunk.
        n_ranks: processes.
        pool_fraction: share of the tokens kept for the pool.

    Returns:
        ``(shares, pool)``: ``n_ranks`` lists of indices, each in row order, and the pool's units, each a list of
        indices in row order; together they hold every index exactly once.
    """
    chunks: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        chunks.setdefault(row // chunk_rows, []).append(i)
    cost = {c: sum(costs[i] for i in members) for c, members in chunks.items()}
    order = sorted(chunks, key=lambda c: (-cost[c], c))
    pooled: list[int] = []
    budget = pool_fraction * sum(cost.values())
    while order and cost[order[-1]] <= budget:  # the cheapest units, while they fit
        budget -= cost[order[-1]]
        pooled.append(order.pop())
    load = [0] * n_ranks
    shares: list[list[int]] = [[] for _ in range(n_ranks)]
    for c in order:
        rank = min(range(n_ranks), key=lambda r: (load[r], r))
        shares[rank].extend(chunks[c])
        load[rank] += cost[c]
    by_row = rows.__getitem__
    return [sorted(share, key=by_row) for share in shares], [sorted(chunks[c], key=by_row) for c in reversed(pooled)]


# -- messages ----------------------------------------------------------------------------------------------------


def _pickled(message: tuple) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class _Channel:
    """Objects between rank 0 and the others over two gloo groups, received on a thread (see the module doc)."""

    def __init__(self, rank: int, world: int) -> None:
        import torch.distributed as dist

        self.rank, self.world = rank, world
        # every rank creates both groups, in the same order (new_group is collective)
        self._up = dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT)
        self._down = dist.new_group(backend="gloo", timeout=MESSAGE_TIMEOUT)
        self.inbox: queue.Queue[tuple[int, Any]] = queue.Queue()
        self.lost: str | None = None
        self._open = set(range(1, world)) if rank == 0 else {0}  # who may still send to us
        self._thread = threading.Thread(target=self._receive, name="personavec-dp-receive", daemon=True)
        self._thread.start()

    def send(self, dst: int, message: tuple | bytes) -> None:
        """Send ``message`` (or a message already pickled with :func:`_pickled`: one pickling for many ranks)."""
        import torch
        import torch.distributed as dist

        group = self._down if self.rank == 0 else self._up
        payload = message if isinstance(message, bytes) else _pickled(message)
        dist.send(torch.tensor([self.rank, len(payload)], dtype=torch.int64), dst=dst, group=group, tag=_HEADER_TAG)
        dist.send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), dst=dst, group=group, tag=_PAYLOAD_TAG)

    def tell_others(self, message: tuple, *, quiet: bool = False) -> None:
        """Rank 0: send ``message`` to every other rank (``quiet``: skip ranks that cannot be reached)."""
        for dst in range(1, self.world):
            try:
                self.send(dst, message)
            except Exception:
                if not quiet:
                    raise

    def _receive(self) -> None:
        import torch
        import torch.distributed as dist

        group, src = (self._up, None) if self.rank == 0 else (self._down, 0)
        header = torch.zeros(2, dtype=torch.int64)
        while self._open:
            try:
                dist.recv(header, src=src, group=group, tag=_HEADER_TAG)
                sender, size = (int(x) for x in header.tolist())
                data = torch.empty(size, dtype=torch.uint8)
                dist.recv(data, src=sender, group=group, tag=_PAYLOAD_TAG)
                message = pickle.loads(data.numpy().tobytes())
            except Exception as exc:  # a peer's connection closed: it died, or stopped without a word
                self.lost = f"{type(exc).__name__}: {exc}"
                self.inbox.put((-1, ("lost", self.lost)))
                return
            if message[0] in ("finished", "result", "error"):  # the last message a peer sends us
                self._open.discard(sender)
            self.inbox.put((sender, message))

    def get(self, timeout: float | None = None) -> tuple[int, tuple] | None:
        """The next ``(sender, message)``; None when ``timeout`` seconds pass without one. Waits in short steps,
        so that signals (Ctrl-C, SIGTERM) are handled while waiting."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            step = _POLL_S if deadline is None else min(_POLL_S, max(deadline - time.monotonic(), 0.0))
            try:
                return self.inbox.get(timeout=step)
            except queue.Empty:
                if deadline is not None and time.monotonic() >= deadline:
                    return None

    def expect(self, *kinds: str) -> tuple:
        """The next message from rank 0, which must be one of ``kinds``; an ``error`` or a lost rank 0 raises."""
        got = self.get()
        assert got is not None  # no timeout: get() only returns with a message
        _, message = got
        if message[0] == "error":
            raise DistributedError(message[1])
        if message[0] == "lost":
            raise DistributedError(f"rank {self.rank} lost contact with rank 0 ({message[1]})")
        if message[0] not in kinds:
            raise DistributedError(f"rank {self.rank} expected {'/'.join(kinds)} from rank 0, got {message[0]!r}")
        return message


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


# -- what rank 0 sends each rank ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Share:
    info: xs.ExtractionRunInfo
    location: str  # the activation store, as every rank opens it
    pending: Pending  # this rank's rows (whole write units) and their conversations; the rank tokenizes them
    present: frozenset[int]  # write units already in the store (resume): the writer completes them, never blanks
    claims: tuple[str, int]  # where to claim the pool's units (sent before, the same to every rank): rank 0's counter


class _Claims:
    """Who computes each unit of the pool: an atomic counter in a ``TCPStore`` served by rank 0, so that each unit
    goes to exactly one rank, the first to ask, without waiting for rank 0's main thread."""

    def __init__(self, store: Any, rank: int) -> None:
        self.store, self.rank = store, rank

    @classmethod
    def serve(cls) -> _Claims:
        """Rank 0's counter, on a free port of every interface of its machine."""
        import torch.distributed as dist

        return cls(dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=_CLAIM_TIMEOUT), 0)

    @classmethod
    def connect(cls, address: tuple[str, int], rank: int) -> _Claims:
        import torch.distributed as dist

        try:
            return cls(_interruptible(lambda: dist.TCPStore(*address, is_master=False, timeout=_CLAIM_TIMEOUT)), rank)
        except Exception as exc:
            raise DistributedError(f"rank {rank} could not reach rank 0's work pool at {address}: {exc}") from exc

    @property
    def address(self) -> tuple[str, int]:
        """How the other ranks reach the counter: the launcher's address of rank 0 (``MASTER_ADDR``)."""
        return os.environ.get("MASTER_ADDR") or "127.0.0.1", int(self.store.port)

    def claim(self) -> int:
        """The next unclaimed unit's index (past the pool's end once all are claimed)."""
        try:
            return _interruptible(lambda: int(self.store.add("claimed", 1)) - 1)
        except Exception as exc:  # rank 0 (which serves the counter) is gone
            raise DistributedError(f"rank {self.rank} lost contact with rank 0 (claiming work): {exc}") from exc


#: How long a rank waits for rank 0's counter (connecting, or retrying once rank 0 is gone) before it fails.
_CLAIM_TIMEOUT = timedelta(minutes=1)
T = TypeVar("T")


def _interruptible(call: Callable[[], T]) -> T:
    """``call()`` (a blocking call into torch's C++ store client) on a thread of its own, waited on in short steps.

    Once rank 0 is gone the store's client retries in C++ for up to :data:`_CLAIM_TIMEOUT`, where neither Ctrl-C
    nor the launcher's SIGTERM reached the main thread (the launcher then waited 30 s before killing the rank).
    Signals are handled between the steps; the call's own thread is left behind (a daemon)."""
    got: list[T] = []
    failed: list[BaseException] = []

    def run() -> None:
        try:
            got.append(call())
        except BaseException as exc:  # raised on the caller's thread
            failed.append(exc)

    thread = threading.Thread(target=run, name="personavec-dp-store", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(_POLL_S)
    if failed:
        raise failed[0]
    return got[0]


def _windows(
    own: Iterator[Window],
    pool: Sequence[Pending],
    claims: _Claims,
    loaded: LoadedModel,
    config: ExtractConfig,
    opened: Opened,
    tuning: Tuning,
) -> Iterator[Window]:
    """A rank's plan windows: its own share's, then each pool unit it claims (one write unit, tokenized then, one
    window that adds its rows to the session), until the pool is empty."""
    yield from own
    n_rows, per, limit = opened.info.n_examples, arrays.rows_per_chunk(opened.array), budget(config, loaded, tuning)
    while (k := claims.claim()) < len(pool):
        unit = pool[k]
        window = plan_window(
            unit, render_all(loaded, config, unit.conversations), n_rows=n_rows, chunk_rows=per,
            max_batch_tokens=limit, max_batch_size=config.max_batch_size,
        )  # fmt: skip
        yield dataclasses.replace(window, adds=tuple(unit.rows))


class _LeadSink:
    """Rank 0's :class:`~personavec.extract.sink.RunSink`: its own chunks and the other ranks' reports go to the
    catalog; the run closes when all ended.

    The catalog's units of work run on the background :class:`~personavec.writer.Committer` (one at a time, in
    order), so that rank 0's model does not wait for them: rank 0 marks every rank's chunks, which would otherwise
    slow it alone. A failed one raises at the next report and fails the run at the end."""

    def __init__(
        self,
        catalog: Catalog,
        info: xs.ExtractionRunInfo,
        channel: _Channel,
        owners: dict[int, int],
        chunk_rows: int,
        n_pending: int,
    ) -> None:
        self.catalog, self.run_id = catalog, info.run_id
        self.info, self.channel, self.owners, self.n_pending = info, channel, owners, n_pending
        self.chunk_rows = chunk_rows
        self.running = set(range(1, channel.world))
        self.problems: dict[str, list[str]] = {"failed": [], "interrupted": []}
        self.computed = [0] * channel.world
        self.tokens = [0] * channel.world
        self.seconds = [0.0] * channel.world  # each rank's compute time, for the log
        self.started = time.perf_counter()
        self.status = "running"
        self.error: str | None = None
        self.tok_s = 0.0
        self.committer = Committer("personavec-dp-catalog")
        self._failed = False
        self.counts = (0, 0)
        self.no_span = 0  # rows of this session planned without a span (done, nothing computed)

    def last_batch_launched(self) -> None:
        """Rank 0 keeps marking in the background: the other ranks may still be computing."""

    def _submit(self, fn: Callable[..., None] | None, *args: Any) -> None:
        if self._failed:  # raised once already; finish records it
            return
        try:
            if fn is not None:
                self.committer.submit(fn, self.catalog, self.run_id, *args)
            else:
                self.committer.check()
        except Exception:
            self._failed = True
            raise

    def _mark(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._submit(xs.mark_done if ranges else None, list(ranges))

    def planned(self, table: pa.Table) -> None:
        self.no_span += int(pc.sum(table["done"]).as_py() or 0)
        self._submit(xs.plan_examples, table)

    def _accept_plan(self, sender: int, table: pa.Table) -> None:
        units = {row // self.chunk_rows for row in table["row"].to_pylist()}
        if not all([self._owns(sender, unit) for unit in units]):
            self.problems["failed"].append(f"rank {sender} planned rows not in units it owns")
            return
        self.planned(table)

    def _settle(self) -> str | None:
        """Wait for every unit of work; the first error, if one failed."""
        try:
            self.committer.close()
        except Exception as exc:
            return f"marking rows done in the catalog failed: {_describe(exc)}"
        return None

    def _owns(self, sender: int, unit: int) -> bool:
        if self.owners.get(unit) == _POOLED:  # a pool unit belongs to the rank that claimed it: the first to report
            self.owners[unit] = sender
        return self.owners.get(unit) == sender

    def _accept(self, sender: int, ranges: Sequence[tuple[int, int]]) -> None:
        # Ranges are rows whose write completed: whole write units, or (durability flushes) part of one, possibly
        # again later as the unit fills; every unit they touch must be the sender's.
        good = []
        for start, stop in ranges:
            units = range(start // self.chunk_rows, (stop - 1) // self.chunk_rows + 1)
            if stop <= start or not all([self._owns(sender, unit) for unit in units]):
                self.problems["failed"].append(f"rank {sender} reported rows {start}:{stop}, not in units it owns")
                continue
            good.append((start, stop))
        self._mark(good)

    def _take(self, sender: int, message: tuple) -> None:
        kind = message[0]
        if kind == "batch":
            _, tables, ranges, self.computed[sender], self.tokens[sender] = message
            for table in tables:  # recorded before any of their rows is marked done
                self._accept_plan(sender, table)
            self._accept(sender, ranges)
        elif kind == "finished":
            _, status, error, tables, ranges, self.computed[sender], self.tokens[sender], self.seconds[sender] = message
            for table in tables:
                self._accept_plan(sender, table)
            self._accept(sender, ranges)
            self.running.discard(sender)
            if status != "done":
                self.problems["failed" if status == "failed" else "interrupted"].append(f"rank {sender}: {error}")
        elif kind == "lost":  # a rank died (killed, machine lost): stopped rather than failed
            self.problems["interrupted"].append(f"lost contact with rank(s) {sorted(self.running)}: {message[1]}")
            self.running.clear()
        else:
            self.problems["failed"].append(f"rank {sender} sent {kind!r} during the run")

    def receive(self, wait: bool = False) -> None:
        """Take every report that arrived; with ``wait``, until every other rank finished (or was lost)."""
        while True:
            got = self.channel.get(None if wait and self.running else 0.0)
            if got is None:
                return
            self._take(*got)

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        self._mark(ranges)
        self.receive()

    def drain(self, ranges: Sequence[tuple[int, int]], *, raise_errors: bool = True) -> list[tuple[int, int]]:
        # rank 0's last rows join the queue; finish waits for it (after the other ranks) before closing the run
        try:
            self._mark(ranges)
        except Exception:
            if raise_errors:
                raise
        return []

    def finish(
        self, status: str, error: str | None, tokens: int, elapsed_s: float, left: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        self.tokens[0], self.seconds[0] = tokens, elapsed_s
        stopped: BaseException | None = None
        try:
            self.receive(wait=status == "done")
        except KeyboardInterrupt as exc:  # Ctrl-C / SIGTERM while waiting for the others
            status, error, stopped = "interrupted", _describe(exc), exc
        marking = self._settle()
        if marking is not None:
            self.problems["failed"].append(marking)
        others = self.problems["failed"] + self.problems["interrupted"]
        if status == "done" and others:
            status = "failed" if self.problems["failed"] else "interrupted"
        if others:
            error = "; ".join(([error] if error and error not in others else []) + others)
        if status == "done":
            missing = self.info.n_examples - xs.done_count(self.catalog, self.run_id)
            if missing:
                status, error = "failed", f"{missing} rows were not reported written by any rank"
        elapsed = time.perf_counter() - self.started
        total = sum(self.tokens)
        self.tok_s = total / elapsed if elapsed > 0 and total else 0.0
        self.counts = xs.finish_extraction(self.catalog, self.run_id, status, error, self.tok_s or None, left)
        self.status, self.error = status, error
        for rank in range(self.channel.world):
            log.info(
                "extraction run %d, rank %d: %d examples, %d tokens in %.1f s",
                self.run_id, rank, self.computed[rank], self.tokens[rank], self.seconds[rank],
            )  # fmt: skip
        log.info("extraction run %d: %s, %d tokens in %.1f s on %d ranks", self.run_id, status, total, elapsed,
                 self.channel.world)  # fmt: skip
        if stopped is not None:
            raise RunInterrupted(self.run_id, f"personavec extract --resume {self.run_id}") from stopped
        return self.counts

    def progress_for(
        self, progress: Callable[[ExtractionProgress], None] | None
    ) -> Callable[[ExtractionProgress], None]:
        """Counts rank 0's own work (``done_examples``: what it computed) and calls the user's callback with the
        whole run's numbers."""
        before = self.info.n_examples - self.n_pending

        def report(p: ExtractionProgress) -> None:
            self.computed[0] = p.done_examples
            self.tokens[0] = p.tokens
            if progress is not None:
                done = before + sum(self.computed)
                progress(ExtractionProgress(p.run_id, done, p.total_examples, sum(self.tokens), p.elapsed_s))

        return report


def _lead(
    ws: Workspace,
    config: ExtractConfig | None,
    resume: int | None,
    progress: Callable[[ExtractionProgress], None] | None,
    loaded: LoadedModel | None,
    channel: _Channel,
    local: tuple[int, int],
    tuning: Tuning,
) -> ExtractionResult:
    info: xs.ExtractionRunInfo | None = None
    catalog = None
    try:
        catalog = ws.catalog()
        config = new_config(config) if resume is None else resume_config(catalog, resume, config)
        channel.tell_others(("config", config))
        loaded = loaded or _load(config, *local, tuning)
        started = time.perf_counter()
        if resume is None:  # recorded as one process would; shares need many units
            opened, pending = new_run(
                ws, catalog, config, config.responses_run, loaded, tuning,  # type: ignore[arg-type]
                min_units=channel.world * tuning.units_per_rank, min_unit_rows=1,
            )  # fmt: skip
        else:
            opened, pending = resumed_run(ws, catalog, resume, config, loaded)
        info = opened.info
        tell_launcher(info.run_id)
        per = arrays.rows_per_chunk(opened.array)
        costs = [len(a) + len(q) + len(sp or "") for sp, q, a in pending.conversations]  # before tokenizing
        shares, pooled = split_chunks(pending.rows, costs, per, channel.world, tuning.pool_fraction)
        pool = [pending.take(unit) for unit in pooled]
        claims = _Claims.serve()
        pool_message = _pickled(("pool", pool))  # the same for every rank: pickled once
        for rank in range(1, channel.world):
            share = _Share(
                info, ws.zarr_location, pending.take(shares[rank]), frozenset(opened.present), claims.address
            )
            channel.send(rank, pool_message)
            channel.send(rank, ("plan", share))
    except BaseException as exc:
        channel.tell_others(("error", f"rank 0 could not open the run: {_describe(exc)}"), quiet=True)
        if info is not None and catalog is not None:  # the run exists: leave it resumable, not "running"
            xs.finish_extraction(catalog, info.run_id, "failed", _describe(exc), None)
        raise
    owners = {pending.rows[i] // per: rank for rank, share in enumerate(shares) for i in share}
    owners.update({unit.rows[0] // per: _POOLED for unit in pool})
    mine = pending.take(shares[0])
    sink = _LeadSink(catalog, info, channel, owners, per, len(pending))
    opened = dataclasses.replace(opened, n_done=0)  # progress counts rank 0's own rows (progress_for)
    windows = _windows(
        planned_windows(loaded, config, opened.shape, mine, tuning), pool, claims, loaded, config, opened, tuning
    )
    try:
        own = compute(
            ws.zarr_location, opened.shape, resolved(opened), config, loaded, windows, mine.rows,
            sink.progress_for(progress), started, sink, tuning,
        )  # fmt: skip
    except BaseException as exc:
        channel.tell_others(("error", f"rank 0 stopped: {_describe(exc)}"), quiet=True)
        raise
    if sink.status != "done":
        message = (
            f"extraction run {info.run_id} is marked {sink.status}: {sink.error}; resume it with "
            f"`personavec extract --resume {info.run_id}` (with any number of processes)"
        )
        channel.tell_others(("error", message), quiet=True)
        raise DistributedError(message)
    result = ExtractionResult(
        info.run_id,
        info.zarr_group,
        info.layers,
        info.n_examples,
        len(pending) - sink.no_span,
        sum(sink.tokens),
        sink.tok_s,
        sink.counts[0],
        n_no_span=sink.counts[1],
        n_adopted=opened.n_adopted,
        timings=own.timings,  # rank 0's session
    )
    channel.tell_others(("result", result))
    return result


# -- the other ranks ---------------------------------------------------------------------------------------------


class _Stopped(ExtractionInterrupted):
    """Rank 0 stopped (or was lost): the other ranks stop at their next batch."""


class _FollowSink:
    """A non-zero rank's :class:`~personavec.extract.sink.RunSink`: plans, finished chunks and counts go to rank 0
    (which alone writes the catalog), plans first."""

    def __init__(self, channel: _Channel, run_id: int) -> None:
        self.channel, self.run_id = channel, run_id
        self.tables: list[pa.Table] = []
        self.ranges: list[tuple[int, int]] = []
        self.computed = 0

    def planned(self, table: pa.Table) -> None:
        self.tables.append(table)

    def last_batch_launched(self) -> None:
        """Nothing to hold: rank 0 marks this rank's rows."""

    def _take(self) -> tuple[list[pa.Table], list[tuple[int, int]]]:
        tables, ranges, self.tables, self.ranges = self.tables, self.ranges, [], []
        return tables, ranges

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.ranges.extend(ranges)

    def drain(self, ranges: Sequence[tuple[int, int]], *, raise_errors: bool = True) -> list[tuple[int, int]]:
        self.ranges.extend(ranges)
        return []

    def finish(
        self, status: str, error: str | None, tokens: int, elapsed_s: float, left: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        tables, ranges = self._take()
        # rank 0 may be gone: then the rows not reported are adopted (or computed again) on resume
        with contextlib.suppress(Exception):
            self.channel.send(
                0, ("finished", status, error, tables, [*ranges, *left], self.computed, tokens, elapsed_s)
            )
        return (0, 0)  # rank 0 counts them for the run's result

    def progress_for(
        self, progress: Callable[[ExtractionProgress], None] | None
    ) -> Callable[[ExtractionProgress], None]:
        def report(p: ExtractionProgress) -> None:
            self.computed = p.done_examples  # this rank's (compute counts no rows done before)
            self.channel.send(0, ("batch", *self._take(), self.computed, p.tokens))
            if not self.channel.inbox.empty():  # rank 0 only writes now to stop us
                _, message = self.channel.inbox.get()
                raise _Stopped(message[1] if message[0] == "error" else f"lost contact with rank 0 ({message[1]})")
            if progress is not None:
                progress(p)

        return report


def _follow(
    progress: Callable[[ExtractionProgress], None] | None,
    loaded: LoadedModel | None,
    channel: _Channel,
    local: tuple[int, int],
    tuning: Tuning,
) -> ExtractionResult:
    try:
        config: ExtractConfig = channel.expect("config")[1]
        loaded = loaded or _load(config, *local, tuning)
        started = time.perf_counter()
        pool: list[Pending] = channel.expect("pool")[1]  # units any rank may claim, costliest first
        share: _Share = channel.expect("plan")[1]
        info = share.info
        array = arrays.open_activation_array(share.location, info.zarr_group, "r+")
        claims = _Claims.connect(share.claims, channel.rank)
    except DistributedError:
        raise
    except BaseException as exc:  # tell rank 0, which would otherwise wait for this rank
        with contextlib.suppress(Exception):
            channel.send(0, ("finished", "failed", _describe(exc), [], [], 0, 0, 0.0))
        raise
    sink = _FollowSink(channel, info.run_id)
    opened = Opened(info, array, set(share.present))
    windows = _windows(
        planned_windows(loaded, config, opened.shape, share.pending, tuning),
        pool,
        claims,
        loaded,
        config,
        opened,
        tuning,
    )
    try:
        compute(
            share.location, opened.shape, resolved(opened), config, loaded, windows, share.pending.rows,
            sink.progress_for(progress), started, sink, tuning,
        )  # fmt: skip
    except _Stopped as exc:
        raise DistributedError(f"rank {channel.rank} stopped: {exc}") from exc
    return channel.expect("result")[1]


# -- the entry point ---------------------------------------------------------------------------------------------


def run_distributed(
    ws: Workspace,
    config: ExtractConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[ExtractionProgress], None] | None = None,
    loaded: LoadedModel | None = None,
    tuning: Tuning = DEFAULT,
) -> ExtractionResult:
    """:func:`personavec.extract.run_extraction` in one process of a data-parallel group (call that instead).

    Every process calls it with the same arguments; rank 0's ``ws``, ``config`` and ``resume`` decide (the others
    receive the config from rank 0 and never open the workspace, which may not exist on their machine). ``loaded``
    is this process's own model; without it each process loads the config's model on its own devices
    (:func:`rank_placement`). ``progress`` gets the whole run's numbers on rank 0 and the process's own elsewhere.

    Returns:
        the run's :class:`ExtractionResult` (the same on every rank). A rank that fails makes every rank raise
        (:class:`DistributedError` where another rank's failure is the cause), and the run is left resumable.
    """
    import torch
    from accelerate import PartialState

    state = PartialState(cpu=not torch.cuda.is_available())
    rank, world = state.process_index, state.num_processes
    local = (state.local_process_index, int(os.environ.get("LOCAL_WORLD_SIZE", world) or world))
    channel = _Channel(rank, world)
    if rank == 0:
        return _lead(ws, config, resume, progress, loaded, channel, local, tuning)
    return _follow(progress, loaded, channel, local, tuning)
