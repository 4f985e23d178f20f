"""GRPO and RLOO: the stage on tiny parts built from real exports, its configs, a run, a killed and resumed run."""

from __future__ import annotations

import functools
import json
import signal

import pytest
import torch
from conftest import compose, run_in_process, scalar_curve, train_cli, train_with_fault
from safetensors.torch import load_file

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.models.actor_critic import PolicySpec, load_actor_critic
from lightrlhf.rewards.spec import Component, RewardSpec
from lightrlhf.training.alerts import AlertSpec, Tripwires

FAST_EVAL = ["stage.eval.num_prompts=16", "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1"]


def grpo_args(exports, stage, *extra):
    return [f"stage={stage}", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=4"] + FAST_EVAL + list(extra)


@pytest.fixture(scope="module")
def actor(exports, tiny_spec, tiny_tokenizer):
    torch.manual_seed(0)
    return load_actor_critic(tiny_spec, tiny_tokenizer, PolicySpec(str(exports / "sft" / "export")),
                             reward=RewardSpec(path=str(exports / "rm" / "export")), critic=False)


def _stage(model, stage="grpo", **kwargs):
    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    cfg = compose([f"stage={stage}", "data=demo_prompts", "paths.output_dir=/tmp", "stage.datamodule.batch_size=4",
                   "reward.path=unused"] + FAST_EVAL)
    plain = to_plain(cfg)
    node = {k: v for k, v in plain["stage"].items() if k not in ("model", "datamodule")}
    dm = build(plain["stage"]["datamodule"], "stage.datamodule", source=build(plain["data"], "data"),
               tokenizer=model.tokenizer)
    dm.setup()
    reward = kwargs.pop("reward", RewardSpec(path="unused"))
    group = {**node["group"], **kwargs.pop("group", {})}
    return build({**node, "group": group, **kwargs}, "stage", model=model, datamodule=dm, reward=reward)


def _first_batch(stage):
    batch = next(iter(stage.datamodule.train_dataloader()))
    return stage.rollout(batch["prompt_ids"], batch["prompt_text"])


class _Capture:
    """What Lightning's self.optimizers() returns, reduced to what the update uses; never steps."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        pass


def _no_lightning(stage, monkeypatch):
    optimizer = stage.configure_optimizers()["optimizer"]
    monkeypatch.setattr(stage, "optimizers", lambda: _Capture(optimizer))
    monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
    monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(stage, "clip_gradients", lambda *a, **k: None)
    return optimizer


@pytest.mark.parametrize("stage_name, baseline", [("grpo", "grpo"), ("rloo", "rloo")])
def test_yaml_composes_and_builds_a_critic_free_stage(exports, tmp_path, stage_name, baseline):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    stage, datamodule = build_stage(to_plain(compose(grpo_args(exports, stage_name), tmp_path)))
    assert type(stage).__name__ == "GRPOStage" and stage.stage_name == baseline
    assert stage.group.baseline == baseline and stage.group.scale_rewards == (baseline == "grpo")
    assert not stage.model.has_critic and stage.model.shares_reward_base
    names = stage.trainable_parameter_names()
    assert names and all(".policy." in n for n in names)  # no value adapter, no head, never the reward adapter


@pytest.mark.parametrize("override, message", [
    ("stage.group.group_size=1", "config stage.group.group_size: must be >= 2 (a group baseline compares the k "
                                 "responses to one prompt), got 1"),
    ("stage.group.loss_aggregation=sum", "config stage.group.loss_aggregation: expected one of 'token_mean', "
                                         "'seq_mean', 'dr_grpo', got str 'sum'"),
    ("stage.kl.kl_in=logits", "config stage.kl.kl_in: expected one of 'reward', 'loss', got str 'logits'"),
    ("stage.group.num_minibatches=3", "config stage.group.num_minibatches: must divide the rollout's rows "
                                      "(stage.datamodule.batch_size x group_size = 16), got 3"),
])
def test_bad_values_are_one_line_naming_the_key(exports, tmp_path, override, message):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    with pytest.raises(ConfigError) as raised:
        build_stage(to_plain(compose(grpo_args(exports, "grpo", override), tmp_path)))
    assert str(raised.value) == message


def test_rloo_refuses_std_scaling(exports, tmp_path):
    from lightrlhf.launch.parts import build_stage
    from lightrlhf.launch.run import to_plain

    with pytest.raises(ConfigError, match="config stage.group.scale_rewards: RLOO's leave-one-out baseline is never"):
        build_stage(to_plain(compose(grpo_args(exports, "rloo", "stage.group.scale_rewards=true"), tmp_path)))


@pytest.mark.parametrize("kl_in", ["reward", "loss"])
def test_step_zero_ratio_is_exactly_one_and_kl_exactly_zero(actor, monkeypatch, kl_in):
    """A fresh adapter is the reference: the rollout's log-probs equal the reference's, and the first update's
    recomputed log-probs (other rows in the forward, the batch's padding included) equal the rollout's."""
    stage = _stage(actor, kl={"coef": 0.1, "kl_in": kl_in}, group={"num_iterations": 1, "num_minibatches": 1})
    _no_lightning(stage, monkeypatch)
    batch = _first_batch(stage)
    roll = batch.rollout
    assert (roll.mask == 0).any()  # responses of different lengths: there is padding
    assert roll.rows == 4 * 4 and roll.group_index.tolist() == [i // 4 for i in range(16)]
    assert torch.equal(roll.logprobs * roll.mask, roll.ref_logprobs * roll.mask)
    assert batch.kl.abs().sum().item() == 0.0
    stats = stage.update(batch)
    assert stats["policy/ratio_mean"] == 1.0 and stats["policy/approxkl"] == 0.0 and stats["policy/clipfrac"] == 0.0
    assert stats["policy/kl_loss"] == 0.0 and stats["policy/optimizer_steps"] == 1.0


def test_the_reward_model_runs_each_prompt_once_and_scores_as_whole_rows_do(actor, monkeypatch):
    """k responses to one prompt: the shared-base reward adapter runs the prompt once (the same scores as
    k whole rows to float rounding); rows given without their grouping run whole."""
    from lightrlhf.models.reward import backbone_of

    stage = _stage(actor)
    roll = _first_batch(stage).rollout
    backbone = backbone_of(actor.module)
    seen = []
    original = type(backbone).forward

    @functools.wraps(original)  # keeps the signature the cache keyword is read from
    def counting(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].shape)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(backbone), "forward", counting)

    class WholeRows:  # the same rows, nothing said about their groups
        sequences, attention_mask = roll.sequences, roll.attention_mask
        prompts, raw_prompts, texts = roll.prompts, roll.raw_prompts, roll.texts

    score = actor.reward_model()
    with torch.no_grad():
        grouped_scores = score(roll)
        grouped_shapes, seen[:] = list(seen), []
        whole_scores = score(WholeRows())
    rows, width, responses = roll.rows, roll.prompt_width, roll.responses.shape[1]
    assert grouped_shapes == [(rows // 4, width), (rows, responses)]  # prompts once, then the responses
    assert seen == [(rows, width + responses)]
    torch.testing.assert_close(grouped_scores, whole_scores, atol=1e-5, rtol=1e-5)


def test_at_beta_zero_the_reference_runs_only_to_measure_the_kl(actor, monkeypatch):
    """kl.coef=0 with kl.measure=false runs no reference forward (trl's GRPO at beta 0): the same samples,
    loss and gradient as with the measurement, and no objective/kl logged rather than a KL of 0."""
    results = {}
    for measure in (True, False):
        stage = _stage(actor, kl={"coef": 0.0, "measure": measure}, group={"num_iterations": 1, "num_minibatches": 1})
        optimizer = _no_lightning(stage, monkeypatch)
        calls = []
        original = type(actor).reference_context
        monkeypatch.setattr(actor, "reference_context", lambda: calls.append(1) or original(actor))
        batch = _first_batch(stage)
        stats = stage.update(batch)
        metrics = stage.rollout_metrics(batch, stats)
        grads = [p.grad.clone() for g in optimizer.param_groups for p in g["params"]]
        results[measure] = (batch, stats, metrics, grads, len(calls))
    (measured, m_stats, m_metrics, m_grads, m_calls), (skipped, s_stats, s_metrics, s_grads, s_calls) = \
        results[True], results[False]
    assert m_calls >= 1 and s_calls == 0
    assert skipped.rollout.ref_logprobs is None and skipped.kl is None
    assert torch.equal(measured.rollout.responses, skipped.rollout.responses)
    assert torch.equal(measured.rewards, skipped.rewards) and torch.equal(measured.advantages, skipped.advantages)
    assert m_stats["policy/loss"] == s_stats["policy/loss"]
    for a, b in zip(m_grads, s_grads):
        assert torch.equal(a, b)
    assert m_metrics["objective/kl"] == 0.0 and "objective/kl" not in s_metrics
    assert s_metrics["objective/non_score_reward"] == 0.0
    tripwires = Tripwires(AlertSpec(), kl_target=4.0)
    tripwires.baseline = {"length_mean": 10.0, "score_mean": 0.0, "frac_ended_with_eos": 1.0}
    fired, _ = tripwires.check(s_metrics, rollout=1)
    assert fired["alerts/kl_exceeded"] == 0.0


@pytest.mark.parametrize("stage_name", ["grpo", "rloo"])
def test_one_pass_reuses_the_rollout_forward_with_the_same_gradient(actor, monkeypatch, stage_name):
    """num_iterations=1, one minibatch: the update backpropagates the rollout's policy forward instead of
    running it again; the same samples, loss and gradient as recomputing it (two micro-batches)."""
    grads, losses = [], []
    for micro, reused in ((None, True), (8, False)):
        stage = _stage(actor, stage_name, group={"num_iterations": 1, "num_minibatches": 1, "micro_batch_size": micro})
        optimizer = _no_lightning(stage, monkeypatch)
        assert stage.reuse_rollout_forward is reused
        batch = _first_batch(stage)
        assert (batch.rollout.logprobs_graph is not None) is reused
        stats = stage.update(batch)
        assert stats["policy/ratio_mean"] == 1.0 and stats["policy/optimizer_steps"] == 1.0
        losses.append(stats["policy/loss"])
        grads.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"]])
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-7)
    assert any(g.abs().sum() > 0 for g in grads[0])
    for fused, recomputed in zip(*grads):
        torch.testing.assert_close(fused, recomputed, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("stage_name", ["grpo", "rloo"])
def test_advantages_compare_the_responses_to_one_prompt(actor, stage_name):
    stage = _stage(actor, stage_name, group={"scale_rewards": False} if stage_name == "grpo" else {})
    batch = _first_batch(stage)
    groups = batch.rewards.view(-1, 4)
    assert torch.equal(batch.rewards, batch.shaped - 0.05 * batch.kl)  # kl_in=reward, beta 0.05 (here KL = 0)
    # r - mean(group) (Dr. GRPO) or r - mean(others) = 4/3 (r - mean(group)) (RLOO): zero-sum within each group
    scale = 1.0 if stage_name == "grpo" else 4 / 3
    torch.testing.assert_close(batch.advantages.view(-1, 4), scale * (groups - groups.mean(1, keepdim=True)))


def _three_values(prompts, completions):
    return [1.0, 2.0, 3.0]


def test_a_reward_function_returning_the_wrong_number_of_values_is_named(actor):
    reward = RewardSpec(path="unused", components={"bad": Component(_three_values)})
    stage = _stage(actor, reward=reward)
    with pytest.raises(UserError) as raised:
        _first_batch(stage)
    assert str(raised.value) == ("reward.components.bad (test_grpo._three_values): returned 3 values for 16 "
                                 "completions (one number per completion is required)")


def _nan_for_the_second(prompts, completions):
    return [0.0, float("nan")] + [0.0] * (len(completions) - 2)


def test_a_reward_function_returning_nan_is_named(actor):
    stage = _stage(actor, reward=RewardSpec(path="unused", components={"nan": Component(_nan_for_the_second)}))
    with pytest.raises(UserError, match=r"^reward.components.nan \(test_grpo._nan_for_the_second\): value 1 is nan "
                                        r"for completion '.*'$"):
        _first_batch(stage)


@pytest.mark.slow
def test_a_reward_function_breaking_its_contract_ends_the_run_with_one_line_and_exit_2(exports, tmp_path):
    """operator.concat(prompts, completions) is a plausible slip: a list, but of 2N strings."""
    echo = ("+reward.components.echo={_target_: lightrlhf.rewards.spec.Component, "
            "fn: {_target_: operator.concat, _partial_: true}}")
    done = train_cli(grpo_args(exports, "grpo", echo, f"hydra.run.dir={tmp_path / 'run'}"))
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["error: reward.components.echo (_operator.concat): returned 32 values for "
                                        "16 completions (one number per completion is required)"]


@pytest.mark.slow
@pytest.mark.parametrize("stage_name", ["grpo", "rloo"])
def test_a_short_run_logs_the_diagnostics_and_exports_the_policy(exports, tmp_path, stage_name):
    run_dir = tmp_path / stage_name
    run_in_process(grpo_args(exports, stage_name, "stage.rollouts=3", "trainer.val_check_interval=3",
                             "callbacks.checkpoint.every_n_steps=4"), run_dir)
    checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)
    assert all(".lora_A.policy." in k or ".lora_B.policy." in k for k in checkpoint["state_dict"])
    state = checkpoint["lightrlhf"]
    assert state["rollout_count"] == 3 and state["normalizer"]["count"] == 16  # 1 rollout batch: 4 prompts x 4
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["global_step"] == 3 * 2 * 2  # rollouts x num_iterations x num_minibatches
    metrics = record["metrics"]
    for key in ("eval/gold_score", "eval/gold_score_initial", "eval/win_rate_vs_sft", "eval/kl", "eval/length_mean"):
        assert key in metrics, key
    manifest = json.loads((run_dir / "export" / "lightrlhf.json").read_text())
    assert manifest["stage"] == stage_name and (run_dir / "export" / "adapter_model.safetensors").is_file()
    for tag in ("objective/kl", "objective/entropy", "reward/length_mean", "reward/frac_ended_with_eos",
                "group/reward_std", "policy/ratio_mean", "alerts/kl_exceeded"):
        assert len(scalar_curve(run_dir, tag)) == 3, tag


@pytest.mark.slow
def test_killed_after_a_checkpoint_and_resumed_equals_uninterrupted(exports, tmp_path):
    """GRPO (RLOO is the same stage with another baseline: the same state is checkpointed)."""
    args = grpo_args(exports, "grpo", "stage.rollouts=4", "trainer.val_check_interval=2",
                     "callbacks.checkpoint.every_n_steps=4", "stage.kl.kl_in=loss")
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
    for tag in ("objective/kl", "policy/loss", "policy/kl_loss", "reward/length_mean", "group/reward_std"):
        assert scalar_curve(killed, tag) == scalar_curve(straight, tag), tag


def test_the_pipeline_summary_reports_the_gold_gain_of_grpo_like_ppo():
    from lightrlhf.launch.pipeline import summarise, summary_table

    results = {"sft": {"stage": "sft", "metrics": {"eval/gold_score": 0.5, "eval/gold_score_std": 0.6}},
               "grpo": {"stage": "grpo", "metrics": {"eval/gold_score": 1.1, "eval/gold_score_initial": 0.5,
                                                     "eval/gold_score_std_initial": 0.6, "eval/kl": 2.0}}}
    summary = summarise(results)
    # (1.1 - 0.5) / 0.6 = 1.0 standard deviations of the SFT policy
    assert summary["gold_score"]["grpo_gain_in_sft_std"] == pytest.approx(1.0)
    assert summary["steps"]["grpo"]["metrics"] == {"eval/kl": 2.0}
    assert any(line.startswith("  GRPO vs its SFT start") and "+1.00 standard deviations" in line
               for line in summary_table(summary))
