"""The seed's file helpers, kept name for name: responses as the seed's JSON cache, vectors as a ``.pt`` dict.

The seed's model-facing names (``ActivationExtractor``, ``extract_persona_vectors``, ``generate_responses``)
live with their stages and are re-exported from ``personavec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch

from personavec.errors import InputFileError
from personavec.files import atomic_write
from personavec.ingest import read_response_file


def save_responses(responses: Mapping[tuple[str, str], str], path: str | os.PathLike[str]) -> None:
    """Write ``{(persona, question): text}`` in the seed's cache format: a JSON object whose keys are
    JSON-encoded ``[persona, question]`` lists."""
    doc = {json.dumps([p, q], ensure_ascii=False): text for (p, q), text in responses.items()}
    atomic_write(Path(path), lambda tmp: tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False), "utf-8"))


def load_responses(path: str | os.PathLike[str]) -> dict[tuple[str, str], str]:
    """Read the seed's cache format back into ``{(persona, question): text}`` (validated, see ingest)."""
    table = read_response_file(Path(path), "seed-json")
    return {
        (p, q): t
        for p, q, t in zip(
            table["persona"].to_pylist(), table["question"].to_pylist(), table["text"].to_pylist(), strict=True
        )
    }


def save_persona_vectors(vectors: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Save ``{persona: Tensor[d_model]}`` as the seed's ``.pt`` dict (tensors moved to CPU)."""
    data = {k: v.detach().cpu() for k, v in vectors.items()}
    atomic_write(Path(path), lambda tmp: torch.save(data, tmp))


def load_persona_vectors(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a ``.pt`` dict of vectors with ``weights_only=True`` (no code from the file runs)."""
    path = Path(path)
    if not path.is_file():
        raise InputFileError(f"{path}: no such file")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or unsafe files
        raise InputFileError(f"{path}: not a persona-vector .pt file loadable with weights_only=True: {exc}") from exc
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise InputFileError(f"{path}: expected a dict of persona name -> tensor")
    return data


# The seed's extraction names live with the extraction stage.
from personavec.extract import ActivationExtractor, extract_persona_vectors  # noqa: E402

__all__ = [
    "ActivationExtractor",
    "extract_persona_vectors",
    "load_persona_vectors",
    "load_responses",
    "save_persona_vectors",
    "save_responses",
]
