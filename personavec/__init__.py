"""personavec: persona vectors from transformer language models, every step kept in a queryable catalog."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("personavec")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

from personavec.builtin import DEFAULT_PERSONAS, EVAL_QUESTIONS, PERSONAS
from personavec.workspace import Workspace, init_workspace

__all__ = ["DEFAULT_PERSONAS", "EVAL_QUESTIONS", "PERSONAS", "Workspace", "init_workspace", "__version__"]
