"""Reward-hacking tripwires, checked on every rollout against the initial (SFT) policy's rollouts."""

from __future__ import annotations

from dataclasses import dataclass

from lightrlhf.validation import in_range, positive


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
