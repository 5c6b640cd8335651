"""Model resolution (embedded GGUF -> cached safetensors dir) and decoder-layer resolution per architecture."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config, tiny_model_dir
from transformers import AutoModelForCausalLM

from personavec.errors import ModelError
from personavec.modeling import (
    EMBEDDED_ALIAS,
    SOURCE_FILE,
    d_model_of,
    decoder_layers,
    load_model,
    local_model_path,
    n_layers_of,
)

ARCHS = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3text", "gemma3", "olmo2", "olmo3", "phi3", "gpt2"]


@pytest.mark.parametrize("arch", ARCHS)
def test_decoder_layers_every_family(arch: str) -> None:
    config = tiny_config(arch)
    if arch == "gemma3":
        from transformers import Gemma3ForConditionalGeneration

        model = Gemma3ForConditionalGeneration(config)
    else:
        model = AutoModelForCausalLM.from_config(config)
    layers = decoder_layers(model)
    assert isinstance(layers, torch.nn.ModuleList)
    assert len(layers) == n_layers_of(config) == 4
    assert d_model_of(config) == 64


def test_local_dir_returned_as_is_and_hub_id_passthrough(tmp_path: Path) -> None:
    d = tiny_model_dir(tmp_path, "llama")
    assert local_model_path(str(d)) == d
    assert str(local_model_path("google/gemma-3-27b-it")) == "google/gemma-3-27b-it"
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        local_model_path(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="does not exist"):
        local_model_path(str(tmp_path / "missing.gguf"))


@pytest.mark.slow
def test_embedded_model_cached_and_fast_to_load() -> None:
    path = local_model_path(EMBEDDED_ALIAS)  # converts on the first call of the machine (~25 s), then cached
    assert (path / "model.safetensors").is_file() and (path / SOURCE_FILE).is_file()
    assert not any(p.name.endswith(".tmp") for p in path.parent.iterdir())
    start = time.perf_counter()
    assert local_model_path(EMBEDDED_ALIAS) == path
    loaded = load_model(EMBEDDED_ALIAS, dtype="float32", device="cpu")
    elapsed = time.perf_counter() - start
    assert elapsed < 3.0, f"cached load took {elapsed:.2f} s"
    assert (loaded.n_layers, loaded.d_model) == (30, 576)
    assert loaded.revision and loaded.revision.startswith("sha256:")
    assert "quantization_config" not in loaded.model.config.to_dict()
    # SmolLM2's template injects its default system prompt when none is given.
    text = loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert "You are a helpful AI assistant named SmolLM" in text
