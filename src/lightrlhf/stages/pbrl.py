"""Preference-based RL on a control task (Christiano et al. 2017, "Deep Reinforcement Learning from
Human Preferences"): the agent never sees the environment's reward; a teacher compares pairs of short
clips of its behaviour, a reward-model ensemble learns from the comparisons, and PPO trains the policy
on the learned reward.

One `training_step` is one iteration, in the order of the algorithm:

    step 1. roll out   the current policy (with epsilon-greedy exploration for discrete actions) in the
                       fixed-horizon training environments, `ppo.rollout_steps` steps of each
    step 2. ask        on the schedule's iterations: cut clips from this rollout, draw candidate pairs,
                       pick the most useful (random | disagreement | ucb over the ensemble), ask the
                       teacher (a simulated B-Pref teacher on the hidden true reward, or a person through
                       the labelling page), keep the answers
    step 3. fit        after new answers: train the reward-model ensemble on every kept comparison
                       (Bradley-Terry), then measure the mean and std of its reward on those clips
    step 4. reward     the ensemble's mean reward of every rollout step, standardised with those
                       statistics (or, with reward=true, the hidden true reward: the baseline)
    step 5. advantages GAE over the rollout with its episode ends, time-limit ends bootstrapped
    step 6. update     PPO epochs x minibatches (clipped policy loss, clipped value loss, entropy bonus),
                       one optimizer step per minibatch

Evaluation (Lightning's validation loop, every `trainer.val_check_interval` iterations and at the
start): the deterministic policy on the standard environment (eval/true_return, and the learned reward
it collects, eval/learned_return), and the reward model on held-out clips from all of training that no
teacher saw: its accuracy on pairs against the true returns (eval/preference_accuracy) and the
correlation of learned and true clip returns (eval/return_correlation).

Lightning runs the loop (`automatic_optimization = False`): `global_step` counts PPO optimizer steps;
the reward model has its own optimizer inside the stage. Checkpoints hold the policy, the ensemble and
its optimizer, every kept comparison, the held-out clips, the environments' state and every random
generator, so a killed run resumes exactly.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from lightrlhf.control.clips import ClipReservoir, Clips, clip_windows, cut_clips
from lightrlhf.control.envs import (
    EnvSpec,
    env_state,
    load_env_state,
    make_eval_envs,
    make_training_envs,
    to_env_actions,
)
from lightrlhf.control.networks import ActorCriticSpec, EnsembleRewardModel, MLPActorCritic
from lightrlhf.control.teachers import TEACHERS, TeacherSpec, scripted_answers, targets_from_choices
from lightrlhf.io import atomic_directory
from lightrlhf.rl import entropy_from_logits, explained_variance, gae, masked_whiten, policy_objective, value_objective
from lightrlhf.rl.exploration import epsilon_greedy_logprobs, epsilon_greedy_sample, linear_decay
from lightrlhf.rl.gae import bootstrap_truncations
from lightrlhf.rl.normalize import RunningMeanStd
from lightrlhf.rl.preference import soft_bradley_terry_loss
from lightrlhf.rl.queries import SELECTIONS, disagreement_scores, pearson, query_schedule, ucb_scores
from lightrlhf.stages.base import StageModule
from lightrlhf.training.numerics import NumericsSpec
from lightrlhf.training.optim import OptimizerSpec, SchedulerSpec
from lightrlhf.validation import in_range, non_negative, one_of, positive, require

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ControlPPOSpec:
    """PPO on the control task (Schulman et al. 2017; cleanrl's ppo.py settings for classic control).
    rollout_steps: steps of each environment per iteration. epochs x num_minibatches optimizer steps
    per iteration. clip_range, value_clip_range: policy ratio and value clipping. vf_coef, entropy_coef:
    weights of the value loss and the entropy bonus. gamma, lam: GAE's discount and trace decay."""

    rollout_steps: int = 128
    epochs: int = 20
    num_minibatches: int = 4
    clip_range: float = 0.2
    value_clip_range: float = 10.0
    vf_coef: float = 0.5
    entropy_coef: float = 0.0
    gamma: float = 0.98
    lam: float = 0.8

    def __post_init__(self) -> None:
        for name in ("rollout_steps", "epochs", "num_minibatches", "clip_range", "value_clip_range"):
            positive(name, getattr(self, name))
        non_negative("vf_coef", self.vf_coef)
        non_negative("entropy_coef", self.entropy_coef)
        in_range("gamma", self.gamma, 0.0, 1.0)
        in_range("lam", self.lam, 0.0, 1.0)


@dataclass(frozen=True)
class ExplorationSpec:
    """Epsilon-greedy for discrete actions (rl/exploration.py): epsilon at the start, decayed linearly to
    final_epsilon over the first decay_fraction of the iterations. Continuous actions explore through
    the Gaussian policy's own spread."""

    epsilon: float = 0.1
    final_epsilon: float = 0.0
    decay_fraction: float = 0.5

    def __post_init__(self) -> None:
        in_range("epsilon", self.epsilon, 0.0, 0.999)
        in_range("final_epsilon", self.final_epsilon, 0.0, 0.999)
        in_range("decay_fraction", self.decay_fraction, 0.0, 1.0)


@dataclass(frozen=True)
class QuerySpec:
    """total: the query budget of the run. rounds: how many times the teacher is asked, every `every`
    iterations from the first; round r gets a share of the budget proportional to 1 / (1 + decay * r)
    (rl/queries.py::query_schedule). clip_length: steps per clip. selection: random, disagreement or
    ucb (rl/queries.py). candidates: candidate pairs drawn per query asked (the selection picks the best
    1 / candidates of them; random takes the first). ucb_kappa: UCB's weight of the ensemble's spread."""

    total: int = 400
    rounds: int = 20
    every: int = 4
    decay: float = 0.25
    clip_length: int = 50
    selection: Literal["random", "disagreement", "ucb"] = "disagreement"
    candidates: int = 10
    ucb_kappa: float = 1.0

    def __post_init__(self) -> None:
        non_negative("total", self.total)
        for name in ("rounds", "every", "clip_length", "candidates"):
            positive(name, getattr(self, name))
        non_negative("decay", self.decay)
        one_of("selection", self.selection, SELECTIONS)
        non_negative("ucb_kappa", self.ucb_kappa)


@dataclass(frozen=True)
class RewardModelSpec:
    """The reward-model ensemble (control/networks.py): members MLPs of two hidden layers of `hidden`,
    trained after each round, from where the last round left it, for `updates` AdamW steps (lr,
    weight_decay) on minibatches of `batch_size` of every kept comparison so far. A fixed number of steps
    keeps a round's cost flat as comparisons accumulate. bootstrap: each member draws its own minibatches
    with replacement (Christiano et al. 2017: each predictor sees comparisons sampled from D with
    replacement); false: all members see the same minibatches, drawn without replacement."""

    members: int = 3
    hidden: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    updates: int = 30
    batch_size: int = 64
    bootstrap: bool = True

    def __post_init__(self) -> None:
        for name in ("members", "hidden", "lr", "updates", "batch_size"):
            positive(name, getattr(self, name))
        non_negative("weight_decay", self.weight_decay)


@dataclass(frozen=True)
class ControlEvalSpec:
    """heldout_clips: clips kept aside from every iteration's rollout (a reservoir, control/clips.py) to
    judge the reward model on; clips_per_iteration of each rollout are offered to it. heldout_pairs:
    random pairs of those clips (with different true returns) for eval/preference_accuracy, drawn with
    `seed`. tie_warning: warn when more than this fraction of a round's answers are ties."""

    heldout_clips: int = 400
    clips_per_iteration: int = 4
    heldout_pairs: int = 1000
    seed: int = 1234
    tie_warning: float = 0.5

    def __post_init__(self) -> None:
        for name in ("heldout_clips", "clips_per_iteration", "heldout_pairs"):
            positive(name, getattr(self, name))
        in_range("tie_warning", self.tie_warning, 0.0, 1.0)


@dataclass
class ControlRollout:
    """[T, N] steps of N environments. logprobs: of the behaviour policy (epsilon mixture included);
    dones: the episode ended at that step; truncated: by the time limit (bootstrapped);
    final_values: V of the true final observation where an episode ended."""

    observations: Tensor
    actions: Tensor
    logprobs: Tensor
    values: Tensor
    true_rewards: Tensor
    dones: Tensor
    truncated: Tensor
    final_values: Tensor
    features: Tensor  # the reward model's input [T, N, D]
    epsilon: float


@dataclass
class LabelBuffer:
    """Every comparison asked so far: the two clips, the answer and what it means for the loss."""

    clips_a: Clips | None = None
    clips_b: Clips | None = None
    choices: list[str] = field(default_factory=list)

    def add(self, a: Clips, b: Clips, choices: list[str]) -> None:
        self.clips_a = a if self.clips_a is None else Clips.cat([self.clips_a, a])
        self.clips_b = b if self.clips_b is None else Clips.cat([self.clips_b, b])
        self.choices += choices

    def kept(self) -> tuple[Clips, Clips, Tensor]:
        targets, kept = targets_from_choices(self.choices)
        index = kept.nonzero().squeeze(-1)
        return self.clips_a.select(index), self.clips_b.select(index), targets[index]

    def state_dict(self) -> dict[str, Any]:
        return {"a": self.clips_a.state_dict() if self.clips_a is not None else None,
                "b": self.clips_b.state_dict() if self.clips_b is not None else None, "choices": list(self.choices)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clips_a = Clips.from_state(state["a"]) if state["a"] is not None else None
        self.clips_b = Clips.from_state(state["b"]) if state["b"] is not None else None
        self.choices = list(state["choices"])


class PbRLStage(StageModule):
    default_metric = "eval/true_return"
    stage_name = "pbrl"
    data_parallel = "none"  # several backward passes a step (StageModule.data_parallel)

    def __init__(self, env: EnvSpec, teachers: dict[str, TeacherSpec], reward: str | bool = "learned",
                 teacher: str = "oracle", human: Any = None,
                 queries: QuerySpec = QuerySpec(), reward_model: RewardModelSpec = RewardModelSpec(),
                 policy: ActorCriticSpec = ActorCriticSpec(), ppo: ControlPPOSpec = ControlPPOSpec(),
                 exploration: ExplorationSpec = ExplorationSpec(), eval: ControlEvalSpec = ControlEvalSpec(),
                 env_steps: int = 200_000, optim: OptimizerSpec = OptimizerSpec(lr=1e-3, eps=1e-5),
                 scheduler: SchedulerSpec = SchedulerSpec(name="linear", warmup_steps=0, min_lr_ratio=0.0),
                 max_grad_norm: float | None = 0.5, stop_when_solved: bool = False, seed: int = 0,
                 numerics: NumericsSpec | None = None):
        super().__init__(optim, scheduler, max_grad_norm, numerics)
        self.automatic_optimization = False
        # reward=true on the command line arrives as the boolean true
        self.true_reward = reward is True or reward == "true"
        require(self.true_reward or reward == "learned", "reward", f"must be learned or true, got {reward!r}")
        self.teachers = dict(teachers)
        require(teacher == "human" or teacher in self.teachers, "teacher",
                f"must be human or one of the configured teachers {sorted(self.teachers)}, got {teacher!r}")
        unknown = sorted(set(self.teachers) - set(TEACHERS))
        require(not unknown, "teachers", f"unknown teacher {unknown[0] if unknown else ''!r}; "
                                         f"B-Pref's are {list(TEACHERS)}")
        require(teacher != "human" or human is not None, "human", "teacher=human needs the human block")
        self.teacher_name, self.human_spec = teacher, human
        self.env_spec, self.queries, self.rm_spec = env, queries, reward_model
        self.ppo, self.exploration, self.eval_spec = ppo, exploration, eval
        positive("env_steps", env_steps)
        self.steps_per_iteration = env.num_envs * ppo.rollout_steps
        require(env_steps >= self.steps_per_iteration, "env_steps",
                f"must be at least one iteration (env.num_envs x ppo.rollout_steps = {self.steps_per_iteration}), "
                f"got {env_steps}")
        require(self.steps_per_iteration % ppo.num_minibatches == 0, "ppo.num_minibatches",
                f"must divide the iteration's {self.steps_per_iteration} steps, got {ppo.num_minibatches}")
        # detail: a clip never spans an episode end. An end inside a rollout of T steps leaves a stretch of
        # at least T / 2 steps on one side of it, so T >= 2 x clip_length always leaves a whole window (a
        # shorter rollout whose end falls in its middle would have none to cut a clip from).
        require(2 * queries.clip_length <= ppo.rollout_steps, "queries.clip_length",
                f"must fit twice in one rollout (ppo.rollout_steps={ppo.rollout_steps}), got {queries.clip_length}")
        self.iterations = env_steps // self.steps_per_iteration
        require(not stop_when_solved or env.solved_return is not None, "stop_when_solved",
                f"{env.task} has no solved_return (env.solved_return) to stop at")
        self.stop_when_solved = stop_when_solved
        self.seed = seed
        self.envs = make_training_envs(env)
        obs_dim = self.envs.single_observation_space.shape[0]
        space = self.envs.single_action_space
        self.action_dim = int(space.n) if env.discrete else int(space.shape[0])
        self.action_low = None if env.discrete else space.low
        self.action_high = None if env.discrete else space.high
        with torch.random.fork_rng():  # the initial weights depend on the seed alone, not on what ran before
            torch.manual_seed(seed)
            self.model = MLPActorCritic(obs_dim, self.action_dim, env.discrete, policy)
            self.reward_model = EnsembleRewardModel(obs_dim + self.action_dim, reward_model.members,
                                                    reward_model.hidden)
        self.reward_optimizer = torch.optim.AdamW(self.reward_model.parameters(), lr=reward_model.lr,
                                                  weight_decay=reward_model.weight_decay)
        self.schedule = query_schedule(queries.total, queries.rounds, queries.decay)
        # the stage's own state, all of it checkpointed
        self.generator = torch.Generator().manual_seed(seed)
        # detail: the teachers draw from a generator of their own, so a person (who draws nothing) and a
        # simulated teacher giving the same answers leave the run on the very same course
        self.teacher_generator = torch.Generator().manual_seed(seed + 1)
        self.observations = torch.from_numpy(self.envs.reset(seed=seed)[0]).float()
        self.iteration = 0
        self.labels = LabelBuffer()
        self.heldout = ClipReservoir(eval.heldout_clips)
        self.reward_stats = {"mean": 0.0, "std": 1.0}  # of the learned reward on the labelled clips
        self.true_reward_stats = RunningMeanStd()  # reward=true: standardise by everything seen so far
        self.initial_eval: dict[str, float] = {}
        self.eval_results: dict[str, float] = {}
        self._human = None

    # -- the loop Lightning runs: one batch per iteration, one validation batch per evaluation --------
    def train_dataloader(self):
        from torchdata.stateful_dataloader import StatefulDataLoader

        # detail: a stateful loader, so a run resumed mid-way continues at the next iteration
        return StatefulDataLoader(list(range(self.iterations)), batch_size=None, shuffle=False)

    def val_dataloader(self):
        return [0]

    # -- step 1: roll out ------------------------------------------------------------------------
    def features(self, observations: Tensor, actions: Tensor) -> Tensor:
        """The reward model's input: the observation and the action (one-hot when discrete)."""
        if self.env_spec.discrete:
            actions = torch.nn.functional.one_hot(actions.long(), self.action_dim).float()
        return torch.cat([observations, actions.float().reshape(*observations.shape[:-1], -1)], dim=-1)

    @torch.no_grad()
    def roll_out(self, epsilon: float) -> ControlRollout:
        steps, n = self.ppo.rollout_steps, self.env_spec.num_envs
        obs = torch.zeros(steps, n, self.observations.shape[-1])
        actions = torch.zeros(steps, n, dtype=torch.long) if self.env_spec.discrete else \
            torch.zeros(steps, n, self.action_dim)
        logprobs, true_rewards = torch.zeros(steps, n), torch.zeros(steps, n)
        dones, truncated = torch.zeros(steps, n, dtype=torch.bool), torch.zeros(steps, n, dtype=torch.bool)
        final_obs: list[tuple[int, int, Tensor]] = []
        for t in range(steps):
            obs[t] = self.observations
            out = self.model.policy_output(self.observations)
            if self.env_spec.discrete:
                action = epsilon_greedy_sample(out, epsilon, self.generator)
                logprobs[t] = epsilon_greedy_logprobs(out, action, epsilon)
            else:
                dist = self.model.gaussian(out)
                action = out + dist.stddev * torch.randn(out.shape, generator=self.generator)
                logprobs[t] = dist.log_prob(action).sum(-1)
            actions[t] = action
            next_obs, reward, terminated, truncation, info = self.envs.step(
                to_env_actions(self.env_spec, action, self.action_low, self.action_high))
            true_rewards[t] = torch.from_numpy(reward).float()
            ended = terminated | truncation
            dones[t], truncated[t] = torch.from_numpy(ended), torch.from_numpy(truncation & ~terminated)
            for i in ended.nonzero()[0]:
                final_obs.append((t, int(i), torch.as_tensor(info["final_obs"][i]).float()))
            self.observations = torch.from_numpy(next_obs).float()
        values = self.model.value(obs.reshape(steps * n, -1)).reshape(steps, n)
        final_values = torch.zeros(steps, n)
        if final_obs:
            ends = self.model.value(torch.stack([o for _, _, o in final_obs]))
            for (t, i, _), v in zip(final_obs, ends):
                final_values[t, i] = v
        return ControlRollout(obs, actions, logprobs, values, true_rewards, dones, truncated, final_values,
                              self.features(obs, actions), epsilon)

    def random_clips(self, roll: ControlRollout, count: int) -> Clips:
        """`count` clips of the rollout, windows drawn uniformly (with replacement when there are fewer)."""
        windows = clip_windows(roll.dones, self.queries.clip_length)
        if len(windows) >= count:
            chosen = torch.randperm(len(windows), generator=self.generator)[:count]
        else:
            chosen = torch.randint(0, len(windows), (count,), generator=self.generator)
        return cut_clips(windows[chosen], self.queries.clip_length, roll.features, roll.true_rewards,
                         roll.observations, roll.actions)

    # -- step 2: ask -----------------------------------------------------------------------------
    def due_queries(self) -> int:
        """Queries of this iteration's round (0 when none is due)."""
        if self.true_reward or self.iteration % self.queries.every:
            return 0
        round_index = self.iteration // self.queries.every
        return self.schedule[round_index] if round_index < len(self.schedule) else 0

    def select_pairs(self, roll: ControlRollout, count: int) -> tuple[Clips, Clips, Tensor]:
        """`count` pairs out of count x candidates drawn from the rollout, by the configured selection.
        Returns the two sides and the chosen pairs' scores (0 for random)."""
        pool = count * (self.queries.candidates if self.queries.selection != "random" else 1)
        clips = self.random_clips(roll, 2 * pool)
        pairs = torch.arange(2 * pool).reshape(pool, 2)
        if self.queries.selection == "random" or not self.labels.choices:
            chosen, scores = torch.arange(count), torch.zeros(count)  # no reward model to ask yet
        else:
            with torch.no_grad():
                returns = self.clip_returns(clips)  # [K, C]
            if self.queries.selection == "disagreement":
                all_scores = disagreement_scores(returns[:, pairs[:, 0]], returns[:, pairs[:, 1]])
            else:
                all_scores = ucb_scores(returns, pairs, self.queries.ucb_kappa)
            # detail: a stable sort, so equal scores keep the order they were drawn in
            chosen = torch.sort(all_scores, descending=True, stable=True).indices[:count]
            scores = all_scores[chosen]
        return clips.select(pairs[chosen, 0]), clips.select(pairs[chosen, 1]), scores

    def ask(self, a: Clips, b: Clips) -> list[str]:
        if self.teacher_name == "human":
            if self._human is None:
                from lightrlhf.control.human import HumanTeacher

                stop = lambda: any(getattr(c, "received_signal", None) is not None for c in self.trainer.callbacks)  # noqa: E731
                self._human = HumanTeacher(self.human_spec, self.env_spec, stop)
            return self._human.ask(self.iteration, a, b)
        return scripted_answers(self.teachers[self.teacher_name], a.true_rewards, b.true_rewards,
                                self.env_spec.step_reward_range, self.teacher_generator)

    # -- step 3: fit the reward model ------------------------------------------------------------
    def clip_returns(self, clips: Clips) -> Tensor:
        """Each member's predicted return of each clip, [K, C] (in the model's raw units)."""
        c, length, d = clips.features.shape
        return self.reward_model(clips.features.reshape(c * length, d)).reshape(-1, c, length).sum(-1)

    def fit_reward_model(self) -> dict[str, float]:
        a, b, targets = self.labels.kept()
        n = len(targets)
        if n == 0:
            return {}
        spec, members, length = self.rm_spec, self.rm_spec.members, self.queries.clip_length
        both = torch.cat([a.features, b.features]).reshape(2 * n * length, -1)
        self.reward_model.set_input_stats(both)
        losses = []
        for _ in range(spec.updates):
            rows = min(spec.batch_size, n) if not spec.bootstrap else spec.batch_size
            if spec.bootstrap:
                idx = torch.randint(0, n, (members, rows), generator=self.generator)  # each member its own pairs
            else:
                idx = torch.randperm(n, generator=self.generator)[:rows].repeat(members, 1)
            pair = torch.stack([a.features[idx], b.features[idx]], dim=2)  # [K, B, 2, L, D]
            rewards = self.reward_model(pair.reshape(members, rows * 2 * length, -1))
            returns = rewards.reshape(members, rows, 2, length).sum(-1)
            loss = soft_bradley_terry_loss(returns[..., 0], returns[..., 1], targets[idx])
            self.reward_optimizer.zero_grad()
            loss.backward()
            self.reward_optimizer.step()
            losses.append(loss.item())
        with torch.no_grad():
            returns = self.clip_returns(a) - self.clip_returns(b)  # [K, n]
            decided = targets != 0.5
            agree = ((returns > 0) == (targets > 0.5).unsqueeze(0)).float()[:, decided]
            step_rewards = self.reward_model(both).mean(0)
        self.reward_stats = {"mean": step_rewards.mean().item(), "std": max(step_rewards.std().item(), 1e-6)}
        return {"reward_model/train_loss": losses[-1],
                "reward_model/train_accuracy": agree.mean().item() if decided.any() else float("nan")}

    @torch.no_grad()
    def learned_rewards(self, features: Tensor) -> Tensor:
        """The ensemble's mean reward, standardised by its statistics on the labelled clips."""
        shape = features.shape[:-1]
        raw = self.reward_model(features.reshape(-1, features.shape[-1])).mean(0).reshape(shape)
        return (raw - self.reward_stats["mean"]) / self.reward_stats["std"]

    # -- steps 4 to 6: rewards, advantages, update -------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> None:
        started = time.perf_counter()
        progress = self.iteration / max(1, self.iterations)
        epsilon = linear_decay(self.exploration.epsilon, self.exploration.final_epsilon,
                               progress / self.exploration.decay_fraction if self.exploration.decay_fraction else 1)
        epsilon = epsilon if self.env_spec.discrete else 0.0
        # step 1. roll out
        roll = self.roll_out(epsilon)
        self.heldout.offer(self.random_clips(roll, self.eval_spec.clips_per_iteration), self.generator)
        rolled = time.perf_counter()
        metrics: dict[str, float] = {}
        # steps 2 and 3. ask the teacher about this round's pairs, fit the reward model on every answer
        count = self.due_queries()
        if count:
            a, b, scores = self.select_pairs(roll, count)
            choices = self.ask(a, b)
            self.labels.add(a, b, choices)
            round_ties = sum(c == "tie" for c in choices) / len(choices)
            if round_ties > self.eval_spec.tie_warning:
                log.warning("iteration %d: %.0f%% of this round's %d answers are ties; clips this alike teach the "
                            "reward model little (a longer queries.clip_length, or a policy that varies more, helps)",
                            self.iteration, 100 * round_ties, len(choices))
            metrics.update(self.fit_reward_model())
            metrics["queries/round_selection_score"] = scores.mean().item()
        asked = time.perf_counter()
        # step 4. rewards: learned (standardised) or, for the baseline, the hidden true reward
        if self.true_reward:
            self.true_reward_stats.update(roll.true_rewards)
            rewards = self.true_reward_stats.normalize(roll.true_rewards)
        else:
            rewards = self.learned_rewards(roll.features)
        # step 5. advantages: GAE with episode ends; a time-limit end bootstraps from V(final observation)
        rewards_t, dones_t = rewards.T, roll.dones.T  # [N, T]: rows are environments
        bootstrapped = bootstrap_truncations(rewards_t, roll.truncated.T, roll.final_values.T, self.ppo.gamma)
        with torch.no_grad():
            next_value = self.model.value(self.observations)
        ones = torch.ones_like(rewards_t)
        advantages, returns = gae(bootstrapped, roll.values.T, ones, self.ppo.gamma, self.ppo.lam, dones=dones_t,
                                  next_value=next_value)
        # step 6. update
        stats = self.update(roll, advantages.T.reshape(-1), returns.T.reshape(-1))
        updated = time.perf_counter()
        self.iteration += 1
        episodes_true = roll.true_rewards.sum(0).mean().item() * self.env_spec.horizon / self.ppo.rollout_steps
        metrics.update(stats)
        metrics.update({
            "progress/env_steps": float(self.iteration * self.steps_per_iteration),
            "progress/iterations": float(self.iteration),
            "progress/queries": float(len(self.labels.choices)),
            "progress/labels": float(sum(c in ("a", "b", "tie") for c in self.labels.choices)),
            "queries/tie_fraction": self.tie_fraction(),
            "rollout/true_reward_mean": roll.true_rewards.mean().item(),
            "rollout/true_return_per_horizon": episodes_true,
            "rollout/reward_mean": rewards.mean().item(),
            "rollout/epsilon": epsilon,
            "val/explained_variance": explained_variance(roll.values.T, returns, ones).item(),
            "time/rollout_s": rolled - started, "time/queries_s": asked - rolled, "time/update_s": updated - asked,
        })
        # detail: straight to the loggers at Lightning's logging step (self.log costs milliseconds per
        # metric, as much as the rollout); the checkpoint callback carries them like self.log's
        # (callbacks/checkpoint.py, LoggedAtStep), so curves stay exact across a kill and resume.
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=self.trainer.fit_loop.epoch_loop._batches_that_stepped)
        # the progress bar's copy only: the curve is the one logged above
        self.log("queries", metrics["progress/queries"], prog_bar=True, logger=False, batch_size=1)
        if self.iteration >= self.iterations:
            self.trainer.should_stop = True

    def tie_fraction(self) -> float:
        answered = [c for c in self.labels.choices if c in ("a", "b", "tie")]
        return sum(c == "tie" for c in answered) / len(answered) if answered else 0.0

    def logprobs_and_entropy(self, observations: Tensor, actions: Tensor, epsilon: float) -> tuple[Tensor, Tensor]:
        out = self.model.policy_output(observations)
        if self.env_spec.discrete:
            return epsilon_greedy_logprobs(out, actions, epsilon), entropy_from_logits(out)
        dist = self.model.gaussian(out)
        return dist.log_prob(actions).sum(-1), dist.entropy().sum(-1)

    def update(self, roll: ControlRollout, advantages: Tensor, returns: Tensor) -> dict[str, float]:
        optimizer, scheduler = self.optimizers(), self.lr_schedulers()
        spec = self.ppo
        obs = roll.observations.reshape(-1, roll.observations.shape[-1])
        actions = roll.actions.reshape(len(obs), *roll.actions.shape[2:])
        old_logp, old_values = roll.logprobs.reshape(-1), roll.values.reshape(-1)
        rows = len(obs)
        minibatch = rows // spec.num_minibatches
        params = [p for group in optimizer.optimizer.param_groups for p in group["params"]]
        stats: dict[str, list[float]] = {}
        for _epoch in range(spec.epochs):
            order = torch.randperm(rows, generator=self.generator)
            for start in range(0, rows, minibatch):
                idx = order[start:start + minibatch]
                ones = torch.ones(len(idx), 1)
                # detail: advantages normalised per minibatch (Huang et al. 2022, detail 7)
                adv = masked_whiten(advantages[idx].unsqueeze(1), ones)
                logp, entropy = self.logprobs_and_entropy(obs[idx], actions[idx], roll.epsilon)
                policy = policy_objective(logp.unsqueeze(1), entropy.unsqueeze(1), old_logp[idx].unsqueeze(1), adv,
                                          ones, clip_range=spec.clip_range, entropy_coef=spec.entropy_coef)
                value = value_objective(self.model.value(obs[idx]).unsqueeze(1), old_values[idx].unsqueeze(1),
                                        returns[idx].unsqueeze(1), ones, clip_range=spec.value_clip_range,
                                        vf_coef=spec.vf_coef)
                optimizer.zero_grad()
                self.manual_backward(policy.objective + value.objective)
                merged = {"policy/loss": policy.policy.loss.item(), "policy/entropy": policy.entropy.item(),
                          "policy/clipfrac": policy.policy.clipfrac.item(),
                          "policy/approxkl": policy.policy.approxkl.item(), "val/loss": value.value.loss.item(),
                          "val/clipfrac": value.value.clipfrac.item()}
                losses = torch.tensor([merged["policy/loss"], merged["val/loss"]])
                self.minibatch_step(optimizer, scheduler, params, losses, merged, stats)
        out = {k: sum(v) / len(v) for k, v in stats.items()}
        out["numerics/skipped_batches"] = float(self.guard.skipped_total)
        return out

    # -- evaluation ------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        if self.iteration == 0 and not self.initial_eval:
            self.initial_eval = self.evaluate()
            if self.logger is not None:
                self.logger.log_metrics(dict(self.initial_eval), step=0)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """The deterministic policy on the standard environment, one episode per evaluation environment
        (seeded eval_seed + i: the same starts at every evaluation), and the reward model on held-out clips."""
        spec = self.env_spec
        envs = make_eval_envs(spec)
        obs, _ = envs.reset(seed=spec.eval_seed)
        obs = torch.from_numpy(obs).float()
        running = torch.ones(spec.eval_episodes, dtype=torch.bool)
        true_return, learned_return = torch.zeros(spec.eval_episodes), torch.zeros(spec.eval_episodes)
        has_model = bool(self.labels.choices)
        while running.any():
            action = self.model.deterministic_action(obs)
            next_obs, reward, terminated, truncation, _ = envs.step(
                to_env_actions(spec, action, self.action_low, self.action_high))
            true_return += torch.where(running, torch.from_numpy(reward).float(), 0)
            if has_model:
                learned_return += torch.where(running, self.learned_rewards(self.features(obs, action)), 0)
            running &= ~torch.from_numpy(terminated | truncation)
            obs = torch.from_numpy(next_obs).float()
        envs.close()
        results = {"eval/true_return": true_return.mean().item(), "eval/true_return_min": true_return.min().item()}
        if spec.solved_return is not None:
            results["eval/solved"] = float(true_return.mean().item() >= spec.solved_return)
        if has_model:
            results["eval/learned_return"] = learned_return.mean().item()
            results.update(self.heldout_metrics())
        return results

    @torch.no_grad()
    def heldout_metrics(self) -> dict[str, float]:
        clips = self.heldout.clips
        if clips is None or len(clips) < 2:
            return {}
        learned = self.clip_returns(clips).mean(0)
        true = clips.true_rewards.double().sum(1)
        generator = torch.Generator().manual_seed(self.eval_spec.seed)
        pairs = torch.randint(0, len(clips), (self.eval_spec.heldout_pairs, 2), generator=generator)
        differ = true[pairs[:, 0]] != true[pairs[:, 1]]
        pairs = pairs[differ]
        metrics = {"eval/return_correlation": pearson(learned, true).item()}
        if len(pairs):
            right = (learned[pairs[:, 0]] > learned[pairs[:, 1]]) == (true[pairs[:, 0]] > true[pairs[:, 1]])
            metrics["eval/preference_accuracy"] = right.float().mean().item()
        return metrics

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.eval_results = self.evaluate()
        for name, value in self.eval_results.items():
            self.log(name, value, prog_bar=name == "eval/true_return", batch_size=1)
        self.last_validated_step = self.global_step
        if self.stop_when_solved and self.eval_results.get("eval/solved") and not self.trainer.sanity_checking:
            # the budget is a ceiling: a solved task need not spend the rest (rl-zoo's StopTrainingOnRewardThreshold)
            log.info("solved after %d environment steps and %d queries: eval/true_return %.1f >= %g; stopping",
                     self.iteration * self.steps_per_iteration, len(self.labels.choices),
                     self.eval_results["eval/true_return"], self.env_spec.solved_return)
            self.trainer.should_stop = True

    # -- optimisation and checkpoints ------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.optim.build(list(self.model.named_parameters()))
        return self.optimizer_and_schedule(groups, self.iterations * self.ppo.epochs * self.ppo.num_minibatches)

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, _ in self.named_parameters()]

    def stage_state(self) -> dict[str, Any]:
        return {"iteration": self.iteration, "generator": self.generator.get_state(),
                "teacher_generator": self.teacher_generator.get_state(),
                "observations": self.observations.clone(), "envs": env_state(self.envs),
                "labels": self.labels.state_dict(), "heldout": self.heldout.state_dict(),
                "reward_optimizer": self.reward_optimizer.state_dict(),
                "reward_input": {"mean": self.reward_model.input_mean.clone(), "std": self.reward_model.input_std.clone()},
                "reward_stats": dict(self.reward_stats), "true_reward_stats": self.true_reward_stats.state_dict(),
                "initial_eval": dict(self.initial_eval), "eval": dict(self.eval_results)}

    def load_stage_state(self, state: dict[str, Any]) -> None:
        self.iteration = int(state["iteration"])
        self.generator.set_state(state["generator"])
        self.teacher_generator.set_state(state["teacher_generator"])
        self.observations = state["observations"].clone()
        load_env_state(self.envs, state["envs"])
        self.labels.load_state_dict(state["labels"])
        self.heldout.load_state_dict(state["heldout"])
        self.reward_optimizer.load_state_dict(state["reward_optimizer"])
        self.reward_model.input_mean.copy_(state["reward_input"]["mean"])
        self.reward_model.input_std.copy_(state["reward_input"]["std"])
        self.reward_stats = dict(state["reward_stats"])
        self.true_reward_stats.load_state_dict(state["true_reward_stats"])
        self.initial_eval, self.eval_results = dict(state["initial_eval"]), dict(state["eval"])

    # -- what the launcher reads -----------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        metrics = dict(self.eval_results)
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        metrics.update({"progress/env_steps": float(self.iteration * self.steps_per_iteration),
                        "progress/queries": float(len(self.labels.choices)),
                        "progress/iterations": float(self.iteration), "queries/tie_fraction": self.tie_fraction()})
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        """export/: policy.safetensors (the actor-critic), reward_model.safetensors (the ensemble with its
        input statistics and reward normalisation) and lightrlhf.json (what produced them)."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        with atomic_directory(out_dir) as staging:
            save_file({k: v.detach().contiguous() for k, v in self.model.state_dict().items()},
                      str(staging / "policy.safetensors"))
            save_file({**{k: v.detach().contiguous() for k, v in self.reward_model.state_dict().items()},
                       "reward_mean": torch.tensor(self.reward_stats["mean"]),
                       "reward_std": torch.tensor(self.reward_stats["std"])}, str(staging / "reward_model.safetensors"))
            manifest = {"stage": self.stage_name, "kind": "control", "task": self.env_spec.task,
                        "reward": "true" if self.true_reward else "learned", "teacher": self.teacher_name,
                        "metrics": metrics or {}, "config": config or {}}
            (staging / "lightrlhf.json").write_text(json.dumps(manifest, indent=1, default=str))
        return out_dir

