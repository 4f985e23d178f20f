"""The parts of stage=pbrl below the stage: environments, clips, the held-out reservoir, the networks."""

import numpy as np
import pytest
import torch

from lightrlhf.control.clips import ClipReservoir, Clips, clip_windows, cut_clips
from lightrlhf.control.envs import EnvSpec, env_state, load_env_state, make_eval_envs, make_training_envs
from lightrlhf.control.networks import EnsembleRewardModel

CARTPOLE = EnvSpec(task="cartpole", horizon=30, num_envs=2, eval_episodes=2, eval_seed=0, fall_steps=5)


def test_clip_windows_stay_inside_one_episode():
    dones = torch.zeros(6, 2, dtype=torch.bool)
    dones[2, 0] = True  # environment 0: an episode ends at step 2, the next starts at 3
    # length 3: env 0 fits at 0 (0, 1, 2: the end is its last step) and 3 (3, 4, 5), not at 1 or 2; env 1 anywhere
    assert clip_windows(dones, 3).tolist() == [[0, 0], [3, 0], [0, 1], [1, 1], [2, 1], [3, 1]]
    assert clip_windows(dones, 7).shape == (0, 2)


def test_cut_clips_takes_the_steps_of_each_window():
    steps = torch.arange(12.0).reshape(6, 2)  # value = 2 * step + env
    clips = cut_clips(torch.tensor([[1, 0], [3, 1]]), 2, steps.unsqueeze(-1), steps, steps.unsqueeze(-1), steps)
    assert clips.true_rewards.tolist() == [[2.0, 4.0], [7.0, 9.0]]
    assert clips.features.shape == (2, 2, 1)


def _clips(values):
    t = torch.tensor(values, dtype=torch.float32).reshape(-1, 1)
    return Clips(t.unsqueeze(-1), t, t.unsqueeze(-1), t)


def test_the_reservoir_keeps_a_uniform_sample_of_everything_offered():
    counts = torch.zeros(20)
    for seed in range(300):
        reservoir = ClipReservoir(5)
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, 20, 4):
            reservoir.offer(_clips(range(start, start + 4)), generator)
        assert reservoir.seen == 20 and len(reservoir.clips) == 5
        counts[reservoir.clips.true_rewards.long().flatten()] += 1
    # each of the 20 clips is kept with probability 5 / 20: 75 of 300 times on average
    assert counts.min() > 45 and counts.max() < 110, counts
    state = reservoir.state_dict()
    again = ClipReservoir(5)
    again.load_state_dict(state)
    assert again.seen == 20 and torch.equal(again.clips.features, reservoir.clips.features)


def test_the_fixed_horizon_cartpole_never_ends_early_and_pays_zero_while_the_pole_is_down():
    envs = make_training_envs(CARTPOLE)
    envs.reset(seed=0)
    rewards, ends = [], []
    for _ in range(CARTPOLE.horizon):
        _, reward, terminated, truncated, _ = envs.step(np.zeros(2, dtype=np.int64))  # always push left: falls fast
        rewards.append(reward.copy())
        ends.append(terminated | truncated)
    rewards, ends = np.array(rewards), np.array(ends)
    assert not ends[:-1].any() and ends[-1].all()  # only the time limit ends an episode
    first_fall = int(np.argmin(rewards[:, 0]))
    # the fall costs exactly fall_steps steps of reward, then the cart starts afresh
    assert rewards[first_fall:first_fall + CARTPOLE.fall_steps, 0].sum() == 0
    assert rewards[first_fall + CARTPOLE.fall_steps, 0] == 1


def test_the_training_environments_resume_exactly_from_their_state(tmp_path):
    envs, copy = make_training_envs(CARTPOLE), make_training_envs(CARTPOLE)
    envs.reset(seed=3)
    copy.reset(seed=99)
    actions = np.random.default_rng(0).integers(0, 2, size=(60, 2))
    for a in actions[:17]:
        envs.step(a)
    torch.save(env_state(envs), tmp_path / "state.pt")
    load_env_state(copy, torch.load(tmp_path / "state.pt", weights_only=True))  # as a checkpoint loads
    for a in actions[17:]:  # through a fall and a time-limit end: the same observations and rewards
        one, two = envs.step(a), copy.step(a)
        assert np.array_equal(one[0], two[0]) and np.array_equal(one[1], two[1])


def test_evaluation_runs_the_standard_environment():
    envs = make_eval_envs(CARTPOLE)
    assert envs.envs[0].spec.id == "CartPole-v1" and envs.envs[0].spec.max_episode_steps == 500


def test_the_stacked_ensemble_equals_its_members_one_by_one():
    torch.manual_seed(0)
    model = EnsembleRewardModel(input_dim=6, members=3, hidden=8)
    x = torch.randn(10, 6)
    model.set_input_stats(x)
    out = model(x)
    for k in range(3):
        h = (x - model.input_mean) / model.input_std
        for i, (w, b) in enumerate(zip(model.weights, model.biases)):
            h = h @ w[k] + b[k]
            if i < 2:
                h = torch.nn.functional.leaky_relu(h, 0.01)
        torch.testing.assert_close(out[k], h.squeeze(-1), rtol=1e-5, atol=1e-6)
    # each member's own inputs: [K, N, D]
    own = torch.randn(3, 4, 6)
    assert model(own).shape == (3, 4)
    torch.testing.assert_close(model(own)[1], model(own[1])[1])


@pytest.mark.parametrize("kwargs,key", [({"task": "mountaincar"}, "task"), ({"fall_steps": 0}, "fall_steps"),
                                        ({"horizon": 0}, "horizon")])
def test_bad_env_settings_name_the_key(kwargs, key):
    from lightrlhf.errors import ConfigValueError

    settings = {"task": "cartpole", "horizon": 10, "num_envs": 1, "eval_episodes": 1, "eval_seed": 0, "fall_steps": 3}
    with pytest.raises(ConfigValueError) as error:
        EnvSpec(**{**settings, **kwargs})
    assert error.value.param == key
