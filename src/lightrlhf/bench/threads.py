"""python -m lightrlhf.bench.threads [--root LABEL=DIR ...] [--repeats N] [--steps-sft N] [--steps-rm N]

The demo's SFT and reward-model steps/s on an idle machine and beside one busy single-threaded
process (a Python loop), with the same idle gating as `make bench`: before each run the machine must
be idle; the busy process is started for the "busy" runs only. Each `--root LABEL=DIR` runs that
checkout's `train.py` and `src/` (e.g. an older commit, to compare thread policies side by side).
Rates are the StepTimer's steady-state steps/s (first batches dropped), the median over repeats.
Results go to stdout as a table and to `outputs/bench/threads-<date>/threads.{json,md}`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from lightrlhf.bench.runner import wait_until_idle
from lightrlhf.bench.workload import OUT, ROOT

BUSY_LOOP = "while True: pass"


def stage_overrides(stage: str, steps: int) -> list[str]:
    data = {"sft": "demo_sft", "rm": "demo_pref"}[stage]
    return [f"stage={stage}", "model=tiny", f"data={data}", f"trainer.max_steps={steps}",
            "trainer.val_check_interval=1000000", "export.enabled=false", "callbacks.checkpoint=null",
            "callbacks.progress_bar=null", "+trainer.enable_progress_bar=false"] + (
        ["stage.eval.at_start=false", "stage.eval.num_prompts=0"] if stage == "sft" else [])


def one_run(root: Path, stage: str, steps: int, busy: bool, run_dir: Path) -> dict:
    wait_until_idle()
    env = {**os.environ, "PYTHONPATH": str(root / "src"), "PYTHONUNBUFFERED": "1"}
    timer = ["+callbacks.timer._target_=lightrlhf.callbacks.timing.StepTimer",
             f"+callbacks.timer.path={run_dir / 'timer.json'}", "+callbacks.timer.units_per_step=1",
             "+callbacks.timer.unit=steps/s"]
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP]) if busy else None
    started = time.monotonic()
    try:
        with open(run_dir.with_suffix(".log"), "w") as log:
            rc = subprocess.call([sys.executable, str(root / "train.py"), *stage_overrides(stage, steps),
                                  f"hydra.run.dir={run_dir}", *timer], cwd=root, env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    timer_file = run_dir / "timer.json"
    result = json.loads(timer_file.read_text()) if rc == 0 and timer_file.is_file() else {}
    return {"stage": stage, "busy": busy, "rc": rc, "wall_s": round(time.monotonic() - started, 1),
            "steps_per_s": result.get("rate"), "torch_threads": result.get("torch_threads")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench.threads", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", action="append", default=[], metavar="LABEL=DIR",
                    help="a checkout whose train.py runs (repeatable; default: this one, as 'current')")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each configuration; the median is reported")
    ap.add_argument("--steps-sft", type=int, default=150)
    ap.add_argument("--steps-rm", type=int, default=60)
    args = ap.parse_args(argv)
    roots = dict(r.split("=", 1) for r in args.root) or {"current": str(ROOT)}
    out_dir = OUT / f"threads-{time.strftime('%Y-%m-%d_%H-%M-%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    # interleaved: each repeat runs every checkout once per configuration, so a drift of the machine's
    # speed (measured up to 24% within an hour here) falls on all of them alike
    for repeat in range(args.repeats):
        for stage, steps in (("sft", args.steps_sft), ("rm", args.steps_rm)):
            for busy in (False, True):
                for label, root in roots.items():
                    name = f"{label}-{stage}-{'busy' if busy else 'idle'}-{repeat}"
                    row = {"label": label, **one_run(Path(root).resolve(), stage, steps, busy, out_dir / name)}
                    rows.append(row)
                    print(f"{name}: {row['steps_per_s']} steps/s ({row['torch_threads']} threads at the end, "
                          f"exit {row['rc']}, {row['wall_s']} s)", flush=True)
    lines = ["| checkout | stage | idle steps/s | beside one busy process | slowdown |", "|---|---|---|---|---|"]
    for label in roots:
        for stage in ("sft", "rm"):
            idle, busy = (_median([r["steps_per_s"] for r in rows if r["label"] == label and r["stage"] == stage
                                   and r["busy"] is b]) for b in (False, True))
            if idle and busy:
                lines.append(f"| {label} | {stage} | {idle:.2f} | {busy:.2f} | {idle / busy:.2f}x |")
    print("\n".join(lines))
    (out_dir / "threads.json").write_text(json.dumps(rows, indent=1))
    (out_dir / "threads.md").write_text("\n".join(lines) + "\n")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


def _median(values: list[float | None]) -> float | None:
    values = sorted(v for v in values if v)
    return statistics.median(values) if values else None


if __name__ == "__main__":
    sys.exit(main())
