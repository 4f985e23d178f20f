"""Control tasks for preference-based RL: gymnasium 1.x environments, vectorised.

Two versions of each task:

- training: a *fixed-horizon* variant with no early termination. Every episode lasts exactly
  `horizon` steps, so any two clips of the same length are comparable: with CartPole's usual early
  termination a clip that contains a fall would simply be shorter, and its length alone would give the
  answer away (Christiano et al. 2017, appendix A, replaced termination by a penalty for the same
  reason). In the CartPole variant a fall does not end the episode: the physics goes on (the pole
  swings down, the cart rolls) for `fall_steps` steps, then the cart is set back at a fresh start, as a
  person would put the pole back up. The hidden true reward is CartPole-v1's, 1 per step while the
  pole is within 12 degrees of upright and the cart within 2.4, and 0 for the steps of a fall, so a fall
  costs `fall_steps` steps of reward and a clip's return counts the steps it spends balanced. (The
  `seals` variant of Gleave et al. 2020 never puts the pole back: a clumsy policy then spends almost the
  whole episode fallen, most clips of it score 0 and nearly every comparison is a tie.) The pole angle in
  the observation is wrapped to [-pi, pi); inside the +-12 degrees evaluation sees it is unchanged.
  Pendulum-v1 never terminates early: its variant is Pendulum-v1 with the time limit set to `horizon`.
- evaluation: the standard environment (CartPole-v1: 500 steps at most, early termination, "solved"
  at an average return of 475), run with the deterministic policy.

The agent never sees the true reward: the training environment returns it, and the stage keeps it
aside for the simulated teachers and the logs (or trains on it with `reward=true`, the baseline).

Vector environments are gymnasium's `SyncVectorEnv` (for environments this cheap, one process beats
worker processes) in `same-step` autoreset mode: the step that ends an episode returns the next
episode's first observation and the final one in `info["final_obs"]`, so a time-limit end can be
bootstrapped from the value of the true final observation.

Checkpoints: a killed run resumes with the training environments exactly where they were (state,
random generator, time-limit counter), so its curves equal an uninterrupted run's (`env_state`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from lightrlhf.validation import positive, require

TaskName = Literal["cartpole", "pendulum"]
TASKS = ("cartpole", "pendulum")


@dataclass(frozen=True)
class EnvSpec:
    """One control task (conf/env/*.yaml).

    task: cartpole or pendulum. horizon: steps of every training episode (fixed, no early end).
    num_envs: environments stepped together in training. eval_episodes: episodes of the deterministic
    evaluation on the standard environment, one per evaluation environment, seeded eval_seed + i.
    fall_steps: CartPole only, steps a fallen pole stays down before a fresh start (module docstring).
    solved_return: the evaluation return at which the task counts as solved (CartPole-v1: 475); null: none.
    """

    task: TaskName
    horizon: int
    num_envs: int
    eval_episodes: int
    eval_seed: int
    fall_steps: int = 0
    solved_return: float | None = None

    def __post_init__(self) -> None:
        require(self.task in TASKS, "task", f"must be one of {list(TASKS)}, got {self.task!r}")
        positive("horizon", self.horizon)
        positive("num_envs", self.num_envs)
        positive("eval_episodes", self.eval_episodes)
        require(self.task == "cartpole" or self.fall_steps == 0, "fall_steps", "only CartPole falls")
        require(self.task != "cartpole" or self.fall_steps > 0, "fall_steps", f"must be > 0, got {self.fall_steps}")

    @property
    def gym_id(self) -> str:
        return {"cartpole": "CartPole-v1", "pendulum": "Pendulum-v1"}[self.task]

    @property
    def discrete(self) -> bool:
        return self.task == "cartpole"

    @property
    def step_reward_range(self) -> tuple[float, float]:
        """Bounds of the true reward of one step: what the simulated teachers' thresholds are fractions of."""
        if self.task == "cartpole":
            return 0.0, 1.0
        # Pendulum-v1: -(theta^2 + 0.1 thetadot^2 + 0.001 u^2), theta in [-pi, pi], |thetadot| <= 8, |u| <= 2
        return -(math.pi ** 2 + 0.1 * 8 ** 2 + 0.001 * 2 ** 2), 0.0


def _fixed_horizon_cartpole_class():
    from gymnasium.envs.classic_control.cartpole import CartPoleEnv

    class FixedHorizonCartPole(CartPoleEnv):
        """CartPole without early termination (module docstring): after a fall the physics goes on for
        `fall_steps` steps at reward 0, then the cart is set back at a fresh start."""

        def __init__(self, fall_steps: int, render_mode: str | None = None) -> None:
            super().__init__(render_mode=render_mode)
            self.fall_steps, self.down_for = fall_steps, 0

        def reset(self, *, seed: int | None = None, options: dict | None = None):
            self.down_for = 0
            return super().reset(seed=seed, options=options)

        def step(self, action):
            # detail: CartPoleEnv warns and pays 0 once it has terminated; starting each step from
            # "not terminated" keeps its termination flag the out-of-bounds test of the new state.
            self.steps_beyond_terminated = None
            obs, _, out_of_bounds, _, info = super().step(action)
            down = self.down_for > 0 or out_of_bounds
            self.down_for += int(down)
            if self.down_for >= self.fall_steps:  # down long enough: the cart is set back at a fresh start
                self.down_for = 0
                self.state = self.np_random.uniform(low=-0.05, high=0.05, size=(4,))
                obs = np.array(self.state, dtype=np.float32)
            obs[2] = wrap_angle(float(obs[2]))
            return obs, 0.0 if down else 1.0, False, False, info

    return FixedHorizonCartPole


def wrap_angle(theta: float) -> float:
    """theta mapped to [-pi, pi)."""
    return (theta + math.pi) % (2 * math.pi) - math.pi


def make_training_envs(spec: EnvSpec, render: bool = False):
    """The fixed-horizon training variant, `spec.num_envs` of them (reset them with a seed before use)."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv
    from gymnasium.wrappers import TimeLimit

    mode = "rgb_array" if render else None
    if spec.task == "cartpole":
        cls = _fixed_horizon_cartpole_class()
        make = lambda: TimeLimit(cls(spec.fall_steps, render_mode=mode), spec.horizon)  # noqa: E731
    else:
        make = lambda: gym.make("Pendulum-v1", max_episode_steps=spec.horizon, render_mode=mode,  # noqa: E731
                                disable_env_checker=True)
    return SyncVectorEnv([make for _ in range(spec.num_envs)], autoreset_mode=AutoresetMode.SAME_STEP)


def make_eval_envs(spec: EnvSpec):
    """The standard environment, one per evaluation episode."""
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode, SyncVectorEnv

    make = lambda: gym.make(spec.gym_id, disable_env_checker=True)  # noqa: E731
    return SyncVectorEnv([make for _ in range(spec.eval_episodes)], autoreset_mode=AutoresetMode.SAME_STEP)


def to_env_actions(spec: EnvSpec, actions: torch.Tensor, low: np.ndarray | None = None,
                   high: np.ndarray | None = None) -> np.ndarray:
    """The policy's actions as the environment takes them: integers, or clipped to the action bounds
    (a Gaussian policy's sample is unbounded; its log-probability stays that of the unclipped sample)."""
    if spec.discrete:
        return actions.numpy().astype(np.int64)
    return np.clip(actions.numpy(), low, high).astype(np.float32)


# -- checkpoints: the training environments' exact state -------------------------------------------
_STATE_ATTRIBUTES = ("state", "last_u", "steps_beyond_terminated", "down_for")


def env_state(envs: Any) -> dict[str, Any]:
    """Each sub-environment's physical state, random generator and time-limit counter, as plain values
    and tensors (checkpoints load with torch.load(weights_only=True))."""
    states = []
    for env in envs.envs:
        inner = env.unwrapped
        entry = {"elapsed": int(_time_limit(env)._elapsed_steps or 0), "rng": inner.np_random.bit_generator.state}
        for name in _STATE_ATTRIBUTES:
            value = getattr(inner, name, None)
            entry[name] = torch.from_numpy(np.array(value, dtype=np.float64)) if isinstance(value, np.ndarray) \
                else value
        states.append(entry)
    return {"envs": states}


def load_env_state(envs: Any, state: dict[str, Any]) -> None:
    for env, entry in zip(envs.envs, state["envs"], strict=True):
        inner = env.unwrapped
        inner.np_random.bit_generator.state = entry["rng"]
        _time_limit(env)._elapsed_steps = entry["elapsed"]
        for name in _STATE_ATTRIBUTES:
            if hasattr(inner, name):
                value = entry[name]
                setattr(inner, name, value.numpy().copy() if torch.is_tensor(value) else value)


def _time_limit(env: Any) -> Any:
    from gymnasium.wrappers import TimeLimit

    while not isinstance(env, TimeLimit):
        env = env.env
    return env


# -- rendering a clip (the human teacher) ----------------------------------------------------------
def set_render_state(spec: EnvSpec, env: Any, observation: np.ndarray, action: np.ndarray) -> None:
    """Put a single environment in the state an observation describes, for `render()`: CartPole's
    observation is its state; Pendulum's (cos, sin, thetadot) gives (theta, thetadot), and the action
    is drawn as the torque arrow."""
    inner = env.unwrapped
    if spec.task == "cartpole":
        inner.state = np.array(observation, dtype=np.float64)
    else:
        inner.state = np.array([math.atan2(observation[1], observation[0]), observation[2]], dtype=np.float64)
        inner.last_u = float(np.asarray(action).reshape(-1)[0])
