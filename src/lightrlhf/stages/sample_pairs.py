"""Candidate pairs for people to label: sample k answers per prompt, choose which pairs to ask about.

A stage that trains nothing (`stage=sample_pairs`, the `SamplingStage` contract), built like best-of-n:
the policy export as `policy.init`, prompts as `data`, and the reward-model ensemble that guides the
choice as `stage.reward_model` (an export of `stage=rm stage.ensemble=K`; none for `random`).

    step 1. sample   k responses to each of `num_prompts` prompts (the training split from
                     `first_prompt` on), seeded; or read them back from an earlier run's pool.jsonl
    step 2. score    each response by every member of the ensemble (the scorer's member scores, on
                     the text, tokenized as the reward model was trained)
    step 3. choose   every pair of a prompt's distinct answers gets the selection rule's score
                     (rl/selection.py: random, disagreement, ucb); each prompt offers its best
                     `pairs_per_prompt`, and the `budget` best of those are asked, best first
    step 4. write    candidates.jsonl in the labelling server's format (lightrlhf.feedback):
                     {id, prompt, a, b, policy, selection, score, meta}

Outputs in the run directory: pool.jsonl (every sampled answer, so another rule can choose from
the very same answers: `stage.pool=<run>/pool.jsonl`), candidates.jsonl, selection.json (what
metrics.json reports). Pairs already asked (`stage.exclude`: earlier candidates files) are not
asked again. With the demo's gold scorer the metrics also say how far apart in gold the chosen
pairs are (`pairs/gold_gap_mean`): a rule that picks near-ties asks questions whose answers are
mostly noise; and, given a reward model, how often its ensemble mean orders the pool's pairs as gold
does (`pairs/gold_accuracy_pool`): the reward model's gold accuracy on the policy's own answers, which
a pool of held-out prompts (`data.path.split=validation` on the demo) measures without training.

Resuming (`resume=`, or a pipeline killed here): the outputs are written pool, selection,
candidates, each atomically; a run that finds its candidates.jsonl returns what it recorded instead
of sampling again, so a label already given to a candidate always refers to the same pair.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from lightrlhf.data.modules import PromptDataModule, right_pad
from lightrlhf.data.tokenize import encode_prompt, encode_response, prompt_text
from lightrlhf.errors import ConfigError, DataError, UserError
from lightrlhf.io import atomic_write_text
from lightrlhf.models.actor_critic import ActorCritic, PolicySpec, load_actor_critic
from lightrlhf.models.spec import ModelSpec
from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rewards.spec import NormalizeSpec, RewardSpec
from lightrlhf.rl.ensemble import ensemble_mean_std
from lightrlhf.rl.selection import RULES, disagreement_scores, pair_index, pair_scores, select_pairs
from lightrlhf.rollouts.rollout import sample_responses
from lightrlhf.rollouts.specs import GenerationSpec
from lightrlhf.validation import non_negative, one_of, positive, require

log = logging.getLogger(__name__)
CANDIDATES_FILE, POOL_FILE, SELECTION_FILE = "candidates.jsonl", "pool.jsonl", "selection.json"


@dataclass
class TextSamples:
    """Responses as the scorer reads them, tokenized from their text (prompt, response, EOS)."""

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    prompts: list[str]
    raw_prompts: list
    texts: list[str]


def text_samples(tokenizer, raw_prompts: list, texts: list[str]) -> TextSamples:
    rows = [encode_prompt(tokenizer, p) + encode_response(tokenizer, t) for p, t in zip(raw_prompts, texts, strict=True)]
    ids, mask = right_pad(rows, tokenizer.pad_token_id)
    return TextSamples(ids, mask, [prompt_text(tokenizer, p) for p in raw_prompts], list(raw_prompts), list(texts))


def load_sampler(spec: ModelSpec, tokenizer, policy: PolicySpec, reward_model: str | None = None) -> ActorCritic:
    """Config target: the policy, and the reward model's members as adapters on its base when they
    share it (else loaded beside it); no value function."""
    reward = None if reward_model is None else RewardSpec(path=reward_model)
    return load_actor_critic(spec, tokenizer, policy, reward, critic=False)


class SamplePairs:
    """See module docstring. `k`: answers per prompt (pairs per prompt: k(k-1)/2); `ucb_c`: c of
    mean + c * std; `id_prefix`: prepended to every candidate id (one per round of a loop, so ids
    stay unique across its files); `batch_size`: prompts per generate call (k rows each)."""

    resumable = True  # a rerun reuses what the killed one finished (module docstring)

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule,
                 selection: Literal["random", "disagreement", "ucb"] = "random", budget: int = 1000, k: int = 4,
                 num_prompts: int = 1024, first_prompt: int = 0, pairs_per_prompt: int = 1, ucb_c: float = 1.0,
                 reward_model: str | None = None, policy: PolicySpec | None = None, pool: str | None = None,
                 exclude: tuple[str, ...] = (), id_prefix: str = "", batch_size: int = 16, seed: int = 0,
                 generation: GenerationSpec | None = None, forward_batch_size: int | None = None):
        one_of("selection", selection, RULES)
        non_negative("budget", budget)
        require(k >= 2, "k", f"a pair needs at least 2 answers per prompt, got {k}")
        positive("num_prompts", num_prompts)
        non_negative("first_prompt", first_prompt)
        positive("pairs_per_prompt", pairs_per_prompt)
        non_negative("ucb_c", ucb_c)
        positive("batch_size", batch_size)
        if forward_batch_size is not None:
            positive("forward_batch_size", forward_batch_size)
        self.model, self.datamodule = model, datamodule
        self.selection, self.budget, self.k, self.ucb_c = selection, budget, k, ucb_c
        self.num_prompts, self.first_prompt, self.pairs_per_prompt = num_prompts, first_prompt, pairs_per_prompt
        self.pool, self.exclude, self.id_prefix = pool, list(exclude or []), id_prefix
        self.batch_size, self.seed, self.generation = batch_size, seed, generation or GenerationSpec()
        self.forward_batch_size = forward_batch_size
        self.policy_name = (policy.init if policy is not None else None) or "model.name_or_path"
        # the raw composite score of each member (no shaping: only the order and the spread matter here)
        self.scorer = None if reward_model is None else Scorer(
            RewardSpec(path=reward_model, normalize=NormalizeSpec(enabled=False)), model.reward_model(forward_batch_size))
        members = model.reward_ensemble_size
        if selection != "random" and members < 2:
            raise ConfigError("stage.selection", f"{selection!r} ranks pairs by the spread of a reward-model "
                                                 "ensemble: set stage.reward_model to the export of "
                                                 "stage=rm stage.ensemble=K (K >= 2)"
                                                 + (f"; {reward_model} has one member" if members else ""))
        self.evaluator = getattr(datamodule, "evaluator", None)
        self.default_metric = "pairs/selected"

    # -- step 1 ------------------------------------------------------------------------------------
    def sample_pool(self) -> list[dict[str, Any]]:
        """k answers to each prompt: [{prompt_index, prompt, responses, ended_with_eos}]."""
        dm = self.datamodule
        chosen = list(dm.train_set.items)[self.first_prompt:self.first_prompt + self.num_prompts]
        if not chosen:
            raise ConfigError("stage.first_prompt", f"the data has {len(dm.train_set)} training prompts, none from "
                                                    f"{self.first_prompt} on")
        generator = torch.Generator().manual_seed(self.seed)
        pool = []
        log.info("sample_pairs: sampling %d answers to each of %d prompts", self.k, len(chosen))
        for start in range(0, len(chosen), self.batch_size):
            batch = chosen[start:start + self.batch_size]
            raws = [dm.train_examples[f.index].prompt for f in batch]
            out = sample_responses(self.model, [f.prompt_ids for f in batch], [f.prompt_text for f in batch], raws,
                                   self.generation, generator, group_size=self.k)
            for i, (feature, raw) in enumerate(zip(batch, raws, strict=True)):
                rows = slice(i * self.k, (i + 1) * self.k)
                pool.append({"prompt_index": feature.index, "prompt": raw, "responses": out.texts[rows],
                             "ended_with_eos": out.ended_with_eos[rows].tolist()})
        return pool

    def read_pool(self, path: str) -> list[dict[str, Any]]:
        rows = []
        try:
            lines = Path(path).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise ConfigError("stage.pool", f"cannot read {path} ({error.strerror or error})") from None
        for number, line in enumerate(lines, 1):
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(path, number, "not a JSON object") from None
            if not isinstance(row, dict) or not isinstance(row.get("responses"), list) or "prompt" not in row:
                raise DataError(path, number, "a pool row needs prompt and responses (written by stage=sample_pairs)")
            if len(row["responses"]) != self.k:
                raise DataError(path, number, f"has {len(row['responses'])} responses but stage.k={self.k}")
            rows.append(row)
        if not rows:
            raise DataError(path, None, "empty pool file")
        return rows

    # -- steps 2 and 3 -------------------------------------------------------------------------------
    @torch.no_grad()
    def member_scores(self, pool: list[dict[str, Any]]) -> torch.Tensor:
        """[K, P, k] each member's composite score of each answer."""
        raws = [row["prompt"] for row in pool for _ in range(self.k)]
        texts = [text for row in pool for text in row["responses"]]
        out = []
        size = self.batch_size * self.k
        for start in range(0, len(texts), size):
            out.append(self.scorer.member_scores(text_samples(self.model.tokenizer, raws[start:start + size],
                                                              texts[start:start + size])))
        return torch.cat(out, dim=1).view(-1, len(pool), self.k)

    def asked_before(self) -> set[tuple[str, frozenset]]:
        """(prompt, {a, b}) of every pair in the `exclude` candidates files."""
        from lightrlhf.feedback.candidates import read_candidates

        asked = set()
        for path in self.exclude:
            if not Path(path).is_file():
                raise ConfigError("stage.exclude", f"{path} is not a file")
            asked.update((c.prompt, frozenset((c.a, c.b))) for c in read_candidates(path))
        return asked

    def choose(self, pool: list[dict[str, Any]], members: torch.Tensor | None) -> tuple[list[tuple[int, int]], torch.Tensor,
                                                                                        torch.Tensor]:
        """(chosen (prompt, pair) list, scores [P, M], valid [P, M]): distinct answers, not asked before."""
        i, j = pair_index(self.k)
        asked = self.asked_before()
        valid = torch.tensor([[row["responses"][a] != row["responses"][b] and
                               (self._prompt(row), frozenset((row["responses"][a], row["responses"][b]))) not in asked
                               for a, b in zip(i.tolist(), j.tolist(), strict=True)] for row in pool], dtype=torch.bool)
        generator = torch.Generator().manual_seed(self.seed + 1)  # not the sampling stream: pool and choice vary apart
        scores = pair_scores(self.selection, members, len(pool), self.k, self.ucb_c, generator)
        return select_pairs(scores, self.budget, self.pairs_per_prompt, valid), scores, valid

    def _prompt(self, row: dict[str, Any]) -> str:
        return row["prompt"] if isinstance(row["prompt"], str) else prompt_text(self.model.tokenizer, row["prompt"])

    # -- step 4 -----------------------------------------------------------------------------------
    def candidates(self, pool: list[dict[str, Any]], chosen: list[tuple[int, int]], scores: torch.Tensor,
                   members: torch.Tensor | None) -> list[dict[str, Any]]:
        i, j = pair_index(self.k)
        mean, std = ensemble_mean_std(members) if members is not None else (None, None)
        out = []
        for p, m in chosen:
            row, a, b = pool[p], int(i[m]), int(j[m])
            meta: dict[str, Any] = {"prompt_index": row.get("prompt_index", p), "responses": [a, b]}
            if mean is not None:
                meta["reward_mean"] = [round(mean[p, a].item(), 6), round(mean[p, b].item(), 6)]
                meta["reward_std"] = [round(std[p, a].item(), 6), round(std[p, b].item(), 6)]
            out.append({"id": f"{self.id_prefix}p{meta['prompt_index']}-{a}-{b}", "prompt": self._prompt(row),
                        "a": row["responses"][a], "b": row["responses"][b], "policy": self.policy_name,
                        "selection": self.selection, "score": round(float(scores[p, m]), 6), "meta": meta})
        return out

    def metrics(self, pool: list[dict[str, Any]], chosen: list[tuple[int, int]], scores: torch.Tensor,
                valid: torch.Tensor, members: torch.Tensor | None) -> dict[str, float]:
        i, j = pair_index(self.k)
        picked = torch.zeros_like(valid)
        for p, m in chosen:
            picked[p, m] = True
        out = {"pairs/pool_prompts": float(len(pool)), "pairs/pool_pairs": float(valid.sum()),
               "pairs/selected": float(len(chosen)), "pairs/budget": float(self.budget)}
        if chosen:
            out["pairs/score_mean"] = scores[picked].double().mean().item()
        out["pairs/score_mean_pool"] = scores[valid].double().mean().item() if valid.any() else 0.0
        if members is not None and members.shape[0] > 1:
            spread = disagreement_scores(members)
            out["pairs/disagreement_mean_pool"] = spread[valid].mean().item() if valid.any() else 0.0
            if chosen:
                out["pairs/disagreement_mean"] = spread[picked].mean().item()
        if self.evaluator is not None:
            prompts = [self._prompt(row) for row in pool for _ in range(self.k)]
            gold = torch.tensor(self.evaluator(prompts, [t for row in pool for t in row["responses"]]),
                                dtype=torch.float64).view(len(pool), self.k)
            gap = (gold[:, i] - gold[:, j]).abs()
            name = getattr(self.evaluator, "name", "gold_score")
            out[f"pairs/{name}_mean"] = gold.mean().item()
            out["pairs/gold_gap_mean_pool"] = gap[valid].mean().item() if valid.any() else 0.0
            if chosen:
                out["pairs/gold_gap_mean"] = gap[picked].mean().item()
            if members is not None:
                # how well the ensemble's mean ranks this pool: over every valid pair whose gold differs,
                # the share where the mean reward orders the two answers as gold does (the rm stage's
                # val/gold_accuracy, on the policy's own answers instead of a preference file)
                mean = ensemble_mean_std(members.double())[0]
                gold_diff, reward_diff = gold[:, i] - gold[:, j], mean[:, i] - mean[:, j]
                decided = valid & (gold_diff != 0)
                out["pairs/gold_decided_pool"] = float(decided.sum())
                if decided.any():
                    out["pairs/gold_accuracy_pool"] = ((reward_diff[decided] > 0) == (gold_diff[decided] > 0)).double(
                    ).mean().item()
        return out

    def run(self, out_dir: Path) -> dict[str, Any]:
        """What the launcher calls: steps 1 to 4; returns metrics.json's content."""
        candidates_path, selection_path = out_dir / CANDIDATES_FILE, out_dir / SELECTION_FILE
        if candidates_path.is_file() and selection_path.is_file():
            log.info("sample_pairs: %s is complete from an earlier launch; kept as it is", candidates_path)
            return json.loads(selection_path.read_text(encoding="utf-8"))
        pool = self.read_pool(self.pool) if self.pool else self.sample_pool()
        if not self.pool:
            atomic_write_text(out_dir / POOL_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in pool))
        members = self.member_scores(pool) if self.scorer is not None else None
        chosen, scores, valid = self.choose(pool, members)
        if len(chosen) < self.budget:
            log.warning("sample_pairs: %d pairs chosen of a budget of %d (the pool offers no more)", len(chosen),
                        self.budget)
        if not chosen:
            raise UserError(f"sample_pairs: no pair to ask about among {len(pool)} prompts (every pair identical or "
                            "asked before); sample more prompts (stage.num_prompts) or answers (stage.k)")
        rows = self.candidates(pool, chosen, scores, members)
        result = {"metrics": self.metrics(pool, chosen, scores, valid, members), "candidates": str(candidates_path),
                  "selection": self.selection, "policy": self.policy_name}
        atomic_write_text(selection_path, json.dumps(result, indent=1, ensure_ascii=False))
        atomic_write_text(candidates_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        log.info("sample_pairs: %d pairs (%s) of %d written to %s", len(rows), self.selection, int(valid.sum()),
                 candidates_path)
        return result
