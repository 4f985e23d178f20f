"""PPO: the invariants RLHF silently depends on, checked on tiny parts built from real exports."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import run_in_process, scalar_curve, train_cli
from safetensors.torch import load_file

from lightrlhf.errors import UserError
from lightrlhf.models.actor_critic import PolicySpec, ValueSpec, load_actor_critic
from lightrlhf.rewards.functions import length_words
from lightrlhf.rewards.spec import Component, NormalizeSpec, RewardSpec

FAST_EVAL = ["stage.eval.num_prompts=16", "stage.eval.batch_size=16", "reward.normalize.init_rollouts=1"]


def ppo_args(exports, *extra):
    return ["stage=ppo", "data=demo_prompts", f"policy.init={exports / 'sft' / 'export'}",
            f"reward.path={exports / 'rm' / 'export'}", "stage.datamodule.batch_size=8"] + FAST_EVAL + list(extra)


@pytest.fixture(scope="module")
def actor_critic(exports, tiny_spec):
    torch.manual_seed(0)
    return load_actor_critic(tiny_spec, _tokenizer(tiny_spec), PolicySpec(str(exports / "sft" / "export")),
                             value=ValueSpec("auto"), reward=RewardSpec(path=str(exports / "rm" / "export")), critic=True)


def _tokenizer(spec):
    from lightrlhf.models.loading import load_tokenizer

    return load_tokenizer(spec)


def _stage(model, **kwargs):
    from conftest import CONF
    from hydra import compose, initialize_config_dir

    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=["stage=ppo", "data=demo_prompts", "paths.output_dir=/tmp",
                                          "stage.datamodule.batch_size=8", "reward.path=unused"] + FAST_EVAL)
    plain = to_plain(cfg)
    node = {k: v for k, v in plain["stage"].items() if k not in ("model", "datamodule")}
    source = build(plain["data"], "data")
    dm = build(plain["stage"]["datamodule"], "stage.datamodule", source=source, tokenizer=model.tokenizer)
    dm.setup()
    reward = kwargs.pop("reward", RewardSpec(path="unused"))
    return build({**node, **kwargs}, "stage", model=model, datamodule=dm, reward=reward)


def test_shared_base_roles_and_kl_is_exactly_zero_at_step_0(actor_critic, exports):
    model = actor_critic
    assert model.shares_reward_base and model.separate_reward is None
    names = set(model.trainable_parameter_names())
    assert names and all(".policy." in n or ".value." in n or n.startswith("value_head.") for n in names)
    assert not any(".reward." in n for n in names)
    stage = _stage(model)
    batch = next(iter(stage.datamodule.train_dataloader()))
    ppo_batch = stage.rollout(batch["prompt_ids"], batch["prompt_text"])
    roll = ppo_batch.rollout
    assert torch.equal(roll.logprobs * roll.mask, roll.ref_logprobs * roll.mask)  # a fresh adapter is the identity
    assert ppo_batch.kl.abs().sum().item() == 0.0
    # the value function starts from the reward model: same adapter weights, same head
    rm_head = load_file(exports / "rm" / "export" / "score_head.safetensors")
    assert torch.equal(model.value_head.linear.weight, rm_head["linear.weight"])


def test_python_reward_function_composes_with_the_reward_model(actor_critic):
    reward = RewardSpec(path="unused", weight=0.5, components={"length_words": Component(length_words, weight=-0.1)})
    stage = _stage(actor_critic, reward=reward)
    batch = next(iter(stage.datamodule.train_dataloader()))
    roll = stage.rollout(batch["prompt_ids"], batch["prompt_text"])
    assert set(roll.components) == {"reward_model", "length_words"}
    expected_words = torch.tensor([float(len(t.split())) for t in roll.rollout.texts])
    assert torch.equal(roll.components["length_words"], expected_words)
    torch.testing.assert_close(roll.scores, 0.5 * roll.components["reward_model"] - 0.1 * expected_words)


def test_one_optimizer_step_per_minibatch_and_gradients_are_clipped(actor_critic, monkeypatch):
    stage = _stage(actor_critic, ppo={"epochs": 3, "num_minibatches": 4, "micro_batch_size": 1}, max_grad_norm=1e-3)
    optimizer = stage.configure_optimizers()["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norms_at_step = []

    class Wrapped:  # what Lightning's self.optimizers() returns, reduced to what the update uses
        def __init__(self, opt):
            self.optimizer = opt

        def zero_grad(self):
            self.optimizer.zero_grad()

        def step(self):
            norms_at_step.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])).item())
            self.optimizer.step()

    monkeypatch.setattr(stage, "optimizers", lambda: Wrapped(optimizer))
    monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
    monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(stage, "clip_gradients", lambda opt, gradient_clip_val, gradient_clip_algorithm:
                        torch.nn.utils.clip_grad_norm_(params, gradient_clip_val))
    batch = next(iter(stage.datamodule.train_dataloader()))
    roll = stage.rollout(batch["prompt_ids"], batch["prompt_text"])
    stats = stage.update(roll)
    assert len(norms_at_step) == 3 * 4 == stats["policy/optimizer_steps"]  # epochs x minibatches, micro-batches inside
    assert stats["policy/grad_norm"] > 1e-3  # the raw gradient was larger ...
    assert max(norms_at_step) <= 1e-3 * 1.0001  # ... and every step saw it clipped


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batches_give_exactly_the_minibatch_gradient(actor_critic, monkeypatch, aggregation):
    """Each micro-batch is normalised by the whole minibatch's count, so accumulating micro-batches of 1 or 2
    rows gives the gradient of one pass over the minibatch (weighting by row share gave a per-sequence mean)."""
    gradients = {}
    for micro in (None, 1, 2):
        stage = _stage(actor_critic, ppo={"epochs": 1, "num_minibatches": 1, "micro_batch_size": micro,
                                          "loss_aggregation": aggregation, "entropy_coef": 0.01}, max_grad_norm=None)
        optimizer = stage.configure_optimizers()["optimizer"]
        named = [(n, p) for g in optimizer.param_groups for n, p in zip(range(len(g["params"])), g["params"])]

        class Capture:  # records the gradient the step would apply, and does not step: the model stays as it is
            def __init__(self, opt):
                self.optimizer = opt

            def zero_grad(self):
                self.optimizer.zero_grad()

            def step(self):
                gradients[micro] = [p.grad.clone() for _, p in named if p.grad is not None]

        monkeypatch.setattr(stage, "optimizers", lambda opt=optimizer: Capture(opt))
        monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
        monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
        batch = next(iter(stage.datamodule.train_dataloader()))
        stage.update(stage.rollout(batch["prompt_ids"], batch["prompt_text"]))
        optimizer.zero_grad()
    assert len(gradients[None]) == len(gradients[1]) > 0
    for micro in (1, 2):
        for whole, accumulated in zip(gradients[None], gradients[micro]):
            torch.testing.assert_close(accumulated, whole, rtol=1e-4, atol=1e-7)


def test_the_first_minibatch_backpropagates_the_rollouts_own_forwards(actor_critic, monkeypatch):
    """One minibatch of the whole rollout: the rollout runs the policy and value forwards with gradient
    and the first epoch backpropagates them instead of running them again -- the same losses and
    gradients, epoch after epoch, as recomputing them."""
    runs = {}
    for reused in (True, False):
        stage = _stage(actor_critic, ppo={"epochs": 2, "num_minibatches": 1, "entropy_coef": 0.01},
                       max_grad_norm=None)
        assert stage.reuse_rollout_forward  # one minibatch, one micro-batch, no checkpointing
        stage.reuse_rollout_forward = reused
        optimizer = stage.configure_optimizers()["optimizer"]
        steps = []

        class Capture:  # records each step's gradient and does not step: both runs see the same weights
            def __init__(self, opt):
                self.optimizer = opt

            def zero_grad(self):
                self.optimizer.zero_grad()

            def step(self):
                steps.append([p.grad.clone() for g in optimizer.param_groups for p in g["params"] if p.grad is not None])

        monkeypatch.setattr(stage, "optimizers", lambda opt=optimizer: Capture(opt))
        monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
        monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
        batch = next(iter(stage.datamodule.train_dataloader()))
        ppo_batch = stage.rollout(batch["prompt_ids"], batch["prompt_text"])
        roll = ppo_batch.rollout
        graphs = (roll.logprobs_graph, roll.values_graph, roll.entropy_graph)
        assert all((g is not None) is reused for g in graphs)
        if reused:
            assert torch.equal(roll.logprobs_graph.detach(), roll.logprobs) and roll.values_graph.requires_grad
        stats = stage.update(ppo_batch)
        assert stats["policy/optimizer_steps"] == 2.0
        runs[reused] = (roll.logprobs, roll.values, stats, steps)
        optimizer.zero_grad()
    (logprobs, values, stats, steps), (logprobs_0, values_0, stats_0, steps_0) = runs[True], runs[False]
    assert torch.equal(logprobs, logprobs_0) and torch.equal(values, values_0)  # the same rollout
    for key in ("policy/loss", "val/loss", "policy/entropy", "policy/ratio_mean"):
        assert stats[key] == pytest.approx(stats_0[key], rel=1e-6, abs=1e-9), key
    assert len(steps) == len(steps_0) == 2 and len(steps[0]) == len(steps_0[0]) > 0
    for fused, recomputed in zip(steps, steps_0):
        for a, b in zip(fused, recomputed):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_the_rollouts_forwards_are_not_reused_where_they_are_not_the_updates(actor_critic):
    for ppo in ({"num_minibatches": 2}, {"micro_batch_size": 4}, {"forward_batch_size": 4}):
        assert not _stage(actor_critic, ppo=ppo).reuse_rollout_forward, ppo
    # activation checkpointing recomputes in the backward with whichever adapter is active by then
    body = next(m for m in actor_critic.module.modules() if hasattr(m, "gradient_checkpointing"))
    body.gradient_checkpointing = True
    try:
        assert not _stage(actor_critic).reuse_rollout_forward
    finally:
        body.gradient_checkpointing = False


def test_early_stop_on_approx_kl_skips_the_remaining_updates(actor_critic, monkeypatch):
    stage = _stage(actor_critic, ppo={"epochs": 4, "num_minibatches": 2, "max_approx_kl": 1e-12},
                   optim={"lr": 0.05})
    optimizer = stage.configure_optimizers()["optimizer"]

    class Wrapped:
        optimizer_ = optimizer

        def __init__(self):
            self.optimizer = optimizer

        def zero_grad(self):
            optimizer.zero_grad()

        def step(self):
            optimizer.step()

    monkeypatch.setattr(stage, "optimizers", lambda: Wrapped())
    monkeypatch.setattr(stage, "lr_schedulers", lambda: None)
    monkeypatch.setattr(stage, "manual_backward", lambda loss: loss.backward())
    monkeypatch.setattr(stage, "clip_gradients", lambda *a, **k: None)
    batch = next(iter(stage.datamodule.train_dataloader()))
    stats = stage.update(stage.rollout(batch["prompt_ids"], batch["prompt_text"]))
    # the first minibatch sees ratio 1 (approx-KL 0) and steps; the second sees the moved policy, exceeds
    # max_approx_kl and stops the update *without* taking its own step
    assert stats["policy/optimizer_steps"] == 1.0 and stats["policy/early_stopped"] == 1.0


def test_value_init_reward_needs_a_shared_base(exports, tiny_spec):
    with pytest.raises(UserError, match="value.init: 'reward' needs a reward model on the policy's base"):
        load_actor_critic(tiny_spec, _tokenizer(tiny_spec), PolicySpec(str(exports / "sft" / "export")),
                          value=ValueSpec("reward"), reward=RewardSpec(path=str(exports / "rm_raw_base" / "export")),
                          critic=True)


def test_reward_model_on_another_base_is_loaded_separately(exports, tiny_spec):
    model = load_actor_critic(tiny_spec, _tokenizer(tiny_spec), PolicySpec(str(exports / "sft" / "export")),
                              value=ValueSpec("auto"), reward=RewardSpec(path=str(exports / "rm_raw_base" / "export")),
                              critic=True)
    assert not model.shares_reward_base and model.separate_reward is not None
    assert model.value_head.linear.weight.abs().sum().item() == 0.0  # fresh value head
    stage = _stage(model)
    batch = next(iter(stage.datamodule.train_dataloader()))
    roll = stage.rollout(batch["prompt_ids"], batch["prompt_text"])
    expected = model.separate_reward.score(batch["prompt_text"], roll.rollout.texts)
    torch.testing.assert_close(roll.components["reward_model"], expected)


def test_an_sft_export_given_as_the_reward_model_is_refused(exports, tiny_spec):
    with pytest.raises(UserError, match=r"reward.path: .* is a causal_lm export \(from stage 'sft'\), not a reward model"):
        load_actor_critic(tiny_spec, _tokenizer(tiny_spec), PolicySpec(None), value=ValueSpec("auto"),
                          reward=RewardSpec(path=str(exports / "sft" / "export")), critic=True)


def test_tripwires():
    from lightrlhf.training.alerts import AlertSpec, Tripwires

    tripwires = Tripwires(AlertSpec(length_drift=0.5, eos_collapse=0.5, kl_multiple=2.0), kl_target=4.0)
    tripwires.baseline = {"score_mean": 0.0, "score_std": 1.0, "length_mean": 10.0, "frac_ended_with_eos": 0.9}
    calm = {"reward/length_mean": 12.0, "objective/scores": 0.5, "reward/frac_ended_with_eos": 0.9, "objective/kl": 1.0}
    assert tripwires.check(calm, 1) == ({"alerts/length_drift": 0.0, "alerts/eos_collapse": 0.0,
                                         "alerts/kl_exceeded": 0.0}, False)
    hacked = {"reward/length_mean": 16.0, "objective/scores": 1.5, "reward/frac_ended_with_eos": 0.3, "objective/kl": 13.0}
    assert tripwires.check(hacked, 2) == ({"alerts/length_drift": 1.0, "alerts/eos_collapse": 1.0,
                                           "alerts/kl_exceeded": 1.0}, False)
    # longer but *not* rewarded more is not length hacking
    assert tripwires.check({**hacked, "objective/scores": -0.1}, 3)[0]["alerts/length_drift"] == 0.0
    assert tripwires.fired == {"length_drift": 1, "eos_collapse": 2, "kl_exceeded": 2}


def test_a_reward_component_given_by_target_in_the_config_is_built_and_weighted(tmp_path):
    from conftest import compose

    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    component = ("+reward.components.brevity={_target_: lightrlhf.rewards.spec.Component, weight: -0.05, "
                 "fn: {_target_: lightrlhf.rewards.functions.length_words, _partial_: true}}")
    cfg = compose(["stage=ppo", "data=demo_prompts", "reward.path=some/rm", component], tmp_path)
    spec = build(to_plain(cfg)["reward"], "reward")
    brevity = spec.components["brevity"]
    assert brevity.weight == -0.05 and brevity.fn(["explain river rain :"], ["the river .", "a b c d"]) == [3.0, 4.0]


def test_alerts_stop_switch_asks_the_run_to_stop():
    from lightrlhf.training.alerts import AlertSpec, Tripwires

    tripwires = Tripwires(AlertSpec(kl_multiple=2.0, stop=True), kl_target=4.0)
    tripwires.baseline = {"score_mean": 0.0, "score_std": 1.0, "length_mean": 10.0, "frac_ended_with_eos": 0.9}
    calm = {"reward/length_mean": 10.0, "objective/scores": 0.5, "reward/frac_ended_with_eos": 0.9, "objective/kl": 1.0}
    assert tripwires.check(calm, 1)[1] is False
    assert tripwires.check({**calm, "objective/kl": 9.0}, 2)[1] is True  # 9 > 2 x kl.target (4)
    assert Tripwires(AlertSpec(stop=False), 4.0).check({**calm, "objective/kl": 9.0}, 2)[1] is False


def test_shaped_score_is_normalised_clipped_then_penalised_for_missing_eos():
    """shaped = clip((score - mean) / std, -clip, clip) - penalty * [no EOS], the statistics being the SFT
    policy's scores (here set by hand: mean 2, std 2). The penalty comes after the clip, so a response far
    above the clip still pays it (the fourth and sixth rows: with the penalty first they kept 1.5)."""
    from lightrlhf.rewards.scorer import Scorer

    scorer = Scorer(RewardSpec(path=None, components={"x": Component(length_words)}, clip=1.5, missing_eos_penalty=1.0))
    scorer.calibrate(torch.tensor([0.0, 4.0]))  # mean 2, population std 2
    scores = torch.tensor([2.0, 4.0, 4.0, 10.0, -6.0, 10.0, -6.0])
    ended = torch.tensor([True, True, False, True, True, False, False])
    torch.testing.assert_close(scorer.shape(scores, ended), torch.tensor([0.0, 1.0, 0.0, 1.5, -1.5, 0.5, -2.5]),
                               atol=1e-6, rtol=0)
    raw = Scorer(RewardSpec(path=None, components={"x": Component(length_words)}, clip=None, missing_eos_penalty=0.5,
                            normalize=NormalizeSpec(enabled=False)))
    torch.testing.assert_close(raw.shape(scores, ended), torch.tensor([2.0, 4.0, 3.5, 10.0, -6.0, 9.5, -6.5]))


@pytest.mark.slow
def test_ppo_run_checkpoint_holds_adapters_and_stage_state_not_the_base(exports, tmp_path):
    run_dir = tmp_path / "ppo"
    run_in_process(ppo_args(exports, "stage.rollouts=3", "stage.kl.adaptive=true", "trainer.val_check_interval=3",
                            "callbacks.checkpoint.every_n_steps=8"), run_dir)
    checkpoint = torch.load(sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)
    keys = list(checkpoint["state_dict"])
    assert keys and all(".lora_A.policy." in k or ".lora_B.policy." in k or ".lora_A.value." in k
                        or ".lora_B.value." in k or k.startswith("model.value_head.") for k in keys)
    state = checkpoint["lightrlhf"]
    assert state["rollout_count"] == 3 and state["kl_controller"]["value"] != 0.05  # adaptive beta moved
    assert state["normalizer"]["count"] > 0 and torch.is_tensor(state["sampler"])
    assert set(state["baseline"]) == {"score_mean", "score_std", "length_mean", "frac_ended_with_eos"}
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["global_step"] == 3 * 4 * 2 and record["metrics"]["progress/rollouts"] == 3.0
    manifest = json.loads((run_dir / "export" / "lightrlhf.json").read_text())
    assert manifest["stage"] == "ppo" and (run_dir / "export" / "adapter_model.safetensors").is_file()
    # objective/kl_coef is the beta that rollout's rewards were built with (logged before the controller
    # moves it): 0.05 at the first rollout, then Ziegler et al.'s update from the previous rollout's KL
    beta, kl = [v for _, v in scalar_curve(run_dir, "objective/kl_coef")], [v for _, v in scalar_curve(run_dir, "objective/kl")]
    assert len(beta) == 3 and beta[0] == pytest.approx(0.05, rel=1e-7)
    for i in range(2):
        expected = beta[i] * (1 + min(max(kl[i] / 4.0 - 1, -0.2), 0.2) * 8 / 10000)
        assert beta[i + 1] == pytest.approx(expected, rel=1e-6) and beta[i + 1] != beta[i]
    assert state["kl_controller"]["value"] == pytest.approx(beta[2] * (1 + min(max(kl[2] / 4.0 - 1, -0.2), 0.2) * 8 / 10000),
                                                            rel=1e-6)


@pytest.mark.slow
def test_minibatches_must_divide_the_rollout_batch(exports, tmp_path):
    done = train_cli(ppo_args(exports, "stage.ppo.num_minibatches=3", f"hydra.run.dir={tmp_path / 'run'}"))
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: config stage.ppo.num_minibatches: must divide the rollout batch "
                                        "(stage.datamodule.batch_size=8), got 3"]


def test_dropout_stays_off_even_when_lightning_switches_to_train_mode(actor_critic):
    """LoRA dropout on (p=0.5 in every adapter here), yet `.train()` -- what Lightning calls before each
    training epoch -- leaves every module in eval mode: the first PPO epoch's ratio is exactly 1 and
    values are reproducible."""
    originals = {}
    for name, module in actor_critic.named_modules():
        if hasattr(module, "lora_dropout"):
            for adapter in module.lora_dropout:
                originals[(name, adapter)] = (module, module.lora_dropout[adapter])
                module.lora_dropout[adapter] = torch.nn.Dropout(0.5)
    try:
        assert originals
        actor_critic.train()
        assert not any(m.training for m in actor_critic.modules())
        ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
        mask = torch.ones_like(ids)
        torch.testing.assert_close(actor_critic.values(ids, mask), actor_critic.values(ids, mask), rtol=0, atol=0)
        # and the check is not vacuous: in train mode the same dropout would change the values
        torch.nn.Module.train(actor_critic, True)
        assert not torch.equal(actor_critic.values(ids, mask), actor_critic.values(ids, mask))
    finally:
        for (_, adapter), (module, dropout) in originals.items():
            module.lora_dropout[adapter] = dropout
        actor_critic.train()


@pytest.mark.slow
def test_a_reward_function_breaking_its_contract_is_one_line_and_exit_2(exports, tmp_path):
    """operator.concat(prompts, completions) is a plausible slip: a list, but of 2N strings."""
    echo = ("+reward.components.echo={_target_: lightrlhf.rewards.spec.Component, "
            "fn: {_target_: operator.concat, _partial_: true}}")
    done = train_cli(ppo_args(exports, echo, f"hydra.run.dir={tmp_path / 'run'}"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.splitlines() == ["error: reward.components.echo (_operator.concat): returned 16 values for "
                                        "8 completions (one number per completion is required)"]
