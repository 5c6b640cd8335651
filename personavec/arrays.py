"""The activation store: the only module that touches Zarr.

Layout: ``<workspace>/activations.zarr`` is a Zarr v3 group; each extraction run owns the subgroup
``run_<id>`` holding ``activations``: float32 ``[n_examples, n_layers, d_model]``, chunked along examples
(``chunk_rows`` x 1 layer x d_model, at least about 1 MB per chunk). Rows are written a whole chunk at a time,
so a chunk has one writer; the catalog marks rows done only after their chunk is on disk.

A store is a local path or an fsspec URL (``file:///shared/acts.zarr``, ``s3://bucket/acts.zarr``: zarr's
``FsspecStore``); every function here takes either, as :attr:`personavec.workspace.Workspace.zarr_location` gives it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal, cast

import numpy as np
import zarr

from personavec.errors import StorageError

ARRAY_NAME = "activations"

#: A local path or an fsspec URL.
StoreLocation = Path | str


def group_name(run_id: int) -> str:
    return f"run_{run_id}"


def chunk_rows_for(d_model: int, target_bytes: int = 1 << 20) -> int:
    """Rows per chunk so that one chunk (rows x 1 layer x d_model float32) is at least ``target_bytes``."""
    rows = 1
    while rows * d_model * 4 < target_bytes:
        rows *= 2
    return max(16, min(rows, 4096))


def _activations(root: zarr.Group, name: str) -> zarr.Array:
    """``root[name][ARRAY_NAME]``: zarr types a member as Array | Group; this layout fixes which one each is."""
    group = cast(zarr.Group, root[name])
    return cast(zarr.Array, group[ARRAY_NAME])


def is_url(location: StoreLocation) -> bool:
    return isinstance(location, str) and "://" in location


def _open(location: StoreLocation, mode: Literal["r", "r+", "a"]) -> zarr.Group:
    # fsspec's local filesystem does not create parent directories unless asked (other filesystems have none)
    options = {"auto_mkdir": True} if is_url(location) and str(location).startswith(("file://", "local://")) else None
    return zarr.open_group(str(location), mode=mode, zarr_format=3, storage_options=options)


def _root(zarr_path: StoreLocation) -> zarr.Group:
    return _open(zarr_path, "a")


def create_activation_array(
    zarr_path: StoreLocation,
    run_id: int,
    n_examples: int,
    n_layers: int,
    d_model: int,
    attrs: dict | None = None,
    chunk_rows: int | None = None,
) -> str:
    """Create (or reopen, when resuming) the run's array; returns its group name. Shapes must match on reopen.

    ``chunk_rows`` overrides :func:`chunk_rows_for` (rows per chunk)."""
    name = group_name(run_id)
    root = _root(zarr_path)
    shape = (n_examples, n_layers, d_model)
    if name in root:
        arr = _activations(root, name)
        if tuple(arr.shape) != shape:
            raise StorageError(f"{zarr_path}/{name}: existing array has shape {arr.shape}, expected {shape}")
        return name
    group = root.create_group(name)
    if attrs:
        group.attrs.update(attrs)
    group.create_array(
        ARRAY_NAME,
        shape=shape,
        chunks=(chunk_rows or chunk_rows_for(d_model), 1, d_model),
        dtype="float32",
        fill_value=np.nan,
    )
    return name


def open_activation_array(zarr_path: StoreLocation, name: str, mode: Literal["r", "r+"] = "r") -> zarr.Array:
    """The ``activations`` array of one run's group."""
    try:
        return _activations(_open(zarr_path, mode), name)
    except (KeyError, FileNotFoundError) as exc:
        raise StorageError(
            f"activation store {zarr_path} has no group {name!r}: the Zarr store and the catalog disagree"
        ) from exc


def rows_per_chunk(array: zarr.Array) -> int:
    """Rows of one chunk of an activation array (a chunk holds whole rows of one layer)."""
    return int(array.chunks[0])


def write_rows(array: zarr.Array, start: int, values: np.ndarray) -> None:
    """Write ``values`` ([k, n_layers, d_model]) into rows ``start:start+k``."""
    array[start : start + values.shape[0]] = values.astype(np.float32, copy=False)


def read_rows(array: zarr.Array, rows: np.ndarray | None = None, layer_index: int | None = None) -> np.ndarray:
    """Read rows (all if ``rows`` is None), optionally one layer index, as float32."""
    sel_layer = slice(None) if layer_index is None else layer_index
    if rows is None:
        return np.asarray(array[:, sel_layer])
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and np.all(np.diff(rows) == 1):
        return np.asarray(array[int(rows[0]) : int(rows[-1]) + 1, sel_layer])
    return np.asarray(array.get_orthogonal_selection((rows, sel_layer if layer_index is not None else slice(None))))


def run_groups(zarr_path: StoreLocation) -> list[str]:
    """Names of the run groups in the store (empty when it does not exist)."""
    if is_url(zarr_path):
        try:
            root = _open(zarr_path, "r")
        except FileNotFoundError:  # zarr's GroupNotFoundError is one
            return []
    elif not (Path(zarr_path) / "zarr.json").is_file():
        return []
    else:
        root = _open(zarr_path, "r")
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
