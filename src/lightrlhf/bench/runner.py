"""Timed runs on a shared machine: wait until it is idle, run, and measure who else used the CPUs.

On 2 cores, an OpenMP job with 2 threads slows down many times over when another process takes
one core (PEERS.md, "Measurement hazard"). So before each run we wait until the machine's busy
share, read from /proc/stat over a short window, has stayed low; and over the run we compare the
machine's busy CPU time with the run's own user+system time (from `/usr/bin/time -v`). What is
left is other processes' work; a run where it exceeds `max_foreign` of the machine is kept in the
records but flagged as contaminated, and another run replaces it.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CPUS = os.cpu_count() or 1
TICKS = os.sysconf("SC_CLK_TCK")
TIME = "/usr/bin/time"


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has spent busy since boot (all but idle and iowait)."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is already inside user)
    return (sum(fields[:8]) - fields[3] - fields[4]) / TICKS


def busy_share(window: float) -> float:
    """Fraction of all CPUs busy over the next `window` seconds."""
    before, started = busy_cpu_seconds(), time.monotonic()
    time.sleep(window)
    return (busy_cpu_seconds() - before) / ((time.monotonic() - started) * CPUS)


def wait_until_idle(limit: float = 0.05, window: float = 2.0, quiet_windows: int = 2,
                    max_wait: float = 900.0) -> tuple[float, float]:
    """Block until `quiet_windows` consecutive windows are below `limit`; (seconds waited, last share)."""
    started, quiet, told = time.monotonic(), 0, False
    while True:
        share = busy_share(window)
        quiet = quiet + 1 if share < limit else 0
        waited = time.monotonic() - started
        if quiet >= quiet_windows or waited > max_wait:
            return round(waited, 1), round(share, 3)
        if not told and waited > 10:
            print(f"  waiting for an idle machine (busy {share:.0%})...", flush=True)
            told = True


@dataclass
class Measured:
    rc: int
    wall_s: float
    user_s: float | None
    sys_s: float | None
    max_rss_mb: float | None
    foreign_cpu_share: float

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _field(text: str, label: str) -> float | None:
    match = re.search(re.escape(label) + r":\s*([\d.]+)", text)
    return float(match.group(1)) if match else None


def run_timed(argv: list[str], log_path: Path, cwd: Path) -> Measured:
    """Run `argv` under `/usr/bin/time -v`, output to `log_path`; resources and foreign CPU share."""
    time_file = log_path.with_suffix(".time")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    before, started = busy_cpu_seconds(), time.monotonic()
    with open(log_path, "w") as log:
        rc = subprocess.call([TIME, "-v", "-o", str(time_file), *argv], stdout=log, stderr=subprocess.STDOUT,
                             cwd=cwd, env=env)
    wall, busy = time.monotonic() - started, busy_cpu_seconds() - before
    text = time_file.read_text() if time_file.is_file() else ""
    user, system = _field(text, "User time (seconds)"), _field(text, "System time (seconds)")
    rss_kb = _field(text, "Maximum resident set size (kbytes)")
    own = (user or 0.0) + (system or 0.0)
    foreign = max(0.0, busy - own) / (wall * CPUS)
    return Measured(rc, round(wall, 2), user, system, round(rss_kb / 1024, 1) if rss_kb else None, round(foreign, 4))
