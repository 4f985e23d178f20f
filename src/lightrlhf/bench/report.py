"""Summaries of the runs: medians over clean runs, ratios, MFU, and the markdown report.

Ratios are of medians. Ours vs the bare-PyTorch floor is taken within one session. Ours vs trl is
taken within the session too when trl ran in it (`--peers`, the side-by-side table of `compare.py`);
otherwise it uses the figures published in PEERS.md (another session, maybe another host), so it is
indicative only -- the floor measured here next to the floor published there shows how far the
machines differ.
"""

from __future__ import annotations

import platform
import statistics
from dataclasses import dataclass
from typing import Any

from lightrlhf.bench.workload import ONLINE, PAIRS, Config

# PEERS.md, "Results" (2026-11-24, median of 3 clean runs) -- quoted, not re-measured here.
PEER_DATE = "2026-11-24"


@dataclass(frozen=True)
class Published:
    title: str
    steps: str
    rate: float
    low: float
    high: float
    unit: str
    s_per_step: float
    secondary: str
    rss_mb: float
    wall_s: float


PUBLISHED = {
    "sft": Published("trl SFT (1.16.0)", "150", 5142, 5015, 5194, "tokens/s", 0.398,
                     "2,571 loss-tokens/s; 40.2 seq/s", 961, 65.8),
    "floor": Published("bare PyTorch SFT (floor)", "150", 6916, 6886, 7069, "tokens/s", 0.296, "", 852, 50.7),
    "rm": Published("trl reward model (1.16.0)", "150", 28.5, 27.6, 30.0, "pairs/s", 0.561, "7,300 tokens/s",
                    1130, 90.9),
    "ppo": Published("trl PPO, 4 PPO epochs (1.12.0)", "25 rollouts", 4.03, 3.80, 4.12, "episodes/s", 3.97,
                     "258 generated tok/s", 1239, 104.8),
    "ppo1": Published("trl PPO, 1 PPO epoch (1.12.0)", "25 rollouts", 6.98, 6.73, 7.05, "episodes/s", 2.29,
                      "447 generated tok/s", 1244, 64.8),
    "dpo": Published("trl DPO (1.16.0)", "100", 13.6, 12.9, 14.3, "pairs/s", 1.175, "3,487 tokens/s", 1373, 124.2),
    "grpo": Published("trl GRPO, k=4 (1.16.0)", "60 rollouts", 12.6, 12.1, 13.0, "episodes/s", 1.271,
                      "3.15 prompts/s; 805 generated tok/s", 979, 82.4),
    "rloo": Published("trl RLOO, k=4 (1.16.0)", "60 rollouts", 10.2, 10.1, 10.8, "episodes/s", 1.573,
                      "2.54 prompts/s; 651 generated tok/s", 911, 101.5),
}
# The targets: ours / trl at least this, both taken relative to the bare-PyTorch floor (the
# scaled ratio below), since absolute rates on these shared machines drift between sessions.
TARGETS = {"dpo": 1.5, "grpo": 1.3, "rloo": 1.3}
# MFU (PEERS.md): work actually done per token by LoRA SFT on this model, and the measured peak.
FLOP_PER_TOKEN = 16.7e6
PEAK_FLOPS = 180.7e9


@dataclass(frozen=True)
class Summary:
    config: Config
    rate: float
    low: float
    high: float
    s_per_step: float
    rss_mb: float
    wall_s: float
    clean: int
    contaminated: int
    threads: int | None
    extra: dict[str, float]  # medians of other per-run figures (PPO, GRPO, RLOO: rollout_s, update_s)
    kept: int = 0  # contaminated runs among the `clean` ones (`--keep-contaminated`, smoke runs)


def counted(record: dict[str, Any], keep_contaminated: bool = False) -> bool:
    """A run the figures use: it finished with a rate, and nobody else used the CPUs (or, in a smoke
    run on a busy machine, `keep_contaminated`)."""
    return record["ok"] and (keep_contaminated or not record["contaminated"])


def summarise(config: Config, records: list[dict[str, Any]], keep_contaminated: bool = False) -> Summary | None:
    clean = [r for r in records if counted(r, keep_contaminated)]
    if not clean:
        return None
    rates = [r["result"]["rate"] for r in clean]
    med = statistics.median
    extra = {k: med([r["result"][k] for r in clean if k in r["result"]])
             for k in ("rollout_s", "update_s") if any(k in r["result"] for r in clean)}
    return Summary(config, med(rates), min(rates), max(rates), config.units_per_step / med(rates),
                   med([r["max_rss_mb"] for r in clean]), med([r["wall_s"] for r in clean]), len(clean),
                   sum(1 for r in records if r["contaminated"]), clean[0]["result"].get("torch_threads"), extra,
                   sum(1 for r in clean if r["contaminated"]))


def fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def _secondary(s: Summary) -> str:
    return "; ".join(f"{fmt(s.rate * units / s.config.units_per_step)} {label}"
                     for label, units in s.config.secondary.items())


def ppo_split(four_epochs: Summary, one_epoch: Summary) -> tuple[float, float]:
    """(s per PPO epoch, s of rollout) per iteration: t4 - t1 = 3 epochs, t1 = rollout + 1 epoch."""
    epoch = (four_epochs.s_per_step - one_epoch.s_per_step) / 3
    return epoch, one_epoch.s_per_step - epoch


def mfu(tokens_per_s: float) -> float:
    return tokens_per_s * FLOP_PER_TOKEN / PEAK_FLOPS


def markdown(summaries: dict[str, Summary], runs: int, when: str, environment: dict[str, Any],
             side_by_side: str = "", caveats: tuple[str, ...] = ()) -> str:
    """The report; `caveats` (a quick or smoke run) in bold under the header, `side_by_side` (ours
    beside trl, `compare.side_by_side`) after the main table."""
    # trl ran in this session (`--peers`): PEERS.md's figures, from another run, are left out altogether
    interleaved = any(peer in summaries for peer in PAIRS.values())
    published = {} if interleaved else PUBLISHED
    said = ("lightrlhf and trl ran interleaved in this one run, each trl run next to ours; every ratio in "
            "this report compares runs of this run only, never figures from another run. " if interleaved else "")
    lines = [f"# lightrlhf benchmark ({when})", "",
             f"Workload: PEERS.md (tiny Llama, 4.19M params; LoRA r=16 on q/k/v/o; fp32; 128-token sequences). "
             f"{said}"
             f"Median of {runs} clean runs per configuration [min–max]; steady state, first 3 steps dropped. "
             f"torch {environment['torch']}, {environment['threads']} intra-op threads, {environment['cpu']}; "
             f"lightrlhf at {environment['commit']}.", "",
             *(line for caveat in caveats for line in (f"**{caveat}**", "")),
             "| configuration | steps | throughput (median [min–max]) | s/step | secondary rates | peak RSS | wall |"
             " clean runs |",
             "|---|---|---|---|---|---|---|---|"]
    for s in summaries.values():
        steps = f"{s.config.steps}" + (f" {s.config.step_word}" if s.config.step_word != "steps" else "")
        runs = f"{s.clean}" + (f" (+{s.contaminated} contaminated)" if s.contaminated else "")
        if s.kept:
            runs = f"{s.clean - s.kept} + {s.kept} contaminated, kept"
        lines.append(f"| {s.config.title} | {steps} | "
                     f"**{fmt(s.rate)} {s.config.unit}** [{fmt(s.low)}–{fmt(s.high)}] | {s.s_per_step:.3f} | "
                     f"{_secondary(s)} | {s.rss_mb:,.0f} MB | {s.wall_s:.1f} s | {runs} |")
    for name, p in published.items():
        lines.append(f"| *{p.title}: PEERS.md, {PEER_DATE}, not re-measured here* | {p.steps} | "
                     f"{fmt(p.rate)} {p.unit} [{fmt(p.low)}–{fmt(p.high)}] | {p.s_per_step:.3f} | {p.secondary} | "
                     f"{p.rss_mb:,.0f} MB | {p.wall_s:.1f} s | 3 |")
    if side_by_side:
        lines.append(side_by_side.rstrip("\n"))
    lines += ["", "## Ratios", ""]
    ratios_start = len(lines)
    sft, floor = summaries.get("sft"), summaries.get("floor")
    if sft and floor:
        lines.append(f"- **SFT vs the bare-PyTorch floor, same session: {sft.rate / floor.rate:.2f}x** the floor's "
                     f"throughput ({sft.s_per_step:.3f} vs {floor.s_per_step:.3f} s/step).")
    rm, rm_floor = summaries.get("rm"), summaries.get("rm_floor")
    if rm and rm_floor:
        lines.append(f"- **Reward model vs its bare-PyTorch floor, same session: {rm.rate / rm_floor.rate:.2f}x** the "
                     f"floor's throughput ({rm.s_per_step:.3f} vs {rm_floor.s_per_step:.3f} s/step).")
    if floor and published:
        lines.append(f"- Machine drift: the floor measured here runs at {floor.rate / PUBLISHED['floor'].rate:.2f}x "
                     f"its PEERS.md figure ({fmt(floor.rate)} vs {fmt(PUBLISHED['floor'].rate)} tokens/s).")
    cross = [f"{s.config.title} {s.rate / PUBLISHED[name].rate:.2f}x {PUBLISHED[name].title}"
             for name, s in summaries.items() if s.config.ours and name in published]
    if cross:
        lines.append("- Cross-session, indicative only (ours here / trl as published in PEERS.md): "
                     + "; ".join(cross) + ".")
        if floor:
            scaled = {name: s.rate / floor.rate * PUBLISHED["floor"].rate / PUBLISHED[name].rate
                      for name, s in summaries.items() if s.config.ours and name in PUBLISHED}
            lines.append("  Scaled by the floor's drift (ours / floor here x floor / trl there): " + "; ".join(
                f"{summaries[name].config.title} {ratio:.2f}x" for name, ratio in scaled.items()) + ".")
            targets = [f"{summaries[name].config.title} {scaled[name]:.2f}x vs {goal:.1f}x: "
                       + ("met" if scaled[name] >= goal else "**missed**")
                       for name, goal in TARGETS.items() if name in scaled]
            if targets:
                lines.append("- Targets (the scaled ratio above): " + "; ".join(targets) + ".")
    for name in (*ONLINE, "dpo"):
        if name in summaries and name in published:
            s, p = summaries[name], PUBLISHED[name]
            lines.append(f"- Peak RSS, {s.config.title}: {s.rss_mb:,.0f} MB at {fmt(s.rate)} {s.config.unit} "
                         f"(trl: {p.rss_mb:,.0f} MB at {fmt(p.rate)} {p.unit}, PEERS.md).")
    if "ppo" in summaries and "ppo1" in summaries:
        epoch, rollout = ppo_split(summaries["ppo"], summaries["ppo1"])
        if PAIRS["ppo"] in summaries and PAIRS["ppo1"] in summaries:
            peer_epoch, peer_rollout = ppo_split(summaries[PAIRS["ppo"]], summaries[PAIRS["ppo1"]])
            theirs = f"trl, same derivation in this run: {peer_epoch:.2f} s and {peer_rollout:.2f} s"
        else:
            theirs = "trl, same derivation on the PEERS.md machine: 0.56 s and 1.7 s"
        lines.append(f"- PPO, derived as in PEERS.md from the 4- and 1-epoch runs: about {epoch:.2f} s per PPO "
                     f"epoch and {rollout:.2f} s of rollout (64-token sampling for 16 prompts + "
                     f"scoring) per iteration ({theirs}).")
    for name in ONLINE:
        s = summaries.get(name)
        if s and {"rollout_s", "update_s"} <= set(s.extra):
            lines.append(f"- {s.config.title}, as the stage logs it (`time/rollout_s`, `time/update_s`): "
                         f"{s.extra['rollout_s']:.2f} s rollout + {s.extra['update_s']:.2f} s update per iteration.")
    if len(lines) == ratios_start:
        del lines[-3:]  # nothing to say under the heading
    if sft or floor:
        lines += ["", "## MFU (SFT)", "",
                  f"Assumption (PEERS.md): {FLOP_PER_TOKEN / 1e6:.1f} MFLOP per token for LoRA training of this model "
                  f"(frozen base: no weight gradients), peak {PEAK_FLOPS / 1e9:.1f} GFLOP/s (fp32 2048² matmul, "
                  "2 threads, measured on the PEERS.md machine, not here).", ""]
        for s in (sft, summaries.get(PAIRS["sft"]), floor):
            if s:
                lines.append(f"- {s.config.title}: {s.rate * FLOP_PER_TOKEN / 1e9:.1f} GFLOP/s = "
                             f"**{mfu(s.rate):.0%}** of peak")
        if not interleaved:
            lines.append(f"- trl SFT (PEERS.md): {mfu(PUBLISHED['sft'].rate):.0%}; floor (PEERS.md): "
                         f"{mfu(PUBLISHED['floor'].rate):.0%}")
    return "\n".join(lines) + "\n"


DIFFERENCES = """## Settings and known differences from the peers

- Held equal: LoRA r=16, alpha 32, dropout 0 on q/k/v/o; fp32; no gradient checkpointing; AdamW at a
  constant learning rate (2e-4 SFT/RM/DPO, 1e-5 PPO/GRPO/RLOO), no warmup; batch 16; logging every step;
  completion-only SFT loss; PPO with 16 prompts, 64 sampled tokens, temperature 1, 1 minibatch, kl coef 0.05.
- DPO as trl_dpo.py: 16 pairs per step, sigmoid loss, beta 0.1, no label smoothing, the reference = the
  same base with the adapter off, recomputed at every step (`stage.reference.precompute=false`).
- GRPO and RLOO as trl_grpo.py / trl_rloo.py: 4 prompts x k=4 = 16 responses of exactly 64 tokens at
  temperature 1, one pass (num_iterations 1) of one minibatch = one optimizer step per rollout, ratio clip
  0.2, loss averaged over all response tokens of the batch (`token_mean`; trl's GRPO loss `dapo` divides by
  the batch's token count, the same on one process). GRPO: beta 0, advantages (r - mean) / (std + 1e-4)
  over each prompt's group. RLOO: beta 0.05 as beta x the response's summed k1 KL subtracted from the
  reward, leave-one-out baseline, advantages not normalised (trl's defaults).
- GRPO/RLOO reward: the reward model's raw score, as trl uses it (`reward.normalize.enabled=false`,
  `reward.clip=null`, no missing-EOS penalty). Ours scores the sampled token ids through the reward
  adapter on the shared base (last token's hidden state only); trl decodes the text, re-tokenises it and
  runs the separate `tiny-llama-rm`.
- GRPO/RLOO sampling: `ignore_eos` makes EOS an ordinary token (it can be sampled, and sampling goes on);
  trl's `min_new_tokens=64` masks EOS out for all 64 steps. Same lengths, so the same work.
- RLOO's loss: trl 1.16 takes the ratio of whole sequences (exp of the summed log-ratio), clips it and
  averages over sequences; ours clips per token and averages over tokens (GRPO's surrogate). At ratio 1
  (one pass) trl's gradient is 64x ours (one per token of a 64-token response): AdamW nearly ignores the
  scale, the gradient clipping at 1.0 does not. The same forwards and backward either way.
- GRPO at beta 0: neither runs a reference forward (ours: `stage.kl.measure=false`, so no `objective/kl`
  and no KL tripwire; by default ours runs it at beta 0 too, for those two).
- Forwards per GRPO/RLOO rollout: ours samples (with the policy's LoRA folded into the weights,
  `stage.generation.merge_adapter`; trl's `generate()` runs the adapter's extra matmuls at every token),
  then runs the reference (RLOO; not GRPO at beta 0, above), the reward adapter (each prompt once for
  its group), and one policy forward with gradient that the single update backpropagates (the
  rollout's log-probs and entropy are read from it). trl's GRPO runs the same policy forward once;
  trl's RLOO runs it twice (a no-grad one for the old log-probs, then the update's).
- DPO forwards: ours runs each prompt once and the chosen and rejected responses against its KV cache
  (`models/shared_prompt.py`; the same log-probs and gradient, 3/4 of the token positions here), the LM
  head on response positions only; trl runs chosen and rejected as 2 x 16 full rows, the LM head on
  every position.
- Off in ours during the timed loop: validation and held-out sampling (`trainer.val_check_interval`
  past the budget, `stage.eval.at_start=false`), checkpoints (`callbacks.checkpoint=null`), export
  (`export.enabled=false`) and the progress bar.
- Value function: ours is a LoRA adapter + scalar head on the shared frozen base, initialised from the
  reward model; trl's PPO trains a separate, fully trainable copy of `tiny-llama-rm` (3.68M params).
- Policy, reference, value and reward share one base model in ours (adapters switched by name);
  trl holds the policy (with adapters off as the reference) plus two separate sequence classifiers.
- Rollouts: ours samples with its own KV-cache loop (`lightrlhf.models.generation.sample`), trl
  calls Hugging Face `generate()`. Both sample exactly 64 tokens (`ignore_eos` / `stop_token=None`).
- Reward model: ours is `tiny-llama` + an identity LoRA + the score weight of `tiny-llama-rm`
  (scores checked equal to the peer model's); the RM stage trains `tiny-llama` + LoRA + a fresh head,
  trl trains `tiny-llama-rm` + LoRA + its head. Neither computes the LM head's vocabulary logits.
- Data: one example of each file is held out (`data.val_fraction=0`, the least lightrlhf allows),
  so the training set has 2047 rows (SFT, RM, DPO) and 511 prompts (PPO, GRPO, RLOO); trl trains on all
  of them. After training, lightrlhf validates once on that one example (counted in wall time, not in
  throughput).
- PPO: `reward.normalize.init_rollouts=1` (one batch of the initial policy's rollouts fixes the
  reward normaliser) runs before the first timed batch; trl does not normalise scores. GRPO/RLOO
  sample one such batch too (the tripwires' baseline), also before the timed loop.
- Gradient clipping at norm 1.0 in ours and in trl (its default); the floor does not clip.
- SFT's LM head: ours runs it on the positions the completion-only loss reads (65 of 128), the floor
  (Hugging Face's `labels=` loss) on all 128; the loss and gradient are the same.
- Start-up: wall time includes imports, Hydra composition, model load and tokenization for ours,
  imports, model load and dataset processing for the peers.
"""


def environment() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            cpu = f"{names[0]} x{len(names)}"
    except OSError:
        pass
    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu": cpu,
            "python": platform.python_version(), "commit": git_commit()}


def git_commit() -> str:
    """The checkout's commit, marked `+changes` when tracked files differ from it."""
    import subprocess

    from lightrlhf.bench.workload import ROOT

    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    return commit + (" +changes" if git("status", "--porcelain", "--untracked-files=no") else "")
