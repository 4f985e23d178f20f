"""Recognising each data format, normalising it, and reporting what is wrong or dropped."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lightrlhf.data.clean import CleaningSpec
from lightrlhf.data.formats import (
    FORMATS,
    LoadReport,
    PreferenceExample,
    PromptExample,
    SFTExample,
    load_preferences,
    load_prompts,
    load_sft,
)
from lightrlhf.errors import DataError, UserError

FIXTURES = Path(__file__).parent.parent / "fixtures" / "data"


def fixture(name: str) -> str:
    return str(FIXTURES / name)


def user(content: str) -> dict[str, str]:
    return {"role": "user", "content": content}


def assistant(content: str) -> dict[str, str]:
    return {"role": "assistant", "content": content}


def system(content: str) -> dict[str, str]:
    return {"role": "system", "content": content}


def jsonl(tmp_path: Path, *rows: object, name: str = "data.jsonl") -> str:
    path = tmp_path / name
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return str(path)


def error_of(load, source: str, **options) -> str:
    with pytest.raises(UserError) as caught:
        load(source, **options)
    message = str(caught.value)
    assert "\n" not in message
    return message


# --- SFT -------------------------------------------------------------------------------------


def test_sft_prompt_completion():
    source = fixture("sft_prompt_completion.jsonl")
    examples, report = load_sft(source)
    assert examples == [
        SFTExample("What is 2 + 2?", "4", f"{source}:1"),
        SFTExample("把这句话翻译成英文：我爱你", "I love you.", f"{source}:2"),
        SFTExample([system("You are terse."), user("Name a colour.")], "Blue.", f"{source}:4"),
    ]
    assert report == LoadReport(source, "prompt_completion", rows=3, kept=3, dropped={})


def test_sft_messages():
    source = fixture("sft_messages.jsonl")
    examples, report = load_sft(source)
    assert examples == [
        SFTExample([system("你是一个乐于助人的助手。"), user("北京是哪个国家的首都？")], "中国。", f"{source}:1"),
        SFTExample([user("Hi"), assistant("Hello!"), user("Bye")], "Goodbye.", f"{source}:2"),
    ]
    assert report.format == "messages"


def test_sft_sharegpt_conversations():
    source = fixture("sft_sharegpt.json")
    examples, report = load_sft(source)
    assert examples == [
        SFTExample([user("Say hi.")], "Hi.", f"{source}:2"),
        SFTExample([system("用中文回答。"), user("天空是什么颜色？")], "蓝色。", f"{source}:9"),
    ]
    assert report.format == "messages"


def test_sft_alpaca():
    source = fixture("sft_alpaca.json")
    examples, report = load_sft(source)
    assert examples == [
        SFTExample("Translate to French.\n\nGood morning", "Bonjour", f"{source}:4"),
        SFTExample("写一首关于春天的短诗。", "春风拂面，花开满园。", f"{source}:5"),
    ]
    assert report.format == "alpaca"


# --- preferences -----------------------------------------------------------------------------


def test_explicit_pairs_with_margins_and_drops():
    source = fixture("pref_explicit.jsonl")
    examples, report = load_preferences(source)
    assert examples == [
        PreferenceExample("Is the earth round?", "Yes, roughly a sphere.", "No, it is flat.", 2.5, f"{source}:1"),
        PreferenceExample("用一句话介绍长城。", "长城是中国古代修建的军事防御工程。", "长城是一条河。", 1.0, f"{source}:2"),
        PreferenceExample("Is the earth round?", "Yes, roughly a sphere.", "No, it is flat.", 2.5, f"{source}:5"),
    ]
    assert report == LoadReport(source, "explicit", rows=5, kept=3, dropped={"tie": 1, "empty_response": 1})


def test_drop_duplicates_counts_them():
    source = fixture("pref_explicit.jsonl")
    examples, report = load_preferences(source, clean=CleaningSpec())
    assert [e.where for e in examples] == [f"{source}:1", f"{source}:2"]
    assert report.dropped == {"tie": 1, "empty_response": 1, "duplicate": 1}


def test_strict_mode_reports_the_first_dropped_row():
    source = fixture("pref_explicit.jsonl")
    assert error_of(load_preferences, source, strict=True) == (
        f"{source}:3: chosen and rejected are identical (a tie); strict mode does not drop it"
    )


def test_strict_mode_reports_empty_responses_and_duplicates(tmp_path):
    row = {"prompt": "p", "chosen": "a", "rejected": "b"}
    source = jsonl(tmp_path, row, row)
    assert error_of(load_preferences, source, strict=True, clean=CleaningSpec()) == (
        f"{source}:2: a duplicate of the example at {source}:1; strict mode does not drop it"
    )
    source = jsonl(tmp_path, {"prompt": "p", "chosen": "a", "rejected": " \n"})
    assert error_of(load_preferences, source, strict=True) == (
        f"{source}:1: the rejected response is empty; strict mode does not drop it"
    )


def test_implicit_pairs_split_at_a_word_boundary():
    source = fixture("pref_implicit.jsonl")
    examples, report = load_preferences(source)
    assert [(e.prompt, e.chosen, e.rejected) for e in examples] == [
        ("Question: What is the capital of France? Answer: ", "Paris.", "London."),
        ("问：一加一等于几？答：", "二。", "三。"),
        ("Q: colour of grass? A: ", "green", "grey"),
    ]
    assert report.format == "implicit"


def test_implicit_responses_that_start_alike_keep_their_first_word(tmp_path):
    source = jsonl(tmp_path, {"chosen": "Q: ok? A: yes", "rejected": "Q: ok? A: yes, sure"})
    [example], _ = load_preferences(source)
    assert (example.prompt, example.chosen, example.rejected) == ("Q: ok? A: ", "yes", "yes, sure")


def test_implicit_pairs_without_a_shared_prompt_are_an_error(tmp_path):
    source = jsonl(tmp_path, {"chosen": "Paris", "rejected": "London"})
    assert error_of(load_preferences, source) == (
        f'{source}:1: chosen and rejected share no prompt prefix (format "implicit" needs both to '
        "start with the prompt)"
    )


def test_conversational_pairs():
    source = fixture("pref_conversational.jsonl")
    examples, report = load_preferences(source)
    assert examples == [
        PreferenceExample([user("What is 3 * 3?")], "9", "6", None, f"{source}:1"),
        PreferenceExample([system("请用中文回答。"), user("太阳从哪边升起？")], "东边。", "西边。", None, f"{source}:2"),
        PreferenceExample(
            [user("Hi"), assistant("Hello"), user("Tell a joke")],
            "Why did the chicken cross the road?", "No.", None, f"{source}:3",
        ),
    ]
    assert report.format == "conversational"


def test_conversational_pairs_from_csv_json_cells():
    source = fixture("pref_conversational.csv")
    examples, _ = load_preferences(source)
    assert examples == [PreferenceExample([user("你好")], "你好！", "走开", None, f"{source}:row 2")]


def test_hh_rlhf_dialogues_are_parsed_into_messages():
    source = fixture("pref_hh_rlhf.jsonl")
    examples, report = load_preferences(source)
    assert examples == [
        PreferenceExample(
            [user("What is a good name for a cat?")], "How about Whiskers?", "Dog.", None, f"{source}:1"
        ),
        PreferenceExample(
            [user("你好"), assistant("你好！有什么可以帮你？"), user("推荐一本书。")],
            "《红楼梦》。", "不知道。", None, f"{source}:2",
        ),
    ]
    assert report.format == "hh_rlhf"


def test_hh_rlhf_data_can_be_read_as_implicit_text(tmp_path):
    source = fixture("pref_hh_rlhf.jsonl")
    examples, report = load_preferences(source, format="implicit")
    assert examples[0].prompt == "\n\nHuman: What is a good name for a cat?\n\nAssistant: "
    assert (examples[0].chosen, report.format) == ("How about Whiskers?", "implicit")


def test_ultrafeedback_pairs_and_margins_from_scores():
    source = fixture("pref_ultrafeedback.jsonl")
    examples, report = load_preferences(source, margin_from_scores=True)
    assert examples == [
        PreferenceExample(
            [user("Write a haiku about rain.")], "Soft rain on the roof", "Rain is wet.", 5.5, f"{source}:1"
        ),
        PreferenceExample(
            [user("解释一下什么是机器学习。")], "机器学习是让计算机从数据中学习规律的方法。", "不知道。", 7.0, f"{source}:2"
        ),
    ]
    assert report.format == "ultrafeedback"
    assert [e.margin for e in load_preferences(source)[0]] == [None, None]


def test_ultrafeedback_prompt_becomes_a_user_turn_when_the_replies_lack_it(tmp_path):
    source = jsonl(tmp_path, {"prompt": "嗨", "chosen": [assistant("你好")], "rejected": [assistant("走")]})
    [example], _ = load_preferences(source)
    assert example.prompt == [user("嗨")]


def test_csv_margins_are_numeric_strings():
    examples, report = load_preferences(fixture("pref_explicit.csv"))
    assert [e.margin for e in examples] == [1.5, None, 0.5]
    assert examples[2].chosen == "Line one\nLine two"


def test_pairs_continuing_different_conversations_are_dropped(tmp_path):
    good = {"chosen": [user("a"), assistant("b")], "rejected": [user("a"), assistant("c")]}
    odd = {"chosen": [user("a"), assistant("b")], "rejected": [user("x"), assistant("c")]}
    examples, report = load_preferences(jsonl(tmp_path, good, odd))
    assert (len(examples), report.dropped) == (1, {"prompt_mismatch": 1})


def test_a_file_with_every_row_dropped_is_an_error(tmp_path):
    source = jsonl(tmp_path, *[{"prompt": "p", "chosen": "same", "rejected": "same"}] * 40)
    assert error_of(load_preferences, source) == f"{source}: all 40 rows were dropped (tie: 40)"


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        ({"prompt": "p", "rejected": "r"}, 'field "chosen" is missing'),
        ({"chosen": "\n\nHuman: a\n\nAssistant: b"}, 'field "rejected" is missing'),
        ({"prompt": "p", "chosen": None, "rejected": "r"}, 'field "chosen" is null'),
        (
            {"prompt": "p", "chosen": 3, "rejected": "r"},
            'field "chosen" must be a string or a list of {role, content} messages, got number',
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": "r", "margin": "big"},
            'field "margin" must be a number, got "big"',
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": "r", "margin": True},
            'field "margin" must be a number, got boolean',
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": "r", "margin": float("inf")},
            'field "margin" must be a finite number, got a number out of range',
        ),
        (
            {"prompt": "p", "chosen": "c", "rejected": "r", "margin": "nan"},
            'field "margin" must be a finite number, got "nan"',
        ),
        (
            {"chosen": [user("a"), user("b")], "rejected": [user("a"), assistant("c")]},
            'field "chosen": the final message must be from the assistant, got "user"',
        ),
        (
            {"chosen": [assistant("b")], "rejected": [assistant("c")]},
            'field "chosen": there is no user message before the final assistant message',
        ),
        (
            {"chosen": [{"content": "b"}], "rejected": [assistant("c")]},
            'field "chosen"[0]: message has no "role"',
        ),
        (
            {"chosen": [user("a"), {"role": "bot", "content": "b"}], "rejected": []},
            'field "chosen"[1]: "role" must be one of system, user, assistant, got "bot"',
        ),
        (
            {"chosen": [user("a"), {"role": "assistant", "content": ["b"]}], "rejected": []},
            'field "chosen"[1]: "content" must be a string, got list',
        ),
        ({"chosen": [user("a"), assistant("b")], "rejected": []}, 'field "rejected" is empty'),
        (
            {"chosen": ["hi"], "rejected": ["ho"]},
            'field "chosen"[0] must be an object with "role" and "content", got string',
        ),
        (
            {"prompt": [user("a")], "chosen": [user("b"), assistant("c")], "rejected": [user("b"), assistant("d")]},
            'field "chosen" holds a conversation that does not start with the prompt',
        ),
        (
            {
                "chosen": "\n\nHuman: hi\n\nAssistant: yo\n\nHuman: ?",
                "rejected": "\n\nHuman: hi\n\nAssistant: no",
            },
            'field "chosen": the final message must be from the assistant, got "user"',
        ),
        (
            {"chosen": "x\ud800y", "rejected": "xz"},
            'field "chosen" holds an unpaired surrogate (a \\ud800-style escape), not text',
        ),
        (
            {"question": "q", "answer": "a"},
            'cannot tell the preference format from the fields "question", "answer"; formats: '
            "explicit {prompt, chosen, rejected}, ultrafeedback {prompt, chosen, rejected}, "
            "conversational {prompt?, chosen, rejected}, hh_rlhf {chosen, rejected}, "
            "implicit {chosen, rejected}",
        ),
    ],
)
def test_a_bad_preference_row_is_one_line_at_its_line(tmp_path, row, problem):
    source = jsonl(tmp_path, row, name="pref.jsonl")
    with pytest.raises(DataError) as caught:
        load_preferences(source)
    assert str(caught.value) == f"{source}:1: {problem}"


def test_a_later_row_in_another_format_is_an_error_at_its_line(tmp_path):
    explicit = {"prompt": "p", "chosen": "a", "rejected": "b"}
    source = jsonl(
        tmp_path,
        explicit,
        {"prompt": "p", "chosen": [user("p"), assistant("a")], "rejected": [user("p"), assistant("b")]},
    )
    assert error_of(load_preferences, source) == f'{source}:2: field "chosen" must be a string, got list'
    source = jsonl(tmp_path, explicit, explicit, {"messages": [user("p"), assistant("a")]})
    assert error_of(load_preferences, source) == f'{source}:3: field "prompt" is missing'


def test_scores_are_required_for_margins_from_scores(tmp_path):
    source = jsonl(tmp_path, {"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1})
    assert error_of(load_preferences, source, margin_from_scores=True) == (
        f'{source}:1: field "score_rejected" is missing (margin_from_scores needs it)'
    )


def test_a_forced_format_must_fit_every_row():
    source = fixture("pref_implicit.jsonl")
    assert error_of(load_preferences, source, format="explicit") == f'{source}:1: field "prompt" is missing'
    assert error_of(load_preferences, source, format="hh_rlhf") == (
        f'{source}:1: field "chosen" is not an HH-RLHF dialogue: it must start with "\\n\\nHuman:"'
    )
    assert error_of(load_sft, source, format="messages") == f'{source}:1: field "messages" is missing'


def test_an_unknown_format_lists_the_known_ones():
    assert error_of(load_preferences, fixture("pref_explicit.jsonl"), format="dpo") == (
        'unknown preference format "dpo"; known: auto, explicit, ultrafeedback, conversational, hh_rlhf, implicit'
    )
    assert FORMATS["sft"] == ("prompt_completion", "messages", "alpaca")


# --- SFT and prompt errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("row", "problem"),
    [
        (
            {"messages": [user("a"), assistant("b"), {"role": "user"}]},
            'field "messages"[2]: message has no "content"',
        ),
        (
            {"messages": [user("a"), assistant("b"), user("c")]},
            'field "messages": the final message must be from the assistant, got "user"',
        ),
        (
            {"messages": [system("s"), assistant("b")]},
            'field "messages": the prompt must end with a user message, got "system"',
        ),
        ({"messages": []}, 'field "messages" is empty'),
        (
            {"messages": "hello"},
            'field "messages" must be a list of {role, content} messages, got string',
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "bing", "value": "b"}]},
            'field "conversations"[1]: "from" must be one of human, gpt, system, got "bing"',
        ),
        (
            {"prompt": "p", "completion": [user("c")]},
            'field "completion" must be a string or a list of one assistant message',
        ),
        (
            {"prompt": [assistant("p")], "completion": "c"},
            'field "prompt": the prompt must end with a user message, got "assistant"',
        ),
        (
            {"instruction": "i", "input": 5, "output": "o"},
            'field "input" must be a string, got number',
        ),
    ],
)
def test_a_bad_sft_row_is_one_line_at_its_line(tmp_path, row, problem):
    source = jsonl(tmp_path, row)
    assert error_of(load_sft, source) == f"{source}:1: {problem}"


def test_empty_completions_are_dropped(tmp_path):
    source = jsonl(tmp_path, {"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": ""})
    _, report = load_sft(source)
    assert (report.kept, report.dropped) == (1, {"empty_response": 1})


def test_prompts():
    source = fixture("prompts.jsonl")
    examples, report = load_prompts(source)
    assert examples == [
        PromptExample("Write a story about a robot.", f"{source}:1"),
        PromptExample([system("简洁地回答。"), user("讲一个笑话。")], f"{source}:2"),
    ]
    assert report == LoadReport(source, "prompt", rows=3, kept=2, dropped={"empty_prompt": 1})


def test_prompts_from_messages_drop_the_final_assistant_turn():
    source = fixture("prompts_messages.jsonl")
    examples, report = load_prompts(source)
    assert [e.prompt for e in examples] == [[user("Summarise: the cat sat on the mat.")], [user("你好吗？")]]
    assert report.format == "messages"


@pytest.mark.parametrize(
    ("name", "form", "first_prompt"),
    [
        ("pref_hh_rlhf.jsonl", "hh_rlhf", [user("What is a good name for a cat?")]),
        ("pref_ultrafeedback.jsonl", "ultrafeedback", [user("Write a haiku about rain.")]),
        ("pref_implicit.jsonl", "implicit", "Question: What is the capital of France? Answer: "),
        ("sft_prompt_completion.jsonl", "prompt", "What is 2 + 2?"),
        ("sft_alpaca.json", "alpaca", "Translate to French.\n\nGood morning"),
        ("sft_sharegpt.json", "messages", [user("Say hi.")]),
    ],
)
def test_prompts_from_sft_and_preference_files(name, form, first_prompt):
    examples, report = load_prompts(fixture(name))
    assert (examples[0].prompt, report.format) == (first_prompt, form)


def test_prompts_from_pairs_ignore_ties(tmp_path):
    source = jsonl(tmp_path, {"prompt": "p", "chosen": "same", "rejected": "same"})
    assert load_prompts(source)[0] == [PromptExample("p", f"{source}:1")]


def test_missing_file_through_a_loader_is_one_line():
    assert error_of(load_sft, "data/nope.jsonl") == "data/nope.jsonl: no such file"
