"""personavec: persona vectors from transformer language models, every step kept in a queryable catalog.

The seed's API (``PersonaVectorConfig``, ``ActivationExtractor``, ``extract_persona_vectors``,
``generate_responses``, ``load_responses``, ``save_responses``, ``save_persona_vectors``,
``load_persona_vectors``, ``PERSONAS``, ``EVAL_QUESTIONS``) is importable from here; names that need torch or
transformers (or the catalog stack, or the built-in sets) are imported on first use so that ``import personavec``
and the CLI start fast. The stages (one function each, ``fn(ws, config, *, resume=None, progress=None)``) live in
their modules: ``personavec.ingest.ingest``, ``personavec.generation.generate.run_generation``,
``personavec.extract.run_extraction``, ``personavec.vectors.compute_vectors``, ``personavec.report.build_report``.
"""

from importlib import import_module
from typing import Any

from personavec.config import PersonaVectorConfig, package_version
from personavec.workspace import Workspace, init_workspace

# Imported on first use: ``import personavec`` stays light (no torch, DuckDB, SQLAlchemy or pyarrow).
_LAZY = {
    "PERSONAS": "personavec.builtin",
    "EVAL_QUESTIONS": "personavec.builtin",
    "DEFAULT_PERSONAS": "personavec.builtin",
    "ActivationExtractor": "personavec.seed",
    "extract_persona_vectors": "personavec.seed",
    "load_responses": "personavec.seed",
    "save_responses": "personavec.seed",
    "load_persona_vectors": "personavec.seed",
    "save_persona_vectors": "personavec.seed",
    "generate_responses": "personavec.generation.generate",
    "load_vectors": "personavec.vectors",
}

__all__ = [
    "PersonaVectorConfig",
    "Workspace",
    "__version__",
    "init_workspace",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name == "__version__":
        globals()[name] = value = package_version()
        return value
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personavec' has no attribute {name!r}")
