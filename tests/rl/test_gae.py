import torch
from torch.testing import assert_close

from lightrlhf.rl import gae, last_valid_index


def test_gae_by_hand_with_padding_and_single_token():
    # Row 0: three valid tokens; row 1: one valid token. Padding holds junk that must be ignored.
    rewards = torch.tensor([[0.0, 0.0, 1.0, 7.0], [2.0, 5.0, 5.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.2, 9.0], [0.5, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.5)
    # row 0, gamma*lam = 0.45, V after the last token = 0 (terminal):
    #   delta_2 = 1 + 0.9*0 - 0.2 = 0.8           A_2 = 0.8
    #   delta_1 = 0 + 0.9*0.2 - 0.4 = -0.22       A_1 = -0.22 + 0.45*0.8 = 0.14
    #   delta_0 = 0 + 0.9*0.4 - 0.5 = -0.14       A_0 = -0.14 + 0.45*0.14 = -0.077
    #   R = A + V = [-0.077 + 0.5, 0.14 + 0.4, 0.8 + 0.2] = [0.423, 0.54, 1.0]
    # row 1: A_0 = delta_0 = 2 - 0.5 = 1.5, R_0 = 2
    expected_adv = torch.tensor([[-0.077, 0.14, 0.8, 0.0], [1.5, 0.0, 0.0, 0.0]])
    expected_ret = torch.tensor([[0.423, 0.54, 1.0, 0.0], [2.0, 0.0, 0.0, 0.0]])
    assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert_close(ret, expected_ret, rtol=0, atol=1e-6)
    padding = ~mask.bool()
    assert (adv[padding] == 0).all() and (ret[padding] == 0).all()


def test_gamma_and_lam_one_give_monte_carlo_returns():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    # R_t = sum of rewards from t: [0.6, 0.5, 0.3] ; A = R - V = [-0.4, -1.5, -2.7]
    # (check A_1 = delta_1 + delta_2 = (0.2 + 3 - 2) + (0.3 - 3) = 1.2 - 2.7 = -1.5)
    assert_close(ret, torch.tensor([[0.6, 0.5, 0.3]]), rtol=0, atol=1e-6)
    assert_close(adv, torch.tensor([[-0.4, -1.5, -2.7]]), rtol=0, atol=1e-6)


def test_lam_zero_gives_one_step_td():
    rewards = torch.tensor([[0.1, 0.2, 0.3]])
    values = torch.tensor([[1.0, 2.0, 3.0]])
    adv, _ = gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.0)
    # A_t = delta_t: [0.1 + 0.5*2 - 1, 0.2 + 0.5*3 - 2, 0.3 - 3] = [0.1, -0.3, -2.7]
    assert_close(adv, torch.tensor([[0.1, -0.3, -2.7]]), rtol=0, atol=1e-6)


def test_all_masked_row_is_zero():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [1.0, 2.0, 3.0]])
    values = torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]])
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    # row 0: R = [6, 5, 3], A = R - 0.5 ; row 1 has no response at all
    assert_close(ret[0], torch.tensor([6.0, 5.0, 3.0]), rtol=0, atol=1e-6)
    assert_close(adv[0], torch.tensor([5.5, 4.5, 2.5]), rtol=0, atol=1e-6)
    assert (adv[1] == 0).all() and (ret[1] == 0).all()


def test_done_in_the_middle_splits_a_row_into_two_episodes():
    # One environment, four steps; the first episode ends at step 1, the second at step 3.
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0]])
    values = torch.tensor([[0.5, 0.5, 1.0, 1.0]])
    dones = torch.tensor([[0, 1, 0, 1]])
    adv, ret = gae(rewards, values, torch.ones(1, 4), gamma=0.9, lam=0.8, dones=dones,
                   next_value=torch.tensor([5.0]))
    # gamma*lam = 0.72 ; the last step is terminal, so next_value = 5 is not used:
    #   t=3 done: delta_3 = 2 - 1 = 1                         A_3 = 1
    #   t=2:      delta_2 = 0 + 0.9*1.0 - 1.0 = -0.1          A_2 = -0.1 + 0.72*1 = 0.62
    #   t=1 done: delta_1 = 1 - 0.5 = 0.5 (V_2 unused)        A_1 = 0.5 (A_2 unused)
    #   t=0:      delta_0 = 0 + 0.9*0.5 - 0.5 = -0.05         A_0 = -0.05 + 0.72*0.5 = 0.31
    #   R = A + V = [0.81, 1.0, 1.62, 2.0]
    assert_close(adv, torch.tensor([[0.31, 0.5, 0.62, 1.0]]), rtol=0, atol=1e-6)
    assert_close(ret, torch.tensor([[0.81, 1.0, 1.62, 2.0]]), rtol=0, atol=1e-6)


def test_truncated_row_bootstraps_from_next_value():
    # Row 0 is cut by the horizon (no done) and bootstraps V(s_T) = 2. Row 1 ends at its last step
    # and row 2 at padding: both ignore their next_value of 7.
    rewards = torch.tensor([[1.0, 0.0, 1.0], [1.0, 0.0, 1.0], [1.0, 0.0, 9.0]])
    values = torch.tensor([[1.0, 2.0, 1.0], [1.0, 2.0, 1.0], [1.0, 2.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 1], [1, 1, 0]])
    dones = torch.tensor([[0, 0, 0], [0, 0, 1], [0, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8, dones=dones, next_value=torch.tensor([2.0, 7.0, 7.0]))
    # gamma*lam = 0.72
    # row 0: delta_2 = 1 + 0.9*2 - 1 = 1.8                  A_2 = 1.8
    #        delta_1 = 0 + 0.9*1 - 2 = -1.1                 A_1 = -1.1 + 0.72*1.8 = 0.196
    #        delta_0 = 1 + 0.9*2 - 1 = 1.8                  A_0 = 1.8 + 0.72*0.196 = 1.94112
    #        R = [2.94112, 2.196, 2.8]
    # row 1: delta_2 = 1 - 1 = 0 (done)                     A_2 = 0
    #        delta_1 = -1.1                                 A_1 = -1.1
    #        delta_0 = 1.8                                  A_0 = 1.8 + 0.72*(-1.1) = 1.008
    #        R = [2.008, 0.9, 1.0]
    # row 2: delta_1 = 0 + 0.9*0 - 2 = -2 (padding next)    A_1 = -2
    #        delta_0 = 1.8                                  A_0 = 1.8 + 0.72*(-2) = 0.36
    #        R = [1.36, 0.0, 0 (padding)]
    expected_adv = torch.tensor([[1.94112, 0.196, 1.8], [1.008, -1.1, 0.0], [0.36, -2.0, 0.0]])
    expected_ret = torch.tensor([[2.94112, 2.196, 2.8], [2.008, 0.9, 1.0], [1.36, 0.0, 0.0]])
    assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert_close(ret, expected_ret, rtol=0, atol=1e-6)


def _cleanrl_gae(rewards, values, dones, next_value, gamma, lam):
    """cleanrl ppo.py's loop, time-major [T, N]. cleanrl stores at step t the done flag of the
    observation it acted on (True if the previous step ended an episode), so its dones[t + 1] is
    our done_t and its next_done is our done_{T-1}."""
    rewards, values = rewards.T, values.T
    num_steps = rewards.shape[0]
    cleanrl_dones = torch.cat([torch.zeros_like(dones[:, :1]), dones[:, :-1]], dim=1).T.float()
    next_done = dones[:, -1].float()
    advantages = torch.zeros_like(rewards)
    lastgaelam = 0
    for t in reversed(range(num_steps)):
        if t == num_steps - 1:
            nextnonterminal = 1.0 - next_done
            nextvalues = next_value
        else:
            nextnonterminal = 1.0 - cleanrl_dones[t + 1]
            nextvalues = values[t + 1]
        delta = rewards[t] + gamma * nextvalues * nextnonterminal - values[t]
        advantages[t] = lastgaelam = delta + gamma * lam * nextnonterminal * lastgaelam
    returns = advantages + values
    return advantages.T, returns.T


def test_matches_cleanrl_loop_with_random_dones():
    generator = torch.Generator().manual_seed(0)
    envs, steps = 5, 13
    rewards = torch.randn(envs, steps, generator=generator)
    values = torch.randn(envs, steps, generator=generator)
    dones = torch.rand(envs, steps, generator=generator) < 0.2
    next_value = torch.randn(envs, generator=generator)
    assert dones.any() and not dones.all()
    adv, ret = gae(rewards, values, torch.ones(envs, steps), 0.99, 0.95, dones=dones, next_value=next_value)
    expected_adv, expected_ret = _cleanrl_gae(rewards, values, dones, next_value, 0.99, 0.95)
    assert_close(adv, expected_adv, rtol=0, atol=1e-6)
    assert_close(ret, expected_ret, rtol=0, atol=1e-6)


def test_text_case_is_done_at_last_valid_token_without_bootstrap():
    generator = torch.Generator().manual_seed(1)
    rewards = torch.randn(4, 6, generator=generator)
    values = torch.randn(4, 6, generator=generator)
    # ragged right padding, one full row and one empty row
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 0]])
    dones = torch.zeros(4, 6).scatter(1, last_valid_index(mask).unsqueeze(1), 1.0) * mask
    default = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    explicit = gae(rewards, values, mask, gamma=0.9, lam=0.8, dones=dones, next_value=torch.zeros(4))
    assert torch.equal(default[0], explicit[0]) and torch.equal(default[1], explicit[1])


def test_bootstrap_truncations_adds_the_discounted_final_value_only_where_cut():
    from lightrlhf.rl.gae import bootstrap_truncations

    rewards = torch.tensor([[1.0, 2.0, 3.0]])
    truncated = torch.tensor([[0, 1, 0]])
    final_values = torch.tensor([[100.0, 10.0, 100.0]])  # read only where truncated
    # 2 + 0.5 * 10 = 7 at the cut, the others unchanged
    out = bootstrap_truncations(rewards, truncated, final_values, gamma=0.5)
    assert_close(out, torch.tensor([[1.0, 7.0, 3.0]]), rtol=0, atol=0)


def test_a_time_limit_end_bootstraps_while_a_true_end_does_not():
    from lightrlhf.rl.gae import bootstrap_truncations

    # one environment, two episodes of two steps: the first cut by the time limit (V(final) = 4),
    # the second ends for real at the last step; gamma = 0.5, lam = 1
    rewards = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    values = torch.tensor([[2.0, 2.0, 2.0, 2.0]])
    dones = torch.tensor([[0, 1, 0, 1]])
    truncated = torch.tensor([[0, 1, 0, 0]])
    final_values = torch.tensor([[0.0, 4.0, 0.0, 0.0]])
    r = bootstrap_truncations(rewards, truncated, final_values, gamma=0.5)
    adv, ret = gae(r, values, torch.ones(1, 4), gamma=0.5, lam=1.0, dones=dones)
    # episode 1: R_1 = 1 + 0.5 * 4 = 3 ; R_0 = 1 + 0.5 * 3 = 2.5
    # episode 2: R_3 = 1 ; R_2 = 1 + 0.5 * 1 = 1.5
    assert_close(ret, torch.tensor([[2.5, 3.0, 1.5, 1.0]]), rtol=0, atol=1e-6)
    assert_close(adv, ret - values, rtol=0, atol=1e-6)
