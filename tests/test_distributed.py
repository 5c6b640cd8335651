"""Data-parallel extraction: the split, the device mapping, the fsspec activation store, and real runs of 2 gloo
processes (``accelerate launch``, one and two "machines") and of a rank killed mid-run, against one process."""

from __future__ import annotations

import gc
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pytest

from personavec import EVAL_QUESTIONS, PERSONAS, arrays
from personavec.cli import app
from personavec.errors import ConfigError, DistributedError, StorageError
from personavec.extract import ExtractConfig, launch, run_extraction
from personavec.extract import distributed as dp
from personavec.ingest import IngestConfig, ingest
from personavec.store.extraction import done_count, extraction_examples, get_extraction_run
from personavec.store.responses import answered_responses
from personavec.store.runs import get_run, list_runs
from personavec.vectors import VectorConfig, compute_vectors, load_vectors
from personavec.verify import describe, verify_run
from personavec.workspace import Workspace, init_workspace

ROOT = Path(__file__).resolve().parents[1]
LAYERS = (1, 3)  # of the tiny llama's 4
N_PERSONAS, N_QUESTIONS = 4, 3  # 12 examples: 6 chunks of 2 rows, 3 per process


# -- the split and the device mapping (no processes) ---------------------------------------------------------------


def test_split_gives_whole_chunks_once_and_balances_tokens() -> None:
    rng = random.Random(0)
    lengths = sorted((rng.randint(20, 900) for _ in range(1000)), reverse=True)
    rows = list(range(1000))
    for n_ranks, chunk_rows in ((2, 64), (3, 16), (8, 7)):
        for fraction in (0.0, 0.25):
            shares, pool = dp.split_chunks(rows, lengths, chunk_rows, n_ranks, fraction)
            assert sorted(i for part in [*shares, *pool] for i in part) == rows  # every example exactly once
            owner = {}
            for who, part in [*enumerate(shares), *((f"pool {k}", unit) for k, unit in enumerate(pool))]:
                assert part == sorted(part)
                for i in part:
                    assert owner.setdefault(rows[i] // chunk_rows, who) == who  # a chunk has one owner
            assert all(len({rows[i] // chunk_rows for i in unit}) == 1 for unit in pool)  # a pool unit is one chunk
            pooled = [sum(lengths[i] for i in unit) for unit in pool]
            assert pooled == sorted(pooled, reverse=True)  # claimed costliest first
            assert sum(pooled) <= fraction * sum(lengths) and (fraction == 0) == (not pool)
            if pool:  # the pool holds the cheapest units
                kept: dict[int, int] = {}
                for i in (i for share in shares for i in share):
                    kept[rows[i] // chunk_rows] = kept.get(rows[i] // chunk_rows, 0) + lengths[i]
                assert max(pooled) <= min(kept.values())
            loads = [sum(lengths[i] for i in share) for share in shares]
            biggest_chunk = max(sum(lengths[r : r + chunk_rows]) for r in range(0, 1000, chunk_rows))
            assert max(loads) - min(loads) <= biggest_chunk
    # a resumed run: only some rows of a chunk are left, and they still go together
    assert dp.split_chunks([5, 6, 7, 40, 41], [10, 10, 10, 50, 50], 4, 2) == ([[3, 4], [0, 1, 2]], [])
    assert dp.split_chunks([5, 6, 7, 40, 41], [10, 10, 10, 50, 50], 4, 2, 0.25) == ([[3, 4], []], [[0, 1, 2]])
    assert dp.split_chunks([], [], 4, 3) == ([[], [], []], [])


def test_pool_units_are_claimed_once_each_and_a_lost_rank_0_is_named() -> None:
    """The pool's counter (a real TCPStore served by "rank 0"): three ranks claiming at once get every unit exactly
    once; once rank 0 is gone, a claim fails with a DistributedError that names it."""
    lead = dp._Claims.serve()
    ranks = [lead, *(dp._Claims.connect(lead.address, r) for r in (1, 2))]
    got: dict[int, list[int]] = {r: [] for r in range(3)}

    def claim_all(rank: int, claims: dp._Claims) -> None:
        while (k := claims.claim()) < 60:
            got[rank].append(k)

    threads = [threading.Thread(target=claim_all, args=(r, ranks[r])) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(k for claimed in got.values() for k in claimed) == list(range(60))
    one = ranks[1]
    del lead, ranks, threads
    gc.collect()  # rank 0's counter stops serving
    with pytest.raises(DistributedError, match="rank 1 lost contact with rank 0"):
        one.claim()


def test_a_rank_waiting_for_a_gone_rank_0_still_takes_ctrl_c() -> None:
    """Reaching rank 0's counter once rank 0 is gone: torch's store client retries in C++ (for a minute), and the
    wait must still give way to a signal at once (the launcher's SIGTERM once waited 30 s, then killed the rank)."""
    with socket.socket() as s:  # a port nobody serves: rank 0 gone
        s.bind(("127.0.0.1", 0))
        address = s.getsockname()
    signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        dp._Claims.connect(address, 1)
    assert time.monotonic() - started < 5
    timer.join()


def test_launched_world_reads_the_launchers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """One reading of RANK / WORLD_SIZE for the CLI, the catalog (no warm hold in a rank) and the launch module."""
    from personavec.config import launched_world

    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world() == launch.launched_rank() == (0, 1)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", " 2 ")
    assert launched_world() == launch.launched_rank() == (1, 2)
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert launched_world() == (1, 1)


def test_rank_placement_maps_groups_of_gpus() -> None:
    gib = 1 << 30
    assert launch.rank_placement(1, 2, 1, []) == launch.Placement("cpu")
    assert launch.rank_placement(0, 2, 1, [80 * gib] * 2, device="cpu") == launch.Placement("cpu")
    assert launch.rank_placement(1, 2, 1, [80 * gib] * 2) == launch.Placement("cuda:1", gpus=(1,))
    # 8 GPUs, 4 processes of 2: process 2 shards its model over GPUs 4 and 5 only
    place = launch.rank_placement(2, 4, 2, [80 * gib] * 8)
    assert (place.device, place.gpus, place.device_map) == ("cuda:4", (4, 5), "auto")
    assert place.max_memory == {4: int(80 * gib * 0.9), 5: int(80 * gib * 0.9)}
    place = launch.rank_placement(2, 4, 2, [80 * gib] * 8, weight_memory_fraction=0.5)  # injected, not patched
    assert place.max_memory == {4: 40 * gib, 5: 40 * gib}
    assert launch.rank_placement(1, 2, 3, [80 * gib] * 6, device_map="balanced").device_map == "balanced"
    assert launch.rank_placement(1, 2, 3, [80 * gib] * 6).gpus == (3, 4, 5)
    with pytest.raises(ConfigError, match="need 6 GPUs; this machine has 4: launch at most 2"):
        launch.rank_placement(0, 3, 2, [80 * gib] * 4)
    with pytest.raises(ConfigError, match="gpus_per_process"):
        ExtractConfig(gpus_per_process=0)


def test_num_processes_launches_the_same_command(cli, workspace, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(launch, "launch", lambda args, n: calls.append((args, n)) or launch.Launched(0))
    args = ["extract", "-w", str(workspace.root), "--responses-run", "3", "--layer", "2", "--layer", "5"]
    result = cli.invoke(app, [*args, "--no-compile", "--num-processes", "2", "--chunk-rows", "4", "--json"])
    assert result.exit_code == 0, result.output
    forwarded, n = calls[0]
    assert n == 2 and "--num-processes" not in forwarded
    assert forwarded[0] == "extract" and forwarded[forwarded.index("--responses-run") + 1] == "3"
    assert forwarded.count("--layer") == 2 and "--no-compile" in forwarded and "--json" in forwarded
    assert forwarded[forwarded.index("--chunk-rows") + 1] == "4" and str(workspace.root) in forwarded
    monkeypatch.setattr(launch, "launch", lambda args, n: launch.Launched(3))
    assert cli.invoke(app, [*args, "--num-processes", "2"]).exit_code == 3  # a failed rank's exit code
    bad = cli.invoke(app, [*args, "--num-processes", "0"])
    assert bad.exit_code == 2 and "--num-processes must be >= 1" in bad.output


@pytest.mark.slow
def test_ctrl_c_while_ranks_run_stops_them_and_comes_out_as_a_keyboard_interrupt(workspace) -> None:
    """Ctrl-C in the launching process while its ranks start: torch-elastic stops them and raises its own
    SignalException; :func:`launch.launch` gives it as a KeyboardInterrupt (what the CLI reports as interrupted,
    exit 130) and leaves this process's SIGINT handler as it was."""
    import os
    import signal
    import threading

    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(3.0, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            launch.launch(["extract", "-w", str(workspace.root), "--resume", "999999"], 2)
    finally:
        timer.cancel()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.mark.slow
def test_the_rank_that_failed_first_is_named_and_noted_on_the_run(
    cli, workspace, make_extraction_run, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real launch of two ranks that both fail: the outcome names the first (by its failure time) and the exit
    code; the CLI notes it in front of the run's own error (rank 0, stopped by the launcher, only knows it was
    terminated) and prints it with the resume command. The launching process keeps its own signal handlers
    (torch-elastic replaces them while it runs: a later Ctrl-C must still be a KeyboardInterrupt)."""
    import signal

    from personavec.store.runs import finish_run, get_run

    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)}
    launched = launch.launch(["extract", "-w", str(workspace.root), "--resume", "999999"], 2)
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    # rank 0 exits 2 (no such run); rank 1 exits 1 when rank 0 tells it so, or is stopped by the launcher (SIGTERM)
    assert launched.code in (1, 2) and launched.run_id is None
    assert re.fullmatch(r"rank [01] of 2 failed first \(exit code [12]\); the launcher then stopped the others",
                        launched.first_failure)  # fmt: skip
    run_id = make_extraction_run(workspace).run_id
    with workspace.catalog().session() as session:
        finish_run(session, run_id, "interrupted", "Terminated: terminated by signal 15")
    note = "rank 1 of 2 failed first (killed by signal 9); the launcher then stopped the others"
    monkeypatch.setattr(launch, "launch", lambda args, n: launch.Launched(137, run_id, note))
    out = cli.invoke(app, ["extract", "-w", str(workspace.root), "--resume", str(run_id), "--num-processes", "2"])
    assert out.exit_code == 137
    resume = f"personavec extract --workspace {workspace.root.resolve()} --resume {run_id} --num-processes 2"
    assert note in out.output and resume in out.output
    assert get_run(workspace.catalog(), run_id).error == f"{note}; Terminated: terminated by signal 15"


# -- the activation store at an fsspec URL (one process) -----------------------------------------------------------


def _ingest(ws: Workspace, path: Path) -> int:
    return ingest(ws, IngestConfig("responses", path)).run_id


@pytest.fixture(scope="module")
def responses_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(7)
    words = "the a persona answer question reply think calm bright careful sea ship story".split()
    data = {
        json.dumps([p, q]): f"{p} says: " + " ".join(rng.choice(words) for _ in range(rng.randint(2, 18)))
        for p in list(PERSONAS)[:N_PERSONAS]
        for q in EVAL_QUESTIONS[:N_QUESTIONS]
    }
    path = tmp_path_factory.mktemp("responses") / "responses.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow
def test_zarr_url_workspace_keeps_activations_there(tmp_path: Path, responses_file: Path, tiny_llama: str) -> None:
    url = f"file://{tmp_path}/elsewhere/acts.zarr"
    ws = init_workspace(tmp_path / "ws", zarr_url=url)
    assert ws.zarr_url == url and ws.zarr_location == url
    assert init_workspace(tmp_path / "ws", zarr_url=url).zarr_url == url  # idempotent
    model = tiny_llama
    config = ExtractConfig(responses_run=_ingest(ws, responses_file), model=model, layers=(2,), device="cpu")
    result = run_extraction(ws, config)
    assert not ws.zarr_path.exists()  # nothing in the workspace directory
    assert (tmp_path / "elsewhere" / "acts.zarr" / result.zarr_group / arrays.ARRAY_NAME / "zarr.json").is_file()
    assert arrays.run_groups(url) == [result.zarr_group]
    vectors = compute_vectors(ws, VectorConfig(extraction_run_id=result.run_id))
    assert vectors.n_examples == N_PERSONAS * N_QUESTIONS
    with pytest.raises(ConfigError, match="cannot move"):
        init_workspace(tmp_path / "ws", zarr_url="file:///somewhere/else.zarr")
    with pytest.raises(ConfigError, match="fsspec URL"):
        init_workspace(tmp_path / "ws2", zarr_url="/not/a/url")
    # a store this machine cannot reach (its filesystem's package missing here): verify says so, and --repair does
    # not take the done rows for lost
    settings = ws.root / "workspace.json"
    settings.write_text(json.dumps({"zarr_url": "nosuchfs://bucket/acts.zarr"}))
    ws.close()
    check = verify_run(ws, result.run_id, repair=True)
    assert [p.kind for p in check.problems] == ["store"] and not check.repaired_rows
    assert "fsspec knows no filesystem for nosuchfs://" in describe(check) and "no checksums" not in describe(check)
    assert done_count(ws.catalog(), result.run_id) == N_PERSONAS * N_QUESTIONS
    with pytest.raises(StorageError, match="fsspec knows no filesystem for nosuchfs://"):
        compute_vectors(ws, VectorConfig(extraction_run_id=result.run_id))
    settings.write_text(json.dumps({"zarr_url": url}))
    # one process may also keep them in memory (not shared between processes: no use for data parallel)
    mem = init_workspace(tmp_path / "ws3", zarr_url="memory://personavec-test/acts.zarr")
    config = ExtractConfig(responses_run=_ingest(mem, responses_file), model=model, layers=(2,), device="cpu")
    done = run_extraction(mem, config)
    assert arrays.open_activation_array(mem.zarr_location, done.zarr_group).shape == (12, 1, 64)


def test_cli_init_zarr_url(cli, tmp_path: Path) -> None:
    url = f"file://{tmp_path}/shared/acts.zarr"
    out = cli.invoke(app, ["init", "-w", str(tmp_path / "ws"), "--zarr-url", url, "--json"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output)["activations"] == url
    assert Workspace.resolve(tmp_path / "ws").zarr_location == url
    # refused before anything is made: a half-made workspace would then fail as "unknown persona set 'builtin'"
    (tmp_path / "afile").write_text("x")
    for bad, message in [
        ("/not/a/url", "must be an fsspec URL"),
        ("nosuchfs://bucket/acts.zarr", "fsspec knows no filesystem for nosuchfs://"),
        (f"file://{tmp_path}/afile", "is a file, not a directory"),
    ]:
        out = cli.invoke(app, ["init", "-w", str(tmp_path / "new"), "--zarr-url", bad])
        assert out.exit_code == 2 and message in out.output and len(out.output.strip().splitlines()) == 1, out.output
        assert not (tmp_path / "new").exists()


# -- real processes on the tiny llama -------------------------------------------------------------------------


def _env() -> dict[str, str]:
    # the ranks import this checkout (not an installed copy) and the worker script next to this file
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}


def _run(cmd: list[str], cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)


def _accelerate(n: int, *, port: int, machines: int = 1, machine_rank: int = 0) -> list[str]:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n)]
    cmd += ["--num_machines", str(machines), "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1"]
    return cmd + ["--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def _extract_args(ws: Path | str, responses_run: int, model: str) -> list[str]:
    args = ["extract", "-w", str(ws), "--responses-run", str(responses_run), "--model", model]
    args += ["--dtype", "float32", "--device", "cpu"]
    args += ["--layer", str(LAYERS[0]), "--layer", str(LAYERS[1]), "--chunk-rows", "2", "--json"]
    return args + ["--max-batch-tokens", "1"]  # one example per batch, as the reference: the same float32 sums


def _json_line(output: str) -> dict:
    return json.loads(next(line for line in output.splitlines() if line.startswith('{"run_id"')))


def _vectors(ws: Workspace, run_id: int) -> dict[tuple[int, str], np.ndarray]:
    vrun = compute_vectors(ws, VectorConfig(extraction_run_id=run_id)).run_id
    out = {}
    for layer in LAYERS:
        vset = load_vectors(vrun, layer, workspace=ws)
        out.update({(layer, name): vset[name].numpy() for name in vset})
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory, responses_file: Path, tiny_llama: str) -> dict:
    """The reference: the same extraction in this one process, and its persona vectors. One example per batch
    everywhere: batches padded differently give float32 sums that differ in the last bit (1.5e-5 at |x| ~ 128)."""
    ws = init_workspace(tmp_path_factory.mktemp("one") / "ws")
    config = ExtractConfig(
        responses_run=_ingest(ws, responses_file),
        model=tiny_llama,
        layers=LAYERS,
        dtype="float32",
        device="cpu",
        chunk_rows=2,
        max_batch_tokens=1,
    )
    result = run_extraction(ws, config)
    vectors = _vectors(ws, result.run_id)
    ws.close()
    return vectors


def _check_consistent(ws: Workspace, run_id: int, reference: dict) -> None:
    """The run is done, every answered response is in it exactly once, every row is written, and its vectors equal
    the one-process run's."""
    catalog = ws.catalog()
    assert get_run(catalog, run_id).status == "done"
    info = get_extraction_run(catalog, run_id)
    table = extraction_examples(catalog, run_id)
    answered = sorted(r.id for r in answered_responses(catalog, info.source_run_id))
    assert sorted(table["response_id"].to_pylist()) == answered  # each response once
    assert sorted(table["row"].to_pylist()) == list(range(len(answered)))  # each Zarr row once
    assert pc.all(table["done"]).as_py() and done_count(catalog, run_id) == info.n_examples
    values = arrays.read_rows(arrays.open_activation_array(ws.zarr_location, info.zarr_group))
    assert values.shape == (len(answered), len(LAYERS), 64) and np.isfinite(values).all()
    got = _vectors(ws, run_id)
    assert got.keys() == reference.keys()
    diff = max(float(np.abs(got[k] - reference[k]).max()) for k in got)
    assert diff <= 1e-5, f"max abs diff {diff} between the data-parallel and the one-process vectors"


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, responses_file: Path, one_process: dict, tiny_llama: str) -> None:
    ws = init_workspace(tmp_path / "ws")
    run = _ingest(ws, responses_file)
    ws.close()
    args = _extract_args(ws.root, run, tiny_llama)
    args = args[: args.index("--chunk-rows")] + args[args.index("--chunk-rows") + 2 :]  # the default layout
    out = _run([sys.executable, "-m", "personavec", *args, "--num-processes", "2"], tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = _json_line(out.stdout)  # rank 0 alone prints
    assert out.stdout.count('{"run_id"') == 1
    assert (result["n_examples"], result["n_computed"]) == (12, 12)
    # without --chunk-rows a data-parallel run has shards enough to share (one 12-row shard would go to one rank),
    # and the array's shards are the plan's write units
    array = arrays.open_activation_array(ws.zarr_location, result["zarr_group"])
    assert arrays.n_blocks(array) == 12 and arrays.rows_per_chunk(array) == 1
    _check_consistent(ws, result["run_id"], one_process)


@pytest.mark.slow
def test_two_machines_share_an_fsspec_store(
    tmp_path: Path, responses_file: Path, one_process: dict, tiny_llama: str
) -> None:
    """Two "machines" on one host: two launches, `--num_machines 2`; the workspace (catalog) exists only on machine
    0's side, the activations at a file:// URL in a third directory both open."""
    machines = [tmp_path / "machine0", tmp_path / "machine1"]
    for m in machines:
        m.mkdir()
    ws = init_workspace(machines[0] / "ws", zarr_url=f"file://{tmp_path}/shared/acts.zarr")
    run = _ingest(ws, responses_file)
    ws.close()
    port = launch.free_port()
    # the same command on both: `-w ws` names the workspace only where it exists (machine 0)
    procs = [
        subprocess.Popen(
            [
                *_accelerate(2, port=port, machines=2, machine_rank=i),
                "-m",
                "personavec",
                *_extract_args("ws", run, tiny_llama),
            ],
            cwd=m,
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i, m in enumerate(machines)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert not (machines[1] / "ws").exists()
    result = _json_line(outs[0][0])
    assert '{"run_id"' not in outs[1][0]
    assert not ws.zarr_path.exists() and arrays.run_groups(ws.zarr_location) == [result["zarr_group"]]
    _check_consistent(ws, result["run_id"], one_process)


@pytest.mark.slow
def test_killed_rank_leaves_a_run_any_number_of_processes_resume(
    tmp_path: Path, responses_file: Path, one_process: dict, tiny_llama: str
) -> None:
    ws = init_workspace(tmp_path / "ws")
    run = _ingest(ws, responses_file)
    ws.close()
    worker = [str(ROOT / "tests" / "dist_worker.py"), "--workspace", str(ws.root), "--model", tiny_llama]
    layers = [a for layer in LAYERS for a in ("--layer", str(layer))]
    # rank 1 dies (SIGKILL) after its first batch (one example: its first shard is not complete, so nothing of
    # its share is written); the launcher then stops rank 0 (SIGTERM), which may have finished its own share
    out = _run([*_accelerate(2, port=launch.free_port()), *worker, "--responses-run", str(run), *layers], tmp_path)
    assert out.returncode != 0
    run_id = list_runs(ws.catalog(), "extract")[0].id
    assert get_run(ws.catalog(), run_id).status == "interrupted"
    first = done_count(ws.catalog(), run_id)
    assert first <= 8 and first % 2 == 0, out.stderr[-3000:]  # whole shards only; rank 1's share is left
    # resumed on 2 processes (rank 1's unwritten share is split again, so rank 0 has work), rank 0 dies this time
    # (SIGKILL: its run stays "running" with a dead owner)
    ws.close()
    cmd = [*_accelerate(2, port=launch.free_port()), *worker, "--resume", str(run_id), "--die-rank", "0"]
    out = _run(cmd, tmp_path)
    assert out.returncode != 0, out.stderr[-3000:]
    assert get_run(ws.catalog(), run_id).status == "interrupted"  # "running", owner gone
    second = done_count(ws.catalog(), run_id)
    assert first <= second < 12
    # and one process finishes it: only the rows not done are computed; rows rank 0 wrote but was killed before
    # marking are adopted (verified, not recomputed)
    result = run_extraction(ws, None, resume=run_id)
    assert result.n_computed + result.n_adopted == 12 - second
    _check_consistent(ws, run_id, one_process)
