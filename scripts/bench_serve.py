"""Benchmark: the steering server (`personavec serve`) steered and unsteered, `transformers serve`, and HF `generate`.

Workload: ``--requests`` chat requests sent at once (persona x question prompts of the built-in sets), greedy,
``max_tokens`` each, every answer exactly ``max_tokens`` long: ``ignore_eos`` on our server, end-of-sequence disabled
(``eos_token_id: -1`` in the request's ``generation_config``) on `transformers serve`, and ``eos_token_id=-1`` in HF
``generate``, so every row does the same work (random weights do not end their answers reliably). Rows:

- personavec serve, unsteered: no interventions;
- personavec serve, steered: every request its own vector (a random inline direction, ``add`` at the model's default
  layer, a small coefficient), so the batch mixes ``--requests`` different interventions;
- HF generate (batch): ``model.generate`` on all the prompts as one left-padded batch (no server, no TTFT);
- one decoding step over all the prompts (cached), without and with a per-row vector applied as the server's hook
  applies it, interleaved, median: the cost of steering itself, without the HTTP and client noise;
- transformers serve: the same requests, unsteered, last (its continuous batching may change the model's attention
  implementation). On a named model, `transformers serve MODEL` in its own process (its default, sequential
  ``generate`` per request). On ``--synthetic``, transformers' own serving app (the model manager, chat handler and
  FastAPI app that `transformers serve` builds, transformers 5.17's layout) in this process on a uvicorn thread with
  the already-built model put in its model cache (a 27B random model cannot be saved to the device's disk), with
  ``--hf-serve-mode cb`` (default: `transformers serve --continuous-batching`, its batched engine) or ``sequential``.
  Its tokens/s counts the tokens that arrived within ``--limit-s``.

Requests are streamed (SSE) by one asyncio ``openai`` client: TTFT is the time from sending a request to its first
content chunk (p50 and p90 over requests), tokens/s the completion tokens of all requests over the wall time from
the first send to the last answer. Our server runs on a thread of this process (model thread + HTTP thread), so the
client shares the CPU with it. Steered and unsteered rows alternate (``--repeats`` each) and the best of each is
kept, to damp a shared machine's noise; ``load_avg`` is printed.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_serve.py [--model smollm2-135m-instruct] [--requests 64]
        [--max-tokens 32] [--repeats 2] [--device cpu] [--threads 1] [--no-transformers-serve]

GPU, the gemma-3-27b architecture with random bf16 weights (scripts/bench_extract.py's ``build_synthetic``) and the
embedded model's tokenizer (its ids fit Gemma's vocabulary; save it once with ``--save-tokenizer DIR`` where the
embedded model is, and carry DIR to a machine without it):

    python scripts/bench_serve.py --synthetic gemma-3-27b --device cuda --tokenizer DIR --max-tokens 128

Prints a table; the last line is one JSON object with the figures, also written to ``$OUT/bench_serve.json`` when
the environment variable ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import torch

from personavec.builtin import EVAL_QUESTIONS, PERSONAS
from personavec.config import default_layer
from personavec.generation.local import prompt_ids
from personavec.modeling import load_model
from personavec.serve import EMBEDDED_MODEL, local_server
from personavec.serving.app import ServeConfig, running_server

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_extract import SYNTHETIC, build_synthetic  # noqa: E402


def _prompts(n: int) -> list[tuple[str, str]]:
    pairs = [(s, q) for q in EVAL_QUESTIONS for s in PERSONAS.values()]
    return [pairs[i % len(pairs)] for i in range(n)]


async def _one(client, model: str, system: str, question: str, extra: dict, max_tokens: int, got: list) -> None:
    """One streamed request; appends ``[ttft, tokens]`` to ``got`` and updates it as chunks arrive (a cut-off
    workload keeps what came)."""
    t0 = time.perf_counter()
    entry: list[Any] = [None, 0]  # [ttft s or None, tokens]
    got.append(entry)
    stream = await client.chat.completions.create(
        model=model,
        messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body=extra,
    )
    async for chunk in stream:
        if any(c.delta.content for c in chunk.choices):
            if entry[0] is None:
                entry[0] = time.perf_counter() - t0
            entry[1] += 1  # about one token per content chunk; replaced by usage at the end
        if chunk.usage is not None:
            entry[1] = chunk.usage.completion_tokens


async def _workload(base_url: str, model: str, prompts, extras, max_tokens: int, limit_s: float | None = None) -> dict:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=3600)
    got: list = []
    t0 = time.perf_counter()
    tasks = [
        asyncio.ensure_future(_one(client, model, s, q, e, max_tokens, got))
        for (s, q), e in zip(prompts, extras, strict=True)
    ]
    done, pending = await asyncio.wait(tasks, timeout=limit_s)
    wall = time.perf_counter() - t0
    for task in pending:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    ttft = sorted(e[0] if e[0] is not None else math.inf for e in got)
    tokens = sum(e[1] for e in got)
    return {
        "tokens": tokens,
        "wall_s": wall,
        "tok_s": tokens / wall,
        "ttft_p50_s": statistics.median(ttft),
        "ttft_p90_s": ttft[int(0.9 * (len(ttft) - 1))],
        "finished": len(done),
        "requests": len(tasks),
    }


@contextmanager
def _transformers_serve_in_process(model, tokenizer, name: str, *, continuous_batching: bool):
    """Transformers' own serving app (what `transformers serve` builds: model manager, generation state, handlers,
    FastAPI app; transformers 5.17's layout) on a uvicorn thread, with ``model`` already in its model cache under
    ``name``. Yields the base URL."""
    import transformers
    import uvicorn
    from transformers.cli.serving import model_manager

    if not hasattr(model_manager, "TimedModel"):  # 5.2x runs each model in a process of its own: no model passed in
        raise RuntimeError(
            f"this baseline follows transformers 5.17's serving app (the GPU machine's); transformers "
            f"{transformers.__version__} has another: pass --model NAME to time a `transformers serve` process instead"
        )
    # mypy checks this against the transformers installed here: the 5.17 names below are ignored where they differ
    from transformers.cli.serving.chat_completion import ChatCompletionHandler
    from transformers.cli.serving.completion import CompletionHandler
    from transformers.cli.serving.model_manager import ModelManager, TimedModel  # type: ignore[attr-defined]
    from transformers.cli.serving.response import ResponseHandler
    from transformers.cli.serving.server import build_server
    from transformers.cli.serving.transcription import TranscriptionHandler
    from transformers.cli.serving.utils import GenerationState
    from transformers.utils import logging

    from personavec.serve import free_port

    logging.set_verbosity_error()  # not a line per request
    manager = ModelManager(device=str(model.device), dtype="auto", model_timeout=-1)  # type: ignore[call-arg]
    # Where load_model_and_processor looks first: the model is "loaded" (timeout -1: never unloaded).
    manager.loaded_models[manager.process_model_name(name)] = TimedModel(  # type: ignore[attr-defined]
        model, timeout_seconds=-1, processor=tokenizer
    )
    state = GenerationState(continuous_batching=continuous_batching)
    app = build_server(
        manager,
        ChatCompletionHandler(model_manager=manager, generation_state=state),
        completion_handler=CompletionHandler(model_manager=manager, generation_state=state),
        response_handler=ResponseHandler(model_manager=manager, generation_state=state),
        transcription_handler=TranscriptionHandler(manager, state),  # type: ignore[call-arg]
        generation_state=state,
    )  # type: ignore[call-arg]
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, name="transformers-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise SystemExit("transformers' serving app did not start")
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.shutdown()  # type: ignore[attr-defined]


def _hf_generate(loaded, prompts, max_tokens: int) -> dict:
    """``model.generate`` on all the prompts as one left-padded batch, greedy, end-of-sequence disabled (every row
    generates ``max_tokens``)."""
    ids = [prompt_ids(loaded.tokenizer, s, q) for s, q in prompts]
    pad = loaded.tokenizer.pad_token_id if loaded.tokenizer.pad_token_id is not None else 0
    width = max(map(len, ids))
    x = torch.full((len(ids), width), pad, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = loaded.input_device

    def run(n: int, rows: int) -> int:
        with torch.inference_mode():
            out = loaded.model.generate(
                input_ids=x[:rows].to(device), attention_mask=mask[:rows].to(device), max_new_tokens=n,
                do_sample=False, eos_token_id=-1, pad_token_id=pad, use_cache=True,
            )  # fmt: skip
        return (out.shape[1] - width) * rows

    run(4, min(4, len(ids)))  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    tokens = run(max_tokens, len(ids))
    _sync(device)
    wall = time.perf_counter() - t0
    return {"tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50_s": None, "ttft_p90_s": None}


def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _load_avg() -> float:
    return os.getloadavg()[0]


def _step_cost(loaded, prompts, layer: int, coef: float, repeats: int = 6) -> tuple[float, float]:
    """Median seconds of one cached decoding step over all the prompts, without and with a per-row ``add`` at
    ``layer`` applied the way the server's hook applies it (``apply_rows`` with ``[B, d]`` tensors), interleaved."""
    from transformers import DynamicCache

    from personavec.steering.interventions import apply_rows

    ids = [prompt_ids(loaded.tokenizer, s, q) for s, q in prompts]
    width, b, d = max(map(len, ids)), len(ids), loaded.d_model
    x = torch.full((b, width), loaded.tokenizer.pad_token_id or 0)
    mask = torch.zeros((b, width + 1), dtype=torch.long)
    for i, p in enumerate(ids):
        x[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    import inspect

    device = loaded.input_device
    x, mask = x.to(device), mask.to(device)
    kw = "cache" if "cache" in inspect.signature(loaded.model.forward).parameters else "past_key_values"
    cache = DynamicCache()  # full layers, as the server's (a sliding-window layer cannot be cropped)
    with torch.inference_mode():
        loaded.model(input_ids=x, attention_mask=mask[:, :-1], use_cache=True, logits_to_keep=1, **{kw: cache})
    dev = next(loaded.layers[layer - 1].parameters()).device
    units = torch.nn.functional.normalize(torch.randn(b, d, device=dev), dim=-1)
    args = (units, units * coef, torch.zeros(b, device=dev), torch.full((b,), math.inf, device=dev))
    on = [False]

    def hook(module, inputs, output):
        if not on[0]:
            return None
        h = output[0] if isinstance(output, tuple) else output
        y = apply_rows(h.float(), *args).to(h.dtype)
        return (y, *output[1:]) if isinstance(output, tuple) else y

    handle = loaded.layers[layer - 1].register_forward_hook(hook)
    positions = mask.sum(-1, keepdim=True) - 1
    times: dict[bool, list[float]] = {False: [], True: []}
    try:
        for i in range(2 * repeats + 2):
            on[0] = bool(i % 2)
            _sync(device)
            t0 = time.perf_counter()
            with torch.inference_mode():
                loaded.model(input_ids=x[:, -1:], attention_mask=mask, position_ids=positions, **{kw: cache})
            _sync(device)
            if i >= 2:
                times[on[0]].append(time.perf_counter() - t0)
            cache.crop(-1)
    finally:
        handle.remove()
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--synthetic", default=None, choices=sorted(SYNTHETIC),
                    help="a random-weight Gemma 3 shape (bench_extract.py) instead of --model")  # fmt: skip
    ap.add_argument("--tokenizer", default=None,
                    help="with --synthetic: a tokenizer directory (default: the embedded model's)")  # fmt: skip
    ap.add_argument("--save-tokenizer", default=None, metavar="DIR",
                    help="save the embedded model's tokenizer (chat template included) to DIR and exit")  # fmt: skip
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--coef", type=float, default=0.5, help="coefficient of each request's unit direction")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="of --model (a --synthetic model is bfloat16)")
    ap.add_argument("--no-transformers-serve", action="store_true")
    ap.add_argument("--hf-serve-mode", choices=("cb", "sequential"), default="cb",
                    help="with --synthetic: transformers serve with continuous batching (its batched engine) or "
                         "its default sequential generate per request")  # fmt: skip
    ap.add_argument(
        "--limit-s",
        type=float,
        default=600.0,
        help="stop waiting for transformers serve after this long (its row then counts the tokens that arrived)",
    )
    ap.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads here and in transformers serve (OMP_NUM_THREADS); on a "
        "shared, oversubscribed CPU one thread is several times faster than two",
    )
    args = ap.parse_args()
    if args.save_tokenizer:
        from transformers import AutoTokenizer

        from personavec.modeling import local_model_path

        AutoTokenizer.from_pretrained(local_model_path(EMBEDDED_MODEL)).save_pretrained(args.save_tokenizer)
        print(f"saved the tokenizer of {EMBEDDED_MODEL} to {args.save_tokenizer}")
        return
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the transformers serve process
    started = time.perf_counter()

    if args.synthetic:
        from transformers import AutoTokenizer

        from personavec.modeling import local_model_path

        tok = AutoTokenizer.from_pretrained(args.tokenizer or local_model_path(EMBEDDED_MODEL))
        loaded = build_synthetic(args.synthetic, args.device, tokenizer=tok)
        name = f"{args.synthetic}-random"  # no ":" (transformers serve reads "repo:file.gguf" as a GGUF file)
        args.dtype = "bfloat16"
    else:
        loaded = load_model(args.model, dtype=args.dtype, device=args.device)
        name = args.model
    built_s = time.perf_counter() - started
    prompts = _prompts(args.requests)
    layer = default_layer(loaded.n_layers)
    rng = np.random.default_rng(0)
    plain = [{"ignore_eos": True}] * args.requests
    steered = []
    for _ in range(args.requests):
        v = rng.normal(size=loaded.d_model)
        steered.append(
            {
                "ignore_eos": True,
                "interventions": [{"vector": (v / np.linalg.norm(v)).tolist(), "layers": [layer], "coef": args.coef}],
            }  # fmt: skip
        )
    rows: dict[str, dict] = {}
    head = f"{'':42} {'tokens':>7} {'done':>7} {'wall s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'load':>5}"
    where = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "?"
    print(f"{name} ({loaded.dtype}) on {args.device} ({where}, {args.threads} torch threads, built in "
          f"{built_s:.0f} s): {args.requests} concurrent requests x {args.max_tokens} tokens, greedy, "
          f"steering layer {layer}", flush=True)  # fmt: skip
    print(head, flush=True)

    def show(label: str, r: dict) -> None:
        ttft = [f"{r[k]:9.2f}" if r[k] is not None else f"{'-':>9}" for k in ("ttft_p50_s", "ttft_p90_s")]
        done = f"{r.get('finished', args.requests)}/{r.get('requests', args.requests)}"
        print(f"{label:42} {r['tokens']:7d} {done:>7} {r['wall_s']:8.2f} {r['tok_s']:8.1f} {ttft[0]} {ttft[1]} "
              f"{r['load_avg']:5.1f}", flush=True)  # fmt: skip

    cfg = ServeConfig(model=name, max_batch=args.requests, max_tokens=args.max_tokens, device=args.device)
    with running_server(cfg, loaded=loaded) as server:
        asyncio.run(_workload(server.base_url, server.model, prompts[:4], plain[:4], 4))  # warm-up
        asyncio.run(_workload(server.base_url, server.model, prompts, steered, 4))  # every batch size, steered
        for _ in range(args.repeats):
            for label, extras in (("personavec serve, unsteered", plain), ("personavec serve, steered", steered)):
                got = asyncio.run(_workload(server.base_url, server.model, prompts, extras, args.max_tokens))
                got["load_avg"] = _load_avg()
                show(label + " (run)", got)
                if label not in rows or got["tok_s"] > rows[label]["tok_s"]:
                    rows[label] = got
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()  # what our server's cache held goes back before the next engine sizes its own

    rows["HF generate (one batch)"] = _hf_generate(loaded, prompts, args.max_tokens)
    rows["HF generate (one batch)"]["load_avg"] = _load_avg()
    show("HF generate (one batch)", rows["HF generate (one batch)"])

    plain_step, steered_step = _step_cost(loaded, prompts, layer, args.coef)
    ratio = steered_step / plain_step
    print(f"one decoding step of {args.requests} rows: {plain_step * 1000:.1f} ms unsteered, "
          f"{steered_step * 1000:.1f} ms with {args.requests} per-row vectors ({ratio:.3f})", flush=True)  # fmt: skip
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()

    hf_error = None
    if not args.no_transformers_serve:
        label = "transformers serve"
        try:
            if args.synthetic:
                label += " (continuous batching)" if args.hf_serve_mode == "cb" else " (sequential)"
                served = _transformers_serve_in_process(
                    loaded.model, loaded.tokenizer, name, continuous_batching=args.hf_serve_mode == "cb"
                )
                model_name = name
            else:
                served = local_server(args.model, device=args.device)
            with served as srv:
                base_url = srv if isinstance(srv, str) else srv.base_url
                model_name = name if isinstance(srv, str) else srv.model
                gen = json.dumps({"max_new_tokens": args.max_tokens, "do_sample": False, "eos_token_id": -1})
                extra = [{"generation_config": gen}] * args.requests
                asyncio.run(_workload(base_url, model_name, prompts[:4], extra[:4], 4, args.limit_s))  # warm-up
                got = asyncio.run(_workload(base_url, model_name, prompts, extra, args.max_tokens, args.limit_s))
            got["load_avg"] = _load_avg()
            rows[label] = got
            show(label, got)
        except Exception as exc:  # the other rows stand; say why this one is missing
            hf_error = f"{type(exc).__name__}: {exc}"
            print(f"{label} failed: {hf_error}", flush=True)

    print("best of each:")
    for label, r in rows.items():
        show(label, r)
    s, u = rows["personavec serve, steered"], rows["personavec serve, unsteered"]
    print(f"steered / unsteered throughput: {s['tok_s'] / u['tok_s']:.3f}")
    hf = next((r for k, r in rows.items() if k.startswith("transformers serve")), None)
    if hf is not None:
        print(f"unsteered / transformers serve throughput: {u['tok_s'] / hf['tok_s']:.3f}")
    result = {
        "model": name, "synthetic": args.synthetic, "device": args.device, "device_name": where,
        "dtype": str(loaded.dtype), "requests": args.requests, "max_tokens": args.max_tokens, "layer": layer,
        "rows": rows, "step_s": {"unsteered": plain_step, "steered": steered_step},
        "steered_over_unsteered": s["tok_s"] / u["tok_s"],
        "unsteered_over_transformers_serve": u["tok_s"] / hf["tok_s"] if hf is not None else None,
        "transformers_serve_error": hf_error, "total_s": time.perf_counter() - started,
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__},
    }  # fmt: skip
    line = json.dumps(result)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_serve.json").write_text(line + "\n")
    print(line)


if __name__ == "__main__":
    main()
