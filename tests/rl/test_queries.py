import math

import pytest
import torch
from torch.testing import assert_close

from lightrlhf.rl.queries import disagreement_scores, pearson, query_schedule, ucb_scores


def test_disagreement_is_the_std_of_the_members_probabilities():
    # pair 0: members say d = 0 and d = ln 3: P = 0.5 and 0.75, population std = 0.125
    # pair 1: both members say d = 1: no disagreement, however sure they are
    a = torch.tensor([[0.0, 1.0], [math.log(3.0), 1.0]])
    b = torch.zeros(2, 2)
    assert_close(disagreement_scores(a, b), torch.tensor([0.125, 0.0]), rtol=0, atol=1e-6)


def test_disagreement_ignores_a_member_offset():
    a, b = torch.tensor([[1.0], [11.0]]), torch.tensor([[0.0], [10.0]])  # member 2 adds 10 to everything
    assert disagreement_scores(a, b).item() == 0.0


def test_ucb_by_hand():
    # two members, three clips; member 2 = member 1 scaled and shifted, except clip 2
    returns = torch.tensor([[0.0, 1.0, 2.0], [10.0, 30.0, 20.0]])
    # z (population std): member 1: [-1.2247, 0, 1.2247]; member 2: [-1.2247, 1.2247, 0]
    # u = mean + 1 * std over members: clip 0: -1.2247 + 0 ; clip 1: 0.6124 + 0.6124 ; clip 2: same
    z = math.sqrt(1.5)
    pairs = torch.tensor([[0, 1], [1, 2]])
    assert_close(ucb_scores(returns, pairs, kappa=1.0), torch.tensor([-z + z, 2 * z]), rtol=0, atol=1e-5)
    # kappa = 0: the mean standardised return alone
    assert_close(ucb_scores(returns, pairs, kappa=0.0), torch.tensor([-z + z / 2, z]), rtol=0, atol=1e-5)


def test_ucb_of_a_constant_member_is_zero_not_nan():
    out = ucb_scores(torch.tensor([[1.0, 1.0]]), torch.tensor([[0, 1]]), 1.0)
    assert out.item() == 0.0


def test_query_schedule_by_hand():
    # weights 1, 1/2, 1/3 (decay 1): shares of 11 = 6, 3, 2 exactly
    assert query_schedule(11, 3, 1.0) == [6, 3, 2]
    # decay 0: even; 10 over 3 rounds = 3.33 each, the remainder to the earliest round
    assert query_schedule(10, 3, 0.0) == [4, 3, 3]
    counts = query_schedule(400, 20, 0.25)
    assert sum(counts) == 400 and counts == sorted(counts, reverse=True)
    assert query_schedule(0, 4, 0.5) == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        query_schedule(10, 0, 0.5)


def test_pearson_by_hand():
    assert_close(pearson(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 4.0, 7.0])),
                 torch.tensor(0.99339927), rtol=0, atol=1e-6)
    assert pearson(torch.tensor([1.0, 1.0]), torch.tensor([0.0, 5.0])).item() == 0.0
