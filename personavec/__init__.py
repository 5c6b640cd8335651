"""personavec: persona vectors from transformer language models, every step kept in a queryable catalog.

The seed's API (``PersonaVectorConfig``, ``ActivationExtractor``, ``extract_persona_vectors``,
``generate_responses``, ``load_responses``, ``save_responses``, ``save_persona_vectors``,
``load_persona_vectors``, ``PERSONAS``, ``EVAL_QUESTIONS``) is importable from here; names that need torch or
transformers are imported on first use so that ``import personavec`` and the CLI start fast.
"""

from importlib import import_module
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("personavec")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from personavec.builtin import DEFAULT_PERSONAS, EVAL_QUESTIONS, PERSONAS
from personavec.config import PersonaVectorConfig
from personavec.workspace import Workspace, init_workspace

_LAZY = {
    "ActivationExtractor": "personavec.seed",
    "extract_persona_vectors": "personavec.seed",
    "load_responses": "personavec.seed",
    "save_responses": "personavec.seed",
    "load_persona_vectors": "personavec.seed",
    "save_persona_vectors": "personavec.seed",
    "generate_responses": "personavec.generate",
    "load_vectors": "personavec.vectors",
}

__all__ = [
    "DEFAULT_PERSONAS",
    "EVAL_QUESTIONS",
    "PERSONAS",
    "PersonaVectorConfig",
    "Workspace",
    "__version__",
    "init_workspace",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'personavec' has no attribute {name!r}")
