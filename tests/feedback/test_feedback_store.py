"""The candidates reader and the label store: one-line errors, undo, torn lines, several writers."""

from __future__ import annotations

import json

import pytest
from feedback_support import write_candidates

from lightrlhf.errors import DataError, UserError
from lightrlhf.feedback.candidates import read_candidates
from lightrlhf.feedback.labels import LabelRejected, read_label_file, read_labels
from lightrlhf.feedback.store import LabelStore

PAIR = {"id": "p1", "prompt": "q", "a": "x", "b": "y"}


def lines(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- candidates ----------------------------------------------------------------------------------
def test_candidates_are_read_in_file_order_with_their_optional_fields(tmp_path):
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    path = write_candidates(tmp_path / "c.jsonl", [
        {**PAIR, "policy": "round-1", "selection": "ucb", "score": 0.5, "meta": {"k": 1}, "a_media": "clip.gif"},
        {"id": "p2", "prompt": "写一首诗", "a": "床前明月光", "b": "<script>x()</script>"}])
    first, second = read_candidates(path)
    assert (first.id, first.a_media, first.b_media, first.extra["selection"]) == ("p1", "clip.gif", None, "ucb")
    assert first.public() == {"id": "p1", "prompt": "q", "a": "x", "b": "y", "a_media": "clip.gif"}
    assert (second.prompt, second.b, second.where) == ("写一首诗", "<script>x()</script>", f"{path}:2")


@pytest.mark.parametrize("content,message", [
    ("", "{f}: the file is empty"),
    ("\n\n", "{f}: the file is empty"),
    ('{"id": "p1", "prompt": "q", "a": "x", "b": "y"}\n{"id": "p2", "prompt": \n', "{f}:2: invalid JSON"),
    ('{"id": "p1", "prompt": "q", "a": "x"}\n', '{f}:1: field "b" is missing'),
    ('{"id": "p1", "prompt": "q", "a": "x", "b": null}\n', '{f}:1: field "b" is null'),
    ('{"id": 7, "prompt": "q", "a": "x", "b": "y"}\n', '{f}:1: field "id" must be a string, got number'),
    ('{"id": " ", "prompt": "q", "a": "x", "b": "y"}\n', '{f}:1: field "id" is empty'),
    ('{"id": "p1", "prompt": "q", "a": "x", "b": "y", "score": "high"}\n',
     '{f}:1: field "score" must be a number, got string'),
    ('{"id": "p1", "prompt": "q", "a": "x", "b": "y"}\n\n{"id": "p1", "prompt": "r", "a": "x", "b": "y"}\n',
     '{f}:3: duplicate id "p1" (first at {f}:1)'),
    ('{"id": "p1", "prompt": "q", "a": "x", "b": "y", "b_media": "gone.png"}\n',
     '{f}:1: field "b_media": no such file {d}/gone.png'),
    ('[1, 2]\n', "{f}:1: expected a JSON object, got list"),
])
def test_a_bad_candidates_file_is_one_line_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "c.jsonl"
    path.write_text(content)
    with pytest.raises(DataError) as error:
        read_candidates(path)
    assert str(error.value).startswith(message.format(f=path, d=tmp_path))
    assert "\n" not in str(error.value)


def test_a_missing_candidates_file_is_one_line(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_candidates(tmp_path / "nope.jsonl")


# -- labels --------------------------------------------------------------------------------------
def test_labels_are_appended_as_json_lines_with_every_field(tmp_path):
    path = tmp_path / "labels.jsonl"
    with LabelStore(path, known_ids={"p1", "p2"}) as store:
        store.append("p1", "ana", "a", reason="on topic", seconds=2.5)
        store.append("p2", " ana ", "both_bad")
    first, second = lines(path)
    assert {k: first[k] for k in ("id", "annotator", "choice", "reason", "seconds")} == \
        {"id": "p1", "annotator": "ana", "choice": "a", "reason": "on topic", "seconds": 2.5}
    assert first["time"].endswith("Z") and second["annotator"] == "ana" and second["reason"] == ""
    assert [(label.id, label.choice) for label in read_labels(path)] == [("p1", "a"), ("p2", "both_bad")]


def test_undo_retracts_the_annotators_latest_label_and_only_theirs(tmp_path):
    path = tmp_path / "labels.jsonl"
    with LabelStore(path) as store:
        store.append("p1", "ana", "a")
        store.append("p1", "ben", "b")
        store.append("p2", "ana", "tie")
        assert store.undo("ana") == "p2"
        assert store.undo("ana") == "p1"
        assert store.undo("ana") is None  # nothing left: nothing written
        store.append("p1", "ana", "b")  # a retracted pair can be labelled again
        assert store.labelled_ids("ana") == {"p1"}
    assert [(r.get("undo", False), r["annotator"], r["id"]) for r in lines(path)] == [
        (False, "ana", "p1"), (False, "ben", "p1"), (False, "ana", "p2"), (True, "ana", "p2"), (True, "ana", "p1"),
        (False, "ana", "p1")]
    assert [(label.annotator, label.id, label.choice) for label in read_labels(path)] == [
        ("ben", "p1", "b"), ("ana", "p1", "b")]


def test_a_store_refuses_unknown_ids_second_labels_and_bad_values_and_writes_nothing(tmp_path):
    path = tmp_path / "labels.jsonl"
    with LabelStore(path, known_ids={"p1"}) as store:
        store.append("p1", "ana", "a")
        refused = []
        for args in [("p9", "ana", "a"), ("p1", "ana", "b"), ("p1", "bob", "maybe"), ("p1", "", "a"),
                     ("p1", "bob", "a", 5), ("p1", "bob", "a", "", -1.0), ("p1", "bob", "a", "", float("nan"))]:
            with pytest.raises(LabelRejected) as error:
                store.append(*args)
            refused.append(error.value.status)
    assert refused == [404, 409, 400, 400, 400, 400, 400]
    assert len(lines(path)) == 1


def test_a_second_store_on_the_same_file_sees_the_first_ones_labels(tmp_path):
    """Two servers (two open files, as two processes have) on one label file: the file lock and the
    catch-up read make "already labelled" hold across them."""
    path = tmp_path / "labels.jsonl"
    with LabelStore(path) as one, LabelStore(path) as two:
        one.append("p1", "ana", "a")
        with pytest.raises(LabelRejected) as error:
            two.append("p1", "ana", "b")
        assert error.value.status == 409
        two.append("p2", "ana", "b")
        assert one.undo("ana") == "p2"  # the latest label is the one the other store wrote
        assert two.labelled_ids("ana") == {"p1"}
    assert len(lines(path)) == 3


def test_a_torn_last_line_is_skipped_by_readers_and_moved_aside_by_the_next_store(tmp_path, caplog):
    path = tmp_path / "labels.jsonl"
    with LabelStore(path) as store:
        store.append("p1", "ana", "a")
        store.append("p2", "ana", "b")
    with open(path, "ab") as file:  # what a power cut halfway through a write leaves
        file.write(b'{"id": "p3", "annotator": "ana", "cho')
    log = read_label_file(path)
    assert [label.id for label in log.labels] == ["p1", "p2"] and log.torn == f"{path}:3"
    assert "cut short" in caplog.text
    with LabelStore(path) as store:
        assert store.notes == [f"{path}:3: the last line was cut short by a crash (a label never confirmed); "
                               f"moved to {path}.torn"]
        store.append("p3", "ana", "tie")
    assert (tmp_path / "labels.jsonl.torn").read_bytes() == b'{"id": "p3", "annotator": "ana", "cho\n'
    assert [(label.id, label.choice) for label in read_labels(path)] == [("p1", "a"), ("p2", "b"), ("p3", "tie")]
    assert read_label_file(path).torn is None


def test_a_malformed_complete_line_is_an_error_naming_its_line(tmp_path):
    path = tmp_path / "labels.jsonl"
    path.write_text('{"id": "p1", "annotator": "ana", "choice": "a"}\nnot json\n'
                    '{"id": "p2", "annotator": "ana", "choice": "a"}\n')
    with pytest.raises(DataError, match=f"^{path}:2: invalid JSON"):
        read_labels(path)
    path.write_text('{"id": "p1", "annotator": "ana", "choice": "best"}\n')
    with pytest.raises(DataError, match=f'^{path}:1: not a label record: "choice" must be one of'):
        LabelStore(path)


def test_an_unwritable_label_file_is_one_line_and_a_missing_one_is_an_error_for_readers(tmp_path):
    # (permission bits do not stop root, so the unwritable paths here are a directory and a file's child)
    (tmp_path / "file").write_text("")
    for where, why in [(tmp_path, "Is a directory"), (tmp_path / "file" / "labels.jsonl", "Not a directory")]:
        with pytest.raises(UserError) as error:
            LabelStore(where)
        assert str(error.value) == f"{where}: cannot write the labels there ({why})"
    with pytest.raises(DataError, match="no such file"):
        read_labels(tmp_path / "none.jsonl")


def test_a_write_the_disk_refuses_is_rolled_back_and_reported_as_507(tmp_path, monkeypatch):
    import errno
    import os

    path = tmp_path / "labels.jsonl"
    with LabelStore(path) as store:
        store.append("p1", "ana", "a")
        before = path.read_bytes()
        real_fsync, calls = os.fsync, []

        def full_disk(fd):  # the line reached the file, then the disk said no
            calls.append(fd)
            if len(calls) == 1:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full_disk)
        with pytest.raises(LabelRejected) as error:
            store.append("p2", "ana", "b")
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert error.value.status == 507
        assert str(error.value) == (f"{path}: cannot save the label (No space left on device); every earlier "
                                    "label is kept")
        assert path.read_bytes() == before and store.labelled_ids("ana") == {"p1"}
        store.append("p2", "ana", "b")  # once the disk has room again
    assert [label.id for label in read_labels(path)] == ["p1", "p2"]
