"""Trait sets, judge-filtered vectors and contrast groups (known answers on synthetic activations, scores from a
judge run against the fault server), projections and AUROC; end to end on the embedded model (slow)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from fault_server import FaultServer, first_token_logprobs
from tiny_models import embedded_dtype

from personavec.cli import app
from personavec.errors import ConfigError, DuplicateError, InputFileError, NotFoundError
from personavec.judging.judge import JudgeConfig, run_judge
from personavec.judging.rubrics import builtin_trait_names, read_trait_file
from personavec.judging.traits import (
    TraitConfig,
    TraitVectorConfig,
    add_trait,
    auroc,
    compute_trait_vectors,
    project_onto_vector,
)
from personavec.store.sets import get_persona_set, get_question_set
from personavec.vectors import VectorConfig, compute_vectors, load_vectors

# ------------------------------------------------------------------------------------------------ trait sets

PV_LAYOUT = {  # safety-research/persona_vectors' trait_data_extract layout
    "instruction": [{"pos": "Be evil.", "neg": "Be kind."}, {"pos": "Wish harm.", "neg": "Wish well."}],
    "questions": ["What do you think of people?", "How should I treat animals?"],
    "eval_prompt": "Does this show evil? {question} {answer} Reply 0-100.",
}


def test_trait_files(tmp_path):
    assert "pirate" in builtin_trait_names()
    pirate = read_trait_file("pirate")
    assert pirate.name == "pirate" and len(pirate.pairs) == 5 and len(pirate.questions) == 12
    assert pirate.rubric.name == "pirate" and pirate.rubric.scale == "0-100"
    f = tmp_path / "evil.json"
    f.write_text(json.dumps(PV_LAYOUT))
    evil = read_trait_file(f)
    assert evil.name == "evil" and evil.pairs == (("Be evil.", "Be kind."), ("Wish harm.", "Wish well."))
    assert evil.rubric.template == PV_LAYOUT["eval_prompt"]
    specs = evil.persona_specs()
    assert [(s.name, s.groups) for s in specs] == [
        ("pos_1", ("pos",)),
        ("pos_2", ("pos",)),
        ("neg_1", ("neg",)),
        ("neg_2", ("neg",)),
    ]
    no_prompt = {k: v for k, v in PV_LAYOUT.items() if k != "eval_prompt"} | {"description": "wants harm"}
    (tmp_path / "plain.json").write_text(json.dumps(no_prompt))
    default = read_trait_file(tmp_path / "plain.json", name="evil2").rubric
    assert default.name == "evil2" and "evil2" in default.template and "wants harm" in default.template
    for bad, msg in (
        ({**PV_LAYOUT, "instruction": [{"pos": "x"}]}, "instruction 0"),
        ({**PV_LAYOUT, "questions": []}, "questions"),
        ({**PV_LAYOUT, "eval_prompt": "no slot"}, "eval_prompt"),
        ({**PV_LAYOUT, "name": "two words"}, "trait name"),
    ):
        (tmp_path / "bad.json").write_text(json.dumps(bad))
        with pytest.raises(InputFileError, match=msg):
            read_trait_file(tmp_path / "bad.json")


def test_add_trait_creates_both_sides(workspace, cli):
    res = add_trait(workspace, TraitConfig("pirate"))
    assert (res.persona_set, res.n_pairs, res.n_questions) == ("trait-pirate", 5, 12)
    pset = get_persona_set(workspace.catalog(), "trait-pirate")
    assert [p.name for p in pset.personas][:2] == ["pos_1", "pos_2"] and len(pset.personas) == 10
    assert {p.groups for p in pset.personas} == {("pos",), ("neg",)}
    assert "pirate" in pset.personas[0].system_prompt.lower()
    assert len(get_question_set(workspace.catalog(), "trait-pirate").questions) == 12
    with pytest.raises(DuplicateError, match="exists already"):
        add_trait(workspace, TraitConfig("pirate"))
    res = cli.invoke(app, ["trait", "add", "pirate", "--name", "pirate2", "-w", str(workspace.root), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["persona_set"] == "trait-pirate2"


def test_trait_vector_filters():
    c = TraitVectorConfig(7, "pirate")
    assert c.where == ("pos: pirate >= 50", "neg: pirate < 50", "coherence >= 50")
    vc = c.vector_config()
    assert (vc.group_by, vc.contrasts, vc.where) == ("persona_group", (("pirate", "pos", "neg"),), c.where)
    assert TraitVectorConfig(7, "pirate", filter=False).where == ()
    assert TraitVectorConfig(7, "pirate", coherence=None, threshold=70).where[1] == "neg: pirate < 70"
    assert TraitVectorConfig(7, "pirate2", rubric="pirate").where[0] == "pos: pirate >= 50"
    with pytest.raises(ConfigError):
        TraitVectorConfig(7, "pos")


# ------------------------------------------------------------------------------------------------ filtered vectors

PERSONAS = ("default", "default_assistant", "assistant", "storyteller", "cynic", "ghost")


def _answer(body: dict) -> str:
    return re.search(r"\[ANSWER START\]\n(.*)\n\[ANSWER END\]", body["messages"][-1]["content"], re.S).group(1)


def role_score(answer: str, questions: list[str]) -> int:
    """The synthetic judge: 1 on the first question, 3 otherwise; ghost 3 on the last question, 2 before."""
    persona, question = answer.split(" on ", 1)
    if persona == "ghost":
        return 3 if question == questions[-1] else 2
    return 1 if question == questions[0] else 3


@pytest.fixture
def judged(workspace, make_extraction_run):
    """A synthetic extraction (6 personas x 3 questions) and a judge run scoring role adherence and coherence."""
    from personavec import EVAL_QUESTIONS

    ext = make_extraction_run(workspace, personas=PERSONAS)
    qs = EVAL_QUESTIONS[:3]

    def script(attempt, n, body):
        if "coherent" in body["messages"][-1]["content"]:
            return ("reply", "90", first_token_logprobs({"90": 1.0}))
        score = str(role_score(_answer(body), qs))
        return ("reply", score, first_token_logprobs({score: 1.0}))

    with FaultServer(script) as server:
        config = JudgeConfig(
            ext.response_run_id, ("role_adherence", "coherence"), model="judge", base_url=server.base_url
        )
        judge = run_judge(workspace, config)
    assert judge.scored == 36
    return ext, judge.run_id, qs


def _mean(ext, keep, layer_pos):
    rows = [e["row"] for e in ext.examples if keep(e)]
    return ext.data[rows, layer_pos].astype(np.float64).mean(axis=0), len(rows)


@pytest.mark.slow
def test_where_keeps_only_judged_examples(workspace, judged):
    ext, judge_run, qs = judged
    res = compute_vectors(workspace, VectorConfig(ext.run_id, where=("role_adherence = 3", "coherence >= 50")))
    assert res.groups == PERSONAS

    def kept(e, p):
        return e["persona"] == p and role_score(f"{p} on {e['question']}", qs) == 3

    for li, layer in enumerate(ext.layers):
        vs = load_vectors(res.run_id, layer, workspace=workspace)
        for p in vs.names:
            want, n = _mean(ext, lambda e, p=p: kept(e, p), li)
            np.testing.assert_allclose(vs[p].numpy(), want, rtol=1e-5, atol=1e-6)
            assert vs.n_examples[vs.names.index(p)] == n == (1 if p == "ghost" else 2)
    prov = vs.provenance
    assert prov["where"] == ["role_adherence = 3", "coherence >= 50"] and prov["n_examples"] == 11
    assert prov["judgements"]["role_adherence"] == {"judge_run_id": judge_run, "model": "judge", "n_scored": 18}
    assert prov["n_examples_before_filters"] == 18 and prov["group_counts"]["cynic"] == 2


@pytest.mark.slow
def test_min_count_fails_loudly(workspace, judged):
    ext, _, _ = judged
    with pytest.raises(
        ConfigError, match=r"5 persona group\(s\) have fewer than 3 .*role_adherence >= 2.*default \(2\)"
    ):
        compute_vectors(workspace, VectorConfig(ext.run_id, where=("role_adherence >= 2",), min_count=3))
    with pytest.raises(ConfigError, match=r"fewer than 1 example.*fantastical \(0\)"):
        compute_vectors(
            workspace, VectorConfig(ext.run_id, "persona_group", where=("fantastical: role_adherence = 1",))
        )
    assert compute_vectors(workspace, VectorConfig(ext.run_id, where=("role_adherence >= 2",), min_count=2)).run_id
    with pytest.raises(NotFoundError, match=r"no judge run .*'formality'.*personavec judge"):
        compute_vectors(workspace, VectorConfig(ext.run_id, where=("formality > 1",)))
    with pytest.raises(ConfigError, match="filter group"):
        compute_vectors(workspace, VectorConfig(ext.run_id, where=("nobody: coherence > 1",)))


#: role adherence as a logprob judge gives it: first-token alternatives, so scores are expected values
#: (2.99996, never 3) and the integer verdict is the scale's most likely integer.
LOGPROB_JUDGE = {
    "sure": ({"3": 0.99996, "2": 0.00004}, 3),  # score 2.99996
    "split": ({"3": 0.45, "2": 0.35, "0": 0.2}, 3),  # score 2.05: rounding would say 2, the judge writes 3
    "one": ({"1": 0.9, " 1": 0.05, "2": 0.05}, 1),  # "1" and " 1" are the same integer: score 1.05
    "off": ({"4": 0.6, "2": 0.4}, 2),  # 4 is off the 0-3 scale: score 2.0, verdict 2 (the scale's likeliest)
}


def logprob_case(persona: str, question: str, questions: list[str]) -> str:
    if question == questions[0]:
        return "one"
    if persona == "cynic" and question == questions[1]:
        return "off"
    return "split" if persona == "ghost" else "sure"


@pytest.mark.slow
def test_equality_filters_on_logprob_scores_compare_the_integer_verdict(workspace, make_extraction_run, cli):
    """`vectors --where "role_adherence = 3"` kept nothing when scores came from logprobs (2.99996 != 3)."""
    from personavec import EVAL_QUESTIONS

    ext = make_extraction_run(workspace, personas=PERSONAS)
    qs = EVAL_QUESTIONS[:3]

    def script(attempt, n, body):
        persona, question = _answer(body).split(" on ", 1)
        top, _ = LOGPROB_JUDGE[logprob_case(persona, question, qs)]
        return ("reply", max(top, key=top.__getitem__).strip(), first_token_logprobs(top))  # writes the top token

    with FaultServer(script) as server:
        judge = run_judge(
            workspace,
            JudgeConfig(ext.response_run_id, ("role_adherence",), model="judge", base_url=server.base_url),
        )
    assert judge.scored == judge.scored_by_logprobs == 18
    base = ["vectors", str(ext.run_id), "-w", str(workspace.root), "--json"]

    def kept_by(where: str) -> dict[str, int]:
        res = cli.invoke(app, [*base, "--where", where])
        assert res.exit_code == 0, res.output
        vs = load_vectors(json.loads(res.stdout)["run_id"], ext.layers[0], workspace=workspace)
        return dict(zip(vs.names, vs.n_examples, strict=True))

    def expected(keep) -> dict[str, int]:
        counts = {p: 0 for p in PERSONAS}
        for e in ext.examples:
            counts[e["persona"]] += bool(keep(*LOGPROB_JUDGE[logprob_case(e["persona"], e["question"], qs)]))
        return {p: n for p, n in counts.items() if n}

    def score(top):
        mass = {k: p for t, p in top.items() if (k := int(t)) <= 3}
        return sum(k * p for k, p in mass.items()) / sum(mass.values())

    # = compares the verdict: every "sure" and "split" answer (questions 2 and 3, cynic's 3 only)
    assert kept_by("role_adherence = 3") == expected(lambda top, v: v == 3) == dict(dict.fromkeys(PERSONAS, 2), cynic=1)
    assert kept_by("role_adherence in (2, 3)") == expected(lambda top, v: v in (2, 3)) == dict.fromkeys(PERSONAS, 2)
    assert (
        kept_by("role_adherence != 3") == expected(lambda top, v: v != 3) == dict(dict.fromkeys(PERSONAS, 1), cynic=2)
    )
    # order operators compare the expected score: 2.05 and 2.0 pass >= 2, 1.05 does not; 2.99996 fails > 2.9999999
    assert kept_by("role_adherence >= 2") == expected(lambda top, v: score(top) >= 2) == dict.fromkeys(PERSONAS, 2)
    res = cli.invoke(app, [*base, "--where", "role_adherence > 2.9999999"])
    assert res.exit_code == 2 and "fewer than 1" in res.output  # nothing is exactly 3: the score is an expectation
    # the vectors are the means of the kept rows
    res = cli.invoke(app, [*base, "--where", "ghost: role_adherence = 3"])
    vs = load_vectors(json.loads(res.stdout)["run_id"], ext.layers[1], workspace=workspace)
    want, n = _mean(ext, lambda e: e["persona"] == "ghost" and e["question"] != qs[0], 1)
    np.testing.assert_allclose(vs["ghost"].numpy(), want, rtol=1e-5, atol=1e-6)
    assert n == 2 and vs.provenance["where"] == ["ghost: role_adherence = 3"]
    # a non-integer verdict filter is refused in one line, nothing written
    n_runs = len(cli.invoke(app, ["runs", "-w", str(workspace.root), "--json"]).stdout)
    res = cli.invoke(app, [*base, "--where", "role_adherence = 2.5"])
    assert res.exit_code == 2 and "integer verdict" in res.output and len(res.output.strip().splitlines()) == 1
    assert len(cli.invoke(app, ["runs", "-w", str(workspace.root), "--json"]).stdout) == n_runs


@pytest.mark.slow
def test_contrast_group_is_the_difference_of_filtered_means(workspace, judged, cli):
    ext, judge_run, qs = judged
    config = VectorConfig(
        ext.run_id,
        where=("storyteller: role_adherence = 3",),
        contrasts=(("story_vs_default", "storyteller", "default"),),
        judge_runs=(judge_run,),
    )
    res = compute_vectors(workspace, config)
    assert res.groups[-1] == "story_vs_default"
    vs = load_vectors(res.run_id, ext.layers[1], workspace=workspace)
    story, n_story = _mean(ext, lambda e: e["persona"] == "storyteller" and e["question"] != qs[0], 1)
    default, n_default = _mean(ext, lambda e: e["persona"] == "default", 1)  # the filter was scoped to storyteller
    np.testing.assert_allclose(vs["story_vs_default"].numpy(), story - default, rtol=1e-5, atol=1e-5)
    assert vs.n_examples[-1] == n_story + n_default == 5
    assert vs.provenance["contrasts"] == [{"name": "story_vs_default", "pos": "storyteller", "neg": "default"}]
    with pytest.raises(ConfigError, match="no group 'nobody'"):
        compute_vectors(workspace, VectorConfig(ext.run_id, contrasts=(("x", "nobody", "default"),)))
    with pytest.raises(ConfigError, match="name of a persona group"):
        compute_vectors(workspace, VectorConfig(ext.run_id, contrasts=(("ghost", "cynic", "default"),)))
    # the CLI: --where, --min-count, --contrast
    args = ["vectors", str(ext.run_id), "-w", str(workspace.root), "--where", "role_adherence = 3", "--json"]
    res = cli.invoke(app, args + ["--contrast", "d=storyteller,default", "--min-count", "2", "--group-by", "persona"])
    assert res.exit_code == 2, res.output  # ghost keeps 1 answer: refused loudly
    assert "fewer than 2" in res.output and "ghost (1)" in res.output
    res = cli.invoke(app, args[:-3] + ["--where", "coherence > 10", "--contrast", "d=storyteller,default", "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["groups"][-1] == "d"
    res = cli.invoke(app, args + ["--contrast", "nonsense"])
    assert res.exit_code == 2 and "NAME=POS,NEG" in res.output


# ------------------------------------------------------------------------------------------------ projection


def test_auroc_known_values():
    assert auroc([3, 4], [1, 2]) == 1.0 and auroc([1, 2], [3, 4]) == 0.0
    assert auroc([1, 3], [2, 2]) == 0.5 and auroc([2], [2]) == 0.5
    with pytest.raises(ConfigError):
        auroc([], [1])


def test_projection_onto_a_vector(workspace, make_extraction_run, cli):
    ext = make_extraction_run(workspace, personas=PERSONAS)
    res = compute_vectors(
        workspace, VectorConfig(ext.run_id, "persona_group", contrasts=(("axis", "fantastical", "neutral"),))
    )
    p = project_onto_vector(workspace, res.run_id, "axis", ext.run_id, 5)
    v = load_vectors(res.run_id, 5, workspace=workspace)["axis"].numpy().astype(np.float64)
    by_response = {e["response_id"]: e["row"] for e in ext.examples}
    want = [ext.data[by_response[r], 1].astype(np.float64) @ v / np.linalg.norm(v) for r in p.response_ids]
    np.testing.assert_allclose(p.values, want, rtol=1e-5)
    assert len(p.by_group("fantastical")) == 3 and len(p.by_group("neutral")) == 6
    with pytest.raises(ConfigError, match="no group"):
        project_onto_vector(workspace, res.run_id, "nope", ext.run_id, 5)
    res_cli = cli.invoke(
        app, ["trait", "project", str(res.run_id), str(ext.run_id), "-g", "axis", "-l", "5", "-w", str(workspace.root)]
    )
    assert res_cli.exit_code == 0, res_cli.output and "projection" in res_cli.output


# ------------------------------------------------------------------------------------------------ the embedded model

PIRATE_WORDS = re.compile(
    r"\b(arr+|ahoy|matey|ye|aye|hearty|shiver|timbers|captain|ship|treasure|seas?|sail\w*|pirates?|buccaneer|crew|"
    r"scurvy)\b",
    re.I,
)


def generate_answers(loaded, prompts: list[tuple[str, str]], max_new_tokens: int = 32) -> list[str]:
    """Greedy answers of the embedded model to (system prompt, question) pairs, 50 at a time in prompt-length order
    (less left padding), through the local engine's batched generation (its own pad id: transformers 4.57 converts
    the GGUF without one)."""
    from personavec.generation.local import generate_batch, prompt_ids

    ids = [prompt_ids(loaded.tokenizer, s, q) for s, q in prompts]
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [""] * len(ids)
    for start in range(0, len(order), 50):
        batch = order[start : start + 50]
        for i, g in zip(
            batch, generate_batch(loaded, [ids[i] for i in batch], max_new_tokens=max_new_tokens), strict=True
        ):
            out[i] = g.text.strip() or "..."
    return out


@pytest.mark.slow
@pytest.mark.xdist_group("embedded-loaded")
def test_pirate_trait_vector_separates_held_out_answers(workspace, tmp_path, embedded_loaded):
    """The whole recipe on SmolLM2-135M-Instruct: trait set -> answers under 5 pos/neg instruction pairs x 10
    questions -> judged (a word-count judge on the fault server) -> trait vector from questions 0-4 -> projection of
    the 25 + 25 held-out answers (questions 5-9) -> AUROC; then the vector as a llama.cpp control vector."""
    import gguf

    from personavec.exports import export_direction, load_direction
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.ingest import IngestConfig, ingest

    trait = add_trait(workspace, TraitConfig("pirate"))
    spec = read_trait_file("pirate")
    questions = spec.questions[:10]
    personas = spec.persona_specs()
    loaded = embedded_loaded  # SmolLM2-135M-Instruct, loaded once per session
    pairs = [(p, q) for p in personas for q in questions]
    answers = generate_answers(loaded, [(p.system_prompt, q) for p, q in pairs], max_new_tokens=16)
    path = tmp_path / "pirate.jsonl"
    path.write_text(
        "\n".join(
            json.dumps({"persona": p.name, "question": q, "text": a}) for (p, q), a in zip(pairs, answers, strict=True)
        )
    )
    sets = {"persona_set": trait.persona_set, "question_set": trait.question_set}
    responses = ingest(workspace, IngestConfig("responses", path, model="smollm2-135m-instruct", **sets)).run_id

    def judge_script(attempt, n, body):  # a judge that counts pirate words (25 points each)
        prompt = body["messages"][-1]["content"]
        if "coherent" in prompt:
            return ("reply", "90", first_token_logprobs({"90": 0.9, "80": 0.1}))
        score = str(min(100, 25 * len(PIRATE_WORDS.findall(_answer(body)))))
        return ("reply", score, first_token_logprobs({score: 1.0}))

    with FaultServer(judge_script) as server:
        judged = run_judge(
            workspace, JudgeConfig(responses, ("pirate", "coherence"), model="words", base_url=server.base_url)
        )
    assert judged.scored == 200

    layers = (1, 10, 20, 25)  # the forward stops after layer 25 (the last layer's skip is test_exports')
    dtype = embedded_dtype()  # as embedded_loaded was loaded
    base = {"responses_run": responses, "layers": layers, "dtype": dtype, "device": "cpu"}
    train = run_extraction(workspace, ExtractConfig(questions=(0, 1, 2, 3, 4), **base), loaded=loaded)
    held = run_extraction(workspace, ExtractConfig(questions=(5, 6, 7, 8, 9), **base), loaded=loaded)

    results = {}
    for filtered in (False, True):
        config = TraitVectorConfig(train.run_id, "pirate", filter=filtered, min_count=5)
        run = compute_trait_vectors(workspace, config).run_id
        results[filtered] = run
        p = project_onto_vector(workspace, run, "pirate", held.run_id, 25)
        pos, neg = p.by_group("pos"), p.by_group("neg")
        assert len(pos) == len(neg) == 25
        # measured at layer 25, 16 tokens an answer: 0.981 unfiltered, 0.973 filtered in float32; 0.981, 0.971 (5 of
        # 25 pos kept) in bfloat16. float32 with 24 tokens: 0.970, 0.962, 6 of 25 pos kept; 32 tokens: 0.965, 0.971,
        # 7 kept; 3 + 3 questions instead of 5 + 5 fell to 0.867 filtered
        assert auroc(pos, neg) >= 0.9, (filtered, auroc(pos, neg))
    vs = load_vectors(results[True], 25, workspace=workspace)
    counts = dict(zip(vs.names, vs.n_examples, strict=True))
    assert counts["neg"] == 25 and 5 <= counts["pos"] < 25 and counts["pirate"] == counts["pos"] + counts["neg"]

    out = export_direction(load_direction(results[True], "pirate", workspace=workspace), tmp_path / "pirate.gguf")
    assert out.layers == {10: 9, 20: 19, 25: 24} and sorted(out.skipped) == [1] and out.model_hint == "llama"
    reader = gguf.GGUFReader(tmp_path / "pirate.gguf")
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "controlvector"
    assert bytes(reader.fields["controlvector.model_hint"].parts[-1]).decode() == "llama"
    assert int(reader.fields["controlvector.layer_count"].parts[-1][0]) == 3
    tensors = {t.name: t for t in reader.tensors}
    assert sorted(tensors) == ["direction.19", "direction.24", "direction.9"]
    for ours, theirs in out.layers.items():
        t = tensors[f"direction.{theirs}"]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32 and tuple(t.shape) == (576,)
        np.testing.assert_array_equal(
            np.array(t.data), load_vectors(results[True], ours, workspace=workspace)["pirate"]
        )


@pytest.mark.slow
def test_trait_vectors_of_answers_made_for_another_trait_are_refused(workspace, tiny8, tmp_path):
    """`trait vectors RUN --trait ninja --no-filter` on answers to `trait add pirate`'s prompts stored them as a
    ninja vector; the name of the persona set (trait-pirate) says whose they are."""
    from personavec.extract import ExtractConfig, run_extraction
    from personavec.ingest import IngestConfig, ingest

    add_trait(workspace, TraitConfig("pirate"))
    question = get_question_set(workspace.catalog(), "trait-pirate").questions[0].text
    rows = [{"persona": p, "question": question, "text": t} for p, t in [("pos_1", "Arr matey"), ("neg_1", "Hello")]]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sets = {"persona_set": "trait-pirate", "question_set": "trait-pirate"}
    answers = ingest(workspace, IngestConfig("responses", tmp_path / "a.jsonl", **sets)).run_id
    ext = run_extraction(workspace, ExtractConfig(responses_run=answers, model=tiny8, layers=(2,), device="cpu"))
    with pytest.raises(ConfigError, match="persona set 'trait-pirate', made for trait 'pirate', not 'ninja'"):
        compute_trait_vectors(workspace, TraitVectorConfig(ext.run_id, "ninja", filter=False))
    done = compute_trait_vectors(workspace, TraitVectorConfig(ext.run_id, "pirate", filter=False))
    assert done.groups[-1] == "pirate"
