"""Engine, sessions and schema guard for the DuckDB catalog.

Only ``personavec.store`` speaks SQL. Each public store function is one unit of work: it opens
:meth:`Catalog.session` (commit on success, rollback on error, always close); helpers take the session as an
argument. SQLAlchemy/DuckDB errors leave as :class:`CatalogError` (:class:`CatalogLockedError` when another
process holds DuckDB's single write lock, :class:`CatalogCorruptError` when the file is damaged).

DuckDB allows one configuration (read-only or read-write) per file and process: :func:`open_catalog` keeps one
:class:`Catalog` per file per process, which :class:`personavec.workspace.Workspace` hands out.

DuckDB also allows one process at a time to write a file, and none to read it meanwhile. So that `personavec runs`,
`sql`, `report` or `load_vectors` work while an hours-long generation or extraction writes, a catalog holds the file
only around units of work: each :meth:`Catalog.session` opens its own DuckDB connection and closes it at the end,
and a unit of work that finds the file held by another process retries with backoff for up to ``lock_timeout_s``
(:data:`WRITE_LOCK_TIMEOUT_S` / :data:`READ_LOCK_TIMEOUT_S`) before :class:`CatalogLockedError`. Long writers
therefore commit in batches (by time or rows), not per row.

Opening the file costs ~25 ms (DuckDB builds a database instance: catalog, buffer manager, threads) while a
connection to an instance already open costs ~0.4 ms. So a catalog keeps the instance open for
:data:`LINGER_S` after its last unit of work ends: the next unit of this process, usually soon after, opens
it warm. It never keeps it past :data:`MAX_HOLD_S` of continuous holding (the file is then released when the units
of work in progress end, and not held again for as long), so another process waiting for the file gets it; and once
a unit of work had to wait for another process, or in a rank of a multi-process launch, it holds nothing (the file
is shared: every unit of work releases it, as a catalog without the hold). Opening a catalog is itself such a unit
of work: one connection checks the file and its schema revision, and the units that follow use the same instance.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import random
import threading
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import duckdb
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from personavec.config import launched_world
from personavec.errors import (
    CatalogCorruptError,
    CatalogError,
    CatalogLockedError,
    ConfigError,
    SchemaVersionError,
)
from personavec.store.models import SCHEMA_REVISION


def dbapi_connection(session: Session) -> duckdb.DuckDBPyConnection:
    """The DuckDB connection under a session (duckdb_engine's wrapper, which forwards to DuckDBPyConnection).

    SQLAlchemy types ``dbapi_connection`` as an optional generic DB-API connection; inside a live unit of work
    it is always set, and duckdb_engine's wrapper has DuckDB's methods (register, execute, ...)."""
    return cast(duckdb.DuckDBPyConnection, session.connection().connection.dbapi_connection)


#: How long a unit of work waits for another process to release the file: writers (long runs that must not die
#: because a reader held the file) wait longer than readers (a person at a prompt). ``$PERSONAVEC_LOCK_TIMEOUT``
#: (seconds) overrides both.
WRITE_LOCK_TIMEOUT_S = 120.0
READ_LOCK_TIMEOUT_S = 15.0
LOCK_TIMEOUT_ENV = "PERSONAVEC_LOCK_TIMEOUT"

#: A catalog keeps DuckDB's database instance (and the file) this long after its last unit of work ended, so that
#: the next opens warm (~0.4 ms instead of ~25 ms); held continuously, it lets the file go after MAX_HOLD_S and
#: holds nothing for as long. It holds nothing for SHARED_REST_S after one of its units of work had to wait for
#: another process, nor ever in a process of a multi-process launch (``WORLD_SIZE`` > 1: ranks share the catalog).
LINGER_S = 0.25
MAX_HOLD_S = 0.5
SHARED_REST_S = 30.0


# DuckDB's own wording (IOException for both): a lock held by another process, and a damaged file. A plain
# substring "lock" also matches "block", which every checksum failure names ("... in block at location N").
_LOCK_MARKERS = ("could not set lock on file", "conflicting lock is held")
_CORRUPT_MARKERS = ("corrupt database file", "not a valid duckdb database file")


def translate_error(exc: BaseException, catalog_path: Path) -> CatalogError:
    """A SQLAlchemy or DuckDB error as this package's: locked, corrupt, or a plain :class:`CatalogError`."""
    orig = getattr(exc, "orig", exc)
    text = str(orig)
    first = text.splitlines()[0] if text else type(orig).__name__
    lower = text.lower()
    if isinstance(orig, duckdb.Error) and any(m in lower for m in _CORRUPT_MARKERS):
        # Remembered across processes: a later command whose writes never touch the damaged block must not write.
        _remember_corrupt(Path(catalog_path), first)
        return CatalogCorruptError(
            f"catalog {catalog_path} is corrupt: restore it from a backup (personavec will not write into it). "
            f"DuckDB said: {first}"
        )
    if isinstance(orig, duckdb.IOException) and any(m in lower for m in _LOCK_MARKERS):
        return CatalogLockedError(
            f"catalog {catalog_path} is locked by another process (DuckDB allows one writer per file): "
            f"wait for it to finish or stop it, then retry. DuckDB said: {first}"
        )
    return CatalogError(f"catalog {catalog_path}: {first}")


def corrupt_marker(catalog_path: Path) -> Path:
    """``<catalog>.corrupt``: written when DuckDB reports the file damaged; while it matches the file (same size and
    modification time), no read-write open is allowed. Restoring the file (or deleting the marker) lifts it."""
    return catalog_path.with_name(catalog_path.name + ".corrupt")


def _remember_corrupt(catalog_path: Path, message: str) -> None:
    try:
        stat = catalog_path.stat()
        corrupt_marker(catalog_path).write_text(
            json.dumps({"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "duckdb": message}) + "\n"
        )
    except OSError:  # a read-only directory: the error is still reported, just not remembered
        pass


def _refuse_if_known_corrupt(catalog_path: Path) -> None:
    marker = corrupt_marker(catalog_path)
    if not marker.is_file():
        return
    try:
        known = json.loads(marker.read_text())
        stat = catalog_path.stat()
        same = (known["size"], known["mtime_ns"]) == (stat.st_size, stat.st_mtime_ns)
    except (OSError, ValueError, KeyError, TypeError):
        same = True
        known = {}
    if not same:  # the file was replaced since (a restored backup)
        marker.unlink(missing_ok=True)
        return
    raise CatalogCorruptError(
        f"catalog {catalog_path} was found corrupt (DuckDB said: {known.get('duckdb', '?')}); personavec will "
        f"not write into it: restore it from a backup (or delete {marker.name} to override)"
    )


def create_catalog_engine(catalog_path: Path, *, read_only: bool = False) -> Engine:
    """An engine on one DuckDB file, opened once to fail here on what is not a usable catalog file. ``read_only``
    opens it so that no statement can write; a read-write open is refused while the file is known to be corrupt
    (:func:`corrupt_marker`)."""
    engine = _engine(catalog_path, read_only)
    try:
        with engine.connect():
            pass
    except DBAPIError as exc:
        engine.dispose()
        raise translate_error(exc, catalog_path) from exc
    return engine


# DuckDB builds one database instance per file and process, shared by that file's connections, and tears it down when
# the last one closes. A connection opened in another thread during that teardown builds a second instance, which
# fails: "Unique file handle conflict: Cannot attach "catalog" - ... already attached" (duckdb 1.4; 8% of the units of
# work of 4 threads failed so when this process held no instance). Connections are therefore opened and closed one at
# a time in the process (~0.4 ms each with the instance open).
_INSTANCE_LOCK = threading.Lock()


def _new_instance_lock() -> None:  # a child forked while another thread held it would wait forever
    global _INSTANCE_LOCK
    _INSTANCE_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):  # not on Windows
    os.register_at_fork(after_in_child=_new_instance_lock)


class _InstancePool(sa.pool.NullPool):
    """No pool (see :func:`_engine`); each connection opened and closed under :data:`_INSTANCE_LOCK`."""

    def _do_get(self) -> sa.pool.ConnectionPoolEntry:
        with _INSTANCE_LOCK:
            return super()._do_get()

    def _do_return_conn(self, record: sa.pool.ConnectionPoolEntry) -> None:
        with _INSTANCE_LOCK:
            super()._do_return_conn(record)


def _engine(catalog_path: Path, read_only: bool) -> Engine:
    """:func:`create_catalog_engine` without opening the file."""
    if not read_only:
        _refuse_if_known_corrupt(Path(catalog_path))
    return sa.create_engine(
        f"duckdb:///{catalog_path}",
        connect_args={"read_only": read_only},
        # No pool: a connection lives for one unit of work, so the file is free for other processes between them
        # (see the module docstring). Connections of one process share DuckDB's in-process database instance.
        poolclass=_InstancePool,
    )


def _locked(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return isinstance(orig, duckdb.IOException) and any(m in str(orig).lower() for m in _LOCK_MARKERS)


def lock_timeout(read_only: bool, override: float | None = None) -> float:
    """Seconds to wait out another process's lock: ``override``, else ``$PERSONAVEC_LOCK_TIMEOUT``, else
    :data:`READ_LOCK_TIMEOUT_S` or :data:`WRITE_LOCK_TIMEOUT_S`."""
    if override is not None:
        return override
    value = os.environ.get(LOCK_TIMEOUT_ENV, "").strip()
    if not value:
        return READ_LOCK_TIMEOUT_S if read_only else WRITE_LOCK_TIMEOUT_S
    try:
        seconds = float(value)
    except ValueError:
        seconds = math.nan
    if not 0 <= seconds < math.inf:
        raise ConfigError(f"${LOCK_TIMEOUT_ENV} must be a finite number of seconds >= 0 (how long to wait for another "
                          f"process's lock on the catalog), got {value!r}")  # fmt: skip
    return seconds


def with_lock_retry(connect, timeout_s: float, on_wait=None):  # type: ignore[no-untyped-def]
    """Call ``connect()`` until it does not fail on another process's file lock, backing off (with jitter) from
    10 ms to 0.5 s, for ``timeout_s`` (the last wait is cut short at the deadline, then one last try); the last lock
    error is re-raised. Lock errors may come as SQLAlchemy's ``DBAPIError``, DuckDB's ``IOException`` (a raw
    ``duckdb.connect``) or :class:`CatalogLockedError`. ``on_wait()`` is called at each wait."""
    deadline = time.monotonic() + timeout_s
    delay = 0.01
    while True:
        try:
            return connect()
        except (DBAPIError, duckdb.IOException, CatalogLockedError) as exc:
            left = deadline - time.monotonic()
            if not (isinstance(exc, CatalogLockedError) or _locked(exc)) or left <= 0:
                raise
        if on_wait is not None:
            on_wait()
        time.sleep(min(delay * (0.5 + random.random()), left))
        delay = min(delay * 2, 0.5)


def current_revision(engine: Engine) -> str | None:
    """The catalog's Alembic revision (None for an empty file)."""
    with engine.connect() as conn:
        return _revision(conn)


def _revision(conn: sa.Connection) -> str | None:
    # Alembic's MigrationContext would do, but costs ~20 ms per open; this is the same single-row table, read
    # directly: on a freshly opened file that takes ~1 ms, where any catalog listing (duckdb_tables(),
    # information_schema) first loads every table's metadata (~10 ms for the catalog's ~40 tables). A missing table
    # is a binder error, which leaves the transaction usable.
    try:
        return conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    except DBAPIError as exc:
        if isinstance(exc.orig, duckdb.CatalogException):
            return None
        raise


def catalog_revision(catalog_path: Path) -> str | None:
    """The Alembic revision of a catalog file, read without the schema check (None for an empty file)."""
    engine = create_catalog_engine(catalog_path, read_only=True)
    try:
        return current_revision(engine)
    except DBAPIError as exc:
        raise translate_error(exc, catalog_path) from exc
    finally:
        engine.dispose()


def _check_schema(conn: sa.Connection, catalog_path: Path) -> None:
    """Fail unless the catalog is at the head revision, naming the command that fixes it."""
    rev = _revision(conn)
    head = SCHEMA_REVISION
    if rev != head:
        raise SchemaVersionError(
            f"catalog {catalog_path} is at schema revision {rev or 'none'}, this personavec needs {head}: "
            f"run `personavec db upgrade` (back up the file first)"
        )


class Catalog:
    """An open catalog: one engine, one session factory, errors mapped to :class:`CatalogError`."""

    def __init__(
        self, catalog_path: Path, *, read_only: bool = False, check: bool = True, lock_timeout_s: float | None = None
    ) -> None:
        self.path = Path(catalog_path)
        self.read_only = read_only
        self.pid = os.getpid()
        self.closed = False
        self.lock_timeout_s = lock_timeout(read_only, lock_timeout_s)
        self.engine = _engine(self.path, read_only)
        self._sessions = sessionmaker(bind=self.engine, expire_on_commit=False)
        self._warm = _WarmHold(self.engine)
        try:
            with_lock_retry(lambda: self._open(check), self.lock_timeout_s, on_wait=self._warm.contended)
        except DBAPIError as exc:
            self.close()
            raise translate_error(exc, self.path) from exc
        except BaseException:
            self.close()
            raise

    def _open(self, check: bool) -> None:
        """The first unit of work: opens the file (failing on what is not a usable catalog) and checks its schema,
        on one connection; the warm hold keeps DuckDB's instance for the units that usually follow at once (each
        DuckDB instance costs ~15-25 ms to open and close)."""
        self._warm.begin()
        try:
            with self.engine.connect() as conn:
                self._warm.hold()
                if check:
                    _check_schema(conn, self.path)
        finally:
            self._warm.end()

    @contextmanager
    def session(self) -> Iterator[Session]:
        """One unit of work: its own connection (waiting out another process's lock), commit on success, roll back
        on any error, always close (the file is released :data:`LINGER_S` later unless another unit begins)."""
        session = self._sessions()
        self._warm.begin()
        try:
            with_lock_retry(session.connection, self.lock_timeout_s, on_wait=self._warm.contended)
            self._warm.hold()
            yield session
            session.commit()
        except (SQLAlchemyError, duckdb.Error) as exc:  # duckdb.Error: from the raw connection (bulk Arrow paths)
            session.rollback()
            error = translate_error(exc, self.path)
            if isinstance(error, CatalogCorruptError):
                self.close()  # no later unit of work of this process writes into a damaged file
            raise error from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()
            self._warm.end()

    @contextmanager
    def raw(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """The DuckDB connection inside a unit of work, for bulk Arrow inserts; commits or rolls back with it."""
        with self.session() as session:
            yield dbapi_connection(session)

    def close(self) -> None:
        self.closed = True
        self._warm.release()
        self.engine.dispose()

    def __enter__(self) -> Catalog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _WarmHold:
    """Keeps one extra connection of ``engine`` open (so DuckDB's database instance and its file lock stay) while
    units of work run and for :data:`LINGER_S` after the last ends, at most :data:`MAX_HOLD_S` in a row (then none
    for as long: units of work open and close the file each, as without it); a timer thread lets it go."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._lock = threading.Lock()
        self._conn: Any = None
        self._since = 0.0  # when the held connection was opened
        self._rest_until = 0.0  # after a hold of MAX_HOLD_S, none until then
        self._ended = 0.0  # when the last unit of work ended
        self._active = 0
        self._timer: threading.Timer | None = None
        self._pid = os.getpid()
        self._off = launched_world()[1] > 1  # a rank: peers share the file
        _HOLDS.add(self)

    def begin(self) -> None:
        with self._lock:
            self._active += 1

    def hold(self) -> None:
        """Inside a unit of work whose connection is open (so the instance is: this connection costs ~0.4 ms)."""
        with self._lock:
            if self._conn is not None or os.getpid() != self._pid:
                return
            if self._off or time.monotonic() < self._rest_until:
                return
            try:
                self._conn = self._engine.raw_connection()
            except Exception:  # noqa: BLE001 - only an optimisation: units of work open their own connections
                return
            self._since = time.monotonic()

    def contended(self) -> None:
        """A unit of work waits for another process: the file is shared now, hold nothing for a while."""
        with self._lock:
            self._rest_until = time.monotonic() + SHARED_REST_S

    def end(self) -> None:
        with self._lock:
            self._active -= 1
            self._ended = time.monotonic()
            if self._conn is None:
                return
            if self._ended - self._since >= MAX_HOLD_S:
                self._close()
                self._rest_until = self._ended + MAX_HOLD_S
            elif self._timer is None:
                self._schedule(LINGER_S)

    def _schedule(self, delay: float) -> None:
        self._timer = threading.Timer(delay, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        with self._lock:
            self._timer = None
            if self._conn is None:
                return
            idle = time.monotonic() - self._ended
            if self._active == 0 and idle >= LINGER_S:
                self._close()
            else:
                self._schedule(max(LINGER_S - idle, 0.005) if self._active == 0 else LINGER_S)

    def _close(self) -> None:
        conn, self._conn = self._conn, None
        try:
            conn.close()
        except Exception:  # noqa: BLE001 - the connection is gone either way
            pass

    def release(self) -> None:
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            if self._conn is not None and os.getpid() == self._pid:
                self._close()
            self._conn = None


# Every hold is let go before the interpreter finalizes (a DuckDB instance torn down by a daemon timer thread during
# finalization aborts the process).
_HOLDS: weakref.WeakSet[_WarmHold] = weakref.WeakSet()


@atexit.register
def _release_holds() -> None:
    for hold in list(_HOLDS):
        hold.release()


# One catalog per file in this process (see the module docstring). Keyed by the resolved path.
_OPEN: dict[Path, Catalog] = {}


def open_catalog(catalog_path: Path, *, read_only: bool = False) -> Catalog:
    """The process's catalog for ``catalog_path``, opened on first use and kept open until :func:`close_catalog`.

    A read-write catalog also serves read-only requests; asking for read-write while the file is open read-only
    reopens it read-write. A catalog inherited through ``fork`` is never reused (DuckDB connections do not survive
    it)."""
    key = Path(catalog_path).resolve()
    cat = _OPEN.get(key)
    if cat is not None and not cat.closed and cat.pid == os.getpid():
        if read_only or not cat.read_only:
            return cat
        cat.close()
    cat = Catalog(key, read_only=read_only)
    _OPEN[key] = cat
    return cat


def close_catalog(catalog_path: Path | None = None) -> None:
    """Close this process's catalog for ``catalog_path`` (every open catalog when None), releasing DuckDB's file
    lock so that another process can write."""
    keys = list(_OPEN) if catalog_path is None else [Path(catalog_path).resolve()]
    for key in keys:
        cat = _OPEN.pop(key, None)
        if cat is not None and cat.pid == os.getpid() and not cat.closed:
            cat.close()
