"""Model resolution (embedded GGUF -> cached safetensors dir) and decoder-layer resolution per architecture."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_config, tiny_gguf, tiny_model_dir
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
    # a --model that names no model is bad input (exit 2), as a garbage .gguf is (it exited 1)
    (tmp_path / "notes.txt").write_text("x")
    for name, match in [
        (tmp_path / "empty", "config.json"),
        (tmp_path / "missing.gguf", "does not exist"),
        (tmp_path / "notes.txt", "neither a model directory nor a .gguf file"),
        ("not a valid/repo/id", "is not a local directory, a .gguf file"),
    ]:
        with pytest.raises(ModelError, match=match) as info:
            load_model(str(name))
        assert info.value.exit_code == 2


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


@pytest.fixture(scope="module")
def gguf_file(tmp_path_factory) -> Path:
    return tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.mark.slow
def test_a_conversion_reads_the_file_once_and_converts_as_transformers_does(gguf_file, tmp_path, monkeypatch):
    import gguf
    from safetensors.torch import load_file

    from personavec import modeling

    opened = []

    class CountingReader(gguf.GGUFReader):
        def __init__(self, path, *args):
            opened.append(str(path))
            super().__init__(path, *args)

    monkeypatch.setattr(gguf, "GGUFReader", CountingReader)
    once = modeling.convert_gguf(gguf_file, tmp_path / "once")
    assert opened == [str(gguf_file)]  # transformers alone opens it three times (tokenizer, config, weights)
    assert gguf.GGUFReader is CountingReader  # put back
    with modeling._gguf_parsed_once():
        kept = gguf.GGUFReader  # as a module importing it during a conversion would keep it
        first = kept(gguf_file)
        assert kept(gguf_file) is first
    assert kept(gguf_file) is not first  # afterwards it reads afresh, as gguf's own
    monkeypatch.setattr(modeling, "_gguf_parsed_once", contextlib.nullcontext)
    before = len(opened)
    plain = modeling.convert_gguf(gguf_file, tmp_path / "plain")
    assert len(opened) - before > 1
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (once / name).read_text() == (plain / name).read_text(), name
    a, b = load_file(once / "model.safetensors"), load_file(plain / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    loaded = load_model(str(once), dtype="float32", device="cpu")
    assert (loaded.n_layers, loaded.d_model) == (4, 64)


@pytest.mark.slow
def test_a_process_needing_a_gguf_another_converts_waits_and_uses_that_conversion(gguf_file, tmp_path):
    """Two processes at once (both test workers on a fresh machine, two commands) convert a file once: the second
    waits on the cache entry's lock and takes the first one's result."""
    from personavec import modeling

    env = {**os.environ, "PERSONAVEC_CACHE": str(tmp_path / "cache")}
    code = (
        "import sys; from personavec import modeling as m; calls = []; convert = m.convert_gguf\n"
        "m.convert_gguf = lambda *a: calls.append(a) or convert(*a)\n"
        "print('ready', flush=True); path = m.local_model_path(sys.argv[1]); print(path, len(calls), flush=True)"
    )
    with pytest.MonkeyPatch.context() as m:
        m.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
        out = modeling._cache_dir_for(gguf_file)
        waiter = None
        try:
            with modeling._conversion_lock(out):  # this process converts
                waiter = subprocess.Popen(
                    [sys.executable, "-c", code, str(gguf_file)], env=env, stdout=subprocess.PIPE, text=True
                )
                assert waiter.stdout is not None and waiter.stdout.readline().strip() == "ready"
                time.sleep(1.0)
                assert waiter.poll() is None, "the second process did not wait for the lock"
                modeling.convert_gguf(gguf_file, out)
            stdout, _ = waiter.communicate(timeout=60)
        finally:
            if waiter is not None:
                waiter.kill()
                waiter.wait()
    assert waiter.returncode == 0 and stdout.split() == [str(out), "0"]  # no second conversion
    assert json.loads((out / SOURCE_FILE).read_text())["file"] == "tiny.gguf"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


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
