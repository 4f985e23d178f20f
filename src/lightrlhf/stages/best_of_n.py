"""Best-of-n sampling: draw n responses from a policy, keep the one the scorer ranks highest.

A stage that trains nothing (`stage=best_of_n`, the `SamplingStage` contract): the launcher builds it
like any stage -- the policy export as `policy.init`, the reward model and/or reward functions as
`reward`, prompts as `data` -- and calls `run(out_dir)` instead of fitting.

    step 1. sample   n_max + 1 responses per prompt, once, with a fixed seed (the policy as exported:
                     its fresh LoRA adapter is the identity)
    step 2. score    the scorer's composite score in raw units (PPO's eval/reward; normalisation,
                     clipping and the EOS penalty shape a training signal and play no part in ranking);
                     with an evaluator (the demo's hidden gold scorer) also the gold score; an ensemble
                     reward model's min or uncertainty aggregate standardises each member on all the
                     draws first (all from the one policy sampled), and the table adds the
                     members' mean and std of the chosen response (reward_model_mean, reward_model_std)
    step 3. curve    for each n: the unbiased estimates over every n-subset of the draws
                     (rl/best_of_n.py) of the chosen response's reward, gold score and length, its
                     win rate (gold) against one further draw, and the analytic KL log n - (n-1)/n
    step 4. use      with `select_n`: the best of the first select_n draws of each prompt, written as
                     JSONL rows {prompt, completion, reward, n} -- data `stage=sft data=jsonl` reads as
                     it is (rejection sampling / RAFT: fine-tune on the best-of-n samples)

Why n_max + 1 draws: the win rate compares the best of n draws with a *different* draw of the same
prompt, so the largest n needs one draw more than it keeps. The reward and gold estimates use all of
them (at n = n_max + 1 they would be the single top draw; at n <= n_max every subset of that size is
averaged, which has less variance than one best-of-n draw per prompt).

Outputs in the run directory: metrics.json (`best_of_n/<n>/<name>` and the table), table.md, and
chosen.jsonl with select_n. Measure gold on >= 512 prompts to see differences of ~0.1 SFT std.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.errors import UserError
from lightrlhf.io import atomic_write_text
from lightrlhf.models.actor_critic import ActorCritic
from lightrlhf.rewards.scorer import MEMBERS_MEAN, SPREAD, Scorer
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rl.best_of_n import best_of_n_kl, best_of_n_mean, best_of_n_win_rate
from lightrlhf.rollouts.rollout import sample_responses
from lightrlhf.rollouts.specs import GenerationSpec
from lightrlhf.training.reporting import markdown_table
from lightrlhf.validation import one_of, positive, require

log = logging.getLogger(__name__)
CHOSEN_FILE, TABLE_FILE = "chosen.jsonl", "table.md"


def powers_of_two(n_max: int) -> list[int]:
    """1, 2, 4, ... up to n_max, and n_max itself when it is not a power of two."""
    values = [2 ** k for k in range(n_max.bit_length()) if 2 ** k <= n_max]
    return values + ([n_max] if values[-1] != n_max else [])


class BestOfN:
    """See module docstring. `n`: the n of the table (None: 1, 2, 4, ..., n_max); `batch_size`: prompts
    per generate call (each with n_max + 1 rows); `split`: which prompts of the data (validation: the
    held-out ones, for evaluation; train: for making SFT data with select_n)."""

    def __init__(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec, n_max: int = 64,
                 n: list[int] | None = None, num_prompts: int = 512, split: Literal["validation", "train"] = "validation",
                 batch_size: int = 8, seed: int = 0, generation: GenerationSpec | None = None,
                 select_n: int | None = None, forward_batch_size: int | None = None):
        positive("n_max", n_max)
        self.n_values = sorted(set(n)) if n is not None else powers_of_two(n_max)
        require(bool(self.n_values), "n", "must list at least one n (or be null: 1, 2, 4, ..., n_max)")
        bad = [v for v in self.n_values if not 1 <= v <= n_max]
        require(not bad, "n", f"every n must be in [1, n_max={n_max}], got {bad[0] if bad else None}")
        if select_n is not None:
            require(1 <= select_n <= n_max, "select_n", f"must be in [1, n_max={n_max}] or null, got {select_n}")
        positive("num_prompts", num_prompts)
        one_of("split", split, ("validation", "train"))
        positive("batch_size", batch_size)
        if forward_batch_size is not None:
            positive("forward_batch_size", forward_batch_size)
        self.model, self.datamodule = model, datamodule
        self.n_max, self.num_prompts, self.split, self.batch_size, self.seed = n_max, num_prompts, split, batch_size, seed
        self.generation, self.select_n = generation or GenerationSpec(), select_n
        self.scorer = Scorer(reward, model.reward_model(forward_batch_size))
        self.evaluator = getattr(datamodule, "evaluator", None)
        headline = "gold_score" if self.evaluator is not None else "reward"
        self.default_metric = f"best_of_n/{self.n_values[-1]}/{headline}"

    @property
    def gold_name(self) -> str:
        return getattr(self.evaluator, "name", "gold_score")

    def prompts(self) -> list[tuple[list[int], str, Any]]:
        """(token ids, prompt text as the policy sees it, prompt as the data gave it), at most num_prompts."""
        dm = self.datamodule
        features, examples = (dm.val_set, dm.val_examples) if self.split == "validation" else (dm.train_set,
                                                                                                 dm.train_examples)
        chosen = list(features.items)[: self.num_prompts]
        if not chosen:
            raise UserError(f"config stage.split: the data has no {self.split} prompts to sample")
        return [(f.prompt_ids, f.prompt_text, examples[f.index].prompt) for f in chosen]

    @torch.no_grad()
    def sample(self, prompts: list[tuple[list[int], str, Any]]) -> dict[str, Any]:
        """Steps 1 and 2: [P, N] scores (and gold), lengths, EOS flags and texts of N = n_max + 1 draws each."""
        draws = self.n_max + 1
        generator = torch.Generator().manual_seed(self.seed)
        out: dict[str, list] = {"scores": [], "gold": [], "lengths": [], "eos": [], "texts": [], MEMBERS_MEAN: [],
                                SPREAD: []}
        measured = []
        log.info("best-of-n: sampling %d responses for each of %d %s prompts", draws, len(prompts), self.split)
        for start in range(0, len(prompts), self.batch_size):
            chunk = prompts[start:start + self.batch_size]
            texts = [text for _, text, _ in chunk]
            responses = sample_responses(self.model, [ids for ids, _, _ in chunk], texts, [raw for _, _, raw in chunk],
                                         self.generation, generator, group_size=draws)
            measured.append(self.scorer.measure(responses))
            if self.evaluator is not None:
                gold = self.evaluator(responses.prompts, responses.texts)
                out["gold"].append(torch.tensor(gold, dtype=torch.float64).view(len(chunk), draws))
            out["lengths"].append(responses.lengths.view(len(chunk), draws))
            out["eos"].append(responses.ended_with_eos.float().view(len(chunk), draws))
            out["texts"].extend(responses.texts[i * draws:(i + 1) * draws] for i in range(len(chunk)))
        # every draw comes from the one policy sampled here (it is not trained): an ensemble's min or uncertainty
        # aggregate takes each member's units from all of them before combining (nothing to do for the mean)
        self.scorer.calibrate_members(measured)
        for batch in measured:
            scores, components = self.scorer.combine(batch)
            out["scores"].append(scores.view(-1, draws))
            if SPREAD in components:  # an ensemble: its members' mean and spread, beside the aggregate ranked by
                out[MEMBERS_MEAN].append(components.get(MEMBERS_MEAN, components["reward_model"]).view(-1, draws))
                out[SPREAD].append(components[SPREAD].view(-1, draws))
        return {k: (torch.cat(v) if k != "texts" and v else v) for k, v in out.items()}

    def curve(self, draws: dict[str, Any]) -> list[dict[str, float]]:
        """Step 3: one row per n, each an average over prompts of the per-prompt unbiased estimates."""
        scores = draws["scores"]
        rows = []
        for n in self.n_values:
            row = {"n": n, "reward": best_of_n_mean(scores, scores, n).mean().item()}
            if self.evaluator is not None:
                row[self.gold_name] = best_of_n_mean(scores, draws["gold"], n).mean().item()
                row["win_rate_vs_n1"] = best_of_n_win_rate(scores, draws["gold"], n).mean().item()
            row["kl"] = best_of_n_kl(n)
            row["length_mean"] = best_of_n_mean(scores, draws["lengths"], n).mean().item()
            row["frac_ended_with_eos"] = best_of_n_mean(scores, draws["eos"], n).mean().item()
            for name in (MEMBERS_MEAN, SPREAD):  # an ensemble reward model's mean and std of the chosen response
                if len(draws[name]):
                    row[name] = best_of_n_mean(scores, draws[name], n).mean().item()
            rows.append(row)
        return rows

    def select(self, prompts: list[tuple[list[int], str, Any]], draws: dict[str, Any], n: int) -> list[dict[str, Any]]:
        """Step 4: the best of each prompt's first n draws (draws are i.i.d., so these are n fresh
        draws; a tie goes to the earlier one)."""
        best = draws["scores"][:, :n].argmax(1).tolist()
        return [{"prompt": raw, "completion": draws["texts"][p][i], "reward": draws["scores"][p, i].item(), "n": n}
                for p, ((_, _, raw), i) in enumerate(zip(prompts, best))]

    def run(self, out_dir: Path) -> dict[str, Any]:
        """What the launcher calls: steps 1 to 4; returns metrics.json's content (metrics and the table)."""
        prompts = self.prompts()
        draws = self.sample(prompts)
        rows = self.curve(draws)
        header = list(rows[0])
        table = markdown_table(header, [[f"{row[k]:.4f}" if isinstance(row[k], float) else row[k] for k in header]
                                        for row in rows])
        atomic_write_text(out_dir / TABLE_FILE, table + "\n")
        for line in table.splitlines():
            log.info(line)
        if self.select_n is not None:
            chosen = self.select(prompts, draws, self.select_n)
            atomic_write_text(out_dir / CHOSEN_FILE, "".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chosen))
            log.info("best of %d for each of %d prompts: %s", self.select_n, len(chosen), out_dir / CHOSEN_FILE)
        metrics = {f"best_of_n/{row['n']}/{k}": float(v) for row in rows for k, v in row.items() if k != "n"}
        return {"metrics": metrics, "table": rows, "prompts": len(prompts), "draws_per_prompt": self.n_max + 1}
