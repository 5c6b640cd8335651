"""Benchmark: the steering server (`personavec serve`) steered and unsteered, `transformers serve`, and HF `generate`.

Workload: ``--requests`` chat requests sent at once (persona x question prompts of the built-in sets), greedy,
``max_tokens`` each with ``ignore_eos`` on our server (every answer is exactly ``max_tokens`` long, so steered and
unsteered runs generate the same number of tokens). Rows:

- personavec serve, unsteered: no interventions;
- personavec serve, steered: every request its own vector (a random inline direction, ``add`` at the model's default
  layer, a small coefficient), so the batch mixes ``--requests`` different interventions;
- transformers serve: the same requests, unsteered (it has no ``ignore_eos``: answers may end early; tokens/s
  counts what it generated);
- HF generate (batch): ``model.generate`` on all the prompts as one left-padded batch (no server, no TTFT);
- one decoding step over all the prompts (cached), without and with a per-row vector applied as the server's hook
  applies it, interleaved, median: the cost of steering itself, without the HTTP and client noise.

Requests are streamed (SSE) by one asyncio ``openai`` client: TTFT is the time from sending a request to its first
content chunk (p50 and p90 over requests), tokens/s the completion tokens of all requests over the wall time from
the first send to the last answer. Our server runs on a thread of this process (model thread + HTTP thread), so the
client shares the CPU with it; `transformers serve` runs in its own process. Steered and unsteered rows alternate
(``--repeats`` each) and the best of each is kept, to damp a shared machine's noise; ``load_avg`` is printed.

    PYTHONPATH=$PWD .venv/bin/python scripts/bench_serve.py [--model smollm2-135m-instruct] [--requests 64]
        [--max-tokens 32] [--repeats 2] [--device cpu] [--threads 1] [--no-transformers-serve]

Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import statistics
import time

import numpy as np
import openai
import torch

from personavec.builtin import EVAL_QUESTIONS, PERSONAS
from personavec.config import default_layer
from personavec.generation.local import generate_batch, prompt_ids
from personavec.modeling import load_model
from personavec.serve import EMBEDDED_MODEL, local_server
from personavec.serving.app import ServeConfig, running_server


def _prompts(n: int) -> list[tuple[str, str]]:
    pairs = [(s, q) for q in EVAL_QUESTIONS for s in PERSONAS.values()]
    return [pairs[i % len(pairs)] for i in range(n)]


async def _one(client, model: str, system: str, question: str, extra: dict, max_tokens: int, got: list) -> None:
    """One streamed request; appends ``[ttft, tokens]`` to ``got`` and updates it as chunks arrive (a cut-off
    workload keeps what came)."""
    t0 = time.perf_counter()
    entry = [None, 0]
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
    cache = DynamicCache(config=loaded.model.config)
    with torch.inference_mode():
        loaded.model(input_ids=x, attention_mask=mask[:, :-1], cache=cache, use_cache=True, logits_to_keep=1)
    units = torch.nn.functional.normalize(torch.randn(b, d), dim=-1)
    args = (units, units * coef, torch.zeros(b), torch.full((b,), math.inf))
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
            t0 = time.perf_counter()
            with torch.inference_mode():
                loaded.model(input_ids=x[:, -1:], attention_mask=mask, position_ids=positions, cache=cache)
            if i >= 2:
                times[on[0]].append(time.perf_counter() - t0)
            cache.crop(-1)
    finally:
        handle.remove()
    return statistics.median(times[False]), statistics.median(times[True])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=EMBEDDED_MODEL)
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--coef", type=float, default=0.5, help="coefficient of each request's unit direction")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-transformers-serve", action="store_true")
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
    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # the transformers serve process

    loaded = load_model(args.model, dtype=args.dtype, device=args.device)
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
    head = f"{'':32} {'tokens':>7} {'done':>7} {'wall s':>8} {'tok/s':>8} {'TTFT p50':>9} {'TTFT p90':>9} {'load':>5}"
    print(f"{args.model} on {args.device} ({args.threads} torch threads, {platform.processor() or '?'}): "
          f"{args.requests} concurrent requests x {args.max_tokens} tokens, greedy", flush=True)  # fmt: skip
    print(head, flush=True)

    def show(name: str, r: dict) -> None:
        ttft = [f"{r[k]:9.2f}" if r[k] is not None else f"{'-':>9}" for k in ("ttft_p50_s", "ttft_p90_s")]
        done = f"{r.get('finished', args.requests)}/{r.get('requests', args.requests)}"
        print(f"{name:32} {r['tokens']:7d} {done:>7} {r['wall_s']:8.2f} {r['tok_s']:8.1f} {ttft[0]} {ttft[1]} "
              f"{r['load_avg']:5.1f}", flush=True)  # fmt: skip

    cfg = ServeConfig(model=args.model, max_batch=args.requests, max_tokens=args.max_tokens, device=args.device)
    with running_server(cfg, loaded=loaded) as server:
        asyncio.run(_workload(server.base_url, server.model, prompts[:4], plain[:4], 4))  # warm-up
        for _ in range(args.repeats):
            for name, extras in (("personavec serve, unsteered", plain), ("personavec serve, steered", steered)):
                got = asyncio.run(_workload(server.base_url, server.model, prompts, extras, args.max_tokens))
                got["load_avg"] = os.getloadavg()[0]
                show(name + " (run)", got)
                if name not in rows or got["tok_s"] > rows[name]["tok_s"]:
                    rows[name] = got

    if not args.no_transformers_serve:
        with local_server(args.model, device=args.device) as server:
            asyncio.run(_workload(server.base_url, server.model, prompts[:4], [{}] * 4, 4))
            got = asyncio.run(
                _workload(server.base_url, server.model, prompts, [{}] * args.requests, args.max_tokens, args.limit_s)
            )
            got["load_avg"] = os.getloadavg()[0]
            rows["transformers serve"] = got
            show("transformers serve", got)

    ids = [prompt_ids(loaded.tokenizer, s, q) for s, q in prompts]
    generate_batch(loaded, ids[:4], max_new_tokens=4)
    t0 = time.perf_counter()
    outs = generate_batch(loaded, ids, max_new_tokens=args.max_tokens)
    wall = time.perf_counter() - t0
    tokens = sum(g.completion_tokens for g in outs)
    rows["HF generate (one batch)"] = {
        "tokens": tokens, "wall_s": wall, "tok_s": tokens / wall, "ttft_p50_s": None, "ttft_p90_s": None,
        "load_avg": os.getloadavg()[0],
    }  # fmt: skip
    show("HF generate (one batch)", rows["HF generate (one batch)"])

    plain_step, steered_step = _step_cost(loaded, prompts, layer, args.coef)
    ratio = steered_step / plain_step
    print(f"one decoding step of {args.requests} rows: {plain_step * 1000:.1f} ms unsteered, "
          f"{steered_step * 1000:.1f} ms with {args.requests} per-row vectors ({ratio:.3f})")  # fmt: skip
    print("best of each:")
    for name, r in rows.items():
        show(name, r)
    s, u = rows["personavec serve, steered"], rows["personavec serve, unsteered"]
    print(f"steered / unsteered throughput: {s['tok_s'] / u['tok_s']:.3f}")
    print(json.dumps({"model": args.model, "device": args.device, "requests": args.requests,
                      "max_tokens": args.max_tokens, "rows": rows,
                      "step_s": {"unsteered": plain_step, "steered": steered_step}}))  # fmt: skip


if __name__ == "__main__":
    main()
