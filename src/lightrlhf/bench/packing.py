"""python -m lightrlhf.bench.packing [--steps N] [--threads T]

SFT tokens/s with padded batches against packed ones (`stage.datamodule.packing`), on the demo's
demonstrations (4 to 28 tokens, 17 on average: a realistic mix of short and long). Both run the same
batches of 32 demonstrations through the demo model with its LoRA and AdamW, alternating padded and
packed blocks of steps in one process so that a drift of the machine's speed hits both alike. Real
(non-pad) tokens per second are reported, and the ratio; the positions computed per batch explain it.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m lightrlhf.bench.packing", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40, help="steps per block (default 40)")
    ap.add_argument("--blocks", type=int, default=3, help="blocks of each layout, alternating (default 3)")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lightrlhf.data.modules import SFTDataModule, collate_sft
    from lightrlhf.data.source import DataSource
    from lightrlhf.demo.task import DemoTask
    from lightrlhf.launch.resolvers import asset
    from lightrlhf.models.causal_lm import load_causal_lm
    from lightrlhf.models.spec import LoraSpec, ModelSpec
    from lightrlhf.stages.sft import SFTStage, sft_loss

    spec = ModelSpec(name_or_path=asset("tiny"), lora=LoraSpec())
    model = load_causal_lm(spec)
    path = DemoTask(cache_dir="outputs/.cache").materialize("sft", "train")
    datamodule = SFTDataModule(DataSource(path=str(path), max_length=64, max_prompt_length=16), model.tokenizer,
                               batch_size=32)
    datamodule.setup("fit")
    features = datamodule.train_set.items
    batches = [features[i:i + 32] for i in range(0, args.steps * 32, 32)]
    stage = SFTStage(model, None)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    layouts = {"padded": collate_sft(model.tokenizer.pad_token_id),
               "packed": collate_sft(model.tokenizer.pad_token_id, datamodule.max_length)}
    rates: dict[str, list[float]] = {name: [] for name in layouts}
    positions: dict[str, int] = {}
    for block in range(args.blocks + 1):  # block 0 warms up both layouts and is not counted
        for name, collate in layouts.items():
            collated = [collate(b) for b in batches]
            positions[name] = sum(b["input_ids"].numel() for b in collated)
            tokens = sum(sum(len(f.input_ids) for f in b) for b in batches)
            started = time.perf_counter()
            for batch in collated:
                loss, _ = sft_loss(stage._logits(batch), batch["input_ids"], stage._loss_mask(batch))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            if block > 0:
                rates[name].append(tokens / (time.perf_counter() - started))
    padded, packed = statistics.median(rates["padded"]), statistics.median(rates["packed"])
    print(f"| layout | positions computed per {args.steps} batches | real tokens/s (median of {args.blocks}) |")
    print("|---|---|---|")
    for name, rate in (("padded", padded), ("packed", packed)):
        print(f"| {name} | {positions[name]:,} | {rate:,.0f} |")
    print(f"packed / padded: {packed / padded:.2f}x ({args.threads} threads)")


if __name__ == "__main__":
    main()
