"""Ad-hoc read-only SQL for `personavec sql`: a dedicated, locked-down DuckDB connection.

Three layers keep a query inside the catalog, each enough on its own for the attacks we know of:

1. The file is opened read-only, so no statement can change it.
2. DuckDB's own settings, fixed at connect time and then locked: no external access (no ``COPY ... TO``,
   ``EXPORT``, ``ATTACH``, ``read_csv``, ``glob``, ``INSTALL``/``LOAD``), no extension autoload/autoinstall, and
   ``lock_configuration`` so that no ``SET``/``PRAGMA`` can undo any of it.
3. DuckDB's parser, not a regex, classifies every statement; only read statements (``SELECT`` in all its forms:
   ``WITH``, ``FROM``-first, ``VALUES``, ``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``PRAGMA table_info``; and
   ``EXPLAIN``) run, and only if every statement of the input is one.

DuckDB refuses a second connection to one file with another configuration in the same process, so this module
closes the process's shared catalog (:func:`personavec.store.engine.close_catalog`) before connecting; the next
``Workspace.catalog()`` reopens it.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from personavec.errors import CatalogError, ConfigError, QueryError, QueryLimitError
from personavec.store.engine import close_catalog, lock_timeout, translate_error, with_lock_retry

# Set when the connection opens; lock_configuration (last) forbids any later SET/PRAGMA/RESET of any option.
LOCKED_CONFIG: dict[str, str | bool | int | float | list[str]] = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "allow_community_extensions": False,
    "allow_unsigned_extensions": False,
    "lock_configuration": True,
}
#: Defaults of ``personavec sql``: seconds a query may run, and DuckDB's memory limit for it.
DEFAULT_TIMEOUT_S = 300.0
DEFAULT_MEMORY_LIMIT = "4GB"
_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|[KMGT]i?B)\s*$", re.IGNORECASE)
#: Rows converted to Python per fetch: between batches a stop (timeout, Ctrl-C) is noticed.
_FETCH_ROWS = 10_000
# By name: the duckdb 1.4 type stubs spell the members differently (SELECT_STATEMENT) from the module (SELECT).
READ_STATEMENTS = frozenset({"SELECT", "EXPLAIN"})

# DuckDB errors caused by the query itself (syntax, binding, casts, refused operations): bad input, exit 2.
_QUERY_ERRORS = (
    duckdb.ProgrammingError,
    duckdb.DataError,
    duckdb.PermissionException,
    duckdb.NotSupportedError,
)


@dataclass(frozen=True)
class SqlResult:
    """The result of one statement: its text, column names as DuckDB gives them (duplicates possible), rows."""

    statement: str
    columns: tuple[str, ...]
    rows: list[tuple[Any, ...]]

    @property
    def keys(self) -> list[str]:
        """Column names made unique for JSON/CSV: a repeated name gets ``_1``, ``_2``, ... (``group_key``,
        ``group_key_1``), skipping any suffix another column already uses."""
        taken = set(self.columns)
        used: set[str] = set()
        out = []
        for name in self.columns:
            key, n = name, 0
            while key in used or (key != name and key in taken):
                n += 1
                key = f"{name}_{n}"
            used.add(key)
            out.append(key)
        return out

    def records(self) -> list[dict[str, Any]]:
        """Rows as dicts keyed by :attr:`keys` (no column is lost to a shared name)."""
        keys = self.keys
        return [dict(zip(keys, row, strict=True)) for row in self.rows]


def check_limits(timeout_s: float | None, memory_limit: str | None) -> None:
    """Refuse a bad ``timeout_s`` (a number >= 0; 0 or None: no limit) or ``memory_limit`` (``"512MB"``, ``"4GiB"``)."""
    if timeout_s is not None and not (timeout_s >= 0 and timeout_s != float("inf")):
        raise ConfigError(f"--timeout must be a number of seconds >= 0 (0: no limit), got {timeout_s}")
    if memory_limit is not None and not _MEMORY.match(memory_limit):
        raise ConfigError(f"--memory-limit must be a size such as 512MB or 4GiB, got {memory_limit!r}")


def run_readonly_sql(
    catalog_path: Path, query: str, *, timeout_s: float | None = None, memory_limit: str | None = None
) -> list[SqlResult]:
    """Run ``query`` (one or more read statements separated by ``;``) on the catalog file, read-only and locked
    down (see the module docstring); returns one :class:`SqlResult` per statement, in order.

    Every statement is checked before any runs. Raises :class:`QueryError` (exit 2) for an empty query, a syntax
    error, a statement that is not a read, or a query that fails on its own terms or tries to reach outside the
    catalog; :class:`QueryLimitError` (exit 1) past ``timeout_s`` seconds (all statements together; None or 0: no
    limit) or DuckDB's ``memory_limit``; :class:`CatalogError` (or its locked/corrupt subclasses) when the file
    cannot be read. The query runs in a worker thread: Ctrl-C or SIGTERM in the main thread interrupts it at once.

    Example::

        >>> [r.rows for r in run_readonly_sql(ws.catalog_path, "SELECT 1 AS a; SELECT 2 AS a")]
        [[(1,)], [(2,)]]
    """
    check_limits(timeout_s, memory_limit)
    if not query.strip():
        raise QueryError("empty SQL query")
    config: dict[str, Any] = {"memory_limit": memory_limit} if memory_limit else {}
    config |= LOCKED_CONFIG  # lock_configuration last
    path = Path(catalog_path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    close_catalog(path)
    try:
        # A writer in another process holds the file only for one unit of work: wait it out like any reader.
        con = with_lock_retry(
            lambda: duckdb.connect(str(path), read_only=True, config=config), lock_timeout(read_only=True)
        )
    except duckdb.ConnectionException as exc:
        raise CatalogError(
            f"catalog {path} is still open in this process with another configuration; close it "
            f"(Workspace.close()) before running SQL. DuckDB said: {_one_line(exc)}"
        ) from exc
    except duckdb.Error as exc:
        raise translate_error(exc, path) from exc
    try:
        statements = _read_statements(con, query)
        stop = threading.Event()
        return _supervised(
            con, lambda: [_run(con, stmt, text, path, stop) for stmt, text in statements], stop, timeout_s
        )
    finally:
        con.close()


def _supervised(
    con: duckdb.DuckDBPyConnection, work: Callable[[], Any], stop: threading.Event, timeout_s: float | None
) -> Any:
    """``work()`` in a worker thread while this thread waits in short steps, so that Ctrl-C / SIGTERM (delivered to
    the main thread) and the time limit interrupt DuckDB (``con.interrupt()``) within a fraction of a second."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = work()
        except BaseException as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=target, name="personavec-sql", daemon=True)
    deadline = time.monotonic() + timeout_s if timeout_s else None
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.05)
            if deadline is not None and time.monotonic() > deadline and worker.is_alive():
                stop.set()
                con.interrupt()
                worker.join(5)
                raise QueryLimitError(
                    f"SQL stopped after the time limit of {timeout_s:g} s: narrow the query (WHERE, LIMIT) or give "
                    f"personavec sql --timeout SECONDS (0: no limit)"
                )
    except KeyboardInterrupt:
        stop.set()
        con.interrupt()
        worker.join(5)
        raise
    if "error" in box:
        raise box["error"]
    return box["value"]


def _read_statements(con: duckdb.DuckDBPyConnection, query: str) -> list[tuple[duckdb.Statement, str]]:
    try:
        statements = con.extract_statements(query)
    except _QUERY_ERRORS as exc:
        raise QueryError(f"SQL refused: {_one_line(exc)}") from exc
    if not statements:
        raise QueryError("no SQL statement in the query")
    out = []
    for i, stmt in enumerate(statements, 1):
        text = _text(stmt)
        if stmt.type.name not in READ_STATEMENTS:
            where = f"statement {i} ({text[:60]!r})" if text else f"statement {i}"
            raise QueryError(
                f"SQL refused: {where} is {stmt.type.name}; `personavec sql` runs only read statements "
                f"(SELECT, WITH, FROM, VALUES, DESCRIBE, SHOW, SUMMARIZE, EXPLAIN) and nothing ran"
            )
        out.append((stmt, text))
    return out


def _run(
    con: duckdb.DuckDBPyConnection, stmt: duckdb.Statement, text: str, path: Path, stop: threading.Event | None = None
) -> SqlResult:
    try:
        cursor = con.execute(stmt)
        description = cursor.description or []
        columns = tuple(str(d[0]) for d in description)
        # DuckDB's Python conversion of TIMESTAMP WITH TIME ZONE needs pytz; Arrow's uses the standard zoneinfo.
        if any("TIMESTAMP WITH TIME ZONE" in str(d[1]) for d in description):
            rows = _arrow_rows(cursor.fetch_arrow_table())
        else:
            rows = []
            while batch := cursor.fetchmany(_FETCH_ROWS):
                rows.extend(batch)
                if stop is not None and stop.is_set():
                    raise QueryLimitError("SQL stopped")
    except duckdb.OutOfMemoryException as exc:
        raise QueryLimitError(
            f"SQL stopped: the query needs more than the memory limit "
            f"({_one_line(exc).split(' Possible solutions')[0]}); narrow it, or give "
            f"personavec sql --memory-limit SIZE"
        ) from exc
    except _QUERY_ERRORS as exc:
        raise QueryError(f"SQL failed: {_one_line(exc)}") from exc
    except duckdb.Error as exc:
        raise translate_error(exc, path) from exc
    return SqlResult(text, columns, rows)


def _arrow_rows(table: pa.Table) -> list[tuple[Any, ...]]:
    columns = []
    for col in table.columns:
        try:
            columns.append(col.to_pylist())
        except (OverflowError, ValueError, pa.ArrowException):  # e.g. 'infinity' timestamps: beyond datetime
            columns.append(col.cast(pa.string()).to_pylist())
    return list(zip(*columns, strict=True))


def _text(stmt: duckdb.Statement) -> str:
    try:
        return stmt.query.strip()
    except IndexError:  # DuckDB 1.4 cannot slice the text of some rewritten statements (PIVOT's enum CREATE)
        return ""


def _one_line(exc: BaseException) -> str:
    """DuckDB's message on one line: it spans several (the error, a hint, then the query again under "LINE n:"
    with a caret, which a one-line error drops)."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = []
    for line in lines:
        if line.startswith("LINE "):
            break
        if line:
            kept.append(line)
    return " ".join(kept)
