import io

import torch
from torch.testing import assert_close

from lightrlhf.rl import RunningMeanStd


def _fed(*batches):
    rms = RunningMeanStd()
    for batch in batches:
        rms.update(torch.tensor(batch))
    return rms


def test_two_batches_merge_to_the_stats_of_their_union():
    rms = _fed([1.0, 2.0, 3.0], [4.0, 5.0])
    # [1, 2, 3]: mean 2, var 2/3 ; [4, 5]: mean 4.5, var 0.25 ; delta = 2.5, n = 5
    # mean = 2 + 2.5 * 2/5 = 3
    # var = (2/3*3 + 0.25*2 + 2.5^2 * 3*2/5) / 5 = (2 + 0.5 + 7.5) / 5 = 2
    # which is the population variance of 1..5: (4 + 1 + 0 + 1 + 4) / 5 = 2
    assert rms.count == 5
    assert abs(rms.mean - 3.0) < 1e-12
    assert abs(rms.var - 2.0) < 1e-12
    assert abs(rms.std - 2.0**0.5) < 1e-12


def test_any_shape_is_flattened_and_empty_is_ignored():
    rms = _fed([[1.0, 2.0], [3.0, 4.0]], [])
    # 1..4: mean 2.5, var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert (rms.count, rms.mean, rms.var) == (4, 2.5, 1.25)


def test_normalize_and_clip():
    rms = _fed([1.0, 2.0, 3.0, 4.0, 5.0])
    x = torch.tensor([3.0, 5.0, 100.0])
    # (x - 3) / sqrt(2) = [0, 1.414214, 68.589357]
    assert_close(rms.normalize(x), torch.tensor([0.0, 1.414214, 68.589357]), rtol=0, atol=1e-4)
    assert_close(rms.normalize(x, clip=5.0), torch.tensor([0.0, 1.414214, 5.0]), rtol=0, atol=1e-5)
    # clip bounds both sides: (-100 - 3) / sqrt(2) = -72.8 -> -5
    assert rms.normalize(torch.tensor([-100.0]), clip=5.0).item() == -5.0


def test_normalize_before_any_update_returns_input_unchanged():
    rms = RunningMeanStd()
    x = torch.tensor([10.0, -10.0])
    assert rms.count == 0
    assert torch.equal(rms.normalize(x, clip=1.0), x)


def test_state_round_trips_through_a_weights_only_checkpoint():
    rms = _fed([1.0, 2.0, 3.0])
    buffer = io.BytesIO()
    torch.save({"rms": rms.state_dict()}, buffer)
    buffer.seek(0)
    resumed = RunningMeanStd()
    resumed.load_state_dict(torch.load(buffer, weights_only=True)["rms"])
    assert (resumed.count, resumed.mean, resumed.var) == (rms.count, rms.mean, rms.var)
    # the resumed stream continues exactly as the original would: [4, 5] -> mean 3, var 2
    resumed.update(torch.tensor([4.0, 5.0]))
    assert abs(resumed.mean - 3.0) < 1e-12 and abs(resumed.var - 2.0) < 1e-12
