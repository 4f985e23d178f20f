"""Clips: fixed-length pieces of the policy's own trajectories, the things a teacher compares.

A rollout is [T, N] steps of N environments; a clip is L consecutive steps of one environment inside
one episode (Christiano et al. 2017 use 1-2 second segments; 50 CartPole steps are one second). A
clip holds what the reward model reads (observation and action features), what a person sees (the
observations and actions, rendered), and the hidden true rewards the simulated teachers and the
evaluation read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor


@dataclass
class Clips:
    """C clips of L steps: features [C, L, D] (the reward model's input), true_rewards [C, L] (hidden
    from the agent), observations [C, L, O] and actions [C, L] or [C, L, A] (for rendering)."""

    features: Tensor
    true_rewards: Tensor
    observations: Tensor
    actions: Tensor

    def __len__(self) -> int:
        return self.features.shape[0]

    def select(self, index: Tensor) -> Clips:
        return Clips(self.features[index], self.true_rewards[index], self.observations[index], self.actions[index])

    @staticmethod
    def cat(parts: list[Clips]) -> Clips:
        return Clips(*(torch.cat([getattr(p, f) for p in parts]) for f in ("features", "true_rewards",
                                                                            "observations", "actions")))

    def state_dict(self) -> dict[str, Tensor]:
        return {"features": self.features, "true_rewards": self.true_rewards, "observations": self.observations,
                "actions": self.actions}

    @staticmethod
    def from_state(state: dict[str, Tensor]) -> Clips:
        return Clips(state["features"], state["true_rewards"], state["observations"], state["actions"])


def clip_windows(dones: Tensor, length: int) -> Tensor:
    """Every window of `length` steps inside one episode of a [T, N] rollout, as [W, 2] (start step,
    environment), in order of environment then start.

    dones[t, n] = 1 when environment n's episode ended at step t (its next step starts a new one), so a
    window starting at s fits when no episode ends at s .. s + length - 2 (it may end at its last step).
    """
    steps, envs = dones.shape
    if length > steps:
        return torch.zeros(0, 2, dtype=torch.long)
    # ends_before[s] = number of episode ends at steps < s, per environment
    ends = dones.to(torch.long)
    ends_before = torch.cat([torch.zeros(1, envs, dtype=torch.long), ends.cumsum(0)])
    starts = torch.arange(steps - length + 1)
    inside = ends_before[starts + length - 1] - ends_before[starts]  # ends at s .. s + length - 2
    env, start = torch.nonzero((inside == 0).T, as_tuple=True)
    return torch.stack([start, env], dim=1)


def cut_clips(windows: Tensor, length: int, features: Tensor, true_rewards: Tensor, observations: Tensor,
              actions: Tensor) -> Clips:
    """The clips of the given windows ([W, 2] start, environment) from [T, N, ...] rollout tensors."""
    steps = windows[:, :1] + torch.arange(length)  # [W, L]
    envs = windows[:, 1:].expand_as(steps)
    return Clips(features[steps, envs], true_rewards[steps, envs], observations[steps, envs], actions[steps, envs])


class ClipReservoir:
    """A uniform sample of `size` clips out of every clip offered so far (reservoir sampling, Vitter
    1985, algorithm R): the held-out clips that the reward model is judged on, from every stage of
    training -- early clumsy ones and late good ones -- so that accuracy and correlation measure the
    model over the range of behaviour, not only the current policy's."""

    def __init__(self, size: int) -> None:
        self.size, self.seen = size, 0
        self.clips: Clips | None = None

    def offer(self, clips: Clips, generator: torch.Generator) -> None:
        for i in range(len(clips)):
            one = clips.select(torch.tensor([i]))
            if self.clips is None or len(self.clips) < self.size:
                self.clips = one if self.clips is None else Clips.cat([self.clips, one])
            else:
                slot = int(torch.randint(0, self.seen + 1, (1,), generator=generator))
                if slot < self.size:
                    for name in ("features", "true_rewards", "observations", "actions"):
                        getattr(self.clips, name)[slot] = getattr(one, name)[0]
            self.seen += 1

    def state_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "clips": self.clips.state_dict() if self.clips is not None else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = int(state["seen"])
        self.clips = Clips.from_state(state["clips"]) if state["clips"] is not None else None
