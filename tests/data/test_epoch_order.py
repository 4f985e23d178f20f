"""The training order survives a checkpoint in any epoch: a StatefulDataLoader over EpochShuffleSampler,
stopped part-way through an epoch and restored into a fresh loader, yields what an uninterrupted one does."""

from __future__ import annotations

import pytest
from torchdata.stateful_dataloader import StatefulDataLoader

from lightrlhf.data.modules import EpochShuffleSampler


def _loader(size: int = 20, batch_size: int = 4) -> StatefulDataLoader:
    return StatefulDataLoader(list(range(size)), batch_size=batch_size, sampler=EpochShuffleSampler(size, seed=3))


def _epoch(loader: StatefulDataLoader, epoch: int) -> list[list[int]]:
    loader.sampler.set_epoch(epoch)
    return [batch.tolist() for batch in loader]


@pytest.mark.parametrize("epoch", [0, 1, 2])
@pytest.mark.parametrize("taken", [1, 3])
def test_a_restored_loader_finishes_the_epoch_in_that_epochs_order(epoch, taken):
    straight = _epoch(_loader(), epoch)
    stopped = _loader()
    stopped.sampler.set_epoch(epoch)
    batches = iter(stopped)
    seen = [next(batches).tolist() for _ in range(taken)]
    state = stopped.state_dict()

    # as Lightning resumes: the loader's state is loaded (drawing an order) before set_epoch is called
    resumed = _loader()
    resumed.load_state_dict(state)
    rest = [batch.tolist() for batch in resumed]
    assert seen + rest == straight
    # the next epoch is the uninterrupted run's next epoch
    assert _epoch(resumed, epoch + 1) == _epoch(_loader(), epoch + 1)


def test_each_epoch_is_a_permutation_of_its_own():
    loader = _loader()
    orders = [sum(_epoch(loader, e), []) for e in range(3)]
    assert all(sorted(order) == list(range(20)) for order in orders)
    assert orders[0] != orders[1] != orders[2]


LENGTHS = [(7 * i) % 23 + 1 for i in range(203)]  # 203 examples: 12 full batches of 16 and a short one


def _grouped(seed: int = 3, batch_size: int = 16) -> StatefulDataLoader:
    sampler = EpochShuffleSampler(len(LENGTHS), seed=seed, lengths=LENGTHS, batch_size=batch_size)
    return StatefulDataLoader(list(range(len(LENGTHS))), batch_size=batch_size, sampler=sampler)


def _padding(batches: list[list[int]]) -> int:
    """Padded positions when each batch is padded to its longest example."""
    return sum(max(LENGTHS[i] for i in b) * len(b) - sum(LENGTHS[i] for i in b) for b in batches)


def test_length_grouped_batches_hold_every_example_once_and_pad_far_less():
    batches = _epoch(_grouped(), 0)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert [len(b) for b in batches] == [16] * 12 + [11]  # the short batch last, where drop_last drops it
    random_order = _epoch(StatefulDataLoader(list(range(len(LENGTHS))), batch_size=16,
                                             sampler=EpochShuffleSampler(len(LENGTHS), seed=3)), 0)
    # one window of 50 batches covers all 203 examples here: a batch of 16 spans at most three neighbouring lengths (about 9 examples each)
    assert all(max(LENGTHS[i] for i in b) - min(LENGTHS[i] for i in b) <= 2 for b in batches[:-1])
    assert _padding(batches) * 10 < _padding(random_order)


def test_length_grouped_order_depends_on_seed_and_epoch_only_and_survives_a_restore():
    assert _epoch(_grouped(), 1) == _epoch(_grouped(), 1)
    assert _epoch(_grouped(), 1) != _epoch(_grouped(), 2)
    assert _epoch(_grouped(seed=4), 1) != _epoch(_grouped(), 1)
    straight = _epoch(_grouped(), 2)
    stopped = _grouped()
    stopped.sampler.set_epoch(2)
    batches = iter(stopped)
    seen = [next(batches).tolist() for _ in range(5)]
    resumed = _grouped()
    resumed.load_state_dict(stopped.state_dict())
    assert seen + [b.tolist() for b in resumed] == straight
