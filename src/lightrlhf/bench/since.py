"""The same benchmark at an earlier commit, run beside today's code: `python -m lightrlhf.bench --since REV`.

A speed-up is a ratio against "before", and before must be measured in the same session: the floor
script ran at 5,400-9,100 tokens/s on different days on this machine, so a figure from another day
says nothing. `--since REV` checks REV out (a detached `git worktree` under outputs/bench/since/) and
adds that commit's own configuration of each chosen benchmark (`ppo@<sha>`, ...) to the round-robin,
next to ours: the old code with its old overrides, its own reward-model export and assets (built by
its own code, from the same peer builder), run by this interpreter with PYTHONPATH on its sources.
Each round runs the pair back to back, the old commit first in odd rounds and today's first in even
ones, and the ratio is taken within a round (`compare.py`).

For PPO, GRPO and RLOO the report also gives the rollout's own rate: generated tokens / the stage's
`time/rollout_s` (sampling plus the scoring forwards, its median over the timed rollouts), the
figure the rollout work is judged by.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from lightrlhf.bench.workload import OUT, ROOT, BenchError, Config, peer_bench_dir, since_name

SINCE_DIR = OUT / "since"

# Run inside the old checkout (its sources first on sys.path): its own assets, reward export and
# configurations, printed as JSON. Only what Config needs is read back; the old code's argv is then
# built by today's Config.argv, which has not changed for train.py runs since the benchmark exists.
_DESCRIBE = """
import json, sys
from lightrlhf.bench import workload as w
names, scale = sys.argv[1].split(","), float(sys.argv[2])
w.ensure_assets(w.ASSETS)
online = [n for n in names if n.startswith(("ppo", "grpo", "rloo"))]
reward = w.ensure_reward_export(w.ASSETS) if online else None
configs = w.configurations(w.ASSETS, reward, scale)
missing = [n for n in names if n not in configs]
print(json.dumps({"missing": missing, "configs": {n: {
    "title": c.title, "unit": c.unit, "units_per_step": c.units_per_step, "steps": c.steps,
    "step_word": c.step_word, "secondary": c.secondary, "overrides": list(c.overrides)}
    for n, c in configs.items() if n in names}}))
"""


def resolve(rev: str) -> str:
    """The full sha of `rev` in this checkout's repository; one line when it is none."""
    try:
        done = subprocess.run(["git", "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}"], cwd=ROOT,
                              capture_output=True, text=True)
    except OSError as error:
        raise BenchError(f"--since {rev}: git is not available ({error.strerror or error})") from None
    if done.returncode != 0 or not done.stdout.strip():
        raise BenchError(f"--since {rev}: not a commit of the repository at {ROOT}")
    return done.stdout.strip()


def checkout(sha: str, root: Path = SINCE_DIR) -> Path:
    """A detached worktree of `sha` (made once, reused); one line when git cannot make it."""
    path = root / sha[:12]
    if (path / "train.py").is_file():
        return path
    root.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["git", "worktree", "add", "--detach", str(path), sha], cwd=ROOT,
                          capture_output=True, text=True)
    if done.returncode != 0 or not (path / "train.py").is_file():
        why = (done.stderr.strip().splitlines() or ["no train.py there"])[-1]
        raise BenchError(f"--since {sha[:12]}: cannot check it out to {path}: {why}")
    return path


def source_env(path: Path) -> dict[str, str]:
    """The environment that makes this interpreter import the checkout's lightrlhf, not today's."""
    return {**os.environ, "PYTHONPATH": str(path / "src"), "PEER_BENCH": str(peer_bench_dir())}


def old_configurations(path: Path, sha: str, names: list[str], scale: float) -> dict[str, Config]:
    """{`<name>@<sha7>`: the old commit's configuration of `name`}, run from its checkout."""
    print(f"--since {sha[:12]}: preparing its assets and configurations in {path}", flush=True)
    done = subprocess.run([sys.executable, "-c", _DESCRIBE, ",".join(names), repr(scale)], cwd=path,
                          env=source_env(path), capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        why = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise BenchError(f"--since {sha[:12]}: its benchmark configurations could not be read: {why}")
    described = json.loads(lines[-1])
    if described["missing"]:
        raise BenchError(f"--since {sha[:12]}: {', '.join(described['missing'])} did not exist at that commit")
    out = {}
    for name, c in described["configs"].items():
        config = Config(since_name(name, sha), f"{c['title']} at {sha[:7]}", c["unit"], c["units_per_step"],
                        c["steps"], step_word=c["step_word"], secondary=dict(c["secondary"]),
                        overrides=tuple(c["overrides"]))
        out[config.name] = replace(config, checkout=str(path))
    return out
