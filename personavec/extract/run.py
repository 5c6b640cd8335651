"""The ``extract`` stage: a catalogued, resumable extraction run over a responses run.

``run_extraction(ws, ExtractConfig(responses_run=N, ...))`` plans every selected answered response (Zarr row, token
span, token counts, truncation), records the plan in one catalog transaction, creates the run's Zarr array once that
has committed, and computes with :mod:`personavec.extract.core`; the model starts on a first batch while the rest is
planned and recorded (:func:`_new_run`, :data:`PLAN_INLINE_MAX`). Rows are assigned longest-first (within each
window of the plan), so consecutive batches fill consecutive write units (shards, see :mod:`personavec.arrays`); a
write unit is assembled and written whole by a pool of writer threads, and its rows are marked done (on a catalog
thread, at most once a second) only after the write completed. Partly filled units are also written every
``flush_seconds`` / ``flush_rows``, so a kill loses a bounded amount of work. An answer with no tokens to average
(an empty answer) is planned with an empty span and marked done at once: it has no row of activations (NaN) and the
vector stage leaves it out. ``run_extraction(ws, None, resume=RUN)`` rebuilds the run's stored config, adopts rows
that were written but not yet marked done, and computes only the rest.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import heapq
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Generator, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import pyarrow as pa

from personavec import arrays
from personavec.arrays import STORAGE_DTYPES
from personavec.config import DTYPES, check_selection, config_dict, config_from_dict, default_layer
from personavec.errors import (
    ConfigError,
    ModelError,
    PersonavecError,
    RunInterrupted,
    StorageConflictError,
    StorageCorruptError,
    StorageError,
    StorageOverflowError,
)
from personavec.extract.core import default_batch_tokens, iter_mean_activations, plan_batches
from personavec.modeling import LoadedModel, load_model, model_provenance
from personavec.spans import PROMPT_FORMATS, SPAN_RULES, Rendered, conversation, render, render_many, render_workers
from personavec.store import extraction as xs
from personavec.store.responses import ResponseRecord

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace


@dataclass(frozen=True)
class ExtractConfig:
    """Configuration of an extraction run (serialised into the run row).

    Attributes:
        responses_run: the responses run (``generate`` / ``ingest-responses``) to extract; required for a new run.
        model: hub id, local directory, ``.gguf`` file or ``"smollm2-135m-instruct"``.
        layers: layers to extract (``hidden_states`` indices), or None for the seed's default
            :func:`personavec.config.default_layer` of ``layer_fraction``.
        layer_fraction: used when ``layers`` is None.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        device_map: ``from_pretrained``'s ``device_map`` for models larger than one device (e.g. ``"auto"``).
        max_batch_tokens: token budget per batch, counted as ``batch_size * longest_sequence`` (padding included);
            None = :func:`personavec.extract.core.default_batch_tokens` for the device (1,024 on CPU, 16,384 on GPU).
        max_batch_size: most conversations per batch.
        span: ``"exact"`` (response tokens via offsets) or ``"seed"`` (the seed's rule, see :mod:`personavec.spans`).
        prompt_format: ``"chat"`` (chat template) or ``"raw"`` (seed's plaintext format).
        max_length: context to truncate to; None = the model's position limit.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` by default).
        chunk_rows: Zarr rows per shard, the write unit; None = ``arrays.shard_rows_for(...)`` (~64 MB of rows).
        compile: ``torch.compile`` each decoder block that runs (regional compilation: the blocks share code, so they
            compile once), with sequence widths padded to a multiple of 8. For GPUs: 1.6x the eager throughput on
            an H100 (gemma-3-27b shapes) after a one-off compile of ~25 s paid by the first batches; same means up to
            rounding. Needs a C++ compiler on CPU (inductor) and gains little there. Off by default.
        personas: only responses of these personas (names), or None for all.
        questions: only responses to these questions (0-based positions in the question set), or None for all.
        layers_path: attribute path of the model's decoder-block ModuleList (e.g. ``"model.layers"``), for a model
            whose blocks auto-detection does not find; None = auto-detect.
        gpus_per_process: with several processes (data parallel, :mod:`personavec.extract.distributed`), the GPUs
            each process shards its replica over with ``device_map`` (process ``r`` of a node takes GPUs
            ``r*K .. r*K+K-1``); 1 = one whole replica per GPU.
        storage_dtype: how activations are stored: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"`` (half
            the bytes; a value float16 cannot hold fails the run, never stored as inf).
        writer_threads: threads writing shards while the model computes.
        flush_seconds, flush_rows: durability bound: partly filled shards are written (and their rows marked done)
            once this many seconds or computed rows have passed since the last time, whichever comes first; a kill
            loses at most that much work.
    """

    responses_run: int | None = None
    model: str = "smollm2-135m-instruct"
    layers: tuple[int, ...] | None = None
    layer_fraction: float = 0.65
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int = 64
    span: str = "exact"
    prompt_format: str = "chat"
    max_length: int | None = None
    attn_implementation: str | None = "sdpa"
    chunk_rows: int | None = None
    compile: bool = False
    personas: tuple[str, ...] | None = None
    questions: tuple[int, ...] | None = None
    layers_path: str | None = None
    gpus_per_process: int = 1
    storage_dtype: str = "float32"
    writer_threads: int = 4
    flush_seconds: float = 30.0
    flush_rows: int = 8192

    def __post_init__(self) -> None:
        for name in ("personas", "questions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if not value:
                    raise ConfigError(f"{name} filter is empty: leave it out (None) to take every response")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.span not in SPAN_RULES:
            raise ConfigError(f"span must be one of {', '.join(SPAN_RULES)}, got {self.span!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if (self.max_batch_tokens is not None and self.max_batch_tokens <= 0) or self.max_batch_size <= 0:
            raise ConfigError("max_batch_tokens and max_batch_size must be > 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"layers must be distinct non-negative integers, got {self.layers}")
        if self.chunk_rows is not None and self.chunk_rows <= 0:
            raise ConfigError("chunk_rows must be > 0")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")
        if not isinstance(self.gpus_per_process, int) or self.gpus_per_process < 1:
            raise ConfigError(f"gpus_per_process must be an integer >= 1, got {self.gpus_per_process!r}")
        if self.storage_dtype not in STORAGE_DTYPES:
            raise ConfigError(f"storage_dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.storage_dtype!r}")
        if self.writer_threads < 1 or self.flush_seconds <= 0 or self.flush_rows < 1:
            raise ConfigError("writer_threads and flush_rows must be >= 1 and flush_seconds > 0")
        if self.layers_path is not None and not self.layers_path.strip(". "):
            raise ConfigError("layers_path is empty: give the decoder blocks' path (e.g. 'model.layers') or None")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The requested layers, or the seed's default layer for a model of ``n_layers`` blocks; validated."""
        layers = self.layers if self.layers is not None else (default_layer(n_layers, self.layer_fraction),)
        bad = [x for x in layers if x > n_layers]
        if bad:
            raise ConfigError(f"layers {bad} out of range: the model has {n_layers} layers (valid 0..{n_layers})")
        return layers


#: Fields that define what a run computes; a resumed run keeps them (the others are how it runs: device, batching,
#: compilation, attention kernel, where the decoder blocks are).
IDENTITY_FIELDS = (
    "responses_run",
    "model",
    "layers",
    "layer_fraction",
    "dtype",
    "span",
    "prompt_format",
    "max_length",
    "chunk_rows",
    "personas",
    "questions",
    "storage_dtype",
)


def load_for(config: ExtractConfig, *, max_memory: dict[int | str, int | str] | None = None) -> LoadedModel:
    """Load the model an :class:`ExtractConfig` names (``max_memory``: per-device budget for ``device_map``)."""
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        device_map=config.device_map,
        attn_implementation=config.attn_implementation,
        layers_path=config.layers_path,
        max_memory=max_memory,
    )


def encode_response(
    loaded: LoadedModel, system_prompt: str | None, question: str, response: str, config: ExtractConfig
) -> Rendered:
    """Render one seed-style conversation (system, user, assistant) under the config's format, rule and context."""
    return render(
        loaded.tokenizer,
        conversation(system_prompt, question, response),
        config.prompt_format,
        config.span,
        max_length=config.max_length or loaded.context_length,
    )


def encode_responses(
    loaded: LoadedModel, conversations: Iterable[tuple[str | None, str, str]], config: ExtractConfig
) -> list[Rendered]:
    """:func:`encode_response` for many ``(system_prompt, question, response)`` at once (batched tokenization,
    shared prefixes rendered once; the same result)."""
    return render_many(
        loaded.tokenizer,
        [conversation(sp, q, r) for sp, q, r in conversations],
        config.prompt_format,
        config.span,
        max_length=config.max_length or loaded.context_length,
    )


#: Renders ``(system prompt, question, response)`` conversations for a run's plan, in order. The default renders them
#: here (batched, :func:`encode_responses`); the data-parallel path (:mod:`personavec.extract.distributed`) spreads
#: them over its processes.
Renderer = Callable[[LoadedModel, ExtractConfig, Sequence[tuple[str | None, str, str]]], list[Rendered]]


def render_all(
    loaded: LoadedModel, config: ExtractConfig, conversations: Sequence[tuple[str | None, str, str]]
) -> list[Rendered]:
    """Render every ``(system prompt, question, response)`` with :func:`encode_responses` (the default Renderer)."""
    return encode_responses(loaded, conversations, config)


@dataclass(frozen=True)
class ExtractionProgress:
    """What the progress callback receives after each batch."""

    run_id: int
    done_examples: int
    total_examples: int
    tokens: int
    elapsed_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ExtractionResult:
    """What :func:`run_extraction` did. ``n_no_span``: examples with no tokens to average (empty answers), done
    without a row of activations; ``n_adopted``: rows a resumed session found written but not marked done and kept.
    ``timings``: seconds before the model starts (``plan_s``: selecting the responses and planning the first batch;
    a resumed run: opening it), from then to the last row written (``compute_s``), of which waiting for the writers
    while the model could have computed (``stall_s``) and writing after the last batch (``drain_s``), and closing
    the run in the catalog (``close_s``)."""

    run_id: int
    zarr_group: str
    layers: tuple[int, ...]
    n_examples: int
    n_computed: int
    n_tokens: int
    tok_s: float
    n_truncated: int
    n_no_span: int = 0
    n_adopted: int = 0
    timings: dict[str, float] = field(default_factory=dict)


class ExtractionInterrupted(Exception):
    """Raise from a progress callback to stop a run on purpose (it is then marked ``interrupted``)."""


# -- the plan ----------------------------------------------------------------------------------------------------


def longest_first(lengths: Sequence[int]) -> list[int]:
    """The Zarr row of each example: longest first (ties in input order), so batches fill chunks in row order."""
    order = np.lexsort((np.arange(len(lengths)), -np.asarray(lengths, dtype=np.int64)))
    rows = np.empty(len(lengths), dtype=np.int64)
    rows[order] = np.arange(len(lengths))
    return rows.tolist()


def has_span(example: Rendered) -> bool:
    """Whether an example has tokens to average (an empty answer, or one truncated away, has none)."""
    start, end = example.assistant_spans[0]
    return end > start


@dataclass(frozen=True)
class ExtractionPlan:
    """What a run (or a resumed session of it) computes, worked out once.

    ``examples[i]`` goes to Zarr row ``rows[i]``; examples are in row order, and ``batches`` (lists of indices into
    ``examples``) cover consecutive rows, so write units (``chunk_rows`` rows: a shard) complete one after another.
    Examples without a span are not in the plan (they are done when the run is created).
    """

    examples: list[Rendered]
    rows: list[int]
    n_rows: int
    chunk_rows: int
    batches: list[list[int]]

    @classmethod
    def build(
        cls,
        examples: Sequence[Rendered],
        rows: Sequence[int],
        *,
        n_rows: int,
        chunk_rows: int,
        max_batch_tokens: int,
        max_batch_size: int,
    ) -> ExtractionPlan:
        """Sort ``examples`` by their ``rows`` and plan the batches under the token budget."""
        order = sorted(range(len(rows)), key=rows.__getitem__)
        examples = [examples[i] for i in order]
        rows = [int(rows[i]) for i in order]
        batches = plan_batches([ex.forward_length for ex in examples], max_batch_tokens, max_batch_size)
        batches.sort(key=lambda b: rows[b[0]])
        return cls(examples, rows, n_rows, chunk_rows, batches)

    def chunk_len(self, chunk: int) -> int:
        """Rows in chunk ``chunk`` (the last one may be short)."""
        return min(self.chunk_rows, self.n_rows - chunk * self.chunk_rows)


# -- chunk assembly ----------------------------------------------------------------------------------------------


def row_ranges(rows: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows as ``[start, stop)`` ranges of consecutive rows."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not rows.size:
        return []
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cuts)]


@dataclass
class _Block:
    """One write unit being filled: rows ``[start, stop)``; ``pieces`` are computed rows (``(first row, float32
    [k, n_layers, d_model])`` views of batch outputs, never copied on the model's thread). ``sealed``: every row of
    it is planned (a unit straddling the end of a plan window waits for the next window)."""

    start: int
    stop: int
    missing: int
    read_base: bool
    sealed: bool = True
    pieces: list[tuple[int, np.ndarray]] = field(default_factory=list)
    flushed: int = 0


def _resolve(array: Any) -> Any:
    """The array, or what a future of it (the run's array, created while the first batch computes) holds."""
    if isinstance(array, Future):
        opened = array.result()
        return getattr(opened, "array", opened)
    return array


class ChunkAssembler:
    """Collects computed rows into whole write units; a unit leaves once all its planned rows are in.

    The model's thread only keeps references to batch outputs; :meth:`job` returns a function that builds the unit
    (NaN where nothing was computed, or what the store holds for rows done in an earlier session), checks the
    computed rows are finite, and writes it: that runs on a writer thread. ``array`` may be a future (a new run's
    array is created while the first batch computes): the writer threads wait for it, not the model's.

    A plan may come in windows (:meth:`extend`): rows at and above ``planned_to`` are not planned yet, and a unit
    holding some of them leaves only once a later window has planned them.
    """

    def __init__(
        self,
        plan: ExtractionPlan,
        array: Any,
        n_layers: int,
        d_model: int,
        present: Collection[int] = (),
        planned_to: int | None = None,
    ) -> None:
        self.array = array
        self.shape = (n_layers, d_model)
        self.per = plan.chunk_rows
        self.n_rows = plan.n_rows
        self.present = set(present)
        self.blocks: dict[int, _Block] = {}
        self._ready: list[_Block] = []
        self.extend(plan, planned_to)

    def extend(self, plan: ExtractionPlan, planned_to: int | None = None) -> None:
        """Add a window of the plan: its rows, and that every row below ``planned_to`` (default: all) is planned.
        Units it completes leave with the next :meth:`add`."""
        per = self.per
        planned_to = self.n_rows if planned_to is None else planned_to
        if plan.rows:
            counts = np.bincount(np.asarray(plan.rows, dtype=np.int64) // per)
            for b in np.flatnonzero(counts).tolist():
                block = self.blocks.get(b)
                if block is None:
                    length = min(per, self.n_rows - b * per)
                    # A unit not fully planned holds rows done earlier: read back before it is rewritten, if it exists.
                    read_base = int(counts[b]) < length and b in self.present
                    block = self.blocks[b] = _Block(b * per, b * per + length, 0, read_base, sealed=False)
                block.missing += int(counts[b])
        for b, block in list(self.blocks.items()):
            if not block.sealed and block.stop <= planned_to:
                block.sealed = True
                if block.missing == 0:
                    self._ready.append(self.blocks.pop(b))

    def ready(self) -> list[_Block]:
        """Units completed by :meth:`extend` and not returned yet."""
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
            if block.missing == 0 and block.sealed:
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

        def write() -> list[tuple[int, int]]:
            for first, values in pieces:
                bad = arrays.nonfinite_rows(values)
                if bad.size:
                    raise ModelError(
                        f"the model produced NaN/inf activations for Zarr row(s) {[first + int(i) for i in bad[:5]]}"
                        " (half-precision overflow?): extract again with --dtype float32 or bfloat16"
                    )
            array = _resolve(source)
            if len(pieces) == 1 and pieces[0][0] == start and len(pieces[0][1]) == stop - start:
                out = pieces[0][1]
            else:
                if read_base:
                    out = arrays.read_rows(array, np.arange(start, stop))
                else:
                    out = np.full((stop - start, *shape), np.nan, dtype=np.float32)
                for first, values in pieces:
                    out[first - start : first - start + len(values)] = values
            arrays.write_rows(array, start, out)
            return done

        return write, done


# -- the writer --------------------------------------------------------------------------------------------------

Job = Callable[[], Any]


#: Computed rows that may wait in memory for the writers (units assembled or being written), in bytes: a large new
#: run's units wait for its array until all of it is planned and recorded (36 s for 330,000 answers on a 16-core
#: H200 host); with every layer of a 27B model kept, 4 GiB is ~3,000 rows, ~80 s of an H200's compute, where the old
#: bound (2 units per writer thread, ~400 rows) stopped the model after ~11 s.
IN_FLIGHT_BYTES = 4 << 30


def units_in_flight(unit_bytes: int, threads: int) -> int:
    """How many write units of ``unit_bytes`` may wait or be written at once: :data:`IN_FLIGHT_BYTES` of them, and
    at least two per writer thread."""
    return max(2 * threads, IN_FLIGHT_BYTES // max(unit_bytes, 1))


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
            future = self._pool.submit(lambda: arrays.write_rows(_resolve(self.array), start, values))
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


class DoneMarker:
    """Marks written rows done in the catalog on a thread of its own, at most every ``interval`` seconds, so the
    model's thread never waits for a DuckDB commit. A failed commit raises at the next :meth:`add` and at
    :meth:`close`; rows written but not marked when the process dies are adopted by the next resume."""

    def __init__(self, catalog: Catalog, run_id: int | Callable[[], int], interval: float = 1.0) -> None:
        self.catalog = catalog
        self.run_id = run_id  # or how to get it (a new run is recorded while its first batch computes)
        self.interval = interval
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-catalog")
        self._queued: list[tuple[int, int]] = []
        self._future: Future[None] | None = None
        self._last = time.monotonic()
        self._held = False

    def _collect(self, wait: bool) -> None:
        if self._future is not None and (wait or self._future.done()):
            future, self._future = self._future, None
            future.result()

    def add(self, ranges: Sequence[tuple[int, int]], *, now: bool = False) -> None:
        """Queue ranges; commit the queue in the background when ``interval`` has passed (or ``now``)."""
        self._collect(wait=False)
        self._queued.extend(ranges)
        due = now or time.monotonic() - self._last >= self.interval
        if self._queued and due and self._future is None and not self._held:
            batch, self._queued = row_ranges([r for a, b in self._queued for r in range(a, b)]), []
            run_id = self.run_id() if callable(self.run_id) else self.run_id
            self._future = self._pool.submit(xs.mark_done, self.catalog, run_id, batch)
            self._last = time.monotonic()

    def hold(self) -> None:
        """Commit nothing more in the background: the rest is marked by the unit of work that closes the run (the
        last batch is computing; a commit started now would be waited for at the end, ~50 ms)."""
        self._held = True

    def drain(self, ranges: Sequence[tuple[int, int]] = (), *, raise_errors: bool = True) -> list[tuple[int, int]]:
        """Wait for the commit in flight and stop the thread; returns what is still to be marked (queued and
        ``ranges``), for the unit of work that closes the run."""
        try:
            self._collect(wait=True)
        except Exception:
            if raise_errors:
                raise
        finally:
            self._pool.shutdown(wait=True)
        left = row_ranges([r for a, b in [*self._queued, *ranges] for r in range(a, b)])
        self._queued = []
        return left


# -- the stage ---------------------------------------------------------------------------------------------------


def run_extraction(
    ws: Workspace,
    config: ExtractConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[ExtractionProgress], None] | None = None,
    loaded: LoadedModel | None = None,
) -> ExtractionResult:
    """Extract per-response mean activations of a responses run into a new (or resumed) extraction run.

    Args:
        ws: the workspace (its catalog and ``activations.zarr``).
        config: what to extract; ``config.responses_run`` names the responses run. May be None with ``resume``
            (the run's stored config is used); given with ``resume``, its :data:`IDENTITY_FIELDS` must match the
            run's (a :class:`ConfigError` names those that differ) and its other fields (device, batching,
            compilation, layers path, writer threads, flush bounds) apply to this session.
        resume: an extract run to continue: rows written but not marked done are adopted (when finite and their
            checksums hold), and only the rest is computed.
        progress: called after each batch with an :class:`ExtractionProgress`, once the run is recorded (it carries
            the run id; a large new run is recorded once all of it is planned, while it computes); raising
            :class:`ExtractionInterrupted` from it stops the run (marked ``interrupted``; every written unit stays
            done). Ctrl-C (or SIGTERM in the CLI) does the same and leaves as :class:`RunInterrupted`, which names the
            resume command; any other exception marks the run ``failed``.
        loaded: an already loaded model matching the config (skips loading).

    Returns:
        an :class:`ExtractionResult`. A store that cannot be written raises :class:`StorageError`; the run is then
        marked ``failed`` and ``resume`` completes it.

    Example:
        >>> run_extraction(ws, ExtractConfig(responses_run=2, layers=(10, 20), device="cpu")).run_id
        3
    """
    # -- data-parallel hook: under `accelerate launch` (world size > 1) every process takes the distributed path,
    # where rank 0 alone plans and writes the catalog (personavec.extract.distributed).
    from personavec.extract import distributed

    if distributed.world_size() > 1:
        return distributed.run_distributed(ws, config, resume=resume, progress=progress, loaded=loaded)
    # -- end of the data-parallel hook
    catalog = ws.catalog()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-plan") as pool:
        if resume is None:
            if config is None:
                raise ConfigError("run_extraction needs a config (new run) or resume=RUN_ID")
            if config.responses_run is None:
                raise ConfigError("ExtractConfig.responses_run is not set: name the responses run to extract")
            loaded = loaded or load_for(config)
            t0 = time.perf_counter()
            first, layers, n_examples, rest = _new_run(ws, catalog, config, config.responses_run, loaded)
            # The model starts on the first batch. A small run's rest is planned, the run recorded and its array
            # created by the model's thread when it asks for the next batch (the first computing meanwhile); a large
            # run's on a helper thread, in windows handed to the model as they are planned.
            opening: Future[_Opened]
            if n_examples <= PLAN_INLINE_MAX:
                opening = _OnDemand(rest)
                windows = _first_then_rest(first, opening)
            else:
                planned: queue.Queue[Window | None] = queue.Queue()
                stop = threading.Event()
                opening = pool.submit(_announcing_failure, rest, planned, stop)
                windows = _first_then_streamed((first, len(first.examples)), planned, opening, stop)
        else:
            config = _resumed_config(catalog, resume, config)
            loaded = loaded or load_for(config)
            t0 = time.perf_counter()
            opened, rows, conversations = _resumed_run(ws, catalog, resume, config, loaded)
            layers, n_examples = opened.info.layers, opened.info.n_examples
            opening = Future()
            opening.set_result(opened)
            k = config.max_batch_size
            if len(rows) <= max(PLAN_INLINE_MAX, k):
                windows = iter([(_plan_pending(loaded, config, opened, rows, conversations), None)])
            else:  # the model starts on the first rows; the rest is planned in windows on a helper thread
                first = _plan_pending(loaded, config, opened, rows[:k], conversations[:k])
                pending_rest = functools.partial(_pending_windows, loaded, config, opened, rows[k:], conversations[k:])
                planned, stop = queue.Queue(), threading.Event()
                planning = pool.submit(_announcing_failure, pending_rest, planned, stop)
                windows = _first_then_streamed((first, rows[k]), planned, planning, stop)
        plan_s = time.perf_counter() - t0
        sink = RunSink(catalog, lambda: opening.result().info.run_id)
        return _compute(ws.zarr_location, opening, config, loaded, windows, layers, n_examples, progress, plan_s, sink)


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


def _first_then_rest(first: ExtractionPlan, opening: Future[_Opened]) -> Iterator[Window]:
    """A small new run's windows: its first batch, then the rest of its plan, planned when the model asks for it.
    The rest seals the write units the first left open."""
    yield first, len(first.examples)
    rest = opening.result().rest
    assert rest is not None  # a small new run's rows after its first batch, in one window
    yield rest, None


T = TypeVar("T")


class _PlanningStopped(Exception):
    """The model's thread stopped (Ctrl-C, an error) while a large run's rest was still being planned."""


def _announcing_failure(rest: Callable[..., T], planned: queue.Queue[Window | None], stop: threading.Event) -> T:
    """Run the ``rest`` of a large run's plan on the helper thread, its windows into ``planned``; None there if it
    fails. Once ``stop`` is set it stops at the next window (a new run: before it is recorded)."""

    def emit(window: Window) -> None:
        if stop.is_set():
            raise _PlanningStopped("the run stopped before all of it was planned; nothing was recorded")
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


@dataclass(frozen=True)
class _Opened:
    """A run ready to be written: its catalog info, array, the write units already in the store, rows adopted, the
    plan of the rows after the first batch (a new run whose rest came in one window), and the rows already done."""

    info: xs.ExtractionRunInfo
    array: Any
    present: set[int] = field(default_factory=set)
    n_adopted: int = 0
    rest: ExtractionPlan | None = None
    n_done: int = 0  # rows done before this session computes (no span; done in an earlier session)


def _selected_responses(catalog: Catalog, config: ExtractConfig, run: int) -> list[ResponseRecord]:
    names, n_questions, answered = xs.responses_to_extract(catalog, run)
    check_selection(f"responses run {run}", config.personas, config.questions, names, n_questions)
    records = [
        r
        for r in answered
        if (config.personas is None or r.persona in config.personas)
        and (config.questions is None or r.question_position in config.questions)
    ]
    if not records:
        which = " of the selected personas and questions" if config.personas or config.questions else ""
        raise ConfigError(f"responses run {run} has no answered responses{which} to extract")
    return records


def _examples_table(records: Sequence[ResponseRecord], examples: Sequence[Rendered], rows: Sequence[int]) -> pa.Table:
    first = [ex.assistant_spans[0] for ex in examples]
    return pa.table(
        {
            "response_id": pa.array([r.id for r in records], pa.int64()),
            "row": pa.array(rows, pa.int32()),
            "span_start": pa.array([s for s, _ in first], pa.int32()),
            "span_end": pa.array([e for _, e in first], pa.int32()),
            "n_tokens": pa.array([ex.forward_length for ex in examples], pa.int32()),
            "n_response_tokens": pa.array([e - s for s, e in first], pa.int32()),
            "truncated": pa.array([ex.truncated for ex in examples], pa.bool_()),
            # no tokens to average: nothing to compute, so done from the start (no row of activations)
            "done": pa.array([e <= s for s, e in first], pa.bool_()),
        }
    )


def _chars(record: ResponseRecord) -> int:
    return len(record.text) + len(record.question) + len(record.system_prompt or "")


def _budget(config: ExtractConfig, loaded: LoadedModel) -> int:
    return config.max_batch_tokens or default_batch_tokens(loaded.input_device)


#: Sizes (answers) of the windows a large new run's rest is planned in, the last repeated: the first few are quick
#: to plan, so the model soon has work after its first batch; later ones are rendered by parallel processes.
REST_WINDOWS = (1024, 4096, 16384, 65536)


def _window_bounds(n: int) -> Iterator[tuple[int, int]]:
    """``(start, stop)`` of the windows ``n`` items are planned in (:data:`REST_WINDOWS`, the last size repeated);
    one empty window when ``n`` is 0."""
    start, sizes = 0, iter(REST_WINDOWS)
    while True:
        stop = min(start + next(sizes, REST_WINDOWS[-1]), n)
        yield start, stop
        if stop >= n:
            return
        start = stop


#: A new run (without ``chunk_rows``) has at least this many write units (shards) when they can each hold one inner
#: chunk of rows (about 1 MB a layer): a unit is written as soon as its rows are computed, while later batches
#: compute, so that only the last units are written after the last batch (one layer of a 27B model made a 414-answer
#: run a single 9 MB shard, written whole at the end).
MIN_UNITS = 8

#: A new run of at most this many answers plans the rest of its plan (after the first batch) on the model's own
#: thread, while the first batch computes (about 0.5 s of tokenizing on an H200 host's CPU for the largest: no other
#: thread competes with the model's for the GIL); a larger one on a helper thread.
PLAN_INLINE_MAX = 2048


def _new_run(
    ws: Workspace,
    catalog: Catalog,
    config: ExtractConfig,
    run: int,
    loaded: LoadedModel,
    render: Renderer = render_all,
    min_units: int = MIN_UNITS,
    min_unit_rows: int | None = None,
) -> tuple[ExtractionPlan, tuple[int, ...], int, Callable[[], _Opened]]:
    """Select the responses and plan the first batch only; returns that plan (rows ``0..k-1``), the layers, the
    number of examples, and the function that plans the rest (rows ``k..n-1``, longest first), records the run (one
    transaction, every example) and then creates its array. Splitting keeps tokenizing a run off the GPU's path: the
    model starts on the first batch right away. The first batch is the one the whole plan would start with, about:
    the longest (by a character count, a proxy for tokens) that fit the token budget. ``min_units``: without
    ``config.chunk_rows``, shards are made small enough that the run has at least this many, but of no fewer than
    ``min_unit_rows`` rows (default: one inner chunk of the layout, see :data:`MIN_UNITS`; data parallel asks for
    more units, of any size: work to share out)."""
    records = _selected_responses(catalog, config, run)
    layers = config.resolve_layers(loaded.n_layers)
    n = len(records)
    per = arrays.layout_for(
        n, len(layers), loaded.d_model, config.storage_dtype, config.chunk_rows,
        min_units=min_units, min_unit_rows=min_unit_rows,
    )[0]  # fmt: skip
    budget = _budget(config, loaded)

    def triples(part: Sequence[ResponseRecord]) -> list[tuple[str | None, str, str]]:
        return [(r.system_prompt, r.question, r.text) for r in part]

    head_at = sorted(heapq.nlargest(config.max_batch_size, range(n), key=lambda i: _chars(records[i])))
    head = [records[i] for i in head_at]
    head_examples = render(loaded, config, triples(head))
    spanned = [i for i, ex in enumerate(head_examples) if has_span(ex)]
    lengths = [head_examples[i].forward_length for i in spanned]
    batch = [spanned[i] for i in plan_batches(lengths, budget, config.max_batch_size)[0]] if spanned else []
    in_first = set(batch)
    first = ExtractionPlan.build(
        [head_examples[i] for i in batch], range(len(batch)), n_rows=n, chunk_rows=per,
        max_batch_tokens=budget, max_batch_size=config.max_batch_size,
    )  # fmt: skip

    def rest(emit: Callable[[Window], None] | None = None) -> _Opened:
        """Plan the rows after the first batch, record the run, create its array. Without ``emit``, in one window
        (the returned rest). With it, in windows of growing size (:data:`REST_WINDOWS`, the conversations in the
        character proxy's order, longest first; each window's rows longest first), each handed to ``emit`` as soon
        as it is planned, the last with no ``planned_to``; the run is recorded after the last."""
        in_head = set(head_at)
        others = [i for i in range(n) if i not in in_head]
        if emit is not None:
            others.sort(key=lambda i: -_chars(records[i]))
        carried = [i for i in range(len(head)) if i not in in_first]  # head answers left out of the first batch
        carried_records, carried_examples = [head[i] for i in carried], [head_examples[i] for i in carried]
        all_records, all_examples = [head[i] for i in batch], list(first.examples)
        all_rows: list[int] = list(range(len(batch)))
        # at least one window, even an empty one: it seals the units the first batch left open
        bounds = _window_bounds(len(others)) if emit is not None else iter([(0, len(others))])
        # a large run's windows share one set of rendering processes (spans.render_workers)
        workers = render_workers(loaded.tokenizer, len(others)) if emit is not None else contextlib.nullcontext()
        with workers:
            for start, stop in bounds:
                part = [records[i] for i in others[start:stop]]
                window_records = carried_records + part
                window_examples = carried_examples + render(loaded, config, triples(part))
                carried_records, carried_examples = [], []
                offset = len(all_rows)
                rows = [offset + r for r in longest_first([ex.forward_length if has_span(ex) else 0
                                                           for ex in window_examples])]  # fmt: skip
                keep = [i for i, ex in enumerate(window_examples) if has_span(ex)]
                plan = ExtractionPlan.build(
                    [window_examples[i] for i in keep], [rows[i] for i in keep], n_rows=n, chunk_rows=per,
                    max_batch_tokens=budget, max_batch_size=config.max_batch_size,
                )  # fmt: skip
                all_records += window_records
                all_examples += window_examples
                all_rows += rows
                if emit is not None:
                    emit((plan, offset + len(rows) if stop < len(others) else None))
        opened = record(_examples_table(all_records, all_examples, all_rows), plan if emit is None else None)
        return dataclasses.replace(opened, n_done=sum(not has_span(ex) for ex in all_examples))

    def record(table: pa.Table, plan: ExtractionPlan | None) -> _Opened:
        model_id, revision = model_provenance(config.model)
        info = xs.create_extraction_run(
            catalog,
            {**config_dict(config), "layers": list(layers)},
            table,
            zarr_group=arrays.group_name,
            source_run_id=run,
            model=model_id,
            model_revision=revision or loaded.revision,
            architecture=loaded.architecture,
            n_model_layers=loaded.n_layers,
            d_model=loaded.d_model,
            layers=list(layers),
            dtype=str(loaded.dtype).removeprefix("torch."),
            span_rule=config.span,
            prompt_format=config.prompt_format,
            device=loaded.device,
            n_examples=n,
        )
        array = _array(ws, catalog, info, config, create=True, chunk_rows=per)
        if arrays.rows_per_chunk(array) != per:  # the plan's write units must be the array's shards, or rows are lost
            error = f"{info.zarr_group}: array made with shards of {arrays.rows_per_chunk(array)} rows, planned {per}"
            xs.finish_extraction(catalog, info.run_id, "failed", f"StorageError: {error}", None)
            raise StorageError(error)
        return _Opened(info, array, rest=plan)

    return first, layers, n, rest


def _array(
    ws: Workspace,
    catalog: Catalog,
    info: xs.ExtractionRunInfo,
    config: ExtractConfig,
    *,
    create: bool,
    resume: bool = False,
    chunk_rows: int | None = None,
) -> Any:
    """The run's Zarr array, created when ``create`` (after the run's rows committed: no group without its run)
    with ``chunk_rows`` rows per shard (default ``config.chunk_rows``). A store that fails here marks the run failed
    (resume creates the array again)."""
    try:
        if create:
            arrays.create_activation_array(
                ws.zarr_location,
                info.run_id,
                info.n_examples,
                len(info.layers),
                info.d_model,
                attrs={"layers": list(info.layers), "model": info.model, "run_id": info.run_id},
                chunk_rows=chunk_rows or config.chunk_rows,
                dtype=config.storage_dtype,
                resume=resume,
            )
        return arrays.open_activation_array(ws.zarr_location, info.zarr_group, mode="r+")
    except Exception as exc:
        error = exc if isinstance(exc, StorageError) else StorageError(f"{ws.zarr_location}/{info.zarr_group}: {exc}")
        xs.finish_extraction(catalog, info.run_id, "failed", f"StorageError: {error}", None)
        if isinstance(error, StorageConflictError):
            raise error from exc
        raise StorageError(f"{error}; {_resume_hint(info.run_id)}") from exc


def _resume_hint(run_id: int) -> str:
    return (
        f"extraction run {run_id} is marked failed; fix the activation store (space, permissions), then resume it "
        f"with `personavec extract --resume {run_id}`"
    )


def stored_config(ws: Workspace, run_id: int) -> ExtractConfig:
    """The config an extraction run was made with, rebuilt from its run row (layers as resolved then).

    Example: resume on another device with ``dataclasses.replace(stored_config(ws, 3), device="cuda:1")``."""
    return _stored_config(ws.catalog(), run_id)


def _stored_config(catalog: Catalog, run_id: int) -> ExtractConfig:
    info = xs.get_extraction_run(catalog, run_id)
    return config_from_dict(
        ExtractConfig, xs.extraction_run_config(catalog, run_id), layers=info.layers, responses_run=info.source_run_id
    )


def _resumed_config(catalog: Catalog, run_id: int, given: ExtractConfig | None) -> ExtractConfig:
    stored = _stored_config(catalog, run_id)
    if given is None:
        return stored
    changed = [
        f
        for f in IDENTITY_FIELDS
        if getattr(given, f) != getattr(stored, f)
        # None asks for the run's responses run / the default layer (then layer_fraction is compared)
        and not (f in ("responses_run", "layers") and getattr(given, f) is None)
        and not (f == "layer_fraction" and given.layers is not None)
    ]
    if changed:
        detail = ", ".join(f"{f}: run has {getattr(stored, f)!r}, got {getattr(given, f)!r}" for f in changed)
        raise ConfigError(
            f"extraction run {run_id} was made with other settings ({detail}): resume it with the same settings, "
            "or start a new run without --resume"
        )
    operational = [f.name for f in dataclasses.fields(ExtractConfig) if f.name not in IDENTITY_FIELDS]
    return dataclasses.replace(stored, **{f: getattr(given, f) for f in operational})


def adopt_written_rows(array: Any, pending: np.ndarray) -> tuple[list[tuple[int, int]], set[int]]:
    """Rows of ``pending`` that the store already holds, finite and with valid checksums (written before the
    process died, before they were marked done), as ranges; and the write units present in the store."""
    present = arrays.written_blocks(array)
    per = arrays.rows_per_chunk(array)
    adopted: list[int] = []
    pending = np.asarray(pending, dtype=np.int64)
    for block in sorted(set((pending // per).tolist()) & present):
        rows = pending[(pending >= block * per) & (pending < (block + 1) * per)]
        try:
            values = arrays.read_rows(array, rows)
        except StorageCorruptError:
            continue  # recomputed, and the unit rewritten
        bad = set(arrays.nonfinite_rows(values).tolist())
        adopted.extend(int(r) for i, r in enumerate(rows) if i not in bad)
    return row_ranges(adopted), present


def _resumed_run(
    ws: Workspace, catalog: Catalog, run_id: int, config: ExtractConfig, loaded: LoadedModel
) -> tuple[_Opened, list[int], list[tuple[str | None, str, str]]]:
    """Reopen a run to resume it: its array (created if the run failed before it was), rows the store holds whole
    but the catalog never marked adopted. Returns the opened run, the rows still to compute (ascending) and their
    conversations; :func:`_plan_pending` plans them (all at once, or in windows)."""
    info = xs.get_extraction_run(catalog, run_id)
    if (loaded.n_layers, loaded.d_model) != (info.n_model_layers, info.d_model):
        raise ModelError(
            f"extraction run {run_id} was made with a model of {info.n_model_layers} layers x {info.d_model}; "
            f"{loaded.name} has {loaded.n_layers} x {loaded.d_model}"
        )
    # A run may have failed before its array was created: create it (or reopen the one this run made).
    array = _array(ws, catalog, info, config, create=True, resume=True)
    pending = xs.resume_extraction_run(catalog, run_id)
    adopted, present = adopt_written_rows(array, np.asarray(pending["row"].to_numpy(), dtype=np.int64))
    if adopted:
        xs.mark_done(catalog, run_id, adopted)
        keep = ~np.isin(pending["row"].to_numpy(), [r for a, b in adopted for r in range(a, b)])
        pending = pending.filter(pa.array(keep))
    rows = pending["row"].to_pylist()
    conversations = list(
        zip(
            pending["system_prompt"].to_pylist(), pending["question"].to_pylist(), pending["text"].to_pylist(),
            strict=True,
        )
    )  # fmt: skip
    n_adopted = sum(b - a for a, b in adopted)
    return _Opened(info, array, present, n_adopted, n_done=info.n_examples - len(rows)), rows, conversations


def _plan_pending(
    loaded: LoadedModel,
    config: ExtractConfig,
    opened: _Opened,
    rows: Sequence[int],
    conversations: Sequence[tuple[str | None, str, str]],
    render: Renderer = render_all,
) -> ExtractionPlan:
    """Render and plan rows of a resumed run (:func:`_resumed_run`)."""
    return ExtractionPlan.build(
        render(loaded, config, conversations),
        rows,
        n_rows=opened.info.n_examples,
        chunk_rows=arrays.rows_per_chunk(opened.array),
        max_batch_tokens=_budget(config, loaded),
        max_batch_size=config.max_batch_size,
    )


def _pending_windows(
    loaded: LoadedModel,
    config: ExtractConfig,
    opened: _Opened,
    rows: Sequence[int],
    conversations: Sequence[tuple[str | None, str, str]],
    emit: Callable[[Window], None],
) -> None:
    """A large resumed run's rows after its first batch, planned in windows of :data:`REST_WINDOWS` rows (in row
    order: a run's rows were assigned longest first) handed to ``emit``, the last with no ``planned_to``."""
    with render_workers(loaded.tokenizer, len(rows)):
        for lo, hi in _window_bounds(len(rows)):
            plan = _plan_pending(loaded, config, opened, rows[lo:hi], conversations[lo:hi])
            emit((plan, rows[hi] if hi < len(rows) else None))


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
    for block in assembler.ready():  # completed by the last window's plan, with nothing left to compute in them
        job, done = assembler.job(block)
        writer.submit(block.start, job, done=done)


class RunSink:
    """Where the compute loop reports rows whose write unit is written and how the session ended: the catalog
    (rows marked done on a :class:`DoneMarker` thread, the last ones in the unit of work that closes the run).
    ``run_id`` may be a function giving it (a new run is recorded while its first batch computes).

    The data-parallel path (:mod:`personavec.extract.distributed`) passes its own: on rank 0 it also takes the
    other ranks' written rows into the catalog and waits for them before closing the run; on the others it sends
    them to rank 0 (which alone writes the catalog)."""

    def __init__(self, catalog: Catalog, run_id: int | Callable[[], int]) -> None:
        self.catalog = catalog
        self._run_id = run_id
        self.marker = DoneMarker(catalog, run_id)

    @property
    def run_id(self) -> int:
        return self._run_id() if callable(self._run_id) else self._run_id

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Rows ``[start, stop)`` whose write completed (marked in the background)."""
        self.marker.add(ranges)

    def last_batch_launched(self) -> None:
        """Every batch is launched: the rows written from now on are marked by the unit of work closing the run."""
        self.marker.hold()

    def drain(self, ranges: Sequence[tuple[int, int]], *, raise_errors: bool = True) -> list[tuple[int, int]]:
        """The loop ended: wait for marks in flight; returns the rows still to be marked when the run closes."""
        return self.marker.drain(ranges, raise_errors=raise_errors)

    def finish(
        self, status: str, error: str | None, tokens: int, elapsed_s: float, left: Sequence[tuple[int, int]]
    ) -> tuple[int, int]:
        """The session ended with ``status`` (done, interrupted, failed) after computing ``tokens`` tokens; marks
        ``left`` done and closes the run. Returns the run's numbers of truncated examples and of examples with no
        span."""
        tok_s = tokens / elapsed_s if elapsed_s > 0 and tokens else None
        return xs.finish_extraction(self.catalog, self.run_id, status, error, tok_s, left)


#: A window of a session's plan and the row below which every row is planned once it is in (None: every row). A
#: session computes its windows in order, as one stream of batches: a new single-process run has two (its first
#: batch, then the rest), a data-parallel rank its share and then each unit it claims from the shared pool.
Window = tuple[ExtractionPlan, int | None]


def _compute(
    location: arrays.StoreLocation,
    opening: Future[_Opened],
    config: ExtractConfig,
    loaded: LoadedModel,
    windows: Iterator[Window],
    layers: tuple[int, ...],
    n_examples: int,
    progress: Callable[[ExtractionProgress], None] | None,
    plan_s: float,
    sink: RunSink,
) -> ExtractionResult:
    """Compute the ``windows`` of a plan (later ones may wait for ``opening``: the rest of a new run's plan) as one
    stream of batches and write it through a :class:`ChunkWriter`; ``sink`` receives the written rows and closes the
    session. ``location``: the activation store, for messages. Progress is reported once the run is recorded (a
    large new run is recorded once all its windows are planned; batches before that are not waited for, but
    reported with the next, or at the end); ``done_examples`` counts the rows done before this session
    (``_Opened.n_done``) and those computed."""
    start_t = time.perf_counter()
    resumed = opening.done()  # a resumed run is open before computing; a new one opens during its first batch
    if resumed and opening.exception() is not None:
        raise opening.exception()  # type: ignore[misc]
    present = opening.result().present if resumed else set()
    first, planned_to = next(windows)
    assembler = ChunkAssembler(first, opening, len(layers), loaded.d_model, present, planned_to=planned_to)
    unit_bytes = assembler.per * len(layers) * loaded.d_model * 4  # float32 from the model, before storage dtype
    in_flight = units_in_flight(unit_bytes, config.writer_threads)
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
        means = iter_mean_activations(loaded, examples, layers, batches=batches(), compile=config.compile)
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
            if isinstance(failed, _PlanningStopped):  # stopped by this error before the run was recorded
                raise
            if failed is not None:  # the run was never recorded, or recording it failed
                raise failed from None
            run_id = opening.result().info.run_id
            if isinstance(exc, StorageError) and not isinstance(exc, StorageOverflowError):
                raise StorageError(f"{exc}; {_resume_hint(run_id)}") from exc
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
