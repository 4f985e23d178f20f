"""How many CPU threads a run uses: the CPUs this process may use that other work leaves free.

Small-model training on a CPU collapses on a shared machine for two reasons:

- torch's default thread count is the machine's core count, not what this process may use: a CPU
  affinity mask (taskset, a batch scheduler) or a cgroup CPU quota (a container) can give it fewer.
  `available_cpus` reads both.
- torch's OpenMP workers meet at a barrier after every parallel region (every matrix product). With
  as many threads as cores and one other busy process, one worker shares its core with that process
  and the others spin at the barrier until the scheduler gives it a time slice: on the 2-core
  machine the demo's SFT ran 4x slower beside one busy Python loop with 2 threads, while 1 thread on
  the free core lost almost nothing (README, "Threads"). Making the idle workers sleep instead
  (`OMP_WAIT_POLICY=PASSIVE`) halves that loss but costs 10-25% when the machine is idle.

So `threads=null` (the default) means: as many threads as the available CPUs minus those other
processes keep busy, measured from `/proc/stat` (the CPUs' busy time) less this process's own CPU
time (`/proc/self/stat`) -- once before the run and then every few seconds while it trains
(`AdaptiveThreads`), so a job started beside the run, or ended, moves the count within seconds.
`threads=N` or `OMP_NUM_THREADS` fixes the count and nothing adapts.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning.pytorch.callbacks import Callback

log = logging.getLogger("lightrlhf")

# A CPU counts as taken once other processes keep it at least this busy: a background process that
# wakes now and then (an editor, a shell) should not halve a 2-core run.
TAKEN_FROM = 0.3
# Busy fields of a /proc/stat cpu line (user nice system idle iowait irq softirq steal ...): steal is
# time the hypervisor gave to another guest, as unavailable to us as a busy neighbour.
_BUSY_FIELDS = (0, 1, 2, 5, 6, 7)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (None when there is none): cgroup v2's
    `cpu.max` ("quota period" or "max period"), else v1's cfs_quota_us / cfs_period_us."""
    try:
        text = (root / "cpu.max").read_text().split()
        if text and text[0] != "max":
            return int(text[0]) / int(text[1])
        if text:
            return None
    except (OSError, ValueError, IndexError, ZeroDivisionError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return quota / period if quota > 0 and period > 0 else None
    except (OSError, ValueError):
        return None


def allowed_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def available_cpus(root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by its cgroup quota (at least 1)."""
    count = len(allowed_cpus())
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        count = min(count, max(1, math.floor(limit)))
    return max(1, count)


@dataclass(frozen=True)
class CpuTimes:
    """Clock ticks: busy and total over the CPUs this process may use, and this process's own."""

    busy: int
    total: int
    own: int
    cpus: int


def read_cpu_times(proc: Path = Path("/proc"), cpus: set[int] | None = None) -> CpuTimes | None:
    """A sample of `/proc/stat` and `/proc/self/stat`; None where they cannot be read (not Linux)."""
    cpus = allowed_cpus() if cpus is None else cpus
    try:
        busy = total = 0
        for line in (proc / "stat").read_text().splitlines():
            name, *fields = line.split()
            if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
                continue
            ticks = [int(f) for f in fields[:8]]
            busy += sum(ticks[i] for i in _BUSY_FIELDS)
            total += sum(ticks)
        # fields after the command's closing parenthesis; utime and stime are the 12th and 13th
        after_name = (proc / "self" / "stat").read_text().rsplit(")", 1)[1].split()
        own = int(after_name[11]) + int(after_name[12])
    except (OSError, ValueError, IndexError):
        return None
    return CpuTimes(busy, total, own, len(cpus)) if total else None


def others_busy_cpus(before: CpuTimes, after: CpuTimes) -> float:
    """CPUs' worth of time other processes took between two samples:
    (Δbusy − Δown) / (Δtotal / cpus), Δtotal / cpus being the elapsed ticks of one CPU."""
    elapsed = (after.total - before.total) / max(1, after.cpus)
    if elapsed <= 0:
        return 0.0
    others = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, others / elapsed)


def threads_for(available: int, others_busy: float) -> int:
    """Available CPUs less the ones other processes take (each counts once it is ≥ TAKEN_FROM busy)."""
    taken = max(0, math.ceil(others_busy - TAKEN_FROM))
    return max(1, min(available, available - taken))


def fixed_threads(threads: int | None) -> int | None:
    """The count the user fixed: `threads=N`, else `OMP_NUM_THREADS`; None leaves it to the policy."""
    if threads:
        return threads
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def configure(threads: int | None, sample_s: float = 0.25) -> AdaptiveThreads | None:
    """Set torch's intra-op threads before a run. Fixed (`threads=N`, OMP_NUM_THREADS): that many, and
    None is returned. Otherwise: what other work leaves free, sampled over `sample_s`, and the
    callback that keeps it so while training."""
    import torch

    fixed = fixed_threads(threads)
    if fixed is not None:
        torch.set_num_threads(fixed)
        return None
    available = available_cpus()
    before = read_cpu_times()
    if before is None:  # no /proc: the available CPUs, nothing to adapt to
        torch.set_num_threads(available)
        return None
    time.sleep(sample_s)
    after = read_cpu_times()
    count = threads_for(available, others_busy_cpus(before, after)) if after else available
    torch.set_num_threads(count)
    if count < available:
        log.info("threads: %d of %d CPUs (other processes keep the rest busy; threads=N fixes it)",
                 count, available)
    return AdaptiveThreads(available, after or before)


class AdaptiveThreads(Callback):
    """Every `every_s` seconds of training, re-measure what other processes take and set torch's
    thread count to what is left; a new count must be seen twice in a row before it is set, so a
    passing burst does not make the count flap."""

    def __init__(self, available: int, last_sample: CpuTimes, every_s: float = 3.0):
        self.available, self.every_s = available, every_s
        self._last, self._last_at = last_sample, time.monotonic()
        self._pending: int | None = None

    def on_train_batch_end(self, *args: Any) -> None:
        if time.monotonic() - self._last_at >= self.every_s:
            self.check()

    def check(self) -> None:
        import torch

        sample = read_cpu_times()
        if sample is None:
            return
        wanted = threads_for(self.available, others_busy_cpus(self._last, sample))
        self._last, self._last_at = sample, time.monotonic()
        current = torch.get_num_threads()
        if wanted == current:
            self._pending = None
        elif wanted == self._pending:
            torch.set_num_threads(wanted)
            log.debug("threads: %d -> %d", current, wanted)
            self._pending = None
        else:
            self._pending = wanted
