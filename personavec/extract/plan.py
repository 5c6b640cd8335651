"""A session's plan: the rows it has to compute (:class:`Pending`), tokenized a window at a time
(:func:`plan_window`) into which examples go to which Zarr rows in which batches (:class:`ExtractionPlan`), and what
the catalog learns of them (:class:`Window`).

A run is recorded when its responses are selected, rows in character-length order (a proxy for tokens), before
anything is tokenized; a window's rows tokenized for the first time are then reassigned among themselves longest
first by tokens, so that its batches cover consecutive rows and fill write units one after another."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from personavec.extract.config import ExtractConfig
from personavec.extract.core import plan_batches
from personavec.modeling import LoadedModel
from personavec.spans import Rendered
from personavec.tuning import DEFAULT, Tuning


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
    Examples without a span are not in the plan (they are done once planned: :attr:`Window.no_span`).
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


def row_ranges(rows: Sequence[int] | np.ndarray) -> list[tuple[int, int]]:
    """Sorted rows as ``[start, stop)`` ranges of consecutive rows."""
    rows = np.unique(np.asarray(rows, dtype=np.int64))
    if not rows.size:
        return []
    cuts = np.flatnonzero(np.diff(rows) != 1) + 1
    return [(int(r[0]), int(r[-1]) + 1) for r in np.split(rows, cuts)]


def budget(config: ExtractConfig, loaded: LoadedModel, tuning: Tuning = DEFAULT) -> int:
    """A batch's token budget: the config's, or the tuning's default for the model's device."""
    return config.max_batch_tokens or tuning.batch_tokens(loaded.input_device)


@dataclass(frozen=True)
class Pending:
    """Rows a session computes, ascending, with their response ids, conversations (system prompt, question,
    answer) and whether each was planned (tokenized, its span recorded) by an earlier session."""

    rows: list[int]
    response_ids: list[int]
    conversations: list[tuple[str | None, str, str]]
    planned: list[bool]

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int]) -> Pending:
        """The pending rows at ``indices`` (ascending indices keep the rows ascending)."""
        return Pending(
            [self.rows[i] for i in indices],
            [self.response_ids[i] for i in indices],
            [self.conversations[i] for i in indices],
            [self.planned[i] for i in indices],
        )

    def part(self, start: int, stop: int) -> Pending:
        return Pending(
            self.rows[start:stop],
            self.response_ids[start:stop],
            self.conversations[start:stop],
            self.planned[start:stop],
        )


@dataclass(frozen=True)
class Window:
    """A window of a session's plan: the examples to compute (``plan``), the rows with nothing to compute
    (``no_span``: done once the catalog has the plan), the catalog's record of the rows planned for the first time
    (``table``, :func:`personavec.store.extraction.plan_examples`; None when none were), and, for a unit claimed
    from a data-parallel pool, the rows it adds to the session (``adds``)."""

    plan: ExtractionPlan
    no_span: list[int]
    table: pa.Table | None = None
    adds: tuple[int, ...] = ()


def examples_table(response_ids: Sequence[int], examples: Sequence[Rendered], rows: Sequence[int]) -> pa.Table:
    """The catalog's columns of planned examples (no tokens to average: done, with no row of activations)."""
    first = [ex.assistant_spans[0] for ex in examples]
    return pa.table(
        {
            "response_id": pa.array(response_ids, pa.int64()),
            "row": pa.array(rows, pa.int32()),
            "span_start": pa.array([s for s, _ in first], pa.int32()),
            "span_end": pa.array([e for _, e in first], pa.int32()),
            "n_tokens": pa.array([ex.forward_length for ex in examples], pa.int32()),
            "n_response_tokens": pa.array([e - s for s, e in first], pa.int32()),
            "truncated": pa.array([ex.truncated for ex in examples], pa.bool_()),
            "done": pa.array([e <= s for s, e in first], pa.bool_()),
        }
    )


def plan_window(
    pending: Pending,
    examples: Sequence[Rendered],
    *,
    n_rows: int,
    chunk_rows: int,
    max_batch_tokens: int,
    max_batch_size: int,
) -> Window:
    """Plan one window: ``examples[i]`` is the rendering of ``pending``'s ``i``-th conversation. Rows not planned
    before are reassigned among themselves longest first (by tokens; no span last), and recorded in ``table``."""
    rows = list(pending.rows)
    fresh = [i for i, planned in enumerate(pending.planned) if not planned]
    table = None
    if fresh:
        slots = sorted(rows[i] for i in fresh)
        ranks = longest_first([examples[i].forward_length if has_span(examples[i]) else 0 for i in fresh])
        for i, rank in zip(fresh, ranks, strict=True):
            rows[i] = slots[rank]
        table = examples_table(
            [pending.response_ids[i] for i in fresh], [examples[i] for i in fresh], [rows[i] for i in fresh]
        )
    keep = [i for i, ex in enumerate(examples) if has_span(ex)]
    plan = ExtractionPlan.build(
        [examples[i] for i in keep], [rows[i] for i in keep], n_rows=n_rows, chunk_rows=chunk_rows,
        max_batch_tokens=max_batch_tokens, max_batch_size=max_batch_size,
    )  # fmt: skip
    return Window(plan, [rows[i] for i, ex in enumerate(examples) if not has_span(ex)], table)


def window_bounds(n: int, first: int, tuning: Tuning = DEFAULT) -> list[tuple[int, int]]:
    """How ``n`` pending rows are planned: the first ``first`` (the model starts on them), then the rest in one
    window when at most :attr:`Tuning.plan_inline_max` rows (planned on the model's thread), else in windows of
    :attr:`Tuning.rest_windows` (on a planner thread)."""
    head = min(first, n)
    rest = n - head
    if rest == 0:
        return [(0, head)]
    if rest <= tuning.plan_inline_max:
        return [(0, head), (head, n)]
    return [(0, head), *((head + a, head + b) for a, b in tuning.windows(rest))]
