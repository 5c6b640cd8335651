"""Reference behaviour of other projects' steering, written out here as they define it, to test ours against.

persona_vectors (safety-research/persona_vectors, ``activation_steer.py`` and ``eval/eval_persona.py``):
``ActivationSteerer(model, vector, coeff=coef, layer_idx=layer - 1, positions="response")`` is a forward hook on
decoder block ``layer - 1`` that adds ``coeff * vector`` to ``out[:, -1, :]`` (the first element when the block
returns a tuple) on *every* forward pass; ``sample_steering`` tokenizes the chat prompts with left padding and runs
``model.generate(..., do_sample=False, use_cache=True)`` under it. With the KV cache the first pass is the prompt
(its last position is steered, so the first generated token already is) and each later pass is one generated
token.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def persona_vectors_response_generate(
    loaded, prompts: Sequence[Sequence[int]], vector: np.ndarray, coef: float, layer: int, max_new_tokens: int
) -> list[list[int]]:
    """Greedy answers of ``prompts`` (token ids) steered as persona_vectors' ``positions="response"`` steers at its
    ``--layer layer`` (block ``layer - 1``), each cut after its first stop token as ``generate_batch`` cuts it."""
    from personavec.generation.local import stop_ids

    model, block = loaded.model, loaded.layers[layer - 1]
    param = next(model.parameters())
    steer = coef * torch.as_tensor(vector, dtype=param.dtype, device=param.device)

    def hook(module, ins, out):
        def add(t):
            t2 = t.clone()
            t2[:, -1, :] += steer.to(t.device)
            return t2

        if torch.is_tensor(out):
            return add(out)
        return (add(out[0]), *out[1:])

    tok = loaded.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    stops = set(stop_ids(loaded))
    handle = block.register_forward_hook(hook)
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=max_new_tokens,
                use_cache=True,
                pad_token_id=pad,
                eos_token_id=sorted(stops),
            )
    finally:
        handle.remove()
    answers = []
    for row in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
        answers.append(row[:cut])
    return answers
