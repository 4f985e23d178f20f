"""Reward-weighted fine-tuning (RAFT, ReST, RWR, REINFORCE, naive): the stage on tiny parts built from real
exports, what each method trains on, its bad settings, a run of each, a killed and resumed run."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from conftest import compose, run_in_process, scalar_curve, train_cli, train_with_fault
from safetensors.torch import load_file

from lightrlhf.errors import ConfigError
from lightrlhf.models.actor_critic import PolicySpec, load_actor_critic
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl.reward_weighted import leave_one_out_advantages, naive_sign_rewards, rwr_weights

METHODS = ("raft", "rest", "rwr", "reinforce", "naive")
FAST_EVAL = ["stage.eval.num_prompts=16", "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1"]


def rw_args(exports, *extra):
    return ["stage=reward_weighted", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=4"] + FAST_EVAL + list(extra)


@pytest.fixture(scope="module")
def actor(exports, tiny_spec, tiny_tokenizer):
    torch.manual_seed(0)
    return load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(str(exports / "sft" / "export")),
                             reward=RewardSpec(path=str(exports / "rm" / "export")), critic=False)


def _stage(model, method, **blocks):
    """The stage as conf/stage/reward_weighted.yaml builds it (4 prompts x k = 4), blocks overridden."""
    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    cfg = compose(["stage=reward_weighted", "data=demo_prompts", "paths.output_dir=/tmp", "reward.path=unused",
                   "stage.datamodule.batch_size=4", f"stage.method={method}"] + FAST_EVAL)
    plain = to_plain(cfg)
    node = {k: v for k, v in plain["stage"].items() if k not in ("model", "datamodule")}
    for name, values in blocks.items():
        node[name] = {**node[name], **values} if isinstance(values, dict) else values
    dm = build(plain["stage"]["datamodule"], "stage.datamodule", source=build(plain["data"], "data"),
               tokenizer=model.tokenizer)
    dm.setup()
    return build(node, "stage", model=model, datamodule=dm, reward=RewardSpec(path="unused"))


class _Optimizer:
    """What Lightning's self.optimizers() returns, reduced to what the update uses; steps for real."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()


def _no_lightning(stage, monkeypatch):
    optimizer = stage.configure_optimizers()["optimizer"]
    monkeypatch.setattr(stage, "optimizers", lambda: _Optimizer(optimizer))
    monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
    monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(stage, "clip_gradients", lambda *a, **k: None)
    stage.tripwires.baseline = {"score_mean": 0.0, "score_std": 1.0, "length_mean": 10.0, "frac_ended_with_eos": 1.0}
    return optimizer


def _first_batch(stage):
    batch = next(iter(stage.datamodule.train_dataloader()))
    return stage.rollout(batch["prompt_ids"], batch["prompt_text"])


def _intercept(stage, monkeypatch):
    """Record every minibatch the update trains on: (weight set name, row indices, their weights)."""
    seen = []
    original = stage.minibatch_loss

    def recording(batch, idx, weight_set):
        seen.append((weight_set.name, idx.tolist(), weight_set.weights[idx].tolist()))
        return original(batch, idx, weight_set)

    monkeypatch.setattr(stage, "minibatch_loss", recording)
    return seen


def _policy_weights(stage):
    return {n: p.detach().clone() for n, p in stage.named_trainable()}


def test_raft_trains_only_on_the_best_sample_of_each_prompt(actor, monkeypatch):
    stage = _stage(actor, "raft", update={"epochs": 2, "minibatch_size": 3})
    _no_lightning(stage, monkeypatch)
    seen = _intercept(stage, monkeypatch)
    batch = _first_batch(stage)
    rewards = batch.rewards.view(4, 4)
    best_rows = {p * 4 + int(rewards[p].argmax()) for p in range(4)}
    stats = stage.update(batch)
    # 4 kept rows (one per prompt), 2 epochs of minibatches of 3: [3, 1] per epoch
    assert [len(idx) for _, idx, _ in seen] == [3, 1, 3, 1] and stats["policy/optimizer_steps"] == 4.0
    for epoch in (seen[:2], seen[2:]):
        rows = [r for _, idx, _ in epoch for r in idx]
        assert sorted(rows) == sorted(best_rows)  # each best once per epoch, nothing else
    assert all(w == 1.0 for _, _, weights in seen for w in weights)
    # each trained row holds the highest shaped reward of its prompt
    for row in best_rows:
        assert batch.rewards[row] == rewards[row // 4].max()
    assert stage.rollout_metrics(batch, stats)["weights/kept_fraction"] == 0.25


def test_raft_with_a_quantile_drops_the_bests_below_it(actor, monkeypatch):
    stage = _stage(actor, "raft", raft={"quantile": 0.75})
    _no_lightning(stage, monkeypatch)
    batch = _first_batch(stage)
    kept = batch.weight_sets[0].weights.view(4, 4)
    threshold = torch.quantile(batch.rewards.double(), 0.75).float()
    for p in range(4):
        best = batch.rewards.view(4, 4)[p].max()
        assert kept[p].sum().item() == (1.0 if best >= threshold else 0.0)


def test_rest_improve_steps_train_on_samples_above_rising_quantiles(actor, monkeypatch):
    stage = _stage(actor, "rest", update={"epochs": 1, "minibatch_size": 64})
    _no_lightning(stage, monkeypatch)
    seen = _intercept(stage, monkeypatch)
    batch = _first_batch(stage)
    rewards = batch.rewards.double()
    expected = [torch.quantile(rewards, q).float().item() for q in (0.5, 0.7, 0.9)]
    assert batch.thresholds == pytest.approx(expected)
    stats = stage.update(batch)
    names = [name for name, _, _ in seen]
    assert names == ["improve_1", "improve_2", "improve_3"]  # one minibatch each, in order
    kept = []
    for (_, idx, _), threshold in zip(seen, batch.thresholds):
        assert sorted(idx) == [i for i in range(16) if batch.rewards[i] >= threshold]
        kept.append(len(idx))
    assert kept[0] >= kept[1] >= kept[2] >= 1
    metrics = stage.rollout_metrics(batch, stats)
    assert metrics["weights/kept_fraction_improve_1"] == kept[0] / 16
    assert metrics["weights/threshold_3"] == pytest.approx(expected[2])


def test_rwr_weighs_every_sample_by_its_softmax_weight(actor, monkeypatch):
    stage = _stage(actor, "rwr", rwr={"temperature": 0.5, "normalization": "prompt"})
    _no_lightning(stage, monkeypatch)
    seen = _intercept(stage, monkeypatch)
    batch = _first_batch(stage)
    expected = rwr_weights(batch.rewards.view(4, 4), 0.5, "prompt").flatten()
    torch.testing.assert_close(batch.weight_sets[0].weights, expected)
    stats = stage.update(batch)
    assert sorted(r for _, idx, _ in seen[:1] for r in idx) == list(range(16))  # every row, minibatch of 16
    metrics = stage.rollout_metrics(batch, stats)
    ess = expected.sum() ** 2 / (expected ** 2).sum()
    assert metrics["weights/ess"] == pytest.approx(ess.item(), rel=1e-5)
    assert 0 < metrics["weights/ess_fraction"] <= 1


def test_reinforce_weights_are_leave_one_out_advantages_with_the_kl_term(actor, monkeypatch):
    stage = _stage(actor, "reinforce")
    _no_lightning(stage, monkeypatch)
    batch = _first_batch(stage)
    expected = leave_one_out_advantages(batch.rewards.view(4, 4)).flatten()
    torch.testing.assert_close(batch.weight_sets[0].weights, expected)
    assert batch.weight_sets[0].weights.view(4, 4).sum(1).abs().max() < 1e-5  # zero-sum per prompt
    stats = stage.update(batch)
    # the first minibatch's policy is the reference: KL term exactly 0 on the first step (k3 at ratio 1)
    assert "policy/kl_loss" in stats and "policy/nll_negatives" in stats and "policy/nll_positives" in stats


def test_naive_rewards_are_signs_of_the_raw_score_against_the_sft_mean(actor, monkeypatch):
    stage = _stage(actor, "naive")
    _no_lightning(stage, monkeypatch)
    stage.tripwires.baseline["score_mean"] = 0.25
    batch = _first_batch(stage)
    assert batch.thresholds == [0.25]
    torch.testing.assert_close(batch.weight_sets[0].weights, naive_sign_rewards(batch.scores, 0.25))
    fixed = _stage(actor, "naive", naive={"threshold": -100.0})
    _no_lightning(fixed, monkeypatch)
    assert (_first_batch(fixed).weight_sets[0].weights == 1.0).all()  # every score beats -100


@pytest.mark.parametrize("method", METHODS)
def test_every_method_moves_the_policy(actor, monkeypatch, method):
    stage = _stage(actor, method)
    _no_lightning(stage, monkeypatch)
    before = _policy_weights(stage)
    stats = stage.update(_first_batch(stage))
    assert stats["policy/optimizer_steps"] >= 1
    after = _policy_weights(stage)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    # put the shared actor back: the next test starts from the SFT policy again
    with torch.no_grad():
        for n, p in stage.named_trainable():
            p.copy_(before[n])


@pytest.mark.parametrize("override, message", [
    ("stage.method=ppo", "config stage.method: expected one of 'raft', 'rest', 'rwr', 'reinforce', 'naive', "
                         "got str 'ppo'"),
    ("stage.rwr.temperature=0", "config stage.rwr.temperature: must be > 0, got 0.0"),
    ("stage.rwr.normalization=group", "config stage.rwr.normalization: expected one of 'batch', 'prompt', "
                                      "got str 'group'"),
    ("stage.rest.quantiles=[0.9,0.5]", "config stage.rest.quantiles: must not decrease (each Improve step filters "
                                       "harder), got [0.9, 0.5]"),
    ("stage.raft.quantile=1.5", "config stage.raft.quantile: must be in [0.0, 1.0], got 1.5"),
    ("stage.update.epochs=0", "config stage.update.epochs: must be > 0, got 0"),
])
def test_bad_values_are_one_line_naming_the_key(exports, tmp_path, override, message):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    with pytest.raises(ConfigError) as raised:
        build_stage(to_plain(compose(rw_args(exports, override), tmp_path)))
    assert str(raised.value) == message


def test_reinforce_needs_two_samples_per_prompt(exports, tmp_path):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    with pytest.raises(ConfigError) as raised:
        build_stage(to_plain(compose(rw_args(exports, "stage.method=reinforce", "stage.update.group_size=1"),
                                     tmp_path)))
    assert str(raised.value) == ("config stage.update.group_size: must be >= 2 for method=reinforce (the baseline "
                                 "is the mean of the other k-1 responses to the prompt), got 1")


@pytest.mark.slow
def test_a_bad_method_on_the_command_line_is_one_line_and_exit_2(exports, tmp_path):
    done = train_cli(rw_args(exports, "stage.method=loss_times_reward", f"hydra.run.dir={tmp_path / 'run'}"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["error: config stage.method: expected one of 'raft', 'rest', 'rwr', "
                                        "'reinforce', 'naive', got str 'loss_times_reward'"]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_a_short_run_of_each_method_logs_its_diagnostics_and_exports_a_moved_policy(exports, tmp_path, method):
    run_dir = tmp_path / method
    run_in_process(rw_args(exports, f"stage.method={method}", "stage.rollouts=2", "trainer.val_check_interval=2"),
                   run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    metrics = record["metrics"]
    for key in ("eval/gold_score", "eval/gold_score_initial", "eval/kl", "eval/win_rate_vs_sft"):
        assert key in metrics, key
    assert metrics["progress/rollouts"] == 2.0
    manifest = json.loads((run_dir / "export" / "lightrlhf.json").read_text())
    assert manifest["stage"] == "reward_weighted"
    adapter = load_file(run_dir / "export" / "adapter_model.safetensors")
    # a fresh LoRA adapter has B = 0: a B that is not all zero is a policy that moved from SFT
    assert any(v.abs().sum() > 0 for k, v in adapter.items() if "lora_B" in k)
    tags = {"raft": "weights/kept_fraction", "rest": "weights/kept_fraction_improve_3", "rwr": "weights/ess",
            "reinforce": "policy/kl_loss", "naive": "policy/nll_negatives"}
    for tag in ("objective/kl", "objective/nll", "reward/score_std", "policy/loss", tags[method]):
        assert len(scalar_curve(run_dir, tag)) == 2, tag


@pytest.mark.slow
def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(exports, tmp_path):
    """ReST: the most optimizer steps per iteration, over weight sets that depend on the sampler's state."""
    args = rw_args(exports, "stage.method=rest", "stage.rollouts=4", "trainer.val_check_interval=2",
                   "callbacks.checkpoint.every_n_steps=6")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert train_cli(args + [f"hydra.run.dir={straight}"]).returncode == 0
    done = train_with_fault("kill_after_checkpoint:2", args + [f"hydra.run.dir={killed}"])
    assert done.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    resumed = train_cli([f"resume={killed}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(straight / "export" / "adapter_model.safetensors")
    b = load_file(killed / "export" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ma = json.loads((straight / "metrics.json").read_text())["metrics"]
    mb = json.loads((killed / "metrics.json").read_text())["metrics"]
    timing = {k for k in ma if k.startswith("time/")}
    assert {k: v for k, v in ma.items() if k not in timing} == {k: v for k, v in mb.items() if k not in timing}
    for tag in ("objective/kl", "policy/loss", "weights/threshold_1", "weights/kept_fraction_improve_2"):
        assert scalar_curve(killed, tag) == scalar_curve(straight, tag), tag
