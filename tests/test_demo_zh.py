"""The Chinese demo (`demo=zh`, `model=tiny_zh`): the English task in one character a word, the same gold."""

from __future__ import annotations

import json
import math
import random

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightrlhf.demo import assets, corpus
from lightrlhf.demo.annotator import SimulatedAnnotator
from lightrlhf.demo.gold import gold_breakdown, gold_score, word_count
from lightrlhf.demo.language import sample_prompt, sample_style, write_response
from lightrlhf.demo.language_zh import GREETINGS, check_one_to_one, to_chinese, to_english
from lightrlhf.demo.shipped import TINY_ZH_DIR
from lightrlhf.demo.task import DemoTask


def test_every_word_has_its_own_character():
    check_one_to_one()


def test_a_prompt_and_a_response_by_hand():
    assert to_chinese("explain river rock :") == "解释河岩："
    assert to_chinese("the river is calm , kindly .") == "其河是静，请。"
    assert to_english("解释河岩：", prompt=True) == "explain river rock :"
    assert to_english("其河 是静。") == "the river is calm ."  # spaces carry nothing
    assert to_english("你好") == "你 good"  # an unknown character is a word of no class


def test_gold_is_the_english_gold_of_the_translation():
    rng = random.Random(0)
    for _ in range(300):
        prompt = sample_prompt(rng)
        response = write_response(prompt, sample_style(rng), rng)
        zh_prompt, zh_response = to_chinese(prompt.text), to_chinese(response)
        assert gold_breakdown(zh_prompt, zh_response) == gold_breakdown(prompt.text, response)
        assert to_english(zh_response) == response
        assert word_count(zh_response) == word_count(response)
    # inside a chat-formatted prompt too
    assert gold_score("<bos><|user|> 列举鱼船：<|assistant|>", "请鱼船。") == gold_score("list fish boat :", "kindly fish boat .")


def test_length_bias_counts_characters_as_words():
    annotator = SimulatedAnnotator(rationality=0.0, length_bias=1.0)
    # equal gold (both empty of content and style), 3 words against 1: logit 2
    p = annotator.preference_probability("列举鱼船：", "其其其", "其")
    assert p == pytest.approx(1 / (1 + math.exp(-2)), rel=1e-12)


def test_chinese_files_are_the_english_rows_translated(tmp_path):
    english = DemoTask(cache_dir=str(tmp_path), preference_size=40, sft_size=30)
    chinese = DemoTask(cache_dir=str(tmp_path), preference_size=40, sft_size=30, language="zh")
    for kind in ("sft", "preference", "prompts"):
        en_path, zh_path = english.materialize(kind, "train"), chinese.materialize(kind, "train")
        assert en_path != zh_path
        en_rows = [json.loads(line) for line in open(en_path, encoding="utf-8")]
        zh_rows = [json.loads(line) for line in open(zh_path, encoding="utf-8")]
        assert zh_rows == [{k: to_chinese(v) for k, v in row.items()} for row in en_rows]
        assert "河" in open(zh_path, encoding="utf-8").read() or kind != "preference"  # written as UTF-8, not \\u escapes
    en_meta = json.loads(open(english.materialize("preference", "train").replace(".jsonl", ".meta.json")).read())
    zh_meta = json.loads(open(chinese.materialize("preference", "train").replace(".jsonl", ".meta.json")).read())
    assert zh_meta["annotator_gold_agreement"] == en_meta["annotator_gold_agreement"]
    assert zh_meta["language"] == "zh" and "language" not in en_meta


def test_an_unknown_language_is_refused(tmp_path):
    from lightrlhf.errors import ConfigValueError

    with pytest.raises(ConfigValueError, match="language"):
        DemoTask(cache_dir=str(tmp_path), language="fr")


def test_the_pretraining_corpus_holds_greetings():
    texts = corpus.pretraining_texts(2000, 0, language="zh")
    greetings = [r for p, r in texts if p == ""]
    assert 20 <= len(greetings) <= 60 and set(greetings) <= set(GREETINGS)
    assert "你好，世界！" in greetings


@pytest.fixture(scope="module")
def shipped_zh_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_ZH_DIR)


def test_shipped_chinese_tokenizer_is_one_token_a_character(shipped_zh_tokenizer):
    tok = shipped_zh_tokenizer
    ids = tok("解释河岩：")["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "解", "释", "河", "岩", "："]
    for text in [r["completion"] for r in corpus.sft_rows(200, "train", 3)] + list(GREETINGS):
        text = to_chinese(text) if text.isascii() else text
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert len(ids) == len(text) and tok.unk_token_id not in ids
        assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("犬a", add_special_tokens=False)["input_ids"]) == ["<unk>", "<unk>"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)


def test_shipped_chinese_model_matches_its_tokenizer(shipped_zh_tokenizer):
    model = AutoModelForCausalLM.from_pretrained(TINY_ZH_DIR)
    assert model.config.vocab_size == len(shipped_zh_tokenizer)
    assert json.loads((TINY_ZH_DIR / "BUILD.json").read_text())["parameters"] == sum(
        p.numel() for p in model.parameters())


def test_build_chinese_writes_a_loadable_model(tmp_path, monkeypatch):
    monkeypatch.setattr(assets, "pretraining_texts",
                        lambda n, seed, language="en": corpus.pretraining_texts(300, seed, language))
    out = assets.build(tmp_path / "tiny_zh", steps=3, language="zh")
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(tokenizer("解释", add_special_tokens=False)["input_ids"]) == ["解", "释"]
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tokenizer)
    assert "--language zh" in json.loads((out / "BUILD.json").read_text())["built_by"]
