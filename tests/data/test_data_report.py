"""The data report: every count in report.json checked against what the fixture files were written to hold.

The fixtures under tests/fixtures/data/quality/ were made row by row for this (English and Chinese,
preference pairs and SFT, prompt/completion and chat messages); the comments say which row is what.
Token counts use `WordTokenizer`: a Han character, a run of word characters or one punctuation mark is
a token, so the lengths can be counted by eye.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from conftest import train_cli

from lightrlhf.data.report import ReportSpec, build_report, write_report
from lightrlhf.data.source import DataSource

QUALITY = Path(__file__).parent.parent / "fixtures" / "data" / "quality"
TOKEN = re.compile(r"[\u4e00-\u9fff]|\w+|[^\w\s]")


class WordTokenizer:
    name_or_path = "words"

    def __init__(self) -> None:
        self.vocabulary: dict[str, int] = {}

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[self.vocabulary.setdefault(t, len(self.vocabulary)) for t in TOKEN.findall(x)]
                              for x in texts]}


def tokens(text: str) -> list[str]:
    return TOKEN.findall(text)


def report_of(name: str, **clean) -> dict:
    source = DataSource(path=str(QUALITY / name), max_length=64, max_prompt_length=16, **clean)
    return build_report(source, WordTokenizer(), ReportSpec())


def distinct(responses: list[str], n: int) -> float:
    grams = [tuple(t[i:i + n]) for t in map(tokens, responses) for i in range(len(t) - n + 1)]
    return len(set(grams)) / len(grams)


EGG_C = "Put the egg in boiling water for nine minutes, then cool it in cold water."
FRANCE_C = ("The capital of France is Paris, a city on the river Seine known for the Eiffel Tower and the "
            "Louvre museum.")
COLOUR = "Red is one of the three primary colours in the traditional colour wheel used by painters."
WET = "Well, it depends on how you define wetness, and philosophers have argued about it for years."
# pref_en.jsonl, rows kept with the default cleaning (prompt, chosen, rejected), as cleaned
PREF_EN_KEPT = [
    ("How do I boil an egg?", EGG_C, "Boil it."),  # 1: annotator a1, margin 2
    ("How do I boil an egg?", EGG_C, "Boil it."),  # 2: a2 agrees with a1 (kept: another annotator's label)
    ("How do I boil an egg?", "Boil it.", EGG_C),  # 3: a3 labels the same pair the other way
    # 4: a1 repeats row 1 exactly: dropped as a duplicate
    ("What is the capital of France?", FRANCE_C, "France has no capital city at all."),  # 5
    ("What is the capital of France?", FRANCE_C[:-1] + "!", "France has no capital city at all."),  # 6: near-dup of 5
    ("Name a primary colour.", COLOUR, COLOUR[:-2] + "."),  # 7: near-identical responses, same length
    # 8: a tie, dropped
    ("Reply briefly: is water wet?", "Yes.", WET),  # 9: chosen shorter
    ("What is 2+2?", "It is 4.", "5"),  # 10: full-width letters, a zero-width space, a double space
    # 11: an empty chosen response, dropped
]


def test_english_preference_report_counts():
    report = report_of("pref_en.jsonl")
    assert report["kind"] == "preference" and report["format"] == "explicit"
    assert report["rows"] == {
        "read": 11, "kept": 8, "dropped": {"duplicate": 1, "empty_response": 1, "tie": 1},
        # row 10: NFKC (full-width), control (zero-width space), whitespace; row 11: "   " -> ""
        "cleaned": {"control_chars": 1, "unicode": 1, "whitespace": 2},
        # near-duplicates: rows 2 and 3 repeat row 1's texts (another annotator), row 6 is row 5 but "!"
        "flagged": {"near_duplicate": 3, "near_identical_pair": 1}}
    assert report["duplicates"] == {"exact": 1, "near_duplicate": 3, "near_identical_pair": 1,
                                    "exact_rate": 1 / 11, "near_duplicate_rate": 3 / 11,
                                    "near_identical_pair_rate": 1 / 11}
    # chosen longer in rows 1, 2, 5, 6, 10; shorter in 3 and 9; row 7 has equal lengths
    assert report["length_bias"] == {
        "pairs": 8, "chosen_longer": 5, "chosen_shorter": 2, "same_length": 1, "chosen_longer_fraction": 5 / 8,
        "length_only_accuracy": 5.5 / 8, "length_only_rule": "longer", "warning_at": 0.6, "warning": True}
    assert report["labels"] == {"pairs_labelled_more_than_once": 1, "contradictory_pairs": 1}
    # the egg pair has three labels: a1 and a2 agree, a3 disagrees with both -> 1 agreeing pair of 3
    assert report["annotators"] == {
        "count": 3, "rows": {"a1": 2, "a2": 3, "a3": 3}, "pairs_with_several_labels": 1, "agreement": 1 / 3,
        "agreement_per_annotator": {"a1": 0.5, "a2": 0.5, "a3": 0.0}}
    margins = report["margins"]
    assert (margins["present"], margins["mean"], margins["min"], margins["max"]) == (2, 1.5, 1.0, 2.0)
    prompts = report["prompts"]
    assert {k: v for k, v in prompts.items() if k != "top"} == {
        "unique": 5, "rows_per_prompt_mean": 8 / 5, "rows_per_prompt_max": 3, "in_several_rows": 2,
        "with_several_responses": 5, "responses_per_prompt_mean": 11 / 5}
    assert prompts["top"] == [{"prompt": "How do I boil an egg?", "rows": 3},
                              {"prompt": "What is the capital of France?", "rows": 2}]
    assert report["scripts"]["rows"] == {"latin": 8, "cjk": 0, "mixed": 0, "none": 0}
    assert any(w.startswith("length bias") for w in report["warnings"])
    assert any(w.startswith("label noise: 1 pairs") for w in report["warnings"])


def test_english_preference_lengths_and_diversity():
    report = report_of("pref_en.jsonl")
    for name, column in (("prompt", 0), ("chosen", 1), ("rejected", 2)):
        lengths = sorted(len(tokens(row[column])) for row in PREF_EN_KEPT)
        summary = report["lengths"][name]
        assert (summary["count"], summary["min"], summary["max"]) == (8, lengths[0], lengths[-1])
        assert summary["mean"] == pytest.approx(sum(lengths) / 8)
        assert sum(summary["histogram"]["counts"]) == 8
    responses = [row[1] for row in PREF_EN_KEPT] + [row[2] for row in PREF_EN_KEPT]
    assert report["diversity"]["distinct_1"] == pytest.approx(distinct(responses, 1))
    assert report["diversity"]["distinct_2"] == pytest.approx(distinct(responses, 2))
    assert report["diversity"]["unigrams"] == sum(len(tokens(r)) for r in responses)


def test_chinese_preference_report_counts():
    report = report_of("pref_zh.jsonl")
    assert report["rows"] == {
        "read": 8, "kept": 6, "dropped": {"duplicate": 1, "tie": 1},  # row 2 repeats row 1; row 8 is a tie
        # row 6: full-width "ＡＩ" (its "？" stays); row 7: a BEL character and a double space
        "cleaned": {"control_chars": 1, "unicode": 1, "whitespace": 1},
        # row 3 is row 1 with "！" for "。"; row 4's two responses differ in their last character
        "flagged": {"near_duplicate": 1, "near_identical_pair": 1}}
    # chosen longer in rows 1, 3, 6, 7; shorter in 5; the same length in 4
    bias = report["length_bias"]
    assert (bias["chosen_longer"], bias["chosen_shorter"], bias["same_length"]) == (4, 1, 1)
    assert bias["length_only_accuracy"] == 4.5 / 6 and bias["warning"]
    assert report["annotators"]["rows"] == {"甲": 1, "乙": 1}
    assert report["annotators"]["agreement"] is None  # no pair was labelled twice
    assert report["labels"] == {"pairs_labelled_more_than_once": 0, "contradictory_pairs": 0}
    assert report["margins"] == {"present": 0}
    # row 6 writes "AI" twice beside 34 Han characters: over a tenth of its letters are Latin
    assert report["scripts"]["rows"] == {"latin": 0, "cjk": 5, "mixed": 1, "none": 0}
    assert report["prompts"]["top"] == [{"prompt": "用一句话介绍长城。", "rows": 2}]
    wall = "长城是中国古代修建的军事防御工程，东起山海关，西到嘉峪关，绵延上万里，是世界上最著名的建筑之一。"
    assert report["lengths"]["chosen"]["max"] == len(tokens(wall)) == 48  # one token per character


def test_english_sft_report_counts():
    report = report_of("sft_en.jsonl")
    assert report["kind"] == "sft" and report["format"] == "prompt_completion"
    assert report["rows"] == {
        "read": 7, "kept": 5, "dropped": {"duplicate": 1, "empty_response": 1},  # row 2 repeats row 1; row 5 " "
        "cleaned": {"control_chars": 1, "unicode": 1, "whitespace": 2},  # row 6 (NUL, spaces, CRLF), 7, and 5
        "flagged": {"near_duplicate": 1}}  # row 4 is row 1 with "!" for "."
    prompts = report["prompts"]
    assert {k: prompts[k] for k in ("unique", "in_several_rows", "with_several_responses")} == {
        "unique": 3, "in_several_rows": 1, "with_several_responses": 1}  # the haiku prompt has 3 completions
    assert report["labels"] == {"field": {"True": 1, "False": 1}}  # rows 1 and 3 carry a label
    assert "length_bias" not in report and "annotators" not in report
    completions = [json.loads(line)["completion"] for line in (QUALITY / "sft_en.jsonl").read_text().splitlines()]
    kept = [completions[0], completions[2], completions[3], "Hi there!", "ok"]
    assert report["lengths"]["completion"]["mean"] == pytest.approx(sum(len(tokens(c)) for c in kept) / 5)
    assert report["diversity"]["distinct_2"] == pytest.approx(distinct(kept, 2))


def test_chinese_chat_sft_report_counts():
    report = report_of("sft_zh.jsonl")
    assert report["format"] == "messages"
    assert report["rows"] == {"read": 6, "kept": 4, "dropped": {"duplicate": 1, "empty_response": 1},
                              "cleaned": {"unicode": 1, "whitespace": 1}, "flagged": {"near_duplicate": 1}}
    assert report["prompts"]["unique"] == 2 and report["prompts"]["with_several_responses"] == 1
    assert report["lengths"]["prompt"]["max"] == len("写一句关于春天的话。")  # the content, not "user: ..."
    assert report["scripts"]["rows"] == {"latin": 0, "cjk": 3, "mixed": 1, "none": 0}  # 翻译：Hello / 你好


def test_switching_a_step_on_turns_flagged_rows_into_drops():
    from lightrlhf.data.clean import CleaningSpec

    report = report_of("pref_en.jsonl", clean=CleaningSpec(near_duplicates=True, near_identical_pairs=True))
    assert report["rows"]["dropped"] == {"duplicate": 1, "empty_response": 1, "tie": 1, "near_duplicate": 3,
                                         "near_identical_pair": 1}
    assert report["rows"]["flagged"] == {}
    assert report["duplicates"]["near_duplicate"] == 3  # measured the same either way
    assert report["rows"]["kept"] == 4


def test_report_files_and_plots(tmp_path):
    report = report_of("pref_en.jsonl")
    written = write_report(report, tmp_path)
    assert sorted(p.name for p in written) == ["length_bias.png", "lengths.png", "margins.png", "report.json"]
    assert json.loads((tmp_path / "report.json").read_text())["length_bias"]["pairs"] == 8
    assert all((tmp_path / name).read_bytes().startswith(b"\x89PNG") for name in ("lengths.png", "length_bias.png"))


def test_a_saved_dataset_directory_reports_like_its_file(tmp_path):
    import datasets

    rows = [json.loads(line) for line in (QUALITY / "pref_en.jsonl").read_text().splitlines()]
    columns = {key: [row.get(key) for row in rows] for key in ("prompt", "chosen", "rejected", "margin", "annotator")}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(columns)}).save_to_disk(str(tmp_path / "saved"))
    source = DataSource(path=str(tmp_path / "saved"), split="train", max_length=64, max_prompt_length=16)
    from_disk = build_report(source, WordTokenizer(), ReportSpec())
    from_file = report_of("pref_en.jsonl")
    for section in ("rows", "duplicates", "length_bias", "labels", "annotators", "prompts"):
        assert from_disk[section] == from_file[section]


def run_report(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    """`python -m lightrlhf.data report <args>` in a process of its own (forked from the test worker's
    server of preloaded imports, as train.py's runs are)."""
    return train_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], timeout=300,
                     script=["-m", "lightrlhf.data", "report"])


@pytest.mark.slow
def test_the_command_writes_the_report_and_refuses_bad_input_in_one_line(tmp_path):
    done = run_report(["data=jsonl", f"data.path={QUALITY / 'pref_en.jsonl'}"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["rows"]["kept"] == 8
    assert (tmp_path / "run" / "lengths.png").exists() and "length bias" in done.stderr + done.stdout

    done = run_report(["data=jsonl", f"data.path={QUALITY / 'pref_en.jsonl'}", "data.clean.num_perm=48"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith("error: config data.clean.num_perm: must be a power of two")

    # a broken file: the same one line from the same place in the command (the UserError of building the
    # report, whose exit status 2 the run above shows), here without another process start-up
    from lightrlhf.errors import UserError

    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n{"prompt": "p", "chosen": "a"\n')
    with pytest.raises(UserError) as error:
        build_report(DataSource(path=str(broken), max_length=64, max_prompt_length=16), WordTokenizer(), ReportSpec())
    assert str(error.value).startswith(f"{broken}:2: invalid JSON") and "\n" not in str(error.value)


def test_every_stage_logs_the_same_figures_in_its_data_summary(tiny_tokenizer):
    from lightrlhf.data.modules import PreferenceDataModule
    from lightrlhf.data.profile import summary_scalars

    source = DataSource(path=str(QUALITY / "pref_en.jsonl"), validation_path=str(QUALITY / "pref_en.jsonl"),
                        max_length=64, max_prompt_length=16)
    datamodule = PreferenceDataModule(source, tiny_tokenizer, batch_size=2, group_by_length=False)
    datamodule.setup("fit")
    summary = datamodule.summary
    report = build_report(source, tiny_tokenizer, ReportSpec())
    assert summary["train/length_bias/length_only_accuracy"] == report["length_bias"]["length_only_accuracy"]
    assert {k: v for k, v in summary.items() if k.startswith("train/length_bias/")} == {
        k: v for k, v in summary_scalars(report, "train").items() if k.startswith("train/length_bias/")}
    assert summary["train/dropped_duplicate"] == 1 and summary["train/cleaned_unicode"] == 1
    assert summary["train/annotators/agreement"] == pytest.approx(1 / 3)
    # MinHash is the report's (3 near-duplicates there); a stage start runs it only for a step that is on
    assert report["rows"]["flagged"]["near_duplicate"] == 3
    assert not [k for k in summary if "near_duplicate" in k or "near_identical" in k]


def test_a_stage_with_near_duplicate_cleaning_on_logs_what_it_dropped(tiny_tokenizer):
    from lightrlhf.data.clean import CleaningSpec
    from lightrlhf.data.modules import PreferenceDataModule

    source = DataSource(path=str(QUALITY / "pref_en.jsonl"), validation_path=str(QUALITY / "pref_en.jsonl"),
                        max_length=64, max_prompt_length=16, clean=CleaningSpec(near_duplicates=True))
    datamodule = PreferenceDataModule(source, tiny_tokenizer, batch_size=2, group_by_length=False)
    datamodule.setup("fit")
    summary = datamodule.summary
    assert summary["train/dropped_near_duplicate"] == 3 and summary["train/duplicates/near_duplicate"] == 3
    assert "train/duplicates/near_identical_pair" not in summary  # that step is off: not measured


def test_features_tokenized_a_batch_at_once_equal_those_tokenized_one_by_one(tiny_tokenizer):
    from lightrlhf.data.formats import load_preferences, load_prompts, load_sft
    from lightrlhf.data.modules import PreferenceDataModule, PromptDataModule, SFTDataModule
    from lightrlhf.data.tokenize import TruncationReport, encode_pair, encode_prompt, encode_sft

    def source(name):
        path = str(QUALITY / name)
        return DataSource(path=path, validation_path=path, max_length=40, max_prompt_length=12)

    for name in ("sft_en.jsonl", "sft_zh.jsonl"):  # text prompts; chat prompts (template)
        datamodule = SFTDataModule(source(name), tiny_tokenizer, batch_size=2)
        datamodule.setup("fit")
        examples, _ = load_sft(str(QUALITY / name), clean=datamodule.source.clean)
        alone = [encode_sft(tiny_tokenizer, e.prompt, e.completion, 40, 12, TruncationReport()) for e in examples]
        assert datamodule.train_set.items == [f for f in alone if f is not None] and len(alone) > 3
    for name in ("pref_en.jsonl", "pref_zh.jsonl"):
        datamodule = PreferenceDataModule(source(name), tiny_tokenizer, batch_size=2, group_by_length=False)
        datamodule.setup("fit")
        examples, _ = load_preferences(str(QUALITY / name), clean=datamodule.source.clean)
        alone = [encode_pair(tiny_tokenizer, e.prompt, e.chosen, e.rejected, e.margin, 40, 12, TruncationReport())
                 for e in examples]
        assert [(f.chosen_ids, f.rejected_ids, f.chosen_prompt_length) for f in datamodule.train_set.items] == [
            (f.chosen_ids, f.rejected_ids, f.chosen_prompt_length) for f in alone if f is not None]
        datamodule = PromptDataModule(source(name), tiny_tokenizer, batch_size=2)
        datamodule.setup("fit")
        examples, _ = load_prompts(str(QUALITY / name), clean=datamodule.source.clean)
        assert [f.prompt_ids for f in datamodule.train_set.items] == [
            encode_prompt(tiny_tokenizer, e.prompt)[-12:] for e in examples]


def test_a_stage_counts_exact_repeats_it_keeps(tiny_tokenizer):
    from lightrlhf.data.clean import CleaningSpec
    from lightrlhf.data.modules import PreferenceDataModule

    source = DataSource(path=str(QUALITY / "pref_en.jsonl"), validation_path=str(QUALITY / "pref_en.jsonl"),
                        max_length=64, max_prompt_length=16, clean=CleaningSpec(drop_duplicates=False))
    datamodule = PreferenceDataModule(source, tiny_tokenizer, batch_size=2, group_by_length=False)
    datamodule.setup("fit")
    assert datamodule.summary["train/flagged_duplicate"] == 1 and "train/dropped_duplicate" not in datamodule.summary
    assert datamodule.summary["train/duplicates/exact"] == 1

def word_ids(texts: list[str]) -> list[list[int]]:
    """A stateless word tokenizer (the same ids in every process)."""
    return [[zlib.crc32(word.encode()) & 0x7FFFFFFF for word in tokens(text)] for text in texts]


WORKERS_SCRIPT = """
import json, re, sys, zlib
from lightrlhf.data.clean import CleaningSpec
from lightrlhf.data.formats import stream_examples
from lightrlhf.data import profile as P

TOKEN = re.compile(r"[\\u4e00-\\u9fff]|\\w+|[^\\w\\s]")

def word_ids(texts):
    return [[zlib.crc32(word.encode()) & 0x7FFFFFFF for word in TOKEN.findall(text)] for text in texts]

path, kind = sys.argv[1], sys.argv[2]
out = {}
for batch_size, workers in ((3, 0), (3, 2), (4096, 0), (4096, 1)):
    examples, load_report = stream_examples(kind, path, clean=CleaningSpec(), measure_all=True)
    profile = P.DataProfile(kind, word_ids)
    profile.add_all(examples, batch_size=batch_size, workers=workers)
    out[f"{batch_size},{workers}"] = profile.result(load_report)
print(json.dumps(out, sort_keys=True, default=str))
"""


def test_the_report_does_not_depend_on_batches_or_worker_processes():
    """Run in a fresh process, as the report's CLI runs: there the worker processes are forked for real (a
    forked child of a long-lived test process that ran torch can deadlock on a lock another thread held)."""
    import subprocess

    results = {}
    for name in ("pref_en.jsonl", "sft_zh.jsonl"):
        kind = "preference" if name.startswith("pref") else "sft"
        done = subprocess.run([sys.executable, "-c", WORKERS_SCRIPT, str(QUALITY / name), kind], capture_output=True,
                              text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert done.returncode == 0, done.stderr[-3000:]
        runs = json.loads(done.stdout)
        whole = runs["4096,0"]
        assert all(result == whole for result in runs.values())
        results[name] = runs
    assert results["pref_en.jsonl"]["3,2"]["length_bias"]["pairs"] == 8
    assert results["sft_zh.jsonl"]["3,2"]["scripts"]["rows"]["cjk"] > 0
