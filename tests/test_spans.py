"""Exact response spans for every chat template style, the raw format, the seed's rule, truncation."""

from __future__ import annotations

import pytest
from tiny_models import TEMPLATES, template_tokenizer

from personavec.errors import ConfigError, SpanError
from personavec.spans import Rendered, conversation, render

RESPONSE = "  Hello there!\nI am\tfine, thanks. Über-naïve 🙂 text.  "


@pytest.fixture(scope="module", params=list(TEMPLATES))
def tok(request):
    return template_tokenizer(request.param)


def _decoded(tok, rendered):
    return [tok.decode(rendered.input_ids[s:e]) for s, e in rendered.assistant_spans]


@pytest.mark.slow
@pytest.mark.parametrize("system", ["You are a pirate.", "", None])
def test_exact_span_decodes_to_response_multi_turn(tok, system) -> None:
    messages = conversation(system, "How are you?", RESPONSE) + [
        {"role": "user", "content": "And then?"},
        {"role": "assistant", "content": "Second answer, shorter."},
    ]
    rendered = render(tok, messages)
    assert len(rendered.assistant_spans) == 2
    first, second = _decoded(tok, rendered)
    assert first.strip() == RESPONSE.strip()
    assert second.strip() == "Second answer, shorter."
    # the span holds no template tokens: at most whitespace beyond the response
    assert len(first) - len(RESPONSE.strip()) <= len(RESPONSE) - len(RESPONSE.strip()) + 1
    # no double BOS: the template puts BOS in the text and the tokenizer must not add another
    assert rendered.input_ids[:2].count(tok.bos_token_id) <= 1
    assert not rendered.truncated


def test_smollm2_template_injects_default_system_prompt_only_without_system() -> None:
    tok = template_tokenizer("smollm2")
    with_default = render(tok, conversation(None, "Q?", "A.")).text
    empty_system = render(tok, conversation("", "Q?", "A.")).text
    assert "You are a helpful AI assistant named SmolLM" in with_default
    assert "SmolLM" not in empty_system and "<|im_start|>system\n<|im_end|>" in empty_system


def test_gemma_merges_system_into_user() -> None:
    tok = template_tokenizer("gemma")
    rendered = render(tok, conversation("You are a pirate.", "Q?", "Arr."))
    assert "<start_of_turn>user\nYou are a pirate.\n\nQ?" in rendered.text
    assert _decoded(tok, rendered) == ["Arr."]


def test_raw_format(tok) -> None:
    rendered = render(tok, conversation("Sys.", "Q?", RESPONSE), prompt_format="raw")
    assert rendered.text.startswith("System: Sys.\n\nUser: Q?\n\nAssistant: ")
    assert _decoded(tok, rendered)[0].strip() == RESPONSE.strip()


def test_seed_rule_is_the_full_rendering_from_rstripped_prompt_plus_one(tok) -> None:
    messages = conversation("Sys.", "Q?", "The answer is here.")
    rendered = render(tok, messages, span="seed")
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    prompt = tok.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    assert rendered.input_ids == tok(full)["input_ids"]  # the default special tokens, as the seed
    start = len(tok(prompt.rstrip())["input_ids"]) + 1
    assert rendered.assistant_spans == [(start, len(rendered.input_ids))]
    assert rendered.forward_length == len(rendered.input_ids)
    # the template's end-of-turn tokens are inside the span
    end_of_turn = {"<|im_end|>", "<end_of_turn>", "<|eot_id|>"}
    assert any(t in tok.decode(rendered.input_ids[slice(*rendered.assistant_spans[0])]) for t in end_of_turn)
    with pytest.raises(SpanError):
        render(tok, messages + messages[1:], span="seed")


def test_seed_rule_raw_format(tok) -> None:
    rendered = render(tok, conversation("Sys.", "Q?", "The answer is here."), prompt_format="raw", span="seed")
    prompt = "System: Sys.\n\nUser: Q?\n\nAssistant:"
    assert rendered.text == prompt + " The answer is here."
    assert rendered.input_ids == tok(rendered.text)["input_ids"]
    assert rendered.assistant_spans == [(len(tok(prompt)["input_ids"]) + 1, len(rendered.input_ids))]


def test_forward_length_ends_at_the_last_span() -> None:
    tok = template_tokenizer("chatml")
    rendered = render(tok, conversation("Sys.", "Q?", "Answer."))
    assert rendered.forward_length == rendered.assistant_spans[-1][1] < rendered.n_tokens  # <|im_end|> not needed
    assert Rendered([1, 2, 3], [(0, 0)], "").forward_length == 1  # a span truncated away still runs one token


def test_truncation_keeps_response_and_records_it() -> None:
    tok = template_tokenizer("chatml")
    full = render(tok, conversation("sys " * 60, "Q?", "word " * 10))
    cut = render(tok, conversation("sys " * 60, "Q?", "word " * 10), max_length=40)
    assert cut.truncated and len(cut.input_ids) == 40 and cut.n_dropped == len(full.input_ids) - 40
    assert tok.decode(cut.input_ids[slice(*cut.assistant_spans[0])]).strip() == ("word " * 10).strip()
    assert cut.input_ids[0] == tok.bos_token_id
    # a response longer than the context keeps its beginning
    long = render(tok, conversation("sys", "Q?", "word " * 100), max_length=30)
    s, e = long.assistant_spans[0]
    assert long.truncated and len(long.input_ids) == 30 and e == 30
    assert tok.decode(long.input_ids[s:e]).strip().startswith("word word")


def test_errors() -> None:
    tok = template_tokenizer("chatml")
    with pytest.raises(ConfigError):
        render(tok, conversation("s", "q", "a"), prompt_format="xml")
    with pytest.raises(ConfigError):
        render(tok, conversation("s", "q", "a"), span="middle")
    tok.chat_template = None
    with pytest.raises(ConfigError, match="raw"):
        render(tok, conversation("s", "q", "a"))


def test_a_whitespace_only_answer_has_no_span_like_an_empty_one():
    from personavec.spans import conversation, render, render_many

    tok = template_tokenizer("chatml")
    blank = [conversation("You are a pirate.", "Hi?", text) for text in ("", " ", " \n\t ")]
    assert [render(tok, c).assistant_spans for c in blank] == [[(0, 0)]] * 3
    assert [r.assistant_spans for r in render_many(tok, [*blank, conversation("", "Hi?", "Arr")])][:3] == [[(0, 0)]] * 3


@pytest.mark.parametrize("prompt_format", ["chat", "raw"])
def test_render_many_equals_render_one_by_one(tok, prompt_format) -> None:
    """The batched planner of a whole run gives exactly what rendering each conversation does: empty answers,
    truncation, shared and distinct prefixes, multi-turn, awkward whitespace and characters."""
    convs = []
    for i in range(23):
        system = [None, "", "You are a pirate.", "  Sys with spaces  "][i % 4]
        answer = ["", RESPONSE, f"answer {i} " * (i % 7), "🙂", " x "][i % 5]
        convs.append(conversation(system, f"Question {i % 3}?", answer))
    convs.append(conversation("Sys.", "Q1?", "First.") + [{"role": "user", "content": "Q2?"},
                 {"role": "assistant", "content": "Second, longer answer."}])  # fmt: skip
    from personavec.spans import render_many

    for max_length in (None, 24):
        many = render_many(tok, convs, prompt_format, max_length=max_length, batch_size=5)
        assert many == [render(tok, c, prompt_format, max_length=max_length) for c in convs]
    seed = render_many(tok, convs[:-1], prompt_format, "seed")
    assert seed == [render(tok, c, prompt_format, "seed") for c in convs[:-1]]


@pytest.mark.slow
def test_render_many_in_worker_processes_equals_render() -> None:
    from personavec.spans import render_many

    tok = template_tokenizer("gemma")
    convs = [conversation(f"Sys {i % 3}.", f"Q {i % 4}?", ["", RESPONSE, f"answer {i}"][i % 3]) for i in range(40)]
    many = render_many(tok, convs, max_length=30, batch_size=8, workers=2)
    assert many == [render(tok, c, max_length=30) for c in convs]


@pytest.mark.slow
def test_windows_rendered_within_render_workers_share_one_set_of_processes(monkeypatch) -> None:
    """A large run's rest is rendered in windows: within ``render_workers`` every call of more than one batch goes
    to the processes started once (not a new set per window, which cost seconds each), with the same result."""
    from personavec import spans
    from personavec.spans import render_many, render_workers

    tok = template_tokenizer("gemma")
    convs = [conversation(f"Sys {i % 3}.", f"Q {i % 4}?", ["", RESPONSE, f"answer {i}"][i % 3]) for i in range(40)]
    made = []
    real = spans._worker_pool

    def counted(tokenizer, workers):
        made.append(workers)
        return real(tokenizer, workers)

    monkeypatch.setattr(spans, "_worker_pool", counted)
    monkeypatch.setattr(spans, "_default_workers", lambda n, parallel_from=0: 2)  # this machine may have 1 spare core
    with render_workers(tok, len(convs)):
        windows = [render_many(tok, convs[a:b], max_length=30, batch_size=8) for a, b in ((0, 5), (5, 20), (20, 40))]
    assert made == [2]  # once, for all windows
    assert [r for w in windows for r in w] == [render(tok, c, max_length=30) for c in convs]
    assert spans._WORKERS.get() is None  # gone after: later calls start their own
