"""Per-token monitoring: the projection ``h . u`` of every token of a text onto a direction ``u`` at a layer.

``h`` is the raw, uncentred residual stream ``hidden_states[L]`` (the output of block ``L - 1``), as capping sees it,
so a capping threshold and a monitored value are on the same scale. The mean over an answer's tokens of ``h . u`` is
the answer's mean activation (what extraction stores) dotted with ``u``.

- :func:`token_projections`: the core, over token id sequences, batched with right padding, the forward stopped after
  the deepest layer needed.
- :func:`project_responses`: every answer of a responses run onto a named vector (``RUN:NAME``), one row of values per
  answer token (exact answer spans, as extraction finds them); :func:`project_text` for any given text.
- :func:`reference_thresholds`: the capping thresholds, a percentile of a reference run's per-token projections.
- :func:`export_projections`: one row per token to CSV or JSON lines.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from personavec.errors import ConfigError, InputFileError, NotFoundError
from personavec.tuning import DEFAULT

if TYPE_CHECKING:
    from personavec.modeling import LoadedModel
    from personavec.workspace import Workspace


def hidden_at(loaded: LoadedModel, input_ids: Any, attention_mask: Any, layers: Sequence[int]) -> dict[int, Any]:
    """``{layer: hidden_states[layer]}`` (float32, ``[B, S, d_model]``) for one batch, without running later blocks
    (:func:`personavec.hooks.record` with ``stop``; layer ``n`` is the final norm's output)."""
    import torch

    from personavec.hooks import record

    n = loaded.n_layers
    bad = [layer for layer in layers if not 0 <= layer <= n]
    if bad:
        raise ConfigError(f"layer(s) {bad} out of range: {loaded.name} has hidden_states 0..{n}")
    norm = loaded.final_norm() if n in layers else None
    with torch.inference_mode(), record(loaded.layers, layers, reduce=lambda _, h: h.float(), stop=True,
                                        final_norm=norm) as out:  # fmt: skip
        loaded.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return dict(out)


def _unit(vector: Any) -> np.ndarray:
    v = vector.detach().cpu().double().numpy() if hasattr(vector, "detach") else np.asarray(vector, np.float64)
    v = v.reshape(-1)
    norm = float(np.linalg.norm(v))
    if norm == 0.0:
        raise ConfigError("cannot project onto a zero vector")
    return v / norm


def token_projections(
    loaded: LoadedModel,
    sequences: Sequence[Sequence[int]],
    directions: Mapping[int, Any],
    *,
    max_batch_tokens: int | None = None,
) -> list[np.ndarray]:
    """``h . u`` at every token of every sequence: one ``[len(seq), len(directions)]`` float64 array per sequence,
    columns in the order of ``directions`` (``{layer: vector}``; each vector is normalised here)."""
    import torch

    layers = list(directions)
    units = torch.tensor(np.stack([_unit(directions[layer]) for layer in layers]), dtype=torch.float32)
    device = loaded.input_device
    budget = max_batch_tokens or DEFAULT.batch_tokens(device)
    pad_id = loaded.tokenizer.pad_token_id
    if pad_id is None:
        pad_id = loaded.tokenizer.eos_token_id or 0
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    results: list[np.ndarray] = [np.zeros((0, len(layers)))] * len(sequences)
    start = 0
    while start < len(order):
        width = max(1, len(sequences[order[start]]))
        stop = start + max(1, min(len(order) - start, budget // width))
        batch = order[start:stop]
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, i in enumerate(batch):
            seq = list(sequences[i])
            ids[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
            mask[row, : len(seq)] = 1
        hidden = hidden_at(loaded, ids.to(device), mask.to(device), layers)
        cols = [(hidden[layer] @ units[j].to(hidden[layer].device)).cpu() for j, layer in enumerate(layers)]
        values = torch.stack(cols, dim=-1).double().numpy()  # [B, S, n_layers]
        for row, i in enumerate(batch):
            results[i] = values[row, : len(sequences[i])]
        start = stop
    return results


# ------------------------------------------------------------------------------------------- responses and texts


@dataclass(frozen=True)
class TextProjection:
    """Per-token projections of one text (an answer of a responses run, or a given text) at one layer."""

    label: str
    layer: int
    vector: str
    tokens: tuple[str, ...]
    values: np.ndarray  # [n_tokens] float64
    response_id: int | None = None
    persona: str | None = None
    question: str | None = None
    sample_index: int | None = None
    first: int = 0  # the summary (``mean``, ``summarized``) starts at this position; ``values`` keep every token

    @property
    def summarized(self) -> np.ndarray:
        """The values the summary is over: from ``first`` on (every value when that leaves none)."""
        return self.values[self.first :] if len(self.values) > self.first else self.values

    @property
    def mean(self) -> float:
        return float(self.summarized.mean()) if len(self.values) else math.nan


def responses_of(ws: Workspace, run_id: int) -> tuple[int, str, Any]:
    """``(responses run id, prompt format, answered responses)`` for a responses run, or for an extract run (its
    responses run, rendered in its prompt format)."""
    from personavec.store.extraction import get_extraction_run
    from personavec.store.responses import RESPONSE_RUN_KINDS, answered_responses
    from personavec.store.runs import get_run

    catalog = ws.catalog()
    run = get_run(catalog, run_id)
    prompt_format = "chat"
    if run.kind == "extract":
        ext = get_extraction_run(catalog, run_id)
        run_id, prompt_format = ext.source_run_id, ext.prompt_format
    elif run.kind not in RESPONSE_RUN_KINDS:
        raise NotFoundError(
            f"run {run_id} is a {run.kind} run: name a responses run (generate, ingest) or an extract run"
        )
    return run_id, prompt_format, answered_responses(catalog, run_id)


def selected_responses(ws: Workspace, run_id: int, personas: Sequence[str] = ()) -> tuple[str, list[Any]]:
    """``(prompt format, answered responses)`` of a responses or extract run (:func:`responses_of`), only those of
    ``personas`` when given; a persona the run has no answer of is a :class:`ConfigError` (a typo would otherwise
    project nothing and succeed)."""
    _, prompt_format, records = responses_of(ws, run_id)
    if not personas:
        return prompt_format, list(records)
    have = {r.persona for r in records}
    missing = [p for p in personas if p not in have]
    if missing:
        shown = ", ".join(sorted(have)[:12]) + (", ..." if len(have) > 12 else "")
        raise ConfigError(
            f"--persona {', '.join(map(repr, missing))}: run {run_id} has no answer of it (its personas: {shown})"
        )
    return prompt_format, [r for r in records if r.persona in set(personas)]


def _answer_tokens(loaded: LoadedModel, records: Sequence[Any], prompt_format: str) -> list[tuple[Any, list, tuple]]:
    """For each record with a non-empty answer span: ``(record, input ids up to the span's end, span)``."""
    from personavec.spans import conversation, render

    max_length = loaded.context_length
    out = []
    for r in records:
        rendered = render(
            loaded.tokenizer, conversation(r.system_prompt, r.question, r.text), prompt_format, max_length=max_length
        )
        start, end = rendered.assistant_spans[-1]
        if end > start:
            out.append((r, rendered.input_ids[:end], (start, end)))
    return out


def project_responses(
    ws: Workspace,
    loaded: LoadedModel,
    run_id: int,
    vector: str,
    layer: int | None = None,
    *,
    personas: Sequence[str] = (),
    max_batch_tokens: int | None = None,
) -> list[TextProjection]:
    """Project every answer token of a responses (or extract) run onto a named vector (``RUN:NAME``) at ``layer``
    (default: the vectors run's default layer). One :class:`TextProjection` per non-empty answer."""
    from personavec.steering.naming import VectorRef, resolve_vector
    from personavec.vectors import load_vectors

    ref = VectorRef.parse(vector)
    vset = load_vectors(ref.run_id, layer, workspace=ws)
    direction = resolve_vector(vset, ref.expr, negate=ref.negate)
    prompt_format, records = selected_responses(ws, run_id, personas)
    items = _answer_tokens(loaded, records, prompt_format)
    values = token_projections(
        loaded, [ids for _, ids, _ in items], {vset.layer: direction}, max_batch_tokens=max_batch_tokens
    )
    out = []
    for (r, ids, (s, e)), vals in zip(items, values, strict=True):
        out.append(
            TextProjection(
                label=f"{r.persona} / q{r.question_position} / s{r.sample_index}",
                layer=vset.layer,
                vector=str(ref),
                tokens=token_texts(loaded.tokenizer, ids[s:e]),
                values=vals[s:e, 0],
                response_id=r.id,
                persona=r.persona,
                question=r.question,
                sample_index=r.sample_index,
            )
        )
    return out


def token_texts(tokenizer: Any, ids: Sequence[int]) -> tuple[str, ...]:
    """Each token as the text it stands for (``" hello"``, not the byte-level BPE symbol ``"Ġhello"``); a token that
    is part of a multi-byte character shows as U+FFFD."""
    return tuple(tokenizer.decode([int(i)]) for i in ids)


def project_text(
    loaded: LoadedModel, text: str | Sequence[Mapping[str, str]], direction: Any, layer: int, *, label: str = "text"
) -> TextProjection:
    """Per-token projections of a given text (tokenized as is, with the tokenizer's special tokens) or of a
    conversation (``[{"role", "content"}, ...]``, rendered with the chat template); every token is kept.

    The summary (``mean``) leaves out position 0: the first position of any sequence is an attention sink whose
    residual stream dwarfs the rest (SmolLM2, ``"Boo, I am a ghost."`` onto ghost-default at layer 20: -5121 at
    the first token, -22 to +4 after it), whether it holds a BOS token or the text's first word. Answers of a run
    never start there (they follow their prompt)."""
    if isinstance(text, str):
        ids = list(loaded.tokenizer(text)["input_ids"])
    else:
        from personavec.spans import render

        ids = render(loaded.tokenizer, list(text)).input_ids
    if not ids:
        raise ConfigError(f"{label} has no tokens to project (an empty text)")
    (vals,) = token_projections(loaded, [ids], {layer: direction})
    return TextProjection(
        label=label,
        layer=layer,
        vector="given",
        tokens=token_texts(loaded.tokenizer, ids),
        values=vals[:, 0],
        first=1,
    )


def export_projections(items: Sequence[TextProjection], path: str | Path, *, overwrite: bool = False) -> Path:
    """One row per token (label, response id, persona, question, sample, layer, vector, position, token,
    projection) to ``.csv`` or ``.jsonl``. Refuses to overwrite unless ``overwrite``."""
    from personavec.files import atomic_write

    path = Path(path)
    if path.suffix.lower() not in (".csv", ".jsonl"):
        raise ConfigError(f"{path}: export to .csv or .jsonl")
    if path.exists() and not overwrite:
        raise InputFileError(f"{path} exists: pass overwrite (--overwrite) to replace it")
    header = ["label", "response_id", "persona", "question", "sample_index", "layer", "vector", "position", "token"]
    rows = [
        [t.label, t.response_id, t.persona, t.question, t.sample_index, t.layer, t.vector, i, tok, float(v)]
        for t in items
        for i, (tok, v) in enumerate(zip(t.tokens, t.values, strict=True))
    ]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            if path.suffix.lower() == ".csv":
                writer = csv.writer(fh)
                writer.writerow([*header, "projection"])
                writer.writerows(rows)
            else:
                for row in rows:
                    fh.write(json.dumps(dict(zip([*header, "projection"], row, strict=True))) + "\n")

    atomic_write(path, write)
    return path


# ------------------------------------------------------------------------------------------- capping thresholds


@dataclass(frozen=True)
class ReferenceThresholds:
    """Capping thresholds from a reference run: ``{layer: tau}`` and what they were computed over."""

    thresholds: dict[int, float]
    responses_run_id: int
    n_answers: int
    n_tokens: int
    percentile: float


def reference_thresholds(
    ws: Workspace,
    loaded: LoadedModel,
    run_id: int,
    vectors: Mapping[int, Any],
    percentile: float,
    *,
    personas: Sequence[str] = (),
    max_batch_tokens: int | None = None,
) -> ReferenceThresholds:
    """The ``percentile`` of ``h . u`` over every answer token of a reference run, per layer (``vectors`` is
    ``{layer: vector}``). ``run_id`` is a responses run or an extract run (then its responses run)."""
    responses_run_id, prompt_format, records = responses_of(ws, run_id)
    if personas:
        unknown = sorted(set(personas) - {r.persona for r in records})
        if unknown:
            raise ConfigError(f"reference run {responses_run_id} has no answers of {', '.join(unknown)}")
        records = [r for r in records if r.persona in set(personas)]
    items = _answer_tokens(loaded, records, prompt_format)
    if not items:
        raise ConfigError(f"reference run {responses_run_id} has no answers to compute thresholds from")
    values = token_projections(loaded, [ids for _, ids, _ in items], vectors, max_batch_tokens=max_batch_tokens)
    spans = np.concatenate([vals[s:e] for (_, _, (s, e)), vals in zip(items, values, strict=True)])
    taus = np.percentile(spans, percentile, axis=0)
    return ReferenceThresholds(
        thresholds={layer: float(taus[j]) for j, layer in enumerate(vectors)},
        responses_run_id=responses_run_id,
        n_answers=len(items),
        n_tokens=int(spans.shape[0]),
        percentile=float(percentile),
    )
