"""Benchmark: the whole extraction pipeline (``run_extraction`` into a workspace: plan, catalog, Zarr) on 1..N
data-parallel processes, one GPU each, over the same synthetic workload.

GPU: ``python scripts/bench_pipeline_dp.py --synthetic gemma-3-27b --processes 1 2`` builds the gemma-3-27b text
architecture with random bf16 weights in every process (seed 0: the same model everywhere), with a word-level
tokenizer and a ChatML template built in memory, and ingests ``--n`` synthetic conversations (built-in personas and
questions, responses of 120-256 words: prompt ~40-140 tokens, response ~130-280) into a fresh workspace per process
count. One process runs this script as is; N > 1 run it under ``accelerate launch --multi_gpu --num_processes N``.
Timed: ``run_extraction`` on rank 0, from a barrier after every process built its model to its return (every rank
finished, the run marked done). Then the activations of each N are compared with those of the first.
CPU smoke test: ``--synthetic gemma-3-tiny --device cpu --n 512 --chunk-rows 32 --processes 1 2``.
Last line: one JSON object (tok/s per process count, speedup over the first, min cosine of the rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_extract import build_synthetic, synth_response  # noqa: E402

from personavec.extract.launch import free_port, launched_rank  # noqa: E402

RESULT = "BENCH_RESULT "
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def conversations(n: int) -> list[dict]:
    """``n`` responses over the built-in personas x questions (sample_index counts the repeats), seeded."""
    from personavec.builtin import EVAL_QUESTIONS, PERSONAS

    rng = random.Random(0)
    pairs = [(p, q) for p in PERSONAS for q in EVAL_QUESTIONS]
    return [
        {"persona": p, "question": q, "sample_index": i // len(pairs), "text": synth_response(i, rng)}
        for i, (p, q) in ((i, pairs[i % len(pairs)]) for i in range(n))
    ]


def word_tokenizer(texts: list[str]):
    """A fast word-level tokenizer over the workload's words, with ChatML turn markers and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<unk>", "<|im_start|>", "<|im_end|>"]
    words = sorted({w for t in texts for w in re.findall(r"\w+|[^\w\s]+", t)} | {"system", "user", "assistant"})
    vocab = {w: i for i, w in enumerate(specials + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
        additional_special_tokens=specials[3:],
    )  # fmt: skip
    tok.chat_template = CHATML
    return tok


def worker(args: argparse.Namespace) -> None:
    """One process: build the model, (rank 0) make the workspace, then time run_extraction."""
    import logging

    from personavec.builtin import EVAL_QUESTIONS, PERSONAS
    from personavec.config import default_layer
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.ingest import IngestConfig, ingest
    from personavec.workspace import Workspace, init_workspace

    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("personavec.extract.distributed").setLevel(logging.INFO)  # each rank's share and time
    rank, world = launched_rank()
    state = None
    device = args.device
    if world > 1:
        from accelerate import PartialState

        state = PartialState(cpu=device == "cpu")
        device = "cpu" if device == "cpu" else f"cuda:{state.local_process_index}"
    rows = conversations(args.n)
    texts = [r["text"] for r in rows] + list(PERSONAS.values()) + list(EVAL_QUESTIONS)
    t0 = time.perf_counter()
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    loaded = build_synthetic(args.synthetic, device, tokenizer=word_tokenizer(texts), dtype=dtype)
    build_s = time.perf_counter() - t0
    ws = Workspace.resolve(args.workspace)
    responses_run = 0
    if rank == 0:
        ws = init_workspace(args.workspace)
        path = Path(args.workspace) / "responses.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        responses_run = ingest(ws, IngestConfig("responses", path)).run_id
    config = ExtractConfig(
        responses_run=responses_run or None,
        model=loaded.name,
        layers=(args.layer or default_layer(loaded.n_layers),),
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        max_batch_tokens=args.max_batch_tokens,
        chunk_rows=args.chunk_rows,
        compile=args.compile,
    )
    if state is not None:
        state.wait_for_everyone()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    result = run_extraction(ws, config, loaded=loaded)
    wall = time.perf_counter() - t0
    if rank == 0:
        out = {
            "processes": world,
            "wall_s": round(wall, 2),
            "tok_s": round(result.n_tokens / wall, 1),
            "run_tok_s": round(result.tok_s, 1),  # the run's own figure: compute start to every rank finished
            "tokens": result.n_tokens,
            "n": result.n_examples,
            "run_id": result.run_id,
            "build_s": round(build_s, 1),
            "timings": result.timings,  # rank 0's session: plan_s is the time before the shares go out
        }
        print(RESULT + json.dumps(out), flush=True)


def launch(args: argparse.Namespace, n: int, workspace: Path) -> dict:
    """Run the worker in ``n`` processes (``accelerate launch`` when n > 1); its rank-0 result."""
    forwarded = ["--worker", "--workspace", str(workspace), "--synthetic", args.synthetic, "--n", str(args.n)]
    forwarded += ["--device", args.device] + (["--compile"] if args.compile else [])
    forwarded += ["--max-batch-tokens", str(args.max_batch_tokens)] if args.max_batch_tokens else []
    forwarded += ["--layer", str(args.layer)] if args.layer else []
    forwarded += ["--chunk-rows", str(args.chunk_rows)] if args.chunk_rows else []
    cmd = [sys.executable]
    if n > 1:
        cmd += ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(n), "--num_machines", "1"]
        cmd += ["--main_process_port", str(free_port()), "--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += [str(Path(__file__).resolve()), *forwarded]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    print(f"== {n} process(es): {' '.join(cmd)}", flush=True)
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode:
        raise SystemExit(f"{n} process(es) failed with exit code {proc.returncode}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith(RESULT))
    return json.loads(line[len(RESULT) :])


def compare(base: Path, other: Path, run_a: int, run_b: int) -> float:
    """Min cosine between the rows of two workspaces' runs (the same responses: rows by response order)."""
    import numpy as np

    from personavec import arrays
    from personavec.store.extraction import extraction_examples, get_extraction_run
    from personavec.workspace import Workspace

    def by_response(path: Path, run_id: int) -> np.ndarray:
        ws = Workspace.resolve(path)
        table = extraction_examples(ws.catalog(), run_id)
        info = get_extraction_run(ws.catalog(), run_id)
        values = arrays.read_rows(arrays.open_activation_array(ws.zarr_location, info.zarr_group))
        columns = [table[c].to_pylist() for c in ("persona", "question", "sample_index")]
        key = list(zip(*columns, strict=True))
        order = sorted(range(len(key)), key=lambda i: key[i])
        ws.close()
        return values[np.asarray(table["row"].to_pylist())[order]].astype(np.float64)

    a, b = by_response(base, run_a), by_response(other, run_b)
    a, b = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1])
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default="gemma-3-27b", help="gemma-3-27b (GPU) or gemma-3-tiny (CPU smoke test)")
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="process counts to time (one GPU each)")
    ap.add_argument("--n", type=int, default=2048, help="conversations (default 2048)")
    ap.add_argument("--device", default="cuda", help="cuda (a GPU per process) or cpu")
    ap.add_argument("--layer", type=int, default=None, help="layer to extract (default: the seed's 65%%)")
    ap.add_argument("--max-batch-tokens", type=int, default=None, help="token budget (default: 16384 on GPU)")
    ap.add_argument("--chunk-rows", type=int, default=None, help="Zarr rows per chunk (default ~1 MB: 64 for 27B)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the blocks (ExtractConfig.compile)")
    ap.add_argument("--keep", default=None, help="keep the workspaces under this directory")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--workspace", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="bench-dp-"))
    results = {n: launch(args, n, root / f"ws-{n}") for n in args.processes}
    first = args.processes[0]
    base = results[first]
    out = {
        "tok_s": {str(n): r["tok_s"] for n, r in results.items()},
        "speedup": {str(n): round(r["tok_s"] / base["tok_s"], 3) for n, r in results.items()},
        "wall_s": {str(n): r["wall_s"] for n, r in results.items()},
        "min_cos_vs_first": {
            str(n): round(compare(root / f"ws-{first}", root / f"ws-{n}", base["run_id"], r["run_id"]), 6)
            for n, r in results.items()
            if n != first
        },
        "n": base["n"],
        "tokens": base["tokens"],
        "model": f"synthetic:{args.synthetic}",
        "compile": args.compile,
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
    }
    for n, r in results.items():
        print(f"{n} process(es): {r['tok_s']:,.0f} tok/s ({r['wall_s']:.1f} s), {out['speedup'][str(n)]:.2f}x")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
