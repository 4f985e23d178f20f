"""Rows from a data source, each tagged with where it came from.

A source is a local file (`.jsonl`, `.jsonl.gz`, `.json`, `.csv`, `.parquet`), a directory written by
`datasets`' `save_to_disk` (a Dataset, or a DatasetDict and a split), or a Hugging Face Hub dataset id
(`owner/name` or `owner/name:config`); the last two are read through `datasets`, one batch at a time. Every problem with the source is a one-line
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

Memory. JSONL (gzipped or not) and CSV are read a line at a time, and `iter_rows` hands out one row
at a time, so reading takes memory in proportion to the longest row, not to the file. A line (a
JSON row of a `.json` file) longer than `max_line_bytes` is refused with one line before it is
decoded or parsed: a single runaway line (a whole dump on one line, a missing newline) would
otherwise take several times its size at once. A `.json` document and a Parquet file have no lines
to stream by and are read whole.
"""

from __future__ import annotations

import codecs
import csv
import gzip
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from lightrlhf.errors import DataError, UserError

SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".csv", ".parquet")
MAX_LINE_BYTES = 16 * 1024 * 1024  # data.max_line_bytes' default: far above any real example
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?")
_FILE_SUFFIX = re.compile(r"\.[A-Za-z]+$")  # "owner/name.txt" is a missing file, not a hub dataset
_JSON_SPACE = re.compile(r"[ \t\n\r]*")
_JSON_CELL = re.compile(r"\s*\[\s*\{")
_LONE_CR = re.compile(r"(?<=\r)(?!\n)")  # where a line ends at a bare "\r" (csv's newline="" rule)


@dataclass(frozen=True)
class Row:
    values: dict[str, Any]
    where: str  # "path:17", "path:row 12" or "hub:owner/name[train]:row 17"


def read_rows(source: str, split: str | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> list[Row]:
    """All rows of `source` (see `iter_rows`)."""
    return list(iter_rows(source, split, max_line_bytes))


def iter_rows(source: str, split: str | None = None, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Row]:
    """The rows of `source`, one at a time; `split` applies to hub datasets only (default "train")."""
    path = Path(source)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except (OSError, ValueError) as error:
        raise DataError(source, None, f"cannot read the file ({_first_line(error)})") from None
    if not exists and _HUB_ID.fullmatch(source) and not _FILE_SUFFIX.search(source):
        yield from _hub_rows(source, split or "train")
        return
    if is_dir and _is_saved_dataset(path):
        yield from _disk_rows(path, source, split)
        return
    if is_dir:
        raise DataError(source, None, "is a directory, not a data file (nor a datasets save_to_disk directory)")
    if not exists:
        raise DataError(source, None, "no such file")
    suffix = next((s for s in SUFFIXES if path.name.lower().endswith(s)), None)
    if suffix is None:
        found = f'"{path.suffix}"' if path.suffix else "(no extension)"
        supported = ", ".join(SUFFIXES)
        raise DataError(source, None, f"unsupported file type {found}; supported: {supported}")
    lines = None
    if suffix == ".parquet":
        rows = _parquet_rows(_read_bytes(path, source), source)
    elif suffix == ".json":
        rows = _json_rows(_text(_read_bytes(path, source), source), source, max_line_bytes)
    else:
        lines = _Lines(path, source, max_line_bytes, gzipped=suffix == ".jsonl.gz", newline=suffix == ".csv")
        rows = _csv_rows(lines, source) if suffix == ".csv" else _jsonl_rows(lines, source)
    count = 0
    for count, row in enumerate(rows, 1):
        yield row
    if not count:
        blank = lines is not None and lines.blank
        raise DataError(source, None, "the file is empty" if blank else "the file holds no rows")


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


def _open(path: Path, source: str) -> IO[bytes]:
    try:
        return path.open("rb")
    except PermissionError:
        raise DataError(source, None, "permission denied") from None
    except OSError as error:
        raise DataError(source, None, f"cannot read the file ({error.strerror or error})") from None


def _read_bytes(path: Path, source: str) -> bytes:
    with _open(path, source) as file:
        try:
            data = file.read()
        except OSError as error:
            raise DataError(source, None, f"cannot read the file ({error.strerror or error})") from None
    if not data:
        raise DataError(source, None, "the file is empty")
    return data


class _Lines:
    """The decoded lines of a text file (gzipped or not) as (number from 1, text), each checked
    against `max_line_bytes` while it is read, so a longer one is never held whole. `newline`: keep
    each line's "\\n" (csv wants it). `blank` stays True while nothing but whitespace was read."""

    def __init__(self, path: Path, source: str, max_line_bytes: int, gzipped: bool, newline: bool = False):
        self.path, self.source, self.limit, self.gzipped, self.newline = path, source, max_line_bytes, gzipped, newline
        self.blank = True

    def __iter__(self) -> Iterator[tuple[int, str]]:
        if self.path.stat().st_size == 0:
            raise DataError(self.source, None, "the file is empty")
        with _open(self.path, self.source) as raw:
            file = gzip.GzipFile(fileobj=raw) if self.gzipped else raw
            number = 0
            while line := self._read(file, self.limit + 1):
                number += 1
                if len(line) > self.limit and not line.endswith(b"\n"):
                    raise DataError(self.source, number, f"row of {self._rest(file, len(line))} bytes exceeds "
                                                         f"data.max_line_bytes={self.limit}")
                text = self._decode(line, number)
                del line  # detail: the bytes go before the row is parsed, so a long line is held twice at most
                self.blank = self.blank and (not text or text.isspace())
                yield number, text

    def _read(self, file: IO[bytes], size: int) -> bytes:
        try:
            return file.readline(size)
        except (OSError, EOFError, zlib.error) as error:
            if self.gzipped:
                raise DataError(self.source, None, f"not a valid gzip file ({_first_line(error)})") from None
            raise DataError(self.source, None, f"cannot read the file ({error.strerror or error})") from None

    def _rest(self, file: IO[bytes], size: int) -> int:
        """The length in bytes (newline excluded) of a line whose first `size` bytes were read."""
        while (piece := self._read(file, 1 << 20)) and not piece.endswith(b"\n"):
            size += len(piece)
        return size + max(len(piece) - 1, 0)

    def _decode(self, line: bytes, number: int) -> str:
        start = len(codecs.BOM_UTF8) if number == 1 and line.startswith(codecs.BOM_UTF8) else 0
        end = len(line) - (not self.newline and line.endswith(b"\n"))
        try:
            return str(memoryview(line)[start:end], "utf-8")  # detail: a view, not a copy of the line
        except UnicodeDecodeError as error:
            raise DataError(self.source, None, _not_utf8(line[start:end], error.start, number)) from None


def _text(data: bytes, source: str) -> str:
    data = data.removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        line_start = data.rfind(b"\n", 0, error.start) + 1
        line_end = len(data) if (end := data.find(b"\n", error.start)) < 0 else end
        line = data.count(b"\n", 0, error.start) + 1
        raise DataError(source, None, _not_utf8(data[line_start:line_end], error.start - line_start, line)) from None
    if not text or text.isspace():
        raise DataError(source, None, "the file is empty")
    return text


_CJK = re.compile("[\u3000-\u303f\u3400-\u9fff\uff00-\uffef]")


def _not_utf8(line: bytes, position: int, number: int) -> str:
    """The problem with a line that is not UTF-8 at `position`; a line that reads as Chinese in GB18030
    (a superset of GBK and GB2312, what Chinese Windows tools save) says so, and how to convert it."""
    problem = f"not valid UTF-8 (byte 0x{line[position]:02x} at line {number})"
    try:
        chinese = _CJK.search(line.decode("gb18030")) is not None
    except UnicodeDecodeError:
        chinese = False
    return problem + ("; it reads as Chinese in GB18030/GBK: convert the file to UTF-8 "
                      "(iconv -f GB18030 -t UTF-8)" if chinese else "")


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


def _jsonl_rows(lines: _Lines, source: str) -> Iterator[Row]:
    # lines end at "\n" only, not at every splitlines() break: JSON strings may hold U+2028 and others
    for number, text in lines:
        if text and not text.isspace():
            yield _json_object(_parse_json(text, source, number), source, number)


def _json_rows(text: str, source: str, max_line_bytes: int) -> list[Row]:
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
    rows = []
    for item, (line, start, end) in zip(items, _item_spans(text, key)):
        # detail: a character is at most 4 bytes in UTF-8, so only a long item is encoded to be measured
        if 4 * (end - start) > max_line_bytes and (size := len(text[start:end].encode())) > max_line_bytes:
            raise DataError(source, line, f"row of {size} bytes exceeds data.max_line_bytes={max_line_bytes}")
        rows.append(_json_object(item, source, line))
    return rows


def _item_spans(text: str, key: str | None) -> list[tuple[int, int, int]]:
    """(line it starts on, start, end) of each item of the top-level list (or of the list under `key`).

    `text` is already known to be valid JSON, so this walk needs no error handling of its own."""
    decoder, spans, line, counted = json.JSONDecoder(), [], 1, 0

    def skip(pos: int) -> int:
        return _JSON_SPACE.match(text, pos).end()

    def end_of(pos: int) -> int:
        return decoder.raw_decode(text, pos)[1]

    def after(end: int) -> int:
        pos = skip(end)
        return skip(pos + 1) if text[pos] == "," else pos

    pos = skip(0)
    if key is not None:  # find the value of the last `key` (json.loads keeps the last duplicate)
        start, pos = None, skip(pos + 1)
        while text[pos] != "}":
            name, pos = decoder.raw_decode(text, pos)
            pos = skip(skip(pos) + 1)
            start = pos if name == key else start
            pos = after(end_of(pos))
        pos = start
    pos = skip(pos + 1)
    while text[pos] != "]":
        line, counted = line + text.count("\n", counted, pos), pos
        end = end_of(pos)
        spans.append((line, pos, end))
        pos = after(end)
    return spans


def _csv_rows(lines: _Lines, source: str) -> Iterator[Row]:
    # a bare "\r" ends a line too, as in a file opened with newline="" (what csv expects)
    physical = (piece for _, text in lines for piece in _LONE_CR.split(text) if piece)
    reader = csv.reader(physical)
    header, start = None, 1
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
            yield Row(values, f"{source}:row {line}")
    except csv.Error as error:
        raise DataError(source, start, f"invalid CSV ({_first_line(error)})", "row ") from None


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


def _hub_rows(source: str, split: str) -> Iterator[Row]:
    name, _, config = source.partition(":")
    where = f"hub:{source}[{split}]"
    try:
        import datasets  # here, not at the top: importing it takes seconds

        dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as error:  # noqa: BLE001 - datasets raises many unrelated types for one cause
        raise UserError(
            f"{where}: could not load the dataset from the Hugging Face Hub "
            f"({type(error).__name__}: {_first_line(error)})"
        ) from None
    yield from _dataset_rows(dataset, where)


_SAVED_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")  # what save_to_disk writes


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in _SAVED_MARKERS)


def _disk_rows(path: Path, source: str, split: str | None) -> Iterator[Row]:
    """A `Dataset` or `DatasetDict` written by `save_to_disk` (a DatasetDict needs `split`, default train)."""
    try:
        import datasets

        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001 - as for the hub: many types, one cause
        raise DataError(source, None, f"could not load the saved dataset ({type(error).__name__}: "
                                      f"{_first_line(error)})") from None
    if isinstance(dataset, datasets.DatasetDict):
        split = split or "train"
        if split not in dataset:
            raise DataError(source, None, f'has no split "{split}" (splits: {", ".join(dataset)})')
        dataset = dataset[split]
        source = f"{source}[{split}]"
    yield from _dataset_rows(dataset, source)


def _dataset_rows(dataset, where: str) -> Iterator[Row]:
    """The rows of a `datasets.Dataset`, read from its memory-mapped Arrow table a batch at a time."""
    if not len(dataset):
        raise UserError(f"{where}: the split holds no rows")
    number = 0
    for batch in dataset.iter(batch_size=1024):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            number += 1
            yield Row(dict(zip(columns, values)), f"{where}:row {number}")
