"""The one place where config nodes become objects (`_target_` instantiation), with checks.

Hydra's `instantiate` reports a bad value as a long traceback from deep inside a constructor. This
builder instantiates the same `_target_` nodes bottom-up and checks each node against the
signature of the callable it names, so the constructor *is* the schema:

- a key the callable does not take: `config stage.clip_rnage: unknown key for PPOStage (did you mean clip_range?)`
- a value of the wrong type, from the parameter's annotation: `config stage.ppo_epochs: expected int, got str 'four'`
- a required key that is missing: `config data.path: required by DataSource, but not set`
- a value the constructor rejects (`ConfigValueError` from `lightrlhf.validation`):
  `config model.lora.r: must be > 0, got 0`

`_partial_: true` returns a `functools.partial` for parts that need arguments only known later.
Keyword arguments given to `build` (`tokenizer=...`) are passed to the top node and take the
place of config keys of the same name.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import functools
import importlib
import inspect
import types
import typing
from pathlib import Path
from typing import Any

from lightrlhf.errors import ConfigError, ConfigValueError, UserError

TARGET, PARTIAL = "_target_", "_partial_"


def locate(path: str, key: str) -> Any:
    module_name, _, attr = path.rpartition(".")
    try:
        obj = importlib.import_module(module_name) if module_name else None
        for part in attr.split("."):
            obj = getattr(obj, part)
        return obj
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{key}._target_", f"cannot import {path!r} ({error})") from None


def build(node: Any, key: str, **given: Any) -> Any:
    """Instantiate `node` (plain dicts/lists, already resolved) and everything inside it."""
    if isinstance(node, list):
        return [build(item, f"{key}[{i}]") for i, item in enumerate(node)]
    if not isinstance(node, dict):
        return node
    if TARGET not in node:
        return {k: (given[k] if k in given else build(v, _join(key, k))) for k, v in node.items()}
    target = node[TARGET] if callable(node[TARGET]) else locate(str(node[TARGET]), key)
    partial = bool(node.get(PARTIAL, False))
    fields = {k: v for k, v in node.items() if k not in (TARGET, PARTIAL)}
    params, accepts_any = parameters(target)
    name = getattr(target, "__name__", str(target))
    for k in fields:
        if k not in params and not accepts_any and k not in given:
            raise _unknown_key(_join(key, k), k, params, name)
    kwargs = {k: build(v, _join(key, k)) for k, v in fields.items() if k not in given}
    kwargs.update(given)
    hints = _type_hints(target)
    for k, value in list(kwargs.items()):
        if k in hints and k not in given:
            checked = check_type(value, hints[k], _join(key, k))
            if isinstance(checked, _Structured):
                checked = build({TARGET: checked.cls, **checked.fields}, _join(key, k))
            kwargs[k] = checked
    if not partial:
        for k, p in params.items():
            if p.default is inspect.Parameter.empty and k not in kwargs and p.kind in (
                    inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                raise ConfigError(_join(key, k), f"required by {name}, but not set")
        return call(target, key, kwargs)
    return functools.partial(target, **kwargs)


def call(target: Any, key: str, kwargs: dict[str, Any]) -> Any:
    """Call a config target, turning its complaints about arguments into one-line config errors."""
    try:
        return target(**kwargs)
    except ConfigValueError as error:
        raise ConfigError(_join(key, error.param), error.problem) from None
    except UserError:
        raise
    except ValueError as error:  # third-party constructors (torch, Lightning) reject values this way
        raise ConfigError(key, _first_line(error)) from None
    except Exception as error:
        if type(error).__name__ == "MisconfigurationException":  # Lightning's "your settings conflict"
            raise ConfigError(key, _first_line(error)) from None
        raise


def _unknown_key(key: str, name: str, params: dict[str, inspect.Parameter], target_name: str) -> ConfigError:
    hint = difflib.get_close_matches(name, list(params), n=1)
    return ConfigError(key, f"unknown key for {target_name}" + (f" (did you mean {hint[0]}?)" if hint else ""))


@dataclasses.dataclass
class _Structured:
    cls: type
    fields: dict[str, Any]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def parameters(target: Any) -> tuple[dict[str, inspect.Parameter], bool]:
    """The named parameters `target` takes, and whether it also takes any keyword (`**kwargs`, or no
    signature to read)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return {}, True
    params = {k: p for k, p in signature.parameters.items()
              if p.kind not in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)}
    accepts_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values())
    return params, accepts_any


def _type_hints(target: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # unresolvable forward references: check nothing rather than guess
        return {}


def _type_name(hint: Any) -> str:
    if hint is type(None):
        return "null"
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    args = typing.get_args(hint)
    if origin in (list, collections.abc.Sequence) or (origin is tuple and args and args[-1] is Ellipsis):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin is tuple and args:
        return f"a list of {len(args)} ({', '.join(_type_name(a) for a in args)})"
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(hint, "__name__", str(hint))


def check_type(value: Any, hint: Any, key: str) -> Any:
    """`value` converted to fit `hint` (int -> float, list -> tuple, str -> Path), or a ConfigError."""
    ok, converted = _fits(value, hint)
    if not ok:
        shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
        raise ConfigError(key, f"expected {_type_name(hint)}, got {type(value).__name__} {shown}")
    return converted


def _fits(value: Any, hint: Any) -> tuple[bool, Any]:
    if dataclasses.is_dataclass(hint) and isinstance(hint, type) and isinstance(value, dict) and TARGET not in value:
        # a nested settings block given as a plain mapping (no _target_): build its dataclass
        return True, _Structured(hint, value)
    if hint is Any or hint is inspect.Parameter.empty or isinstance(hint, (str, typing.TypeVar)):
        return True, value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            ok, converted = _fits(value, arg)
            if ok:
                return True, converted
        return False, value
    if origin is typing.Literal:
        return value in args, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else value
    if hint is str:
        return isinstance(value, str), value
    if hint is Path:
        return isinstance(value, (str, Path)), Path(value) if isinstance(value, str) else value
    if origin in (list, tuple, collections.abc.Sequence):
        if not isinstance(value, (list, tuple)):
            return False, value
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                return False, value
            pairs = [_fits(v, a) for v, a in zip(value, args)]
        else:
            pairs = [_fits(v, args[0]) for v in value] if args else [(True, v) for v in value]
        if not all(ok for ok, _ in pairs):
            return False, value
        items = [c for _, c in pairs]
        return True, tuple(items) if origin is tuple else items
    if origin in (dict, collections.abc.Mapping):
        return isinstance(value, dict), value
    if origin is collections.abc.Callable or hint is collections.abc.Callable:
        return callable(value), value
    if inspect.isclass(hint):
        try:
            return isinstance(value, hint), value
        except TypeError:
            return True, value
    return True, value


def validate(node: Any, key: str, given: tuple[str, ...] = ()) -> None:
    """Check a node as `build` would -- importable targets, known keys, value types, required keys --
    without calling anything. For configs whose targets need hardware or packages this machine
    lacks (a GPU strategy, an optional logger). `given` names arguments supplied at build time."""
    if isinstance(node, list):
        for i, item in enumerate(node):
            validate(item, f"{key}[{i}]")
        return
    if not isinstance(node, dict):
        return
    if TARGET not in node:
        for k, v in node.items():
            validate(v, _join(key, k))
        return
    target = locate(str(node[TARGET]), key)
    params, accepts_any = parameters(target)
    hints = _type_hints(target)
    name = getattr(target, "__name__", str(target))
    for k, value in node.items():
        if k in (TARGET, PARTIAL):
            continue
        if k not in params and not accepts_any and k not in given:
            raise _unknown_key(_join(key, k), k, params, name)
        if isinstance(value, dict) and TARGET in value or isinstance(value, list):
            validate(value, _join(key, k))
        elif k in hints:
            check_type(value, hints[k], _join(key, k))
    if node.get(PARTIAL, False):
        return  # its remaining arguments come when it is called
    for k, p in params.items():
        if p.default is inspect.Parameter.empty and k not in node and k not in given and p.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
            raise ConfigError(_join(key, k), f"required by {name}, but not set")
