"""The pairs to label: `candidates.jsonl`, read and checked before anything is served.

One JSON object a line (blank lines skipped):

    {"id": str, "prompt": str, "a": str, "b": str,                     required
     "policy": str, "selection": str, "score": float, "meta": {...},   optional, shown nowhere, kept
     "a_media": str, "b_media": str}                                   optional image/animation files

`a_media`/`b_media` are paths relative to the candidates file's folder (a clip of a control task, a
rendered image); the page shows them above the response text. Every problem is one line naming the
file and line: a malformed line, a missing or mistyped field, an empty id, a duplicate id (with the
line of its first use), a media file that does not exist. An empty file is an error too: a server
with nothing to ask is a mistake, not a quiet success.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightrlhf.data.readers import iter_rows, json_type
from lightrlhf.errors import DataError

REQUIRED = ("id", "prompt", "a", "b")
MEDIA = ("a_media", "b_media")
_OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {"policy": (str,), "selection": (str,), "score": (int, float),
                                                "meta": (dict,), "a_media": (str,), "b_media": (str,)}


@dataclass(frozen=True)
class Candidate:
    id: str
    prompt: str
    a: str
    b: str
    where: str  # "candidates.jsonl:7"
    a_media: str | None = None  # as written in the file (relative to its folder)
    b_media: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # policy, selection, score, meta

    def public(self) -> dict[str, Any]:
        """What the page is sent: the texts and media, never the selection score (it would bias the rater)."""
        shown = {"id": self.id, "prompt": self.prompt, "a": self.a, "b": self.b}
        shown.update({name: getattr(self, name) for name in MEDIA if getattr(self, name) is not None})
        return shown


def read_candidates(path: str | Path) -> list[Candidate]:
    """Every candidate of the file, in file order (the order the pairs are asked in)."""
    path = Path(path)
    candidates: list[Candidate] = []
    first_line: dict[str, str] = {}
    for row in iter_rows(str(path)):
        candidate = _candidate(row.values, row.where, path.parent)
        if candidate.id in first_line:
            raise DataError(row.where, None, f'duplicate id "{candidate.id}" (first at {first_line[candidate.id]})')
        first_line[candidate.id] = row.where
        candidates.append(candidate)
    return candidates


def media_path(candidates_path: str | Path, relative: str) -> Path:
    """Where a candidate's media file lies: relative to the candidates file's folder."""
    return Path(candidates_path).parent / relative


def _candidate(values: dict[str, Any], where: str, folder: Path) -> Candidate:
    for name in REQUIRED:
        if values.get(name) is None:
            raise DataError(where, None, f'field "{name}" is {"null" if name in values else "missing"}')
        if not isinstance(values[name], str):
            raise DataError(where, None, f'field "{name}" must be a string, got {json_type(values[name])}')
    if not values["id"].strip():
        raise DataError(where, None, 'field "id" is empty')
    for name, types in _OPTIONAL_TYPES.items():
        value = values.get(name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, types)):
            wanted = {str: "a string", dict: "an object"}.get(types[0], "a number")
            raise DataError(where, None, f'field "{name}" must be {wanted}, got {json_type(value)}')
    for name in MEDIA:
        relative = values.get(name)
        if relative is not None and not (folder / relative).is_file():
            raise DataError(where, None, f'field "{name}": no such file {folder / relative}')
    extra = {k: v for k, v in values.items() if k not in REQUIRED and k not in MEDIA}
    return Candidate(values["id"], values["prompt"], values["a"], values["b"], where,
                     values.get("a_media"), values.get("b_media"), extra)
