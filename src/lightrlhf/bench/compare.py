"""lightrlhf beside trl, both measured in one interleaved run: the side-by-side table of the report.

The machine's speed drifts by up to 20% within an hour (PEERS.md), so a ratio of two medians taken
minutes apart carries that drift. Each round runs our configuration and trl's next to each other;
the ratio is taken within a round, ours_k / trl_k, and the median over rounds is reported, so a slow
stretch of the session slows both sides of the ratios it touches.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Any

from lightrlhf.bench.report import Summary, counted, fmt
from lightrlhf.bench.workload import PAIRS, SEPARATOR, since_name


@dataclass(frozen=True)
class Pair:
    stage: str  # our configuration's name
    ours: Summary
    peer: Summary
    ratios: list[float]  # ours / trl in each round where both have a counted run, round order


def rates_by_round(records: list[dict[str, Any]], keep_contaminated: bool = False, key: str = "rate") -> dict[int, float]:
    """{round: the result's `key`} of the counted runs that report it (a round's last one, if a run was
    repeated in it)."""
    return {r["round"]: r["result"][key] for r in records
            if counted(r, keep_contaminated) and "round" in r and r["result"].get(key) is not None}


def per_round_ratios(numerator: list[dict[str, Any]], denominator: list[dict[str, Any]],
                     keep_contaminated: bool = False, key: str = "rate") -> list[float]:
    """key_num(k) / key_den(k) for every round k with a counted run of both, in round order."""
    top, bottom = (rates_by_round(r, keep_contaminated, key) for r in (numerator, denominator))
    return [top[k] / bottom[k] for k in sorted(top.keys() & bottom.keys())]


def pairs(summaries: dict[str, Summary], records: dict[str, list[dict[str, Any]]],
          keep_contaminated: bool = False) -> list[Pair]:
    return [Pair(stage, summaries[stage], summaries[peer],
                 per_round_ratios(records[stage], records[peer], keep_contaminated))
            for stage, peer in PAIRS.items() if stage in summaries and peer in summaries]


def _ratio(values: list[float]) -> str:
    if not values:
        return "— (no round with both)"
    spread = f" [{min(values):.2f}–{max(values):.2f}]" if len(values) > 1 else ""
    return f"**{statistics.median(values):.2f}x**{spread}"


def side_by_side(matched: list[Pair], records: dict[str, list[dict[str, Any]]],
                 keep_contaminated: bool = False) -> str:
    """The markdown section: each stage's two medians, the median per-round ratio, peak RSS beside."""
    lines = ["", "## lightrlhf vs trl, interleaved in this run", "",
             "Throughput ratio: lightrlhf / trl within each round (the two runs are neighbours), median over "
             "rounds [min–max]. Peak RSS: ratio of the medians. Threads: torch's intra-op threads (ours follows "
             "the machine's free CPUs, README \"Threads\"; trl takes torch's default, all cores), equal on an idle "
             "machine. Nothing here is compared with another run.", "",
             "| stage | unit | lightrlhf (median [min–max]) | trl (median [min–max]) | lightrlhf / trl | rounds |"
             " peak RSS lightrlhf | peak RSS trl | RSS lightrlhf / trl | threads lightrlhf / trl |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for p in matched:
        ours, peer = p.ours, p.peer
        lines.append(f"| {ours.config.title} vs {peer.config.title} | {ours.config.unit} | "
                     f"{fmt(ours.rate)} [{fmt(ours.low)}–{fmt(ours.high)}] | "
                     f"{fmt(peer.rate)} [{fmt(peer.low)}–{fmt(peer.high)}] | {_ratio(p.ratios)} | {len(p.ratios)} | "
                     f"{ours.rss_mb:,.0f} MB | {peer.rss_mb:,.0f} MB | {ours.rss_mb / peer.rss_mb:.2f}x | "
                     f"{ours.threads or '?'} / {peer.threads or '?'} |")
    floor = records.get("floor")
    if floor:
        against = [(name, per_round_ratios(records[name], floor, keep_contaminated))
                   for name in ("sft", "trl_sft") if records.get(name)]
        said = [f"{'lightrlhf' if name == 'sft' else 'trl'} SFT {_ratio(ratios)}" for name, ratios in against]
        if said:
            lines += ["", "- SFT vs the bare-PyTorch floor, within each round (median [min–max]): "
                      + "; ".join(said) + "."]
    return "\n".join(lines) + "\n"


def against_earlier(sha: str, summaries: dict[str, Summary], records: dict[str, list[dict[str, Any]]],
                    keep_contaminated: bool = False) -> str:
    """The markdown section of `--since`: each configuration now against commit `sha` (bench.since),
    both ratios taken within a round. For the online stages also the rollout's generated tokens/s,
    i.e. generated tokens / time/rollout_s (sampling and the scoring forwards), its ratio being
    rollout_s then / rollout_s now."""
    tag = sha[:7]
    lines = ["", f"## lightrlhf now against commit {tag}, interleaved in this run", "",
             f"Each configuration as commit {sha[:12]} ran it (its checkout, code and overrides) beside today's, "
             "the two back to back in every round; ratios are now / then within a round, median over rounds "
             "[min–max].", "",
             "| stage | unit | now (median) | then (median) | now / then | rollout generated tok/s now | then |"
             " rollout now / then | rounds |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name in summaries:
        earlier = since_name(name, sha)
        if SEPARATOR in name or earlier not in summaries:
            continue
        now, then = summaries[name], summaries[earlier]
        ratios = per_round_ratios(records[name], records[earlier], keep_contaminated)
        rollout = ["–", "–", "–"]
        tokens = now.config.secondary.get("generated tok/s")
        if tokens and "rollout_s" in now.extra and "rollout_s" in then.extra:
            # rollout tokens/s now / then = rollout_s then / rollout_s now
            speedups = per_round_ratios(records[earlier], records[name], keep_contaminated, key="rollout_s")
            rollout = [f"{fmt(tokens / now.extra['rollout_s'])}", f"{fmt(tokens / then.extra['rollout_s'])}",
                       _ratio(speedups)]
        lines.append(f"| {now.config.title} | {now.config.unit} | {fmt(now.rate)} | {fmt(then.rate)} | "
                     f"{_ratio(ratios)} | {' | '.join(rollout)} | {len(ratios)} |")
    return "\n".join(lines) + "\n"
