"""Simulated annotators that label response pairs by a Bradley-Terry draw on the hidden gold score.

One persona (`SimulatedAnnotator`) judges "a" (shown first) against "b":

    logit  = rationality * (gold_a - gold_b) + length_bias * (words_a - words_b) + position_bias
    P(tie) = tie_rate * exp(-rationality * |gold_a - gold_b|)            (asked first; a tie stays a tie)
    P(a)   = (1 - flip_rate) * sigmoid(logit) + flip_rate * (1 - sigmoid(logit))   (given no tie)

- `rationality` is the inverse temperature of the choice (Bradley & Terry 1952; the Boltzmann-rational
  model of Christiano et al. 2017): 0 is a coin flip, large values always pick the better answer.
- `length_bias` adds a preference per extra word that has nothing to do with quality, the way human
  raters favour longer answers (Singhal et al. 2023, "A Long Way to Go"); it provokes length hacking.
- `position_bias` is a logit in favour of the first-shown answer, the order effect found in LLM
  judges (Zheng et al. 2023, "Judging LLM-as-a-judge"; Wang et al. 2023, "Large language models are
  not fair evaluators"). The demo shows `a` first; its comparisons draw a and b independently from
  the same writers, so the first-shown answer is no better on average and the bias is not confounded
  with quality.
- `flip_rate`: after the Bradley-Terry draw the label is inverted with this probability, the label
  noise AlpacaFarm adds to its simulated annotators (25%; Dubois et al. 2023).
- `tie_rate` is the chance of answering "tie" for two equally good answers, decaying with the gap.

A `PersonaPool` is several personas labelling pairs in turn, AlpacaFarm's pool of simulated
annotators: each pair goes to one member drawn from the judgement's rng, so

    P_pool(a) = (1 / M) * sum_m P_m(a)

`python -m lightrlhf.demo.annotator report` tabulates the shipped personas (conf/annotator/).
"""

from __future__ import annotations

import argparse
import math
import random
import sys
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from lightrlhf.demo.gold import gold_score, word_count
from lightrlhf.validation import in_range, non_negative, require

A_BETTER, B_BETTER, TIE = "a", "b", "tie"
# the fields the first cached demo files were named by: always part of an annotator's shape
_ORIGINAL_FIELDS = ("rationality", "length_bias", "tie_rate")


@dataclass(frozen=True)
class SimulatedAnnotator:
    """One persona; see the module docstring for its formula. `name` only labels it in reports."""

    rationality: float = 5.0
    length_bias: float = 0.0
    tie_rate: float = 0.0
    position_bias: float = 0.0
    flip_rate: float = 0.0
    name: str = "default"

    def __post_init__(self) -> None:
        non_negative("rationality", self.rationality)
        in_range("tie_rate", self.tie_rate, 0.0, 1.0)
        in_range("flip_rate", self.flip_rate, 0.0, 1.0)
        require(bool(str(self.name).strip()), "name", "must be a non-empty name")

    def shape(self) -> dict[str, Any]:
        """What shapes its labels, for the demo's cache-file names: a field added later appears only
        when it differs from its default, so the files of an annotator that leaves it alone keep their
        names (and the name, which shapes no label, never appears)."""
        values = asdict(self)
        out = {k: values[k] for k in _ORIGINAL_FIELDS}
        for f in fields(self):
            if f.name not in _ORIGINAL_FIELDS and f.name != "name" and values[f.name] != f.default:
                out[f.name] = values[f.name]
        return out

    def preference_probability(self, prompt: str, a: str, b: str) -> float:
        """P(a is preferred over b), given no tie: the Bradley-Terry probability, then the flips."""
        logit = self.rationality * (gold_score(prompt, a) - gold_score(prompt, b))
        logit += self.length_bias * (word_count(a) - word_count(b))
        logit += self.position_bias
        p = 1.0 / (1.0 + math.exp(-logit))
        # detail: with flip_rate 0 this is p to the last bit, so the default's labels are unchanged
        return (1.0 - self.flip_rate) * p + self.flip_rate * (1.0 - p)

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> str:
        """One noisy judgement: "a", "b" or "tie".

        detail: the flip is not drawn apart: one uniform against P(a) with the flips folded in has the
        same distribution, and every persona then takes the same two draws per pair (one when it
        answers "tie"), so the demo generates the same pairs whatever the flip or position settings."""
        gap = abs(gold_score(prompt, a) - gold_score(prompt, b))
        if rng.random() < self.tie_rate * math.exp(-self.rationality * gap):
            return TIE
        return A_BETTER if rng.random() < self.preference_probability(prompt, a, b) else B_BETTER


@dataclass(frozen=True)
class PersonaPool:
    """Personas that label pairs in turn (AlpacaFarm's annotator pool, Dubois et al. 2023): each
    judgement goes to the member `rng` draws, uniformly, so a pair's labeller is fixed by the rng the
    caller seeds for it (stage=label: one per pair id). P(a) = the members' mean P(a)."""

    members: tuple[SimulatedAnnotator, ...]
    name: str = "pool"

    def __post_init__(self) -> None:
        object.__setattr__(self, "members", tuple(self.members))  # a list from Python or YAML
        require(len(self.members) > 0, "members", "needs at least one persona")
        require(bool(str(self.name).strip()), "name", "must be a non-empty name")

    def shape(self) -> dict[str, Any]:
        return {"pool": [member.shape() for member in self.members]}

    def preference_probability(self, prompt: str, a: str, b: str) -> float:
        return sum(m.preference_probability(prompt, a, b) for m in self.members) / len(self.members)

    def label(self, prompt: str, a: str, b: str, rng: random.Random) -> str:
        return self.member_for(rng).label(prompt, a, b, rng)

    def member_for(self, rng: random.Random) -> SimulatedAnnotator:
        return self.members[rng.randrange(len(self.members))]


Annotator = SimulatedAnnotator | PersonaPool


# --- the persona report ---------------------------------------------------------------------------

CONF_DIR = Path(__file__).resolve().parents[3] / "conf" / "annotator"  # in a source checkout


@dataclass(frozen=True)
class PersonaStats:
    name: str
    held_out_agreement: float  # share of the held-out rows whose chosen answer has the higher gold score
    random_agreement: float  # the same on random pairs from every kind of writer
    tie_rate: float  # share of judgements that were "tie" (the demo re-draws those pairs)
    first_chosen: float  # share of held-out a/b labels that chose the first-shown answer
    length_difference: float  # mean words(chosen) - words(rejected) over the held-out rows


def shipped_personas() -> list[str]:
    """conf/annotator/'s personas, the default first."""
    return sorted((p.stem for p in CONF_DIR.glob("*.yaml")), key=lambda name: (name != "default", name))


def load_persona(name: str) -> Annotator:
    """The annotator conf/annotator/<name>.yaml configures, built as train.py builds it."""
    from omegaconf import OmegaConf

    from lightrlhf.errors import UserError
    from lightrlhf.launch.build import build

    path = CONF_DIR / f"{name}.yaml"
    if not path.is_file():
        raise UserError(f"--personas: no persona {name!r} in {CONF_DIR} (shipped: {', '.join(shipped_personas())})")
    node = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return build(node, "demo.annotator")


def random_pairs(n: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """n (prompt, a, b) pairs from the whole population of writers (the base model's "web", 10% word
    salad): wider gaps in quality than the demo's comparisons of two demonstrations."""
    from lightrlhf.demo.corpus import word_salad
    from lightrlhf.demo.language import sample_prompt, sample_style, write_response

    rng = random.Random(f"annotator-report-pairs-{seed}")
    out = []
    while len(out) < n:
        prompt = sample_prompt(rng)
        a, b = (word_salad(rng) if rng.random() < 0.1 else write_response(prompt, sample_style(rng), rng)
                for _ in range(2))
        if a != b:
            out.append((prompt.text, a, b))
    return out


def demo_held_out() -> tuple[int, int]:
    """(seed, validation_size) of the default demo task (conf/demo/default.yaml states the same)."""
    from lightrlhf.demo.task import DemoTask

    defaults = {f.name: f.default for f in fields(DemoTask)}
    return defaults["seed"], defaults["validation_size"]


def persona_stats(name: str, annotator: Annotator, pairs: list[tuple[str, str, str]],
                  held_out: int | None = None, seed: int | None = None) -> PersonaStats:
    """The persona on the demo's held-out comparisons -- exactly the rows of the validation file it
    would generate (demo seed `seed`, `held_out` rows; by default the demo's) -- and on `pairs`,
    judged with one rng for all personas."""
    from lightrlhf.demo.corpus import judged_pairs

    default_seed, default_size = demo_held_out()
    seed = default_seed if seed is None else seed
    held_out = default_size if held_out is None else held_out

    rows, ties, first = [], 0, 0
    for prompt, a, b, verdict in judged_pairs("validation", seed, annotator):
        if verdict == TIE:  # the demo re-draws the pair
            ties += 1
            continue
        first += verdict == A_BETTER
        rows.append((prompt, a, b) if verdict == A_BETTER else (prompt, b, a))
        if len(rows) == held_out:
            break
    judge = random.Random(f"annotator-report-labels-{seed}")
    verdicts = [annotator.label(prompt, a, b, judge) for prompt, a, b in pairs]
    decided = [(p, a, b) if v == A_BETTER else (p, b, a) for (p, a, b), v in zip(pairs, verdicts) if v != TIE]
    return PersonaStats(
        name=name, held_out_agreement=_agreement(rows), random_agreement=_agreement(decided),
        tie_rate=ties / (ties + len(rows)), first_chosen=first / len(rows),
        length_difference=sum(word_count(c) - word_count(r) for _, c, r in rows) / len(rows))


def _agreement(rows: list[tuple[str, str, str]]) -> float:
    """Share of (prompt, chosen, rejected) whose chosen has the higher gold score (as the demo's file
    meta counts it: a pair equal in gold counts as a disagreement)."""
    return sum(gold_score(p, c) > gold_score(p, r) for p, c, r in rows) / len(rows) if rows else float("nan")


def persona_table(stats: list[PersonaStats], held_out: int, pairs: int) -> str:
    from lightrlhf.training.reporting import markdown_table

    head = ["persona", f"gold agreement, held-out ({held_out})", f"gold agreement, random pairs ({pairs})",
            "ties", "first shown chosen", "words chosen - rejected"]
    return markdown_table(head, [[f"`{s.name}`", f"{s.held_out_agreement:.1%}", f"{s.random_agreement:.1%}",
                                  f"{s.tie_rate:.1%}", f"{s.first_chosen:.1%}", f"{s.length_difference:+.2f}"]
                                 for s in stats])


def main(argv: list[str] | None = None) -> None:
    """python -m lightrlhf.demo.annotator report [--personas NAME ...] [--pairs N]"""
    from lightrlhf.errors import UserError
    from lightrlhf.launch.cli import exit_for_user_error

    ap = argparse.ArgumentParser(prog="python -m lightrlhf.demo.annotator",
                                 description="The shipped annotator personas (conf/annotator/) against the gold "
                                             "score: a markdown table on stdout.")
    commands = ap.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="agreement with gold, ties, position and length of each persona")
    report.add_argument("--personas", nargs="+", default=None, help="persona names (default: every shipped one)")
    report.add_argument("--pairs", type=int, default=4000, help="random pairs each persona judges (default 4000)")
    report.add_argument("--held-out", type=int, default=demo_held_out()[1],
                        help="held-out comparisons (default: as many as the demo's validation file)")
    args = ap.parse_args(argv)
    try:
        if args.pairs < 1 or args.held_out < 1:
            raise UserError("--pairs and --held-out must be at least 1")
        names = args.personas or shipped_personas()
        personas = {name: load_persona(name) for name in names}
    except UserError as error:
        exit_for_user_error(error)
    pairs = random_pairs(args.pairs)
    stats = [persona_stats(name, annotator, pairs, args.held_out) for name, annotator in personas.items()]
    print(persona_table(stats, args.held_out, args.pairs))


if __name__ == "__main__":
    # the importable module's classes, not this __main__ copy's (corpus.py imports that one)
    from lightrlhf.demo.annotator import main as module_main

    module_main(sys.argv[1:])
