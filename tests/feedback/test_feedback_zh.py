"""Chinese pairs through the labelling server, the label file, export and stats: UTF-8 text, never escapes.

(The page's rendering of Chinese is checked in a real browser by test_feedback_browser.py.)
"""

from __future__ import annotations

import json
import urllib.parse

from feedback_support import feedback_cli, write_candidates
from test_feedback_api import raw

from lightrlhf.data.formats import load_preferences
from lightrlhf.feedback.client import FeedbackClient
from lightrlhf.feedback.server import serve_in_thread

# the Chinese demo language (explain river rock : / the river is calm , kindly .) and everyday Chinese
PAIRS = [("解释河岩：", "其河是静，请。", "唉随，蠢。"),
         ("用一句话介绍长城。", "长城是中国古代修建的军事防御工程。", "长城是一条河……"),
         ("推荐一本书。", "《红楼梦》：人物刻画细腻。", "随便。")]


def chinese_candidates(tmp_path):
    rows = [{"id": f"对{i}", "prompt": p, "a": a, "b": b} for i, (p, a, b) in enumerate(PAIRS, 1)]
    return write_candidates(tmp_path / "候选.jsonl", rows), rows


def test_chinese_pairs_are_served_as_utf8_and_labelled_under_chinese_names(tmp_path):
    candidates, rows = chinese_candidates(tmp_path)
    labels = tmp_path / "labels.jsonl"
    with serve_in_thread(candidates, labels) as url:
        status, headers, body = raw(url + "/api/next?" + urllib.parse.urlencode({"annotator": "甲"}))
        assert status == 200 and headers["Content-Type"] == "application/json"  # JSON is UTF-8 (RFC 8259)
        assert "其河是静，请。".encode() in body and b"\\u" not in body
        assert json.loads(body)["candidate"] == rows[0]
        client = FeedbackClient(url)
        for annotator, choices in (("甲", "aab"), ("乙", "abb")):
            for row, choice in zip(rows, choices):
                client.label(row["id"], annotator, choice, reason="更礼貌" if choice == "a" else "")
        assert client.next("甲")["done"] is True
    text = labels.read_bytes().decode("utf-8")
    assert "\\u" not in text and '"annotator": "甲"' in text and "更礼貌" in text

    out = tmp_path / "偏好" / "prefs.jsonl"
    done = feedback_cli("export", str(labels), "--candidates", str(candidates), "--out", str(out))
    assert done.returncode == 0, done.stderr
    exported = out.read_bytes().decode("utf-8")
    assert "\\u" not in exported
    # 对1: a by both; 对2: a/b level (not exported); 对3: b by both
    assert [json.loads(line) for line in exported.splitlines()] == [
        {"prompt": "解释河岩：", "chosen": "其河是静，请。", "rejected": "唉随，蠢。", "id": "对1"},
        {"prompt": "推荐一本书。", "chosen": "随便。", "rejected": "《红楼梦》：人物刻画细腻。", "id": "对3"}]
    examples, report = load_preferences(str(out))
    assert report.format == "explicit" and [e.chosen for e in examples] == ["其河是静，请。", "随便。"]

    table = feedback_cli("stats", str(labels))
    assert table.returncode == 0, table.stderr
    # a Chinese name takes two columns a character: the table stays aligned in a terminal (乙 sorts before 甲)
    assert table.stdout.splitlines()[:3] == [
        "annotator  labels  a  b  tie  both bad  skip  median s",
        "乙              3  1  2    0         0     0       0.0",
        "甲              3  2  1    0         0     0       0.0"]
    as_json = feedback_cli("stats", str(labels), "--json").stdout
    assert '"name": "甲"' in as_json and json.loads(as_json)["agreements"][0]["first"] == "乙"
