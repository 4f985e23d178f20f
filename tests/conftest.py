"""Shared test fixtures: config composition, the real CLI in a subprocess, tiny demo parts.

Generated demo data goes to one cache directory per test session (LIGHTRLHF_CACHE_DIR), so it is
produced once and every test reads the same files; so do the runs that several tests start from
(`shared`), whichever xdist worker needs them first.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
FIXTURES = Path(__file__).parent / "fixtures"

# Tests train tiny models: one intra-op thread avoids oversubscribing the 2-core CI machine.
torch.set_num_threads(1)


def _session_dir(tmp_path_factory) -> Path:
    """A directory of this test session that every xdist worker sees (the parent of the workers' own)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def shared(tmp_path_factory, name: str, make) -> Path:
    """<session dir>/shared/<name>, made by `make(path)` once per test session: the first worker to ask
    makes it, a worker asking meanwhile waits for it (a file lock) rather than making it again."""
    import fcntl
    import shutil

    root = _session_dir(tmp_path_factory) / "shared"
    root.mkdir(exist_ok=True)
    path, done = root / name, root / f"{name}.done"
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            shutil.rmtree(path, ignore_errors=True)  # what a failed attempt left
            make(path)
            done.touch()
    return path


@pytest.fixture(autouse=True)
def default_sigint():
    """Each test starts with Python's own Ctrl-C handler. Lightning sets SIGINT to SIG_IGN when a fit
    run in this process ends on KeyboardInterrupt, and a process started afterwards inherits SIG_IGN:
    a later test of Ctrl-C in a subprocess would then depend on which tests this worker ran before."""
    import signal

    signal.signal(signal.SIGINT, signal.default_int_handler)
    yield


@pytest.fixture(scope="session", autouse=True)
def demo_cache(tmp_path_factory) -> Path:
    # the files are named by a hash of what shaped them and written atomically: the workers can share them
    path = _session_dir(tmp_path_factory) / "lightrlhf-cache"
    path.mkdir(exist_ok=True)
    os.environ["LIGHTRLHF_CACHE_DIR"] = str(path)
    return path


def compose(overrides: list[str], output_dir: Path | None = None):
    """The config `python train.py <overrides>` would run, with paths.output_dir set."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import lightrlhf.launch  # noqa: F401  (registers the resolvers)

    extra = [f"paths.output_dir={output_dir}"] if output_dir is not None else []
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name="train", overrides=overrides + extra)


def run_in_process(overrides: list[str], run_dir: Path):
    """Run training in this process exactly as train.py would (no Hydra job machinery)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightrlhf.launch.run import run_stage

    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = overrides + [f"paths.output_dir={run_dir}"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose(config_name="train", overrides=overrides, return_hydra_config=True)
        choices = dict(cfg.hydra.runtime.choices)
        from omegaconf import open_dict

        with open_dict(cfg):
            del cfg["hydra"]
        return run_stage(cfg, run_dir, overrides, choices)


class _ForkServer:
    """tests/support/forkserver.py, started on first use: each run is a forked child of a Python that has
    already imported torch, Lightning and transformers (the seconds of every run's imports, paid once per
    worker), and still a process of its own: pid, exit status, signals, stdout and stderr."""

    def __init__(self, env: dict, log: Path):
        self.env, self.log, self.pending, self.current = env, log, b"", None
        with open(log, "ab") as server_log:
            self.process = subprocess.Popen([sys.executable, str(FIXTURES.parent / "support" / "forkserver.py")],
                                            cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            stderr=server_log)

    def _reply(self, timeout: float | None) -> dict | None:
        """The server's next reply, or None if none came within `timeout` seconds."""
        import select
        import time

        deadline = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not select.select([self.process.stdout], [], [], wait)[0]:
                return None
            chunk = os.read(self.process.stdout.fileno(), 4096)
            if not chunk:
                raise RuntimeError(f"the fork server ended; its log: {self.log}")
            self.pending += chunk
        line, self.pending = self.pending.split(b"\n", 1)
        return json.loads(line)

    def start(self, command: list[str], env: dict) -> _ForkedRun:
        import tempfile

        if self.current is not None and self.current.poll() is None:  # left running by a failed test
            self.current.kill()
            self.current.wait()
        scratch = tempfile.TemporaryDirectory()
        out, err = Path(scratch.name) / "stdout", Path(scratch.name) / "stderr"
        request = {"argv": command[1:], "cwd": str(ROOT), "env": env, "stdout": str(out), "stderr": str(err)}
        self.process.stdin.write(json.dumps(request).encode() + b"\n")
        self.process.stdin.flush()
        self.current = _ForkedRun(self, command, self._reply(None)["pid"], scratch)
        return self.current


class _ForkedRun:
    """A run in the fork server, as much of subprocess.Popen (text mode, output captured) as the tests use."""

    def __init__(self, server: _ForkServer, args: list[str], pid: int, scratch):
        self.server, self.args, self.pid, self.scratch, self.returncode = server, args, pid, scratch, None

    def poll(self) -> int | None:
        if self.returncode is None:
            reply = self.server._reply(0)
            if reply is not None:
                self.returncode = reply["status"]
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if self.returncode is None:
            reply = self.server._reply(timeout)
            if reply is None:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = reply["status"]
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if self.returncode is None:
            os.kill(self.pid, signum)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def communicate(self, timeout: float | None = None) -> tuple[str, str]:
        self.wait(timeout)
        output = tuple((Path(self.scratch.name) / name).read_text(errors="replace") for name in ("stdout", "stderr"))
        self.scratch.cleanup()
        return output


_server: _ForkServer | None = None


def _fork_server(env: dict) -> _ForkServer | None:
    """This worker's fork server, if it was started with this environment (its imports may have read it)."""
    global _server
    if _server is None:
        log = Path(os.environ.get("LIGHTRLHF_CACHE_DIR", ROOT)) / f"forkserver-{os.getpid()}.log"
        _server = _ForkServer({**os.environ, "OMP_NUM_THREADS": "1"}, log)
    # may differ: set by pytest for each test (no run reads it); a DDP test's rendezvous port (read when
    # the processes meet, long after the imports); set in this process by an in-process run's
    # seed_everything and Lightning's import (read by a run, never by the server's imports; the child
    # gets the request's environment, as a subprocess would)
    late = ("PYTEST_CURRENT_TEST", "MASTER_PORT", "PL_GLOBAL_SEED", "PL_SEED_WORKERS",
            "PYTORCH_NVML_BASED_CUDA_CHECK", "TORCHINDUCTOR_CACHE_DIR")
    same = all(_server.env.get(k) == env.get(k) for k in set(_server.env) | set(env) if k not in late)
    return _server if same and _server.process.poll() is None else None


def start_train(args: list[str], script: list[str] | None = None, env: dict | None = None):
    """Start the real entry point in a process of its own, output captured: a subprocess.Popen (text), or
    its stand-in from the fork server (pid, poll, wait, send_signal, kill, communicate, returncode).
    `env` adds to this process's environment (a value None removes the variable)."""
    command = [sys.executable] + (script or [str(ROOT / "train.py")]) + args
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env = {k: v for k, v in full_env.items() if v is not None}  # None: unset it
    server = _fork_server(full_env)
    if server is not None:
        return server.start(command, full_env)
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=full_env)


def train_cli(args: list[str], timeout: float = 600, script: list[str] | None = None, env: dict | None = None):
    """Run the real entry point in a process of its own; returns CompletedProcess (text)."""
    process = start_train(args, script, env)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:  # as subprocess.run: end it before saying so
        process.kill()
        process.communicate()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def scalar_curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """(step, value) of one scalar in a run's TensorBoard events, as TensorBoard shows it (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def every_curve(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag but `time/*` (wall-clock seconds, different in any two runs), as TensorBoard
    shows the run's directory (restarts purged)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"] if not tag.startswith("time/")}


FAULTS = [str(Path(__file__).parent / "support" / "run_with_faults.py")]

# Smaller demo files (generated once per session like the full ones): for runs whose subject is the
# machinery -- stopping, resuming, failing -- rather than what is learned from the data.
SMALL_DEMO = ["demo.sft_size=1000", "demo.preference_size=2000", "demo.prompt_size=512", "demo.validation_size=64"]


def train_with_fault(fault: str, args: list[str], timeout: float = 600):
    return train_cli([fault] + args, timeout=timeout, script=FAULTS)


@pytest.fixture(scope="session")
def tiny_spec():
    from lightrlhf.launch.resolvers import asset
    from lightrlhf.models.spec import LoraSpec, ModelSpec

    return ModelSpec(name_or_path=asset("tiny"), lora=LoraSpec(r=8, alpha=16))


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_spec):
    from lightrlhf.models.loading import load_tokenizer

    return load_tokenizer(tiny_spec)


@pytest.fixture(scope="session")
def exports(tmp_path_factory):
    """A short SFT run, a reward model trained on top of it (InstructGPT's order), and one on the raw base.
    Made once for both workers; tests read them and never write there."""
    def make(root):
        run_in_process(["stage=sft", "trainer.max_steps=30", "stage.eval.num_prompts=8",
                        "trainer.val_check_interval=30"], root / "sft")
        run_in_process(["stage=rm", "data=demo_pref", f"model.name_or_path={root / 'sft' / 'export'}",
                        "trainer.max_steps=30", "trainer.val_check_interval=30"], root / "rm")
        run_in_process(["stage=rm", "data=demo_pref", "trainer.max_steps=5", "trainer.val_check_interval=5"],
                       root / "rm_raw_base")

    return shared(tmp_path_factory, "exports", make)


@pytest.fixture(scope="session")
def ensemble_run(exports, tmp_path_factory):
    """A 3-member reward ensemble (stage.ensemble=3) trained for a few steps on the shared SFT export."""
    def make(root):
        run_in_process(["stage=rm", "data=demo_pref", f"model.name_or_path={exports / 'sft' / 'export'}",
                        "stage.ensemble=3", "trainer.max_steps=6", "trainer.val_check_interval=6",
                        "stage.datamodule.batch_size=16"], root)

    return shared(tmp_path_factory, "ensemble_rm", make)


# The two longest tests (minutes each) each head one worker's queue: `pytest -n 2 --dist worksteal` (make
# test) hands the first half of the collection to one worker and the second half to the other, and an idle
# worker steals only from the tail of a queue, so neither waits behind the other or runs at the very end.
LONGEST = ("test_demo_targets.py::test_the_default_demo_meets_its_targets_and_resume_skips_finished_stages",
           "test_demo_targets.py::test_a_length_biased_annotator_provokes_length_hacking_and_the_tripwire_fires")


def pytest_collection_modifyitems(config, items):
    longest = [item for name in LONGEST for item in items if item.nodeid.endswith(name)]
    rest = [item for item in items if item not in longest]
    heads = [len(items) * i // len(longest) for i in range(len(longest))]
    for head, item in zip(heads, longest):
        rest.insert(head, item)
    items[:] = rest
