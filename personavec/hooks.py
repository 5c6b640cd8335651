"""Forward hooks on a model's decoder blocks, as context managers that always remove them.

The layer convention is transformers' ``hidden_states`` index (the seed's): layer ``0`` is the input of block 0 (the
embedding output), layer ``L`` in ``1..n-1`` the output of block ``L-1``, and layer ``n`` (``n`` blocks) the
final-norm output, which needs the norm module (``final_norm``); without it, layer ``n`` is block ``n-1``'s output.

- :func:`record` reads layers (reduced on the device by a function of yours, e.g. a mean over a span) and can stop
  the forward once the deepest one is read: no later blocks, no lm_head.
- :func:`patch` replaces layers (add a vector, ablate a direction, cap a projection).

Both take the blocks (``LoadedModel.layers``, or any ``ModuleList``), in the style of steering-vectors'
``record_activations``::

    with record(blocks, [10, 20], stop=True) as out:
        model(input_ids)           # stops after block 19; the stop is swallowed by the with
    out[10], out[20]               # [batch, tokens, d_model]

    with patch(blocks, {20: lambda h: h + 4.0 * direction}):
        model.generate(...)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from personavec.errors import ConfigError

#: ``reduce(layer, hidden) -> value`` is called in the hook with the layer's hidden states ``[batch, tokens, d]``;
#: its result is kept in the recording (None: nothing kept). The default keeps ``hidden`` itself.
Reduce = Callable[[int, Any], Any]


class StopForward(Exception):
    """Raised by :func:`record`'s hook once the deepest layer is read (``stop=True``); :func:`record` swallows it
    when it leaves its ``with`` block. Catch it yourself around a forward inside a long-lived recording."""


def _hidden(output: Any) -> Any:
    return output[0] if isinstance(output, tuple | list) else output


def _hook_point(blocks: Sequence[Any], layer: int, final_norm: Any | None) -> tuple[Any, bool]:
    """The module whose hook sees ``layer`` and whether it is a pre-hook (input of block 0)."""
    n = len(blocks)
    if layer < 0 or layer > n:
        raise ConfigError(f"layer {layer} out of range: the model has layers 0..{n}")
    if layer == 0:
        return blocks[0], True
    if layer == n and final_norm is not None:
        return final_norm, False
    return blocks[layer - 1], False


@contextlib.contextmanager
def record(
    blocks: Sequence[Any],
    layers: Sequence[int],
    *,
    reduce: Reduce | None = None,
    stop: bool = False,
    final_norm: Any | None = None,
) -> Iterator[dict[int, Any]]:
    """Record ``layers`` (``hidden_states`` indices) of every forward run inside the block; hooks always removed.

    Args:
        blocks: the decoder blocks, in order.
        layers: layers to record.
        reduce: applied in the hook (on the device) to each layer's hidden states; its result is recorded, so a
            forward keeps ``[batch, d]`` instead of ``[batch, tokens, d]``. Default: keep the hidden states.
        stop: raise :class:`StopForward` once the deepest layer is recorded (the rest of the forward is skipped);
            swallowed when raised inside the ``with`` block.
        final_norm: the final-norm module, for layer ``len(blocks)``.

    Yields:
        a dict ``layer -> value`` of the latest forward (overwritten by the next).
    """
    out: dict[int, Any] = {}
    deepest = max(layers)
    keep = reduce or (lambda layer, hidden: hidden)

    def take(layer: int, hidden: Any) -> None:
        value = keep(layer, hidden)
        if value is not None:
            out[layer] = value
        if stop and layer == deepest:
            raise StopForward

    def pre(layer: int) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> None:
            take(layer, args[0] if args else kwargs["hidden_states"])

        return hook

    def post(layer: int) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> None:
            take(layer, _hidden(output))

        return hook

    handles = []
    try:
        for layer in sorted(set(layers)):
            module, is_pre = _hook_point(blocks, layer, final_norm)
            if is_pre:
                handles.append(module.register_forward_pre_hook(pre(layer), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post(layer)))
        try:
            yield out
        except StopForward:
            pass
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def patch(
    blocks: Sequence[Any], edits: Mapping[int, Callable[[Any], Any]], *, final_norm: Any | None = None
) -> Iterator[None]:
    """Replace layers while inside the block: ``edits[layer](hidden) -> new hidden`` (``hidden_states`` indices;
    layer 0 edits the input of block 0). Hooks always removed.

    Example:
        >>> with patch(loaded.layers, {20: lambda h: h + 4.0 * v}):
        ...     model.generate(**inputs)
    """

    def pre(fn: Callable[[Any], Any]) -> Callable:
        def hook(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
            if args:
                return (fn(args[0]), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}

        return hook

    def post(fn: Callable[[Any], Any]) -> Callable:
        def hook(module: Any, args: Any, output: Any) -> Any:
            if isinstance(output, tuple):
                return (fn(output[0]), *output[1:])
            if isinstance(output, list):
                return [fn(output[0]), *output[1:]]
            return fn(output)

        return hook

    handles = []
    try:
        for layer, fn in sorted(edits.items()):
            module, is_pre = _hook_point(blocks, layer, final_norm)
            if is_pre:
                handles.append(module.register_forward_pre_hook(pre(fn), with_kwargs=True))
            else:
                handles.append(module.register_forward_hook(post(fn)))
        yield
    finally:
        for handle in handles:
            handle.remove()
