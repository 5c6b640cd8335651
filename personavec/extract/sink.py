"""From computed batches to the store and the catalog: whole write units assembled (:class:`ChunkAssembler`),
written by a bounded pool of threads (:class:`ChunkWriter`), then marked done (:class:`RunSink`: the catalog through
the one background committer, or rank 0 of a data-parallel run); :func:`store_batches` is the loop between them."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pyarrow as pa

from personavec import arrays
from personavec.errors import ModelError, PersonavecError, StorageError
from personavec.extract.plan import row_ranges
from personavec.store import extraction as xs
from personavec.tuning import DEFAULT, Tuning
from personavec.writer import Committer

if TYPE_CHECKING:
    from personavec.extract.record import Opened
    from personavec.store.engine import Catalog


@dataclass
class _Block:
    """One write unit being filled: rows ``[start, stop)``, ``missing`` of them still to compute or to find
    without a span; ``pieces`` are computed rows (``(first row, float32 [k, n_layers, d_model])`` views of batch
    outputs, never copied on the model's thread)."""

    start: int
    stop: int
    missing: int
    read_base: bool
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)
    flushed: int = 0


class ChunkAssembler:
    """Collects computed rows into whole write units; a unit leaves once every row of it the session expects is
    computed or known to have no span.

    The model's thread only keeps references to batch outputs; :meth:`job` returns a function that builds the unit
    (NaN where nothing was computed, or what the store holds for rows done in an earlier session), checks the
    computed rows are finite, and writes it: that runs on a writer thread.

    Args:
        array: the run's Zarr array, or a future of it (a new run's array is created while the first batches
            compute: writes wait for it on the writer threads).
        n_rows, chunk_rows: rows of the array and of a write unit.
        n_layers, d_model: a row's shape.
        present: write units already in the store (a resumed run): one the session does not wholly rewrite is read
            back before it is written.
        expect: the session's rows (every row it will compute or find without a span; more with :meth:`expect`).
        durable: a unit's write returns only once its files are on disk (:func:`personavec.arrays.sync_rows`), so
            the rows it marks done survive a power cut (:attr:`personavec.tuning.Tuning.fsync_writes`).
    """

    def __init__(
        self,
        array: Any,
        n_rows: int,
        chunk_rows: int,
        n_layers: int,
        d_model: int,
        present: Collection[int] = (),
        expect: Sequence[int] = (),
        *,
        durable: bool = True,
    ) -> None:
        self.array = array
        self.durable = durable
        self.shape = (n_layers, d_model)
        self.per = chunk_rows
        self.n_rows = n_rows
        self.present = set(present)
        self.blocks: dict[int, _Block] = {}
        self._ready: list[_Block] = []
        self.expect(expect)

    def expect(self, rows: Sequence[int]) -> None:
        """Rows the session will compute (or find without a span), in units it has no other rows of."""
        if not len(rows):
            return
        per = self.per
        counts = np.bincount(np.asarray(rows, dtype=np.int64) // per)
        for b in np.flatnonzero(counts).tolist():
            length = min(per, self.n_rows - b * per)
            # A unit the session does not wholly rewrite holds rows done earlier: read back first, if it exists.
            read_base = int(counts[b]) < length and b in self.present
            self.blocks[b] = _Block(b * per, b * per + length, int(counts[b]), read_base)

    def skip(self, rows: Sequence[int]) -> None:
        """Rows found to have no span (nothing to compute); units they complete leave with the next :meth:`add`
        or :meth:`ready`."""
        for row in rows:
            block = self.blocks[row // self.per]
            block.missing -= 1
            if block.missing == 0:
                self._ready.append(self.blocks.pop(row // self.per))

    def ready(self) -> list[_Block]:
        """Units completed by :meth:`skip` and not returned yet."""
        out, self._ready = self._ready, []
        return out

    def add(self, rows: Sequence[int], values: np.ndarray) -> list[_Block]:
        """Add a batch's rows (``values[j]`` is row ``rows[j]``); returns the units now complete."""
        per = self.per
        complete = self.ready()
        j = 0
        while j < len(rows):
            block = self.blocks[rows[j] // per]
            k = j + 1
            while k < len(rows) and rows[k] == rows[k - 1] + 1 and rows[k] < block.stop:
                k += 1
            block.pieces.append((rows[j], values[j:k]))
            block.missing -= k - j
            if block.missing == 0:
                complete.append(self.blocks.pop(rows[j] // per))
            j = k
        return complete

    def unflushed(self) -> list[_Block]:
        """Units partly filled with rows computed since their last write (for a durability flush)."""
        out = [b for b in self.blocks.values() if len(b.pieces) > b.flushed]
        for block in out:
            block.flushed = len(block.pieces)
        return out

    def job(self, block: _Block) -> tuple[Callable[[], list[tuple[int, int]]], list[tuple[int, int]]]:
        """The write of ``block`` as it is now (a snapshot of its pieces) and the row ranges it makes durable."""
        pieces = list(block.pieces)
        done = row_ranges([r for first, v in pieces for r in range(first, first + len(v))])
        source, start, stop, read_base, shape = self.array, block.start, block.stop, block.read_base, self.shape
        durable = self.durable

        def write() -> list[tuple[int, int]]:
            for first, values in pieces:
                bad = arrays.nonfinite_rows(values)
                if bad.size:
                    raise ModelError(
                        f"the model produced NaN/inf activations for Zarr row(s) {[first + int(i) for i in bad[:5]]}"
                        " (half-precision overflow?): extract again with --dtype float32 or bfloat16"
                    )
            array = source.result() if isinstance(source, Future) else source
            if len(pieces) == 1 and pieces[0][0] == start and len(pieces[0][1]) == stop - start:
                out = pieces[0][1]
            else:
                if read_base:
                    out = arrays.read_rows(array, np.arange(start, stop))
                else:
                    out = np.full((stop - start, *shape), np.nan, dtype=np.float32)
                for first, values in pieces:
                    out[first - start : first - start + len(values)] = values
            arrays.write_rows(array, start, out, durable=durable)
            return done

        return write, done


Job = Callable[[], Any]


def units_in_flight(unit_bytes: int, threads: int, tuning: Tuning = DEFAULT) -> int:
    """How many write units of ``unit_bytes`` may wait or be written at once: :attr:`Tuning.in_flight_bytes` of
    them, and at least two per writer thread. (A large new run's units wait for its array until all of it is
    planned and recorded; with every layer of a 27B model kept, 4 GiB is ~3,000 rows, ~80 s of an H200's compute.)"""
    return max(2 * threads, tuning.in_flight_bytes // max(unit_bytes, 1))


class ChunkWriter:
    """Writes whole write units on background threads while the model computes the next batches.

    At most ``max_in_flight`` units (default two per thread; a run passes :func:`units_in_flight`) wait or are being
    written: :meth:`submit` first waits for the oldest when that many are pending, and for an earlier write of the
    same unit (a durability flush) before queueing a newer one. A write that failed raises at the next
    :meth:`submit` and at :meth:`close` (a store error as :class:`StorageError`, a value the storage dtype cannot
    hold as :class:`StorageOverflowError`), so a failing store stops the producer instead of blocking it (there is
    no queue for a dead thread to leave full).
    :meth:`written` returns only rows whose write completed; :attr:`stall_s` is how long :meth:`submit` waited.
    """

    def __init__(self, array: Any, where: str, max_in_flight: int | None = None, threads: int = 4) -> None:
        self.array = array
        self.where = where
        self.max_in_flight = max_in_flight or 2 * threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="personavec-zarr-writer")
        self._pending: deque[tuple[int, list[tuple[int, int]], Future[Any]]] = deque()
        self._written: list[tuple[int, int]] = []
        self._error: BaseException | None = None
        self.stall_s = 0.0

    def _reap(self, wait_for: int) -> None:
        """Collect finished writes in submission order, waiting for the oldest ``wait_for`` of them."""
        while self._pending and (wait_for > 0 or self._pending[0][2].done()):
            _, ranges, future = self._pending.popleft()
            wait_for -= 1
            exc = future.exception()
            if exc is None:
                self._written.extend(ranges)
            elif self._error is None:
                if isinstance(exc, PersonavecError):
                    self._error = exc
                else:
                    where = ", ".join(f"{a}:{b}" for a, b in ranges)
                    self._error = StorageError(f"writing activation rows {where} to {self.where} failed: {exc}")
                    self._error.__cause__ = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, start: int, values: np.ndarray | Job, *, done: Sequence[tuple[int, int]] | None = None) -> None:
        """Queue a write: ``values`` (rows ``start:start+len(values)``), or a function that writes a unit starting
        at row ``start`` and makes the rows ``done`` durable. Raises the error of an earlier failed write."""
        t0 = time.perf_counter()
        same = [i for i, (key, _, _) in enumerate(self._pending) if key == start]
        self._reap(wait_for=max(len(self._pending) - self.max_in_flight + 1, same[-1] + 1 if same else 0))
        self.stall_s += time.perf_counter() - t0
        self._check()
        if callable(values):
            future = self._pool.submit(values)
            ranges = list(done or [])
        else:
            future = self._pool.submit(arrays.write_rows, self.array, start, values)
            ranges = [(start, start + len(values))] if done is None else list(done)
        self._pending.append((start, ranges, future))

    def written(self) -> list[tuple[int, int]]:
        """Row ranges whose write completed since the last call (never raises: errors surface in submit/close)."""
        self._reap(wait_for=0)
        out, self._written = self._written, []
        return out

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every pending write and stop the threads; then raise the first failure unless ``raise_errors``
        is False (the run is stopping for another reason)."""
        try:
            self._reap(wait_for=len(self._pending))
        finally:
            self._pool.shutdown(wait=True)
        if raise_errors:
            self._check()


class DoneMarks:
    """Marks written rows done in the catalog through a :class:`personavec.writer.Committer` (its own thread), at
    most every ``interval`` seconds, so the model's thread never waits for a DuckDB commit. A failed commit raises
    at the next :meth:`add` and at :meth:`drain`; rows written but not marked when the process dies are adopted by
    the next resume. ``run_id`` may be a future (a run recorded on ``committer`` ahead of any mark)."""

    def __init__(
        self, catalog: Catalog, run_id: int | Future[int], interval: float = 1.0, committer: Committer | None = None
    ) -> None:
        self.catalog = catalog
        self.run_id = run_id
        self.interval = interval
        self.committer = committer or Committer()
        self._queued: list[tuple[int, int]] = []
        self._last = time.monotonic()
        self._held = False

    def add(self, ranges: Sequence[tuple[int, int]], *, now: bool = False) -> None:
        """Queue ranges; commit the queue in the background when ``interval`` has passed (or ``now``), one commit
        at a time."""
        self.committer.check()
        self._queued.extend(ranges)
        due = now or time.monotonic() - self._last >= self.interval
        if self._queued and due and not self._held and self.committer.idle:
            batch, self._queued = row_ranges([r for a, b in self._queued for r in range(a, b)]), []
            self.committer.submit(self._mark, batch)
            self._last = time.monotonic()

    def _mark(self, ranges: list[tuple[int, int]]) -> None:
        run_id = self.run_id.result() if isinstance(self.run_id, Future) else self.run_id
        xs.mark_done(self.catalog, run_id, ranges)

    def hold(self) -> None:
        """Commit nothing more in the background: the rest is marked by the unit of work that closes the run (the
        last batch is computing; a commit started now would be waited for at the end, ~50 ms)."""
        self._held = True

    def drain(self, ranges: Sequence[tuple[int, int]] = (), *, raise_errors: bool = True) -> list[tuple[int, int]]:
        """Wait for the commit in flight and stop the thread; returns what is still to be marked (queued and
        ``ranges``), for the unit of work that closes the run."""
        self.committer.close(raise_errors=raise_errors)
        left = row_ranges([r for a, b in [*self._queued, *ranges] for r in range(a, b)])
        self._queued = []
        return left


def store_batches(
    assembler: ChunkAssembler,
    batches: Iterable[tuple[Sequence[int], Any, int]],
    writer: ChunkWriter,
    *,
    on_written: Callable[[list[tuple[int, int]]], None] = lambda ranges: None,
    on_batch: Callable[[int, int], None] = lambda rows, tokens: None,
    flush_seconds: float = 30.0,
    flush_rows: int = 8192,
) -> None:
    """Feed computed batches (``(Zarr rows, means [B, n_layers, d_model], n_tokens)``) into whole write units:
    complete units go to ``writer``; partly filled ones too every ``flush_seconds`` or ``flush_rows`` computed rows.
    ``on_written(ranges)`` gets the rows whose write completed (mark them done), ``on_batch(rows, tokens)`` is
    called after each batch. The loop a data-parallel rank runs over its own units, too."""
    since_rows, since_t = 0, time.monotonic()
    for rows, means, n_tok in batches:
        values = means.numpy() if hasattr(means, "numpy") else np.asarray(means)
        ready = assembler.add(rows, values)
        since_rows += len(rows)
        if since_rows >= flush_rows or time.monotonic() - since_t >= flush_seconds:
            ready += assembler.unflushed()
            since_rows, since_t = 0, time.monotonic()
        for block in ready:
            job, done = assembler.job(block)
            writer.submit(block.start, job, done=done)
        on_written(writer.written())
        on_batch(len(rows), n_tok)
    for block in assembler.ready():  # completed by rows found without a span, with nothing left to compute
        job, done = assembler.job(block)
        writer.submit(block.start, job, done=done)


class RunSink(Protocol):
    """Where the compute loop (:func:`personavec.extract.pipeline.compute`) reports rows whose write unit is
    written and how the session ended: the catalog (:class:`CatalogSink`), or, data parallel, rank 0 (which also
    takes the other ranks' rows into the catalog) or a message to it (:mod:`personavec.extract.distributed`)."""

    def planned(self, table: pa.Table) -> None:
        """Examples planned for the first time (:attr:`personavec.extract.plan.Window.table`): recorded before any
        of their rows is marked done."""

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Rows ``[start, stop)`` whose write completed."""

    def last_batch_launched(self) -> None:
        """Every batch of this session is launched."""

    def drain(self, ranges: Sequence[tuple[int, int]], *, raise_errors: bool = True) -> list[tuple[int, int]]:
        """The loop ended: wait for marks in flight; returns the rows still to be marked when the run closes."""
        ...

    def finish(
        self, status: str, error: str | None, tokens: int, elapsed_s: float, left: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        """The session ended with ``status`` (done, interrupted, failed) after computing ``tokens`` tokens; marks
        ``left`` done and closes the run. Returns the run's numbers of truncated examples and of examples with no
        span."""
        ...


class CatalogSink:
    """One process's sink: plans recorded and rows marked done through :class:`DoneMarks` (on the one background
    :class:`~personavec.writer.Committer`, in order; marks at most every :attr:`Tuning.mark_interval_s`), the last
    marks in the unit of work that closes the run.

    ``opening`` is the run being opened: a new run is recorded by a unit of work queued on ``committer`` before any
    plan or mark (:func:`personavec.extract.pipeline.run_local`), so the sink takes plans and marks at once and they
    land after it."""

    def __init__(
        self, catalog: Catalog, opening: Future[Opened], tuning: Tuning = DEFAULT, committer: Committer | None = None
    ) -> None:
        self.catalog = catalog
        self.opening = opening
        run_id = then(opening, lambda opened: opened.info.run_id)
        self.marks = DoneMarks(catalog, run_id, tuning.mark_interval_s, committer)

    def planned(self, table: pa.Table) -> None:
        self.marks.committer.submit(self._plan, table)

    def _plan(self, table: pa.Table) -> None:
        xs.plan_examples(self.catalog, self.opening.result().info.run_id, table)

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        self.marks.add(ranges)

    def last_batch_launched(self) -> None:
        """The rows written from now on are marked by the unit of work closing the run."""
        self.marks.hold()

    def drain(self, ranges: Sequence[tuple[int, int]], *, raise_errors: bool = True) -> list[tuple[int, int]]:
        return self.marks.drain(ranges, raise_errors=raise_errors)

    def finish(
        self, status: str, error: str | None, tokens: int, elapsed_s: float, left: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        if self.opening.exception() is not None:  # never recorded, or already marked failed by the recording
            return (0, 0)
        tok_s = tokens / elapsed_s if elapsed_s > 0 and tokens else None
        return xs.finish_extraction(self.catalog, self.opening.result().info.run_id, status, error, tok_s, left)


def then(future: Future[Any], fn: Callable[[Any], Any]) -> Future[Any]:
    """A future of ``fn(future's result)`` (or of its error), settled when ``future`` is."""
    out: Future[Any] = Future()
    future.add_done_callback(lambda f: _settle(out, f, fn))
    return out


def resolved(value: Any) -> Future[Any]:
    """A future already holding ``value``."""
    out: Future[Any] = Future()
    out.set_result(value)
    return out


def _settle(out: Future[Any], source: Future[Any], fn: Callable[[Any], Any]) -> None:
    exc = source.exception()
    if exc is not None:
        out.set_exception(exc)
    else:
        out.set_result(fn(source.result()))
