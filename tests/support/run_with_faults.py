"""Run train.py in this process with a fault injected, for tests of what survives a crash.

    python tests/support/run_with_faults.py <fault> <train.py overrides...>

Faults (the test decides which, through argv[1]):
  kill_after_checkpoint:N   SIGKILL this process right after the N-th checkpoint is on disk
  kill_during_checkpoint:N  SIGKILL it halfway through writing the N-th checkpoint file
  none                      no fault
"""

import os
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def install(fault: str) -> None:
    if fault == "none":
        return
    name, _, arg = fault.partition(":")
    count = {"n": 0}
    if name == "kill_after_checkpoint":
        from lightrlhf.callbacks.checkpoint import PeriodicCheckpoint

        original = PeriodicCheckpoint.save

        def save(self, trainer):
            path = original(self, trainer)
            count["n"] += 1
            if count["n"] == int(arg):
                os.kill(os.getpid(), signal.SIGKILL)
            return path

        PeriodicCheckpoint.save = save
    elif name == "kill_during_checkpoint":
        import lightrlhf.io as lio

        original_write = lio.atomic_write

        def atomic_write(path, write):
            if str(path).endswith(".ckpt"):
                count["n"] += 1
                if count["n"] == int(arg):
                    def torn(f):
                        f.write(b"partial checkpoint bytes")
                        f.flush()
                        os.kill(os.getpid(), signal.SIGKILL)
                    return original_write(path, torn)
            return original_write(path, write)

        lio.atomic_write = atomic_write
        import lightrlhf.callbacks.checkpoint as ckpt_module

        ckpt_module.atomic_write = atomic_write
    else:
        raise SystemExit(f"unknown fault {fault!r}")


if __name__ == "__main__":
    install(sys.argv[1])
    sys.argv = [str(ROOT / "train.py")] + sys.argv[2:]
    runpy.run_path(str(ROOT / "train.py"), run_name="__main__")
