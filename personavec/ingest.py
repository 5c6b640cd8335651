"""Ingest stage: persona sets, question sets and responses from files into the catalog.

Formats: persona/question sets from JSON, YAML or CSV; responses from the seed's cache (a JSON object whose keys
are JSON-encoded ``[persona, question]``), JSONL, CSV or Parquet. Each ingest is one transaction and one run row
(with the file's path and SHA-256); responses go in through Arrow and DuckDB's own insert, not the ORM.
Any problem raises :class:`InputFileError` naming the file and the row or key, and nothing is written.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import yaml

from personavec.config import name_problem
from personavec.errors import ConfigError, InputFileError
from personavec.files import file_sha256, resource_path
from personavec.store.records import PersonaSpec
from personavec.store.responses import ResolvedResponses, ingest_response_table
from personavec.store.sets import create_persona_set, create_question_set, set_names

if TYPE_CHECKING:
    from personavec.store.engine import Catalog
    from personavec.workspace import Workspace

BUILTIN = "builtin"
#: Longest persona name or question text, in UTF-8 bytes: both are unique keys, and DuckDB's index (ART) refuses keys
#: over ~184 KiB with an error that names neither the file nor the row.
MAX_KEY_BYTES = 100_000
RESPONSE_FORMATS = ("seed-json", "jsonl", "csv", "parquet")


@dataclass(frozen=True)
class IngestResult:
    run_id: int
    kind: str
    name: str | None
    rows: int


# ---------------------------------------------------------------------------------------------------- reading files


def _require_file(path: Path) -> None:
    if path.is_dir():
        raise InputFileError(f"{path}: is a directory, expected a file")
    if not path.is_file():
        if path.exists():
            raise InputFileError(f"{path}: not a regular file (a device, pipe or socket): give a file")
        raise InputFileError(f"{path}: no such file")


def _not_utf8(path: Path, offset: int, exc: UnicodeDecodeError) -> InputFileError:
    bad = exc.object[exc.start : exc.start + 1]
    return InputFileError(f"{path}: not UTF-8 text (byte {offset + exc.start} is {bad!r}): save it as UTF-8")


def _check_utf8(path: Path, data: bytes | None = None) -> None:
    """Arrow's CSV/JSON readers let invalid UTF-8 through (as binary, or as broken strings). ``data``: the file's
    bytes when they are in memory already (checked there, not read again)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for chunk in _blocks(path, data):
        try:
            decoder.decode(chunk)
        except UnicodeDecodeError as exc:
            raise _not_utf8(path, offset, exc) from exc
        offset += len(chunk)
    try:
        decoder.decode(b"", final=True)
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, offset, exc) from exc


def _blocks(path: Path, data: bytes | None, size: int = 1 << 20) -> Iterator[bytes | memoryview]:
    if data is not None:
        view = memoryview(data)
        yield from (view[i : i + size] for i in range(0, len(view), size))
        return
    with path.open("rb") as fh:
        while chunk := fh.read(size):
            yield chunk


def _read_text(path: Path) -> str:
    """The file as text; a UTF-8 byte order mark (Excel's "CSV UTF-8", Notepad) is dropped."""
    _require_file(path)
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        text = data[bom:].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, bom, exc) from exc
    if not text.strip():
        raise InputFileError(f"{path}: the file is empty")
    return text


def _no_duplicate_keys(path: Path, where: str = ""):
    at = f" {where}:" if where else ""

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: dict[str, Any] = {}
        for key, value in pairs:
            if key in seen:
                raise InputFileError(f"{path}:{at} duplicate key {key!r}: each key may appear once")
            seen[key] = value
        return seen

    return hook


def _load_structured(path: Path) -> Any:
    """JSON or YAML document (by extension), rejecting duplicate keys."""
    text = _read_text(path)
    if path.suffix.lower() in (".yaml", ".yml"):
        return _load_yaml(path, text)
    try:
        return json.loads(text, object_pairs_hook=_no_duplicate_keys(path))
    except json.JSONDecodeError as exc:
        raise InputFileError(f"{path}: not valid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from exc


def _load_yaml(path: Path, text: str) -> Any:
    """One YAML document; a syntax error is one line naming the file, line and column (PyYAML's own message
    spans several lines and names ``<unicode string>``)."""
    loader = None
    try:
        loader = _UniqueKeyLoader(text)  # checks for unprintable characters already
        loader.name = str(path)  # the marks of later errors (a duplicate key) name the file
        return loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        at = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        context = ""
        if exc.context and exc.problem:
            cm = exc.context_mark
            context = f" ({exc.context}" + (f" at line {cm.line + 1} column {cm.column + 1})" if cm else ")")
        problem = " ".join(str(exc.problem or exc.context).split())
        raise InputFileError(f"{path}: not valid YAML{at}: {problem}{context}") from exc
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise InputFileError(
            f"{path}: not valid YAML at line {line}: unacceptable character #x{exc.character:04x}: {exc.reason}"
        ) from exc
    except yaml.YAMLError as exc:
        raise InputFileError(f"{path}: not valid YAML: {' '.join(str(exc).split())}") from exc
    finally:
        if loader is not None:
            loader.dispose()


class _UniqueKeyLoader(yaml.SafeLoader):
    pass


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key (a list): construct_mapping below names it
            continue
        if duplicate:
            raise InputFileError(
                f"{node.start_mark.name}: duplicate key {key!r} at line {key_node.start_mark.line + 1}"
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _csv_rows(path: Path, required: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """``(where, row)`` for each record: where is ``line N``, the line it starts on (a quoted value may span
    lines)."""
    text = _read_text(path)
    reader = csv.DictReader(io.StringIO(text))
    header = reader.fieldnames or []
    _no_duplicate_columns(path, header, "line 1: ")
    missing = [c for c in required if c not in header]
    if missing:
        raise InputFileError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(header) or 'none'} "
            f"(expected {', '.join(required)})"
        )
    rows, start = [], reader.line_num + 1
    for row in reader:
        rows.append((f"line {start}", row))
        start = reader.line_num + 1
    return rows


def _no_duplicate_columns(path: Path, names: Sequence[str], where: str) -> None:
    seen: dict[str, int] = {}
    for i, name in enumerate(names, start=1):
        if name in seen:
            raise InputFileError(
                f"{path}: {where}duplicate column {name!r} (columns {seen[name]} and {i}): each column may appear once"
            )
        seen[name] = i


def _check_key_size(path: Path, where: str, what: str, value: str) -> None:
    size = len(value.encode("utf-8"))
    if size > MAX_KEY_BYTES:
        raise InputFileError(
            f"{path}: {where}: the {what} is {size:,} bytes long; at most {MAX_KEY_BYTES:,} bytes are allowed "
            f"(it is a unique key in the catalog)"
        )


def read_persona_file(path: Path) -> tuple[str | None, list[PersonaSpec]]:
    """Personas from JSON/YAML (``{name?, personas: [{name, system_prompt, groups?}]}`` or ``{name: prompt}``)
    or CSV (columns ``name``, ``system_prompt``, optional ``groups`` separated by ``;``)."""
    set_name: str | None = None
    entries: list[tuple[str, Any]] = []
    if path.suffix.lower() == ".csv":
        for where, row in _csv_rows(path, ("name", "system_prompt")):
            groups = [g.strip() for g in (row.get("groups") or "").split(";") if g.strip()]
            entries.append((where, {"name": row["name"], "system_prompt": row["system_prompt"], "groups": groups}))
    else:
        doc = _load_structured(path)
        if isinstance(doc, dict) and "personas" in doc:
            set_name = doc.get("name")
            items = doc["personas"]
            if isinstance(items, dict):
                items = [{"name": k, "system_prompt": v} for k, v in items.items()]
            if not isinstance(items, list):
                raise InputFileError(f"{path}: 'personas' must be a list of {{name, system_prompt}} objects")
            entries = [(f"personas[{i}]", item) for i, item in enumerate(items)]
        elif isinstance(doc, dict):
            entries = [(f"key {k!r}", {"name": k, "system_prompt": v}) for k, v in doc.items()]
        else:
            raise InputFileError(
                f"{path}: expected an object {{persona: system_prompt}} or {{name, personas: [...]}}, "
                f"got {type(doc).__name__}"
            )
    personas: list[PersonaSpec] = []
    seen: set[str] = set()
    for where, item in entries:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise InputFileError(f"{path}: {where}: each persona needs a non-empty string 'name'")
        prompt = item.get("system_prompt")
        if not isinstance(prompt, str):
            raise InputFileError(
                f"{path}: {where}: persona {item['name']!r} needs a string 'system_prompt' (may be empty)"
            )
        groups = item.get("groups") or []
        if not isinstance(groups, list) or not all(isinstance(g, str) for g in groups):
            raise InputFileError(f"{path}: {where}: 'groups' must be a list of strings")
        if item["name"] in seen:
            raise InputFileError(f"{path}: {where}: duplicate persona name {item['name']!r}")
        for what, value in (("persona name", item["name"]), *(("persona group", g) for g in groups)):
            if problem := name_problem(value):
                raise InputFileError(f"{path}: {where}: {what} {problem}: rename it")
        _check_key_size(path, where, "persona name", item["name"])
        seen.add(item["name"])
        personas.append(PersonaSpec(item["name"], prompt, tuple(groups)))
    if not personas:
        raise InputFileError(f"{path}: no personas in the file")
    return set_name, personas


def read_question_file(path: Path) -> tuple[str | None, list[str]]:
    """Questions from JSON/YAML (a list of strings, or ``{name?, questions: [...]}``) or CSV (column ``question``)."""
    set_name: str | None = None
    if path.suffix.lower() == ".csv":
        records = _csv_rows(path, ("question",))
        items: list[Any] = [row["question"] for _, row in records]
        where = [at for at, _ in records]
    else:
        doc = _load_structured(path)
        if isinstance(doc, dict) and "questions" in doc:
            set_name, doc = doc.get("name"), doc["questions"]
        if not isinstance(doc, list):
            raise InputFileError(f"{path}: expected a list of questions or {{name, questions: [...]}}")
        items = doc
        where = [f"questions[{i}]" for i in range(len(items))]
    seen: set[str] = set()
    for w, q in zip(where, items, strict=True):
        if not isinstance(q, str) or not q.strip():
            raise InputFileError(f"{path}: {w}: each question must be a non-empty string")
        if q in seen:
            raise InputFileError(f"{path}: {w}: duplicate question {q!r}")
        _check_key_size(path, w, "question", q)
        seen.add(q)
    if not items:
        raise InputFileError(f"{path}: no questions in the file")
    return set_name, list(items)


def detect_response_format(path: Path) -> str:
    suffix = path.suffix.lower()
    return {".json": "seed-json", ".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet"}.get(
        suffix, ""
    ) or _bad_format(path)


def _bad_format(path: Path) -> str:
    raise InputFileError(
        f"{path}: cannot tell the response format from the extension {path.suffix!r}: "
        f"use .json (seed cache), .jsonl, .csv or .parquet, or pass --format"
    )


_TEXT_ALIASES = ("text", "response")
_STRING_COLUMNS = ("persona", "question", *_TEXT_ALIASES)


def read_response_file(path: Path, fmt: str | None = None) -> pa.Table:
    """Responses as an Arrow table with ``persona``, ``question``, ``sample_index``, ``text`` and ``_where``
    (the line or row each came from, for error messages). ``persona``, ``question`` and ``text`` must be strings
    and ``sample_index`` a whole number in every row: a value of another JSON or Parquet type is an error naming
    its line or row, never converted."""
    fmt = fmt or detect_response_format(path)
    if fmt not in RESPONSE_FORMATS:
        raise InputFileError(f"{path}: unknown format {fmt!r}; expected one of {', '.join(RESPONSE_FORMATS)}")
    _require_file(path)
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: the file is empty")
    if fmt == "seed-json":
        return _read_seed_json(path)
    data = path.read_bytes() if fmt == "jsonl" else None  # read once: checked, then parsed from memory
    if fmt in ("jsonl", "csv"):
        _check_utf8(path, data)
    # Arrow reads in blocks (1 MiB by default) and refuses a row longer than one ("straddling object straddles two
    # block boundaries"): a block as large as the file holds any row (the whole table is in memory anyway).
    block = min(max(path.stat().st_size + 1, 1 << 20), (1 << 31) - 1)
    lines: list[int] | None = None
    try:
        if fmt == "jsonl":
            assert data is not None
            table, lines = _read_jsonl(path, data, block)
            first_row = 1
        elif fmt == "csv":
            table = pacsv.read_csv(
                path,
                read_options=pacsv.ReadOptions(block_size=block),
                # Text stays text: inferred types would turn a response "007" into 7 and "4.50" into 4.5.
                convert_options=pacsv.ConvertOptions(
                    strings_can_be_null=False, column_types=dict.fromkeys(_STRING_COLUMNS, pa.string())
                ),
            )
            first_row = 2
        else:
            table = pq.read_table(path)
            first_row = 0
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise InputFileError(f"{path}: cannot be read as {fmt}: {str(exc).splitlines()[0]}") from exc
    names = table.column_names
    _no_duplicate_columns(path, names, "line 1: " if fmt == "csv" else "")
    text_col = next((c for c in _TEXT_ALIASES if c in names), None)
    missing = [c for c in ("persona", "question") if c not in names] + ([] if text_col else ["text"])
    if missing or text_col is None:
        raise InputFileError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(names) or 'none'} "
            f"(expected persona, question, text [, sample_index])"
        )
    if table.num_rows == 0:
        raise InputFileError(f"{path}: no responses in the file")
    unit = "line" if fmt in ("jsonl", "csv") else "row"
    n = table.num_rows
    if fmt == "csv":
        lines = _csv_record_lines(table, first_row)
    numbers = pa.array(lines if lines is not None else range(first_row, first_row + n))
    where = pc.binary_join_element_wise(pa.scalar(unit), pc.cast(numbers, pa.string()), " ")
    strings = {col: _string_column(path, table[col], col, where) for col in ("persona", "question", text_col)}
    sample = (
        _sample_index(path, table["sample_index"], where, untyped=fmt == "csv")
        if "sample_index" in names
        else pa.array([0] * n, pa.int32())
    )
    out = pa.table(
        {
            "persona": strings["persona"],
            "question": strings["question"],
            "sample_index": sample,
            "text": strings[text_col],
            "_where": where,
        }
    )
    for col in ("persona", "question", "text"):
        nulls = pc.is_null(out[col])
        if pc.any(nulls).as_py():
            at = out["_where"].filter(nulls)[0].as_py()
            raise InputFileError(f"{path}: {at}: {col!r} is missing (null)")
    return out


def _csv_record_lines(table: pa.Table, first_row: int) -> list[int] | None:
    """The line each CSV record starts on where quoted values span lines (answers often do), counted from the
    newlines inside each record's values; None when every record is one line (its row number + ``first_row``)."""
    inside = None
    for column in table.columns:
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            count = pc.fill_null(pc.count_substring(column, "\n"), 0)
            inside = count if inside is None else pc.add(inside, count)
    if inside is None or not pc.sum(inside).as_py():
        return None
    per_record = pc.cast(inside, pa.int64())
    if isinstance(per_record, pa.ChunkedArray):
        per_record = per_record.combine_chunks()
    before = pc.subtract(pc.cumulative_sum(per_record), per_record)  # newlines in the records above
    return pc.add(pa.array(range(first_row, first_row + len(per_record)), pa.int64()), before).to_pylist()


def _read_jsonl(path: Path, data: bytes, block: int) -> tuple[pa.Table, list[int] | None]:
    """The table, and the line number (from 1) of each row where that is not its row number + 1 (blank lines).
    Any line Arrow cannot read is found again line by line, so that the error names the line (Arrow counts rows
    from 0, skipping blank lines) and the column. ``data``: the file's bytes."""
    try:
        table = pajson.read_json(pa.BufferReader(data), read_options=pajson.ReadOptions(block_size=block))
    except pa.ArrowInvalid as exc:
        raise _jsonl_problem(path, data, exc) from exc
    n = table.num_rows
    first = data[: data.find(b"\n")] if b"\n" in data else data
    one_per_line = data.count(b"\n") + (not data.endswith(b"\n")) == n
    if one_per_line and first.removeprefix(codecs.BOM_UTF8).strip() and not re.search(rb"\n[ \t\r]*\n", data):
        return table, None
    lines = [i for i, line in enumerate(data.split(b"\n"), start=1) if line.removeprefix(codecs.BOM_UTF8).strip()]
    if len(lines) != n:  # a line holding two objects
        raise _jsonl_problem(path, data, None)
    return table, lines


def _jsonl_problem(path: Path, data: bytes, exc: pa.ArrowInvalid | None) -> InputFileError:
    """The first line that is not one JSON object with string persona/question/text and a whole sample_index."""
    text_lines = data.decode("utf-8-sig").split("\n")
    for number, line in enumerate(text_lines, start=1):
        if not line.strip():
            continue
        where = f"line {number}"
        try:
            row = json.loads(line, object_pairs_hook=_no_duplicate_keys(path, where))
        except json.JSONDecodeError as err:
            return InputFileError(f"{path}: {where}: not valid JSON at column {err.colno}: {err.msg}")
        if not isinstance(row, dict):
            return InputFileError(
                f"{path}: {where}: expected one JSON object {{persona, question, text}}, got {_show(row)}"
            )
        for col in _STRING_COLUMNS:
            if row.get(col) is not None and not isinstance(row[col], str):
                return _not_a_string(path, where, col, row[col])
        value = row.get("sample_index")
        if value is not None and not _whole_number(value):
            return _not_a_sample_index(path, where, value)
    message = str(exc).splitlines()[0] if exc is not None else "a line holds more than one JSON object"
    # Arrow's row N is the (N+1)th non-blank line.
    if (m := re.search(r" in row (\d+)$", message)) is not None:
        rows = [i for i, line in enumerate(text_lines, start=1) if line.strip()]
        if int(m[1]) < len(rows):
            return InputFileError(f"{path}: line {rows[int(m[1])]}: cannot be read as jsonl: {message[: m.start()]}")
    return InputFileError(f"{path}: cannot be read as jsonl: {message}")


def _whole_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _show(value: object) -> str:
    shown = json.dumps(value, ensure_ascii=False, default=str) if not isinstance(value, bytes) else repr(value)
    return shown if len(shown) <= 60 else shown[:57] + "..."


def _not_a_string(path: Path, where: str, col: str, value: object) -> InputFileError:
    return InputFileError(f"{path}: {where}: {col!r} must be a string, got {_show(value)}")


def _not_a_sample_index(path: Path, where: str, value: object) -> InputFileError:
    return InputFileError(f"{path}: {where}: sample_index must be a whole number >= 0, got {_show(value)}")


def _is_textual(typ: pa.DataType) -> bool:
    t = pa.types
    return any(
        check(typ)
        for check in (
            t.is_string,
            t.is_large_string,
            t.is_string_view,
            t.is_binary,
            t.is_large_binary,
            t.is_binary_view,
        )
    )


def _first(mask: pa.ChunkedArray) -> int:
    return int(pc.index(mask, True).as_py())


def _string_column(path: Path, column: pa.ChunkedArray, col: str, where: pa.Array) -> pa.ChunkedArray:
    """``column`` as UTF-8 strings; a value of another type (a number, a list, an object) or bytes that are not
    UTF-8 (Parquet binary or string columns are not checked by Arrow) is an error naming its line or row."""
    if pa.types.is_dictionary(column.type):
        column = column.cast(column.type.value_type)
    if pa.types.is_null(column.type):
        return column.cast(pa.string())  # all missing: the caller names the first row
    if not _is_textual(column.type):
        i = _first(pc.is_valid(column))
        raise _not_a_string(path, where[i].as_py(), col, column[i].as_py())
    try:
        # A cast from binary checks that the bytes are UTF-8; a string column read from Parquet is checked by
        # nobody (DuckDB then refuses it with an error naming neither file nor row).
        if not pa.types.is_binary(column.type) and not pa.types.is_large_binary(column.type):
            for chunk in column.chunks:
                chunk.validate(full=True)
        return column.cast(pa.string())
    except pa.ArrowInvalid:
        pass
    offset = 0
    for chunk in column.cast(pa.large_binary()).chunks:
        for i, value in enumerate(chunk.to_pylist()):
            try:
                if value is not None:
                    value.decode("utf-8")
            except UnicodeDecodeError as exc:
                bad = value[exc.start : exc.start + 1]
                raise InputFileError(
                    f"{path}: {where[offset + i].as_py()}: {col!r} is not UTF-8 text "
                    f"(byte {exc.start} is {bad!r}): write it as UTF-8"
                ) from None
        offset += len(chunk)
    raise InputFileError(f"{path}: column {col!r} is not UTF-8 text")


def _sample_index(path: Path, column: pa.ChunkedArray, where: pa.Array, untyped: bool) -> pa.ChunkedArray:
    """``sample_index`` as int32; a value that is not a whole number (1.5, "x", true, 1e12) or is missing is an
    error naming its row. Strings are read as numbers only from CSV (``untyped``), where every value is text."""
    if column.null_count:
        at = where[_first(pc.is_null(column))].as_py()
        raise InputFileError(
            f"{path}: {at}: 'sample_index' is missing (null): give it on every row, or leave the column out"
        )
    typ = column.type
    if not (pa.types.is_integer(typ) or pa.types.is_floating(typ) or (untyped and _is_textual(typ))):
        raise _not_a_sample_index(path, where[0].as_py(), column[0].as_py())
    try:
        return column.cast(pa.int32())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    for i, value in enumerate(column.to_pylist()):
        try:
            pa.array([value]).cast(pa.int32())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise _not_a_sample_index(path, where[i].as_py(), value) from None
    raise InputFileError(f"{path}: sample_index must hold whole numbers (type {typ})")


def _read_seed_json(path: Path) -> pa.Table:
    doc = _load_structured(path)
    if not isinstance(doc, dict):
        raise InputFileError(
            f'{path}: the seed cache format is a JSON object mapping \'["persona", "question"]\' to the response text'
        )
    if not doc:
        raise InputFileError(f"{path}: no responses in the file")
    personas, questions, texts = [], [], []
    for key, value in doc.items():
        try:
            pair = json.loads(key)
        except json.JSONDecodeError:
            pair = None
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise InputFileError(
                f"{path}: key {key!r} is not a JSON-encoded [persona, question] pair of strings (the seed's format)"
            )
        if not isinstance(value, str):
            raise InputFileError(f"{path}: key {key!r}: the value must be the response text (a string)")
        personas.append(pair[0])
        questions.append(pair[1])
        texts.append(value)
    n = len(texts)
    return pa.table(
        {
            "persona": personas,
            "question": questions,
            "sample_index": pa.array([0] * n, type=pa.int32()),
            "text": texts,
            "_where": [f"key {json.dumps([p, q])}" for p, q in zip(personas, questions, strict=True)],
        }
    )


TRANSCRIPT_ROLES = ("system", "user", "assistant")


def read_transcript_file(path: Path) -> dict[str, list[dict[str, str]]]:
    """Conversations to project, from JSON: one list of ``{role, content}`` messages, a list of such lists, or
    ``{name: messages}``. Roles must be system/user/assistant; every transcript needs a non-empty assistant turn."""
    doc = _load_structured(Path(path))
    if isinstance(doc, list) and doc and all(isinstance(m, dict) for m in doc):
        doc = {Path(path).stem: doc}
    elif isinstance(doc, list):
        doc = {f"transcript {i + 1}": t for i, t in enumerate(doc)}
    if not isinstance(doc, dict) or not doc:
        raise InputFileError(f"{path}: expected a list of messages, a list of transcripts or {{name: messages}}")
    for name, msgs in doc.items():
        if not isinstance(msgs, list) or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs
        ):
            raise InputFileError(f"{path}: transcript {name!r} must be a list of {{role, content}} messages")
        for i, m in enumerate(msgs):
            if m["role"] not in TRANSCRIPT_ROLES:
                raise InputFileError(
                    f"{path}: transcript {name!r} message {i}: unknown role {m['role']!r} "
                    f"(expected {', '.join(TRANSCRIPT_ROLES)})"
                )
            if m["role"] == "assistant" and not m["content"].strip():
                raise InputFileError(f"{path}: transcript {name!r} message {i}: empty assistant message")
        if not any(m["role"] == "assistant" for m in msgs):
            raise InputFileError(f"{path}: transcript {name!r} has no assistant message to project")
    return doc


# ---------------------------------------------------------------------------------------------------- ingesting

INGEST_KINDS = ("personas", "questions", "responses")


@dataclass(frozen=True)
class IngestConfig:
    """What to ingest: a persona set, a question set, or responses, from one file.

    Attributes:
        kind: ``"personas"``, ``"questions"`` or ``"responses"``.
        path: the input file.
        name: set name (personas/questions; default: the file's ``name`` field, else its stem).
        persona_set / question_set: the sets response files refer to (by persona name and question text).
        format: response format (``seed-json``, ``jsonl``, ``csv``, ``parquet``); default: by extension.
        model: the model that wrote the responses (provenance).

    Example: ``ingest(ws, IngestConfig("responses", Path("cache.json")))``.
    """

    kind: str
    path: Path
    name: str | None = None
    persona_set: str = BUILTIN
    question_set: str = BUILTIN
    format: str | None = None
    model: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INGEST_KINDS:
            raise ConfigError(f"ingest kind must be one of {', '.join(INGEST_KINDS)}, got {self.kind!r}")
        object.__setattr__(self, "path", Path(self.path))
        if self.format is not None and self.format not in RESPONSE_FORMATS:
            raise ConfigError(f"response format must be one of {', '.join(RESPONSE_FORMATS)}, got {self.format!r}")


def ingest(
    ws: Workspace,
    config: IngestConfig,
    *,
    resume: int | None = None,
    progress: Callable[[IngestResult], None] | None = None,
) -> IngestResult:
    """Ingest one file into a new run: a persona set, a question set, or responses resolved against two sets.

    Responses: unknown personas/questions and duplicate (persona, question, sample) rows are errors naming the
    file and row; nothing is written then. Ingest runs are one transaction, so there is nothing to resume
    (``resume`` must be None). ``progress`` is called once with the result."""
    if resume is not None:
        raise ConfigError("ingest runs are a single transaction and cannot be resumed: ingest the file again")
    path = config.path
    catalog = ws.catalog()
    if config.kind == "personas":
        file_name, personas = read_persona_file(path)
        name = config.name or file_name or path.stem
        run_id = create_persona_set(catalog, name, personas, _provenance(config, name), str(path.resolve()))
        result = IngestResult(run_id, "ingest-personas", name, len(personas))
    elif config.kind == "questions":
        file_name, questions = read_question_file(path)
        name = config.name or file_name or path.stem
        run_id = create_question_set(catalog, name, questions, _provenance(config, name), str(path.resolve()))
        result = IngestResult(run_id, "ingest-questions", name, len(questions))
    else:
        result = _ingest_responses(catalog, config)
    if progress is not None:
        progress(result)
    return result


def _provenance(config: IngestConfig, name: str | None, **extra: object) -> dict:
    return {"path": str(config.path.resolve()), "name": name, **extra}


def _ingest_responses(catalog: Catalog, config: IngestConfig) -> IngestResult:
    path = config.path
    fmt = config.format or detect_response_format(path)
    table = read_response_file(path, fmt)
    sha = file_sha256(path)
    run_id, resolved = ingest_response_table(
        catalog,
        table,
        persona_set=config.persona_set,
        question_set=config.question_set,
        config=_provenance(config, None, format=fmt, sha256=sha, model=config.model),
        model=config.model,
        source=str(path.resolve()),
        source_sha256=sha,
    )
    if run_id is None:
        _refuse(path, resolved, config.persona_set, config.question_set)
    assert run_id is not None  # _refuse raised otherwise
    return IngestResult(run_id, "ingest-responses", None, table.num_rows)


def _refuse(path: Path, resolved: ResolvedResponses, pset: str, qset: str) -> None:
    """Raise the error naming the first duplicate or unknown row."""
    if resolved.duplicate:
        persona, question, sample, where = resolved.duplicate
        raise InputFileError(
            f"{path}: duplicate response for persona {persona!r}, question {question!r}, sample {sample} "
            f"at {', '.join(where[:3])}: each (persona, question, sample_index) may appear once"
        )
    if resolved.unknown_persona:
        at, persona = resolved.unknown_persona
        raise InputFileError(
            f"{path}: {at}: unknown persona {persona!r} (not in persona set {pset!r}); "
            f"ingest a persona set that has it and pass --persona-set"
        )
    if resolved.unknown_question:
        at, question = resolved.unknown_question
        raise InputFileError(
            f"{path}: {at}: unknown question {question!r} (not in question set {qset!r}); "
            f"ingest a question set that has it and pass --question-set"
        )
    if resolved.negative_sample:
        raise InputFileError(f"{path}: {resolved.negative_sample}: sample_index must be >= 0")
    raise InputFileError(f"{path}: the responses could not be resolved")


def builtin_files() -> tuple[Path, Path]:
    data = resource_path("data")
    return data / "personas.yaml", data / "questions.yaml"


def register_builtin_sets(ws: Workspace) -> None:
    """Add the built-in persona and question sets (named ``builtin``) unless they are there already."""
    personas_file, questions_file = builtin_files()
    persona_sets, question_sets = set_names(ws.catalog())
    if BUILTIN not in persona_sets:
        ingest(ws, IngestConfig("personas", personas_file, BUILTIN))
    if BUILTIN not in question_sets:
        ingest(ws, IngestConfig("questions", questions_file, BUILTIN))
