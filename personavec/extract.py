"""Extraction: mean residual-stream activations over response tokens, batched, into the Zarr store.

Two layers of API:

- :func:`mean_activations` / :func:`iter_mean_activations`: the reusable core. Given a loaded model and encoded
  conversations (:class:`personavec.spans.Rendered`), returns one float32 row ``[n_layers, d_model]`` per assistant
  span. The forward stops after the deepest requested layer (a forward hook raises once it has captured it: no later
  blocks, no lm_head, no hidden-state tuple); examples go in length-sorted batches under a token budget; the mean over
  each span is taken in float32 on the device, and only ``[batch, layers, d_model]`` is copied back.
- :func:`run_extraction`: a catalogued, resumable extraction run over a responses run (catalog rows + Zarr array).

Layer convention (the seed's): layer ``L`` is ``hidden_states[L]``: 0 is the embedding output (the input of block 0),
``L`` in ``1..n-1`` the output of block ``L-1``, and ``L = n`` the final-norm output (as transformers returns it).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from personavec.config import DTYPES, config_dict
from personavec.errors import ConfigError, ModelError, StorageError
from personavec.modeling import LoadedModel, load_model
from personavec.spans import PROMPT_FORMATS, SPAN_RULES, Rendered, conversation, max_length_of, render

if TYPE_CHECKING:
    from personavec.workspace import Workspace


@dataclass(frozen=True)
class ExtractConfig:
    """Configuration of an extraction run (serialised into the run row).

    Attributes:
        model: hub id, local directory, ``.gguf`` file or ``"smollm2-135m-instruct"``.
        layers: layers to extract (``hidden_states`` indices), or None for the seed's default
            ``int(n_layers * layer_fraction + 0.5)``.
        layer_fraction: used when ``layers`` is None.
        dtype: ``"auto"`` (bf16 on CUDA, float32 on CPU), ``"float32"``, ``"bfloat16"``, ``"float16"``.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:N"``.
        device_map: ``from_pretrained``'s ``device_map`` for models larger than one device (e.g. ``"auto"``).
        max_batch_tokens: token budget per batch, counted as ``batch_size * longest_sequence`` (padding included);
            None = :func:`default_batch_tokens` for the device (1,024 on CPU, 16,384 on GPU).
        max_batch_size: most conversations per batch.
        span: ``"exact"`` (response tokens via offsets) or ``"seed"`` (the seed's rule).
        prompt_format: ``"chat"`` (chat template) or ``"raw"`` (seed's plaintext format).
        max_length: context to truncate to; None = the model's ``max_position_embeddings``.
        attn_implementation: passed to ``from_pretrained`` (``"sdpa"`` by default).
        chunk_rows: Zarr rows per chunk; None = ``arrays.chunk_rows_for(d_model)``.
        compile: ``torch.compile`` each decoder block that runs (regional compilation: the blocks share code, so they
            compile once), with sequence widths padded to a multiple of 8. For GPUs: 1.6x the eager throughput on
            an H100 (gemma-3-27b shapes) after a one-off compile of ~25 s paid by the first batches; same means up to
            rounding. Needs a C++ compiler on CPU (inductor) and gains little there. Off by default.
        personas: only responses of these personas (names), or None for all.
        questions: only responses to these questions (0-based positions in the question set), or None for all.
    """

    model: str = "smollm2-135m-instruct"
    layers: tuple[int, ...] | None = None
    layer_fraction: float = 0.65
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int = 64
    span: str = "exact"
    prompt_format: str = "chat"
    max_length: int | None = None
    attn_implementation: str | None = "sdpa"
    chunk_rows: int | None = None
    compile: bool = False
    personas: tuple[str, ...] | None = None
    questions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("personas", "questions"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, tuple(value))
                if not value:
                    raise ConfigError(f"{name} filter is empty: leave it out (None) to take every response")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.span not in SPAN_RULES:
            raise ConfigError(f"span must be one of {', '.join(SPAN_RULES)}, got {self.span!r}")
        if self.prompt_format not in PROMPT_FORMATS:
            raise ConfigError(f"prompt_format must be one of {', '.join(PROMPT_FORMATS)}, got {self.prompt_format!r}")
        if (self.max_batch_tokens is not None and self.max_batch_tokens <= 0) or self.max_batch_size <= 0:
            raise ConfigError("max_batch_tokens and max_batch_size must be > 0")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))
            if not self.layers or len(set(self.layers)) != len(self.layers) or min(self.layers) < 0:
                raise ConfigError(f"layers must be distinct non-negative integers, got {self.layers}")
        if self.chunk_rows is not None and self.chunk_rows <= 0:
            raise ConfigError("chunk_rows must be > 0")
        if not isinstance(self.compile, bool):
            raise ConfigError(f"compile must be true or false, got {self.compile!r}")

    def resolve_layers(self, n_layers: int) -> tuple[int, ...]:
        """The requested layers, or the seed's default layer for a model of ``n_layers`` blocks; validated."""
        layers = self.layers if self.layers is not None else (int(n_layers * self.layer_fraction + 0.5),)
        bad = [x for x in layers if x > n_layers]
        if bad:
            raise ModelError(f"layers {bad} out of range: the model has {n_layers} layers (valid 0..{n_layers})")
        return layers


# -- the core: truncated, batched forward ------------------------------------------------------------------------


class _Stop(Exception):
    """Raised from a hook once the deepest requested layer is captured, to skip the rest of the forward."""


def _final_norm(model: Any) -> Any:
    for path in ("model.norm", "model.language_model.norm", "language_model.model.norm", "transformer.ln_f"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, torch.nn.Module):
            return obj
    raise ModelError(f"cannot find the final norm of {type(model).__name__} (needed for layer = n_layers)")


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with ``len(batch) * longest <= max_batch_tokens``.

    A single sequence longer than the budget gets a batch of its own.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        longest = lengths[cur[0]] if cur else lengths[i]
        if cur and (len(cur) + 1 > max_batch_size or (len(cur) + 1) * longest > max_batch_tokens):
            batches.append(cur)
            cur = []
        cur.append(i)
    if cur:
        batches.append(cur)
    return batches


class _Capture:
    """Forward hooks that reduce the requested layers to span means on the device, then stop the forward."""

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]) -> None:
        self.layers = list(layers)
        self.weights: torch.Tensor | None = None  # [B, S, T] float32, 1/len on span positions
        self.out: dict[int, torch.Tensor] = {}
        self.handles = []
        n = loaded.n_layers
        deepest = max(self.layers)
        for layer in sorted(set(self.layers)):
            if layer == 0:
                self.handles.append(
                    loaded.layers[0].register_forward_pre_hook(self._pre(layer, deepest), with_kwargs=True)
                )
            elif layer < n:
                self.handles.append(loaded.layers[layer - 1].register_forward_hook(self._post(layer, deepest)))
            else:
                self.handles.append(_final_norm(loaded.model).register_forward_hook(self._post(layer, deepest)))

    def _reduce(self, layer: int, hidden: torch.Tensor, deepest: int) -> None:
        if self.weights is None:  # set before every forward pass that reaches the hooks
            raise RuntimeError("span weights not set before the forward pass")
        weights = self.weights.to(hidden.device)
        # float32 before the weighted sum: the mean of bf16 activations is taken in float32, as the seed's .float().
        self.out[layer] = torch.bmm(weights, hidden.float())
        if layer == deepest:
            raise _Stop

    def _pre(self, layer: int, deepest: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            self._reduce(layer, hidden, deepest)

        return hook

    def _post(self, layer: int, deepest: int) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> None:
            hidden = output[0] if isinstance(output, tuple | list) else output
            self._reduce(layer, hidden, deepest)

        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


# Widths are padded to a multiple of this when compiling. The compiled blocks use dynamic shapes, so one graph serves
# every width (no recompiles were seen with no padding at all); padding to 8 keeps bf16 rows 16-byte aligned and the
# number of distinct widths small for ~1% padded tokens on ~300-token conversations. 64 cost ~11% padded tokens and
# measured 12.8-14.5k tok/s against 16-17k at 16 and 17.5-17.9k at 8 or 1 (H100, gemma-3-27b shapes).
COMPILE_PAD = 8

# One compiled wrapper per block class: dynamo keys its cache on the code object *and* the compile call's backend, so
# re-wrapping on every call would recompile on every call; the blocks of a model share this one wrapper (their
# parameters are graph inputs), so a 62-block model compiles a handful of variants (sliding/global attention, batch
# of 1), not 62.
_COMPILED: dict[Any, Any] = {}


def _compile_blocks(blocks: Sequence[torch.nn.Module]) -> Callable[[], None]:
    """Give each block a ``torch.compile``d forward (an instance attribute); returns the function that restores them.

    Module hooks run in ``Module.__call__`` around ``forward``, so the capture hooks (and the early stop they raise)
    stay outside the compiled region.
    """
    import types

    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    # The default (8) is per code object, shared by all blocks: sliding/global masks x mask present/absent x batch of
    # one can reach it, after which dynamo silently falls back to eager for new variants.
    if getattr(cfg, name, 64) < 64:
        setattr(cfg, name, 64)
    saved = []
    for block in blocks:
        own = block.__dict__.get("forward")  # e.g. accelerate's dispatch wrapper with device_map
        if own is not None:
            compiled = torch.compile(own, dynamic=True)
        else:
            fn = type(block).forward
            if fn not in _COMPILED:
                _COMPILED[fn] = torch.compile(fn, dynamic=True)
            compiled = types.MethodType(_COMPILED[fn], block)
        saved.append((block, own))
        block.forward = compiled

    def restore() -> None:
        for block, own in saved:
            if own is not None:
                block.forward = own
            else:
                del block.forward

    return restore


def _padded_width(width: int, multiple: int, config: Any) -> int:
    """``width`` rounded up to ``multiple``, but never past the model's position limit (learned position tables)."""
    from personavec.modeling import text_config

    padded = -(-width // multiple) * multiple
    tc = text_config(config)
    limit = getattr(tc, "max_position_embeddings", None) or getattr(tc, "n_positions", None)
    return padded if not isinstance(limit, int) or padded <= limit else max(width, limit)


#: Token budgets measured best by scripts/bench_extract.py (docs/PERFORMANCE.md): on CPU small batches stay in
#: cache (1,024 beat 2,048 / 4,096 / 16,384 by 10-40% on 2 cores); on an H100 16,384 and 65,536 tie.
CPU_BATCH_TOKENS = 1024
GPU_BATCH_TOKENS = 16384


def default_batch_tokens(device: Any) -> int:
    """The default token budget for a model on ``device``."""
    return CPU_BATCH_TOKENS if str(device).startswith("cpu") else GPU_BATCH_TOKENS


def iter_mean_activations(
    loaded: LoadedModel,
    examples: Sequence[Rendered],
    layers: Sequence[int],
    *,
    max_batch_tokens: int | None = None,
    max_batch_size: int = 64,
    batches: list[list[int]] | None = None,
    compile: bool = False,
    pad_to: int | None = None,
) -> Iterator[tuple[list[int], torch.Tensor, int]]:
    """Yield ``(example indices, means [n_spans_in_batch, n_layers, d_model] float32 CPU, n_tokens)`` per batch.

    Spans of a batch are ordered by example (as in ``indices``) then by span. Empty spans give NaN rows.
    ``batches`` overrides the planned batches (lists of indices into ``examples``). ``compile``: run the blocks that
    run through ``torch.compile`` (see :class:`ExtractConfig`); restored on return. ``pad_to``: pad each batch's width
    to a multiple of this (default :data:`COMPILE_PAD` when compiling, else no padding); padding never changes the
    means (attention mask, zero span weights). ``n_tokens`` counts real tokens, not padding.
    """
    if not layers:
        raise ConfigError("no layers requested")
    if max(layers) > loaded.n_layers:
        raise ModelError(f"layer {max(layers)} out of range: {loaded.name} has {loaded.n_layers} layers")
    # Conversations are cut right after their last span: causal attention means later tokens never change the
    # span's activations, so computing them would be waste.
    lengths = [max([e for _, e in ex.assistant_spans] + [1]) for ex in examples]
    if batches is None:
        budget = max_batch_tokens or default_batch_tokens(loaded.input_device)
        batches = plan_batches(lengths, budget, max_batch_size)
    device = loaded.input_device
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id or 0
    if pad_to is None:
        pad_to = COMPILE_PAD if compile else 1
    capture = _Capture(loaded, layers)
    # Blocks 0..deepest-1 run (hidden_states[L] is block L-1's output; L = n also runs the final norm, uncompiled).
    restore = _compile_blocks(list(loaded.layers)[: min(max(layers), loaded.n_layers)]) if compile else None
    try:
        with torch.inference_mode():
            for batch in batches:
                width = max(lengths[i] for i in batch)
                if pad_to > 1:
                    width = _padded_width(width, pad_to, loaded.model.config)
                n_spans = max(len(examples[i].assistant_spans) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                weights = torch.zeros((len(batch), n_spans, width), dtype=torch.float32)
                for row, i in enumerate(batch):
                    seq = examples[i].input_ids[: lengths[i]]
                    ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
                    mask[row, : len(seq)] = 1
                    for k, (s, e) in enumerate(examples[i].assistant_spans):
                        if e > s:
                            weights[row, k, s:e] = 1.0 / (e - s)
                        else:  # an empty span (truncated away) has no mean
                            weights[row, k, :] = float("nan")
                capture.weights = weights.to(device, non_blocking=True)
                capture.out = {}
                try:
                    loaded.model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Stop:
                    pass
                # [B, S, n_layers, d] on device -> keep only real spans -> one copy to the host
                stacked = torch.stack([capture.out[layer] for layer in layers], dim=2)
                keep = [stacked[row, : len(examples[i].assistant_spans)] for row, i in enumerate(batch)]
                yield batch, torch.cat(keep).cpu(), int(sum(lengths[i] for i in batch))
    finally:
        capture.remove()
        if restore is not None:
            restore()


def mean_activations(
    loaded: LoadedModel,
    examples: Sequence[Rendered],
    layers: Sequence[int],
    *,
    max_batch_tokens: int | None = None,
    max_batch_size: int = 64,
    compile: bool = False,
    pad_to: int | None = None,
) -> torch.Tensor:
    """Mean activation over every assistant span: float32 ``[n_spans, n_layers, d_model]`` on the CPU.

    Rows follow the examples' order, then each example's spans in order (one row per assistant message of a
    multi-turn conversation). Layers follow ``layers``. ``compile`` and ``pad_to``: see :func:`iter_mean_activations`.

    Example:
        >>> loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
        >>> ex = render(loaded.tokenizer, conversation("You are a pirate.", "Hi?", "Arr, ahoy!"))
        >>> mean_activations(loaded, [ex], [20]).shape
        torch.Size([1, 1, 576])
    """
    offsets = np.cumsum([0] + [len(e.assistant_spans) for e in examples])
    out = torch.empty((int(offsets[-1]), len(layers), loaded.d_model), dtype=torch.float32)
    for batch, means, _ in iter_mean_activations(
        loaded,
        examples,
        layers,
        max_batch_tokens=max_batch_tokens,
        max_batch_size=max_batch_size,
        compile=compile,
        pad_to=pad_to,
    ):
        pos = 0
        for i in batch:
            k = len(examples[i].assistant_spans)
            out[offsets[i] : offsets[i] + k] = means[pos : pos + k]
            pos += k
    return out


def load_for(config: ExtractConfig) -> LoadedModel:
    """Load the model an :class:`ExtractConfig` names."""
    return load_model(
        config.model,
        dtype=config.dtype,
        device=config.device,
        device_map=config.device_map,
        attn_implementation=config.attn_implementation,
    )


def encode_response(
    loaded: LoadedModel, system_prompt: str | None, question: str, response: str, config: ExtractConfig
) -> Rendered:
    """Render one seed-style conversation (system, user, assistant) under the config's format, rule and context."""
    max_length = config.max_length or max_length_of(loaded.model.config, loaded.tokenizer)
    return render(
        loaded.tokenizer,
        conversation(system_prompt, question, response),
        config.prompt_format,
        config.span,
        max_length=max_length,
    )


# -- catalogued, resumable runs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExtractionProgress:
    """What the progress callback receives after each batch."""

    run_id: int
    done_examples: int
    total_examples: int
    tokens: int
    elapsed_s: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class ExtractionResult:
    run_id: int
    zarr_group: str
    layers: tuple[int, ...]
    n_examples: int
    n_computed: int
    n_tokens: int
    tok_s: float
    n_truncated: int


class ExtractionInterrupted(Exception):
    """Raise from a progress callback to stop a run on purpose (it is then marked ``interrupted``)."""


class _ChunkWriter:
    """Background thread writing whole Zarr chunks while the GPU/CPU computes the next batches."""

    def __init__(self, array: Any) -> None:
        self.array = array
        self.todo: queue.Queue = queue.Queue(maxsize=4)
        self.written: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="personavec-zarr-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        from personavec import arrays

        while True:
            item = self.todo.get()
            if item is None:
                return
            start, values = item
            try:
                arrays.write_rows(self.array, start, values)
                self.written.put((start, start + values.shape[0]))
            except BaseException as exc:  # surfaced in the main thread by check()
                self.error = exc
                return

    def submit(self, start: int, values: np.ndarray) -> None:
        self.check()
        self.todo.put((start, values))

    def check(self) -> None:
        if self.error is not None:
            raise StorageError(f"writing activations to {self.array.store} failed: {self.error}") from self.error

    def drain(self) -> list[tuple[int, int]]:
        out = []
        while True:
            try:
                out.append(self.written.get_nowait())
            except queue.Empty:
                return out

    def close(self) -> None:
        self.todo.put(None)
        self.thread.join()


def run_extraction(
    workspace: Workspace,
    config: ExtractConfig,
    source_run_id: int | None = None,
    run_id: int | None = None,
    *,
    progress: Callable[[ExtractionProgress], None] | None = None,
    loaded: LoadedModel | None = None,
) -> ExtractionResult:
    """Extract per-response mean activations of a responses run into a new (or resumed) extraction run.

    New run (``run_id`` None): creates the ``extract`` run and its ``extraction_runs`` row with provenance, plans every
    answered response of ``source_run_id`` (Zarr row, token span, token counts, truncation) into ``activations``,
    creates the Zarr array, then computes. Rows are assigned longest-first so that consecutive batches fill
    consecutive Zarr chunks; a chunk is written whole by a background thread and its rows are marked done only after.

    Resume (``run_id`` given): reuses the run's stored config and plan and computes only rows not yet done.

    Args:
        progress: called after each batch with an :class:`ExtractionProgress`; an exception it raises interrupts the
            run (the run is marked ``interrupted`` and every complete chunk stays done).
        loaded: an already loaded model matching ``config`` (skips loading).
    """
    with workspace.catalog() as catalog:
        return _run_extraction(workspace, catalog, config, source_run_id, run_id, progress, loaded)


# The catalog and Zarr stack is imported inside, not at module level, so the compute core above runs where only
# torch and transformers are installed (e.g. a bare GPU box running scripts/bench_extract.py).
def _run_extraction(
    workspace: Workspace,
    catalog: Any,
    config: ExtractConfig,
    source_run_id: int | None,
    run_id: int | None,
    progress: Callable[[ExtractionProgress], None] | None,
    loaded: LoadedModel | None,
) -> ExtractionResult:
    from personavec import arrays
    from personavec.store import extraction as xs

    if run_id is None:
        if source_run_id is None:
            raise ConfigError("run_extraction needs a source responses run id (or a run id to resume)")
        loaded = loaded or load_for(config)
        run_id = _plan_run(workspace, catalog, config, source_run_id, loaded)
    else:
        info = xs.get_extraction_run(catalog, run_id)
        stored = xs.extraction_run_config(catalog, run_id)
        fields = {f.name for f in dataclasses.fields(ExtractConfig)}
        config = ExtractConfig(**{k: v for k, v in stored.items() if k in fields} | {"layers": tuple(info.layers)})
        loaded = loaded or load_for(config)
        xs.set_run_status(catalog, run_id, "running")
    info = xs.get_extraction_run(catalog, run_id)
    layers = tuple(info.layers)
    array = arrays.open_activation_array(workspace.zarr_path, info.zarr_group, mode="r+")
    chunk = int(array.chunks[0])
    plan = xs.pending_examples(catalog, run_id)  # rows not done, with their conversation text
    todo_rows = plan["row"].to_pylist()
    examples = [
        encode_response(loaded, sp, q, r, config)
        for sp, q, r in zip(
            plan["system_prompt"].to_pylist(), plan["question"].to_pylist(), plan["text"].to_pylist(), strict=True
        )
    ]
    row_of = dict(enumerate(todo_rows))
    # Batches over consecutive rows (rows are already longest-first), so chunks complete in order.
    lengths = [max([e for _, e in ex.assistant_spans] + [1]) for ex in examples]
    budget = config.max_batch_tokens or default_batch_tokens(loaded.input_device)
    batches = plan_batches(lengths, budget, config.max_batch_size)
    batches.sort(key=lambda b: row_of[b[0]])
    buffers: dict[int, np.ndarray] = {}
    filled: dict[int, int] = {}
    n_rows_total = info.n_examples

    def chunk_size(c: int) -> int:
        return min(chunk, n_rows_total - c * chunk)

    # Chunks partly done before (impossible: done is marked per chunk) would never fill; guard anyway.
    for c in {r // chunk for r in todo_rows}:
        filled[c] = chunk_size(c) - sum(1 for r in todo_rows if r // chunk == c)
        if filled[c]:
            buffers[c] = np.asarray(array[c * chunk : c * chunk + chunk_size(c)])
    writer = _ChunkWriter(array)
    tokens = 0
    done = info.n_examples - len(todo_rows)
    start_t = time.perf_counter()
    status, error = "done", None
    try:
        for batch, means, n_tok in iter_mean_activations(
            loaded, examples, layers, batches=batches, compile=config.compile
        ):
            values = means.numpy()
            for j, i in enumerate(batch):
                row = row_of[i]
                c = row // chunk
                buf = buffers.setdefault(
                    c, np.full((chunk_size(c), len(layers), info.d_model), np.nan, dtype=np.float32)
                )
                buf[row - c * chunk] = values[j]
                filled[c] += 1
                if filled[c] == chunk_size(c):
                    writer.submit(c * chunk, buffers.pop(c))
            tokens += n_tok
            done += len(batch)
            _mark_written(catalog, run_id, writer)
            if progress is not None:
                progress(ExtractionProgress(run_id, done, info.n_examples, tokens, time.perf_counter() - start_t))
    except BaseException as exc:
        status = "interrupted" if isinstance(exc, KeyboardInterrupt | ExtractionInterrupted) else "failed"
        error = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        writer.close()
        _mark_written(catalog, run_id, writer)
        elapsed = time.perf_counter() - start_t
        tok_s = tokens / elapsed if elapsed > 0 and tokens else 0.0
        xs.finish_extraction(catalog, run_id, status, error, tokens, tok_s if tokens else None)
    writer.check()
    n_truncated = xs.count_truncated(catalog, run_id)
    return ExtractionResult(
        run_id, info.zarr_group, layers, info.n_examples, len(todo_rows), tokens, tok_s, n_truncated
    )


def _mark_written(catalog: Any, run_id: int, writer: _ChunkWriter) -> None:
    from personavec.store import extraction as xs

    writer.check()
    written = writer.drain()
    if written:
        with catalog.session() as session:
            for start, stop in written:
                xs.mark_rows_done(session, run_id, start, stop)


def _select(records: list, config: ExtractConfig, source_run_id: int) -> list:
    """The responses the config's persona/question filters keep; unknown names or positions are errors."""
    if not records:
        raise ConfigError(f"responses run {source_run_id} has no answered responses to extract")
    if config.personas is not None:
        unknown = sorted(set(config.personas) - {r.persona for r in records})
        if unknown:
            raise ConfigError(f"responses run {source_run_id} has no answers of persona(s) {', '.join(unknown)}")
        records = [r for r in records if r.persona in config.personas]
    if config.questions is not None:
        unknown_positions = sorted(set(config.questions) - {r.question_position for r in records})
        if unknown_positions:
            raise ConfigError(
                f"responses run {source_run_id} has no answers to question position(s) {unknown_positions} "
                f"among the selected personas (positions are 0-based)"
            )
        records = [r for r in records if r.question_position in config.questions]
    return records


def _plan_run(
    workspace: Workspace, catalog: Any, config: ExtractConfig, source_run_id: int, loaded: LoadedModel
) -> int:
    from personavec import arrays
    from personavec.modeling import model_provenance
    from personavec.store import extraction as xs
    from personavec.store.responses import answered_responses
    from personavec.store.runs import create_run

    records = _select(answered_responses(catalog, source_run_id), config, source_run_id)
    layers = config.resolve_layers(loaded.n_layers)
    encoded = [encode_response(loaded, r.system_prompt, r.question, r.text, config) for r in records]
    lengths = [max(e for _, e in ex.assistant_spans) for ex in encoded]
    order = sorted(range(len(records)), key=lambda i: (-lengths[i], i))  # longest first: see run_extraction
    row = np.empty(len(records), dtype=np.int32)
    row[order] = np.arange(len(records), dtype=np.int32)
    table = pa.table(
        {
            "response_id": pa.array([r.id for r in records], pa.int64()),
            "row": pa.array(row, pa.int32()),
            "span_start": pa.array([ex.assistant_spans[0][0] for ex in encoded], pa.int32()),
            "span_end": pa.array([ex.assistant_spans[0][1] for ex in encoded], pa.int32()),
            "n_tokens": pa.array(lengths, pa.int32()),
            "n_response_tokens": pa.array(
                [ex.assistant_spans[0][1] - ex.assistant_spans[0][0] for ex in encoded], pa.int32()
            ),
            "truncated": pa.array([ex.truncated for ex in encoded], pa.bool_()),
        }
    )
    model_id, revision = model_provenance(config.model)
    run_config = {**config_dict(config), "layers": list(layers), "source_run_id": source_run_id}
    with catalog.session() as session:
        run_id = create_run(session, "extract", run_config)
        group = arrays.create_activation_array(
            workspace.zarr_path,
            run_id,
            len(records),
            len(layers),
            loaded.d_model,
            attrs={"layers": list(layers), "model": model_id, "run_id": run_id},
            chunk_rows=config.chunk_rows,
        )
        xs.add_extraction_run(
            session,
            run_id,
            source_run_id=source_run_id,
            model=model_id,
            model_revision=revision or loaded.revision,
            architecture=loaded.architecture,
            n_model_layers=loaded.n_layers,
            d_model=loaded.d_model,
            layers=list(layers),
            dtype=str(loaded.dtype).removeprefix("torch."),
            span_rule=config.span,
            prompt_format=config.prompt_format,
            device=loaded.device,
            zarr_group=group,
            n_examples=len(records),
        )
        xs.add_examples(session, run_id, table)
    return run_id


# -- the seed's API ----------------------------------------------------------------------------------------------


class ActivationExtractor:
    """The seed's extractor: lazy-loads ``config.model_name`` on first use and extracts mean response activations.

    Example:
        >>> extractor = ActivationExtractor(PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32"))
        >>> extractor.extract_activations(["You are a pirate."], ["Hi?"], ["Arr!"], layer=20).shape
        torch.Size([1, 576])
    """

    def __init__(self, config: Any = None) -> None:
        from personavec.config import PersonaVectorConfig

        self.config = config if config is not None else PersonaVectorConfig()
        self._loaded: LoadedModel | None = None

    @property
    def extract_config(self) -> ExtractConfig:
        c = self.config
        return ExtractConfig(
            model=c.model_name,
            layer_fraction=c.layer_fraction,
            dtype=c.dtype,
            device=c.device,
            max_batch_tokens=c.max_batch_tokens,
            max_batch_size=c.max_batch_size,
            span=c.span,
            prompt_format=c.prompt_format,
        )

    @property
    def loaded(self) -> LoadedModel:
        """The loaded model (loads it on first access)."""
        if self._loaded is None:
            self._loaded = load_for(self.extract_config)
        return self._loaded

    @property
    def model(self) -> Any:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def num_layers(self) -> int:
        return self.loaded.n_layers

    @property
    def d_model(self) -> int:
        return self.loaded.d_model

    def get_extraction_layer(self) -> int:
        """The seed's default layer: ``int(num_layers * layer_fraction + 0.5)``."""
        return self.config.layer_for(self.num_layers)

    def extract_activations(
        self,
        system_prompts: Sequence[str],
        questions: Sequence[str],
        responses: Sequence[str],
        layer: int | None = None,
    ) -> torch.Tensor:
        """Mean activation over each response's tokens at ``layer``: float32 ``[n, d_model]`` (CPU)."""
        if not len(system_prompts) == len(questions) == len(responses):
            raise ConfigError(
                f"system_prompts, questions and responses differ in length: "
                f"{len(system_prompts)}, {len(questions)}, {len(responses)}"
            )
        layer = self.get_extraction_layer() if layer is None else int(layer)
        config = self.extract_config
        examples = [
            encode_response(self.loaded, s, q, r, config)
            for s, q, r in zip(system_prompts, questions, responses, strict=True)
        ]
        if not examples:
            return torch.empty((0, self.d_model), dtype=torch.float32)
        out = mean_activations(
            self.loaded,
            examples,
            [layer],
            max_batch_tokens=config.max_batch_tokens,
            max_batch_size=config.max_batch_size,
        )
        return out[:, 0]


def extract_persona_vectors(
    extractor: ActivationExtractor,
    personas: dict[str, str],
    questions: Sequence[str],
    responses: dict[tuple[str, str], str],
    layer: int | None = None,
) -> dict[str, torch.Tensor]:
    """The seed's persona vectors: per persona, the mean over its responses of the per-response mean activation.

    Args:
        personas: ``{name: system_prompt}``.
        questions: the questions to use.
        responses: ``{(persona, question): response_text}``; missing pairs are skipped.
        layer: ``hidden_states`` index (default: the extractor's default layer).

    Returns:
        ``{persona: Tensor[d_model]}`` (float32), for every persona with at least one response.
    """
    keys = [(p, q) for p in personas for q in questions if (p, q) in responses]
    acts = extractor.extract_activations(
        [personas[p] for p, _ in keys], [q for _, q in keys], [responses[k] for k in keys], layer
    )
    vectors: dict[str, torch.Tensor] = {}
    for name in personas:
        rows = [i for i, (p, _) in enumerate(keys) if p == name]
        if rows:
            vectors[name] = acts[rows].mean(0)
    return vectors
