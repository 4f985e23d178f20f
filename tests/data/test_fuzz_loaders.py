"""Whatever a data file holds, loading it either works or fails with one line naming the file.

Any other exception (a traceback) fails these tests.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lightrlhf.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
)
from lightrlhf.data.messages import ROLES
from lightrlhf.data.readers import read_rows
from lightrlhf.errors import UserError

LOADERS = (read_rows, load_sft, load_preferences, load_prompts)
KEYS = (
    "prompt", "completion", "chosen", "rejected", "messages", "conversations", "role", "content",
    "from", "value", "instruction", "input", "output", "margin", "score_chosen", "score_rejected",
    "data", "rows",
)
# Leaves that make a loader go deeper than random text would: roles, HH dialogues, numbers.
TEXTS = st.one_of(
    st.text(max_size=12),
    st.sampled_from([*ROLES, "human", "gpt", "", " ", "中文", "1.5", "nan"]),
    st.just("\n\nHuman: hi\n\nAssistant: yo"),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | TEXTS,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=4), inner, max_size=5),
    max_leaves=16,
)
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from([*ROLES, "bot"]), "content": TEXTS})
ROW = st.one_of(
    JSON,
    st.dictionaries(st.sampled_from(KEYS), TEXTS | st.lists(MESSAGE, max_size=4) | JSON, max_size=5),
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    # hypothesis runs many examples per test call, so a function-scoped tmp_path would be shared
    # between them; each example gets its own file in this module-wide folder instead.
    return tmp_path_factory.mktemp("fuzz")


def new_file(folder: Path, suffix: str, content: bytes) -> str:
    handle, name = tempfile.mkstemp(suffix=suffix, dir=folder)
    with open(handle, "wb") as file:
        file.write(content)
    return name


def check_every_loader(source: str) -> None:
    for load in LOADERS:
        try:
            result = load(source)
        except UserError as error:
            message = str(error)
            assert "\n" not in message and message.startswith(source), message
            message.encode("utf-8")  # printable
        else:
            check_result(load, source, result)


def check_result(load, source: str, result) -> None:
    if load is read_rows:
        assert result and all(isinstance(row.values, dict) for row in result)
        return
    examples, report = result
    assert examples and report.kept == len(examples) <= report.rows
    for example in examples:
        assert example.where.startswith(source)
        check_prompt(example.prompt)
        if isinstance(example, SFTExample):
            assert isinstance(example.completion, str)
        elif isinstance(example, PreferenceExample):
            assert isinstance(example.chosen, str) and isinstance(example.rejected, str)
            margin = example.margin
            assert margin is None or (type(margin) is float and math.isfinite(margin))
        else:
            assert isinstance(example, PromptExample)


def check_prompt(prompt) -> None:
    if isinstance(prompt, str):
        return
    assert isinstance(prompt, list) and prompt and prompt[-1]["role"] == "user"
    for message in prompt:
        assert set(message) == {"role", "content"} and message["role"] in ROLES
        assert isinstance(message["content"], str)


@FUZZ
@given(
    suffix=st.sampled_from([".jsonl", ".json", ".csv"]),
    content=st.binary(max_size=200) | st.text(max_size=200).map(str.encode),
)
def test_random_bytes(folder, suffix, content):
    check_every_loader(new_file(folder, suffix, content))


@FUZZ
@given(rows=st.lists(ROW, max_size=5))
def test_random_json_rows(folder, rows):
    content = "".join(json.dumps(row) + "\n" for row in rows).encode()
    check_every_loader(new_file(folder, ".jsonl", content))


@FUZZ
@given(
    data=st.one_of(
        st.lists(ROW, max_size=4),
        st.dictionaries(st.sampled_from(["data", "rows", "x"]), st.lists(ROW, max_size=4), max_size=2),
        JSON,
    )
)
def test_random_json_documents(folder, data):
    check_every_loader(new_file(folder, ".json", json.dumps(data, indent=1).encode()))


@FUZZ
@given(
    suffix=st.sampled_from([".jsonl.gz", ".parquet"]),
    content=st.binary(max_size=200) | st.sampled_from([b"PAR1", b"PAR1\x00\x00PAR1", b"\x1f\x8b\x08\x00"]).flatmap(
        lambda head: st.binary(max_size=100).map(lambda tail: head + tail)),
)
def test_random_bytes_in_compressed_and_columnar_files(folder, suffix, content):
    # plausible headers (parquet's magic, gzip's) push the readers past their first check
    check_every_loader(new_file(folder, suffix, content))


@FUZZ
@given(rows=st.lists(ROW, max_size=5))
def test_random_json_rows_gzipped(folder, rows):
    import gzip

    content = gzip.compress("".join(json.dumps(row) + "\n" for row in rows).encode())
    check_every_loader(new_file(folder, ".jsonl.gz", content))


@FUZZ
@given(rows=st.lists(st.dictionaries(st.sampled_from(KEYS), TEXTS | st.integers() | st.floats() | st.none(),
                                     min_size=1, max_size=4), min_size=1, max_size=4))
def test_random_tables_as_parquet(folder, rows):
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pa.Table.from_pylist(rows)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types or huge ints: write them as text
        table = pa.Table.from_pylist([{k: str(v) for k, v in row.items()} for row in rows])
    path = new_file(folder, ".parquet", b"")
    pq.write_table(table, path)
    check_every_loader(path)
