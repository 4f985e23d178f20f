"""Reading rows from files and the hub: locations, and one line for every broken file."""

from __future__ import annotations

import gzip
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lightrlhf.data.readers import Row, read_rows
from lightrlhf.errors import DataError, UserError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "data"


def write(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return str(path)


def error_of(source: str) -> str:
    with pytest.raises(UserError) as caught:
        read_rows(source)
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_jsonl_rows_are_located_by_line_and_blank_lines_are_skipped():
    source = str(FIXTURES / "sft_prompt_completion.jsonl")
    rows = read_rows(source)
    assert [row.where for row in rows] == [f"{source}:1", f"{source}:2", f"{source}:4"]
    assert rows[1].values == {"prompt": "把这句话翻译成英文：我爱你", "completion": "I love you."}


def test_utf8_bom_and_crlf_are_accepted(tmp_path):
    content = '\ufeff{"prompt": "你好"}\r\n\r\n{"prompt": "b"}\r\n'.encode()
    source = write(tmp_path, "bom.jsonl", content)
    expected = [Row({"prompt": "你好"}, f"{source}:1"), Row({"prompt": "b"}, f"{source}:3")]
    assert read_rows(source) == expected


def test_jsonl_gz(tmp_path):
    source = write(tmp_path, "rows.jsonl.gz", gzip.compress('{"prompt": "压缩"}\n'.encode()))
    assert read_rows(source) == [Row({"prompt": "压缩"}, f"{source}:1")]


def test_json_list_items_are_located_by_the_line_they_start_on():
    source = str(FIXTURES / "sft_sharegpt.json")
    rows = read_rows(source)
    assert [row.where for row in rows] == [f"{source}:2", f"{source}:9"]
    assert rows[1].values["conversations"][2] == {"from": "gpt", "value": "蓝色。"}


def test_json_object_with_rows_under_data():
    source = str(FIXTURES / "sft_alpaca.json")
    rows = read_rows(source)
    assert [row.where for row in rows] == [f"{source}:4", f"{source}:5"]
    assert rows[1].values["output"] == "春风拂面，花开满园。"


def test_json_rows_key_and_last_duplicate_key_win(tmp_path):
    source = write(tmp_path, "x.json", '{"rows": [1],\n "rows": [\n\n {"a": 1}, {"a": 2}]}')
    assert read_rows(source) == [Row({"a": 1}, f"{source}:4"), Row({"a": 2}, f"{source}:4")]


def test_csv_rows_are_located_by_the_physical_line_of_the_record():
    source = str(FIXTURES / "pref_explicit.csv")
    rows = read_rows(source)
    assert [row.where for row in rows] == [f"{source}:row 2", f"{source}:row 3", f"{source}:row 4"]
    assert rows[1].values == {
        "prompt": "写一句问候语。", "chosen": "你好，很高兴见到你！", "rejected": "走开。", "margin": ""
    }
    assert rows[2].values["chosen"] == "Line one\nLine two"


def test_csv_cells_holding_a_json_list_of_objects_are_parsed():
    rows = read_rows(str(FIXTURES / "pref_conversational.csv"))
    assert rows[0].values["chosen"] == [
        {"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}
    ]


def test_csv_cells_starting_with_a_bracket_but_no_object_stay_text(tmp_path):
    source = write(tmp_path, "p.csv", "prompt\n[INST] hi [/INST]\n\"[1, 2]\"\n")
    assert [row.values["prompt"] for row in read_rows(source)] == ["[INST] hi [/INST]", "[1, 2]"]


def test_parquet_rows_are_numbered_from_one(tmp_path):
    source = str(tmp_path / "pref.parquet")
    pq.write_table(pa.table({"prompt": ["a", "问"], "chosen": ["b", "答"], "rejected": ["c", "否"]}), source)
    rows = read_rows(source)
    assert rows[1] == Row({"prompt": "问", "chosen": "答", "rejected": "否"}, f"{source}:row 2")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        (
            "pref.jsonl",
            '{"a": 1}\n\n{"prompt": "ab" "chosen": 1}\n',
            "{p}:3: invalid JSON (Expecting ',' delimiter, column 17)",
        ),
        (
            "x.jsonl",
            b'{"a": 1}\n{"a": 2}\n{"a": 3}\n{"a": "\xff"}\n',
            "{p}: not valid UTF-8 (byte 0xff at line 4)",
        ),
        ("x.jsonl", "", "{p}: the file is empty"),
        ("x.jsonl", "\n  \n", "{p}: the file is empty"),
        (
            "x.jsonl",
            '{"a": 1}\n{"a": 2}\n{"a": 3}\n{"a": 4}\n[1, 2]\n',
            "{p}:5: expected a JSON object, got list",
        ),
        ("x.jsonl", '"text"\n', "{p}:1: expected a JSON object, got string"),
        ("x.jsonl", "[" * 100_000 + "\n", "{p}:1: invalid JSON (nested too deeply)"),
        (
            "x.jsonl",
            '{"a": ' + "1" * 5000 + "}\n",
            "{p}:1: invalid JSON (Exceeds the limit (4300 digits) for integer string conversion)",
        ),
        (
            "x.json",
            '{"prompt": "x"}',
            "{p}: expected a JSON list of objects "
            '(or an object with a list under "data"/"rows"), got object',
        ),
        (
            "x.json",
            '[\n  {"a": 1},\n  {"a": 2,}\n]',
            "{p}:3: invalid JSON (Expecting property name enclosed in double quotes, column 11)",
        ),
        ("x.json", '[\n  {"a": 1},\n  null\n]', "{p}:3: expected a JSON object, got null"),
        ("x.json", "[]", "{p}: the file holds no rows"),
        ("x.csv", "prompt,chosen\n", "{p}: the file holds no rows"),
        (
            "x.csv",
            'prompt,chosen\n"a","b"\n"c"\n',
            "{p}:row 3: the record has 1 cells, the header has 2",
        ),
        ("x.csv", "prompt,prompt\na,b\n", '{p}:row 1: column "prompt" appears twice in the header'),
        (
            "x.csv",
            'chosen\n"[{""role"": }]"\n',
            '{p}:row 2: column "chosen" starts like a JSON list but is not valid JSON '
            "(Expecting value, column 11)",
        ),
        ("x.parquet", b"PAR1 not really", "{p}: not a readable Parquet file ("),
        ("x.jsonl.gz", b"not gzip", "{p}: not a valid gzip file (Not a gzipped file (b'no'))"),
        (
            "x.txt",
            "hello",
            '{p}: unsupported file type ".txt"; supported: .jsonl, .jsonl.gz, .json, .csv, .parquet',
        ),
        (
            "README",
            "hello",
            "{p}: unsupported file type (no extension); "
            "supported: .jsonl, .jsonl.gz, .json, .csv, .parquet",
        ),
    ],
)
def test_a_broken_file_is_one_line_naming_file_and_line(tmp_path, name, content, expected):
    source = write(tmp_path, name, content)
    message = error_of(source)
    expected = expected.format(p=source)
    assert message.startswith(expected) if expected.endswith("(") else message == expected


def test_missing_file_and_directory(tmp_path):
    assert error_of(str(tmp_path / "data" / "nope.jsonl")) == f"{tmp_path}/data/nope.jsonl: no such file"
    assert error_of(str(tmp_path)) == f"{tmp_path}: is a directory, not a data file (nor a datasets save_to_disk directory)"
    assert error_of("data/nope.jsonl") == "data/nope.jsonl: no such file"


def test_permission_denied(tmp_path, monkeypatch):
    source = write(tmp_path, "secret.jsonl", '{"a": 1}\n')

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "open", refuse)  # root can read any file, so simulate it
    assert error_of(source) == f"{source}: permission denied"


def test_errors_are_data_errors_with_path_and_line(tmp_path):
    source = write(tmp_path, "x.jsonl", '{"a": 1}\n{\n')
    with pytest.raises(DataError) as caught:
        read_rows(source)
    assert (caught.value.path, caught.value.line) == (source, 2)


def test_a_hub_dataset_that_cannot_be_loaded_is_one_line_naming_it(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path))
    # The libraries read those variables once, when imported: in a test worker that imported them earlier
    # (transformers does) only these take effect. Online, the load would retry the unreachable hub for ~20 s.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path)
    monkeypatch.chdir(tmp_path)  # so "owner/name" is not a local path
    message = error_of("lightrlhf-test/no-such-dataset:default")
    assert message.startswith(
        "hub:lightrlhf-test/no-such-dataset:default[train]: "
        "could not load the dataset from the Hugging Face Hub ("
    )


# --- a row longer than data.max_line_bytes ---------------------------------------------------------
LONG = '{"a": "' + "x" * 100 + '"}'  # 109 bytes
WIDE = '{"a": "' + "é" * 30 + '"}'  # 39 characters, 69 bytes: the limit counts bytes


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        ("x.jsonl", '{"a": 1}\n' + LONG + '\n{"a": 2}\n', "{p}:2: row of 109 bytes exceeds data.max_line_bytes=50"),
        ("x.jsonl", '{"a": 1}\n' + LONG, "{p}:2: row of 109 bytes exceeds data.max_line_bytes=50"),
        ("x.jsonl", LONG + "\r\n", "{p}:1: row of 110 bytes exceeds data.max_line_bytes=50"),
        ("x.jsonl", WIDE + "\n", "{p}:1: row of 69 bytes exceeds data.max_line_bytes=50"),
        ("x.jsonl.gz", gzip.compress(f'{{"a": 1}}\n{LONG}\n'.encode(), mtime=0),
         "{p}:2: row of 109 bytes exceeds data.max_line_bytes=50"),
        ("x.json", '[\n {"a": 1},\n ' + LONG + "\n]", "{p}:3: row of 109 bytes exceeds data.max_line_bytes=50"),
        ("x.json", '{"data": [' + WIDE + "]}", "{p}:1: row of 69 bytes exceeds data.max_line_bytes=50"),
        ("x.csv", "a\nshort\n" + "y" * 100 + "\n", "{p}:3: row of 100 bytes exceeds data.max_line_bytes=50"),
    ],
)
def test_a_row_longer_than_max_line_bytes_is_one_line(tmp_path, name, content, expected):
    source = write(tmp_path, name, content)
    with pytest.raises(DataError) as caught:
        read_rows(source, max_line_bytes=50)
    assert str(caught.value) == expected.format(p=source)


def test_a_row_of_exactly_max_line_bytes_is_read_and_loaders_pass_the_limit_on(tmp_path):
    from lightrlhf.data.formats import load_sft

    row = '{"prompt": "p", "completion": "' + "c" * 20 + '"}'
    for ending in ("\n", "\r\n", ""):
        source = write(tmp_path, "x.jsonl", row + ending)
        assert read_rows(source, max_line_bytes=len(row) + len(ending.rstrip("\n")))[0].values["completion"] == "c" * 20
    source = write(tmp_path, "x.jsonl", row + "\n")
    with pytest.raises(DataError, match=rf":1: row of {len(row)} bytes exceeds data.max_line_bytes={len(row) - 1}$"):
        load_sft(source, max_line_bytes=len(row) - 1)


# The reader in a fresh process: its peak RSS (ru_maxrss) before and after reading one file.
PEAK = """
import json, resource, sys
from lightrlhf.data.readers import read_rows
from lightrlhf.errors import UserError
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    outcome = len(read_rows(sys.argv[1], max_line_bytes=int(sys.argv[2]))[-1].values["completion"])
except UserError as error:
    outcome = str(error)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_mb": (peak - before) / 1024, "outcome": outcome}))
"""


def _peak(source: str, max_line_bytes: int) -> dict:
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", PEAK, source, str(max_line_bytes)], capture_output=True, text=True,
                          timeout=300, check=True)
    return json.loads(done.stdout)


def test_one_huge_line_takes_a_small_multiple_of_its_size_and_over_the_limit_is_one_line(tmp_path):
    size = 20 * 2**20
    source = tmp_path / "huge.jsonl"
    with open(source, "w") as file:
        file.write('{"prompt": "p"}\n{"prompt": "q", "completion": "')
        file.write("the quick brown fox " * (size // 20))
        file.write('"}\n')
    source, line = str(source), size + len('{"prompt": "q", "completion": ""}')
    kept = _peak(source, 32 * 2**20)
    assert kept["outcome"] == size
    # Twice the line at most: readline joins the chunks it read into one bytes object, then the bytes
    # and the decoded line, then the line and the parsed value, exist together (measured: 1.95x for
    # 20 MiB). The reader before held the bytes, the text, the split lines and the value (3.8x).
    assert kept["growth_mb"] < 3 * line / 2**20, kept
    refused = _peak(source, 16 * 2**20)  # data.max_line_bytes' default
    assert refused["outcome"] == f"{source}:2: row of {line} bytes exceeds data.max_line_bytes={16 * 2**20}"
    assert refused["growth_mb"] < 3 * 16, refused  # no more than the limit is read, and held twice at most
