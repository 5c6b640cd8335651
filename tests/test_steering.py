"""Interventions (add, ablate, cap) on tiny random models: exactness of identity settings, agreement of the batched,
padded, KV-cached path with an unbatched, uncached reference, capping really caps; vector naming from a VectorSet."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from reference_steering import persona_vectors_response_generate
from tiny_models import tiny_model_dir

from personavec.errors import ConfigError
from personavec.generation.local import generate_batch, prompt_ids, stop_ids
from personavec.modeling import load_model
from personavec.steering.interventions import LayerIntervention, Steerer, SteeringConfig
from personavec.steering.naming import VectorRef, resolve_vector, unit_norm
from personavec.vectors import VectorSet

PROMPTS = [
    ("You are a pirate who loves the sea.", "How are you?"),
    ("", "What is the nature of truth, in your own words and at some length?"),
    ("You are terse.", "Hi"),
]


_LOADED: dict[tuple[Path, str], object] = {}


def _loaded(root: Path, arch: str):
    """A tiny model in float64 (loaded once per session): batched and unbatched passes then agree to ~1e-12, so
    greedy tokens match exactly."""
    if (root, arch) not in _LOADED:
        loaded = load_model(str(tiny_model_dir(root, arch, "chatml")), dtype="float32", device="cpu")
        loaded.model.to(torch.float64)
        _LOADED[root, arch] = loaded
    return _LOADED[root, arch]


def _prompts(loaded) -> list[list[int]]:
    return [prompt_ids(loaded.tokenizer, s, q) for s, q in PROMPTS]


def _reference(loaded, prompt: list[int], max_new: int, steerer: Steerer | None) -> list[int]:
    """Greedy decoding one prompt at a time, no padding, no KV cache: every step recomputes the whole sequence."""
    stops = stop_ids(loaded)
    ids = list(prompt)
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(max_new):
            if steerer is not None:
                steerer.begin(len(prompt))
            logits = loaded.model(input_ids=torch.tensor([ids]), use_cache=False).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids.append(token)
            if token in stops:
                break
    return out


def _direction(loaded, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(size=loaded.d_model) * 2.0


@pytest.mark.slow
@pytest.mark.parametrize(
    "make",
    [
        lambda v: LayerIntervention(layer=2, kind="add", vector=v, scale=0.0),
        lambda v: LayerIntervention(layer=2, kind="add", vector=v, scale=0.0, positions="generated"),
        lambda v: LayerIntervention(layer=2, kind="add", vector=v, scale=0.0, positions="response"),
        lambda v: LayerIntervention(layer=1, kind="ablate", vector=np.zeros_like(v), scale=0.0),
        lambda v: LayerIntervention(layer=3, kind="cap", vector=v, tau=math.inf),
        lambda v: LayerIntervention(layer=3, kind="cap", vector=v, tau=math.inf, positions="generated"),
    ],
    ids=["add0", "add0-generated", "add0-response", "ablate-zero", "cap-inf", "cap-inf-generated"],
)
def test_identity_interventions_reproduce_unsteered_greedy_output(tiny_root, make):
    loaded = _loaded(tiny_root, "llama")
    prompts = _prompts(loaded)
    assert len({len(p) for p in prompts}) == len(prompts)  # really padded
    plain = generate_batch(loaded, prompts, max_new_tokens=12)
    with Steerer(loaded.model, [make(_direction(loaded))]) as steerer:
        steered = generate_batch(loaded, prompts, max_new_tokens=12, steerer=steerer)
    assert [g.token_ids for g in steered] == [g.token_ids for g in plain]
    assert all(len(g.token_ids) > 1 for g in plain)
    # The batched, padded, cached path is the unbatched, uncached one.
    assert [list(g.token_ids) for g in plain] == [_reference(loaded, p, 12, None) for p in prompts]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen3"])
@pytest.mark.parametrize(
    "make",
    [
        lambda v: [LayerIntervention(layer=2, kind="add", vector=v, scale=3.0)],
        lambda v: [LayerIntervention(layer=2, kind="add", vector=v, scale=3.0, positions="generated")],
        lambda v: [LayerIntervention(layer=2, kind="add", vector=v, scale=3.0, positions="response")],
        lambda v: [LayerIntervention(layer=1, kind="ablate", vector=v, scale=-2.0)],
        lambda v: [
            LayerIntervention(layer=1, kind="cap", vector=v, tau=-0.5, positions="generated"),
            LayerIntervention(layer=3, kind="add", vector=-v, scale=1.5),
        ],
    ],
    ids=["add", "add-generated", "add-response", "ablate-plus", "cap-generated+add"],
)
def test_steered_batch_matches_unbatched_uncached_reference(tiny_root, arch, make):
    loaded = _loaded(tiny_root, arch)
    prompts = _prompts(loaded)
    interventions = make(_direction(loaded))
    plain = generate_batch(loaded, prompts, max_new_tokens=10)
    with Steerer(loaded.model, interventions) as steerer:
        steered = generate_batch(loaded, prompts, max_new_tokens=10, steerer=steerer)
        reference = [_reference(loaded, p, 10, steerer) for p in prompts]
    assert [list(g.token_ids) for g in steered] == reference
    assert [g.token_ids for g in steered] != [g.token_ids for g in plain]  # the intervention did something


def test_per_row_steering_gives_each_row_what_it_alone_would_get(tiny_root):
    """``Steerer.per_row``: one batch, each row with its own interventions (other kinds, layers and positions, or
    none) decodes the tokens that row gets when the whole batch is steered with that row's interventions."""
    loaded = _loaded(tiny_root, "llama")
    prompts = _prompts(loaded)
    v = _direction(loaded)
    rows = [
        [LayerIntervention(layer=2, kind="add", vector=v, scale=3.0, positions="generated")],
        [],
        [
            LayerIntervention(layer=1, kind="ablate", vector=v, scale=-2.0, positions="response"),
            LayerIntervention(layer=3, kind="cap", vector=v, tau=-0.5),
        ],
    ]
    assert len(rows) == len(prompts)
    alone = []
    for i, ivs in enumerate(rows):
        with Steerer(loaded.model, ivs) as steerer:
            alone.append(generate_batch(loaded, prompts, max_new_tokens=10, steerer=steerer)[i].token_ids)
    with Steerer.per_row(loaded.model, rows) as steerer:
        together = [g.token_ids for g in generate_batch(loaded, prompts, max_new_tokens=10, steerer=steerer)]
    assert together == alone
    assert len({tuple(t) for t in together}) == len(rows)  # the rows were steered differently
    # rows steered alike get the one [1, d] set a Steerer of those interventions has (what a run alone gets)
    alike = Steerer.per_row(loaded.model, [rows[2]] * len(prompts))
    assert {slot.on(torch.device("cpu"))[0].shape[0] for slots in alike.slots.values() for slot in slots} == {1}
    with pytest.raises(ConfigError, match="steerable layers"):
        Steerer.per_row(loaded.model, [[], [LayerIntervention(layer=99, kind="add", vector=v, scale=1.0)]])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_response_positions_are_persona_vectors_response_token_for_token(tiny_root, arch):
    """persona_vectors' ActivationSteerer(positions="response") adds to [:, -1, :] of every forward pass: with the
    KV cache that is the last prompt position and every generated token. positions="response" is exactly that;
    positions="generated" (the first generated token unsteered) is not."""
    loaded = _loaded(tiny_root, arch)
    prompts = _prompts(loaded)
    v, layer, coef = _direction(loaded, 3), 2, 3.0
    reference = persona_vectors_response_generate(loaded, prompts, v, coef, layer, max_new_tokens=10)

    def ours(positions: str) -> list[list[int]]:
        iv = LayerIntervention(layer=layer, kind="add", vector=v, scale=coef, positions=positions)
        with Steerer(loaded.model, [iv]) as steerer:
            return [list(g.token_ids) for g in generate_batch(loaded, prompts, max_new_tokens=10, steerer=steerer)]

    assert ours("response") == reference
    plain = [list(g.token_ids) for g in generate_batch(loaded, prompts, max_new_tokens=10)]
    generated = ours("generated")
    assert reference != plain and generated != reference
    # "generated" leaves the first token unsteered: it is the unsteered model's first token, "response"'s is not
    assert [g[0] for g in generated] == [p[0] for p in plain] != [r[0] for r in reference]


def test_capping_caps_every_position_of_the_capped_layers(tiny_root):
    loaded = _loaded(tiny_root, "llama")
    prompts = _prompts(loaded)
    v = _direction(loaded, seed=3)
    unit = torch.tensor(v / np.linalg.norm(v))
    seen: dict[int, list[torch.Tensor]] = {1: [], 3: []}

    def reader(layer: int):
        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            seen[layer].append((h.double() @ unit).flatten())

        return hook

    # Thresholds that bite: the median unsteered projection at each layer.
    handles = [loaded.layers[layer - 1].register_forward_hook(reader(layer)) for layer in seen]
    generate_batch(loaded, prompts, max_new_tokens=8)
    tau = {layer: float(torch.cat(seen[layer]).median()) for layer in seen}
    for layer in seen:
        seen[layer].clear()
    for h in handles:
        h.remove()
    caps = [LayerIntervention(layer=layer, kind="cap", vector=v, tau=tau[layer]) for layer in seen]
    with Steerer(loaded.model, caps) as steerer:
        # Registered after the steerer's hooks: reads each capped layer's output after the intervention.
        handles = [loaded.layers[layer - 1].register_forward_hook(reader(layer)) for layer in seen]
        try:
            generate_batch(loaded, prompts, max_new_tokens=8, steerer=steerer)
        finally:
            for h in handles:
                h.remove()
    for layer in seen:
        values = torch.cat(seen[layer])
        assert len(seen[layer]) == 8  # the prompt pass and 7 cached decoding steps
        assert float(values.max()) <= tau[layer] + 1e-4
        assert float((values - tau[layer]).abs().min()) < 1e-6  # some positions sat above tau and were capped


def test_steerer_refuses_unsteerable_layers_and_always_removes_hooks(tiny_root):
    loaded = _loaded(tiny_root, "llama")
    v = _direction(loaded)
    for layer in (0, loaded.n_layers):
        with pytest.raises(ConfigError, match="steerable layers 1..3"):
            Steerer(loaded.model, [LayerIntervention(layer=layer, kind="add", vector=v, scale=1.0)])
    with pytest.raises(RuntimeError, match="boom"):
        with Steerer(loaded.model, [LayerIntervention(layer=2, kind="add", vector=v, scale=1.0)]):
            raise RuntimeError("boom")
    assert not loaded.layers[1]._forward_hooks


# ------------------------------------------------------------------------------------------------ naming and config


def _vset(groups: dict[str, list[str]] | None = None) -> VectorSet:
    names = ("default", "default_assistant", "pirate", "bard-x")
    matrix = torch.tensor(
        [[1.0, 0.0, 0.0], [3.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 4.0]],
        dtype=torch.float32,
    )
    provenance = {
        "persona_groups": groups or {},
        "norms": {n: float(r.norm()) for n, r in zip(names, matrix, strict=True)},
    }
    return VectorSet(7, 20, "persona", names, matrix, (3, 3, 3, 3), provenance)


def test_vector_ref_parses_names_differences_axis_and_negation():
    assert VectorRef.parse("7:pirate") == VectorRef(7, "pirate")
    assert VectorRef.parse(" 7 : -axis ") == VectorRef(7, "axis", negate=True)
    assert str(VectorRef.parse("12:pirate-default")) == "12:pirate-default"
    for bad in ("pirate", "x:pirate", "7:", ""):
        with pytest.raises(ConfigError, match="RUN:NAME"):
            VectorRef.parse(bad)


def test_resolve_vector_names_groups_differences_and_axis():
    vs = _vset({"default": ["neutral"], "default_assistant": ["neutral"], "pirate": ["creative"]})
    assert resolve_vector(vs, "pirate").tolist() == [0.0, 2.0, 0.0]
    assert resolve_vector(vs, "pirate-default").tolist() == [-1.0, 2.0, 0.0]
    assert resolve_vector(vs, "bard-x").tolist() == [0.0, 0.0, 4.0]  # a hyphenated name wins over a split
    assert resolve_vector(vs, "bard-x-pirate").tolist() == [0.0, -2.0, 4.0]
    assert resolve_vector(vs, "creative-neutral").tolist() == [-2.0, 2.0, 0.0]  # group means
    axis = resolve_vector(vs, "axis")
    assert np.isclose(np.linalg.norm(axis), 1.0) and axis[0] > 0  # towards the defaults
    assert np.allclose(resolve_vector(vs, "axis", negate=True), -axis)
    with pytest.raises(ConfigError, match="has no vector 'ghost'"):
        resolve_vector(vs, "ghost")
    assert unit_norm(vs) == pytest.approx((1 + 3 + 2 + 4) / 4)


def _random_vset(names: tuple[str, ...], groups: dict[str, list[str]] | None = None) -> VectorSet:
    rng = np.random.default_rng(0)
    matrix = torch.tensor(rng.normal(size=(len(names), 3)) * 50, dtype=torch.float32)
    return VectorSet(7, 20, "persona", names, matrix, (3,) * len(names), {"persona_groups": groups or {}})


def test_a_persona_named_axis_in_an_old_catalog_is_ambiguous_not_silently_used():
    vs = _random_vset(("default", "pirate", "axis"), {"default": ["default"]})
    with pytest.raises(ConfigError, match=r"'axis' of vectors run 7 is ambiguous: it could be persona 'axis'; or the "):
        resolve_vector(vs, "axis")
    # a persona a-b beside personas a and b: two readings as well
    vs = _random_vset(("default", "a", "b", "a-b"))
    with pytest.raises(ConfigError, match="ambiguous: it could be persona 'a-b'; or persona 'a' minus persona 'b'"):
        resolve_vector(vs, "a-b")
    # one reading resolves as before
    assert np.allclose(resolve_vector(vs, "default-a"), vs["default"].double().numpy() - vs["a"].double().numpy())


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        ({"kind": "push"}, "kind"),
        ({"positions": "prompt"}, "positions"),
        ({"layers": (0,)}, "steerable"),
        ({"kind": "cap"}, "cap needs thresholds"),
        ({"kind": "cap", "tau": (1.0,), "reference_run": 3}, "not both"),
        ({"kind": "cap", "tau": (1.0,), "coef": 2.0}, "no coefficient"),
        ({"kind": "cap", "tau": (1.0, 2.0), "layers": (1, 2, 3)}, "one per layer"),
        ({"kind": "cap", "tau": (float("nan"),)}, "tau must be"),
        ({"tau": (1.0,)}, "for cap"),
        ({"coef": float("inf")}, "finite"),
    ],
)
def test_steering_config_rejects_bad_values(kw, match):
    with pytest.raises(ConfigError, match=match):
        SteeringConfig("7:pirate", **kw)


def test_steering_config_roundtrips_and_labels():
    cfg = SteeringConfig("7:-axis", kind="cap", layers=(20, 21), tau=[math.inf, 3])
    assert SteeringConfig.from_dict({**cfg.__dict__, "unknown": 1}) == cfg
    assert cfg.label() == "cap 7:-axis tau=inf,3 @20,21"
    assert SteeringConfig("7:a-b", coef=4, normalize=True).label() == "add 7:a-b x4 (normalized) @default"


# ------------------------------------------------------------------------------------------------ embedded model


@pytest.mark.slow
def test_steering_towards_a_persona_moves_the_answers_along_its_direction():
    """Neutral system prompt, +c * (v_persona - v_default) at the default layer: the answers, extracted at that
    layer by the unsteered model, project further onto the direction as c grows (c = 0..3)."""
    from personavec.builtin import EVAL_QUESTIONS, PERSONAS
    from personavec.config import default_layer
    from personavec.extract import mean_activations
    from personavec.spans import conversation, render

    # SmolLM2-135M-Instruct in float32, not the session's shared copy: in bfloat16 the projections still rose, but
    # by 0.6 between c = 1 and 2 (-23.5, 5.8, 6.5, 22.8)
    loaded = load_model("smollm2-135m-instruct", dtype="float32", device="cpu")
    layer = default_layer(loaded.n_layers)
    questions = EVAL_QUESTIONS[:3]
    neutral = PERSONAS["default"]

    def answers(system: str, rows: list[list[LayerIntervention]]) -> list[list[str]]:
        """The answers to the questions under each row's interventions, all rows in one batch."""
        prompts = [prompt_ids(loaded.tokenizer, system, q) for q in questions]
        with Steerer.per_row(loaded.model, [ivs for ivs in rows for _ in questions]) as steerer:
            out = [g.text for g in generate_batch(loaded, prompts * len(rows), max_new_tokens=24, steerer=steerer)]
        return [out[i : i + len(questions)] for i in range(0, len(out), len(questions))]

    def means(system: str, texts: list[str]) -> np.ndarray:
        asked = questions * (len(texts) // len(questions))
        examples = [render(loaded.tokenizer, conversation(system, q, t)) for q, t in zip(asked, texts, strict=True)]
        return mean_activations(loaded, examples, [layer])[:, 0].double().numpy()

    (unsteered,) = answers(neutral, [[]])
    v_default = means(neutral, unsteered).mean(axis=0)
    coefs = (0.0, 1.0, 2.0, 3.0)
    # measured (1 thread, 24 tokens): trader -25.3, -4.9, 11.4, 25.5, the same with the four coefficients answered
    # in one batch as one batch each. jester was dropped to halve the test: it stayed monotone, but by 1.2 between
    # c = 2 and 3.
    for persona in ("trader",):
        (own,) = answers(PERSONAS[persona], [[]])
        v = means(PERSONAS[persona], own).mean(axis=0) - v_default
        unit = v / np.linalg.norm(v)
        steered = answers(neutral, [[LayerIntervention(layer, "add", v.astype(np.float32), scale=c)] for c in coefs])
        per_answer = means(neutral, [t for texts in steered for t in texts]) @ unit
        n = len(questions)
        projections = [float(per_answer[i : i + n].mean()) for i in range(0, len(per_answer), n)]
        assert np.all(np.diff(projections) > 0), (persona, projections)
