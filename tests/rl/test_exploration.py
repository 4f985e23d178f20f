import math

import torch
from torch.testing import assert_close

from lightrlhf.rl.exploration import epsilon_greedy_logprobs, epsilon_greedy_sample, linear_decay


def test_epsilon_greedy_logprob_by_hand():
    # pi = softmax([ln 3, 0]) = [0.75, 0.25]; eps = 0.2, n = 2: mu = 0.8 * pi + 0.1 = [0.7, 0.3]
    logits = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])
    out = epsilon_greedy_logprobs(logits, torch.tensor([0, 1]), 0.2)
    assert_close(out, torch.tensor([math.log(0.7), math.log(0.3)]), rtol=0, atol=1e-6)
    # eps = 0 is the policy itself
    assert_close(epsilon_greedy_logprobs(logits, torch.tensor([0, 1]), 0.0),
                 torch.tensor([math.log(0.75), math.log(0.25)]), rtol=0, atol=1e-6)


def test_a_vanishing_policy_probability_keeps_the_uniform_share():
    # pi(a=1) = e^-200 underflows; mu(a=1) = eps / n = 0.05 still
    out = epsilon_greedy_logprobs(torch.tensor([[0.0, -200.0]]), torch.tensor([1]), 0.1)
    assert_close(out, torch.tensor([math.log(0.05)]), rtol=0, atol=1e-6)


def test_gradient_flows_into_the_policy_through_the_mixture():
    logits = torch.tensor([[0.0, 0.0]], requires_grad=True)
    epsilon_greedy_logprobs(logits, torch.tensor([0]), 0.5).sum().backward()
    # mu_0 = 0.5 * sigmoid(z0 - z1) + 0.25; d log mu_0 / d z0 = 0.5 * 0.25 / 0.5 = 0.25, and -0.25 for z1
    assert_close(logits.grad, torch.tensor([[0.25, -0.25]]), rtol=0, atol=1e-6)


def test_sampling_follows_the_mixture():
    generator = torch.Generator().manual_seed(0)
    logits = torch.tensor([[20.0, 0.0, 0.0, 0.0]]).expand(20000, 4)  # the policy always picks 0
    actions = epsilon_greedy_sample(logits, 0.4, generator)
    # mu = 0.6 + 0.1 for action 0, 0.1 for each other
    freq = torch.bincount(actions, minlength=4).float() / len(actions)
    assert_close(freq, torch.tensor([0.7, 0.1, 0.1, 0.1]), rtol=0, atol=0.015)
    assert (epsilon_greedy_sample(logits[:100], 0.0, generator) == 0).all()


def test_linear_decay():
    assert linear_decay(0.1, 0.0, 0.0) == 0.1
    assert abs(linear_decay(0.1, 0.0, 0.25) - 0.075) < 1e-12
    assert linear_decay(0.1, 0.0, 1.0) == 0.0 and linear_decay(0.1, 0.0, 3.0) == 0.0
