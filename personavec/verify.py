"""``personavec verify [RUN]``: check the catalog against the activation store, and name (or apply) the fix.

For each extraction run: the catalog has one example per planned row; the run's Zarr group opens (its metadata
decodes) and has the catalog's shape; every write unit holding rows marked done exists, decodes (checksums hold, on
arrays made since checksums exist) and those rows are finite; rows with no span (empty answers) need no data. Rows
written but not marked done (a process killed between the two) are counted as adoptable: the next resume keeps
them. Temporary ``*.partial`` files a killed writer left are reported. With ``repair=True`` the damaged rows are
marked not done (the whole write unit when a chunk of it is corrupt, whose file is then removed) so that
``personavec extract --resume RUN`` recomputes them, and leftover ``*.partial`` files are deleted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from personavec import arrays
from personavec.errors import StorageCorruptError, StorageError, StorageMissingError
from personavec.store import extraction as xs
from personavec.store.runs import list_runs
from personavec.workspace import Workspace


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a run's stored activations: ``kind`` (``count``, ``metadata``, ``missing_group``,
    ``shape``, ``corrupt``, ``nonfinite``, ``missing_rows``, ``partial_files``, ``store``: it cannot be reached),
    the rows concerned, and detail."""

    kind: str
    detail: str
    rows: tuple[tuple[int, int], ...] = ()
    repairable: bool = True


@dataclass(frozen=True)
class RunCheck:
    """What :func:`verify_runs` found for one extraction run, and the fix."""

    run_id: int
    zarr_group: str
    n_examples: int
    n_done: int
    n_no_span: int
    n_adoptable: int
    layout: int | None
    storage_dtype: str | None
    checksummed: bool
    problems: tuple[Problem, ...]
    repaired_rows: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def fix(self) -> str | None:
        """The command(s) that fix what was found, or None when nothing is wrong."""
        if not self.problems:
            return None
        if any(not p.repairable for p in self.problems):
            return next(p.detail.split("; fix: ", 1)[1] for p in self.problems if "; fix: " in p.detail)
        if self.repaired_rows or all(p.kind == "partial_files" for p in self.problems):
            return f"personavec extract --resume {self.run_id}" if self.repaired_rows else "nothing left to fix"
        return f"personavec verify {self.run_id} --repair, then personavec extract --resume {self.run_id}"


def _ranges_text(ranges: tuple[tuple[int, int], ...], limit: int = 4) -> str:
    parts = [f"{a}..{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges[:limit]]
    more = f" and {len(ranges) - limit} more ranges" if len(ranges) > limit else ""
    return ", ".join(parts) + more


def _ranges(rows: list[int]) -> tuple[tuple[int, int], ...]:
    from personavec.extract.plan import row_ranges

    return tuple(row_ranges(rows))


def _check_unit(array: object, start: int, stop: int) -> tuple[np.ndarray | None, str]:
    """A write unit's rows, or None and which layers fail to decode."""
    try:
        return arrays.read_rows(array, np.arange(start, stop)), ""  # type: ignore[arg-type]
    except StorageCorruptError:
        pass
    bad = []
    for layer in range(int(array.shape[1])):  # type: ignore[attr-defined]
        try:
            arrays.read_rows(array, np.arange(start, stop), layer)  # type: ignore[arg-type]
        except StorageCorruptError as exc:
            bad.append(layer)
            reason = str(exc.__cause__ or exc)
    if bad:
        why = "checksum mismatch" if "checksum" in reason else " ".join(reason.split())[:120]
        return None, f"layer indices {bad}: {why}"
    return None, "its shard index does not decode"


def verify_run(
    ws: Workspace, run_id: int, *, repair: bool = False, progress: Callable[[int, int], None] | None = None
) -> RunCheck:
    """Check one extraction run (see the module docstring); with ``repair``, queue damaged rows for recomputation.

    ``progress(units_checked, units_total)`` is called as write units are read."""
    catalog = ws.catalog()
    info = xs.get_extraction_run(catalog, run_id)
    states = xs.example_states(catalog, run_id)
    rows = np.asarray(states["row"].to_numpy(), dtype=np.int64)
    done = np.asarray(states["done"].to_numpy(zero_copy_only=False), dtype=bool)
    spanned = np.asarray(states["has_span"].to_numpy(zero_copy_only=False), dtype=bool)
    problems: list[Problem] = []
    base = RunCheck(
        run_id=run_id,
        zarr_group=info.zarr_group,
        n_examples=info.n_examples,
        n_done=int(done.sum()),
        n_no_span=int(np.asarray(states["no_span"].to_numpy(zero_copy_only=False), dtype=bool).sum()),
        n_adoptable=0,
        layout=None,
        storage_dtype=None,
        checksummed=False,
        problems=(),
    )
    if len(rows) != info.n_examples or not np.array_equal(rows, np.arange(len(rows))):
        problems.append(
            Problem(
                "count",
                f"the catalog has {len(rows)} examples in rows {rows.min() if len(rows) else '-'}.."
                f"{rows.max() if len(rows) else '-'} for {info.n_examples} planned; fix: restore catalog.duckdb "
                "from a backup (the catalog itself is inconsistent)",
                repairable=False,
            )
        )
    needed = done & spanned
    try:
        array = arrays.open_activation_array(ws.zarr_location, info.zarr_group, "r+" if repair else "r")
    except StorageCorruptError as exc:
        problems.append(
            Problem(
                "metadata",
                f"{exc}; fix: restore {ws.zarr_location}/{info.zarr_group} from a backup, or extract the run again",
                repairable=False,
            )
        )
        return replace(base, problems=tuple(problems))
    except StorageMissingError:
        if needed.any():
            lost = _ranges(rows[needed].tolist())
            problems.append(Problem("missing_group", f"no Zarr group {info.zarr_group} for rows marked done", lost))
            repaired = xs.mark_not_done(catalog, run_id, lost) if repair else 0
        else:
            repaired = 0
        return replace(base, problems=tuple(problems), repaired_rows=repaired)
    except StorageError as exc:  # the store cannot be reached from here: nothing is known of its rows
        problems.append(Problem("store", f"{exc}; fix: make the store reachable, then verify again", repairable=False))
        return replace(base, problems=tuple(problems))
    expected = (info.n_examples, len(info.layers), info.d_model)
    layout = 2 if arrays.is_checksummed(array) else 1
    base = replace(base, layout=layout, storage_dtype=arrays.storage_dtype(array), checksummed=layout >= 2)
    if tuple(array.shape) != expected:
        problems.append(
            Problem(
                "shape",
                f"{info.zarr_group} has shape {tuple(array.shape)}, the catalog says {expected}; fix: the store and "
                "the catalog are from different runs: restore the matching backup, or extract the run again",
                repairable=False,
            )
        )
        return replace(base, problems=tuple(problems))

    present = arrays.written_blocks(array)
    n_units = arrays.n_blocks(array)
    corrupt: list[int] = []
    corrupt_detail: list[str] = []
    nonfinite: list[int] = []
    missing: list[int] = []
    adoptable = 0
    for unit in range(n_units):
        start, stop = arrays.block_rows(array, unit)
        need = needed[start:stop]
        pending = ~done[start:stop] & spanned[start:stop]
        if unit not in present:
            missing.extend((np.flatnonzero(need) + start).tolist())
        elif need.any() or pending.any():
            values, why = _check_unit(array, start, stop)
            if values is None:
                if need.any():
                    corrupt.append(unit)
                    corrupt_detail.append(f"rows {start}..{stop - 1} ({why})")
            else:
                finite = np.isfinite(values).reshape(len(values), -1).all(axis=1)
                nonfinite.extend((np.flatnonzero(need & ~finite) + start).tolist())
                adoptable += int((pending & finite).sum())
        if progress is not None:
            progress(unit + 1, n_units)
    if corrupt:
        problems.append(
            Problem(
                "corrupt",
                f"{len(corrupt)} write unit(s) fail their checksum or do not decode: {'; '.join(corrupt_detail[:3])}",
                tuple(arrays.block_rows(array, u) for u in corrupt),
            )
        )
    if nonfinite:
        problems.append(Problem("nonfinite", f"{len(nonfinite)} done row(s) hold NaN/inf", _ranges(nonfinite)))
    if missing:
        problems.append(Problem("missing_rows", f"{len(missing)} done row(s) were never written", _ranges(missing)))
    leftovers = arrays.partial_files(ws.zarr_location, info.zarr_group)
    if leftovers:
        problems.append(
            Problem("partial_files", f"{len(leftovers)} temporary *.partial file(s) left by a killed writer")
        )
    repaired = 0
    if repair:
        if corrupt:
            arrays.delete_blocks(array, corrupt)
        bad_ranges = [r for p in problems if p.kind in ("corrupt", "nonfinite", "missing_rows") for r in p.rows]
        repaired = xs.mark_not_done(catalog, run_id, bad_ranges) if bad_ranges else 0
        for path in leftovers:
            path.unlink(missing_ok=True)
    return replace(base, n_adoptable=adoptable, problems=tuple(problems), repaired_rows=repaired)


def verify_runs(
    ws: Workspace,
    run_id: int | None = None,
    *,
    repair: bool = False,
    progress: Callable[[int, int, int], None] | None = None,
) -> list[RunCheck]:
    """Check one extraction run, or every one in the workspace (see :func:`verify_run`).

    ``progress(run_id, units_checked, units_total)``.

    Example:
        >>> [c.fix for c in verify_runs(Workspace.resolve("ws")) if not c.ok]
        ['personavec verify 3 --repair, then personavec extract --resume 3']
    """
    ids = [run_id] if run_id is not None else [r.id for r in list_runs(ws.catalog(), "extract")]
    out = []
    for rid in ids:
        report = None if progress is None else (lambda done, total, rid=rid: progress(rid, done, total))
        out.append(verify_run(ws, rid, repair=repair, progress=report))
    return out


def describe(check: RunCheck) -> str:
    """One line per run: what was found and the fix."""
    head = (
        f"run {check.run_id}: {check.n_examples} examples, {check.n_done} done ({check.n_no_span} with no span), "
        f"{check.storage_dtype or '?'}"
        + (", no checksums (made before personavec stored them: bit flips go unseen)" if check.layout == 1 else "")
    )
    if check.n_adoptable:
        head += f", {check.n_adoptable} written but not marked done (a resume adopts them)"
    if check.ok:
        return f"{head}: ok"
    found = "; ".join(
        p.detail.split("; fix: ", 1)[0] + (f" (rows {_ranges_text(p.rows)})" if p.rows and p.kind != "corrupt" else "")
        for p in check.problems
    )
    done = f"; marked {check.repaired_rows} row(s) not done" if check.repaired_rows else ""
    return f"{head}: {found}{done}; fix: {check.fix}"
