"""Render conversations to token ids and find the exact tokens of every assistant message.

The core API is generic over multi-turn conversations::

    rendered = render(tokenizer, [{"role": "system", "content": s}, {"role": "user", "content": q},
                                  {"role": "assistant", "content": a}, ...])
    rendered.input_ids          # list[int], what the model sees
    rendered.assistant_spans    # [(start, end), ...] one per assistant message, token indices, end exclusive

Span rules:

- ``"exact"`` (default): the tokens of each assistant message's *content* inside the rendered text, located through the
  fast tokenizer's offset mapping. Template tokens before and after (turn headers, end-of-turn) are excluded. A token
  that straddles the start or end of the content (BPE merges across the boundary) is included.
- ``"seed"``: the seed's rule, for comparing with vectors computed by the seed. Single-turn only (system?, user,
  assistant). The input is the tokenization, with the tokenizer's default special tokens, of the *full* rendering
  ``apply_chat_template([system, user, assistant], tokenize=False, add_generation_prompt=False)``; the span runs from
  ``len(tokenize(generation_prompt.rstrip())) + 1`` to the end of that sequence, where ``generation_prompt`` is
  ``apply_chat_template([system, user], tokenize=False, add_generation_prompt=True)``. So the template's
  end-of-turn tokens after the response (``<|im_end|>\n``, ``<end_of_turn>\n``) are inside the mean. With
  ``prompt_format="raw"`` the generation prompt is ``"System: {system}\n\nUser: {user}\n\nAssistant:"`` and the
  input ``f"{generation_prompt} {response}"``. The ``+ 1`` steps over the whitespace token that ``rstrip`` removed
  (a chat template's newline after the assistant header); where there is none, as in the raw format (the space
  merges into the response's first token), it skips the response's first token, as the seed does.

Prompt formats:

- ``"chat"``: the tokenizer's chat template. The rendered text is tokenized with ``add_special_tokens=False`` because
  templates put BOS in the text themselves (no double BOS). Whatever the template does is kept: Gemma merges the
  system prompt into the first user turn, SmolLM2 injects a default system prompt when none is given; an empty system
  prompt is passed on as an empty system message, as the seed does (see :func:`conversation`).
- ``"raw"``: the seed's plaintext fallback for models without a chat template:
  ``"System: {system}\\n\\nUser: {user}\\n\\nAssistant: {assistant}\\n\\n..."``, tokenized with the tokenizer's
  default special tokens (BOS if the tokenizer adds one).

Over-long conversations (more tokens than ``max_length``): tokens are dropped from the left of the conversation
(after the first token when it is BOS), never past the start of the last assistant message; if that message alone is
still too long, its end is cut. ``Rendered.truncated`` records that this happened (extraction
stores it in ``activations.truncated``) and ``n_dropped`` how many tokens were dropped. Spans that fall entirely
into the dropped part become empty ``(0, 0)``.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any

from personavec.errors import ConfigError, SpanError
from personavec.tuning import DEFAULT

SPAN_RULES = ("exact", "seed")
PROMPT_FORMATS = ("chat", "raw")

Message = Mapping[str, str]


@dataclass(frozen=True)
class Rendered:
    """A tokenized conversation and the token span ``[start, end)`` of each assistant message."""

    input_ids: list[int]
    assistant_spans: list[tuple[int, int]]
    text: str
    truncated: bool = False
    n_dropped: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.input_ids)

    @property
    def forward_length(self) -> int:
        """Tokens a forward pass needs: up to the end of the last assistant span (at least 1). Attention is causal,
        so the tokens after it never change the spans' activations."""
        return max([e for _, e in self.assistant_spans] + [1])


def conversation(system_prompt: str | None, question: str, response: str) -> list[dict[str, str]]:
    """The seed's single-turn conversation: system (kept even when empty, as the seed does), user, assistant.

    ``system_prompt=None`` leaves the system message out (then templates like SmolLM2's inject their default).
    """
    messages = [] if system_prompt is None else [{"role": "system", "content": system_prompt}]
    return [*messages, {"role": "user", "content": question}, {"role": "assistant", "content": response}]


def _check(prompt_format: str, span: str) -> None:
    if prompt_format not in PROMPT_FORMATS:
        raise ConfigError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if span not in SPAN_RULES:
        raise ConfigError(f"span rule must be one of {', '.join(SPAN_RULES)}, got {span!r}")


def _raw_text(messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    parts = [f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}\n\n" for m in messages]
    return "".join(parts) + ("Assistant: " if add_generation_prompt else "")


def _template_text(tokenizer: Any, messages: Sequence[Message], prompt_format: str, generation_prompt: bool) -> str:
    if prompt_format == "raw":
        return _raw_text(messages, generation_prompt)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(
            f"tokenizer {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: use prompt format 'raw'"
        )
    return tokenizer.apply_chat_template(
        [dict(m) for m in messages], tokenize=False, add_generation_prompt=generation_prompt
    )


def _template_texts(
    tokenizer: Any, many: Sequence[Sequence[Message]], prompt_format: str, generation_prompt: bool
) -> list[str]:
    """:func:`_template_text` of many conversations in one call (transformers renders a batch with one template)."""
    if prompt_format == "raw" or len(many) < 2:
        return [_template_text(tokenizer, m, prompt_format, generation_prompt) for m in many]
    if not getattr(tokenizer, "chat_template", None):
        return [_template_text(tokenizer, m, prompt_format, generation_prompt) for m in many]  # raises
    return list(
        tokenizer.apply_chat_template(
            [[dict(m) for m in messages] for messages in many], tokenize=False, add_generation_prompt=generation_prompt
        )
    )


def _locate(text: str, content: str, start: int) -> tuple[int, int]:
    """Character span of ``content`` in ``text`` at or after ``start``; templates may trim the content."""
    for candidate in (content, content.strip()):
        if not candidate:
            continue
        pos = text.find(candidate, start)
        if pos >= 0:
            return pos, pos + len(candidate)
    raise SpanError(
        f"assistant content {content[:60]!r}... not found in the rendered conversation after character {start}: "
        "the chat template rewrites message content; use prompt format 'raw' or span rule 'seed'"
    )


def _char_to_token_span(offsets: Sequence[tuple[int, int]], cs: int, ce: int) -> tuple[int, int]:
    first = last = None
    for i, (a, b) in enumerate(offsets):
        if b <= a:  # special tokens and empty pieces carry no characters
            continue
        if a < ce and b > cs:
            if first is None:
                first = i
            last = i
        elif a >= ce:
            break
    if first is None or last is None:  # both are set together
        return 0, 0
    return first, last + 1


def _encode(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError("exact response spans need a fast tokenizer (offset mapping); use span rule 'seed'")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


def _truncate(
    ids: list[int], spans: list[tuple[int, int]], max_length: int | None, bos_id: int | None
) -> tuple[list[int], list[tuple[int, int]], bool, int]:
    if max_length is None or len(ids) <= max_length:
        return ids, spans, False, 0
    keep_first = 1 if ids and bos_id is not None and ids[0] == bos_id else 0
    live_starts = [s for s, e in spans if e > s]
    last_start = live_starts[-1] if live_starts else len(ids)
    # Drop from the left (after BOS), but never into the last response: it is what we extract; if it alone is
    # longer than the context, keep its beginning and cut its end.
    left = min(len(ids) - max_length, max(0, last_start - keep_first))
    new_ids = (ids[:keep_first] + ids[keep_first + left :])[:max_length]

    def moved(s: int, e: int) -> tuple[int, int]:
        s2, e2 = max(s - left, keep_first), min(e - left, len(new_ids))
        return (s2, e2) if e > s and e2 > s2 else (0, 0)

    return new_ids, [moved(s, e) for s, e in spans], True, len(ids) - len(new_ids)


def render(
    tokenizer: Any,
    messages: Sequence[Message],
    prompt_format: str = "chat",
    span: str = "exact",
    *,
    max_length: int | None = None,
) -> Rendered:
    """Tokenize a conversation and find the token span of each assistant message.

    Args:
        tokenizer: a (fast) transformers tokenizer; with ``prompt_format="chat"`` it needs a chat template.
        messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``, any number of turns.
        prompt_format: ``"chat"`` or ``"raw"`` (see the module docstring).
        span: ``"exact"`` or ``"seed"`` (single-turn, last message must be the assistant's).
        max_length: the model's context; longer conversations are truncated (see the module docstring).

    Returns:
        :class:`Rendered` with ``input_ids`` and one ``(start, end)`` per assistant message, in order.

    Raises:
        SpanError: an assistant message's content cannot be found in the rendered text.
        ConfigError: unknown format/rule, no chat template for ``"chat"``, or a slow tokenizer for ``"exact"``.
    """
    _check(prompt_format, span)
    if not messages:
        raise SpanError("empty conversation")
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if span == "seed":
        return _render_seed(tokenizer, messages, prompt_format, max_length, bos_id)
    text = _template_text(tokenizer, messages, prompt_format, generation_prompt=False)
    ids, offsets = _encode(tokenizer, text, add_special_tokens=prompt_format == "raw")

    def prefix(i: int) -> str:
        return _template_text(tokenizer, messages[:i], prompt_format, generation_prompt=True)

    spans = _exact_spans(messages, text, offsets, prefix)
    ids, spans, truncated, dropped = _truncate(ids, spans, max_length, bos_id)
    return Rendered(ids, spans, text, truncated, dropped)


def _exact_spans(
    messages: Sequence[Message], text: str, offsets: Sequence[tuple[int, int]], prefix: Callable[[int], str]
) -> list[tuple[int, int]]:
    """Token span of each assistant message's content in ``text``; ``prefix(i)`` renders ``messages[:i]`` with a
    generation prompt."""
    spans: list[tuple[int, int]] = []
    cursor = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        # Where the assistant turn starts: the rendered prefix with a generation prompt, when the template renders
        # prefixes consistently (almost all do); otherwise just after the previous assistant message.
        head = prefix(i) if i else ""
        start = len(head) if text.startswith(head) else cursor
        # a whitespace-only answer has no span, like an empty one (else a lone space token is averaged in)
        content = message["content"]
        cs, ce = _locate(text, content, max(start, cursor)) if content.strip() else (start, start)
        spans.append(_char_to_token_span(offsets, cs, ce) if ce > cs else (0, 0))
        cursor = ce
    return spans


def render_many(
    tokenizer: Any,
    conversations: Sequence[Sequence[Message]],
    prompt_format: str = "chat",
    span: str = "exact",
    *,
    max_length: int | None = None,
    batch_size: int = 2048,
    workers: int | None = None,
) -> list[Rendered]:
    """:func:`render` for many conversations: the same result, one by one, made faster for a whole run.

    Conversations are rendered a batch at a time and tokenized in one call per batch (the fast tokenizer encodes a
    batch on all cores, without the GIL, while the next batch is rendered); the rendered prefixes that locate each
    assistant turn are computed once per distinct prefix (a run repeats each system prompt and question many
    times). ``workers`` > 1 spreads batches over that many processes (the Python part of rendering holds the GIL);
    None: one process per spare core for ``Tuning.parallel_from`` conversations or more, else one, or the processes
    :func:`render_workers` started for this thread. The seed rule and slow tokenizers go through :func:`render` one
    conversation at a time.
    """
    _check(prompt_format, span)
    if span == "seed" or not getattr(tokenizer, "is_fast", False) or len(conversations) < 2:
        return [render(tokenizer, c, prompt_format, span, max_length=max_length) for c in conversations]
    shared = _WORKERS.get() if workers is None else None
    if len(conversations) > batch_size:
        if shared is not None:
            return _render_in(shared, conversations, prompt_format, span, max_length, batch_size)
        pool = _worker_pool(tokenizer, _default_workers(len(conversations)) if workers is None else workers)
        if pool is not None:
            with pool:
                return _render_in(pool, conversations, prompt_format, span, max_length, batch_size)
    from concurrent.futures import ThreadPoolExecutor

    bos_id = getattr(tokenizer, "bos_token_id", None)
    special = prompt_format == "raw"
    prefixes: dict[tuple[tuple[str, str], ...], str] = {}

    def key(messages: Sequence[Message]) -> tuple[tuple[str, str], ...]:
        return tuple((m["role"], m["content"]) for m in messages)

    def render_prefixes(chunk: Sequence[Sequence[Message]]) -> None:
        """Render, in one call, the prefixes (before each assistant turn) of ``chunk`` not rendered yet."""
        todo = {}
        for messages in chunk:
            for i, message in enumerate(messages):
                if i and message["role"] == "assistant" and key(messages[:i]) not in prefixes:
                    todo[key(messages[:i])] = messages[:i]
        if todo:
            texts = _template_texts(tokenizer, list(todo.values()), prompt_format, True)
            prefixes.update(zip(todo, texts, strict=True))

    def prefix_of(messages: Sequence[Message]) -> Callable[[int], str]:
        return lambda i: prefixes[key(messages[:i])]

    def encode(texts: list[str]) -> Any:
        return tokenizer(texts, add_special_tokens=special, return_offsets_mapping=True)

    out: list[Rendered] = []
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="personavec-tokenize") as pool:
        pending = None
        for lo in [*range(0, len(conversations), batch_size), len(conversations)]:
            chunk = conversations[lo : lo + batch_size]
            texts = _template_texts(tokenizer, chunk, prompt_format, False) if chunk else []
            future = pool.submit(encode, texts) if texts else None
            render_prefixes(chunk)
            if pending is not None:
                done_chunk, done_texts, done_future = pending
                enc = done_future.result()
                for messages, text, ids, offsets in zip(
                    done_chunk, done_texts, enc["input_ids"], enc["offset_mapping"], strict=True
                ):
                    spans = _exact_spans(messages, text, offsets, prefix_of(messages))
                    ids, spans, truncated, dropped = _truncate(list(ids), spans, max_length, bos_id)
                    out.append(Rendered(ids, spans, text, truncated, dropped))
            pending = (chunk, texts, future) if future is not None else None
    return out


_WORKER_TOKENIZER: Any = None


def _init_worker(tokenizer_bytes: bytes) -> None:
    global _WORKER_TOKENIZER
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per process; the processes are the parallelism
    _WORKER_TOKENIZER = pickle.loads(tokenizer_bytes)


def _render_chunk(args: tuple[Sequence[Sequence[Message]], str, str, int | None, int]) -> list[Rendered]:
    conversations, prompt_format, span, max_length, batch_size = args
    return render_many(
        _WORKER_TOKENIZER, conversations, prompt_format, span, max_length=max_length, batch_size=batch_size, workers=1
    )


def _default_workers(n_conversations: int, parallel_from: int = DEFAULT.parallel_from) -> int:
    """Worker processes for ``n_conversations``: one per spare core (at most 16) from ``parallel_from`` on
    (:attr:`personavec.tuning.Tuning.parallel_from`), else none."""
    return min(16, (os.cpu_count() or 1) - 1) if n_conversations >= parallel_from else 1


def _worker_pool(tokenizer: Any, workers: int) -> Executor | None:
    """``workers`` spawned processes (safe next to CUDA), each with its copy of the tokenizer; None for one worker
    or a tokenizer that cannot travel (then rendering stays in this process)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if workers < 2:
        return None
    try:
        tokenizer_bytes = pickle.dumps(tokenizer)
    except (pickle.PicklingError, TypeError, AttributeError):
        return None
    context = multiprocessing.get_context("spawn")
    return ProcessPoolExecutor(workers, context, initializer=_init_worker, initargs=(tokenizer_bytes,))


def _render_in(
    pool: Executor,
    conversations: Sequence[Sequence[Message]],
    prompt_format: str,
    span: str,
    max_length: int | None,
    batch_size: int,
) -> list[Rendered]:
    """Batches of :func:`render_many` in the worker processes of ``pool``, in order."""
    chunks = [
        (conversations[lo : lo + batch_size], prompt_format, span, max_length, batch_size)
        for lo in range(0, len(conversations), batch_size)
    ]
    return [rendered for part in pool.map(_render_chunk, chunks) for rendered in part]


#: The worker processes :func:`render_many` uses in this context (set by :func:`render_workers`).
_WORKERS: contextvars.ContextVar[Executor | None] = contextvars.ContextVar("personavec_render_workers", default=None)


@contextlib.contextmanager
def render_workers(tokenizer: Any, n_conversations: int, parallel_from: int = DEFAULT.parallel_from) -> Iterator[None]:
    """Within it, :func:`render_many` calls of this thread (default ``workers``, more than one batch) share one set
    of worker processes, started here, at once, for ``n_conversations`` in all (none under ``parallel_from``).
    Starting them (spawning, imports, unpickling the tokenizer) costs seconds: a run planned in windows paid that
    for each window (65,536 answers took 11-12 s on 16 cores, of which rendering ~4 s)."""
    workers = _default_workers(n_conversations, parallel_from)
    pool = _worker_pool(tokenizer, workers)
    if pool is None:
        yield
        return
    for _ in range(workers):  # spawn them now (one per task waiting), not at first use
        pool.submit(int)
    token = _WORKERS.set(pool)
    try:
        yield
    finally:
        _WORKERS.reset(token)
        pool.shutdown(wait=True, cancel_futures=True)  # stopped planning (Ctrl-C, an error): no batch left to wait for


def _render_seed(
    tokenizer: Any, messages: Sequence[Message], prompt_format: str, max_length: int | None, bos_id: int | None
) -> Rendered:
    if messages[-1]["role"] != "assistant" or any(m["role"] == "assistant" for m in messages[:-1]):
        raise SpanError("span rule 'seed' handles single-turn conversations ending with the assistant's message")
    prompt = _template_text(tokenizer, messages[:-1], prompt_format, generation_prompt=True)
    if prompt_format == "raw":
        prompt = prompt.rstrip()
        text = f"{prompt} {messages[-1]['content']}"
    else:
        text = _template_text(tokenizer, messages, prompt_format, generation_prompt=False)
    ids = list(tokenizer(text)["input_ids"])
    start = len(tokenizer(prompt.rstrip())["input_ids"]) + 1
    spans = [(min(start, len(ids)), len(ids))]
    ids, spans, truncated, dropped = _truncate(ids, spans, max_length, bos_id)
    return Rendered(ids, spans, text, truncated, dropped)
