"""python -m lightrlhf.bench.decode [--repeats N] [--threads T] [--max-wait S] [--profile]

The rollout's decode loop on the benchmark workload's model shape, transformers' forward against
the lean step (models/fast_decode.py), side by side in one process. The model is built offline from
a `LlamaConfig` (hidden 256, 4 layers, 4 heads, FFN 688, vocab 2000, untied head, fp32, sdpa; 4.2M
parameters, random weights from a fixed seed) with a peft LoRA adapter r=16, alpha 32 on
q/k/v/o whose B is drawn non-zero, and it samples as PPO's rollout does: 16 prompts of 64 tokens,
64 new tokens each without stopping at EOS, inside `merged_adapter` (rollouts/rollout.py).

A decode step's time is (time of a 64-token sample - time of a 1-token sample) / 63, which leaves
out the prompt forward both share; tokens/s is 16 * 64 over the whole 64-token sample (prompt
forward included), the rate a rollout sees. The paths alternate within each repeat so that load
from other processes falls on both; medians are printed. As `make bench` does (bench/runner.py), it
first waits for an idle machine, and it prints the share of the CPUs other processes used while it
ran: with 2 threads on 2 cores, one busy neighbour slows every op many times over.

Measured on the shared 2-core machine (2026-12-01, --repeats 7; ms per decode step, tokens/s; the
first three runs before the lean step packed its weights for MKL):

    threads  other load  transformers forward   lean step            tokens/s ratio
    1        0%          9.42 ms, 1426 tok/s    6.27 ms, 1951 tok/s  1.37x
    2        1%          5.50 ms, 2432 tok/s    3.77 ms, 3283 tok/s  1.35x
    2        1%          6.37 ms, 2225 tok/s    4.15 ms, 3189 tok/s  1.43x
    1        51%         6.09 ms, 2201 tok/s    4.10 ms, 2970 tok/s  1.35x
    2        57%         138 ms, 113 tok/s      29.4 ms, 434 tok/s   3.86x

The last run shows the hazard above: with 2 threads beside busy neighbours each parallel op waits
for a descheduled thread, so a step costs per op, and the lean step's fewer ops win 3.9x; on an
idle machine the gain is the 1.35-1.43x above. The step's 29 matmuls and 4 attention calls alone,
at the same shapes, take 3.9 ms (1 thread) and 2.5 ms (2 threads): the floor under any eager decode
step here. Packing the float32 weights for
MKL took a step from 4.7 to 4.0 ms (1 thread, same process). A profile of transformers' path
(1 thread, cProfile, 656 ms for one 64-token sample): 232 ms in linear (prompt forward included),
101 ms in attention, the rest in per-token Python and small ops: RMSNorm modules 46 ms, rotary 32 ms,
peft's LoRA wrappers 98 ms with their matmuls, module dispatch over 4,800 calls, mask and cache
bookkeeping 27 ms, the token draw 32 ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lightrlhf.bench.runner import CPUS, busy_cpu_seconds, wait_until_idle
from lightrlhf.models.adapters import merged_adapter
from lightrlhf.models.generation import sample

ROWS, PROMPT_TOKENS, NEW_TOKENS = 16, 64, 64
EOS, PAD = 2, 0


def build_model(seed: int = 0):
    """The workload's Llama shape with a LoRA adapter that changes the output (B != 0), in eval mode."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=2000, hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                         tie_word_embeddings=False, pad_token_id=PAD, bos_token_id=1, eos_token_id=EOS,
                         dtype="float32", attn_implementation="sdpa")
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0,
                                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.02, generator=generator)
    return model.eval()


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 2000, (ROWS, PROMPT_TOKENS), generator=generator)
    return ids, torch.ones_like(ids)


def timed_sample(model, ids, mask, new_tokens: int, fast: bool, seed: int = 0):
    """(seconds, Generation) of one sample() as the rollout calls it, adapter folded in."""
    started = time.perf_counter()
    with merged_adapter(model):
        gen = sample(model, ids, mask, max_new_tokens=new_tokens, eos_token_id=EOS, pad_token_id=PAD,
                     temperature=1.0, generator=torch.Generator().manual_seed(seed), stop_at_eos=False, fast=fast)
    return time.perf_counter() - started, gen


def profile(model, ids, mask, fast: bool, rows: int = 12) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, _ = timed_sample(model, ids, mask, NEW_TOKENS, fast)
    events = prof.key_averages()
    self_total = sum(e.self_cpu_time_total for e in events) / 1e3
    print(f"\n## profile, {'lean step' if fast else 'transformers forward'}: {seconds * 1e3:.0f} ms under the "
          f"profiler, of which {self_total:.0f} ms inside torch ops (self time, all ops)")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench.decode", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per path (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    ap.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for an idle machine (default 60)")
    ap.add_argument("--profile", action="store_true", help="also profile one 64-token sample per path")
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        ap.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    model = build_model()
    ids, mask = prompts()
    same = torch.equal(timed_sample(model, ids, mask, NEW_TOKENS, False)[1].response_ids,
                       timed_sample(model, ids, mask, NEW_TOKENS, True)[1].response_ids)  # also the warm-up
    waited, share = wait_until_idle(max_wait=args.max_wait)
    machine, own, started = busy_cpu_seconds(), time.process_time(), time.monotonic()
    runs = {False: {"full": [], "one": []}, True: {"full": [], "one": []}}
    for _ in range(args.repeats):
        for fast in (False, True):
            runs[fast]["one"].append(timed_sample(model, ids, mask, 1, fast)[0])
            runs[fast]["full"].append(timed_sample(model, ids, mask, NEW_TOKENS, fast)[0])
    foreign = (busy_cpu_seconds() - machine - (time.process_time() - own)) / ((time.monotonic() - started) * CPUS)
    print(f"{ROWS} prompts x {PROMPT_TOKENS} tokens -> {NEW_TOKENS} new tokens, {args.threads} thread(s), "
          f"median of {args.repeats}; identical samples from both paths: {same}")
    print(f"machine busy {share:.0%} before the runs (waited {waited:.0f} s); other processes used "
          f"{max(foreign, 0.0):.0%} of the CPUs during them")
    print(f"{'path':<22}{'ms/decode step':>16}{'ms/sample':>12}{'tokens/s':>11}")
    rates = {}
    for fast, label in ((False, "transformers forward"), (True, "lean step")):
        full, one = statistics.median(runs[fast]["full"]), statistics.median(runs[fast]["one"])
        rates[fast] = ROWS * NEW_TOKENS / full
        print(f"{label:<22}{(full - one) / (NEW_TOKENS - 1) * 1e3:>16.2f}{full * 1e3:>12.0f}{rates[fast]:>11.0f}")
    print(f"speed-up in tokens/s: {rates[True] / rates[False]:.2f}x")
    if args.profile:
        for fast in (False, True):
            profile(model, ids, mask, fast)


if __name__ == "__main__":
    main()
