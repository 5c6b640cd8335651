"""Benchmark: does the store keep up with the GPU? The bare compute core vs the catalogued pipeline, in one process.

Model mode (default). Cases, each measured as core then pipeline, ``--repeat`` times (best of each, same process):

- ``layer-eager``: the seed's default layer (40 of 62 for gemma-3-27b), eager;
- ``layer-compiled``: the same layer, regionally compiled (a first compiled pass over the workload compiles);
- ``all-eager``: every ``hidden_states`` layer (0..n: 63 for gemma-3-27b), eager (~1.35 MB float32 per answer);
- ``all-compiled``: every layer, regionally compiled.

*Core*: ``iter_mean_activations`` over the pre-tokenized workload with the pipeline's own batches, outputs dropped
(the copy to the host included). *Pipeline*: ``run_extraction`` into a real catalog + Zarr store (the loaded model
passed in), timed from the call to its return: selection, tokenization, recording the run, compute, every write,
the last commit. The overhead is ``1 - pipeline tok/s / core tok/s``; targets: all layers <= 5%, compiled one
layer <= 3%. ``--plan-inline-max 100000 0`` (``Tuning.plan_inline_max``) times the pipeline both ways the rest
of a new run can be planned (by the model's thread after it launched the first batch, or on a helper thread),
alternated.

Workloads: ``--synthetic gemma-3-27b`` (GPU: the 27B text architecture with random bf16 weights, as
scripts/bench_extract.py) and ``--synthetic tiny`` (CPU: a 4-layer 256-wide Llama) use a word-level tokenizer built
here (no download: one token per word, a ChatML template) over 23 built-in personas x 18 questions with 120-256-word
answers (~100k tokens for 414 answers, the shape of the issue's measurement); ``--model smollm2-135m-instruct`` uses
the embedded model and its own tokenizer.

Store-only mode (``--stress``, no model, any machine): the pipeline's real writer path (``store_batches`` +
``ChunkWriter`` + catalog marking, real DuckDB and Zarr) fed ``[batch, n_layers, d_model]`` float32 batches at a
simulated GPU rate (``--gpu-tok-s``; 0 = as fast as the store goes). Four variants in the same run: ``before``
(the writer loop and layout of personavec before this change, reproduced here: per-row copies and a catalog commit
per batch on the model's thread, one writer thread, unsharded ``rows x 1 x d`` zstd chunks), ``legacy`` (today's
loop, the old layout, one writer thread), ``sharded`` (today's loop and layout) and ``sharded-no-fsync`` (the same
without fsyncing each shard before its rows are marked done, ``Tuning.fsync_writes=False``). Reports the time the
model's thread lost (wall - simulated GPU time), how long it waited on the writers, the final drain, and the store's
MB/s.

    GPU:  PYTHONPATH=. python3 scripts/bench_pipeline.py --device cuda --synthetic gemma-3-27b --repeat 2
    CPU:  .venv/bin/python scripts/bench_pipeline.py --synthetic tiny --n 96
          .venv/bin/python scripts/bench_pipeline.py --stress --gpu-tok-s 8504 --n 414

The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import platform
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench_extract import WORDS, build_synthetic, synth_response  # noqa: E402

from personavec import EVAL_QUESTIONS, PERSONAS, arrays  # noqa: E402
from personavec.config import default_layer  # noqa: E402
from personavec.extract.config import ExtractConfig, encode_responses  # noqa: E402
from personavec.extract.core import (  # noqa: E402
    _batch_tensors,
    _padded_width,
    capture,
    compiled_blocks,
    iter_mean_activations,
)
from personavec.extract.plan import ExtractionPlan, longest_first  # noqa: E402
from personavec.extract.run import run_extraction  # noqa: E402
from personavec.extract.sink import ChunkAssembler, ChunkWriter, DoneMarks, store_batches  # noqa: E402
from personavec.ingest import IngestConfig, ingest  # noqa: E402
from personavec.spans import Rendered  # noqa: E402
from personavec.tuning import DEFAULT, Tuning  # noqa: E402
from personavec.workspace import Workspace, init_workspace  # noqa: E402

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def word_tokenizer():
    """A fast word-level tokenizer built in code: one token per whitespace-separated word (unknown words share one
    id), ChatML turn markers as special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<pad>", "<bos>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for w in WORDS} | {w.capitalize() for w in WORDS} | {w + "." for w in WORDS})
    vocab = {t: i for i, t in enumerate([*specials, *words, "system", "user", "assistant", "Response"])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>", bos_token="<bos>", eos_token="<|im_end|>"
    )
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    return tok


def build_tiny(device: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from personavec.modeling import LoadedModel, decoder_layers

    cfg = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).eval()
    model.to(device)
    return LoadedModel(
        name="synthetic:tiny", path=Path("."), model=model, tokenizer=None, layers=decoder_layers(model),
        n_layers=4, d_model=256, architecture="LlamaForCausalLM", revision=None, device=device, dtype=torch.float32,
        layers_path="model.layers",
    )  # fmt: skip


def load(args):
    """The model (with a tokenizer) and a function giving the i-th synthetic answer."""
    import dataclasses

    rng = random.Random(0)
    if args.synthetic:
        loaded = build_synthetic(args.synthetic, args.device) if args.synthetic != "tiny" else build_tiny(args.device)
        loaded = dataclasses.replace(loaded, tokenizer=word_tokenizer())

        def answer(i: int) -> str:
            n = rng.randint(120, 256)
            return " ".join(rng.choice(WORDS) for _ in range(n))

        return loaded, answer
    from personavec.modeling import load_model

    loaded = load_model(args.model, dtype=args.dtype, device=args.device, attn_implementation="sdpa")
    return loaded, lambda i: synth_response(i, rng)


def responses_file(path: Path, n: int, answer) -> Path:
    """``n`` answers over the built-in personas x questions (more samples per pair beyond 414), as JSONL."""
    pairs = [(p, q) for p in PERSONAS for q in EVAL_QUESTIONS]
    with path.open("w") as f:
        for i in range(n):
            p, q = pairs[i % len(pairs)]
            f.write(json.dumps({"persona": p, "question": q, "sample_index": i // len(pairs), "text": answer(i)}))
            f.write("\n")
    return path


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def store_bytes(ws: Workspace, group: str) -> tuple[int, int]:
    files = [p for p in (ws.zarr_path / group).rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files), len(files)


# -- model mode ---------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def gc_pauses():
    """Yields a dict filled, on exit, with the time Python's cyclic garbage collector ran meanwhile (its pauses stop
    every thread; a full collection walks every object, torch.compile's included) and its full collections."""
    found = {"gc_s": 0.0, "gc_full": 0}
    started: list[float] = []

    def callback(phase: str, info: dict) -> None:
        if phase == "start":
            started.append(time.perf_counter())
        elif started:
            found["gc_s"] += time.perf_counter() - started.pop()
            found["gc_full"] += info["generation"] == 2

    gc.callbacks.append(callback)
    try:
        yield found
    finally:
        gc.callbacks.remove(callback)
        found["gc_s"] = round(found["gc_s"], 3)


def model_mode(args) -> dict:
    device = args.device
    t0 = time.perf_counter()
    loaded, answer = load(args)
    load_s = time.perf_counter() - t0
    work = Path(args.dir or tempfile.mkdtemp(prefix="pv-bench-"))
    ws = init_workspace(work / "ws")
    resp_run = ingest(ws, IngestConfig("responses", responses_file(work / "responses.jsonl", args.n, answer))).run_id
    if args.synthetic:  # random weights have no files; their config stands in as the model (provenance only)
        loaded.model.config.save_pretrained(work / "model")
    deflayer = default_layer(loaded.n_layers)
    cases = {
        "layer-eager": ((deflayer,), False),
        "layer-compiled": ((deflayer,), True),
        "all-eager": (tuple(range(loaded.n_layers + 1)), False),
        "all-compiled": (tuple(range(loaded.n_layers + 1)), True),
    }
    chosen = args.case or (list(cases) if device.startswith("cuda") else ["layer-eager", "all-eager"])
    budget = args.max_batch_tokens or (16384 if device.startswith("cuda") else 1024)
    base = ExtractConfig(
        responses_run=resp_run, model=str(work / "model") if args.synthetic else args.model, device=device,
        max_batch_tokens=budget,
        max_batch_size=args.max_batch_size, storage_dtype=args.storage_dtype, writer_threads=args.writer_threads,
    )  # fmt: skip
    # The workload, tokenized as the pipeline does it, and the pipeline's own batches.
    from personavec.store.responses import answered_responses

    records = answered_responses(ws.catalog(), resp_run)
    examples = encode_responses(loaded, [(r.system_prompt, r.question, r.text) for r in records], base)
    rows = longest_first([ex.forward_length for ex in examples])
    plan = ExtractionPlan.build(examples, rows, n_rows=len(examples), chunk_rows=1 << 30, max_batch_tokens=budget,
                                max_batch_size=args.max_batch_size)  # fmt: skip
    ntok = sum(ex.forward_length for ex in plan.examples)
    print(f"device={device} model={loaded.name} n={len(examples)} tokens={ntok} default_layer={deflayer} "
          f"load_s={load_s:.1f} dir={work}", flush=True)  # fmt: skip

    def core(layers, compile_: bool) -> float:
        sync(device)
        with gc_pauses() as pauses:
            t = time.perf_counter()
            for _ in iter_mean_activations(loaded, plan.examples, layers, batches=plan.batches, compile=compile_):
                pass
            sync(device)
            dt = time.perf_counter() - t
        core_gc.append(pauses)
        return dt

    def core_sync(layers, compile_: bool) -> float:
        """The core as it was before double buffering (reproduced here): each batch's means copied to the host and
        waited for before the next batch is prepared and launched."""
        pad_id = loaded.tokenizer.pad_token_id or 0
        sync(device)
        t = time.perf_counter()
        with contextlib.ExitStack() as stack:
            spans = stack.enter_context(capture(loaded, layers))
            if compile_:
                stack.enter_context(compiled_blocks(list(loaded.layers)[: min(max(layers), loaded.n_layers)]))
            stack.enter_context(torch.inference_mode())
            for batch in plan.batches:
                width = max(plan.examples[i].forward_length for i in batch)
                if compile_:
                    width = _padded_width(width, DEFAULT.compile_pad, loaded.model.config)
                means = spans(*_batch_tensors(plan.examples, batch, width, pad_id))
                torch.cat([means[row, :1] for row in range(len(batch))]).cpu()
        sync(device)
        return time.perf_counter() - t

    def pipeline(layers, compile_: bool, inline_max: int | None) -> tuple[float, dict]:
        config = ExtractConfig(**{**base.__dict__, "layers": layers, "compile": compile_})
        tuning = Tuning(plan_inline_max=inline_max) if inline_max is not None else DEFAULT
        sync(device)
        with gc_pauses() as pauses:
            t = time.perf_counter()
            res = run_extraction(ws, config, loaded=loaded, tuning=tuning)
            sync(device)
            dt = time.perf_counter() - t
        size, files = store_bytes(ws, res.zarr_group)
        arrays.remove_groups(ws.zarr_path, [res.zarr_group])  # disk: only one run's rows at a time
        other = dt - sum(res.timings.get(k, 0.0) for k in ("plan_s", "compute_s", "close_s"))
        detail = {**res.timings, "other_s": round(other, 3), **pauses, "mb": round(size / 1e6, 1), "files": files}
        return dt, {**detail, "tok_s": round(ntok / dt, 1)}

    core_gc: list[dict] = []  # the garbage collector's pauses in each core run
    default_inline_max = DEFAULT.plan_inline_max
    # warm-up: kernels and the allocator (the first pipeline repeat still pays the process's first catalog and Zarr use)
    warm = plan.examples[: min(8, len(plan.examples))]
    for _ in iter_mean_activations(loaded, warm, [deflayer], max_batch_tokens=budget):
        pass
    print(f"objects the garbage collector tracks: {len(gc.get_objects()):,}", flush=True)
    out: dict = {}
    for name in chosen:
        layers, compile_ = cases[name]
        if compile_:
            first = core(layers, True)
            print(f"{name}: compiled first pass (compile included) {first:.1f} s", flush=True)
        cores, pipes, details = [], [], []
        others: dict[int, list[float]] = {v: [] for v in args.plan_inline_max[1:]}
        syncs: list[float] = []
        for rep in range(args.repeat):
            if args.sync_core:
                syncs.append(core_sync(layers, compile_))
                print(f"{name} rep {rep}: core one batch at a time (before) {ntok / syncs[-1]:,.0f} tok/s", flush=True)
            cores.append(core(layers, compile_))
            dt, detail = pipeline(layers, compile_, args.plan_inline_max[0])
            pipes.append(dt)
            details.append(detail)
            print(f"{name} rep {rep}: core {ntok / cores[-1]:,.0f} tok/s {core_gc[-1]}, pipeline {ntok / dt:,.0f} "
                  f"tok/s ({1 - cores[-1] / dt:+.1%} overhead) {detail}", flush=True)  # fmt: skip
            for inline_max, times in others.items():  # the same run planned another way, alternated with the first
                dt, detail = pipeline(layers, compile_, inline_max)
                times.append(dt)
                print(f"{name} rep {rep}, plan_inline_max={inline_max}: pipeline {ntok / dt:,.0f} tok/s "
                      f"({1 - cores[-1] / dt:+.1%} overhead) {detail}", flush=True)  # fmt: skip
        best_core, best_pipe = ntok / min(cores), ntok / min(pipes)
        out[name] = {
            "layers": len(layers),
            "core_tok_s": round(best_core, 1),
            "pipeline_tok_s": round(best_pipe, 1),
            "overhead": round(1 - best_pipe / best_core, 4),
            "overhead_median": round(1 - statistics.median(cores) / statistics.median(pipes), 4),
            "core_runs": [round(ntok / c, 1) for c in cores],
            "core_sync_tok_s": round(ntok / min(syncs), 1) if syncs else None,
            "pipeline_runs": [round(ntok / p, 1) for p in pipes],
            "pipeline_detail": details[pipes.index(min(pipes))],
            "plan_inline_max": args.plan_inline_max[0] if args.plan_inline_max[0] is not None else default_inline_max,
            "other_plan_inline_max": {
                str(v): {"pipeline_tok_s": round(ntok / min(t), 1), "overhead": round(1 - min(cores) / min(t), 4)}
                for v, t in others.items()
            },
        }
        print(f"{name}: core {best_core:,.0f} tok/s, pipeline {best_pipe:,.0f} tok/s, overhead "
              f"{out[name]['overhead']:.1%} (median {out[name]['overhead_median']:.1%})", flush=True)  # fmt: skip
    targets = {"all-eager": 0.05, "all-compiled": 0.05, "layer-compiled": 0.03}
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "mode": "model",
        "cases": out,
        "targets_met": {k: out[k]["overhead"] <= v for k, v in targets.items() if k in out},
        "n": len(examples),
        "tokens": ntok,
        "max_batch_tokens": budget,
        "storage_dtype": args.storage_dtype,
        "writer_threads": args.writer_threads,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }


# -- store-only mode ----------------------------------------------------------------------------------------------


def before_loop(plan, array, batches, writer, catalog, run_id, n_layers, d_model) -> None:
    """The writer path as it was before this change (personavec 714be8a), for a same-run baseline: rows copied one
    by one into NaN-filled chunk buffers on the model's thread, whole chunks to one writer thread, the catalog marked
    after every batch in the model's thread."""
    from personavec.store import extraction as xs

    buffers: dict[int, np.ndarray] = {}
    missing: dict[int, int] = {}
    for row in plan.rows:
        missing[row // plan.chunk_rows] = missing.get(row // plan.chunk_rows, 0) + 1
    for batch, values, _ in batches:
        for j, i in enumerate(batch):
            row = plan.rows[i]
            chunk = row // plan.chunk_rows
            buf = buffers.get(chunk)
            if buf is None:
                buf = buffers[chunk] = np.full((plan.chunk_len(chunk), n_layers, d_model), np.nan, dtype=np.float32)
            buf[row - chunk * plan.chunk_rows] = values[j]
            missing[chunk] -= 1
            if not missing[chunk]:
                writer.submit(chunk * plan.chunk_rows, buffers.pop(chunk))
        xs.mark_done(catalog, run_id, writer.written())


def stress_mode(args) -> dict:
    """The writer path under a simulated GPU: real catalog, real Zarr, synthetic batches."""
    import pyarrow as pa
    import zarr

    from personavec.store import extraction as xs
    from personavec.store.responses import answered_responses

    n, n_layers, d_model = args.n, args.stress_layers, args.stress_d_model
    tokens_per_row = args.stress_tokens_per_row
    batch_rows = max(1, args.max_batch_tokens // tokens_per_row if args.max_batch_tokens else 54)
    work = Path(args.dir or tempfile.mkdtemp(prefix="pv-stress-"))
    ws = init_workspace(work / "ws")
    resp_run = ingest(ws, IngestConfig("responses", responses_file(work / "r.jsonl", n, lambda i: f"a{i}"))).run_id
    ids = [r.id for r in answered_responses(ws.catalog(), resp_run)]
    rng = np.random.default_rng(0)
    batch_values = [rng.normal(size=(batch_rows, n_layers, d_model)).astype(np.float32) for _ in range(4)]
    per_batch_s = batch_rows * tokens_per_row / args.gpu_tok_s if args.gpu_tok_s else 0.0
    print(f"stress: {n} rows x {n_layers} layers x {d_model} float32 ({n * n_layers * d_model * 4 / 1e6:,.0f} MB), "
          f"batches of {batch_rows}, simulated GPU {args.gpu_tok_s or 'inf'} tok/s ({per_batch_s * 1e3:.0f} ms/batch)"
          f", dir={work}", flush=True)  # fmt: skip

    def one(layout: str, threads: int, durable: bool = True) -> dict:
        table = pa.table({
            "response_id": pa.array(ids, pa.int64()), "row": pa.array(range(n), pa.int32()),
            "span_start": pa.array([1] * n, pa.int32()), "span_end": pa.array([2] * n, pa.int32()),
            "n_tokens": pa.array([tokens_per_row] * n, pa.int32()), "n_response_tokens": pa.array([1] * n, pa.int32()),
            "truncated": pa.array([False] * n),
        })  # fmt: skip
        run_id = xs.create_extraction_run(
            ws.catalog(), {"stress": layout}, table, zarr_group=arrays.group_name, source_run_id=resp_run,
            model="stress", n_model_layers=n_layers, d_model=d_model, layers=list(range(n_layers)), dtype="bfloat16",
            span_rule="exact", prompt_format="chat", device="cpu", n_examples=n,
        ).run_id  # fmt: skip
        group = arrays.group_name(run_id)
        if layout in ("legacy", "before"):  # personavec before: float32 (rows, 1, d) chunks >= 1 MB, zarr's zstd
            root = zarr.open_group(str(ws.zarr_path), mode="a", zarr_format=3)
            root.create_group(group).create_array(
                arrays.ARRAY_NAME, shape=(n, n_layers, d_model), chunks=(arrays.chunk_rows_for(d_model), 1, d_model),
                dtype="float32", fill_value=np.nan,
            )  # fmt: skip
        else:
            arrays.create_activation_array(ws.zarr_path, run_id, n, n_layers, d_model, dtype=args.storage_dtype)
        array = arrays.open_activation_array(ws.zarr_path, group, "r+")
        per = arrays.rows_per_chunk(array)
        examples = [Rendered([1] * tokens_per_row, [(1, 2)], "") for _ in range(n)]
        plan = ExtractionPlan.build(
            examples, list(range(n)), n_rows=n, chunk_rows=per, max_batch_tokens=batch_rows * tokens_per_row,
            max_batch_size=batch_rows,
        )  # fmt: skip
        slept = [0.0]

        def batches():
            for k, batch in enumerate(plan.batches):
                t = time.perf_counter()
                while time.perf_counter() - t < per_batch_s:  # the GPU computing (the thread waits in a sync)
                    time.sleep(min(0.002, per_batch_s))
                slept[0] += time.perf_counter() - t
                yield batch, batch_values[k % len(batch_values)][: len(batch)], len(batch) * tokens_per_row

        writer = ChunkWriter(array, group, threads=threads)
        t = time.perf_counter()
        if layout == "before":
            before_loop(plan, array, batches(), writer, ws.catalog(), run_id, n_layers, d_model)
            loop_s = time.perf_counter() - t
            writer.close()
            xs.mark_done(ws.catalog(), run_id, writer.written())
            xs.finish_extraction(ws.catalog(), run_id, "done", None, None)
        else:
            marker = DoneMarks(ws.catalog(), run_id)
            assembler = ChunkAssembler(array, n, per, n_layers, d_model, expect=range(n), durable=durable)
            store_batches(assembler, batches(), writer, on_written=marker.add)
            loop_s = time.perf_counter() - t
            writer.close()
            xs.finish_extraction(ws.catalog(), run_id, "done", None, None, marker.drain(writer.written()))
        wall = time.perf_counter() - t
        size, files = store_bytes(ws, group)
        reader = arrays.open_activation_array(ws.zarr_path, group)
        t = time.perf_counter()
        arrays.read_rows(reader, None, n_layers * 2 // 3)  # one layer of every row: what the vector stage reads
        read_s = time.perf_counter() - t
        arrays.remove_groups(ws.zarr_path, [group])
        compute = slept[0]
        res = {
            "layout": layout, "writer_threads": threads, "wall_s": round(wall, 3), "gpu_s": round(compute, 3),
            "lost_s": round(wall - compute, 3), "overhead": round(1 - compute / wall, 4) if compute else None,
            "stall_s": round(writer.stall_s, 3), "drain_s": round(wall - loop_s, 3),
            "store_mb_s": round(size / 1e6 / wall, 1), "mb": round(size / 1e6, 1), "files": files,
            "read_one_layer_s": round(read_s, 3),
        }  # fmt: skip
        res["layout"] = layout = layout if durable or layout == "before" else f"{layout}-no-fsync"
        print(f"{layout:8s} threads={threads}: {res}", flush=True)
        return res

    runs = []
    for _ in range(args.repeat):
        runs.append(one("before", 1))
        runs.append(one("legacy", 1))
        runs.append(one("sharded", args.writer_threads))
        runs.append(one("sharded", args.writer_threads, durable=False))
    if not args.dir:
        shutil.rmtree(work, ignore_errors=True)
    best = {
        layout: min((r for r in runs if r["layout"] == layout), key=lambda r: r["wall_s"])
        for layout in ("before", "legacy", "sharded", "sharded-no-fsync")
    }
    return {
        "mode": "stress", "runs": runs, "best": best, "n": n, "layers": n_layers, "d_model": d_model,
        "batch_rows": batch_rows, "gpu_tok_s": args.gpu_tok_s, "storage_dtype": args.storage_dtype,
        "machine": platform.processor() or platform.machine(),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=414, help="answers (default 414 = 23 personas x 18 questions)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--synthetic", default=None, help="gemma-3-27b (GPU) or tiny (CPU): random weights")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--case", action="append", choices=["layer-eager", "layer-compiled", "all-eager", "all-compiled"])
    ap.add_argument("--max-batch-tokens", type=int, default=None)
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--storage-dtype", default="float32", choices=arrays.STORAGE_DTYPES)
    ap.add_argument("--writer-threads", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--sync-core",
        action="store_true",
        help="also time the core as before double buffering (one batch at a time), alternated",
    )
    ap.add_argument("--plan-inline-max", type=int, nargs="+", default=[None],
                    help="Tuning.plan_inline_max (default: personavec's); more values time the pipeline "
                         "planned each way too, alternated in each repeat (0: rest on a helper thread)")  # fmt: skip
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed at the end)")
    ap.add_argument("--stress", action="store_true", help="store-only: no model, simulated GPU rate")
    ap.add_argument("--gpu-tok-s", type=float, default=8504.0, help="--stress: simulated model rate (0 = no wait)")
    ap.add_argument("--stress-layers", type=int, default=63)
    ap.add_argument("--stress-d-model", type=int, default=5376)
    ap.add_argument("--stress-tokens-per-row", type=int, default=278)
    args = ap.parse_args()
    out = stress_mode(args) if args.stress else model_mode(args)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
