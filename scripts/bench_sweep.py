"""Benchmark: a steering sweep answered in shared batches (``run_sweep``) against the same runs made one at a time
(one ``run_local_generation`` call per coefficient: how sweeps ran before), on one loaded model.

Both sides are real runs: a catalog and Zarr store, answers ingested and extracted at the default layer, a vectors
run, then steered generate runs (greedy, ``--max-tokens`` each) landing in the catalog. Each repeat times the
baseline then the sweep; the last row checks that every run of the sweep has the answers its one-at-a-time twin has.

    CPU: .venv/bin/python scripts/bench_sweep.py                         (the embedded model, float32)
    GPU: PYTHONPATH=. python3 scripts/bench_sweep.py --device cuda --synthetic gemma-3-27b

``--synthetic`` builds random weights (scripts/bench_extract.py's shapes, the word-level tokenizer of
scripts/bench_pipeline.py): the same FLOPs and bytes per step as the real model; its answers are noise, but they are
the same noise on both sides. Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_extract import WORDS  # noqa: E402
from bench_pipeline import build_synthetic, build_tiny, responses_file, word_tokenizer  # noqa: E402

from personavec import PERSONAS  # noqa: E402
from personavec.config import default_layer  # noqa: E402
from personavec.extract import ExtractConfig, run_extraction  # noqa: E402
from personavec.generation.config import GenerateConfig, LocalOptions  # noqa: E402
from personavec.generation.local import run_local_generation, run_sweep  # noqa: E402
from personavec.ingest import IngestConfig, ingest  # noqa: E402
from personavec.steering.interventions import SteeringConfig  # noqa: E402
from personavec.store.responses import answered_responses  # noqa: E402
from personavec.vectors import VectorConfig, compute_vectors  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", default=None, help="gemma-3-27b (GPU) or tiny; default: the embedded model")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--coefs", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0])
    ap.add_argument("--personas", type=int, default=2)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    device = args.device
    work = Path(tempfile.mkdtemp(prefix="pv-bench-sweep-"))

    t0 = time.perf_counter()
    if args.synthetic:
        raw = build_synthetic(args.synthetic, device) if args.synthetic != "tiny" else build_tiny(device)
        model = str(work / "model")  # random weights: their config stands in for the model (provenance)
        raw.model.config.save_pretrained(model)
        loaded = dataclasses.replace(raw, tokenizer=word_tokenizer(), name=model, path=Path(model))
    else:
        from personavec.modeling import load_model
        from personavec.serve import EMBEDDED_MODEL

        model = EMBEDDED_MODEL
        loaded = load_model(model, dtype="float32" if device == "cpu" else "bfloat16", device=device)
    load_s = time.perf_counter() - t0
    if loaded.tokenizer.pad_token_id is None:
        loaded.tokenizer.pad_token_id = loaded.tokenizer.eos_token_id

    # a vectors run to steer with: two personas' answers to every built-in question, extracted at the default layer
    rng = random.Random(0)
    ws = init_workspace(work / "ws")
    answers = responses_file(work / "answers.jsonl", 36, lambda i: " ".join(rng.choice(WORDS) for _ in range(40)))
    responses = ingest(ws, IngestConfig("responses", answers, model=model)).run_id
    layer = default_layer(loaded.n_layers)
    ext = run_extraction(ws, ExtractConfig(responses_run=responses, model=model, layers=(layer,), device=device),
                         loaded=loaded)  # fmt: skip
    vectors = compute_vectors(ws, VectorConfig(ext.run_id)).run_id
    first, second = list(PERSONAS)[:2]
    config = GenerateConfig(
        engine="local",
        model=model,
        personas=tuple(list(PERSONAS)[: args.personas]),
        questions=tuple(range(args.questions)),
        max_tokens=args.max_tokens,
        temperature=0.0,
        local=LocalOptions(device=device, batch_size=args.batch_size),
        steering=SteeringConfig(f"{vectors}:{second}-{first}", layers=(layer,)),
    )
    n_answers = args.personas * args.questions
    print(f"device={device} ({torch.cuda.get_device_name() if device.startswith('cuda') else platform.machine()}) "
          f"model={loaded.name} layers={loaded.n_layers} layer={layer} load_s={load_s:.1f} coefs={args.coefs} "
          f"answers/run={n_answers} batch_size={args.batch_size} max_tokens={args.max_tokens}", flush=True)  # fmt: skip
    # warm-up: one small unsteered run (CUDA context, kernels, allocator)
    run_local_generation(ws, dataclasses.replace(config, steering=None, personas=config.personas[:1], max_tokens=4),
                         loaded=loaded)  # fmt: skip

    rows: list[dict] = []
    pairs: list[tuple[list[int], list[int]]] = []
    steering = config.steering
    assert steering is not None
    for rep in range(args.repeat):
        sync(device)
        t = time.perf_counter()
        alone = [
            run_local_generation(
                ws, dataclasses.replace(config, steering=dataclasses.replace(steering, coef=c)), loaded=loaded
            )
            for c in args.coefs
        ]
        sync(device)
        alone_s = time.perf_counter() - t
        t = time.perf_counter()
        sweep = run_sweep(ws, config, args.coefs, loaded=loaded)
        sync(device)
        sweep_s = time.perf_counter() - t
        pairs.append(([r.run_id for r in alone], [r.run_id for _, r in sweep.runs]))
        for mode, wall, results in (
            ("one run at a time", alone_s, alone),
            ("shared batches", sweep_s, [r for _, r in sweep.runs]),
        ):
            tokens = sum(r.completion_tokens for r in results)
            rows.append(
                {
                    "repeat": rep,
                    "mode": mode,
                    "runs": len(results),
                    "answers": sum(r.answers for r in results),
                    "completion_tokens": tokens,
                    "wall_s": round(wall, 3),
                    "tok_s": round(tokens / wall, 1),
                }
            )

    def texts(run_id: int) -> dict:
        return {(r.persona, r.question): r.text for r in answered_responses(ws.catalog(), run_id)}

    same = sum(texts(a) == texts(b) for one, both in pairs for a, b in zip(one, both, strict=True))
    total = sum(len(one) for one, _ in pairs)
    widths = {"repeat": 6, "mode": 18, "runs": 4, "answers": 7, "tokens": 7, "wall s": 8, "tok/s": 8, "speedup": 8}

    def line(cells) -> str:
        return " ".join(
            f"{c:<{w}}" if h == "mode" else f"{c:>{w}}" for c, (h, w) in zip(cells, widths.items(), strict=True)
        )

    print("\n" + line(widths))
    for row in rows:
        base = next(r for r in rows if r["repeat"] == row["repeat"] and r["mode"] == "one run at a time")
        speedup = f"{base['wall_s'] / row['wall_s']:.2f}x"
        print(line([*list(row.values())[:5], f"{row['wall_s']:.2f}", f"{row['tok_s']:.1f}", speedup]))
    print(f"runs with the same answers both ways: {same}/{total}")
    print(json.dumps({"device": device, "model": loaded.name, "rows": rows, "same_answers": [same, total]}))


if __name__ == "__main__":
    main()
