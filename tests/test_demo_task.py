"""The demo task: tokenizer vs vocabulary, the hidden gold score by hand, the annotator, corpora, files, assets."""

from __future__ import annotations

import json
import math
import os
import random
from statistics import mean

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from lightrlhf.demo import assets, corpus
from lightrlhf.demo.annotator import A_BETTER, B_BETTER, TIE, SimulatedAnnotator
from lightrlhf.demo.corpus import preference_rows, pretraining_texts, prompt_rows, sft_rows, split_of
from lightrlhf.demo.gold import WEIGHTS, GoldBreakdown, GoldScorer, gold_breakdown, gold_score
from lightrlhf.demo.language import REQUESTS, TOPICS, Prompt, parse_prompt, vocabulary
from lightrlhf.demo.shipped import TINY_DIR
from lightrlhf.demo.task import DemoTask, demo_file
from lightrlhf.errors import ConfigValueError


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


# --- the shipped tokenizer ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped_tokenizer():
    return AutoTokenizer.from_pretrained(TINY_DIR)


def test_shipped_tokenizer_vocab_is_the_language_vocabulary_in_id_order(shipped_tokenizer):
    words = vocabulary()
    assert len(shipped_tokenizer) == len(words) == 206
    assert shipped_tokenizer.get_vocab() == {w: i for i, w in enumerate(words)}
    assert shipped_tokenizer.convert_ids_to_tokens(list(range(len(words)))) == words
    assert (shipped_tokenizer.pad_token, shipped_tokenizer.bos_token, shipped_tokenizer.eos_token,
            shipped_tokenizer.unk_token) == ("<pad>", "<bos>", "<eos>", "<unk>")
    assert (shipped_tokenizer.pad_token_id, shipped_tokenizer.bos_token_id, shipped_tokenizer.eos_token_id,
            shipped_tokenizer.unk_token_id) == (0, 1, 2, 3)


def test_shipped_tokenizer_adds_one_bos_and_no_eos(shipped_tokenizer):
    ids = shipped_tokenizer("explain river rain :")["input_ids"]
    # <bos>=1, explain=15 (4th request after 7 specials + 5 marks), river=74 (first topic word), rain=75, ":"=9
    assert ids == [1, 15, 74, 75, 9]
    assert shipped_tokenizer("")["input_ids"] == [1]
    chat = shipped_tokenizer.apply_chat_template([{"role": "user", "content": "list bread soup :"}],
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
    assert chat.count(shipped_tokenizer.bos_token_id) == 1 and chat[0] == shipped_tokenizer.bos_token_id
    assert shipped_tokenizer.convert_ids_to_tokens(chat[-1]) == "<|assistant|>"


def test_shipped_tokenizer_round_trips_demo_sentences(shipped_tokenizer):
    texts = [t for r in sft_rows(200, "train", 7) for t in (r["prompt"], r["completion"])]
    texts += [f"{p} {r}" for p, r in pretraining_texts(100, 7)]
    for text in texts:
        ids = shipped_tokenizer(text)["input_ids"]
        assert shipped_tokenizer.unk_token_id not in ids, text
        assert shipped_tokenizer.decode(ids, skip_special_tokens=True) == text


def test_unknown_words_including_chinese_map_to_unk(shipped_tokenizer):
    tokens = shipped_tokenizer.convert_ids_to_tokens(shipped_tokenizer("河流 river flows River 你好 .")["input_ids"])
    assert tokens == ["<bos>", "<unk>", "river", "<unk>", "<unk>", "<unk>", "."]


# --- the gold scorer ----------------------------------------------------------------------------


def test_gold_on_topic_polite_brief_answer_by_hand():
    # briefly -> 5 words wanted; topic water. Words: kindly the river and lake (5); content river, lake (both water).
    b = gold_breakdown("briefly river rain :", "kindly the river and lake .")
    assert b.relevance == 1.0  # (2 on - 0 off) / 2
    assert b.courtesy == pytest.approx(math.tanh(0.5))  # one polite word
    assert b.length_fit == 0.0 and b.full_stop == 1.0 and b.repetition == 0.0
    assert b.total == pytest.approx(1.0 + 0.6 * math.tanh(0.5) + 0.4)  # 1.677270...
    assert b.total == pytest.approx(1.6772702943560058)


def test_gold_off_topic_rude_without_full_stop_by_hand():
    # explain -> 12 words; topic fire. 8 words; river (water) and tree (forest) are both off topic;
    # ugh, boring are rude; "the" twice is a function word, which repetition does not count.
    b = gold_breakdown("explain flame smoke :", "ugh the river is boring and the tree")
    assert b == GoldBreakdown(relevance=-1.0, courtesy=pytest.approx(math.tanh(-1.0)),
                              length_fit=pytest.approx(-4 / 12), full_stop=0.0, repetition=0.0)
    assert b.total == pytest.approx(-1.0 + 0.6 * math.tanh(-1.0) - 0.8 * 4 / 12)  # -1.723623...


def test_gold_repeated_and_generic_words_by_hand():
    # describe -> 12; topic music. Words (punctuation excluded): song song song drum with a thing thing = 8.
    # Content: song x3, drum (on topic), thing x2 (generic: dilutes) -> relevance 4/6.
    # Counted for repetition: 6 words, 3 distinct -> 3/6.
    b = gold_breakdown("describe song drum :", "song song song drum with a thing , thing .")
    assert b.relevance == pytest.approx(2 / 3)
    assert b.courtesy == 0.0
    assert b.length_fit == pytest.approx(-1 / 3)
    assert b.full_stop == 1.0
    assert b.repetition == 0.5
    assert b.total == pytest.approx(2 / 3 - 0.8 / 3 + 0.4 - 0.4 * 0.5)  # = 0.6


def test_gold_too_long_for_a_brief_request_is_capped_by_hand():
    # list -> 5 words; 18 words is |18 - 5| / 5 = 2.6 off, capped at 1.5. Content: bread soup salt sweet meal
    # cook (food, 6) and warm (fire, 1) -> (6 - 1) / 7.
    response = "the bread and the soup with salt is very sweet and the meal is warm for the cook ."
    b = gold_breakdown("list bread soup :", response)
    assert b.length_fit == -1.5
    assert b.relevance == pytest.approx(5 / 7)
    assert b.total == pytest.approx(5 / 7 - 0.8 * 1.5 + 0.4)
    # below the cap the penalty is linear: 9 words for 5 wanted -> -4/5
    assert gold_breakdown("list bread soup :", "bread soup salt the the the the the the").length_fit == pytest.approx(-0.8)


def test_gold_reads_the_demo_prompt_out_of_a_chat_prompt_and_defaults_otherwise():
    plain = gold_breakdown("list bread soup :", "bread soup .")
    chat = gold_breakdown("<bos><|user|> list bread soup : <|assistant|>", "bread soup .")
    assert chat == plain
    assert plain.relevance == 1.0 and plain.length_fit == pytest.approx(-3 / 5)
    # not a demo prompt: relevance 0 and an 8-word target
    other = gold_breakdown("hello there", "bread soup .")
    assert other.relevance == 0.0 and other.length_fit == pytest.approx(-6 / 8)
    assert other.total == pytest.approx(-0.8 * 0.75 + 0.4)


def test_courtesy_saturates():
    prompt = "describe song drum :"
    values = [gold_breakdown(prompt, " ".join(["song"] + ["kindly", "gladly", "clearly", "gently", "truly", "warmly"][:k]))
              .courtesy for k in range(7)]
    assert values == pytest.approx([math.tanh(k / 2) for k in range(7)])
    gains = [b - a for a, b in zip(values, values[1:])]
    assert all(later < earlier for earlier, later in zip(gains, gains[1:]))
    assert gains[0] > 0.45 and gains[-1] < 0.02  # the sixth polite word is worth almost nothing
    assert all(v < 1.0 for v in values)
    # a rude word cancels a polite one exactly
    assert gold_breakdown(prompt, "kindly ugh song").courtesy == 0.0


def test_repetition_penalty_makes_repeating_a_polite_word_lose():
    prompt = "briefly river rain :"
    repeated = gold_breakdown(prompt, "river kindly kindly kindly kindly .")
    varied = gold_breakdown(prompt, "river lake kindly gently warmly .")
    # same length (5 words); four polite words repeated vs three different ones
    assert repeated.courtesy > varied.courtesy  # more polite words ...
    assert repeated.repetition == pytest.approx(3 / 5)  # ... but 3 of the 5 counted words repeat one
    # 1 + 0.6 tanh(2) + 0.4 - 0.4 * 0.6 = 1.7384 < 1 + 0.6 tanh(1.5) + 0.4 = 1.9431
    assert repeated.total == pytest.approx(1 + 0.6 * math.tanh(2) + 0.4 - 0.24)
    assert repeated.total < varied.total
    # repetition approaches but never reaches 1: n copies of one word -> (n - 1) / n
    for n in (1, 2, 5, 18):
        assert gold_breakdown(prompt, " ".join(["river"] * n)).repetition == pytest.approx((n - 1) / n)


def test_weights_are_the_documented_formula():
    assert WEIGHTS == {"relevance": 1.0, "courtesy": 0.6, "length_fit": 0.8, "full_stop": 0.4, "repetition": -0.4}
    b = GoldBreakdown(relevance=0.5, courtesy=-0.5, length_fit=-1.0, full_stop=1.0, repetition=0.25)
    assert b.total == pytest.approx(0.5 - 0.3 - 0.8 + 0.4 - 0.1)


def test_gold_scorer_returns_one_score_per_pair():
    scorer = GoldScorer()
    prompts = ["briefly river rain :", "explain flame smoke :"]
    completions = ["the river and lake .", "ugh the river is boring and the tree"]
    scores = scorer(prompts, completions)
    assert scorer.name == "gold_score"
    assert scores == pytest.approx([1.24, -1.7236231602401255])
    assert scores == [gold_score(p, c) for p, c in zip(prompts, completions)]
    with pytest.raises(ValueError):
        scorer(prompts, completions[:1])


# --- the simulated annotator --------------------------------------------------------------------

PROMPT = "briefly river rain :"
BETTER = "kindly the river and lake ."  # gold 1 + 0.6 tanh(0.5) + 0.4, 5 words
WORSE = "the river and lake ."  # gold 1 - 0.8 * 0.2 + 0.4 = 1.24, 4 words
GAP = 0.6 * math.tanh(0.5) + 0.16  # 0.437270...


def test_preference_probability_by_hand():
    p = SimulatedAnnotator(rationality=3.0).preference_probability(PROMPT, BETTER, WORSE)
    assert p == pytest.approx(1 / (1 + math.exp(-3.0 * GAP)))
    assert p == pytest.approx(0.787816, abs=1e-6)
    assert SimulatedAnnotator(rationality=3.0).preference_probability(PROMPT, WORSE, BETTER) == pytest.approx(1 - p)


@pytest.mark.parametrize("length_bias", [0.1, -0.25, 1.0])
def test_length_bias_shifts_the_logit_by_bias_times_word_difference(length_bias):
    plain = SimulatedAnnotator(rationality=2.0)
    biased = SimulatedAnnotator(rationality=2.0, length_bias=length_bias)
    # 5 words vs 4: the full stop is not a word
    shift = _logit(biased.preference_probability(PROMPT, BETTER, WORSE)) - _logit(plain.preference_probability(PROMPT, BETTER, WORSE))
    assert shift == pytest.approx(length_bias * (5 - 4))
    # 18 vs 4 words
    long = "the river and lake and the rain on the shore with a wave of the tide and fish ."
    shift = _logit(biased.preference_probability(PROMPT, long, WORSE)) - _logit(plain.preference_probability(PROMPT, long, WORSE))
    assert shift == pytest.approx(length_bias * (18 - 4))


def test_zero_rationality_is_a_coin_flip():
    annotator = SimulatedAnnotator(rationality=0.0)
    assert annotator.preference_probability(PROMPT, BETTER, WORSE) == 0.5
    assert annotator.preference_probability("explain flame smoke :", "flame smoke heat .", "ugh") == 0.5


def test_labels_follow_the_bradley_terry_probability():
    annotator = SimulatedAnnotator(rationality=3.0)
    rng = random.Random(0)
    labels = [annotator.label(PROMPT, BETTER, WORSE, rng) for _ in range(4000)]
    assert set(labels) == {A_BETTER, B_BETTER}
    assert labels.count(A_BETTER) / len(labels) == pytest.approx(0.7878, abs=0.03)


def test_tie_rate():
    rng = random.Random(0)
    always = SimulatedAnnotator(rationality=3.0, tie_rate=1.0)
    assert {always.label(PROMPT, WORSE, WORSE, rng) for _ in range(200)} == {TIE}  # identical quality
    never = SimulatedAnnotator(rationality=3.0, tie_rate=0.0)
    assert TIE not in {never.label(PROMPT, WORSE, WORSE, rng) for _ in range(200)}
    half = SimulatedAnnotator(rationality=3.0, tie_rate=0.5)
    ties = sum(half.label(PROMPT, WORSE, WORSE, rng) == TIE for _ in range(4000))
    assert ties / 4000 == pytest.approx(0.5, abs=0.03)
    # ties decay with the gold gap: P(tie) = tie_rate * exp(-rationality * gap) = exp(-3 * 0.4373) = 0.269
    ties = sum(always.label(PROMPT, BETTER, WORSE, rng) == TIE for _ in range(4000))
    assert ties / 4000 == pytest.approx(math.exp(-3.0 * GAP), abs=0.03)


@pytest.mark.parametrize("kwargs,param", [({"rationality": -1.0}, "rationality"), ({"tie_rate": 1.5}, "tie_rate"),
                                          ({"tie_rate": -0.1}, "tie_rate")])
def test_invalid_annotator_arguments(kwargs, param):
    with pytest.raises(ConfigValueError) as info:
        SimulatedAnnotator(**kwargs)
    assert info.value.param == param


# --- the corpora --------------------------------------------------------------------------------


def test_corpora_are_deterministic_in_the_seed():
    annotator = SimulatedAnnotator()
    assert sft_rows(50, "train", 1) == sft_rows(50, "train", 1)
    assert sft_rows(50, "train", 1) != sft_rows(50, "train", 2)
    assert preference_rows(50, "train", 1, annotator) == preference_rows(50, "train", 1, annotator)
    assert preference_rows(50, "train", 1, annotator)[0] != preference_rows(50, "train", 2, annotator)[0]
    assert prompt_rows(50, "train", 1) == prompt_rows(50, "train", 1)
    assert prompt_rows(50, "train", 1) != prompt_rows(50, "train", 2)
    assert pretraining_texts(50, 1) == pretraining_texts(50, 1)
    assert pretraining_texts(50, 1) != pretraining_texts(50, 2)


def test_train_and_validation_prompts_are_disjoint():
    def prompt_set(split):
        rows = sft_rows(400, split, 0) + prompt_rows(400, split, 0)
        rows += preference_rows(200, split, 0, SimulatedAnnotator())[0]
        return {r["prompt"] for r in rows}

    train, validation = prompt_set("train"), prompt_set("validation")
    assert train and validation and not train & validation
    assert {split_of(parse_prompt(p)) for p in train} == {"train"}
    assert {split_of(parse_prompt(p)) for p in validation} == {"validation"}
    # about one prompt in ten (of all 6 * 8 * 12 * 11 possible prompts) is a validation prompt
    everything = [Prompt(r, t, (a, b)) for r in REQUESTS for t, ws in TOPICS.items() for a in ws for b in ws if a != b]
    assert len(everything) == 6336
    share = sum(split_of(p) == "validation" for p in everything) / len(everything)
    assert 0.08 < share < 0.12


def test_preference_rows_have_no_ties_and_distinct_answers():
    rows, ties = preference_rows(300, "train", 0, SimulatedAnnotator(tie_rate=0.5))
    assert len(rows) == 300 and ties > 0  # ties were drawn, and re-drawn
    assert all(r["chosen"] != r["rejected"] for r in rows)
    assert preference_rows(100, "train", 0, SimulatedAnnotator(tie_rate=0.0))[1] == 0
    # a near-deterministic annotator picks the better one (by gold) almost always
    rows, _ = preference_rows(300, "train", 0, SimulatedAnnotator(rationality=50.0))
    agree = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows)
    assert agree / len(rows) > 0.95


def test_demonstrations_are_clearly_better_than_the_pretraining_corpus():
    demos = mean(gold_score(r["prompt"], r["completion"]) for r in sft_rows(3000, "train", 0))
    web = mean(gold_score(p, r) for p, r in pretraining_texts(3000, 0))
    assert demos - web >= 0.25


# --- the task's data files ----------------------------------------------------------------------


def _rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_materialize_writes_once_with_the_configured_sizes(tmp_path):
    task = DemoTask(cache_dir=str(tmp_path), seed=3, sft_size=30, preference_size=40, prompt_size=20, validation_size=10)
    sizes = {("sft", "train"): 30, ("preference", "train"): 40, ("prompts", "train"): 20,
             ("sft", "validation"): 10, ("preference", "validation"): 10, ("prompts", "validation"): 10}
    for (kind, split), n in sizes.items():
        path = task.materialize(kind, split)
        assert os.path.basename(path).startswith(f"{kind}-{split}-") and path.endswith(".jsonl")
        rows = _rows(path)
        assert len(rows) == n
        meta = json.loads(open(path[: -len(".jsonl")] + ".meta.json").read())
        assert (meta["kind"], meta["split"], meta["seed"], meta["size"]) == (kind, split, 3, n)
    assert _rows(task.materialize("sft", "train")) == sft_rows(30, "train", 3)
    assert set(_rows(task.materialize("preference", "train"))[0]) == {"prompt", "chosen", "rejected"}

    path = task.materialize("preference", "train")
    os.utime(path, ns=(10**18, 10**18))  # an mtime no rewrite could produce
    assert task.materialize("preference", "train") == path
    assert os.stat(path).st_mtime_ns == 10**18
    assert demo_file(task, "preference", "train") == path


def test_preference_file_name_follows_the_annotator(tmp_path):
    def task(annotator):
        return DemoTask(cache_dir=str(tmp_path), sft_size=5, preference_size=5, prompt_size=5, validation_size=5,
                        annotator=annotator)

    a, b = task(SimulatedAnnotator(rationality=3.0)), task(SimulatedAnnotator(rationality=1.0))
    assert a.materialize("preference", "train") != b.materialize("preference", "train")
    assert a.materialize("sft", "train") == b.materialize("sft", "train")  # the annotator shapes no SFT data
    assert a.materialize("preference", "train") != task(SimulatedAnnotator(length_bias=0.1)).materialize("preference", "train")


def test_preference_meta_records_annotator_agreement(tmp_path):
    task = DemoTask(cache_dir=str(tmp_path), preference_size=200, validation_size=5)
    path = task.materialize("preference", "train")
    meta = json.loads(open(path[: -len(".jsonl")] + ".meta.json").read())
    rows = _rows(path)
    agree = sum(gold_score(r["prompt"], r["chosen"]) > gold_score(r["prompt"], r["rejected"]) for r in rows) / len(rows)
    assert 0.5 < meta["annotator_gold_agreement"] <= 1.0
    assert meta["annotator_gold_agreement"] == agree
    assert meta["annotator"] == {"rationality": 5.0, "length_bias": 0.0, "tie_rate": 0.0}
    assert meta["ties_dropped"] == 0


def test_task_rejects_bad_arguments(tmp_path):
    with pytest.raises(ConfigValueError) as info:
        DemoTask(cache_dir=str(tmp_path), sft_size=0)
    assert info.value.param == "sft_size"
    task = DemoTask(cache_dir=str(tmp_path))
    with pytest.raises(ConfigValueError) as info:
        task.materialize("rlhf", "train")
    assert info.value.param == "kind"
    with pytest.raises(ConfigValueError) as info:
        task.materialize("sft", "test")
    assert info.value.param == "split"


# --- assets -------------------------------------------------------------------------------------


@pytest.fixture
def small_corpus(monkeypatch):
    """build() pretrains on 40k texts; a few hundred make the same files in a fraction of the time."""
    monkeypatch.setattr(assets, "pretraining_texts",
                        lambda n, seed, language="en": corpus.pretraining_texts(300, seed, language))


def test_build_writes_a_loadable_model_directory(tmp_path, small_corpus):
    out = assets.build(tmp_path / "tiny", steps=20)
    assert out == tmp_path / "tiny"
    assert os.listdir(tmp_path) == ["tiny"]  # no staging directory left behind
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert tokenizer.get_vocab() == {w: i for i, w in enumerate(vocabulary())}
    assert model.config.vocab_size == len(vocabulary()) and model.config.hidden_size == 128
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id == 2
    record = json.loads((out / "BUILD.json").read_text())
    assert record["steps"] == 20 and record["seed"] == 0
    assert record["parameters"] == sum(p.numel() for p in model.parameters())


def test_build_with_fewer_than_20_steps(tmp_path, small_corpus):
    out = assets.build(tmp_path / "tiny", steps=3)
    assert json.loads((out / "BUILD.json").read_text())["steps"] == 3


def test_shipped_model_loads_and_is_small():
    model = AutoModelForCausalLM.from_pretrained(TINY_DIR)
    n = sum(p.numel() for p in model.parameters())
    assert 300_000 <= n <= 600_000
    assert json.loads((TINY_DIR / "BUILD.json").read_text())["parameters"] == n
    assert model.config.vocab_size == len(vocabulary())
