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
    # Excel's "CSV UTF-8" and Notepad start the file with a byte order mark: it is not part of the first column.
    bom = "\ufeff"
    (tmp_path / "q.csv").write_text(bom + 'question\n"Why, though?"\nHow?\n', encoding="utf-8")
    (tmp_path / "p2.json").write_text(bom + json.dumps({"c": "Be C", "d": "Be D"}), encoding="utf-8")
    (tmp_path / "p3.csv").write_text(bom + "name,system_prompt\ne,Be E\n", encoding="utf-8")
    (tmp_path / "q2.yaml").write_text(bom + "name: q2\nquestions:\n  - Where?\n", encoding="utf-8")
    with workspace.catalog() as catalog:
        assert ingest(workspace, IngestConfig("personas", tmp_path / "p.yaml")).name == "mine"
        assert ingest(workspace, IngestConfig("questions", tmp_path / "q.csv")).name == "q"
        assert ingest(workspace, IngestConfig("personas", tmp_path / "p2.json", name="cd")).rows == 2
        assert ingest(workspace, IngestConfig("personas", tmp_path / "p3.csv")).rows == 1
        assert ingest(workspace, IngestConfig("questions", tmp_path / "q2.yaml")).name == "q2"
        pset = get_persona_set(catalog, "mine")
        assert [(p.name, p.system_prompt, p.groups) for p in pset.personas] == [("a", "Be A", ("x",)), ("b", "", ())]
        assert [(p.name, p.system_prompt) for p in get_persona_set(catalog, "p3").personas] == [("e", "Be E")]
        assert [q.text for q in get_question_set(catalog, "q").questions] == ["Why, though?", "How?"]
        assert [q.text for q in get_question_set(catalog, "q2").questions] == ["Where?"]
        kinds = [r.kind for r in list_runs(catalog)]
        assert kinds.count("ingest-personas") == 4 and kinds.count("ingest-questions") == 3
        with pytest.raises(DuplicateError, match="already exists"):
            ingest(workspace, IngestConfig("personas", tmp_path / "p.yaml"))


def _write(tmp_path, name, content):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


def _parquet(**columns) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue().to_pybytes()


def _jsonl(*rows, text=EVAL_QUESTIONS[0]) -> str:
    """Response lines for persona ``default``, each ``{persona, question, text}`` updated with a row of ``rows``."""
    return "".join(json.dumps({"persona": "default", "question": text, "text": "a"} | row) + "\n" for row in rows)


_Q0, _Q1 = EVAL_QUESTIONS[0], EVAL_QUESTIONS[1]


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
    # persona/question/text must be strings and sample_index a whole number on every line, never converted
    ("text_list.jsonl", _jsonl({"text": ["a", "b"]}), "text_list.jsonl: line 1: 'text' must be a string, got \\["),
    ("persona_list.jsonl", _jsonl({"persona": ["default"]}), "persona_list.jsonl: line 1: 'persona' must be a string"),
    ("text_obj.jsonl", _jsonl({}, {"question": _Q1, "text": {"a": 1}}), "line 2: 'text' must be a string, got {"),
    ("text_numbers.jsonl", _jsonl({"text": 5}, {"question": _Q1, "text": 6}), "line 1: 'text' must be a string, got 5"),
    ("text_mixed.jsonl", _jsonl({}, {"question": _Q1, "text": 6}), "line 2: 'text' must be a string, got 6"),
    ("question_num.jsonl", _jsonl({"question": 4}), "line 1: 'question' must be a string, got 4"),
    ("sample_bool.jsonl", _jsonl({"sample_index": True}), "line 1: sample_index must be a whole number >= 0, got true"),
    ("sample_str.jsonl", _jsonl({"sample_index": "1"}), 'line 1: sample_index must be a whole number >= 0, got "1"'),
    (
        "sample_gap.jsonl",
        _jsonl({"sample_index": 1}, {"question": _Q1}),
        "line 2: 'sample_index' is missing \\(null\\)",
    ),
    (
        "sample_empty.csv",
        f"persona,question,text,sample_index\ndefault,{_Q0},a,\n",
        "line 2: 'sample_index' is missing",
    ),
    ("sample_bool.csv", f"persona,question,text,sample_index\ndefault,{_Q0},a,true\n", "line 2: sample_index .* true"),
    # JSONL errors count lines from 1, blank lines included
    ("parse.jsonl", _jsonl({}) + '{"persona": "default",}\n', "parse.jsonl: line 2: not valid JSON at column 23"),
    ("notobj.jsonl", _jsonl({}) + "[1]\n", "line 2: expected one JSON object"),
    (
        "two.jsonl",
        _jsonl({}).strip() + " " + _jsonl({"question": _Q1}),
        "line 1: not valid JSON at column \\d+: Extra data",
    ),
    ("dupkey.jsonl", '{"persona": "default", "text": "a", "text": "b"}\n', "line 1: duplicate key 'text'"),
    ("blank.jsonl", "\n" + _jsonl({}) + "\n" + _jsonl({"persona": "pirat"}), "line 4: unknown persona 'pirat'"),
    ("extra.jsonl", _jsonl({"m": 1}, {"question": _Q1, "m": "x"}), "line 2: cannot be read as jsonl: .*Column\\(/m\\)"),
    (  # answers spanning lines: the line a record starts on, not its row number + 2
        "multiline.csv",
        f'persona,question,text\ndefault,"{_Q0}","one\ntwo\nthree"\npirat,"{_Q0}",x\n',
        "multiline.csv: line 5: unknown persona 'pirat'",
    ),
    (
        "dupcol.csv",
        f"persona,question,text,text\ndefault,{_Q0},a,b\n",
        "line 1: duplicate column 'text' \\(columns 3 and 4\\)",
    ),
    (
        "bytes.parquet",
        _parquet(persona=["default"], question=[_Q0], text=[b"\xff"]),
        "bytes.parquet: row 0: 'text' is not UTF-8 text \\(byte 0 is b'\\\\xff'\\)",
    ),
    (
        "badstr.parquet",
        _parquet(persona=["default"], question=[_Q0], text=pa.array([b"ok\xff"], pa.binary()).view(pa.string())),
        "badstr.parquet: row 0: 'text' is not UTF-8 text \\(byte 2",
    ),
    ("int.parquet", _parquet(persona=["default"], question=[_Q0], text=[5]), "row 0: 'text' must be a string, got 5"),
    (
        "sample_null.parquet",
        _parquet(persona=["default"], question=[_Q0], text=["a"], sample_index=pa.array([None], pa.int64())),
        "row 0: 'sample_index' is missing",
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "content", "message"), BAD_RESPONSES, ids=[b[0] for b in BAD_RESPONSES])
def test_bad_response_files(cli, workspace, tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with workspace.catalog() as catalog:
        before = _counts(catalog)
        with pytest.raises(InputFileError, match=message) as info:
            ingest(workspace, IngestConfig("responses", path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert _counts(catalog) == before
    res = cli.invoke(app, ["ingest", "responses", str(path), "-w", str(workspace.root)])
    assert one_line_error(res, 2, str(path)).strip().count("\n") == 0
    assert _counts(workspace.catalog()) == before


BAD_SETS = [
    (
        "p_dup.yaml",
        "personas:\n  - {name: a, system_prompt: x}\n  - {name: a, system_prompt: y}\n",
        "duplicate persona",
    ),
    ("p_dupkey.yaml", "a: x\na: y\n", "p_dupkey.yaml: duplicate key 'a' at line 2"),
    ("p_noprompt.json", json.dumps({"personas": [{"name": "a"}]}), "needs a string 'system_prompt'"),
    ("p_cols.csv", "persona,prompt\na,b\n", "missing column\\(s\\) name, system_prompt"),
    ("p_empty.yaml", "", "the file is empty"),
    ("p_bad.yaml", "personas: [a: b: c", "not valid YAML"),
    (
        "p_unclosed.yaml",
        "name: [unclosed\n",
        "p_unclosed.yaml: not valid YAML at line 2 column 1: expected ',' or ']'.* at line 1 column 7",
    ),
    ("p_control.yaml", "a: \x07\n", "p_control.yaml: not valid YAML at line 1: unacceptable character #x0007"),
    ("p_unhashable.yaml", "? [a]\n: x\n", "not valid YAML at line 1 column 3: found unhashable key"),
    ("p_lines.csv", 'name,system_prompt\na,"two\nlines"\na,b\n', "p_lines.csv: line 4: duplicate persona name 'a'"),
    (
        "p_dupcol.csv",
        "name,system_prompt,name\na,b,c\n",
        "p_dupcol.csv: line 1: duplicate column 'name' \\(columns 1 and 3\\)",
    ),
]


@pytest.mark.parametrize(("name", "content", "message"), BAD_SETS, ids=[b[0] for b in BAD_SETS])
def test_bad_persona_files(workspace, tmp_path, name, content, message):
    path = _write(tmp_path, name, content)
    with workspace.catalog() as catalog:
        before = _counts(catalog)
        with pytest.raises(InputFileError, match=message) as info:
            ingest(workspace, IngestConfig("personas", path))
        assert str(path) in str(info.value) and "\n" not in str(info.value) and info.value.exit_code == 2
        assert _counts(catalog) == before


def test_bad_question_files(workspace, tmp_path):
    with workspace.catalog() as catalog:
        for name, content, message in [
            ("q.yaml", "- a\n- a\n", "duplicate question"),
            ("q.yaml", "- ''\n", "non-empty string"),
            ("q.yaml", "{x: 1}", "expected a list of questions"),
            (
                "q.csv",
                "question,question\nWhy?,How?\n",
                "q.csv: line 1: duplicate column 'question' \\(columns 1 and 2\\)",
            ),
        ]:
            path = _write(tmp_path, name, content)
            with pytest.raises(InputFileError, match=message) as info:
                ingest(workspace, IngestConfig("questions", path))
            assert str(path) in str(info.value) and "\n" not in str(info.value)
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
        ("two", r'r.jsonl: line 2: sample_index must be a whole number >= 0, got "two"'),
    ],
)
def test_sample_index_must_be_a_whole_number(workspace, tmp_path, value, message):
    row = {"persona": "default", "question": EVAL_QUESTIONS[0], "text": "a", "sample_index": 0}
    path = _write(tmp_path, "r.jsonl", json.dumps(row) + "\n" + json.dumps(row | {"sample_index": value}) + "\n")
    with pytest.raises(InputFileError, match=message):
        ingest(workspace, IngestConfig("responses", path))


def test_csv_text_that_looks_like_numbers_stays_text(workspace, tmp_path):
    from personavec.store.responses import answered_responses

    path = _write(tmp_path, "r.csv", f'persona,question,text\ndefault,{_Q0},007\ndefault,{_Q1},"4.50"\n')
    result = ingest(workspace, IngestConfig("responses", path))
    assert sorted(r.text for r in answered_responses(workspace.catalog(), result.run_id)) == ["007", "4.50"]
