"""The reward-model floor: PEERS.md's reward-model workload as a bare PyTorch + peft loop, nothing else.

`python src/lightrlhf/bench/rm_floor.py --assets DIR --steps N` (run by `make bench` as `rm_floor`),
the counterpart of the peers' torch_sft_floor.py for `stage=rm`: what a pairwise step costs with no
framework around it, so lightrlhf's reward model is judged against it within one session. Same model
as trl_reward.py (tiny-llama-rm: the policy's backbone and a linear score head), LoRA r=16 alpha 32
on q/k/v/o with the score head trained, AdamW lr 2e-4 at a constant rate, 16 pairs a step, each
sequence prompt + response + EOS = 128 tokens, fp32, no clipping, no logging.

The loss is Bradley-Terry's, -log sigmoid(r(x, y_chosen) - r(x, y_rejected)) averaged over the
pairs (Ouyang et al. 2022, eq. 1), chosen and rejected in one forward of 32 rows. The reward is the
score head on the last token's hidden state only (the sequences are all 128 tokens, unpadded), so
the floor computes no head over the other 127 positions.

Unit: pairs/s over the steady state (the first --warmup steps left out), as trl_reward.py reports.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

SEQUENCE_TOKENS = 128


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", required=True, help="the directory make_assets.py wrote")
    ap.add_argument("--out", default=None, help="unused (the peers' scripts take it; nothing is written)")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="pairs per step")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    args = parse_args(argv)
    torch.manual_seed(args.seed)
    model_dir = os.path.join(args.assets, "tiny-llama-rm")
    tok = AutoTokenizer.from_pretrained(model_dir)
    with open(os.path.join(args.assets, "pref.jsonl"), encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    chosen, rejected = [], []
    for r in rows:
        prompt = tok(r["prompt"])["input_ids"]
        chosen.append(prompt + tok(r["chosen"])["input_ids"] + [tok.eos_token_id])
        rejected.append(prompt + tok(r["rejected"])["input_ids"] + [tok.eos_token_id])
    lengths = {len(row) for row in chosen + rejected}
    if len(lengths) != 1:  # the floor pads nothing: PEERS.md's sequences are all 128 tokens
        print(f"{os.path.join(args.assets, 'pref.jsonl')}: sequences of {min(lengths)} to {max(lengths)} tokens; the "
              f"floor needs one length (PEERS.md's assets: {SEQUENCE_TOKENS})", file=sys.stderr)
        raise SystemExit(2)
    chosen_ids, rejected_ids = torch.tensor(chosen), torch.tensor(rejected)

    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1, dtype="float32")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, task_type="SEQ_CLS",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model.train()
    body, head = model.base_model.model.model, model.base_model.model.score  # LlamaModel, the score head
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=2e-4)

    ends, pairs = [], args.batch
    for step in range(args.steps):
        i = torch.arange(step * pairs, (step + 1) * pairs) % len(chosen_ids)
        hidden = body(input_ids=torch.cat([chosen_ids[i], rejected_ids[i]])).last_hidden_state[:, -1]
        reward = head(hidden).squeeze(-1)
        loss = -F.logsigmoid(reward[:pairs] - reward[pairs:]).mean()
        if step == 0:
            first_loss = loss.item()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ends.append(time.perf_counter())
    w = min(args.warmup, args.steps - 1)
    seconds = ends[-1] - ends[w - 1] if w > 0 else ends[-1] - ends[0]
    timed = args.steps - w if w > 0 else args.steps - 1
    print("BENCH_RESULT " + json.dumps({
        "bench": "torch_rm_floor", "unit": "pairs/s", "throughput": round(timed * pairs / seconds, 3),
        "steps": args.steps, "warmup_steps_excluded": w, "sec_per_step_steady": round(seconds / timed, 4),
        "seq_len": chosen_ids.shape[1], "first_loss": first_loss, "final_loss": loss.item(), "torch_threads": torch.get_num_threads(),
        "trainable_params": sum(p.numel() for p in trainable)}), flush=True)


if __name__ == "__main__":
    main()
