"""trainer=ddp on 2 CPU processes (gloo): one run directory, one set of checkpoints, one TensorBoard run.

Lightning starts the second rank by re-running the command line; alone and inside a -m sweep, that
must join the same run, not start another one (Hydra issue #2070, lightning-hydra-template #393).
"""

from __future__ import annotations

import json

import pytest
from conftest import ROOT, SMALL_DEMO, train_cli

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
