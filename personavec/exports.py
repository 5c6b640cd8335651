"""Exports of one *direction* (one group of a vectors run, at every layer it holds) that other tools load.

- **GGUF control vector** (``.gguf``), as llama.cpp's ``--control-vector`` reads it and repeng's ``export_gguf``
  writes it: ``general.architecture = "controlvector"``, ``controlvector.model_hint`` (transformers'
  ``model_type``, e.g. ``llama``, ``gpt_neox``), ``controlvector.layer_count`` (number of direction tensors), and
  one 1-D float32 tensor ``direction.<k>`` of ``d_model`` values per layer. We add ``controlvector.personavec``
  (the provenance as JSON), which llama.cpp ignores.
- **safetensors** (``.safetensors``): one float32 tensor ``layer.<L>`` per layer in our numbering, the provenance
  as JSON in the metadata (``personavec``) with the numbering spelled out.

Layer numbering. Ours is the seed's ``hidden_states`` index: ``L = 0`` is the embedding output, ``L`` in
``1..n-1`` the output of decoder block ``L-1``, ``L = n`` the final-norm output. llama.cpp adds ``direction.k`` to
the output of block ``k`` (0-based; ``build_cvec(cur, il)`` right after the block's last residual add) and refuses
``direction.0`` at load time; repeng's layer ``k`` is also the output of ``model.layers[k]``. So **ours = theirs +
1**: our layer ``L`` is written as ``direction.{L-1}``, for ``2 <= L <= n-1``. Layer 0 (embeddings), layer 1 (block
0, which llama.cpp cannot steer) and layer ``n`` (after the final norm, not the residual stream llama.cpp adds to)
have no llama.cpp counterpart: they are skipped when exporting all layers and refused when named.

The vector is written as stored (e.g. ``mean(pos) - mean(neg)`` in residual-stream units): llama.cpp scales it with
``--control-vector-scaled FILE SCALE``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from personavec.errors import ConfigError, InputFileError
from personavec.workspace import Workspace

#: Export formats of a direction, by file suffix.
DIRECTION_FORMATS = {".gguf": "gguf", ".safetensors": "safetensors"}
CONTROL_VECTOR_ARCH = "controlvector"
SAFETENSORS_FORMAT = "personavec-direction/1"


@dataclass(frozen=True)
class Direction:
    """One group of a vectors run across layers: ``vectors[L]`` is a float32 ``[d_model]`` array, ``L`` a
    ``hidden_states`` index."""

    run_id: int
    group: str
    vectors: dict[int, np.ndarray]
    n_examples: int
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return str(self.provenance.get("model", ""))

    @property
    def n_model_layers(self) -> int | None:
        n = self.provenance.get("n_model_layers")
        return int(n) if n is not None else None

    @property
    def d_model(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_direction` wrote: ``layers`` maps each exported layer of ours to its index in the file
    (the same for safetensors, ``L-1`` for GGUF); ``skipped`` gives the reason for each layer left out."""

    path: Path
    format: str
    group: str
    layers: dict[int, int]
    skipped: dict[int, str]
    model_hint: str | None = None
    model_hint_note: str | None = None  # where the hint came from when the vectors run recorded no model_type


def load_direction(
    run_id: int,
    group: str,
    layers: tuple[int, ...] | None = None,
    *,
    workspace: Workspace | str | os.PathLike[str] | None = None,
) -> Direction:
    """One group of vectors run ``run_id`` at ``layers`` (default: every layer the run holds).

    Example: ``load_direction(9, "pirate", workspace=ws).vectors[20]``."""
    from personavec.store.vectors import read_group_vectors

    ws = workspace if isinstance(workspace, Workspace) else Workspace.resolve(workspace)
    info, vectors, n_examples = read_group_vectors(ws.catalog(read_only=True), run_id, group)
    if layers is not None:
        missing = [layer for layer in layers if layer not in vectors]
        if missing:
            raise ConfigError(
                f"vectors run {run_id} has no layer(s) {', '.join(map(str, missing))}; "
                f"its layers are {', '.join(map(str, sorted(vectors)))}"
            )
        vectors = {layer: vectors[layer] for layer in layers}
    provenance = {
        **info.config,
        "run_id": run_id,
        "group": group,
        "group_n_examples": n_examples,
        "package_version": info.package_version,
        "created_at": info.created_at,
        "status": info.status,
    }
    return Direction(run_id, group, dict(sorted(vectors.items())), n_examples, provenance)


def llama_cpp_layer(layer: int, n_model_layers: int | None) -> int | str:
    """llama.cpp's (and repeng's) layer index for our ``hidden_states`` layer ``layer``: ``layer - 1`` (the output
    of block ``layer - 1``), or the reason why it has none."""
    if layer == 0:
        return "layer 0 is the embedding output, which llama.cpp cannot steer"
    if layer == 1:
        return "layer 1 is the output of block 0, which llama.cpp refuses (direction.0)"
    if n_model_layers is not None and layer >= n_model_layers:
        return f"layer {layer} is the final-norm output, not the residual stream llama.cpp adds to"
    return layer - 1


_ARCH_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel", "Model")


def model_type_of_architecture(architecture: str) -> str | None:
    """transformers' ``model_type`` whose auto classes include ``architecture`` (``GPTNeoXForCausalLM`` ->
    ``gpt_neox``), or None when transformers maps no model type, or several, to it. Where several model types share
    the class (``LlamaForCausalLM``: ``llama``, ``exaone``...), the one spelled like the class is taken (``llama``)."""
    from transformers.models.auto import modeling_auto

    types = set()
    for name in dir(modeling_auto):
        mapping = getattr(modeling_auto, name) if name.endswith("_MAPPING_NAMES") else None
        if isinstance(mapping, dict):
            for model_type, classes in mapping.items():
                if architecture in (classes if isinstance(classes, tuple | list) else (classes,)):
                    types.add(str(model_type))
    if len(types) == 1:
        return types.pop()
    spelled = next((architecture[: -len(x)] for x in _ARCH_SUFFIXES if architecture.endswith(x)), "").lower()
    return spelled if spelled in types else None


def model_hint_for(provenance: dict[str, Any]) -> tuple[str, str | None]:
    """``(hint, note)``: repeng's and llama.cpp's ``controlvector.model_hint``, which is transformers'
    ``model_type`` (``gpt_neox``, ``qwen3_moe``; repeng writes ``model.config.model_type``).

    The extraction run records the model's ``config.model_type`` and the vectors run carries it (``note`` is None).
    Runs recorded before that have only the architecture class: its model type is looked up in transformers' auto
    mappings and ``note`` says so. :class:`ConfigError` when neither gives one: pass ``model_hint``."""
    model_type = provenance.get("model_type")
    if isinstance(model_type, str) and model_type:
        return model_type, None
    run = provenance.get("run_id", "?")
    arch = str(provenance.get("architecture") or "")
    found = model_type_of_architecture(arch) if arch else None
    if found is None:
        raise ConfigError(
            f"vectors run {run} records no model_type (computed before personavec recorded it) and transformers "
            f"maps no single model type to its architecture {arch or '(none recorded)'!r}: give the model hint, "
            "transformers' model_type of the model (--model-hint, e.g. llama)"
        )
    return found, (
        f"vectors run {run} records no model_type (computed before personavec recorded it): model_hint {found!r} is "
        f"transformers' model type of its architecture {arch}; --model-hint overrides it"
    )


def export_direction(
    direction: Direction,
    path: str | os.PathLike[str],
    fmt: str | None = None,
    *,
    layers_named: bool = False,
    model_hint: str | None = None,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``direction`` as a llama.cpp control vector (``gguf``) or one-tensor-per-layer ``safetensors`` (see
    the module docstring for both layouts and the layer mapping).

    Args:
        direction: from :func:`load_direction`.
        path: output file; ``fmt`` defaults to its suffix (``.gguf``, ``.safetensors``).
        layers_named: the caller named the layers: a layer llama.cpp has no index for is an error instead of
            being skipped.
        model_hint: GGUF ``controlvector.model_hint`` (default: the recorded ``model_type``, see
            :func:`model_hint_for`).
        overwrite: replace an existing file.

    Example: ``export_direction(load_direction(9, "pirate", workspace=ws), "pirate.gguf")``.
    """
    from personavec.files import atomic_write

    path = Path(path)
    fmt = fmt or DIRECTION_FORMATS.get(path.suffix.lower(), "")
    if fmt not in DIRECTION_FORMATS.values():
        raise ConfigError(
            f"{path}: a direction exports to {', '.join(DIRECTION_FORMATS)} (by suffix or --format gguf/safetensors)"
        )
    if path.is_dir():
        raise InputFileError(f"{path} is a directory: give a file name such as {path / f'{direction.group}.{fmt}'}")
    if path.exists() and not overwrite:
        raise InputFileError(f"{path} exists: pass overwrite (--overwrite) to replace it")
    meta = json.dumps(direction.provenance, sort_keys=True, default=str)
    if fmt == "safetensors":
        mapping = {layer: layer for layer in direction.vectors}
        atomic_write(path, lambda tmp: _write_safetensors(direction, tmp, meta))
        return ExportResult(path, fmt, direction.group, mapping, {})

    mapping, skipped = {}, {}
    for layer in direction.vectors:
        target = llama_cpp_layer(layer, direction.n_model_layers)
        if isinstance(target, str):
            skipped[layer] = target
        else:
            mapping[layer] = target
    if skipped and layers_named:
        raise ConfigError("; ".join(f"cannot export layer {k}: {why}" for k, why in skipped.items()))
    if not mapping:
        raise ConfigError(
            f"vectors run {direction.run_id} holds no layer llama.cpp can steer ({'; '.join(skipped.values())}): "
            "compute vectors at layers 2..n-1"
        )
    hint, note = (model_hint, None) if model_hint else model_hint_for(direction.provenance)
    if not re.fullmatch(r"[\w.\-]+", hint):
        raise ConfigError(f"model hint {hint!r} must be a model type such as 'llama' or 'gpt_neox'")
    atomic_write(path, lambda tmp: _write_gguf(direction, mapping, hint, meta, tmp))
    return ExportResult(path, fmt, direction.group, mapping, skipped, hint, note)


def _write_gguf(direction: Direction, mapping: dict[int, int], hint: str, meta: str, tmp: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(tmp), CONTROL_VECTOR_ARCH)
    try:
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.model_hint", hint)
        writer.add_uint32(f"{CONTROL_VECTOR_ARCH}.layer_count", len(mapping))
        writer.add_string(f"{CONTROL_VECTOR_ARCH}.personavec", meta)
        for ours, theirs in sorted(mapping.items(), key=lambda kv: kv[1]):
            writer.add_tensor(f"direction.{theirs}", np.ascontiguousarray(direction.vectors[ours], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _write_safetensors(direction: Direction, tmp: Path, meta: str) -> None:
    from safetensors.numpy import save_file

    tensors = {f"layer.{k}": np.ascontiguousarray(v, dtype=np.float32) for k, v in direction.vectors.items()}
    metadata = {
        "format": SAFETENSORS_FORMAT,
        "group": direction.group,
        "model": direction.model,
        "layer_numbering": "hidden_states: layer.L is the output of decoder block L-1 (layer.0 the embeddings); "
        "llama.cpp/repeng layer = L - 1",
        "personavec": meta,
    }
    save_file(tensors, str(tmp), metadata=metadata)


__all__ = [
    "DIRECTION_FORMATS",
    "Direction",
    "ExportResult",
    "export_direction",
    "llama_cpp_layer",
    "load_direction",
    "model_hint_for",
    "model_type_of_architecture",
]
