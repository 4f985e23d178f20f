"""python -m lightrlhf.bench [--runs N] [--only sft rm ppo ppo1 dpo grpo rloo floor] [--steps-scale F]

Runs each configuration N times (clean runs; contaminated ones are retried), round-robin so that
drift over the session spreads evenly over the configurations, then prints the report and writes
outputs/bench/report.md and outputs/bench/results.jsonl (one record per run, this session only).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightrlhf.bench.report import DIFFERENCES, environment, git_commit, markdown, summarise
from lightrlhf.bench.runner import run_timed, wait_until_idle
from lightrlhf.bench.workload import (
    ASSETS,
    ONLINE,
    OUT,
    ROOT,
    BenchError,
    Config,
    check_sequence_lengths,
    configurations,
    ensure_assets,
    ensure_reward_export,
    read_result,
    require_peer_bench,
)

NAMES = ("sft", "floor", "rm", "ppo", "ppo1", "dpo", "grpo", "rloo")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="clean runs per configuration (default 3)")
    ap.add_argument("--only", nargs="+", choices=NAMES, default=list(NAMES), help="configurations to run")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every step budget (e.g. 0.1 for a quick check; the figures are then not comparable)")
    ap.add_argument("--max-foreign", type=float, default=0.03,
                    help="flag a run as contaminated when other processes used more than this share of the CPUs")
    ap.add_argument("--retries", type=int, default=6, help="extra runs allowed per configuration to replace flagged ones")
    ap.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for an idle machine before a run")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.steps_scale <= 0:
        ap.error("--runs must be >= 1 and --steps-scale > 0")
    return args


def one_run(config: Config, run_dir: Path, args: argparse.Namespace) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    waited, busy_before = wait_until_idle(max_wait=args.max_wait)
    log_path = run_dir / "log.txt"
    commit = git_commit()
    measured = run_timed(config.argv(run_dir, ASSETS), log_path, cwd=ROOT)
    text = log_path.read_text(errors="replace")
    result = read_result(config, run_dir, text) if measured.rc == 0 else None
    ok = result is not None and result.get("rate") is not None
    return {"config": config.name, "title": config.title, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "unit": config.unit, "units_per_step": config.units_per_step, "steps": config.steps,
            **measured.as_dict(), "contaminated": measured.foreign_cpu_share > args.max_foreign, "ok": ok,
            "waited_s": waited, "busy_share_before": busy_before, "result": result, "commit": commit,
            "run_dir": str(run_dir),
            "argv": config.argv(run_dir, ASSETS)[1:]}


def describe(record: dict[str, Any]) -> str:
    if not record["ok"]:
        return f"FAILED (exit {record['rc']}), see {record['run_dir']}/log.txt"
    res = record["result"]
    flag = " CONTAMINATED, will be replaced" if record["contaminated"] else ""
    return (f"{res['rate']:,.2f} {record['unit']}, {res['seconds_per_step']:.3f} s/step, "
            f"RSS {record['max_rss_mb']:,.0f} MB, wall {record['wall_s']:.1f} s, "
            f"others used {record['foreign_cpu_share']:.1%} of the CPUs{flag}")


def prepare(only: list[str]) -> tuple[dict[str, str], list[str], dict[str, Any], Path | None]:
    hashes, notes = ensure_assets(ASSETS)
    print(f"assets {ASSETS}: sha256 prefixes of " + ", ".join(f"{k} {v[:8]}" for k, v in hashes.items())
          + " match PEERS.md", flush=True)
    for note in notes:
        print(f"  note: {note}", flush=True)
    lengths = check_sequence_lengths(ASSETS)
    print(f"tokenized with lightrlhf: SFT and preference sequences {lengths['sft_lengths']} tokens "
          f"(prompt {lengths['sft_prompt_lengths']}, ends with EOS), prompts {lengths['prompt_lengths']}, "
          f"BOS added: {lengths['bos_added']}", flush=True)
    reward = ensure_reward_export(ASSETS) if set(ONLINE) & set(only) else None
    if "floor" in only:
        require_peer_bench("the bare-PyTorch floor")
    return hashes, notes, lengths, reward


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        hashes, notes, lengths, reward = prepare(args.only)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    configs = configurations(ASSETS, reward, args.steps_scale)
    chosen = [configs[n] for n in NAMES if n in args.only]
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    started = time.strftime("%Y-%m-%d %H:%M")
    run_root = OUT / "runs" / stamp
    results_path = OUT / "results.jsonl"
    results_path.write_text("")
    records: dict[str, list[dict[str, Any]]] = {c.name: [] for c in chosen}
    attempts = {c.name: 0 for c in chosen}
    failed: set[str] = set()
    for round_no in range(1, args.runs + 1):
        for config in chosen:
            while config.name not in failed and attempts[config.name] < args.runs + args.retries:
                clean = sum(r["ok"] and not r["contaminated"] for r in records[config.name])
                if clean >= round_no:
                    break
                attempts[config.name] += 1
                run_dir = run_root / f"{config.name}-{attempts[config.name]}"
                print(f"{config.name} run {clean + 1}/{args.runs} (attempt {attempts[config.name]}): "
                      f"{config.title}, {config.steps} {config.step_word}", flush=True)
                record = one_run(config, run_dir, args)
                records[config.name].append(record)
                with open(results_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print("  " + describe(record), flush=True)
                if not record["ok"]:
                    failed.add(config.name)
                    print("  " + "\n  ".join(Path(record["run_dir"], "log.txt").read_text(errors="replace")
                                             .strip().splitlines()[-5:]), flush=True)
    summaries = {c.name: s for c in chosen if (s := summarise(c, records[c.name])) is not None}
    env = environment()
    env["threads"] = "/".join(str(t) for t in sorted({s.threads for s in summaries.values() if s.threads})) or "?"
    text = markdown(summaries, args.runs, started, env)
    if args.steps_scale != 1.0:
        text += f"\n**Quick check: step budgets scaled by {args.steps_scale}; not comparable with PEERS.md.**\n"
    text += checks_section(hashes, notes, lengths, records)
    text += "\n" + DIFFERENCES
    text += f"\nRuns: `{results_path.relative_to(ROOT)}` (one record per run), logs under `{run_root.relative_to(ROOT)}`.\n"
    (OUT / "report.md").write_text(text)
    print("\n" + text)
    missing = [c.name for c in chosen if c.name not in summaries]
    if missing:
        print(f"no clean run for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def checks_section(hashes: dict[str, str], notes: list[str], lengths: dict[str, Any],
                   records: dict[str, list[dict[str, Any]]]) -> str:
    lines = ["", "## Checks", "",
             "- Assets: sha256 " + ", ".join(f"{k} `{v[:8]}…`" for k, v in hashes.items())
             + " match PEERS.md's prefixes and the builder's manifest.json.",
             *(f"  Note: {n}." for n in notes),
             f"- lightrlhf's tokenization: every SFT and preference sequence is {lengths['sft_lengths']} tokens "
             f"(prompt {lengths['sft_prompt_lengths']} + completion + EOS), every prompt {lengths['prompt_lengths']}; "
             f"BOS added: {'yes' if lengths['bos_added'] else 'no'}."]
    ours = [r for rs in records.values() for r in rs if r["ok"] and "data_problems" in r["result"]]
    problems = {k: v for r in ours for k, v in r["result"]["data_problems"].items() if v}
    lines.append(f"- Truncated or dropped rows in the runs: {problems or 'none'}.")
    online = [r["result"].get("shares_base") for name in ONLINE for r in records.get(name, []) if r["ok"]]
    if online:
        lines.append(f"- PPO, GRPO, RLOO: the reward model shares the policy's base (log says so) in "
                     f"{sum(map(bool, online))} of {len(online)} runs.")
    commits = sorted({r["commit"] for rs in records.values() for r in rs if r["ok"]})
    lines.append(f"- lightrlhf code: {', '.join(commits)}"
                 + (" -- the code changed during the session" if len(commits) > 1 else " for every run") + ".")
    threads = sorted({r["result"].get("torch_threads") for rs in records.values() for r in rs if r["ok"]} - {None})
    lines.append(f"- torch intra-op threads in the runs: {threads} (the run's thread policy, README \"Threads\"; the machine is idle before each run).")
    flagged = [r for rs in records.values() for r in rs if r["contaminated"]]
    lines.append(f"- Contaminated runs (others used > the limit of the CPUs), kept in results.jsonl and replaced: "
                 f"{len(flagged)}" + (" (" + ", ".join(f"{r['config']} {r['foreign_cpu_share']:.1%}" for r in flagged)
                                      + ")" if flagged else "") + ".")
    clean = [r for rs in records.values() for r in rs if r["ok"] and not r["contaminated"]]
    if clean:
        lines.append(f"- Largest CPU share used by other processes in a clean run: "
                     f"{max(r['foreign_cpu_share'] for r in clean):.1%}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
