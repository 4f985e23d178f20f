"""Bounded load: 8 annotators at once over real HTTP, against two server processes sharing one label file."""

from __future__ import annotations

import json
import random
import threading

import pytest
from feedback_support import ServerProcess, demo_candidates, feedback_cli, free_port, write_candidates

from lightrlhf.feedback.client import FeedbackClient, FeedbackError
from lightrlhf.feedback.labels import CHOICES, read_label_file

ANNOTATORS, PAIRS = 8, 50  # 8 x 50 = 400 labels


@pytest.mark.slow
def test_eight_concurrent_annotators_leave_exactly_400_whole_distinct_lines(tmp_path):
    candidates = write_candidates(tmp_path / "candidates.jsonl", demo_candidates(PAIRS))
    labels = tmp_path / "labels.jsonl"
    port_one, port_two = free_port(), free_port()
    one = ServerProcess(candidates, labels, port_one)
    two = None
    try:
        busy = feedback_cli("serve", str(candidates), "--out", str(labels), "--port", str(port_one))
        assert busy.returncode == 2 and busy.stderr == (
            f"error: 127.0.0.1:{port_one}: the port is in use (another server?); choose another with --port\n")
        two = ServerProcess(candidates, labels, port_two)
        given: dict[tuple[str, str], str] = {}
        refused: list[int] = []
        problems: list[BaseException] = []
        start = threading.Barrier(ANNOTATORS)

        def annotate(index: int) -> None:
            name, rng = f"annotator-{index}", random.Random(index)
            servers = [FeedbackClient(one.url), FeedbackClient(two.url)]
            try:
                start.wait()
                for turn in range(PAIRS):
                    # each label through one process and the page's double-click through the other: the
                    # second must be refused by a server that did not write the first
                    here, there = servers[turn % 2], servers[1 - turn % 2]
                    candidate = here.next(name)["candidate"]
                    choice = rng.choice(CHOICES)
                    here.label(candidate["id"], name, choice, reason=f"turn {turn}", seconds=turn / 10)
                    given[(name, candidate["id"])] = choice
                    try:
                        there.label(candidate["id"], name, rng.choice(CHOICES))
                    except FeedbackError as error:
                        refused.append(error.status)
            except BaseException as error:  # reported by the test thread
                problems.append(error)

        threads = [threading.Thread(target=annotate, args=(i,)) for i in range(ANNOTATORS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(300)
        assert not problems, problems
        assert not any(thread.is_alive() for thread in threads)
        assert FeedbackClient(two.url).next("annotator-3") == {"done": True, "candidate": None,
                                                               "progress": {"labelled": PAIRS, "total": PAIRS}}
    finally:
        one.stop()
        if two is not None:
            two.stop()

    raw = labels.read_bytes()
    assert raw.endswith(b"\n")
    records = [json.loads(line) for line in raw.decode("utf-8").split("\n")[:-1]]  # every line whole JSON
    assert len(records) == ANNOTATORS * PAIRS == 400
    assert len({(r["annotator"], r["id"]) for r in records}) == 400  # no pair labelled twice by anyone
    assert refused == [409] * 400
    assert {(r["annotator"], r["id"]): r["choice"] for r in records} == given
    assert all(r["reason"].startswith("turn ") for r in records)
    log = read_label_file(labels)
    assert len(log.labels) == 400 and log.torn is None
