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
