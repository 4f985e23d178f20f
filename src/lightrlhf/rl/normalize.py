"""Running mean and variance of a stream of scalars, e.g. reward-model scores."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor


class RunningMeanStd:
    """Mean and (population) variance of every value seen so far, merged batch by batch.

    The merge is the parallel algorithm of Chan, Golub & LeVeque 1979 ("Updating Formulae and a
    Pairwise Algorithm for Computing Sample Variances"), as in OpenAI baselines' RunningMeanStd:
        delta = mean_b - mean ;  n' = n + n_b ;  mean' = mean + delta * n_b / n'
        var' = (var * n + var_b * n_b + delta^2 * n * n_b / n') / n'
    Statistics are Python floats (float64), so long streams of float32 inputs do not drift.
    Before the first update mean = 0, var = 1, count = 0.
    """

    def __init__(self) -> None:
        self._mean, self._var, self._count = 0.0, 1.0, 0

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._var

    @property
    def std(self) -> float:
        return math.sqrt(self._var)

    @property
    def count(self) -> int:
        return self._count

    def update(self, x: Tensor) -> None:
        """Merge the values of x (any shape, flattened); an empty tensor changes nothing."""
        x = x.detach().flatten().double()
        n_b = x.numel()
        if n_b == 0:
            return
        mean_b, var_b = x.mean().item(), x.var(unbiased=False).item()
        n = self._count
        total = n + n_b
        delta = mean_b - self._mean
        self._mean += delta * n_b / total
        self._var = (self._var * n + var_b * n_b + delta**2 * n * n_b / total) / total
        self._count = total

    def normalize(self, x: Tensor, clip: float | None = None, eps: float = 1e-8) -> Tensor:
        """(x - mean) / (std + eps), then clamped to [-clip, clip] when clip is given.

        Before any update there are no statistics: x is returned unchanged (not clipped either,
        since clip bounds normalised values and x is not normalised).
        """
        if self._count == 0:
            return x
        out = (x - self._mean) / (self.std + eps)
        return out if clip is None else out.clamp(-clip, clip)

    def state_dict(self) -> dict[str, Any]:
        """Plain Python numbers, loadable with torch.load(weights_only=True)."""
        return {"mean": self._mean, "var": self._var, "count": self._count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._mean, self._var = float(state["mean"]), float(state["var"])
        self._count = int(state["count"])
