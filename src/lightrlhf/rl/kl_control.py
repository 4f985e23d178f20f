"""Controllers for the KL coefficient beta of the per-token reward r_t = -beta * KL_t (+ score).

Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", sec. 2.2.
Both keep their coefficient in `.value`; `state_dict` holds it so a resumed run continues it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightrlhf.validation import non_negative, one_of, positive


class FixedKLController:
    """A constant beta."""

    def __init__(self, coef: float) -> None:
        non_negative("coef", coef)
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """Does nothing: the coefficient is fixed."""

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """beta moved towards the value that keeps the measured KL at `target`:

    e = clip(KL / target - 1, -0.2, 0.2) ;  beta <- beta * (1 + e * n_steps / horizon)

    n_steps is the number of samples the KL was measured on (the rollout batch size), so beta
    changes at a rate set by samples seen, not by how often update is called. target and horizon
    come from the config and are not part of the state: a resumed run may change them.
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        non_negative("init_coef", init_coef)
        positive("target", target)
        positive("horizon", horizon)
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        # Clipping the proportional error bounds a single step's change, however far the KL is off.
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, Any]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.value = float(state["value"])


@dataclass(frozen=True)
class KLSpec:
    """Per-token KL penalty -beta * KL_t with KL_t estimated by `estimator` (Schulman 2020):
    k1 = log pi - log pi_ref (unbiased, per-token signed), k3 = (r - 1) - log r (unbiased, >= 0).
    `adaptive`: beta follows Ziegler et al. 2019's proportional controller towards `target` nats
    per response, with time constant `horizon` episodes."""

    coef: float = 0.05
    estimator: Literal["k1", "k2", "k3", "abs"] = "k1"
    adaptive: bool = False
    target: float = 4.0
    horizon: int = 10000

    def __post_init__(self) -> None:
        non_negative("coef", self.coef)
        one_of("estimator", self.estimator, ("k1", "k2", "k3", "abs"))
        positive("target", self.target)
        positive("horizon", self.horizon)

    def controller(self) -> FixedKLController | AdaptiveKLController:
        if self.adaptive:
            return AdaptiveKLController(self.coef, self.target, self.horizon)
        return FixedKLController(self.coef)
