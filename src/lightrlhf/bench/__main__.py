"""python -m lightrlhf.bench [--runs N] [--only sft rm ppo ppo1 dpo grpo rloo floor trl_sft ...] [--peers]
                             [--steps-scale F]

Runs each configuration N times (clean runs; contaminated ones are retried), round-robin so that
drift over the session spreads evenly over the configurations, then prints the report and writes
outputs/bench/report.md and outputs/bench/results.jsonl (one record per run, this session only).

--peers adds trl's run of every chosen configuration (trl_sft for sft, ...; `make bench-peers`), in
the peers' environments (`python -m lightrlhf.bench.peers setup`). Each round runs trl's
configuration and ours back to back, trl first in odd rounds and ours first in even ones, so every
lightrlhf / trl ratio is taken between neighbouring runs and neither side always runs first.

--since REV adds, the same way, each chosen configuration as the commit REV ran it (`bench.since`:
its checkout, its code, its overrides), so a speed-up against earlier code is measured in one session.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from lightrlhf.bench.compare import against_earlier, pairs, side_by_side
from lightrlhf.bench.peers import ENVS, PEERS, check_env, peer_configurations
from lightrlhf.bench.report import DIFFERENCES, counted, environment, git_commit, markdown, summarise
from lightrlhf.bench.runner import run_timed, wait_until_idle
from lightrlhf.bench.since import checkout, old_configurations, resolve
from lightrlhf.bench.workload import (
    ASSETS,
    ONLINE,
    OUT,
    PAIRS,
    ROOT,
    SEPARATOR,
    BenchError,
    Config,
    base_name,
    check_sequence_lengths,
    configurations,
    ensure_assets,
    ensure_reward_export,
    read_result,
    require_peer_bench,
    since_name,
)

NAMES = ("sft", "floor", "rm", "rm_floor", "ppo", "ppo1", "dpo", "grpo", "rloo")
PEER_NAMES = tuple(PAIRS.values())


def round_order(chosen: list[str], round_no: int) -> list[str]:
    """One round of the round-robin: our configurations in NAMES order, each next to its trl peer and
    its earlier commit's run (`--since`), those first in odd rounds and ours first in even ones (a
    group's order alternates, so whatever favours the first or second run of a pair -- caches, the
    machine settling -- cancels out over rounds)."""
    order = []
    for name in NAMES:
        earlier = [n for n in chosen if SEPARATOR in n and base_name(n) == name]
        group = [n for n in (PAIRS.get(name), *earlier, name) if n in chosen]
        order += group if round_no % 2 else group[::-1]
    return order


def chosen_names(only: list[str], peers: bool, since: str | None = None) -> list[str]:
    """The configurations to run: `only`, plus the trl peer of each when `peers`, plus each of ours as
    the commit `since` (a full sha) ran it."""
    earlier = [since_name(n, since) for n in only if since and n in NAMES and not n.endswith("floor")]
    return [*only, *(PAIRS[n] for n in only if peers and n in PAIRS and PAIRS[n] not in only), *earlier]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3, help="clean runs per configuration (default 3)")
    ap.add_argument("--only", nargs="+", choices=NAMES + PEER_NAMES, default=list(NAMES), metavar="NAME",
                    help=f"configurations to run, of {' '.join(NAMES + PEER_NAMES)} (default: ours and the floor)")
    ap.add_argument("--peers", action="store_true",
                    help="also run trl's peer of every chosen configuration, interleaved with ours")
    ap.add_argument("--since", metavar="REV", default=None,
                    help="also run each chosen configuration as commit REV ran it, interleaved (bench.since)")
    ap.add_argument("--steps-scale", type=float, default=1.0,
                    help="multiply every step budget (e.g. 0.1 for a quick check; the figures are then not comparable)")
    ap.add_argument("--max-foreign", type=float, default=0.03,
                    help="flag a run as contaminated when other processes used more than this share of the CPUs")
    ap.add_argument("--retries", type=int, default=6, help="extra runs allowed per configuration to replace flagged ones")
    ap.add_argument("--max-wait", type=float, default=900.0, help="seconds to wait for an idle machine before a run")
    ap.add_argument("--keep-contaminated", action="store_true",
                    help="smoke runs on a busy machine: count flagged runs instead of replacing them "
                         "(the report says so; its figures then mean nothing)")
    args = ap.parse_args(argv)
    if args.runs < 1 or args.steps_scale <= 0:
        ap.error("--runs must be >= 1 and --steps-scale > 0")
    return args


def one_run(config: Config, run_dir: Path, round_no: int, args: argparse.Namespace) -> dict[str, Any]:
    run_dir.mkdir(parents=True, exist_ok=True)
    waited, busy_before = wait_until_idle(max_wait=args.max_wait)
    log_path = run_dir / "log.txt"
    commit = git_commit()
    measured = run_timed(config.argv(run_dir, ASSETS), log_path, cwd=ROOT)
    text = log_path.read_text(errors="replace")
    result = read_result(config, run_dir, text) if measured.rc == 0 else None
    ok = result is not None and result.get("rate") is not None
    return {"config": config.name, "title": config.title, "round": round_no, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "unit": config.unit, "units_per_step": config.units_per_step, "steps": config.steps,
            **measured.as_dict(), "contaminated": measured.foreign_cpu_share > args.max_foreign, "ok": ok,
            "waited_s": waited, "busy_share_before": busy_before, "result": result, "commit": commit,
            "run_dir": str(run_dir),
            "argv": config.argv(run_dir, ASSETS)[1:]}


def describe(record: dict[str, Any], keep_contaminated: bool = False) -> str:
    if not record["ok"]:
        return f"FAILED (exit {record['rc']}), see {record['run_dir']}/log.txt"
    res = record["result"]
    flag = ""
    if record["contaminated"]:
        flag = " CONTAMINATED, " + ("kept (--keep-contaminated)" if keep_contaminated else "will be replaced")
    return (f"{res['rate']:,.2f} {record['unit']}, {res['seconds_per_step']:.3f} s/step, "
            f"RSS {record['max_rss_mb']:,.0f} MB, wall {record['wall_s']:.1f} s, "
            f"others used {record['foreign_cpu_share']:.1%} of the CPUs{flag}")


def require_peer_envs(names: list[str]) -> None:
    """Every trl configuration in `names` needs its environment, working: else one line (exit 2)
    before any asset is built or any run started."""
    needed = sorted({PEERS[n][3] for n in names if n in PEERS})
    if needed:
        require_peer_bench("the trl peers")
    for name in needed:
        check_env(ENVS[name])
        print(f"peer environment {ENVS[name].path}: trl {ENVS[name].trl}", flush=True)


def prepare(only: list[str]) -> tuple[dict[str, str], list[str], dict[str, Any], Path | None]:
    require_peer_envs(only)
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
    keep = args.keep_contaminated
    try:
        since = resolve(args.since) if args.since else None
        names = chosen_names(args.only, args.peers, since)
        hashes, notes, lengths, reward = prepare([base_name(n) for n in names])
        earlier = {} if since is None else old_configurations(
            checkout(since), since, [base_name(n) for n in names if SEPARATOR in n], args.steps_scale)
    except BenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    ours = configurations(ASSETS, reward, args.steps_scale)
    configs = {**ours, **peer_configurations(ours), **earlier}
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    started = time.strftime("%Y-%m-%d %H:%M")
    run_root = OUT / "runs" / stamp
    results_path = OUT / "results.jsonl"
    results_path.write_text("")
    records: dict[str, list[dict[str, Any]]] = {n: [] for n in round_order(names, 1)}
    attempts = dict.fromkeys(records, 0)
    failed: set[str] = set()
    for round_no in range(1, args.runs + 1):
        for config in (configs[n] for n in round_order(names, round_no)):
            while config.name not in failed and attempts[config.name] < args.runs + args.retries:
                clean = sum(counted(r, keep) for r in records[config.name])
                if clean >= round_no:
                    break
                attempts[config.name] += 1
                run_dir = run_root / f"{config.name}-{attempts[config.name]}"
                print(f"{config.name} run {clean + 1}/{args.runs} (round {round_no}, attempt "
                      f"{attempts[config.name]}): {config.title}, {config.steps} {config.step_word}", flush=True)
                record = one_run(config, run_dir, round_no, args)
                records[config.name].append(record)
                with open(results_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                print("  " + describe(record, keep), flush=True)
                if not record["ok"]:
                    failed.add(config.name)
                    print("  " + "\n  ".join(Path(record["run_dir"], "log.txt").read_text(errors="replace")
                                             .strip().splitlines()[-5:]), flush=True)
    summaries = {name: s for name in records if (s := summarise(configs[name], records[name], keep)) is not None}
    env = environment()
    env["threads"] = "/".join(str(t) for t in sorted({s.threads for s in summaries.values() if s.threads})) or "?"
    matched = pairs(summaries, records, keep)
    beside = side_by_side(matched, records, keep) if matched else ""
    if since is not None:
        beside += against_earlier(since, summaries, records, keep)
    caveats = []
    if keep:
        caveats.append("Smoke run (--keep-contaminated): runs that other processes slowed were counted, not "
                       "replaced; these figures mean nothing.")
    if args.steps_scale != 1.0:
        caveats.append(f"Quick check: step budgets scaled by {args.steps_scale}; not comparable with PEERS.md.")
    text = markdown(summaries, args.runs, started, env, beside, tuple(caveats))
    text += checks_section(hashes, notes, lengths, records, keep)
    text += "\n" + DIFFERENCES
    text += f"\nRuns: `{results_path.relative_to(ROOT)}` (one record per run), logs under `{run_root.relative_to(ROOT)}`.\n"
    (OUT / "report.md").write_text(text)
    print("\n" + text)
    missing = [name for name in records if name not in summaries]
    if missing:
        print(f"no clean run for: {', '.join(missing)}", file=sys.stderr)
        return 1
    return 0


def checks_section(hashes: dict[str, str], notes: list[str], lengths: dict[str, Any],
                   records: dict[str, list[dict[str, Any]]], keep_contaminated: bool = False) -> str:
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
    versions = sorted({json.dumps(r["result"]["versions"], sort_keys=True) for name in PEER_NAMES
                       for r in records.get(name, []) if r["ok"] and r["result"].get("versions")})
    if versions:
        lines.append("- trl's runs, as they report their packages: "
                     + "; ".join(", ".join(f"{k} {v}" for k, v in json.loads(v).items()) for v in versions)
                     + " (environments under `outputs/peer-envs/`).")
    threads = sorted({r["result"].get("torch_threads") for rs in records.values() for r in rs if r["ok"]} - {None})
    lines.append(f"- torch intra-op threads in the runs: {threads} (the run's thread policy, README \"Threads\"; the machine is idle before each run).")
    flagged = [r for rs in records.values() for r in rs if r["contaminated"]]
    fate = "kept in results.jsonl and counted (--keep-contaminated)" if keep_contaminated else \
        "kept in results.jsonl and replaced"
    lines.append(f"- Contaminated runs (others used > the limit of the CPUs), {fate}: "
                 f"{len(flagged)}" + (" (" + ", ".join(f"{r['config']} {r['foreign_cpu_share']:.1%}" for r in flagged)
                                      + ")" if flagged else "") + ".")
    clean = [r for rs in records.values() for r in rs if r["ok"] and not r["contaminated"]]
    if clean:
        lines.append(f"- Largest CPU share used by other processes in a clean run: "
                     f"{max(r['foreign_cpu_share'] for r in clean):.1%}.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
