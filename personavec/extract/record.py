"""Opening a run to write. A new run is recorded when its responses are selected: :func:`select_new` chooses its
rows (every example not planned yet, in character-length order) and their layout, :func:`record_new` records the run
with every row pending (one unit of work) and then creates its Zarr array (only after that commit: no group without
its run). The pipeline records on its background committer while the model computes the first batches
(:func:`personavec.extract.pipeline.run_local`); :func:`new_run` does both in turn. From then on a new run is a
resume of a run with every row pending (:func:`resumed_run`: rows the store holds whole but the catalog never marked
adopted)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from personavec import arrays
from personavec.config import check_selection, config_dict
from personavec.errors import ConfigError, ModelError, StorageConflictError, StorageCorruptError, StorageError
from personavec.extract.config import ExtractConfig
from personavec.extract.plan import Pending, row_ranges
from personavec.modeling import LoadedModel, model_provenance
from personavec.store import extraction as xs
from personavec.store.responses import ResponseRecord
from personavec.tuning import DEFAULT, Tuning

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace


@dataclass(frozen=True)
class Shape:
    """What the model's thread needs of a run before it is recorded: its rows, layers, write unit (rows per shard),
    the write units already in the store and the rows done before this session."""

    n_examples: int
    layers: tuple[int, ...]
    chunk_rows: int
    present: frozenset[int] = frozenset()
    n_done: int = 0


@dataclass(frozen=True)
class Opened:
    """A run ready to be written: its catalog info, array, the write units already in the store, rows adopted, and
    the rows done before this session."""

    info: xs.ExtractionRunInfo
    array: Any
    present: set[int] = field(default_factory=set)
    n_adopted: int = 0
    n_done: int = 0

    @property
    def shape(self) -> Shape:
        return Shape(
            self.info.n_examples, tuple(self.info.layers), arrays.rows_per_chunk(self.array), frozenset(self.present),
            self.n_done,
        )  # fmt: skip


@dataclass(frozen=True)
class Selected:
    """A new run's responses (its rows, in order) and layout, chosen before it is recorded."""

    records: list[ResponseRecord]
    shape: Shape

    def pending(self) -> Pending:
        """Every row, none planned."""
        n = len(self.records)
        conversations: list[tuple[str | None, str, str]] = [(r.system_prompt, r.question, r.text) for r in self.records]
        return Pending(list(range(n)), [r.id for r in self.records], conversations, [False] * n)


def selected_responses(catalog: Catalog, config: ExtractConfig, run: int) -> list[ResponseRecord]:
    """The answered responses of ``run`` the config's filters select, longest first by characters (a proxy for
    tokens; ties in the run's order): the rows of a new run."""
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
    chars = [len(r.text) + len(r.question) + len(r.system_prompt or "") for r in records]
    return [records[i] for i in sorted(range(len(records)), key=lambda i: (-chars[i], i))]


def _unplanned(records: Sequence[ResponseRecord]) -> pa.Table:
    n = len(records)
    zeros = pa.array([0] * n, pa.int32())
    return pa.table(
        {
            "response_id": pa.array([r.id for r in records], pa.int64()),
            "row": pa.array(range(n), pa.int32()),
            "span_start": zeros,
            "span_end": zeros,
            "n_tokens": zeros,  # not planned yet: filled by plan_examples as each window is tokenized
            "n_response_tokens": zeros,
            "truncated": pa.array([False] * n, pa.bool_()),
            "done": pa.array([False] * n, pa.bool_()),
        }
    )


def select_new(
    catalog: Catalog,
    config: ExtractConfig,
    run: int,
    loaded: LoadedModel,
    tuning: Tuning = DEFAULT,
    *,
    min_units: int | None = None,
    min_unit_rows: int | None = None,
) -> Selected:
    """Select a new run's responses (rows longest first by characters) and choose its layout.

    Without ``config.chunk_rows``, shards are made small enough that the run has at least ``min_units`` (default
    :attr:`Tuning.min_units`), of no fewer than ``min_unit_rows`` rows (default: one inner chunk of the layout;
    data parallel asks for more units, of any size: work to share out)."""
    records = selected_responses(catalog, config, run)
    layers = tuple(config.resolve_layers(loaded.n_layers))
    per = arrays.layout_for(
        len(records), len(layers), loaded.d_model, config.storage_dtype, config.chunk_rows,
        min_units=min_units or tuning.min_units, min_unit_rows=min_unit_rows, target_bytes=tuning.shard_bytes,
        chunk_bytes=tuning.chunk_bytes,
    )[0]  # fmt: skip
    return Selected(records, Shape(len(records), layers, per))


def record_new(
    ws: Workspace, catalog: Catalog, config: ExtractConfig, run: int, loaded: LoadedModel, selected: Selected
) -> Opened:
    """Record the run with every example of ``selected`` pending (one unit of work, none planned yet), then create
    its array; returns the run, open to write."""
    records, shape = selected.records, selected.shape
    model_id, revision = model_provenance(config.model)
    info = xs.create_extraction_run(
        catalog,
        {**config_dict(config), "layers": list(shape.layers), "model_type": loaded.model_type},
        _unplanned(records),
        zarr_group=arrays.group_name,
        source_run_id=run,
        model=model_id,
        model_revision=revision or loaded.revision,
        architecture=loaded.architecture,
        n_model_layers=loaded.n_layers,
        d_model=loaded.d_model,
        layers=list(shape.layers),
        dtype=str(loaded.dtype).removeprefix("torch."),
        span_rule=config.span,
        prompt_format=config.prompt_format,
        device=loaded.device,
        n_examples=shape.n_examples,
    )
    array = run_array(ws, catalog, info, config, create=True, chunk_rows=shape.chunk_rows)
    if arrays.rows_per_chunk(array) != shape.chunk_rows:  # the plan's write units must be the array's shards
        error = (
            f"{info.zarr_group}: array made with shards of {arrays.rows_per_chunk(array)} rows, "
            f"planned {shape.chunk_rows}"
        )
        xs.finish_extraction(catalog, info.run_id, "failed", f"StorageError: {error}", None)
        raise StorageError(error)
    return Opened(info, array)


def new_run(
    ws: Workspace,
    catalog: Catalog,
    config: ExtractConfig,
    run: int,
    loaded: LoadedModel,
    tuning: Tuning = DEFAULT,
    *,
    min_units: int | None = None,
    min_unit_rows: int | None = None,
) -> tuple[Opened, Pending]:
    """:func:`select_new` then :func:`record_new` on this thread: the run, open to write, and every row pending
    (what :func:`resumed_run` would return for it, without reading it back)."""
    selected = select_new(catalog, config, run, loaded, tuning, min_units=min_units, min_unit_rows=min_unit_rows)
    return record_new(ws, catalog, config, run, loaded, selected), selected.pending()


def run_array(
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
        raise StorageError(f"{error}; {resume_hint(info.run_id)}") from exc


def resume_hint(run_id: int) -> str:
    return (
        f"extraction run {run_id} is marked failed; fix the activation store (space, permissions), then resume it "
        f"with `personavec extract --resume {run_id}`"
    )


def adopt_written_rows(array: Any, pending: np.ndarray) -> tuple[list[tuple[int, int]], set[int]]:
    """Rows of ``pending`` that the store already holds, finite and with valid checksums (written before the
    process died, before they were marked done), as ranges, made durable (their writer may have died before its
    fsync); and the write units present in the store."""
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
    arrays.sync_blocks(array, sorted({r // per for r in adopted}))  # each unit once, however its rows are spread
    return row_ranges(adopted), present


def resumed_run(
    ws: Workspace, catalog: Catalog, run_id: int, config: ExtractConfig, loaded: LoadedModel
) -> tuple[Opened, Pending]:
    """Reopen a run to write it (a new one, or one resumed): its array (created if the run failed before it was),
    rows the store holds whole but the catalog never marked adopted (only rows planned before: the catalog knows
    which response each holds). Returns the opened run and its rows still to compute."""
    info = xs.get_extraction_run(catalog, run_id)
    if (loaded.n_layers, loaded.d_model) != (info.n_model_layers, info.d_model):
        raise ModelError(
            f"extraction run {run_id} was made with a model of {info.n_model_layers} layers x {info.d_model}; "
            f"{loaded.name} has {loaded.n_layers} x {loaded.d_model}"
        )
    array = run_array(ws, catalog, info, config, create=True, resume=True)
    pending = xs.resume_extraction_run(catalog, run_id)
    planned = np.asarray(pending["planned"].to_numpy(zero_copy_only=False), dtype=bool)
    rows = np.asarray(pending["row"].to_numpy(), dtype=np.int64)
    adopted, present = adopt_written_rows(array, rows[planned])
    if adopted:
        xs.mark_done(catalog, run_id, adopted)
        pending = pending.filter(pa.array(~np.isin(rows, [r for a, b in adopted for r in range(a, b)])))
    conversations = list(
        zip(
            pending["system_prompt"].to_pylist(), pending["question"].to_pylist(), pending["text"].to_pylist(),
            strict=True,
        )
    )  # fmt: skip
    left = Pending(
        pending["row"].to_pylist(),
        pending["response_id"].to_pylist(),
        conversations,
        pending["planned"].to_pylist(),
    )
    n_adopted = sum(b - a for a, b in adopted)
    return Opened(info, array, present, n_adopted, n_done=info.n_examples - len(left)), left
