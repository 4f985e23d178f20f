"""Loading tokenizers and base models, and knowing exactly which base weights were loaded.

An adapter is only valid on the exact weights it was trained on. Every loaded base therefore comes
with a `BaseIdentity`: its name and a fingerprint of its weights. The fingerprint of a plain model
directory is a SHA-256 over its weight files; the fingerprint of a base made by merging an SFT
adapter export into its own base is SHA-256(base fingerprint, adapter file hash). The second rule
matters: it names the merged weights without hashing floating-point results, which differ in the
last bits between machines, so an RM trained on a GPU box still matches the same SFT base here.

Loading is safe by default: `trust_remote_code` is off unless the config sets it; safetensors are
preferred by transformers whenever the directory has them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lightrlhf.errors import UserError
from lightrlhf.models.spec import ModelSpec

EXPORT_MANIFEST = "lightrlhf.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


@dataclass(frozen=True)
class BaseIdentity:
    name_or_path: str
    fingerprint: str

    def to_dict(self) -> dict[str, str]:
        return asdict(self)


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_model_dir(name_or_path: str, revision: str | None = None, key: str = "model.name_or_path") -> Path:
    """A local directory for `name_or_path`: itself, or the hub snapshot (downloaded if online)."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        return path.resolve()
    if path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
        raise UserError(f"config {key}: {name_or_path} is not a model directory")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name_or_path, revision=revision,
                                      allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja",
                                                      "*.tiktoken", "*.py"]))
    except Exception as error:  # any hub failure (offline, unknown id, gated) is the user's to fix
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"config {key}: cannot load {name_or_path!r}: not a local directory and not "
                        f"available from the hub ({reason})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@functools.lru_cache(maxsize=64)
def _cached_file_hash(path: str, size: int, mtime_ns: int) -> str:
    return sha256_file(Path(path))


def file_hash(path: Path) -> str:
    stat = path.stat()
    return _cached_file_hash(str(path), stat.st_size, stat.st_mtime_ns)


def weights_fingerprint(model_dir: Path, key: str | None = None) -> str:
    """SHA-256 over the names and contents of a directory's weight files; `key`: the config key that
    named the directory, for the message when it has none."""
    files = sorted(p for p in model_dir.iterdir() if p.suffix in WEIGHT_SUFFIXES and p.is_file())
    safetensors = [p for p in files if p.suffix == ".safetensors"]
    files = safetensors or files  # the files transformers would actually read
    if not files:
        where = f"config {key}: {model_dir}" if key else str(model_dir)
        raise UserError(f"{where}: no weight files (*.safetensors or *.bin) in this model directory")
    digest = hashlib.sha256()
    for p in files:
        digest.update(p.name.encode() + b"\0" + file_hash(p).encode() + b"\n")
    return digest.hexdigest()


def merged_fingerprint(base: BaseIdentity, adapter_file: Path) -> str:
    return hashlib.sha256(f"{base.fingerprint}+{file_hash(adapter_file)}".encode()).hexdigest()


def read_export_manifest(directory: Path) -> dict | None:
    path = directory / EXPORT_MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: unreadable export manifest ({error})") from None


def load_tokenizer(spec: ModelSpec):
    """The tokenizer of `spec`, with a pad token guaranteed (EOS is reused when there is none)."""
    _quiet_transformers()
    from transformers import AutoTokenizer

    source = spec.tokenizer or spec.name_or_path
    directory = resolve_model_dir(source, spec.revision, "model.tokenizer" if spec.tokenizer else "model.name_or_path")
    manifest = read_export_manifest(directory)
    if manifest is not None and not (directory / "tokenizer_config.json").exists():
        raise UserError(f"{directory}: export has no tokenizer files")
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, trust_remote_code=spec.trust_remote_code)
    except Exception as error:
        raise UserError(f"config model.tokenizer: cannot load a tokenizer from {directory} "
                        f"({str(error).splitlines()[0] if str(error) else type(error).__name__})") from None
    if tokenizer.eos_token is None and tokenizer.sep_token is not None:
        # detail: an encoder's tokenizer (BERT) has no EOS; its [SEP] closes a segment, so prompt, then
        # response and EOS reads [CLS] prompt [SEP] response [SEP]: BERT's own layout of a text pair
        tokenizer.eos_token = tokenizer.sep_token
    if tokenizer.pad_token_id is None:
        # detail: a pad token equal to EOS is safe here because padding is always tracked by the
        # attention mask, never by comparing token ids with pad_token_id.
        tokenizer.pad_token = tokenizer.eos_token
    if spec.max_length is not None:
        tokenizer.model_max_length = spec.max_length
    return tokenizer


def is_encoder(name_or_path: str, revision: str | None = None, trust_remote_code: bool = False) -> bool:
    """Whether the model is an encoder (BERT, RoBERTa, ...): an architecture with a masked-LM head and
    no decoder. Its text is read both ways, so it is no causal LM, and a reward model on it scores from
    the first token ([CLS]) instead of the last."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    directory = resolve_model_dir(name_or_path, revision)
    if read_export_manifest(directory) is not None and not (directory / "config.json").is_file():
        return False  # an adapter export: the causal-LM exports are the only ones loaded as a base
    try:
        config = AutoConfig.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError):
        return False  # loading it as a causal LM gives the one-line error
    return not config.is_encoder_decoder and config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def _from_pretrained(directory: Path, spec: ModelSpec, encoder: bool = False):
    from transformers import AutoModel, AutoModelForCausalLM

    kind = "an encoder" if encoder else "a causal language model"
    if not encoder and is_encoder(str(directory), trust_remote_code=spec.trust_remote_code):
        # detail: transformers would load BERT as BertLMHeadModel, a "causal" LM that reads the tokens
        # it is to predict
        raise UserError(f"config model.name_or_path: {directory} is an encoder (masked LM), not a causal language "
                        "model; it can be the base of a reward model (stage=rm) or of reward-weighted fine-tuning by "
                        "mask-predict (stage=reward_weighted_mlm), not of a causal policy")
    try:
        if encoder:  # the transformer body alone: no masked-LM head, no pooler (the score head reads [CLS])
            model = AutoModel.from_pretrained(directory, dtype=getattr(torch, spec.dtype),
                                              trust_remote_code=spec.trust_remote_code)
            if getattr(model, "pooler", None) is not None:
                model.pooler = None
            return model
        return AutoModelForCausalLM.from_pretrained(
            directory, dtype=getattr(torch, spec.dtype), trust_remote_code=spec.trust_remote_code,
            attn_implementation=spec.attn_implementation)
    except (ValueError, OSError, KeyError) as error:
        if "trust_remote_code" in str(error):
            raise UserError(f"config model.trust_remote_code: {directory} needs custom code from the model "
                            "repository; set model.trust_remote_code=true if you trust it") from None
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UserError(f"config model.name_or_path: cannot load {kind} from {directory} ({first})") from None


def load_base_model(spec: ModelSpec, encoder: bool = False):
    """(causal LM with all weights frozen, its BaseIdentity). Export directories are followed.
    encoder: the transformer body of an encoder (`is_encoder`) instead, from a plain model directory."""
    _quiet_transformers()
    directory = resolve_model_dir(spec.name_or_path, spec.revision)
    manifest = read_export_manifest(directory)
    if manifest is None or encoder:
        model = _from_pretrained(directory, spec, encoder)
        identity = BaseIdentity(str(directory), weights_fingerprint(directory))
    else:
        model, identity = _load_export_as_base(directory, manifest, spec)
    model.requires_grad_(False)
    model.config.use_cache = False  # training forwards; generation passes use_cache explicitly
    if spec.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, identity


def _load_export_as_base(directory: Path, manifest: dict, spec: ModelSpec):
    from dataclasses import replace

    if manifest.get("kind") != "causal_lm":
        raise UserError(f"config model.name_or_path: {directory} is a {manifest.get('kind')} export "
                        f"(from stage {manifest.get('stage')!r}), not a causal language model")
    if manifest.get("weights") == "full":
        return _from_pretrained(directory, spec), BaseIdentity(str(directory), weights_fingerprint(directory))
    from peft import PeftModel

    recorded = manifest["base"]
    base_model, base_id = load_base_model(replace(spec, name_or_path=recorded["name_or_path"], revision=None,
                                                  gradient_checkpointing=False))
    check_same_base(base_id, recorded, what=str(directory))
    merged = PeftModel.from_pretrained(base_model, directory).merge_and_unload()
    return merged, BaseIdentity(str(directory), merged_fingerprint(base_id, directory / "adapter_model.safetensors"))


def check_same_base(loaded: BaseIdentity, recorded: dict, what: str) -> None:
    """An adapter trained on other weights gives silently wrong outputs: refuse it in one line."""
    if loaded.fingerprint != recorded["fingerprint"]:
        raise UserError(
            f"{what} was trained on base {recorded['name_or_path']} (fingerprint {recorded['fingerprint'][:12]}) "
            f"but the base loaded here is {loaded.name_or_path} (fingerprint {loaded.fingerprint[:12]}); "
            "an adapter is only valid on the exact weights it was trained on")
