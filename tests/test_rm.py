"""Reward model: metrics by hand, batching and padding invariances, every data format, export."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import FIXTURES, compose, run_in_process, train_cli
from safetensors.torch import load_file

from lightrlhf.data.modules import collate_pairs
from lightrlhf.data.tokenize import PairFeatures, TruncationReport, encode_pair
from lightrlhf.errors import UserError
from lightrlhf.models.reward import RewardModel, load_reward_model_for_training
from lightrlhf.stages.rm import preference_metrics

DATA = FIXTURES / "data"


def test_preference_metrics_by_hand():
    chosen = torch.tensor([2.0, 0.0, 1.0, -1.0])
    rejected = torch.tensor([1.0, 1.0, 0.0, -3.0])
    chosen_len = torch.tensor([3, 5, 2, 4])
    rejected_len = torch.tensor([5, 4, 4, 2])
    m = preference_metrics(chosen, rejected, chosen_len, rejected_len)
    # differences 1, -1, 1, 2 -> 3 of 4 right, mean 0.75
    assert m["accuracy"] == 0.75 and m["margin_mean"] == 0.75
    # chosen shorter in pairs 0 and 2, both right
    assert m["frac_chosen_shorter"] == 0.5 and m["accuracy_chosen_shorter"] == 1.0
    assert m["chosen_mean"] == 0.5 and m["rejected_mean"] == -0.25  # (1 + 1 + 0 - 3) / 4
    rewards = torch.cat([chosen, rejected])
    lengths = torch.cat([chosen_len, rejected_len]).float()
    expected_r = torch.corrcoef(torch.stack([rewards, lengths]))[0, 1].item()
    assert m["length_correlation"] == pytest.approx(expected_r, abs=1e-5)
    # ECE over both orientations: probabilities s(d) with label 1 and s(-d) with label 0
    probs = torch.sigmoid(torch.tensor([1.0, -1.0, 1.0, 2.0, -1.0, 1.0, -1.0, -2.0]))
    labels = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0]).float()
    bins = torch.clamp((probs * 10).long(), max=9)
    ece = sum((bins == b).sum() / 8 * abs(probs[bins == b].mean() - labels[bins == b].mean())
              for b in bins.unique())
    assert m["ece"] == pytest.approx(ece.item(), abs=1e-5)


def test_over_long_pairs_keep_responses_and_cut_the_prompt(tiny_tokenizer):
    report = TruncationReport()
    prompt = " ".join(["river"] * 20) + " :"
    pair = encode_pair(tiny_tokenizer, prompt, "the river .", "a rain .", None, max_length=12, max_prompt_length=40,
                       report=report)
    eos = tiny_tokenizer.eos_token_id
    assert pair.chosen_ids[-4:] == tiny_tokenizer("the river .", add_special_tokens=False)["input_ids"] + [eos]
    assert len(pair.chosen_ids) == 12 and pair.chosen_prompt_length == 8
    assert report.counts == {"prompt_truncated": 1}
    assert encode_pair(tiny_tokenizer, "a", " ".join(["river"] * 20), "b", None, 12, 8, report) is None
    assert report.counts["dropped_response_too_long"] == 1


@pytest.fixture(scope="module")
def reward_model(tiny_spec):
    torch.manual_seed(0)
    model = load_reward_model_for_training(tiny_spec)
    with torch.no_grad():  # make the adapter matter
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model.eval()


def test_reward_is_read_at_the_last_real_token_whatever_the_padding(reward_model):
    tok = reward_model.tokenizer
    ids = tok("explain river rain : the river .")["input_ids"] + [tok.eos_token_id]
    n, pad = len(ids), tok.pad_token_id
    right = torch.tensor([ids + [pad] * 3]), torch.tensor([[1] * n + [0] * 3])
    left = torch.tensor([[pad] * 3 + ids]), torch.tensor([[0] * 3 + [1] * n])
    alone = torch.tensor([ids]), torch.ones(1, n, dtype=torch.long)
    with torch.no_grad():
        values = [reward_model(*x).item() for x in (right, left, alone)]
    assert values[0] == pytest.approx(values[2], abs=1e-5) and values[1] == pytest.approx(values[2], abs=1e-5)


def test_chosen_and_rejected_in_one_batched_forward_match_separate_forwards(reward_model, tiny_tokenizer):
    from lightrlhf.stages.rm import RewardModelStage

    report = TruncationReport()
    pairs = [encode_pair(tiny_tokenizer, "explain river rain :", c, r, None, 64, 16, report)
             for c, r in [("the river is wet .", "ugh"), ("rain", "the lake and the wave flow near the shore .")]]
    batch = collate_pairs(tiny_tokenizer.pad_token_id)([p if p.index >= 0 else PairFeatures(**{**p.__dict__, "index": i})
                                                         for i, p in enumerate(pairs)])
    stage = RewardModelStage(reward_model, datamodule=None)
    with torch.no_grad():
        chosen, rejected = stage.pair_rewards(batch)
        alone = [reward_model(torch.tensor([p.chosen_ids]), torch.ones(1, len(p.chosen_ids), dtype=torch.long)).item()
                 for p in pairs]
    assert chosen[0].tolist() == pytest.approx(alone, abs=1e-5)  # [K, B]: the one member's rewards
    assert batch["chosen_length"].tolist() == [len(p.chosen_ids) - p.chosen_prompt_length for p in pairs]


FORMATS = [("pref_explicit.jsonl", "explicit"), ("pref_explicit.csv", "explicit"), ("pref_implicit.jsonl", "implicit"),
           ("pref_conversational.jsonl", "conversational"), ("pref_hh_rlhf.jsonl", "hh_rlhf"),
           ("pref_ultrafeedback.jsonl", "ultrafeedback")]


@pytest.mark.parametrize("name,fmt", FORMATS)
def test_rm_trains_on_each_preference_format(name, fmt, tmp_path):
    run_dir = tmp_path / "run"
    run_in_process(["stage=rm", "data=jsonl", f"data.path={DATA / name}", "trainer.max_steps=2",
                    "stage.datamodule.batch_size=2", "trainer.val_check_interval=2"], run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["data"]["train/format"] == fmt
    assert "val/accuracy" in record["metrics"] and (run_dir / "export" / "score_head.safetensors").is_file()


@pytest.mark.slow
def test_rm_learns_the_demo_task_and_its_export_scores_identically_in_a_fresh_process(tmp_path):
    run_dir = tmp_path / "rm"
    run_in_process(["stage=rm", "data=demo_pref", "trainer.max_steps=150", "trainer.val_check_interval=150"], run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    assert metrics["val/gold_accuracy"] > 0.7 and metrics["val/accuracy"] > 0.65
    for name in ("val/ece", "val/length_correlation", "val/accuracy_chosen_shorter", "val/annotator_gold_agreement",
                 "val/chosen_mean", "val/rejected_std"):
        assert name in metrics
    prompts = ["explain river rain :", "briefly moon star :", "list bread salt :"]
    responses = ["the river is wet and blue .", "ugh whatever", "bread salt ."]
    script = textwrap.dedent(f"""
        import json
        from lightrlhf.models.reward import RewardModel
        model = RewardModel.from_pretrained({str(run_dir / 'export')!r})
        print(json.dumps(model.score({prompts!r}, {responses!r}).tolist()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    here = RewardModel.from_pretrained(run_dir / "export").score(prompts, responses).tolist()
    assert fresh == pytest.approx(here, abs=1e-6)
    # the export scores what the trained model scored: its rewards on the held-out pairs reproduce the
    # statistics the stage logged at the last validation (same weights, adapter *and* head)
    pairs = [json.loads(line) for line in Path(_validation_file(tmp_path)).read_text().splitlines()]
    exported = RewardModel.from_pretrained(run_dir / "export")
    chosen = exported.score([p["prompt"] for p in pairs], [p["chosen"] for p in pairs])
    rejected = exported.score([p["prompt"] for p in pairs], [p["rejected"] for p in pairs])
    assert len(pairs) == 512
    assert chosen.mean().item() == pytest.approx(metrics["val/chosen_mean"], abs=1e-4)
    assert rejected.std().item() == pytest.approx(metrics["val/rejected_std"], abs=1e-3)
    assert (chosen > rejected).float().mean().item() == pytest.approx(metrics["val/accuracy"], abs=1e-6)
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("step-*.ckpt"))[-1], weights_only=True)["state_dict"]
    head = {k[len("model.heads.0."):]: v for k, v in ckpt.items() if k.startswith("model.heads.0.")}
    assert head and all(torch.equal(exported.head.state_dict()[k], v) for k, v in head.items())


def _validation_file(tmp_path) -> str:
    from lightrlhf.launch.build import build
    from lightrlhf.launch.run import to_plain

    return str(build(to_plain(compose(["stage=rm", "data=demo_pref"], tmp_path / "cfg"))["data"]["validation_path"],
                     "data.validation_path"))


def test_loading_an_sft_export_as_a_reward_model_is_refused(tmp_path):
    (tmp_path / "lightrlhf.json").write_text(json.dumps({"kind": "causal_lm", "stage": "sft"}))
    with pytest.raises(UserError, match=r"is a causal_lm export \(from stage 'sft'\), not a reward model"):
        RewardModel.from_pretrained(tmp_path)


@pytest.mark.slow
def test_malformed_preference_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "pref.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"}\n')
    done = train_cli(["stage=rm", "data=jsonl", f"data.path={bad}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [f'error: {bad}:2: field "rejected" is missing']


def test_rm_resume_continues_in_place(tmp_path):
    run_dir = tmp_path / "rm"
    common = ["stage=rm", "data=demo_pref", "trainer.val_check_interval=100", "callbacks.checkpoint.every_n_steps=5"]
    run_in_process(common + ["trainer.max_steps=5"], run_dir)
    run_in_process([f"resume={run_dir}", "trainer.max_steps=10"], run_dir)
    record = json.loads((run_dir / "metrics.json").read_text())
    assert record["global_step"] == 10 and record["stage"] == "rm"
    assert json.loads((run_dir / "run.json").read_text())["launches"] == 2
    for name in ("train/accuracy", "train/ece", "train/chosen_std", "train/length_correlation"):
        assert name in record["metrics"]
    # the same weights as a run that was never stopped
    straight = tmp_path / "straight"
    run_in_process(common + ["trainer.max_steps=10"], straight)
    for name in ("adapter_model.safetensors", "score_head.safetensors"):
        a, b = load_file(run_dir / "export" / name), load_file(straight / "export" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
