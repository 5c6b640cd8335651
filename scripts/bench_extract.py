"""Benchmark: personavec's batched, truncated extraction vs the seed-style loop, in one process.

CPU (default): the embedded model, 414 conversations (23 built-in personas x 18 questions) with deterministic
synthetic responses of ~150-250 tokens (``--n`` for fewer). GPU: ``--device cuda --synthetic gemma-3-27b`` builds the
gemma-3-27b text architecture with random bf16 weights (as ../shared/bench/gpu_baseline.py) and uses its tokenizer-free
workload (token ids), with the embedded tokenizer's chat template spans replaced by prompt/response lengths.

The seed-style reference: one example per forward, all layers, ``output_hidden_states=True``, mean over the span.
``--compile`` also times the regionally compiled path (``ExtractConfig.compile``) after the eager one, in the same
process: a first pass over the whole workload (compile included), then steady-state passes for each
``--compile-setting BUDGET:BATCH_SIZE:PAD_TO`` (``--repeat`` times each); ``--profile`` prints the top GPU kernels
of one more pass of the best setting.
Last line: one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# The compute core imports no catalog stack (tests/test_extract.py::test_core_imports_without_the_catalog_stack), so
# this runs on a GPU box with only torch and transformers once `import personavec` itself is light too.
from personavec.config import default_layer  # noqa: E402
from personavec.extract.core import mean_activations  # noqa: E402
from personavec.spans import Rendered, conversation, render  # noqa: E402
from personavec.tuning import DEFAULT  # noqa: E402

WORDS = (
    "the of and to in is that it as for with was on be by this are from or have an they which one you were all "
    "we can her has there been if more when will would who so no about out up into them some could him time only "
    "new like than also other how first our over well even because most these any through where much should"
).split()


def synth_response(i: int, rng: random.Random) -> str:
    n = rng.randint(120, 200)  # ~150-250 tokens with punctuation
    words = [rng.choice(WORDS) for _ in range(n)]
    for k in range(0, n, rng.randint(8, 14)):
        words[k] = words[k].capitalize()
        if k:
            words[k - 1] += "."
    return f"Response {i}: " + " ".join(words) + "."


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def seed_style(model, examples: list[Rendered], layers: list[int], device: str) -> torch.Tensor:
    rows = []
    with torch.inference_mode():
        for ex in examples:
            hs = model(input_ids=torch.tensor([ex.input_ids], device=device), output_hidden_states=True).hidden_states
            s, e = ex.assistant_spans[0]
            rows.append(torch.stack([hs[layer][0, s:e].float().mean(0) for layer in layers]).cpu())
    return torch.stack(rows)


#: Random-weight Gemma-3 text shapes: the 27B (GPU benchmarks) and a tiny one that runs the same code on a CPU.
SYNTHETIC: dict[str, dict[str, Any]] = {
    "gemma-3-27b": dict(
        hidden_size=5376, intermediate_size=21504, num_hidden_layers=62, num_attention_heads=32,
        num_key_value_heads=16, head_dim=128, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=168,
    ),
    "gemma-3-tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, vocab_size=262208, sliding_window=1024, query_pre_attn_scalar=16,
    ),
}  # fmt: skip


def build_synthetic(name: str, device: str, tokenizer=None, dtype=torch.bfloat16):
    """The named SYNTHETIC shape with random weights (seed 0: every process builds the same model) on ``device``;
    ``tokenizer`` defaults to a stub with pad/eos ids only (for workloads of token ids)."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    from personavec.modeling import LoadedModel, decoder_layers

    if name not in SYNTHETIC:
        raise SystemExit(f"unknown synthetic model {name} (known: {', '.join(SYNTHETIC)})")
    cfg = Gemma3TextConfig(**SYNTHETIC[name])
    torch.manual_seed(0)
    torch.set_default_dtype(dtype)
    with torch.device(device):
        model = Gemma3ForCausalLM._from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    torch.set_default_dtype(torch.float32)
    model.eval()

    class _Tok:
        pad_token_id = 0
        eos_token_id = 1

    return LoadedModel(
        name=f"synthetic:{name}", path=Path("."), model=model, tokenizer=tokenizer or _Tok(),
        layers=decoder_layers(model), n_layers=cfg.num_hidden_layers, d_model=cfg.hidden_size,
        architecture="Gemma3ForCausalLM", revision=None, device=device, dtype=dtype, layers_path="model.layers",
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=414, help="conversations (default 414 = 23 personas x 18 questions)")
    ap.add_argument("--n-seed", type=int, default=None, help="conversations for the seed-style loop (default: --n)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--synthetic", default=None, help="gemma-3-27b: random-weight 27B architecture (GPU)")
    ap.add_argument("--layer", type=int, action="append", help="layers to extract (default: the seed's 65%%)")
    ap.add_argument("--max-batch-tokens", type=int, action="append", help="token budget(s) to try")
    ap.add_argument("--max-batch-size", type=int, default=64)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compile", action="store_true", help="also time the regionally compiled path")
    ap.add_argument(
        "--compile-setting", action="append", metavar="BUDGET:BATCH_SIZE:PAD_TO",
        help=f"compiled setting(s) to time (default: best eager budget, --max-batch-size, {DEFAULT.compile_pad})",
    )  # fmt: skip
    ap.add_argument("--profile", action="store_true", help="with --compile: top kernels of the best setting")
    ap.add_argument("--repeat", type=int, default=1, help="steady-state passes per compiled setting")
    args = ap.parse_args()
    torch.manual_seed(0)
    rng = random.Random(0)
    device = args.device
    t0 = time.perf_counter()
    if args.synthetic:
        loaded = build_synthetic(args.synthetic, device)
        # the gpu_baseline workload: prompt 40-140 tokens, response 120-256 tokens, random ids
        examples = []
        for _ in range(args.n):
            p, r = rng.randint(40, 140), rng.randint(120, 256)
            examples.append(Rendered(torch.randint(1000, 200000, (p + r,)).tolist(), [(p, p + r)], ""))
    else:
        from personavec.builtin import EVAL_QUESTIONS, PERSONAS
        from personavec.modeling import load_model

        loaded = load_model(args.model, dtype=args.dtype, device=device, attn_implementation="sdpa")
        pairs = [(p, q) for p in PERSONAS for q in EVAL_QUESTIONS][: args.n]
        examples = [
            render(loaded.tokenizer, conversation(PERSONAS[p], q, synth_response(i, rng)))
            for i, (p, q) in enumerate(pairs)
        ]
    load_s = time.perf_counter() - t0
    layers = args.layer or [default_layer(loaded.n_layers)]
    ntok = sum(ex.forward_length for ex in examples)
    resp_tok = sum(e - s for ex in examples for s, e in ex.assistant_spans)
    budgets = args.max_batch_tokens or ([16384, 65536] if device.startswith("cuda") else [1024, 4096])
    print(f"device={device} model={loaded.name} n={len(examples)} tokens={ntok} response_tokens={resp_tok} "
          f"layers={layers} load_s={load_s:.1f}", flush=True)  # fmt: skip

    # warm-up (allocator, kernels) on a few examples for both methods
    mean_activations(loaded, examples[:4], layers, max_batch_tokens=budgets[0])
    n_seed = args.n_seed or len(examples)
    seed_examples = examples[:n_seed]
    seed_style(loaded.model, seed_examples[:2], layers, device)

    sync(device)
    t = time.perf_counter()
    ref = seed_style(loaded.model, seed_examples, layers, device)
    sync(device)
    seed_s = time.perf_counter() - t
    seed_tok = sum(len(ex.input_ids) for ex in seed_examples)
    seed_tok_s = seed_tok / seed_s
    print(f"seed-style loop: {seed_tok_s:,.0f} tok/s ({seed_s:.1f} s for {n_seed})", flush=True)

    results = {}
    best = budgets[0]
    for budget in budgets:
        sync(device)
        t = time.perf_counter()
        got = mean_activations(loaded, examples, layers, max_batch_tokens=budget, max_batch_size=args.max_batch_size)
        sync(device)
        dt = time.perf_counter() - t
        cos = torch.nn.functional.cosine_similarity(got[:n_seed].flatten(0, 1), ref.flatten(0, 1), dim=-1)
        results[budget] = (ntok / dt, cos.min().item(), dt)
        print(f"project budget={budget}: {ntok / dt:,.0f} tok/s ({dt:.1f} s), min cos {cos.min().item():.6f}",
              flush=True)  # fmt: skip
        if ntok / dt > results[best][0]:
            best = budget
    compiled: dict = {}
    if args.compile:
        settings = [tuple(int(x) for x in c.split(":")) for c in args.compile_setting or []] or [
            (best, args.max_batch_size, DEFAULT.compile_pad)
        ]

        def run_compiled(budget: int, size: int, pad: int) -> tuple[float, float]:
            sync(device)
            t = time.perf_counter()
            got = mean_activations(
                loaded, examples, layers, max_batch_tokens=budget, max_batch_size=size, compile=True, pad_to=pad
            )
            sync(device)
            dt = time.perf_counter() - t
            cos = torch.nn.functional.cosine_similarity(got[:n_seed].flatten(0, 1), ref.flatten(0, 1), dim=-1)
            return dt, cos.min().item()

        # first pass: compiles (every variant the workload needs) and runs the whole workload once
        first_s, first_cos = run_compiled(*settings[0])
        print(f"compiled first pass (compile included) {settings[0]}: {first_s:.1f} s, min cos {first_cos:.6f}",
              flush=True)  # fmt: skip
        steady: dict[str, list[tuple[float, float]]] = {}
        for setting in settings:
            for rep in range(args.repeat):
                dt, c = run_compiled(*setting)
                steady.setdefault(":".join(map(str, setting)), []).append((ntok / dt, c))
                print(f"compiled {setting} (budget, batch size, pad_to) rep {rep}: {ntok / dt:,.0f} tok/s "
                      f"({dt:.1f} s), min cos {c:.6f}", flush=True)  # fmt: skip
        key = max(steady, key=lambda k: max(v[0] for v in steady[k]))
        best_steady = max(v[0] for v in steady[key])
        first_key = ":".join(map(str, settings[0]))
        compiled = {
            "compiled_tok_s": round(best_steady, 1),
            "compiled_best": key,
            "compiled_min_cos": round(min(v[1] for vs in steady.values() for v in vs), 6),
            "compile_first_pass_s": round(first_s, 1),
            # the first pass minus what a steady pass of the same setting takes: the compile's own cost
            "compile_s": round(first_s - ntok / max(v[0] for v in steady[first_key]), 1),
            "compiled_by": {k: [round(v[0], 1) for v in vs] for k, vs in steady.items()},
        }
        print(f"compile ~{compiled['compile_s']:.0f} s; best steady {best_steady:,.0f} tok/s ({key}), "
              f"{best_steady / results[best][0]:.2f}x eager", flush=True)  # fmt: skip
        if args.profile:
            from torch.profiler import ProfilerActivity, profile

            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
            with profile(activities=acts) as prof:
                run_compiled(*(int(x) for x in key.split(":")))
            sort = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
            print(prof.key_averages().table(sort_by=sort, row_limit=15, max_name_column_width=60), flush=True)
    tok_s, min_cos, _ = results[best]
    out = {
        "project_tok_s": round(tok_s, 1),
        "seed_tok_s": round(seed_tok_s, 1),
        "speedup": round(tok_s / seed_tok_s, 3),
        "min_cos": round(min_cos, 6),
        "best_max_batch_tokens": best,
        "by_budget": {str(b): round(v[0], 1) for b, v in results.items()},
        **compiled,
        "n": len(examples),
        "n_seed": n_seed,
        "tokens": ntok,
        "layers": layers,
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": torch.get_num_threads(),
        "model": loaded.name,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "torch": torch.__version__,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
