"""python -m lightrlhf.bench.peers setup [--only trl-1.16 trl-1.12]

The peers' Python environments for `make bench-peers`: one venv per trl release the peer scripts
need, under outputs/peer-envs/, made with the interpreter that runs this module (the project's
Python 3.11). trl 1.16.0 runs trl_sft/reward/dpo/grpo/rloo.py; trl_ppo.py needs trl 1.12.0, the
last release with `trl.experimental.ppo`. The other pins are the peers' own requirements.txt.

An environment is made once: a stamp file records the trl version and the requirements file's
sha256, and `setup` does nothing while the stamp matches (a changed pin redoes the install).
PEER_ENVS moves the environments elsewhere, PEER_BENCH names the peers' scripts (as for `make bench`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from lightrlhf.bench.workload import PAIRS, ROOT, BenchError, Config, peer_bench_dir, require_peer_bench
from lightrlhf.models.loading import sha256_file

ENV_ROOT = Path(os.environ.get("PEER_ENVS", ROOT / "outputs" / "peer-envs")).expanduser().resolve()
# torch first, pinned: its CPU wheel; a bare `torch` (or a dependency asking for one) pulls a CUDA build.
TORCH = "torch==2.13.0"
STAMP = ".bench-peers-stamp"


@dataclass(frozen=True)
class PeerEnv:
    name: str
    trl: str

    @property
    def path(self) -> Path:
        return ENV_ROOT / self.name  # looked up at call time, so tests can move ENV_ROOT

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"


ENVS = {e.name: e for e in (PeerEnv("trl-1.16", "1.16.0"), PeerEnv("trl-1.12", "1.12.0"))}


# trl's configuration of each stage: (title, script, script options, environment)
PEERS = {
    "trl_sft": ("trl SFT", "trl_sft.py", (), "trl-1.16"),
    "trl_reward": ("trl reward model", "trl_reward.py", (), "trl-1.16"),
    "trl_ppo": ("trl PPO, 4 PPO epochs", "trl_ppo.py", ("--ppo-epochs", "4"), "trl-1.12"),
    "trl_ppo1": ("trl PPO, 1 PPO epoch", "trl_ppo.py", ("--ppo-epochs", "1"), "trl-1.12"),
    "trl_dpo": ("trl DPO", "trl_dpo.py", (), "trl-1.16"),
    "trl_grpo": ("trl GRPO (k=4)", "trl_grpo.py", (), "trl-1.16"),
    "trl_rloo": ("trl RLOO (k=4)", "trl_rloo.py", (), "trl-1.16"),
}


def peer_configurations(ours: dict[str, Config]) -> dict[str, Config]:
    """trl's run of each of our configurations in `ours`: the same step budget, unit and secondary
    rates (so the two rates divide), the peer script run by its environment's python."""
    scripts = peer_bench_dir()
    out = {}
    for stage, name in PAIRS.items():
        if stage not in ours:
            continue
        title, script, options, env = PEERS[name]
        out[name] = replace(ours[stage], name=name, title=f"{title} ({ENVS[env].trl})", overrides=(),
                            script=str(scripts / script), script_args=options, python=str(ENVS[env].python))
    return out


def requirements_file() -> Path:
    return peer_bench_dir() / "requirements.txt"


def stamp_text(env: PeerEnv, requirements: Path) -> str:
    return json.dumps({"trl": env.trl, "requirements_sha256": sha256_file(requirements)}, sort_keys=True)


def setup_commands(env: PeerEnv, requirements: Path, python: str = sys.executable) -> list[list[str]]:
    """The command lines that make `env` from nothing (each is safe to re-run on a half-made venv)."""
    pip = [str(env.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    return [[python, "-m", "venv", str(env.path)],
            [*pip, "--upgrade", "pip"],
            [*pip, TORCH],
            [*pip, "-r", str(requirements), f"trl=={env.trl}"]]


def is_ready(env: PeerEnv, requirements: Path) -> bool:
    stamp = env.path / STAMP
    return env.python.is_file() and stamp.is_file() and stamp.read_text() == stamp_text(env, requirements)


def setup(names: list[str]) -> None:
    require_peer_bench("setting up the peers' environments")
    requirements = requirements_file()
    for env in (ENVS[n] for n in names):
        if is_ready(env, requirements):
            print(f"{env.path}: ready (trl {env.trl})", flush=True)
            continue
        print(f"{env.path}: installing trl {env.trl} with {requirements} (a few minutes)", flush=True)
        (env.path / STAMP).unlink(missing_ok=True)
        for argv in setup_commands(env, requirements):
            print("  $ " + " ".join(argv), flush=True)
            if subprocess.call(argv) != 0:
                raise BenchError(f"{env.name}: `{' '.join(argv)}` failed; see the output above")
        check_env(env)
        (env.path / STAMP).write_text(stamp_text(env, requirements))


def check_env(env: PeerEnv) -> None:
    """The env's python imports trl at the expected version and torch; else one line saying how to fix it."""
    fix = f"run `python -m lightrlhf.bench.peers setup` (or `make bench-peers`), or delete {env.path} to rebuild it"
    if not env.python.is_file():
        raise BenchError(f"the trl {env.trl} peers need the environment {env.path}, which is missing: {fix}")
    probe = "import torch, trl; print(trl.__version__)"
    try:
        done = subprocess.run([str(env.python), "-c", probe], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise BenchError(f"{env.python} cannot run ({error}): {fix}") from None
    if done.returncode != 0:
        why = (done.stderr.strip().splitlines() or [f"exit {done.returncode}"])[-1]
        raise BenchError(f"{env.path} is broken ({why}): {fix}")
    version = (done.stdout.strip().splitlines() or ["?"])[-1]
    if version != env.trl:
        raise BenchError(f"{env.path} has trl {version}, the peers need {env.trl}: {fix}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench.peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["setup"])
    ap.add_argument("--only", nargs="+", choices=list(ENVS), default=list(ENVS), help="environments to make")
    args = ap.parse_args(argv)
    try:
        setup(args.only)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
