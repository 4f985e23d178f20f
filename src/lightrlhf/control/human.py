"""A person as the teacher: each round's clip pairs become candidates of the labelling page
(lightrlhf.feedback), shown as short animations, and the run waits for the labels.

    <directory>/clips/<id>-a.gif, <id>-b.gif      each clip rendered by gymnasium (`rgb_array`)
    <directory>/candidates.jsonl                   every round's pairs so far, in the page's format
    <directory>/labels.jsonl                       the page's append-only labels (read with read_labels)

While it waits the run serves the page itself (human.serve, on human.host:human.port; a page left open
picks up the next round when it is reloaded), or, with serve=false, anyone may serve the files with
`python -m lightrlhf.feedback serve <directory>/candidates.jsonl --out <directory>/labels.jsonl`. Candidate ids
name the iteration and the pair (`it0008-q003`), so a run resumed after a kill asks for the same pairs
again and finds the answers already given. Each candidate's `meta` keeps the clips' hidden true returns
(never sent to the page), so a person's agreement with the truth can be measured afterwards, and a
program that answers from them is the oracle: labels are labels, whoever gives them.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from lightrlhf.control.clips import Clips
from lightrlhf.control.envs import EnvSpec, make_training_envs, set_render_state
from lightrlhf.errors import UserError
from lightrlhf.io import atomic_write, atomic_write_text
from lightrlhf.validation import positive, require

log = logging.getLogger(__name__)
CANDIDATES, LABELS, CLIPS = "candidates.jsonl", "labels.jsonl", "clips"
QUESTION = {"cartpole": "Which cart keeps its pole upright, without running off the track?",
            "pendulum": "Which pendulum is swung up and held upright, pointing straight up and still?"}


@dataclass(frozen=True)
class HumanSpec:
    """directory: where candidates, labels and clips go. serve: the run serves the labelling page while
    it waits, on host:port. annotator: only this annotator's labels count (null = anyone's). poll_s:
    seconds between looks at the labels file. timeout_s: give up after this long (null = never).
    frame_width: pixels across a clip. frames_per_second: playback speed."""

    directory: str
    serve: bool = True
    host: str = "127.0.0.1"
    port: int = 8765
    annotator: str | None = None
    poll_s: float = 2.0
    timeout_s: float | None = None
    frame_width: int = 240
    frames_per_second: int = 25

    def __post_init__(self) -> None:
        require(0 <= self.port < 65536, "port", f"must be in [0, 65535], got {self.port}")
        positive("poll_s", self.poll_s)
        if self.timeout_s is not None:
            positive("timeout_s", self.timeout_s)
        positive("frame_width", self.frame_width)
        positive("frames_per_second", self.frames_per_second)


def render_gif(env_spec: EnvSpec, env: Any, observations: np.ndarray, actions: np.ndarray, width: int,
               frames_per_second: int) -> bytes:
    """One clip as an animated GIF: each step's observation put back into `env` and rendered."""
    import io

    from PIL import Image

    frames = []
    for obs, action in zip(observations, actions):
        set_render_state(env_spec, env, obs, action)
        frame = Image.fromarray(env.render())
        height = round(frame.height * width / frame.width)
        frames.append(frame.resize((width, height), Image.Resampling.BILINEAR).convert("P", palette=Image.ADAPTIVE))
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], loop=0,
                   duration=round(1000 / frames_per_second))
    return buffer.getvalue()


class HumanTeacher:
    def __init__(self, spec: HumanSpec, env_spec: EnvSpec, should_stop: Any = None) -> None:
        self.spec, self.env_spec = spec, env_spec
        self.directory = Path(spec.directory)
        self.should_stop = should_stop or (lambda: False)
        self._renderer = None

    @property
    def candidates_path(self) -> Path:
        return self.directory / CANDIDATES

    @property
    def labels_path(self) -> Path:
        return self.directory / LABELS

    def write_round(self, iteration: int, ids: list[str], a: Clips, b: Clips) -> None:
        """Render the round's clips and add its pairs to the candidates file (rewritten atomically:
        earlier rounds kept, this round's ids replaced if a resumed run writes them again)."""
        if self._renderer is None:
            self._renderer = make_training_envs(replace(self.env_spec, num_envs=1), render=True).envs[0]
            self._renderer.reset(seed=0)
        clips_dir = self.directory / CLIPS
        clips_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, query_id in enumerate(ids):
            media = {}
            for side, clips in (("a", a), ("b", b)):
                name = f"{CLIPS}/{query_id}-{side}.gif"
                gif = render_gif(self.env_spec, self._renderer, clips.observations[i].numpy(),
                                 clips.actions[i].numpy(), self.spec.frame_width, self.spec.frames_per_second)
                atomic_write(self.directory / name, lambda f, data=gif: f.write(data))
                media[f"{side}_media"] = name
            length = clips.observations.shape[1]
            meta = {"task": self.env_spec.task, "iteration": iteration,
                    "true_return_a": float(a.true_rewards[i].sum()), "true_return_b": float(b.true_rewards[i].sum())}
            rows.append({"id": query_id, "prompt": QUESTION[self.env_spec.task], "a": f"clip A ({length} steps)",
                         "b": f"clip B ({length} steps)", **media, "meta": meta})
        existing = []
        if self.candidates_path.exists():
            fresh = set(ids)
            existing = [line for line in self.candidates_path.read_text().splitlines()
                        if line.strip() and json.loads(line)["id"] not in fresh]
        atomic_write_text(self.candidates_path, "\n".join(existing + [json.dumps(r) for r in rows]) + "\n")

    def answers(self, ids: list[str]) -> dict[str, str]:
        """The effective labels given so far for these ids (by the configured annotator, if any)."""
        if not self.labels_path.exists():
            return {}
        from lightrlhf.feedback.labels import read_labels

        wanted, found = set(ids), {}
        for label in read_labels(self.labels_path):
            if label.id in wanted and (self.spec.annotator is None or label.annotator == self.spec.annotator):
                found[label.id] = label.choice
        return found

    def ask(self, iteration: int, a: Clips, b: Clips) -> list[str]:
        ids = [f"it{iteration:04d}-q{i:03d}" for i in range(len(a))]
        self.write_round(iteration, ids, a, b)
        if not self.spec.serve:
            log.info("iteration %d: %d pairs to label; serve them with: python -m lightrlhf.feedback serve %s --out %s",
                     iteration, len(ids), self.candidates_path, self.labels_path)
            return self.wait(iteration, ids)
        from lightrlhf.feedback.server import serve_in_thread

        with serve_in_thread(self.candidates_path, self.labels_path, self.spec.host, self.spec.port) as url:
            log.info("iteration %d: %d pairs to label: open %s/", iteration, len(ids), url)
            return self.wait(iteration, ids)

    def wait(self, iteration: int, ids: list[str]) -> list[str]:
        started = time.monotonic()
        reported = -1
        while True:
            found = self.answers(ids)
            if len(found) == len(ids):
                return [found[i] for i in ids]
            if len(found) != reported:
                log.info("iteration %d: %d of %d pairs labelled (labels: %s)", iteration, len(found), len(ids),
                         self.labels_path)
                reported = len(found)
            if self.spec.timeout_s is not None and time.monotonic() - started > self.spec.timeout_s:
                raise UserError(f"{self.labels_path}: {len(ids) - len(found)} of iteration {iteration}'s {len(ids)} "
                                f"pairs still unlabelled after {self.spec.timeout_s:g} s (human.timeout_s)")
            if self.should_stop():
                raise KeyboardInterrupt
            time.sleep(self.spec.poll_s)
