"""Reductions over the valid (mask == 1) positions of a padded batch.

Every RL statistic in lightrlhf is taken over real tokens only: a mean over padding would change
with the batch's longest response, not with the policy. `mask` may be bool or 0/1 float.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i * m_i over `dim` (all positions when None)."""
    # detail: select with `where`, not `x * mask`: padding may hold inf or nan, and 0 * inf = nan.
    return torch.where(mask.bool(), x, 0).sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """sum_i x_i m_i / sum_i m_i over `dim`; 0 (not NaN) where no position is valid."""
    count = mask.bool().sum(dim=dim).clamp(min=1)
    return masked_sum(x, mask, dim) / count


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance over all valid positions, 1/(n-1) sum_i m_i (x_i - mean)^2 when unbiased.

    With fewer than two valid positions the variance is 0 (not NaN): there is no spread to measure.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.bool().sum()
        # Bessel's correction n/(n-1); for n <= 1 the biased variance is already 0, keep it.
        var = var * n / (n - 1).clamp(min=1)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  total: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """(x - mean) / sqrt(var + eps), mean and unbiased var over valid positions only.

    With shift_mean=False the mean is added back (only the scale is normalised), as TRL does when
    it whitens rewards (`whiten_rewards`). Masked positions are exactly 0 in the output.

    `total` sums a tensor over the parts of a batch that other processes hold (data parallelism:
    training/distributed.all_sum); mean and variance are then those of every part's valid positions,
    in two exact passes: mean = total(sum x) / n, var = total(sum (x - mean)^2) / (n - 1).
    """
    if total is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        valid = mask.bool()
        moments = total(torch.stack([valid.sum().to(x.dtype), masked_sum(x, mask)]))
        n, mean = moments[0], moments[1] / moments[0].clamp(min=1)
        var = total(masked_sum((x - mean) ** 2, mask)) / (n - 1).clamp(min=1)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, 0)
