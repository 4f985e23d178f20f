"""A reward model on an encoder (BERT): scored from [CLS], exported, and loaded back as a causal policy's scorer."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import ROOT, run_in_process, shared, train_cli
from support.tiny_bert import save_tiny_bert
from transformers import BertModel

from lightrlhf.data.tokenize import TruncationReport, encode_pair
from lightrlhf.demo.shipped import TINY_ZH_DIR
from lightrlhf.errors import UserError
from lightrlhf.models.loading import is_encoder, load_base_model, load_tokenizer
from lightrlhf.models.reward import RewardModel, load_reward_model_for_training
from lightrlhf.models.spec import ModelSpec

ZH = ["demo=zh", "demo.sft_size=1000", "demo.preference_size=2000", "demo.prompt_size=512",
      "demo.validation_size=64"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return shared(tmp_path_factory, "tiny_bert_zh_random", save_tiny_bert)


@pytest.fixture(scope="module")
def encoder_rm(bert_dir):
    torch.manual_seed(0)
    model = load_reward_model_for_training(ModelSpec(name_or_path=str(bert_dir)))
    with torch.no_grad():  # make the adapter matter
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
    return model.eval()


def test_an_encoder_is_told_from_a_causal_model(bert_dir):
    assert is_encoder(str(bert_dir)) and not is_encoder(str(TINY_ZH_DIR))


def test_the_encoder_tokenizer_closes_prompt_and_response_with_sep(bert_dir):
    tokenizer = load_tokenizer(ModelSpec(name_or_path=str(bert_dir)))
    assert tokenizer.eos_token == "[SEP]" and tokenizer.pad_token == "[PAD]"
    pair = encode_pair(tokenizer, "解释河岩：", "其河是静。", "唉随。", None, 64, 16, TruncationReport())
    assert tokenizer.convert_ids_to_tokens(pair.chosen_ids) == ["[CLS]", *"解释河岩：", "[SEP]", *"其河是静。", "[SEP]"]
    assert pair.chosen_prompt_length == 7  # [CLS] and the five characters and [SEP]


def test_the_encoder_reward_is_read_at_cls_whatever_the_padding(encoder_rm, bert_dir):
    assert encoder_rm.pooling == "first" and encoder_rm.is_adapter
    tok = encoder_rm.tokenizer
    ids = tok("解释河岩：", "其河是静。")["input_ids"]
    n, pad = len(ids), tok.pad_token_id
    right = torch.tensor([ids + [pad] * 3]), torch.tensor([[1] * n + [0] * 3])
    left = torch.tensor([[pad] * 3 + ids]), torch.tensor([[0] * 3 + [1] * n])
    alone = torch.tensor([ids]), torch.ones(1, n, dtype=torch.long)
    with torch.no_grad():
        values = [encoder_rm(*x).item() for x in (right, left, alone)]
        # by hand, adapter off: the plain encoder's hidden state at position 0 through the head
        with encoder_rm.module.disable_adapter():
            plain = encoder_rm.head(encoder_rm.module.get_base_model()(input_ids=alone[0]).last_hidden_state[:, 0])
        bare = BertModel.from_pretrained(bert_dir, add_pooling_layer=False).eval()
        reference = encoder_rm.head(bare(input_ids=alone[0]).last_hidden_state[:, 0])
    assert values[0] == pytest.approx(values[2], abs=1e-5) and values[1] == pytest.approx(values[2], abs=1e-5)
    assert plain.item() == pytest.approx(reference.item(), abs=1e-5)  # adapter off: the plain encoder's [CLS]
    assert values[2] != pytest.approx(plain.item(), abs=1e-4)  # and the adapter changes it
    # [CLS] sees the whole sequence: changing its last character changes the score
    other = tok("解释河岩：", "其河是闷。")["input_ids"]
    with torch.no_grad():
        changed = encoder_rm(torch.tensor([other]), torch.ones(1, len(other), dtype=torch.long)).item()
    assert changed != pytest.approx(values[2], abs=1e-6)


def test_lora_adapts_every_linear_layer_of_the_encoder(encoder_rm):
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in encoder_rm.module.named_parameters()
               if ".lora_A." in name}
    assert adapted == {"query", "key", "value", "dense"}  # attention, its output, the feed-forward pair
    assert not any("pooler" in name for name, _ in encoder_rm.module.named_parameters())
    trainable = [n for n, p in encoder_rm.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n or n.startswith("heads.") for n in trainable)


def test_a_causal_stage_refuses_an_encoder_in_one_line(bert_dir):
    with pytest.raises(UserError) as caught:
        load_base_model(ModelSpec(name_or_path=str(bert_dir)))
    assert str(caught.value) == (f"config model.name_or_path: {bert_dir} is an encoder (masked LM), not a causal "
                                 "language model; it can be the base of a reward model (stage=rm) or of "
                                 "reward-weighted fine-tuning by mask-predict (stage=reward_weighted_mlm), not of a "
                                 "causal policy")


def test_an_ensemble_of_encoder_members_scores_each_with_its_own_adapter(bert_dir):
    torch.manual_seed(0)
    model = load_reward_model_for_training(ModelSpec(name_or_path=str(bert_dir)), ensemble=2).eval()
    with torch.no_grad():
        for name, param in model.module.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.2)
        ids = torch.tensor([model.tokenizer("解释河岩：", "其河是静。")["input_ids"]])
        members = model.member_rewards(ids, torch.ones_like(ids))
        alone = []
        for k, member in enumerate(model.members):
            model.module.set_adapter(member)
            hidden = model.module.get_base_model()(input_ids=ids).last_hidden_state[:, 0]
            alone.append(model.heads[k](hidden).item())
    assert members.shape == (2, 1) and members[:, 0].tolist() == pytest.approx(alone, abs=1e-5)
    assert members[0, 0].item() != pytest.approx(members[1, 0].item(), abs=1e-4)


def test_chat_messages_with_a_tokenizer_without_a_chat_template_are_one_line(bert_dir):
    from lightrlhf.data.modules import PreferenceDataModule
    from lightrlhf.data.source import DataSource

    source = str(ROOT / "tests" / "fixtures" / "data" / "zh" / "pref_conversational.jsonl")
    datamodule = PreferenceDataModule(DataSource(path=source, max_length=64, max_prompt_length=16),
                                      load_tokenizer(ModelSpec(name_or_path=str(bert_dir))), batch_size=2,
                                      group_by_length=False)
    with pytest.raises(UserError) as caught:
        datamodule.setup("fit")
    assert str(caught.value) == (
        f"{source}:1: the prompt is a list of chat messages, but the tokenizer ({bert_dir}) has no chat template "
        "to write it with; use plain-text prompts, or a tokenizer with a template (model.tokenizer=...)")


@pytest.fixture(scope="module")
def encoder_rm_run(bert_dir, tmp_path_factory):
    def make(root):
        run_in_process(["stage=rm", "data=demo_pref", *ZH, f"model.name_or_path={bert_dir}", "trainer.max_steps=4",
                        "trainer.val_check_interval=4", "stage.datamodule.batch_size=16"], root)

    return shared(tmp_path_factory, "encoder_rm_run", make)


@pytest.mark.slow
def test_the_encoder_rm_trains_on_chinese_pairs_and_its_export_scores_the_same(encoder_rm_run):
    record = json.loads((encoder_rm_run / "metrics.json").read_text())
    assert record["data"]["train/format"] == "explicit"
    assert {"val/accuracy", "val/gold_accuracy", "val/annotator_gold_agreement"} <= set(record["metrics"])
    export = encoder_rm_run / "export"
    meta = json.loads((export / "lightrlhf.json").read_text())
    assert meta["pooling"] == "first" and meta["weights"] == "adapter"
    assert json.loads((export / "adapter_config.json").read_text())["task_type"] == "FEATURE_EXTRACTION"
    model = RewardModel.from_pretrained(export)
    assert model.pooling == "first"
    prompts, responses = ["解释河岩：", "列举鱼船："], ["其河是静，请。", "唉随。"]
    tok = model.tokenizer
    rows = [tok(p, r)["input_ids"] for p, r in zip(prompts, responses)]
    by_hand = [model(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long)).item() for ids in rows]
    assert model.score(prompts, responses).tolist() == pytest.approx(by_hand, abs=1e-5)


@pytest.mark.slow
def test_a_causal_chinese_policy_is_scored_by_the_encoder_rm_through_its_own_tokenizer(encoder_rm_run, tmp_path):
    """best-of-n with model=tiny_zh and the BERT reward model: the policy's text is re-tokenised by the RM."""
    run_dir = tmp_path / "bon"
    done = train_cli(["stage=best_of_n", "data=demo_prompts", *ZH, "model=tiny_zh",
                      f"reward.path={encoder_rm_run / 'export'}", "stage.n_max=2", "stage.num_prompts=4",
                      "stage.batch_size=4", "stage.generation.max_new_tokens=8", "stage.select_n=2",
                      f"hydra.run.dir={run_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert "loading it separately and scoring re-tokenised text" in done.stderr + done.stdout
    chosen = [json.loads(line) for line in (run_dir / "chosen.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(chosen) == 4
    model = RewardModel.from_pretrained(encoder_rm_run / "export")
    rescored = model.score([row["prompt"] for row in chosen], [row["completion"] for row in chosen]).tolist()
    assert [row["reward"] for row in chosen] == pytest.approx(rescored, abs=1e-4)
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in row["prompt"]) for row in chosen)


@pytest.mark.slow
def test_ppo_on_the_causal_chinese_policy_with_the_encoder_rm_logs_its_scores_in_chinese_tables(encoder_rm_run,
                                                                                                 tmp_path):
    from test_zh_pipeline import table_rows

    run_dir = tmp_path / "ppo"
    run_in_process(["stage=ppo", "data=demo_prompts", *ZH, "model=tiny_zh", f"reward.path={encoder_rm_run / 'export'}",
                    "stage.datamodule.batch_size=8", "stage.eval.num_prompts=8", "stage.eval.batch_size=8",
                    "reward.normalize.init_rollouts=1", "stage.rollouts=1", "stage.samples_every=1",
                    "stage.generation.max_new_tokens=8", "trainer.val_check_interval=1"], run_dir)
    record = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    assert record["metrics"]["progress/rollouts"] == 1.0 and "eval/gold_score" in record["metrics"]
    assert len(table_rows(run_dir, "rollout_samples")) == 8
    rows = table_rows(run_dir, "eval_samples")  # prompt, completion, score (raw units), gold
    model = RewardModel.from_pretrained(encoder_rm_run / "export")
    rescored = model.score([row[0] for row in rows], [row[1] for row in rows]).tolist()
    assert [float(row[2]) for row in rows] == pytest.approx(rescored, abs=1e-3)  # the table shows 3 decimals
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in row[0]) for row in rows)
