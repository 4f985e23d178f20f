"""`python -m lightrlhf.bench --since REV`: an earlier commit's configurations beside today's, in one
interleaved run. Nothing here runs a benchmark: the old checkout is a stand-in module tree."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from lightrlhf.bench import since
from lightrlhf.bench.__main__ import chosen_names, main, round_order
from lightrlhf.bench.compare import against_earlier
from lightrlhf.bench.report import summarise
from lightrlhf.bench.workload import ROOT, BenchError, Config, base_name, configurations

SHA = "c076402a9a25c816facee18d38ee406f0e64548d"


def test_each_configuration_runs_beside_its_earlier_self_in_alternating_order():
    chosen = chosen_names(["sft", "floor", "ppo"], peers=True, since=SHA)
    assert chosen == ["sft", "floor", "ppo", "trl_sft", "trl_ppo", "sft@c076402", "ppo@c076402"]  # no floor@
    assert round_order(chosen, 1) == ["trl_sft", "sft@c076402", "sft", "floor", "trl_ppo", "ppo@c076402", "ppo"]
    assert round_order(chosen, 2) == ["sft", "sft@c076402", "trl_sft", "floor", "ppo", "ppo@c076402", "trl_ppo"]
    assert base_name("ppo1@c076402") == "ppo1" and base_name("ppo1") == "ppo1"


def test_an_earlier_commits_run_uses_its_own_train_py_and_sources(tmp_path):
    config = Config("ppo@c076402", "t", "episodes/s", 16, 5, overrides=("stage=ppo",), checkout=str(tmp_path))
    argv = config.argv(tmp_path / "run", tmp_path)
    assert argv[:4] == ["env", f"PYTHONPATH={tmp_path / 'src'}", sys.executable, str(tmp_path / "train.py")]
    assert argv[4] == "stage=ppo" and f"hydra.run.dir={tmp_path / 'run' / 'run'}" in argv
    today = Config("ppo", "t", "episodes/s", 16, 5, overrides=("stage=ppo",)).argv(tmp_path / "run", tmp_path)
    assert today[:2] == [sys.executable, str(ROOT / "train.py")] and today[2:] == argv[4:]


def test_a_revision_that_is_no_commit_is_one_line(capsys):
    with pytest.raises(BenchError, match="not a commit"):
        since.resolve("no-such-revision-anywhere")
    assert main(["--since", "no-such-revision-anywhere", "--only", "ppo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --since no-such-revision-anywhere")


def test_a_commit_resolves_to_its_full_sha():
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    if not head:
        pytest.skip("not a git checkout")
    assert since.resolve("HEAD") == head


def _stand_in_checkout(tmp_path, configs: str):
    """A checkout whose lightrlhf.bench.workload is a stand-in: it must be the one imported."""
    package = tmp_path / "src" / "lightrlhf" / "bench"
    package.mkdir(parents=True)
    (tmp_path / "src" / "lightrlhf" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "workload.py").write_text(textwrap.dedent(f"""
        from dataclasses import dataclass, field
        ASSETS = "assets"
        def ensure_assets(assets): pass
        def ensure_reward_export(assets): return "reward"
        @dataclass
        class Config:
            name: str; title: str; unit: str; units_per_step: float; steps: int
            step_word: str = "steps"; secondary: dict = field(default_factory=dict); overrides: tuple = ()
        def configurations(assets, reward, scale):
            return {configs}
        """))
    return tmp_path


def test_the_old_configurations_come_from_the_old_code(tmp_path):
    path = _stand_in_checkout(tmp_path, '{"ppo": Config("ppo", "old PPO", "episodes/s", 16, round(25 * scale), '
                                        '"rollouts", {"generated tok/s": 1024}, ("stage=ppo", "reward.path=" + reward))}')
    configs = since.old_configurations(path, SHA, ["ppo"], 0.2)
    old = configs["ppo@c076402"]
    assert old.title == "old PPO at c076402" and old.steps == 5 and old.step_word == "rollouts"
    assert old.overrides == ("stage=ppo", "reward.path=reward") and old.checkout == str(path)
    assert old.secondary == {"generated tok/s": 1024}


def test_a_configuration_the_old_code_lacks_is_one_line(tmp_path):
    path = _stand_in_checkout(tmp_path, "{}")
    with pytest.raises(BenchError, match="grpo did not exist at that commit"):
        since.old_configurations(path, SHA, ["grpo"], 1.0)


def test_old_code_that_fails_is_one_line_with_its_last_words(tmp_path):
    path = _stand_in_checkout(tmp_path, "{}")
    (path / "src" / "lightrlhf" / "bench" / "workload.py").write_text("raise ImportError('gone')\n")
    with pytest.raises(BenchError, match="could not be read: ImportError: gone"):
        since.old_configurations(path, SHA, ["ppo"], 1.0)


def _run(name: str, round_no: int, rate: float, rollout_s: float) -> dict:
    return {"config": name, "round": round_no, "ok": True, "contaminated": False, "max_rss_mb": 900.0,
            "wall_s": 60.0, "result": {"rate": rate, "torch_threads": 2, "rollout_s": rollout_s}}


def test_the_report_gives_ratios_within_rounds_and_the_rollouts_own_rate(tmp_path):
    ours = configurations(tmp_path, tmp_path / "reward")["ppo1"]
    then = Config("ppo1@c076402", "PPO then", ours.unit, ours.units_per_step, ours.steps,
                  secondary=dict(ours.secondary), checkout=str(tmp_path))
    records = {"ppo1": [_run("ppo1", 1, 12.0, 0.5), _run("ppo1", 2, 10.0, 0.6)],
               "ppo1@c076402": [_run("ppo1@c076402", 1, 6.0, 1.5), _run("ppo1@c076402", 2, 4.0, 1.5)]}
    summaries = {n: summarise(c, records[n]) for n, c in (("ppo1", ours), ("ppo1@c076402", then))}
    text = against_earlier(SHA, summaries, records)
    row = next(line for line in text.splitlines() if line.startswith(f"| {ours.title} |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # rates: 12/6 and 10/4 within rounds -> median 2.25 [2.00-2.50]
    assert cells[4] == "**2.25x** [2.00–2.50]"
    # rollout: 1,024 generated tokens per rollout; medians 0.55 s now and 1.5 s then; ratio 3.0 and 2.5
    assert cells[5] == f"{1024 / 0.55:,.0f}" and cells[6] == f"{1024 / 1.5:,.0f}"
    assert cells[7] == "**2.75x** [2.50–3.00]" and cells[8] == "2"
