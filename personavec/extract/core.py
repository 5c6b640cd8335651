"""The compute core: mean residual-stream activations over assistant spans, batched and truncated.

Given a loaded model and encoded conversations (:class:`personavec.spans.Rendered`), :func:`mean_activations`
returns one float32 row ``[n_layers, d_model]`` per assistant span. The forward stops after the deepest requested
layer (a hook raises once it has captured it: no later blocks, no lm_head, no hidden-state tuple); examples go in
length-sorted batches under a token budget (:func:`plan_batches`); the mean over each span is taken in float32 on the
device, and only ``[batch, layers, d_model]`` is copied back.

This module needs only torch and transformers (no catalog, no Zarr), so it runs on a bare GPU box.

Layer convention (the seed's): layer ``L`` is ``hidden_states[L]``: 0 is the embedding output (the input of block 0),
``L`` in ``1..n-1`` the output of block ``L-1``, and ``L = n`` the final-norm output (as transformers returns it).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Generator, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from personavec.errors import ConfigError
from personavec.hooks import StopForward, record
from personavec.modeling import LoadedModel, max_positions
from personavec.spans import Rendered
from personavec.tuning import DEFAULT, Tuning

# One compiled wrapper per block class: dynamo keys its cache on the code object *and* the compile call's backend, so
# re-wrapping on every call would recompile on every call; the blocks of a model share this one wrapper (their
# parameters are graph inputs), so a 62-block model compiles a handful of variants (sliding/global attention, batch
# of 1), not 62.
_COMPILED: dict[Any, Any] = {}


def default_batch_tokens(device: Any, tuning: Tuning = DEFAULT) -> int:
    """The default token budget for a model on ``device`` (:attr:`Tuning.cpu_batch_tokens` / ``gpu_batch_tokens``)."""
    return tuning.batch_tokens(device)


def plan_batches(lengths: Sequence[int], max_batch_tokens: int, max_batch_size: int) -> list[list[int]]:
    """Indices grouped into batches, longest first, with ``len(batch) * longest <= max_batch_tokens``.

    Ties keep index order, so indices already sorted longest first give batches of consecutive indices. A single
    sequence longer than the budget gets a batch of its own.
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


# -- hooks -------------------------------------------------------------------------------------------------------


class SpanCapture:
    """Span means from :func:`personavec.hooks.record`'s hooks: call it with a padded batch and the span weights.

    Each hook reduces its layer's hidden states ``[B, T, d]`` to ``weights @ hidden`` in float32 on the device; the
    hook of the deepest layer then stops the forward. Use it through :func:`capture` (hooks always removed).
    """

    def __init__(self, loaded: LoadedModel, layers: Sequence[int]) -> None:
        if not layers:
            raise ConfigError("no layers requested")
        if max(layers) > loaded.n_layers or min(layers) < 0:
            raise ConfigError(f"layers {list(layers)} out of range: {loaded.name} has layers 0..{loaded.n_layers}")
        self.loaded = loaded
        self.layers = list(layers)
        self._weights: torch.Tensor | None = None
        self._out: dict[int, torch.Tensor] = {}

    def _reduce(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        if self._weights is None:  # a forward of the model outside __call__
            raise RuntimeError("personavec's capture hooks ran outside SpanCapture.__call__")
        # float32 before the weighted sum: the mean of bf16 activations is taken in float32, as the seed's .float().
        return torch.bmm(self._weights.to(hidden.device), hidden.float())

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Span means of one padded batch: float32 ``[B, S, n_layers, d_model]`` on the device.

        Args:
            input_ids, attention_mask: ``[B, T]``.
            weights: ``[B, S, T]`` float32, ``1 / len`` on the tokens of span ``s`` of row ``b``, 0 elsewhere.
        """
        device = self.loaded.input_device
        self._weights = weights.to(device, non_blocking=True)
        self._out.clear()
        try:
            self.loaded.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False)
        except StopForward:
            pass
        finally:
            self._weights = None
        return torch.stack([self._out[layer] for layer in self.layers], dim=2)


@contextlib.contextmanager
def capture(loaded: LoadedModel, layers: Sequence[int]) -> Iterator[SpanCapture]:
    """Register the span-mean hooks on ``layers`` (``hidden_states`` indices) for the block; always removes them.

    Example:
        >>> with capture(loaded, [20]) as spans:
        ...     means = spans(input_ids, attention_mask, weights)  # [B, S, 1, d_model]
    """
    spans = SpanCapture(loaded, layers)
    final_norm = loaded.final_norm() if max(layers) == loaded.n_layers else None
    with record(loaded.layers, spans.layers, reduce=spans._reduce, stop=True, final_norm=final_norm) as out:
        spans._out = out
        yield spans


# -- regional compilation ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def compiled_blocks(blocks: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Give each block a ``torch.compile``d forward (an instance attribute) for the block; restores them after.

    Module hooks run in ``Module.__call__`` around ``forward``, so the capture hooks (and the early stop they raise)
    stay outside the compiled region.
    """
    import torch._dynamo

    cfg = torch._dynamo.config
    name = "recompile_limit" if hasattr(cfg, "recompile_limit") else "cache_size_limit"
    # The default (8) is per code object, shared by all blocks: sliding/global masks x mask present/absent x batch of
    # one can reach it, after which dynamo silently falls back to eager for new variants.
    if getattr(cfg, name, 64) < 64:
        setattr(cfg, name, 64)
    saved = []
    try:
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
        yield
    finally:
        for block, own in saved:
            if own is not None:
                block.forward = own
            else:
                del block.forward


def _padded_width(width: int, multiple: int, config: Any) -> int:
    """``width`` rounded up to ``multiple``, but never past the model's position limit (learned position tables)."""
    padded = -(-width // multiple) * multiple
    limit = max_positions(config)
    return padded if limit is None or padded <= limit else max(width, limit)


# -- batched means -----------------------------------------------------------------------------------------------


def _batch_tensors(
    examples: Sequence[Rendered], batch: Sequence[int], width: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, attention mask and span weights (``1/len`` on span tokens; NaN rows for empty spans) of a batch."""
    n_spans = max(len(examples[i].assistant_spans) for i in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), n_spans, width), dtype=torch.float32)
    for row, i in enumerate(batch):
        seq = examples[i].input_ids[: examples[i].forward_length]
        ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[row, : len(seq)] = 1
        for k, (s, e) in enumerate(examples[i].assistant_spans):
            if e > s:
                weights[row, k, s:e] = 1.0 / (e - s)
            else:  # an empty span (truncated away) has no mean
                weights[row, k, :] = float("nan")
    return ids, mask, weights


def iter_mean_activations(
    loaded: LoadedModel,
    examples: Sequence[Rendered],
    layers: Sequence[int],
    *,
    max_batch_tokens: int | None = None,
    max_batch_size: int = 64,
    batches: Iterable[Sequence[int]] | None = None,
    compile: bool = False,
    pad_to: int | None = None,
) -> Generator[tuple[list[int], torch.Tensor, int]]:
    """Yield ``(example indices, means [n_spans_in_batch, n_layers, d_model] float32 CPU, n_tokens)`` per batch.
    The next batch is launched before a batch is yielded (on a GPU it computes meanwhile; the means arrive in pinned
    host memory), so ``batches`` is read one batch ahead.

    Spans of a batch are ordered by example (as in ``indices``) then by span. Empty spans give NaN rows.
    ``batches`` overrides the planned batches (lists of indices into ``examples``; any iterable, consumed one batch
    at a time, so ``examples`` may grow as it goes). ``compile``: run the blocks that
    run through ``torch.compile`` (see ``ExtractConfig.compile``); restored on return. ``pad_to``: pad each batch's
    width to a multiple of this (default ``Tuning.compile_pad`` when compiling, else no padding); padding never changes
    the means (attention mask, zero span weights). ``n_tokens`` counts real tokens, not padding.
    """
    # Conversations are cut right after their last span (Rendered.forward_length).
    if batches is None:
        budget = max_batch_tokens or default_batch_tokens(loaded.input_device)
        batches = plan_batches([ex.forward_length for ex in examples], budget, max_batch_size)
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id or 0
    if pad_to is None:
        pad_to = DEFAULT.compile_pad if compile else 1
    with contextlib.ExitStack() as stack:
        spans = stack.enter_context(capture(loaded, layers))
        if compile:
            # Blocks 0..deepest-1 run (hidden_states[L] is block L-1's output; L = n also runs the final norm,
            # uncompiled).
            stack.enter_context(compiled_blocks(list(loaded.layers)[: min(max(layers), loaded.n_layers)]))
        stack.enter_context(torch.inference_mode())
        # Double-buffered: batch i+1 is launched (queued on the device) before batch i's results are waited for and
        # handed out, so the device never idles while the caller works on a batch or the next one is prepared.
        waiting: tuple[list[int], torch.Tensor, Any, int] | None = None
        for batch in batches:
            batch = list(batch)
            lengths = [examples[i].forward_length for i in batch]
            width = max(lengths)
            if pad_to > 1:
                width = _padded_width(width, pad_to, loaded.model.config)
            means = spans(*_batch_tensors(examples, batch, width, pad_id))
            # [B, S, n_layers, d] on device -> keep only real spans -> one copy to the host
            keep = [means[row, : len(examples[i].assistant_spans)] for row, i in enumerate(batch)]
            launched = (batch, *_to_host(torch.cat(keep)), sum(lengths))
            if waiting is not None:
                yield _arrived(waiting)
            waiting = launched
        if waiting is not None:
            yield _arrived(waiting)


def _to_host(values: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying ``values`` to the host; returns the host tensor and an event to wait for (None: done)."""
    if values.device.type != "cuda":
        return values.cpu(), None
    host = torch.empty(values.shape, dtype=values.dtype, pin_memory=True)
    host.copy_(values, non_blocking=True)
    done = torch.cuda.Event()
    done.record(torch.cuda.current_stream(values.device))  # the copy runs on the source device's stream
    return host, done


def _arrived(launched: tuple[list[int], torch.Tensor, Any, int]) -> tuple[list[int], torch.Tensor, int]:
    batch, host, done, n_tokens = launched
    if done is not None:
        done.synchronize()
    return batch, host, n_tokens


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
