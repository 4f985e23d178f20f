"""The HTTP API on a real served thread (uvicorn), through FeedbackClient and raw requests."""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest
from feedback_support import PNG, demo_candidates, write_candidates

from lightrlhf.errors import DataError, UserError
from lightrlhf.feedback.client import FeedbackClient, FeedbackError
from lightrlhf.feedback.labels import read_labels
from lightrlhf.feedback.server import MAX_BODY_BYTES, TOKEN_COOKIE, bind, check_binding, serve_in_thread


def raw(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body bytes) of one request, errors included."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


@pytest.fixture
def files(tmp_path):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips" / "a 1.png").write_bytes(PNG)
    (tmp_path / "secret.txt").write_text("not for the page")
    rows = demo_candidates(4)
    rows[0]["a_media"] = "clips/a 1.png"
    rows[1]["b"] = "<script>window.pwned = 1</script>"
    return write_candidates(tmp_path / "candidates.jsonl", rows), tmp_path / "labels.jsonl"


def test_next_label_undo_and_progress_follow_the_file_order(files):
    candidates, labels = files
    with serve_in_thread(candidates, labels) as url:
        client = FeedbackClient(url)
        first = client.next("ana")
        assert first["done"] is False and first["progress"] == {"labelled": 0, "total": 4}
        assert first["candidate"] == {"id": "p1", "prompt": "explain river rain :",
                                      "a": "the river and the rain flow gently to the lake , thanks .",
                                      "b": "ugh rain rain whatever", "a_media": "clips/a 1.png"}
        assert client.label("p1", "ana", "a", reason="kind", seconds=3.25) == {"progress": {"labelled": 1, "total": 4}}
        second = client.next("ana")["candidate"]
        assert second["id"] == "p2" and second["b"] == "<script>window.pwned = 1</script>"  # text, verbatim
        assert client.next("ben")["candidate"]["id"] == "p1"  # each annotator has their own place
        client.label("p3", "ana", "skip")  # out of order through the API: p2 is still the next
        assert client.next("ana")["candidate"]["id"] == "p2"
        assert client.undo("ana") == {"undone": "p3", "progress": {"labelled": 1, "total": 4}}
        for id, choice in [("p2", "b"), ("p3", "tie"), ("p4", "both_bad")]:
            client.label(id, "ana", choice)
        assert client.next("ana") == {"done": True, "candidate": None, "progress": {"labelled": 4, "total": 4}}
        assert client.undo("ben") == {"undone": None, "progress": {"labelled": 0, "total": 4}}
    assert [(label.id, label.choice, label.reason, label.seconds) for label in read_labels(labels)] == [
        ("p1", "a", "kind", 3.25), ("p2", "b", "", 0.0), ("p3", "tie", "", 0.0), ("p4", "both_bad", "", 0.0)]


def test_a_restarted_server_resumes_at_the_first_pair_the_annotator_has_not_labelled(files):
    candidates, labels = files
    with serve_in_thread(candidates, labels) as url:
        client = FeedbackClient(url)
        client.label("p1", "ana", "a")
        client.label("p2", "ana", "b")
        client.label("p1", "ben", "tie")
    with serve_in_thread(candidates, labels) as url:
        client = FeedbackClient(url)
        assert client.next("ana")["candidate"]["id"] == "p3"
        assert client.next("ana")["progress"] == {"labelled": 2, "total": 4}
        assert client.next("ben")["candidate"]["id"] == "p2"
        with pytest.raises(FeedbackError) as error:
            client.label("p2", "ana", "a")
        assert error.value.status == 409


@pytest.mark.parametrize("path,body,status,message", [
    ("/api/label", b"{not json", 400, "the request body is not valid JSON"),
    ("/api/label", b"[1]", 400, "the request body must be a JSON object"),
    ("/api/label", b'{"id": "p1", "annotator": "ana"}', 400, 'field "choice" is missing'),
    ("/api/label", b'{"id": "p1", "annotator": "ana", "choice": "a", "extra": 1}', 400, 'unknown field "extra"'),
    ("/api/label", b'{"id": "p1", "annotator": "ana", "choice": "A"}', 400, '"choice" must be one of'),
    ("/api/label", b'{"id": "p1", "annotator": "ana", "choice": "a", "seconds": "3"}', 400, '"seconds" must be'),
    ("/api/label", b'{"id": "nope", "annotator": "ana", "choice": "a"}', 404, 'unknown candidate id "nope"'),
    ("/api/label", b'{"id": "p1", "annotator": "' + b"x" * MAX_BODY_BYTES + b'"}', 413, "over 65536 bytes"),
    ("/api/undo", b"{}", 400, 'field "annotator" is missing'),
    ("/api/undo", b'{"annotator": 5}', 400, '"annotator" must be a non-empty name'),
    ("/api/next", None, 400, 'field "annotator" is missing'),
    ("/api/nothing", None, 404, "Not Found"),
    ("/media/secret.txt", None, 404, "no such media file: secret.txt"),
    ("/media/../secret.txt", None, 404, "no such media file"),
    ("/static/../server.py", None, 404, ""),
])
def test_a_malformed_request_is_a_4xx_json_error_and_writes_nothing(files, path, body, status, message):
    candidates, labels = files
    with serve_in_thread(candidates, labels) as url:
        FeedbackClient(url).label("p1", "ana", "a")
        before = labels.read_bytes()
        got, headers, content = raw(url + path, "POST" if body is not None else "GET", body,
                                    {"Content-Type": "application/json"})
    assert got == status and headers["Content-Type"] == "application/json"
    assert message in json.loads(content)["error"]
    assert labels.read_bytes() == before


def test_the_page_its_files_and_named_media_are_served_with_a_strict_policy(files):
    candidates, labels = files
    with serve_in_thread(candidates, labels) as url:
        status, headers, page = raw(url + "/")
        assert status == 200 and b'<script src="static/page.js"' in page
        assert "script-src" not in headers["Content-Security-Policy"]  # default-src 'self': no inline script
        assert "default-src 'self'" in headers["Content-Security-Policy"]
        for name in ("page.js", "page.css"):
            assert raw(f"{url}/static/{name}")[0] == 200
        status, headers, image = raw(url + "/media/clips/a%201.png")
        assert (status, headers["Content-Type"], image) == (200, "image/png", PNG)


def test_a_token_is_required_on_every_request_and_the_page_carries_it_in_a_cookie(files):
    candidates, labels = files
    with serve_in_thread(candidates, labels, token="s3cret") as url:
        for path in ("/", "/static/page.js", "/api/next?annotator=ana", "/media/clips/a%201.png"):
            status, _, content = raw(url + path)
            assert status == 401 and "token" in json.loads(content)["error"]
        assert raw(url + "/?token=wrong")[0] == 401
        status, headers, _ = raw(url + "/?token=s3cret")
        assert status == 200 and f"{TOKEN_COOKIE}=s3cret" in headers["Set-Cookie"]
        assert "HttpOnly" in headers["Set-Cookie"] and "SameSite=strict" in headers["Set-Cookie"]
        assert raw(url + "/static/page.css", headers={"Cookie": f"{TOKEN_COOKIE}=s3cret"})[0] == 200
        with pytest.raises(FeedbackError) as error:
            FeedbackClient(url).label("p1", "ana", "a")
        assert error.value.status == 401
        FeedbackClient(url, token="s3cret").label("p1", "ana", "a")
    assert [label.id for label in read_labels(labels)] == ["p1"]


def test_binding_beyond_loopback_needs_a_token_and_a_busy_port_is_one_line(files):
    candidates, labels = files
    with pytest.raises(UserError, match="^--host 0.0.0.0: listening beyond this machine needs a token"):
        check_binding("0.0.0.0", None)
    check_binding("0.0.0.0", "s3cret")
    check_binding("127.0.0.1", None)
    with pytest.raises(UserError, match="^--token: must be a non-empty string without spaces"):
        check_binding("127.0.0.1", "two words")
    busy = bind("127.0.0.1", 0)
    port = busy.getsockname()[1]
    try:
        with pytest.raises(UserError) as error:
            with serve_in_thread(candidates, labels, port=port):
                pass
        assert str(error.value) == f"127.0.0.1:{port}: the port is in use (another server?); choose another with --port"
    finally:
        busy.close()
    with pytest.raises(DataError, match="the file is empty"):
        with serve_in_thread(write_candidates(labels.with_name("empty.jsonl"), []), labels):
            pass
