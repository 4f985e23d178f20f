"""The benchmark workload: the peers' assets, our reward-model export, and each configuration's command.

Assets come from the peers' own builder (`make_assets.py`, deterministic), so both sides train on
byte-identical files; the sha256 hashes PEERS.md quotes are checked against the files on disk.
Every configuration is the PEERS.md setting expressed as `train.py` overrides: LoRA r=16, alpha 32,
dropout 0 on q/k/v/o, fp32, no gradient checkpointing, constant learning rate, logging every step,
and nothing else in the timed loop (no validation, held-out sampling, checkpoints or export).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightrlhf.models.loading import sha256_file

ROOT = Path(__file__).resolve().parents[3]  # the checkout: train.py, conf/, outputs/
OUT = ROOT / "outputs" / "bench"
ASSETS = OUT / "assets"
RM_EXPORT = "lightrlhf-rm"  # under the assets directory

# PEERS.md quotes each sha256 as prefix...suffix.
EXPECTED_SHA256 = {
    "sft.jsonl": ("2e89f357", "5d33e"),
    "pref.jsonl": ("8a147a01", "31"),
    "prompts.jsonl": ("a9841dfc", "4c64"),
    "tokenizer/tokenizer.json": ("c68ef5f8", "74d4"),
    "tiny-llama/model.safetensors": ("29db215f", "18c5"),
    "tiny-llama-rm/model.safetensors": ("4fb74983", "b582"),
}
PROMPT_TOKENS, SEQUENCE_TOKENS, NEW_TOKENS, BATCH = 64, 128, 64, 16
GROUP = 4  # GRPO/RLOO: responses per prompt (trl's num_generations)
LORA_TARGETS = "[q_proj,k_proj,v_proj,o_proj]"
ONLINE = ("ppo", "ppo1", "grpo", "rloo")  # sample, score and log time/rollout_s, time/update_s
SEPARATOR = "@"  # `ppo@1a2b3c4`: the configuration `ppo` as commit 1a2b3c4 ran it (`bench.since`)
# Each of our configurations and the trl peer that runs the same workload (`bench.peers`).
PAIRS = {"sft": "trl_sft", "rm": "trl_reward", "ppo": "trl_ppo", "ppo1": "trl_ppo1", "dpo": "trl_dpo",
         "grpo": "trl_grpo", "rloo": "trl_rloo"}
# The peers train on the files as they are: no cleaning step may change a token of the workload (the
# default whitespace step would strip the prompts' leading space and shorten every sequence).
NO_CLEANING = {"unicode": None, "control_chars": False, "whitespace": False, "drop_duplicates": False}


class BenchError(Exception):
    """Something the person running the benchmark must fix; printed as one line, exit status 2."""


def since_name(name: str, sha: str) -> str:
    return f"{name}{SEPARATOR}{sha[:7]}"


def base_name(name: str) -> str:
    """`ppo` for `ppo@1a2b3c4`, the name itself otherwise."""
    return name.split(SEPARATOR, 1)[0]


def peer_bench_dir() -> Path:
    return Path(os.environ.get("PEER_BENCH", ROOT.parent / "shared" / "peer-bench")).expanduser().resolve()


def require_peer_bench(why: str) -> Path:
    path = peer_bench_dir()
    if not (path / "make_assets.py").is_file():
        raise BenchError(f"{why} needs the peers' scripts, not found in {path}: set PEER_BENCH to the "
                         "peer-bench directory (the one holding make_assets.py and torch_sft_floor.py)")
    return path


# -- assets ----------------------------------------------------------------------------------------
def ensure_assets(assets: Path = ASSETS) -> tuple[dict[str, str], list[str]]:
    """Build the assets once with the peers' builder; ({file: sha256}, notes), checked against PEERS.md."""
    if not (assets / "manifest.json").is_file():
        builder = require_peer_bench("building the benchmark assets") / "make_assets.py"
        print(f"building the workload with {builder} --out {assets}", flush=True)
        done = subprocess.run([sys.executable, str(builder), "--out", str(assets)], capture_output=True, text=True)
        if done.returncode != 0:
            raise BenchError(f"{builder} failed (exit {done.returncode}): {done.stderr.strip().splitlines()[-1:]}")
    return verify_assets(assets)


def verify_assets(assets: Path) -> tuple[dict[str, str], list[str]]:
    """The files' sha256 must equal the manifest's and start with PEERS.md's prefix; a differing
    suffix is only noted (PEERS.md abbreviates by hand)."""
    recorded = json.loads((assets / "manifest.json").read_text()).get("sha256", {})
    found, notes = {}, []
    for name, (head, tail) in EXPECTED_SHA256.items():
        actual = sha256_file(assets / name)
        key = "tokenizer.json" if name.startswith("tokenizer/") else name
        if recorded.get(key) != actual:
            raise BenchError(f"{assets / name}: sha256 {actual[:8]}… differs from {assets / 'manifest.json'} "
                             "(delete the assets directory to rebuild it)")
        if not actual.startswith(head):
            raise BenchError(f"{assets / name}: sha256 {actual[:8]}… is not PEERS.md's {head}… "
                             "(delete the assets directory to rebuild it)")
        if not actual.endswith(tail):
            notes.append(f"{name}: PEERS.md abbreviates its sha256 as {head}…{tail}, the file's ends in "
                         f"…{actual[-len(tail) - 2:]} (prefix and manifest match)")
        found[name] = actual
    return found, notes


def check_sequence_lengths(assets: Path) -> dict[str, Any]:
    """Tokenize the three data files with lightrlhf's own data modules (the code train.py runs) and
    check the PEERS.md lengths: 64 + 63 + EOS = 128 per trained sequence, 64-token prompts, no BOS."""
    from lightrlhf.data.clean import CleaningSpec
    from lightrlhf.data.modules import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lightrlhf.data.source import DataSource
    from lightrlhf.models.loading import load_tokenizer
    from lightrlhf.models.spec import ModelSpec

    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(assets / "tiny-llama")))

    def module(cls, name: str):
        source = DataSource(path=str(assets / name), val_fraction=0.0, max_length=SEQUENCE_TOKENS,
                            max_prompt_length=PROMPT_TOKENS, clean=CleaningSpec(**NO_CLEANING))
        options = {"group_by_length": False} if cls is PreferenceDataModule else {}
        dm = cls(source=source, tokenizer=tokenizer, batch_size=BATCH, **options)
        dm.setup("fit")
        return dm

    sft = module(SFTDataModule, "sft.jsonl").train_set.items
    pref = module(PreferenceDataModule, "pref.jsonl").train_set.items
    prompts = module(PromptDataModule, "prompts.jsonl").train_set.items
    firsts = [f.input_ids[0] for f in sft] + [f.prompt_ids[0] for f in prompts]
    out = {
        "sft_lengths": sorted({len(f.input_ids) for f in sft}),
        "sft_prompt_lengths": sorted({f.prompt_length for f in sft}),
        "sft_ends_with_eos": all(f.input_ids[-1] == tokenizer.eos_token_id for f in sft),
        "pref_lengths": sorted({len(f.chosen_ids) for f in pref} | {len(f.rejected_ids) for f in pref}),
        "prompt_lengths": sorted({len(f.prompt_ids) for f in prompts}),
        "bos_added": tokenizer.bos_token_id is not None and tokenizer.bos_token_id in firsts,
    }
    ok = (out["sft_lengths"] == [SEQUENCE_TOKENS] and out["sft_prompt_lengths"] == [PROMPT_TOKENS]
          and out["sft_ends_with_eos"] and out["pref_lengths"] == [SEQUENCE_TOKENS]
          and out["prompt_lengths"] == [PROMPT_TOKENS] and not out["bos_added"])
    if not ok:
        raise BenchError(f"tokenized lengths differ from the PEERS.md workload: {out}")
    return out


def ensure_reward_export(assets: Path) -> Path:
    """A lightrlhf reward-model export equivalent to the peers' `tiny-llama-rm`, built once.

    tiny-llama-rm is tiny-llama's backbone plus a seeded linear score head (no bias). Ours: the same
    base with a fresh LoRA adapter on q/k/v/o -- B = 0, so the identity -- and a head holding the
    peer's score weight with bias 0. The export records tiny-llama's fingerprint, so PPO loads it as
    an adapter on the shared base. Its scores are checked against the peer model's.
    """
    out = assets / RM_EXPORT
    if (out / "lightrlhf.json").is_file():
        return out
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    from lightrlhf.models.reward import load_reward_model_for_training
    from lightrlhf.models.spec import LoraSpec, ModelSpec

    peer = load_file(assets / "tiny-llama-rm" / "model.safetensors")
    if "score.bias" in peer:
        raise BenchError(f"{assets / 'tiny-llama-rm'}: the score head has a bias; the export assumes none")
    spec = ModelSpec(name_or_path=str(assets / "tiny-llama"),
                     lora=LoraSpec(r=16, alpha=32, dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    model = load_reward_model_for_training(spec)
    with torch.no_grad():
        model.head.linear.weight.copy_(peer["score.weight"])
        model.head.linear.bias.zero_()
    model.eval()
    rows = [json.loads(line) for line in (assets / "sft.jsonl").read_text().splitlines()[:4]]
    ids = torch.tensor([model.tokenizer(r["prompt"])["input_ids"] + model.tokenizer(r["completion"])["input_ids"]
                        + [model.tokenizer.eos_token_id] for r in rows])
    reference = AutoModelForSequenceClassification.from_pretrained(assets / "tiny-llama-rm", num_labels=1,
                                                                   dtype=torch.float32).eval()
    with torch.no_grad():
        ours, theirs = model(ids, torch.ones_like(ids)), reference(input_ids=ids).logits.squeeze(-1)
    if not torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4):
        raise BenchError(f"the reward export does not reproduce tiny-llama-rm's scores: {ours} vs {theirs}")
    model.save(out, stage="rm", config={"note": "benchmark reward model: tiny-llama + identity LoRA + "
                                                "tiny-llama-rm's score weight"})
    return out


# -- configurations --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Config:
    name: str
    title: str
    unit: str
    units_per_step: float
    steps: int
    step_word: str = "steps"
    secondary: dict[str, float] = field(default_factory=dict)  # label -> units per step
    overrides: tuple[str, ...] = ()  # train.py overrides (ours)
    script: str | None = None  # a peer-bench script instead of train.py (the floor, trl's trainers)
    script_args: tuple[str, ...] = ()  # the script's own options, e.g. trl_ppo.py's --ppo-epochs
    python: str | None = None  # the script's interpreter (trl's: its `bench.peers` venv); None: this one
    checkout: str | None = None  # another commit's checkout whose train.py runs these overrides (`bench.since`)

    @property
    def ours(self) -> bool:
        return self.script is None

    def argv(self, run_dir: Path, assets: Path) -> list[str]:
        if not self.ours:
            return [self.python or sys.executable, self.script, "--assets", str(assets), "--out",
                    str(run_dir / "out"), "--steps", str(self.steps), *self.script_args]
        timer = ["+callbacks.timer._target_=lightrlhf.callbacks.timing.StepTimer",
                 f"+callbacks.timer.path={run_dir / 'timer.json'}",
                 f"+callbacks.timer.units_per_step={self.units_per_step:g}", f"+callbacks.timer.unit={self.unit}"]
        run = [*self.overrides, f"hydra.run.dir={run_dir / 'run'}", *timer]
        if self.checkout is not None:  # that commit's sources, not the installed ones, on this interpreter
            return ["env", f"PYTHONPATH={Path(self.checkout) / 'src'}", sys.executable,
                    str(Path(self.checkout) / "train.py"), *run]
        return [sys.executable, str(ROOT / "train.py"), *run]


def _common(assets: Path, data: str) -> list[str]:
    return [
        f"model.name_or_path={assets / 'tiny-llama'}", "model.dtype=float32", "model.gradient_checkpointing=false",
        "model.lora.r=16", "model.lora.alpha=32", "model.lora.dropout=0.0", f"model.lora.target_modules={LORA_TARGETS}",
        "data=jsonl", f"data.path={assets / data}", f"data.max_length={SEQUENCE_TOKENS}",
        f"data.max_prompt_length={PROMPT_TOKENS}",
        *(f"data.clean.{key}={'null' if value is None else str(value).lower()}" for key, value in NO_CLEANING.items()),
        # detail: one held-out example (the least DataSource allows): run() validates once after
        # fit, outside the timed loop, and returns a validation metric; keep that negligible.
        "data.val_fraction=0.0",
        "trainer.precision=32-true", "trainer.log_every_n_steps=1", "trainer.val_check_interval=1000000",
        "export.enabled=false", "callbacks.checkpoint=null", "callbacks.progress_bar=null",
        "+trainer.enable_progress_bar=false",
    ]


def configurations(assets: Path, reward_export: Path | None, scale: float = 1.0) -> dict[str, Config]:
    def steps(n: int) -> int:
        return max(5, round(n * scale))  # at least 2 batches past the 3 dropped ones

    supervised = ["stage.datamodule.batch_size=16", "stage.optim.lr=2e-4", "stage.scheduler.name=constant",
                  "stage.scheduler.warmup_steps=0"]
    sft = Config("sft", "lightrlhf SFT", "tokens/s", BATCH * SEQUENCE_TOKENS, steps(150),
                 secondary={"loss-tokens/s": BATCH * (SEQUENCE_TOKENS - PROMPT_TOKENS), "seq/s": BATCH},
                 overrides=("stage=sft", *_common(assets, "sft.jsonl"), *supervised, "stage.completion_only_loss=true",
                            "stage.eval.at_start=false", f"trainer.max_steps={steps(150)}"))
    rm = Config("rm", "lightrlhf reward model", "pairs/s", BATCH, steps(150),
                secondary={"tokens/s": BATCH * 2 * SEQUENCE_TOKENS},
                overrides=("stage=rm", *_common(assets, "pref.jsonl"), *supervised, f"trainer.max_steps={steps(150)}"))

    def ppo(name: str, title: str, epochs: int) -> Config:
        return Config(name, title, "episodes/s", BATCH, steps(25), step_word="rollouts",
                      secondary={"generated tok/s": BATCH * NEW_TOKENS},
                      overrides=("stage=ppo", *_common(assets, "prompts.jsonl"), "policy.init=null",
                                 f"reward.path={reward_export}", "reward.normalize.init_rollouts=1",
                                 "reward.missing_eos_penalty=0.0",  # as trl's PPO default (None)
                                 "stage.datamodule.batch_size=16", f"stage.generation.max_new_tokens={NEW_TOKENS}",
                                 "stage.generation.ignore_eos=true", "stage.generation.temperature=1.0",
                                 f"stage.ppo.epochs={epochs}", "stage.ppo.num_minibatches=1", "stage.kl.coef=0.05",
                                 "stage.optim.lr=1e-5", "stage.scheduler.name=constant",
                                 "stage.scheduler.warmup_steps=0", f"stage.rollouts={steps(25)}",
                                 "stage.eval.at_start=false"))

    # trl_dpo.py: 16 pairs, sigmoid, beta 0.1, the reference = the adapter off, recomputed every step
    dpo = Config("dpo", "lightrlhf DPO", "pairs/s", BATCH, steps(100),
                 secondary={"tokens/s": BATCH * 2 * SEQUENCE_TOKENS},
                 overrides=("stage=dpo", *_common(assets, "pref.jsonl"), "policy.init=null", *supervised,
                            "stage.loss_type=sigmoid", "stage.beta=0.1", "stage.label_smoothing=0.0",
                            "stage.reference.precompute=false", "stage.eval.at_start=false",
                            f"trainer.max_steps={steps(100)}"))

    def group(name: str, title: str, stage: str, beta: float) -> Config:
        # trl_rloo.py / trl_grpo.py: 4 prompts x k=4, exactly 64 new tokens, the frozen RM's raw score,
        # num_iterations 1 and one optimizer step per generation batch (1 minibatch of 16)
        return Config(name, title, "episodes/s", BATCH, steps(60), step_word="rollouts",
                      secondary={"prompts/s": BATCH // GROUP, "generated tok/s": BATCH * NEW_TOKENS},
                      overrides=(f"stage={stage}", *_common(assets, "prompts.jsonl"), "policy.init=null",
                                 f"reward.path={reward_export}",
                                 # trl scores with the raw RM output: no normaliser, clip or EOS penalty
                                 "reward.normalize.enabled=false", "reward.normalize.init_rollouts=1",
                                 "reward.clip=null", "reward.missing_eos_penalty=0.0",
                                 f"stage.datamodule.batch_size={BATCH // GROUP}", f"stage.group.group_size={GROUP}",
                                 "stage.group.num_iterations=1", "stage.group.num_minibatches=1",
                                 "stage.group.clip_range=0.2", "stage.group.loss_aggregation=token_mean",
                                 f"stage.kl.coef={beta}", "stage.kl.kl_in=reward",
                                 # trl runs no reference at beta 0, so neither do we (no objective/kl then)
                                 f"stage.kl.measure={str(beta > 0).lower()}",
                                 f"stage.generation.max_new_tokens={NEW_TOKENS}", "stage.generation.ignore_eos=true",
                                 "stage.generation.temperature=1.0", "stage.optim.lr=1e-5",
                                 "stage.scheduler.name=constant", "stage.scheduler.warmup_steps=0",
                                 f"stage.rollouts={steps(60)}", "stage.eval.at_start=false"))

    configs = [sft, rm, ppo("ppo", "lightrlhf PPO, 4 PPO epochs", 4), ppo("ppo1", "lightrlhf PPO, 1 PPO epoch", 1),
               dpo,
               # GRPO as trl's defaults: beta 0 (no KL term), rewards scaled by the group's std
               group("grpo", "lightrlhf GRPO (k=4)", "grpo", 0.0),
               # RLOO as trl's defaults: beta 0.05, sequence-level k1 KL subtracted from the reward
               group("rloo", "lightrlhf RLOO (k=4)", "rloo", 0.05)]
    floor = peer_bench_dir() / "torch_sft_floor.py"
    configs.append(Config("floor", "bare PyTorch SFT floor (measured here)", "tokens/s", BATCH * SEQUENCE_TOKENS, steps(150),
                          script=str(floor)))
    # the reward model's own floor: the same pairwise step as bare PyTorch + peft (bench/rm_floor.py)
    configs.append(Config("rm_floor", "bare PyTorch reward-model floor (measured here)", "pairs/s", BATCH, steps(150),
                          secondary={"tokens/s": BATCH * 2 * SEQUENCE_TOKENS},
                          script=str(Path(__file__).with_name("rm_floor.py"))))
    return {c.name: c for c in configs}


def read_result(config: Config, run_dir: Path, log_text: str) -> dict[str, Any] | None:
    """The run's rate and what else it reports, from the StepTimer file or the BENCH_RESULT line."""
    if not config.ours:
        lines = [line for line in log_text.splitlines() if line.startswith("BENCH_RESULT ")]
        if not lines:
            return None
        res = json.loads(lines[-1][len("BENCH_RESULT "):])
        return {"rate": res["throughput"], "seconds_per_step": res.get("sec_per_step_steady"),
                "steps": res.get("steps"), "torch_threads": res.get("torch_threads"),
                "final_loss": res.get("final_loss"), "versions": res.get("versions")}
    timer_file = run_dir / "timer.json"
    if not timer_file.is_file():
        return None
    timer = json.loads(timer_file.read_text())
    out = {"rate": timer["rate"], "rate_whole_loop": timer["rate_whole_loop"],
           "seconds_per_step": timer["seconds_per_batch"], "steps": timer["batches"],
           "optimizer_steps": timer["global_step"], "torch_threads": timer["torch_threads"]}
    metrics_file = run_dir / "run" / "metrics.json"
    if metrics_file.is_file():
        record = json.loads(metrics_file.read_text())
        out["final_metrics"] = record.get("metrics", {})
        data = record.get("data", {})
        out["data_problems"] = {k: v for k, v in data.items() if "truncated" in k or "dropped" in k}
    log_file = run_dir / "run" / "train.log"
    if base_name(config.name) in ONLINE and log_file.is_file():  # also an earlier commit's (`bench.since`)
        out["shares_base"] = "shares the policy's base" in log_file.read_text()
        out.update(ppo_time_split(run_dir / "run" / "tb", skip=timer["warmup"]))
    return out


def ppo_time_split(tb_dir: Path, skip: int) -> dict[str, float]:
    """Median seconds per rollout spent sampling+scoring and updating, from the online stage's own
    (PPO, GRPO, RLOO) `time/rollout_s` and `time/update_s` curves (first `skip` rollouts left out)."""
    import statistics

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    files = sorted(tb_dir.rglob("events.out.tfevents.*"))
    if not files:
        return {}
    events = EventAccumulator(str(files[0]), size_guidance={"scalars": 0})
    events.Reload()
    out = {}
    for tag, key in (("time/rollout_s", "rollout_s"), ("time/update_s", "update_s")):
        values = [e.value for e in events.Scalars(tag)][skip:] if tag in events.Tags()["scalars"] else []
        if values:
            out[key] = round(statistics.median(values), 4)
    return out
