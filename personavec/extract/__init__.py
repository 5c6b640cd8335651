"""Extraction: mean residual-stream activations over response tokens.

- :mod:`personavec.extract.core`: the compute core (``capture`` hooks, ``plan_batches``, ``iter_mean_activations``,
  ``mean_activations``, regional compilation, ``default_batch_tokens``); needs only torch and transformers.
- the ``extract`` stage, ``run_extraction(ws, ExtractConfig(...))`` (:mod:`personavec.extract.run`): a catalogued,
  resumable run, in ``config`` (what is computed), ``plan`` (rows, batches), ``record`` (selecting, recording,
  reopening a run), ``sink`` (write units, writer pool, marks) and ``pipeline`` (one session's compute loop).
- :mod:`personavec.extract.distributed`: the same stage over several processes (``accelerate launch``,
  ``--num-processes``): rank 0 plans and alone writes the catalog, every rank computes and writes its own chunks.

The seed's ``ActivationExtractor`` and ``extract_persona_vectors`` live in :mod:`personavec.seed`. The stage's names
are imported on first use, so importing the core does not load the catalog stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from personavec.extract.core import (
    SpanCapture,
    capture,
    compiled_blocks,
    default_batch_tokens,
    iter_mean_activations,
    mean_activations,
    plan_batches,
)

if TYPE_CHECKING:
    from personavec.errors import ExtractionInterrupted
    from personavec.extract.config import (
        ExtractConfig,
        ExtractionProgress,
        ExtractionResult,
        encode_response,
        load_for,
        stored_config,
    )
    from personavec.extract.plan import ExtractionPlan
    from personavec.extract.run import run_extraction
    from personavec.extract.sink import ChunkWriter

#: The stage's names and the module each lives in, imported on first use (the core alone needs no catalog stack).
_LAZY = {
    "ChunkWriter": "personavec.extract.sink",
    "ExtractConfig": "personavec.extract.config",
    "ExtractionInterrupted": "personavec.errors",
    "ExtractionPlan": "personavec.extract.plan",
    "ExtractionProgress": "personavec.extract.config",
    "ExtractionResult": "personavec.extract.config",
    "encode_response": "personavec.extract.config",
    "load_for": "personavec.extract.config",
    "run_extraction": "personavec.extract.run",
    "stored_config": "personavec.extract.config",
}

__all__ = [
    "SpanCapture",
    "capture",
    "compiled_blocks",
    "default_batch_tokens",
    "iter_mean_activations",
    "mean_activations",
    "plan_batches",
    "ChunkWriter",
    "ExtractConfig",
    "ExtractionInterrupted",
    "ExtractionPlan",
    "ExtractionProgress",
    "ExtractionResult",
    "encode_response",
    "load_for",
    "run_extraction",
    "stored_config",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personavec.extract' has no attribute {name!r}")
