"""Reward over-optimisation: the functional forms of Gao et al. 2022 and what a curve's peak says.

Gao, Schulman & Hilton 2022 ("Scaling Laws for Reward Model Overoptimization") measure how far a policy
has moved from its start by d = sqrt(KL(pi || pi_init)) and find the gold score's gain R(d) (gold
minus gold at d = 0) follows, for a proxy reward model optimised

    best-of-n    R_bon(d) = d (alpha_bon - beta_bon d)
    RL (PPO)     R_rl(d)  = d (alpha_rl - beta_rl log d)

For best-of-n the KL is analytic: KL_bon(n) = log n - (n - 1) / n (Stiennon et al. 2020, appendix;
rl/best_of_n.py). Both forms are linear in (alpha, beta) for fixed d, so they are fitted by least
squares without an intercept (R(0) = 0 by construction) on the regressors

    best-of-n    [d, -d^2]
    RL           [d, -d log d]          (d log d -> 0 as d -> 0)

R^2 = 1 - SS_res / SS_tot with SS_tot about the mean of R, as for any regression: it says how much of
the curve's variation the two-parameter form explains. The same forms are fitted to the proxy score,
where Gao et al. find beta small (the proxy keeps rising) while gold's beta bends the curve down:
over-optimisation is gold peaking and falling while the proxy still rises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

Form = Literal["best_of_n", "rl"]
FORMS: tuple[str, ...] = ("best_of_n", "rl")


@dataclass(frozen=True)
class Fit:
    """R(d) = d (alpha - beta d) (best_of_n) or d (alpha - beta log d) (rl), and its R^2 on the points."""

    form: str
    alpha: float
    beta: float
    r_squared: float
    points: int

    def __call__(self, d: float) -> float:
        if d <= 0:
            return 0.0
        return d * (self.alpha - self.beta * (d if self.form == "best_of_n" else math.log(d)))

    def peak(self) -> tuple[float, float] | None:
        """(d*, R(d*)) of the fitted curve's maximum, None when it has none for d > 0.

        best_of_n: dR/dd = alpha - 2 beta d = 0 -> d* = alpha / (2 beta)          (beta > 0)
        rl:        dR/dd = alpha - beta (log d + 1) = 0 -> d* = exp(alpha / beta - 1)   (beta > 0)
        """
        if self.beta <= 0:
            return None
        d = self.alpha / (2 * self.beta) if self.form == "best_of_n" else math.exp(self.alpha / self.beta - 1)
        return (d, self(d)) if d > 0 else None


def regressors(form: Form, d: torch.Tensor) -> torch.Tensor:
    """[N, 2] the design matrix whose least-squares coefficients are (alpha, beta)."""
    if form == "best_of_n":
        return torch.stack([d, -d * d], dim=1)
    if form == "rl":
        safe = d.clamp(min=1e-12)  # d log d -> 0 at d = 0
        return torch.stack([d, -torch.where(d > 0, d * torch.log(safe), torch.zeros_like(d))], dim=1)
    raise ValueError(f"unknown form {form!r} (one of {', '.join(FORMS)})")


def fit(form: Form, distances: Sequence[float], gains: Sequence[float]) -> Fit:
    """Least-squares (alpha, beta) of `form` through the origin; needs two points with d > 0."""
    d = torch.tensor(list(distances), dtype=torch.float64)
    r = torch.tensor(list(gains), dtype=torch.float64)
    if d.shape != r.shape or int((d > 0).sum()) < 2:
        raise ValueError(f"need as many gains as distances and two distances > 0, got {list(distances)}")
    if bool((d < 0).any()):
        raise ValueError(f"distances sqrt(KL) must be >= 0, got {list(distances)}")
    x = regressors(form, d)
    coef = torch.linalg.lstsq(x, r.unsqueeze(1)).solution.squeeze(1)
    residual = float(((x @ coef - r) ** 2).sum())
    total = float(((r - r.mean()) ** 2).sum())
    r_squared = 1.0 - residual / total if total > 0 else (1.0 if residual == 0 else 0.0)
    return Fit(form, float(coef[0]), float(coef[1]), r_squared, len(d))


def distance(kl: float) -> float:
    """d = sqrt(KL), the KL clamped at 0: a sampled k1 estimate near the start can be slightly negative."""
    return math.sqrt(max(kl, 0.0))


@dataclass(frozen=True)
class Peak:
    """Where a measured gold curve peaks and how much of the gain it gives back by its end."""

    index: int  # of the peak point
    value: float
    final: float
    start: float

    @property
    def drop(self) -> float:
        """peak - final (>= 0): what over-optimisation took back."""
        return self.value - self.final

    @property
    def peaked_and_fell(self) -> bool:
        """The curve rose above its start, then ended below its peak."""
        return self.value > self.start and self.final < self.value


def peak_of(values: Sequence[float]) -> Peak:
    """The first maximum of a curve (values in order of d) and its start and end."""
    if not values:
        raise ValueError("an empty curve has no peak")
    index = max(range(len(values)), key=lambda i: (values[i], -i))
    return Peak(index, float(values[index]), float(values[-1]), float(values[0]))
