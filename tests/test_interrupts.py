"""Ctrl-C at any moment ends with one line and exit status 130: the seconds of imports included.

(Ctrl-C during training, which saves a checkpoint first, is in test_faults.py.) An import is made to
take a minute here, so the signal lands inside it whatever the speed of the machine: `HOOK` stands
in front of Python's importers, announces the import on stdout and sleeps in it, then runs train.py
as `python train.py` would.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest
from conftest import ROOT

pytestmark = pytest.mark.slow

HOOK = """
import runpy, sys, time

SLOW = sys.argv[1]  # the module whose import takes a minute

class SlowImport:
    def find_spec(self, name, path=None, target=None):
        if name == SLOW:
            sys.meta_path.remove(self)
            print("importing", name, flush=True)
            time.sleep(60)
        return None

sys.meta_path.insert(0, SlowImport())
sys.argv = sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("module,args", [
    ("hydra", ["--help"]),  # train.py's first import
    ("lightrlhf.launch", ["--help"]),  # its last
    ("torch", ["stage=sft", "trainer.max_steps=2"]),  # loaded inside the run, once the config is composed
])
def test_ctrl_c_during_imports_is_one_line_and_exit_130(tmp_path, module, args):
    if module == "torch":
        args = args + [f"hydra.run.dir={tmp_path / 'run'}"]
    process = subprocess.Popen([sys.executable, "-c", HOOK, module, str(ROOT / "train.py"), *args], cwd=ROOT,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        assert process.stdout.readline() == f"importing {module}\n"
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.splitlines() == ["interrupted"]
