"""Chinese text through the loaders: every file type and row format, truncation by tokens, and broken files.

The fixtures (tests/fixtures/data/zh/) are hand-written Chinese sentences and rows of the Chinese demo
language, with the punctuation Chinese is written with: full-width ，。：！？（）, the 书名号 《》,
the 顿号 、, curly quotes “” and the ellipsis ……. Every file loads with its format detected and every
string exactly as written: no mojibake, and no NFKC folding of the punctuation by the default cleaning.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import train_cli
from transformers import AutoTokenizer

from lightrlhf.data.clean import CleaningSpec
from lightrlhf.data.formats import (
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
)
from lightrlhf.data.tokenize import TruncationReport, encode_pair, encode_sft, token_counter
from lightrlhf.demo.shipped import TINY_ZH_DIR
from lightrlhf.errors import DataError

ZH = Path(__file__).parent.parent / "fixtures" / "data" / "zh"


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


GREAT_WALL = ("用一句话介绍长城。", "长城是中国古代修建的军事防御工程。", "长城是一条河。")
SFT_PROMPT_COMPLETION = [
    ("用一句话介绍长城。", "长城是中国古代修建的军事防御工程，东起山海关，西到嘉峪关。", 1),
    ("他听完后说了什么？", "他说：“知道了！”然后就走了……", 2),
    ("解释河岩：", "其河是静，请。", 3),  # the demo language: explain river rock : / the river is calm , kindly .
    ([system("请用中文回答。"), user("一年有几个季节？")], "四个：春、夏、秋、冬。", 4),
]
EXPLICIT = [(*GREAT_WALL, 2.0), ("推荐一本书，并说明理由。", "《红楼梦》：人物刻画细腻，语言优美。", "不知道……", 1.5),
            ("解释河岩：", "其河是静，请。", "唉随，蠢。", None)]


def sft(rows, source, unit=""):
    return [SFTExample(prompt, completion, f"{source}:{unit}{where}") for prompt, completion, where in rows]


def pairs(rows, source, wheres, unit=""):
    return [PreferenceExample(prompt, chosen, rejected, margin, f"{source}:{unit}{where}")
            for (prompt, chosen, rejected, margin), where in zip(rows, wheres, strict=True)]


def expected(name: str) -> tuple[str, str, list]:
    """(kind, detected format, examples) of each fixture, written out by hand from the file."""
    source = str(ZH / name)
    table = {
        "sft_prompt_completion.jsonl": ("sft", "prompt_completion", sft(SFT_PROMPT_COMPLETION, source)),
        "sft_prompt_completion.jsonl.gz": ("sft", "prompt_completion", sft(SFT_PROMPT_COMPLETION, source)),
        "sft_messages.jsonl": ("sft", "messages", sft([
            ([system("你是一个乐于助人的助手。"), user("《静夜思》的作者是谁？")], "李白。", 1),
            ([user("你好！"), assistant("你好，有什么可以帮你？"), user("今天天气怎么样？")], "晴，最高气温二十五度。", 2),
            ([user("概括河雨：")], "河与雨，明。", 3)], source)),
        "sft_sharegpt.json": ("sft", "messages", sft([
            ([user("“欲穷千里目”的下一句是什么？")], "更上一层楼。", 2),
            ([system("回答要简短。"), user("描述星月：")], "星与月很亮，请。", 9)], source)),
        "sft_alpaca.json": ("sft", "alpaca", sft([
            ("把下面的句子翻译成英文。\n\n我喜欢读书。", "I like reading.", 3),
            ("写一句关于秋天的话。", "秋风起，落叶黄。", 4), ("列举鱼船：", "鱼船，请。", 5)], source)),
        "pref_explicit.jsonl": ("preference", "explicit", pairs(EXPLICIT, source, [1, 2, 3])),
        "pref_explicit.parquet": ("preference", "explicit", pairs(EXPLICIT, source, [1, 2, 3], "row ")),
        "pref_explicit.csv": ("preference", "explicit", pairs([
            (*GREAT_WALL, 2.0), ("写两行诗，每行五个字。", "床前明月光，\n疑是地上霜。", "月亮, 很圆。", 1.0),
            ("解释河岩：", "其河是静，请。", "唉随，蠢。", None)], source, [2, 3, 5], "row ")),
        "pref_implicit.jsonl": ("preference", "implicit", pairs([
            ("问：一加一等于几？答：", "二。", "三。", None),
            ("问：水在几度结冰？答：", "零摄氏度。", "一百度。", None)], source, [1, 2])),
        "pref_conversational.jsonl": ("preference", "conversational", pairs([
            ([user("你好")], "你好！很高兴见到你。", "走开。", None),
            ([system("请用中文回答。"), user("太阳从哪边升起？")], "东边。", "西边。", None)], source, [1, 2])),
        "pref_hh_rlhf.jsonl": ("preference", "hh_rlhf", pairs([
            ([user("你好"), assistant("你好！有什么可以帮你？"), user("推荐一本书。")], "《西游记》，故事有趣。", "随便。", None),
            ([user("描述星月：")], "星与月很亮，请。", "哼，闷。", None)], source, [1, 2])),
        "pref_ultrafeedback.jsonl": ("preference", "ultrafeedback", pairs([
            ([user("解释一下什么是机器学习。")], "机器学习是让计算机从数据中学习规律的方法。", "不知道。", None),
            ([user("讨论饼果：")], "饼与果很甜，谢。", "呸。", None)], source, [1, 2])),
        "prompts.jsonl": ("prompt", "prompt", [
            PromptExample("写一首关于春天的短诗。", f"{source}:1"), PromptExample("简述月星：", f"{source}:2"),
            PromptExample([system("简洁地回答。"), user("讲一个笑话。")], f"{source}:3")]),
        "prompts_messages.csv": ("prompt", "messages", [
            PromptExample([user("北京是哪个国家的首都？")], f"{source}:row 2"),
            PromptExample([user("你好吗？")], f"{source}:row 3")]),
    }
    return table[name]


LOADERS = {"sft": load_sft, "preference": load_preferences, "prompt": load_prompts}
FILES = sorted(p.name for p in ZH.iterdir())


def test_every_fixture_has_its_expected_rows():
    assert set(FILES) == {"sft_prompt_completion.jsonl", "sft_prompt_completion.jsonl.gz", "sft_messages.jsonl",
                          "sft_sharegpt.json", "sft_alpaca.json", "pref_explicit.jsonl", "pref_explicit.parquet",
                          "pref_explicit.csv", "pref_implicit.jsonl", "pref_conversational.jsonl",
                          "pref_hh_rlhf.jsonl", "pref_ultrafeedback.jsonl", "prompts.jsonl", "prompts_messages.csv"}


@pytest.mark.parametrize("clean", [None, CleaningSpec()], ids=["raw", "default_cleaning"])
@pytest.mark.parametrize("name", FILES)
def test_each_chinese_file_loads_in_its_format_with_its_text_intact(name, clean):
    kind, fmt, examples = expected(name)
    loaded, report = LOADERS[kind](str(ZH / name), clean=clean)
    assert report.format == fmt
    assert loaded == examples
    assert report.dropped == {} and report.cleaned == {}  # the default NFKC step changed no Chinese text


@pytest.mark.parametrize("name", ["sft_prompt_completion.jsonl", "pref_explicit.jsonl", "pref_explicit.parquet"])
def test_the_chinese_ellipsis_and_full_width_punctuation_survive_nfkc_while_full_width_letters_fold(name, tmp_path):
    """NFKC writes "……" as "......" and "，" as ","; the cleaning keeps both, and folds "Ａ３" to "A3" (README)."""
    kind, _, examples = expected(name)
    source = tmp_path / "row.jsonl"
    source.write_text(json.dumps({"prompt": "Ａ３纸有多大？", "completion": "二百一十乘二百九十七毫米……对吗？"},
                                 ensure_ascii=False) + "\n", encoding="utf-8")
    (example,), report = load_sft(str(source), clean=CleaningSpec())
    assert (example.prompt, example.completion) == ("A3纸有多大？", "二百一十乘二百九十七毫米……对吗？")
    assert report.cleaned == {"unicode": 1}
    texts = [getattr(e, field) for e in examples for field in ("completion", "chosen", "rejected") if hasattr(e, field)]
    assert any("……" in text for text in texts)


def test_the_chinese_files_are_utf8_on_disk_not_escapes():
    """The fixtures hold the characters themselves, so what is tested is the decoding of real UTF-8."""
    for name in FILES:
        if name.endswith((".jsonl", ".json", ".csv")):
            text = (ZH / name).read_bytes().decode("utf-8")
            assert "\\u" not in text and any("\u4e00" <= ch <= "\u9fff" for ch in text), name


@pytest.mark.parametrize("dict_split", [None, "validation"])
def test_a_saved_datasets_directory_of_chinese_pairs_loads_like_the_jsonl(tmp_path, dict_split):
    import datasets

    rows = [json.loads(line) for line in (ZH / "pref_explicit.jsonl").read_text(encoding="utf-8").splitlines()]
    columns = {key: [row.get(key) for row in rows] for key in ("prompt", "chosen", "rejected", "margin")}
    dataset = datasets.Dataset.from_dict(columns)
    saved = tmp_path / "saved"
    (datasets.DatasetDict({dict_split: dataset}) if dict_split else dataset).save_to_disk(str(saved))
    loaded, report = load_preferences(str(saved), split=dict_split, clean=CleaningSpec())
    where = f"{saved}[{dict_split}]" if dict_split else str(saved)
    assert report.format == "explicit"
    assert loaded == pairs(EXPLICIT, where, [1, 2, 3], "row ")


# --- truncation counts Chinese tokens --------------------------------------------------------------


@pytest.fixture(scope="module")
def zh_tokenizer():
    from lightrlhf.models.loading import load_tokenizer
    from lightrlhf.models.spec import ModelSpec

    return load_tokenizer(ModelSpec(name_or_path=str(TINY_ZH_DIR)))


@pytest.fixture(scope="module")
def bert_tokenizer():
    from support.tiny_bert import bert_tokenizer

    return bert_tokenizer()


def test_the_char_tokenizer_counts_one_token_a_character(zh_tokenizer):
    count = token_counter(zh_tokenizer)
    assert count(["其河是静，请。", "解释河岩：", "你好，世界！"]) == [7, 5, 6]


def test_a_long_chinese_prompt_loses_its_left_characters_and_a_completion_its_right(zh_tokenizer):
    tok = zh_tokenizer
    prompt = "概括河雨：" * 4  # 20 characters, 21 tokens with <bos>
    report = TruncationReport()
    features = encode_sft(tok, prompt, "其河是静，请。", max_length=12, max_prompt_length=8, report=report)
    # the prompt keeps its last 8 tokens (8 characters); the completion the 4 that remain, EOS cut off
    assert tok.convert_ids_to_tokens(features.input_ids) == [*"河雨：概括河雨：", *"其河是静"]
    assert features.prompt_length == 8
    assert report.counts == {"prompt_truncated": 1, "completion_truncated": 1}
    # a preference response is never cut: 7 characters + EOS leave 4 tokens of a 12-token budget for the prompt
    pair = encode_pair(tok, prompt, "其河是静，请。", "唉。", None, 12, 8, report)
    assert pair.chosen_prompt_length == 4 and tok.decode(pair.chosen_ids[:4]) == "括河雨："
    assert tok.convert_ids_to_tokens(pair.chosen_ids[4:]) == [*"其河是静，请。", "<eos>"]


def test_an_encoder_tokenizer_counts_characters_and_its_special_tokens(bert_tokenizer):
    tok = bert_tokenizer
    assert token_counter(tok)(["其河是静，请。"]) == [7]  # without special tokens, as the cleaning counts
    report = TruncationReport()
    tok.eos_token = tok.sep_token  # as lightrlhf.models.loading.load_tokenizer sets it for an encoder
    pair = encode_pair(tok, "概括河雨：" * 4, "其河是静，请。", "唉。", None, 12, 16, report)
    # 7 characters + [SEP] leave 4: the last 4 prompt tokens are "河", "雨", "：" and [SEP]; [CLS] is cut
    assert tok.convert_ids_to_tokens(pair.chosen_ids) == [*"河雨：", "[SEP]", *"其河是静，请。", "[SEP]"]
    assert report.counts == {"prompt_truncated": 1}


def test_token_limits_of_the_cleaning_count_chinese_characters(zh_tokenizer, tmp_path):
    source = tmp_path / "sft.jsonl"
    rows = [{"prompt": "简述河：", "completion": "其河是静。"}, {"prompt": "简述河：", "completion": "其河是静，请，谢。"}]
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    kept, report = load_sft(str(source), clean=CleaningSpec(max_response_tokens=8),
                            count_tokens=token_counter(zh_tokenizer))
    assert [e.completion for e in kept] == ["其河是静。"] and report.dropped == {"response_too_long": 1}  # 9 > 8


# --- a broken Chinese file: one line naming the file and the line ------------------------------------

GOOD = '{"prompt": "你好", "completion": "你好！"}\n{"prompt": "早上好", "completion": "早！"}\n'
GBK_HINT = "; it reads as Chinese in GB18030/GBK: convert the file to UTF-8 (iconv -f GB18030 -t UTF-8)"
BROKEN = {  # id: (file name, bytes, the one line)
    "json_syntax": ("sft.jsonl", (GOOD + '{"prompt": "晚上好" "completion": "晚安"}\n').encode(),
                    "{p}:3: invalid JSON (Expecting ',' delimiter, column 18)"),  # columns count characters, not bytes
    "missing_field": ("sft.jsonl", (GOOD + '\n{"prompt": "晚上好"}\n').encode(), '{p}:4: field "completion" is missing'),
    "wrong_type": ("sft.json", '[\n  {"prompt": "你好", "completion": "你好！"},\n  {"prompt": "早上好", "completion": 3}\n]'
                   .encode(), '{p}:3: field "completion" must be a string or a list of {{role, content}} messages, got number'),
    "gbk_jsonl": ("sft.jsonl", GOOD.encode() + '{"prompt": "晚上好", "completion": "晚安"}\n'.encode("gbk"),
                  "{p}: not valid UTF-8 (byte 0xcd at line 3)" + GBK_HINT),  # 晚 is CD ED in GBK
    "gbk_csv": ("sft.csv", "prompt,completion\n你好,你好！\n".encode() + "晚上好,晚安\n".encode("gb18030"),
                "{p}: not valid UTF-8 (byte 0xcd at line 3)" + GBK_HINT),
    "csv_cells": ("sft.csv", 'prompt,completion\n"写两行诗。","床前明月光，\n疑是地上霜。"\n"晚上好"\n'.encode(),
                  "{p}:row 4: the record has 1 cells, the header has 2"),  # the record before it spans lines 2-3
}


@pytest.mark.parametrize("case", BROKEN)
def test_a_broken_chinese_file_is_one_line_at_its_line(tmp_path, case):
    name, content, message = BROKEN[case]
    source = tmp_path / name
    source.write_bytes(content)
    with pytest.raises(DataError) as caught:
        load_sft(str(source), clean=CleaningSpec())
    assert str(caught.value) == message.format(p=source)


@pytest.mark.slow
@pytest.mark.parametrize("case", ["json_syntax", "gbk_jsonl"])
def test_a_broken_chinese_file_stops_train_py_with_its_line_and_exit_2(tmp_path, case):
    name, content, message = BROKEN[case]
    source = tmp_path / name
    source.write_bytes(content)
    done = train_cli(["stage=sft", "model=tiny_zh", "data=jsonl", f"data.path={source}",
                      f"hydra.run.dir={tmp_path / 'run'}"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == ["error: " + message.format(p=source)]


def test_the_tiny_zh_tokenizer_reads_the_fixtures_without_unknown_demo_characters():
    tok = AutoTokenizer.from_pretrained(TINY_ZH_DIR)
    for text in ("其河是静，请。", "唉随，蠢。", "河与雨，明。", "星与月很亮，请。", "饼与果很甜，谢。", "鱼船，请。", "哼，闷。"):
        assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
