"""The seed's API, kept name for name, as thin wrappers over the stages.

- ``ActivationExtractor`` / ``extract_persona_vectors``: the seed's extraction, over the compute core
  (:mod:`personavec.extract.core`);
- ``save_responses`` / ``load_responses``: responses as the seed's JSON cache;
- ``save_persona_vectors`` / ``load_persona_vectors``: vectors as a ``.pt`` dict.

``generate_responses`` lives with the generate stage; all are re-exported from ``personavec``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from personavec.config import PersonaVectorConfig
from personavec.errors import ConfigError, InputFileError
from personavec.extract.config import ExtractConfig, encode_response, load_for
from personavec.extract.core import mean_activations
from personavec.files import atomic_write
from personavec.ingest import read_response_file
from personavec.modeling import LoadedModel


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


class ActivationExtractor:
    """The seed's extractor: lazy-loads ``config.model_name`` on first use and extracts mean response activations.

    Example:
        >>> extractor = ActivationExtractor(PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32"))
        >>> extractor.extract_activations(["You are a pirate."], ["Hi?"], ["Arr!"], layer=20).shape
        torch.Size([1, 576])
    """

    def __init__(self, config: PersonaVectorConfig | None = None) -> None:
        self.config = config if config is not None else PersonaVectorConfig()
        self._loaded: LoadedModel | None = None

    @property
    def extract_config(self) -> ExtractConfig:
        """The extraction settings this extractor uses (model, dtype, device, batching, span rule, format)."""
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
        """The seed's default layer (:func:`personavec.config.default_layer` of ``config.layer_fraction``)."""
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
        ``{persona: Tensor[d_model]}`` (float32), for every persona with at least one response that has tokens (an
        empty answer has none to average: it is left out, as extraction leaves out a row with no span; it made the
        persona's vector all NaN).
    """
    if not isinstance(personas, Mapping):
        raise ConfigError(f"personas is {{name: system_prompt}}, got {type(personas).__name__}")
    if isinstance(questions, str):
        raise ConfigError("questions is a list of questions, got one string: wrap it in a list")
    keys = [(p, q) for p in personas for q in questions if (p, q) in responses]
    acts = extractor.extract_activations(
        [personas[p] for p, _ in keys], [q for _, q in keys], [responses[k] for k in keys], layer
    )
    answered = torch.isfinite(acts).all(-1).tolist() if len(keys) else []
    vectors: dict[str, torch.Tensor] = {}
    for name in personas:
        rows = [i for i, (p, _) in enumerate(keys) if p == name and answered[i]]
        if rows:
            vectors[name] = acts[rows].mean(0)
    return vectors


__all__ = [
    "ActivationExtractor",
    "extract_persona_vectors",
    "load_persona_vectors",
    "load_responses",
    "save_persona_vectors",
    "save_responses",
]
