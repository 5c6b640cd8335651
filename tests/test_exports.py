"""Direction exports: a llama.cpp control vector (GGUF, read back with the gguf package as llama.cpp reads it) and
one-tensor-per-layer safetensors with provenance, from a synthetic vectors run with known values."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
from safetensors import safe_open

from personavec.cli import app
from personavec.errors import ConfigError, InputFileError
from personavec.exports import export_direction, llama_cpp_layer, load_direction, model_hint_for
from personavec.vectors import VectorConfig, compute_vectors, load_vectors

LAYERS = (0, 1, 2, 5, 8)  # the synthetic model has 8 blocks: hidden_states 0..8


@pytest.fixture
def vector_run(workspace, make_extraction_run):
    # an extraction recorded before personavec kept the model_type: the GGUF hint falls back to the architecture
    ext = make_extraction_run(workspace, layers=LAYERS, d_model=16, architecture="GPTNeoXForCausalLM")
    return compute_vectors(workspace, VectorConfig(ext.run_id)).run_id


def read_gguf(path) -> tuple[dict, dict]:
    """(key -> value, tensor name -> (shape, type, data)) as the gguf package reads the file."""
    reader = gguf.GGUFReader(path)
    fields = {}
    for name, f in reader.fields.items():
        if f.types and f.types[0] == gguf.GGUFValueType.STRING:
            fields[name] = bytes(f.parts[-1]).decode()
        elif f.types:
            fields[name] = f.parts[-1][0].item()
    tensors = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type, np.array(t.data)) for t in reader.tensors}
    return fields, tensors


def check_as_llama_cpp_would(tensors: dict) -> None:
    """common_control_vector_load_one's rules: names direction.<k>, k an integer >= 1, 1-D F32, one n_embd."""
    n_embd = set()
    for name, (shape, ttype, _) in tensors.items():
        prefix, _, k = name.partition(".")
        assert prefix == "direction" and k.isdigit() and int(k) >= 1, name
        assert ttype == gguf.GGMLQuantizationType.F32 and len(shape) == 1
        n_embd.add(shape[0])
    assert len(n_embd) == 1


def test_layer_mapping_to_llama_cpp():
    # ours = theirs + 1: hidden_states[L] is the output of block L-1, which llama.cpp steers with direction.(L-1)
    assert [llama_cpp_layer(layer, 8) for layer in (2, 5, 7)] == [1, 4, 6]
    for layer, why in ((0, "embedding"), (1, "direction.0"), (8, "final-norm")):
        assert why in llama_cpp_layer(layer, 8)


def test_model_hint_is_transformers_model_type():
    # recorded with the run: used as is
    assert model_hint_for({"model_type": "qwen3_moe", "architecture": "Qwen3MoeForCausalLM"}) == ("qwen3_moe", None)
    # older runs: transformers' auto mappings, and a note saying so
    hint, note = model_hint_for({"run_id": 7, "architecture": "GPTNeoXForCausalLM"})
    assert hint == "gpt_neox" and "vectors run 7 records no model_type" in note and "GPTNeoXForCausalLM" in note
    for arch, model_type in (
        ("Qwen3MoeForCausalLM", "qwen3_moe"),
        ("LlamaForCausalLM", "llama"),  # also exaone's, internlm3's...: the one spelled like the class
        ("Gemma3ForConditionalGeneration", "gemma3"),
        ("Gemma3ForCausalLM", "gemma3_text"),
        ("GPT2LMHeadModel", "gpt2"),
    ):
        assert model_hint_for({"architecture": arch})[0] == model_type, arch
    for prov in ({"architecture": "Synthetic"}, {"architecture": "", "model": "org/Qwen3-8B"}):
        with pytest.raises(ConfigError, match="records no model_type.*--model-hint"):
            model_hint_for(prov)


def test_gguf_control_vector_reads_back_as_llama_cpp_expects(workspace, vector_run, tmp_path):
    direction = load_direction(vector_run, "ghost", workspace=workspace)
    assert sorted(direction.vectors) == list(LAYERS) and direction.n_examples == 3
    res = export_direction(direction, tmp_path / "ghost.gguf")
    assert res.format == "gguf" and res.layers == {2: 1, 5: 4} and sorted(res.skipped) == [0, 1, 8]
    fields, tensors = read_gguf(tmp_path / "ghost.gguf")
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.model_hint"] == res.model_hint == "gpt_neox"  # not "gptneox" from the class name
    assert "records no model_type" in res.model_hint_note
    assert fields["controlvector.layer_count"] == 2
    prov = json.loads(fields["controlvector.personavec"])
    assert prov["run_id"] == vector_run and prov["group"] == "ghost" and prov["model"] == "synthetic/model"
    assert sorted(tensors) == ["direction.1", "direction.4"]
    check_as_llama_cpp_would(tensors)
    for ours, theirs in res.layers.items():
        want = load_vectors(vector_run, ours, workspace=workspace)["ghost"].numpy()
        np.testing.assert_array_equal(tensors[f"direction.{theirs}"][2], want)
        assert tensors[f"direction.{theirs}"][0] == (16,)


def test_gguf_named_layers_and_refusals(workspace, vector_run, tmp_path):
    out = tmp_path / "g.gguf"
    res = export_direction(load_direction(vector_run, "ghost", (5,), workspace=workspace), out, model_hint="llama")
    assert res.layers == {5: 4} and read_gguf(out)[0]["controlvector.model_hint"] == "llama"
    with pytest.raises(InputFileError, match="exists"):
        export_direction(load_direction(vector_run, "ghost", (5,), workspace=workspace), out)
    with pytest.raises(ConfigError, match="cannot export layer 8: .*final-norm"):
        export_direction(
            load_direction(vector_run, "ghost", (5, 8), workspace=workspace), tmp_path / "h.gguf", layers_named=True
        )
    with pytest.raises(ConfigError, match="no layer llama.cpp can steer"):
        export_direction(load_direction(vector_run, "ghost", (0, 1), workspace=workspace), tmp_path / "none.gguf")
    with pytest.raises(ConfigError, match="no group 'nobody'.*ghost"):
        load_direction(vector_run, "nobody", workspace=workspace)
    with pytest.raises(ConfigError, match="no layer"):
        load_direction(vector_run, "ghost", (3,), workspace=workspace)
    with pytest.raises(ConfigError, match="gguf"):
        export_direction(load_direction(vector_run, "ghost", workspace=workspace), tmp_path / "x.npz")


def test_safetensors_one_tensor_per_layer_with_provenance(workspace, vector_run, tmp_path):
    res = export_direction(load_direction(vector_run, "cynic", workspace=workspace), tmp_path / "cynic.safetensors")
    assert res.layers == {layer: layer for layer in LAYERS} and not res.skipped
    with safe_open(str(tmp_path / "cynic.safetensors"), "np") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == sorted(f"layer.{layer}" for layer in LAYERS)
        for layer in LAYERS:
            want = load_vectors(vector_run, layer, workspace=workspace)["cynic"].numpy()
            got = f.get_tensor(f"layer.{layer}")
            assert got.dtype == np.float32 and got.shape == (16,)
            np.testing.assert_array_equal(got, want)
    assert meta["format"] == "personavec-direction/1" and meta["group"] == "cynic"
    assert "llama.cpp/repeng layer = L - 1" in meta["layer_numbering"]
    prov = json.loads(meta["personavec"])
    assert prov["extraction_run_id"] and prov["group_n_examples"] == 3 and prov["layers"] == list(LAYERS)


def test_safetensors_exports_respect_the_umask(workspace, vector_run, tmp_path):
    import os
    import stat

    from personavec.exports import export_direction, load_direction
    from personavec.vectors import export_vectors, load_vectors

    old = os.umask(0o022)
    try:
        export_vectors(load_vectors(vector_run, 5, workspace=workspace), tmp_path / "v.safetensors")
        export_direction(load_direction(vector_run, "ghost", workspace=workspace), tmp_path / "d.safetensors")
    finally:
        os.umask(old)
    for name in ("v.safetensors", "d.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644, name


@pytest.mark.slow
def test_cli_export_direction(workspace, vector_run, tmp_path, cli):
    out = tmp_path / "ghost.gguf"
    base = ["export-direction", str(vector_run), "ghost", str(out), "-w", str(workspace.root)]
    res = cli.invoke(app, base + ["--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert got["layers"] == {"2": 1, "5": 4} and got["model_hint"] == "gpt_neox"
    res = cli.invoke(app, base)
    assert res.exit_code == 2 and "exists" in res.output
    res = cli.invoke(app, base + ["--overwrite", "-l", "8"])
    assert res.exit_code == 2 and "final-norm" in res.output
    res = cli.invoke(app, base + ["--overwrite", "-l", "5"])
    assert res.exit_code == 0 and "5->4" in res.output
    assert "note: vectors run" in res.output and "model_hint 'gpt_neox'" in res.output


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt_neox", "qwen3_moe"])
def test_extraction_records_model_type_and_the_gguf_hint_uses_it(
    arch, workspace, seed_cache_file, tiny_root, tmp_path, cli
):
    """The GGUF model_hint was derived from the class name (GPTNeoXForCausalLM -> 'gptneox'); repeng writes
    transformers' model_type. A real extraction on a tiny model records it, the vectors carry it, the export uses it."""
    from tiny_models import tiny_model_dir

    from personavec.extract import ExtractConfig, run_extraction
    from personavec.ingest import IngestConfig, ingest
    from personavec.store.extraction import get_extraction_run

    responses = ingest(workspace, IngestConfig("responses", seed_cache_file)).run_id
    model = str(tiny_model_dir(tiny_root, arch, "chatml"))
    ext = run_extraction(workspace, ExtractConfig(responses_run=responses, model=model, layers=(2, 3), device="cpu"))
    info = get_extraction_run(workspace.catalog(), ext.run_id)
    assert info.model_type == arch and info.architecture != arch  # GPTNeoXForCausalLM / Qwen3MoeForCausalLM
    vectors = compute_vectors(workspace, VectorConfig(ext.run_id)).run_id
    assert load_vectors(vectors, 2, workspace=workspace).provenance["model_type"] == arch
    out = tmp_path / "d.gguf"
    res = cli.invoke(app, ["export-direction", str(vectors), "default", str(out), "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output
    assert "note" not in res.output  # the hint was recorded, not guessed
    assert read_gguf(out)[0]["controlvector.model_hint"] == arch


def test_without_model_type_or_a_known_architecture_the_hint_must_be_given(
    workspace, make_extraction_run, tmp_path, cli
):
    ext = make_extraction_run(workspace, layers=(2, 5), d_model=16)  # architecture "Synthetic", no model_type
    run = compute_vectors(workspace, VectorConfig(ext.run_id)).run_id
    out = tmp_path / "g.gguf"
    base = ["export-direction", str(run), "ghost", str(out), "-w", str(workspace.root)]
    res = cli.invoke(app, base)
    assert res.exit_code == 2 and "--model-hint" in res.output and len(res.output.strip().splitlines()) == 1
    assert not out.exists() and not list(tmp_path.glob("*.gguf*"))
    res = cli.invoke(app, [*base, "--model-hint", "llama"])
    assert res.exit_code == 0 and read_gguf(out)[0]["controlvector.model_hint"] == "llama"
