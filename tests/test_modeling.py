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
    context_length,
    d_model_of,
    decoder_layers,
    final_norm,
    load_model,
    local_model_path,
    max_positions,
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
    norm = final_norm(model)  # found next to the blocks
    assert isinstance(norm, torch.nn.Module) and not isinstance(norm, torch.nn.ModuleList)
    assert type(norm).__name__.lower().endswith(("norm", "layernorm"))


class _Wrapped(torch.nn.Module):
    """A layout no auto-detection knows: the decoder under ``backbone``."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = inner.model


class _NoNorm(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2)])


def test_layers_path_names_an_unknown_layout() -> None:
    odd = _Wrapped(AutoModelForCausalLM.from_config(tiny_config("llama")))
    with pytest.raises(ModelError, match="name their ModuleList with --layers-path"):
        decoder_layers(odd)
    assert decoder_layers(odd, "backbone.layers") is odd.backbone.layers
    assert final_norm(odd, "backbone.layers") is odd.backbone.norm
    with pytest.raises(ModelError, match="'backbone.norm' does not name a non-empty torch.nn.ModuleList"):
        decoder_layers(odd, "backbone.norm")
    with pytest.raises(ModelError, match="cannot find the final norm"):
        final_norm(_NoNorm(), "blocks")


def test_max_positions_is_the_one_position_limit(tmp_path: Path) -> None:
    assert max_positions(tiny_config("gpt2")) == 1024  # n_positions
    assert max_positions(tiny_config("gemma3")) == max_positions(tiny_config("gemma3").text_config)  # text config
    assert max_positions(object()) is None

    class Tok:
        model_max_length = 512

    assert context_length(object(), Tok()) == 512
    Tok.model_max_length = int(1e30)  # "no limit" sentinel of tokenizers
    assert context_length(object(), Tok()) is None
    assert context_length(tiny_config("llama"), Tok()) == tiny_config("llama").max_position_embeddings


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


def test_gguf_cache_is_keyed_by_content(tmp_path, monkeypatch):
    from personavec import modeling

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    a = tmp_path / "a" / "m.gguf"
    b = tmp_path / "b" / "m.gguf"
    for path in (a, b):
        path.parent.mkdir()
        path.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    assert modeling._cache_dir_for(a) == modeling._cache_dir_for(b)  # two copies (clones, venvs): one conversion
    b.write_bytes(b"GGUF" + bytes(255 - i for i in range(256)) * 64)
    assert modeling._cache_dir_for(a) != modeling._cache_dir_for(b)


def test_bad_model_inputs_fail_fast_with_one_line(cli, workspace, tmp_path, monkeypatch):
    import time

    from personavec.cli import app

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"this is not a gguf file" * 100)
    w = ["-w", str(workspace.root), "--responses-run", "1"]
    with monkeypatch.context() as m:  # an empty model cache for the garbage file only (not for the embedded model:
        m.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))  # converting it again took ~20 s of this test)
        res = cli.invoke(app, ["extract", "--model", str(garbage), *w])
        assert res.exit_code == 2 and "not a GGUF model transformers can load" in res.output
        assert not list((tmp_path / "cache" / "models").glob("garbage*"))  # nothing half-converted left behind
    res = cli.invoke(app, ["extract", "--device", "cuda", *w])
    assert res.exit_code == 2 and "sees no CUDA device" in res.output
    t = time.monotonic()
    res = cli.invoke(app, ["extract", "--model", "no-such-org/no-such-model-xyz", *w])
    assert res.exit_code != 0 and "not in the local Hugging Face cache" in res.output
    assert time.monotonic() - t < 15  # this machine is offline: no minute of retries
