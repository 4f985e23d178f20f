"""Reward-hacking tripwires, checked on every rollout against the initial (SFT) policy's rollouts."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from lightrlhf.validation import in_range, positive

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlertSpec:
    """Reward-hacking tripwires, checked every rollout against the initial (SFT) policy's rollouts.

    length_drift: mean response length moved by more than this fraction of the SFT length while the
      score rose above the SFT score -- the signature of length hacking.
    eos_collapse: the fraction of responses ending with EOS fell below this fraction of SFT's.
    kl_multiple: the KL to the reference exceeded this multiple of `kl.target`.
    stop: end the run (cleanly, with a checkpoint and an export) when an alert fires.
    """

    length_drift: float = 0.5
    eos_collapse: float = 0.5
    kl_multiple: float = 2.0
    stop: bool = False

    def __post_init__(self) -> None:
        positive("length_drift", self.length_drift)
        in_range("eos_collapse", self.eos_collapse, 0.0, 1.0)
        positive("kl_multiple", self.kl_multiple)


class Tripwires:
    """Compares each rollout with the initial policy's (`baseline`) and counts the alerts that fire.

    Shared by every online method: it reads only the logged rollout metrics
    `reward/length_mean`, `objective/scores`, `reward/frac_ended_with_eos` and `objective/kl`.
    """

    def __init__(self, spec: AlertSpec, kl_target: float) -> None:
        self.spec, self.kl_target = spec, kl_target
        self.baseline: dict[str, float] = {}  # the initial policy's score_mean, length_mean, frac_ended_with_eos
        self.fired: dict[str, int] = {}  # alert name -> rollouts on which it fired

    def check(self, metrics: dict[str, float], rollout: int) -> tuple[dict[str, float], bool]:
        """(`alerts/<name>` 0/1 for this rollout, whether the run should stop)."""
        if not self.baseline:
            return {}, False
        spec, base = self.spec, self.baseline
        length, score, eos = metrics["reward/length_mean"], metrics["objective/scores"], metrics[
            "reward/frac_ended_with_eos"]
        kl = metrics.get("objective/kl")  # absent when no reference is run (GRPO's kl.measure=false)
        fired = {
            "length_drift": abs(length - base["length_mean"]) > spec.length_drift * base["length_mean"]
                            and score > base["score_mean"],
            "eos_collapse": eos < spec.eos_collapse * base["frac_ended_with_eos"],
            "kl_exceeded": kl is not None and kl > spec.kl_multiple * self.kl_target,
        }
        messages = {
            "length_drift": f"mean response length {length:.1f} vs {base['length_mean']:.1f} for the SFT policy "
                            f"while the score rose ({score:.3f} vs {base['score_mean']:.3f}): length hacking?",
            "eos_collapse": f"only {eos:.0%} of responses end with EOS (SFT: {base['frac_ended_with_eos']:.0%})",
            "kl_exceeded": f"KL to the reference {kl or 0.0:.2f} exceeds {spec.kl_multiple} x kl.target ({self.kl_target})",
        }
        stop = False
        for name, on in fired.items():
            if on:
                if name not in self.fired:
                    log.warning("alert %s at rollout %d: %s", name, rollout, messages[name])
                self.fired[name] = self.fired.get(name, 0) + 1
                if spec.stop:
                    log.warning("alerts.stop=true: stopping the run")
                    stop = True
        return {f"alerts/{k}": float(v) for k, v in fired.items()}, stop

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": dict(self.baseline), "alerts_fired": dict(self.fired)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline, self.fired = dict(state["baseline"]), dict(state["alerts_fired"])
