"""Annotator personas: each bias by hand, flips and position measured over many draws, the pool's turns,
the demo's cached file names kept, the `annotator=` config group, and the persona report."""

from __future__ import annotations

import hashlib
import json
import math
import random
import subprocess
import sys
from itertools import islice

import pytest
from conftest import CONF, ROOT, compose, train_cli

from lightrlhf.demo.annotator import (
    A_BETTER,
    B_BETTER,
    TIE,
    PersonaPool,
    SimulatedAnnotator,
    load_persona,
    main,
    persona_stats,
    random_pairs,
    shipped_personas,
)
from lightrlhf.demo.corpus import judged_pairs
from lightrlhf.demo.gold import gold_score
from lightrlhf.demo.task import DemoTask
from lightrlhf.errors import ConfigValueError
from lightrlhf.launch.build import build
from lightrlhf.launch.run import to_plain

PROMPT = "briefly river rain :"
BETTER = "kindly the river and lake ."  # gold 1 + 0.6 tanh(0.5) + 0.4, 5 words
WORSE = "the river and lake ."  # gold 1 - 0.8 * 0.2 + 0.4 = 1.24, 4 words
GAP = 0.6 * math.tanh(0.5) + 0.16  # gold(BETTER) - gold(WORSE) = 0.437270...
PERSONAS = ["default", "careless", "length_biased", "noisy", "pool", "position_biased"]  # the default first


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --- each bias by hand --------------------------------------------------------------------------


def test_the_default_persona_is_todays_bradley_terry_to_the_last_bit():
    p = SimulatedAnnotator().preference_probability(PROMPT, BETTER, WORSE)
    assert p == 1.0 / (1.0 + math.exp(-5.0 * (gold_score(PROMPT, BETTER) - gold_score(PROMPT, WORSE))))


def test_position_bias_adds_its_logit_for_the_first_shown_answer():
    annotator = SimulatedAnnotator(rationality=3.0, position_bias=1.0)
    # sigmoid(3 * 0.437270 + 1) = sigmoid(2.311811) = 0.909850
    assert annotator.preference_probability(PROMPT, BETTER, WORSE) == pytest.approx(0.909850, abs=1e-6)
    # shown second, the better answer loses the bias: sigmoid(-1.311811 + 1) = 0.422673
    assert annotator.preference_probability(PROMPT, WORSE, BETTER) == pytest.approx(0.422673, abs=1e-6)
    # two equally good answers: the first wins sigmoid(1) = 0.731059 of the time
    assert annotator.preference_probability(PROMPT, WORSE, WORSE) == pytest.approx(0.731059, abs=1e-6)


def test_flips_mix_the_bradley_terry_probability_with_its_complement():
    # (1 - 0.25) * 0.787816 + 0.25 * 0.212184 = 0.643908
    p = SimulatedAnnotator(rationality=3.0, flip_rate=0.25).preference_probability(PROMPT, BETTER, WORSE)
    assert p == pytest.approx(0.643908, abs=1e-6)
    assert p == pytest.approx(0.75 * sigmoid(3.0 * GAP) + 0.25 * sigmoid(-3.0 * GAP))
    # flipping every label inverts the preference; half the labels, a coin
    assert SimulatedAnnotator(rationality=3.0, flip_rate=1.0).preference_probability(PROMPT, BETTER, WORSE) == \
        pytest.approx(sigmoid(-3.0 * GAP))
    assert SimulatedAnnotator(rationality=3.0, flip_rate=0.5).preference_probability(PROMPT, BETTER, WORSE) == 0.5


def test_every_bias_at_once():
    annotator = SimulatedAnnotator(rationality=2.0, length_bias=0.5, position_bias=-0.5, flip_rate=0.1)
    # logit = 2 * 0.437270 + 0.5 * (5 - 4) - 0.5 = 0.874541; sigmoid = 0.705690; 0.9 * 0.705690 + 0.1 * 0.294310
    assert annotator.preference_probability(PROMPT, BETTER, WORSE) == pytest.approx(0.664552, abs=1e-6)


def test_a_pool_is_the_mean_of_its_members():
    coin, sharp = SimulatedAnnotator(rationality=0.0, name="coin"), SimulatedAnnotator(rationality=3.0, name="sharp")
    pool = PersonaPool([coin, sharp])
    # (0.5 + 0.787816) / 2 = 0.643908: half coin-flippers is, in probability, a 25% flip rate
    assert pool.preference_probability(PROMPT, BETTER, WORSE) == pytest.approx(0.643908, abs=1e-6)
    assert pool.members == (coin, sharp)


# --- measured over many draws ---------------------------------------------------------------------


def test_the_measured_flip_rate():
    # at rationality 50 the Bradley-Terry draw picks BETTER with probability 1 - 3e-10: every B is a flip
    annotator, rng = SimulatedAnnotator(rationality=50.0, flip_rate=0.25), random.Random(0)
    labels = [annotator.label(PROMPT, BETTER, WORSE, rng) for _ in range(20000)]
    assert labels.count(B_BETTER) / len(labels) == pytest.approx(0.25, abs=0.015)  # 5 standard errors
    assert set(labels) == {A_BETTER, B_BETTER}


def test_a_tie_is_never_flipped():
    annotator, rng = SimulatedAnnotator(rationality=3.0, tie_rate=1.0, flip_rate=1.0), random.Random(0)
    assert {annotator.label(PROMPT, WORSE, WORSE, rng) for _ in range(200)} == {TIE}


def test_the_measured_first_position_rate():
    annotator, rng = SimulatedAnnotator(position_bias=1.0), random.Random(0)
    labels = [annotator.label(PROMPT, WORSE, WORSE, rng) for _ in range(20000)]
    assert labels.count(A_BETTER) / len(labels) == pytest.approx(sigmoid(1.0), abs=0.015)


def test_the_demo_shows_no_better_answer_first_so_position_is_not_quality():
    """a and b are two independent demonstrations: the first is better about half the time, so a
    persona's first-position rate measures its bias, not the data's order."""
    pairs = list(islice(judged_pairs("train", 0, SimulatedAnnotator()), 2000))
    first_better = sum(gold_score(p, a) > gold_score(p, b) for p, a, b, _ in pairs) / len(pairs)
    assert first_better == pytest.approx(0.5, abs=0.035)
    first_chosen = sum(v == A_BETTER for *_, v in pairs) / len(pairs)
    assert first_chosen == pytest.approx(0.5, abs=0.035)
    biased = [v for *_, v in islice(judged_pairs("train", 0, SimulatedAnnotator(position_bias=1.0)), 2000)]
    assert biased.count(A_BETTER) / len(biased) > first_chosen + 0.04


def test_flips_and_position_change_labels_not_pairs():
    """One uniform per judgement whatever the settings: the demo generates the same pairs for every
    persona without ties, and only the verdicts differ."""
    plain = list(islice(judged_pairs("train", 0, SimulatedAnnotator()), 300))
    noisy = list(islice(judged_pairs("train", 0, SimulatedAnnotator(flip_rate=0.25, position_bias=0.5)), 300))
    assert [row[:3] for row in plain] == [row[:3] for row in noisy]
    assert sum(a[3] != b[3] for a, b in zip(plain, noisy)) > 30


# --- the pool's turns -----------------------------------------------------------------------------


def test_the_pool_member_is_drawn_from_the_rng_so_a_pair_id_fixes_it():
    coin, sharp = SimulatedAnnotator(rationality=0.0, name="coin"), SimulatedAnnotator(rationality=50.0, name="sharp")
    pool = PersonaPool([coin, sharp])
    judge = lambda id: random.Random(f"0:{id}")  # noqa: E731  (as stage=label seeds one judgement per pair id)
    labels = [pool.label(PROMPT, WORSE, BETTER, judge(f"p{i}")) for i in range(400)]
    assert labels == [pool.label(PROMPT, WORSE, BETTER, judge(f"p{i}")) for i in range(400)]
    members = [pool.member_for(judge(f"p{i}")).name for i in range(400)]
    assert members.count("coin") / 400 == pytest.approx(0.5, abs=0.08)
    for i in range(50):  # the pool's label is its member's, on the same rng after the draw of the member
        rng = judge(f"p{i}")
        member = pool.member_for(rng)
        assert pool.label(PROMPT, WORSE, BETTER, judge(f"p{i}")) == member.label(PROMPT, WORSE, BETTER, rng)
    # the sharp member always prefers BETTER (shown second); the coin, half the time
    assert all(label == B_BETTER for label, member in zip(labels, members) if member == "sharp")
    coin_labels = [label for label, member in zip(labels, members) if member == "coin"]
    assert coin_labels.count(A_BETTER) / len(coin_labels) == pytest.approx(0.5, abs=0.12)


@pytest.mark.parametrize("make,param", [
    (lambda: SimulatedAnnotator(flip_rate=1.5), "flip_rate"), (lambda: SimulatedAnnotator(flip_rate=-0.1), "flip_rate"),
    (lambda: SimulatedAnnotator(name=" "), "name"), (lambda: PersonaPool([]), "members")])
def test_invalid_persona_arguments(make, param):
    with pytest.raises(ConfigValueError) as info:
        make()
    assert info.value.param == param


# --- the demo's cached files ----------------------------------------------------------------------

# the names the default annotator's preference files had before the personas (sha256 of their shape)
DEFAULT_FILES = {("en", "train"): "preference-train-afe578809ac3.jsonl",
                 ("en", "validation"): "preference-validation-22ded1e899dd.jsonl",
                 ("zh", "train"): "preference-train-b30a43f46bf3.jsonl",
                 ("zh", "validation"): "preference-validation-d259d954899c.jsonl"}


@pytest.mark.parametrize("language,split", sorted(DEFAULT_FILES))
def test_the_default_annotators_file_names_are_unchanged(tmp_path, language, split):
    expected = tmp_path / "demo" / DEFAULT_FILES[language, split]
    expected.parent.mkdir()
    expected.touch()  # a file of that name is found and not written again: any other name would be written
    assert DemoTask(cache_dir=str(tmp_path), language=language).materialize("preference", split) == str(expected)
    assert sorted(p.name for p in expected.parent.iterdir()) == [expected.name]
    composed = build(to_plain(compose(["annotator=default"], tmp_path))["demo"], "demo")
    assert composed.annotator == SimulatedAnnotator()


def test_the_default_annotators_rows_are_unchanged(tmp_path):
    path = DemoTask(cache_dir=str(tmp_path)).materialize("preference", "validation")
    with open(path, "rb") as f:  # the file as the demo wrote it before the personas
        assert hashlib.sha256(f.read()).hexdigest()[:16] == "190e85d2b5e93b6a"
    meta = json.loads(open(path[: -len(".jsonl")] + ".meta.json").read())
    assert meta["annotator"] == {"rationality": 5.0, "length_bias": 0.0, "tie_rate": 0.0}


def test_the_file_name_follows_what_shapes_the_labels_not_the_name(tmp_path):
    def path(annotator):
        return DemoTask(cache_dir=str(tmp_path), preference_size=5, validation_size=5,
                        annotator=annotator).materialize("preference", "train")

    default = path(SimulatedAnnotator())
    assert path(SimulatedAnnotator(name="someone")) == default
    assert path(SimulatedAnnotator(flip_rate=0.25)) != default
    assert path(SimulatedAnnotator(position_bias=1.0)) != default
    assert path(PersonaPool([SimulatedAnnotator()])) != default  # the pool draws a member: other labels
    assert SimulatedAnnotator(flip_rate=0.25, name="x").shape() == {
        "rationality": 5.0, "length_bias": 0.0, "tie_rate": 0.0, "flip_rate": 0.25}


# --- the config group -----------------------------------------------------------------------------


def test_every_persona_is_shipped():
    assert shipped_personas() == PERSONAS


@pytest.mark.parametrize("persona", PERSONAS)
@pytest.mark.parametrize("demo", ["default", "zh"])
def test_annotator_sets_demo_annotator(tmp_path, persona, demo):
    plain = to_plain(compose([f"annotator={persona}", f"demo={demo}"], tmp_path))
    task = build(plain["demo"], "demo")
    assert task.language == {"default": "en", "zh": "zh"}[demo]
    assert task.annotator == load_persona(persona)  # the report reads the same file
    assert task.annotator.name == persona


def test_the_shipped_personas_do_what_their_names_say():
    default, personas = SimulatedAnnotator(), {name: load_persona(name) for name in PERSONAS}
    assert personas["default"] == default
    assert personas["noisy"] == SimulatedAnnotator(flip_rate=0.25, name="noisy")
    assert personas["length_biased"].length_bias > 0 and personas["position_biased"].position_bias > 0
    assert personas["careless"].rationality < default.rationality
    assert len(personas["pool"].members) >= 3


def test_stage_label_labels_with_the_chosen_persona(tmp_path):
    candidates = ROOT / "tests" / "fixtures" / "data" / "candidates_demo.jsonl"
    plain = to_plain(compose(["stage=label", f"stage.candidates={candidates}", "annotator=pool"], tmp_path))
    assert build(plain["stage"]["annotator"], "stage.annotator") == load_persona("pool")


@pytest.mark.parametrize("override,expected", [
    ("demo.annotator.flip_rate=1.5", "annotator.flip_rate: must be in [0.0, 1.0], got 1.5"),
    ("annotator=nosiy", "Could not find 'annotator/nosiy'")])
def test_a_wrong_persona_value_is_one_line_and_exit_2(tmp_path, override, expected):
    done = train_cli(["stage=rm", "data=demo_pref", "annotator=noisy", override, f"hydra.run.dir={tmp_path}"], timeout=300)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: config") and expected in lines[0], done.stderr


def test_the_demo_pipeline_runs_every_step_with_the_chosen_persona(tmp_path):
    from hydra import initialize_config_dir
    from test_launch_layout import _composed, _without_training

    from lightrlhf.launch.pipeline import run_pipeline

    run_dir, seen = tmp_path / "demo", {}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg, overrides, choices = _composed(["annotator=noisy", "demo=zh", f"paths.output_dir={run_dir}"])
        run_pipeline(cfg, run_dir, overrides, choices, "train", run_step=_without_training(seen))
    steps = [seen[name][0] for name in ("sft", "rm", "ppo")]
    assert all(c.demo.language == "zh" for c in steps)
    assert all(c.demo.annotator.flip_rate == 0.25 for c in steps)


# --- the report -----------------------------------------------------------------------------------


def test_the_held_out_agreement_is_the_validation_files_own(tmp_path):
    pairs = random_pairs(50)
    for name in ("default", "noisy", "pool"):
        annotator = load_persona(name)
        path = DemoTask(cache_dir=str(tmp_path), preference_size=5, annotator=annotator).materialize(
            "preference", "validation")
        meta = json.loads(open(path[: -len(".jsonl")] + ".meta.json").read())
        stats = persona_stats(name, annotator, pairs)
        assert stats.held_out_agreement == meta["annotator_gold_agreement"]
        assert stats.tie_rate == meta["ties_dropped"] / (meta["ties_dropped"] + 512)


def test_the_report_table(capsys):
    main(["report", "--pairs", "400"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("| persona | gold agreement, held-out (512) | gold agreement, random pairs (400) |")
    columns = ("held_out", "random", "ties", "first", "length")
    by_name = {cells[0].strip("`"): dict(zip(columns, (float(c.rstrip("%")) for c in cells[1:])))
               for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines[2:])}
    assert list(by_name) == PERSONAS
    assert by_name["default"]["held_out"] > 85 and by_name["default"]["ties"] == 0
    assert by_name["noisy"]["held_out"] < by_name["default"]["held_out"] - 10  # a quarter flipped
    assert by_name["careless"]["held_out"] < by_name["default"]["held_out"] - 10 and by_name["careless"]["ties"] > 0
    assert by_name["length_biased"]["length"] > by_name["default"]["length"] + 1  # chooses the longer
    assert by_name["position_biased"]["first"] > by_name["default"]["first"] + 4  # chooses the first shown
    assert all(45 < by_name[name]["first"] < 55 for name in PERSONAS if name != "position_biased")


def test_the_report_of_an_unknown_persona_is_one_line_and_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        main(["report", "--personas", "default", "nope"])
    assert info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --personas: no persona 'nope'") and "noisy" in err[0]


def test_the_report_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "lightrlhf.demo.annotator", "report", "--personas", "default", "pool",
                           "--pairs", "20", "--held-out", "30"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 4 and "| `pool` |" in done.stdout and "(30)" in done.stdout
    assert "Warning" not in done.stderr
