"""OmegaConf resolvers the config tree uses (registered once, on import of `lightrlhf.launch`).

- `${lightrlhf.asset:tiny}`: the directory of a model shipped inside the package.
- `${lightrlhf.run_dir:${resume},<default>}`: the run directory -- the resumed run's own directory
  when `resume=<dir>` is given, so a resumed run continues in place, else the default.
- `${lightrlhf.output_subdir:${resume}}`: `.hydra` for a new run; null for a resumed run, so that
  Hydra does not overwrite the record of how the run was first launched.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from lightrlhf.errors import ConfigError


def asset(name: str) -> str:
    from lightrlhf.demo.shipped import ASSETS_DIR

    path = ASSETS_DIR / name
    if not path.is_dir():
        known = sorted(p.name for p in ASSETS_DIR.iterdir() if p.is_dir())
        raise ConfigError("model.name_or_path", f"no shipped model {name!r} (shipped: {', '.join(known)})")
    return str(path)


def run_dir(resume: str | None, default: str) -> str:
    if resume in (None, ""):
        return default
    path = Path(str(resume)).expanduser()
    return str(path)


def output_subdir(resume: str | None) -> str | None:
    return ".hydra" if resume in (None, "") else None


def register() -> None:
    for name, fn in {"lightrlhf.asset": asset, "lightrlhf.run_dir": run_dir,
                     "lightrlhf.output_subdir": output_subdir}.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)
