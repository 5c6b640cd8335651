"""The seed's file helpers: responses JSON cache and .pt vector dicts."""

from __future__ import annotations

import pickle

import pytest
import torch

import personavec
from personavec.errors import InputFileError
from personavec.seed import load_persona_vectors, load_responses, save_persona_vectors, save_responses


def test_builtin_data_matches_the_seed():
    assert len(personavec.PERSONAS) == 23
    assert len(personavec.EVAL_QUESTIONS) == 18
    assert personavec.PERSONAS["default"] == ""
    assert personavec.DEFAULT_PERSONAS == ("default", "default_assistant", "default_llm", "default_helpful")
    for name in ("assistant", "philosopher", "jester", "trickster", "ghost", "rationalist"):
        assert personavec.PERSONAS[name]


def test_responses_round_trip(tmp_path):
    responses = {("a", "Why?"): "Because.", ("b", 'Say "hi"'): "hi\nthere", ("a", "ünïcode?"): "✓"}
    path = tmp_path / "sub" / "r.json"
    save_responses(responses, path)
    assert load_responses(path) == responses
    assert list(tmp_path.joinpath("sub").iterdir()) == [path]  # no temp files left behind


def test_vectors_round_trip(tmp_path):
    vectors = {"a": torch.randn(8), "b": torch.randn(8, dtype=torch.bfloat16)}
    path = tmp_path / "v.pt"
    save_persona_vectors(vectors, path)
    loaded = load_persona_vectors(path)
    assert loaded.keys() == vectors.keys()
    for k in vectors:
        assert torch.equal(loaded[k], vectors[k])


def test_vectors_load_refuses_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    path = tmp_path / "evil.pt"
    with path.open("wb") as f:
        pickle.dump({"a": Evil()}, f)
    with pytest.raises(InputFileError, match="weights_only=True"):
        load_persona_vectors(path)
    with pytest.raises(InputFileError, match="no such file"):
        load_persona_vectors(tmp_path / "missing.pt")
