"""The ``extract`` stage: a catalogued, resumable extraction run over a responses run.

``run_extraction(ws, ExtractConfig(responses_run=N, ...))`` plans every selected answered response (Zarr row, token
span, token counts, truncation), records the plan in one catalog transaction, creates the run's Zarr array once that
has committed, then computes with :mod:`personavec.extract.core`. Rows are assigned longest-first, so consecutive
batches fill consecutive Zarr chunks; a chunk is written whole by a background writer and its rows are marked done
only after the write completed. ``run_extraction(ws, None, resume=RUN)`` rebuilds the run's stored config and
computes only the rows not yet done.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from personavec import arrays
from personavec.config import DTYPES, check_selection, config_dict, config_from_dict, default_layer
from personavec.errors import ConfigError, ModelError, RunInterrupted, StorageError
from personavec.extract.core import default_batch_tokens, iter_mean_activations, plan_batches
from personavec.modeling import LoadedModel, load_model, model_provenance
from personavec.spans import PROMPT_FORMATS, SPAN_RULES, Rendered, conversation, render
from personavec.store import extraction as xs
from personavec.store.responses import ResponseRecord, answered_responses

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
        chunk_rows: Zarr rows per chunk; None = ``arrays.chunk_rows_for(d_model)``.
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
        if self.layers_path is not None and not self.layers_path.strip(". "):
            raise ConfigError("layers_path is empty: give the decoder blocks' path (e.g. 'model.layers') or None")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The requested layers, or the seed's default layer for a model of ``n_layers`` blocks; validated."""
        layers = self.layers if self.layers is not None else (default_layer(n_layers, self.layer_fraction),)
        bad = [x for x in layers if x > n_layers]
        if bad:
            raise ModelError(f"layers {bad} out of range: the model has {n_layers} layers (valid 0..{n_layers})")
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
)


def load_for(config: ExtractConfig) -> LoadedModel:
    """Load the model an :class:`ExtractConfig` names."""
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        device_map=config.device_map,
        attn_implementation=config.attn_implementation,
        layers_path=config.layers_path,
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


#: Renders ``(system prompt, question, response)`` conversations for a run's plan, in order. The default renders them
#: here; the data-parallel path (:mod:`personavec.extract.distributed`) spreads them over its processes.
Renderer = Callable[[LoadedModel, ExtractConfig, Sequence[tuple[str | None, str, str]]], list[Rendered]]


def render_all(
    loaded: LoadedModel, config: ExtractConfig, conversations: Sequence[tuple[str | None, str, str]]
) -> list[Rendered]:
    """Render every ``(system prompt, question, response)`` with :func:`encode_response` (the default Renderer)."""
    return [encode_response(loaded, sp, q, r, config) for sp, q, r in conversations]


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
    run_id: int
    zarr_group: str
    layers: tuple[int, ...]
    n_examples: int
    n_computed: int
    n_tokens: int
    tok_s: float
    n_truncated: int


class ExtractionInterrupted(Exception):
    """Raise from a progress callback to stop a run on purpose (it is then marked ``interrupted``)."""


# -- the plan ----------------------------------------------------------------------------------------------------


def longest_first(lengths: Sequence[int]) -> list[int]:
    """The Zarr row of each example: longest first (ties in input order), so batches fill chunks in row order."""
    rows = [0] * len(lengths)
    for row, i in enumerate(sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))):
        rows[i] = row
    return rows


@dataclass(frozen=True)
class ExtractionPlan:
    """What a run (or a resumed session of it) computes, worked out once.

    ``examples[i]`` goes to Zarr row ``rows[i]``; examples are in row order, and ``batches`` (lists of indices into
    ``examples``) cover consecutive rows, so chunks of ``chunk_rows`` rows complete one after another.
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


class _ChunkBuffers:
    """Collects computed rows into whole chunks; a chunk leaves once all its rows are in."""

    def __init__(self, plan: ExtractionPlan, array: Any, n_layers: int, d_model: int) -> None:
        self.plan = plan
        self.shape = (n_layers, d_model)
        self.buffers: dict[int, np.ndarray] = {}
        self.missing: dict[int, int] = {}
        for row in plan.rows:
            chunk = row // plan.chunk_rows
            self.missing[chunk] = self.missing.get(chunk, 0) + 1
        for chunk, missing in self.missing.items():
            if missing < plan.chunk_len(chunk):  # rows done before in a chunk not written whole: keep them
                start = chunk * plan.chunk_rows
                self.buffers[chunk] = arrays.read_rows(array, np.arange(start, start + plan.chunk_len(chunk)))

    def add(self, row: int, values: np.ndarray) -> tuple[int, np.ndarray] | None:
        """Put one row in; returns ``(start row, values)`` of its chunk when that chunk is now complete."""
        chunk = row // self.plan.chunk_rows
        buf = self.buffers.get(chunk)
        if buf is None:
            buf = self.buffers[chunk] = np.full((self.plan.chunk_len(chunk), *self.shape), np.nan, dtype=np.float32)
        buf[row - chunk * self.plan.chunk_rows] = values
        self.missing[chunk] -= 1
        if self.missing[chunk]:
            return None
        return chunk * self.plan.chunk_rows, self.buffers.pop(chunk)


# -- the writer --------------------------------------------------------------------------------------------------


class ChunkWriter:
    """Writes whole Zarr chunks on a background thread while the model computes the next batches.

    At most ``max_in_flight`` chunks wait or are being written: :meth:`submit` first waits for the oldest when that
    many are pending. A write that failed raises :class:`StorageError` at the next :meth:`submit` and at
    :meth:`close`, so a failing store stops the producer instead of blocking it (there is no queue for a dead thread
    to leave full). :meth:`written` returns only rows whose write completed.
    """

    def __init__(self, array: Any, where: str, max_in_flight: int = 4) -> None:
        self.array = array
        self.where = where
        self.max_in_flight = max_in_flight
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-zarr-writer")
        self._pending: deque[tuple[tuple[int, int], Future[None]]] = deque()
        self._written: list[tuple[int, int]] = []
        self._error: StorageError | None = None

    def _reap(self, wait_for: int) -> None:
        """Collect finished writes in submission order, waiting for the oldest ``wait_for`` of them."""
        while self._pending and (wait_for > 0 or self._pending[0][1].done()):
            (start, stop), future = self._pending.popleft()
            wait_for -= 1
            exc = future.exception()
            if exc is None:
                self._written.append((start, stop))
            elif self._error is None:
                self._error = StorageError(f"writing activation rows {start}:{stop} to {self.where} failed: {exc}")
                self._error.__cause__ = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    def submit(self, start: int, values: np.ndarray) -> None:
        """Queue rows ``start:start+len(values)`` for writing; raises the error of an earlier failed write."""
        self._reap(wait_for=len(self._pending) - self.max_in_flight + 1)
        self._check()
        future = self._pool.submit(arrays.write_rows, self.array, start, values)
        self._pending.append(((start, start + len(values)), future))

    def written(self) -> list[tuple[int, int]]:
        """Row ranges whose write completed since the last call (never raises: errors surface in submit/close)."""
        self._reap(wait_for=0)
        out, self._written = self._written, []
        return out

    def close(self, *, raise_errors: bool = True) -> None:
        """Wait for every pending write and stop the thread; then raise the first failure unless ``raise_errors``
        is False (the run is stopping for another reason)."""
        try:
            self._reap(wait_for=len(self._pending))
        finally:
            self._pool.shutdown(wait=True)
        if raise_errors:
            self._check()


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
            compilation, layers path) apply to this session.
        resume: an extract run to continue: only rows not yet done are computed.
        progress: called after each batch with an :class:`ExtractionProgress`; raising
            :class:`ExtractionInterrupted` from it stops the run (marked ``interrupted``; every complete chunk stays
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
    if resume is None:
        if config is None:
            raise ConfigError("run_extraction needs a config (new run) or resume=RUN_ID")
        if config.responses_run is None:
            raise ConfigError("ExtractConfig.responses_run is not set: name the responses run to extract")
        loaded = loaded or load_for(config)
        info, plan, array = _new_run(ws, catalog, config, config.responses_run, loaded)
    else:
        config = _resumed_config(catalog, resume, config)
        loaded = loaded or load_for(config)
        info, plan, array = _resumed_run(ws, catalog, resume, config, loaded)
    where = f"{ws.zarr_location}/{info.zarr_group}"
    return _compute(RunSink(catalog, info.run_id), info, config, loaded, plan, array, where, progress)


def _selected_responses(catalog: Catalog, config: ExtractConfig, run: int) -> list[ResponseRecord]:
    names, n_questions = xs.response_run_selection(catalog, run)
    check_selection(f"responses run {run}", config.personas, config.questions, names, n_questions)
    records = [
        r
        for r in answered_responses(catalog, run)
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
        }
    )


def _budget(config: ExtractConfig, loaded: LoadedModel) -> int:
    return config.max_batch_tokens or default_batch_tokens(loaded.input_device)


def _new_run(
    ws: Workspace,
    catalog: Catalog,
    config: ExtractConfig,
    run: int,
    loaded: LoadedModel,
    render: Renderer = render_all,
) -> tuple[xs.ExtractionRunInfo, ExtractionPlan, Any]:
    records = _selected_responses(catalog, config, run)
    layers = config.resolve_layers(loaded.n_layers)
    examples = render(loaded, config, [(r.system_prompt, r.question, r.text) for r in records])
    rows = longest_first([ex.forward_length for ex in examples])
    model_id, revision = model_provenance(config.model)
    run_id = xs.create_extraction_run(
        catalog,
        {**config_dict(config), "layers": list(layers)},
        _examples_table(records, examples, rows),
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
        n_examples=len(records),
    )
    info = xs.get_extraction_run(catalog, run_id)
    array = _array(ws, catalog, info, config, create=True)
    plan = ExtractionPlan.build(
        examples,
        rows,
        n_rows=len(records),
        chunk_rows=arrays.rows_per_chunk(array),
        max_batch_tokens=_budget(config, loaded),
        max_batch_size=config.max_batch_size,
    )
    return info, plan, array


def _array(ws: Workspace, catalog: Catalog, info: xs.ExtractionRunInfo, config: ExtractConfig, *, create: bool) -> Any:
    """The run's Zarr array, created when ``create`` (after the run's rows committed: no group without its run).
    A store that fails here marks the run failed (resume creates the array again)."""
    try:
        if create:
            arrays.create_activation_array(
                ws.zarr_location,
                info.run_id,
                info.n_examples,
                len(info.layers),
                info.d_model,
                attrs={"layers": list(info.layers), "model": info.model, "run_id": info.run_id},
                chunk_rows=config.chunk_rows,
            )
        return arrays.open_activation_array(ws.zarr_location, info.zarr_group, mode="r+")
    except Exception as exc:
        error = exc if isinstance(exc, StorageError) else StorageError(f"{ws.zarr_location}/{info.zarr_group}: {exc}")
        xs.finish_extraction(catalog, info.run_id, "failed", f"StorageError: {error}", None)
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


def _resumed_run(
    ws: Workspace,
    catalog: Catalog,
    run_id: int,
    config: ExtractConfig,
    loaded: LoadedModel,
    render: Renderer = render_all,
) -> tuple[xs.ExtractionRunInfo, ExtractionPlan, Any]:
    info = xs.get_extraction_run(catalog, run_id)
    if (loaded.n_layers, loaded.d_model) != (info.n_model_layers, info.d_model):
        raise ModelError(
            f"extraction run {run_id} was made with a model of {info.n_model_layers} layers x {info.d_model}; "
            f"{loaded.name} has {loaded.n_layers} x {loaded.d_model}"
        )
    # Rows done before need the existing array; a run with none may have failed before its array was created.
    array = _array(ws, catalog, info, config, create=xs.done_count(catalog, run_id) == 0)
    pending = xs.resume_extraction_run(catalog, run_id)
    conversations = zip(
        pending["system_prompt"].to_pylist(), pending["question"].to_pylist(), pending["text"].to_pylist(), strict=True
    )
    examples = render(loaded, config, list(conversations))
    plan = ExtractionPlan.build(
        examples,
        pending["row"].to_pylist(),
        n_rows=info.n_examples,
        chunk_rows=arrays.rows_per_chunk(array),
        max_batch_tokens=_budget(config, loaded),
        max_batch_size=config.max_batch_size,
    )
    return info, plan, array


class RunSink:
    """Where the compute loop reports rows whose chunk is written and how the session ended: the catalog.

    The data-parallel path (:mod:`personavec.extract.distributed`) passes its own: on rank 0 it also takes the
    other ranks' finished chunks into the catalog and waits for them before closing the run; on the others it sends
    them to rank 0 (which alone writes the catalog)."""

    def __init__(self, catalog: Catalog, run_id: int) -> None:
        self.catalog = catalog
        self.run_id = run_id

    def mark_done(self, ranges: Sequence[tuple[int, int]]) -> None:
        """Rows ``[start, stop)`` whose chunk write completed."""
        xs.mark_done(self.catalog, self.run_id, ranges)

    def finish(self, status: str, error: str | None, tokens: int, elapsed_s: float) -> None:
        """The session ended with ``status`` (done, interrupted, failed) after computing ``tokens`` tokens."""
        tok_s = tokens / elapsed_s if elapsed_s > 0 and tokens else None
        xs.finish_extraction(self.catalog, self.run_id, status, error, tok_s)

    def n_truncated(self) -> int:
        return xs.count_truncated(self.catalog, self.run_id)


def _compute(
    sink: RunSink,
    info: xs.ExtractionRunInfo,
    config: ExtractConfig,
    loaded: LoadedModel,
    plan: ExtractionPlan,
    array: Any,
    where: str,
    progress: Callable[[ExtractionProgress], None] | None,
) -> ExtractionResult:
    run_id = info.run_id
    writer = ChunkWriter(array, where)
    tokens = 0
    done = info.n_examples - len(plan.examples)
    start_t = time.perf_counter()
    status, error = "done", None
    batches = iter_mean_activations(loaded, plan.examples, info.layers, batches=plan.batches, compile=config.compile)
    try:
        chunks = _ChunkBuffers(plan, array, len(info.layers), info.d_model)
        for batch, means, n_tok in batches:
            values = means.numpy()
            for j, i in enumerate(batch):
                full = chunks.add(plan.rows[i], values[j])
                if full is not None:
                    writer.submit(*full)
            sink.mark_done(writer.written())
            tokens += n_tok
            done += len(batch)
            if progress is not None:
                progress(ExtractionProgress(run_id, done, info.n_examples, tokens, time.perf_counter() - start_t))
        writer.close()
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt | ExtractionInterrupted) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        writer.close(raise_errors=False)
        if isinstance(exc, StorageError):
            raise StorageError(f"{exc}; {_resume_hint(run_id)}") from exc
        if isinstance(exc, KeyboardInterrupt) and not isinstance(exc, RunInterrupted):  # Ctrl-C, SIGTERM
            raise RunInterrupted(run_id, f"personavec extract --resume {run_id}") from exc
        raise
    finally:
        batches.close()  # removes the capture hooks now, not when the generator is collected
        sink.mark_done(writer.written())
        elapsed = time.perf_counter() - start_t
        tok_s = tokens / elapsed if elapsed > 0 and tokens else 0.0
        sink.finish(status, error, tokens, elapsed)
    return ExtractionResult(
        run_id,
        info.zarr_group,
        info.layers,
        info.n_examples,
        len(plan.examples),
        tokens,
        tok_s,
        sink.n_truncated(),
    )
