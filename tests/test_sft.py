"""SFT: completion-only masking on a hand-made batch, the loss falls, full fine-tuning works."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import FIXTURES, run_in_process

from lightrlhf.data.modules import collate_sft
from lightrlhf.data.tokenize import SFTFeatures, TruncationReport, encode_sft
from lightrlhf.stages.sft import sft_loss


def test_completion_only_mask_on_a_hand_made_batch():
    # prompt [5 6 7] + completion [8 9 EOS=2]; a shorter second row padded with 0
    batch = collate_sft(pad_id=0)([SFTFeatures([5, 6, 7, 8, 9, 2], 3), SFTFeatures([5, 8, 2], 1)])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2], [5, 8, 2, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0]]


def test_sft_loss_counts_exactly_the_masked_next_tokens():
    vocab = 4
    logits = torch.zeros(1, 4, vocab)
    logits[0, 1, 3] = 2.0  # predicts token 3 at position 2
    input_ids = torch.tensor([[1, 2, 3, 0]])
    mask = torch.tensor([[0, 0, 1, 0]])  # only the prediction of position 2 counts
    loss, tokens = sft_loss(logits, input_ids, mask)
    # -log softmax([0, 0, 0, 2])[3] = -(2 - log(3 + e^2))
    expected = -(2 - torch.log(torch.tensor(3.0) + torch.exp(torch.tensor(2.0))))
    assert tokens.item() == 1
    torch.testing.assert_close(loss, expected)


def test_tokenized_sft_example_has_one_bos_and_ends_with_eos(tiny_tokenizer):
    report = TruncationReport()
    features = encode_sft(tiny_tokenizer, "explain river rain :", "the river flows .", 64, 16, report)
    ids = features.input_ids
    assert ids[0] == tiny_tokenizer.bos_token_id and ids.count(tiny_tokenizer.bos_token_id) == 1
    assert ids[-1] == tiny_tokenizer.eos_token_id
    assert tiny_tokenizer.decode(ids[features.prompt_length:], skip_special_tokens=True) == "the river ."  # "flows" is <unk>


def test_chat_prompt_is_templated_once(tiny_tokenizer):
    report = TruncationReport()
    messages = [{"role": "user", "content": "explain river rain :"}]
    features = encode_sft(tiny_tokenizer, messages, "the river .", 64, 16, report)
    prompt = features.input_ids[: features.prompt_length]
    assert prompt.count(tiny_tokenizer.bos_token_id) == 1
    assert tiny_tokenizer.convert_ids_to_tokens(prompt[-1]) == "<|assistant|>"


def test_over_long_prompt_is_cut_from_the_left_and_counted(tiny_tokenizer):
    report = TruncationReport()
    prompt = " ".join(["river"] * 30) + " rain :"
    features = encode_sft(tiny_tokenizer, prompt, "the river .", 64, 8, report)
    assert features.prompt_length == 8
    assert tiny_tokenizer.decode(features.input_ids[:8]).endswith("river rain :")
    assert report.counts["prompt_truncated"] == 1


@pytest.mark.parametrize("name,fmt", [("sft_prompt_completion.jsonl", "prompt_completion"),
                                      ("sft_messages.jsonl", "messages"), ("sft_alpaca.json", "alpaca"),
                                      ("sft_sharegpt.json", "messages")])
def test_sft_trains_on_each_data_format(name, fmt, tmp_path):
    run_in_process(["stage=sft", "data=jsonl", f"data.path={FIXTURES / 'data' / name}", "trainer.max_steps=2",
                    "stage.datamodule.batch_size=2", "trainer.val_check_interval=2", "stage.eval.num_prompts=2"],
                   tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["data"]["train/format"] == fmt and record["status"] == "completed"


def test_gradient_accumulation_goes_through_lightning(tmp_path):
    run_in_process(["stage=sft", "trainer.max_steps=3", "trainer.accumulate_grad_batches=2",
                    "trainer.val_check_interval=6", "stage.eval.at_start=false", "stage.eval.num_prompts=4"],
                   tmp_path / "run")
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert record["global_step"] == 3  # optimizer steps; six batches were consumed
    checkpoint = __import__("torch").load(tmp_path / "run" / "checkpoints" / "step-00000003.ckpt", weights_only=True)
    assert checkpoint["loops"]["fit_loop"]["epoch_loop.batch_progress"]["total"]["completed"] == 6


def test_ckpt_path_starts_a_new_run_from_a_checkpoint(tmp_path):
    common = ["stage=sft", "trainer.val_check_interval=100", "stage.eval.num_prompts=4",
              "callbacks.checkpoint.every_n_steps=5"]
    run_in_process(common + ["trainer.max_steps=5"], tmp_path / "first")
    run_in_process(common + ["trainer.max_steps=8", f"ckpt_path={tmp_path / 'first' / 'checkpoints' / 'step-00000005.ckpt'}"],
                   tmp_path / "second")
    assert json.loads((tmp_path / "second" / "metrics.json").read_text())["global_step"] == 8
    assert json.loads((tmp_path / "first" / "metrics.json").read_text())["global_step"] == 5  # untouched


def test_packing_lays_demonstrations_end_to_end_on_a_hand_made_batch():
    # [5 6 7 | 8 9 2] (prompt 3), [5 | 8 2] (prompt 1), [4 | 2] (prompt 1), rows of 8: longest first, first fit
    batch = collate_sft(pad_id=0, pack_width=8)(
        [SFTFeatures([5, 6, 7, 8, 9, 2], 3), SFTFeatures([5, 8, 2], 1), SFTFeatures([4, 2], 1)])
    assert "attention_mask" not in batch
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 2, 4, 2], [5, 8, 2, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1], [0, 1, 2, 0, 1, 2, 3, 4]]
    # a demonstration's first token is never a target: it would be predicted from the one before it
    assert batch["token_mask"].tolist() == [[0, 1, 1, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1, 1, 0, 1], [0, 1, 1, 0, 0, 0, 0, 0]]


@pytest.mark.parametrize("completion_only", [True, False])
def test_a_packed_batch_gives_the_unpacked_loss_and_gradient(tiny_spec, tiny_tokenizer, completion_only):
    from lightrlhf.models.causal_lm import load_causal_lm
    from lightrlhf.stages.sft import SFTStage

    texts = [("explain river rain :", "the river is wet and the rain is calm ."), ("list stone :", "stone ."),
             ("describe a calm lake :", "lake calm water , kindly ."), ("tell me about sand :", "sand sand dune")]
    features = [encode_sft(tiny_tokenizer, p, c, 64, 16, TruncationReport()) for p, c in texts]
    torch.manual_seed(0)
    model = load_causal_lm(tiny_spec, tiny_tokenizer)
    with torch.no_grad():  # a trained-looking adapter, so that the gradient of every LoRA weight is non-zero
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    stage = SFTStage(model, None, completion_only_loss=completion_only)
    results = []
    for collate in (collate_sft(tiny_tokenizer.pad_token_id), collate_sft(tiny_tokenizer.pad_token_id, 64)):
        batch = collate(features)
        model.zero_grad()
        loss, tokens = sft_loss(stage._logits(batch), batch["input_ids"], stage._loss_mask(batch))
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((batch["input_ids"].numel(), loss.detach(), tokens, grads))
    (padded_size, loss, tokens, grads), (packed_size, packed_loss, packed_tokens, packed_grads) = results
    assert packed_size < padded_size  # 4 rows padded to the longest vs one row of the four end to end
    assert packed_tokens == tokens
    torch.testing.assert_close(packed_loss, loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == packed_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(packed_grads[name], grads[name], rtol=1e-4, atol=1e-6)


def test_the_lm_head_runs_from_the_position_before_the_first_scored_token():
    from lightrlhf.stages.sft import scored_tail

    # position t predicts token t + 1: row 2 scores token 2, predicted at position 1 -> keep 6 - 1 = 5
    mask = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
    assert scored_tail(mask) == 5
    assert scored_tail(torch.tensor([[0, 0, 0, 0, 1]])) == 2
    assert scored_tail(torch.tensor([[1, 1, 1, 1]])) == 4  # a whole-sequence loss: every position
    assert scored_tail(torch.zeros(2, 3, dtype=torch.long)) == 3


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("completion_only", [True, False])
def test_training_steps_loss_and_gradient_equal_the_full_logits_ones(tiny_spec, tiny_tokenizer, completion_only,
                                                                     packed):
    """The training step runs the LM head on the scored positions only: the loss and every LoRA gradient
    are those of the logits of every position."""
    from lightrlhf.models.causal_lm import load_causal_lm
    from lightrlhf.stages.sft import SFTStage, scored_tail

    texts = [("explain river rain , the long prompt :", "the river is wet ."), ("list stone and sand :", "stone ."),
             ("describe a calm lake :", "lake calm water , kindly and warmly .")]
    features = [encode_sft(tiny_tokenizer, p, c, 64, 16, TruncationReport()) for p, c in texts]
    batch = collate_sft(tiny_tokenizer.pad_token_id, 64 if packed else None)(features)
    assert ("position_ids" in batch) is packed
    torch.manual_seed(0)
    model = load_causal_lm(tiny_spec, tiny_tokenizer)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.05)
    stage = SFTStage(model, None, completion_only_loss=completion_only)
    mask = stage._loss_mask(batch)
    assert (scored_tail(mask) < batch["input_ids"].shape[1]) is completion_only
    results = []
    for trimmed in (True, False):
        model.zero_grad()
        if trimmed:
            loss = stage.training_step(batch, 0)
        else:
            loss, _ = sft_loss(stage._logits(batch), batch["input_ids"], mask)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (loss, grads), (full_loss, full_grads) = results
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-7)
    assert grads.keys() == full_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], full_grads[name], rtol=1e-5, atol=1e-7)


def test_sft_with_packing_trains_and_resumes_as_one_run(tmp_path):
    common = ["stage=sft", "stage.datamodule.packing=true", "stage.eval.num_prompts=8", "trainer.val_check_interval=6",
              "callbacks.checkpoint.every_n_steps=6"]
    run_in_process(common + ["trainer.max_steps=6"], tmp_path / "run")
    run_in_process([f"resume={tmp_path / 'run'}", "trainer.max_steps=12"], tmp_path / "run")
    run_in_process(common + ["trainer.max_steps=12"], tmp_path / "straight")
    resumed, straight = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("run", "straight"))
    assert resumed["global_step"] == straight["global_step"] == 12
    assert resumed["metrics"]["val/loss"] == pytest.approx(straight["metrics"]["val/loss"], rel=1e-5)
