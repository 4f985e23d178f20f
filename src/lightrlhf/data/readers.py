"""Rows from a data source, each tagged with where it came from.

A source is a local file (`.jsonl`, `.jsonl.gz`, `.json`, `.csv`, `.parquet`) or a Hugging Face Hub
dataset id (`owner/name` or `owner/name:config`). Every problem with the source is a one-line
`UserError` naming the file and the line; `Row.where` is the prefix of any later error about a row.

- JSONL: one object a line; blank lines are skipped.
- JSON: a list of objects, or an object holding one under "data" or "rows"; each row is located by
  the line its object starts on.
- CSV: a header row, then one record a row; values are strings, located by the physical line the
  record starts on (`path:row 5`). A cell whose text starts with `[{` is parsed as JSON, so a column
  can hold a message list; such a cell that is not valid JSON is an error rather than a string,
  because a prompt that starts with `[{` is rare and a broken message list is a common export
  mistake. Other cells, "[INST] ..." included, stay strings.
- Parquet: read with pyarrow; rows are numbered from 1 (`path:row 12`).
"""

from __future__ import annotations

import codecs
import csv
import gzip
import io
import json
import re
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightrlhf.errors import DataError, UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]+$")  # "owner/name.txt" is a missing file, not a hub dataset
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_CELL = re.compile(r"\s*\[\s*\{")


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    where: str  # "path:17", "path:row 12" or "hub:owner/name[train]:row 17"


def read_rows(source: str, split: str | None = None) -> list[Row]:
    """All rows of `source`; `split` applies to hub datasets only (default "train")."""
    path = Path(source)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as error:
        raise DataError(source, None, f"cannot read the file ({_first_line(error)})") from None
    if not exists and _HUB_ID.fullmatch(source) and not _FILE_SUFFIX.search(source):
        return _hub_rows(source, split or "train")
    if is_dir:
        raise DataError(source, None, "is a directory, not a data file")
    if not exists:
        raise DataError(source, None, "no such file")
    suffix = next((s for s in SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        found = f'"{path.suffix}"' if path.suffix else "(no extension)"
        supported = ", ".join(SUFFIXES)
        raise DataError(source, None, f"unsupported file type {found}; supported: {supported}")
    data = _read_bytes(path, source)
    if suffix == ".parquet":
        rows = _parquet_rows(data, source)
    else:
        text = _text(_gunzip(data, source) if suffix == ".jsonl.gz" else data, source)
        read = {".json": _json_rows, ".csv": _csv_rows}.get(suffix, _jsonl_rows)
        rows = read(text, source)
    if not rows:
        raise DataError(source, None, "the file holds no rows")
    return rows


def json_type(value: Any) -> str:
    """The JSON name of a value's type, for messages ("got list")."""
    names = {dict: "object", list: "list", tuple: "list", str: "string", bool: "boolean"}
    if value is None:
        return "null"
    if type(value) in names:
        return names[type(value)]
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0]


def _read_bytes(path: Path, source: str) -> bytes:
    try:
        data = path.read_bytes()
    except PermissionError:
        raise DataError(source, None, "permission denied") from None
    except OSError as error:
        raise DataError(source, None, f"cannot read the file ({error.strerror or error})") from None
    if not data:
        raise DataError(source, None, "the file is empty")
    return data


def _gunzip(data: bytes, source: str) -> bytes:
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as error:
        raise DataError(source, None, f"not a valid gzip file ({_first_line(error)})") from None


def _text(data: bytes, source: str) -> str:
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(
            source, None, f"not valid UTF-8 (byte 0x{data[error.start]:02x} at line {line})"
        ) from None
    if not text.strip():
        raise DataError(source, None, "the file is empty")
    return text


def _parse_json(
    text: str, source: str, line: int, unit: str = "", what: str = "invalid JSON"
) -> Any:
    """`text` parsed; a syntax error is reported at its own line, counting from `line`."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        line, problem = line + error.lineno - 1, f"{error.msg}, column {error.colno}"
    except RecursionError:
        problem = "nested too deeply"
    except ValueError as error:  # e.g. an integer with more digits than Python converts
        problem = _first_line(error).split(":")[0]
    raise DataError(source, line, f"{what} ({problem})", unit)


def _json_object(value: Any, source: str, line: int, unit: str = "") -> Row:
    if not isinstance(value, dict):
        raise DataError(source, line, f"expected a JSON object, got {json_type(value)}", unit)
    return Row(value, f"{source}:{unit}{line}")


def _jsonl_rows(text: str, source: str) -> list[Row]:
    # split("\n"), not splitlines(): JSON strings may hold U+2028 and other line breaks
    lines = enumerate(text.split("\n"), 1)
    return [_json_object(_parse_json(t, source, n), source, n) for n, t in lines if t.strip()]


def _json_rows(text: str, source: str) -> list[Row]:
    data = _parse_json(text, source, 1)
    key = None
    if isinstance(data, dict):
        key = next((k for k in ("data", "rows") if isinstance(data.get(k), list)), None)
    if not isinstance(data, list) and key is None:
        raise DataError(
            source,
            None,
            'expected a JSON list of objects (or an object with a list under "data"/"rows"), '
            f"got {json_type(data)}",
        )
    items = data if key is None else data[key]
    return [_json_object(item, source, line) for item, line in zip(items, _item_lines(text, key))]


def _item_lines(text: str, key: str | None) -> list[int]:
    """The line each item of the top-level list (or of the list under `key`) starts on.

    `text` is already known to be valid JSON, so this walk needs no error handling of its own."""
    decoder, lines, line, counted = json.JSONDecoder(), [], 1, 0

    def skip(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    def after_item(pos: int) -> int:
        pos = skip(decoder.raw_decode(text, pos)[1])
        return skip(pos + 1) if text[pos] == "," else pos

    pos = skip(0)
    if key is not None:  # find the value of the last `key` (json.loads keeps the last duplicate)
        start, pos = None, skip(pos + 1)
        while text[pos] != "}":
            name, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)
            start = pos if name == key else start
            pos = after_item(pos)
        pos = start
    pos = skip(pos + 1)
    while text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        lines.append(line)
        pos = after_item(pos)
    return lines


def _csv_rows(text: str, source: str) -> list[Row]:
    reader = csv.reader(io.StringIO(text, newline=""))
    header, rows, start = None, [], 1
    try:
        for record in reader:
            line, start = start, reader.line_num + 1
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = _csv_header(record, source, line)
                continue
            if len(record) != len(header):
                problem = f"the record has {len(record)} cells, the header has {len(header)}"
                raise DataError(source, line, problem, "row ")
            cells = zip(header, record)
            values = {name: _csv_cell(cell, name, source, line) for name, cell in cells}
            rows.append(Row(values, f"{source}:row {line}"))
    except csv.Error as error:
        raise DataError(source, start, f"invalid CSV ({_first_line(error)})", "row ") from None
    return rows


def _csv_header(record: list[str], source: str, line: int) -> list[str]:
    names, seen = [name.strip() for name in record], set()
    for name in names:
        if name in seen:
            problem = f"column {json.dumps(name)} appears twice in the header"
            raise DataError(source, line, problem, "row ")
        seen.add(name)
    return names


def _csv_cell(cell: str, column: str, source: str, line: int) -> Any:
    if not _JSON_CELL.match(cell):
        return cell
    what = f"column {json.dumps(column)} starts like a JSON list but is not valid JSON"
    return _parse_json(cell, source, line, "row ", what)


def _parquet_rows(data: bytes, source: str) -> list[Row]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        records = pq.read_table(pa.BufferReader(data)).to_pylist()
    except (pa.ArrowException, OSError, ValueError, TypeError) as error:
        problem = f"not a readable Parquet file ({_first_line(error)})"
        raise DataError(source, None, problem) from None
    return [Row(record, f"{source}:row {n}") for n, record in enumerate(records, 1)]


def _hub_rows(source: str, split: str) -> list[Row]:
    name, _, config = source.partition(":")
    where = f"hub:{source}[{split}]"
    try:
        import datasets  # here, not at the top: importing it takes seconds

        records = list(datasets.load_dataset(name, config or None, split=split))
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types for one cause
        raise UserError(
            f"{where}: could not load the dataset from the Hugging Face Hub "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
    if not records:
        raise UserError(f"{where}: the split holds no rows")
    return [Row(dict(record), f"{where}:row {n}") for n, record in enumerate(records, 1)]
