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


@pytest.mark.parametrize("name", ["sft", "rm", "ppo", "ppo1", "dpo", "grpo", "rloo"])
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


@pytest.mark.parametrize("name", ["sft", "rm", "ppo", "dpo", "grpo"])
def test_benchmark_data_is_trained_as_the_peers_read_it(name, tmp_path):
    """No cleaning step may touch the PEERS.md files: the default whitespace step strips the prompts'
    leading space, which shortens every 128-token sequence (the workload check then refuses to run)."""
    from lightrlhf.data.clean import CleaningSpec, normalize_text

    clean = _bench_config(name, tmp_path)["data"]["clean"]
    spec = CleaningSpec(**{k: v for k, v in clean.items() if k != "_target_"})
    assert not spec.drop_duplicates
    for text in (" bopu pozo zifuru.", "a  b\r\n", "ｆｕｌｌ\u200b"):
        assert normalize_text(text, spec) == text


def _bench_config(name: str, tmp_path) -> dict:
    from conftest import compose

    from lightrlhf.bench.workload import configurations
    from lightrlhf.launch.run import to_plain

    config = configurations(tmp_path / "assets", tmp_path / "rm", scale=0.2)[name]
    argv = config.argv(tmp_path / "run", tmp_path / "assets")
    return to_plain(compose([a for a in argv[2:] if not a.startswith("hydra.")], tmp_path))


def test_benchmark_dpo_is_trl_dpo_settings(tmp_path):
    """trl_dpo.py: 16 pairs a step, sigmoid, beta 0.1, the reference recomputed with the adapter off
    every step (no precompute), lr 2e-4 constant, 100 steps (20 at scale 0.2)."""
    cfg = _bench_config("dpo", tmp_path)
    stage = cfg["stage"]
    assert stage["_target_"] == "lightrlhf.stages.dpo.DPOStage"
    assert (stage["loss_type"], stage["beta"], stage["label_smoothing"]) == ("sigmoid", 0.1, 0.0)
    assert stage["reference"]["precompute"] is False
    assert stage["datamodule"]["batch_size"] == 16 and stage["datamodule"]["_target_"].endswith("PreferenceDataModule")
    assert stage["optim"]["lr"] == 2e-4 and stage["scheduler"]["name"] == "constant"
    assert stage["scheduler"]["warmup_steps"] == 0 and stage["max_grad_norm"] == 1.0
    assert stage["eval"]["at_start"] is False and cfg["trainer"]["max_steps"] == 20
    assert cfg["data"]["path"].endswith("pref.jsonl") and cfg["callbacks"]["timer"]["units_per_step"] == 16


@pytest.mark.parametrize("name, baseline, scale, beta", [("grpo", "grpo", True, 0.0), ("rloo", "rloo", False, 0.05)])
def test_benchmark_grpo_rloo_are_trl_settings(name, baseline, scale, beta, tmp_path):
    """trl_rloo.py / trl_grpo.py: 4 prompts x k=4, exactly 64 new tokens, the RM's raw score, one
    optimizer step per rollout (num_iterations 1, one minibatch), token-mean loss, lr 1e-5 constant;
    GRPO beta 0 with std scaling, RLOO beta 0.05 as sequence-level k1 in the reward."""
    cfg = _bench_config(name, tmp_path)
    stage, group, reward = cfg["stage"], cfg["stage"]["group"], cfg["reward"]
    assert stage["_target_"] == "lightrlhf.stages.grpo.GRPOStage"
    assert (group["baseline"], group["scale_rewards"], group["group_size"]) == (baseline, scale, 4)
    assert (group["num_iterations"], group["num_minibatches"], group["micro_batch_size"]) == (1, 1, None)
    assert group["clip_range"] == 0.2 and group["loss_aggregation"] == "token_mean"
    assert stage["kl"]["coef"] == beta and stage["kl"]["kl_in"] == "reward"
    assert stage["kl"]["measure"] is (beta > 0)  # trl runs no reference at beta 0
    assert stage["generation"]["merge_adapter"] is True
    assert stage["datamodule"]["batch_size"] * group["group_size"] == 16
    gen = stage["generation"]
    assert (gen["max_new_tokens"], gen["ignore_eos"], gen["temperature"], gen["top_k"], gen["top_p"]) == \
        (64, True, 1.0, 0, 1.0)
    assert reward["path"] == str(tmp_path / "rm") and reward["normalize"]["enabled"] is False
    assert reward["clip"] is None and reward["missing_eos_penalty"] == 0.0
    assert stage["optim"]["lr"] == 1e-5 and stage["scheduler"]["name"] == "constant"
    assert stage["max_grad_norm"] == 1.0 and stage["rollouts"] == 12 and stage["eval"]["at_start"] is False
    assert cfg["policy"]["init"] is None and cfg["data"]["path"].endswith("prompts.jsonl")
    assert cfg["callbacks"]["timer"]["units_per_step"] == 16 and cfg["callbacks"]["timer"]["unit"] == "episodes/s"


def test_report_scales_the_new_rows_by_the_floor_and_checks_the_targets(tmp_path):
    """ours / floor here x floor / trl there, for DPO, GRPO and RLOO too, against the issue's targets."""
    from lightrlhf.bench.report import PUBLISHED, Summary, markdown
    from lightrlhf.bench.workload import configurations

    configs = configurations(tmp_path / "assets", tmp_path / "rm")
    # the floor at half its published rate: every scaled ratio is twice the plain one
    rates = {"floor": PUBLISHED["floor"].rate / 2, "dpo": 10.3, "grpo": 7.56, "rloo": 8.0}
    summaries = {name: Summary(configs[name], rate, rate, rate, configs[name].units_per_step / rate, 900.0, 60.0, 3, 0,
                               2, {"rollout_s": 0.5, "update_s": 0.3} if name in ("grpo", "rloo") else {})
                 for name, rate in rates.items()}
    text = markdown(summaries, 3, "now", {"torch": "x", "threads": "2", "cpu": "cpu", "commit": "abc"})
    assert "lightrlhf DPO 1.51x; lightrlhf GRPO (k=4) 1.20x; lightrlhf RLOO (k=4) 1.57x." in text
    assert ("- Targets (the scaled ratio above): lightrlhf DPO 1.51x vs 1.5x: met; lightrlhf GRPO (k=4) 1.20x vs 1.3x: "
            "**missed**; lightrlhf RLOO (k=4) 1.57x vs 1.3x: met.") in text
    assert "| *trl GRPO, k=4 (1.16.0): PEERS.md, 2026-11-24, not re-measured here* | 60 rollouts | 12.6 episodes/s" in text
    assert "lightrlhf RLOO (k=4), as the stage logs it (`time/rollout_s`, `time/update_s`): 0.50 s rollout" in text
