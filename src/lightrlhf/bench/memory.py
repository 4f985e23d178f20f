"""PPO's peak memory at a real size: a GPT-2-small-shaped model, lightrlhf against trl side by side.

    python -m lightrlhf.bench.memory --peer-python <trl 1.12 env>/bin/python [--rollouts 4] [--runs 2]

The PEERS.md workload (16 prompts of 64 tokens, 64 sampled tokens, 4 PPO epochs, LoRA r=16 on q/k/v/o)
on a model of GPT-2 small's size built offline from a config, random init: hidden 768, 12 layers, 12
heads, GPT-2's vocabulary of 50,257 rows with the input embedding tied to the output head, and an MLP of
2,048 so that the Llama-style block (three MLP matrices) holds GPT-2's parameter count, 123.6M in all. (The
peer's script adapts q/k/v/o by name, hence a Llama-style block rather than GPT-2's fused c_attn.) The
tokenizer is the benchmark's (2,000 tokens); ids beyond it are never in a prompt and decode to nothing.

trl (trl.experimental.ppo, 1.12, the last release that ships it) holds four models: the policy with its
LoRA (the reference is the adapter off), a value model trained in full and a frozen reward model, each a
full copy of the backbone, plus AdamW's two moments for every value-model weight. lightrlhf holds one frozen
base with the policy, value and reward adapters on it. Each side runs alone under `/usr/bin/time -v`;
the report gives each run's peak RSS and the ratio. Writes outputs/bench/memory/report.md and results.jsonl.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

from lightrlhf.bench.peers import peer_configurations
from lightrlhf.bench.runner import run_timed, wait_until_idle
from lightrlhf.bench.workload import (
    ASSETS,
    OUT,
    ROOT,
    BenchError,
    configurations,
    ensure_assets,
    ensure_reward_export,
    require_peer_bench,
)

SIZED = OUT / "assets-gpt2-small"
MEMORY_OUT = OUT / "memory"
# GPT-2 small: 768 wide, 12 layers of 12 heads, 50,257 tokens, tied head; MLP 2,048 (see module docstring)
SHAPE = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "num_key_value_heads": 12,
         "intermediate_size": 2048, "vocab_size": 50257, "max_position_embeddings": 1024,
         "tie_word_embeddings": True}


def build_sized_assets(source: Path = ASSETS, out: Path = SIZED, seed: int = 1234, shape: dict | None = None) -> Path:
    """The benchmark's data and tokenizer with GPT-2-small-shaped `tiny-llama` / `tiny-llama-rm` (the names
    the peer's script reads), built once. The reward model is the causal model's backbone plus a seeded
    score head without bias, as the peers' tiny-llama-rm is."""
    if (out / "tiny-llama-rm" / "model.safetensors").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    out.mkdir(parents=True, exist_ok=True)
    for name in ("prompts.jsonl", "sft.jsonl", "pref.jsonl"):
        shutil.copy(source / name, out / name)
    shutil.copytree(source / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(source / "tokenizer")
    small = json.loads((source / "tiny-llama" / "config.json").read_text())
    config = LlamaConfig(**{**{k: small[k] for k in ("rms_norm_eps", "rope_theta", "hidden_act") if k in small},
                            **(shape or SHAPE), "pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
                            "eos_token_id": tokenizer.eos_token_id})
    torch.manual_seed(seed)
    causal = LlamaForCausalLM(config)
    causal.save_pretrained(out / "tiny-llama")
    tokenizer.save_pretrained(out / "tiny-llama")
    reward = LlamaForSequenceClassification(LlamaConfig(**{**config.to_dict(), "num_labels": 1}))
    reward.model.load_state_dict(causal.model.state_dict())
    with torch.no_grad():
        reward.score.weight.normal_(0.0, 0.02, generator=torch.Generator().manual_seed(seed + 1))
    reward.save_pretrained(out / "tiny-llama-rm")
    tokenizer.save_pretrained(out / "tiny-llama-rm")
    return out


def parameter_count(config) -> int:
    """Parameters of the causal model `config` builds (a tied head counted once), without allocating it."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def sized_config(assets: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(assets / "tiny-llama")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench.memory", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--peer-python", required=True, help="the python of an environment with trl 1.12")
    ap.add_argument("--rollouts", type=int, default=4, help="PPO rollouts per run (each side)")
    ap.add_argument("--runs", type=int, default=2, help="runs per side, alternating")
    ap.add_argument("--max-wait", type=float, default=600.0, help="seconds to wait for an idle machine per run")
    args = ap.parse_args(argv)
    try:
        if not Path(args.peer_python).is_file():
            raise BenchError(f"--peer-python {args.peer_python}: no such interpreter (make bench-peers creates it)")
        require_peer_bench("the memory benchmark")
        ensure_assets()
        assets = build_sized_assets()
        reward_export = ensure_reward_export(assets)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    ppo = configurations(assets, reward_export)["ppo"]
    # the peak comes in the first rollout; a few suffice (the throughput benchmark's minimum is 5)
    ours = replace(ppo, steps=args.rollouts, overrides=tuple(
        f"stage.rollouts={args.rollouts}" if o.startswith("stage.rollouts=") else o for o in ppo.overrides))
    # trl's run of that configuration, as `make bench-peers` runs it, with the given interpreter; one
    # warm-up step (the rate is not what this measures, and the script's default would exceed a few rollouts)
    trl = peer_configurations({"ppo": ours})["trl_ppo"]
    peer = replace(trl, python=args.peer_python, script_args=(*trl.script_args, "--warmup", "1"))
    MEMORY_OUT.mkdir(parents=True, exist_ok=True)
    records = []
    for run in range(args.runs):
        for side in ("trl", "lightrlhf"):
            run_dir = MEMORY_OUT / "runs" / f"{side}-{run}-{int(time.time())}"
            run_dir.mkdir(parents=True)
            wait_until_idle(max_wait=args.max_wait)
            command = (peer if side == "trl" else ours).argv(run_dir, assets)
            measured = run_timed(command, run_dir / "log.txt", cwd=ROOT)
            record = {"side": side, "run": run, "rc": measured.rc, "max_rss_mb": measured.max_rss_mb,
                      "wall_s": measured.wall_s, "foreign_cpu_share": measured.foreign_cpu_share, "log": str(run_dir)}
            records.append(record)
            print(json.dumps(record), flush=True)
            if measured.rc != 0:
                print(f"error: {side} failed (exit {measured.rc}); see {run_dir / 'log.txt'}", file=sys.stderr)
                return 1
    with open(MEMORY_OUT / "results.jsonl", "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    peak = {side: statistics.median(r["max_rss_mb"] for r in records if r["side"] == side) for side in ("trl", "lightrlhf")}
    report = (f"# PPO peak memory, GPT-2-small-shaped model ({parameter_count(sized_config(assets)) / 1e6:.1f}M parameters)\n\n"
              f"{args.runs} runs per side, alternating, {args.rollouts} rollouts each, PEERS.md PPO workload.\n\n"
              "| | peak RSS MB (median) | runs |\n|---|---|---|\n"
              f"| trl 1.12 PPOTrainer | {peak['trl']:.0f} | {', '.join(str(r['max_rss_mb']) for r in records if r['side'] == 'trl')} |\n"
              f"| lightrlhf PPO | {peak['lightrlhf']:.0f} | "
              f"{', '.join(str(r['max_rss_mb']) for r in records if r['side'] == 'lightrlhf')} |\n\n"
              f"lightrlhf / trl: **{peak['lightrlhf'] / peak['trl']:.2f}x**\n")
    (MEMORY_OUT / "report.md").write_text(report)
    print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
