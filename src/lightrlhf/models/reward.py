"""A reward model: a causal LM's backbone with a LoRA adapter and a scalar score head.

    r(x, y) = w . h_T + b,   h_T = last hidden state at the last real token of prompt + response + EOS

The head reads the backbone's hidden states directly (the LM head's vocabulary logits are never
computed). "Last real token" is found from the attention mask, so left and right padding give the
same score, and a pad token equal to EOS does no harm.

An export keeps the adapter *and* the head (`score_head.safetensors`) together with the tokenizer:
saving only the adapter, as a plain peft `save_pretrained` would, loses the head and silently
scores with a random one. `RewardModel.from_pretrained(export)` loads the recorded base, checks
its fingerprint, applies adapter and head, and `score(prompts, responses)` gives exactly the
scores the model had at the end of training.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from lightrlhf.data.formats import Prompt
from lightrlhf.data.tokenize import encode_prompt, encode_response
from lightrlhf.errors import UserError
from lightrlhf.io import atomic_directory
from lightrlhf.models.adapters import adapter_parameter_names
from lightrlhf.models.export import manifest, write_manifest
from lightrlhf.models.loading import (
    BaseIdentity,
    check_same_base,
    load_base_model,
    load_tokenizer,
    read_export_manifest,
)
from lightrlhf.models.spec import ModelSpec
from lightrlhf.rl.shaping import last_valid_index

ADAPTER = "default"
HEAD_FILE = "score_head.safetensors"


def backbone_of(causal_lm: nn.Module) -> nn.Module:
    """The transformer body of a causal LM (`model` for Llama/Qwen, `transformer` for GPT-2)."""
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return base.base_model


def hidden_size_of(causal_lm: nn.Module) -> int:
    base = causal_lm.get_base_model() if hasattr(causal_lm, "get_base_model") else causal_lm
    return base.config.hidden_size


class ScoreHead(nn.Module):
    """Linear(hidden, 1) in float32 whatever the backbone's dtype (a bf16 score loses ranks)."""

    def __init__(self, hidden_size: int, std: float = 0.02):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1, dtype=torch.float32)
        nn.init.normal_(self.linear.weight, std=std)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: Tensor) -> Tensor:
        return self.linear(hidden.float()).squeeze(-1)


def last_token_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                      use_cache=False).last_hidden_state
    index = last_valid_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0]), index]


class RewardModel(nn.Module):
    def __init__(self, module: nn.Module, head: ScoreHead, tokenizer, spec: ModelSpec, base: BaseIdentity):
        super().__init__()
        self.module, self.head, self.tokenizer, self.spec, self.base = module, head, tokenizer, spec, base
        if spec.lora is None:
            module.requires_grad_(True)
            self._adapter_names = [n for n, _ in module.named_parameters()]
        else:
            self._adapter_names = adapter_parameter_names(module, ADAPTER)
        head.requires_grad_(True)

    @property
    def is_adapter(self) -> bool:
        return self.spec.lora is not None

    def trainable_parameter_names(self) -> list[str]:
        return [f"module.{n}" for n in self._adapter_names] + [f"head.{n}" for n, _ in self.head.named_parameters()]

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards [B] read at each row's last real token."""
        return self.head(last_token_hidden(backbone_of(self.module), input_ids, attention_mask))

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str], batch_size: int = 64) -> Tensor:
        """Score text pairs, tokenized exactly as in training (prompt, response, EOS)."""
        from lightrlhf.data.modules import right_pad

        was_training = self.training
        self.eval()
        out = []
        try:
            for start in range(0, len(prompts), batch_size):
                rows = [encode_prompt(self.tokenizer, p) + encode_response(self.tokenizer, r)
                        for p, r in zip(prompts[start:start + batch_size], responses[start:start + batch_size],
                                        strict=True)]
                ids, mask = right_pad(rows, self.tokenizer.pad_token_id)
                out.append(self(ids, mask))
        finally:
            self.train(was_training)
        return torch.cat(out) if out else torch.zeros(0)

    # -- export / load -------------------------------------------------------------------------
    def save(self, out_dir: str | Path, *, stage: str = "rm", config: dict | None = None,
             metrics: dict | None = None) -> Path:
        with atomic_directory(out_dir) as staging:
            self.module.save_pretrained(staging, safe_serialization=True)
            save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, staging / HEAD_FILE)
            self.tokenizer.save_pretrained(staging)
            write_manifest(staging, manifest(stage=stage, kind="reward_model",
                                             weights="adapter" if self.is_adapter else "full", base=self.base,
                                             config=config, metrics=metrics, head=HEAD_FILE,
                                             hidden_size=self.head.linear.in_features))
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> RewardModel:
        """Load a reward-model export (in a fresh process too): base, adapter, head, tokenizer."""
        directory = Path(directory)
        meta = reward_manifest(directory)
        if not (directory / HEAD_FILE).is_file():
            raise UserError(f"{directory}: reward model export has no {HEAD_FILE}")
        tokenizer = load_tokenizer(ModelSpec(name_or_path=str(directory)))
        if meta["weights"] == "full":
            spec = ModelSpec(name_or_path=str(directory), dtype=dtype, lora=None)
            module, identity = load_base_model(spec)
        else:
            from peft import PeftModel

            spec = ModelSpec(name_or_path=meta["base"]["name_or_path"], dtype=dtype)
            base_model, identity = load_base_model(spec)
            check_same_base(identity, meta["base"], what=str(directory))
            module = PeftModel.from_pretrained(base_model, directory, adapter_name=ADAPTER)
        head = ScoreHead(meta["hidden_size"])
        head.load_state_dict(load_file(directory / HEAD_FILE))
        model = cls(module, head, tokenizer, spec, identity)
        model.requires_grad_(False)
        return model.eval()


def reward_manifest(directory: str | Path, key: str | None = None) -> dict:
    """The manifest of a reward-model export; anything else is a one-line error (naming `key`)."""
    directory = Path(directory)
    where = f"config {key}: {directory}" if key else str(directory)
    meta = read_export_manifest(directory) if directory.is_dir() else None
    if meta is None:
        raise UserError(f"{where} is not a lightrlhf export directory")
    if meta.get("kind") != "reward_model":
        raise UserError(f"{where} is a {meta.get('kind')} export (from stage {meta.get('stage')!r}), "
                        "not a reward model")
    return meta


def load_reward_model_for_training(spec: ModelSpec, tokenizer=None, head_std: float = 0.02) -> RewardModel:
    """Config target for the RM stage: base + fresh LoRA adapter (or full weights) + fresh head."""
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    base, identity = load_base_model(spec)
    if spec.lora is None:
        module = base
    else:
        from peft import get_peft_model

        # detail: task type CAUSAL_LM, not SEQ_CLS: the head is ours (kept in its own file), so the
        # same adapter can later sit beside the policy's on one causal-LM base in PPO.
        module = get_peft_model(base, spec.lora.to_peft("CAUSAL_LM"), adapter_name=ADAPTER)
    return RewardModel(module, ScoreHead(hidden_size_of(module), head_std), tokenizer, spec, identity)
