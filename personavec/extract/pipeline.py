"""One extraction session, the one pipeline of every run: planner -> model thread -> writer -> marks.

A new run is recorded when its responses are selected (:func:`personavec.extract.record.record_new`, on the sink's
background committer while the model computes its first batches: the writers wait for its array, plans and marks
queue behind it), so a new run is a resume of a run with every row pending: one path from there. The rows left are
planned (tokenized) a window at a time (:func:`planned_windows`: the first ``max_batch_size`` rows before the model
starts; the rest on the model's thread when it asks for it, or, past
:attr:`~personavec.tuning.Tuning.plan_inline_max` rows, on a planner thread that hands windows over a bounded
queue); the model's thread computes them as one stream of batches and hands whole write units to the writer pool,
whose written rows the sink marks done (:func:`compute`). A data-parallel rank runs :func:`compute` over its share
and the pool units it claims (:mod:`personavec.extract.distributed`).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

from personavec import arrays
from personavec.errors import ConfigError, ExtractionInterrupted, RunInterrupted, StorageError, StorageOverflowError
from personavec.extract.config import (
    ExtractConfig,
    ExtractionProgress,
    ExtractionResult,
    Renderer,
    load_for,
    render_all,
    resume_config,
)
from personavec.extract.core import iter_mean_activations
from personavec.extract.plan import Pending, Window, budget, plan_window, window_bounds
from personavec.extract.record import Opened, Shape, record_new, resume_hint, resumed_run, select_new
from personavec.extract.sink import (
    CatalogSink,
    ChunkAssembler,
    ChunkWriter,
    RunSink,
    resolved,
    store_batches,
    then,
    units_in_flight,
)
from personavec.modeling import LoadedModel
from personavec.spans import Rendered, render_workers
from personavec.tuning import DEFAULT, Tuning
from personavec.writer import Committer

if TYPE_CHECKING:
    from personavec.workspace import Workspace


def new_config(config: ExtractConfig | None) -> ExtractConfig:
    """``config`` checked for a new run (it names its responses run)."""
    if config is None:
        raise ConfigError("run_extraction needs a config (new run) or resume=RUN_ID")
    if config.responses_run is None:
        raise ConfigError("ExtractConfig.responses_run is not set: name the responses run to extract")
    return config


def run_local(
    ws: Workspace,
    config: ExtractConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[ExtractionProgress], None] | None = None,
    loaded: LoadedModel | None = None,
    tuning: Tuning = DEFAULT,
) -> ExtractionResult:
    """:func:`personavec.extract.run_extraction` in one process (see there)."""
    catalog = ws.catalog()
    committer = Committer()
    if resume is None:
        config = new_config(config)
        loaded = loaded or load_for(config)
        started = time.perf_counter()
        run: int = config.responses_run  # type: ignore[assignment]
        selected = select_new(catalog, config, run, loaded, tuning)
        # Recorded on the committer while the first window is tokenized and computed (the model's thread needs only
        # the selection); the writers wait for the array, plans and marks queue behind it.
        opening = committer.submit(record_new, ws, catalog, config, run, loaded, selected)
        shape, pending = selected.shape, selected.pending()
    else:
        config = resume_config(catalog, resume, config)
        loaded = loaded or load_for(config)
        started = time.perf_counter()
        opened, pending = resumed_run(ws, catalog, resume, config, loaded)
        opening, shape = resolved(opened), opened.shape
    sink = CatalogSink(catalog, opening, tuning, committer)
    windows = planned_windows(loaded, config, shape, pending, tuning)
    return compute(
        ws.zarr_location, shape, opening, config, loaded, windows, pending.rows, progress, started, sink, tuning
    )


def planned_windows(
    loaded: LoadedModel,
    config: ExtractConfig,
    shape: Shape,
    pending: Pending,
    tuning: Tuning = DEFAULT,
    render: Renderer = render_all,
) -> Generator[Window]:
    """The windows of ``pending`` (:func:`personavec.extract.plan.window_bounds`), planned as they are asked for:
    the first on the caller's thread, the rest on it too when small, else on a planner thread (its rendering
    processes shared by every window, :func:`personavec.spans.render_workers`). Closing the generator stops the
    planner at its next window."""
    n_rows, chunk_rows = shape.n_examples, shape.chunk_rows
    limit = budget(config, loaded, tuning)

    def plan(start: int, stop: int) -> Window:
        part = pending.part(start, stop)
        return plan_window(
            part, render(loaded, config, part.conversations), n_rows=n_rows, chunk_rows=chunk_rows,
            max_batch_tokens=limit, max_batch_size=config.max_batch_size,
        )  # fmt: skip

    bounds = window_bounds(len(pending), config.max_batch_size, tuning)
    if len(bounds) <= 2:
        for start, stop in bounds:
            yield plan(start, stop)
        return
    yield plan(*bounds[0])

    def rest(emit: Callable[[Window], None]) -> None:
        with render_workers(loaded.tokenizer, bounds[-1][1] - bounds[1][0], tuning.parallel_from):
            for start, stop in bounds[1:]:
                emit(plan(start, stop))

    yield from in_background(rest)


class _Stop(Exception):
    """The consumer of :func:`in_background` stopped."""


_END = object()


def in_background(produce: Callable[[Callable[[Any], None]], None], size: int = 2) -> Generator[Any]:
    """Run ``produce(emit)`` on a thread of its own; yield what it emits, through a queue of ``size`` (the
    producer waits when the consumer is behind). Its error is raised here; closing the generator stops it at its
    next ``emit``."""
    items: queue.Queue[Any] = queue.Queue(maxsize=size)
    stop = threading.Event()
    failed: list[BaseException] = []

    def put(item: Any) -> None:
        while not stop.is_set():
            with contextlib.suppress(queue.Full):
                items.put(item, timeout=0.1)
                return
        raise _Stop

    def run() -> None:
        try:
            produce(put)
        except _Stop:
            return
        except BaseException as exc:  # raised in the consumer
            failed.append(exc)
        with contextlib.suppress(_Stop):
            put(_END)

    thread = threading.Thread(target=run, name="personavec-plan", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = items.get(timeout=0.2)  # in steps: Ctrl-C and SIGTERM reach a waiting model thread
            except queue.Empty:
                if thread.is_alive():
                    continue
                item = _END if items.empty() else items.get()
            if item is _END:
                break
            yield item
        if failed:
            raise failed[0]
    finally:
        stop.set()  # the producer stops at its next emit (the window it renders, if any, is dropped)


def compute(
    location: arrays.StoreLocation,
    shape: Shape,
    opening: Future[Opened],
    config: ExtractConfig,
    loaded: LoadedModel,
    windows: Iterator[Window],
    expect: list[int],
    progress: Callable[[ExtractionProgress], None] | None,
    started: float,
    sink: RunSink,
    tuning: Tuning = DEFAULT,
) -> ExtractionResult:
    """Compute the ``windows`` of a session as one stream of batches and write them through a :class:`ChunkWriter`;
    ``sink`` records each window's plan, receives the written rows and closes the session.

    Args:
        location: the activation store, for messages.
        shape: the run's rows, layers and write units.
        opening: the run, open to write (a new one may still be being recorded: the writers wait for its array,
            the progress and the result for its id; its error, if it fails, is the session's).
        windows: the session's plan, window by window (each taken when the model asks for its next batch).
        expect: the session's rows (more may come with a window's ``adds``: a claimed pool unit).
        progress: called after each batch; ``done_examples`` counts rows done before this session
            (``Opened.n_done``), rows computed and rows found without a span.
        started: when the session started (``time.perf_counter()``): ``plan_s`` runs from it to the first window.
        sink: where plans and written rows go.
    """
    layers, per = shape.layers, shape.chunk_rows
    array = then(opening, lambda opened: opened.array)
    assembler = ChunkAssembler(
        array, shape.n_examples, per, len(layers), loaded.d_model, shape.present, expect, durable=tuning.fsync_writes
    )
    unit_bytes = per * len(layers) * loaded.d_model * 4  # float32 from the model, before the storage dtype
    in_flight = units_in_flight(unit_bytes, config.writer_threads, tuning)
    writer = ChunkWriter(None, str(location), max_in_flight=in_flight, threads=config.writer_threads)
    state = {"tokens": 0, "computed": 0, "skipped": 0}
    status, error, left = "done", None, []
    drain_s = close_s = 0.0
    counts = (0, 0)
    examples: list[Rendered] = []  # every window's examples, in order; batches index into it
    rows: list[int] = []
    start_t = time.perf_counter()
    plan_s = start_t - started

    def batches() -> Iterator[list[int]]:
        """Each window's batches as indices into ``examples``; the next window is taken (its plan sent to the sink,
        its rows without a span skipped) only when the model asks for its next batch."""
        nonlocal plan_s, start_t
        for k, window in enumerate(windows):
            if k == 0:  # the first window is planned before the model starts
                start_t = time.perf_counter()
                plan_s = start_t - started
            assembler.expect(window.adds)
            if window.table is not None:
                sink.planned(window.table)
            assembler.skip(window.no_span)
            state["skipped"] += len(window.no_span)
            base = len(examples)
            examples.extend(window.plan.examples)
            rows.extend(window.plan.rows)
            for batch in window.plan.batches:
                yield [base + i for i in batch]
        sink.last_batch_launched()  # the core asks for a batch after launching the one before: this was the last

    def computed() -> Generator[tuple[list[int], Any, int]]:
        means = iter_mean_activations(
            loaded, examples, layers, batches=batches(), compile=config.compile,
            pad_to=tuning.compile_pad if config.compile else 1,
        )  # fmt: skip
        with contextlib.closing(means):  # removes the capture hooks at once, however the loop ends
            for batch, values, n_tok in means:
                yield [rows[i] for i in batch], values, n_tok

    def on_batch(n_rows: int, tokens: int) -> None:
        state["tokens"] += tokens
        state["computed"] += n_rows
        if progress is not None:
            n_done = shape.n_done + state["computed"] + state["skipped"]
            elapsed = time.perf_counter() - start_t
            run_id = opening.result().info.run_id  # recorded by now (the first batch took longer)
            progress(ExtractionProgress(run_id, n_done, shape.n_examples, state["tokens"], elapsed))

    stream = computed()
    try:
        try:
            store_batches(
                assembler, stream, writer, on_written=sink.mark_done, on_batch=on_batch,
                flush_seconds=config.flush_seconds, flush_rows=config.flush_rows,
            )  # fmt: skip
            t_drain = time.perf_counter()
            writer.close()
            left = sink.drain(writer.written())
            drain_s = time.perf_counter() - t_drain
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt | ExtractionInterrupted) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            stream.close()
            if isinstance(windows, Generator):
                windows.close()  # the planner, if still going, stops at its next window
            writer.close(raise_errors=False)
            left = sink.drain(writer.written(), raise_errors=False)
            if opening.done() and opening.exception() is not None:  # the run could not be recorded or opened
                raise opening.exception() from None  # type: ignore[misc]
            info = opening.result().info
            if isinstance(exc, StorageError) and not isinstance(exc, StorageOverflowError):
                raise StorageError(f"{exc}; {resume_hint(info.run_id)}") from exc
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):  # Ctrl-C, SIGTERM
                raise RunInterrupted(info.run_id, f"personavec extract --resume {info.run_id}") from exc
            raise
    finally:
        stream.close()
        elapsed = time.perf_counter() - start_t
        t_close = time.perf_counter()
        counts = sink.finish(status, error, state["tokens"], elapsed, left)
        close_s = time.perf_counter() - t_close
    tok_s = state["tokens"] / elapsed if elapsed > 0 and state["tokens"] else 0.0
    opened = opening.result()
    info = opened.info
    return ExtractionResult(
        info.run_id,
        info.zarr_group,
        info.layers,
        info.n_examples,
        state["computed"],
        state["tokens"],
        tok_s,
        counts[0],
        n_no_span=counts[1],
        n_adopted=opened.n_adopted,
        timings={
            "plan_s": round(plan_s, 3),
            "compute_s": round(elapsed, 3),
            "stall_s": round(writer.stall_s, 3),
            "drain_s": round(drain_s, 3),
            "close_s": round(close_s, 3),
        },
    )
