"""experiment=iterated_rlhf: two short rounds killed with SIGKILL while round 2 is being labelled through
the HTTP API, then resumed: no label lost or given twice, no finished step or round run again."""

from __future__ import annotations

import json
import random
import signal
import time

import pytest
from conftest import start_train, train_cli

from lightrlhf.demo.annotator import SimulatedAnnotator
from lightrlhf.feedback.labels import read_label_file

PAIRS = 6
# short steps: the loop's wiring, resume and files are under test, not how well the models learn
TINY = ["experiment=iterated_rlhf", "pipeline.loop.rounds=2", f"pipeline.loop.pairs_per_round={PAIRS}",
        "pipeline.loop.prompts_per_round=8",
        "pipeline.extra.sft=['trainer.max_steps=4','trainer.val_check_interval=4','stage.eval.num_prompts=8']",
        "pipeline.extra.sample_pairs=['stage.generation.max_new_tokens=12','stage.batch_size=8']",
        "pipeline.extra.label=['stage.pace_s=0.3']",  # a person's pace, so the kill lands mid-round
        "pipeline.extra.rm=['stage.ensemble=2','trainer.max_steps=3','trainer.val_check_interval=3',"
        "'stage.datamodule.batch_size=4']",
        "pipeline.extra.ppo=['stage.rollouts=2','trainer.val_check_interval=2','stage.eval.num_prompts=8',"
        "'stage.datamodule.batch_size=8','reward.normalize.init_rollouts=1','stage.generation.max_new_tokens=12']"]
FINISHED_BEFORE_THE_KILL = ("sft", "pairs_r1", "labels_r1", "rm_r1", "ppo_r1", "pairs_r2")


@pytest.mark.slow
def test_a_loop_killed_mid_round_resumes_without_losing_or_repeating(tmp_path):
    run_dir = tmp_path / "loop"
    labels_r2 = run_dir / "labels_r2" / "labels.jsonl"
    process = start_train(TINY + [f"hydra.run.dir={run_dir}"])
    try:
        while process.poll() is None and not (labels_r2.exists() and labels_r2.read_bytes().count(b"\n") >= 2):
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()[1][-3000:]
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    before_kill = labels_r2.read_bytes()
    assert 2 <= before_kill.count(b"\n") < PAIRS
    finished = {name: (run_dir / name / "metrics.json").read_bytes() for name in FINISHED_BEFORE_THE_KILL}
    candidates = {n: (run_dir / f"pairs_r{n}" / "candidates.jsonl").read_bytes() for n in (1, 2)}

    done = train_cli([f"resume={run_dir}"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    log = done.stdout + done.stderr
    for name, record in finished.items():  # finished steps were skipped, their records untouched
        assert f"pipeline step {name} already finished" in log
        assert (run_dir / name / "metrics.json").read_bytes() == record
    for n in (1, 2):
        assert (run_dir / f"pairs_r{n}" / "candidates.jsonl").read_bytes() == candidates[n]  # the same pairs
    # every pair of each round labelled exactly once; the labels given before the kill kept as written
    assert labels_r2.read_bytes().startswith(before_kill)
    for n in (1, 2):
        log_file = read_label_file(run_dir / f"labels_r{n}" / "labels.jsonl")
        rows = [json.loads(line) for line in candidates[n].decode().splitlines()]
        assert log_file.records == PAIRS and log_file.undos == 0 and log_file.torn is None
        assert [label.id for label in log_file.labels] == [row["id"] for row in rows]
        for label, row in zip(log_file.labels, rows):  # as an uninterrupted run would have labelled them
            assert label.choice == SimulatedAnnotator().label(row["prompt"], row["a"], row["b"],
                                                              random.Random(f"0:{row['id']}"))
    # round 2's reward model trained on both rounds' labels, round 1's first
    first = (run_dir / "labels_r1" / "prefs.jsonl").read_text()
    both = (run_dir / "labels_r2" / "prefs.jsonl").read_text()
    assert both.startswith(first) and len(both.splitlines()) > len(first.splitlines())
    # round 2 sampled from round 1's PPO policy and chose with round 1's reward ensemble
    pairs_r2 = json.loads((run_dir / "pairs_r2" / "metrics.json").read_text())
    assert pairs_r2["selection"] == "disagreement" and pairs_r2["policy"].endswith("ppo_r1/export")
    rounds = json.loads((run_dir / "rounds.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [1, 2] and all(r["ppo_gold"] is not None for r in rounds)
    assert [r["labels_total"] for r in rounds] == [len(first.splitlines()), len(both.splitlines())]
