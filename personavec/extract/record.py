"""Opening a run to write: a new run selected, planned and recorded (:func:`new_run`: the model starts on the first
batch while the rest is planned), or a resumed one reopened (:func:`resumed_run`, rows written but never marked
adopted, :func:`plan_pending`); the run's Zarr array created only once its rows committed (:func:`run_array`)."""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from personavec import arrays
from personavec.config import check_selection, config_dict
from personavec.errors import ConfigError, ModelError, StorageConflictError, StorageCorruptError, StorageError
from personavec.extract.config import ExtractConfig, Renderer, render_all
from personavec.extract.core import plan_batches
from personavec.extract.plan import ExtractionPlan, Window, has_span, longest_first, row_ranges
from personavec.extract.plan import budget as batch_budget
from personavec.modeling import LoadedModel, model_provenance
from personavec.spans import Rendered, render_workers
from personavec.store import extraction as xs
from personavec.store.responses import ResponseRecord
from personavec.tuning import DEFAULT, Tuning

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace


@dataclass(frozen=True)
class Opened:
    """A run ready to be written: its catalog info, array, the write units already in the store, rows adopted, the
    plan of the rows after the first batch (a new run whose rest came in one window), and the rows already done."""

    info: xs.ExtractionRunInfo
    array: Any
    present: set[int] = field(default_factory=set)
    n_adopted: int = 0
    rest: ExtractionPlan | None = None
    n_done: int = 0  # rows done before this session computes (no span; done in an earlier session)


def selected_responses(catalog: Catalog, config: ExtractConfig, run: int) -> list[ResponseRecord]:
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


def examples_table(records: Sequence[ResponseRecord], examples: Sequence[Rendered], rows: Sequence[int]) -> pa.Table:
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


def chars(record: ResponseRecord) -> int:
    return len(record.text) + len(record.question) + len(record.system_prompt or "")


def new_run(
    ws: Workspace,
    catalog: Catalog,
    config: ExtractConfig,
    run: int,
    loaded: LoadedModel,
    render: Renderer = render_all,
    tuning: Tuning = DEFAULT,
    min_units: int | None = None,
    min_unit_rows: int | None = None,
) -> tuple[ExtractionPlan, tuple[int, ...], int, Callable[[], Opened]]:
    """Select the responses and plan the first batch only; returns that plan (rows ``0..k-1``), the layers, the
    number of examples, and the function that plans the rest (rows ``k..n-1``, longest first), records the run (one
    transaction, every example) and then creates its array. Splitting keeps tokenizing a run off the GPU's path: the
    model starts on the first batch right away. The first batch is the one the whole plan would start with, about:
    the longest (by a character count, a proxy for tokens) that fit the token budget. ``min_units``: without
    ``config.chunk_rows``, shards are made small enough that the run has at least this many, but of no fewer than
    ``min_unit_rows`` rows (default: one inner chunk of the layout, see :attr:`Tuning.min_units`; data parallel asks for
    more units, of any size: work to share out)."""
    records = selected_responses(catalog, config, run)
    layers = config.resolve_layers(loaded.n_layers)
    n = len(records)
    per = arrays.layout_for(
        n, len(layers), loaded.d_model, config.storage_dtype, config.chunk_rows,
        min_units=min_units or tuning.min_units, min_unit_rows=min_unit_rows, target_bytes=tuning.shard_bytes,
        chunk_bytes=tuning.chunk_bytes,
    )[0]  # fmt: skip
    budget = batch_budget(config, loaded, tuning)

    def triples(part: Sequence[ResponseRecord]) -> list[tuple[str | None, str, str]]:
        return [(r.system_prompt, r.question, r.text) for r in part]

    head_at = sorted(heapq.nlargest(config.max_batch_size, range(n), key=lambda i: chars(records[i])))
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

    def rest(emit: Callable[[Window], None] | None = None) -> Opened:
        """Plan the rows after the first batch, record the run, create its array. Without ``emit``, in one window
        (the returned rest). With it, in windows of growing size (:attr:`Tuning.rest_windows`, the conversations in the
        character proxy's order, longest first; each window's rows longest first), each handed to ``emit`` as soon
        as it is planned, the last with no ``planned_to``; the run is recorded after the last."""
        in_head = set(head_at)
        others = [i for i in range(n) if i not in in_head]
        if emit is not None:
            others.sort(key=lambda i: -chars(records[i]))
        carried = [i for i in range(len(head)) if i not in in_first]  # head answers left out of the first batch
        carried_records, carried_examples = [head[i] for i in carried], [head_examples[i] for i in carried]
        all_records, all_examples = [head[i] for i in batch], list(first.examples)
        all_rows: list[int] = list(range(len(batch)))
        # at least one window, even an empty one: it seals the units the first batch left open
        bounds = (tuning.windows(len(others)) or [(0, 0)]) if emit is not None else [(0, len(others))]
        # a large run's windows share one set of rendering processes (spans.render_workers)
        workers = (
            render_workers(loaded.tokenizer, len(others), tuning.parallel_from)
            if emit is not None
            else contextlib.nullcontext()
        )
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
        opened = record(examples_table(all_records, all_examples, all_rows), plan if emit is None else None)
        return dataclasses.replace(opened, n_done=sum(not has_span(ex) for ex in all_examples))

    def record(table: pa.Table, plan: ExtractionPlan | None) -> Opened:
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
        array = run_array(ws, catalog, info, config, create=True, chunk_rows=per)
        if arrays.rows_per_chunk(array) != per:  # the plan's write units must be the array's shards, or rows are lost
            error = f"{info.zarr_group}: array made with shards of {arrays.rows_per_chunk(array)} rows, planned {per}"
            xs.finish_extraction(catalog, info.run_id, "failed", f"StorageError: {error}", None)
            raise StorageError(error)
        return Opened(info, array, rest=plan)

    return first, layers, n, rest


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


def resumed_run(
    ws: Workspace, catalog: Catalog, run_id: int, config: ExtractConfig, loaded: LoadedModel
) -> tuple[Opened, list[int], list[tuple[str | None, str, str]]]:
    """Reopen a run to resume it: its array (created if the run failed before it was), rows the store holds whole
    but the catalog never marked adopted. Returns the opened run, the rows still to compute (ascending) and their
    conversations; :func:`plan_pending` plans them (all at once, or in windows)."""
    info = xs.get_extraction_run(catalog, run_id)
    if (loaded.n_layers, loaded.d_model) != (info.n_model_layers, info.d_model):
        raise ModelError(
            f"extraction run {run_id} was made with a model of {info.n_model_layers} layers x {info.d_model}; "
            f"{loaded.name} has {loaded.n_layers} x {loaded.d_model}"
        )
    # A run may have failed before its array was created: create it (or reopen the one this run made).
    array = run_array(ws, catalog, info, config, create=True, resume=True)
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
    return Opened(info, array, present, n_adopted, n_done=info.n_examples - len(rows)), rows, conversations


def plan_pending(
    loaded: LoadedModel,
    config: ExtractConfig,
    opened: Opened,
    rows: Sequence[int],
    conversations: Sequence[tuple[str | None, str, str]],
    render: Renderer = render_all,
    tuning: Tuning = DEFAULT,
) -> ExtractionPlan:
    """Render and plan rows of a resumed run (:func:`resumed_run`)."""
    return ExtractionPlan.build(
        render(loaded, config, conversations),
        rows,
        n_rows=opened.info.n_examples,
        chunk_rows=arrays.rows_per_chunk(opened.array),
        max_batch_tokens=batch_budget(config, loaded, tuning),
        max_batch_size=config.max_batch_size,
    )


def pending_windows(
    loaded: LoadedModel,
    config: ExtractConfig,
    opened: Opened,
    rows: Sequence[int],
    conversations: Sequence[tuple[str | None, str, str]],
    emit: Callable[[Window], None],
    tuning: Tuning = DEFAULT,
) -> None:
    """A large resumed run's rows after its first batch, planned in windows of :attr:`Tuning.rest_windows` rows (in
    row order: a run's rows were assigned longest first) handed to ``emit``, the last with no ``planned_to``."""
    with render_workers(loaded.tokenizer, len(rows), tuning.parallel_from):
        for lo, hi in tuning.windows(len(rows)):
            plan = plan_pending(loaded, config, opened, rows[lo:hi], conversations[lo:hi], tuning=tuning)
            emit((plan, rows[hi] if hi < len(rows) else None))
