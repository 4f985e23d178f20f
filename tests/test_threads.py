"""The thread policy: CPUs available to the process, what other processes take, and the count that
follows them while training (lightrlhf.threads)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
import torch

from lightrlhf import threads
from lightrlhf.threads import AdaptiveThreads, CpuTimes


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize("files,expected", [
    ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2 with a quota
    ({"cpu.max": "max 100000\n"}, None),  # cgroup v2 without
    ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),  # v1
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no quota
    ({}, None),  # no cgroup files at all
])
def test_cgroup_cpu_limit(tmp_path, files, expected):
    for name, text in files.items():
        _write(tmp_path / name, text)
    assert threads.cgroup_cpu_limit(tmp_path) == expected


def test_available_cpus_is_the_affinity_capped_by_the_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(threads, "allowed_cpus", lambda: {0, 1, 2, 3})
    assert threads.available_cpus(tmp_path) == 4
    _write(tmp_path / "cpu.max", "250000 100000\n")
    assert threads.available_cpus(tmp_path) == 2  # 2.5 CPUs of quota: 2 whole ones
    _write(tmp_path / "cpu.max", "50000 100000\n")
    assert threads.available_cpus(tmp_path) == 1  # never fewer than one


def _proc(tmp_path, cpu_lines: dict[int, list[int]], utime: int, stime: int):
    lines = ["cpu  999 0 999 999 0 0 0 0 0 0"]  # the machine-wide line is not used
    lines += [f"cpu{n} " + " ".join(map(str, ticks)) for n, ticks in cpu_lines.items()]
    lines += ["intr 1 2 3", "ctxt 42"]
    _write(tmp_path / "stat", "\n".join(lines) + "\n")
    # comm may hold spaces and parentheses: fields are counted after the last ')'
    fields = ["S"] + ["0"] * 10 + [str(utime), str(stime)] + ["0"] * 30
    _write(tmp_path / "self" / "stat", "1234 (py (x) y) " + " ".join(fields) + "\n")


def test_read_cpu_times_sums_the_allowed_cpus_and_reads_own_time(tmp_path):
    # fields: user nice system idle iowait irq softirq steal
    _proc(tmp_path, {0: [10, 1, 5, 80, 2, 1, 1, 0], 1: [20, 0, 10, 60, 0, 0, 0, 10], 2: [50] * 8}, utime=7, stime=3)
    sample = threads.read_cpu_times(tmp_path, cpus={0, 1})
    # busy = user+nice+system+irq+softirq+steal: cpu0 10+1+5+1+1+0 = 18, cpu1 20+0+10+0+0+10 = 40
    assert sample == CpuTimes(busy=58, total=100 + 100, own=10, cpus=2)


def test_read_cpu_times_without_proc_is_none(tmp_path):
    assert threads.read_cpu_times(tmp_path, cpus={0}) is None


def test_others_busy_cpus_subtracts_own_time():
    before = CpuTimes(busy=1000, total=4000, own=300, cpus=2)
    # 2 CPUs for 100 ticks each: total +200; busy +180 of which 80 were this process: others 100
    after = CpuTimes(busy=1180, total=4200, own=380, cpus=2)
    assert threads.others_busy_cpus(before, after) == pytest.approx(100 / 100)
    assert threads.others_busy_cpus(before, before) == 0.0


@pytest.mark.parametrize("available,others,expected", [
    (2, 0.0, 2), (2, 0.29, 2), (2, 0.31, 1), (2, 0.67, 1), (2, 1.0, 1), (2, 2.0, 1), (2, 5.0, 1),
    (8, 1.0, 7), (8, 2.5, 5), (1, 0.0, 1),
])
def test_threads_for(available, others, expected):
    assert threads.threads_for(available, others) == expected


def test_threads_fixed_by_the_setting_or_omp_num_threads(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert threads.fixed_threads(None) is None
    assert threads.fixed_threads(3) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert threads.fixed_threads(None) == 1
    assert threads.fixed_threads(2) == 2  # the setting wins over the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "junk")
    assert threads.fixed_threads(None) is None


def test_configure_fixed_sets_the_count_and_adapts_nothing(monkeypatch):
    before = torch.get_num_threads()
    try:
        assert threads.configure(1) is None
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_adaptive_threads_follow_other_work_after_two_agreeing_checks(monkeypatch):
    samples = iter([
        CpuTimes(busy=100, total=200, own=0, cpus=2),  # others took 1 CPU: wanted 1 (first sighting)
        CpuTimes(busy=200, total=400, own=0, cpus=2),  # again: set to 1
        CpuTimes(busy=200, total=600, own=0, cpus=2),  # idle: wanted 2 (first sighting)
        CpuTimes(busy=300, total=800, own=0, cpus=2),  # busy again: pending cleared, stays 1
        CpuTimes(busy=300, total=1000, own=0, cpus=2),  # idle
        CpuTimes(busy=300, total=1200, own=0, cpus=2),  # idle again: back to 2
    ])
    monkeypatch.setattr(threads, "read_cpu_times", lambda: next(samples))
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        policy = AdaptiveThreads(available=2, last_sample=CpuTimes(busy=0, total=0, own=0, cpus=2))
        seen = []
        for _ in range(6):
            policy.check()
            seen.append(torch.get_num_threads())
        assert seen == [2, 1, 1, 1, 1, 2]
    finally:
        torch.set_num_threads(original)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_busy_process_beside_this_one_is_measured():
    """A child spinning in a loop takes (about) one CPU: at least half of one whatever else runs."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)  # let it start
        before = threads.read_cpu_times()
        time.sleep(1.0)
        after = threads.read_cpu_times()
    finally:
        busy.kill()
        busy.wait()
    assert threads.others_busy_cpus(before, after) >= 0.5
