"""A reward model: a causal LM's backbone with a LoRA adapter and a scalar score head.

    r(x, y) = w . h_T + b,   h_T = last hidden state at the last real token of prompt + response + EOS

The head reads the backbone's hidden states directly (the LM head's vocabulary logits are never
computed). "Last real token" is found from the attention mask, so left and right padding give the
same score, and a pad token equal to EOS does no harm.

On an encoder (BERT, RoBERTa: `loading.is_encoder`) the head reads the *first* token instead:

    r(x, y) = w . h_0 + b,   h_0 = last hidden state at [CLS] of [CLS] prompt [SEP] response [SEP]

A causal model's last token is the only one that has seen the whole text; an encoder's every token
has, and [CLS] is the one its pretraining made a summary of the sequence (Devlin et al. 2019, as in
BERT's sequence classification). The export records it (`lightrlhf.json["pooling"]`: "first" or
"last"), and such a model always scores through its own tokenizer, never as an adapter on a
policy's base: a policy is a causal LM.

An export keeps the adapter *and* the head (`score_head.safetensors`) together with the tokenizer:
saving only the adapter, as a plain peft `save_pretrained` would, loses the head and silently
scores with a random one. `RewardModel.from_pretrained(export)` loads the recorded base, checks
its fingerprint, applies adapter and head, and `score(prompts, responses)` gives exactly the
scores the model had at the end of training.

An ensemble (`stage.ensemble=K`, rl/ensemble.py) is K members on the one frozen base, each its own
LoRA adapter ("member0" ...) and head, so the base is held once and each member's forward costs one
pass of the small model with its adapter on. Its export keeps one folder per member (adapter and
head, as peft writes a named adapter) and lists them in `lightrlhf.json["members"]`:

    export/member0/{adapter_model.safetensors, adapter_config.json, score_head.safetensors}, member1/ ...

`forward` and `score` give the members' mean -- the reward every consumer (PPO, best-of-n, stats)
uses -- and `member_rewards` / `member_scores` give all K, for the std. A single reward model is
the ensemble of one, with the layout above it has always had (adapter and head at the top).
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
from lightrlhf.models.adapters import active_adapter, adapter_parameter_names
from lightrlhf.models.export import manifest, write_manifest
from lightrlhf.models.loading import (
    BaseIdentity,
    check_same_base,
    is_encoder,
    load_base_model,
    load_tokenizer,
    read_export_manifest,
)
from lightrlhf.models.spec import ModelSpec
from lightrlhf.rl.shaping import last_valid_index

ADAPTER = "default"
HEAD_FILE = "score_head.safetensors"
POOLING = ("last", "first")  # the token the head reads: a causal LM's last real one, an encoder's [CLS]


def member_names(size: int) -> list[str]:
    """The adapters of an ensemble of `size`: the one "default" adapter, or member0, member1, ..."""
    return [ADAPTER] if size == 1 else [f"member{k}" for k in range(size)]


def member_dir(directory: Path, member: str) -> Path:
    """Where a member's adapter and head are in an export (peft keeps "default" at the top)."""
    return directory if member == ADAPTER else directory / member


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


def first_token_hidden(backbone: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """An encoder's hidden state at each row's first real token ([CLS]), whatever the padding."""
    positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions).last_hidden_state
    index = attention_mask.long().argmax(-1)  # detail: argmax gives the first maximum, the first 1
    return hidden[torch.arange(hidden.shape[0]), index]


class RewardModel(nn.Module):
    """`heads[k]` scores with adapter `members[k]` on (one of each for a single reward model);
    `pooling`: the token the heads read ("last", or "first" on an encoder)."""

    def __init__(self, module: nn.Module, heads: ScoreHead | list[ScoreHead], tokenizer, spec: ModelSpec,
                 base: BaseIdentity, members: list[str] | None = None, pooling: str = "last"):
        super().__init__()
        heads = [heads] if isinstance(heads, ScoreHead) else list(heads)
        members = members or member_names(len(heads))
        if len(members) != len(heads) or (len(members) > 1 and spec.lora is None):
            raise ValueError(f"{len(members)} member adapters for {len(heads)} heads (lora: {spec.lora})")
        if pooling not in POOLING:
            raise ValueError(f"pooling must be one of {POOLING}, got {pooling!r}")
        self.module, self.heads, self.tokenizer, self.spec, self.base = module, nn.ModuleList(heads), tokenizer, spec, base
        self.members, self.pooling = members, pooling
        self._hidden = first_token_hidden if pooling == "first" else last_token_hidden
        if spec.lora is None:
            module.requires_grad_(True)
            self._adapter_names = [n for n, _ in module.named_parameters()]
        else:
            self._adapter_names = [n for member in members for n in adapter_parameter_names(module, member)]
            trainable = set(self._adapter_names)
            for name, param in module.named_parameters():
                param.requires_grad_(name in trainable)
        self.heads.requires_grad_(True)

    @property
    def head(self) -> ScoreHead:
        """The first member's head (a single reward model's only one)."""
        return self.heads[0]

    @property
    def ensemble_size(self) -> int:
        return len(self.members)

    @property
    def is_adapter(self) -> bool:
        return self.spec.lora is not None

    def trainable_parameter_names(self) -> list[str]:
        return [f"module.{n}" for n in self._adapter_names] + [f"heads.{n}" for n, _ in self.heads.named_parameters()]

    def member_parameter_names(self) -> list[list[str]]:
        """Each member's trainable weights (adapter and head), as in `named_parameters()`."""
        if self.ensemble_size == 1:
            return [self.trainable_parameter_names()]
        return [[f"module.{n}" for n in adapter_parameter_names(self.module, member)] +
                [f"heads.{k}.{n}" for n, _ in self.heads[k].named_parameters()]
                for k, member in enumerate(self.members)]

    def member_rewards(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """[K, B]: each member's rewards, read at each row's last real token (an encoder's first)."""
        backbone = backbone_of(self.module)
        if self.ensemble_size == 1:
            return self.heads[0](self._hidden(backbone, input_ids, attention_mask)).unsqueeze(0)
        out = []
        for member, head in zip(self.members, self.heads, strict=True):
            with active_adapter(self.module, member):
                out.append(head(self._hidden(backbone, input_ids, attention_mask)))
        return torch.stack(out)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Rewards [B] read at each row's last real token, or an encoder's first (an ensemble's: the members' mean)."""
        return self.member_rewards(input_ids, attention_mask).mean(0)

    @torch.no_grad()
    def score(self, prompts: list[Prompt], responses: list[str], batch_size: int = 64) -> Tensor:
        """Score text pairs, tokenized exactly as in training (prompt, response, EOS): [N]."""
        return self.member_scores(prompts, responses, batch_size).mean(0)

    @torch.no_grad()
    def member_scores(self, prompts: list[Prompt], responses: list[str], batch_size: int = 64) -> Tensor:
        """As `score`, every member's: [K, N]."""
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
                out.append(self.member_rewards(ids, mask))
        finally:
            self.train(was_training)
        return torch.cat(out, dim=1) if out else torch.zeros(self.ensemble_size, 0)

    # -- export / load -------------------------------------------------------------------------
    def save(self, out_dir: str | Path, *, stage: str = "rm", config: dict | None = None,
             metrics: dict | None = None, offsets: Tensor | None = None) -> Path:
        """Write the export; `offsets` [K] are subtracted from the members' heads' biases (an
        ensemble's members aligned to one mean level, rl/ensemble.py: `align_offsets`)."""
        extra = {"members": list(self.members)} if self.ensemble_size > 1 else {}
        with atomic_directory(out_dir) as staging:
            self.module.save_pretrained(staging, safe_serialization=True)  # named adapters: a folder each
            for k, (member, head) in enumerate(zip(self.members, self.heads, strict=True)):
                state = {name: value.detach().clone().contiguous() for name, value in head.state_dict().items()}
                if offsets is not None:
                    state["linear.bias"] -= offsets[k].to(state["linear.bias"].dtype)
                save_file(state, member_dir(staging, member) / HEAD_FILE)
            self.tokenizer.save_pretrained(staging)
            write_manifest(staging, manifest(stage=stage, kind="reward_model",
                                             weights="adapter" if self.is_adapter else "full", base=self.base,
                                             config=config, metrics=metrics, head=HEAD_FILE,
                                             hidden_size=self.head.linear.in_features, pooling=self.pooling, **extra))
        return Path(out_dir)

    @classmethod
    def from_pretrained(cls, directory: str | Path, dtype: str = "float32") -> RewardModel:
        """Load a reward-model export (in a fresh process too): base, adapters, heads, tokenizer."""
        directory = Path(directory)
        meta = reward_manifest(directory)
        members = export_members(directory, meta)
        tokenizer = load_tokenizer(ModelSpec(name_or_path=str(directory)))
        pooling = meta.get("pooling", "last")  # exports from before encoders: causal, the last token
        encoder = pooling == "first"
        if meta["weights"] == "full":
            spec = ModelSpec(name_or_path=str(directory), dtype=dtype, lora=None)
            module, identity = load_base_model(spec, encoder=encoder)
        else:
            from peft import PeftModel

            spec = ModelSpec(name_or_path=meta["base"]["name_or_path"], dtype=dtype)
            base_model, identity = load_base_model(spec, encoder=encoder)
            check_same_base(identity, meta["base"], what=str(directory))
            module = PeftModel.from_pretrained(base_model, member_dir(directory, members[0]), adapter_name=members[0])
            for member in members[1:]:
                module.load_adapter(member_dir(directory, member), adapter_name=member)
        heads = [load_head(directory, meta, member) for member in members]
        model = cls(module, heads, tokenizer, spec, identity, members, pooling)
        model.requires_grad_(False)
        return model.eval()


def export_members(directory: Path, meta: dict) -> list[str]:
    """The member adapters of a reward-model export (["default"] for a single model), each checked."""
    members = meta.get("members") or [ADAPTER]
    if len(members) > 1 and meta.get("weights") == "full":
        raise UserError(f"{directory}: an ensemble export must hold LoRA adapters, not full weights")
    for member in members:
        if not (member_dir(directory, member) / HEAD_FILE).is_file():
            raise UserError(f"{directory}: reward model export has no {HEAD_FILE}"
                            + ("" if member == ADAPTER else f" for member {member}"))
    return members


def load_head(directory: Path, meta: dict, member: str = ADAPTER) -> ScoreHead:
    """One member's score head from an export."""
    head = ScoreHead(meta["hidden_size"])
    head.load_state_dict(load_file(member_dir(Path(directory), member) / HEAD_FILE))
    return head


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


def load_reward_model_for_training(spec: ModelSpec, tokenizer=None, head_std: float = 0.02,
                                   ensemble: int = 1) -> RewardModel:
    """Config target for the RM stage: base + fresh LoRA adapter (or full weights) + fresh head;
    with `ensemble` = K > 1, K fresh adapters and heads on the one base. Each member's adapter and
    head draw their initial weights in turn from the run's seeded generator, so the members start
    apart and every run with the same seed starts the same."""
    if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
        raise UserError(f"config stage.ensemble: must be an integer >= 1, got {ensemble!r}")
    if ensemble > 1 and spec.lora is None:
        raise UserError("config stage.ensemble: an ensemble is K LoRA adapters on one frozen base; "
                        "model.lora=null (full fine-tuning) would need K copies of the model")
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    encoder = is_encoder(spec.name_or_path, spec.revision, spec.trust_remote_code)
    base, identity = load_base_model(spec, encoder=encoder)
    members = member_names(ensemble)
    if spec.lora is None:
        module = base
    else:
        from peft import get_peft_model

        # detail: task type CAUSAL_LM, not SEQ_CLS: the head is ours (kept in its own file), so the
        # same adapter can later sit beside the policy's on one causal-LM base in PPO. An encoder's
        # adapter never does (a policy is causal): a plain feature extractor's.
        task = "FEATURE_EXTRACTION" if encoder else "CAUSAL_LM"
        module = get_peft_model(base, spec.lora.to_peft(task), adapter_name=members[0])
        for member in members[1:]:
            module.add_adapter(member, spec.lora.to_peft(task))
    heads = [ScoreHead(hidden_size_of(module), head_std) for _ in members]
    return RewardModel(module, heads, tokenizer, spec, identity, members, "first" if encoder else "last")
