"""The activation store: the only module that touches Zarr.

Layout: ``<workspace>/activations.zarr`` is a Zarr v3 group; each extraction run owns the subgroup ``run_<id>``
holding ``activations``, ``[n_examples, n_layers, d_model]``, fill value NaN (rows never written read as NaN).

Arrays made by this version (``personavec_layout = 2``):

- **Sharded** (zarr's sharding codec): one shard, one file, holds ``shard_rows`` whole rows x every layer, so a
  330k-row, 63-layer run is a few thousand files, not millions. Inside a shard each layer of those rows is its own
  chunk (``chunk_rows`` x 1 x ``d_model``, about 1 MB), so reading one layer of every row (the vector stage) reads
  1/n_layers of the bytes.
- **Checksummed**: every inner chunk ends with a crc32c (zarr's ``crc32c`` codec) and so does the shard index
  (zarr's default), so a flipped bit is an error, never a silently wrong vector. No compression: activations do not
  compress (random-like float mantissas) and compressing costs writer time.
- **Storage dtype** ``float32`` (default), ``float16`` or ``bfloat16`` (half the bytes). Zarr v3 has no bfloat16,
  so it is stored as its ``uint16`` bit pattern with the attribute ``personavec_dtype: bfloat16``; :func:`read_rows`
  always returns float32. A value the storage dtype cannot hold is refused (:class:`StorageOverflowError`), never
  stored as inf.

The write unit is a whole shard (:func:`rows_per_chunk` rows): a writer holds it in memory and writes it in one
go, so every shard has one writer and nothing is read back. Arrays made before (layout 1: float32 chunks of
``rows x 1 x d_model``, zstd, no shards, no checksums) are read and resumed as they are; their write unit is one
row block of chunks.

A store is a local path or an fsspec URL (``file:///shared/acts.zarr``, ``s3://bucket/acts.zarr``: zarr's
``FsspecStore``); every function here takes either, as :attr:`personavec.workspace.Workspace.zarr_location` gives it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import zarr
from zarr.codecs import BytesCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import LocalStore

from personavec.errors import (
    StorageConflictError,
    StorageCorruptError,
    StorageError,
    StorageMissingError,
    StorageOverflowError,
)
from personavec.files import fsync

ARRAY_NAME = "activations"
#: Storage dtypes an activation array may have.
STORAGE_DTYPES = ("float32", "float16", "bfloat16")
#: The layout of arrays this version creates (attribute ``personavec_layout``; absent on layout-1 arrays).
LAYOUT = 2
_BF16_NAN = 0x7FC0
# Errors zarr and its codecs raise on bytes they cannot decode: a checksum mismatch is a ValueError, a truncated
# shard index an IndexError/ValueError, a damaged zstd frame (layout 1) a RuntimeError, garbage JSON a ValueError.
_DECODE_ERRORS = (ValueError, KeyError, TypeError, IndexError, RuntimeError, OSError)

#: A local path or an fsspec URL.
StoreLocation = Path | str


def group_name(run_id: int) -> str:
    return f"run_{run_id}"


def chunk_rows_for(d_model: int, target_bytes: int = 1 << 20, itemsize: int = 4) -> int:
    """Rows per chunk so that one chunk (rows x 1 layer x d_model) is at least ``target_bytes``."""
    rows = 1
    while rows * d_model * itemsize < target_bytes:
        rows *= 2
    return max(16, min(rows, 4096))


def shard_rows_for(
    n_layers: int, d_model: int, itemsize: int = 4, target_bytes: int = 64 << 20, n_rows: int | None = None
) -> int:
    """Rows per shard (the write unit): at most about ``target_bytes`` of whole rows and 16,384 rows (small models:
    bounded buffers), a multiple of the inner chunk rows when a shard holds more than one chunk of rows. Given
    ``n_rows``, shards of one chunk of rows are evened out so that the last one is not mostly padding (zarr stores
    edge chunks whole)."""
    rows = int(min(max(1, target_bytes // (n_layers * d_model * itemsize)), 16384))
    inner = chunk_rows_for(d_model, itemsize=itemsize)
    if rows >= inner:
        return rows // inner * inner
    if n_rows:
        rows = -(-n_rows // -(-n_rows // rows))  # the same number of shards, as even as can be
    return rows


def layout_for(
    n_rows: int,
    n_layers: int,
    d_model: int,
    dtype: str = "float32",
    chunk_rows: int | None = None,
    *,
    min_units: int = 1,
    min_unit_rows: int | None = None,
    target_bytes: int = 64 << 20,
    chunk_bytes: int = 1 << 20,
) -> tuple[int, int]:
    """``(rows per shard, rows per inner chunk)`` of a new array: shards of ``chunk_rows`` rows (default
    :func:`shard_rows_for`, made small enough that the array has at least ``min_units`` shards, of no fewer than
    ``min_unit_rows`` rows, default one inner chunk), never more than the array holds, made of one-layer chunks of at
    most about ``chunk_bytes`` (:func:`chunk_rows_for`; shards about ``target_bytes``,
    :class:`personavec.tuning.Tuning`) that divide the shard evenly (zarr stores an edge chunk whole: small
    runs waste little)."""
    itemsize = dtype_itemsize(dtype)
    most = chunk_rows_for(d_model, chunk_bytes, itemsize=itemsize)
    shard = chunk_rows or shard_rows_for(n_layers, d_model, itemsize, target_bytes, n_rows=n_rows)
    if not chunk_rows and n_rows and min_units > 1:
        shard = min(shard, max(-(-n_rows // min_units), min_unit_rows or most))
    shard = max(1, min(shard, n_rows)) if n_rows else shard
    inner = -(-shard // -(-shard // most))  # the fewest chunks of at most `most` rows, as even as can be
    return -(-shard // inner) * inner, inner


def dtype_itemsize(dtype: str) -> int:
    """Bytes per value of a storage dtype."""
    return 4 if dtype == "float32" else 2


def _activations(root: zarr.Group, name: str) -> zarr.Array:
    """``root[name][ARRAY_NAME]``: zarr types a member as Array | Group; this layout fixes which one each is."""
    group = cast(zarr.Group, root[name])
    return cast(zarr.Array, group[ARRAY_NAME])


def is_url(location: StoreLocation) -> bool:
    return isinstance(location, str) and "://" in location


def url_problem(url: str) -> str | None:
    """Why the fsspec URL ``url`` cannot hold an activation store on this machine, or None when, as far as can be
    told without reaching it, it can: fsspec has no filesystem for its protocol, the filesystem's package is not
    installed (``s3fs`` for ``s3://``), or a ``file://`` path is a file."""
    scheme, _, rest = url.partition("://")
    try:
        import fsspec

        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:  # fsspec's own message names the package: "Install s3fs to access S3"
        return f"{url}: {_one_line(exc).removeprefix('ImportError: ')} (pip install it here)"
    except ValueError:
        return f"{url}: fsspec knows no filesystem for {scheme}:// (file://, s3://, gs://, ... with their packages)"
    if scheme in ("file", "local") and Path(rest).exists() and not Path(rest).is_dir():
        return f"{url}: {rest} is a file, not a directory"
    return None


def _open(location: StoreLocation, mode: Literal["r", "r+", "a"]) -> zarr.Group:
    problem = url_problem(str(location)) if is_url(location) else None
    if problem:
        raise StorageError(f"activation store {problem}")
    # fsspec's local filesystem does not create parent directories unless asked (other filesystems have none)
    options = {"auto_mkdir": True} if is_url(location) and str(location).startswith(("file://", "local://")) else None
    return zarr.open_group(str(location), mode=mode, zarr_format=3, storage_options=options)


def _root(zarr_path: StoreLocation, mode: Literal["r", "a"] = "a") -> zarr.Group:
    try:
        return _open(zarr_path, mode)
    except (FileNotFoundError, StorageError):
        raise
    except _DECODE_ERRORS as exc:
        raise StorageCorruptError(
            f"activation store {zarr_path}: its zarr.json (metadata) cannot be read ({_one_line(exc)}); restore it "
            "from a backup (personavec verify checks every run)"
        ) from exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def create_activation_array(
    zarr_path: StoreLocation,
    run_id: int,
    n_examples: int,
    n_layers: int,
    d_model: int,
    attrs: dict | None = None,
    chunk_rows: int | None = None,
    *,
    dtype: str = "float32",
    resume: bool = False,
) -> str:
    """Create the run's array (layout 2, see the module docstring); returns its group name.

    Args:
        chunk_rows: rows per shard, the write unit (default :func:`shard_rows_for`); see :func:`layout_for`.
        dtype: storage dtype, one of :data:`STORAGE_DTYPES`.
        resume: reopen the group when it exists (shapes must match). A new run (the default) refuses a group that
            exists: it belongs to a run the catalog no longer knows (e.g. a catalog restored from an older backup
            reuses run ids), and mixing its rows with the new run's would be silent corruption.
    """
    if dtype not in STORAGE_DTYPES:
        raise StorageError(f"storage dtype must be one of {', '.join(STORAGE_DTYPES)}, got {dtype!r}")
    name = group_name(run_id)
    root = _root(zarr_path)
    shape = (n_examples, n_layers, d_model)
    if name in root:
        if not resume:
            raise StorageConflictError(
                f"{zarr_path}/{name} already exists although run {run_id} is new: it was left by another run with "
                f"the same id (a catalog restored from an older backup reuses run ids). Move it aside (or delete it "
                f"if no run needs it), then `personavec extract --resume {run_id}`"
            )
        arr = _activations(root, name)
        if tuple(arr.shape) != shape:
            raise StorageError(f"{zarr_path}/{name}: existing array has shape {arr.shape}, expected {shape}")
        return name
    shard, inner = layout_for(n_examples, n_layers, d_model, dtype, chunk_rows)
    group = root.create_group(name)
    if attrs:
        group.attrs.update(attrs)
    array_attrs: dict[str, Any] = {"personavec_layout": LAYOUT, "personavec_dtype": dtype}
    group.create_array(
        ARRAY_NAME,
        shape=shape,
        shards=(shard, n_layers, d_model),
        chunks=(inner, 1, d_model),
        dtype="uint16" if dtype == "bfloat16" else dtype,
        fill_value=_BF16_NAN if dtype == "bfloat16" else np.nan,
        serializer=BytesCodec(),
        compressors=[Crc32cCodec()],
        filters=None,
        attributes=array_attrs,
    )
    base = _local_dir(root.store_path)
    if base is not None:  # the run's rows are marked done only after this: its metadata must outlive a power cut
        _sync_paths(base, ["zarr.json", f"{name}/zarr.json", f"{name}/{ARRAY_NAME}/zarr.json"], top=base.parent)
    return name


def open_activation_array(zarr_path: StoreLocation, name: str, mode: Literal["r", "r+"] = "r") -> zarr.Array:
    """The ``activations`` array of one run's group (writes store every chunk, even all-NaN ones: no
    fill-value comparison on the writer's path)."""
    try:
        root = _root(zarr_path, "r" if mode == "r" else "a")
        array = _activations(root, name)
    except (KeyError, FileNotFoundError) as exc:
        raise StorageMissingError(
            f"activation store {zarr_path} has no group {name!r}: the Zarr store and the catalog disagree "
            "(`personavec verify` names the fix)"
        ) from exc
    except StorageError:
        raise
    except _DECODE_ERRORS as exc:
        raise StorageCorruptError(
            f"activation store {zarr_path}/{name}: its zarr.json (metadata) cannot be read ({_one_line(exc)}); "
            f"restore it from a backup, or check the store with `personavec verify`"
        ) from exc
    return array.with_config({"write_empty_chunks": True}) if mode == "r+" else array


def storage_dtype(array: zarr.Array) -> str:
    """The dtype values are stored in: ``float32``, ``float16`` or ``bfloat16``."""
    if array.dtype == np.uint16:
        return "bfloat16"
    return str(array.dtype)


def is_checksummed(array: zarr.Array) -> bool:
    """Whether the array's chunks carry checksums (layout 2); layout-1 arrays cannot tell a flipped bit."""
    layout = array.attrs.get("personavec_layout", 1)
    return isinstance(layout, int) and layout >= 2


def rows_per_chunk(array: zarr.Array) -> int:
    """Rows of one write unit: a shard (layout 2) or a row block of chunks (layout 1)."""
    return int(array.shards[0] if array.shards else array.chunks[0])


def to_storage(values: np.ndarray, dtype: str, first_row: int = 0) -> np.ndarray:
    """``values`` (float32) in the storage representation of ``dtype``; refuses values the dtype cannot hold.

    Raises:
        StorageOverflowError: a finite value became inf (float16 above 65,504; bfloat16 near float32's limit).
    """
    if dtype == "float32":
        return values.astype(np.float32, copy=False)
    out: np.ndarray
    if dtype == "float16":
        with np.errstate(over="ignore"):
            out = values.astype(np.float16)
        finite = np.isfinite(out)
    else:
        import torch

        as_bf16 = torch.from_numpy(np.ascontiguousarray(values, np.float32)).to(torch.bfloat16)
        out = as_bf16.view(torch.int16).numpy().view(np.uint16)
        finite = (out & 0x7F80) != 0x7F80
    if not finite.all():
        lost = ~finite & np.isfinite(values)
        if lost.any():
            idx = np.argwhere(lost)[0]
            biggest = float(np.abs(values[lost]).max())
            raise StorageOverflowError(
                f"storage dtype {dtype} cannot hold this run's activations: |value| {biggest:.4g} (first at row "
                f"{first_row + int(idx[0])}, layer index {int(idx[1])}) would be stored as inf; extract again with "
                f"storage dtype {'bfloat16 or ' if dtype == 'float16' else ''}float32 (a new run)"
            )
    return out


def from_storage(values: np.ndarray) -> np.ndarray:
    """Stored values as float32 (bfloat16 bit patterns widened exactly)."""
    if values.dtype == np.uint16:
        return (values.astype(np.uint32) << 16).view(np.float32)
    return values.astype(np.float32, copy=False)


def write_rows(array: zarr.Array, start: int, values: np.ndarray, *, durable: bool = False) -> None:
    """Write ``values`` (float32 ``[k, n_layers, d_model]``) into rows ``start:start+k``, converted to the
    array's storage dtype (see :func:`to_storage`). ``durable``: return only once the files written are on disk
    (:func:`sync_rows`), so that rows marked done afterwards survive a power cut."""
    array[start : start + values.shape[0]] = to_storage(values, storage_dtype(array), start)
    if durable:
        sync_rows(array, start, start + values.shape[0])


def _local_dir(store_path: Any) -> Path | None:
    """The directory of a store path on this machine's filesystem (a local path or a ``file://`` URL); None for
    other stores (an object store makes a write durable itself)."""
    store = store_path.store
    if isinstance(store, LocalStore):
        root = Path(store.root)
    else:
        fs = getattr(getattr(store, "fs", None), "sync_fs", getattr(store, "fs", None))
        if fs is None or "file" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
            return None
        root = Path(store.path)
    return root / store_path.path if store_path.path else root


def _sync_paths(base: Path, keys: Iterable[str], top: Path | None = None) -> None:
    """fsync the files ``base/key``, then every directory from theirs up to ``top`` (default ``base``), deepest
    first: the file's bytes, then the names that lead to it (zarr renames a temporary file into place and creates
    directories as it goes). Directories cannot be opened on Windows: files only there."""
    top = top or base
    dirs: set[Path] = set()
    for key in keys:
        path = base / key
        fsync(path)
        if os.name != "nt":
            dirs.update(parent for parent in path.parents if parent == top or top in parent.parents)
    for directory in sorted(dirs, key=lambda d: len(d.parts), reverse=True):
        fsync(directory)


def sync_rows(array: zarr.Array, start: int, stop: int) -> None:
    """Make rows ``start:stop`` durable: :func:`sync_blocks` of their write units."""
    if stop > start:
        per = rows_per_chunk(array)
        sync_blocks(array, range(start // per, -(-stop // per)))


def sync_blocks(array: zarr.Array, blocks: Iterable[int]) -> None:
    """Make write units durable: fsync their files and the directories above them, up to the array's, each once. A
    no-op for an object store (fsspec URLs other than ``file://``)."""
    base = _local_dir(array.store_path)
    if base is not None:
        _sync_paths(base, [key for block in blocks for key in _block_keys(array, block)])


def _where(array: zarr.Array) -> str:
    return f"{array.store_path}"


def read_rows(array: zarr.Array, rows: np.ndarray | None = None, layer_index: int | None = None) -> np.ndarray:
    """Read rows (all if ``rows`` is None), optionally one layer index, as float32.

    Raises:
        StorageCorruptError: a chunk fails its checksum or cannot be decoded (one line naming the rows and the fix).
    """
    sel_layer = slice(None) if layer_index is None else layer_index
    try:
        if rows is None:
            out = np.asarray(array[:, sel_layer])
        else:
            rows = np.asarray(rows, dtype=np.int64)
            if rows.size and np.all(np.diff(rows) == 1):
                out = np.asarray(array[int(rows[0]) : int(rows[-1]) + 1, sel_layer])
            else:
                out = np.asarray(
                    array.get_orthogonal_selection((rows, sel_layer if layer_index is not None else slice(None)))
                )
    except _DECODE_ERRORS as exc:
        span = "all rows" if rows is None or not len(rows) else f"rows {int(rows[0])}..{int(rows[-1])}"
        raise StorageCorruptError(
            f"activation store {_where(array)}: {span} cannot be read, a chunk is corrupt ({_one_line(exc)}); "
            "`personavec verify RUN` names the damaged rows and `--repair` queues them for recomputation"
        ) from exc
    return from_storage(out)


# -- write units: what exists, what to delete (resume adoption, verify) ------------------------------------------


def _block_keys(array: zarr.Array, block: int) -> list[str]:
    """Store keys (relative to the array) of write unit ``block``: its shard, or its row of layout-1 chunks."""
    if array.shards:
        return [array.metadata.encode_chunk_key((block, 0, 0))]
    n_layer_chunks = -(-int(array.shape[1]) // int(array.chunks[1]))
    return [array.metadata.encode_chunk_key((block, j, 0)) for j in range(n_layer_chunks)]


def n_blocks(array: zarr.Array) -> int:
    """Write units of the array (the last one may be short)."""
    return -(-int(array.shape[0]) // rows_per_chunk(array))


async def _list(store: Any, prefix: str) -> set[str]:
    return {key async for key in store.list_prefix(prefix)}


def written_blocks(array: zarr.Array) -> set[int]:
    """Write units with at least one chunk in the store (written whole, or flushed partly: read them to know)."""
    prefix = f"{array.store_path.path}/" if array.store_path.path else ""
    present = {key[len(prefix) :] for key in sync(_list(array.store_path.store, prefix))}
    return {b for b in range(n_blocks(array)) if any(key in present for key in _block_keys(array, b))}


def delete_blocks(array: zarr.Array, blocks: Iterable[int]) -> None:
    """Remove write units from the store (their rows read as NaN again); used to repair corrupt ones."""
    store = array.store_path.store
    prefix = f"{array.store_path.path}/" if array.store_path.path else ""
    for block in blocks:
        for key in _block_keys(array, block):
            sync(store.delete(prefix + key))


def block_rows(array: zarr.Array, block: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of write unit ``block``."""
    per = rows_per_chunk(array)
    return block * per, min((block + 1) * per, int(array.shape[0]))


def partial_files(zarr_path: StoreLocation, name: str) -> list[Path]:
    """Temporary files a killed writer left inside a run's group (zarr writes ``<key>.<uuid>.partial``, then
    renames): garbage, never data. Local stores only (an fsspec URL has none to list: empty)."""
    if is_url(zarr_path):
        return []
    root = Path(zarr_path) / name
    return sorted(root.rglob("*.partial")) if root.is_dir() else []


def nonfinite_rows(values: np.ndarray) -> np.ndarray:
    """Indices of the rows of ``values`` (``[k, ...]``) that hold a NaN or inf."""
    return np.flatnonzero(~np.isfinite(values).reshape(len(values), -1).all(axis=1))


def run_groups(zarr_path: StoreLocation) -> list[str]:
    """Names of the run groups in the store (empty when it does not exist)."""
    if is_url(zarr_path):
        try:
            root = _root(zarr_path, "r")
        except FileNotFoundError:  # zarr's GroupNotFoundError is one
            return []
    elif not (Path(zarr_path) / "zarr.json").is_file():
        return []
    else:
        root = _root(zarr_path, "r")
    return sorted(name for name in root.group_keys() if name.startswith("run_"))


def remove_groups(zarr_path: StoreLocation, names: Iterable[str]) -> list[str]:
    """Delete the named run groups (and their arrays) that exist; returns the names removed. Used when the catalog
    forgets runs (a schema downgrade), so that a reused run id never meets an old group."""
    present = set(run_groups(zarr_path))
    removed = [name for name in dict.fromkeys(names) if name in present]
    if removed:
        root = _root(zarr_path)
        for name in removed:
            del root[name]
    return removed
