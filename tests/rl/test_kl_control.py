import pytest

from lightrlhf.errors import ConfigValueError
from lightrlhf.rl import AdaptiveKLController, FixedKLController


def test_fixed_controller_never_moves_and_round_trips():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=512)
    assert ctl.value == 0.05
    resumed = FixedKLController(0.2)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == 0.05


@pytest.mark.parametrize(
    "current_kl,expected",
    [
        (6.6, 0.101),  # e = 6.6/6 - 1 = 0.1 ; 0.1 * (1 + 0.1 * 100/1000) = 0.101
        (5.4, 0.099),  # e = -0.1 ; 0.1 * (1 - 0.01) = 0.099
        (60.0, 0.102),  # e = 9, clipped to 0.2 ; 0.1 * (1 + 0.02) = 0.102
        (0.0, 0.098),  # e = -1, clipped to -0.2 ; 0.1 * (1 - 0.02) = 0.098
        (6.0, 0.1),  # on target: unchanged
    ],
)
def test_adaptive_update_by_hand(current_kl, expected):
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl, n_steps=100)
    assert ctl.value == pytest.approx(expected, rel=1e-12)


def test_adaptive_updates_compound_and_resume_continues():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=1000)
    ctl.update(60.0, n_steps=100)
    ctl.update(60.0, n_steps=100)
    # 0.1 * 1.02 * 1.02 = 0.10404
    assert ctl.value == pytest.approx(0.10404, rel=1e-12)
    resumed = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=1000)
    resumed.load_state_dict(ctl.state_dict())
    resumed.update(60.0, n_steps=100)
    # 0.10404 * 1.02 = 0.1061208
    assert resumed.value == pytest.approx(0.1061208, rel=1e-12)


@pytest.mark.parametrize(
    "kwargs,param",
    [
        ({"init_coef": -0.1, "target": 6.0, "horizon": 1000}, "init_coef"),
        ({"init_coef": 0.1, "target": 0.0, "horizon": 1000}, "target"),
        ({"init_coef": 0.1, "target": 6.0, "horizon": 0}, "horizon"),
    ],
)
def test_adaptive_rejects_bad_arguments(kwargs, param):
    with pytest.raises(ConfigValueError) as err:
        AdaptiveKLController(**kwargs)
    assert err.value.param == param


def test_fixed_rejects_negative_coef():
    with pytest.raises(ConfigValueError) as err:
        FixedKLController(-1.0)
    assert err.value.param == "coef"
