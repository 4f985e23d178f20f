"""`python -m lightrlhf.bench` (`make bench`): lightrlhf's throughput on the peers' fixed workload.

The workload is the one in `shared/PEERS.md`: the peers' `make_assets.py` builds a tiny Llama
(4.19M parameters, vocab 2000), its tokenizer and the data offline and deterministically; every
trained sequence is 64 prompt + 63 completion tokens + EOS = 128 tokens, and PPO samples exactly 64
tokens after a 64-token prompt. Each configuration runs through the real entry point,
`python train.py ...`, in its own process under `/usr/bin/time -v` (peak RSS), with a
`lightrlhf.callbacks.timing.StepTimer` added from the command line; the bare-PyTorch SFT loop
(`torch_sft_floor.py`) runs in the same session as the denominator of the SFT ratio, because
absolute times on a shared 2-core machine drift from one session to the next.

    workload.py   assets (built once, hashes checked), the lightrlhf reward-model export, the
                  command line of every configuration
    runner.py     idle-gated, contamination-checked subprocess runs
    report.py     medians, ratios, MFU, the markdown table; results.jsonl and report.md
    peers.py      trl's environments (`python -m lightrlhf.bench.peers setup`) and configurations
    compare.py    ours beside trl in one interleaved run (`--peers`, `make bench-peers`): ratios
                  taken round by round between neighbouring runs
"""
