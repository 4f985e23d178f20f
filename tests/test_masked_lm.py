"""The masked LM (`model=tiny_bert_zh`): its layout, mask-predict, the likelihood estimates, the fill command
and reward-weighted fine-tuning of it (`stage=reward_weighted_mlm`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, train_cli

from lightrlhf.demo.shipped import TINY_BERT_ZH_DIR, TINY_ZH_DIR
from lightrlhf.models.masked_lm import (
    MaskPredictSpec,
    banned_ids,
    decode_slots,
    infill_batch,
    lowest,
    mask_predict,
    masked_prompts,
    remask_count,
    slot_ids,
)
from lightrlhf.rl.infill_likelihood import elbo_terms, one_step_terms, sequence_estimate

SLOT = 8


@pytest.fixture(scope="module")
def tiny_mlm():
    """An untrained 1-layer BERT with the shipped tokenizer and a slot of 8: fast and fully random."""
    from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(TINY_BERT_ZH_DIR)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=32, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, response_slot=SLOT)
    return BertForMaskedLM(config).eval(), tokenizer


def fill(model, tokenizer, seed, spec=MaskPredictSpec(iterations=4)):
    start = masked_prompts(tokenizer, [tokenizer("解释河岩：")["input_ids"], tokenizer("简述雨")["input_ids"]], SLOT)
    return mask_predict(model, start, start.slot_mask, spec, tokenizer.mask_token_id, banned_ids(tokenizer),
                        torch.Generator().manual_seed(seed))


def test_layout_of_a_known_response(tiny_mlm):
    _, tok = tiny_mlm
    response = tok("河是静。", add_special_tokens=False)["input_ids"]
    slot = slot_ids(tok, response, SLOT)
    assert slot == response + [tok.sep_token_id] + [tok.pad_token_id] * 3
    assert slot_ids(tok, list(range(10, 20)), SLOT) == list(range(10, 18))  # cut, no [SEP]
    prompt = tok("解释河岩：")["input_ids"]
    assert prompt[0] == tok.cls_token_id and prompt[-1] == tok.sep_token_id
    batch = infill_batch(tok, [prompt, prompt[:3]], [slot, slot])
    assert batch.slot_mask.sum(1).tolist() == [SLOT, SLOT]
    assert batch.slots().tolist() == [slot, slot]
    assert batch.attention_mask.sum(1).tolist() == [len(prompt) + SLOT, 3 + SLOT]
    texts, ended = decode_slots(tok, batch.slots())
    assert texts == ["河是静。", "河是静。"] and ended.tolist() == [True, True]
    texts, ended = decode_slots(tok, torch.tensor([list(range(10, 18))]))
    assert len(texts[0]) == SLOT and ended.tolist() == [False]


def test_remask_count_and_lowest_confidence_by_hand():
    # L = 10, T = 4: iterations 1, 2, 3 re-mask floor(10 * 3/4) = 7, 5, floor(10/4) = 2
    assert [int(remask_count(torch.tensor([10]), t, 4)) for t in (1, 2, 3)] == [7, 5, 2]
    scores = torch.tensor([[0.9, 0.1, 0.5, 0.1, 0.7]])
    eligible = torch.tensor([[True, True, True, False, True]])
    # the two lowest eligible: 0.1 (index 1) and 0.5 (index 2); index 3 is not fillable
    assert lowest(scores, eligible, torch.tensor([2])).tolist() == [[False, True, True, False, False]]


def test_mask_predict_is_deterministic_under_a_seed(tiny_mlm):
    model, tok = tiny_mlm
    first, again, other = fill(model, tok, 0), fill(model, tok, 0), fill(model, tok, 1)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    start = masked_prompts(tok, [tok("解释河岩：")["input_ids"]], SLOT)
    assert torch.equal(first[0][~start.slot_mask[0]], start.input_ids[0][~start.slot_mask[0]])  # prompt kept
    slots = first[:1][start.slot_mask].tolist()
    assert not set(slots) & set(banned_ids(tok))  # no [MASK], [CLS] or [UNK] written
    random_spec = MaskPredictSpec(iterations=4, remasking="random", top_k=5)
    assert torch.equal(fill(model, tok, 3, random_spec), fill(model, tok, 3, random_spec))
    greedy = MaskPredictSpec(iterations=4, temperature=0.0)
    assert torch.equal(fill(model, tok, 0, greedy), fill(model, tok, 1, greedy))  # argmax needs no randomness


def test_one_step_and_elbo_estimates_by_hand():
    # p = softmax(log [1, 2, 1]) = [1/4, 1/2, 1/4] at both slot positions; the infill is (1, 0)
    logits = torch.log(torch.tensor([1.0, 2.0, 1.0])).expand(1, 2, 3)
    targets = torch.tensor([[1, 0]])
    one_step = sequence_estimate(one_step_terms(logits, targets))
    assert one_step.item() == pytest.approx(math.log(0.5) + math.log(0.25), abs=1e-6)
    # ELBO with t = 0.5 and only the first position masked: log(1/2) / 0.5
    elbo = sequence_estimate(elbo_terms(logits, targets, torch.tensor([[True, False]]), torch.tensor([0.5])))
    assert elbo.item() == pytest.approx(math.log(0.5) / 0.5, abs=1e-6)
    # an unmasked position counts nothing, even with a log-prob of -inf
    logits = torch.tensor([[[0.0, 0.0, 0.0], [0.0, -math.inf, 0.0]]])
    elbo = elbo_terms(logits, torch.tensor([[2, 1]]), torch.tensor([[True, False]]), torch.tensor([0.25]))
    assert elbo.tolist() == [[pytest.approx(math.log(1 / 3) / 0.25), 0.0]]


def test_the_stage_estimate_masks_the_slot_of_a_tiny_model(tiny_mlm):
    """The stage's terms equal log-softmax read off a forward done by hand with the slot masked."""
    from types import SimpleNamespace

    from lightrlhf.stages.masked_reward_weighted import Infills, MaskedRewardWeightedStage

    model, tok = tiny_mlm
    prompt = tok("解释河岩：")["input_ids"]
    response = tok("河是静。", add_special_tokens=False)["input_ids"]
    batch = infill_batch(tok, [prompt], [slot_ids(tok, response, SLOT)])
    infills = Infills(batch, batch.slots(), ["河是静。"], torch.tensor([True]), torch.tensor([4.0]), ["p"], ["p"])
    stage = SimpleNamespace(likelihood="one_step", sampler=torch.Generator().manual_seed(0), model=_Forward(model, tok))
    terms = MaskedRewardWeightedStage.log_likelihood_terms(stage, infills, slice(None))
    by_hand_ids = batch.input_ids.clone()
    by_hand_ids[0, len(prompt):] = tok.mask_token_id
    logp = torch.log_softmax(model(input_ids=by_hand_ids, attention_mask=batch.attention_mask).logits[0], -1)
    expected = [logp[len(prompt) + i, token].item() for i, token in enumerate(batch.slots()[0].tolist())]
    assert terms[0].tolist() == pytest.approx(expected, abs=1e-5)


class _Forward:
    def __init__(self, model, tokenizer):
        self.module, self.tokenizer = model, tokenizer

    def __call__(self, ids, mask):
        return self.module(input_ids=ids, attention_mask=mask).logits


def _fill(*args: str):
    return subprocess.run([sys.executable, "-m", "lightrlhf.models.masked_lm", "fill", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def test_fill_command_completes_hello_world_with_the_shipped_model():
    done = _fill("你好，[MASK][MASK]！")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "你好，世界！"


def test_fill_command_bad_input_is_one_line(capsys):
    """In-process through the command's own entry (the exit status and the one line it prints); one case also
    in a process of its own."""
    from lightrlhf.models.masked_lm import main

    for args, expected in ((["你好，世界！"], "has no [MASK] to fill"),
                           (["你好[MASK]", "--model", str(TINY_ZH_DIR)], "is not a masked language model"),
                           (["你好[MASK]", "--iterations", "0"], "--iterations: must be > 0")):
        with pytest.raises(SystemExit) as exited:
            main(["fill", *args])
        assert exited.value.code == 2, args
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and expected in lines[0], (args, lines)
    done = _fill("你好，世界！")
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "error: fill: the text has no [MASK] to fill: '你好，世界！'"]


STAGE = ["stage=reward_weighted_mlm", "model=tiny_bert_zh", "demo=zh", "data=demo_prompts", "demo.prompt_size=512",
         "demo.validation_size=64", "stage.eval.num_prompts=16", "stage.datamodule.batch_size=4",
         "stage.weighting.group_size=2", "stage.generation.iterations=3", "reward.normalize.init_rollouts=1",
         "+reward.components.full_stop={_target_:lightrlhf.rewards.spec.Component,weight:1.0,"
         "fn:{_target_:lightrlhf.rewards.functions.contains,_partial_:true,pattern:'。'}}"]


@pytest.mark.slow
def test_stage_runs_checkpoints_only_the_adapter_and_resumes(tmp_path):
    run = tmp_path / "run"
    first = train_cli(STAGE + ["stage.rollouts=2", "callbacks.checkpoint.every_n_steps=2",
                               f"hydra.run.dir={run}"])
    assert first.returncode == 0, first.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "step-00000004.ckpt", weights_only=True)
    assert checkpoint["state_dict"] and all(".lora_" in name for name in checkpoint["state_dict"])
    assert checkpoint["lightrlhf"]["rollout_count"] == 2
    metrics = json.loads((run / "metrics.json").read_text())["metrics"]
    assert "eval/gold_score" in metrics and "eval/gold_score_initial" in metrics
    assert metrics["eval/drift_initial"] == pytest.approx(0.0, abs=1e-6)  # the adapter starts at zero
    resumed = train_cli([f"resume={run}", "stage.rollouts=3"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["metrics"]["progress/rollouts"] == 3.0
    manifest = json.loads((run / "export" / "lightrlhf.json").read_text())
    assert manifest["kind"] == "masked_lm" and manifest["stage"] == "reward_weighted_mlm"
    done = _fill("你好，[MASK][MASK]！", "--model", str(run / "export"))
    assert done.returncode == 0 and done.stdout.strip().startswith("你好，"), done.stderr


def test_stage_bad_settings_are_one_line(tmp_path):
    from conftest import run_in_process

    from lightrlhf.errors import UserError

    for override, expected in (("stage.weighting.method=best", "config stage.weighting.method: expected one of"),
                               ("stage.likelihood=exact", "config stage.likelihood: expected one of"),
                               ("stage.weighting.group_size=1", "config stage.weighting.group_size: must be >= 2"),
                               (f"reward.path={TINY_ZH_DIR}", "config reward.path: ")):
        with pytest.raises(UserError) as caught:
            run_in_process(STAGE + [override, "stage.rollouts=1"], tmp_path / override.split("=")[0])
        assert expected in str(caught.value) and "\n" not in str(caught.value), override
