"""Seeded pipeline steps run side by side, each as its own `python train.py` process.

Why processes: a step run this way is exactly a run started by hand -- its own Hydra job (its
`train.log` in its directory), its one-line errors and exit status, its checkpoint on SIGTERM, its
`resume=`. On a small machine this is what makes a ranking over seeds affordable: the demo's models
are too small to use two cores in one process (README, "Threads"), so two runs at once finish in
little more time than one. Each process gets the thread policy's share of the CPUs.

The parent forwards SIGINT/SIGTERM to every running step (each saves a checkpoint and stops) and
then stops itself, pointing at `resume=<pipeline dir>`; a step process whose parent dies is sent
SIGTERM by the kernel (Linux PR_SET_PDEATHSIG), so a killed pipeline never leaves a step running
that a resumed pipeline would start a second time.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from lightrlhf.errors import UserError

log = logging.getLogger("lightrlhf")
CONSOLE_LOG = "console.log"  # a step process's stdout and stderr, in its directory
_PR_SET_PDEATHSIG = 1


class StepFailed(UserError):
    """A step process ended with an error; its exit status becomes the pipeline's."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def entry_script() -> Path:
    """The script this process was started as (train.py, under Hydra's main): each step process runs it."""
    from hydra.core.hydra_config import HydraConfig

    script = Path(sys.argv[0]).resolve()
    if not HydraConfig.initialized() or script.suffix != ".py" or not script.is_file():
        raise UserError(f"pipeline.parallel > 1 runs each step as `python train.py ...`, but this process was not "
                        f"started by train.py ({sys.argv[0]!r}); set pipeline.parallel=1")
    return script


@dataclass
class _Running:
    name: str
    directory: Path
    process: subprocess.Popen
    started: float


class StepProcesses:
    """At most `limit` step processes at once; `start` waits for a free slot."""

    def __init__(self, limit: int, script: Path):
        self.limit, self.script = limit, script
        self.running: list[_Running] = []
        self.failures: list[StepFailed] = []

    def start(self, name: str, directory: Path, overrides: list[str], resuming: bool) -> None:
        while len(self.running) >= self.limit:
            self._wait_one()
        if self.failures:
            return  # a step failed: start nothing new, let the running ones finish
        directory.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, str(self.script), *overrides, f"hydra.run.dir={directory}"]
        if resuming:
            argv.append(f"resume={directory}")
        with open(directory / CONSOLE_LOG, "ab") as console:
            process = subprocess.Popen(argv, stdout=console, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                       preexec_fn=_die_with_parent)
        log.info("pipeline step %s%s: started as process %d (its log: %s)", name, " (resuming)" if resuming else "",
                 process.pid, directory / "train.log")
        self.running.append(_Running(name, directory, process, time.monotonic()))

    def wait_all(self) -> None:
        """Wait for every running step; raise the first failure once none is running."""
        while self.running:
            self._wait_one()
        if self.failures:
            raise self.failures[0]

    def _wait_one(self) -> None:
        """Until one running step ends (polled: waiting for any child would reap processes not ours)."""
        while True:
            done = next((r for r in self.running if r.process.poll() is not None), None)
            if done is not None:
                break
            time.sleep(0.5)
        self.running.remove(done)
        code, seconds = done.process.returncode, time.monotonic() - done.started
        if code == 0:
            log.info("pipeline step %s finished in %.0f s", done.name, seconds)
            return
        last = _last_line(done.directory / CONSOLE_LOG)
        exit_code = code if code > 0 else 128 - code  # killed by signal N: 128 + N, as a shell reports it
        log.error("pipeline step %s failed (exit %d): %s", done.name, exit_code, last)
        self.failures.append(StepFailed(f"pipeline step {done.name} failed (exit {exit_code}): {last} "
                                        f"(its output: {done.directory / CONSOLE_LOG})", exit_code))

    def stop(self, signum: int) -> None:
        """Pass the signal on to every running step and wait for each to save and stop."""
        for running in self.running:
            with contextlib.suppress(ProcessLookupError):
                running.process.send_signal(signum)
        for running in self.running:
            running.process.wait()
        self.running.clear()


def _last_line(path: Path) -> str:
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "no output"
    return lines[-1] if lines else "no output"


@contextlib.contextmanager
def forwarding_signals(processes: StepProcesses, run_dir: Path) -> Iterator[None]:
    """While step processes run: SIGINT/SIGTERM go to them, then the pipeline stops, resumable."""
    from lightrlhf.callbacks.checkpoint import RunInterrupted

    def handler(signum: int, frame: object) -> None:
        processes.stop(signum)
        raise RunInterrupted(f"interrupted: each running step saved a checkpoint; continue with "
                             f"python train.py resume={run_dir}", 128 + signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
