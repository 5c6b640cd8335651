"""One error hierarchy for personavec.

Every error the package raises on purpose is a :class:`PersonavecError`; subclasses also inherit the matching
builtin so that callers can catch either. Messages say what was wrong, where, and what to do about it. The CLI
turns any ``PersonavecError`` into one red line and exit code ``error.exit_code``.
"""

from __future__ import annotations


class PersonavecError(Exception):
    """Root of every error personavec raises on purpose."""

    exit_code: int = 1


class ConfigError(PersonavecError, ValueError):
    """A configuration value is invalid (names the field and the allowed values)."""

    exit_code = 2


class InputFileError(PersonavecError, ValueError):
    """An input file is malformed: the message names the file and the row/key."""

    exit_code = 2


class WorkspaceError(PersonavecError, FileNotFoundError):
    """The workspace directory is missing or is not a personavec workspace (a wrong --workspace: exit 2)."""

    exit_code = 2


class CatalogError(PersonavecError, RuntimeError):
    """A database error in the catalog."""


class CatalogLockedError(CatalogError):
    """Another process holds the catalog's write lock (DuckDB allows one writer per file)."""


class CatalogCorruptError(CatalogError):
    """The catalog file is damaged (not a DuckDB file, or a block fails its checksum); personavec stops using it."""


class SchemaVersionError(CatalogError):
    """The catalog's schema is not at this package's head revision."""


class NotFoundError(PersonavecError, LookupError):
    """A named thing (run, persona set, persona, question) does not exist in the catalog: bad input, exit 2."""

    exit_code = 2


class RunNotFoundError(NotFoundError):
    """No run with that id (or of that kind)."""


class RunBusyError(PersonavecError, RuntimeError):
    """A run cannot be resumed because another live process is still running it."""


class DistributedError(PersonavecError, RuntimeError):
    """A process of a data-parallel run stopped, failed or lost contact with the others; the message names the
    rank and the cause (the run is left resumable with ``personavec extract --resume RUN``)."""


class RunInterrupted(KeyboardInterrupt):
    """A stage stopped by Ctrl-C or SIGTERM after marking its run ``interrupted``: carries the command that
    resumes it. A ``KeyboardInterrupt``, so code that handles Ctrl-C handles this too."""

    def __init__(self, run_id: int, resume_command: str, signal_exit: int = 130) -> None:
        super().__init__(f"run {run_id} interrupted: resume with `{resume_command}`")
        self.run_id = run_id
        self.resume_command = resume_command
        self.exit_code = signal_exit


class Terminated(KeyboardInterrupt):
    """Raised in the main thread on SIGTERM (see ``personavec.cli.main``) so that runs unwind as on Ctrl-C and are
    marked ``interrupted``, not ``failed``."""


def interruption(exc: BaseException) -> str:
    """What stopped a run, as its ``interrupted`` row records it: SIGTERM (also when it arrived while another error
    unwound) or Ctrl-C."""
    if isinstance(exc, Terminated) or isinstance(exc.__context__, Terminated):
        return "terminated (SIGTERM)"
    return "interrupted by the user"


class QueryError(PersonavecError, ValueError):
    """A query given to ``personavec sql`` is refused (not a read statement, or it would reach outside the catalog)
    or fails on its own terms (syntax, unknown table or column, bad cast)."""

    exit_code = 2


class QueryLimitError(QueryError):
    """A ``personavec sql`` query ran past its time limit or DuckDB's memory limit: stopped, nothing kept (a runtime
    limit, exit 1; raise the limit with ``--timeout`` / ``--memory-limit``)."""

    exit_code = 1


class DuplicateError(PersonavecError, ValueError):
    """Creating something that already exists, or a duplicate key in an input."""

    exit_code = 2


class ModelError(PersonavecError, RuntimeError):
    """A model cannot be resolved, loaded, or does not have the requested layers."""


class ModelNotFoundError(ModelError):
    """``--model`` names nothing that is a model: no such file or directory, not a model there, not a Hub id."""

    exit_code = 2


class SpanError(PersonavecError, ValueError):
    """The response text cannot be located in the rendered conversation."""


class EndpointError(PersonavecError, RuntimeError):
    """An OpenAI-compatible endpoint failed in a way retrying cannot fix (bad key, bad model, not OpenAI-compatible)."""


class RequestFailed(EndpointError):
    """One request kept failing with retryable errors until the retries ran out. Recorded per pair (``text`` NULL,
    ``error`` and ``attempts`` set) and the run goes on; resuming the run asks it again."""

    def __init__(self, message: str, attempts: int) -> None:
        super().__init__(message)
        self.attempts = attempts


class StorageError(PersonavecError, OSError):
    """The activation store (Zarr) is missing, inconsistent with the catalog, or cannot be written."""


class StorageMissingError(StorageError):
    """A run's group is not in the activation store (the catalog says it should be)."""


class StorageCorruptError(StorageError):
    """Bytes in the activation store fail their checksum or cannot be decoded (a damaged chunk or zarr.json)."""


class StorageConflictError(StorageError):
    """The activation store holds a group for a run id the catalog is creating anew (left by a forgotten run)."""


class StorageOverflowError(StorageError):
    """A value does not fit the run's storage dtype (float16 above 65,504): refused, never stored as inf."""


class ExtractionInterrupted(PersonavecError):
    """Raise from a stage's progress callback to stop its run on purpose (the run is then marked ``interrupted``
    and stays resumable)."""
