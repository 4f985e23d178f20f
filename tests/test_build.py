"""The config builder: unknown keys, type checks from annotations, errors naming the full dotted key.

Targets are small classes and functions defined here and given to `build` as objects (`_target_`
accepts a callable as well as a dotted path); dotted paths are exercised with the standard library
and lightrlhf's own config classes.
"""

from __future__ import annotations

import datetime
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest

from lightrlhf.errors import ConfigError, UserError
from lightrlhf.launch.build import build, check_type
from lightrlhf.models.spec import LoraSpec, ModelSpec
from lightrlhf.validation import positive


@dataclass
class Clip:
    low: float = 0.8
    high: float = 1.2

    def __post_init__(self) -> None:
        positive("low", self.low)


@dataclass
class Settings:
    clip_range: float = 0.2
    epochs: int = 4
    whiten: bool = True
    name: str = "ppo"
    seed: Optional[int] = None
    optimizer: Literal["adam", "sgd"] = "adam"
    modules: list[str] = field(default_factory=list)
    betas: tuple[float, float] = (0.9, 0.95)
    clip: Clip = field(default_factory=Clip)
    path: Path = Path(".")


@dataclass
class Needs:
    lr: float
    steps: int = 1


@dataclass
class Item:
    n: int

    def __post_init__(self) -> None:
        positive("n", self.n)


@dataclass
class Holder:
    items: list = field(default_factory=list)
    extra: object = None


def loose(a: int, **rest):
    return {"a": a, **rest}


class MisconfigurationException(Exception):  # Lightning's name for "your settings conflict"
    pass


def conflicting(flag: bool = False):
    raise MisconfigurationException("flag conflicts with strategy\nsee the docs")


def refusing(value: int = 0):
    raise ValueError("value out of range\ntraceback-ish details")


def refusing_as_user(value: int = 0):
    raise UserError("data/x.jsonl:3: broken")


def buggy(value: int = 0):
    raise TypeError("a real bug")


def _error(node, key="stage", **given) -> str:
    with pytest.raises(ConfigError) as info:
        build(node, key, **given)
    return str(info.value)


# --- keys ---------------------------------------------------------------------------------------


def test_unknown_key_with_a_close_match():
    assert _error({"_target_": Settings, "clip_rnage": 0.1}) == \
        "config stage.clip_rnage: unknown key for Settings (did you mean clip_range?)"


def test_unknown_key_without_a_close_match():
    assert _error({"_target_": Settings, "zzz": 1}) == "config stage.zzz: unknown key for Settings"
    assert _error({"_target_": Settings, "zzz": 1}, key="") == "config zzz: unknown key for Settings"


def test_var_keyword_target_accepts_any_key():
    assert build({"_target_": loose, "a": 1, "anything": "x"}, "k") == {"a": 1, "anything": "x"}


def test_required_key_missing():
    error = _error({"_target_": Needs, "steps": 2}, key="optim")
    assert error == "config optim.lr: required by Needs, but not set"


# --- types --------------------------------------------------------------------------------------


def test_values_of_the_right_types_pass_and_are_converted():
    s = build({"_target_": Settings, "clip_range": 1, "epochs": 3, "whiten": False, "name": "x", "seed": 7,
               "optimizer": "sgd", "modules": ["q_proj", "v_proj"], "betas": [1, 0.5], "path": "out/run"}, "stage")
    assert s == Settings(clip_range=1.0, epochs=3, whiten=False, name="x", seed=7, optimizer="sgd",
                         modules=["q_proj", "v_proj"], betas=(1.0, 0.5), path=Path("out/run"))
    assert type(s.clip_range) is float  # int accepted for a float, and converted
    assert type(s.betas) is tuple and [type(b) for b in s.betas] == [float, float]
    assert isinstance(s.path, Path)
    assert build({"_target_": Settings, "seed": None}, "stage").seed is None


@pytest.mark.parametrize("key,value,message", [
    ("epochs", "four", "expected int, got str 'four'"),
    ("epochs", True, "expected int, got bool True"),
    ("epochs", 2.5, "expected int, got float 2.5"),
    ("clip_range", "0.2", "expected float, got str '0.2'"),
    ("clip_range", False, "expected float, got bool False"),
    ("whiten", 1, "expected bool, got int 1"),
    ("whiten", "yes", "expected bool, got str 'yes'"),
    ("name", 5, "expected str, got int 5"),
    ("seed", "a", "expected int or null, got str 'a'"),
    ("optimizer", "rmsprop", "expected one of 'adam', 'sgd', got str 'rmsprop'"),
    ("modules", "q_proj", "expected a list of str, got str 'q_proj'"),
    ("modules", ["q_proj", 1], "expected a list of str, got list ['q_proj', 1]"),
    ("betas", [0.9], "expected a list of 2 (float, float), got list [0.9]"),
    ("betas", [0.9, "x"], "expected a list of 2 (float, float), got list [0.9, 'x']"),
    ("betas", 0.9, "expected a list of 2 (float, float), got float 0.9"),
])
def test_wrong_types_are_reported_with_the_key(key, value, message):
    assert _error({"_target_": Settings, key: value}) == f"config stage.{key}: {message}"


def test_wrong_list_item_type_names_the_item_type():
    error = _error({"_target_": Settings, "modules": ["q_proj", 1]})
    assert error.startswith("config stage.modules: ") and "str" in error


def test_check_type_directly():
    assert check_type(3, float, "k") == 3.0 and type(check_type(3, float, "k")) is float
    assert check_type([1, 2], tuple[float, float], "k") == (1.0, 2.0)
    assert check_type([1, 2], tuple[int, ...], "k") == (1, 2)
    assert check_type("a", str | list[str], "k") == "a"
    assert check_type(["a"], str | list[str], "k") == ["a"]
    with pytest.raises(ConfigError, match=r"^config k: expected a list of 2 \(float, float\), got list \[1, 2, 3\]$"):
        check_type([1, 2, 3], tuple[float, float], "k")


# --- nested nodes -------------------------------------------------------------------------------


def test_nested_dataclass_given_as_a_plain_dict_is_built():
    s = build({"_target_": Settings, "clip": {"low": 0.5}}, "stage")
    assert s.clip == Clip(low=0.5, high=1.2)
    assert isinstance(s.clip, Clip)
    assert type(build({"_target_": Settings, "clip": {"high": 2}}, "stage").clip.high) is float


def test_errors_inside_a_nested_plain_dict_name_the_full_key():
    assert _error({"_target_": Settings, "clip": {"hihg": 1.0}}) == \
        "config stage.clip.hihg: unknown key for Clip (did you mean high?)"
    assert _error({"_target_": Settings, "clip": {"high": "big"}}) == \
        "config stage.clip.high: expected float, got str 'big'"
    assert _error({"_target_": Settings, "clip": {"low": 0}}) == "config stage.clip.low: must be > 0, got 0.0"


def test_config_value_error_becomes_config_error_with_the_dotted_key():
    node = {"_target_": "lightrlhf.models.spec.ModelSpec", "name_or_path": "x", "lora": {"r": 0}}
    with pytest.raises(ConfigError) as info:
        build(node, "model")
    assert str(info.value) == "config model.lora.r: must be > 0, got 0"
    assert info.value.key == "model.lora.r"
    # the same node with a valid value builds the real spec, LoRA block included
    spec = build({**node, "lora": {"r": 4, "alpha": 8}}, "model")
    assert spec == ModelSpec(name_or_path="x", lora=LoraSpec(r=4, alpha=8.0))
    assert build({**node, "lora": None}, "model").lora is None


def test_third_party_value_error_becomes_a_config_error_naming_the_node():
    # datetime.date is a C type without a signature: nothing is checked up front, the constructor complains
    assert _error({"_target_": "datetime.date", "year": 2024, "month": 13, "day": 1}, key="trainer.start") == \
        "config trainer.start: month must be in 1..12"
    assert build({"_target_": "datetime.date", "year": 2024, "month": 2, "day": 29}, "k") == datetime.date(2024, 2, 29)
    # only the first line of a multi-line message
    assert _error({"_target_": refusing, "value": 3}, key="x") == "config x: value out of range"
    assert _error({"_target_": conflicting}, key="trainer") == "config trainer: flag conflicts with strategy"


def test_user_errors_pass_through_and_bugs_keep_their_type():
    with pytest.raises(UserError) as info:
        build({"_target_": refusing_as_user}, "x")
    assert type(info.value) is UserError and str(info.value) == "data/x.jsonl:3: broken"
    with pytest.raises(TypeError, match="a real bug"):
        build({"_target_": buggy}, "x")


def test_lists_of_nodes_are_built_with_indexed_keys():
    built = build([{"_target_": Item, "n": 1}, {"_target_": Item, "n": 2}], "callbacks")
    assert built == [Item(1), Item(2)]
    assert _error([{"_target_": Item, "n": 1}, {"_target_": Item, "n": 0}], key="callbacks") == \
        "config callbacks[1].n: must be > 0, got 0"
    assert _error({"_target_": Holder, "items": [{"_target_": Item, "n": 1}, {"_target_": Item, "m": 1}]}, key="h") == \
        "config h.items[1].m: unknown key for Item"
    # plain (target-less) mappings are walked too
    assert _error({"a": {"b": [{"_target_": Item, "n": -1}]}}, key="root") == "config root.a.b[0].n: must be > 0, got -1"
    assert build({"a": {"_target_": Item, "n": 3}, "b": [1, "x"]}, "root") == {"a": Item(3), "b": [1, "x"]}


def test_unimportable_target_names_the_target_key():
    error = _error({"_target_": "no_such_module.Thing", "n": 1}, key="model.head")
    assert error.startswith("config model.head._target_: cannot import 'no_such_module.Thing' (")
    error = _error({"_target_": "lightrlhf.validation.no_such_check"}, key="k")
    assert error.startswith("config k._target_: cannot import 'lightrlhf.validation.no_such_check' (")
    assert "\n" not in error


# --- partial and given arguments ----------------------------------------------------------------


def test_partial_returns_a_functools_partial_without_requiring_keys():
    made = build({"_target_": Needs, "_partial_": True, "steps": 3}, "optim")
    assert isinstance(made, functools.partial)
    assert made.func is Needs and made.keywords == {"steps": 3}
    assert made(lr=0.1) == Needs(lr=0.1, steps=3)
    # values are still checked
    assert _error({"_target_": Needs, "_partial_": True, "steps": "3"}, key="optim") == \
        "config optim.steps: expected int, got str '3'"


def test_given_keyword_arguments_replace_config_keys():
    marker = object()  # not an int: given arguments are not type checked
    made = build({"_target_": Holder, "items": [{"_target_": Item, "n": 0}], "extra": "from config"}, "h",
                 items=marker)
    assert made.items is marker and made.extra == "from config"  # the invalid config node was never built
    assert build({"_target_": Needs, "lr": "not a float"}, "optim", lr=0.5) == Needs(lr=0.5)
    assert build({"_target_": Needs}, "optim", lr=0.5) == Needs(lr=0.5)  # fills a required key
