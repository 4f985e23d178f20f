"""trainer=ddp on 2 CPU processes (gloo): one run directory, one set of checkpoints, one TensorBoard run.

Lightning starts the second rank by re-running the command line; alone and inside a -m sweep, that
must join the same run, not start another one (Hydra issue #2070, lightning-hydra-template #393).
"""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import ROOT, SMALL_DEMO, scalar_curve, train_cli, train_with_fault
from safetensors.torch import load_file

pytestmark = pytest.mark.slow
QUICK = ["trainer=ddp", "trainer.max_steps=6", "trainer.val_check_interval=6", "callbacks.checkpoint.every_n_steps=3",
         "stage.datamodule.batch_size=8", *SMALL_DEMO]


@pytest.fixture(autouse=True)
def free_rendezvous_port(monkeypatch):
    """Each DDP run gets its own free port: tests on parallel workers must not meet at Lightning's default."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MASTER_PORT", str(port))


def _outputs_snapshot():
    """Run directories under the default locations (outputs/<date>/<time>, outputs/multirun/...)."""
    outputs = ROOT / "outputs"
    if not outputs.exists():
        return set()
    return {p for top in outputs.iterdir() if top.is_dir() and top.name not in ("bench", ".cache")
            for p in top.rglob("*") if p.is_dir()}


def _one_run(run_dir):
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000003.ckpt", "step-00000006.ckpt"]
    # one TensorBoard run, written by rank 0 alone (event file names carry the writing process id)
    writers = {p.name.split(".")[4] for p in (run_dir / "tb").glob("events.out.tfevents.*")}
    assert len(writers) == 1
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert (run_dir / "export" / "lightrlhf.json").is_file()
    assert not [p for p in run_dir.iterdir() if p.is_dir() and p.name not in ("checkpoints", "tb", "export", ".hydra")]


@pytest.mark.parametrize("stage", [["stage=sft", "stage.eval.num_prompts=16"],
                                   ["stage=rm", "data=demo_pref"]])
def test_ddp_on_two_cpu_processes(tmp_path, stage):
    before = _outputs_snapshot()
    run_dir = tmp_path / "run"
    done = train_cli(stage + QUICK + [f"hydra.run.dir={run_dir}"], timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _one_run(run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["global_step"] == 6
    assert _outputs_snapshot() == before  # the second rank made no run directory of its own


def test_ddp_inside_a_multirun_sweep(tmp_path):
    before = _outputs_snapshot()
    sweep = tmp_path / "sweep"
    done = train_cli(["-m", "stage=sft", "stage.optim.lr=1e-3,2e-3", "stage.eval.num_prompts=16",
                      f"hydra.sweep.dir={sweep}"] + QUICK, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
    for job in ("0", "1"):
        _one_run(sweep / job)
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert [r["status"] for r in summary["runs"]] == ["completed", "completed"]
    assert _outputs_snapshot() == before


# -- PPO and GRPO on two processes: each rank rolls out its own prompts ---------------------------------
def free_port() -> str:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def online_args(exports, stage: str, prompts_per_rank: int, *extra: str) -> list[str]:
    # held-out: 2 batches of 8 prompts, so that each of two ranks evaluates one
    return [f"stage={stage}", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", f"stage.datamodule.batch_size={prompts_per_rank}",
            "stage.eval.num_prompts=16", "stage.eval.batch_size=8", *extra]


# 6 rollouts of 16 prompts in all (8 per rank), 8 optimizer steps each (4 epochs x 2 minibatches)
PPO = ["stage.rollouts=6", "trainer.val_check_interval=48", "callbacks.checkpoint.every_n_steps=24"]


def test_ppo_on_two_processes_follows_the_one_process_run_and_resumes_after_sigkill(exports, tmp_path):
    """One test, so that the runs it compares are made once, on one worker: the one-process run with 16
    prompts per rollout, the run on two ranks of 8 each, and that run again, killed and resumed."""
    one, two, killed = tmp_path / "one", tmp_path / "two", tmp_path / "killed"
    done = train_cli(online_args(exports, "ppo", 16, *PPO, f"hydra.run.dir={one}"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    done = train_cli(online_args(exports, "ppo", 8, *PPO, "trainer=ddp", f"hydra.run.dir={two}"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _one_run_of_ppo(two)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (one, two))
    assert a["global_step"] == b["global_step"] == 48 and b["metrics"]["progress/episodes"] == 96
    # the held-out evaluation splits the same batches with the same seeds: the one-process figures, exactly
    initial = [k for k in a["metrics"] if k.endswith("_initial")]
    assert initial and {k: a["metrics"][k] for k in initial} == {k: b["metrics"][k] for k in initial}
    # training samples differ (each rank draws its own prompts and tokens), so the curves agree within
    # sampling noise: rollout by rollout the difference is centred on zero
    for tag, slack in (("objective/scores", 0.5), ("objective/kl", 0.3)):
        ca, cb = scalar_curve(one, tag), scalar_curve(two, tag)
        assert [s for s, _ in ca] == [s for s, _ in cb] and len(ca) == 6, tag
        diffs = torch.tensor([vb - va for (_, va), (_, vb) in zip(ca, cb)])
        spread = torch.tensor([v for _, v in ca + cb]).std()
        assert diffs.mean().abs() <= 3 * diffs.std() / len(diffs) ** 0.5 + slack * spread, (tag, ca, cb)
    # both learned: the held-out reward rose in each
    for m in (a["metrics"], b["metrics"]):
        assert m["eval/reward"] > m["eval/reward_initial"]

    # killed with SIGKILL right after its first checkpoint (rollout 3 of 6), resumed: the uninterrupted run
    done = train_with_fault("kill_after_checkpoint:1", online_args(exports, "ppo", 8, *PPO, "trainer=ddp",
                                                                  f"hydra.run.dir={killed}"), timeout=900)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    _wait_for_ranks_to_end(killed)
    resumed = train_cli([f"resume={killed}"], timeout=900, env={"MASTER_PORT": free_port()})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _one_run_of_ppo(killed)
    wa = load_file(two / "export" / "adapter_model.safetensors")
    wb = load_file(killed / "export" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ma, mb = (json.loads((d / "metrics.json").read_text())["metrics"] for d in (two, killed))
    assert {k: v for k, v in ma.items() if not k.startswith("time/")} == \
           {k: v for k, v in mb.items() if not k.startswith("time/")}
    for tag in ("objective/scores", "objective/kl", "policy/loss", "val/loss"):
        assert scalar_curve(killed, tag) == scalar_curve(two, tag), tag


def test_grpo_on_two_processes(exports, tmp_path):
    run_dir = tmp_path / "grpo"
    done = train_cli(online_args(exports, "grpo", 2, "stage.rollouts=1", "trainer.val_check_interval=1",
                                 "trainer=ddp", f"hydra.run.dir={run_dir}"), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["status"] == "completed" and record["metrics"]["progress/rollouts"] == 1
    # 2 prompts x 4 answers on each of 2 ranks
    assert record["metrics"]["progress/episodes"] == 16
    assert len(scalar_curve(run_dir, "group/reward_std")) == 1


def _one_run_of_ppo(run_dir):
    writers = {p.name.split(".")[4] for p in (run_dir / "tb").glob("events.out.tfevents.*")}
    assert len(writers) <= 2  # rank 0 alone writes; a resumed run adds its own writer
    assert json.loads((run_dir / "metrics.json").read_text())["status"] == "completed"
    assert (run_dir / "export" / "adapter_model.safetensors").is_file()


def _wait_for_ranks_to_end(run_dir, timeout: float = 60.0):
    """The killed rank 0's other rank fails at its next collective (its peer is gone); wait for it to exit
    before the run is resumed, as a person would see it end."""
    import os
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        alive = []
        for proc in Path("/proc").iterdir():
            try:
                if proc.name.isdigit() and str(run_dir) in (proc / "cmdline").read_bytes().decode(errors="replace"):
                    alive.append(proc.name)
            except OSError:
                continue
        if not alive or alive == [str(os.getpid())]:
            return
        time.sleep(0.5)
    raise AssertionError(f"the other rank of {run_dir} did not end")
