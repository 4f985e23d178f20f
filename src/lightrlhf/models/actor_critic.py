"""PPO's four models as roles on one frozen base: policy, value, reward and reference.

    base      = the SFT model's weights (an SFT adapter export is merged in on load), frozen, held once
    reference = the base with every adapter off
    policy    = a fresh LoRA adapter "policy" (B = 0: at step 0 it *is* the reference, KL = 0)
    value     = adapter "value" + a scalar head, initialised from the reward model's adapter and head
                (built only for a method with a critic: PPO; GRPO and RLOO have none)
    reward    = adapter "reward" + head from the reward-model export, frozen (an ensemble export:
                adapters "reward_member0" ... with their heads; the reward is the members' mean and
                `reward_model()` gives the scorer all of them, for their std)

Peak memory is one copy of the base plus small adapters and activations, not four models. This is
only valid when the reward model was trained on these exact base weights (InstructGPT's recipe:
RM trained on top of the SFT model); its recorded base fingerprint is compared with this base's.
A reward model on another base (or tokenizer) is loaded beside it as a separate `RewardModel` and
fed re-tokenised text; the value function then starts fresh.

Roles are switched by adapter name (`adapters.active_adapter`), and what trains is decided by
name once, here: policy and value adapters plus the value head.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from lightrlhf.errors import UserError
from lightrlhf.models.adapters import active_adapter, adapter_parameter_names
from lightrlhf.models.generation import positions_from_mask
from lightrlhf.models.loading import (
    BaseIdentity,
    load_base_model,
    read_export_manifest,
    resolve_model_dir,
    weights_fingerprint,
)
from lightrlhf.models.reward import (
    RewardModel,
    ScoreHead,
    backbone_of,
    export_members,
    hidden_size_of,
    last_token_hidden,
    load_head,
    member_dir,
    reward_manifest,
)
from lightrlhf.models.shared_prompt import PromptResponses, checkpointing, grouped, last_response_hidden
from lightrlhf.models.spec import ModelSpec
from lightrlhf.rewards.scorer import RewardModelFn, Samples
from lightrlhf.rollouts.rollout import chunks
from lightrlhf.validation import one_of

log = logging.getLogger(__name__)
POLICY, VALUE, REWARD = "policy", "value", "reward"


@dataclass(frozen=True)
class PolicySpec:
    """`policy.init`: the SFT export (or any causal-LM directory) PPO starts from and stays close to.

    `policy.adapt_head`: the policy adapter also adapts the output head (a LoRA on `lm_head`), which
    peft's "all-linear" leaves out. Below the head, LoRA can only move the hidden state; tokens that
    were interchangeable in pretraining (the demo's polite and rude words fill the same slots) keep
    near-identical output embeddings, so no hidden state favours one over the other. Measured on the
    demo (PPO, 100 rollouts, beta 0.05): without it held-out gold stops at 1.26 -- also when PPO
    optimises the gold score itself -- and the policy never learns courtesy; with it gold reaches 1.65.
    """

    init: str | None = None
    adapt_head: bool = False


@dataclass(frozen=True)
class ValueSpec:
    """`value.init`: `reward` (the reward model's adapter and head), `fresh`, or `auto` (reward when it
    shares the base, else fresh). Starting from the RM gives the critic features that already track
    the score (Ouyang et al. 2022)."""

    init: Literal["auto", "reward", "fresh"] = "auto"

    def __post_init__(self) -> None:
        one_of("init", self.init, ("auto", "reward", "fresh"))


class ActorCritic(nn.Module):
    """`reward_heads[k]` scores with adapter `reward_adapters[k]` on (none: no shared-base reward model)."""

    def __init__(self, module: nn.Module, value_head: ScoreHead | None, reward_heads: list[ScoreHead] | None, tokenizer,
                 base: BaseIdentity, separate_reward: RewardModel | None = None,
                 reward_adapters: list[str] | None = None):
        super().__init__()
        reward_heads = list(reward_heads or [])
        self.module, self.value_head, self.reward_heads = module, value_head, nn.ModuleList(reward_heads)
        self.reward_adapters = reward_adapters or reward_adapter_names(len(reward_heads))
        self.tokenizer, self.base, self.separate_reward = tokenizer, base, separate_reward
        self._trainable = adapter_parameter_names(module, POLICY)
        if value_head is not None:
            self._trainable += adapter_parameter_names(module, VALUE)
        self._set_trainable_by_role()

    @property
    def has_critic(self) -> bool:
        return self.value_head is not None

    def _set_trainable_by_role(self) -> None:
        trainable = set(self._trainable)
        for name, param in self.module.named_parameters():
            param.requires_grad_(name in trainable)
        if self.value_head is not None:
            self.value_head.requires_grad_(True)
        self.reward_heads.requires_grad_(False)
        if self.separate_reward is not None:
            self.separate_reward.requires_grad_(False)

    def trainable_parameter_names(self) -> list[str]:
        head = [] if self.value_head is None else [f"value_head.{n}" for n, _ in self.value_head.named_parameters()]
        return [f"module.{n}" for n in self._trainable] + head

    def policy_parameter_names(self) -> list[str]:
        return [f"module.{n}" for n in adapter_parameter_names(self.module, POLICY)]

    # -- role contexts -------------------------------------------------------------------------
    def policy_context(self) -> contextlib.AbstractContextManager:
        return active_adapter(self.module, POLICY)

    def reference_context(self) -> contextlib.AbstractContextManager:
        return active_adapter(self.module, None)

    # -- forwards ------------------------------------------------------------------------------
    def _logits(self, input_ids: Tensor, attention_mask: Tensor, last: int) -> Tensor:
        return self.module(input_ids=input_ids, attention_mask=attention_mask,
                           position_ids=positions_from_mask(attention_mask), use_cache=False,
                           logits_to_keep=last).logits

    def policy_logits(self, input_ids: Tensor, attention_mask: Tensor, last: int = 0) -> Tensor:
        """[B, T, V]; with `last` > 0 only the last `last` positions' [B, last, V]: the LM head (and
        whatever reads its output) then runs on the positions that predict a scored token alone."""
        with self.policy_context():
            return self._logits(input_ids, attention_mask, last)

    def reference_logits(self, input_ids: Tensor, attention_mask: Tensor, last: int = 0) -> Tensor:
        """As `policy_logits`, with every adapter off."""
        with self.reference_context():
            return self._logits(input_ids, attention_mask, last)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """V at every position [B, T] (the value of the state *after* reading that token)."""
        if self.value_head is None:
            raise RuntimeError("this actor was built without a critic (load_actor_critic(critic=False))")
        with active_adapter(self.module, VALUE):
            hidden = backbone_of(self.module)(input_ids=input_ids, attention_mask=attention_mask,
                                              position_ids=positions_from_mask(attention_mask),
                                              use_cache=False).last_hidden_state
        return self.value_head(hidden)

    @property
    def shares_reward_base(self) -> bool:
        return len(self.reward_heads) > 0

    @property
    def reward_ensemble_size(self) -> int:
        """Members of the reward model (1 for a single one, 0 for none)."""
        if self.separate_reward is not None:
            return self.separate_reward.ensemble_size
        return len(self.reward_heads)

    def reward_member_scores(self, input_ids: Tensor, attention_mask: Tensor,
                             groups: PromptResponses | None = None) -> Tensor:
        """The shared-base reward model's members' scores at each row's last real token [K, B]; with
        `groups` (the same rows as prompts once and responses grouped), each prompt runs once."""
        out = []
        for adapter, head in zip(self.reward_adapters, self.reward_heads, strict=True):
            with active_adapter(self.module, adapter):
                if groups is not None:
                    hidden = last_response_hidden(backbone_of(self.module), groups)
                else:
                    hidden = last_token_hidden(backbone_of(self.module), input_ids, attention_mask)
                out.append(head(hidden))
        return torch.stack(out)

    def reward_scores(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The shared-base reward model's score at each row's last real token [B] (an ensemble's mean)."""
        return self.reward_member_scores(input_ids, attention_mask).mean(0)

    def reward_model(self, forward_batch_size: int | None = None) -> RewardModelFn | None:
        """The reward model as the scorer calls it (None when the reward is Python functions only):
        the shared-base adapter on the token ids, or the separate model on re-tokenised text. It
        answers [N] scores, or [K, N] for an ensemble's K members (the scorer takes their mean)."""
        ensemble = self.reward_ensemble_size > 1
        if self.shares_reward_base:
            def shared(samples: Samples) -> Tensor:
                # detail: k responses to one prompt (GRPO/RLOO, best-of-n) run their prompt once, as the
                # policy's scoring forward does (models/shared_prompt.py): P + k R positions, not k (P + R)
                k = getattr(samples, "group_size", 1) if hasattr(samples, "prompt_width") else 1
                group = k > 1 and not checkpointing(self.module) and bool((samples.mask.sum(1) > 0).all())
                rows = chunks(samples.sequences.shape[0], forward_batch_size, k if group else 1)
                members = torch.cat([self.reward_member_scores(
                    samples.sequences[r], samples.attention_mask[r],
                    grouped(samples.sequences[r], samples.attention_mask[r], samples.prompt_width, samples.mask[r], k)
                    if group else None) for r in rows], dim=1)
                return members if ensemble else members[0]
            return shared
        if self.separate_reward is not None:
            if ensemble:
                return lambda samples: self.separate_reward.member_scores(samples.raw_prompts, samples.texts)
            return lambda samples: self.separate_reward.score(samples.raw_prompts, samples.texts)
        return None

    def train(self, mode: bool = True) -> ActorCritic:
        # detail: PPO runs with dropout off, in rollouts *and* updates, so the first epoch's ratio
        # is exactly 1 and the KL to the reference is computed between the same functions.
        return super().train(False)


def load_actor_critic(spec: ModelSpec, tokenizer, policy: PolicySpec, reward, value: ValueSpec | None = None, *,
                      critic: bool) -> ActorCritic:
    """Config target of the online stages (`reward` is a `lightrlhf.rewards.spec.RewardSpec`,
    or None for no reward model).
    `critic=false` (GRPO, RLOO, best-of-n) builds no value adapter and no value head; it has no
    default because the stages' configs differ in it."""
    from peft import get_peft_model

    base_spec = spec if policy.init is None else replace(spec, name_or_path=policy.init)
    if policy.init is not None:
        _check_policy_init_matches_model(spec, policy.init)
    base, identity = load_base_model(base_spec)
    lora = (spec.lora.to_peft("CAUSAL_LM") if spec.lora is not None else None)
    if lora is None:
        raise UserError("config model.lora: this stage trains a LoRA policy adapter on a shared frozen base (the "
                        "reference is that base); model.lora=null (full fine-tuning) is not supported by it")
    module = get_peft_model(base, with_output_head(lora, base) if policy.adapt_head else lora, adapter_name=POLICY)
    reward_heads, separate, members = [], None, []
    if reward is not None and reward.path is not None:
        meta = _reward_manifest(reward.path)
        members = export_members(Path(reward.path), meta)
        shares_base = meta["base"]["fingerprint"] == identity.fingerprint and meta["weights"] == "adapter"
        if shares_base and meta.get("pooling", "last") == "last":  # an encoder's never is a causal policy's
            for adapter, member in zip(reward_adapter_names(len(members)), members, strict=True):
                module.load_adapter(member_dir(Path(reward.path), member), adapter_name=adapter, is_trainable=False)
                reward_heads.append(load_head(Path(reward.path), meta, member))
            log.info("reward model %s shares the policy's base: loaded as adapter%s %s", reward.path,
                     "s" if len(members) > 1 else "", ", ".join(reward_adapter_names(len(members))))
        else:
            separate = RewardModel.from_pretrained(reward.path, dtype=spec.dtype)
            log.warning("reward model %s was trained on another base (%s); loading it separately and scoring "
                        "re-tokenised text", reward.path, meta["base"]["name_or_path"])
    if not critic:
        module.set_adapter(POLICY)
        module.base_model.model.config.use_cache = False
        return ActorCritic(module, None, reward_heads, tokenizer, identity, separate)
    init = (value or ValueSpec()).init
    if init == "reward" and not reward_heads:
        raise UserError("config value.init: 'reward' needs a reward model on the policy's base "
                        f"(reward.path={reward.path}); use value.init=fresh or auto")
    if init == "auto":
        init = "reward" if reward_heads else "fresh"
    if init == "reward":  # an ensemble's first member
        module.load_adapter(member_dir(Path(reward.path), members[0]), adapter_name=VALUE, is_trainable=True)
        value_head = load_head(Path(reward.path), _reward_manifest(reward.path), members[0])
    else:
        module.add_adapter(VALUE, lora)
        value_head = ScoreHead(hidden_size_of(module), std=0.0)
    module.set_adapter(POLICY)
    module.base_model.model.config.use_cache = False
    return ActorCritic(module, value_head, reward_heads, tokenizer, identity, separate)


def with_output_head(lora, base: nn.Module):
    """`lora` (a peft LoraConfig) with the model's output head among its targets. "all-linear" is
    spelled out as the names of the linear layers, which then include the head."""
    from transformers.pytorch_utils import Conv1D

    head = base.get_output_embeddings()
    head_name = next(name for name, module in base.named_modules() if module is head)
    if isinstance(lora.target_modules, str):
        if lora.target_modules != "all-linear":  # a regular expression: the head as an alternative
            return replace(lora, target_modules=f"(?:{lora.target_modules})|(?:{head_name})")
        targets = {name.rsplit(".", 1)[-1] for name, module in base.named_modules() if isinstance(module, (nn.Linear, Conv1D))}
    else:
        targets = set(lora.target_modules)
    return replace(lora, target_modules=sorted(targets | {head_name.rsplit(".", 1)[-1]}))


def load_policy(spec: ModelSpec, tokenizer, policy: PolicySpec) -> ActorCritic:
    """Config target of the offline preference stages (DPO): the policy adapter on the base (the SFT
    export of `policy.init` merged in), no critic, no reward model; the reference is the adapter off."""
    return load_actor_critic(spec, tokenizer, policy, reward=None, critic=False)


def _reward_manifest(path: str) -> dict:
    return reward_manifest(path, key="reward.path")


def reward_adapter_names(size: int) -> list[str]:
    """The reward model's adapters on the policy's base: "reward", or reward_member0, ... for an ensemble."""
    return [REWARD] if size == 1 else [f"{REWARD}_member{k}" for k in range(size)]


def _check_policy_init_matches_model(spec: ModelSpec, init: str) -> None:
    """policy.init must descend from model.name_or_path: the two keys describe one model."""
    directory = resolve_model_dir(init, key="policy.init")
    meta = read_export_manifest(directory)
    if meta is not None and meta.get("kind") != "causal_lm":
        raise UserError(f"config policy.init: {init} is a {meta.get('kind')} export (from stage "
                        f"{meta.get('stage')!r}), not a causal language model")
    root = directory
    while meta is not None and meta.get("weights") == "adapter":  # follow exports down to a plain model
        root = resolve_model_dir(meta["base"]["name_or_path"], key="policy.init")
        meta = read_export_manifest(root)
    model_dir = resolve_model_dir(spec.name_or_path, spec.revision)
    if weights_fingerprint(root, key="policy.init") != weights_fingerprint(model_dir, key="model.name_or_path"):
        raise UserError(f"config policy.init: {init} descends from {root}, not from model.name_or_path="
                        f"{spec.name_or_path}")
