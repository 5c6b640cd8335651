"""Ingest: round trips of every format, and every bad input gives one clear error with nothing written."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from checks import one_line_error, runs_of

from personavec import EVAL_QUESTIONS, PERSONAS
from personavec.cli import app
from personavec.errors import DuplicateError, InputFileError, NotFoundError
from personavec.ingest import IngestConfig, ingest
from personavec.seed import load_responses, save_responses
from personavec.store.responses import responses_by_key
from personavec.store.runs import list_runs
from personavec.store.sets import get_persona_set, get_question_set


def _counts(catalog) -> tuple[int, int, int]:
    with catalog.session() as s:
        row = (
            s.connection()
            .exec_driver_sql(
                "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM responses), (SELECT count(*) FROM personas)"
            )
            .one()
        )
    return tuple(row)


def test_seed_format_round_trip(workspace, tmp_path, seed_cache_file):
    original = load_responses(seed_cache_file)
    with workspace.catalog() as catalog:
        result = ingest(workspace, IngestConfig("responses", seed_cache_file))
        assert result.rows == len(original) == 15
        assert responses_by_key(catalog, result.run_id) == original
    out = tmp_path / "again.json"
    save_responses(original, out)
    assert json.loads(out.read_text()) == json.loads(seed_cache_file.read_text())


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_tabular_formats(workspace, tmp_path, fmt):
    rows = [
        {"persona": p, "question": q, "sample_index": s, "text": f"{p}/{i}/{s}, with a comma"}
        for p in list(PERSONAS)[:3]
        for i, q in enumerate(EVAL_QUESTIONS[:2])
        for s in range(2)
    ]
    path = tmp_path / f"r.{fmt}"
    table = pa.Table.from_pylist(rows)
    if fmt == "jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    elif fmt == "csv":
        import pyarrow.csv as pacsv

        pacsv.write_csv(table, path)
    else:
        pq.write_table(table, path)
    with workspace.catalog() as catalog:
        result = ingest(workspace, IngestConfig("responses", path, model="test-model"))
        assert result.rows == 12
        with catalog.session() as s:
            got = (
                s.connection()
                .exec_driver_sql(
                    "SELECT p.name, q.text, r.sample_index, r.text FROM responses r "
                    "JOIN personas p ON p.id = r.persona_id "
                    "JOIN questions q ON q.id = r.question_id WHERE r.run_id = ? ORDER BY 1, 2, 3",
                    (result.run_id,),
                )
                .all()
            )
    assert sorted((r["persona"], r["question"], r["sample_index"], r["text"]) for r in rows) == [tuple(g) for g in got]


def test_persona_and_question_sets(workspace, tmp_path):
    (tmp_path / "p.yaml").write_text(
        "name: mine\npersonas:\n  - {name: a, system_prompt: 'Be A', groups: [x]}\n  - {name: b, system_prompt: ''}\n"
    )
    (tmp_path / "q.csv").write_text('question\n"Why, though?"\nHow?\n')
    (tmp_path / "p2.json").write_text(json.dumps({"c": "Be C", "d": "Be D"}))
    with workspace.catalog() as catalog:
        assert ingest(workspace, IngestConfig("personas", tmp_path / "p.yaml")).name == "mine"
        assert ingest(workspace, IngestConfig("questions", tmp_path / "q.csv")).name == "q"
        assert ingest(workspace, IngestConfig("personas", tmp_path / "p2.json", name="cd")).rows == 2
        pset = get_persona_set(catalog, "mine")
        assert [(p.name, p.system_prompt, p.groups) for p in pset.personas] == [("a", "Be A", ("x",)), ("b", "", ())]
        assert [q.text for q in get_question_set(catalog, "q").questions] == ["Why, though?", "How?"]
        kinds = [r.kind for r in list_runs(catalog)]
        assert kinds.count("ingest-personas") == 3 and kinds.count("ingest-questions") == 2
        with pytest.raises(DuplicateError, match="already exists"):
            ingest(workspace, IngestConfig("personas", tmp_path / "p.yaml"))


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content)
    return path


BAD_RESPONSES = [
    ("malformed.json", '{"["default", "q"]": "x",', "not valid JSON at line 1"),
    ("keyshape.json", json.dumps({"default|What?": "x"}), "is not a JSON-encoded \\[persona, question\\] pair"),
    ("keyshape3.json", json.dumps({json.dumps(["default", "q", "extra"]): "x"}), "not a JSON-encoded"),
    ("notstr.json", json.dumps({json.dumps(["default", EVAL_QUESTIONS[0]]): 3}), "must be the response text"),
    (
        "unknown_persona.json",
        json.dumps({json.dumps(["default", EVAL_QUESTIONS[0]]): "a", json.dumps(["pirate", EVAL_QUESTIONS[0]]): "b"}),
        "unknown persona 'pirate'",
    ),
    ("unknown_question.json", json.dumps({json.dumps(["default", "What is 2+2?"]): "4"}), "unknown question"),
    (
        "dupkey.json",
        '{"[\\"default\\", \\"Q\\"]": "a", "[\\"default\\", \\"Q\\"]": "b"}'.replace("Q", EVAL_QUESTIONS[0]),
        "duplicate key",
    ),
    ("empty.json", "", "the file is empty"),
    ("emptyobj.json", "{}", "no responses in the file"),
    ("list.json", "[1, 2]", "seed cache format is a JSON object"),
    ("cols.csv", "who,what,answer\ndefault,x,y\n", "missing column\\(s\\) persona, question, text"),
    (
        "dup.jsonl",
        "\n".join(json.dumps({"persona": "default", "question": EVAL_QUESTIONS[0], "text": t}) for t in "ab"),
        "duplicate response for persona 'default'.*line 1, line 2",
    ),
    ("nulls.jsonl", json.dumps({"persona": "default", "question": EVAL_QUESTIONS[0], "text": None}), "line 1"),
    ("weird.txt", "hello", "cannot tell the response format"),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "content", "message"), BAD_RESPONSES, ids=[b[0] for b in BAD_RESPONSES])
def test_bad_response_files(workspace, tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with workspace.catalog() as catalog:
        before = _counts(catalog)
        with pytest.raises(InputFileError, match=message) as info:
            ingest(workspace, IngestConfig("responses", path))
        assert str(path) in str(info.value)
        assert _counts(catalog) == before


BAD_SETS = [
    (
        "p_dup.yaml",
        "personas:\n  - {name: a, system_prompt: x}\n  - {name: a, system_prompt: y}\n",
        "duplicate persona",
    ),
    ("p_dupkey.yaml", "a: x\na: y\n", "duplicate key 'a'"),
    ("p_noprompt.json", json.dumps({"personas": [{"name": "a"}]}), "needs a string 'system_prompt'"),
    ("p_cols.csv", "persona,prompt\na,b\n", "missing column\\(s\\) name, system_prompt"),
    ("p_empty.yaml", "", "the file is empty"),
    ("p_bad.yaml", "personas: [a: b: c", "not valid YAML"),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_persona_files(workspace, tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with workspace.catalog() as catalog:
        before = _counts(catalog)
        with pytest.raises(InputFileError, match=message):
            ingest(workspace, IngestConfig("personas", path))
        assert _counts(catalog) == before


def test_bad_question_files(workspace, tmp_path):
    with workspace.catalog() as catalog:
        for content, message in [
            ("- a\n- a\n", "duplicate question"),
            ("- ''\n", "non-empty string"),
            ("{x: 1}", "expected a list of questions"),
        ]:
            with pytest.raises(InputFileError, match=message):
                ingest(workspace, IngestConfig("questions", _write(tmp_path, "q.yaml", content)))
        assert [r.kind for r in list_runs(catalog)] == ["ingest-personas", "ingest-questions"]


def test_unknown_sets(workspace, seed_cache_file):
    with workspace.catalog() as catalog:
        with pytest.raises(NotFoundError, match="unknown persona set 'nope'.*known: builtin"):
            ingest(workspace, IngestConfig("responses", seed_cache_file, persona_set="nope"))
        with pytest.raises(NotFoundError, match="unknown question set 'nope'"):
            ingest(workspace, IngestConfig("responses", seed_cache_file, question_set="nope"))
        assert _counts(catalog)[1] == 0


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "needle"),
    [
        ("axis", "'axis' is reserved"),
        ("AXIS", "is reserved"),
        ("-pirate", "starts with '-'"),
        ("pi\u202erate", "U+202E (RIGHT-TO-LEFT OVERRIDE) at position 2"),
        ("pi\u2066rate", "U+2066"),
        ("tab\tname", "U+0009"),
    ],
)
def test_reserved_and_control_character_persona_names_are_refused_at_ingest(cli, workspace, tmp_path, name, needle):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"name": "mine", "personas": [{"name": name, "system_prompt": "x"}]}))
    before = len(runs_of(workspace))
    res = cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)])
    one_line_error(res, 2, "personas[0]: persona name", needle)
    assert len(runs_of(workspace)) == before


def test_reserved_group_names_are_refused_and_emoji_names_are_kept(cli, workspace, tmp_path):
    path = tmp_path / "p.json"
    path.write_text(json.dumps({"personas": [{"name": "pirate", "system_prompt": "x", "groups": ["axis"]}]}))
    one_line_error(cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)]), 2, "persona group")
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"  # joined by zero-width joiners
    path.write_text(json.dumps({"personas": [{"name": f"{family} 海賊", "system_prompt": "x"}]}))
    res = cli.invoke(app, ["ingest", "personas", str(path), "-w", str(workspace.root)])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_answers_longer_than_arrows_block_are_ingested(workspace, tmp_path, fmt):
    import csv

    from personavec import EVAL_QUESTIONS
    from personavec.ingest import IngestConfig, ingest
    from personavec.store.responses import answered_responses

    long = "a long answer. " * 150_000  # 2.1 MB in one row
    rows = [{"persona": "default", "question": EVAL_QUESTIONS[0], "text": long}]
    rows.append({"persona": "default", "question": EVAL_QUESTIONS[1], "text": "short"})
    path = tmp_path / f"r.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        with path.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, ["persona", "question", "text"])
            writer.writeheader()
            writer.writerows(rows)
    result = ingest(workspace, IngestConfig("responses", path))
    texts = sorted(r.text for r in answered_responses(workspace.catalog(), result.run_id))
    assert texts == sorted([long, "short"])


def test_ingest_of_a_device_says_what_it_is(cli, workspace):
    res = cli.invoke(app, ["ingest", "personas", "/dev/null", "-w", str(workspace.root)])
    one_line_error(res, 2, "/dev/null: not a regular file")


def test_huge_question_is_a_clear_error(workspace, tmp_path):
    path = _write(tmp_path, "q.json", json.dumps(["short?", "x" * 10_000_000]))
    with pytest.raises(InputFileError, match=r"questions\[1\]: the question is 10,000,000 bytes long"):
        ingest(workspace, IngestConfig("questions", path))
    assert _counts(workspace.catalog())[0] == 2  # the two built-in set runs only


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}], "unknown role 'narrator'"),
        ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty assistant message"),
        ([{"role": "user", "content": "hi"}], "no assistant message"),
        ({"a": "not a list"}, "must be a list of"),
    ],
)
def test_bad_transcripts(tmp_path, doc, message):
    from personavec.ingest import read_transcript_file

    with pytest.raises(InputFileError, match=message):
        read_transcript_file(_write(tmp_path, "t.json", json.dumps(doc)))


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (1.5, r"r.jsonl: line 2: sample_index must be a whole number >= 0, got 1.5"),
        (1e12, r"r.jsonl: line 2: sample_index must be a whole number >= 0"),
        ("two", r"r.jsonl: cannot be read as jsonl: .*sample_index"),
    ],
)
def test_sample_index_must_be_a_whole_number(workspace, tmp_path, value, message):
    row = {"persona": "default", "question": EVAL_QUESTIONS[0], "text": "a", "sample_index": 0}
    path = _write(tmp_path, "r.jsonl", json.dumps(row) + "\n" + json.dumps(row | {"sample_index": value}) + "\n")
    with pytest.raises(InputFileError, match=message):
        ingest(workspace, IngestConfig("responses", path))
