"""stage=sample_pairs writes a candidates file the labelling server reads, chosen by each rule; stage=label
labels it through the server's HTTP API."""

from __future__ import annotations

import json
import random

import pytest
from conftest import run_in_process, train_cli

from lightrlhf.feedback.candidates import read_candidates


def _sample(tmp_path, name, exports, *extra):
    run_dir = tmp_path / name
    run_in_process(["stage=sample_pairs", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                    "stage.num_prompts=12", "stage.k=3", "stage.batch_size=6", "stage.generation.max_new_tokens=12",
                    *extra], run_dir)
    return run_dir


@pytest.mark.slow
def test_disagreement_writes_a_valid_candidates_file_best_first(tmp_path, exports, ensemble_run):
    run_dir = _sample(tmp_path, "disagreement", exports, f"stage.reward_model={ensemble_run / 'export'}",
                      "stage.selection=disagreement", "stage.budget=5", "stage.id_prefix=r1-")
    candidates = read_candidates(run_dir / "candidates.jsonl")  # the server's own reader: ids unique, fields typed
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert len(candidates) == 5
    assert all(r["selection"] == "disagreement" and r["id"].startswith("r1-p") and r["a"] != r["b"] for r in rows)
    assert all(r["policy"] == str(exports / "sft" / "export") for r in rows)
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True) and scores[-1] > 0
    assert len({r["prompt"] for r in rows}) == 5  # one pair per prompt (stage.pairs_per_prompt=1)
    pool = [json.loads(line) for line in (run_dir / "pool.jsonl").read_text().splitlines()]
    assert len(pool) == 12 and all(len(p["responses"]) == 3 for p in pool)
    for row in rows:  # each pair is two answers the pool holds for that prompt, as the id says
        answers = next(p for p in pool if p["prompt"] == row["prompt"])["responses"]
        i, j = (int(x) for x in row["id"].rsplit("-", 2)[-2:])
        assert (answers[i], answers[j]) == (row["a"], row["b"])
        assert len(row["meta"]["reward_std"]) == 2
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["pairs/selected"] == 5 and metrics["pairs/disagreement_mean"] >= metrics["pairs/disagreement_mean_pool"]

    # ucb and random choose from the very same pool, and never a pair asked already
    ucb = _sample(tmp_path, "ucb", exports, f"stage.reward_model={ensemble_run / 'export'}", "stage.selection=ucb",
                  "stage.budget=4", f"stage.pool={run_dir / 'pool.jsonl'}",
                  f"stage.exclude=[{run_dir / 'candidates.jsonl'}]")
    ucb_rows = [json.loads(line) for line in (ucb / "candidates.jsonl").read_text().splitlines()]
    asked = {(r["prompt"], frozenset((r["a"], r["b"]))) for r in rows}
    assert len(ucb_rows) == 4 and not asked & {(r["prompt"], frozenset((r["a"], r["b"]))) for r in ucb_rows}
    assert not (ucb / "pool.jsonl").exists()  # read, not sampled again

    # every pair of the pool asked: the pool's gold accuracy is the share of them whose ensemble-mean
    # rewards (written to each candidate's meta) order the two answers as the gold scorer does
    whole = _sample(tmp_path, "whole", exports, f"stage.reward_model={ensemble_run / 'export'}",
                    "stage.selection=disagreement", "stage.budget=36", "stage.pairs_per_prompt=3",
                    f"stage.pool={run_dir / 'pool.jsonl'}")
    from lightrlhf.demo.gold import gold_score

    agree, too_close = [], 0  # meta rounds to 6 decimals: an order within 2e-6 is not read back for sure
    for row in (json.loads(line) for line in (whole / "candidates.jsonl").read_text().splitlines()):
        gold = gold_score(row["prompt"], row["a"]) - gold_score(row["prompt"], row["b"])
        mean_a, mean_b = row["meta"]["reward_mean"]
        if gold != 0:
            agree.append((mean_a > mean_b) == (gold > 0))
            too_close += abs(mean_a - mean_b) < 2e-6
    whole_metrics = json.loads((whole / "metrics.json").read_text())["metrics"]
    assert len(agree) >= 10 and whole_metrics["pairs/gold_decided_pool"] == len(agree)
    assert abs(whole_metrics["pairs/gold_accuracy_pool"] * len(agree) - sum(agree)) <= too_close + 1e-9

    # the simulated annotator labels it through the server; the labels become preference pairs
    labels_dir = tmp_path / "labels"
    run_in_process(["stage=label", f"stage.candidates={run_dir / 'candidates.jsonl'}", "seed=3"], labels_dir)
    from lightrlhf.demo.annotator import SimulatedAnnotator
    from lightrlhf.feedback.labels import read_labels

    labels = read_labels(labels_dir / "labels.jsonl")
    assert [label.id for label in labels] == [r["id"] for r in rows]  # in file order, each once
    for label, row in zip(labels, rows):  # each judgement is the annotator's draw for (seed, id)
        assert label.choice == SimulatedAnnotator().label(row["prompt"], row["a"], row["b"],
                                                          random.Random(f"3:{row['id']}"))
    prefs = [json.loads(line) for line in (labels_dir / "prefs.jsonl").read_text().splitlines()]
    assert len(prefs) == sum(label.choice in ("a", "b") for label in labels)


@pytest.mark.slow
def test_random_needs_no_reward_model_and_the_others_do(tmp_path, exports):
    run_dir = _sample(tmp_path, "random", exports, "stage.budget=100")
    rows = [json.loads(line) for line in (run_dir / "candidates.jsonl").read_text().splitlines()]
    assert len(rows) == 12 and all(r["selection"] == "random" for r in rows)  # the pool offers 12 (one a prompt)
    done = train_cli(["stage=sample_pairs", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
                      "stage.selection=ucb", f"hydra.run.dir={tmp_path / 'ucb'}"])
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: config stage.selection: 'ucb' ranks pairs by the "
                                                           "spread of a reward-model ensemble")
