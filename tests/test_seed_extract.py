"""The seed API: ActivationExtractor and extract_persona_vectors against a naive loop.

On a tiny random llama with the embedded model's tokenizer and chat template (SmolLM2's, default system prompt
included), so spans and the seed's span rule meet the same renderings as on SmolLM2-135M itself; what is checked
(activations equal a naive loop, vectors are means of response means) does not depend on the weights. Loading the
embedded model by its alias is tested in test_modeling.py, and the demo test extracts with it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model_dir

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.config import PersonaVectorConfig, default_layer
from personavec.errors import ConfigError
from personavec.seed import ActivationExtractor, extract_persona_vectors
from personavec.spans import conversation, render

LAYER = 3  # a hidden_states index of the 4-layer model (20 of SmolLM2's 30)


@pytest.fixture(scope="module")
def model(tiny_root: Path) -> str:
    """A 4-layer, 64-wide random llama with SmolLM2's tokenizer and chat template."""
    return str(tiny_model_dir(tiny_root, "llama", "smollm2"))


@pytest.fixture(scope="module")
def extractor(model: str) -> ActivationExtractor:
    return ActivationExtractor(PersonaVectorConfig(model_name=model, dtype="float32", device="cpu"))


def test_lazy_loading_and_shape(extractor: ActivationExtractor) -> None:
    fresh = ActivationExtractor(PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32"))
    assert fresh._loaded is None  # nothing loaded until first use
    assert (extractor.num_layers, extractor.d_model, extractor.get_extraction_layer()) == (4, 64, default_layer(4))


def test_extract_activations_equal_naive_loop(extractor: ActivationExtractor) -> None:
    systems = ["You are a pirate.", "", "You are a careful analyst."]
    questions = ["How are you?", "What is truth?", "Describe the sea."]
    responses = ["Arr, fine as the wind, matey!", "Truth is what survives scrutiny.", "Vast, grey and restless."]
    got = extractor.extract_activations(systems, questions, responses, layer=LAYER)
    assert got.shape == (3, 64) and got.dtype == torch.float32
    tok, model = extractor.tokenizer, extractor.model
    with torch.inference_mode():
        for i, (s, q, r) in enumerate(zip(systems, questions, responses, strict=True)):
            ex = render(tok, conversation(s, q, r))
            start, end = ex.assistant_spans[0]
            assert tok.decode(ex.input_ids[start:end]) == r
            hs = model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states
            ref = hs[LAYER][0, start:end].float().mean(0)
            assert torch.nn.functional.cosine_similarity(ref, got[i], dim=0).item() >= 0.9999


def test_persona_vectors_are_mean_of_response_means(extractor: ActivationExtractor) -> None:
    personas = {name: PERSONAS[name] for name in list(PERSONAS)[:3]}
    questions = EVAL_QUESTIONS[:2]
    responses = {(p, q): f"As {p}, I would answer briefly." for p in personas for q in questions}
    del responses[(list(personas)[2], questions[1])]  # a missing pair is skipped, as in the seed
    vectors = extract_persona_vectors(extractor, personas, questions, responses, layer=2)
    assert set(vectors) == set(personas)
    for name, prompt in personas.items():
        qs = [q for q in questions if (name, q) in responses]
        per_response = extractor.extract_activations([prompt] * len(qs), qs, [responses[(name, q)] for q in qs], 2)
        torch.testing.assert_close(vectors[name], per_response.mean(0), atol=1e-5, rtol=1e-5)


def _seed_rule_reference(tok, model, system: str, question: str, answer: str, layer: int, raw: bool) -> torch.Tensor:
    """The seed's rule written out with plain transformers: tokenize the full rendering, start after the rstripped
    generation prompt + 1, output_hidden_states, slice to the end, mean."""
    if raw:
        prompt = f"System: {system}\n\nUser: {question}\n\nAssistant:"
        full = f"{prompt} {answer}"
    else:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        prompt = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*messages, {"role": "assistant", "content": answer}], tokenize=False, add_generation_prompt=False
        )
    start = tok(prompt.rstrip(), return_tensors="pt").input_ids.shape[1] + 1
    ids = tok(full, return_tensors="pt").input_ids
    with torch.inference_mode():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
    return hidden[0, start:].float().mean(0)


@pytest.mark.parametrize("prompt_format", ["chat", "raw"])
def test_seed_span_rule_matches_an_independent_reference(model: str, prompt_format: str) -> None:
    extractor = ActivationExtractor(
        PersonaVectorConfig(model_name=model, dtype="float32", device="cpu", span="seed", prompt_format=prompt_format)
    )
    personas = {name: PERSONAS[name] for name in list(PERSONAS)[:3]}
    questions = EVAL_QUESTIONS[:2]
    responses = {
        (p, q): f"{p.replace('_', ' ')} says: it depends, {i}." for p in personas for i, q in enumerate(questions)
    }
    vectors = extract_persona_vectors(extractor, personas, questions, responses, layer=LAYER)
    for name, system in personas.items():
        per_response = [
            _seed_rule_reference(
                extractor.tokenizer, extractor.model, system, q, responses[(name, q)], LAYER, prompt_format == "raw"
            )
            for q in questions
        ]
        reference = torch.stack(per_response).mean(0)
        assert torch.nn.functional.cosine_similarity(vectors[name], reference, dim=0).item() >= 0.99999


def test_an_empty_answer_is_left_out_not_a_nan_vector(extractor: ActivationExtractor) -> None:
    """An answer with no tokens to average (empty) is left out of its persona's mean, as extraction leaves out a row
    with no span (it made the whole vector NaN); a persona with only such answers has no vector."""
    names = list(PERSONAS)[:2]
    personas = {name: PERSONAS[name] for name in names}
    questions = EVAL_QUESTIONS[:2]
    responses = {(names[0], questions[0]): "A real answer.", (names[0], questions[1]): "", (names[1], questions[0]): ""}
    assert torch.isnan(extractor.extract_activations([personas[names[0]]], [questions[1]], [""], 2)).all()
    vectors = extract_persona_vectors(extractor, personas, questions, responses, layer=2)
    assert set(vectors) == {names[0]} and torch.isfinite(vectors[names[0]]).all()
    alone = extractor.extract_activations([personas[names[0]]], [questions[0]], ["A real answer."], 2)[0]
    torch.testing.assert_close(vectors[names[0]], alone, atol=1e-5, rtol=1e-5)
    with pytest.raises(ConfigError, match="one string"):
        extract_persona_vectors(extractor, personas, "Why?", responses, layer=2)
    with pytest.raises(ConfigError, match="personas is"):
        extract_persona_vectors(extractor, names, questions, responses, layer=2)  # type: ignore[arg-type]
