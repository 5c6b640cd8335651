"""The seed API on the embedded model: ActivationExtractor and extract_persona_vectors against a naive loop."""

from __future__ import annotations

import pytest
import torch

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.config import PersonaVectorConfig
from personavec.seed import ActivationExtractor, extract_persona_vectors
from personavec.spans import conversation, render

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def extractor() -> ActivationExtractor:
    return ActivationExtractor(PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32", device="cpu"))


def test_lazy_loading_and_shape(extractor: ActivationExtractor) -> None:
    fresh = ActivationExtractor(PersonaVectorConfig(model_name="smollm2-135m-instruct", dtype="float32"))
    assert fresh._loaded is None  # nothing loaded until first use
    assert (extractor.num_layers, extractor.d_model, extractor.get_extraction_layer()) == (30, 576, 20)


def test_extract_activations_equal_naive_loop(extractor: ActivationExtractor) -> None:
    systems = ["You are a pirate.", "", "You are a careful analyst."]
    questions = ["How are you?", "What is truth?", "Describe the sea."]
    responses = ["Arr, fine as the wind, matey!", "Truth is what survives scrutiny.", "Vast, grey and restless."]
    got = extractor.extract_activations(systems, questions, responses, layer=20)
    assert got.shape == (3, 576) and got.dtype == torch.float32
    tok, model = extractor.tokenizer, extractor.model
    with torch.inference_mode():
        for i, (s, q, r) in enumerate(zip(systems, questions, responses, strict=True)):
            ex = render(tok, conversation(s, q, r))
            start, end = ex.assistant_spans[0]
            assert tok.decode(ex.input_ids[start:end]) == r
            hs = model(input_ids=torch.tensor([ex.input_ids]), output_hidden_states=True).hidden_states
            ref = hs[20][0, start:end].float().mean(0)
            assert torch.nn.functional.cosine_similarity(ref, got[i], dim=0).item() >= 0.9999


def test_persona_vectors_are_mean_of_response_means(extractor: ActivationExtractor) -> None:
    personas = {name: PERSONAS[name] for name in list(PERSONAS)[:3]}
    questions = EVAL_QUESTIONS[:2]
    responses = {(p, q): f"As {p}, I would answer briefly." for p in personas for q in questions}
    del responses[(list(personas)[2], questions[1])]  # a missing pair is skipped, as in the seed
    vectors = extract_persona_vectors(extractor, personas, questions, responses, layer=12)
    assert set(vectors) == set(personas)
    for name, prompt in personas.items():
        qs = [q for q in questions if (name, q) in responses]
        per_response = extractor.extract_activations([prompt] * len(qs), qs, [responses[(name, q)] for q in qs], 12)
        torch.testing.assert_close(vectors[name], per_response.mean(0), atol=1e-5, rtol=1e-5)
