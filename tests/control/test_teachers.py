"""B-Pref's six simulated teachers, each on clips whose true returns are worked out by hand."""

import math

import pytest
import torch

from lightrlhf.control.teachers import TeacherSpec, scripted_answers, targets_from_choices

RANGE = (0.0, 1.0)  # CartPole's per-step reward bounds: a 4-step clip's return is in [0, 4]


def answers(spec, a, b, seed=0):
    return scripted_answers(spec, torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), RANGE,
                            torch.Generator().manual_seed(seed))


def test_oracle_prefers_the_larger_true_return_and_calls_equal_returns_a_tie():
    a = [[1, 1, 1, 0], [0, 0, 1, 1], [1, 1, 0, 0]]
    b = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 1, 1]]
    # returns 3 vs 2, 2 vs 3, 2 vs 2
    assert answers(TeacherSpec(), a, b) == ["a", "b", "tie"]


def test_noisy_teacher_answers_with_bradley_terry_probabilities():
    # return difference 1 (a = 2, b = 1) with beta = 1: P(a) = sigmoid(1) = 0.7311
    n = 20000
    got = answers(TeacherSpec(beta=1.0), [[1, 1, 0, 0]] * n, [[1, 0, 0, 0]] * n)
    assert abs(got.count("a") / n - 1 / (1 + math.exp(-1))) < 0.01
    # equal returns: a coin flip, never a tie
    even = answers(TeacherSpec(beta=1.0), [[1, 0, 0, 0]] * n, [[0, 1, 0, 0]] * n)
    assert "tie" not in even and abs(even.count("a") / n - 0.5) < 0.01
    # a large beta is the oracle
    assert answers(TeacherSpec(beta=50.0), [[1, 1, 0, 0]] * 100, [[1, 0, 0, 0]] * 100) == ["a"] * 100


def test_mistake_teacher_flips_with_probability_epsilon():
    n = 20000
    got = answers(TeacherSpec(mistake=0.25), [[1, 1, 0, 0]] * n, [[1, 0, 0, 0]] * n)
    assert abs(got.count("b") / n - 0.25) < 0.01
    assert answers(TeacherSpec(mistake=1.0), [[1, 1, 0, 0]], [[1, 0, 0, 0]]) == ["b"]


def test_skip_teacher_skips_pairs_where_neither_clip_is_good_enough():
    # threshold 0.5 of the range [0, 4]: skip when both returns are below 2
    spec = TeacherSpec(skip_threshold=0.5)
    assert answers(spec, [[1, 0, 0, 0], [1, 1, 0, 0]], [[0, 0, 0, 0], [0, 0, 0, 0]]) == ["skip", "a"]


def test_myopic_teacher_weighs_the_end_of_the_clip_most():
    # equal sums (1 each) -- the oracle says tie -- but with gamma = 0.5 step t of 4 weighs 0.5^(3 - t):
    # a = 0.125 (balanced at the start), b = 1 (balanced at the end)
    assert answers(TeacherSpec(), [[1, 0, 0, 0]], [[0, 0, 0, 1]]) == ["tie"]
    assert answers(TeacherSpec(gamma=0.5), [[1, 0, 0, 0]], [[0, 0, 0, 1]]) == ["b"]
    # it can overturn a larger return: a = 0.5 + 1 = 1.5 (sum 2), b = 0.125 + 0.25 + 0.5 = 0.875 (sum 3)
    assert answers(TeacherSpec(), [[0, 0, 1, 1]], [[1, 1, 1, 0]]) == ["b"]
    assert answers(TeacherSpec(gamma=0.5), [[0, 0, 1, 1]], [[1, 1, 1, 0]]) == ["a"]


def test_equal_teacher_calls_close_pairs_a_tie():
    # threshold 0.3 of the range 4 = 1.2: returns 3 vs 2 differ by 1 -> tie; 4 vs 2 -> a
    spec = TeacherSpec(equal_threshold=0.3)
    assert answers(spec, [[1, 1, 1, 0], [1, 1, 1, 1]], [[1, 1, 0, 0], [1, 1, 0, 0]]) == ["tie", "a"]


def test_answers_depend_on_the_seed_only():
    spec, a, b = TeacherSpec(beta=1.0, mistake=0.1), [[1, 1, 0, 0]] * 50, [[1, 0, 0, 0]] * 50
    assert answers(spec, a, b, seed=3) == answers(spec, a, b, seed=3) != answers(spec, a, b, seed=4)


def test_choices_become_targets_and_unusable_answers_are_dropped():
    targets, kept = targets_from_choices(["a", "b", "tie", "skip", "both_bad"])
    assert targets[:3].tolist() == [1.0, 0.0, 0.5]
    assert kept.tolist() == [True, True, True, False, False]


@pytest.mark.parametrize("key,value", [("beta", 0.0), ("gamma", 1.5), ("mistake", -0.1), ("skip_threshold", 2.0)])
def test_bad_teacher_settings_name_the_key(key, value):
    from lightrlhf.errors import ConfigValueError

    with pytest.raises(ConfigValueError) as error:
        TeacherSpec(**{key: value})
    assert error.value.param == key
