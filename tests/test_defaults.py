"""One home for each default: a shipped YAML and the signature its `_target_` names say the same thing.

The YAML under conf/ holds the value a user runs with; a constructor's default is what a reader of
the Python learns, and what a test that builds a part from Python gets. So for every node with a
`lightrlhf.*` `_target_` in a *home* YAML, each key whose parameter has a default must state exactly
that default (interpolations resolved; 1 == 1.0, a list == a tuple). The homes are

  conf/train.yaml                  `numerics` and the top-level keys (RunSettings, ExportSettings)
  conf/stage/<stage>.yaml          `stage`, `policy`, `value`, `reward`, composed with the stage's usual data
  conf/<group>/<default>.yaml      the option train.yaml picks (model=tiny, data=demo_sft, demo, callbacks,
                                   hydra callbacks); a group's other options are alternatives that
                                   override these defaults by design and are not compared

A parameter whose value legitimately differs between homes (one learning rate per stage, one
max_length per data file) has no default: it is required, and every YAML states it. The few
exceptions, where a YAML value and the Python default may differ, are in DIFFERS with their reasons.

Nested blocks. `optim: OptimizerSpec = OptimizerSpec(lr=2e-3)` is checked field by field against
that instance *and* against OptimizerSpec's own defaults. `generation: GenerationSpec | None = None`
means GenerationSpec(), so the node is checked against GenerationSpec's own defaults -- and such a
None is refused when the class cannot be built without arguments: the constructor would then be
hiding a fallback value in its body, where neither a reader nor this test can see it.

The reverse. A parameter with a default that a home does not mention runs with the Python default;
that is deliberate only for the parameters in UNMENTIONED (each with why). The stages' build-time
arguments (model, datamodule, spec, source, tokenizer and the role blocks) are not config keys, and a
target whose constructor is inherited from another library (StepProgressBar: Lightning's
RichProgressBar) keeps its defaults there and is skipped.

Every failure names the YAML file, the key, the YAML value and the Python default.
The second test checks that every leaf key of every YAML under conf/ carries a comment.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

import pytest
from conftest import CONF, ROOT

from lightrlhf.launch.build import locate
from lightrlhf.launch.run import RunSettings, to_plain

EMPTY = inspect.Parameter.empty
TARGET, PARTIAL = "_target_", "_partial_"
# the data each stage is usually run with (test_configs.py composes the same pairs)
STAGE_DATA = {"rm": ["data=demo_pref"], "ppo": ["data=demo_prompts"], "grpo": ["data=demo_prompts"],
              "rloo": ["data=demo_prompts"], "reward_weighted": ["data=demo_prompts"], "best_of_n": ["data=demo_prompts"], "sample_pairs": ["data=demo_prompts"],
              "label": ["stage.candidates=candidates.jsonl"]}
# blocks a stage file defines next to `stage` (PPO's roles)
ROLE_BLOCKS = ("policy", "value", "reward")
# arguments the launcher passes at build time (launch/run.py: build_stage), never config keys
GIVEN = {"stage": {"model", "datamodule", "policy", "value", "reward", "numerics"},
         "stage.model": {"spec", "tokenizer", "policy", "value", "reward", "numerics"},
         "stage.datamodule": {"source", "tokenizer"}}

# Class.parameter -> why a home's YAML value and the Python default may legitimately differ.
DIFFERS = {
    "PromptDataModule.max_eval_prompts": "conf/stage/ppo.yaml ties it to stage.eval.num_prompts by "
                                         "interpolation; from Python, None (every validation prompt) follows "
                                         "whatever EvalSpec.num_prompts the stage is given",
    "OptimizerSpec.eps": "conf/stage/pbrl.yaml uses cleanrl's Adam epsilon 1e-5 for the control actor-critic; "
                         "the language-model stages keep AdamW's usual 1e-8",
    "NormalizeSpec.init_rollouts": "conf/stage/reward_weighted_mlm.yaml samples k = 8 infills per prompt, so 2 "
                                   "batches give 256 scores, as the online stages' 4 batches of 4 do",
    "SchedulerSpec.min_lr_ratio": "conf/stage/pbrl.yaml anneals PPO's learning rate to 0 at the end of the budget "
                                  "(cleanrl's anneal_lr); the other stages decay to a floor",
}

# Class.parameter -> why a home may leave it out and run with the Python default.
UNMENTIONED = {
    "ModelSpec.revision": "hub revision; the demo's model is a local directory",
    "ModelSpec.max_length": "None = the tokenizer's model_max_length (the tiny model's own); hub models set it",
    "LoraSpec.use_rslora": "a variant for sweeping r; off in every shipped config",
    "DataSource.val_fraction": "only without validation_path (the demo names its validation files); "
                               "conf/data/jsonl.yaml shows it",
    "DataSource.split_seed": "only without validation_path; conf/data/jsonl.yaml shows it",
    "DataSource.split": "hub datasets only; conf/data/hh_rlhf.yaml and the UltraFeedback files show it",
    "DataSource.validation_split": "hub datasets only; conf/data/hh_rlhf.yaml and others show it",
    "DataSource.strict": "dropping and counting bad rows suits every shipped data file; conf/data/jsonl.yaml shows it",
    "DataSource.margin_from_scores": "needs score fields (UltraFeedback); conf/data/jsonl.yaml shows it",
    "OptimizerSpec.betas": "AdamW's usual values; no stage changes them",
    "OptimizerSpec.eps": "AdamW's usual value; no stage changes it",
    "SchedulerSpec.min_lr_ratio": "the decay floor; PPO's constant schedule has no decay",
    "RewardSpec.normalize": "best-of-n (conf/stage/best_of_n.yaml) ranks by the raw composite score; shaping the "
                            "score is for a training signal, and conf/stage/ppo.yaml states it",
    "RewardSpec.clip": "likewise: not used by best-of-n, stated in conf/stage/ppo.yaml",
    "RewardSpec.missing_eos_penalty": "likewise: not used by best-of-n, stated in conf/stage/ppo.yaml",
    "PeriodicCheckpoint.save_on_train_end": "always wanted in a run; a switch for code that drives the callback",
    "PeriodicCheckpoint.save_on_signal": "always wanted in a run; a switch for code that drives the callback",
}


# -- Python side -------------------------------------------------------------------------------------
def _own_defaults(target: Any) -> dict[str, Any] | None:
    """name -> default (EMPTY when required) of a lightrlhf constructor; None when its signature is
    another library's (inherited __init__) -- its defaults live there."""
    if dataclasses.is_dataclass(target) and isinstance(target, type):
        return {f.name: (f.default if f.default is not dataclasses.MISSING else
                         f.default_factory() if f.default_factory is not dataclasses.MISSING else EMPTY)
                for f in dataclasses.fields(target) if f.init}
    function = target.__init__ if inspect.isclass(target) else target
    if not str(getattr(function, "__module__", "") or "").startswith("lightrlhf"):
        return None
    return {k: p.default for k, p in inspect.signature(target).parameters.items()
            if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}


def _hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:
        return {}


def _mentions(hint: Any, cls: type) -> bool:
    if hint is cls:
        return True
    return typing.get_origin(hint) in (typing.Union, types.UnionType) and cls in typing.get_args(hint)


def _is_instance(value: Any) -> bool:
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def same(a: Any, b: Any) -> bool:
    """Equal as config values: numbers numerically (bools strictly), lists and tuples alike."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, Path) or isinstance(b, Path):
        return str(a) == str(b)
    return a == b


# -- the check ---------------------------------------------------------------------------------------
class Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []
        self.used: set[str] = set()

    def node(self, file: str, key: str, node: dict, instance: Any = None) -> None:
        target = node[TARGET] if not isinstance(node[TARGET], str) else locate(node[TARGET], key)
        if not str(getattr(target, "__module__", "")).startswith("lightrlhf"):
            return
        defaults = _own_defaults(target)
        if defaults is None:
            return
        name, hints, given = target.__name__, _hints(target), GIVEN.get(key, set())
        for param, value in node.items():
            if param in given and isinstance(value, dict) and TARGET in value:
                self.node(file, f"{key}.{param}", value)  # stage.model, stage.datamodule: built apart
            if param in (TARGET, PARTIAL) or param in given or param not in defaults:
                continue  # an unknown key is test_configs.py's to report
            expected = [defaults[param]] + ([getattr(instance, param)] if instance is not None else [])
            for default in expected:
                self.value(file, f"{key}.{param}", f"{name}.{param}", value, default, hints.get(param))
        for param, default in defaults.items():
            if param in node or param in given or default is EMPTY:
                continue
            if f"{name}.{param}" in UNMENTIONED:
                self.used.add(f"{name}.{param}")
            else:
                self.problems.append(f"{file}: {key}.{param} is not in the YAML, so it runs with the Python default "
                                     f"{name}.{param} = {default!r}; state it in the YAML, or list it in UNMENTIONED "
                                     "with why")
            if instance is not None and not same(getattr(instance, param), default):
                self.problems.append(f"{file}: {key}.{param} is not in the YAML, so it runs with {default!r}, but "
                                     f"the default {type(instance).__name__}(...) of the parameter says "
                                     f"{getattr(instance, param)!r}")

    def value(self, file: str, key: str, qualified: str, value: Any, default: Any, hint: Any) -> None:
        nested = isinstance(value, dict) and TARGET in value
        if nested or (isinstance(value, dict) and _is_instance(default)):
            node = value if nested else {TARGET: type(default), **value}
            if _is_instance(default):
                self.node(file, key, node, instance=default)
                return
            cls = locate(node[TARGET], key) if isinstance(node[TARGET], str) else node[TARGET]
            if default is None and inspect.isclass(cls) and _mentions(hint, cls):
                required = [k for k, d in (_own_defaults(cls) or {}).items() if d is EMPTY]
                if required:
                    self.problems.append(
                        f"{file}: {key}: the Python default {qualified} = None stands for {cls.__name__}(), which "
                        f"cannot be built ({', '.join(required)} required), so the fallback hides in the "
                        f"constructor's body (the YAML says {', '.join(f'{k}={value.get(k)!r}' for k in required)}); "
                        f"make the default {cls.__name__}(...) explicit, or the parameter required")
            self.node(file, key, node)
            return
        if default is EMPTY or same(value, default):
            return
        if qualified in DIFFERS:
            self.used.add(qualified)
            return
        self.problems.append(f"{file}: {key} = {value!r} in the YAML, but the Python default {qualified} = "
                             f"{default!r} (change the Python default; if homes legitimately differ, make the "
                             "parameter required)")


def _compose(overrides: list[str], tmp_path: Path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    import lightrlhf.launch  # noqa: F401  (registers the resolvers)

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides + [f"paths.output_dir={tmp_path}"],
                      return_hydra_config=True)
    choices = dict(cfg.hydra.runtime.choices)
    hydra_callbacks = OmegaConf.to_container(cfg.hydra.callbacks, resolve=True)
    with open_dict(cfg):
        del cfg["hydra"]
    return to_plain(cfg), choices, hydra_callbacks


def homes(tmp_path: Path):
    """(YAML file, config key, node) for every node whose defaults live in that file."""
    plain, choices, hydra_callbacks = _compose([], tmp_path)
    settings = {f.name: plain[f.name] for f in dataclasses.fields(RunSettings) if f.name in plain}
    yield "conf/train.yaml", "", {TARGET: RunSettings, **settings}
    yield "conf/train.yaml", "numerics", plain["numerics"]
    for group in ("model", "data", "demo"):
        yield f"conf/{group}/{choices[group]}.yaml", group, plain[group]
    for name, node in (plain.get("callbacks") or {}).items():
        yield f"conf/callbacks/{choices['callbacks']}.yaml", f"callbacks.{name}", node
    for name, node in (hydra_callbacks or {}).items():
        yield "conf/hydra/default.yaml", f"hydra.callbacks.{name}", node
    for path in sorted((CONF / "stage").glob("*.yaml")):
        plain, _, _ = _compose([f"stage={path.stem}"] + STAGE_DATA.get(path.stem, []), tmp_path)
        for key in ("stage",) + ROLE_BLOCKS:
            if isinstance(plain.get(key), dict):
                yield f"conf/stage/{path.name}", key, plain[key]


def _walk(checker: Checker, file: str, key: str, node: Any) -> None:
    """Check every `_target_` node in `node`, outermost first (nested ones are checked by their parent)."""
    if isinstance(node, dict):
        if TARGET in node:
            checker.node(file, key, node)
            return
        for k, v in node.items():
            _walk(checker, file, f"{key}.{k}" if key else k, v)
    elif isinstance(node, list):
        for i, item in enumerate(node):
            _walk(checker, file, f"{key}[{i}]", item)


def test_every_yaml_value_is_its_python_default(tmp_path):
    checker = Checker()
    for file, key, node in homes(tmp_path):
        _walk(checker, file, key, node)
    stale = sorted((set(DIFFERS) | set(UNMENTIONED)) - checker.used)
    problems = checker.problems + [f"{entry}: in DIFFERS/UNMENTIONED, but no home needs it any more" for entry in stale]
    assert not problems, f"{len(problems)} defaults disagree:\n" + "\n".join(problems)


# -- comments ----------------------------------------------------------------------------------------
KEY_LINE = re.compile(r"^\s*([A-Za-z_][\w.\-/]*)\s*:(?:\s|$)")
EXEMPT_KEYS = {TARGET, PARTIAL, "defaults"}


def _code(line: str) -> str:
    """The line without its comment (a `#` at the start or after whitespace)."""
    match = re.search(r"(^|\s)#", line)
    return line[: match.start()] if match else line


def uncommented_keys(text: str) -> list[tuple[int, str]]:
    """(line number, key) of each leaf key that has neither an end-of-line comment nor a comment line
    right above it (blank lines skipped). Block keys (`stage:`), list items, `_target_`, `_partial_`,
    `defaults:` and lines inside a multi-line `[...]` / `{...}` are exempt."""
    missing, previous, depth = [], "", 0
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        code = _code(line)
        inside_flow = depth > 0
        depth += code.count("[") + code.count("{") - code.count("]") - code.count("}")
        match = None if inside_flow else KEY_LINE.match(code)
        if match and match.group(1) not in EXEMPT_KEYS:
            leaf = code[match.end():].strip() != ""
            commented = code != line or previous.lstrip().startswith("#")
            if leaf and not commented:
                missing.append((number, match.group(1)))
        previous = line
    return missing


def test_uncommented_keys_are_found():
    text = ("# @package _global_\ndefaults:\n  - override /stage: ppo\nstage:\n  _target_: x.Y\n"
            "  # why\n  a: 1\n  b: 2  # why\n\n  c: 3\n  d: [1,\n      e: 2]\n  - f: 1\n")
    assert uncommented_keys(text) == [(10, "c"), (11, "d")]


@pytest.mark.parametrize("path", sorted(CONF.rglob("*.yaml")), ids=lambda p: str(p.relative_to(CONF)))
def test_every_config_key_has_a_comment(path):
    missing = uncommented_keys(path.read_text())
    where = path.relative_to(ROOT)
    assert not missing, "keys without a comment (end of line, or a comment line above):\n" + "\n".join(
        f"{where}:{n}: {key}" for n, key in missing)
