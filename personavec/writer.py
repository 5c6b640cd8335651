"""Background catalog commits: :class:`Committer` (the one background committer: units of work on one thread, in
order, errors surfacing in the producer) and, over it, :class:`GroupCommitWriter` for stages that ask an endpoint
and land each answer in the catalog as it arrives. The extraction stage marks written rows done through a
``Committer`` too (:class:`personavec.extract.sink.CatalogSink`, and rank 0 of a data-parallel run).

GroupCommitWriter:

The event loop only asks and parses; rows are committed by one writer task whose statements run on a worker thread
(DuckDB releases the GIL), at most every ``interval_s``: one DuckDB commit costs ~5-20 ms whatever its size, so rows
that arrive while a commit runs wait and go together in the next. A row is committed at most one commit after it
arrives, so a killed process loses only the requests in flight and the latest batch or two. A failing write raises
its error in the producer at the next :meth:`GroupCommitWriter.put`, and at :meth:`GroupCommitWriter.close`, which
commits whatever is still queued. The generation and judge stages both write through it.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from personavec.tuning import DEFAULT

T = TypeVar("T")

#: Shortest time from one commit to the next under load (a lone row is committed at once).


class Committer:
    """Runs units of work (catalog commits) on one background thread, one at a time, in the order submitted, so the
    producer (a model's thread, an event loop) never waits for DuckDB.

    A unit of work that failed raises its error in the producer: at the next :meth:`submit` or :meth:`check`, and
    at :meth:`close` (which waits for every unit first). Nothing is queued without bound on a dead thread: the
    executor's futures carry each result.

    Example::

        committer = Committer()
        committer.submit(mark_done, catalog, run_id, ranges)
        ...
        committer.close()   # waits, raises the first failure
    """

    def __init__(self, name: str = "personavec-catalog") -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._pending: deque[Future[Any]] = deque()
        self._error: BaseException | None = None
        self.commits = 0

    def _reap(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0].done()):
            future = self._pending.popleft()
            if future.cancelled():  # never ran (its producer was cancelled first): not a failure
                continue
            exc = future.exception()
            if exc is None:
                self.commits += 1
            elif self._error is None:
                self._error = exc

    def check(self) -> None:
        """Raise the error of a unit of work that failed (without waiting for those running)."""
        self._reap(wait=False)
        if self._error is not None:
            raise self._error

    @property
    def idle(self) -> bool:
        """Whether no unit of work is queued or running."""
        self._reap(wait=False)
        return not self._pending

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        """Queue ``fn(*args)``; raises the error of an earlier failed unit of work instead."""
        self.check()
        future = self._pool.submit(fn, *args)
        self._pending.append(future)
        return future

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every unit of work and stop the thread; then raise the first failure unless ``raise_errors`` is
        False (the caller is stopping for another reason)."""
        try:
            self._reap(wait=True)
        finally:
            self._pool.shutdown(wait=True)
        if raise_errors and self._error is not None:
            raise self._error


class GroupCommitWriter(Generic[T]):
    """Queue rows on the event-loop thread with :meth:`put`; ``write(rows)`` commits a batch on a worker thread and
    ``committed(rows)`` runs on the loop after each commit (count, report progress).

    Example (inside a coroutine)::

        writer = GroupCommitWriter(lambda rows: upsert(catalog, run_id, rows), on_commit)
        writer.begin()
        try:
            ...  # writer.put(row) as answers arrive
        finally:
            await writer.close()
    """

    def __init__(
        self,
        write: Callable[[list[T]], None],
        committed: Callable[[list[T]], None] | None = None,
        *,
        interval_s: float = DEFAULT.commit_interval_s,
    ) -> None:
        self._write_rows, self._committed, self.interval_s = write, committed, interval_s
        self.commits = 0
        self._pending: list[T] = []
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._committer = Committer("personavec-writer")

    def begin(self) -> None:
        """Start the writer task (inside the running event loop)."""
        self._wake = asyncio.Event()
        self._task = asyncio.create_task(self._run())

    def put(self, row: T) -> None:
        """Queue a row; raises the writer's error here, in the producer, if a commit failed."""
        if self._task is None or self._wake is None:
            raise RuntimeError("GroupCommitWriter.begin() was not called")
        if self._task.done():
            self._task.result()
        self._pending.append(row)
        self._wake.set()

    async def close(self) -> None:
        """Commit everything queued and stop; raises the writer's error if a commit failed."""
        if self._task is None or self._wake is None:
            self._committer.close(raise_errors=False)
            return
        self._closed = True
        self._wake.set()
        try:
            died = self._task.exception() if self._task.done() and not self._task.cancelled() else None
            if died is not None and not isinstance(died, Exception):
                # KeyboardInterrupt/SystemExit (a progress callback stopping the run) left the event loop already;
                # raised again here, while asyncio cancels the other tasks, it would cut that cleanup short. The
                # rows queued since still land.
                if self._pending:
                    self._committer.submit(self._write_rows, self._pending)
                    self._pending = []
                return
            await self._task
        finally:
            self._committer.close(raise_errors=False)  # an error reached the task already

    async def _run(self) -> None:
        assert self._wake is not None  # set by begin() before the task starts
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            rows, self._pending = self._pending, []
            started = time.perf_counter()
            # shielded: a cancelled writer (Ctrl-C) still lets a commit it queued run; close() waits for it
            await asyncio.shield(asyncio.wrap_future(self._committer.submit(self._write_rows, rows)))
            self.commits += 1
            if self._committed is not None:
                self._committed(rows)  # after the commit: progress never shows what a crash would lose
            rest = self.interval_s - (time.perf_counter() - started)
            if rest > 0 and not self._closed:
                await asyncio.sleep(rest)  # let a batch gather
