"""The ``extract`` stage's entry point: :func:`run_extraction` runs a session in this process
(:func:`personavec.extract.pipeline.run_local`) or, under ``accelerate launch`` (world size > 1), as one process
of a data-parallel group (:func:`personavec.extract.distributed.run_distributed`).

The modules of the stage, bottom up: ``config`` (what is computed, the resume rule), ``plan`` (rows and batches),
``record`` (selecting, recording and reopening a run, its array), ``sink`` (write units, the writer pool, marks),
``pipeline`` (the compute loop of one session), ``distributed`` (the same over processes), ``run`` (this).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from personavec.extract.config import ExtractConfig, ExtractionProgress, ExtractionResult
from personavec.extract.distributed import run_distributed
from personavec.extract.launch import world_size
from personavec.extract.pipeline import run_local
from personavec.tuning import DEFAULT, Tuning

if TYPE_CHECKING:
    from personavec.modeling import LoadedModel
    from personavec.workspace import Workspace


def run_extraction(
    ws: Workspace,
    config: ExtractConfig | None,
    *,
    resume: int | None = None,
    progress: Callable[[ExtractionProgress], None] | None = None,
    loaded: LoadedModel | None = None,
    tuning: Tuning | None = None,
) -> ExtractionResult:
    """Extract per-response mean activations of a responses run into a new (or resumed) extraction run.

    Args:
        ws: the workspace (its catalog and ``activations.zarr``).
        config: what to extract; ``config.responses_run`` names the responses run. May be None with ``resume``
            (the run's stored config is used); given with ``resume``, its ``IDENTITY_FIELDS``
            (:mod:`personavec.extract.config`) must match the run's (a :class:`ConfigError` names those that
            differ) and its other fields (device, batching, compilation, layers path, writer threads, flush
            bounds) apply to this session.
        resume: an extract run to continue: rows written but not marked done are adopted (when finite and their
            checksums hold), and only the rest is computed.
        progress: called after each batch with an :class:`ExtractionProgress` (the run is recorded before the
            model starts: it carries the run id; ``done_examples`` counts rows without a span once planned); raising
            :class:`ExtractionInterrupted` from it stops the run (marked ``interrupted``; every written unit stays
            done). Ctrl-C (or SIGTERM in the CLI) does the same and leaves as :class:`RunInterrupted`, which names the
            resume command; any other exception marks the run ``failed``.
        loaded: an already loaded model matching the config (skips loading).
        tuning: how the work is cut and scheduled (:class:`personavec.tuning.Tuning`; default: the measured
            values); never changes what is computed.

    Returns:
        an :class:`ExtractionResult`. A store that cannot be written raises :class:`StorageError`; the run is then
        marked ``failed`` and ``resume`` completes it.

    Example:
        >>> run_extraction(ws, ExtractConfig(responses_run=2, layers=(10, 20), device="cpu")).run_id
        3
    """
    tuning = tuning or DEFAULT
    if world_size() > 1:  # every process of the group; rank 0 alone plans and writes the catalog
        return run_distributed(ws, config, resume=resume, progress=progress, loaded=loaded, tuning=tuning)
    return run_local(ws, config, resume=resume, progress=progress, loaded=loaded, tuning=tuning)
