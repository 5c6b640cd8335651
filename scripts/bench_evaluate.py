"""Benchmark: judging a steering sweep's runs together (``personavec evaluate``) against one after another.

A sweep of ``--coefs`` steered runs (``--personas`` x ``--questions`` answers each) is made on a tiny random llama
(scripts/bench_pipeline.py's; its answers are noise, which a judge scores all the same), in a real workspace. The
judge is a real HTTP server on 127.0.0.1 that answers every request after ``--latency`` seconds (a remote judge's
latency) with a score and its logprobs. Baseline: one ``run_judge`` per run, one after another, each with
``--concurrency`` requests in flight (how ``evaluate`` judged before). Together: ``run_evaluation`` (projections off),
whose judging asks every run's requests in one event loop, ``--concurrency`` in flight across them. Judging time is
from the start to the last judgement landed (the evaluation then computes figures and writes its report). Modes
alternate ``--repeat`` times on fresh judge runs of the same answers.

    .venv/bin/python scripts/bench_evaluate.py [--coefs 8] [--personas 1] [--questions 4] [--latency 0.5]
        [--concurrency 16] [--repeat 2]

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import sys
import tempfile
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_pipeline import build_tiny, word_tokenizer  # noqa: E402

from personavec import EVAL_QUESTIONS, PERSONAS  # noqa: E402
from personavec.generation.config import GenerateConfig, LocalOptions  # noqa: E402
from personavec.generation.local import run_sweep  # noqa: E402
from personavec.judging.judge import JudgeConfig, run_judge  # noqa: E402
from personavec.steering.evaluate import EvaluateConfig, run_evaluation  # noqa: E402
from personavec.steering.interventions import SteeringConfig  # noqa: E402
from personavec.store.steering import get_sweep  # noqa: E402
from personavec.vectors import VectorConfig, compute_vectors  # noqa: E402
from personavec.workspace import init_workspace  # noqa: E402


def judge_server(latency: float) -> tuple[ThreadingHTTPServer, dict]:
    """A chat-completions server answering "60" (with first-token logprobs) after ``latency`` s; counts requests
    and the most in flight at once."""
    lock, seen = threading.Lock(), {"requests": 0, "now": 0, "most": 0}
    alternatives = [
        {"token": t, "logprob": math.log(p), "bytes": list(t.encode())} for t, p in (("60", 0.8), ("70", 0.2))
    ]
    body = json.dumps({
        "id": "c", "object": "chat.completion", "created": 0, "model": "judge",
        "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "60"},
                     "logprobs": {"content": [alternatives[0] | {"top_logprobs": alternatives}]}}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 1, "total_tokens": 101},
    }).encode()  # fmt: skip

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", 0)))
            with lock:
                seen["requests"] += 1
                seen["now"] += 1
                seen["most"] = max(seen["most"], seen["now"])
            time.sleep(latency)
            with lock:
                seen["now"] -= 1
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    return server, seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--coefs", type=int, default=8, help="runs in the sweep")
    ap.add_argument("--personas", type=int, default=1)
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.5)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pv-bench-evaluate-"))

    raw = build_tiny("cpu")
    model = str(work / "model")
    raw.model.config.save_pretrained(model)
    loaded = dataclasses.replace(raw, tokenizer=word_tokenizer(), name=model, path=Path(model))
    ws = init_workspace(work / "ws")
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.ingest import IngestConfig, ingest

    answers = work / "answers.jsonl"
    names = list(PERSONAS)[:2]
    answers.write_text("\n".join(
        json.dumps({"persona": p, "question": q, "text": f"{p} answer {i}"})
        for p in names for i, q in enumerate(EVAL_QUESTIONS[:2])
    ))  # fmt: skip
    responses = ingest(ws, IngestConfig("responses", answers, model=model)).run_id
    ext = run_extraction(ws, ExtractConfig(responses_run=responses, model=model, layers=(2,)), loaded=loaded)
    vectors = compute_vectors(ws, VectorConfig(ext.run_id)).run_id
    config = GenerateConfig(
        engine="local", model=model, personas=tuple(list(PERSONAS)[: args.personas]),
        questions=tuple(range(args.questions)), max_tokens=8, temperature=0.0,
        local=LocalOptions(device="cpu", batch_size=64),
        steering=SteeringConfig(f"{vectors}:{names[1]}-{names[0]}", layers=(2,)),
    )  # fmt: skip
    sweep = run_sweep(ws, config, [float(c) for c in range(args.coefs)], loaded=loaded).sweep_id
    runs = [r.run_id for r in get_sweep(ws.catalog(), sweep).runs]
    server, seen = judge_server(args.latency)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1"
    rubrics = ("jester", "coherence")
    print(f"{platform.machine()}: a sweep of {len(runs)} runs x {args.personas * args.questions} answers x "
          f"{len(rubrics)} rubrics = {len(runs) * args.personas * args.questions * len(rubrics)} judge requests, "
          f"{args.latency:g} s each, concurrency {args.concurrency}", flush=True)  # fmt: skip

    def one_after_another() -> float:
        from personavec.judging.rubrics import BUILTIN_RUBRICS, trait_rubric

        trait, coherence = trait_rubric("jester", "Jokes."), BUILTIN_RUBRICS["coherence"]
        start = time.perf_counter()
        for run in runs:
            run_judge(ws, JudgeConfig(run, (trait, coherence), model="judge", base_url=url,
                                      concurrency=args.concurrency))  # fmt: skip
        return time.perf_counter() - start

    def together() -> float:
        start, last = time.perf_counter(), [0.0]

        def progress(p) -> None:
            if p.step == "judge":
                last[0] = time.perf_counter()

        evaluation = EvaluateConfig(
            sweep=sweep, trait="jester", trait_description="Jokes.", judge_model="judge", judge_base_url=url,
            judge_concurrency=args.concurrency, projection=False,
        )  # fmt: skip
        run_evaluation(ws, evaluation, progress=progress)
        return last[0] - start

    rows = []
    for rep in range(args.repeat):
        for mode, fn in (("one run after another", one_after_another), ("together", together)):
            seen.update(requests=0, most=0)
            wall = fn()
            rows.append({"repeat": rep, "mode": mode, "judge_s": round(wall, 2), "requests": seen["requests"],
                         "most_in_flight": seen["most"]})  # fmt: skip
    server.shutdown()
    print("| mode | judging s (each repeat) | requests | most in flight |")
    print("|---|---:|---:|---:|")
    best = {}
    for mode in ("one run after another", "together"):
        mine = [r for r in rows if r["mode"] == mode]
        best[mode] = min(r["judge_s"] for r in mine)
        walls = ", ".join(f"{r['judge_s']:.2f}" for r in mine)
        most = max(r["most_in_flight"] for r in mine)
        print(f"| {mode} | {best[mode]:.2f} ({walls}) | {mine[0]['requests']} | {most} |")
    print(f"together: {best['one run after another'] / best['together']:.2f}x faster")
    print(json.dumps({"rows": rows, "best": best}))


if __name__ == "__main__":
    main()
