"""`make bench-peers`: trl beside lightrlhf in one interleaved run -- the order of the runs, the
per-round ratios, the side-by-side table, the peers' environments. Nothing here runs a benchmark or
needs the peers' environments."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lightrlhf.bench import peers
from lightrlhf.bench.__main__ import chosen_names, main, round_order
from lightrlhf.bench.compare import pairs, per_round_ratios, side_by_side
from lightrlhf.bench.report import markdown, summarise
from lightrlhf.bench.workload import configurations

ENVIRONMENT = {"torch": "x", "threads": "2", "cpu": "cpu", "commit": "abc"}


@pytest.fixture
def peer_bench(tmp_path, monkeypatch):
    """A stand-in peer-bench directory and an empty place for the environments."""
    bench = tmp_path / "peer-bench"
    bench.mkdir()
    (bench / "make_assets.py").write_text("")
    (bench / "requirements.txt").write_text("torch==2.13.0\n")
    monkeypatch.setenv("PEER_BENCH", str(bench))
    monkeypatch.setattr(peers, "ENV_ROOT", tmp_path / "envs")
    return bench


# -- the order of the runs -------------------------------------------------------------------------
def test_peers_join_the_chosen_configurations():
    assert chosen_names(["sft", "floor", "ppo"], peers=False) == ["sft", "floor", "ppo"]
    assert chosen_names(["sft", "floor", "ppo"], peers=True) == ["sft", "floor", "ppo", "trl_sft", "trl_ppo"]
    assert chosen_names(["sft", "trl_sft"], peers=True) == ["sft", "trl_sft"]


def test_each_trl_run_is_next_to_ours_and_the_pair_order_alternates():
    chosen = chosen_names(["sft", "floor", "rm", "ppo", "ppo1"], peers=True)
    assert round_order(chosen, 1) == ["trl_sft", "sft", "floor", "trl_reward", "rm", "trl_ppo", "ppo",
                                      "trl_ppo1", "ppo1"]
    assert round_order(chosen, 2) == ["sft", "trl_sft", "floor", "rm", "trl_reward", "ppo", "trl_ppo",
                                      "ppo1", "trl_ppo1"]
    assert round_order(chosen, 3) == round_order(chosen, 1)


def test_a_configuration_without_its_partner_runs_alone():
    assert round_order(["trl_dpo", "grpo"], 1) == ["trl_dpo", "grpo"]
    assert round_order(["sft", "floor", "rm"], 2) == ["sft", "floor", "rm"]  # `make bench`: as before


# -- ratios from neighbouring runs -----------------------------------------------------------------
def record(name: str, round_no: int, rate: float, contaminated: bool = False, ok: bool = True,
           rss: float = 900.0) -> dict:
    return {"config": name, "round": round_no, "ok": ok, "contaminated": contaminated, "max_rss_mb": rss,
            "wall_s": 60.0, "result": {"rate": rate, "torch_threads": 2} if ok else None}


def test_ratio_is_taken_within_each_round():
    ours = [record("sft", 1, 6000.0), record("sft", 2, 6600.0), record("sft", 3, 5000.0, contaminated=True),
            record("sft", 3, 5500.0)]
    trl = [record("trl_sft", 1, 4000.0), record("trl_sft", 2, 6000.0), record("trl_sft", 3, 5000.0)]
    # round 3: the contaminated run is left out, the clean rerun of that round counts
    assert per_round_ratios(ours, trl) == pytest.approx([1.5, 1.1, 1.1])


def test_rounds_missing_on_one_side_are_skipped_and_flagged_runs_count_only_when_kept():
    ours = [record("dpo", 1, 12.0), record("dpo", 2, 10.0, contaminated=True), record("dpo", 3, 9.0)]
    trl = [record("trl_dpo", 1, 8.0), record("trl_dpo", 2, 10.0), record("trl_dpo", 3, 0.0, ok=False)]
    assert per_round_ratios(ours, trl) == pytest.approx([1.5])
    assert per_round_ratios(ours, trl, keep_contaminated=True) == pytest.approx([1.5, 1.0])


def _run(tmp_path) -> tuple[dict, dict]:
    """A 3-round run of sft, floor and trl_sft, and ppo/trl_ppo, with hand-picked rates. Per round,
    sft / trl_sft = 1.25, 1.5, 1.2 (median 1.25) while the ratio of the medians is 6000 / 4400 = 1.36."""
    ours = configurations(tmp_path / "assets", tmp_path / "rm")
    configs = {**ours, **peers.peer_configurations(ours)}
    records = {
        "trl_sft": [record("trl_sft", 1, 4000.0, rss=1000.0), record("trl_sft", 2, 4400.0, rss=1000.0),
                    record("trl_sft", 3, 5000.0, rss=1000.0)],
        "sft": [record("sft", 1, 5000.0, rss=800.0), record("sft", 2, 6600.0, rss=800.0),
                record("sft", 3, 6000.0, rss=800.0)],
        "floor": [record("floor", 1, 6250.0), record("floor", 2, 6600.0), record("floor", 3, 7500.0)],
        "trl_ppo": [record("trl_ppo", 1, 4.0, rss=1250.0)],
        "ppo": [record("ppo", 1, 4.4, rss=500.0)],
    }
    summaries = {name: summarise(configs[name], rs) for name, rs in records.items()}
    return summaries, records


def test_side_by_side_table_has_both_medians_the_per_round_ratio_and_rss(tmp_path):
    summaries, records = _run(tmp_path)
    matched = pairs(summaries, records)
    assert [(p.stage, p.peer.config.name) for p in matched] == [("sft", "trl_sft"), ("ppo", "trl_ppo")]
    text = side_by_side(matched, records)
    assert ("| lightrlhf SFT vs trl SFT (1.16.0) | tokens/s | 6,000 [5,000–6,600] | 4,400 [4,000–5,000] | "
            "**1.25x** [1.20–1.50] | 3 | 800 MB | 1,000 MB | 0.80x | 2 / 2 |") in text
    assert ("| lightrlhf PPO, 4 PPO epochs vs trl PPO, 4 PPO epochs (1.12.0) | episodes/s | 4.40 [4.40–4.40] | "
            "4.00 [4.00–4.00] | **1.10x** | 1 | 500 MB | 1,250 MB | 0.40x | 2 / 2 |") in text
    # per round: sft / floor = 0.8, 1.0, 0.8; trl_sft / floor = 0.64, 0.67, 0.67
    assert ("- SFT vs the bare-PyTorch floor, within each round (median [min–max]): lightrlhf SFT **0.80x** "
            "[0.80–1.00]; trl SFT **0.67x** [0.64–0.67].") in text
    assert "Nothing here is compared with another run." in text


def test_an_interleaved_report_leaves_out_the_figures_of_another_run(tmp_path):
    summaries, records = _run(tmp_path)
    text = markdown(summaries, 3, "now", ENVIRONMENT)
    assert "every ratio in this report compares runs of this run only" in text
    assert "PEERS.md, 2026-11-24" not in text and "Cross-session" not in text and "Machine drift" not in text
    assert "| trl SFT (1.16.0) | 150 | **4,400 tokens/s** [4,000–5,000]" in text
    assert "- trl SFT (1.16.0): 73.5 GFLOP/s" in text  # MFU of the trl run measured here
    beside = side_by_side(pairs(summaries, records), records)
    text = markdown(summaries, 3, "now", ENVIRONMENT, beside)
    assert text.index("| lightrlhf SFT | 150 |") < text.index("## lightrlhf vs trl") < text.index("## Ratios")
    ours_only = markdown({k: v for k, v in summaries.items() if not k.startswith("trl_")}, 3, "now", ENVIRONMENT)
    assert "PEERS.md, 2026-11-24, not re-measured here" in ours_only and "this run only" not in ours_only
    pair_only = markdown({k: summaries[k] for k in ("sft", "trl_sft")}, 3, "now", ENVIRONMENT)
    assert "## Ratios" not in pair_only  # no floor, no PEERS.md figures: nothing under that heading


# -- the peers' configurations and environments ----------------------------------------------------
def test_peer_configurations_run_the_peer_scripts_with_their_environment_and_our_budgets(tmp_path, peer_bench):
    ours = configurations(tmp_path / "assets", tmp_path / "rm", scale=0.2)
    theirs = peers.peer_configurations(ours)
    assert set(theirs) == {"trl_sft", "trl_reward", "trl_ppo", "trl_ppo1", "trl_dpo", "trl_grpo", "trl_rloo"}
    ppo1 = theirs["trl_ppo1"]
    assert (ppo1.steps, ppo1.unit, ppo1.units_per_step) == (ours["ppo1"].steps, "episodes/s", 16)
    assert ppo1.argv(tmp_path / "run", tmp_path / "assets") == [
        str(tmp_path / "envs" / "trl-1.12" / "bin" / "python"), str(peer_bench.resolve() / "trl_ppo.py"),
        "--assets", str(tmp_path / "assets"), "--out", str(tmp_path / "run" / "out"), "--steps", "5",
        "--ppo-epochs", "1"]
    assert theirs["trl_ppo"].argv(tmp_path, tmp_path)[-2:] == ["--ppo-epochs", "4"]
    sft = theirs["trl_sft"]
    assert sft.python == str(tmp_path / "envs" / "trl-1.16" / "bin" / "python") and sft.steps == 30
    assert sft.title == "trl SFT (1.16.0)" and sft.secondary == ours["sft"].secondary


def test_setup_commands_install_the_cpu_torch_before_the_pins(tmp_path, peer_bench):
    env = peers.ENVS["trl-1.12"]
    python = str(env.python)
    pip = [python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    assert peers.setup_commands(env, Path("/pb/requirements.txt"), python="/usr/bin/python3.11") == [
        ["/usr/bin/python3.11", "-m", "venv", str(tmp_path / "envs" / "trl-1.12")],
        [*pip, "--upgrade", "pip"],
        [*pip, "torch==2.13.0"],
        [*pip, "-r", "/pb/requirements.txt", "trl==1.12.0"]]


def test_setup_installs_once_then_does_nothing_until_a_pin_changes(tmp_path, peer_bench, monkeypatch):
    calls = []

    def fake_call(argv):
        calls.append(argv)
        if argv[1:3] == ["-m", "venv"]:
            python = Path(argv[3]) / "bin" / "python"
            python.parent.mkdir(parents=True, exist_ok=True)
            python.write_text("")
        return 0

    monkeypatch.setattr(peers.subprocess, "call", fake_call)
    monkeypatch.setattr(peers, "check_env", lambda env: None)
    peers.setup(["trl-1.16"])
    assert [c[-1] for c in calls] == [str(tmp_path / "envs" / "trl-1.16"), "pip", "torch==2.13.0", "trl==1.16.0"]
    peers.setup(["trl-1.16"])
    assert len(calls) == 4  # the stamp matches: nothing to do
    (peer_bench / "requirements.txt").write_text("torch==2.13.0\ntransformers==5.23.0\n")
    peers.setup(["trl-1.16"])
    assert len(calls) == 8


def test_a_failed_install_is_one_line(tmp_path, peer_bench, monkeypatch):
    monkeypatch.setattr(peers.subprocess, "call", lambda argv: 1)
    assert peers.main(["setup", "--only", "trl-1.12"]) == 2


def _fake_python(env_dir: Path, script: str) -> None:
    python = env_dir / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text("#!/bin/sh\n" + script)
    python.chmod(0o755)


def test_running_peers_without_their_environment_is_one_line_exit_2(tmp_path, peer_bench, capsys):
    assert main(["--only", "sft", "--peers"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert err[0].startswith(f"error: the trl 1.16.0 peers need the environment {tmp_path / 'envs' / 'trl-1.16'}, "
                             "which is missing: run `python -m lightrlhf.bench.peers setup`")


@pytest.mark.parametrize("script, says", [
    ("echo \"ModuleNotFoundError: No module named 'trl'\" >&2; exit 1",
     "is broken (ModuleNotFoundError: No module named 'trl')"),
    ("echo 1.15.0", "has trl 1.15.0, the peers need 1.16.0"),
])
def test_a_broken_peer_environment_is_one_line_exit_2(tmp_path, peer_bench, capsys, script, says):
    _fake_python(tmp_path / "envs" / "trl-1.16", script)
    assert main(["--only", "trl_sft"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{tmp_path / 'envs' / 'trl-1.16'} {says}: run `python -m" in err[0]


def test_the_command_line_exits_2_without_a_traceback(tmp_path, peer_bench):
    env = {**os.environ, "PEER_ENVS": str(tmp_path / "envs")}
    done = subprocess.run([sys.executable, "-m", "lightrlhf.bench", "--only", "trl_ppo"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: the trl 1.12.0 peers need the environment {tmp_path / 'envs' / 'trl-1.12'}, which is missing: "
        f"run `python -m lightrlhf.bench.peers setup` (or `make bench-peers`), or delete "
        f"{tmp_path / 'envs' / 'trl-1.12'} to rebuild it"]


def test_a_smoke_run_counts_flagged_runs_only_when_told_and_says_so(tmp_path):
    config = configurations(tmp_path / "assets", tmp_path / "rm")["sft"]
    runs = [record("sft", 1, 5000.0, contaminated=True)]
    assert summarise(config, runs) is None
    kept = summarise(config, runs, keep_contaminated=True)
    assert (kept.rate, kept.clean, kept.kept) == (5000.0, 1, 1)
    text = markdown({"sft": kept}, 1, "now", ENVIRONMENT, caveats=("Smoke run: these figures mean nothing.",))
    assert "| 0 + 1 contaminated, kept |" in text
    assert text.index("**Smoke run: these figures mean nothing.**") < text.index("| configuration |")
