"""A session's plan: which examples go to which Zarr rows, in which batches (:class:`ExtractionPlan`), cut into
windows handed to the model as they are planned."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

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


#: A window of a session's plan and the row below which every row is planned once it is in (None: every row). A
#: session computes its windows in order, as one stream of batches: a new single-process run has its first batch,
#: then the rest (in windows of :attr:`personavec.tuning.Tuning.rest_windows` when large), a data-parallel rank its
#: share and then each unit it claims from the shared pool.
Window = tuple[ExtractionPlan, int | None]
