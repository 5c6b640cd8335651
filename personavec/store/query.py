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

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa

from personavec.errors import CatalogError, QueryError
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


def run_readonly_sql(catalog_path: Path, query: str) -> list[SqlResult]:
    """Run ``query`` (one or more read statements separated by ``;``) on the catalog file, read-only and locked
    down (see the module docstring); returns one :class:`SqlResult` per statement, in order.

    Every statement is checked before any runs. Raises :class:`QueryError` (exit 2) for an empty query, a syntax
    error, a statement that is not a read, or a query that fails on its own terms or tries to reach outside the
    catalog; :class:`CatalogError` (or its locked/corrupt subclasses) when the file cannot be read.

    Example::

        >>> [r.rows for r in run_readonly_sql(ws.catalog_path, "SELECT 1 AS a; SELECT 2 AS a")]
        [[(1,)], [(2,)]]
    """
    if not query.strip():
        raise QueryError("empty SQL query")
    path = Path(catalog_path)
    if not path.is_file():
        raise CatalogError(f"catalog {path} does not exist")
    close_catalog(path)
    try:
        # A writer in another process holds the file only for one unit of work: wait it out like any reader.
        con = with_lock_retry(
            lambda: duckdb.connect(str(path), read_only=True, config=LOCKED_CONFIG), lock_timeout(read_only=True)
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
        return [_run(con, stmt, text, path) for stmt, text in statements]
    finally:
        con.close()


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


def _run(con: duckdb.DuckDBPyConnection, stmt: duckdb.Statement, text: str, path: Path) -> SqlResult:
    try:
        cursor = con.execute(stmt)
        description = cursor.description or []
        columns = tuple(str(d[0]) for d in description)
        # DuckDB's Python conversion of TIMESTAMP WITH TIME ZONE needs pytz; Arrow's uses the standard zoneinfo.
        if any("TIMESTAMP WITH TIME ZONE" in str(d[1]) for d in description):
            rows = _arrow_rows(cursor.fetch_arrow_table())
        else:
            rows = cursor.fetchall()
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
