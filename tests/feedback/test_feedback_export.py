"""export and stats against values worked out by hand, through the functions and the CLI."""

from __future__ import annotations

import json

import pytest
from feedback_support import demo_candidates, feedback_cli, write_candidates

from lightrlhf.data.formats import load_preferences
from lightrlhf.feedback.labels import Label
from lightrlhf.feedback.stats import cohen_kappa, label_stats
from lightrlhf.feedback.store import LabelStore

# Two annotators on ten pairs. Agreement on 1 2 3 5 6 8 10: p_o = 7/10.
# ana: a 5, b 3, tie 2; ben: a 5, b 4, tie 1.  p_e = (5*5 + 3*4 + 2*1) / 100 = 39/100.
# kappa = (0.70 - 0.39) / (1 - 0.39) = 31/61 = 0.508197 (Cohen 1960)
ANA = ["a", "a", "a", "a", "b", "b", "b", "tie", "tie", "a"]
BEN = ["a", "a", "a", "b", "b", "b", "a", "tie", "b", "a"]


def test_cohen_kappa_matches_the_hand_computed_table():
    assert cohen_kappa(ANA, BEN) == pytest.approx(31 / 61)
    assert cohen_kappa(["a", "b"], ["a", "b"]) == pytest.approx(1.0)
    # p_o = 0, p_e = (1*1 + 1*1)/4 = 1/2: kappa = -1
    assert cohen_kappa(["a", "b"], ["b", "a"]) == pytest.approx(-1.0)
    assert cohen_kappa(["a", "a"], ["a", "a"]) is None  # p_e = 1: undefined


def labels_of(name: str, choices: list[str], start: int = 1) -> list[Label]:
    return [Label(f"p{i}", name, choice, seconds=float(i)) for i, choice in enumerate(choices, start)]


def test_stats_count_each_annotator_and_compare_them_on_shared_judged_pairs():
    labels = labels_of("ana", ANA + ["skip", "b"]) + labels_of("ben", BEN + ["a"]) + labels_of("cy", ["tie"], 20)
    stats = label_stats(labels)
    ana, ben, cy = stats.annotators
    assert (ana.name, ana.labels, ana.choices) == ("ana", 12, {"a": 5, "b": 4, "tie": 2, "both_bad": 0, "skip": 1})
    assert ana.median_seconds == 6.5 and ben.labels == 11 and cy.labels == 1
    (pair,) = stats.agreements  # cy shares no pair with anyone
    # p11 is skipped by ana, so the shared judged pairs are p1..p10 (p12 was labelled by ana only)
    assert (pair.first, pair.second, pair.shared) == ("ana", "ben", 10)
    assert pair.agreement == pytest.approx(0.7) and pair.kappa == pytest.approx(31 / 61)


def test_agreement_with_a_reward_model_counts_a_b_labels_and_halves_level_scores():
    labels = labels_of("ana", ["a", "b", "a", "tie", "b"])
    scores = {"p1": (2.0, 1.0), "p2": (2.0, 1.0), "p3": (0.5, 0.5), "p4": (9.0, 0.0), "p5": (-1.0, 3.0)}
    (ana,) = label_stats(labels, scores).annotators
    # p1 agrees, p2 disagrees, p3 level (1/2), p4 is a tie (not counted), p5 agrees: 2.5 / 4
    assert ana.reward_model_pairs == 4 and ana.reward_model_agreement == pytest.approx(0.625)


def test_export_takes_the_side_more_annotators_preferred_and_counts_the_rest(tmp_path):
    candidates = write_candidates(tmp_path / "c.jsonl", demo_candidates(7))
    labels = tmp_path / "labels.jsonl"
    votes = {"p1": "aab", "p2": "ab", "p3": ["tie", "both_bad"], "p4": "b", "p5": ["a", "tie", "tie"],
             "p6": ["skip"]}  # p7: nobody
    with LabelStore(labels) as store:
        for id, choices in votes.items():
            for annotator, choice in zip(("ana", "ben", "cy"), choices):
                store.append(id, annotator, choice)
        store.append("p7", "ana", "a")
        store.undo("ana")
        store.append("zz", "ana", "a")  # an id of another round's candidates file
    out = tmp_path / "out" / "prefs.jsonl"
    done = feedback_cli("export", str(labels), "--candidates", str(candidates), "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        f"wrote 3 preference pairs to {out} from 13 labels by 3 annotators on 6 pairs (a 5, b 3, tie 3, "
        "both bad 1, skip 1); not exported: 2 pairs with no a/b preference (tie, both bad or skip only), 1 with "
        "level a/b votes; several annotators on a pair: the side more of them preferred (tie, both bad and skip "
        "abstain); labels of ids in no candidates file given (skipped): 1")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    pair = {row["id"]: row for row in demo_candidates(7)}
    assert rows == [
        {"prompt": pair["p1"]["prompt"], "chosen": pair["p1"]["a"], "rejected": pair["p1"]["b"], "id": "p1"},
        {"prompt": pair["p4"]["prompt"], "chosen": pair["p4"]["b"], "rejected": pair["p4"]["a"], "id": "p4"},
        {"prompt": pair["p5"]["prompt"], "chosen": pair["p5"]["a"], "rejected": pair["p5"]["b"], "id": "p5"}]
    examples, report = load_preferences(str(out))  # what stage=rm reads: TRL's explicit format
    assert report.format == "explicit" and len(examples) == 3


def test_the_stats_cli_prints_the_table_and_json(tmp_path):
    labels = tmp_path / "labels.jsonl"
    with LabelStore(labels) as store:
        for name, choices in (("ana", ANA), ("ben", BEN)):
            for i, choice in enumerate(choices, 1):
                store.append(f"p{i}", name, choice, seconds=2.0)
    done = feedback_cli("stats", str(labels))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "annotator  labels  a  b  tie  both bad  skip  median s",
        "ana            10  5  3    2         0     0       2.0",
        "ben            10  5  4    1         0     0       2.0",
        "",
        "annotators  shared pairs  agreement  Cohen's kappa",
        "ana / ben             10      0.700          0.508"]
    report = json.loads(feedback_cli("stats", str(labels), "--json").stdout)
    assert report["agreements"][0]["kappa"] == pytest.approx(31 / 61)


@pytest.mark.parametrize("args,message", [
    (["export", "{d}/none.jsonl", "--candidates", "{d}/c.jsonl", "--out", "{d}/p.jsonl"],
     "error: {d}/none.jsonl: no such file"),
    (["export", "{d}/labels.jsonl", "--candidates", "{d}/empty.jsonl", "--out", "{d}/p.jsonl"],
     "error: {d}/empty.jsonl: the file is empty"),
    (["export", "{d}/ties.jsonl", "--candidates", "{d}/c.jsonl", "--out", "{d}/p.jsonl"],
     "error: {d}/ties.jsonl: no pair has an a/b preference (labels: 1, pairs of the candidates given: 1); "
     "nothing was written to {d}/p.jsonl"),
    (["export", "{d}/labels.jsonl", "--candidates", "{d}/c.jsonl", "--out", "{d}/c.jsonl/p.jsonl"],
     "error: {d}/c.jsonl/p.jsonl: cannot write"),
    (["stats", "{d}/labels.jsonl", "--reward-model", "{d}"],
     "error: --reward-model: give --candidates too (the texts the labels are of)"),
    (["serve", "{d}/empty.jsonl", "--out", "{d}/l.jsonl"], "error: {d}/empty.jsonl: the file is empty"),
    (["serve", "{d}/c.jsonl", "--out", "{d}/c.jsonl/l.jsonl"],
     "error: {d}/c.jsonl/l.jsonl: cannot write the labels there (Not a directory)"),
    (["serve", "{d}/c.jsonl", "--out", "{d}/l.jsonl", "--host", "0.0.0.0"],
     "error: --host 0.0.0.0: listening beyond this machine needs a token (--token SECRET); every request must "
     "then carry it"),
    (["serve", "{d}/c.jsonl", "--out", "{d}/l.jsonl", "--host", "192.0.2.1", "--token", "t"],
     "error: 192.0.2.1:8765: cannot listen there (Cannot assign requested address)"),
])
def test_cli_mistakes_are_one_line_and_exit_2_and_leave_files_as_they_were(tmp_path, args, message):
    write_candidates(tmp_path / "c.jsonl", demo_candidates(2))
    (tmp_path / "empty.jsonl").write_text("")
    with LabelStore(tmp_path / "labels.jsonl") as store:
        store.append("p1", "ana", "a")
    with LabelStore(tmp_path / "ties.jsonl") as store:
        store.append("p1", "ana", "tie")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    done = feedback_cli(*[arg.format(d=tmp_path) for arg in args])
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(message.format(d=tmp_path)) and done.stderr.count("\n") == 1, done.stderr
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
