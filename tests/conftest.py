"""Shared fixtures: fresh workspaces in tmp_path (copied from one template made per session), seeded RNGs, in-process
CLI runner."""

from __future__ import annotations

import os

# One torch (OpenMP) thread per test process, and in the servers and CLI processes the tests start (they inherit the
# environment): `make test` runs two workers on two cores, and two threads each fighting over busy cores made the
# embedded model's decoding ~10x slower in wall and CPU time (OpenMP threads spin at every barrier). An
# OMP_NUM_THREADS set by the caller wins. Set before torch is imported.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Likewise inductor compiles in the test process itself, not in a pool of compile workers: for the one small graph
# test_compile_matches_eager compiles, starting the pool cost more than it saved (cold cache: 22.3 s -> 18.6 s).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import functools
import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import typer.testing
import zarr
from typer.testing import CliRunner

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.workspace import Workspace, init_workspace


@contextmanager
def _hold(path: Path, seconds: float = 60) -> Iterator[subprocess.Popen]:
    """Another process holding DuckDB's write lock on ``path`` for ``seconds`` (DuckDB's lock is per process);
    killed on exit."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"import duckdb,time; c=duckdb.connect({str(path)!r}); print('ok', flush=True); "
            f"time.sleep({seconds}); c.close()",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        yield holder
    finally:
        holder.kill()
        holder.wait()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep ``--dist loadgroup`` grouping on pytest 9: pytest-xdist 3.8 tells its scheduler a test's ``xdist_group``
    by appending ``@group`` to ``item._nodeid``, which pytest 9 no longer reads (the id lives in ``item._id``), so
    every grouped test was scheduled on its own and each worker started its own embedded server and model
    (pytest-dev/pytest-xdist#1386). This sets the suffix where xdist's did not take; a no-op once it does."""
    if not getattr(config.option, "loadgroup", False):  # set in xdist workers under --dist loadgroup
        return
    for item in items:
        names = sorted(
            {str(m.args[0] if m.args else m.kwargs.get("name", "default")) for m in item.iter_markers("xdist_group")}
        )
        node_id = getattr(item, "_id", None)
        if names and node_id is not None and "@" not in item.nodeid:
            item._id = type(node_id).parse(f"{item.nodeid}@{'_'.join(names)}")


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch):
    """pytest-xdist's workers run with $COLUMNS=80: CLI output (tables off a terminal) must not depend on it."""
    monkeypatch.delenv("COLUMNS", raising=False)


@pytest.fixture
def hold_catalog():
    """``with hold_catalog(path, seconds=60):`` another process holds DuckDB's write lock on the catalog file."""
    return _hold


@pytest.fixture(scope="session")
def template_workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One workspace made by ``init_workspace`` per session (per xdist worker): the Alembic migrations and the built-in
    sets' ingest run once, not once a test. ``init_workspace`` itself and the migrations are tested in
    test_store_schema.py and test_cli_core.py on workspaces of their own."""
    root = tmp_path_factory.mktemp("template") / "ws"
    init_workspace(root)  # closes the catalog: the file is complete on disk (no write-ahead log left)
    return root


@pytest.fixture
def workspace(tmp_path: Path, template_workspace: Path) -> Workspace:
    """A fresh workspace at the head schema with the built-in persona and question sets: a copy of the session's
    template, exactly what ``init_workspace(tmp_path / "ws")`` would make."""
    root = tmp_path / "ws"
    shutil.copytree(template_workspace, root)
    return Workspace.resolve(root)


@pytest.fixture
def rng() -> np.random.Generator:
    random.seed(0)
    return np.random.default_rng(0)


@functools.cache
def _click_command(app):
    return _build_click_command(app)


# Typer's CliRunner rebuilds the click command tree from the Typer app on every invoke (it inspects the signature of
# every command: ~0.1-0.3 s a call, more than most commands take); a `personavec` process builds it once, and so do
# the tests now: the same command, built once per app and process.
_build_click_command = typer.testing._get_command
typer.testing._get_command = _click_command


@pytest.fixture
def cli() -> CliRunner:
    return CliRunner()


@pytest.fixture
def seed_cache_file(tmp_path: Path) -> Path:
    """A responses file in the seed's cache format over 5 built-in personas x 3 built-in questions."""
    responses = {
        json.dumps([p, q]): f"{p} answers question {i}: a thoughtful reply."
        for p in list(PERSONAS)[:5]
        for i, q in enumerate(EVAL_QUESTIONS[:3])
    }
    path = tmp_path / "responses_cache.json"
    path.write_text(json.dumps(responses, indent=2))
    return path


@pytest.fixture
def responses_run(workspace, seed_cache_file) -> int:
    """The seed cache file ingested: 15 answers (5 built-in personas x 3 questions). test_extract.py has its own."""
    from personavec.ingest import IngestConfig, ingest

    return ingest(workspace, IngestConfig("responses", seed_cache_file)).run_id


# ------------------------------------------------------------------------------ synthetic extraction runs (vectors)


@dataclass(frozen=True)
class SyntheticExtraction:
    """An ``extract`` run built through the store with seeded random activations (known answers for vectors)."""

    workspace: Workspace
    run_id: int
    response_run_id: int
    layers: tuple[int, ...]
    d_model: int
    examples: list[dict]  # row, persona, question, sample_index, groups, done
    data: np.ndarray  # [n_examples, n_layers, d_model] exactly as written to Zarr


@pytest.fixture
def make_extraction_run(tmp_path: Path):
    """Factory over ``tmp_path``: see :func:`synthetic_extraction_factory`."""
    return synthetic_extraction_factory(tmp_path)


def synthetic_extraction_factory(tmp_path: Path):
    """Factory: ``make(workspace, personas=..., n_questions=3, layers=(2, 5), d_model=32, undone=0)`` ingests a
    seed-JSON responses file over built-in personas/questions and creates a real extract run (catalog rows +
    Zarr array of seeded random data); the last ``undone`` rows are written as NaN-free data but not marked done.
    Persona ``p`` gets a mean offset of ``p_index`` on dimension 0 so groups differ. ``legacy=True`` writes the
    array in the layout personavec used before sharding and checksums (old stores must keep loading)."""
    from personavec import arrays
    from personavec.builtin import PERSONA_GROUPS
    from personavec.ingest import IngestConfig, ingest
    from personavec.store.extraction import add_examples, add_extraction_run, mark_rows_done
    from personavec.store.responses import answered_responses
    from personavec.store.runs import create_run, finish_run

    counter = iter(range(1000))

    def make(
        ws: Workspace,
        personas: tuple[str, ...] = ("default", "default_assistant", "assistant", "storyteller", "ghost", "cynic"),
        n_questions: int = 3,
        layers: tuple[int, ...] = (2, 5),
        d_model: int = 32,
        undone: int = 0,
        seed: int = 0,
        model: str = "synthetic/model",
        legacy: bool = False,
        revision: str | None = "abc",
        architecture: str = "Synthetic",
    ) -> SyntheticExtraction:
        questions = EVAL_QUESTIONS[:n_questions]
        path = tmp_path / f"responses_{next(counter)}.json"
        path.write_text(json.dumps({json.dumps([p, q]): f"{p} on {q}" for p in personas for q in questions}))
        rng = np.random.default_rng(seed)
        with ws.catalog() as catalog:
            resp = ingest(ws, IngestConfig("responses", path, model=model))
            with catalog.session() as session:
                run_id = create_run(session, "extract", {"synthetic": True})
            examples_info = []
            ids = [(r.id, r.persona, r.question, r.sample_index) for r in answered_responses(catalog, resp.run_id)]
            n = len(ids)
            data = rng.normal(size=(n, len(layers), d_model)).astype(np.float32)
            for row, (rid, p, q, s) in enumerate(ids):
                data[row, :, 0] += personas.index(p)
                examples_info.append(
                    {
                        "row": row,
                        "response_id": rid,
                        "persona": p,
                        "question": q,
                        "sample_index": s,
                        "groups": PERSONA_GROUPS[p],
                        "done": row < n - undone,
                    }
                )
            if legacy:  # as personavec wrote before sharding: float32 (rows, 1, d) chunks, zstd, no checksums
                group = arrays.group_name(run_id)
                root = zarr.open_group(str(ws.zarr_path), mode="a", zarr_format=3)
                root.create_group(group).create_array(
                    arrays.ARRAY_NAME, shape=(n, len(layers), d_model), chunks=(16, 1, d_model), dtype="float32",
                    fill_value=np.nan,
                )  # fmt: skip
            else:
                attrs = {"run_id": run_id}
                group = arrays.create_activation_array(ws.zarr_path, run_id, n, len(layers), d_model, attrs)
            arr = arrays.open_activation_array(ws.zarr_path, group, "r+")
            arrays.write_rows(arr, 0, data)
            table = pa.table(
                {
                    "response_id": pa.array([e["response_id"] for e in examples_info], pa.int64()),
                    "row": pa.array(range(n), pa.int32()),
                    "span_start": pa.array([1] * n, pa.int32()),
                    "span_end": pa.array([5] * n, pa.int32()),
                    "n_tokens": pa.array([6] * n, pa.int32()),
                    "n_response_tokens": pa.array([4] * n, pa.int32()),
                    "truncated": pa.array([False] * n),
                }
            )
            with catalog.session() as session:
                add_extraction_run(
                    session,
                    run_id,
                    source_run_id=resp.run_id,
                    model=model,
                    model_revision=revision,
                    architecture=architecture,
                    n_model_layers=8,
                    d_model=d_model,
                    layers=list(layers),
                    dtype="float32",
                    span_rule="exact",
                    prompt_format="chat",
                    device="cpu",
                    zarr_group=group,
                    n_examples=n,
                )
                add_examples(session, run_id, table)
                mark_rows_done(session, run_id, 0, n - undone)
                finish_run(session, run_id, "done" if not undone else "interrupted")
        return SyntheticExtraction(ws, run_id, resp.run_id, tuple(layers), d_model, examples_info, data)

    return make


# ------------------------------------------------------------------------------ tiny random-weight models


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this session's tiny models live (tests/tiny_models.py builds each one once per process)."""
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_llama(tiny_root: Path) -> str:
    """The directory of the 4-layer, 64-wide random llama with a ChatML template."""
    from tiny_models import tiny_model_dir

    return str(tiny_model_dir(tiny_root, "llama", "chatml"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_llama: str):
    """``tiny_llama`` loaded once per session (float32, CPU): pass it as ``loaded=`` to the stages that take one
    instead of loading the model again. Tests that change a model's weights load their own."""
    from personavec.modeling import load_model

    return load_model(tiny_llama, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny8(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An 8-layer, 64-wide random llama with a ChatML template (8 layers: the synthetic extraction's model size)."""
    from tiny_models import llama8

    return llama8(tmp_path_factory.mktemp("tiny8") / "llama8", seed=0)


@pytest.fixture
def vectors_run(workspace, make_extraction_run, tiny8):
    """A vectors run over synthetic activations recorded as tiny8's (8 layers, 64 wide) at layers 2 and 5."""
    from personavec.vectors import VectorConfig, compute_vectors

    ext = make_extraction_run(
        workspace, layers=(2, 5), d_model=64, model=tiny8, revision=None, architecture="LlamaForCausalLM"
    )
    return compute_vectors(workspace, VectorConfig(extraction_run_id=ext.run_id)).run_id


# ------------------------------------------------------------------------------ the embedded model, served once


@pytest.fixture(scope="session")
def embedded_server():
    """One ``transformers serve`` on the embedded model (CPU) for the whole session (per xdist worker): the serve,
    judge and demo tests that only talk to a server share it; the tests of ``personavec serve`` itself (SIGINT,
    SIGKILL of the command) still start their own. Keep the tests that use it in the ``embedded`` xdist group.
    Skipped under transformers 4 (the dependency floors), whose ``serve`` the transformers backend refuses."""
    from personavec.serve import local_server, transformers_serve_supported

    if not transformers_serve_supported():
        pytest.skip("the transformers backend needs transformers 5's `transformers serve` (personavec/serve.py)")

    with local_server(device="cpu") as server:
        yield server


@pytest.fixture(scope="session")
def steering_server():
    """personavec's own steering server (``personavec serve``, continuous batching) on its own copy of the embedded
    model, for the whole session: a judge endpoint several times faster than ``transformers serve`` on this CPU. Its
    model is not ``embedded_loaded`` (the server's hooks stay on its blocks). Keep its users in the
    ``embedded-loaded`` xdist group."""
    from tiny_models import embedded_dtype

    from personavec.serving.app import ServeConfig, running_server

    with running_server(ServeConfig(model="smollm2-135m-instruct", device="cpu", dtype=embedded_dtype())) as server:
        yield server


@pytest.fixture(scope="session")
def embedded_loaded():
    """The embedded model (SmolLM2-135M-Instruct) loaded once per session (``tiny_models.embedded_dtype``, CPU), for the
    tests whose behaviour depends on a real model's answers (the pirate trait, evaluate). Only hooks may be added to
    it (removed after use), never its weights changed. Keep its users in the ``embedded-loaded`` xdist group."""
    from tiny_models import embedded_dtype

    from personavec.modeling import load_model

    return load_model("smollm2-135m-instruct", dtype=embedded_dtype(), device="cpu")
