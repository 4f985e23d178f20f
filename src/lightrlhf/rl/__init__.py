"""Pure tensor functions for RLHF: one equation per function, one concept per file."""

from lightrlhf.rl.best_of_n import best_of_n_kl, best_of_n_mean, best_of_n_weights, best_of_n_win_rate
from lightrlhf.rl.dpo import DPOLossResult, dpo_loss, dpo_metrics
from lightrlhf.rl.gae import gae
from lightrlhf.rl.kl import kl_abs, kl_k1, kl_k2, kl_k3, kl_penalty
from lightrlhf.rl.kl_control import AdaptiveKLController, FixedKLController
from lightrlhf.rl.logprobs import entropy_from_logits, sequence_logprobs, token_logprobs
from lightrlhf.rl.masked import masked_mean, masked_sum, masked_var, masked_whiten
from lightrlhf.rl.next_token import filter_logits, sample_tokens
from lightrlhf.rl.normalize import RunningMeanStd
from lightrlhf.rl.ppo import (
    PolicyLossResult,
    PolicyObjective,
    ValueLossResult,
    ValueObjective,
    aggregate,
    aggregation_normalizer,
    clipped_value_loss,
    explained_variance,
    policy_objective,
    ppo_minibatch_loss,
    ppo_policy_loss,
    value_objective,
)
from lightrlhf.rl.preference import bradley_terry_loss
from lightrlhf.rl.shaping import last_valid_index, per_token_rewards

__all__ = [
    "AdaptiveKLController",
    "DPOLossResult",
    "FixedKLController",
    "PolicyLossResult",
    "PolicyObjective",
    "RunningMeanStd",
    "ValueLossResult",
    "ValueObjective",
    "aggregate",
    "aggregation_normalizer",
    "best_of_n_kl",
    "best_of_n_mean",
    "best_of_n_weights",
    "best_of_n_win_rate",
    "bradley_terry_loss",
    "clipped_value_loss",
    "dpo_loss",
    "dpo_metrics",
    "entropy_from_logits",
    "explained_variance",
    "filter_logits",
    "gae",
    "kl_abs",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_valid_index",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "per_token_rewards",
    "policy_objective",
    "ppo_minibatch_loss",
    "ppo_policy_loss",
    "sample_tokens",
    "sequence_logprobs",
    "token_logprobs",
    "value_objective",
]
