"""The networks of preference-based RL on a control task: an MLP actor-critic and a reward-model
ensemble whose members run as one stacked forward pass.

Both are small (two hidden layers of 64): on a 2-core CPU the cost of a step is the Python around
the matrix products, so the ensemble computes all K members with one batched matrix product per layer
(`torch.baddbmm` over stacked weights) instead of K module calls.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightrlhf.validation import positive


@dataclass(frozen=True)
class ActorCriticSpec:
    """hidden: width of the two hidden layers of the actor and of the critic (separate networks, as
    cleanrl's ppo.py). init_log_std: the Gaussian policy's initial log standard deviation (continuous
    actions only; a learned state-independent parameter)."""

    hidden: int = 64
    init_log_std: float = 0.0

    def __post_init__(self) -> None:
        positive("hidden", self.hidden)


def _layer(n_in: int, n_out: int, gain: float) -> nn.Linear:
    # detail: orthogonal weights, zero biases; gain sqrt(2) for hidden layers, 0.01 for the policy head
    # (near-uniform initial policy), 1 for the value head (Huang et al. 2022, detail 2).
    layer = nn.Linear(n_in, n_out)
    nn.init.orthogonal_(layer.weight, gain)
    nn.init.zeros_(layer.bias)
    return layer


class MLPActorCritic(nn.Module):
    """pi(a|s) (categorical logits, or a Gaussian's mean with a learned log std) and V(s)."""

    def __init__(self, obs_dim: int, action_dim: int, discrete: bool, spec: ActorCriticSpec) -> None:
        super().__init__()
        h = spec.hidden
        self.discrete = discrete
        self.actor = nn.Sequential(_layer(obs_dim, h, math.sqrt(2)), nn.Tanh(), _layer(h, h, math.sqrt(2)), nn.Tanh(),
                                   _layer(h, action_dim, 0.01))
        self.critic = nn.Sequential(_layer(obs_dim, h, math.sqrt(2)), nn.Tanh(), _layer(h, h, math.sqrt(2)), nn.Tanh(),
                                    _layer(h, 1, 1.0))
        self.log_std = nn.Parameter(torch.full((action_dim,), spec.init_log_std)) if not discrete else None

    def policy_output(self, obs: Tensor) -> Tensor:
        """Logits [N, A] (discrete) or the Gaussian's mean [N, A]."""
        return self.actor(obs)

    def value(self, obs: Tensor) -> Tensor:
        return self.critic(obs).squeeze(-1)

    def gaussian(self, mean: Tensor) -> torch.distributions.Normal:
        return torch.distributions.Normal(mean, self.log_std.exp().expand_as(mean))

    def deterministic_action(self, obs: Tensor) -> Tensor:
        """The evaluation policy: the most likely action (argmax, or the Gaussian's mean)."""
        out = self.policy_output(obs)
        return out.argmax(-1) if self.discrete else out


class EnsembleRewardModel(nn.Module):
    """K reward models r_k(s, a), MLPs of the same shape trained from different initial weights and
    minibatch orders on the same comparisons (Christiano et al. 2017, sec. 2.2.3).

    Input: the observation and the action (one-hot when discrete), [N, D]; output [K, N]. Weights are
    stacked [K, in, out] and every layer is one `baddbmm` for all members. Inputs are standardised with
    fixed statistics (`set_input_stats`, measured on the clips the model is trained on) so that an
    observation's scale (a cart far off, a fast pole) does not decide what the model can fit.
    """

    def __init__(self, input_dim: int, members: int, hidden: int) -> None:
        super().__init__()
        positive("members", members)
        positive("hidden", hidden)
        sizes = [input_dim, hidden, hidden, 1]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            weight = torch.empty(members, n_in, n_out)
            for k in range(members):  # each member as nn.Linear's default initialisation would draw it
                nn.init.kaiming_uniform_(weight[k].T, a=math.sqrt(5))
            self.weights.append(nn.Parameter(weight))
            self.biases.append(nn.Parameter(torch.empty(members, 1, n_out).uniform_(-1 / math.sqrt(n_in),
                                                                                   1 / math.sqrt(n_in))))
        self.register_buffer("input_mean", torch.zeros(input_dim))
        self.register_buffer("input_std", torch.ones(input_dim))
        self.members = members

    def set_input_stats(self, features: Tensor) -> None:
        """Standardise inputs by these features' mean and std (std floored at 1e-3 for a constant input)."""
        self.input_mean.copy_(features.mean(0))
        self.input_std.copy_(features.std(0, unbiased=False).clamp(min=1e-3))

    def forward(self, features: Tensor) -> Tensor:
        """Per-step rewards of every member, [K, N]: of the same features [N, D] for all members, or of
        each member's own [K, N, D] (training: each member its own minibatch)."""
        x = (features - self.input_mean) / self.input_std
        if x.dim() == 2:
            x = x.unsqueeze(0).expand(self.members, -1, -1)
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = torch.nn.functional.leaky_relu(x, 0.01)
        return x.squeeze(-1)
