"""Vector runs and their vectors: one ``vector_runs`` row per run, one ``vectors`` row per (layer, group).

Vectors are written in one statement from an Arrow table (``list<float32>`` -> DuckDB ``FLOAT[]``) and read back
as one Arrow table whose list column is flattened straight into a numpy matrix (no per-row Python objects), so
loading a 23 x 5376 run stays far under 100 ms.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import sqlalchemy as sa
from sqlalchemy.orm import Session

from personavec.errors import ConfigError, NotFoundError
from personavec.store import models as m
from personavec.store.engine import Catalog, dbapi_connection
from personavec.store.runs import create_run, finish_run, require_kind


@dataclass(frozen=True)
class VectorRunInfo:
    """A vector run: its detail row, the run row's provenance, and the layers/groups it holds."""

    run_id: int
    extraction_run_id: int
    group_by: str
    model: str
    d_model: int
    status: str
    package_version: str
    created_at: str
    config: dict[str, Any]
    layers: tuple[int, ...]
    n_groups: int


@dataclass(frozen=True)
class StoredVectors:
    """The vectors of one run and layer, in insertion order: names, counts, norms and a ``[n, d]`` matrix."""

    run_id: int
    layer: int
    group_keys: tuple[str, ...]
    n_examples: tuple[int, ...]
    norms: tuple[float, ...]
    matrix: np.ndarray


def create_vector_run(
    catalog: Catalog,
    provenance: dict[str, Any],
    vectors: pa.Table,
    *,
    extraction_run_id: int,
    group_by: str,
    model: str,
    d_model: int,
) -> int:
    """One unit of work: a done ``vectors`` run (provenance as its config), its ``vector_runs`` row and every vector
    (see :func:`_insert_vectors` for the table's columns). Returns the run id; on any error nothing is written."""
    with catalog.session() as session:
        run_id = create_run(session, "vectors", provenance)
        session.add(
            m.VectorRun(
                run_id=run_id, extraction_run_id=extraction_run_id, group_by=group_by, model=model, d_model=d_model
            )
        )
        session.flush()
        _insert_vectors(session, run_id, vectors)
        finish_run(session, run_id, "done")
    return run_id


def _insert_vectors(session: Session, run_id: int, table: pa.Table) -> int:
    """Bulk-insert vectors from an Arrow table with ``layer``, ``group_key``, ``n_examples``, ``norm`` and
    ``vector`` (``list<float32>``) in one DuckDB statement. Returns the number of rows inserted."""
    # DuckDB preserves insertion order, so ids follow the table's row order (persona-set order for personas).
    con = dbapi_connection(session)
    con.register("_pv_vectors", table)
    try:
        con.execute(
            "INSERT INTO vectors (run_id, layer, group_key, n_examples, norm, vector) "
            "SELECT ?, layer, group_key, n_examples, norm, vector::FLOAT[] FROM _pv_vectors",
            [run_id],
        )
    finally:
        con.unregister("_pv_vectors")
    return table.num_rows


_INFO = """
SELECT r.kind, r.status, r.package_version, r.created_at, r.config, v.extraction_run_id, v.group_by, v.model,
       v.d_model, (SELECT list(DISTINCT layer ORDER BY layer) FROM vectors WHERE run_id = r.id),
       (SELECT count(DISTINCT group_key) FROM vectors WHERE run_id = r.id)
FROM runs r LEFT JOIN vector_runs v ON v.run_id = r.id WHERE r.id = ?
"""


def _info(con: Any, run_id: int) -> VectorRunInfo:
    # One statement (not ORM gets): loading a run by id must stay far under 100 ms.
    row = con.execute(_INFO, [run_id]).fetchone()
    require_kind(run_id, row[0] if row is not None else None, ("vectors",))
    kind, status, version, created, config, ext_id, group_by, model, d_model, layers, n_groups = row
    if ext_id is None:
        raise NotFoundError(f"vectors run {run_id} has no vector_runs row (it failed before writing anything)")
    return VectorRunInfo(
        run_id=run_id,
        extraction_run_id=int(ext_id),
        group_by=group_by,
        model=model,
        d_model=int(d_model),
        status=status,
        package_version=version,
        created_at=created.isoformat(timespec="seconds"),
        config=json.loads(config or "{}"),
        layers=tuple(int(x) for x in layers or ()),
        n_groups=int(n_groups),
    )


_READ = "SELECT group_key, n_examples, norm, vector FROM vectors WHERE run_id = ? AND layer = ? ORDER BY id"


def read_vectors(
    catalog: Catalog, run_id: int, layer: int | Callable[[VectorRunInfo], int]
) -> tuple[VectorRunInfo, StoredVectors]:
    """The run's info and the vectors of one layer as a numpy matrix (rows in the order they were computed).

    ``layer`` is a layer number or a function choosing one from the run's info (e.g. a default layer rule).
    """
    with catalog.session() as session:
        con = dbapi_connection(session)
        info = _info(con, run_id)
        if not info.layers:
            raise ConfigError(f"vectors run {run_id} holds no vectors (status {info.status})")
        chosen = layer(info) if callable(layer) else int(layer)
        if chosen not in info.layers:
            raise ConfigError(
                f"vectors run {run_id} has no layer {chosen}; its layers are {', '.join(map(str, info.layers))}"
            )
        table = con.execute(_READ, [run_id, chosen]).fetch_arrow_table()
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    # a writable copy (Arrow buffers are read-only; torch.from_numpy wants to own writable memory)
    matrix = np.array(flat, dtype=np.float32).reshape(table.num_rows, info.d_model)
    return info, StoredVectors(
        run_id=run_id,
        layer=chosen,
        group_keys=tuple(table["group_key"].to_pylist()),
        n_examples=tuple(table["n_examples"].to_pylist()),
        norms=tuple(table["norm"].to_pylist()),
        matrix=matrix,
    )


def persona_groups_for_responses(catalog: Catalog, response_run_id: int) -> dict[str, tuple[str, ...]]:
    """``{persona: groups}`` of the persona set a response run refers to (e.g. to find the ``default`` group)."""
    q = sa.text(
        "SELECT p.name, p.groups FROM response_runs rr JOIN personas p ON p.persona_set_id = rr.persona_set_id "
        "WHERE rr.run_id = :run ORDER BY p.position"
    )
    with catalog.session() as session:
        rows = session.execute(q, {"run": response_run_id}).all()
    return {name: tuple(groups) for name, groups in rows}


_READ_GROUP = "SELECT layer, n_examples, vector FROM vectors WHERE run_id = ? AND group_key = ? ORDER BY layer"


def read_group_vectors(catalog: Catalog, run_id: int, group: str) -> tuple[VectorRunInfo, dict[int, np.ndarray], int]:
    """The run's info, ``{layer: vector}`` of one group at every layer the run holds, and the group's example count
    (exports of one direction across layers: control vectors). ``ConfigError`` names the groups when it is absent."""
    with catalog.session() as session:
        con = dbapi_connection(session)
        info = _info(con, run_id)
        table = con.execute(_READ_GROUP, [run_id, group]).fetch_arrow_table()
        if table.num_rows == 0:
            names = [
                r[0]
                for r in con.execute("SELECT DISTINCT group_key FROM vectors WHERE run_id = ?", [run_id]).fetchall()
            ]
            raise ConfigError(f"vectors run {run_id} has no group {group!r} (groups: {', '.join(sorted(names))})")
    flat = table["vector"].combine_chunks().flatten().to_numpy(zero_copy_only=False)
    matrix = np.array(flat, dtype=np.float32).reshape(table.num_rows, info.d_model)
    layers = table["layer"].to_pylist()
    return info, {int(layer): matrix[i] for i, layer in enumerate(layers)}, int(table["n_examples"][0].as_py())
