"""The PPO stage's settings, each block a small checked dataclass (see conf/stage/ppo.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from lightrlhf.rl.kl_control import AdaptiveKLController, FixedKLController
from lightrlhf.validation import in_range, non_negative, one_of, positive, require


@dataclass(frozen=True)
class KLSpec:
    """Per-token KL penalty -beta * KL_t with KL_t estimated by `estimator` (Schulman 2020):
    k1 = log pi - log pi_ref (unbiased, per-token signed), k3 = (r - 1) - log r (unbiased, >= 0).
    `adaptive`: beta follows Ziegler et al. 2019's proportional controller towards `target` nats
    per response, with time constant `horizon` episodes."""

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    adaptive: bool = False
    target: float = 6.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        non_negative("coef", self.coef)
        one_of("estimator", self.estimator, ("k1", "k2", "k3", "abs"))
        positive("target", self.target)
        positive("horizon", self.horizon)

    def controller(self) -> FixedKLController | AdaptiveKLController:
        if self.adaptive:
            return AdaptiveKLController(self.coef, self.target, self.horizon)
        return FixedKLController(self.coef)


@dataclass(frozen=True)
class PPOSpec:
    """The update: `epochs` passes over each rollout batch in `num_minibatches` minibatches, one
    optimizer step per minibatch (micro-batches of `micro_batch_size` accumulate inside one).

    clip_range: policy ratio clip epsilon (Schulman et al. 2017, eq. 7).
    value_clip_range: clip of the value update around the rollout's values.
    vf_coef: weight of the value loss; entropy_coef: entropy bonus (0 = off).
    gamma, lam: GAE discount and trace decay (Schulman et al. 2016); gamma = 1 for RLHF's single reward.
    max_approx_kl: stop the remaining epochs of a rollout once the minibatch approx-KL exceeds this.
    loss_aggregation: token_mean (every token weighs the same) or seq_mean (every response does).
    forward_batch_size: rows per forward when scoring a rollout (bounds memory; None = all at once).
    """

    epochs: int = 4
    num_minibatches: int = 2
    micro_batch_size: int | None = None
    clip_range: float = 0.2
    value_clip_range: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    max_approx_kl: float | None = None
    loss_aggregation: Literal["token_mean", "seq_mean"] = "token_mean"
    forward_batch_size: int | None = None

    def __post_init__(self) -> None:
        positive("epochs", self.epochs)
        positive("num_minibatches", self.num_minibatches)
        if self.micro_batch_size is not None:
            positive("micro_batch_size", self.micro_batch_size)
        positive("clip_range", self.clip_range)
        positive("value_clip_range", self.value_clip_range)
        non_negative("vf_coef", self.vf_coef)
        non_negative("entropy_coef", self.entropy_coef)
        in_range("gamma", self.gamma, 0.0, 1.0)
        in_range("lam", self.lam, 0.0, 1.0)
        if self.max_approx_kl is not None:
            positive("max_approx_kl", self.max_approx_kl)
        one_of("loss_aggregation", self.loss_aggregation, ("token_mean", "seq_mean"))
        if self.forward_batch_size is not None:
            positive("forward_batch_size", self.forward_batch_size)


@dataclass(frozen=True)
class AlertSpec:
    """Reward-hacking tripwires, checked every rollout against the initial (SFT) policy's rollouts.

    length_drift: mean response length moved by more than this fraction of the SFT length while the
      score rose above the SFT score -- the signature of length hacking.
    eos_collapse: the fraction of responses ending with EOS fell below this fraction of SFT's.
    kl_multiple: the KL to the reference exceeded this multiple of `kl.target`.
    stop: end the run (cleanly, with a checkpoint and an export) when an alert fires.
    """

    length_drift: float = 0.5
    eos_collapse: float = 0.5
    kl_multiple: float = 2.0
    stop: bool = False

    def __post_init__(self) -> None:
        positive("length_drift", self.length_drift)
        in_range("eos_collapse", self.eos_collapse, 0.0, 1.0)
        positive("kl_multiple", self.kl_multiple)


def check_minibatches(batch_size: int, ppo: PPOSpec) -> None:
    require(batch_size % ppo.num_minibatches == 0, "ppo.num_minibatches",
            f"must divide the rollout batch (stage.datamodule.batch_size={batch_size}), got {ppo.num_minibatches}")
    if ppo.micro_batch_size is not None:
        minibatch = batch_size // ppo.num_minibatches
        require(minibatch % ppo.micro_batch_size == 0, "ppo.micro_batch_size",
                f"must divide the minibatch ({minibatch} rows), got {ppo.micro_batch_size}")
