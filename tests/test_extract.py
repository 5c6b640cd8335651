"""Batched, truncated extraction against a naive output_hidden_states loop; resumable catalogued runs; the CLI."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import tiny_model_dir

from personavec import EVAL_QUESTIONS, PERSONAS, arrays
from personavec.cli import app
from personavec.config import config_dict
from personavec.errors import ConfigError, ModelError
from personavec.extract import (
    ExtractConfig,
    ExtractionInterrupted,
    mean_activations,
    plan_batches,
    run_extraction,
)
from personavec.ingest import IngestConfig, ingest
from personavec.modeling import load_model
from personavec.spans import conversation, render
from personavec.store.extraction import (
    done_count,
    extraction_examples,
    extraction_run_config,
    get_extraction_run,
)
from personavec.store.runs import get_run, list_runs


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _examples(tok, n: int, seed: int = 0):
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = " ".join(f"word{rng.randint(0, 999)}" for _ in range(rng.randint(1, 40)))
        system = rng.choice(["", "You are a pirate.", "You are a careful analyst who answers briefly."])
        out.append(render(tok, conversation(system, f"Question number {i}?", words)))
    return out


def _naive(loaded, examples, layers):
    """The seed's way: one example per forward, all layers, output_hidden_states, mean over the span."""
    rows = []
    with torch.inference_mode():
        for ex in examples:
            hs = loaded.model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states
            s, e = ex.assistant_spans[0]
            rows.append(torch.stack([hs[layer][0, s:e].float().mean(0) for layer in layers]))
    return torch.stack(rows)


def _min_cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(0, -2), b.flatten(0, -2), dim=-1).min().item()


@pytest.mark.parametrize(
    ("arch", "template"),
    [("llama", "llama3"), ("gemma3", "gemma"), ("qwen2", "chatml"), ("qwen3", "chatml"), ("olmo2", "chatml")],
)
def test_batched_equals_naive_loop(tiny_root: Path, arch: str, template: str) -> None:
    loaded = load_model(str(tiny_model_dir(tiny_root, arch, template)), dtype="float32", device="cpu")
    examples = _examples(loaded.tokenizer, 10)
    layers = [3, 0, loaded.n_layers, 1]  # unordered, embeddings and the final-norm layer included
    got = mean_activations(loaded, examples, layers, max_batch_tokens=256)
    assert got.shape == (10, 4, loaded.d_model) and got.dtype == torch.float32
    assert _min_cos(got, _naive(loaded, examples, layers)) >= 0.9999


def test_stops_after_deepest_layer(tiny_root: Path) -> None:
    loaded = load_model(str(tiny_model_dir(tiny_root, "llama", "chatml")), dtype="float32", device="cpu")
    calls: list[str] = []
    handles = [loaded.layers[i].register_forward_hook(lambda *a, i=i: calls.append(f"block{i}")) for i in range(4)]
    handles.append(loaded.model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head")))
    try:
        mean_activations(loaded, _examples(loaded.tokenizer, 2), [2])
    finally:
        for h in handles:
            h.remove()
    assert calls == ["block0", "block1"]


def test_independent_of_batching_and_order(tiny_root: Path) -> None:
    loaded = load_model(str(tiny_model_dir(tiny_root, "qwen2", "chatml")), dtype="float32", device="cpu")
    examples = _examples(loaded.tokenizer, 12, seed=1)
    ref = mean_activations(loaded, examples, [2], max_batch_tokens=1, max_batch_size=1)
    for budget, size in ((64, 64), (400, 3), (100_000, 64)):
        got = mean_activations(loaded, examples, [2], max_batch_tokens=budget, max_batch_size=size)
        assert _min_cos(got, ref) >= 0.9999
        assert torch.allclose(got, ref, atol=1e-4, rtol=1e-4)
    perm = list(range(12))[::-1]
    shuffled = mean_activations(loaded, [examples[i] for i in perm], [2], max_batch_tokens=300)
    assert torch.allclose(shuffled, ref[perm], atol=1e-4, rtol=1e-4)


def test_multi_turn_one_row_per_assistant_turn(tiny_root: Path) -> None:
    loaded = load_model(str(tiny_model_dir(tiny_root, "llama", "llama3")), dtype="float32", device="cpu")
    messages = conversation("Sys.", "Q1?", "First answer here.") + [
        {"role": "user", "content": "Q2?"},
        {"role": "assistant", "content": "Second answer, longer than the first one."},
    ]
    ex = render(loaded.tokenizer, messages)
    got = mean_activations(loaded, [ex, _examples(loaded.tokenizer, 1)[0]], [2])
    assert got.shape[0] == 3
    with torch.inference_mode():
        hs = loaded.model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states[2][0]
    for k, (s, e) in enumerate(ex.assistant_spans):
        assert _min_cos(got[k, 0][None], hs[s:e].mean(0)[None]) >= 0.9999


def test_plan_batches_respects_budget() -> None:
    lengths = [5, 50, 7, 20, 20, 3, 100]
    batches = plan_batches(lengths, max_batch_tokens=60, max_batch_size=2)
    assert sorted(i for b in batches for i in b) == list(range(7))
    for b in batches:
        assert len(b) <= 2 and (len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 60)


def test_config_validation() -> None:
    with pytest.raises(ConfigError):
        ExtractConfig(span="nope")
    with pytest.raises(ConfigError):
        ExtractConfig(layers=(3, 3))
    with pytest.raises(ModelError, match="out of range"):
        ExtractConfig(layers=(31,)).resolve_layers(30)
    assert ExtractConfig().resolve_layers(30) == (20,)
    assert ExtractConfig().resolve_layers(62) == (40,)
    with pytest.raises(ConfigError, match="compile"):
        ExtractConfig(compile="yes")
    assert config_dict(ExtractConfig(compile=True))["compile"] is True


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
    reason="torch.compile's CPU backend (inductor) needs a C++ compiler and none is on PATH",
)
def test_compile_matches_eager(tiny_root: Path) -> None:
    loaded = load_model(str(tiny_model_dir(tiny_root, "llama", "chatml")), dtype="float32", device="cpu")
    examples = _examples(loaded.tokenizer, 6, seed=2)
    layers = [3, 0, loaded.n_layers, 1]
    ref = mean_activations(loaded, examples, layers, max_batch_tokens=100_000)
    # one batch, so one graph to compile (~25-45 s on 2 cores, the bulk of this test)
    got = mean_activations(loaded, examples, layers, max_batch_tokens=100_000, compile=True)
    assert _min_cos(got, ref) >= 0.9999
    assert all("forward" not in block.__dict__ for block in loaded.layers)  # the eager forwards are back
    # the capture hooks stay outside the compiled blocks: the early stop still skips the later blocks
    calls: list[int] = []
    handles = [loaded.layers[i].register_forward_hook(lambda *a, i=i: calls.append(i)) for i in range(4)]
    try:
        again = mean_activations(loaded, examples, [2], max_batch_tokens=100_000, compile=True)
    finally:
        for h in handles:
            h.remove()
    assert calls == [0, 1]
    assert _min_cos(again[:, 0], mean_activations(loaded, examples, [2])[:, 0]) >= 0.9999


# -- catalogued runs ---------------------------------------------------------------------------------------------


@pytest.fixture
def responses_run(workspace, tmp_path: Path) -> int:
    rng = random.Random(3)
    data = {
        json.dumps([p, q]): f"{p} on {i}: " + " ".join(f"w{rng.randint(0, 99)}" for _ in range(rng.randint(1, 30)))
        for p in list(PERSONAS)[:5]
        for i, q in enumerate(EVAL_QUESTIONS[:5])
    }
    path = tmp_path / "responses.json"
    path.write_text(json.dumps(data))
    return ingest(workspace, IngestConfig("responses", path)).run_id


def _activations(workspace, run_id: int) -> np.ndarray:
    info = get_extraction_run(workspace.catalog(), run_id)
    return arrays.read_rows(arrays.open_activation_array(workspace.zarr_path, info.zarr_group))


def test_run_extraction_provenance_and_rows(workspace, responses_run: int, tiny_root: Path) -> None:
    model = str(tiny_model_dir(tiny_root, "llama", "chatml"))
    config = ExtractConfig(
        responses_run=responses_run, model=model, layers=(2, 4), chunk_rows=4, max_batch_tokens=300, device="cpu"
    )
    result = run_extraction(workspace, config)
    info = get_extraction_run(workspace.catalog(), result.run_id)
    assert (info.layers, info.n_examples, info.span_rule, info.prompt_format) == ((2, 4), 25, "exact", "chat")
    assert info.dtype == "float32" and info.device == "cpu" and info.architecture == "LlamaForCausalLM"
    assert info.tok_s and info.tok_s > 0 and info.n_tokens == result.n_tokens
    assert get_run(workspace.catalog(), result.run_id).status == "done"
    assert extraction_run_config(workspace.catalog(), result.run_id)["compile"] is False
    values = _activations(workspace, result.run_id)
    assert values.shape == (25, 2, 64) and not np.isnan(values).any()
    # each stored row equals a direct computation for its response
    table = extraction_examples(workspace.catalog(), result.run_id, done_only=True)
    assert table.num_rows == 25
    loaded = load_model(model, dtype="float32", device="cpu")
    from personavec.store.responses import answered_responses

    by_id = {r.id: r for r in answered_responses(workspace.catalog(), responses_run)}
    rows = table["row"].to_pylist()[:6]
    recs = [by_id[i] for i in table["response_id"].to_pylist()[:6]]
    examples = [render(loaded.tokenizer, conversation(r.system_prompt, r.question, r.text)) for r in recs]
    assert [ex.assistant_spans[0] for ex in examples] == list(
        zip(table["span_start"].to_pylist()[:6], table["span_end"].to_pylist()[:6], strict=True)
    )
    naive = _naive(loaded, examples, [2, 4]).numpy()
    assert _min_cos(torch.from_numpy(values[rows]), torch.from_numpy(naive)) >= 0.9999


def test_interrupted_run_resumes_to_same_result(workspace, responses_run: int, tiny_root: Path) -> None:
    config = ExtractConfig(
        responses_run=responses_run,
        model=str(tiny_model_dir(tiny_root, "llama", "chatml")),
        layers=(3,),
        chunk_rows=4,
        max_batch_tokens=200,
        max_batch_size=3,
        device="cpu",
    )
    full = run_extraction(workspace, config)
    batches = []

    def interrupt_after_four(progress) -> None:
        batches.append(progress.done_examples)
        if len(batches) == 4:
            raise ExtractionInterrupted("simulated crash")

    with pytest.raises(ExtractionInterrupted):
        run_extraction(workspace, config, progress=interrupt_after_four)
    run_id = full.run_id + 1
    assert get_run(workspace.catalog(), run_id).status == "interrupted"
    done_before = done_count(workspace.catalog(), run_id)
    assert 0 < done_before < 25 and done_before % 4 == 0  # whole chunks only
    resumed = run_extraction(workspace, None, resume=run_id)
    assert resumed.n_computed == 25 - done_before  # done rows are not recomputed
    assert get_run(workspace.catalog(), run_id).status == "done"
    np.testing.assert_allclose(_activations(workspace, run_id), _activations(workspace, full.run_id), atol=1e-5)


def test_cli_extract(cli, workspace, responses_run: int, tiny_root: Path) -> None:
    model = str(tiny_model_dir(tiny_root, "qwen3", "chatml"))
    args = ["extract", "-w", str(workspace.root), "--responses-run", str(responses_run), "--model", model]
    result = cli.invoke(app, [*args, "--layer", "3", "--layer", "1", "--device", "cpu", "--json"])
    assert result.exit_code == 0, result.output
    line = next(line for line in result.output.splitlines() if '{"run_id"' in line)
    out = json.loads(line[line.index('{"run_id"') :])
    assert out["layers"] == [3, 1] and out["n_examples"] == 25
    assert _activations(workspace, out["run_id"]).shape == (25, 2, 64)
    bad = cli.invoke(app, [*args, "--layer", "9"])
    assert bad.exit_code != 0 and "out of range" in bad.output


def test_persona_and_question_filters(workspace, responses_run: int, tiny_root: Path) -> None:
    from personavec.store.extraction import extraction_examples

    model = str(tiny_model_dir(tiny_root, "llama", "chatml"))
    personas = list(PERSONAS)[:5]
    config = ExtractConfig(
        model=model, layers=(2,), device="cpu", personas=(personas[1], personas[3]), questions=(0, 4)
    )
    result = run_extraction(workspace, config, responses_run)
    with workspace.catalog() as catalog:
        table = extraction_examples(catalog, result.run_id)
    got = sorted(zip(table["persona"].to_pylist(), table["question_position"].to_pylist(), strict=True))
    assert got == sorted((p, q) for p in (personas[1], personas[3]) for q in (0, 4))
    assert _activations(workspace, result.run_id).shape == (4, 1, 64)
    with pytest.raises(ConfigError, match="no answers of persona\\(s\\) pirate"):
        run_extraction(workspace, ExtractConfig(model=model, device="cpu", personas=("pirate",)), responses_run)
    with pytest.raises(ConfigError, match="question position\\(s\\) \\[7\\]"):
        run_extraction(workspace, ExtractConfig(model=model, device="cpu", questions=(7,)), responses_run)
    with pytest.raises(ConfigError, match="filter is empty"):
        ExtractConfig(personas=())
    with workspace.catalog() as catalog:  # the refused runs left nothing behind
        assert [r.id for r in list_runs(catalog, "extract")] == [result.run_id]
