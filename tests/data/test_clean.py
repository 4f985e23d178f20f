"""Each cleaning step of data.clean: what it changes or drops, and that switching it off leaves the row alone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightrlhf.data.clean import CleaningSpec, normalize_text
from lightrlhf.data.formats import load_preferences, load_prompts, load_sft
from lightrlhf.errors import ConfigValueError, UserError

OFF = CleaningSpec(unicode=None, control_chars=False, whitespace=False, drop_duplicates=False)


def jsonl(tmp_path: Path, *rows: dict) -> str:
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def words(texts: list[str]) -> list[int]:
    return [len(text.split()) for text in texts]


def test_unicode_nfkc_folds_full_width_letters_but_keeps_chinese_punctuation():
    assert normalize_text("Ｗｈａｔ ﬁne x²", CleaningSpec()) == "What fine x2"
    assert normalize_text("你好，世界！（ＡＩ）", CleaningSpec()) == "你好，世界！（AI）"
    assert normalize_text("Ｗｈａｔ", CleaningSpec(unicode="NFC")) == "Ｗｈａｔ"  # NFC is lossless
    assert normalize_text("Ｗｈａｔ", OFF) == "Ｗｈａｔ"


def test_control_characters_go_newlines_and_tabs_stay():
    text = "a\x00b\u200bc\ufeffd\x1b[0me\tf\ng"
    assert normalize_text(text, CleaningSpec(whitespace=False)) == "abcd[0me\tf\ng"
    assert normalize_text(text, OFF) == text


def test_whitespace_keeps_indentation_and_one_blank_line():
    text = "  def f():\r\n      return  1   \r\n\n\n\nprint( f() )\t\t x \n"
    assert normalize_text(text, CleaningSpec()) == "def f():\n      return 1\n\nprint( f() ) x"
    assert normalize_text(text, OFF) == text


def test_normalised_texts_count_each_step_once_per_row(tmp_path):
    source = jsonl(tmp_path, {"prompt": "Ｑ\u200b  one", "completion": "a  b"}, {"prompt": "plain", "completion": "x"})
    examples, report = load_sft(source, clean=CleaningSpec())
    assert [(e.prompt, e.completion) for e in examples] == [("Q one", "a b"), ("plain", "x")]
    assert report.cleaned == {"unicode": 1, "control_chars": 1, "whitespace": 1}
    _, report = load_sft(source, clean=OFF)
    assert report.cleaned == {}


def test_text_steps_reach_chat_messages(tmp_path):
    source = jsonl(tmp_path, {"messages": [{"role": "user", "content": "Ｈｉ  there"},
                                           {"role": "assistant", "content": "Hello\x00!"}]})
    [example], _ = load_sft(source, clean=CleaningSpec())
    assert example.prompt == [{"role": "user", "content": "Hi there"}] and example.completion == "Hello!"


def test_a_response_that_cleaning_empties_is_dropped_as_empty(tmp_path):
    source = jsonl(tmp_path, {"prompt": "p", "chosen": "\u200b", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": "b"})
    _, report = load_preferences(source, clean=CleaningSpec())
    assert report.dropped == {"empty_response": 1}
    _, report = load_preferences(source, clean=OFF)
    assert report.dropped == {}


def test_exact_duplicates_after_normalisation(tmp_path):
    rows = [{"prompt": "p", "chosen": "a b", "rejected": "c"}, {"prompt": "p", "chosen": "a  b", "rejected": "c"},
            {"prompt": "p", "chosen": "a b", "rejected": "c", "margin": 3}]
    source = jsonl(tmp_path, *rows)
    examples, report = load_preferences(source, clean=CleaningSpec())
    assert len(examples) == 1 and report.dropped == {"duplicate": 2}  # the margin is not part of the example's text
    examples, _ = load_preferences(source, clean=CleaningSpec(drop_duplicates=False))
    assert len(examples) == 3


def test_prompt_duplicates(tmp_path):
    source = jsonl(tmp_path, {"prompt": "Hi"}, {"prompt": "Hi "}, {"prompt": "Bye"})
    examples, report = load_prompts(source, clean=CleaningSpec())
    assert [e.prompt for e in examples] == ["Hi", "Bye"] and report.dropped == {"duplicate": 1}


LONG = ("Photosynthesis turns light, water and carbon dioxide into sugar and oxygen inside the chloroplasts "
        "of green plants, and it feeds almost every food chain on Earth")


def test_near_duplicates_are_dropped_only_when_switched_on(tmp_path):
    rows = [{"prompt": "Explain photosynthesis.", "completion": LONG + "."},
            {"prompt": "Explain photosynthesis.", "completion": LONG + "!"},  # one character apart
            {"prompt": "Explain photosynthesis.", "completion": "Plants make food from light."}]
    source = jsonl(tmp_path, *rows)
    examples, report = load_sft(source, clean=CleaningSpec(near_duplicates=True))
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["1", "3"]
    assert report.dropped == {"near_duplicate": 1}
    examples, report = load_sft(source, clean=CleaningSpec(), measure_all=True)
    assert len(examples) == 3 and report.flagged == {"near_duplicate": 1}
    _, report = load_sft(source, clean=CleaningSpec(near_duplicates=True, near_duplicate_threshold=1.0))
    assert report.dropped == {}


def test_near_duplicates_in_chinese_use_character_shingles(tmp_path):
    text = "长城是中国古代修建的军事防御工程，东起山海关，西到嘉峪关，绵延上万里，是世界上最著名的建筑之一"
    source = jsonl(tmp_path, {"prompt": "介绍长城。", "completion": text + "。"},
                   {"prompt": "介绍长城。", "completion": text + "！"}, {"prompt": "介绍长城。", "completion": "长城很长。"})
    examples, report = load_sft(source, clean=CleaningSpec(near_duplicates=True))
    assert len(examples) == 2 and report.dropped == {"near_duplicate": 1}


def test_near_duplicates_across_batches(tmp_path, monkeypatch):
    import lightrlhf.data.clean as clean

    monkeypatch.setattr(clean, "BATCH", 2)
    topics = ["rivers", "volcanoes", "glaciers", "deserts", "forests"]
    rows = [{"prompt": f"Tell me about {t}.", "completion": f"{t} " * 12 + LONG[:40]} for t in topics]
    rows.append({"prompt": "Tell me about volcanoes.", "completion": "volcanoes " * 12 + LONG[:40] + "!"})  # ~ row 2
    examples, report = load_sft(jsonl(tmp_path, *rows), clean=CleaningSpec(near_duplicates=True))
    assert len(examples) == 5 and report.dropped == {"near_duplicate": 1}


def test_near_identical_pairs(tmp_path):
    rows = [{"prompt": "p", "chosen": LONG + ".", "rejected": LONG + "!"},
            {"prompt": "q", "chosen": "Plants make sugar from light.", "rejected": "Plants eat sunlight."}]
    source = jsonl(tmp_path, *rows)
    examples, report = load_preferences(source, clean=CleaningSpec(near_identical_pairs=True))
    assert [e.prompt for e in examples] == ["q"] and report.dropped == {"near_identical_pair": 1}
    examples, report = load_preferences(source, clean=CleaningSpec(), measure_all=True)
    assert len(examples) == 2 and report.flagged == {"near_identical_pair": 1}


def test_token_limits(tmp_path):
    rows = [{"prompt": "one two three four", "chosen": "a b", "rejected": "c"},
            {"prompt": "p", "chosen": "a b c d e f", "rejected": "c"},
            {"prompt": "p", "chosen": "a b", "rejected": "ok"},
            {"prompt": "p", "chosen": "a b", "rejected": "c d"}]
    source = jsonl(tmp_path, *rows)
    spec = CleaningSpec(max_prompt_tokens=3, max_response_tokens=5, min_response_tokens=2)
    examples, report = load_preferences(source, clean=spec, count_tokens=words)
    assert [e.where.rsplit(":", 1)[1] for e in examples] == ["4"]
    assert report.dropped == {"prompt_too_long": 1, "response_too_long": 1, "response_too_short": 1}
    examples, _ = load_preferences(source, clean=CleaningSpec(), count_tokens=words)
    assert len(examples) == 4


def test_token_limits_need_a_tokenizer(tmp_path):
    source = jsonl(tmp_path, {"prompt": "p", "completion": "c"})
    with pytest.raises(UserError, match="token limits need the model's tokenizer"):
        load_sft(source, clean=CleaningSpec(max_prompt_tokens=3))


def test_strict_mode_names_the_original_of_a_near_duplicate(tmp_path):
    source = jsonl(tmp_path, {"prompt": "p", "completion": LONG + "."}, {"prompt": "p", "completion": LONG + "!"})
    with pytest.raises(UserError) as caught:
        load_sft(source, strict=True, clean=CleaningSpec(near_duplicates=True))
    assert str(caught.value) == (f"{source}:2: a near-duplicate of {source}:1 (>= 0.85); strict mode does not drop it")


@pytest.mark.parametrize("field,value,message", [
    ("unicode", "NFD", "must be one of ['NFKC', 'NFC', None], got 'NFD'"),
    ("num_perm", 100, "must be a power of two >= 8"),
    ("near_duplicate_threshold", 1.5, "must be in [0.0, 1.0], got 1.5"),
    ("max_response_tokens", 0, "must be > 0, got 0"),
])
def test_bad_settings_name_their_key(field, value, message):
    with pytest.raises(ConfigValueError) as caught:
        CleaningSpec(**{field: value})
    assert caught.value.param == field and message in caught.value.problem
