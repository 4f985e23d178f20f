"""Exports: the Hugging Face-format directory every stage ends with, and the next stage starts from.

    export/
      adapter_model.safetensors, adapter_config.json   (LoRA runs; or model.safetensors + config.json)
      score_head.safetensors                           (reward models: the head travels with the adapter)
      tokenizer files
      lightrlhf.json      what produced it: stage, kind, weights, base identity, config, metrics
      merged/             with export.merged=true: adapter folded into full weights + tokenizer

`lightrlhf.json["base"]` is the identity of the weights the adapter was trained on; loading the
adapter onto anything else is refused (see `loading.check_same_base`). The directory is built under
a temporary name and renamed into place, so a crash never leaves half an export.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

from lightrlhf import __version__
from lightrlhf.io import atomic_directory
from lightrlhf.models.loading import EXPORT_MANIFEST, BaseIdentity


def manifest(*, stage: str, kind: str, weights: str, base: BaseIdentity, config: dict[str, Any] | None,
             metrics: dict[str, float] | None, **extra: Any) -> dict[str, Any]:
    return {"lightrlhf_version": __version__, "stage": stage, "kind": kind, "weights": weights,
            "base": base.to_dict(), "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            **extra, "metrics": metrics or {}, "config": config or {}}


def write_manifest(directory: Path, content: dict[str, Any]) -> None:
    # the config and metrics as written (a Chinese data path stays readable), in UTF-8 whatever the locale
    (directory / EXPORT_MANIFEST).write_text(json.dumps(content, indent=1, sort_keys=False, default=str,
                                                        ensure_ascii=False), encoding="utf-8")


def export_causal_lm(model, out_dir: str | Path, *, stage: str, config: dict | None = None,
                     metrics: dict | None = None, merged: bool = False) -> Path:
    """Write `model` (a `CausalLM`) as an adapter (LoRA) or full weights, plus tokenizer and manifest."""
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as staging:
        module = model.module
        if model.is_adapter:
            module.save_pretrained(staging, safe_serialization=True)
            # detail: peft records the base as given; point it at the resolved directory so that
            # plain `AutoPeftModelForCausalLM.from_pretrained(export)` finds it in a fresh process.
            _set_adapter_base_path(staging, model.base.name_or_path)
            weights = "adapter"
        else:
            module.save_pretrained(staging, safe_serialization=True)
            weights = "full"
        model.tokenizer.save_pretrained(staging)
        if merged and model.is_adapter:
            merged_dir = staging / "merged"
            model.merged_model().save_pretrained(merged_dir, safe_serialization=True)
            model.tokenizer.save_pretrained(merged_dir)
        write_manifest(staging, manifest(stage=stage, kind="causal_lm", weights=weights, base=model.base,
                                         config=config, metrics=metrics, merged=bool(merged and model.is_adapter)))
    return out_dir


def _set_adapter_base_path(directory: Path, base_path: str) -> None:
    path = directory / "adapter_config.json"
    content = json.loads(path.read_text())
    content["base_model_name_or_path"] = base_path
    path.write_text(json.dumps(content, indent=2, sort_keys=True))


def export_policy_adapter(model, adapter: str, out_dir: str | Path, *, stage: str, config: dict | None = None,
                          metrics: dict | None = None, merged: bool = False) -> Path:
    """Export one named adapter of a multi-adapter model (PPO's policy) as a standalone causal LM.

    peft writes a non-default adapter into a subdirectory named after it; its files are moved up so
    the export looks like any other adapter export (and `AutoPeftModelForCausalLM` loads it).
    """
    import copy
    import shutil

    out_dir = Path(out_dir)
    module = model.module
    with atomic_directory(out_dir) as staging:
        module.save_pretrained(staging, selected_adapters=[adapter], safe_serialization=True)
        nested = staging / adapter
        if nested.is_dir():
            for item in nested.iterdir():
                shutil.move(str(item), staging / item.name)
            nested.rmdir()
        _set_adapter_base_path(staging, model.base.name_or_path)
        model.tokenizer.save_pretrained(staging)
        if merged:
            folded = copy.deepcopy(module)
            for other in [name for name in folded.peft_config if name != adapter]:
                folded.delete_adapter(other)
            folded = folded.merge_and_unload()
            folded.save_pretrained(staging / "merged", safe_serialization=True)
            model.tokenizer.save_pretrained(staging / "merged")
        write_manifest(staging, manifest(stage=stage, kind="causal_lm", weights="adapter", base=model.base,
                                         config=config, metrics=metrics, merged=bool(merged)))
    return out_dir
