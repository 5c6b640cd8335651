"""Does steering move the answers? The numbers behind docs/steering.md's table (the slow test asserts the same).

Neutral system prompt, ``+c * (v_persona - v_default)`` at the default layer (vectors from each persona's own greedy
answers to the same questions), greedy answers; each answer is then read by the unsteered model, its mean activation
at that layer taken over its tokens (the extraction core) and dotted with the unit direction.

    .venv/bin/python scripts/steer_effect.py [--personas trader jester] [--coefs 0 1 2 3] [--questions 3]
        [--max-tokens 24]

Prints one row per persona and one answer per coefficient; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from personavec.builtin import EVAL_QUESTIONS, PERSONAS
from personavec.config import default_layer
from personavec.extract import mean_activations
from personavec.generation.local import generate_batch, prompt_ids
from personavec.modeling import load_model
from personavec.spans import conversation, render
from personavec.steering.interventions import LayerIntervention, Steerer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--personas", nargs="+", default=["trader", "jester"])
    ap.add_argument("--coefs", type=float, nargs="+", default=[0.0, 1.0, 2.0, 3.0])
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=24)
    args = ap.parse_args()
    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    layer = default_layer(loaded.n_layers)
    questions = EVAL_QUESTIONS[: args.questions]
    neutral = PERSONAS["default"]

    def answers(system: str, interventions=()) -> list[str]:
        prompts = [prompt_ids(loaded.tokenizer, system, q) for q in questions]
        with Steerer(loaded.model, list(interventions)) as steerer:
            out = generate_batch(loaded, prompts, max_new_tokens=args.max_tokens, steerer=steerer)
        return [g.text for g in out]

    def means(system: str, texts: list[str]) -> np.ndarray:
        examples = [render(loaded.tokenizer, conversation(system, q, t)) for q, t in zip(questions, texts, strict=True)]
        return mean_activations(loaded, examples, [layer])[:, 0].double().numpy()

    v_default = means(neutral, answers(neutral)).mean(axis=0)
    result: dict[str, Any] = {"layer": layer, "default_norm": float(np.linalg.norm(v_default)), "personas": {}}
    for persona in args.personas:
        v = means(PERSONAS[persona], answers(PERSONAS[persona])).mean(axis=0) - v_default
        unit = v / np.linalg.norm(v)
        row, texts = [], []
        for c in args.coefs:
            out = answers(neutral, [LayerIntervention(layer, "add", v.astype(np.float32), scale=c)])
            row.append(round(float((means(neutral, out) @ unit).mean()), 2))
            texts.append(out[0])
        result["personas"][persona] = {"norm": round(float(np.linalg.norm(v)), 1), "projections": row}
        print(
            f"{persona:<12} |v| {np.linalg.norm(v):6.1f}  "
            + "  ".join(f"c={c:g}: {p:+.2f}" for c, p in zip(args.coefs, row, strict=True))
        )
        for c, t in zip(args.coefs, texts, strict=True):
            print(f"    c={c:g}: {t[:90]!r}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
