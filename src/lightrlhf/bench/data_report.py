"""The data report on a large synthetic preference file: wall time and peak memory.

    python -m lightrlhf.bench.data_report [--rows 1000000] [--file <path>] [--near-duplicates]

Writes (once; reused while it exists) a JSONL file of `rows` preference pairs in the demo's style: prompts
drawn from a small grammar (so prompts repeat), responses of 5-40 words, a chosen response that is
longer on ~65% of the pairs, 1% exact repeats, 1% near-duplicates (one word changed), 2% pairs in
Chinese. Then runs the same code as `python -m lightrlhf.data report` (model=tiny's tokenizer, the
default cleaning plus the report's measuring of the switched-off steps) and prints the wall time and
the peak resident memory of the main process and of the largest worker (getrusage), the CPU time of
all of them and the load average (the figures mean little on a busy machine), so that "reported in 2 minutes with bounded memory" is measured,
not assumed. Not part of `make test`: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import time
from pathlib import Path

VERBS = ["explain", "describe", "summarise", "compare", "list", "define", "discuss", "outline"]
TOPICS = ["rivers", "tides", "glaciers", "volcanoes", "forests", "deserts", "bridges", "engines", "markets", "songs",
          "clocks", "maps", "storms", "islands", "gardens", "roads", "cities", "stars", "bees", "ships"]
WORDS = ("the a of and to in is that it for on with as by at from this be are was or an which their more "
         "water light stone river time place work form early small large old new high long part way").split()
ZH = "长城河流山脉森林城市天空海洋星星花园道路桥梁市场歌曲时钟地图风暴岛屿蜜蜂船只湖泊草原"


def synthetic_rows(rows: int, seed: int = 0):
    rng = random.Random(seed)
    recent: list[dict] = []
    for number in range(rows):
        draw = rng.random()
        if recent and draw < 0.01:
            yield dict(rng.choice(recent))  # an exact repeat
            continue
        if recent and draw < 0.02:
            row = dict(rng.choice(recent))
            words = row["chosen"].split()
            words[rng.randrange(len(words))] = rng.choice(WORDS)
            row["chosen"] = " ".join(words)  # a near-duplicate
            yield row
            continue
        if draw < 0.04:
            prompt = f"请介绍{rng.choice(ZH)}{rng.choice(ZH)}。"
            a = "".join(rng.choice(ZH) for _ in range(rng.randint(8, 60))) + "。"
            b = "".join(rng.choice(ZH) for _ in range(rng.randint(8, 60))) + "。"
        else:
            prompt = f"{rng.choice(VERBS)} {rng.choice(TOPICS)} {rng.choice(TOPICS)} :"
            a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " ."
            b = " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40))) + " ."
        longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
        chosen, rejected = (longer, shorter) if rng.random() < 0.65 else (shorter, longer)
        row = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": round(rng.uniform(0, 3), 2)}
        if number % 1000 == 0:
            recent = recent[-50:]
        recent.append(row)
        yield row


def write_file(path: Path, rows: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    with partial.open("w", encoding="utf-8") as file:
        for row in synthetic_rows(rows):
            file.write(json.dumps(row, ensure_ascii=False) + "\n")
    partial.rename(path)


def _cpu_seconds() -> tuple[float, float]:
    """CPU seconds of this process and of its (finished) children, the workers."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--file", type=Path, default=None, help="default: outputs/bench/pref-<rows>.jsonl")
    parser.add_argument("--near-duplicates", action="store_true", help="drop near-duplicates too (data.clean)")
    parser.add_argument("--workers", type=int, default=2, help="report.workers (0: a single process)")
    args = parser.parse_args(argv)
    path = args.file or Path("outputs/bench") / f"pref-{args.rows}.jsonl"
    if not path.exists():
        started = time.perf_counter()
        write_file(path, args.rows)
        print(f"wrote {path} ({path.stat().st_size / 2**20:.0f} MiB) in {time.perf_counter() - started:.1f} s")

    from lightrlhf.data.clean import CleaningSpec
    from lightrlhf.data.report import ReportSpec, build_report
    from lightrlhf.data.source import DataSource
    from lightrlhf.demo.assets import TINY_DIR
    from lightrlhf.models.loading import load_tokenizer
    from lightrlhf.models.spec import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(TINY_DIR)))
    source = DataSource(path=str(path), max_length=64, max_prompt_length=16,
                        clean=CleaningSpec(near_duplicates=args.near_duplicates))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    load_before = os.getloadavg()[0]
    started, cpu_started = time.perf_counter(), _cpu_seconds()
    report = build_report(source, tokenizer, ReportSpec(workers=args.workers))
    wall, cpu_ended = time.perf_counter() - started, _cpu_seconds()
    main_cpu, workers_cpu = cpu_ended[0] - cpu_started[0], cpu_ended[1] - cpu_started[1]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    worker_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # the largest worker's
    rows, bias = report["rows"], report["length_bias"]
    print(f"rows: {rows['read']} read, {rows['kept']} kept, dropped {rows['dropped']}, flagged {rows['flagged']}")
    print(f"length bias: chosen longer {bias['chosen_longer_fraction']:.3f}, "
          f"length-only accuracy {bias['length_only_accuracy']:.3f}")
    print(f"report wall time: {wall:.1f} s ({rows['read'] / wall:.0f} rows/s) with {args.workers} worker process(es); "
          f"CPU time {main_cpu + workers_cpu:.1f} s: {main_cpu:.1f} s main process, {workers_cpu:.1f} s workers")
    # on a busy machine the wall time says how busy it was; the CPU times give what 2 free cores would take:
    # the main process (reading, cleaning) is serial, the rest shares the cores
    print(f"wall time on {os.cpu_count()} free cores, from the CPU times: >= "
          f"{max(main_cpu, (main_cpu + workers_cpu) / (os.cpu_count() or 1)):.1f} s")
    print(f"peak RSS: {peak / 1024:.0f} MiB main process (before the report: {before / 1024:.0f} MiB)"
          + (f", {worker_peak / 1024:.0f} MiB largest worker" if args.workers else ""))
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} CPUs")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
