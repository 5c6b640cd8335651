"""Benchmark: how fast answers land in the catalog, against instant local OpenAI-compatible servers.

Each server is a separate process (``--serve``: a minimal asyncio HTTP/1.1 server answering every chat request at
once, ~4,000 requests/s on one core), so the client measured does not share its interpreter with the server. Every
row is measured in a fresh process against the same servers, in the same run:

- ``generate_responses``: the seed's API, answers kept in memory (no catalog);
- ``run_generation``: every answer committed to the catalog as it arrives, over one base URL, then over every server
  (``--servers N``: round-robin over replicas);
- ``run_generation @ REF``: the same call on the package as it was at git ``REF`` (``--baseline``, default the commit
  before issue 9's speed-up), the "before" figure of this run.

    .venv/bin/python scripts/bench_generate.py [--personas 23] [--questions 18] [--samples 2] [--concurrency 20]
        [--servers 2] [--repeat 3] [--baseline REF|none]

Each figure is the median of ``--repeat`` runs. Prints a table; the last line is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
#: The package before issue 9 item 4 (group commit on the event loop, the httpx backend, typed params transform).
DEFAULT_BASELINE = "4dd2e1c"

# ------------------------------------------------------------------------------------------- the instant server


def _answer(body: bytes) -> bytes:
    messages = json.loads(body)["messages"]
    text = f"[{messages[0]['content'][:20]}] answer to: {messages[-1]['content'][:40]}"
    n = len(text.split())
    payload = json.dumps(
        {
            "id": "chatcmpl-instant",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": "fault-model",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": n, "total_tokens": 10 + n},
        }
    ).encode()
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(payload)}\r\n\r\n"
    return head.encode() + payload


class _InstantHTTP(asyncio.Protocol):
    """HTTP/1.1 with keep-alive and Content-Length bodies: all an OpenAI client sends."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].decode("latin-1").lower().split("\r\n")
            length = next((int(h.split(":", 1)[1]) for h in head if h.startswith("content-length:")), 0)
            if len(self.buffer) < end + 4 + length:
                return
            body, self.buffer = self.buffer[end + 4 : end + 4 + length], self.buffer[end + 4 + length :]
            ok = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}"
            self.transport.write(_answer(body) if head[0].startswith("post") else ok)


async def _serve() -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_InstantHTTP, "127.0.0.1", 0)
    print(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1", flush=True)
    await loop.run_in_executor(None, sys.stdin.read)  # until the parent closes our stdin


# ------------------------------------------------------------------------------------------- one measurement

# Runs in a fresh interpreter with PYTHONPATH at the source tree measured (and -P, so that the current directory,
# perhaps another checkout, does not come first); only uses calls that exist in every version compared
# (GenerateConfig(...), run_generation(ws, config), generate_responses(...)).
_MEASURE = """
import json, os, sys, tempfile, time
from pathlib import Path
from personavec.builtin import EVAL_QUESTIONS, PERSONAS
from personavec.workspace import init_workspace
a = json.loads(sys.argv[1])
personas, questions = list(PERSONAS)[: a["personas"]], EVAL_QUESTIONS[: a["questions"]]
if a["mode"] == "seed":
    from personavec.config import PersonaVectorConfig
    from personavec import generate_responses
    cfg = PersonaVectorConfig(openrouter_model="fault-model", base_url=a["urls"][0],
                              max_concurrent_requests=a["concurrency"])
    t0, c0 = time.perf_counter(), os.times()
    for _ in range(a["samples"]):  # the seed's API asks each pair once per call
        n = len(generate_responses({p: PERSONAS[p] for p in personas}, questions, cfg))
    seconds, c1 = time.perf_counter() - t0, os.times()
    cpu = c1.user + c1.system - c0.user - c0.system
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "answers": n * a["samples"]}))
else:
    try:
        from personavec.generation.generate import GenerateConfig, run_generation
    except ModuleNotFoundError:  # before the packages by capability (the baseline): personavec/generate.py
        from personavec.generate import GenerateConfig, run_generation
    with tempfile.TemporaryDirectory() as tmp:
        ws = init_workspace(Path(tmp) / "ws")
        extra = {"replicas": tuple(a["urls"][1:])} if len(a["urls"]) > 1 else {}
        config = GenerateConfig(personas=tuple(personas), questions=tuple(range(len(questions))),
                                n_samples=a["samples"], model="fault-model", base_url=a["urls"][0],
                                concurrency=a["concurrency"], **extra)
        t0, c0 = time.perf_counter(), os.times()
        result = run_generation(ws, config)
        seconds, c1 = time.perf_counter() - t0, os.times()
        assert result.failures == 0, result
        cpu = c1.user + c1.system - c0.user - c0.system
        print(json.dumps({"seconds": seconds, "cpu_s": cpu, "answers": result.answers}))
"""


def _measure(tree: Path, mode: str, urls: list[str], args: argparse.Namespace) -> tuple[float, float]:
    """Answers per second of one run and the client's CPU milliseconds per answer (in a fresh process importing
    ``personavec`` from ``tree``)."""
    spec = {"mode": mode, "urls": urls, **{k: getattr(args, k) for k in ("personas", "questions", "samples")}}
    spec["concurrency"] = args.concurrency
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run(
        [sys.executable, "-P", "-c", _MEASURE, json.dumps(spec)], env=env, capture_output=True, text=True, check=False
    )
    if out.returncode != 0:
        raise SystemExit(f"measurement {mode} in {tree} failed:\n{out.stderr[-3000:]}")
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return got["answers"] / got["seconds"], 1000 * got["cpu_s"] / got["answers"]


def _baseline_tree(ref: str, into: Path) -> Path | None:
    """The package files at git ``ref`` (package, data, migrations), or None when git cannot give them."""
    paths = ["personavec", "data", "migrations", "alembic.ini"]
    archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, *paths], capture_output=True, check=False)
    if archive.returncode != 0:
        print(f"(no baseline: git archive {ref} failed: {archive.stderr.decode().strip()[:200]})")
        return None
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", type=int, default=23)
    ap.add_argument("--questions", type=int, default=18)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=20)
    ap.add_argument("--servers", type=int, default=2, help="instant servers (replicas) for the round-robin row")
    ap.add_argument("--repeat", type=int, default=3, help="runs per row; the median is shown")
    ap.add_argument("--baseline", default=DEFAULT_BASELINE, help="git ref measured as 'before' ('none': skip)")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # internal: be one instant server
    args = ap.parse_args()
    if args.serve:
        asyncio.run(_serve())
        return

    n = args.personas * args.questions * args.samples
    servers = [
        subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        for _ in range(max(1, args.servers))
    ]
    try:
        urls = [s.stdout.readline().strip() for s in servers if s.stdout is not None]
        with tempfile.TemporaryDirectory() as tmp:
            rows: list[tuple[str, Path, str, list[str]]] = [
                ("generate_responses (seed API, in memory, no catalog)", REPO, "seed", urls[:1]),
                ("run_generation (committed as they arrive), 1 base URL", REPO, "catalog", urls[:1]),
            ]
            if len(urls) > 1:
                rows.append((f"run_generation, {len(urls)} base URLs (round-robin)", REPO, "catalog", urls))
            if args.baseline != "none":
                tree = _baseline_tree(args.baseline, Path(tmp) / "baseline")
                if tree is not None:
                    rows.insert(1, (f"run_generation @ {args.baseline} (before), 1 URL", tree, "catalog", urls[:1]))
            rates: dict[str, list[float]] = {label: [] for label, *_ in rows}
            cpu: dict[str, list[float]] = {label: [] for label, *_ in rows}
            for _ in range(args.repeat):  # interleaved, so a noisy neighbour hits every row alike
                for label, tree, mode, row_urls in rows:
                    rate, ms = _measure(tree, mode, row_urls, args)
                    rates[label].append(rate)
                    cpu[label].append(ms)
    finally:
        for s in servers:
            if s.stdin is not None:
                s.stdin.close()
            s.wait(timeout=10)

    median = {label: statistics.median(r) for label, r in rates.items()}
    cpu_ms = {label: statistics.median(r) for label, r in cpu.items()}
    print(f"{n:,} answers from instant local servers, concurrency {args.concurrency}, on {platform.node()}")
    print(f"(median of {args.repeat}, each run in a fresh process; cpu: the client's CPU ms per answer)")
    print(f"{'path':<60}{'answers/s':>10}{'min':>7}{'max':>7}{'cpu ms':>8}")
    for label, r in rates.items():
        print(f"{label:<60}{median[label]:>10.0f}{min(r):>7.0f}{max(r):>7.0f}{cpu_ms[label]:>8.2f}")
    figures = {"answers_per_s": median, "cpu_ms_per_answer": cpu_ms}
    print(json.dumps({"answers": n, "concurrency": args.concurrency, **figures}))


if __name__ == "__main__":
    main()
