"""What an online stage makes global when it runs on several processes (`trainer=ddp`).

Each rank rolls out its own prompts (Lightning's distributed sampler gives it its share of every
batch), scores them and backpropagates its own rows. For the run to be the one-process run with the
global batch, a few quantities must be taken over every rank's rows, not each rank's own:

- the loss's normaliser (valid tokens, or rows) and the gradient: each rank divides its loss by the
  *global* count and the gradients are summed over ranks once per optimizer step, so the step is
  exactly the one a single process takes on the whole minibatch;
- advantage whitening, the reward normaliser's running statistics and the adaptive KL controller's
  measured KL, so that every rank keeps the same state;
- every decision that changes what the ranks do next (a non-finite rollout skipped, PPO's approx-KL
  early stop, a tripwire's stop): taken on global values, or one rank would wait forever for another.

Lightning's DDP wrapper is kept (it starts the ranks, broadcasts the initial weights and shards the
data) but its reducer stays out of every backward (the stage's `manual_backward` runs under the
strategy's `block_backward_sync`): an online step makes several backward passes, each through only a
part of the trainable weights (the policy's loss never reaches the value adapter), which the reducer
would wait for or sync once per pass.

With one process every function here is the identity, at no cost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


def _group() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def world_size() -> int:
    return torch.distributed.get_world_size() if _group() else 1


def rank() -> int:
    return torch.distributed.get_rank() if _group() else 0


def all_sum(x: Tensor) -> Tensor:
    """The sum of `x` over ranks (a new tensor; `x` is left as it was)."""
    if not _group():
        return x
    total = x.detach().clone()
    torch.distributed.all_reduce(total)
    return total


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order."""
    if not _group():
        return [obj]
    out: list[Any] = [None] * world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def all_cat(x: Tensor) -> Tensor:
    """Every rank's rows of `x`, concatenated in rank order (ranks may hold different numbers of rows)."""
    if not _group():
        return x
    return torch.cat([torch.as_tensor(part) for part in all_gather_objects(x.detach().cpu())])


def all_agree(flag: bool) -> bool:
    """True when `flag` is true on every rank."""
    if not _group():
        return flag
    return bool(all_sum(torch.tensor([0.0 if flag else 1.0])).item() == 0)


def mean_over_ranks(metrics: dict[str, float]) -> dict[str, float]:
    """Each metric averaged over the ranks that logged it (each rank's value is its own rows' mean, and
    the ranks hold equal numbers of rows, so this is the global mean of a per-row metric)."""
    if not _group():
        return metrics
    gathered = all_gather_objects(metrics)
    keys = [k for k in gathered[0] if all(k in m for m in gathered)]
    return {k: sum(m[k] for m in gathered) / len(gathered) for k in keys}


def sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Replace every parameter's gradient by its sum over ranks, in one all-reduce of one flat buffer.

    A parameter without a gradient on this rank takes part as zeros (another rank may have one); after
    the sum it has the global gradient like the others.
    """
    if not _group() or not params:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p)
        offset += n

