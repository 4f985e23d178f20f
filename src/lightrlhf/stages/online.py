"""What every online method (PPO, GRPO, RLOO) does around its update, in one place.

An online stage samples from its policy, scores the samples (rewards/scorer.py) and updates the
policy adapter on one frozen base. Around that update they all need the same things, which live here:

- the initial (SFT) policy measured before the first rollout: the scorer's normalisation statistics
  and the tripwires' baseline (length, EOS rate, score);
- held-out evaluation in Lightning's validation loop (rollouts/evaluation.py): eval/reward, eval/kl,
  length, EOS fraction and, on the demo, the gold score and the win rate against the SFT policy;
- sample tables in TensorBoard, the final metrics and the policy-adapter export.

A subclass owns its `training_step` (rollout -> score -> advantages -> update), its optimizer and its
own checkpointed state; it sets the attributes `_init_online` documents.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from lightrlhf.data.modules import PromptDataModule
from lightrlhf.models.actor_critic import POLICY, ActorCritic
from lightrlhf.models.export import export_policy_adapter
from lightrlhf.rewards.scorer import Scorer
from lightrlhf.rewards.spec import RewardSpec
from lightrlhf.rollouts.evaluation import PolicyEvaluation
from lightrlhf.rollouts.rollout import chunks, sample_responses
from lightrlhf.rollouts.specs import EvalSpec, GenerationSpec
from lightrlhf.stages.base import StageModule
from lightrlhf.training import distributed
from lightrlhf.training.alerts import AlertSpec, Tripwires
from lightrlhf.training.reporting import log_data_summary, log_sample_table

log = logging.getLogger(__name__)


class OnlineStage(StageModule):
    """Base of the online stages (see module docstring)."""

    rollout_group_size = 1  # responses per prompt in a rollout batch (GRPO, RLOO: k)
    data_parallel = "none"  # unless the method syncs itself (PPO, GRPO, RLOO: "stage")

    def _init_online(self, model: ActorCritic, datamodule: PromptDataModule, reward: RewardSpec,
                     generation: GenerationSpec | None, eval: EvalSpec | None, alerts: AlertSpec | None,
                     kl_target: float, seed: int, forward_batch_size: int | None) -> None:
        self.model, self.datamodule = model, datamodule
        self.generation = generation or GenerationSpec()
        self.eval_spec = eval or EvalSpec()
        self.scorer = Scorer(reward, model.reward_model(forward_batch_size))
        self.evaluation = PolicyEvaluation(model, self.scorer, self.generation, self.eval_spec,
                                           getattr(datamodule, "evaluator", None), forward_batch_size)
        # the stage's own state, all of it checkpointed (with what the subclass adds)
        self.tripwires = Tripwires(alerts or AlertSpec(), kl_target)
        self.rollout_count = 0
        self.seed = seed
        self.sampler = torch.Generator().manual_seed(seed)
        self.initial_eval: dict[str, float] = {}
        self.eval_results: dict[str, float] = {}
        self._eval_rows: list[dict[str, Any]] = []

    def setup(self, stage: str) -> None:
        StageModule.setup(self, stage)  # refuses what cannot run on these processes
        if self.trainer is not None and self.trainer.world_size > 1:
            # each rank samples its own responses: the same seed would correlate the ranks' draws
            self.sampler.manual_seed(self.seed + 1_000_003 * distributed.rank())

    def train(self, mode: bool = True) -> OnlineStage:
        super().train(mode)
        self.model.eval()  # detail: dropout stays off in rollouts and updates (see ActorCritic.train)
        return self

    # -- the initial (SFT) policy: normaliser statistics and tripwire baseline ---------------------
    def on_train_start(self) -> None:
        if self.rollout_count == 0 and not self.tripwires.baseline:
            log_data_summary(self.logger, self.datamodule.summary)
            self.measure_baseline()
            if self.eval_spec.at_start:
                self.initial_eval = self.evaluate()
                if self.logger is not None:
                    self.logger.log_metrics(dict(self.initial_eval), step=0)

    @torch.no_grad()
    def measure_baseline(self) -> None:
        """Sample the initial policy (= SFT: the adapter starts at zero) on the first training prompts, as
        `normalize.init_rollouts` rollout batches: its scores set the normaliser (and, for an ensemble's
        min or uncertainty aggregate, each member's units first), its length and EOS rate the tripwires' baseline."""
        dm = self.datamodule
        features = dm.train_set.items[: max(1, self.scorer.spec.normalize.init_rollouts) * dm.batch_size]
        generator = torch.Generator().manual_seed(self.eval_spec.seed + 1)
        measured, lengths, eos = [], [], []
        for rows in chunks(len(features), dm.batch_size):
            chunk = features[rows]
            responses = sample_responses(self.model, [f.prompt_ids for f in chunk], [f.prompt_text for f in chunk],
                                         [dm.train_examples[f.index].prompt for f in chunk], self.generation,
                                         generator, group_size=self.rollout_group_size)
            measured.append(self.scorer.measure(responses))
            lengths.append(responses.lengths)
            eos.append(responses.ended_with_eos.float())
        scores_all = self.scorer.calibrate_initial(measured)  # an ensemble's members' units, then the score's
        baseline = {"score_mean": scores_all.mean().item(), "score_std": scores_all.std().item(),
                    "length_mean": torch.cat(lengths).mean().item(), "frac_ended_with_eos": torch.cat(eos).mean().item()}
        self.tripwires.baseline = baseline
        log.info("initial policy over %d rollouts: score %.3f +- %.3f, length %.1f, %.0f%% end with EOS",
                 len(scores_all), baseline["score_mean"], baseline["score_std"], baseline["length_mean"],
                 100 * baseline["frac_ended_with_eos"])

    def rollout_is_finite(self, **quantities: torch.Tensor) -> bool:
        """The NaN guard on a rollout, decided for every rank at once: when another rank's rollout is not
        finite this rank skips (or stops) too, so that no rank waits for another's gradient."""
        local = all(bool(torch.isfinite(q).all()) for q in quantities.values())
        if not distributed.all_agree(local) and local:
            quantities = {"another rank's rollout": torch.tensor(float("nan"))}
        return self.guard.check(self.global_step, **quantities)

    # -- evaluation --------------------------------------------------------------------------------
    def _raw_prompts(self, batch: dict[str, Any], train: bool) -> list:
        examples = self.datamodule.train_examples if train else self.datamodule.val_examples
        return [examples[int(i)].prompt for i in batch["index"]]

    def _evaluate_batch(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Any]:
        return self.evaluation.batch(batch["prompt_ids"], batch["prompt_text"], self._raw_prompts(batch, train=False),
                                     batch_idx)

    def evaluate(self) -> dict[str, float]:
        """Every held-out batch with its own seed, on any number of ranks: rank r evaluates batches
        r, r + N, r + 2N, ... of the whole loader and every rank summarises all of them, in order, so the
        figures are the one-process figures."""
        world, rank = distributed.world_size(), distributed.rank()
        mine = [(i, self._evaluate_batch(b, i)) for i, b in enumerate(self.datamodule.val_dataloader()) if i % world == rank]
        everyone = sorted((pair for part in distributed.all_gather_objects(mine) for pair in part), key=lambda p: p[0])
        return self._summarise([row for _, row in everyone])

    def _summarise(self, rows: list[dict[str, Any]]) -> dict[str, float]:
        if rows:
            first, n = rows[0], self.eval_spec.num_logged
            self._log_table("eval_samples", first["prompts"][:n], first["texts"][:n], first["scores"][:n].tolist(),
                            first["gold"][:n].tolist() if "gold" in first else None)
        return self.evaluation.summarise(rows)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if distributed.world_size() == 1:  # several ranks evaluate in on_validation_epoch_end
            self._eval_rows.append(self._evaluate_batch(batch, batch_idx))

    def on_validation_epoch_end(self) -> None:
        rows, self._eval_rows = self._eval_rows, []
        if self.trainer.sanity_checking:
            return
        if distributed.world_size() > 1:
            # Lightning's shards would pair other prompts with other seeds than one process does:
            # `evaluate` splits the whole loader's batches between the ranks instead
            self.eval_results = self.evaluate()
        elif rows:
            self.eval_results = self._summarise(rows)
        else:
            return
        # detail: the ranks hold the same (global) figures; sync_dist only spares Lightning's warning
        for name, value in self.eval_results.items():
            self.log(name, value, prog_bar=name == "eval/gold_score", sync_dist=distributed.world_size() > 1)
        self.last_validated_step = self.global_step

    def publish_rollout(self, metrics: dict[str, float], roll: Any, scores: torch.Tensor,
                        seconds: tuple[float, float, float]) -> None:
        """The end of every rollout iteration, whatever the method: count it, add timing and progress,
        run the tripwires, log, show samples now and then, and stop at the rollout budget or when a
        tripwire says so. `seconds`: (started, rolled out, updated) from time.perf_counter()."""
        started, rolled, updated = seconds
        self.rollout_count += 1
        episodes = roll.rows * distributed.world_size()
        metrics.update({"time/rollout_s": rolled - started, "time/update_s": updated - rolled,
                        "time/episodes_per_s": episodes / (updated - started),
                        "progress/rollouts": float(self.rollout_count),
                        "progress/episodes": float(self.rollout_count * episodes)})
        # every rank's tripwires see the same (global) numbers, so they stop together
        metrics = distributed.mean_over_ranks(metrics)
        alerts, stop = self.tripwires.check(metrics, self.rollout_count)
        metrics.update(alerts)
        for name, value in metrics.items():
            self.log(name, value, prog_bar=name in ("objective/scores", "objective/kl"))
        if self.samples_every and self.rollout_count % self.samples_every == 0:
            self._log_table("rollout_samples", roll.prompts, roll.texts, scores.tolist())
        if stop or self.rollout_count >= self.rollouts:
            self.trainer.should_stop = True

    def _log_table(self, tag: str, prompts: list[str], texts: list[str], scores: list[float],
                   gold: list[float] | None = None) -> None:
        log_sample_table(self.logger, tag, self.rollout_count, self.eval_spec.num_logged, prompts, texts, scores,
                         gold, response="completion")

    # -- checkpoints: the state every online stage keeps --------------------------------------------
    def online_state(self) -> dict[str, Any]:
        # every rank's sampler: a resumed rank continues its own draws (Lightning writes rank 0's state)
        samplers = distributed.all_gather_objects(self.sampler.get_state())
        return {**self.scorer.state_dict(), "rollout_count": self.rollout_count, "sampler": samplers[0],
                "sampler_by_rank": samplers, **self.tripwires.state_dict(), "initial_eval": dict(self.initial_eval),
                "eval": dict(self.eval_results)}

    def load_online_state(self, state: dict[str, Any]) -> None:
        self.scorer.load_state_dict(state)
        self.rollout_count = int(state["rollout_count"])
        samplers = state.get("sampler_by_rank", [state["sampler"]])
        if len(samplers) != distributed.world_size():
            from lightrlhf.errors import UserError

            raise UserError(f"resume: the checkpoint was written by {len(samplers)} process(es); resume it with "
                            f"trainer.devices={len(samplers)} (this run has {distributed.world_size()})")
        self.sampler.set_state(samplers[distributed.rank()])
        self.tripwires.load_state_dict(state)
        self.initial_eval, self.eval_results = dict(state["initial_eval"]), dict(state["eval"])

    # -- what the launcher reads -------------------------------------------------------------------
    def final_metrics(self) -> dict[str, float]:
        metrics = dict(self.eval_results)
        metrics.update({f"{k}_initial": v for k, v in self.initial_eval.items()})
        metrics.update({f"alerts/{k}_count": float(v) for k, v in self.tripwires.fired.items()})
        metrics["progress/rollouts"] = float(self.rollout_count)
        return metrics

    def export(self, out_dir: Path, config: dict | None, metrics: dict | None, merged: bool) -> Path:
        return export_policy_adapter(self.model, POLICY, out_dir, stage=self.stage_name, config=config,
                                     metrics=metrics, merged=merged)


def merge_micro_batches(parts: list[dict[str, float]], additive: tuple[str, ...]) -> dict[str, float]:
    """One minibatch's statistics from its micro-batches': the `additive` ones (shares of the minibatch loss)
    add up, the others (means over tokens) are token-weighted."""
    tokens = sum(p["tokens"] for p in parts) or 1.0
    return {k: (sum(p[k] for p in parts) if k in additive else sum(p[k] * p["tokens"] for p in parts) / tokens)
            for k in parts[0] if k != "tokens"}
