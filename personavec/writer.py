"""A group-commit writer for stages that ask an endpoint and land each answer in the catalog as it arrives.

The event loop only asks and parses; rows are committed by one writer task whose statements run on a worker thread
(DuckDB releases the GIL), at most every ``interval_s``: one DuckDB commit costs ~5-20 ms whatever its size, so rows
that arrive while a commit runs wait and go together in the next. A row is committed at most one commit after it
arrives, so a killed process loses only the requests in flight and the latest batch or two. A failing write raises
its error in the producer at the next :meth:`GroupCommitWriter.put`, and at :meth:`GroupCommitWriter.close`, which
commits whatever is still queued. The generation and judge stages both write through it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")

#: Shortest time from one commit to the next under load (a lone row is committed at once).
COMMIT_INTERVAL_S = 0.1


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
        interval_s: float = COMMIT_INTERVAL_S,
    ) -> None:
        self._write_rows, self._committed, self.interval_s = write, committed, interval_s
        self.commits = 0
        self._pending: list[T] = []
        self._closed = False
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-writer")

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
            self._thread.shutdown(wait=False)
            return
        self._closed = True
        self._wake.set()
        try:
            await self._task
        finally:
            self._thread.shutdown(wait=True)

    async def _run(self) -> None:
        assert self._wake is not None  # set by begin() before the task starts
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._closed:
                    return
                await self._wake.wait()
                self._wake.clear()
                continue
            rows, self._pending = self._pending, []
            started = time.perf_counter()
            await loop.run_in_executor(self._thread, self._write_rows, rows)
            self.commits += 1
            if self._committed is not None:
                self._committed(rows)  # after the commit: progress never shows what a crash would lose
            rest = self.interval_s - (time.perf_counter() - started)
            if rest > 0 and not self._closed:
                await asyncio.sleep(rest)  # let a batch gather
