"""The human path of stage=pbrl: clips rendered to GIFs and asked through the labelling page's files.

A program that answers each pair from the clips' true returns (kept in the candidates' meta, never shown
on the page) is the oracle: the run it labels is the oracle's run, step for step. A headless browser
labels three rendered clip pairs on the real page (skipped without Chromium, as the feedback tests are).
"""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from conftest import every_curve, train_cli

from lightrlhf.control.clips import Clips
from lightrlhf.control.envs import EnvSpec
from lightrlhf.control.human import HumanSpec, HumanTeacher

TINY = ["stage=pbrl", "env=cartpole", "stage.env_steps=3072", "stage.queries.total=12", "stage.queries.rounds=3",
        "stage.queries.every=1", "trainer.val_check_interval=3", "stage.human.serve=false", "stage.human.poll_s=0.2",
        "stage.human.frame_width=60", "seed=5"]


class TruthfulLabeller(threading.Thread):
    """Answers every pair of a candidates file from the true returns in its meta, through the label store."""

    def __init__(self, folder) -> None:
        super().__init__(daemon=True)
        self.folder, self.stop, self.answered = folder, threading.Event(), 0

    def run(self) -> None:
        from lightrlhf.feedback.store import LabelStore

        candidates, done = self.folder / "candidates.jsonl", set()
        while not self.stop.is_set():
            if candidates.exists():
                with LabelStore(self.folder / "labels.jsonl") as store:
                    for line in candidates.read_text().splitlines():
                        row = json.loads(line)
                        if row["id"] in done:
                            continue
                        a, b = row["meta"]["true_return_a"], row["meta"]["true_return_b"]
                        store.append(row["id"], "truthful", "a" if a > b else "b" if b > a else "tie")
                        done.add(row["id"])
                        self.answered += 1
            time.sleep(0.1)


@pytest.mark.slow
def test_labels_given_through_the_files_are_interchangeable_with_the_simulated_oracle(tmp_path):
    oracle_dir, human_dir = tmp_path / "oracle", tmp_path / "human"
    done = train_cli(TINY + [f"hydra.run.dir={oracle_dir}"])
    assert done.returncode == 0, done.stderr[-3000:]
    labeller = TruthfulLabeller(human_dir / "feedback")
    labeller.start()
    try:
        done = train_cli(TINY + ["stage.teacher=human", f"hydra.run.dir={human_dir}"])
    finally:
        labeller.stop.set()
        labeller.join()
    assert done.returncode == 0, done.stderr[-3000:]
    assert labeller.answered == 12
    rows = [json.loads(line) for line in (human_dir / "feedback" / "candidates.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows[:5]] == ["it0000-q000", "it0000-q001", "it0000-q002", "it0000-q003", "it0000-q004"]
    for row in rows:  # every clip rendered, every path relative to the candidates file
        for side in ("a_media", "b_media"):
            assert (human_dir / "feedback" / row[side]).read_bytes()[:6] == b"GIF89a"
    got, want = every_curve(human_dir), every_curve(oracle_dir)
    assert sorted(got) == sorted(want)
    for tag in want:
        assert got[tag] == want[tag], tag


def _round(n: int) -> tuple[Clips, Clips]:
    """n pairs of 10-step CartPole clips: a pole falling to the left and one staying up."""
    steps = torch.arange(10.0)
    falling = torch.stack([torch.zeros(10), torch.zeros(10), 0.03 * steps, 0.3 * torch.ones(10)], dim=1)
    upright = torch.zeros(10, 4)
    def clips(obs, reward):  # noqa: E306
        return Clips(torch.zeros(n, 10, 6), torch.full((n, 10), reward), obs.expand(n, 10, 4).clone(),
                     torch.zeros(n, 10, dtype=torch.long))
    return clips(falling, 0.0), clips(upright, 1.0)


@pytest.fixture(scope="module")
def browser():
    from feedback.feedback_support import browser_session

    yield from browser_session()


@pytest.mark.slow
def test_a_person_labels_three_rendered_clip_pairs_on_the_page(tmp_path, browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    from lightrlhf.feedback.server import serve_in_thread

    env = EnvSpec(task="cartpole", horizon=50, num_envs=1, eval_episodes=1, eval_seed=0, fall_steps=5)
    teacher = HumanTeacher(HumanSpec(directory=str(tmp_path), serve=False, frame_width=120), env)
    ids = ["it0000-q000", "it0000-q001", "it0000-q002"]
    a, b = _round(3)
    teacher.write_round(0, ids, a, b)
    assert teacher.answers(ids) == {}
    with serve_in_thread(teacher.candidates_path, teacher.labels_path) as url:
        browser.get(url + "/")
        browser.find_element(By.ID, "annotator").send_keys("ana", Keys.ENTER)
        for labelled, query_id in enumerate(ids):
            WebDriverWait(browser, 30).until(
                lambda d, i=query_id: d.execute_script("return document.getElementById('pair').dataset.id") == i
                and not d.find_element(By.ID, "choose-left").get_attribute("disabled"))
            # both clips are shown as loaded animations
            WebDriverWait(browser, 30).until(lambda d: d.execute_script(
                "return [...document.querySelectorAll('#pair img')].filter(i => i.complete && i.naturalWidth > 0)"
                ".length") == 2)
            # the person picks the upright pole, wherever the page put it
            upright = "left" if browser.find_element(By.ID, "left").get_attribute("data-side") == "b" else "right"
            browser.find_element(By.ID, f"choose-{upright}").click()
        WebDriverWait(browser, 30).until(lambda _: len(teacher.answers(ids)) == 3)
    assert teacher.answers(ids) == {i: "b" for i in ids}
    meta = [json.loads(line)["meta"] for line in teacher.candidates_path.read_text().splitlines()]
    assert [(m["true_return_a"], m["true_return_b"]) for m in meta] == [(0.0, 10.0)] * 3
