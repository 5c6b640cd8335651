"""Extraction: mean residual-stream activations over response tokens.

- :mod:`personavec.extract.core`: the compute core (``capture`` hooks, ``plan_batches``, ``iter_mean_activations``,
  ``mean_activations``, regional compilation, ``default_batch_tokens``); needs only torch and transformers.
- :mod:`personavec.extract.run`: the ``extract`` stage, ``run_extraction(ws, ExtractConfig(...))``: a catalogued,
  resumable run (plan, chunk assembly, Zarr writer).
- :mod:`personavec.extract.distributed`: the same stage over several processes (``accelerate launch``,
  ``--num-processes``): rank 0 plans and alone writes the catalog, every rank computes and writes its own chunks.

The seed's ``ActivationExtractor`` and ``extract_persona_vectors`` live in :mod:`personavec.seed`. The stage's names
are imported from :mod:`personavec.extract.run` on first use, so importing the core does not load the catalog stack.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from personavec.extract.core import (
    COMPILE_PAD,
    CPU_BATCH_TOKENS,
    GPU_BATCH_TOKENS,
    SpanCapture,
    capture,
    compiled_blocks,
    default_batch_tokens,
    iter_mean_activations,
    mean_activations,
    plan_batches,
)

if TYPE_CHECKING:
    from personavec.extract.run import (
        ChunkWriter,
        ExtractConfig,
        ExtractionInterrupted,
        ExtractionPlan,
        ExtractionProgress,
        ExtractionResult,
        encode_response,
        load_for,
        run_extraction,
        stored_config,
    )

_RUN_NAMES = (
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
)

__all__ = [
    "COMPILE_PAD",
    "CPU_BATCH_TOKENS",
    "GPU_BATCH_TOKENS",
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
    if name in _RUN_NAMES:
        value = getattr(import_module("personavec.extract.run"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personavec.extract' has no attribute {name!r}")
