"""The activation store under faults: empty answers, bit flips and damaged metadata, kill -9 mid-run, storage dtypes,
stale groups, old (unsharded) stores; `personavec verify`."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import zarr
from tiny_models import tiny_model_dir

from personavec import EVAL_QUESTIONS, PERSONAS, arrays
from personavec.cli import app
from personavec.errors import ModelError, StorageConflictError, StorageCorruptError, StorageOverflowError
from personavec.extract import ExtractConfig, ExtractionInterrupted, run_extraction
from personavec.extract.plan import ExtractionPlan
from personavec.extract.sink import ChunkAssembler, ChunkWriter, store_batches
from personavec.ingest import IngestConfig, ingest
from personavec.modeling import load_model
from personavec.spans import Rendered
from personavec.store.extraction import done_count, extraction_examples, get_extraction_run
from personavec.store.runs import get_run, list_runs
from personavec.tuning import Tuning
from personavec.vectors import VectorConfig, compute_vectors, load_vectors
from personavec.verify import verify_runs

ROOT = Path(__file__).resolve().parents[1]


def _responses(workspace, tmp_path: Path, n_personas: int = 5, n_questions: int = 5, empty=(), seed: int = 3) -> int:
    """A real responses run (seed-JSON ingest); answers whose (persona index, question index) is in ``empty``
    are the empty string."""
    rng = random.Random(seed)
    data = {}
    for pi, p in enumerate(list(PERSONAS)[:n_personas]):
        for qi, q in enumerate(EVAL_QUESTIONS[:n_questions]):
            words = " ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(1, 30)))
            data[json.dumps([p, q])] = "" if (pi, qi) in empty else f"{p} on {qi}: {words}"
    path = tmp_path / f"responses_{seed}_{n_personas}x{n_questions}.json"
    path.write_text(json.dumps(data))
    return ingest(workspace, IngestConfig("responses", path)).run_id


def _config(run: int, tiny_root: Path, **kw) -> ExtractConfig:
    base = dict(
        responses_run=run,
        model=str(tiny_model_dir(tiny_root, "llama", "chatml")),
        layers=(1, 3),
        chunk_rows=4,
        max_batch_tokens=200,
        max_batch_size=3,
        device="cpu",
    )
    return ExtractConfig(**(base | kw))


def _values(workspace, run_id: int) -> np.ndarray:
    info = get_extraction_run(workspace.catalog(), run_id)
    return arrays.read_rows(arrays.open_activation_array(workspace.zarr_path, info.zarr_group))


def _by_response(workspace, run_id: int) -> dict[int, np.ndarray]:
    table = extraction_examples(workspace.catalog(), run_id)
    values = _values(workspace, run_id)
    return dict(zip(table["response_id"].to_pylist(), values[table["row"].to_pylist()], strict=True))


def _json(output: str):
    """The JSON document a --json command printed (transformers' progress bars may share its line)."""
    line = output.strip().splitlines()[-1]
    starts = [i for i in (line.find('{"'), line.find('[{"')) if i >= 0]
    return json.loads(line[min(starts) :])


def _shards(workspace, run_id: int) -> list[Path]:
    root = workspace.zarr_path / f"run_{run_id}" / arrays.ARRAY_NAME / "c"
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- 12.4: empty answers ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_empty_answer_has_no_span_is_left_out_of_means_and_counted(
    cli, workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path, empty={(0, 1)})
    result = run_extraction(workspace, _config(run, tiny_root), loaded=tiny_loaded)
    assert get_run(workspace.catalog(), result.run_id).status == "done" and result.n_no_span == 1
    table = extraction_examples(workspace.catalog(), result.run_id)
    empty = [i for i, n in enumerate(table["n_response_tokens"].to_pylist()) if n == 0]
    assert len(empty) == 1 and table["done"][empty[0]].as_py() and table["persona"][empty[0]].as_py() == "default"
    values = _values(workspace, result.run_id)
    rows = table["row"].to_pylist()
    assert np.isnan(values[rows[empty[0]]]).all()  # no activations: never a mean of nothing marked as data
    assert np.isfinite(np.delete(values, rows[empty[0]], axis=0)).all()
    workspace.close()
    out = cli.invoke(app, ["vectors", str(result.run_id), "-w", str(workspace.root), "--json"])
    assert out.exit_code == 0, out.output
    vrun = _json(out.output)["run_id"]
    vset = load_vectors(vrun, layer=3, workspace=workspace.root)
    assert vset.provenance["n_examples_no_span"] == 1 and vset.provenance["n_examples"] == 24
    assert dict(zip(vset.names, vset.n_examples, strict=True))["default"] == 4  # 5 answers, one empty
    by = [i for i, p in enumerate(table["persona"].to_pylist()) if p == "default" and i != empty[0]]
    expected = values[[rows[i] for i in by], 1].mean(axis=0)
    np.testing.assert_allclose(vset["default"].numpy(), expected, rtol=1e-5, atol=1e-6)


# -- 12.5: checksums, verify, one-line errors -------------------------------------------------------------------


def test_every_bit_flip_in_a_chunk_file_is_detected(workspace, tmp_path: Path, tiny_root: Path, tiny_loaded) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=4)
    result = run_extraction(workspace, _config(run, tiny_root), loaded=tiny_loaded)
    array = arrays.open_activation_array(workspace.zarr_path, result.zarr_group)
    shard = _shards(workspace, result.run_id)[0]
    original = shard.read_bytes()
    rng = random.Random(0)
    for _ in range(30):
        data = bytearray(original)
        pos = rng.randrange(len(data))
        data[pos] ^= 1 << rng.randrange(8)
        shard.write_bytes(bytes(data))
        with pytest.raises(StorageCorruptError, match=r"rows 0\.\.3 cannot be read, a chunk is corrupt"):
            arrays.read_rows(array, np.arange(0, 4))
    shard.write_bytes(original)
    np.testing.assert_array_equal(arrays.read_rows(array, np.arange(0, 4)), _values(workspace, result.run_id)[:4])


@pytest.mark.slow
def test_bit_flip_fails_vectors_in_one_line_and_verify_repairs_it(
    cli, workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path)
    config = _config(run, tiny_root)
    reference = run_extraction(workspace, config, loaded=tiny_loaded)
    result = run_extraction(workspace, config, loaded=tiny_loaded)
    rid, ws = result.run_id, ["-w", str(workspace.root)]
    shard = _shards(workspace, rid)[2]  # rows 8..11
    data = bytearray(shard.read_bytes())
    data[40] ^= 0x10  # one bit of a float in the first layer's chunk
    shard.write_bytes(bytes(data))
    workspace.close()

    out = cli.invoke(app, ["vectors", str(rid), *ws])
    assert out.exit_code == 1 and "Traceback" not in out.output
    assert f"run_{rid}/activations: rows" in out.output and "a chunk is corrupt" in out.output
    assert "personavec verify" in out.output

    check = cli.invoke(app, ["verify", str(rid), *ws])
    assert check.exit_code == 1, check.output
    line = check.output.strip()
    assert "1 write unit(s) fail their checksum" in line and "rows 8..11 (layer indices [0]" in line
    on = f"--workspace {workspace.root.resolve()}"  # the commands it names run on the workspace it was given
    assert f"fix: personavec verify {on} {rid} --repair, then personavec extract {on} --resume {rid}" in line
    clean = cli.invoke(app, ["verify", str(reference.run_id), *ws])
    assert clean.exit_code == 0 and clean.output.strip().endswith(": ok")

    repaired = cli.invoke(app, ["verify", str(rid), "--repair", *ws, "--json"])
    assert repaired.exit_code == 0, repaired.output
    report = _json(repaired.output)[0]
    assert report["repaired_rows"] == 4 and report["fix"] == f"personavec extract --resume {rid}"
    assert done_count(workspace.catalog(), rid) == 21 and get_run(workspace.catalog(), rid).status == "interrupted"
    workspace.close()
    resumed = cli.invoke(app, ["extract", "--resume", str(rid), *ws, "--device", "cpu", "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert _json(resumed.output)["n_computed"] == 4
    assert cli.invoke(app, ["verify", *ws]).exit_code == 0
    np.testing.assert_allclose(_values(workspace, rid), _values(workspace, reference.run_id), atol=1e-5)
    assert cli.invoke(app, ["vectors", str(rid), *ws]).exit_code == 0


@pytest.mark.slow
@pytest.mark.parametrize("which", ["array", "group", "root"])
def test_corrupt_zarr_json_is_one_line_not_a_traceback(
    cli, workspace, tmp_path: Path, tiny_root: Path, tiny_loaded, which: str
) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=2)
    rid = run_extraction(workspace, _config(run, tiny_root), loaded=tiny_loaded).run_id
    path = {
        "array": workspace.zarr_path / f"run_{rid}" / arrays.ARRAY_NAME,
        "group": workspace.zarr_path / f"run_{rid}",
        "root": workspace.zarr_path,
    }[which] / "zarr.json"
    path.write_bytes(b'{"zarr_format": 3, "node_type": "arr\xff')
    workspace.close()
    for args in (["vectors", str(rid)], ["verify", str(rid)]):
        out = cli.invoke(app, [*args, "-w", str(workspace.root)])
        assert out.exit_code == 1, out.output
        assert "Traceback" not in out.output and "zarr.json (metadata) cannot be read" in out.output, out.output


@pytest.mark.slow
def test_verify_finds_missing_rows_partial_files_and_adoptable_rows(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=5)
    rid = run_extraction(workspace, _config(run, tiny_root), loaded=tiny_loaded).run_id
    shards = _shards(workspace, rid)
    shards[0].unlink()  # rows 0..3 marked done but gone
    (shards[1].parent / "1.0123abcd.partial").write_bytes(b"half a shard")
    from personavec.store.extraction import mark_not_done

    mark_not_done(workspace.catalog(), rid, [(8, 10)])  # written but not marked done: adoptable
    [check] = verify_runs(workspace, rid)
    kinds = {p.kind: p for p in check.problems}
    assert set(kinds) == {"missing_rows", "partial_files"} and kinds["missing_rows"].rows == ((0, 4),)
    assert check.n_adoptable == 2 and check.checksummed and check.storage_dtype == "float32"
    [fixed] = verify_runs(workspace, rid, repair=True)
    assert fixed.repaired_rows == 4 and not list(shards[1].parent.glob("*.partial"))
    resumed = run_extraction(workspace, None, resume=rid, loaded=tiny_loaded)
    assert (resumed.n_adopted, resumed.n_computed) == (2, 4)
    assert verify_runs(workspace, rid)[0].ok


# -- 12.7: durable progress, adoption after kill -9 ---------------------------------------------------------------

_CHILD = """
import json, os, signal, sys, time
from personavec.extract import ExtractConfig, run_extraction
from personavec.workspace import Workspace
import personavec.store.extraction as xs

config = ExtractConfig(**json.loads(sys.argv[2]))
mode = sys.argv[3]
if mode == "die-before-marking":  # the worst moment: a unit is on disk, the catalog does not know yet
    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)
    xs.mark_done = die  # marking on the way
    xs.finish_extraction = die  # marking the last rows as the run closes

def slow(progress):  # a slower model: leaves time to be killed half way
    time.sleep(float(sys.argv[4]))

run_extraction(Workspace.resolve(sys.argv[1]), config, progress=slow)
"""


def _child(workspace, config: ExtractConfig, mode: str, sleep: float) -> subprocess.Popen:
    fields = {k: (list(v) if isinstance(v, tuple) else v) for k, v in config.__dict__.items()}
    env = {**os.environ, "PYTHONPATH": f"{ROOT}:{ROOT / 'tests'}"}
    workspace.close()
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(workspace.root), json.dumps(fields), mode, str(sleep)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


@pytest.mark.slow  # a child process that imports torch and loads the model, then kill -9
def test_kill_9_keeps_rows_made_durable_by_time(workspace, tmp_path: Path, tiny_root: Path, tiny_loaded) -> None:
    run = _responses(workspace, tmp_path, n_personas=6, n_questions=8)  # 48 answers
    # one shard holds every row: before this change nothing was durable until the whole run was
    config = _config(run, tiny_root, chunk_rows=64, max_batch_size=2, flush_seconds=0.3)
    proc = _child(workspace, config, "slow", 0.1)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list_runs(workspace.catalog(), "extract")
            if runs and done_count(workspace.catalog(), runs[0].id) >= 6:
                break
            workspace.close()
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read().decode() if proc.stdout else ""
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(30)
    rid = list_runs(workspace.catalog(), "extract")[0].id
    kept = done_count(workspace.catalog(), rid)
    assert 6 <= kept < 48 and get_run(workspace.catalog(), rid).status == "interrupted"  # its process is gone
    resumed = run_extraction(workspace, None, resume=rid, loaded=tiny_loaded)
    assert resumed.n_computed + resumed.n_adopted == 48 - kept
    reference = run_extraction(workspace, replace(config, flush_seconds=30.0), loaded=tiny_loaded)
    a, b = _by_response(workspace, rid), _by_response(workspace, reference.run_id)
    for key, value in a.items():
        np.testing.assert_allclose(value, b[key], atol=1e-5)


@pytest.mark.slow  # a child process that imports torch and loads the model, then kill -9
def test_written_unit_not_yet_marked_done_is_adopted_after_kill_9(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path)
    config = _config(run, tiny_root)
    proc = _child(workspace, config, "die-before-marking", 0.0)
    assert proc.wait(120) == -signal.SIGKILL
    rid = list_runs(workspace.catalog(), "extract")[0].id
    assert done_count(workspace.catalog(), rid) == 0 and _shards(workspace, rid)  # on disk, unknown to the catalog
    [check] = verify_runs(workspace, rid)
    assert check.ok and check.n_adoptable >= 4
    resumed = run_extraction(workspace, None, resume=rid, loaded=tiny_loaded)
    assert resumed.n_adopted == check.n_adoptable and resumed.n_computed == 25 - check.n_adoptable
    reference = run_extraction(workspace, config, loaded=tiny_loaded)
    np.testing.assert_allclose(_values(workspace, rid), _values(workspace, reference.run_id), atol=1e-5)


@pytest.mark.slow
def test_partial_units_are_flushed_by_rows(workspace, tmp_path: Path, tiny_root: Path, tiny_loaded) -> None:
    run = _responses(workspace, tmp_path)
    config = _config(run, tiny_root, chunk_rows=32, flush_rows=5)  # one unit for all 25 rows

    def stop_after_four(progress) -> None:
        if progress.done_examples >= 12:
            raise ExtractionInterrupted("stop")

    with pytest.raises(ExtractionInterrupted):
        run_extraction(workspace, config, progress=stop_after_four, loaded=tiny_loaded)
    rid = list_runs(workspace.catalog(), "extract")[0].id
    assert done_count(workspace.catalog(), rid) >= 5  # none of the unit was durable before
    resumed = run_extraction(workspace, None, resume=rid, loaded=tiny_loaded)
    reference = run_extraction(workspace, config, loaded=tiny_loaded)
    assert resumed.n_computed < 25
    np.testing.assert_allclose(_values(workspace, rid), _values(workspace, reference.run_id), atol=1e-5)


@pytest.mark.slow
def test_a_large_resume_starts_on_its_first_rows_and_plans_the_rest_in_windows(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded, monkeypatch
) -> None:
    """Resuming a large run (forced: plan_inline_max 0, windows of 2, 3, then 5 rows, shards of 4 straddling them)
    starts the model on its first pending rows and plans the rest on a helper thread, instead of re-tokenizing every
    pending row first: rows done before are kept, the others computed once, each response's activations equal a
    one-example-per-batch reference, and progress ends at every row done."""
    from personavec.extract import pipeline

    run = _responses(workspace, tmp_path, empty={(0, 1), (4, 4)})
    reference = run_extraction(
        workspace, _config(run, tiny_root, max_batch_tokens=1, max_batch_size=1), loaded=tiny_loaded
    ).run_id

    def stop_early(progress) -> None:
        if progress.done_examples >= 8:
            raise ExtractionInterrupted("stop")

    with pytest.raises(ExtractionInterrupted):
        run_extraction(workspace, _config(run, tiny_root), progress=stop_early, loaded=tiny_loaded)
    (rid,) = [r.id for r in list_runs(workspace.catalog(), "extract") if r.id != reference]
    before = done_count(workspace.catalog(), rid)
    assert 2 < before <= 17  # some rows done (rows without a span once planned), enough left for windows
    sizes: list[int] = []
    real = pipeline.plan_window

    def spied(pending, examples, **kw):
        sizes.append(len(pending))
        return real(pending, examples, **kw)

    monkeypatch.setattr(pipeline, "plan_window", spied)
    seen: list[int] = []
    tuning = Tuning(plan_inline_max=0, rest_windows=(2, 3, 5))
    resumed = run_extraction(
        workspace, None, resume=rid, progress=lambda p: seen.append(p.done_examples), tuning=tuning, loaded=tiny_loaded
    )
    assert resumed.n_computed <= 25 - before and seen[-1] == 25 and seen == sorted(seen)
    # the first 3 pending rows (max_batch_size) start the model; the rest in windows of 2, 3, then 5
    assert sizes[0] == 3 and sum(sizes) == 25 - before and len(sizes) >= 3
    assert sizes[1:-1] == [2, 3, 5, 5, 5][: len(sizes) - 2] and sizes[-1] <= [2, 3, 5, 5, 5][len(sizes) - 2]
    assert done_count(workspace.catalog(), rid) == 25
    got, ref = _by_response(workspace, rid), _by_response(workspace, reference)
    assert got.keys() == ref.keys()
    for response in ref:
        np.testing.assert_allclose(got[response], ref[response], rtol=1e-5, atol=1e-5, equal_nan=True)


# -- storage dtypes ---------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_half_precision_storage_halves_bytes_and_reads_back_as_float32(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path)
    full = run_extraction(workspace, _config(run, tiny_root, chunk_rows=32), loaded=tiny_loaded)
    ref = _values(workspace, full.run_id)
    for dtype, tol in (("bfloat16", 2**-8), ("float16", 2**-11)):
        result = run_extraction(
            workspace, _config(run, tiny_root, chunk_rows=32, storage_dtype=dtype), loaded=tiny_loaded
        )
        array = arrays.open_activation_array(workspace.zarr_path, result.zarr_group)
        assert arrays.storage_dtype(array) == dtype and array.dtype.itemsize == 2
        got = _values(workspace, result.run_id)
        assert got.dtype == np.float32
        np.testing.assert_allclose(got, ref, rtol=tol, atol=1e-6)
        size = sum(p.stat().st_size for p in _shards(workspace, result.run_id))
        assert size < 0.55 * sum(p.stat().st_size for p in _shards(workspace, full.run_id))
        vectors = compute_vectors(workspace, VectorConfig(result.run_id))
        assert vectors.n_vectors == 10


def test_float16_overflow_fails_the_run_loudly(workspace, tmp_path: Path, tiny_root: Path) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=2)
    config = _config(run, tiny_root, layers=(0,), storage_dtype="float16")
    loaded = load_model(config.model, dtype="float32", device="cpu")
    with np.errstate(all="ignore"):
        loaded.model.get_input_embeddings().weight.data *= 1e7  # embeddings far beyond float16's 65,504
    with pytest.raises(StorageOverflowError, match=r"float16 cannot hold .* stored as inf.*bfloat16 or float32"):
        run_extraction(workspace, config, loaded=loaded)
    rid = list_runs(workspace.catalog(), "extract")[0].id
    assert get_run(workspace.catalog(), rid).status == "failed" and done_count(workspace.catalog(), rid) == 0
    assert not np.isinf(_values(workspace, rid)).any()  # nothing stored as inf
    ok = run_extraction(workspace, replace(config, storage_dtype="bfloat16"), loaded=loaded)
    assert np.isfinite(_values(workspace, ok.run_id)).all()


def test_model_nan_is_refused_not_stored(workspace, tmp_path: Path, tiny_root: Path) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=2)
    config = _config(run, tiny_root, layers=(0,))
    loaded = load_model(config.model, dtype="float32", device="cpu")
    loaded.model.get_input_embeddings().weight.data[:] = float("nan")
    with pytest.raises(ModelError, match="NaN/inf activations"):
        run_extraction(workspace, config, loaded=loaded)


# -- stale groups, old stores -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_new_run_refuses_a_group_left_by_a_forgotten_run(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded
) -> None:
    run = _responses(workspace, tmp_path, n_personas=2, n_questions=2)
    config = _config(run, tiny_root)
    first = run_extraction(workspace, config, loaded=tiny_loaded)
    # a catalog restored from an older backup would hand out this id again; the store still has its group
    stale = first.run_id + 1
    root = zarr.open_group(str(workspace.zarr_path), mode="a")
    stale_array = root.create_group(f"run_{stale}").create_array("activations", shape=(4, 2, 64), dtype="float32")
    stale_array[:] = 7.0
    with pytest.raises(StorageConflictError, match=rf"run_{stale} already exists although run {stale} is new"):
        run_extraction(workspace, config, loaded=tiny_loaded)
    assert get_run(workspace.catalog(), stale).status == "failed"
    np.testing.assert_array_equal(stale_array[:], 7.0)  # left as it was
    (workspace.zarr_path / f"run_{stale}").rename(tmp_path / "moved_aside")
    assert run_extraction(workspace, None, resume=stale).n_computed == 4


def test_old_unsharded_store_loads_verifies_and_resumes(workspace, make_extraction_run) -> None:
    synth = make_extraction_run(workspace, legacy=True, undone=5)
    array = arrays.open_activation_array(workspace.zarr_path, f"run_{synth.run_id}")
    assert array.shards is None and not arrays.is_checksummed(array) and arrays.rows_per_chunk(array) == 16
    np.testing.assert_array_equal(arrays.read_rows(array), synth.data)
    res = compute_vectors(workspace, VectorConfig(synth.run_id, allow_partial=True))
    assert res.n_examples == len(synth.examples) - 5
    [check] = verify_runs(workspace, synth.run_id)
    assert check.ok and not check.checksummed and check.n_adoptable == 5
    # the writer fills a layout-1 array a row block at a time (what resuming an old run does)
    n = len(synth.examples)
    examples = [Rendered([1, 2, 3], [(0, 3)], "") for _ in range(n)]
    plan = ExtractionPlan.build(examples, list(range(n)), n_rows=n, chunk_rows=16, max_batch_tokens=30,
                                max_batch_size=10)  # fmt: skip
    rw = arrays.open_activation_array(workspace.zarr_path, f"run_{synth.run_id}", "r+")
    writer = ChunkWriter(rw, "old store", threads=2)
    batches = ((b, 2 * synth.data[b], 3 * len(b)) for b in plan.batches)
    store_batches(ChunkAssembler(rw, n, 16, 2, synth.d_model, expect=plan.rows), batches, writer)
    writer.close()
    np.testing.assert_array_equal(arrays.read_rows(rw), 2 * synth.data)
    assert sorted(writer.written()) == [(s, min(s + 16, n)) for s in range(0, n, 16)]


def test_a_small_run_is_cut_into_write_units_written_while_later_batches_compute() -> None:
    """One layer of a 27B model (d_model 5376) made a 414-answer run one 9 MB shard, written whole after the last
    batch; a run now has at least ``min_units`` shards of at least one inner chunk (64 rows there), so only the last
    are written at the end. All layers keep their 64 MB shards; tiny runs stay one shard; data parallel asks for
    many units of any size; ``chunk_rows`` is kept as given."""
    MIN_UNITS = Tuning().min_units
    assert MIN_UNITS == 8
    assert arrays.layout_for(414, 1, 5376) == (420, 60)  # before: one shard
    assert arrays.layout_for(414, 1, 5376, min_units=MIN_UNITS) == (64, 64)  # 7 shards
    assert arrays.layout_for(414, 63, 5376, min_units=MIN_UNITS) == arrays.layout_for(414, 63, 5376) == (46, 46)
    assert arrays.layout_for(330_000, 1, 5376, min_units=MIN_UNITS) == (3072, 64)  # large runs: as before
    assert arrays.layout_for(40, 1, 5376, min_units=MIN_UNITS) == (40, 40)  # no unit under one inner chunk
    assert arrays.layout_for(414, 1, 576, min_units=MIN_UNITS) == (414, 414)  # SmolLM2: inner chunk 512 rows
    assert arrays.layout_for(12, 1, 64, min_units=32, min_unit_rows=1) == (1, 1)  # data parallel: 2 ranks x 16
    assert arrays.layout_for(414, 1, 5376, chunk_rows=200, min_units=MIN_UNITS)[0] == 200


def test_assembler_waits_for_every_expected_row_of_a_unit(tmp_path: Path) -> None:
    """A session expects all its rows from the start (a run is recorded before it is tokenized): a unit straddling
    two plan windows leaves only once the second window has computed its rows or found them without a span."""
    array = zarr.create_array(str(tmp_path / "a.zarr"), shape=(10, 1, 2), chunks=(4, 1, 2), dtype="float32",
                              fill_value=np.nan)  # fmt: skip
    asm = ChunkAssembler(array, 10, 4, 1, 2, expect=range(10))
    values = np.arange(20, dtype=np.float32).reshape(10, 1, 2)
    assert asm.add([0, 1, 2], values[0:3]) == []  # row 3 is in the next window
    asm.skip([3, 9])  # the next window finds rows 3 and 9 without a span
    done = asm.add([4, 5, 6, 7, 8], values[4:9])
    assert sorted((b.start, b.stop) for b in done) == [(0, 4), (4, 8), (8, 10)]
    for block in done:
        asm.job(block)[0]()
    expected = values.copy()
    expected[[3, 9]] = np.nan
    np.testing.assert_array_equal(arrays.read_rows(array), expected)


@pytest.mark.slow
def test_ctrl_c_while_a_large_run_is_still_planned_stops_the_planning_and_the_run_resumes(
    workspace, tmp_path: Path, tiny_root: Path, monkeypatch
) -> None:
    """Ctrl-C after the first batch of a large run (forced: plan_inline_max 0, windows of 2 answers, each made to
    take 1.5 s to render: 16.5 s of planning left): the planning stops at its next window, the KeyboardInterrupt
    comes out in a few seconds, not after the whole plan; the run, recorded when its responses were selected, is
    ``interrupted`` and a resume (the same path) completes it."""
    from personavec.extract import config as config_mod
    from personavec.extract import pipeline

    run = _responses(workspace, tmp_path)
    encode, compute = config_mod.encode_responses, pipeline.iter_mean_activations

    def slow_windows(loaded, conversations, config):  # the head (3 answers) at full speed, each window slowly
        if len(conversations) <= 2:
            time.sleep(1.5)
        return encode(loaded, conversations, config)

    def ctrl_c_after_the_first_batch(*args, **kwargs):
        for item in compute(*args, **kwargs):
            yield item
            raise KeyboardInterrupt

    monkeypatch.setattr(config_mod, "encode_responses", slow_windows)
    monkeypatch.setattr(pipeline, "iter_mean_activations", ctrl_c_after_the_first_batch)
    config = _config(run, tiny_root)
    load_model(config.model, dtype="float32", device="cpu")  # warm the model's files outside the timing
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt) as info:
        run_extraction(workspace, config, tuning=Tuning(plan_inline_max=0, rest_windows=(2,)))
    assert time.monotonic() - t < 12  # without the stop: over 16.5 s of sleeping alone, whatever the load
    (run_id,) = [r.id for r in list_runs(workspace.catalog(), "extract")]
    assert (
        getattr(info.value, "run_id", None) == run_id and get_run(workspace.catalog(), run_id).status == "interrupted"
    )
    monkeypatch.undo()
    result = run_extraction(workspace, None, resume=run_id)
    assert done_count(workspace.catalog(), run_id) == result.n_examples == 25


@pytest.mark.slow
@pytest.mark.parametrize("inline_max", [0, 10_000])
def test_the_rest_planned_on_a_helper_or_inline_the_run_is_the_same(
    workspace, tmp_path: Path, tiny_root: Path, tiny_loaded, inline_max: int
) -> None:
    """A new run starts on its first batch; the rest is planned on a helper thread in windows handed over as they
    are planned (a large run, forced here: plan_inline_max 0, windows of 2, 3, then 5 answers, so shards straddle
    windows) or by the model's thread when it asks for the next batch (a small one). Either way every response is
    extracted once (the empty ones with no span), every row is written, progress ends at every row done, and each
    response's activations equal a one-example-per-batch reference."""
    run = _responses(workspace, tmp_path, empty={(0, 1), (4, 4)})
    reference = run_extraction(
        workspace, _config(run, tiny_root, max_batch_tokens=1, max_batch_size=1), loaded=tiny_loaded
    ).run_id
    tuning = Tuning(plan_inline_max=inline_max, rest_windows=(2, 3, 5))
    seen: list[int] = []
    result = run_extraction(
        workspace,
        _config(run, tiny_root),
        progress=lambda p: seen.append(p.done_examples),
        tuning=tuning,
        loaded=tiny_loaded,
    )
    assert seen and seen[-1] == 25 and seen == sorted(seen)
    assert (result.n_examples, result.n_computed) == (25, 23)
    assert done_count(workspace.catalog(), result.run_id) == 25
    got, ref = _by_response(workspace, result.run_id), _by_response(workspace, reference)
    assert got.keys() == ref.keys()
    for rid in ref:
        np.testing.assert_allclose(got[rid], ref[rid], rtol=1e-5, atol=1e-5, equal_nan=True)
