"""One extraction session in one process: the model's thread computes the windows of a plan as one stream of
batches (:func:`compute`), fed by the planner (on the model's thread for a small run, a helper thread in windows for
a large one), into the writer pool and the run's sink (:mod:`personavec.extract.sink`). :func:`run_local` opens the
run (new or resumed, :mod:`personavec.extract.record`) and runs it; a data-parallel rank runs :func:`compute` over
its share and the units it claims (:mod:`personavec.extract.distributed`)."""

from __future__ import annotations

import contextlib
import functools
import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from personavec import arrays
from personavec.errors import (
    ConfigError,
    ExtractionInterrupted,
    RunInterrupted,
    StorageError,
    StorageOverflowError,
)
from personavec.extract.config import (
    ExtractConfig,
    ExtractionProgress,
    ExtractionResult,
    load_for,
    resume_config,
)
from personavec.extract.core import iter_mean_activations
from personavec.extract.plan import ExtractionPlan, Window
from personavec.extract.record import (
    Opened,
    new_run,
    pending_windows,
    plan_pending,
    resume_hint,
    resumed_run,
)
from personavec.extract.sink import CatalogSink, ChunkAssembler, ChunkWriter, RunSink, store_batches, units_in_flight
from personavec.modeling import LoadedModel
from personavec.spans import Rendered
from personavec.tuning import DEFAULT, Tuning

if TYPE_CHECKING:
    from personavec.workspace import Workspace


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
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-plan") as pool:
        if resume is None:
            if config is None:
                raise ConfigError("run_extraction needs a config (new run) or resume=RUN_ID")
            if config.responses_run is None:
                raise ConfigError("ExtractConfig.responses_run is not set: name the responses run to extract")
            loaded = loaded or load_for(config)
            t0 = time.perf_counter()
            first, layers, n_examples, rest = new_run(ws, catalog, config, config.responses_run, loaded, tuning=tuning)
            # The model starts on the first batch. A small run's rest is planned, the run recorded and its array
            # created by the model's thread when it asks for the next batch (the first computing meanwhile); a large
            # run's on a helper thread, in windows handed to the model as they are planned.
            opening: Future[Opened]
            if n_examples <= tuning.plan_inline_max:
                opening = _OnDemand(rest)
                windows = _first_then_rest(first, opening)
            else:
                planned: queue.Queue[Window | None] = queue.Queue()
                stop = threading.Event()
                opening = pool.submit(_announcing_failure, rest, planned, stop)
                windows = _first_then_streamed((first, len(first.examples)), planned, opening, stop)
        else:
            config = resume_config(catalog, resume, config)
            loaded = loaded or load_for(config)
            t0 = time.perf_counter()
            opened, rows, conversations = resumed_run(ws, catalog, resume, config, loaded)
            layers, n_examples = opened.info.layers, opened.info.n_examples
            opening = Future()
            opening.set_result(opened)
            k = config.max_batch_size
            if len(rows) <= max(tuning.plan_inline_max, k):
                windows = iter([(plan_pending(loaded, config, opened, rows, conversations, tuning=tuning), None)])
            else:  # the model starts on the first rows; the rest is planned in windows on a helper thread
                first = plan_pending(loaded, config, opened, rows[:k], conversations[:k], tuning=tuning)
                pending_rest = functools.partial(
                    pending_windows, loaded, config, opened, rows[k:], conversations[k:], tuning=tuning
                )
                planned, stop = queue.Queue(), threading.Event()
                planning = pool.submit(_announcing_failure, pending_rest, planned, stop)
                windows = _first_then_streamed((first, rows[k]), planned, planning, stop)
        plan_s = time.perf_counter() - t0
        sink = CatalogSink(catalog, lambda: opening.result().info.run_id, tuning)
        return compute(
            ws.zarr_location, opening, config, loaded, windows, layers, n_examples, progress, plan_s, sink, tuning
        )


class _OnDemand(Future):  # type: ignore[type-arg]
    """A future that computes its value on the first thread asking for it (``result`` or ``exception``); ``done``
    stays False until then. A small new run's rest of planning: the model's thread runs it after it launched the
    first batch (the batches are double-buffered), so it happens while the device computes, and no helper thread
    competes with the model's for the GIL."""

    def __init__(self, fn: Callable[[], Any]) -> None:
        super().__init__()
        self._fn: Callable[[], Any] | None = fn
        self._lock = threading.Lock()

    def _run(self) -> None:
        with self._lock:
            fn, self._fn = self._fn, None
            if fn is None:
                return
            try:
                self.set_result(fn())
            except BaseException as exc:  # Ctrl-C included: whoever waits sees it
                self.set_exception(exc)

    def result(self, timeout: float | None = None) -> Any:
        self._run()
        return super().result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        self._run()
        return super().exception(timeout)


def _first_then_rest(first: ExtractionPlan, opening: Future[Opened]) -> Iterator[Window]:
    """A small new run's windows: its first batch, then the rest of its plan, planned when the model asks for it.
    The rest seals the write units the first left open."""
    yield first, len(first.examples)
    rest = opening.result().rest
    assert rest is not None  # a small new run's rows after its first batch, in one window
    yield rest, None


T = TypeVar("T")


class PlanningStopped(Exception):
    """The model's thread stopped (Ctrl-C, an error) while a large run's rest was still being planned."""


def _announcing_failure(rest: Callable[..., T], planned: queue.Queue[Window | None], stop: threading.Event) -> T:
    """Run the ``rest`` of a large run's plan on the helper thread, its windows into ``planned``; None there if it
    fails. Once ``stop`` is set it stops at the next window (a new run: before it is recorded)."""

    def emit(window: Window) -> None:
        if stop.is_set():
            raise PlanningStopped("the run stopped before all of it was planned; nothing was recorded")
        planned.put(window)

    try:
        return rest(emit)
    except BaseException:
        planned.put(None)
        raise


def _first_then_streamed(
    first: Window, planned: queue.Queue[Window | None], planning: Future[Any], stop: threading.Event
) -> Generator[Window]:
    """A large run's windows: its first batch, then each window of the rest as the helper thread plans it (the last
    one has no ``planned_to``); a failed ``planning`` raises its error here. Closing it (the model's thread
    stopping) stops the planning at its next window."""
    try:
        yield first
        while (window := planned.get()) is not None:
            yield window
            if window[1] is None:
                return
        planning.result()  # raises what stopped the planning
    finally:
        stop.set()


def compute(
    location: arrays.StoreLocation,
    opening: Future[Opened],
    config: ExtractConfig,
    loaded: LoadedModel,
    windows: Iterator[Window],
    layers: tuple[int, ...],
    n_examples: int,
    progress: Callable[[ExtractionProgress], None] | None,
    plan_s: float,
    sink: RunSink,
    tuning: Tuning = DEFAULT,
) -> ExtractionResult:
    """Compute the ``windows`` of a plan (later ones may wait for ``opening``: the rest of a new run's plan) as one
    stream of batches and write it through a :class:`ChunkWriter`; ``sink`` receives the written rows and closes the
    session. ``location``: the activation store, for messages. Progress is reported once the run is recorded (a
    large new run is recorded once all its windows are planned; batches before that are not waited for, but
    reported with the next, or at the end); ``done_examples`` counts the rows done before this session
    (``Opened.n_done``) and those computed."""
    start_t = time.perf_counter()
    resumed = opening.done()  # a resumed run is open before computing; a new one opens during its first batch
    if resumed and opening.exception() is not None:
        raise opening.exception()  # type: ignore[misc]
    present = opening.result().present if resumed else set()
    first, planned_to = next(windows)
    assembler = ChunkAssembler(first, opening, len(layers), loaded.d_model, present, planned_to=planned_to)
    unit_bytes = assembler.per * len(layers) * loaded.d_model * 4  # float32 from the model, before storage dtype
    in_flight = units_in_flight(unit_bytes, config.writer_threads, tuning)
    writer = ChunkWriter(opening, str(location), max_in_flight=in_flight, threads=config.writer_threads)
    state = {"tokens": 0, "computed": 0, "reported": 0}
    status, error, left = "done", None, []
    drain_s = close_s = elapsed = tok_s = 0.0
    counts = (0, 0)
    examples: list[Rendered] = []  # every window's examples, in order; batches index into it
    rows: list[int] = []

    def batches() -> Iterator[list[int]]:
        """Each window's batches as indices into ``examples``; a later window is taken (and its rows planned in
        the assembler) only when the model asks for its next batch, so one generator computes them all."""
        plan: ExtractionPlan | None = first
        while plan is not None:
            base = len(examples)
            examples.extend(plan.examples)
            rows.extend(plan.rows)
            for batch in plan.batches:
                yield [base + i for i in batch]
            plan = None
            for plan, upto in windows:  # the next window (waits for it), planned before its batches are computed
                assembler.extend(plan, upto)
                break
        sink.last_batch_launched()  # the core asks for a batch after launching the one before: this was the last

    def computed() -> Generator[tuple[list[int], Any, int]]:
        means = iter_mean_activations(
            loaded, examples, layers, batches=batches(), compile=config.compile,
            pad_to=tuning.compile_pad if config.compile else 1,
        )  # fmt: skip
        with contextlib.closing(means):  # removes the capture hooks at once, however the loop ends
            for batch, values, n_tok in means:
                yield [rows[i] for i in batch], values, n_tok

    def report(wait: bool = False) -> None:
        """Call ``progress`` if the run is recorded (it gets the run id), or with ``wait`` once it is."""
        if progress is not None and (wait or opening.done()) and state["reported"] != state["computed"]:
            opened = opening.result()
            elapsed = time.perf_counter() - start_t
            done = opened.n_done + state["computed"]
            progress(ExtractionProgress(opened.info.run_id, done, n_examples, state["tokens"], elapsed))
            state["reported"] = state["computed"]

    def on_batch(n_rows: int, tokens: int) -> None:
        state["tokens"] += tokens
        state["computed"] += n_rows
        report()

    stream = computed()
    try:
        try:
            store_batches(
                assembler, stream, writer, on_written=sink.mark_done, on_batch=on_batch,
                flush_seconds=config.flush_seconds, flush_rows=config.flush_rows,
            )  # fmt: skip
            report(wait=True)  # the last batches' progress, if the run was recorded only after them
            t_drain = time.perf_counter()
            writer.close()
            left = sink.drain(writer.written())
            drain_s = time.perf_counter() - t_drain
        except BaseException as exc:
            status = "interrupted" if isinstance(exc, KeyboardInterrupt | ExtractionInterrupted) else "failed"
            error = f"{type(exc).__name__}: {exc}"
            if isinstance(windows, Generator):
                windows.close()  # a large run's planning, if still going, stops at its next window
            writer.close(raise_errors=False)
            left = sink.drain(writer.written(), raise_errors=False)
            failed = opening.exception()
            if isinstance(failed, PlanningStopped):  # stopped by this error before the run was recorded
                raise
            if failed is not None:  # the run was never recorded, or recording it failed
                raise failed from None
            run_id = opening.result().info.run_id
            if isinstance(exc, StorageError) and not isinstance(exc, StorageOverflowError):
                raise StorageError(f"{exc}; {resume_hint(run_id)}") from exc
            if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):  # Ctrl-C, SIGTERM
                raise RunInterrupted(run_id, f"personavec extract --resume {run_id}") from exc
            raise
    finally:
        stream.close()
        elapsed = time.perf_counter() - start_t
        tok_s = state["tokens"] / elapsed if elapsed > 0 and state["tokens"] else 0.0
        if opening.exception() is None:
            t_close = time.perf_counter()
            counts = sink.finish(status, error, state["tokens"], elapsed, left)
            close_s = time.perf_counter() - t_close
    info, opened = opening.result().info, opening.result()
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
