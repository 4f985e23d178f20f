"""stage=best_of_n: built from its YAML, run through the real train.py on tiny exports, bad input in one line."""

from __future__ import annotations

import json
import math

import pytest
from conftest import compose, train_cli

from lightrlhf.launch.run import to_plain
from lightrlhf.stages.best_of_n import powers_of_two

# a few prompts, short responses: seconds on a CPU
SMALL = ["stage.n_max=4", "stage.num_prompts=8", "stage.batch_size=4", "stage.generation.max_new_tokens=8"]


def _exports_overrides(exports) -> list[str]:
    return ["stage=best_of_n", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}"]


def test_powers_of_two():
    assert powers_of_two(1) == [1]
    assert powers_of_two(64) == [1, 2, 4, 8, 16, 32, 64]
    assert powers_of_two(6) == [1, 2, 4, 6]


def test_yaml_composes_and_builds(exports, tmp_path):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.stages.base import SamplingStage

    stage, datamodule = build_stage(to_plain(compose(_exports_overrides(exports), tmp_path)))
    assert isinstance(stage, SamplingStage)
    assert stage.n_values == [1, 2, 4, 8, 16, 32, 64] and stage.n_max == 64
    assert stage.model.shares_reward_base and not stage.model.has_critic  # RM on the SFT base, no value adapter
    assert stage.default_metric == "best_of_n/64/gold_score"  # the demo's data brings the gold scorer


def test_run_writes_the_table_and_the_chosen_responses(exports, tmp_path):
    from lightrlhf.data.formats import load_sft

    run_dir = tmp_path / "bon"
    result = train_cli(_exports_overrides(exports) + SMALL + ["stage.select_n=2", f"hydra.run.dir={run_dir}"])
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["stage"] == "best_of_n"
    assert record["prompts"] == 8 and record["draws_per_prompt"] == 5
    table = record["table"]
    assert [row["n"] for row in table] == [1, 2, 4]
    rewards = [row["reward"] for row in table]
    # exact for the all-subsets estimate: the best of a larger random subset beats its random sub-subset
    assert all(b >= a - 1e-9 for a, b in zip(rewards, rewards[1:])), rewards
    for row in table:
        assert row["kl"] == pytest.approx(math.log(row["n"]) - (row["n"] - 1) / row["n"], abs=1e-12)
        assert 0.0 <= row["win_rate_vs_n1"] <= 1.0 and math.isfinite(row["gold_score"])
    assert table[0]["win_rate_vs_n1"] == pytest.approx(0.5, abs=1e-12)  # n = 1 against one further draw
    assert record["metrics"]["best_of_n/4/kl"] == table[2]["kl"]
    assert record["optimized_metric"] == "best_of_n/4/gold_score"
    assert record["optimized_value"] == table[2]["gold_score"]
    assert (run_dir / "table.md").read_text().startswith("| n | reward | gold_score | win_rate_vs_n1 | kl |")
    # the chosen responses are SFT data as they are
    chosen = [json.loads(line) for line in (run_dir / "chosen.jsonl").read_text().splitlines()]
    assert len(chosen) == 8 and {row["n"] for row in chosen} == {2}
    assert set(chosen[0]) == {"prompt", "completion", "reward", "n"}
    examples, report = load_sft(str(run_dir / "chosen.jsonl"))
    assert report.format == "prompt_completion" and len(examples) + sum(report.dropped.values()) == 8
    assert (run_dir / "run.json").exists()


@pytest.mark.parametrize("override,message", [
    ("stage.n_max=0", "config stage.n_max: must be > 0, got 0"),
    ("stage.n=[1,8]", "config stage.n: every n must be in [1, n_max=4], got 8"),
    ("stage.select_n=5", "config stage.select_n: must be in [1, n_max=4] or null, got 5"),
    ("policy.init=/nonexistent/sft", "config policy.init: /nonexistent/sft is not a model directory"),
    ("reward.path=/nonexistent/rm", "config reward.path: /nonexistent/rm is not a lightrlhf export directory"),
])
def test_bad_input_is_one_line(exports, tmp_path, override, message):
    run_dir = tmp_path / "bon"
    result = train_cli(_exports_overrides(exports) + SMALL + [override, f"hydra.run.dir={run_dir}"])
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert lines[-1] == f"error: {message}", result.stderr[-3000:]
    assert not (run_dir / "run.json").exists()  # nothing claimed: the corrected command can run there


def test_resume_is_refused(exports, tmp_path):
    from conftest import SMALL_DEMO, run_in_process

    # the cheapest run that leaves a finished run directory (the CLI's runs are tested above): one draw
    # pair of one token for one prompt, in this process; the refusal below is the real CLI's
    run_dir = tmp_path / "bon"
    run_in_process(_exports_overrides(exports) + SMALL_DEMO + [
        "stage.n_max=1", "stage.n=[1]", "stage.num_prompts=1", "stage.batch_size=1",
        "stage.generation.max_new_tokens=1"], run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    again = train_cli([f"resume={run_dir}"])
    assert again.returncode == 2
    assert again.stderr.strip().splitlines()[-1].startswith("error: config resume: stage=best_of_n trains nothing")
