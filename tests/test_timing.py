"""StepTimer: the steady-state rate of PEERS.md, checked on hand-made stamps."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from lightrlhf.callbacks import timing
from lightrlhf.callbacks.timing import StepTimer, steady_rate
from lightrlhf.errors import ConfigValueError


def test_rate_drops_the_warmup_batches():
    # 6 batches; the first 3 are slow. Window: end of batch 3 (t=7) to end of batch 6 (t=10).
    ends = [3.0, 5.0, 7.0, 8.0, 9.0, 10.0]
    rates = steady_rate(ends, units_per_step=2048, warmup=3, start=0.0)
    assert rates.rate == pytest.approx(3 * 2048 / 3.0)
    assert rates.seconds_per_batch == pytest.approx(1.0)
    assert rates.rate_whole_loop == pytest.approx(6 * 2048 / 10.0)
    assert rates.batches == 6


def test_without_warmup_the_window_opens_at_the_loop_start():
    rates = steady_rate([2.0, 4.0], units_per_step=16, warmup=0, start=1.0)
    assert rates.rate == pytest.approx(2 * 16 / 3.0)


def test_too_few_batches_give_no_steady_rate():
    assert steady_rate([1.0, 2.0, 3.0], 16, warmup=3, start=0.0).rate is None
    assert steady_rate([], 16, warmup=3, start=0.0).rate_whole_loop is None


def test_callback_stamps_every_batch_and_writes_json(tmp_path, monkeypatch):
    clock = iter([10.0, 11.0, 13.0, 14.0, 14.5, 15.0])  # first batch start, then 5 batch ends
    monkeypatch.setattr(timing.time, "perf_counter", lambda: next(clock))
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    timer = StepTimer(str(tmp_path / "t.json"), units_per_step=16, unit="episodes/s", warmup=2)
    for step in range(1, 6):
        timer.on_train_batch_start(trainer, None, None, step - 1)  # only the first one is stamped
        trainer.global_step = 4 * step  # PPO: four optimizer steps per rollout
        timer.on_train_batch_end(trainer, None, None, None, step - 1)
    timer.on_train_end(trainer, None)
    out = json.loads((tmp_path / "t.json").read_text())
    # window: end of batch 2 (t=13) to end of batch 5 (t=15), 3 batches
    assert out["rate"] == pytest.approx(3 * 16 / 2.0)
    assert out["global_step"] == 20
    assert out["stamps"][0] == [4, 1.0] and out["stamps"][-1] == [20, 5.0]
    assert out["unit"] == "episodes/s" and out["batches"] == 5


def test_rejects_a_non_positive_unit():
    with pytest.raises(ConfigValueError):
        StepTimer("t.json", units_per_step=0, unit="tokens/s")


@pytest.mark.parametrize("name", ["sft", "rm", "ppo", "ppo1"])
def test_benchmark_overrides_compose_and_build_the_timer(name, tmp_path):
    """The `+callbacks.timer...` form (and every other bench override) goes through Hydra and
    the config builder as `train.py` would take it."""
    from conftest import compose

    from lightrlhf.bench.workload import configurations
    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    config = configurations(tmp_path / "assets", tmp_path / "rm", scale=0.1)[name]
    argv = config.argv(tmp_path / "run", tmp_path / "assets")
    overrides = [a for a in argv[2:] if not a.startswith("hydra.")]
    plain = to_plain(compose(overrides, tmp_path))
    timer = build(plain["callbacks"]["timer"], "callbacks.timer")
    assert isinstance(timer, StepTimer) and timer.units_per_step == config.units_per_step
    assert plain["callbacks"]["checkpoint"] is None and plain["export"]["enabled"] is False
    assert plain["model"]["lora"]["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
